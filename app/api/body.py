"""Reading a request: JSON objects only, with 400/415/413/422 for each way a body can be wrong."""

from __future__ import annotations

from flask import request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wsgi import LimitedStream

from app.api.errors import ApiError, from_validation

# nginx passes a JSON route at most 2 MiB (client_max_body_size); what a replica leaves unread of a body, up to this
# much, it reads and drops before answering.
DRAIN_MAX_BYTES = 4 * 1024 * 1024
DRAIN_CHUNK_BYTES = 64 * 1024


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


def discard_unread_body(response):
    """Read what is left of the request body (an after_request hook), so the connection closes cleanly or stays open.

    A replica answers 413 or 415 without reading the body; gunicorn drains only 64 KiB of it, then closes the socket
    with bytes unread, which resets the connection. nginx, still writing the body it buffered, then loses the answer
    and says 502 (seen in CI under load).
    """
    left = DRAIN_MAX_BYTES
    try:
        stream = unread_part()
        while left > 0 and (chunk := stream.read(min(DRAIN_CHUNK_BYTES, left))):
            left -= len(chunk)
    except (OSError, HTTPException):  # the client went away, or a chunked body ran past MAX_CONTENT_LENGTH
        pass
    return response


def unread_part():
    """The rest of the body, as a stream that ends where the body ends (never a wait on a socket for more)."""
    environ = request.environ
    if environ.get("wsgi.input_terminated"):  # the server ends the stream at the body's end (gunicorn; chunked)
        return environ["wsgi.input"]
    try:
        return request.stream  # werkzeug's: bounded by Content-Length, empty without one
    except RequestEntityTooLarge:  # refused by its Content-Length before a byte was read
        return LimitedStream(environ["wsgi.input"], request.content_length or 0)
