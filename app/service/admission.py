"""Admission control for every job (``POST /train`` and each sweep trial): what a job may cost, and how many
jobs the queue and a client may hold.

Everything knowable at submit is refused at submit (422), so no job fails minutes later for a reason the
request already showed; a full queue or a client over its share is told to come back later (429).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from redis import Redis
from redis.exceptions import LockError
from rq import Queue
from rq.job import Job

from app.config import Settings
from app.engine.boolq import HUB_SOURCE
from app.params import TrainParams
from app.service.jobs import class_queues, queued_in
from app.service.keys import Principal
from app.service.redis_connection import service_key

# What a client is told to wait before trying again when the queue or its share is full.
RETRY_AFTER_S = 30
# Rows of google/boolq's train split (DATA_DIR=hub), so the budget needs no download at submit.
HUB_TRAIN_ROWS = 9427
# Statuses in which a job still takes a place in the queue or a worker.
ACTIVE_STATUSES = {"queued", "started", "deferred", "scheduled", "created"}


class Refused(Exception):
    """A submit the service will not take, with per-field reasons."""

    def __init__(self, message: str, fields: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.fields = fields or {}


class OverLimit(Refused):
    """Never: the job breaks a rule or a budget, whatever else runs."""


class NoRoom(Refused):
    """Not now: the queue or this client is at its cap; the same submit may pass later."""


def client_key(principal: Principal, address: str | None) -> str:
    """Whom a job is counted against: the key's name once keys are checked (API_TOKEN's too), else the address (any
    string a client sends unchecked would let it pick a fresh key per request)."""
    if principal.authenticated:
        return f"key:{principal.name}"
    return f"addr:{address or 'unknown'}"


@functools.lru_cache(maxsize=8)
def _count_rows(path: Path, mtime_ns: int, size: int) -> int:
    with path.open("rb") as lines:
        return sum(1 for line in lines if line.strip())


def available_train_rows(data_dir: Path) -> int | None:
    """Rows in DATA_DIR's train split (counted once per file version); None when the data is unreadable here."""
    if str(data_dir) == HUB_SOURCE:
        return HUB_TRAIN_ROWS
    path = Path(data_dir) / "train.jsonl"
    try:
        stat = path.stat()
        return _count_rows(path, stat.st_mtime_ns, stat.st_size)
    except OSError:
        return None  # the worker will name the data problem; it is the operator's, not the client's


def check_cost(params: TrainParams, settings: Settings, dataset_rows: int | None = None) -> None:
    """422 when the job could never run as asked: more devices than a worker has, a step too large for a worker's
    memory, too few rows to split off a dev set, or over the budget. ``dataset_rows``: an uploaded dataset's train
    rows, as its record says (default: BoolQ's in DATA_DIR)."""
    if params.devices > settings.max_devices:
        reason = (
            f"{params.devices} devices asked, this service's workers give at most {settings.max_devices} (MAX_DEVICES)"
        )
        raise OverLimit(reason, {"devices": reason})
    # Peak activation memory follows the tokens one step holds in one process (each device takes its share of
    # the batch), whatever the job's total.
    per_device = math.ceil(params.batch_size / params.devices)
    step_tokens = per_device * params.max_length
    if step_tokens > settings.max_step_tokens:
        share = (
            f" (its share of batch_size {params.batch_size} on {params.devices} devices)" if params.devices > 1 else ""
        )
        reason = (
            f"a training step of {per_device} examples{share} × max_length {params.max_length} = {step_tokens:,} "
            f"tokens exceeds this service's cap of {settings.max_step_tokens:,} tokens per step (MAX_STEP_TOKENS, "
            "peak activation memory); lower batch_size or max_length"
        )
        raise OverLimit(reason, {"batch_size": reason, "max_length": reason})
    available = dataset_rows if dataset_rows is not None else available_train_rows(settings.data_dir)
    if available is None:
        return
    rows = min(params.train_limit, available) if params.train_limit else available
    if rows < 2:
        reason = f"{rows} training row(s) cannot be split into train and dev; use train_limit ≥ 2"
        raise OverLimit(reason, {"train_limit": reason})
    tokens = params.epochs * rows * params.max_length
    if tokens > settings.max_job_tokens:
        reason = (
            f"estimated {tokens:,} tokens (epochs {params.epochs} × {rows} training rows × max_length "
            f"{params.max_length}) exceed this service's budget of {settings.max_job_tokens:,} (MAX_JOB_TOKENS)"
        )
        raise OverLimit(reason, {name: reason for name in ("epochs", "train_limit", "max_length")})


class Admission:
    """Counts queued jobs and each client's active jobs, atomically with the enqueue (one Redis lock)."""

    def __init__(self, queue: Queue, settings: Settings):
        self.queue = queue
        self.settings = settings
        self.prefix = service_key(queue.name)

    @property
    def connection(self) -> Redis:
        return self.queue.connection

    def admit(self, client: str, enqueue, ending: str | None = None) -> Job:
        """Run ``enqueue()`` if the queue and ``client`` have room; else raise :class:`NoRoom`.

        Every job passes here, a sweep's trials too. ``ending``: the id of a job that is ending and starts its
        successor (a sweep's trial), not counted against the client."""
        lock = self.connection.lock(f"{self.prefix}:admission", timeout=10, blocking_timeout=5)
        try:
            with lock:
                self.check_room(client, ending)
                job = enqueue()
                key = self.client_set(client)
                self.connection.pipeline().sadd(key, job.id).expire(key, self.settings.result_ttl).execute()
                return job
        except LockError as exc:
            raise NoRoom("the service is busy admitting other jobs; retry shortly") from exc

    def check_room(self, client: str, ending: str | None = None) -> None:
        queued = self.queued_count()
        if queued >= self.settings.max_queued_jobs:
            raise NoRoom(f"the queue is full ({queued} jobs waiting, MAX_QUEUED_JOBS); retry later")
        active = self.active_jobs_of(client, ending)
        if active >= self.settings.max_jobs_per_client:
            raise NoRoom(
                f"you have {active} queued or running jobs, the most one client may have (MAX_JOBS_PER_CLIENT); "
                "wait for one to finish or cancel one",
            )

    def queued_count(self) -> int:
        return sum(queued_in(q) for q in class_queues(self.queue))

    def client_set(self, client: str) -> str:
        return f"{self.prefix}:client:{client}"

    def active_jobs_of(self, client: str, ending: str | None = None) -> int:
        """The client's queued or running jobs; ended or expired ones leave its set here (at most the cap is read)."""
        key = self.client_set(client)
        ids = [i.decode() for i in self.connection.smembers(key) if i.decode() != ending]
        if not ids:
            return 0
        # A job whose worker died is failed here, not counted as running forever.
        for queue in class_queues(self.queue):
            queue.started_job_registry.cleanup()
        pipe = self.connection.pipeline()
        for job_id in ids:
            pipe.hget(Job.key_for(job_id), "status")
        statuses = pipe.execute()
        ended = [i for i, s in zip(ids, statuses, strict=True) if s is None or s.decode() not in ACTIVE_STATUSES]
        if ended:
            self.connection.srem(key, *ended)
        return len(ids) - len(ended)
