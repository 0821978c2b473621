"""The job index: GET /jobs and /metrics cost the same with 2,000 stored jobs as with 20.

Costs are compared side by side on one Redis (two queues, measured alternately, median of many), so a busy
machine slows both alike; no absolute time is asserted.
"""

from __future__ import annotations

import statistics
import time

import pytest
from rq.job import JobStatus

from app.api import create_app
from app.params import TrainParams
from app.service import jobs
from tests.helpers import TINY_JOB, service_settings

MANY = 2000
FEW = 20


def store_jobs(settings, count: int, failed: bool = False):
    """``count`` real RQ jobs on the settings' queue (no worker listens, so they stay where they are put)."""
    queue = jobs.training_queue(settings, jobs.connect_redis(settings))
    params = TrainParams(**TINY_JOB)
    stored = [jobs.enqueue_training(queue, params, settings) for _ in range(count)]
    if failed:
        with queue.connection.pipeline() as pipe:
            for job in stored:
                queue.remove(job, pipeline=pipe)
                job.set_status(JobStatus.FAILED, pipeline=pipe)
                queue.failed_job_registry.add(job, ttl=3600, exc_string="boom", pipeline=pipe)
            pipe.execute()
    return queue, stored


def median_cost(client, path: str, other_client, rounds: int = 15) -> tuple[float, float]:
    """Median seconds of ``path`` on each client, measured alternately."""
    mine, theirs = [], []
    for _ in range(rounds):
        for target, samples in ((client, mine), (other_client, theirs)):
            started = time.perf_counter()
            assert target.get(path).status_code == 200
            samples.append(time.perf_counter() - started)
    return statistics.median(mine), statistics.median(theirs)


@pytest.fixture(scope="module")
def few_and_many(redis_url, tmp_path_factory):
    folder = tmp_path_factory.mktemp("index")
    few = service_settings(redis_url, folder)
    many = few.model_copy(update=dict(queue_name=few.queue_name + "-many"))
    store_jobs(few, FEW, failed=True)
    store_jobs(few, FEW)
    store_jobs(many, MANY, failed=True)
    store_jobs(many, MANY)
    return create_app(few).test_client(), create_app(many).test_client()


def test_listing_a_page_costs_the_same_with_2000_jobs_as_with_20(few_and_many):
    few, many = few_and_many
    assert many.get("/jobs?per_page=20").get_json()["total"] == 2 * MANY
    cost_few, cost_many = median_cost(few, "/jobs?per_page=20", many)
    assert cost_many < 2 * cost_few, (cost_few, cost_many)


def test_metrics_cost_the_same_with_2000_failed_jobs_as_with_20(few_and_many):
    few, many = few_and_many
    text = many.get("/metrics").get_data(as_text=True)
    assert f'boolq_jobs{{status="failed"}} {float(MANY)}' in text
    assert f'boolq_jobs{{status="queued"}} {float(MANY)}' in text
    cost_few, cost_many = median_cost(few, "/metrics", many)
    assert cost_many < 2 * cost_few, (cost_few, cost_many)


def test_the_listing_is_newest_first_and_drops_expired_records(redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path)
    queue, stored = store_jobs(settings, 6)
    client = create_app(settings).test_client()
    for job in stored[3:5]:
        queue.connection.delete(job.key)  # its record expired
    listed = client.get("/jobs?per_page=3").get_json()
    assert [j["job_id"] for j in listed["jobs"]] == [stored[5].id, stored[2].id, stored[1].id]
    assert listed["total"] == 4


def test_jobs_stored_before_the_index_existed_are_listed(redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path)
    queue, stored = store_jobs(settings, 3)
    queue.connection.delete(f"boolq:{queue.name}:jobs", f"boolq:{queue.name}:jobs:backfilled")
    listed = create_app(settings).test_client().get("/jobs").get_json()
    assert [j["job_id"] for j in listed["jobs"]] == [job.id for job in reversed(stored)]
