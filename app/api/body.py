"""Reading a request: JSON objects only, with 400/415/413/422 for each way a body can be wrong."""

from __future__ import annotations

from flask import request
from pydantic import BaseModel, ValidationError

from app.api.errors import ApiError, from_validation


def json_object() -> dict:
    """The request body as a JSON object; an empty body counts as ``{}``, but it too must be sent as
    application/json: a web page elsewhere can send text/plain or a form without asking, never JSON."""
    if request.mimetype != "application/json":
        raise ApiError(415, f"send the body as application/json, not {request.mimetype or 'no content type'}")
    if not request.content_length and not request.data:
        return {}
    if request.content_length is None and over_the_limit_when_chunked():
        raise ApiError(413, f"the body is larger than this service accepts ({request.max_content_length} bytes)")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # json.loads gives up on deeply nested arrays with this, not a ValueError
        body = None
    if body is None:
        raise ApiError(400, "the body is not valid JSON")
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object", {"body": "must be a JSON object"})
    return body


def over_the_limit_when_chunked() -> bool:
    """A chunked body is cut at MAX_CONTENT_LENGTH without an error (werkzeug); one more byte says it was longer."""
    limit = request.max_content_length
    return limit is not None and len(request.get_data()) >= limit and bool(request.environ["wsgi.input"].read(1))


def parse(model: type[BaseModel], data: dict, where: str = "body") -> BaseModel:
    """Validate ``data`` with ``model``; a violation becomes 422 naming each field and its rule."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc, where) from exc
