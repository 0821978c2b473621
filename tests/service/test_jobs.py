"""Training as RQ jobs, end to end: real Redis, real `python -m app worker` processes, real (tiny) training."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from app.api import create_app
from app.api.schemas import JobView
from tests.helpers import LONG_JOB, TINY_JOB, service_settings, wait_for


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory) -> Path:
    """A model root holding a checkpoint whose config.json is not a model config: training it must fail."""
    root = tmp_path_factory.mktemp("models")
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text(json.dumps({"not": "a model config"}))
    return root


@pytest.fixture(scope="module")
def settings(redis_url, tmp_path_factory, broken_models):
    return service_settings(redis_url, tmp_path_factory.mktemp("jobs"), model_roots=(broken_models,))


@pytest.fixture(scope="module")
def worker(launcher, settings):
    return launcher.worker(settings)


@pytest.fixture(scope="module")
def client(settings, worker):
    return create_app(settings).test_client()


def final_view(client, job_id: str, timeout_s: float = 180) -> dict:
    """Poll GET /jobs/<id> until the job has ended; return every view seen (last one final)."""
    seen = []

    def ended():
        view = client.get(f"/jobs/{job_id}").get_json()
        seen.append(view)
        return view["status"] in ("succeeded", "failed", "cancelled")

    wait_for(ended, timeout_s, f"job {job_id} to end", interval_s=0.3)
    return seen


def running_with_progress(client, job_id: str) -> dict:
    def has_progress():
        view = client.get(f"/jobs/{job_id}").get_json()
        return view if view["status"] == "running" and view["progress"] else None

    return wait_for(has_progress, 180, f"job {job_id} to report progress")


@pytest.fixture(scope="module")
def succeeded(client):
    """One tiny job submitted over HTTP and followed to its end."""
    submitted = client.post("/train", json=TINY_JOB)
    views = final_view(client, submitted.get_json()["job_id"])
    return submitted, views


def test_train_answers_202_with_location_of_a_queued_job(succeeded):
    submitted, _ = succeeded
    body = submitted.get_json()
    assert submitted.status_code == 202
    assert submitted.headers["Location"] == f"/jobs/{body['job_id']}"
    assert body["status"] == "queued"


def test_job_succeeds_with_final_progress_result_and_run_folder(succeeded, settings):
    _, views = succeeded
    final = views[-1]
    JobView.model_validate(final)  # the documented schema is what the API sends
    assert final["status"] == "succeeded"
    assert {v["status"] for v in views} <= {"queued", "running", "succeeded"}
    assert final["params"]["train_limit"] == TINY_JOB["train_limit"]
    progress = final["progress"]
    assert progress["step"] == progress["total_steps"] > 0
    assert progress["epoch"] == progress["epochs"] == 1
    assert progress["dev_accuracy"] is not None and progress["examples_per_s"] > 0
    result = final["result"]
    assert result["n_eval"] == TINY_JOB["eval_limit"]
    assert result["model"] == final["job_id"]
    assert result["tracking"] == {}
    assert final["started_at"] and final["ended_at"] and final["error"] is None
    run_dir = settings.artifacts_dir / final["job_id"]
    assert (run_dir / "metrics.json").is_file() and (run_dir / "model" / "config.json").is_file()
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert result["accuracy"] == sum(r["label"] == r["prediction"] for r in rows) / len(rows)  # what it wrote


def test_predictions_endpoint_lists_each_val_example(client, succeeded):
    job_id = succeeded[1][-1]["job_id"]
    rows = client.get(f"/jobs/{job_id}/predictions").get_json()["predictions"]
    assert len(rows) == TINY_JOB["eval_limit"]
    assert set(rows[0]) == {"idx", "label", "prediction", "probability", "scores"}
    assert all(r["prediction"] == int(r["probability"] >= 0.5) for r in rows)


def test_predict_uses_the_latest_succeeded_job_by_default(client, succeeded):
    job_id = succeeded[1][-1]["job_id"]
    response = client.post("/predict", json={"question": "is the sky blue", "passage": "The sky is blue by day."})
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["model"] == job_id
    assert isinstance(body["answer"], bool) and 0 <= body["probability"] <= 1
    assert body["answer"] == (body["probability"] >= 0.5)


def test_predict_answers_a_batch_with_a_named_job(client, succeeded):
    job_id = succeeded[1][-1]["job_id"]
    items = [{"question": f"is {n} even", "passage": f"{n} is a number."} for n in range(5)]
    response = client.post("/predict", json={"items": items, "model": job_id})
    body = response.get_json()
    assert response.status_code == 200, body
    assert len(body["answers"]) == 5 and body["model"] == job_id


def test_jobs_listing_shows_the_job(client, succeeded):
    job_id = succeeded[1][-1]["job_id"]
    listing = client.get("/jobs?per_page=5").get_json()
    assert job_id in [j["job_id"] for j in listing["jobs"]]
    assert listing["page"] == 1 and listing["per_page"] == 5 and listing["total"] >= 1


def test_another_app_instance_on_the_same_redis_sees_the_same_job(settings, succeeded):
    job_id = succeeded[1][-1]["job_id"]
    other = create_app(settings).test_client()
    view = other.get(f"/jobs/{job_id}").get_json()
    assert view["status"] == "succeeded" and view["result"]["model"] == job_id


def test_wait_true_returns_accuracy_and_predictions(client):
    response = client.post("/train?wait=true&timeout=120", json=TINY_JOB)
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["status"] == "succeeded"
    assert body["metrics"]["allocator"] == "jemalloc"  # the worker restarted itself with it; its jobs fork from it
    written = client.get(f"/jobs/{body['job_id']}/predictions").get_json()["predictions"]
    assert body["predictions"] == [row["prediction"] for row in written]  # the same answers, in val order
    assert body["accuracy"] == sum(r["label"] == r["prediction"] for r in written) / TINY_JOB["eval_limit"]


def test_a_job_that_raises_is_failed_with_its_error(client):
    response = client.post("/train", json=TINY_JOB | {"model": "broken"})
    assert response.status_code == 202, response.get_json()
    final = final_view(client, response.get_json()["job_id"])[-1]
    assert final["status"] == "failed"
    assert final["error"]["type"] and final["error"]["message"]
    assert "Traceback" not in json.dumps(final)
    assert client.get(f"/jobs/{final['job_id']}/predictions").status_code == 409


def test_wait_true_on_a_failing_job_returns_its_error_as_get_jobs_does(client):
    response = client.post("/train?wait=true&timeout=120", json=TINY_JOB | {"model": "broken"})
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["status"] == "failed" and body["error"]["type"] and body["error"]["message"]
    assert body == client.get(f"/jobs/{body['job_id']}").get_json()
    assert "Traceback" not in json.dumps(body)


def test_cancel_stops_a_running_job_and_frees_its_worker(client):
    job_id = client.post("/train", json=LONG_JOB).get_json()["job_id"]
    running_with_progress(client, job_id)
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "cancelled"
    assert client.get(f"/jobs/{job_id}").get_json()["status"] == "cancelled"
    # The same (only) worker takes the next job at once.
    follow_up = client.post("/train?wait=true&timeout=120", json=TINY_JOB)
    assert follow_up.status_code == 200, follow_up.get_json()
    assert follow_up.get_json()["status"] == "succeeded"
    assert len(follow_up.get_json()["predictions"]) == TINY_JOB["eval_limit"]


def horse_pids(worker_pid: int) -> list[int]:
    """The work horses (forked children) of an RQ worker process."""
    children = Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_killed_work_horse_fails_a_job_with_no_retries_left_with_the_reason(launcher, redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path, job_retries=0)  # re-runs: tests/service/test_tasks.py
    worker = launcher.worker(settings)
    client = create_app(settings).test_client()
    job_id = client.post("/train", json=LONG_JOB).get_json()["job_id"]
    running_with_progress(client, job_id)
    for pid in horse_pids(worker.pid):
        os.kill(pid, signal.SIGKILL)  # what the kernel's OOM killer does to the training process
    final = final_view(client, job_id, timeout_s=60)[-1]
    assert final["status"] == "failed"
    assert final["error"]["type"] == "WorkerKilled" and "signal 9" in final["error"]["message"]
    assert worker.poll() is None  # the worker itself survives and takes the next job


def test_killed_worker_leaves_its_job_failed_within_a_bounded_time(launcher, redis_url, tmp_path):
    """Worker and work horse killed together (machine lost): RQ's abandoned-job cleanup fails a job with no retries
    left once its heartbeat lapses (WORKER_HEARTBEAT + WORKER_GRACE_S), triggered here by the API reading the job."""
    settings = service_settings(redis_url, tmp_path, job_retries=0, worker_heartbeat=2, worker_grace_s=5)
    worker = launcher.worker(settings)
    client = create_app(settings).test_client()
    job_id = client.post("/train", json=LONG_JOB).get_json()["job_id"]
    running_with_progress(client, job_id)
    horses = horse_pids(worker.pid)  # RQ puts each work horse in a process group of its own (setpgrp)
    os.killpg(worker.pid, signal.SIGKILL)
    for pid in horses:
        os.kill(pid, signal.SIGKILL)
    worker.wait()
    final = final_view(client, job_id, timeout_s=settings.worker_heartbeat + settings.worker_grace_s + 30)[-1]
    assert final["status"] == "failed"
    assert final["error"]["type"] == "WorkerLost"
