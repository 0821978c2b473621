"""A succeeded job's val predictions, and the val examples they answer (for the console)."""

from __future__ import annotations

import functools
from pathlib import Path

from rq.job import Job

from app.config import Settings
from app.engine import boolq, data, run_folder
from app.service.jobs import public_status
from app.service.model_store import fetched_run_folder


class PredictionsNotReady(RuntimeError):
    """The job has not succeeded (yet), so it has no predictions."""


class PredictionsMissing(LookupError):
    """The job succeeded but its run folder holds no predictions (deleted since)."""


def read_job_predictions(job: Job, settings: Settings) -> list[dict]:
    """The job's val predictions from its run folder, one dict per example: the local one where this host trained
    it, else the run's copy on the MLflow tracking server (cached with its model)."""
    status = public_status(job)
    if status != "succeeded":
        raise PredictionsNotReady(f"job {job.id} is {status}; predictions exist once it has succeeded")
    rows = run_folder.read_predictions(settings.artifacts_dir / job.id)
    if rows is None:
        fetched = fetched_run_folder(job.id, settings)
        rows = run_folder.read_predictions(fetched) if fetched is not None else None
    if rows is None:
        raise PredictionsMissing(f"the run folder of job {job.id} has no predictions (was it deleted?)")
    return list(rows)


def val_examples_by_idx(settings: Settings) -> dict[int, data.Example]:
    """The val examples by idx from ``DATA_DIR`` (as the workers read it); empty for the hub or a missing folder."""
    path = Path(settings.data_dir) / "val.jsonl"
    try:
        return read_val_examples(path, path.stat().st_mtime)
    except (OSError, data.DataError):
        return {}


@functools.lru_cache(maxsize=2)
def read_val_examples(path: Path, _mtime: float) -> dict[int, data.Example]:
    return {example.idx: example for example in boolq.read_jsonl(path)}
