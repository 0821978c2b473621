"""A job's runs on the MLflow tracking server and the files other hosts download from them, one by one, bounded;
and the runs that carry uploaded datasets to other hosts.

A run is complete once it is FINISHED: the tracker closes it last, after every upload (``MlflowTracker.end_run``),
so a killed or failed attempt is never taken for a model. Which run and which bytes are the job's is not the
server's to say: the caller names the run id and each file's size that a worker recorded
(``app.service.model_records``). The calls a download makes have a deadline and no retries of their own, so a
server that hangs holds a request for the caller's time, not for MLflow's minutes of retries.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from app.tracking.mlflow_tracker import RUN_ID_TAG, MlflowClient, use_client_settings

# isort: split
# After mlflow_tracker, which turns MLflow's telemetry off before mlflow is first imported.
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.request_utils import augmented_raise_for_status
from mlflow.utils.rest_utils import http_request

# Longest wait for one read from the server: a stalled download is given up well before the fetch's deadline.
STALL_S = 30.0
CHUNK_BYTES = 1024 * 1024
# Where an uploaded dataset's file sits in its run, and the tag naming the file's content.
DATASET_ARTIFACT_PATH = "dataset"
DATASET_SHA256_TAG = "dataset_sha256"


class ArtifactTooLarge(ValueError):
    """A file on the server is larger than the caller allows (than its worker recorded)."""


class RunNotFound(LookupError):
    """The server has no run with that id (deleted, or never there)."""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str
    artifact_uri: str
    job_id: str | None  # the run's job tag


def seconds_left(deadline: float) -> float:
    """Time to the ``time.monotonic()`` deadline; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline of this download passed")
    return left


class MlflowRuns:
    """The runs of one experiment on a tracking server, by job id."""

    def __init__(self, tracking_uri: str, experiment_name: str):
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name

    @classmethod
    def from_settings(cls, settings) -> MlflowRuns:
        use_client_settings(settings)
        return cls(settings.mlflow_tracking_uri, settings.mlflow_experiment_name)

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

    def has(self, run_id: str, name: str) -> bool:
        """Whether the run's artifacts hold a top-level file or folder ``name``."""
        return name in {artifact.path for artifact in self.client.list_artifacts(run_id)}

    def read_json(self, run_id: str, name: str) -> dict | None:
        """One of the run's JSON files (params.json, metrics.json), or None if the run has no such file."""
        if not self.has(run_id, name):
            return None
        with tempfile.TemporaryDirectory(prefix="boolq-run-file-") as tmp:
            return json.loads(Path(self.client.download_artifacts(run_id, name, tmp)).read_text())

    def run_info(self, run_id: str, deadline: float) -> RunInfo:
        """The run's status, artifact location and job tag, asked once (:class:`RunNotFound`: no such run)."""
        answer = http_request(
            get_default_host_creds(self.tracking_uri),
            "/api/2.0/mlflow/runs/get",
            "GET",
            params={"run_id": run_id},
            max_retries=0,
            timeout=min(seconds_left(deadline), STALL_S),
        )
        if answer.status_code in (400, 404):
            raise RunNotFound(f"the tracking server has no run {run_id}")
        answer.raise_for_status()
        run = answer.json()["run"]
        tags = {tag["key"]: tag["value"] for tag in run.get("data", {}).get("tags", [])}
        info = run["info"]
        return RunInfo(info["run_id"], info["status"], info["artifact_uri"], tags.get(RUN_ID_TAG))

    def download_file(self, run: RunInfo, path: str, destination: Path, max_bytes: int, deadline: float) -> str:
        """The run's artifact file ``path`` written to ``destination``; its sha256. Streams from a server that
        serves artifacts and stops at the first byte past ``max_bytes`` (:class:`ArtifactTooLarge`) or at the
        deadline (TimeoutError); other stores are read whole, then measured."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        repository = get_artifact_repository(run.artifact_uri, tracking_uri=self.tracking_uri)
        if not isinstance(repository, HttpArtifactRepository):
            return self.copy_whole(repository, path, destination, max_bytes)
        answer = http_request(
            get_default_host_creds(repository.artifact_uri),
            posixpath.join("/", path),
            "GET",
            stream=True,
            max_retries=0,
            timeout=min(seconds_left(deadline), STALL_S),
        )
        with answer:
            augmented_raise_for_status(answer)
            digest, written = hashlib.sha256(), 0
            with open(destination, "wb") as file:
                for chunk in answer.iter_content(chunk_size=CHUNK_BYTES):
                    written += len(chunk)
                    if written > max_bytes:
                        raise ArtifactTooLarge(f"{path} on the tracking server is larger than {max_bytes:,} bytes")
                    seconds_left(deadline)
                    digest.update(chunk)
                    file.write(chunk)
        return digest.hexdigest()

    @staticmethod
    def copy_whole(repository, path: str, destination: Path, max_bytes: int) -> str:
        with tempfile.TemporaryDirectory(prefix="boolq-artifact-") as tmp:
            local = Path(repository.download_artifacts(path, tmp))
            if local.stat().st_size > max_bytes:
                raise ArtifactTooLarge(f"{path} on the tracking server is larger than {max_bytes:,} bytes")
            shutil.move(local, destination)
        digest = hashlib.sha256()
        with open(destination, "rb") as file:
            while chunk := file.read(CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()

    def publish_job_files(self, job_id: str, paths: list[Path]) -> str:
        """A finished run of the job (tagged with its id, as a training run is) holding ``paths`` at the top level:
        how a job that trains no model (a batch prediction) shares its files with other hosts; the run's id."""
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.experiment_name)
        run = self.client.create_run(experiment_id, tags={RUN_ID_TAG: job_id}, run_name=f"predictions-{job_id[-6:]}")
        for path in paths:
            self.client.log_artifact(run.info.run_id, str(path))
        self.client.set_terminated(run.info.run_id, "FINISHED")  # last: a finished run is a complete one
        return run.info.run_id

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
