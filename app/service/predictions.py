"""A succeeded job's val predictions, and the val rows (text, text pair) they answer (for the console)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from pydantic import ValidationError
from redis import Redis
from rq.job import Job

from app.config import Settings
from app.engine import boolq, run_folder
from app.engine.data import DataError, DatasetSpec, Example, load_dataset
from app.params import BUILTIN_DATASET, TrainParams
from app.service.datasets import DatasetNotFound, DatasetStore
from app.service.jobs import public_status
from app.service.model_store import fetched_run_folder

log = logging.getLogger(__name__)


class PredictionsNotReady(RuntimeError):
    """The job has not succeeded (yet), so it has no predictions."""


class PredictionsMissing(LookupError):
    """The job succeeded but its run folder holds no predictions (deleted since)."""


def read_job_predictions(job: Job, settings: Settings) -> list[dict]:
    """The job's val predictions (a batch prediction's rows) from its run folder, one dict per example: the local one
    where this host ran it, else the run's copy on the MLflow tracking server (cached with its model)."""
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


def val_examples_by_idx(params: dict, settings: Settings, connection: Redis) -> dict[int, Example]:
    """The val rows a job with ``params`` was scored on, by idx: BoolQ's from ``DATA_DIR``, an uploaded dataset's
    from the store's file (fetched from the MLflow server where files travel that way) with the job's column
    mapping. Empty where the rows cannot be had (DATA_DIR=hub, a missing folder, a dataset deleted since)."""
    try:
        train_params = TrainParams(**params)
        if train_params.dataset == BUILTIN_DATASET:
            path = Path(settings.data_dir) / "val.jsonl"
            return read_boolq_val(path, path.stat().st_mtime)
        return read_val(DatasetStore(settings, connection).spec_for_training(train_params))
    except (OSError, DataError, DatasetNotFound, ValidationError):
        return {}
    except Exception as exc:  # the MLflow client failing to fetch the file: the rows show without their texts
        log.warning("val rows of dataset %s unavailable: %s", params.get("dataset"), exc)
        return {}


@functools.lru_cache(maxsize=2)
def read_boolq_val(path: Path, _mtime: float) -> dict[int, Example]:
    return {example.idx: example for example in boolq.read_jsonl(path)}


# An uploaded file is stored under its sha256, so its spec names its content and the rows can be kept.
@functools.lru_cache(maxsize=2)
def read_val(spec: DatasetSpec) -> dict[int, Example]:
    return {example.idx: example for example in load_dataset(spec).val}
