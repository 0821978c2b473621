"""``POST /predict``: answers from a fine-tuned model (the choice of model, its cache and the bounds are
``app.service.serving``'s)."""

from __future__ import annotations

import functools

from flask import Blueprint, request

from app.api.auth import allowed
from app.api.body import json_object, parse
from app.api.context import current_service
from app.api.openapi import documented
from app.api.schemas import (
    PredictBatch,
    PredictBatchResponse,
    PredictOne,
    PredictOneResponse,
    PredictText,
    PredictTextBatch,
    PredictTextBatchResponse,
    PredictTextResponse,
    respond,
)
from app.service.serving import socket_closed

bp = Blueprint("predict", __name__)


# Request model → response model: {"text", "text_pair"} items get label names; BoolQ's {"question", "passage"}
# (a yes/no model) keeps its {"answer", "probability"}.
SHAPES = {
    PredictText: PredictTextResponse,
    PredictTextBatch: PredictTextBatchResponse,
    PredictOne: PredictOneResponse,
    PredictBatch: PredictBatchResponse,
}


@bp.post("/predict")
@documented(
    "Classify texts or text pairs with a fine-tuned model (default: the champion, else the latest job)",
    {200: ("One answer, or one per item", tuple(SHAPES.values()))},
    body=tuple(SHAPES),
)
@allowed("predict")
def predict():
    body = json_object()
    request_ = parse(request_shape(body), body)
    batch = isinstance(request_, PredictTextBatch | PredictBatch)
    items = request_.items if batch else [request_]
    client = request.environ.get("gunicorn.socket")
    client_gone = functools.partial(socket_closed, client) if client is not None else None
    name, answers = current_service().serving.answer(request_.model, [item.as_pair() for item in items], client_gone)
    if isinstance(request_, PredictText | PredictTextBatch):
        answers = [answer.to_dict(request_.top_k or 0) for answer in answers]
    else:
        answers = [answer.to_yes_no() for answer in answers]
    if batch:
        return respond(SHAPES[type(request_)], answers=answers, model=name)
    return respond(SHAPES[type(request_)], **answers[0], model=name)


def request_shape(body: dict) -> type:
    """Which request model reads ``body``: texts unless it (or its first item) asks BoolQ's question."""
    first = body["items"][0] if isinstance(body.get("items"), list) and body["items"] else body
    yes_no_shape = isinstance(first, dict) and ("question" in first or "passage" in first)
    if "items" in body:
        return PredictBatch if yes_no_shape else PredictTextBatch
    return PredictOne if yes_no_shape else PredictText
