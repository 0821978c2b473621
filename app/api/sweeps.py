"""Sweep endpoints: start a sweep, list sweeps, inspect one (leaderboard best first), cancel one."""

from __future__ import annotations

from flask import Blueprint, request, url_for

from app.api.auth import allowed, audit, client_key, owner_name, owner_scope, visible
from app.api.body import json_object, parse
from app.api.context import current_service
from app.api.errors import ApiError
from app.api.jobs import JOB_ID_PATTERN
from app.api.openapi import documented
from app.api.schemas import JobsQuery, SweepAccepted, SweepList, SweepView, respond
from app.service import datasets, sweeps

bp = Blueprint("sweeps", __name__)


@bp.post("/sweeps")
@documented(
    "Start a hyperparameter sweep: its trials run as jobs, at most `parallel` at once",
    {202: ("Started (Location: /sweeps/<id>)", SweepAccepted)},
    body=sweeps.SweepRequest,
)
@allowed("sweep")
def create():
    service = current_service()
    request_ = parse(sweeps.SweepRequest, json_object())
    base = sweeps.validate_request(request_, service.settings)
    dataset = datasets.DatasetStore(service.settings, service.queue.connection).check_mapping(base)
    if dataset is not None:  # the budget over the uploaded dataset's rows, not BoolQ's
        base = sweeps.validate_request(request_, service.settings, dataset.rows["train"])
    sweep_id = sweeps.create_sweep(request_, base, service.settings, service.queue, client_key(), owner_name())
    audit("sweep", sweep_id)
    location = url_for("sweeps.show", sweep_id=sweep_id)
    return respond(SweepAccepted, 202, {"Location": location}, sweep_id=sweep_id, status="running")


@bp.get("/sweeps")
@documented("Sweeps, newest first (without leaderboards)", {200: ("A page", SweepList)}, query=JobsQuery)
@allowed("read")
def index():
    service = current_service()
    query = parse(JobsQuery, request.args.to_dict(), where="query")
    ids = sweeps.sweep_ids(service.settings, owner_scope())
    start = (query.page - 1) * query.per_page
    page = [
        sweeps.describe_sweep(service.settings, service.queue, i, leaderboard_rows=False)
        for i in ids[start : start + query.per_page]
    ]
    return respond(SweepList, sweeps=page, page=query.page, per_page=query.per_page, total=len(ids))


@bp.get("/sweeps/<sweep_id>")
@documented("Status, space and leaderboard (best dev accuracy first)", {200: ("The sweep", SweepView)})
@allowed("read")
def show(sweep_id: str):
    service = current_service()
    find_sweep(sweep_id)  # a read changes nothing: trials whose worker died are noticed by the workers' check
    return respond(SweepView, **sweeps.describe_sweep(service.settings, service.queue, sweep_id))


@bp.post("/sweeps/<sweep_id>/cancel")
@documented(
    "Cancel a sweep: its queued and running trials are cancelled, no new ones start",
    {200: ("Cancelled", SweepView)},
)
@allowed("cancel")
def cancel(sweep_id: str):
    service = current_service()
    find_sweep(sweep_id)
    sweeps.cancel_sweep(service.settings, service.queue, sweep_id)
    audit("cancel_sweep", sweep_id)
    return respond(SweepView, **sweeps.describe_sweep(service.settings, service.queue, sweep_id))


def find_sweep(sweep_id: str) -> None:
    """404 unless the sweep exists and this request's key may see it (another key's sweep is not there for it)."""
    if not JOB_ID_PATTERN.fullmatch(sweep_id):
        raise ApiError(404, f"no sweep {sweep_id!r}", {"sweep_id": "sweep ids are 1-64 letters, digits, '-' or '_'"})
    study = sweeps.load_study(current_service().settings, sweep_id, telling=True)
    if not visible(sweeps.owner_of(study)):
        raise sweeps.SweepNotFound(f"no sweep {sweep_id}")
