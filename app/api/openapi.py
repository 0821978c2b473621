"""``GET /openapi.json``: the paths are listed here; every schema is generated from the pydantic models."""

from __future__ import annotations

from flask import Blueprint, jsonify
from pydantic.json_schema import models_json_schema

from app.api import schemas
from app.api.context import current_service
from app.params import TrainParams
from app.service.sweeps import SweepRequest

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
MODELS = (
    TrainParams,
    schemas.TrainQuery,
    schemas.JobsQuery,
    schemas.PredictOne,
    schemas.PredictBatch,
    schemas.PredictOneResponse,
    schemas.PredictBatchResponse,
    schemas.JobAccepted,
    schemas.JobView,
    schemas.JobList,
    schemas.TrainResult,
    schemas.PredictionList,
    schemas.ErrorBody,
    schemas.Health,
    schemas.PromoteRequest,
    schemas.ModelList,
    schemas.ChampionView,
    SweepRequest,
    schemas.SweepAccepted,
    schemas.SweepView,
    schemas.SweepList,
)
ERRORS = {
    "400": "Malformed JSON",
    "401": "Missing or wrong bearer token (when API_TOKEN is set)",
    "403": "Without API_TOKEN: a state-changing request from a host not in ALLOWED_HOSTS or another origin",
    "404": "Unknown job, sweep, route or model",
    "405": "Wrong method",
    "409": "Job or sweep in the wrong state for this request; a champion with higher val accuracy (force)",
    "413": "Body over MAX_CONTENT_LENGTH",
    "415": "Body (even an empty one) is not sent as application/json",
    "422": "A field breaks its rule (each named in error.fields)",
    "500": "Internal error (no details leak)",
    "429": "Queue, client or waiter cap reached (Retry-After says when to retry)",
    "503": "Redis unreachable, or /predict over PREDICT_TIMEOUT_S",
}


def ref(model) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def json_response(description: str, model=None) -> dict:
    content = {"application/json": {"schema": ref(model)}} if model else {}
    return {"description": description, "content": content} if content else {"description": description}


def operation(summary: str, responses: dict, body=None, query=None, secured: bool = False) -> dict:
    op = {
        "summary": summary,
        "responses": responses | {k: json_response(v, schemas.ErrorBody) for k, v in ERRORS.items()},
    }
    if body is not None:
        op["requestBody"] = {
            # Required as application/json, `{}` at least: an empty body of another type is refused (415).
            "required": True,
            "content": {
                "application/json": {"schema": {"oneOf": [ref(m) for m in body]} if len(body) > 1 else ref(body[0])}
            },
        }
    parameters = [query_parameter(name, schema) for name, schema in query_properties(query).items()] if query else []
    if parameters:
        op["parameters"] = parameters
    if secured:
        op["security"] = [{"bearer": []}]
    return op


def query_properties(model) -> dict:
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


JOB_ID_PARAM = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
SWEEP_ID_PARAM = {"name": "sweep_id", "in": "path", "required": True, "schema": {"type": "string"}}


def paths() -> dict:
    return {
        "/train": {
            "post": operation(
                "Queue a fine-tuning job (wait=true: wait for its result)",
                {
                    "202": json_response("Queued (Location: /jobs/<id>)", schemas.JobAccepted),
                    "200": json_response("wait=true and the job succeeded in time", schemas.TrainResult),
                },
                body=[TrainParams],
                query=schemas.TrainQuery,
                secured=True,
            )
        },
        "/jobs": {
            "get": operation(
                "Recent jobs, newest first",
                {"200": json_response("A page", schemas.JobList)},
                query=schemas.JobsQuery,
                secured=True,
            )
        },
        "/jobs/{job_id}": {
            "get": operation(
                "Status, progress, result or error", {"200": json_response("The job", schemas.JobView)}, secured=True
            ),
            "parameters": [JOB_ID_PARAM],
        },
        "/jobs/{job_id}/cancel": {
            "post": operation(
                "Cancel a queued job or stop a running one",
                {
                    "200": json_response("Cancelled", schemas.JobView),
                    "202": json_response("Stop requested, not yet confirmed", schemas.JobView),
                },
                secured=True,
            ),
            "parameters": [JOB_ID_PARAM],
        },
        "/jobs/{job_id}/predictions": {
            "get": operation(
                "Per-example val predictions",
                {"200": json_response("Predictions", schemas.PredictionList)},
                secured=True,
            ),
            "parameters": [JOB_ID_PARAM],
        },
        "/predict": {
            "post": operation(
                "Answer yes/no questions with a fine-tuned model (default: the champion, else the latest job)",
                {
                    "200": {
                        "description": "One answer, or one per item",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [ref(schemas.PredictOneResponse), ref(schemas.PredictBatchResponse)]
                                }
                            }
                        },
                    }
                },
                body=[schemas.PredictOne, schemas.PredictBatch],
                secured=True,
            )
        },
        "/models": {
            "get": operation(
                "Registered model versions (job id, params, dev/val accuracy), newest first, and the champion",
                {"200": json_response("The versions", schemas.ModelList)},
            )
        },
        "/models/champion": {
            "post": operation(
                "Promote a version (by job_id or version) to champion; lower val accuracy needs force",
                {"200": json_response("The new champion", schemas.ChampionView)},
                body=[schemas.PromoteRequest],
                secured=True,
            )
        },
        "/sweeps": {
            "post": operation(
                "Start a hyperparameter sweep: its trials run as jobs, at most `parallel` at once",
                {"202": json_response("Started (Location: /sweeps/<id>)", schemas.SweepAccepted)},
                body=[SweepRequest],
                secured=True,
            ),
            "get": operation(
                "Sweeps, newest first (without leaderboards)",
                {"200": json_response("A page", schemas.SweepList)},
                query=schemas.JobsQuery,
            ),
        },
        "/sweeps/{sweep_id}": {
            "get": operation(
                "Status, space and leaderboard (best dev accuracy first)",
                {"200": json_response("The sweep", schemas.SweepView)},
            ),
            "parameters": [SWEEP_ID_PARAM],
        },
        "/sweeps/{sweep_id}/cancel": {
            "post": operation(
                "Cancel a sweep: its queued and running trials are cancelled, no new ones start",
                {"200": json_response("Cancelled", schemas.SweepView)},
                secured=True,
            ),
            "parameters": [SWEEP_ID_PARAM],
        },
        "/healthz": {"get": {"summary": "Process alive", "responses": {"200": json_response("ok", schemas.Health)}}},
        "/readyz": {
            "get": {
                "summary": "Redis reachable and ARTIFACTS_DIR writable",
                "responses": {
                    "200": json_response("ready", schemas.Health),
                    "503": json_response("not ready", schemas.Health),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text format",
                "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}},
            }
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
    }


def component_schemas() -> dict:
    _, top = models_json_schema([(m, "validation") for m in MODELS], ref_template=REF)
    return top["$defs"]


def openapi_document(settings=None) -> dict:
    """The document for this service as configured: without API_TOKEN no operation asks for a token."""
    document = full_document()
    if settings is not None:
        describe_auth_as_configured(document, settings)
    return document


def describe_auth_as_configured(document: dict, settings) -> None:
    for item in document["paths"].values():
        for method, op in item.items():
            if method == "parameters":
                continue
            open_read = method == "get" and settings.public_reads
            if not settings.api_token or open_read:
                op.pop("security", None)
            if "security" not in op:
                op["responses"].pop("401", None)
    if not settings.api_token:
        document["components"].pop("securitySchemes")


def full_document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "boolq-service",
            "version": "0.1.0",
            "description": "Fine-tune BERT on BoolQ, serve answers.",
        },
        "paths": paths(),
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_document(current_service().settings))
