"""Shared fixtures: the bundled BoolQ sample and one real, tiny fine-tuning run of minilm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.config import SAMPLE_DATA_DIR
from app.params import TrainParams

FULL_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "boolq"

# Small enough for CI on 2 cores, large enough for the loss to fall: 48 train rows, 64 tokens, 4 epochs.
TINY_PARAMS = dict(
    model="minilm", batch_size=8, lr=1e-4, epochs=4, max_length=64, train_limit=48, eval_limit=24, seed=7
)


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    return SAMPLE_DATA_DIR


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One real fine-tuning run of minilm, shared by the tests that read its outputs."""
    from app.training import train_and_evaluate

    progress = []
    result = train_and_evaluate(
        TrainParams(**TINY_PARAMS),
        SAMPLE_DATA_DIR,
        tmp_path_factory.mktemp("runs"),
        on_progress=progress.append,
    )
    return result, progress


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- Service fixtures: a real redis-server, real `python -m app worker` and `python -m app serve` processes ---

REPO_ROOT = Path(__file__).resolve().parent.parent
# One tiny training job: a few seconds on a busy core.
TINY_JOB = dict(model="minilm", train_limit=16, eval_limit=8, max_length=32, epochs=1, batch_size=8)
# A job that runs for minutes, long enough to be cancelled or killed mid-run.
LONG_JOB = dict(model="minilm", train_limit=400, eval_limit=8, max_length=64, epochs=3, batch_size=8)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll ``condition()`` until it returns something truthy; fail the test naming ``what`` otherwise."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private redis-server on a free port (no persistence); the tests fail if the binary is missing."""
    import shutil
    import subprocess

    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (Debian package redis-server); the service tests need it")
    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
    ]
    process = subprocess.Popen(argv, stdout=(folder / "redis.log").open("w"), stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"

    def answers():
        try:
            return Redis.from_url(url).ping()
        except RedisConnectionError:
            return False

    try:
        wait_for(answers, 20, "redis-server to answer PING")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def service_settings(redis_url: str, folder: Path, **overrides):
    """Settings for one isolated service: its own queue name and artifacts folder on the shared Redis."""
    import uuid
    from dataclasses import replace

    from app.config import Settings

    defaults = dict(
        redis_url=redis_url,
        queue_name=f"test-{uuid.uuid4().hex[:8]}",
        artifacts_dir=folder / "runs",
        data_dir=SAMPLE_DATA_DIR,
        default_model="minilm",
        tracker="none",
        num_threads=1,
        max_wait=120,
    )
    return replace(Settings(), **(defaults | overrides))


def settings_env(settings) -> dict[str, str]:
    """The environment that makes ``Settings.from_env()`` in a child process equal ``settings``."""
    import os

    return os.environ | {
        "REDIS_URL": settings.redis_url,
        "QUEUE_NAME": settings.queue_name,
        "ARTIFACTS_DIR": str(settings.artifacts_dir),
        "DATA_DIR": str(settings.data_dir),
        "DEFAULT_MODEL": settings.default_model,
        "TRACKER": settings.tracker,
        "NUM_THREADS": str(settings.num_threads),
        "MAX_WAIT": str(settings.max_wait),
        "WORKER_HEARTBEAT": str(settings.worker_heartbeat),
        "API_TOKEN": settings.api_token,
        "MODEL_ROOTS": os.pathsep.join(str(p) for p in settings.model_roots),
        "MAX_CONTENT_LENGTH": str(settings.max_content_length),
        "MAX_QUEUED_JOBS": str(settings.max_queued_jobs),
        "MAX_JOBS_PER_CLIENT": str(settings.max_jobs_per_client),
        "MAX_JOB_TOKENS": str(settings.max_job_tokens),
        "PREDICT_MAX_TOKENS": str(settings.predict_max_tokens),
        "PREDICT_TIMEOUT_S": str(settings.predict_timeout_s),
        "MAX_WAITERS": str(settings.max_waiters),
        "PUBLIC_READS": "1" if settings.public_reads else "0",
        "WEB_THREADS": str(settings.web_threads),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


class Launcher:
    """Starts service processes (each in its own process group) and stops every one of them at teardown."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.processes = []

    def start(self, name: str, argv: list[str], settings):
        import subprocess
        import sys

        log = (self.folder / f"{name}-{len(self.processes)}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "app", *argv],
            cwd=REPO_ROOT,
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process.log_path = Path(log.name)
        self.processes.append(process)
        return process

    def worker(self, settings):
        """A real ``python -m app worker``, returned once it has registered with Redis."""
        from redis import Redis
        from rq import Queue, Worker

        queue = Queue(settings.queue_name, connection=Redis.from_url(settings.redis_url))
        before = Worker.count(queue=queue)
        process = self.start("worker", ["worker"], settings)
        wait_for(lambda: Worker.count(queue=queue) > before or process.poll() is not None, 120, "the worker")
        assert process.poll() is None, process.log_path.read_text()
        return process

    def server(self, settings, workers: int = 2) -> str:
        """A real gunicorn (``python -m app serve``) on a free port; returns its base URL once it answers."""
        import requests

        port = free_port()
        process = self.start(
            "serve", ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)], settings
        )
        url = f"http://127.0.0.1:{port}"

        def healthy():
            if process.poll() is not None:
                pytest.fail("gunicorn exited:\n" + process.log_path.read_text())
            try:
                return requests.get(f"{url}/healthz", timeout=5).status_code == 200
            except requests.RequestException:  # not listening yet, or still booting
                return False

        wait_for(healthy, 120, "gunicorn to answer /healthz")
        return url

    def stop_all(self) -> None:
        import os
        import signal
        import subprocess

        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("processes"))
    yield launcher
    launcher.stop_all()
