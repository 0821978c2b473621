"""Training endpoints: submit (optionally wait), list, inspect, cancel, and per-example predictions."""

from __future__ import annotations

import re

from flask import Blueprint, request, url_for

from app.api.auth import allowed, audit, client_key, owner_name, owner_scope, visible
from app.api.body import json_object, parse
from app.api.context import current_service
from app.api.errors import ApiError
from app.api.openapi import documented
from app.api.schemas import (
    JobAccepted,
    JobList,
    JobsQuery,
    JobView,
    PredictionList,
    TrainQuery,
    TrainResult,
    respond,
)
from app.params import TrainParams
from app.service import datasets, jobs, sweeps
from app.service import predictions as predictions_of
from app.service.admission import RETRY_AFTER_S, check_cost
from app.service.model_access import loadable_here, model_for_training, with_default_model
from app.service.redaction import without_server_paths

bp = Blueprint("jobs", __name__)

JOB_ID = "<job_id>"
JOB_ID_PATTERN = re.compile(jobs.JOB_ID_RULE)


@bp.post("/train")
@documented(
    "Queue a fine-tuning job (wait=true: wait for its result)",
    {
        202: ("Queued (Location: /jobs/<id>)", JobAccepted),
        200: ("wait=true: the job ended in time (its result, or its view if it failed)", (TrainResult, JobView)),
    },
    body=TrainParams,
    query=TrainQuery,
)
@allowed("train")
def train():
    service = current_service()
    query = parse(TrainQuery, request.args.to_dict(), where="query")
    params = parse(TrainParams, with_default_model(json_object(), service.settings))
    # Checked here, resolved again by the worker: the job keeps the name as the client gave it.
    loadable_here(model_for_training(params.model, service.settings))
    dataset = datasets.DatasetStore(service.settings, service.queue.connection).check_mapping(params)
    check_cost(params, service.settings, dataset.rows["train"] if dataset else None)
    if not query.wait:
        return respond_queued(submit(params))
    if not service.waiters.acquire(blocking=False):
        raise ApiError(
            429,
            f"{service.settings.max_waiters} requests already wait in this process (MAX_WAITERS); "
            "submit without wait=true and poll GET /jobs/<job_id>",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    try:
        job = submit(params)
        timeout = min(query.timeout or service.settings.max_wait, service.settings.max_wait)
        if jobs.wait_until(lambda: jobs.public_status(refresh_status(job)) in jobs.FINAL_STATUSES, timeout, 0.25):
            return respond_finished(job)
        return respond_queued(job, waited_s=timeout)
    finally:
        service.waiters.release()


def submit(params: TrainParams):
    """Enqueue through admission control: 429 when the queue or this client has no room."""
    service = current_service()
    job = service.admission.admit(
        client_key(), lambda: jobs.enqueue_training(service.queue, params, service.settings, owner_name())
    )
    audit("train", job.id)
    return job


def respond_queued(job, waited_s: float | None = None):
    """202 with the job's place; after a wait=true that ran out, why it has not ended (``reason``)."""
    location = url_for("jobs.show", job_id=job.id)
    status = jobs.public_status(job)
    reason = None
    if waited_s is not None:
        reason = f"still {status} after {waited_s:g} s"
        if status == "queued" and (waiting := jobs.waiting_reason(job)):
            deadline = current_service().settings.worker_wait_s
            reason = f"{waiting}: none is live; the job fails if none comes within {deadline} s (WORKER_WAIT_S)"
    return respond(JobAccepted, 202, {"Location": location}, job_id=job.id, status=status, reason=reason)


def refresh_status(job):
    """The job with its status read again, and failed if it waited too long for a worker that never came."""
    job.get_status(refresh=True)
    if jobs.fail_if_no_worker(job, current_service().settings):
        job.get_status(refresh=True)
    return job


def respond_finished(job):
    """The tutorial script's synchronous answer (accuracy, predictions); for a failed or cancelled job, its view.

    The request itself succeeded either way (200); the job's outcome is in ``status`` and ``error``,
    exactly as ``GET /jobs/<id>`` shows it, so clients read one shape and proxies see no 5xx.
    """
    job.refresh()  # the wait loop refreshed only the status; timestamps and result are read again here
    view = jobs.describe_job(job)
    if view["status"] != "succeeded":
        return respond(JobView, **view)
    value = job.return_value()
    keys = ("accuracy", "n_eval", "dev_accuracy", "predictions", "metrics", "tracking")
    return respond(TrainResult, job_id=job.id, status="succeeded", **without_server_paths({k: value[k] for k in keys}))


@bp.get("/jobs")
@documented("Recent jobs, newest first", {200: ("A page", JobList)}, query=JobsQuery)
@allowed("read")
def index():
    query = parse(JobsQuery, request.args.to_dict(), where="query")
    page, total = jobs.recent_jobs(current_service().queue, query.page, query.per_page, owner_scope())
    return respond(
        JobList, jobs=[jobs.describe_job(j) for j in page], page=query.page, per_page=query.per_page, total=total
    )


@bp.get(f"/jobs/{JOB_ID}")
@documented("Status, progress, result or error", {200: ("The job", JobView)})
@allowed("read")
def show(job_id: str):
    return respond(JobView, **jobs.describe_job(find_job(job_id)))


@bp.post(f"/jobs/{JOB_ID}/cancel")
@documented(
    "Cancel a queued job or stop a running one",
    {200: ("Cancelled", JobView), 202: ("Stop requested, not yet confirmed", JobView)},
)
@allowed("cancel")
def cancel(job_id: str):
    service = current_service()
    job = jobs.cancel_training(service.queue, find_job(job_id))
    audit("cancel", job.id)
    sweep_id = (job.meta.get("sweep") or {}).get("sweep_id")
    if sweep_id:  # a sweep's trial: the sweep marks it cancelled and starts the next one now
        sweeps.advance(service.settings, service.queue, sweep_id)
    view = jobs.describe_job(job)
    return respond(JobView, 200 if view["status"] == "cancelled" else 202, None, **view)


@bp.get(f"/jobs/{JOB_ID}/predictions")
@documented("Per-example val predictions", {200: ("Predictions", PredictionList)})
@allowed("read")
def predictions(job_id: str):
    return respond(PredictionList, job_id=job_id, predictions=succeeded_job_predictions(job_id))


def succeeded_job_predictions(job_id: str) -> list[dict]:
    return predictions_of.read_job_predictions(find_job(job_id), current_service().settings)


def find_job(job_id: str):
    """The job, if this request's key may see it: another key's job is 404, as if it did not exist."""
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise ApiError(404, f"no job {job_id!r}", {"job_id": "job ids are 1-64 letters, digits, '-' or '_'"})
    job = jobs.fetch_job(current_service().queue, job_id, current_service().settings)
    if not visible(jobs.owner_of(job)):
        raise jobs.JobNotFound(f"no job {job_id}")
    return job
