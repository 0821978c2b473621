"""The model registry over HTTP: list the registered versions, and promote one to champion."""

from __future__ import annotations

import functools

from flask import Blueprint

from app.api.auth import allowed, audit
from app.api.body import json_object, parse
from app.api.context import current_service
from app.api.openapi import documented
from app.api.schemas import ChampionView, ModelList, PromoteRequest, respond
from app.config import Settings
from app.service import registry
from app.service.redaction import without_server_paths

bp = Blueprint("models", __name__)


@bp.get("/models")
@documented(
    "Registered model versions (job id, params, dev/val accuracy), newest first, and the champion",
    {200: ("The versions", ModelList)},
)
@allowed("read")
def index():
    service = current_service()
    models = open_registry(service.settings)
    versions, alias_warning = registry.listed_versions(service.queue.connection, service.settings, models)
    champion = next((v for v in versions if v.champion), None)
    # A version's source is where MLflow keeps its files (file:///… on this server): cut to the last part.
    return respond(
        ModelList,
        registered_model=models.name,
        champion=without_server_paths(champion.model_dump()) if champion else None,
        models=[without_server_paths(v.model_dump()) for v in versions],
        alias_warning=alias_warning,
    )


@bp.post("/models/champion")
@documented(
    "Promote a version (by job_id or version) to champion; lower val accuracy needs force",
    {200: ("The new champion", ChampionView)},
    body=PromoteRequest,
)
@allowed("promote")
def promote():
    service = current_service()
    request_ = parse(PromoteRequest, json_object())
    models = open_registry(service.settings)
    if request_.version is not None:
        version = models.version(request_.version)
    else:
        version = models.version_of_job(request_.job_id)
    champion = registry.promote_champion(service.queue.connection, service.settings, models, version, request_.force)
    audit("promote", f"version {champion.version} (job {champion.job_id})")
    return respond(ChampionView, champion=without_server_paths(champion.model_dump()))


@functools.lru_cache(maxsize=4)
def open_registry(settings: Settings) -> registry.ModelRegistry:
    return registry.ModelRegistry(settings)
