"""How long jobs wait in the queue and how long they run, as Prometheus histograms kept in Redis.

A worker observes each job it starts (queue wait) and ends (run time) and adds it to the buckets here, so every
replica's ``/metrics`` shows the same totals, whichever worker on whichever host ran the job, and each job counts
once (a replica reading a job's status would count it once per read, per replica).
"""

from __future__ import annotations

import logging
import math

from redis import Redis
from redis.exceptions import RedisError

from app.service.redis_connection import service_key

log = logging.getLogger(__name__)

# Upper bounds in seconds: a tiny job to a day-long fine-tuning (JOB_TIMEOUT's default).
BUCKETS_S = {
    "queue_wait": (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, math.inf),
    "duration": (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 24 * 3600, math.inf),
}


def bucket_name(bound: float) -> str:
    return "+Inf" if bound == math.inf else str(bound)


def record_job_time(connection: Redis, queue_name: str, kind: str, seconds: float) -> None:
    """Add one observation to the ``kind`` histogram (cumulative buckets, as Prometheus reads them); a Redis gap
    loses the observation, never the job."""
    key = service_key(queue_name, "job-times", kind)
    try:
        with connection.pipeline(transaction=True) as pipe:
            for bound in BUCKETS_S[kind]:
                if seconds <= bound:
                    pipe.hincrby(key, bucket_name(bound), 1)
            pipe.hincrbyfloat(key, "sum", max(seconds, 0.0))
            pipe.execute()
    except RedisError as exc:
        log.warning("could not record a job's %s: %s", kind, exc)


def read_job_times(connection: Redis, queue_name: str, kind: str) -> tuple[list[tuple[str, float]], float]:
    """The ``kind`` histogram's cumulative buckets and its sum (zeros before the first job). Redis is data: a value
    that is not a number counts as 0."""
    raw = connection.hgetall(service_key(queue_name, "job-times", kind))
    values = {key.decode(): number(value) for key, value in raw.items()}
    buckets = [(bucket_name(bound), values.get(bucket_name(bound), 0.0)) for bound in BUCKETS_S[kind]]
    return buckets, values.get("sum", 0.0)


def number(raw: bytes) -> float:
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0
