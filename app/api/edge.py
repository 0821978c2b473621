"""Replicas answer only the edge (nginx): where nginx reaches them over TCP (compose, several machines), it sends
EDGE_SECRET as ``X-Edge-Secret`` and anything else that connects is refused. Probes are exempt."""

from __future__ import annotations

import hmac

from flask import request

from app.api.context import current_service
from app.api.errors import ApiError

EDGE_HEADER = "X-Edge-Secret"
# What a kubelet or a container healthcheck asks a replica directly, without nginx.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})


def came_through_the_edge(environ: dict, secret: str) -> bool:
    """Whether the request carries the edge's secret (compared in constant time)."""
    given = environ.get("HTTP_X_EDGE_SECRET", "")
    return hmac.compare_digest(given.encode(), secret.encode())


def refuse_around_the_edge() -> None:
    """With EDGE_SECRET set, a request that did not come through nginx is 403 (its client could forge
    X-Forwarded-For, dodge nginx's rate and body limits, or hold a thread with a half-sent request)."""
    secret = current_service().settings.edge_secret
    if secret and request.path not in PROBE_PATHS and not came_through_the_edge(request.environ, secret):
        raise ApiError(403, "this replica answers only through the load balancer", code="not_through_the_edge")
