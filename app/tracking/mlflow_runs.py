"""A job's runs on the MLflow tracking server, found by the job id tag, and the files other hosts download from them:
the finished run's folder (its names are ``app.engine.run_folder``'s, passed in) and the newest checkpoint of any
attempt.

A run is complete once it is FINISHED: the tracker closes it last, after every upload (``MlflowTracker.end_run``),
so a killed or failed attempt is never taken for a model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from app.tracking.mlflow_tracker import (
    CHECKPOINT_ARTIFACT_PATH,
    MODEL_ARTIFACT_PATH,
    RUN_ID_TAG,
    MlflowClient,
)

# Where an uploaded dataset's file sits in its run, and the tag naming the file's content.
DATASET_ARTIFACT_PATH = "dataset"
DATASET_SHA256_TAG = "dataset_sha256"


class MlflowRuns:
    """The runs of one experiment on a tracking server, by job id."""

    def __init__(self, tracking_uri: str, experiment_name: str):
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.experiment_name = experiment_name

    def runs_of_job(self, job_id: str, finished_only: bool) -> list:
        """The job's MLflow runs (one per attempt), newest first."""
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return []
        query = f"tags.`{RUN_ID_TAG}` = '{job_id}'"
        if finished_only:
            query += " and attributes.status = 'FINISHED'"
        return self.client.search_runs(
            [experiment.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=20
        )

    def finished_run_id(self, job_id: str) -> str | None:
        """The MLflow run holding the job's published model, or None (no such job, or it did not finish)."""
        runs = self.runs_of_job(job_id, finished_only=True)
        found = [run for run in runs if self.has(run.info.run_id, MODEL_ARTIFACT_PATH)]
        return found[0].info.run_id if found else None

    def has(self, run_id: str, name: str) -> bool:
        """Whether the run's artifacts hold a top-level file or folder ``name``."""
        return name in {artifact.path for artifact in self.client.list_artifacts(run_id)}

    def download(self, run_id: str, names: tuple[str, ...], destination: Path) -> None:
        """The run's top-level files and folders ``names`` into ``destination``."""
        for name in names:
            self.client.download_artifacts(run_id, name, str(destination))

    def read_json(self, run_id: str, name: str) -> dict | None:
        """One of the run's JSON files (params.json, metrics.json), or None if the run has no such file."""
        if not self.has(run_id, name):
            return None
        with tempfile.TemporaryDirectory(prefix="boolq-run-file-") as tmp:
            return json.loads(Path(self.client.download_artifacts(run_id, name, tmp)).read_text())

    def download_latest_checkpoint(self, job_id: str, destination: Path) -> Path | None:
        """The newest attempt's uploaded training state, downloaded into the folder ``destination``; None if none."""
        for run in self.runs_of_job(job_id, finished_only=False):
            files = self.client.list_artifacts(run.info.run_id, CHECKPOINT_ARTIFACT_PATH)
            if files:
                return Path(self.client.download_artifacts(run.info.run_id, files[0].path, str(destination)))
        return None

    def job_of_alias(self, model_name: str, alias: str) -> str | None:
        """The job id tagged on the registered version that ``alias`` (the champion) points at."""
        version = self.client.get_model_version_by_alias(model_name, alias)
        return (version.tags or {}).get("job_id")

    def publish_dataset(self, path: Path, sha256: str) -> str:
        """Upload a dataset file into a finished run of its own (experiment ``<experiment>-datasets``, tagged with
        the file's sha256), so workers on other hosts can fetch it; the run's id."""
        name = f"{self.experiment_name}-datasets"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, tags={DATASET_SHA256_TAG: sha256}, run_name=path.name)
        self.client.log_artifact(run.info.run_id, str(path), DATASET_ARTIFACT_PATH)
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def download_dataset(self, run_id: str, file_name: str, destination: Path) -> Path:
        """A dataset file published by :meth:`publish_dataset`, downloaded into the folder ``destination``."""
        path = f"{DATASET_ARTIFACT_PATH}/{file_name}"
        return Path(self.client.download_artifacts(run_id, path, str(destination)))
