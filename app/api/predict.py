"""``POST /predict``: answers from a fine-tuned model, loaded once per process and kept in a bounded LRU cache."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path

from flask import Blueprint, request

from app.api.auth import require_token
from app.api.body import json_object, parse
from app.api.context import current_service
from app.api.errors import ApiError
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
from app.service import jobs
from app.service.batching import MicroBatcher
from app.service.model_access import fine_tuned_model
from app.service.registry import CHAMPION, read_champion_pointer

bp = Blueprint("predict", __name__)
log = logging.getLogger(__name__)


class PredictorCache:
    """Up to ``size`` loaded models per process, least recently used evicted first; thread-safe.

    With ``max_batch`` > 1 each model answers through a :class:`MicroBatcher`, so concurrent requests
    share forward passes; ``get`` returns an object with ``predict(pairs)`` either way.
    """

    def __init__(
        self,
        size: int,
        max_batch: int = 1,
        wait_s: float = 0.0,
        on_batch=None,
        num_threads: int = 0,
        max_padding: float | None = None,
    ):
        self.size = max(size, 1)
        self.max_padding = max_padding
        self.num_threads = num_threads
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.on_batch = on_batch
        self.loaded: OrderedDict[Path, object] = OrderedDict()
        self.lock = threading.Lock()  # guards `loaded` and `loading`; never held while a model loads
        self.loading: dict[Path, threading.Lock] = {}

    def get(self, folder: Path):
        """The folder's model, loaded on first use. A load holds only that folder's lock: requests for loaded
        models keep being answered meanwhile, and concurrent requests for the same folder load it once."""
        with self.lock:
            model = self.cached(folder)
            if model is not None:
                return model
            loading = self.loading.setdefault(folder, threading.Lock())
        with loading:
            with self.lock:
                model = self.cached(folder)
            if model is not None:  # another thread loaded it while this one waited
                return model
            try:
                model = self.load(folder)
            finally:
                with self.lock:
                    self.loading.pop(folder, None)
            with self.lock:
                self.loaded[folder] = model
                while len(self.loaded) > self.size:
                    _, evicted = self.loaded.popitem(last=False)
                    if isinstance(evicted, MicroBatcher):
                        evicted.close()
            return model

    def cached(self, folder: Path):
        if folder in self.loaded:
            self.loaded.move_to_end(folder)
            return self.loaded[folder]
        return None

    def predictor(self, folder: Path):
        """The model itself, without micro-batching: for requests large enough to fill a forward pass alone."""
        model = self.get(folder)
        return model.predict_fn.__self__ if isinstance(model, MicroBatcher) else model

    def load(self, folder: Path):
        from app.service.predict import load_predictor

        predictor = load_predictor(folder, self.max_padding, self.num_threads)
        if self.max_batch <= 1:
            return predictor
        return MicroBatcher(predictor.predict, self.max_batch, self.wait_s, on_batch=self.on_batch)


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
@require_token
def predict():
    body = json_object()
    request_ = parse(request_shape(body), body)
    batch = isinstance(request_, PredictTextBatch | PredictBatch)
    items = request_.items if batch else [request_]
    name = served_model(request_.model)
    answers = bounded_answers(model_folder(name), [item.as_pair() for item in items])
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


def bounded_answers(folder: Path, pairs: list[tuple[str, str | None]]) -> list:
    """Answers within PREDICT_MAX_TOKENS (422 above) and PREDICT_TIMEOUT_S (503 after; the work stops too)."""
    from app.service.predict import PredictionStopped, TooManyTokens

    service = current_service()
    settings = service.settings
    deadline = time.monotonic() + settings.predict_timeout_s
    client = request.environ.get("gunicorn.socket")

    def should_stop() -> str | None:
        if client is not None and client_went_away(client):
            return "client gone"
        if time.monotonic() > deadline:
            return "deadline"
        return None

    try:
        predictor = service.predictors.predictor(folder)
        if len(pairs) < service.predictors.max_batch:  # small: share forward passes with concurrent requests
            predictor.check_tokens(pairs, settings.predict_max_tokens)
            return service.predictors.get(folder).predict(pairs, timeout_s=max(deadline - time.monotonic(), 0))
        return predictor.predict(pairs, max_tokens=settings.predict_max_tokens, should_stop=should_stop)
    except TooManyTokens as exc:
        raise ApiError(
            422, f"{exc} (PREDICT_MAX_TOKENS); send fewer or shorter items", {"items": str(exc)}, code="too_many_tokens"
        ) from exc
    except (PredictionStopped, TimeoutError) as exc:  # TimeoutError: a micro-batched answer missed the deadline
        log.warning("/predict of %d items stopped: %s", len(pairs), exc or "deadline")
        raise ApiError(
            503,
            f"the answer took longer than PREDICT_TIMEOUT_S ({settings.predict_timeout_s:g} s) and was stopped; "
            "send fewer or shorter items",
            code="predict_timeout",
        ) from exc


def client_went_away(sock: socket.socket) -> bool:
    """Whether the client closed its connection (readable with nothing to read) while we computed."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def served_model(requested: str | None) -> str:
    """A named model as it is; otherwise (or for "champion") the champion's job, read from Redis on every request
    so a new champion is served at once (never from the tracking server's alias: whoever reaches MLflow could
    move it); with no champion yet, the latest succeeded job."""
    if requested not in (None, CHAMPION):
        return requested
    service = current_service()
    pointer = read_champion_pointer(service.queue.connection, service.settings)
    if pointer and pointer.get("job_id"):
        return pointer["job_id"]
    if requested == CHAMPION:
        raise ApiError(404, "no champion yet: POST /models/champion first", code="no_model")
    return default_model_name()


def default_model_name() -> str:
    """The latest succeeded training job."""
    job_id = jobs.latest_succeeded_job_id(current_service().queue)
    if job_id is None:
        raise ApiError(404, "no training job has succeeded yet: POST /train first, or name a model", code="no_model")
    return job_id


def model_folder(name: str) -> Path:
    return fine_tuned_model(name, current_service().settings)
