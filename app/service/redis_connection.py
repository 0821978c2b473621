"""The one way to the service's Redis: REDIS_URL, or the master that REDIS_SENTINELS name.

Everything that talks to Redis (the RQ queue and workers, the job index, admission, the champion pointer,
the sweeps' Optuna journal) gets its client here, so a Sentinel setup is one setting and a failover is
followed everywhere: redis-py's Sentinel client asks the Sentinels for the master on every new connection.
"""

from __future__ import annotations

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from app.config import Settings

# The API fails fast: a dead Redis, or a failover's gap, answers 503 at once instead of hanging; one quick retry
# covers a pooled connection that broke while idle.
API_OPTIONS = {
    "socket_connect_timeout": 2,
    "socket_timeout": 5,
    "retry": Retry(ExponentialBackoff(cap=0.05, base=0.05), retries=1),
}
# A worker waits a failover out (~30 s of retries), so a job that ends in the gap still stores its result;
# no socket timeout, as its blocking dequeue waits longer than any.
WORKER_OPTIONS = {"socket_keepalive": True, "retry": Retry(ExponentialBackoff(cap=2, base=0.1), retries=20)}


def connect_redis(settings: Settings, for_worker: bool = False) -> Redis:
    """A client of the service's Redis, for the API (fail fast) or for a worker (wait out a failover)."""
    options = WORKER_OPTIONS if for_worker else API_OPTIONS
    if not settings.redis_sentinels:
        return Redis.from_url(settings.redis_url, **options)
    # With Sentinels, REDIS_URL names the database and the credentials; its host is whatever master they name.
    credentials = {k: v for k, v in parse_url(settings.redis_url).items() if k in ("username", "password", "db")}
    sentinel = Sentinel(
        settings.sentinel_addresses(),
        sentinel_kwargs={"password": settings.redis_sentinel_password or None, "socket_connect_timeout": 2},
        **options,
    )
    return sentinel.master_for(settings.redis_sentinel_master, **credentials)


def service_key(queue_name: str, *parts: str) -> str:
    """One of this service's Redis keys, ``boolq:<queue>:<part>:…``: services sharing a Redis stay apart by queue."""
    return ":".join(("boolq", queue_name, *parts))
