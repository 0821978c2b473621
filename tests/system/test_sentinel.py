"""Redis Sentinel: the service follows a master failover (real redis-server master, replica and Sentinel).

The API answers 503 JSON with Retry-After while there is no master, then serves again; jobs queued or
running when the master died still end, on the promoted replica.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime

import pytest
import requests
from pydantic import ValidationError
from redis import Redis

from app.config import Settings
from tests.helpers import TINY_JOB, free_port, service_settings, wait_for

MASTER_NAME = "boolq"


def test_redis_sentinels_is_a_comma_separated_host_port_list():
    settings = Settings(redis_sentinels="sentinel-0:26379, 10.0.0.7:26380")
    assert settings.sentinel_addresses() == [("sentinel-0", 26379), ("10.0.0.7", 26380)]
    assert Settings(redis_sentinels="").sentinel_addresses() == []
    with pytest.raises(ValidationError, match="(?s)redis_sentinels.*'sentinel-0' is not host:port"):
        Settings(redis_sentinels="sentinel-0")


class RedisProcesses:
    """redis-server processes (a master, its replica, a Sentinel) in one folder, stopped together."""

    def __init__(self, folder):
        self.folder = folder
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not installed (Debian package redis-server); the Sentinel test needs it")
        self.processes = {}

    def start(self, name: str, *args: str) -> int:
        port = free_port()
        log = (self.folder / f"{name}.log").open("w")
        argv = [self.binary, *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = Redis(port=port, socket_timeout=1)
        wait_for(lambda: answers(client), 20, f"redis {name} to answer PING")
        return port

    def start_sentinel(self, master_port: int) -> int:
        # Sentinel rewrites its config file (the current master, the replicas it found): one of its own.
        config = self.folder / "sentinel.conf"
        config.write_text(
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 5000\n"
        )
        return self.start("sentinel", str(config), "--sentinel")

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait()

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)


def answers(client: Redis) -> bool:
    try:
        return client.ping()
    except Exception:  # not listening yet
        return False


@pytest.fixture
def sentinel_redis(tmp_path, launcher):
    """A master, a replica in sync with it, and one Sentinel (quorum 1) that has seen the replica. The service
    processes the test launches stop first: a worker stopping without its Redis would retry it for ~30 s."""
    redis = RedisProcesses(tmp_path)
    try:
        no_disk = ("--save", "", "--appendonly", "no")
        master_port = redis.start("master", *no_disk)
        replica_port = redis.start("replica", *no_disk, "--replicaof", "127.0.0.1", str(master_port))
        replica = Redis(port=replica_port)
        wait_for(lambda: replica.info("replication")["master_link_status"] == "up", 30, "the replica to sync")
        sentinel_port = redis.start_sentinel(master_port)
        sentinel = Redis(port=sentinel_port, decode_responses=True)
        wait_for(lambda: sentinel.sentinel_slaves(MASTER_NAME), 30, "the Sentinel to find the replica")
        yield redis, master_port, replica_port, sentinel_port
    finally:
        launcher.stop_all()
        redis.stop_all()


# Long enough to be training through the failover: about 36 steps of 8 rows, 64 tokens (tens of seconds here).
RUNNING_JOB = dict(model="minilm", train_limit=320, eval_limit=8, max_length=64, epochs=1, batch_size=8)


def test_the_api_answers_503_during_a_failover_then_serves_and_no_job_is_lost(sentinel_redis, launcher, tmp_path):
    """Every setting at its default (JOB_RETRIES included) but the Redis ones. The job running at the kill trains
    on through the gap and ends on the new master, on its first attempt; the queued one runs after it."""
    redis, master_port, replica_port, sentinel_port = sentinel_redis
    # REDIS_URL names the first master (the test helpers count workers through it); the service asks the Sentinel.
    settings = service_settings(
        f"redis://127.0.0.1:{master_port}/0",
        tmp_path,
        redis_sentinels=f"127.0.0.1:{sentinel_port}",
        redis_sentinel_master=MASTER_NAME,
    )
    assert settings.job_retries == Settings.model_fields["job_retries"].default
    url = launcher.server(settings, workers=1)
    worker = launcher.worker(settings)
    running = requests.post(f"{url}/train", json=RUNNING_JOB, timeout=30).json()["job_id"]
    queued = requests.post(f"{url}/train", json=TINY_JOB, timeout=30).json()["job_id"]
    progress = wait_for(lambda: training_progress(url, running), 300, "the first job to report a training step", 0.1)
    assert progress["step"] < progress["total_steps"]
    assert Redis(port=master_port).wait(1, 5000) == 1  # the replica holds both jobs before the master dies

    redis.kill("master")
    killed_at, killed_wall = time.monotonic(), time.time()
    gap, served = [], None
    while served is None and time.monotonic() - killed_at < 30:
        response = job(url, queued)
        if response.status_code == 503:
            gap.append(response)
        elif response.status_code == 200:
            served = time.monotonic() - killed_at
        time.sleep(0.1)

    assert gap, "no 503 while the master was down"
    assert all(r.json()["error"]["code"] == "redis_unavailable" and int(r.headers["Retry-After"]) > 0 for r in gap)
    assert served is not None, "the API did not serve again within 30 s of the master's death"
    sentinel = Redis(port=sentinel_port, decode_responses=True)
    assert sentinel.sentinel_get_master_addr_by_name(MASTER_NAME) == ("127.0.0.1", replica_port)

    views = {}
    for job_id in (running, queued):
        wait_for(lambda j=job_id: job(url, j).json()["status"] not in ("queued", "running"), 300, f"job {job_id}")
        views[job_id] = view = job(url, job_id).json()
        assert view["status"] == "succeeded", view
        assert view["attempt"] == 1 and view["previous_attempt"] is None, view  # carried on, not re-run
        assert view["max_attempts"] == 1 + settings.job_retries, view
    ran = views[running]
    assert iso_seconds(ran["started_at"]) < killed_wall < iso_seconds(ran["ended_at"])  # running at the kill
    # Its last step's progress was written after the kill, so to the new master.
    assert ran["progress"]["step"] == ran["progress"]["total_steps"] > progress["step"], ran["progress"]
    assert iso_seconds(views[queued]["started_at"]) >= iso_seconds(ran["ended_at"])
    assert worker.poll() is None, worker.log_path.read_text()
    print(f"failover: {len(gap)} answers 503, served again {served:.1f} s after SIGKILL; the running job was at "
          f"step {progress['step']} of {progress['total_steps']}")  # fmt: skip


def training_progress(url: str, job_id: str) -> dict | None:
    """The job's progress once it is running and has taken a training step."""
    view = job(url, job_id).json()
    progress = view["progress"] or {}
    return progress if view["status"] == "running" and progress.get("step", 0) >= 1 else None


def iso_seconds(text: str) -> float:
    """A job view's timestamp (RQ's UTC, with or without its zone) in seconds since the epoch."""
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def job(url: str, job_id: str) -> requests.Response:
    return requests.get(f"{url}/jobs/{job_id}", timeout=30)
