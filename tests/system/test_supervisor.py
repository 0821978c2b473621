"""The supervisor's backoff: a child that keeps dying is restarted later each time, up to a ceiling, and at
once again after it ran for a while. Real processes (`true`, exiting at once); the clock is the test's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.ops.stack import Child
from app.ops.supervisor import RestartPolicy, Supervisor
from tests.helpers import REPO_ROOT, wait_for


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def dies_at_once(tmp_path) -> Child:
    child = Child("short-lived", "worker", [shutil.which("true")], tmp_path / "child.log")
    child.start({})
    child.process.wait()
    return child


def restart_delays(supervisor: Supervisor, clock: Clock, child: Child, deaths: int) -> list[float]:
    """Let ``child`` die ``deaths`` times; the delay the supervisor chose before each restart."""
    delays = []
    for _ in range(deaths):
        supervisor.tend(child)  # notices the death, schedules the restart
        delays.append(supervisor.restarts[child.name].due_at - clock.now)
        clock.now += delays[-1]
        supervisor.tend(child)  # due: starts it again
        child.process.wait()
    return delays


def test_quick_deaths_double_the_delay_up_to_the_ceiling(tmp_path):
    clock = Clock()
    policy = RestartPolicy(first_delay_s=0.5, max_delay_s=4.0, stable_after_s=30.0)
    supervisor = Supervisor(lambda child: child.start({}), policy, clock=clock)
    child = dies_at_once(tmp_path)
    assert restart_delays(supervisor, clock, child, 6) == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert supervisor.restarts[child.name].count == 6


def test_a_child_that_ran_a_while_is_restarted_after_the_first_delay_again(tmp_path):
    clock = Clock()
    policy = RestartPolicy(first_delay_s=0.5, max_delay_s=4.0, stable_after_s=30.0)
    supervisor = Supervisor(lambda child: child.start({}), policy, clock=clock)
    child = dies_at_once(tmp_path)
    restart_delays(supervisor, clock, child, 3)
    clock.now += 31  # it ran for a while before dying this time
    assert restart_delays(supervisor, clock, child, 1) == [0.5]


def test_a_restart_is_not_started_before_it_is_due(tmp_path):
    clock = Clock()
    supervisor = Supervisor(lambda child: child.start({}), RestartPolicy(first_delay_s=2.0), clock=clock)
    child = dies_at_once(tmp_path)
    first_pid = child.pid
    supervisor.tend(child)
    clock.now += 1.0
    supervisor.tend(child)
    time.sleep(0.05)
    assert child.pid == first_pid
    clock.now += 1.0
    supervisor.tend(child)
    assert child.pid != first_pid


# The stack (parent) starts one child as a worker and one as a replica, prints their pids and waits to be killed.
STACK_STAND_IN = """
import sys, time
from pathlib import Path
from app.ops.stack import Child
# Like an RQ worker with a job under way (SIGTERM: finish it first), or a replica: both ignore SIGTERM here.
ignore = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(99)"
)
folder = Path(sys.argv[1])
children = [Child(role, role, [sys.executable, "-c", ignore], folder / f"{role}.log") for role in ("worker", "api")]
for child in children:
    child.start({})
while not all("ready" in child.log_path.read_text() for child in children):
    time.sleep(0.05)
print(" ".join(str(child.pid) for child in children), flush=True)
time.sleep(600)
"""


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a child of the killed stand-in is reaped by init, or lingers as a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_dies_at_once_with_a_killed_stack_even_while_it_would_finish_a_job(tmp_path):
    """The issue: a stack stopped with SIGTERM then SIGKILL left its worker running, an orphan ignoring SIGTERM."""
    stack = subprocess.Popen(
        [sys.executable, "-c", STACK_STAND_IN, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    worker, replica = (int(pid) for pid in stack.stdout.readline().split())
    try:
        stack.kill()
        stack.wait()
        wait_for(lambda: not is_running(worker), 5, "the worker to die with its stack")
        assert is_running(replica)  # SIGTERM, which a replica (gunicorn) obeys after its requests end
    finally:
        for pid in (worker, replica):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
