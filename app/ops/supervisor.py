"""Restarting the native stack's processes when they die, with exponential backoff per process.

``python -m app stack`` calls :meth:`Supervisor.tend` for each child on every tick. A child that exited has
its whole process group killed (a gunicorn master's workers, an RQ worker's work horse), then is started again
after a delay that doubles with each quick death and resets once it has run for a while. Redis restarts on
its own data folder and append-only file, so queued jobs and job records survive it.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    # Delay before the first restart; doubled for each death within `stable_after_s` of the last start.
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0
    # A child that ran this long before dying is restarted after `first_delay_s` again.
    stable_after_s: float = 30.0


@dataclass
class Restarts:
    """What the supervisor knows about one child: when it started, when it may start again, how often it did."""

    started_at: float
    delay_s: float
    due_at: float | None = None
    count: int = 0


class Supervisor:
    """Keeps children running: ``start(child)`` starts one; ``child`` needs exited(), exit_code, signal_group()."""

    def __init__(self, start, policy: RestartPolicy | None = None, clock=time.monotonic):
        self.start = start
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.restarts: dict[str, Restarts] = {}

    def tend(self, child) -> None:
        """Notice that ``child`` died (schedule its restart) or that its restart is due (start it)."""
        now = self.clock()
        state = self.restarts.setdefault(child.name, Restarts(started_at=now, delay_s=self.policy.first_delay_s))
        if state.due_at is None:
            if child.exit_code is None and child.exited():
                self.schedule(child, state, now)
        elif now >= state.due_at:
            child.exit_code = None
            self.start(child)
            state.started_at, state.due_at = now, None
            state.count += 1
            log.warning("restarted %s (pid %d), restart #%d", child.name, child.pid, state.count)

    def schedule(self, child, state: Restarts, now: float) -> None:
        # A killed gunicorn master or RQ worker leaves its workers or work horse behind; end the whole group.
        child.signal_group(signal.SIGKILL)
        if now - state.started_at >= self.policy.stable_after_s:
            state.delay_s = self.policy.first_delay_s
        state.due_at = now + state.delay_s
        log.warning(
            "%s (pid %d) exited with code %s; restarting it in %.1f s",
            child.name,
            child.pid,
            child.exit_code,
            state.delay_s,
        )
        state.delay_s = min(state.delay_s * 2, self.policy.max_delay_s)
