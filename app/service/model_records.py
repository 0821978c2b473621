"""What a worker published to the MLflow tracking server, as it recorded it in Redis: the trust anchor of every
download.

Anyone who can reach the tracking server can add runs, tags, files and aliases there, so a host never takes a
model, predictions or a checkpoint from it on the server's word. When a worker uploads a job's run folder it
records, next to the job in Redis, the MLflow run id and each file's size and sha256 (``PublishedModel``); when it
uploads a training state, that file's digest (``CheckpointRecord``). ``app.service.model_store`` downloads only
those files from only that run, and refuses any byte that differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from app.config import Settings
from app.engine import run_folder
from app.service.redis_connection import service_key
from app.tracking import Tracker, make_tracker, models_travel_through_mlflow

log = logging.getLogger(__name__)

# What a replica needs of a run folder: the model, and the files predict and GET /jobs/<id>/predictions read.
RUN_FOLDER_PARTS = (run_folder.PARAMS, run_folder.METRICS, run_folder.PREDICTIONS, run_folder.MODEL)
# A retry resumes from one of the job's last few uploaded training states (an upload may lag a save).
CHECKPOINTS_KEPT = 4
# A job is retried within days, not months; its checkpoint records go after this.
CHECKPOINT_RECORD_TTL_S = 30 * 24 * 3600
READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FileDigest:
    path: str  # relative to the run folder, "/"-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class PublishedModel:
    """A job's run folder as its worker uploaded it: the MLflow run, and every file of it with its digest."""

    mlflow_run_id: str
    digest: str
    files: tuple[FileDigest, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class CheckpointRecord:
    """One training state a worker uploaded: the attempt's MLflow run, the file's name there and its digest."""

    mlflow_run_id: str
    name: str
    size: int
    sha256: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_files(run_dir: Path, names: tuple[str, ...] = RUN_FOLDER_PARTS) -> tuple[FileDigest, ...]:
    """Every file under ``run_dir``'s ``names`` (files or folders), sorted by path, with its size and sha256."""
    paths = []
    for name in names:
        top = run_dir / name
        paths += sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
    found = [FileDigest(p.relative_to(run_dir).as_posix(), p.stat().st_size, file_sha256(p)) for p in paths]
    return tuple(sorted(found, key=lambda f: f.path))


def folder_digest(files: tuple[FileDigest, ...]) -> str:
    """One sha256 over the files' paths, sizes and digests in path order: the folder's digest."""
    lines = "".join(f"{f.path}\0{f.size}\0{f.sha256}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(lines.encode()).hexdigest()


def published_key(settings: Settings) -> str:
    return service_key(settings.queue_name, "published")


def checkpoints_key(settings: Settings, job_id: str) -> str:
    return service_key(settings.queue_name, "checkpoints", job_id)


def record_published(
    redis, settings: Settings, job_id: str, mlflow_run_id: str, run_dir: Path, names: tuple[str, ...] = RUN_FOLDER_PARTS
) -> PublishedModel:
    """Record the run folder a worker just uploaded to ``mlflow_run_id`` as the job's model (no expiry: a
    registered version is served as long as it is registered); ``names``: the parts it uploaded (a batch
    prediction publishes its rows and metrics only)."""
    files = digest_files(run_dir, names)
    published = PublishedModel(mlflow_run_id, folder_digest(files), files)
    redis.hset(published_key(settings), job_id, json.dumps(asdict(published) | {"recorded_at": time.time()}))
    log.info("job %s: recorded MLflow run %s, digest %s", job_id, mlflow_run_id, published.digest)
    return published


def read_published(redis, settings: Settings, job_id: str) -> PublishedModel | None:
    raw = redis.hget(published_key(settings), job_id)
    if raw is None:
        return None
    data = json.loads(raw)
    files = tuple(FileDigest(**f) for f in data["files"])
    return PublishedModel(data["mlflow_run_id"], data["digest"], files)


def record_checkpoint(redis, settings: Settings, job_id: str, mlflow_run_id: str, path: Path) -> None:
    """Record a training state about to be uploaded to ``mlflow_run_id``'s ``checkpoint/`` (newest first)."""
    record = CheckpointRecord(mlflow_run_id, path.name, path.stat().st_size, file_sha256(path))
    key = checkpoints_key(settings, job_id)
    pipe = redis.pipeline()
    pipe.lpush(key, json.dumps(asdict(record)))
    pipe.ltrim(key, 0, CHECKPOINTS_KEPT - 1)
    pipe.expire(key, CHECKPOINT_RECORD_TTL_S)
    pipe.execute()


def read_checkpoints(redis, settings: Settings, job_id: str) -> list[CheckpointRecord]:
    """The job's recorded training states, newest first."""
    return [CheckpointRecord(**json.loads(raw)) for raw in redis.lrange(checkpoints_key(settings, job_id), 0, -1)]


def publishing_tracker(redis, settings: Settings, job_id: str) -> Tracker:
    """The tracker of a worker's job: with an MLflow tracking server, one that records in Redis what it uploads."""
    tracker = make_tracker(settings)
    if not models_travel_through_mlflow(settings):
        return tracker
    return PublishingTracker(tracker, redis, settings, job_id)


class PublishingTracker:
    """Passes every call to the job's trackers, and records what reaches MLflow: each training state's digest
    before its upload, and the run folder's digests once the run is closed as FINISHED (after every upload)."""

    def __init__(self, tracker, redis, settings: Settings, job_id: str):
        self.tracker = tracker
        self.redis = redis
        self.settings = settings
        self.job_id = job_id

    def __getattr__(self, name):
        return getattr(self.tracker, name)

    def mlflow_run_id(self) -> str | None:
        return self.tracker.references("mlflow").get("mlflow_run_id")

    def log_checkpoint(self, path: Path) -> None:
        run_id = self.mlflow_run_id()
        if run_id is not None:
            record_checkpoint(self.redis, self.settings, self.job_id, run_id, path)
        self.tracker.log_checkpoint(path)

    def end_run(self, status: str) -> dict:
        references = self.tracker.end_run(status)
        run_id = (references.get("mlflow") or {}).get("mlflow_run_id")
        if status == "FINISHED" and run_id and "mlflow" not in references.get("errors", {}):
            record_published(self.redis, self.settings, self.job_id, run_id, self.settings.artifacts_dir / self.job_id)
        return references
