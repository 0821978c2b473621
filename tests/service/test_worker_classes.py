"""Jobs go to workers that can run them: a job asking for a GPU waits for a GPU worker, and says so."""

from __future__ import annotations

import os
import re
import signal
import time

import requests
from rq import Worker

from app.api import create_app
from app.service import jobs
from app.service.workers import LIVENESS_MARGIN_S
from tests.helpers import TINY_JOB, service_settings, wait_for


def test_with_no_worker_a_queued_job_says_which_class_of_worker_it_waits_for(redis_url, tmp_path):
    client = create_app(service_settings(redis_url, tmp_path)).test_client()
    ids = {
        a: client.post("/train", json=TINY_JOB | {"accelerator": a}).get_json()["job_id"] for a in ("gpu", "cpu", "any")
    }
    waiting = {a: client.get(f"/jobs/{job_id}").get_json()["waiting"] for a, job_id in ids.items()}
    assert waiting == {
        "gpu": "waiting for a gpu worker",
        "cpu": "waiting for a cpu worker",
        "any": "waiting for a worker",
    }
    listed = client.get("/jobs").get_json()
    assert listed["total"] == 3 and {j["params"]["accelerator"] for j in listed["jobs"]} == {"gpu", "cpu", "any"}
    assert 'boolq_jobs{status="queued"} 3.0' in client.get("/metrics").get_data(as_text=True)
    assert "waiting for a gpu worker" in client.get(f"/console/jobs/{ids['gpu']}").get_data(as_text=True)


def test_an_unknown_accelerator_is_422_naming_the_field(redis_url, tmp_path):
    client = create_app(service_settings(redis_url, tmp_path)).test_client()
    response = client.post("/train", json=TINY_JOB | {"accelerator": "tpu"})
    assert response.status_code == 422 and "accelerator" in response.get_json()["error"]["fields"]


def test_a_cpu_worker_runs_cpu_then_any_jobs_and_never_takes_a_gpu_job(launcher, redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path, device="cpu")  # a CPU worker even on a machine with a GPU
    url = launcher.server(settings, workers=1)
    gpu, anywhere, cpu = (  # queued before any worker runs, the any job before the cpu job
        requests.post(f"{url}/train", json=TINY_JOB | {"accelerator": a}, timeout=30).json()["job_id"]
        for a in ("gpu", "any", "cpu")
    )
    worker = launcher.worker(settings)
    for job_id in (cpu, anywhere):
        wait_for(lambda j=job_id: job(url, j)["status"] not in ("queued", "running"), 180, f"job {job_id}")
        assert job(url, job_id)["status"] == "succeeded", job(url, job_id)

    view = job(url, gpu)
    assert view["status"] == "queued" and view["waiting"] == "waiting for a gpu worker"
    assert gpu not in worker.log_path.read_text()
    metrics = requests.get(f"{url}/metrics", timeout=30).text
    workers = dict(re.findall(r'boolq_workers\{accelerator="(\w+)"\} (\S+)', metrics))
    assert workers == {"any": "1.0", "cpu": "1.0", "gpu": "0.0"}
    # The worker timed both jobs it ran, in Redis: each counted once, on every replica alike.
    for kind in ("queue_wait", "duration"):
        assert f"boolq_job_{kind}_seconds_count 2.0" in metrics, kind
        assert f'boolq_job_{kind}_seconds_bucket{{le="+Inf"}} 2.0' in metrics, kind
    assert float(re.search(r"boolq_job_duration_seconds_sum (\S+)", metrics)[1]) > 0
    queue = jobs.training_queue(settings, jobs.connect_redis(settings))
    # The worker takes its class's queue first: the cpu job ran, then the any job queued before it; newest first.
    assert jobs.latest_succeeded_job_id(queue) == anywhere
    succeeded, total = jobs.recent_jobs_with_status(queue, "succeeded", page=1, per_page=20)
    assert [j.id for j in succeeded] == [anywhere, cpu] and total == 2
    [record] = Worker.all(queue=queue)
    advertised = record.connection.hmget(record.key, "boolq_accelerator", "boolq_gpus", "boolq_cpu_cores")
    assert advertised[:2] == [b"cpu", b"0"] and int(advertised[2]) >= 1

    cancelled = requests.post(f"{url}/jobs/{gpu}/cancel", timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    counts = dict(re.findall(r'boolq_jobs\{status="(\w+)"\} (\S+)', requests.get(f"{url}/metrics", timeout=30).text))
    assert counts["succeeded"] == "2.0" and counts["cancelled"] == "1.0" and counts["queued"] == "0.0"


def job(url: str, job_id: str) -> dict:
    return requests.get(f"{url}/jobs/{job_id}", timeout=30).json()


def test_a_gpu_job_with_only_a_cpu_worker_fails_after_worker_wait_s_naming_why_and_wait_true_says_so(
    launcher, redis_url, tmp_path
):
    settings = service_settings(redis_url, tmp_path, device="cpu", worker_wait_s=4)
    launcher.worker(settings)  # live, but of the cpu class
    client = create_app(settings).test_client()
    gpu_job = TINY_JOB | {"accelerator": "gpu"}

    early = client.post("/train?wait=true&timeout=1", json=gpu_job)
    assert early.status_code == 202 and early.get_json()["status"] == "queued"
    assert early.get_json()["reason"] == (
        "waiting for a gpu worker: none is live; the job fails if none comes within 4 s (WORKER_WAIT_S)"
    )
    started = time.monotonic()
    waited = client.post("/train?wait=true&timeout=60", json=gpu_job)
    assert waited.status_code == 200 and time.monotonic() - started < 15, waited.get_json()
    for view in (waited.get_json(), client.get(f"/jobs/{early.get_json()['job_id']}").get_json()):
        assert view["status"] == "failed" and view["error"]["type"] == "NoWorker", view
        assert "no live gpu worker for 4 s (WORKER_WAIT_S)" in view["error"]["message"]
    assert 'boolq_jobs{status="queued"} 0.0' in client.get("/metrics").get_data(as_text=True)  # off the caps


def test_a_killed_worker_leaves_the_live_count_within_its_heartbeat_and_a_margin(launcher, redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path, device="cpu")  # WORKER_HEARTBEAT as it comes (30 s)
    worker = launcher.worker(settings)
    queue = jobs.training_queue(settings, jobs.connect_redis(settings))
    assert jobs.workers_by_class(queue) == {"any": 1, "cpu": 1, "gpu": 0}
    os.killpg(worker.pid, signal.SIGKILL)  # no goodbye: only its heartbeats stop
    worker.wait()
    killed = time.monotonic()
    wait_for(lambda: jobs.workers_by_class(queue)["cpu"] == 0, 60, "the killed worker to leave the count", 0.5)
    assert time.monotonic() - killed <= settings.worker_heartbeat + LIVENESS_MARGIN_S + 2
