"""Bearer-token check when API_TOKEN is set (the endpoints that spend compute or change state, and the reads unless
PUBLIC_READS); without a token, every request must name an allowed host, and state-changing ones come same-origin."""

from __future__ import annotations

import functools
import hmac
from urllib.parse import urlsplit

from flask import request

from app.api.context import current_service
from app.api.edge import PROBE_PATHS
from app.api.errors import ApiError


def bearer_token() -> str:
    """The request's bearer token, or '' without one."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def check_token() -> None:
    expected = current_service().settings.api_token
    if expected and not hmac.compare_digest(bearer_token().encode(), expected.encode()):
        raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <API_TOKEN>)")


def require_token(view):
    @functools.wraps(view)
    def checked(*args, **kwargs):
        check_token()
        return view(*args, **kwargs)

    checked.token_rule = "always"  # read by /openapi.json
    return checked


def require_token_for_reads(view):
    """Job reads need the token too when API_TOKEN is set, unless PUBLIC_READS opens them."""

    @functools.wraps(view)
    def checked(*args, **kwargs):
        if not current_service().settings.public_reads:
            check_token()
        return view(*args, **kwargs)

    checked.token_rule = "reads"  # read by /openapi.json
    return checked


# Methods a browser on another site could use to change state here (GET and HEAD never change state).
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


def refuse_foreign_origin() -> None:
    """Without API_TOKEN nothing else stops a web page the user visits: a state-changing request must come, when
    the browser says where it comes from, from this same origin (its Host is checked by refuse_unknown_host)."""
    settings = current_service().settings
    if settings.api_token or request.method not in STATE_CHANGING:
        return
    host = request.host.lower()
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc.lower() != host:
        raise ApiError(403, f"cross-origin request from {origin!r} refused; set API_TOKEN to allow other origins")


def refuse_unknown_host() -> None:
    """Without API_TOKEN, every request (reads too: jobs, the console, /metrics) must name an ALLOWED_HOSTS host,
    so a DNS-rebinding page cannot read the service through the user's browser. Probes ask by address: exempt."""
    settings = current_service().settings
    if settings.api_token or request.path in PROBE_PATHS:
        return
    allowed = {name.strip().lower() for name in settings.allowed_hosts.split(",") if name.strip()}
    host = request.host.lower()
    if hostname_of(host) not in allowed:
        raise ApiError(403, f"host {host!r} is not in ALLOWED_HOSTS; set API_TOKEN or add the host")


def hostname_of(host: str) -> str:
    """``example.org:4000`` → ``example.org``; ``[::1]:4000`` → ``[::1]``."""
    if host.startswith("["):
        return host[: host.index("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
