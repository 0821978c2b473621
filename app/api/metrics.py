"""Prometheus metrics: request counts and latencies per endpoint, summed over a replica's gunicorn workers; jobs per
status, workers per class, and the jobs' queue wait and run time from Redis (the same on every replica)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flask import Flask, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from redis.exceptions import RedisError
from rq import Queue

from app.service import job_times, jobs

log = logging.getLogger(__name__)


class JobsByStatus:
    """A collector asking Redis for job counts at scrape time (no state kept in the process)."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def collect(self):
        up = GaugeMetricFamily("boolq_redis_up", "1 if Redis answered the last scrape")
        try:
            counts = jobs.job_counts(self.queue)
            workers = jobs.workers_by_class(self.queue)
        except RedisError as exc:
            log.warning("metrics: redis unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        by_status = GaugeMetricFamily("boolq_jobs", "Training jobs known to Redis, by status", labels=["status"])
        for status, count in counts.items():
            by_status.add_metric([status], count)
        yield by_status
        by_class = GaugeMetricFamily(
            "boolq_workers", "Live workers taking each class of job (any: every worker)", labels=["accelerator"]
        )
        for accelerator, count in workers.items():
            by_class.add_metric([accelerator], count)
        yield by_class


class JobTimes:
    """Histograms of the jobs' queue wait and run time, which workers add to in Redis (``job_times``)."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def collect(self):
        for kind, description in (
            ("queue_wait", "Seconds a training job waited in the queue before a worker started it"),
            ("duration", "Seconds a worker ran a training job (each attempt), until it succeeded or failed"),
        ):
            try:
                buckets, total = job_times.read_job_times(self.queue.connection, self.queue.name, kind)
            except RedisError as exc:
                log.warning("metrics: redis unavailable: %s", exc)
                return
            family = HistogramMetricFamily(f"boolq_job_{kind}_seconds", description)
            family.add_metric([], buckets, total)
            yield family


class ServiceMetrics:
    """The API's own metrics. Under gunicorn (``multiproc_dir`` set by app/ops/gunicorn_conf.py) every worker process
    writes its values to files there and a scrape, whichever worker answers it, adds all of them up; without it
    (a test client, one process) they live in this registry."""

    def __init__(self, queue: Queue, multiproc_dir: Path | None = None):
        self.registry = CollectorRegistry()
        if multiproc_dir is not None:
            multiprocess.MultiProcessCollector(self.registry, path=str(multiproc_dir))
        # In multiprocess mode the metrics are read back from the files, not registered (they would count twice).
        own = None if multiproc_dir is not None else self.registry
        self.requests = Counter(
            "boolq_http_requests",
            "HTTP requests served by this replica",
            ["method", "endpoint", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "boolq_http_request_duration_seconds",
            "Request latency in this replica (endpoint /predict: the /predict latency)",
            ["method", "endpoint"],
            registry=own,
        )
        self.predict_batch_size = Histogram(
            "boolq_predict_batch_size",
            "Pairs per /predict forward pass in this replica (micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=own,
        )
        self.registry.register(JobsByStatus(queue))
        self.registry.register(JobTimes(queue))

    def instrument(self, app: Flask) -> None:
        """Count and time every request. Labels are bounded: a method the service routes (else ``other``), a route
        rule (else ``unmatched``), a status code."""
        routed = frozenset(method for rule in app.url_map.iter_rules() for method in rule.methods or ())

        @app.before_request
        def start_timer():
            g.request_started = time.perf_counter()

        @app.after_request
        def observe(response):
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            method = request.method if request.method in routed else "other"
            self.requests.labels(method, endpoint, str(response.status_code)).inc()
            if "request_started" in g:
                self.latency.labels(method, endpoint).observe(time.perf_counter() - g.request_started)
            return response
