"""The RQ worker that runs training jobs: which queues it listens to, and how it rides out a Redis failover."""

from __future__ import annotations

import logging

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Worker
from rq.serializers import JSONSerializer

from app.config import Settings
from app.service.jobs import training_queue
from app.service.redis_connection import connect_redis

log = logging.getLogger(__name__)


class TrainingWorker(Worker):
    """RQ's forking worker, except that a heartbeat lost to a Redis gap (a Sentinel failover) is not fatal."""

    def maintain_heartbeats(self, job, execution):
        # RQ quits the worker on any error here, abandoning the running job; the next heartbeat reconnects.
        try:
            super().maintain_heartbeats(job, execution)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("worker %s: heartbeat missed, Redis unreachable (a failover?): %s", self.name, exc)


def make_worker(settings: Settings) -> Worker:
    """An RQ worker on the training queue; each job runs in a forked work horse it watches."""
    connection = connect_redis(settings, for_worker=True)
    return TrainingWorker(
        [training_queue(settings, connection)],
        connection=connection,
        serializer=JSONSerializer,
        job_monitoring_interval=settings.worker_heartbeat,
    )
