"""What the views share inside one app: settings, the Redis queue, the served models and the metrics."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from flask import current_app
from rq import Queue

from app.config import Settings


@dataclass(frozen=True)
class Service:
    settings: Settings
    queue: Queue
    serving: object  # app.service.serving.Serving
    metrics: object  # app.api.metrics.ServiceMetrics
    admission: object  # app.service.admission.Admission
    keys: object  # app.service.keys.KeyStore
    audit: object  # app.service.audit.AuditLog
    # One slot per allowed concurrent POST /train?wait=true in this process (MAX_WAITERS).
    waiters: threading.BoundedSemaphore


def current_service() -> Service:
    return current_app.extensions["boolq"]
