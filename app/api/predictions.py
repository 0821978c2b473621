"""``POST /predictions``: queue a batch prediction, a model scoring every row of a dataset's split (the rows are then
at ``GET /jobs/<id>/predictions``)."""

from __future__ import annotations

from flask import Blueprint

from app.api.auth import allowed, audit, client_key, owner_name
from app.api.body import json_object, parse
from app.api.context import current_service
from app.api.jobs import respond_queued
from app.api.openapi import documented
from app.api.schemas import JobAccepted
from app.params import PredictionParams
from app.service import batch_predictions

bp = Blueprint("predictions", __name__)


@bp.post("/predictions")
@documented(
    "Queue a batch prediction: a model (default: the champion, else the latest job) scores every row of a dataset's "
    "split into predictions.jsonl and metrics.json",
    {202: ("Queued (Location: /jobs/<id>)", JobAccepted)},
    body=PredictionParams,
)
@allowed("train")
def create():
    service = current_service()
    params = batch_predictions.checked_request(parse(PredictionParams, json_object()), service.settings, service.queue)
    job = service.admission.admit(
        client_key(),
        lambda: batch_predictions.enqueue_predictions(service.queue, params, service.settings, owner_name()),
    )
    audit("predictions", job.id)
    return respond_queued(job)
