"""The supervisor's backoff: a child that keeps dying is restarted later each time, up to a ceiling, and at
once again after it ran for a while. Real processes (`true`, exiting at once); the clock is the test's.
"""

from __future__ import annotations

import shutil
import time

from app.ops.stack import Child
from app.ops.supervisor import RestartPolicy, Supervisor


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
