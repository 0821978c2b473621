"""The REST service: ``create_app(settings)`` builds the Flask app (blueprints, error handlers, metrics)."""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import socket
import threading

from flask import Flask

from app.api import audit, console, datasets, health, jobs, models, openapi, predict, predictions, sweeps
from app.api.auth import refuse_foreign_origin, refuse_unknown_host
from app.api.body import discard_unread_body
from app.api.context import Service
from app.api.edge import refuse_around_the_edge
from app.api.errors import register_error_handlers
from app.api.metrics import ServiceMetrics
from app.api.proxy import TrustedProxyFix
from app.config import Settings
from app.service.admission import Admission
from app.service.audit import AuditLog
from app.service.jobs import training_queue
from app.service.keys import KeyStore
from app.service.redis_connection import connect_redis
from app.service.serving import Serving


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app from ``settings`` (default: the environment). Connects lazily: nothing blocks here."""
    settings = settings or Settings()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_content_length)
    app.json.sort_keys = False
    queue = training_queue(settings, connect_redis(settings))
    metrics = ServiceMetrics(queue, settings.prometheus_multiproc_dir)
    serving = Serving(settings, queue, on_batch=metrics.predict_batch_size.observe)
    waiters = threading.BoundedSemaphore(max(settings.max_waiters, 1))
    admission = Admission(queue, settings)
    keys, audit_log = KeyStore(settings, queue.connection), AuditLog(settings, queue.connection)
    app.extensions["boolq"] = Service(
        settings, queue, serving, metrics, admission, keys=keys, audit=audit_log, waiters=waiters
    )
    # Behind nginx the client's address is the last X-Forwarded-For hop (admission counts jobs per address).
    app.wsgi_app = TrustedProxyFix(app.wsgi_app, settings.trusted_proxies, settings.edge_secret)

    for blueprint in (
        health.bp,
        jobs.bp,
        predict.bp,
        predictions.bp,
        openapi.bp,
        models.bp,
        sweeps.bp,
        datasets.bp,
        audit.bp,
        console.bp,
    ):
        app.register_blueprint(blueprint)
    register_error_handlers(app)
    app.before_request(refuse_around_the_edge)
    app.before_request(refuse_unknown_host)
    app.before_request(refuse_foreign_origin)
    metrics.instrument(app)
    app.after_request(add_replica_header)
    app.after_request(discard_unread_body)
    return app


def add_replica_header(response):
    """``X-Replica: <host>-<process>`` on every response, so load balancing can be observed; both parts opaque
    (a host name and pid would tell a client about the servers)."""
    response.headers["X-Replica"] = replica_id(os.getpid())
    return response


@functools.cache
def replica_id(pid: int) -> str:
    """A digest of the host name (the same for a replica's processes) and a random id drawn once per process
    (keyed by pid: gunicorn forks its workers from one loaded app)."""
    host = hashlib.sha256(f"boolq-replica:{socket.gethostname()}".encode()).hexdigest()[:8]
    return f"{host}-{secrets.token_hex(4)}"
