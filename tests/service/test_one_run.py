"""One job, one run: a job RQ re-runs leaves one finished MLflow run, one registry version and one result, however
its first worker was lost. Real Redis, real ``python -m app worker`` processes (A, then B, on one ARTIFACTS_DIR),
real training, MLflow's local store (SQLite) shared by both."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from app.api import create_app
from app.tracking.mlflow_tracker import RUN_ID_TAG, MlflowClient, local_store
from tests.helpers import service_settings, wait_for, work_horse_pids

# One epoch of 30 steps at 32 tokens: seconds still to go when it is caught mid-run, short enough to run twice.
JOB = dict(model="minilm", train_limit=240, eval_limit=8, max_length=32, epochs=1, batch_size=8)
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def settings(redis_url, tmp_path):
    # A silent worker's job is re-run after 2 + 10 s (the API's read of the job runs RQ's cleanup); a live worker on
    # a loaded machine is never that late.
    return service_settings(redis_url, tmp_path, tracker="mlflow", worker_heartbeat=2, worker_grace_s=10)


def view_of(client, job_id: str) -> dict:
    return client.get(f"/jobs/{job_id}").get_json()


def training(client, job_id: str) -> None:
    wait_for(lambda: (view_of(client, job_id)["progress"] or {}).get("step", 0) >= 1, 300, "the job to train", 0.1)


def ended(client, job_id: str) -> dict:
    return wait_for(lambda: (v := view_of(client, job_id))["status"] in FINAL and v, 300, f"job {job_id} to end", 0.3)


def is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def mlflow_records(settings, job_id: str) -> tuple[list[str], int]:
    """The statuses of the job's MLflow runs (sorted) and the number of registered versions of the job."""
    uri, _ = local_store(settings.artifacts_dir)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment_name)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_ID_TAG}` = '{job_id}'")
    versions = client.search_model_versions(f"name = '{settings.registered_model_name}'")
    return sorted(run.info.status for run in runs), sum(v.tags.get("job_id") == job_id for v in versions)


def test_a_worker_killed_alone_takes_its_training_process_with_it_and_the_job_runs_once_more(launcher, settings):
    """The issue: kill -9 of the worker process alone left its work horse training while another worker re-ran the
    job: two runs, two versions, and a result that changed 22 s after it was final."""
    client = create_app(settings).test_client()
    a = launcher.worker(settings)
    job_id = client.post("/train", json=JOB).get_json()["job_id"]
    training(client, job_id)
    (horse,) = work_horse_pids(a.pid)
    os.kill(horse, signal.SIGSTOP)  # held mid-run while B starts (which takes longer than the rest of the run)
    launcher.worker(settings)  # B, idle until the job is re-run
    os.kill(horse, signal.SIGCONT)  # (a stopped process of an orphaned group would get SIGHUP from the kernel)
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    wait_for(lambda: not is_running(horse), 5, "the work horse to die with its worker")

    view = ended(client, job_id)
    assert view["status"] == "succeeded" and view["attempt"] == 2, view
    assert view["previous_attempt"]["type"] == "WorkerLost", view
    statuses, versions = mlflow_records(settings, job_id)
    assert statuses.count("FINISHED") == 1 and versions == 1, (statuses, versions)
    time.sleep(3)
    assert view_of(client, job_id)["result"] == view["result"]


def test_a_frozen_worker_that_wakes_after_its_job_was_re_run_writes_nothing(launcher, settings):
    """A worker and its work horse frozen (a paused VM, a partition) past the heartbeat grace: RQ re-runs the job on
    B. When A wakes, its attempt no longer holds the job's lease: it stops at its next progress report and records
    no run, version, metrics or result; A itself takes the next job."""
    client = create_app(settings).test_client()
    a = launcher.worker(settings)
    job_id = client.post("/train", json=JOB).get_json()["job_id"]
    training(client, job_id)
    (horse,) = work_horse_pids(a.pid)
    os.kill(horse, signal.SIGSTOP)
    launcher.worker(settings)  # B, idle until the job is re-run
    os.kill(a.pid, signal.SIGSTOP)  # now A's heartbeats stop too

    view = ended(client, job_id)
    assert view["status"] == "succeeded" and view["attempt"] == 2, view
    for pid in (horse, a.pid):
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: not is_running(horse), 120, "A's stale attempt to stop")

    assert view_of(client, job_id) == view  # no progress, status or result of A's written over B's
    assert mlflow_records(settings, job_id) == (["FINISHED", "KILLED"], 1)  # A's run: stopped by the fence
    assert (settings.artifacts_dir / job_id / "metrics.json").is_file()  # B's, not removed by A's stop
    assert a.poll() is None
    again = client.post("/train", json=JOB | {"train_limit": 16}).get_json()["job_id"]
    assert ended(client, again)["status"] == "succeeded"
