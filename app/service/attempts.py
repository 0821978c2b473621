"""One job, one run: which attempt of a job may still write its results (a lease in Redis, fenced by the writers).

RQ re-runs a job whose worker fell silent (killed, frozen, cut off from Redis). The work horse of the earlier
attempt dies with its worker (``TrainingWorker``), but a worker that was only frozen (a paused VM, a stopped
process group, a network partition) wakes up with its horse still training. So each attempt, as its worker
starts it, writes its token (RQ's execution id) under the job's lease key: the newest attempt holds the lease.
Before an attempt writes anything that says "this is the job's outcome" (its progress, ``metrics.json``, the
tracker's finished run and registry version, the job's result) it checks that it still holds the lease; a
superseded attempt raises :class:`AttemptSuperseded` and writes nothing more.

The check and the write are two Redis round trips, not one transaction: a stale attempt that wakes within
milliseconds of being superseded could still write once. The lease narrows minutes of double writes to that.
"""

from __future__ import annotations

import logging

from app.engine.run_folder import RunSuperseded
from app.service.redis_connection import service_key

log = logging.getLogger(__name__)

# Longer than any job runs or waits for a retry; the newest attempt overwrites it anyway.
LEASE_TTL_S = 30 * 24 * 3600

# The token of each job this process runs an attempt of, by job id: set by the worker as it starts the attempt,
# inherited by the work horse it forks (a DDP rank is handed it on its command line).
held: dict[str, str] = {}


class AttemptSuperseded(RunSuperseded):
    """A newer attempt of the job took its lease: this one must stop and write nothing more."""


def lease_key(queue_name: str, job_id: str) -> str:
    return service_key(queue_name, "lease", job_id)


def claim(connection, queue_name: str, job_id: str, token: str) -> None:
    """Make ``token`` the attempt of ``job_id`` that may write results (any earlier attempt is fenced off)."""
    connection.set(lease_key(queue_name, job_id), token, ex=LEASE_TTL_S)
    held.clear()  # a forking worker runs one attempt at a time: the map stays one entry long
    held[job_id] = token


def holder(connection, queue_name: str, job_id: str) -> str | None:
    raw = connection.get(lease_key(queue_name, job_id))
    return raw.decode() if isinstance(raw, bytes) else raw


def superseded(connection, queue_name: str, job_id: str, token: str | None = None) -> bool:
    """Whether another attempt of the job took the lease from this process's (or ``token``'s). A job that this
    process never claimed (run outside a worker) is never superseded."""
    token = token or held.get(job_id)
    if token is None:
        return False
    current = holder(connection, queue_name, job_id)
    return current is not None and current != token


def ensure_held(connection, queue_name: str, job_id: str, token: str | None = None) -> None:
    """Raise :class:`AttemptSuperseded` if another attempt of the job holds its lease."""
    if superseded(connection, queue_name, job_id, token):
        log.warning("job %s: a newer attempt holds the job; this one stops and writes nothing", job_id)
        raise AttemptSuperseded(f"job {job_id}: a newer attempt of this job is running; this one stopped")
