"""The model registry (MLflow's, model ``REGISTERED_MODEL_NAME``): versions, their tags, and the champion.

A version carries its job id, params, dev and val accuracy as tags. The champion is what ``POST /models/champion``
wrote to Redis (``champion_key``): every API replica finds it with one GET, so a new champion is served within a
request, without a restart. The same request sets MLflow's alias ``champion`` for people browsing MLflow; an alias
moved there by anyone else is reported (``foreign_alias``), never served. No torch here; MLflow is imported when
first used.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from app.config import Settings
from app.service.jobs import JOB_ID_RULE
from app.service.redis_connection import service_key
from app.tracking import parse_tracker_names, version_tags

log = logging.getLogger(__name__)

CHAMPION = "champion"
# Tag values are strings; these version tags are read back as numbers.
NUMERIC_TAGS = ("dev_accuracy", "val_accuracy", "accuracy", "precision", "recall", "f1", "majority_baseline")


class RegistryError(LookupError):
    """No such version, or no version for that job."""


class RegistryOff(RuntimeError):
    """TRACKER does not include mlflow, so there is no registry."""


class NotBetter(ValueError):
    """The version's val accuracy is below the champion's and ``force`` was not given."""


class ModelVersion(BaseModel):
    """One registered version as the registry and ``GET /models`` describe it."""

    model_config = ConfigDict(frozen=True)

    version: int
    job_id: str | None
    created_at: str
    dev_accuracy: float | None
    val_accuracy: float | None
    params: dict
    metrics: dict
    aliases: list[str]
    source: str
    champion: bool


def champion_key(settings: Settings) -> str:
    """The Redis key holding the champion's version and job id, per queue (one service per queue)."""
    return service_key(settings.queue_name, "champion")


def read_champion_pointer(redis, settings: Settings) -> dict | None:
    raw = redis.get(champion_key(settings))
    return json.loads(raw) if raw else None


def write_champion_pointer(redis, settings: Settings, version: ModelVersion) -> None:
    pointer = {"version": version.version, "job_id": version.job_id, "set_at": time.time()}
    redis.set(champion_key(settings), json.dumps(pointer))


def foreign_alias(redis, settings: Settings, versions: list[ModelVersion]) -> str | None:
    """What is wrong when MLflow's ``champion`` alias is not on the version this service serves (moved in MLflow's
    UI, by ``python -m app sweep --promote``, or by anyone who can reach the server); None when they agree."""
    pointer = read_champion_pointer(redis, settings) or {}
    alias = next((v for v in versions if CHAMPION in v.aliases), None)
    if alias is None or alias.version == pointer.get("version"):
        return None
    served = f"version {pointer['version']} (job {pointer.get('job_id')})" if pointer else "no champion"
    return (
        f"MLflow's alias '{CHAMPION}' points at version {alias.version} (job {alias.job_id}), which this service does "
        f"not serve: the champion is {served}, set by POST /models/champion; promote it there to serve it"
    )


def report_foreign_alias(redis, settings: Settings) -> str | None:
    """The workers' periodic check: log (once per alias version) an alias moved outside this service. The alias
    is never copied into Redis: whoever reaches the tracking server must not choose what /predict serves."""
    try:
        models = ModelRegistry(settings)
    except RegistryOff:
        return None
    champion = models.champion()
    problem = foreign_alias(redis, settings, [champion] if champion else [])
    if problem is None:
        redis.delete(foreign_alias_key(settings))
        return None
    if redis.set(foreign_alias_key(settings), champion.version, get=True) != str(champion.version).encode():
        log.warning("%s", problem)
    return problem


def foreign_alias_key(settings: Settings) -> str:
    """The alias version last reported, so the periodic check warns once per move, not every minute."""
    return service_key(settings.queue_name, "champion", "foreign-alias")


def listed_versions(redis, settings: Settings, models: ModelRegistry) -> tuple[list[ModelVersion], str | None]:
    """Every version, newest first, marked ``champion`` where Redis' pointer (what /predict serves) says, and the
    warning when MLflow's alias says otherwise."""
    pointer = read_champion_pointer(redis, settings) or {}
    versions = [v.model_copy(update={"champion": v.version == pointer.get("version")}) for v in models.versions()]
    return versions, foreign_alias(redis, settings, versions)


def promote_champion(
    redis, settings: Settings, models: ModelRegistry, version: ModelVersion, force: bool
) -> ModelVersion:
    """``POST /models/champion``: ``version`` becomes what /predict serves (Redis' pointer) and MLflow's alias. A
    lower val accuracy than the champion Redis names needs ``force``; MLflow's alias (anyone's to move) plays no
    part."""
    pointer = read_champion_pointer(redis, settings)
    try:
        current = models.version(int(pointer["version"])) if pointer else None
    except RegistryError:  # the served version was deleted from the registry since
        current = None
    refuse_if_worse(version, current, force)
    champion = models.set_alias(version)
    write_champion_pointer(redis, settings, champion)
    return champion


def refuse_if_worse(version: ModelVersion, current: ModelVersion | None, force: bool) -> None:
    worse = current is not None and (version.val_accuracy or 0.0) < (current.val_accuracy or 0.0)
    if worse and not force:
        raise NotBetter(
            f"version {version.version} has val accuracy {version.val_accuracy:.4f}, below the champion's "
            f"(version {current.version}, {current.val_accuracy:.4f}); send force: true to promote it anyway"
        )


class ModelRegistry:
    """The registered model's versions in MLflow, read and promoted through ``MlflowClient``."""

    def __init__(self, settings: Settings):
        if "mlflow" not in parse_tracker_names(settings.tracker):
            raise RegistryOff("the model registry is MLflow's: set TRACKER to include mlflow")
        # mlflow: heavy, and the API imports this module
        from app.tracking.mlflow_tracker import MlflowClient, MlflowTracker, sqlite_setup_lock

        self.tracker = MlflowTracker.from_settings(settings)
        self.name = settings.registered_model_name
        with sqlite_setup_lock(self.tracker.tracking_uri):
            self.client = MlflowClient(tracking_uri=self.tracker.tracking_uri, registry_uri=self.tracker.tracking_uri)
            self.client.search_registered_models(max_results=1)  # creates the tables of a new local store

    def versions(self) -> list[ModelVersion]:
        """Every version, newest first."""
        found = self.client.search_model_versions(f"name = '{self.name}'", order_by=["version_number DESC"])
        champion = self.champion()  # search results carry no aliases
        return [champion if champion and champion.version == int(v.version) else self.describe(v) for v in found]

    def version(self, number: int) -> ModelVersion:
        from mlflow.exceptions import MlflowException  # mlflow: heavy, and the API imports this module

        try:
            return self.describe(self.client.get_model_version(self.name, str(number)))
        except MlflowException as exc:
            raise RegistryError(f"{self.name} has no version {number}") from exc

    def version_of_job(self, job_id: str) -> ModelVersion:
        if not re.fullmatch(JOB_ID_RULE, job_id):  # it goes into an MLflow filter string
            raise RegistryError(f"{job_id!r} is not a job id (letters, digits, '-' or '_', at most 64)")
        found = self.client.search_model_versions(f"name = '{self.name}' and tags.job_id = '{job_id}'")
        if not found:
            raise RegistryError(f"job {job_id} has no registered version (it was not registered, or did not succeed)")
        return self.describe(max(found, key=lambda v: int(v.version)))

    def champion(self) -> ModelVersion | None:
        from mlflow.exceptions import MlflowException  # mlflow: heavy, and the API imports this module

        try:
            return self.describe(self.client.get_model_version_by_alias(self.name, CHAMPION))
        except MlflowException:
            return None

    def promote(self, version: ModelVersion, force: bool = False) -> ModelVersion:
        """Point MLflow's alias at ``version``; one with lower val accuracy than the alias's version needs ``force``
        (a sweep's promotion, and the CLI's, which have no Redis; the service's is ``promote_champion``)."""
        refuse_if_worse(version, self.champion(), force)
        return self.set_alias(version)

    def set_alias(self, version: ModelVersion) -> ModelVersion:
        self.client.set_registered_model_alias(self.name, CHAMPION, str(version.version))
        return self.version(version.version)

    def register(
        self, model_dir: Path | None, job_id: str, params: dict, metrics: dict, mlflow_run_id: str | None
    ) -> ModelVersion:
        """Register a finished run's model after the fact (a sweep's best trial); ``model_dir`` None: the model is
        the one its MLflow run already holds on the tracking server."""
        tracker = self.tracker
        tracker.client, tracker.run_id = self.client, mlflow_run_id
        if mlflow_run_id is not None:
            tracker.artifact_uri = self.client.get_run(mlflow_run_id).info.artifact_uri
        tracker.register_model(model_dir, {}, version_tags(job_id, params, metrics))
        return self.version(int(tracker.model_version))

    def describe(self, v) -> ModelVersion:
        tags = dict(v.tags or {})
        aliases = list(getattr(v, "aliases", None) or [])
        return ModelVersion(
            version=int(v.version),
            job_id=tags.get("job_id"),
            created_at=datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).isoformat(),
            dev_accuracy=number(tags.get("dev_accuracy")),
            val_accuracy=number(tags.get("val_accuracy")),
            params=json.loads(tags["params"]) if "params" in tags else {},
            metrics={k: number(tags[k]) for k in NUMERIC_TAGS if k in tags},
            aliases=aliases,
            source=v.source,
            champion=CHAMPION in aliases,
        )


def number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
