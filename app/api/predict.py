"""``POST /predict``: answers from a fine-tuned model, loaded once per process and kept in a bounded LRU cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from flask import Blueprint, jsonify

from app import jobs
from app.api.auth import require_token
from app.api.body import json_object, parse
from app.api.context import current_service
from app.api.errors import ApiError
from app.api.schemas import PredictBatch, PredictOne
from app.batching import MicroBatcher
from app.model_access import ModelNotAllowed, fine_tuned_model
from app.registry import CHAMPION, read_champion_pointer

bp = Blueprint("predict", __name__)


class PredictorCache:
    """Up to ``size`` loaded models per process, least recently used evicted first; thread-safe.

    With ``max_batch`` > 1 each model answers through a :class:`MicroBatcher`, so concurrent requests
    share forward passes; ``get`` returns an object with ``predict(pairs)`` either way.
    """

    def __init__(self, size: int, max_batch: int = 1, wait_s: float = 0.0, on_batch=None, num_threads: int = 0):
        self.size = max(size, 1)
        self.num_threads = num_threads
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.on_batch = on_batch
        self.loaded: OrderedDict[Path, object] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, folder: Path):
        with self.lock:
            if folder in self.loaded:
                self.loaded.move_to_end(folder)
                return self.loaded[folder]
            model = self.load(folder)
            self.loaded[folder] = model
            while len(self.loaded) > self.size:
                _, evicted = self.loaded.popitem(last=False)
                if isinstance(evicted, MicroBatcher):
                    evicted.close()
            return model

    def load(self, folder: Path):
        import torch

        from app.predict import Predictor

        if self.num_threads > 0:
            # On a busy machine, a forward pass split over more threads than free cores waits at every op.
            torch.set_num_threads(self.num_threads)
        predictor = Predictor(folder)
        if self.max_batch <= 1:
            return predictor
        return MicroBatcher(predictor.predict, self.max_batch, self.wait_s, on_batch=self.on_batch)


@bp.post("/predict")
@require_token
def predict():
    body = json_object()
    request_ = parse(PredictBatch if "items" in body else PredictOne, body)
    items = request_.items if isinstance(request_, PredictBatch) else [request_]
    name = served_model(request_.model)
    predictor = current_service().predictors.get(model_folder(name))
    answers = [a.to_dict() for a in predictor.predict([(i.question, i.passage) for i in items])]
    if isinstance(request_, PredictBatch):
        return jsonify(answers=answers, model=name)
    return jsonify(answers[0] | {"model": name})


def served_model(requested: str | None) -> str:
    """A named model as it is; otherwise (or for "champion") the champion's job, read from Redis on every request
    so a new champion is served at once; with no champion yet, the latest succeeded job."""
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
    try:
        return fine_tuned_model(name, current_service().settings)
    except ModelNotAllowed as exc:
        raise ApiError(422, str(exc), {"model": str(exc)}) from exc
