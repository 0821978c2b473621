"""The RQ worker that runs training jobs: what it advertises, which queues it takes jobs from, and how it rides
out a Redis failover.

A worker is of the gpu class when torch sees a GPU (and DEVICE is not cpu), else of the cpu class; it takes jobs
from its class's queue first, then from the service's queue that every worker shares ("any"). So a job asking
for a GPU waits in ``<queue>:gpu`` until a GPU worker is up, instead of failing on a CPU one.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue, Worker, worker_registration
from rq.serializers import JSONSerializer
from rq.utils import now

from app.config import Settings
from app.engine.distributed import cpu_cores
from app.engine.lifetime import die_with_parent
from app.service import attempts, registry, sweeps
from app.service.job_times import record_job_time
from app.service.jobs import (
    MAINTENANCE_INTERVAL_S,
    WORKER_SEEN_KEY,
    ProjectJob,
    class_queue,
    fail_jobs_without_workers,
    record_interruption,
    training_queue,
)
from app.service.redis_connection import connect_redis

log = logging.getLogger(__name__)

# The grace RQ adds to a job's heartbeat TTL (rq.worker.BaseWorker.get_heartbeat_ttl).
RQ_GRACE_S = 60
# How long past its heartbeat interval a worker still counts as live (RQ keeps a silent one listed 90 s to 8 min).
LIVENESS_MARGIN_S = 15
# How long a queue's "a worker was here" time is kept (WORKER_SEEN_KEY).
SEEN_TTL_S = 30 * 24 * 3600


class TrainingWorker(Worker):
    """RQ's forking worker, advertising its capabilities in its Redis record (which expires with its heartbeats),
    surviving a heartbeat lost to a Redis gap (a Sentinel failover), and running ``on_maintenance`` (the sweeps'
    periodic check, the champion pointer's sync) with RQ's own maintenance."""

    def __init__(self, *args, capabilities: dict, on_maintenance=None, grace_s: int = RQ_GRACE_S, **kwargs):
        super().__init__(*args, **kwargs)
        self.capabilities = capabilities
        self.on_maintenance = on_maintenance
        self.grace_s = grace_s

    @property
    def dequeue_timeout(self) -> int:
        # RQ blocks an idle worker on the queue for its worker_ttl - 15 s (405 s) between heartbeats.
        return max(1, self.job_monitoring_interval // 2)

    def heartbeat(self, timeout=None, pipeline=None):
        """RQ's heartbeat with a TTL that follows the heartbeat interval, so a killed worker leaves the live count
        within WORKER_HEARTBEAT + LIVENESS_MARGIN_S; it registers again (a worker whose record lapsed, in a Redis gap,
        is dropped by other workers' maintenance) and notes, per queue, that a worker was here (WORKER_WAIT_S)."""
        connection = pipeline if pipeline is not None else self.connection.pipeline()
        super().heartbeat(self.job_monitoring_interval + LIVENESS_MARGIN_S, pipeline=connection)
        worker_registration.register(self, connection)
        for queue in self.queues:
            connection.set(WORKER_SEEN_KEY.format(queue.name), time.time(), ex=SEEN_TTL_S)
        if pipeline is None:
            connection.execute()

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        # RQ adds a fixed 60 s past the heartbeat interval; WORKER_GRACE_S says how long instead.
        return super().get_heartbeat_ttl(job, working_time) - RQ_GRACE_S + self.grace_s

    def run_maintenance_tasks(self):
        # A maintenance hiccup (a record planted in Redis, a gap) must not stop the worker taking jobs.
        try:
            super().run_maintenance_tasks()
        except Exception:
            log.exception("RQ's registry maintenance failed")
        if self.on_maintenance is not None:
            try:
                self.on_maintenance()
            except Exception:
                log.exception("periodic maintenance failed")

    def perform_job(self, job, queue, execution):
        """RQ's run of a job (in the work horse), timed for ``/metrics``: its wait in the queue, then its run."""
        queue_name = self.queues[-1].name  # the service's queue (make_worker puts the class queue first)
        if job.enqueued_at is not None:
            record_job_time(self.connection, queue_name, "queue_wait", (now() - job.enqueued_at).total_seconds())
        started = time.monotonic()
        try:
            return super().perform_job(job, queue, execution)
        finally:
            record_job_time(self.connection, queue_name, "duration", time.monotonic() - started)

    def prepare_execution(self, job):
        """RQ's start of an attempt, in the worker before it forks; the attempt takes the job's lease (``attempts``)."""
        execution = super().prepare_execution(job)
        attempts.claim(self.connection, job.origin, job.id, execution.id)
        return execution

    def main_work_horse(self, job, queue):
        # The horse must not outlive its worker: a worker killed alone would leave it training while another worker
        # re-runs the job. SIGKILL, as RQ's own cold shutdown does; a worker that died before prctl took effect
        # (the horse was re-parented) means the attempt is already lost.
        armed = die_with_parent(signal.SIGKILL)
        if os.getppid() != self.pid:
            os._exit(1)
        if not armed:
            log.warning("work horse of job %s: cannot ask the kernel to end it with its worker", job.id)
        super().main_work_horse(job, queue)

    def superseded(self, job, execution) -> bool:
        """Whether a newer attempt took the job (this worker was frozen or cut off): then its outcome is not
        written, only this attempt's own execution record is dropped."""
        token = execution.id if execution is not None else None
        if not attempts.superseded(self.connection, job.origin, job.id, token):
            return False
        log.warning("job %s: attempt %s was superseded by a newer one; its outcome is not recorded", job.id, token)
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.execute()
        return True

    def handle_job_success(self, job, queue, started_job_registry, execution):
        if self.superseded(job, execution):
            return
        super().handle_job_success(job, queue, started_job_registry, execution)

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
        if self.superseded(job, execution):
            return
        # Here, not in the work horse, RQ handles a work horse that died: the job will be re-run; say why it ended.
        if not self.is_horse and self._stopped_job_id != job.id and job.should_retry:
            try:
                record_interruption(job, exc_string)
            except Exception:
                log.exception("job %s: could not record why its run ended", job.id)
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def register_birth(self):
        super().register_birth()
        self.connection.hset(self.key, mapping={f"boolq_{k}": v for k, v in self.capabilities.items()})
        self.heartbeat()  # RQ's birth gives the record 8 minutes to live

    def maintain_heartbeats(self, job, execution):
        # RQ quits the worker on any error here, abandoning the running job; the next heartbeat reconnects.
        try:
            super().maintain_heartbeats(job, execution)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("worker %s: heartbeat missed, Redis unreachable (a failover?): %s", self.name, exc)


def worker_capabilities(settings: Settings) -> dict:
    """This machine's class (gpu or cpu), GPUs and cores, as the worker advertises them."""
    # NVML's count: CUDA stays uninitialised in this process, so the jobs it forks can still use it.
    gpus = 0 if settings.device == "cpu" else torch.cuda.device_count()
    return {"accelerator": "gpu" if gpus else "cpu", "gpus": gpus, "cpu_cores": cpu_cores()}


def periodic_check(settings: Settings, queue: Queue) -> None:
    """What a worker runs with RQ's maintenance: fail the jobs no worker can take (a gpu job with no gpu worker),
    advance unfinished sweeps, report an MLflow champion alias moved outside the service (never copied into Redis).
    A step that fails never skips the next."""
    try:
        fail_jobs_without_workers(queue, settings)
    except Exception:
        log.exception("periodic check: failing the jobs no worker can take failed")
    try:
        sweeps.advance_unfinished(settings, queue)
    except Exception:
        log.exception("periodic check: advancing the sweeps failed")
    registry.report_foreign_alias(queue.connection, settings)


def make_worker(settings: Settings, on_maintenance=None) -> Worker:
    """A worker on its class's queue and the shared one; each job runs in a forked work horse it watches, and only
    if it names one of the project's tasks (``ProjectJob``). ``on_maintenance`` runs every MAINTENANCE_INTERVAL_S."""
    connection = connect_redis(settings, for_worker=True)
    capabilities = worker_capabilities(settings)
    shared = training_queue(settings, connection)
    log.info("worker capabilities: %s", capabilities)
    return TrainingWorker(
        [class_queue(shared, capabilities["accelerator"]), shared],
        connection=connection,
        serializer=JSONSerializer,
        job_class=ProjectJob,
        job_monitoring_interval=settings.worker_heartbeat,
        maintenance_interval=MAINTENANCE_INTERVAL_S,
        capabilities=capabilities,
        on_maintenance=on_maintenance,
        grace_s=settings.worker_grace_s,
    )
