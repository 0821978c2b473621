"""``python -m app gc``: bounded disks without losing what is served. Real Redis, real workers A and B (each its own
ARTIFACTS_DIR), a real ``mlflow server --serve-artifacts``; gc runs as the CLI does, in a process of its own.

One job is killed on A after its first checkpoint and resumes on B (A keeps an unfinished folder with the training
state, MLflow an unfinished run with the checkpoint), then is promoted; a second, tiny job is neither."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
from redis import Redis

from app.api import create_app
from app.tracking.mlflow_runs import MlflowRuns
from tests.helpers import REPO_ROOT, TINY_JOB, service_settings, settings_env, wait_for, work_horse_pids

FINAL = ("succeeded", "failed", "cancelled")
# Three epochs of 23 steps, checkpointed after each: caught on A after the first, resumed on B.
RESUMED_JOB = dict(
    model="minilm", batch_size=8, lr=1e-4, epochs=3, max_length=32, train_limit=240, eval_limit=8, dev_size=0.25, seed=7
)


@dataclass
class Setup:
    a: object  # A's settings
    b: object  # B's settings
    client: object  # the API, on B's settings
    resumed: str  # the job killed on A and finished on B: the champion
    other: str  # a tiny job finished on B


def ended(client, job_id: str) -> dict:
    view = wait_for(
        lambda: (v := client.get(f"/jobs/{job_id}").get_json())["status"] in FINAL and v, 300, f"job {job_id}", 0.3
    )
    assert view["status"] == "succeeded", view
    return view


def runs_of(settings, job_id: str) -> list:
    """The job's MLflow runs the server still lists as active (gc marks the ones it deletes as deleted)."""
    return MlflowRuns.from_settings(settings).runs_of_job(job_id, finished_only=False)


def artifact_names(settings, run_id: str) -> set[str]:
    return {a.path for a in MlflowRuns.from_settings(settings).client.list_artifacts(run_id)}


def artifacts_of_runs(settings, job_id: str) -> dict[str, set[str]]:
    return {run.info.run_id: artifact_names(settings, run.info.run_id) for run in runs_of(settings, job_id)}


def gc(settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app", "gc", *args],
        cwd=REPO_ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def setup(launcher, mlflow_server, redis_url, tmp_path_factory) -> Setup:
    common = service_settings(
        redis_url,
        tmp_path_factory.mktemp("retention"),
        tracker="mlflow",
        mlflow_tracking_uri=mlflow_server.url,
        checkpoint_every_s=0,
        worker_heartbeat=2,
        worker_grace_s=10,
    )
    a, b = (
        common.model_copy(update={"artifacts_dir": folder / "runs", "model_cache_dir": folder / "cache"})
        for folder in (tmp_path_factory.mktemp("host-a"), tmp_path_factory.mktemp("host-b"))
    )
    mlflow_server.wait_until_answering()
    client = create_app(b).test_client()
    worker_a = launcher.worker(a)
    resumed = client.post("/train", json=RESUMED_JOB).get_json()["job_id"]
    wait_for(
        lambda: any("checkpoint" in artifact_names(a, r.info.run_id) for r in runs_of(a, resumed)),
        300,
        "A's first checkpoint",
    )
    (horse,) = work_horse_pids(worker_a.pid)
    os.kill(horse, signal.SIGSTOP)  # held on A while B starts
    launcher.worker(b)
    os.kill(worker_a.pid, signal.SIGKILL)  # its horse goes with it
    worker_a.wait()
    assert ended(client, resumed)["attempt"] == 2
    other = client.post("/train", json=TINY_JOB).get_json()["job_id"]
    ended(client, other)
    promoted = client.post("/models/champion", json={"job_id": resumed, "force": True})
    assert promoted.status_code == 200, promoted.get_json()
    return Setup(a, b, client, resumed, other)


def test_a_dry_run_lists_the_killed_attempts_leftovers_with_sizes_and_deletes_nothing(setup):
    leftover = setup.a.artifacts_dir / setup.resumed
    assert (leftover / "training_state.pt").is_file()
    before = artifacts_of_runs(setup.a, setup.resumed)
    (unfinished,) = [run for run in runs_of(setup.a, setup.resumed) if run.info.status != "FINISHED"]

    out = gc(setup.a, "--dry-run")
    assert f"would delete local {leftover} (job {setup.resumed})" in out, out
    assert f"would delete mlflow {unfinished.info.run_id} (job {setup.resumed})" in out, out
    assert "would delete 2 item(s)" in out and " 0.0 MB on this host" not in out, out
    assert (leftover / "training_state.pt").is_file()
    assert {
        run.info.run_id: artifact_names(setup.a, run.info.run_id) for run in runs_of(setup.a, setup.resumed)
    } == before


def test_gc_removes_the_killed_attempts_checkpoints_here_and_on_mlflow_and_keeps_the_champion(setup):
    (unfinished,) = [run for run in runs_of(setup.a, setup.resumed) if run.info.status != "FINISHED"]
    assert "checkpoint" in artifact_names(setup.a, unfinished.info.run_id)

    gc(setup.a)
    assert not (setup.a.artifacts_dir / setup.resumed).exists()
    assert artifact_names(setup.a, unfinished.info.run_id) == set()  # gone from the server's view
    (finished,) = runs_of(setup.a, setup.resumed)  # the deleted run is no longer listed
    assert finished.info.status == "FINISHED" and "model" in artifact_names(setup.a, finished.info.run_id)
    assert setup.client.post("/predict", json={"question": "is it", "passage": "It is."}).status_code == 200


def test_a_policy_that_keeps_nothing_still_keeps_the_champion_and_deletes_the_other_run_everywhere(setup):
    (other_run,) = runs_of(setup.b, setup.other)
    out = gc(setup.b, "--older-than", "0.000001", "--keep-last", "0")
    assert f"deleted local {setup.b.artifacts_dir / setup.other}" in out, out
    assert not (setup.b.artifacts_dir / setup.other).exists()
    assert runs_of(setup.b, setup.other) == [] and artifact_names(setup.b, other_run.info.run_id) == set()
    assert Redis.from_url(setup.b.redis_url).hget(f"boolq:{setup.b.queue_name}:published", setup.other) is None

    assert (setup.b.artifacts_dir / setup.resumed / "metrics.json").is_file()  # the champion's
    (champion_run,) = runs_of(setup.b, setup.resumed)
    assert "model" in artifact_names(setup.b, champion_run.info.run_id)
    answer = setup.client.post("/predict", json={"question": "is it", "passage": "It is."})
    assert answer.status_code == 200 and answer.get_json()["model"] == setup.resumed, answer.get_json()
