"""An index of a queue's jobs in Redis, so listing and counting cost O(page), not O(every job kept 30 days).

RQ keeps jobs in per-state registries; listing them newest first would load all of them. The index is one
sorted set (job id → creation time) written at enqueue; ids whose record expired are pruned as they are met,
plus a few of the oldest on every read, so the set tracks RQ's records without a sweep of its own.
"""

from __future__ import annotations

import time

from rq import Queue
from rq.job import Job

from app.service.redis_connection import service_key

# Oldest index entries checked for expiry on each listing (records expire roughly oldest first).
PRUNE_BATCH = 20


class JobIndex:
    """Job ids of one queue by creation time, and the ids of the jobs stopped by a cancel."""

    def __init__(self, queue: Queue):
        self.queue = queue
        self.connection = queue.connection
        self.key = service_key(queue.name, "jobs")
        self.stopped_key = service_key(queue.name, "stopped")
        self.backfilled_key = service_key(queue.name, "jobs", "backfilled")

    def owner_key(self, owner: str) -> str:
        """One key's jobs, so a key that sees only its own lists them in O(page) too."""
        return service_key(self.queue.name, "jobs", "owner", owner)

    def add(self, job: Job, owner: str | None = None) -> None:
        created = job.created_at.timestamp() if job.created_at else time.time()
        pipe = self.connection.pipeline()
        pipe.zadd(self.key, {job.id: created})
        if owner is not None:
            pipe.zadd(self.owner_key(owner), {job.id: created})
        pipe.execute()

    def page(self, page: int, per_page: int, owner: str | None = None) -> tuple[list[Job], int]:
        """One page of jobs (``owner``'s only, if given), newest first, and how many the index holds."""
        self.backfill_once()
        key = self.key if owner is None else self.owner_key(owner)
        self.prune_oldest(key)
        start = (page - 1) * per_page
        while True:
            ids = [i.decode() for i in self.connection.zrevrange(key, start, start + per_page - 1)]
            jobs = self.queue.job_class.fetch_many(ids, self.connection, self.queue.serializer)
            expired = [job_id for job_id, job in zip(ids, jobs, strict=True) if job is None]
            if not expired:
                return jobs, self.connection.zcard(key)
            self.connection.zrem(key, *expired)  # the page shifts up; read it again

    def prune_oldest(self, key: str) -> None:
        ids = [i.decode() for i in self.connection.zrange(key, 0, PRUNE_BATCH - 1)]
        if not ids:
            return
        pipe = self.connection.pipeline()
        for job_id in ids:
            pipe.exists(Job.key_for(job_id))
        gone = [job_id for job_id, exists in zip(ids, pipe.execute(), strict=True) if not exists]
        if gone:
            self.connection.zrem(key, *gone)

    def backfill_once(self) -> None:
        """Index the jobs a version without the index left in Redis; done once per queue."""
        if not self.connection.set(self.backfilled_key, "1", nx=True):
            return
        ids = sorted(all_job_ids(self.queue))
        for start in range(0, len(ids), 500):
            jobs = self.queue.job_class.fetch_many(ids[start : start + 500], self.connection, self.queue.serializer)
            found = {job.id: job.created_at.timestamp() for job in jobs if job is not None and job.created_at}
            if found:
                self.connection.zadd(self.key, found)

    def mark_stopped(self, job: Job, ttl_s: int) -> None:
        """Remember a job stopped by a cancel: RQ files it among the failed ones, /metrics counts it cancelled."""
        self.connection.zadd(self.stopped_key, {job.id: time.time() + ttl_s})

    def stopped_in(self, failed_registry_key: str) -> int:
        """How many of the jobs in RQ's failed registry were stopped by a cancel (reads only stopped ids)."""
        self.connection.zremrangebyscore(self.stopped_key, "-inf", time.time())
        ids = self.connection.zrange(self.stopped_key, 0, -1)
        if not ids:
            return 0
        pipe = self.connection.pipeline()
        for job_id in ids:
            pipe.zscore(failed_registry_key, job_id)
        return sum(score is not None for score in pipe.execute())


def all_job_ids(queue: Queue) -> set[str]:
    """Ids of every job RQ still knows on this queue, whatever its state (registries clean up first)."""
    registries = (
        queue.started_job_registry,
        queue.finished_job_registry,
        queue.failed_job_registry,
        queue.canceled_job_registry,
        queue.deferred_job_registry,
        queue.scheduled_job_registry,
    )
    ids = set(queue.get_job_ids())
    for registry in registries:
        ids.update(registry.get_job_ids())
    return ids
