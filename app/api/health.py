"""Liveness, readiness and metrics: what a load balancer and Prometheus ask."""

from __future__ import annotations

import logging
import os
import tempfile

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from app.api.context import current_service
from app.api.openapi import documented
from app.api.schemas import ErrorBody, Health, respond
from app.tracking import models_travel_through_mlflow, tracking_server_check

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@documented("Process alive", {200: ("ok", Health)}, errors=False)
def healthz():
    return respond(Health, status="ok")


@bp.get("/readyz")
@documented(
    "Redis reachable and ARTIFACTS_DIR writable (and the MLflow server's state)",
    {200: ("ready (status degraded: the MLflow server is down)", Health), 503: ("not ready", Health)},
    errors=False,
)
def readyz():
    """Ready when Redis answers and ARTIFACTS_DIR is writable; 503 naming what is not. With an MLflow tracking
    server, a server that does not answer makes it 200 ``degraded``, not 503: the replica still serves the models
    it has and every job view, and taking each replica out of the balancer for MLflow's outage would serve none."""
    service = current_service()
    checks = {"redis": redis_check(service.queue.connection), "artifacts": artifacts_check(service.settings)}
    ready = all(v == "ok" for v in checks.values())
    if models_travel_through_mlflow(service.settings):
        checks["mlflow"] = tracking_server_check(service.settings)
    status = "unavailable" if not ready else "ok" if checks.get("mlflow", "ok") == "ok" else "degraded"
    return respond(Health, 200 if ready else 503, None, status=status, checks=checks)


def redis_check(connection) -> str:
    """``ok``, or why not without Redis's address (the log has it)."""
    try:
        connection.ping()
    except RedisError as exc:
        log.warning("readyz: redis unreachable: %s", exc)
        return f"unreachable ({type(exc).__name__})"
    return "ok"


def artifacts_check(settings) -> str:
    try:
        settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=settings.artifacts_dir, prefix=".readyz-"):
            pass
    except OSError as exc:
        return f"not writable: {os.strerror(exc.errno) if exc.errno else exc}"
    return "ok"


@bp.get("/metrics")
@documented(
    "Prometheus text format",
    {200: ("metrics", "text/plain"), 403: ("a host not in ALLOWED_HOSTS, or not through nginx", ErrorBody)},
    errors=False,
)
def metrics():
    return Response(generate_latest(current_service().metrics.registry), mimetype=CONTENT_TYPE_LATEST)
