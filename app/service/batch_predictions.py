"""Batch predictions: a job that scores every row of a dataset's split with a fine-tuned model (``POST /predictions``).

At submit (torch-free, in the web process) the request is checked and its model resolved, so nothing is queued that
could only fail: the model exists, the dataset exists, and they share their label names. The worker's side is
``app.service.tasks.predict_job``; its outputs are the run folder's ``predictions.jsonl`` and ``metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rq import Queue
from rq.job import Job

from app.config import Settings
from app.engine import boolq, run_folder
from app.params import BUILTIN_DATASET, PredictionParams
from app.service import jobs
from app.service.datasets import DatasetInvalid, DatasetNotFound, DatasetStore
from app.service.model_access import ModelNotAllowed, fine_tuned_model
from app.service.model_records import record_published
from app.service.model_store import mlflow_runs
from app.service.serving import served_model
from app.tracking import models_travel_through_mlflow

# What a batch prediction publishes; a replica on another host fetches these (``model_store.fetched_run_folder``).
PUBLISHED_FILES = (run_folder.PREDICTIONS, run_folder.METRICS)


class LabelsDiffer(ValueError):
    """The model answers with other label names than the dataset's rows carry."""

    def __init__(self, message: str):
        super().__init__(message)
        self.fields = {"model": message, "dataset": message}


def checked_request(params: PredictionParams, settings: Settings, queue: Queue) -> PredictionParams:
    """``params`` with its model resolved (a champion named now stays the job's model), once the model and the
    dataset exist and share their label names."""
    name = served_model(params.model, settings, queue)
    labels = model_label_names(fine_tuned_model(name, settings))
    expected = dataset_label_names(params.dataset, settings, queue)
    if labels != expected:
        raise LabelsDiffer(
            f"model {name!r} answers with the labels {', '.join(labels)}; dataset {params.dataset!r} has "
            f"{', '.join(expected)}: score it with a model trained on it"
        )
    return params.model_copy(update={"model": name})


def enqueue_predictions(queue: Queue, params: PredictionParams, settings: Settings, owner: str | None = None) -> Job:
    """Put one batch prediction on its worker class's queue (called inside ``Admission.admit``)."""
    return jobs.enqueue_job(
        queue,
        jobs.PREDICT_TASK,
        [params.model_dump()],
        settings,
        description=f"predict {params.dataset} {params.split} with {params.model}",
        accelerator=params.accelerator,
        owner=owner,
    )


def publish(job_id: str, run_dir: Path, settings: Settings, redis) -> None:
    """Where models travel through MLflow, the rows and metrics go there too (a run of the job's own), their
    digests recorded in Redis as a model's are, so a replica on any host fetches and checks them; a failed upload
    fails the job, as a training run's does."""
    if models_travel_through_mlflow(settings):
        run_id = mlflow_runs(settings).publish_job_files(job_id, [run_dir / name for name in PUBLISHED_FILES])
        record_published(redis, settings, job_id, run_id, run_dir, PUBLISHED_FILES)


def model_label_names(checkpoint: Path) -> tuple[str, ...]:
    """A fine-tuned checkpoint's label names in label id order, from its ``config.json`` (no model is loaded)."""
    try:
        id2label = json.loads((checkpoint / "config.json").read_text()).get("id2label") or {}
    except (OSError, ValueError) as exc:
        raise ModelNotAllowed(f"model folder {checkpoint.name}: its config.json cannot be read") from exc
    return tuple(str(id2label[key]) for key in sorted(id2label, key=int))


def dataset_label_names(dataset: str, settings: Settings, queue: Queue) -> tuple[str, ...]:
    if dataset == BUILTIN_DATASET:
        return boolq.LABEL_NAMES
    try:
        return tuple(DatasetStore(settings, queue.connection).get(dataset).label_names)
    except DatasetNotFound as exc:
        raise DatasetInvalid(str(exc), "dataset") from exc
