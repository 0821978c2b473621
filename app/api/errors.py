"""Every error a client sees: one JSON shape ``{"error": {"code", "message", "fields"}}``, never a traceback.

The service raises domain errors (``NoRoom``, ``ModelNotAllowed``, ``JobNotFound``...) and knows no HTTP;
``DOMAIN_ERRORS`` below is the one place that says which status, code and fields each becomes.
"""

from __future__ import annotations

import logging
import re

from flask import Flask, jsonify
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import MasterNotFoundError
from werkzeug.exceptions import HTTPException

from app.service import batch_predictions, datasets, jobs, registry, serving, sweeps
from app.service.admission import RETRY_AFTER_S, NoRoom, OverLimit
from app.service.model_access import ModelNotAllowed, NotYesNo
from app.service.model_store import ModelRefused, ModelStoreUnavailable, ModelTooLarge
from app.service.predictions import PredictionsMissing, PredictionsNotReady

log = logging.getLogger(__name__)

# What a client is told to wait when Redis is unreachable: about a Sentinel failover's gap.
REDIS_RETRY_AFTER_S = 5
# Pydantic adds the tried union member ("float", "int", "list[...]") to an error's location; not a field.
UNION_MEMBER = re.compile(r"int|float|str|bool|none|[\w-]+\[.*\]")
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error the API answers with a status code, a stable code word, a message and per-field rules."""

    def __init__(
        self,
        status: int,
        message: str,
        fields: dict[str, str] | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = fields or {}
        self.code = code or HTTP_CODES.get(status, "error")
        self.headers = headers or {}


def error_response(status: int, message: str, fields: dict | None = None, code: str | None = None):
    body = {"error": {"code": code or HTTP_CODES.get(status, "error"), "message": message, "fields": fields or {}}}
    return jsonify(body), status


def validation_fields(exc: ValidationError) -> dict[str, str]:
    """``{"batch_size": "Input should be less than or equal to 512", ...}``: each field with its rule."""
    fields = {}
    for error in exc.errors(include_url=False):
        parts = [str(p) for p in error["loc"] if not (isinstance(p, str) and UNION_MEMBER.fullmatch(p))]
        name = ".".join(parts) or "body"
        fields.setdefault(name, error["msg"])
    return fields


def from_validation(exc: ValidationError, where: str = "body") -> ApiError:
    """A 422 naming every invalid field of ``where`` (body or query) and the rule it broke."""
    fields = validation_fields(exc)
    return ApiError(422, f"invalid {where}: " + "; ".join(f"{k}: {v}" for k, v in fields.items()), fields)


# Domain error → the API's answer. Messages are the service's own; fields name what to change.
DOMAIN_ERRORS = {
    NoRoom: lambda e: ApiError(429, e.message, e.fields, headers={"Retry-After": str(RETRY_AFTER_S)}),
    OverLimit: lambda e: ApiError(422, e.message, e.fields),
    ModelNotAllowed: lambda e: ApiError(422, str(e), {"model": str(e)}),
    NotYesNo: lambda e: ApiError(422, str(e), {"model": str(e)}, code="not_yes_no"),
    serving.NoModelYet: lambda e: ApiError(404, str(e), {"model": str(e)}, code="no_model"),
    serving.TooManyTokens: lambda e: ApiError(422, str(e), {"items": e.detail}, code="too_many_tokens"),
    serving.AnswerTimedOut: lambda e: ApiError(503, str(e), code="predict_timeout"),
    jobs.JobNotFound: lambda e: ApiError(404, str(e), {"job_id": "unknown job id"}),
    jobs.JobAlreadyFinished: lambda e: ApiError(409, str(e)),
    PredictionsNotReady: lambda e: ApiError(409, str(e)),
    PredictionsMissing: lambda e: ApiError(404, str(e)),
    batch_predictions.LabelsDiffer: lambda e: ApiError(422, str(e), e.fields, code="labels_differ"),
    datasets.DatasetInvalid: lambda e: ApiError(422, str(e), e.fields, code="invalid_dataset"),
    datasets.DatasetNotFound: lambda e: ApiError(404, str(e), {"dataset_id": "unknown dataset id"}),
    datasets.DatasetTooLarge: lambda e: ApiError(413, str(e), {"file": str(e)}),
    datasets.DatasetInUse: lambda e: ApiError(409, str(e)),
    sweeps.SweepError: lambda e: ApiError(422, f"invalid sweep: {e}", e.fields),
    sweeps.SweepNotFound: lambda e: ApiError(404, str(e), {"sweep_id": "unknown sweep id"}),
    registry.RegistryError: lambda e: ApiError(404, str(e)),
    registry.NotBetter: lambda e: ApiError(409, str(e), {"force": "needed to promote a lower val accuracy"}),
    registry.RegistryOff: lambda e: ApiError(409, str(e), code="registry_off"),
    ModelTooLarge: lambda e: ApiError(409, str(e), code="model_too_large"),
    ModelRefused: lambda e: ApiError(409, f"{e}; it is not served", code="model_refused"),
}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        headers = ({"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}) | exc.headers
        body, status = error_response(exc.status, exc.message, exc.fields, exc.code)
        return body, status, headers

    @app.errorhandler(ValidationError)
    def validation_error(exc: ValidationError):
        return api_error(from_validation(exc))

    for kind, answer in DOMAIN_ERRORS.items():
        app.register_error_handler(kind, lambda exc, answer=answer: api_error(answer(exc)))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        response = error_response(exc.code or 500, exc.description or exc.name)
        if exc.code == 405 and exc.valid_methods:
            return *response, {"Allow": ", ".join(exc.valid_methods)}
        return response

    # A master that is down, not yet replaced by the Sentinels, or just demoted to a read-only replica: a gap.
    @app.errorhandler(RedisConnectionError)
    @app.errorhandler(RedisTimeoutError)
    @app.errorhandler(MasterNotFoundError)
    @app.errorhandler(ReadOnlyError)
    def redis_down(exc: Exception):
        log.warning("redis unavailable: %s", exc)
        body, status = error_response(
            503, "the job store (Redis) is unreachable; try again later", code="redis_unavailable"
        )
        return body, status, {"Retry-After": str(REDIS_RETRY_AFTER_S)}

    @app.errorhandler(ModelStoreUnavailable)
    def model_store_down(exc: ModelStoreUnavailable):
        log.warning("model store unavailable: %s", exc)
        return error_response(503, f"{exc}; try again later", code="model_store_unavailable")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal error; see the server log")
