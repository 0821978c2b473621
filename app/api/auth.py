"""Bearer-token check when API_TOKEN is set: for the endpoints that spend compute, and for job reads."""

from __future__ import annotations

import functools
import hmac

from flask import request

from app.api.context import current_service
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

    return checked


def require_token_for_reads(view):
    """Job reads need the token too when API_TOKEN is set, unless PUBLIC_READS opens them."""

    @functools.wraps(view)
    def checked(*args, **kwargs):
        if not current_service().settings.public_reads:
            check_token()
        return view(*args, **kwargs)

    return checked
