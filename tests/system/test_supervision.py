"""Chaos on the native stack (`python -m app stack`): kill -9 a replica, the worker, nginx or Redis, and the
stack brings each back by itself, Redis on the same append-only file with no record lost, the replicas
answering 503 JSON meanwhile. Each kill is bounded by RECOVERY_S.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import requests

from app.ops.stack import answers_healthz, free_ports
from tests.helpers import LONG_JOB, TINY_JOB, running_stack

RECOVERY_S = 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chaos")
    (port,) = free_ports(1)
    env = os.environ | {
        "TRACKER": "none",
        "ARTIFACTS_DIR": str(folder / "artifacts"),
        "HF_HUB_OFFLINE": "1",
        "NUM_THREADS": "1",
        "WORKER_HEARTBEAT": "2",
    }
    argv = [sys.executable, "-m", "app", "stack", "--replicas", "2", "--workers", "1", "--port", str(port)]
    try:
        with running_stack(argv, folder, env) as (process, state):
            yield process, folder / "state" / "stack.json", state
    finally:
        print((folder / "stack.log").read_text()[-5000:])


def current_state(state_file) -> dict:
    return json.loads(state_file.read_text())


def child_named(state_file, name: str) -> dict:
    return next(c for c in current_state(state_file)["children"] if c["name"] == name)


def wait_until(condition, what: str, timeout_s: float = RECOVERY_S) -> float:
    """Seconds until ``condition()`` held; fails naming ``what`` after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s} s"
        time.sleep(0.2)
    return time.monotonic() - started


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.parametrize("name", ["api-1", "nginx"])
def test_a_killed_replica_or_nginx_is_restarted(stack, name):
    process, state_file, state = stack
    victim = child_named(state_file, name)
    os.killpg(victim["pid"], signal.SIGKILL)
    through_nginx = []

    def restarted() -> bool:
        if name != "nginx":  # the other replica serves meanwhile
            through_nginx.append(answers(state["url"] + "/healthz"))
        child = child_named(state_file, name)
        return child["pid"] != victim["pid"] and answers_healthz(child["url"])  # a replica: unix:/…

    # A replica's restart is mostly its boot (torch, transformers): allow for a busy 2-core machine.
    back = wait_until(restarted, f"{name} restarted and answering", timeout_s=RECOVERY_S if name == "nginx" else 90)
    assert all(through_nginx), through_nginx.count(False)
    assert child_named(state_file, name)["restarts"] == victim["restarts"] + 1
    assert answers(state["url"] + "/healthz") and process.poll() is None
    print(f"\n{name} back in {back:.1f} s")


def test_a_killed_worker_is_restarted_and_runs_the_next_job(stack):
    process, state_file, state = stack
    victim = child_named(state_file, "worker-1")
    os.killpg(victim["pid"], signal.SIGKILL)
    wait_until(lambda: child_named(state_file, "worker-1")["pid"] != victim["pid"], "worker restarted")
    job_id = requests.post(state["url"] + "/train", json=TINY_JOB, timeout=30).json()["job_id"]
    wait_until(
        lambda: requests.get(f"{state['url']}/jobs/{job_id}", timeout=10).json()["status"] == "succeeded",
        "a job on the restarted worker",
        timeout_s=120,
    )


def test_a_killed_redis_is_restarted_on_its_append_only_file_with_503_meanwhile(stack):
    process, state_file, state = stack
    url = state["url"]
    submitted = [requests.post(f"{url}/train?wait=false", json=TINY_JOB, timeout=30) for _ in range(2)]
    job_ids = [r.json()["job_id"] for r in submitted]
    time.sleep(1.5)  # appendfsync everysec: what was written a second ago is on disk
    victim = child_named(state_file, "redis")
    os.killpg(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()

    seen = []
    while time.monotonic() - killed < RECOVERY_S:
        response = requests.get(f"{url}/jobs/{job_ids[0]}", timeout=10)
        seen.append(response.status_code)
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "redis_unavailable"
        if response.status_code == 200 and 503 in seen:
            break
        time.sleep(0.1)
    back = time.monotonic() - killed
    assert set(seen) <= {200, 503} and 503 in seen and seen[-1] == 200, seen
    assert back < RECOVERY_S and process.poll() is None
    for job_id in job_ids:
        view = requests.get(f"{url}/jobs/{job_id}", timeout=10)
        assert view.status_code == 200 and view.json()["job_id"] == job_id
    assert answers(f"{url}/readyz")
    # Queued before the crash, run after it: every job runs to the end and succeeds (docs/reliability.md).
    wait_until(
        lambda: all(
            requests.get(f"{url}/jobs/{job_id}", timeout=10).json()["status"] in ("succeeded", "failed")
            for job_id in job_ids
        ),
        "the jobs queued before the crash to end",
        timeout_s=120,
    )
    views = [requests.get(f"{url}/jobs/{job_id}", timeout=10).json() for job_id in job_ids]
    assert [view["status"] for view in views] == ["succeeded", "succeeded"], views
    print(f"\nredis killed: API answered 503 JSON, then 200 again after {back:.1f} s ({len(seen)} probes)")


def test_a_job_running_when_redis_dies_and_comes_back_carries_on_and_succeeds(stack):
    process, state_file, state = stack
    url = state["url"]
    job_id = requests.post(f"{url}/train", json=LONG_JOB, timeout=30).json()["job_id"]
    wait_until(
        lambda: requests.get(f"{url}/jobs/{job_id}", timeout=10).json()["status"] == "running",
        "the job to run",
        timeout_s=120,
    )
    time.sleep(1.5)  # appendfsync everysec: the job's 'started' state is on disk
    os.killpg(child_named(state_file, "redis")["pid"], signal.SIGKILL)
    wait_until(lambda: answers(f"{url}/readyz"), "Redis back")
    # The worker's client waits Redis out (about 30 s of retries): the job never noticed the restart.
    waited = wait_until(
        lambda: requests.get(f"{url}/jobs/{job_id}", timeout=10).json()["status"] in ("failed", "succeeded"),
        "the interrupted job to end",
        timeout_s=300,
    )
    view = requests.get(f"{url}/jobs/{job_id}", timeout=10).json()
    assert view["status"] == "succeeded", view
    print(f"\njob running when Redis died: succeeded {waited:.1f} s after Redis was back")
