"""Training as RQ jobs: the queue, and a job's state as the API reports it (the task is ``app.service.tasks``).

The lifecycle is RQ's (statuses and registries in Redis); this module only maps it to the API's
words (queued | running | succeeded | failed | cancelled, and pruned for a sweep trial the pruner stopped).
Progress lives in the job's ``meta``.
"""

from __future__ import annotations

import contextlib
import logging
import time

from redis import Redis
from rq import Queue, Retry
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.serializers import JSONSerializer
from rq.utils import decode_redis_hash
from rq.worker_registration import get_keys

from app.config import Settings
from app.engine.run_folder import Progress as Progress  # the shape of a job's progress, for the API's schema
from app.engine.run_folder import ScoringProgress as ScoringProgress
from app.params import TrainParams
from app.service.job_index import JobIndex
from app.service.redaction import without_server_addresses, without_server_paths
from app.service.redis_connection import connect_redis as connect_redis  # the API's and the tests' way in

log = logging.getLogger(__name__)

LEARNED_NOTHING = "the model learned nothing: val accuracy is within 1 point of always answering the majority class"
# The worker's tasks, by name: the web side never imports them (nor torch).
TRAIN_TASK = "app.service.tasks.train_job"
TRIAL_TASK = "app.service.sweeps.trials.trial_job"
PREDICT_TASK = "app.service.tasks.predict_job"
# The only functions a worker imports and runs: whoever can write to Redis must not choose the code.
PROJECT_TASKS = frozenset({TRAIN_TASK, TRIAL_TASK, PREDICT_TASK})
# What a job id (and a run folder's name) may be: what the API accepts in a path, and in an MLflow filter.
JOB_ID_RULE = r"[A-Za-z0-9_-]{1,64}"
# The fields of RQ's job record that name code to import or a URL to call (callbacks, webhooks).
BEHAVIOUR_FIELDS = ("success_callback_name", "failure_callback_name", "stopped_callback_name", "webhooks")
# How often a worker runs RQ's registry cleanup and the sweeps' check (trials whose worker died, trials to start).
MAINTENANCE_INTERVAL_S = 60
# The job's meta keys: the re-runs it was allowed when enqueued, and how its worker's last death was seen.
RETRIES = "retries"
INTERRUPTED = "interrupted"
# The meta key naming the API key that created a job (app.service.keys), and the most of one key's jobs a
# status filter reads.
OWNER = "owner"
OWNER_SCAN = 10_000
# When a worker listening on a queue last sent a heartbeat (unix seconds), per queue name: how long a class of jobs
# has had no live worker (WORKER_WAIT_S).
WORKER_SEEN_KEY = "boolq:worker-seen:{}"
# RQ's failure_ttl when a job sets none (one year).
DEFAULT_FAILURE_TTL = 365 * 24 * 3600

PUBLIC_STATUS = {
    JobStatus.CREATED: "queued",
    JobStatus.QUEUED: "queued",
    JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued",
    JobStatus.READY_TO_ENQUEUE: "queued",
    JobStatus.RATE_LIMITED: "queued",
    JobStatus.STARTED: "running",
    JobStatus.FINISHED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "cancelled",
    JobStatus.CANCELED: "cancelled",
}
FINAL_STATUSES = {"succeeded", "failed", "cancelled", "pruned"}
# Worker classes: each has its own queue besides the service's queue, which every worker listens to ("any").
ACCELERATORS = ("cpu", "gpu")


class JobNotFound(LookupError):
    """No job with this id (never created, or its record expired)."""


class JobAlreadyFinished(RuntimeError):
    """Cancel was asked for a job that has already ended."""


class ForbiddenTask(RuntimeError):
    """A job names a function that is not one of the project's tasks, or a callback or webhook; it is never run."""


class UnreadableJob(NoSuchJobError):
    """A job record RQ cannot read (a field planted or mangled in Redis): treated as no job, so a worker skips it
    and its maintenance drops it instead of quitting on the error."""


class ProjectJob(Job):
    """An RQ job that resolves only the project's tasks: RQ would import any ``module.function`` named in Redis.

    Redis carries data, never behaviour: RQ also imports the callbacks and calls the webhooks a job's record
    names, when the job runs and when maintenance fails it. The project sets none, so those fields are dropped
    as the record is read (nothing can run them, in a worker or the API) and a job that names any is refused.

    Only a worker's death re-runs a job (``JOB_RETRIES``): a job that raises would raise again (bad data, a model
    that does not exist, TrackingFailed), so it fails at once whatever retries it has left.
    """

    planted: tuple[str, ...] = ()
    raised = False

    def perform(self):
        try:
            return super().perform()
        except BaseException:
            self.raised = True
            raise

    @property
    def should_retry(self) -> bool:
        # Read in the work horse after the task raised; RQ's abandoned-job cleanup reads retries_left instead.
        return super().should_retry and not self.raised

    def restore(self, raw_data) -> None:
        record = decode_redis_hash(raw_data)
        self.planted = tuple(name for name in BEHAVIOUR_FIELDS if record.get(name))
        try:
            super().restore(raw_data)
        except NoSuchJobError:
            raise
        except Exception as exc:
            raise UnreadableJob(f"job {self.id}: its record in Redis cannot be read ({exc})") from exc
        self._success_callback_name = self._failure_callback_name = self._stopped_callback_name = None
        self.webhooks = []

    @classmethod
    def fetch_many(cls, job_ids, connection, serializer=None) -> list[Job | None]:
        """RQ's bulk fetch, with a record it cannot read as a missing one (None): a listing or a registry's
        maintenance passes over it."""
        job_ids = list(job_ids)
        try:
            return super().fetch_many(job_ids, connection, serializer)
        except UnreadableJob:  # rare: read them one at a time
            return [fetched_or_none(cls, job_id, connection, serializer) for job_id in job_ids]

    @property
    def func(self):
        name = self.func_name
        if self.instance is not None or name not in PROJECT_TASKS:
            raise ForbiddenTask(f"job {self.id} names {name!r}, not one of this service's tasks; it was not run")
        if self.planted:
            raise ForbiddenTask(f"job {self.id} sets {', '.join(self.planted)}; none is allowed, it was not run")
        return super().func

    # And none runs even on a job built in this process, not read from Redis.
    @property
    def success_callback(self):
        return None

    @property
    def failure_callback(self):
        return None

    @property
    def stopped_callback(self):
        return None

    def send_webhooks(self, status, *, exc_string=None) -> None:
        return None


def fetched_or_none(job_class: type[Job], job_id: str, connection: Redis, serializer) -> Job | None:
    try:
        return job_class.fetch(job_id, connection=connection, serializer=serializer)
    except NoSuchJobError:
        return None


def training_queue(settings: Settings, connection: Redis) -> Queue:
    """The RQ queue of training jobs; JSON-serialized so job data is plain and readable (no pickle). Every queue is
    built with ``ProjectJob``: its registries' maintenance (in a worker and in the API) reads jobs through it."""
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer, job_class=ProjectJob)


def class_queue(queue: Queue, accelerator: str) -> Queue:
    """The queue of jobs asking for ``accelerator``: ``queue`` itself for "any", else ``<queue>:gpu`` or ``:cpu``."""
    if accelerator == "any":
        return queue
    return Queue(
        f"{queue.name}:{accelerator}", connection=queue.connection, serializer=queue.serializer, job_class=ProjectJob
    )


def class_queues(queue: Queue) -> list[Queue]:
    """Every queue a job of the service may wait in: ``queue`` (any worker) and each worker class's."""
    return [queue, *(class_queue(queue, accelerator) for accelerator in ACCELERATORS)]


def origin_queue(queue: Queue, job: Job) -> Queue:
    return Queue(job.origin, connection=queue.connection, serializer=queue.serializer, job_class=ProjectJob)


def live_workers(queue: Queue) -> int:
    """Workers listening on ``queue`` now: registered, and with a key their heartbeats keep from expiring."""
    keys = list(get_keys(queue))
    if not keys:
        return 0
    pipe = queue.connection.pipeline()
    for key in keys:
        pipe.exists(key)
    return sum(pipe.execute())


def workers_by_class(queue: Queue) -> dict[str, int]:
    """How many workers listen for each class of job ("any" counts every worker: all of them take those)."""
    return {"any": live_workers(queue)} | {a: live_workers(class_queue(queue, a)) for a in ACCELERATORS}


def no_worker_since(queue: Queue) -> float | None:
    """None while a live worker listens on ``queue``; else when one last did (unix seconds, 0 = never)."""
    if live_workers(queue):
        return None
    seen = queue.connection.get(WORKER_SEEN_KEY.format(queue.name))
    return float(seen) if seen else 0.0


def fail_if_no_worker(job: Job, settings: Settings) -> bool:
    """Fail a queued ``job`` (``NoWorker``) once it has waited WORKER_WAIT_S with no live worker of its class all
    that time: it would wait forever and hold a place under the queue's caps. True if it was failed here."""
    if job.get_status(refresh=False) != JobStatus.QUEUED:
        return False
    queue = Queue(job.origin, connection=job.connection, serializer=job.serializer, job_class=ProjectJob)
    since = no_worker_since(queue)
    if since is None or max(since, job.enqueued_at.timestamp() if job.enqueued_at else 0.0) > (
        time.time() - settings.worker_wait_s
    ):
        return False
    if not queue.connection.lrem(queue.key, 0, job.id):
        return False  # a worker took it meanwhile
    accelerator = (job.args[0] if job.args else {}).get("accelerator", "any")
    worker = "worker" if accelerator == "any" else f"{accelerator} worker"
    reason = (
        f"NoWorker: no live {worker} for {settings.worker_wait_s} s (WORKER_WAIT_S), so nothing could run this job; "
        f"start a {worker}" + ("" if accelerator == "any" else " or submit with accelerator any")
    )
    with job.connection.pipeline() as pipeline:
        record_job_failure(job, reason, pipeline)
        pipeline.execute()
    log.warning("job %s failed: %s", job.id, reason)
    return True


def fail_jobs_without_workers(queue: Queue, settings: Settings) -> None:
    """``fail_if_no_worker`` for every queued job of every class (a worker's periodic check)."""
    for q in class_queues(queue):
        if q.count and no_worker_since(q) is not None:
            for job in ProjectJob.fetch_many(q.get_job_ids(), q.connection, q.serializer):
                if job is not None:
                    fail_if_no_worker(job, settings)


def enqueue_training(queue: Queue, params: TrainParams, settings: Settings, owner: str | None = None) -> Job:
    """Put one training run on its class's queue (and in the job index); the job id becomes the run folder's name."""
    return enqueue_job(
        queue,
        TRAIN_TASK,
        [params.model_dump()],
        settings,
        description=f"train {params.model}",
        accelerator=params.accelerator,
        owner=owner,
    )


def enqueue_job(
    queue: Queue,
    task: str,
    args: list,
    settings: Settings,
    *,
    description: str,
    job_id: str | None = None,
    meta: dict | None = None,
    accelerator: str = "any",
    owner: str | None = None,
) -> Job:
    """The one way a job reaches the queue (called inside ``Admission.admit``): timeouts, retries and TTLs from
    the settings, the queue of the worker class it asks for, and the service's job index, the same for a training
    and a sweep's trial. ``owner``: the key that asked for it (who may see and cancel it)."""
    if task not in PROJECT_TASKS:
        raise ForbiddenTask(f"{task!r} is not one of this service's tasks")
    job = class_queue(queue, accelerator).enqueue(
        task,
        *args,
        job_id=job_id,
        job_timeout=settings.job_timeout,
        result_ttl=settings.result_ttl,
        failure_ttl=settings.result_ttl,
        retry=Retry(max=settings.job_retries) if settings.job_retries > 0 else None,
        meta={"progress": None, RETRIES: settings.job_retries, OWNER: owner} | (meta or {}),
        description=description,
    )
    JobIndex(queue).add(job, owner)
    return job


def fetch_job(queue: Queue, job_id: str, settings: Settings | None = None) -> Job:
    """The job, after letting RQ fail (or re-run) jobs whose worker died, so none stays 'running' forever, and, given
    the ``settings``, failing it if it waited too long for a worker that never came (``fail_if_no_worker``)."""
    try:
        job = ProjectJob.fetch(job_id, connection=queue.connection, serializer=queue.serializer)
    except NoSuchJobError as exc:
        raise JobNotFound(f"no job {job_id}") from exc
    if job.get_status(refresh=False) == JobStatus.STARTED:
        origin_queue(queue, job).started_job_registry.cleanup()
        job.refresh()
    elif settings is not None and fail_if_no_worker(job, settings):
        job.refresh()
    return job


def public_status(job: Job) -> str:
    status = PUBLIC_STATUS.get(job.get_status(refresh=False), "queued")
    return "pruned" if status == "succeeded" and job.meta.get("pruned_at_epoch") else status  # a sweep's trial


def recent_jobs(queue: Queue, page: int, per_page: int, owner: str | None = None) -> tuple[list[Job], int]:
    """One page of jobs (``owner``'s only, if given), newest first, and the total count; reads only that page (the
    job index)."""
    return JobIndex(queue).page(page, per_page, owner)


def owner_of(job: Job) -> str | None:
    """The key that created the job (None: before keys, or on an open service's command line)."""
    owner = job.meta.get(OWNER)
    return owner if isinstance(owner, str) else None


def latest_succeeded_job_id(queue: Queue) -> str | None:
    """The most recently finished job of any class."""
    found = [job for q in class_queues(queue) if (job := latest_succeeded_job(q)) is not None]
    return max(found, key=lambda job: job.ended_at).id if found else None


def latest_succeeded_job(queue: Queue) -> Job | None:
    """The queue's most recently finished job (FinishedJobRegistry scores are expiry times, later = newer)."""
    for start in range(0, queue.finished_job_registry.count, 20):
        ids = queue.finished_job_registry.get_job_ids(start, start + 19, desc=True)
        for job in ProjectJob.fetch_many(ids, queue.connection, queue.serializer):
            # A pruned sweep trial has no model, nor has a batch prediction.
            if job is not None and public_status(job) == "succeeded" and job.func_name != PREDICT_TASK:
                return job
    return None


def cancel_training(queue: Queue, job: Job, wait_s: float = 5.0) -> Job:
    """Cancel a queued job, or stop a running one (RQ kills its work horse); wait briefly for the stop."""
    if public_status(job) in FINAL_STATUSES:
        raise JobAlreadyFinished(f"job {job.id} has already {public_status(job)}")
    if public_status(job) == "queued":
        # A worker may take the job between our read and the cancel; then it is stopped below instead.
        with contextlib.suppress(InvalidJobOperation):
            job.cancel()
        job.refresh()
    if job.get_status(refresh=False) == JobStatus.STARTED:
        JobIndex(queue).mark_stopped(job, ttl_s=job.failure_ttl or DEFAULT_FAILURE_TTL)
        send_stop_job_command(queue.connection, job.id, serializer=queue.serializer)
        wait_until(lambda: job.get_status() != JobStatus.STARTED, wait_s)
        job.refresh()
    return job


def wait_until(done, timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll ``done()`` until it is true or ``timeout_s`` passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(interval_s, max(deadline - time.monotonic(), 0)))
    return True


def describe_job(job: Job) -> dict:
    """What ``GET /jobs/<id>`` shows: status, params, progress, timestamps, and result or error."""
    status = public_status(job)
    return {
        "job_id": job.id,
        "status": status,
        "owner": owner_of(job),
        "params": job.args[0] if job.args else {},
        "progress": job.meta.get("progress"),
        "waiting": waiting_reason(job) if status == "queued" else None,
        "attempt": attempt_of(job),
        "max_attempts": 1 + job.meta.get(RETRIES, 0),
        "previous_attempt": previous_attempt_end(job),
        "created_at": isoformat(job.created_at),
        "enqueued_at": isoformat(job.enqueued_at),
        "started_at": isoformat(job.started_at),
        "ended_at": isoformat(job.ended_at),
        # Results and errors are written by the worker and may name server files; params are the client's own.
        "result": without_server_paths(result_summary(job)) if status == "succeeded" else None,
        "error": without_server_paths(failure_of(job)) if status == "failed" else None,
    }


def waiting_reason(job: Job) -> str | None:
    """Why a queued job cannot start whatever its turn: no live worker listens on its class's queue."""
    if live_workers(Queue(job.origin, connection=job.connection, serializer=job.serializer, job_class=ProjectJob)):
        return None
    accelerator = (job.args[0] if job.args else {}).get("accelerator", "any")
    return "waiting for a worker" if accelerator == "any" else f"waiting for a {accelerator} worker"


def attempt_of(job: Job) -> int:
    """Which run of the job this is (1 = the first): each re-run after a worker's death used one of its retries."""
    return 1 + job.meta.get(RETRIES, 0) - (job.retries_left or 0)


def previous_attempt_end(job: Job) -> dict | None:
    """Why the job's previous run ended (``{"type", "message"}``), None on its first. Two things re-run a job: its
    work horse dying under a live worker, which the worker records (``INTERRUPTED``), and the whole worker falling
    silent, which RQ's abandoned-job cleanup notices and records nothing of."""
    attempt = attempt_of(job)
    if attempt == 1:
        return None
    recorded = job.meta.get(INTERRUPTED) or {}
    if recorded.get("attempt") == attempt - 1:
        return {"type": recorded["type"], "message": recorded["message"]}
    return describe_failure("AbandonedJobError")


def record_interruption(job: Job, exc_string: str) -> None:
    """Note in the job's meta why its current run ended before RQ re-runs it (the job view's ``previous_attempt``)."""
    job.get_meta(refresh=True)  # the work horse wrote progress since this process read the job
    job.meta[INTERRUPTED] = {"attempt": attempt_of(job)} | describe_failure(exc_string)
    job.save_meta()


def result_summary(job: Job) -> dict | None:
    """The run's results without the per-example predictions (those are at /jobs/<id>/predictions)."""
    value = job.return_value()
    if not value:
        return None
    if job.func_name == PREDICT_TASK:
        return {k: value.get(k) for k in ("rows", "model", "dataset", "split", "metrics")}
    keys = ("accuracy", "n_eval", "dev_accuracy", "metrics", "tracking")
    summary = {k: value.get(k) for k in keys} | {"model": job.id, "warning": None}
    if (value.get("metrics") or {}).get("learned") is False:
        summary["warning"] = LEARNED_NOTHING
    return summary


def failure_of(job: Job) -> dict:
    """The error of a failed job as ``{"type", "message"}``; never the traceback, nor a back-end's address."""
    result = job.latest_result()
    failure = describe_failure(result.exc_string if result is not None else "")
    return failure | {"message": without_server_addresses(failure["message"])}


def describe_failure(exc_string: str | None) -> dict:
    """Turn RQ's failure text (a traceback or a worker-side note) into a short type and message."""
    text = (exc_string or "").strip()
    if "AbandonedJobError" in text:
        return {
            "type": "WorkerLost",
            "message": "the worker running this job stopped sending heartbeats (killed or lost); job abandoned",
        }
    if text.startswith("Work-horse terminated unexpectedly"):
        return {
            "type": "WorkerKilled",
            "message": f"the process running this job was killed (for example out of memory): {text.rstrip('; ')}",
        }
    if not text:
        return {"type": "Unknown", "message": "the job failed without an error message"}
    kind, _, message = exception_text(text).partition(": ")
    return {"type": kind.rsplit(".", 1)[-1], "message": " ".join(message.split()) or kind}


def exception_text(traceback_text: str) -> str:
    """The ``Type: message`` part of a traceback: the unindented lines after the last frame."""
    lines = traceback_text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    rest = lines[frames[-1] + 1 :] if frames else lines
    while rest and rest[0].startswith(" "):
        rest = rest[1:]
    return "\n".join(rest) or lines[-1]


def isoformat(moment) -> str | None:
    return moment.isoformat() if moment else None


def queued_in(queue: Queue) -> int:
    """Jobs waiting in ``queue``: enqueued, deferred or scheduled (a retry waiting its turn)."""
    return queue.count + queue.deferred_job_registry.count + queue.scheduled_job_registry.count


def job_counts(queue: Queue) -> dict[str, int]:
    """Jobs per public status in every class's queue, for the metrics endpoint; registry sizes only, no job is loaded.

    Jobs stopped by a cancel sit in RQ's failed registry; the job index remembers which, so they count as cancelled.
    """
    counts = dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0)
    for q in class_queues(queue):
        stopped = JobIndex(queue).stopped_in(q.failed_job_registry.key)
        counts["queued"] += queued_in(q)
        counts["running"] += q.started_job_registry.count
        counts["succeeded"] += q.finished_job_registry.count
        counts["failed"] += q.failed_job_registry.count - stopped
        counts["cancelled"] += q.canceled_job_registry.count + stopped
    return counts


# The registries that can hold a job of each public status (stopped jobs sit in RQ's failed registry).
STATUS_REGISTRIES = {
    "queued": ("deferred_job_registry", "scheduled_job_registry"),
    "running": ("started_job_registry",),
    "succeeded": ("finished_job_registry",),
    "failed": ("failed_job_registry",),
    "cancelled": ("canceled_job_registry", "failed_job_registry"),
}


def recent_jobs_with_status(
    queue: Queue, status: str, page: int, per_page: int, owner: str | None = None
) -> tuple[list[Job], int]:
    """One page of the jobs in one public status, newest first, and their count (the console's filter).

    Succeeded and running jobs are paged in their registry's order (by when they ended or last beat, newest
    first), reading only the page: those registries can hold thousands. The others are few; they are
    read whole and sorted by creation time.
    """
    start = (page - 1) * per_page
    if owner is not None:  # one key's jobs: its own index, read whole (up to OWNER_SCAN) and filtered
        found, _ = recent_jobs(queue, 1, OWNER_SCAN, owner)
        matching = [j for j in found if public_status(j) == status]
        return matching[start : start + per_page], len(matching)
    if status in ("succeeded", "running"):
        registries = [getattr(q, STATUS_REGISTRIES[status][0]) for q in class_queues(queue)]
        return registry_page([r for r in registries if r.count] or registries[:1], status, start, per_page)
    ids = set()
    for q in class_queues(queue):
        ids.update(q.get_job_ids() if status == "queued" else ())
        for name in STATUS_REGISTRIES[status]:
            ids.update(getattr(q, name).get_job_ids())
    found = ProjectJob.fetch_many(list(ids), queue.connection, queue.serializer)
    matching = [j for j in found if j is not None and public_status(j) == status]
    matching.sort(key=lambda j: j.created_at, reverse=True)
    return matching[start : start + per_page], len(matching)


def registry_page(registries: list, status: str, start: int, per_page: int) -> tuple[list[Job], int]:
    """Jobs ``start`` to ``start + per_page`` of the registries, newest first, and their count.

    One registry (the usual case: one class of jobs) is read a page at a time in its own order; several are
    merged by when their jobs ended or started, reading each up to the page's end.
    """
    connection, serializer = registries[0].connection, registries[0].serializer
    if len(registries) == 1:
        ids = registries[0].get_job_ids(start, start + per_page - 1, desc=True)
        found = ProjectJob.fetch_many(ids, connection, serializer)
        return [j for j in found if j is not None], registries[0].count
    ids = [i for r in registries for i in r.get_job_ids(0, start + per_page - 1, desc=True)]
    found = [j for j in ProjectJob.fetch_many(ids, connection, serializer) if j is not None]
    found.sort(key=lambda j: (j.ended_at if status == "succeeded" else j.started_at) or j.created_at, reverse=True)
    return found[start : start + per_page], sum(r.count for r in registries)


def uses_dataset(queue: Queue, dataset_id: str, newest: int = 10_000) -> bool:
    """Whether a queued or running job (of the ``newest`` in the job index) trains on ``dataset_id``. The index,
    not the registries: a job a worker has just taken is in neither the queue nor the started registry yet."""
    found, _ = recent_jobs(queue, 1, newest)
    return any(
        public_status(job) in ("queued", "running")
        and job.args
        and isinstance(job.args[0], dict)
        and job.args[0].get("dataset") == dataset_id
        for job in found
    )
