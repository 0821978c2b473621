"""Issue 22: whoever can write to Redis, a run folder or a local file must not run code or read secrets, and every
door of the API has its lock. Each test reproduces one finding with the real component (Redis, worker, nginx)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from tests.helpers import service_settings, wait_for


class WritesFile:
    """A pickle that creates ``path`` when it is unpickled: the attacker's payload."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_pickle(path) -> bytes:
    return pickle.dumps(WritesFile(path))


@pytest.mark.slow
def test_a_worker_refuses_a_job_naming_a_function_that_is_not_a_project_task(launcher, redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path)
    launcher.worker(settings)
    marker = tmp_path / "owned"
    queue = Queue(settings.queue_name, connection=Redis.from_url(redis_url), serializer=JSONSerializer)
    job = queue.enqueue("os.system", f"touch {marker}")
    wait_for(lambda: job.get_status() in (JobStatus.FAILED, JobStatus.FINISHED), 60, "the planted job to end")
    assert job.get_status() == JobStatus.FAILED
    assert "os.system" in job.latest_result().exc_string
    assert "ForbiddenTask" in job.latest_result().exc_string
    assert not marker.exists()


SWEEP = {
    "base": dict(model="minilm", train_limit=40, eval_limit=8, max_length=32, epochs=1, batch_size=8),
    "space": {"lr": [1e-4, 2e-4]},
    "trials": 2,
    "parallel": 1,
}


def test_a_pickle_planted_as_the_optuna_snapshot_is_never_unpickled(redis_url, tmp_path):
    from app.api import create_app
    from app.service.sweeps import journal_on_redis

    settings = service_settings(redis_url, tmp_path)
    client = create_app(settings).test_client()
    sweep_id = client.post("/sweeps", json=SWEEP).get_json()["sweep_id"]
    marker = tmp_path / "owned"
    Redis.from_url(redis_url).set(f"boolq:{settings.queue_name}:optuna:snapshot", planted_pickle(marker))
    journal_on_redis.cache_clear()  # a new process: its storage replays the journal
    listed = client.get("/sweeps")
    assert listed.status_code == 200
    assert [s["sweep_id"] for s in listed.get_json()["sweeps"]] == [sweep_id]
    assert not marker.exists()


@pytest.mark.slow
def test_a_tampered_checkpoint_runs_no_code_and_the_run_starts_over(tmp_path):
    import torch

    from app.config import SAMPLE_DATA_DIR
    from app.engine import run_folder
    from app.engine.training import train_and_evaluate
    from app.params import TrainParams
    from tests.helpers import RESUMABLE

    marker = tmp_path / "owned"
    state = run_folder.training_state(tmp_path / "runs" / "r")
    state.parent.mkdir(parents=True)
    torch.save({"loop": WritesFile(marker)}, state)  # a killed attempt's checkpoint, rewritten by an attacker
    result = train_and_evaluate(TrainParams(**RESUMABLE), SAMPLE_DATA_DIR, tmp_path / "runs", run_id="r")
    assert not marker.exists()
    assert result.metrics["resumed_from_step"] is None  # refused: trained from the start
    assert not state.exists()


@pytest.mark.slow
def test_the_native_stack_keeps_the_redis_password_out_of_shared_files_logs_and_command_lines(tmp_path):
    import os
    import signal
    import stat
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT, free_port, stack_redis_url, wait_for_state

    state_dir, log_path = tmp_path / "state", tmp_path / "stack.log"
    env = os.environ | {"TRACKER": "none", "ARTIFACTS_DIR": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "app", "stack", "--replicas", "1", "--workers", "1", "--port", str(free_port())]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*argv, "--state-dir", str(state_dir)], cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        state = wait_for_state(process, state_dir / "stack.json", log_path)
        password = stack_redis_url(state).split(":")[2].split("@")[0]
        assert len(password) >= 16 and Redis.from_url(stack_redis_url(state)).ping()
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        for private in ("stack.json", "redis.url", "redis.conf"):
            assert stat.S_IMODE((state_dir / private).stat().st_mode) == 0o600, private
        assert password not in (state_dir / "stack.json").read_text()
        redis_pid = next(c["pid"] for c in state["children"] if c["role"] == "redis")
        assert password not in Path(f"/proc/{redis_pid}/cmdline").read_text()  # what ps shows every user
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    logs = [log_path, *(state_dir / "logs").iterdir()]
    assert all(password not in path.read_text(errors="replace") for path in logs)
