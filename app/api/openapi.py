"""``GET /openapi.json``, built from the routes themselves: each view carries its operation (``@documented``),
the action it needs (``app.api.auth.allowed``) and its path; every schema is generated from the pydantic models
it names."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from flask import Blueprint, Flask, current_app, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api.auth import auth_required
from app.api.context import current_service
from app.api.schemas import ErrorBody
from app.config import Settings
from app.params import TrainParams, with_hugging_face_names

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
ERRORS = {
    "400": "Malformed JSON",
    "401": "Missing, unknown or revoked bearer key (when API_TOKEN is set or a key exists)",
    "403": "The key's role may not do this; without keys: a host not in ALLOWED_HOSTS, or a state-changing request "
    "from another origin; with EDGE_SECRET: a request that did not come through nginx",
    "404": "Unknown job, sweep, route or model (another key's job or sweep, for a key that sees only its own)",
    "405": "Wrong method",
    "409": "Job or sweep in the wrong state for this request; a champion with higher val accuracy (force)",
    "413": "Body over MAX_CONTENT_LENGTH",
    "415": "Body (even an empty one) is not sent as application/json",
    "422": "A field breaks its rule (each named in error.fields)",
    "500": "Internal error (no details leak)",
    "429": "Queue, client or waiter cap reached (Retry-After says when to retry)",
    "503": "Redis unreachable, or /predict over PREDICT_TIMEOUT_S",
}

# A response: its description and what its body is: one model, several (oneOf), a media type, or nothing.
Response = tuple[str, type[BaseModel] | tuple[type[BaseModel], ...] | str | None]


@dataclass(frozen=True)
class Operation:
    """What ``/openapi.json`` says of one route: summary, responses by status, body models, query model."""

    summary: str
    responses: dict[int, Response]
    body: tuple[type[BaseModel], ...] = ()
    query: type[BaseModel] | None = None
    errors: bool = True  # the API's JSON errors (ERRORS) may answer it

    def models(self) -> set[type[BaseModel]]:
        """Every model the operation names: their schemas go into the document's components."""
        named = set(self.body) | ({self.query} if self.query else set()) | ({ErrorBody} if self.errors else set())
        for _, content in self.responses.values():
            if isinstance(content, tuple):
                named |= set(content)
            elif isinstance(content, type):
                named.add(content)
        return named


def documented(
    summary: str,
    responses: dict[int, Response],
    body: type[BaseModel] | tuple[type[BaseModel], ...] = (),
    query: type[BaseModel] | None = None,
    errors: bool = True,
) -> Callable:
    """Attach the route's OpenAPI operation to its view function (put it right under the route decorator)."""
    operation = Operation(summary, responses, body if isinstance(body, tuple) else (body,), query, errors)

    def attach(view):
        view.openapi = operation
        return view

    return attach


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def schema_of(models: tuple[type[BaseModel], ...]) -> dict:
    return {"oneOf": [ref(m) for m in models]} if len(models) > 1 else ref(models[0])


def response_object(description: str, content) -> dict:
    if content is None:
        return {"description": description}
    if isinstance(content, str):  # a media type other than JSON
        return {"description": description, "content": {content: {}}}
    models = content if isinstance(content, tuple) else (content,)
    return {"description": description, "content": {"application/json": {"schema": schema_of(models)}}}


def operation_object(operation: Operation, secured: bool, checked: bool) -> dict:
    """``secured``: the route needs a key as the service is configured; ``checked``: it checks one at all (then a
    key whose role may not do it is 403)."""
    responses = {str(status): response_object(*response) for status, response in operation.responses.items()}
    if operation.errors:
        hidden = set() if secured or checked else {"401"}
        responses |= {code: response_object(text, ErrorBody) for code, text in ERRORS.items() if code not in hidden}
    op = {"summary": operation.summary, "responses": responses}
    if operation.body:
        # Required as application/json, `{}` at least: an empty body of another type is refused (415).
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema_of(operation.body)}}}
    if operation.query is not None:
        op["parameters"] = [query_parameter(name, schema) for name, schema in query_properties(operation.query).items()]
    if secured:
        op["security"] = [{"bearer": []}]
    return op


def query_properties(model: type[BaseModel]) -> dict:
    """Each query field's JSON Schema; an optional field is simply left out of a query string, never null."""
    properties = model.model_json_schema()["properties"]
    for schema in properties.values():
        if "anyOf" in schema:
            (kept,) = [s for s in schema.pop("anyOf") if s.get("type") != "null"]
            schema.update(kept)
        if schema.get("default", 0) is None:
            del schema["default"]
    return properties


def query_parameter(name: str, schema: dict) -> dict:
    description = schema.pop("description", "")
    schema.pop("title", None)
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def path_parameter(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def needs_key(view, settings: Settings, keys_in_use: bool) -> bool:
    """Whether the service as configured asks this route for a key (``app.api.auth.allowed`` on it): every guarded
    route once keys are in use, except the reads where PUBLIC_READS opens them."""
    action = getattr(view, "action", None)
    if not keys_in_use or action is None:
        return False
    return not (action == "read" and settings.public_reads)


def openapi_document(app: Flask, settings: Settings, keys_in_use: bool) -> dict:
    """The document for this service as configured: with no key and no API_TOKEN no operation asks for one."""
    paths: dict[str, dict] = {}
    models: set[type[BaseModel]] = set()
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        operation = getattr(view, "openapi", None)
        if operation is None:  # the console's HTML pages, static files
            continue
        (method,) = rule.methods - {"HEAD", "OPTIONS"}
        item = paths.setdefault(re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), {})
        checked = keys_in_use and getattr(view, "action", None) is not None
        item[method.lower()] = operation_object(operation, needs_key(view, settings, keys_in_use), checked)
        if rule.arguments:
            item["parameters"] = [path_parameter(name) for name in sorted(rule.arguments)]
        models |= operation.models()
    _, top = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)], ref_template=REF)
    components = {"schemas": top["$defs"]}
    if TrainParams.__name__ in components["schemas"]:  # the aliases a validator accepts, which pydantic cannot see
        with_hugging_face_names(components["schemas"][TrainParams.__name__])
    if keys_in_use:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    info = {
        "title": "boolq-service",
        "version": "0.1.0",
        "description": "Fine-tune BERT on your text classification data (or BoolQ), serve answers.",
    }
    return {"openapi": "3.1.0", "info": info, "paths": paths, "components": components}


@bp.get("/openapi.json")
@documented("This document", {200: ("OpenAPI 3.1", None)}, errors=False)
def openapi():
    return jsonify(openapi_document(current_app, current_service().settings, auth_required()))
