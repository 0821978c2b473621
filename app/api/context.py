"""What the views share inside one app: settings, the Redis queue, the predictor cache and the metrics."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app
from rq import Queue

from app.config import Settings


@dataclass(frozen=True)
class Service:
    settings: Settings
    queue: Queue
    predictors: object  # app.api.predict.PredictorCache
    metrics: object  # app.api.metrics.ServiceMetrics


def current_service() -> Service:
    return current_app.extensions["boolq"]
