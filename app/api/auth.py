"""Who a request is, and whether it may do what it asks: the bearer key maps to a principal (``app.service.keys``:
a key's name and role, API_TOKEN's admin, or anonymous), and each view names the one action it needs (``allowed``).

With no key and no API_TOKEN the service is open (anonymous may do anything), every request must name an allowed host
and a state-changing one must come same-origin; once either exists every guarded request needs a valid key.
"""

from __future__ import annotations

import functools
from urllib.parse import urlsplit

from flask import g, request

from app.api.context import current_service
from app.api.edge import PROBE_PATHS
from app.api.errors import ApiError
from app.service import admission
from app.service.keys import Principal, anonymous


def bearer_token() -> str:
    """The request's bearer token, or '' without one."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def auth_required() -> bool:
    """Whether requests need a key: API_TOKEN is set or a key exists (read once per request)."""
    if "auth_required" not in g:
        service = current_service()
        g.auth_required = bool(service.settings.api_token) or service.keys.any()
    return g.auth_required


def current_principal() -> Principal:
    """The request's principal; a key that is wrong, unknown or revoked is 401 wherever keys are in use."""
    if "principal" not in g:
        service = current_service()
        given = bearer_token()
        principal = service.keys.principal_of(given) if given else None
        if principal is None:
            if given and auth_required():
                raise ApiError(401, "unknown or revoked key (Authorization: Bearer <key>)")
            principal = anonymous(auth_required(), service.settings.public_reads)
        g.principal = principal
    return g.principal


def may(action: str) -> bool:
    """Whether the request's principal may do ``action``: for a page that shows data only then, and is empty, not
    refused, otherwise (its script asks again with the key)."""
    return current_principal().may(action)


def check_allowed(action: str) -> Principal:
    """The principal, if it may do ``action``: else 401 without a key, 403 with one whose role may not."""
    principal = current_principal()
    if not principal.may(action):
        if not principal.authenticated:
            raise ApiError(401, "missing bearer key (Authorization: Bearer <key>)")
        raise ApiError(403, f"key {principal.name!r} (role {principal.role}) may not {action}")
    return principal


def allowed(action: str):
    """The view needs ``action`` (one of ``app.service.keys.ACTIONS``); /openapi.json reads it from the view."""

    def wrap(view):
        @functools.wraps(view)
        def checked(*args, **kwargs):
            check_allowed(action)
            return view(*args, **kwargs)

        checked.action = action
        return checked

    return wrap


def owner_scope() -> str | None:
    """Whose jobs, sweeps and datasets a listing shows: None (everyone's) for a principal that sees all."""
    principal = current_principal()
    return None if principal.may("see_all") else principal.name


def visible(owner: str | None) -> bool:
    """Whether the request's principal may see (and cancel, if its role cancels) what ``owner`` created."""
    return current_principal().sees(owner)


def owner_name() -> str | None:
    """The owner a job, sweep or dataset created by this request records: its key's name (None without a key, so
    that no key named like the anonymous principal inherits what an open service made)."""
    principal = current_principal()
    return principal.name if principal.authenticated else None


def client_key() -> str:
    """Whom admission counts this request's job against (``app.service.admission.client_key``)."""
    return admission.client_key(current_principal(), request.remote_addr)


def audit(action: str, target: str) -> None:
    """Record in the audit stream that this request's principal did ``action`` on ``target``."""
    principal = current_principal()
    current_service().audit.record(principal.name, principal.role, action, target, request.remote_addr)


# Methods a browser on another site could use to change state here (GET and HEAD never change state).
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


def refuse_foreign_origin() -> None:
    """Without keys nothing else stops a web page the user visits: a state-changing request must come, when the
    browser says where it comes from, from this same origin (its Host is checked by refuse_unknown_host)."""
    if request.method not in STATE_CHANGING or auth_required():
        return
    host = request.host.lower()
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc.lower() != host:
        raise ApiError(403, f"cross-origin request from {origin!r} refused; set API_TOKEN to allow other origins")


def refuse_unknown_host() -> None:
    """Without keys, every request (reads too: jobs, the console, /metrics) must name an ALLOWED_HOSTS host, so a
    DNS-rebinding page cannot read the service through the user's browser. Probes ask by address: exempt."""
    settings = current_service().settings
    if request.path in PROBE_PATHS or auth_required():
        return
    allowed_hosts = {name.strip().lower() for name in settings.allowed_hosts.split(",") if name.strip()}
    host = request.host.lower()
    if hostname_of(host) not in allowed_hosts:
        raise ApiError(403, f"host {host!r} is not in ALLOWED_HOSTS; set API_TOKEN or add the host")


def hostname_of(host: str) -> str:
    """``example.org:4000`` → ``example.org``; ``[::1]:4000`` → ``[::1]``."""
    if host.startswith("["):
        return host[: host.index("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
