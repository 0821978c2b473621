"""Prometheus metrics: request counts and latencies per endpoint; jobs per status and workers per class from Redis.

Each app (so each gunicorn worker process) has its own registry: request counters are per process and
carry the ``X-Replica`` of the process that served the scrape; job counts come from Redis and are global.
"""

from __future__ import annotations

import logging
import time

from flask import Flask, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from redis.exceptions import RedisError
from rq import Queue

from app.service import jobs

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


class ServiceMetrics:
    def __init__(self, queue: Queue):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "boolq_http_requests",
            "HTTP requests served by this process",
            ["method", "endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "boolq_http_request_duration_seconds",
            "Request latency in this process",
            ["method", "endpoint"],
            registry=self.registry,
        )
        self.predict_batch_size = Histogram(
            "boolq_predict_batch_size",
            "Pairs per /predict forward pass in this process (micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.registry.register(JobsByStatus(queue))

    def instrument(self, app: Flask) -> None:
        @app.before_request
        def start_timer():
            g.request_started = time.perf_counter()

        @app.after_request
        def observe(response):
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            self.requests.labels(request.method, endpoint, str(response.status_code)).inc()
            if "request_started" in g:
                self.latency.labels(request.method, endpoint).observe(time.perf_counter() - g.request_started)
            return response
