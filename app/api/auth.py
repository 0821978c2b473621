"""Bearer-token check for the endpoints that spend compute (train, cancel, predict) when API_TOKEN is set."""

from __future__ import annotations

import functools
import hmac

from flask import request

from app.api.context import current_service
from app.api.errors import ApiError


def require_token(view):
    @functools.wraps(view)
    def checked(*args, **kwargs):
        expected = current_service().settings.api_token
        if expected:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
                raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <API_TOKEN>)")
        return view(*args, **kwargs)

    return checked
