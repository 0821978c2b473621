"""MLflow backend: params, metric curves, artifacts and a registered model version per run.

Without ``MLFLOW_TRACKING_URI`` the store is local and needs no server: SQLite at
``ARTIFACTS_DIR/.mlflow/mlflow.db`` and artifacts under ``ARTIFACTS_DIR/.mlflow/artifacts``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# MLflow 3 sends usage telemetry from the client; a training run must never reach out to the network.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository  # noqa: E402

log = logging.getLogger(__name__)

EXPERIMENT_ARTIFACTS = "artifacts"
# Per-step metrics are buffered and sent with log_batch when this many are pending or this many seconds passed.
FLUSH_EVERY_METRICS = 50
FLUSH_EVERY_SECONDS = 10.0
LOG_BATCH_LIMIT = 1000  # MLflow's maximum metrics per log_batch request
# SQLite allows one writer at a time; other RQ workers wait for it and retry on "database is locked".
LOCKED_RETRIES = 6
LOCKED_FIRST_WAIT_S = 0.25
MODEL_ARTIFACT_PATH = "model"
CHECKPOINT_ARTIFACT_PATH = "checkpoint"
# The tag naming the job (or CLI run) an MLflow run belongs to: how other hosts find a job's model and checkpoint.
RUN_ID_TAG = "boolq.run_id"
# Opens the experiment in MLflow's model-training view, not the GenAI view ("Traces").
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def use_client_settings(settings) -> None:
    """MLflow's HTTP client reads its timeout and retries from the environment at each request: set them from the
    settings before any client is used (``MlflowTracker.from_settings``, ``MlflowRuns.from_settings``)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(settings.mlflow_http_timeout_s)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(settings.mlflow_http_retries)


def local_store(artifacts_dir: Path) -> tuple[str, str]:
    """The default tracking URI (SQLite) and artifact location (a folder) under ``artifacts_dir``."""
    root = (Path(artifacts_dir) / ".mlflow").resolve()  # hidden: a glob of run folders never lists it
    return f"sqlite:///{root / 'mlflow.db'}", (root / EXPERIMENT_ARTIFACTS).as_uri()


def without_credentials(uri: str) -> str:
    """``http://user:pw@host`` → ``http://host``: the URI as it may appear in a job result."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def readable_name(run_id: str, params: dict) -> str:
    """``minilm-lr1e-04-ep3-ml256-a1b2c3``: what the run was, at a glance in MLflow's run list."""
    if "model" not in params:
        return run_id
    model = Path(str(params["model"])).name
    if model == "model":  # a run folder's model/ checkpoint: name it by its run folder
        model = Path(str(params["model"])).parent.name
    return f"{model}-lr{params.get('lr', 0):.0e}-ep{params.get('epochs')}-ml{params.get('max_length')}-{run_id[-6:]}"


class MlflowTracker:
    """One MLflow run per training run, through ``MlflowClient`` (no global active run)."""

    def __init__(self, tracking_uri: str, artifact_location: str | None, experiment_name: str, model_name: str):
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.experiment_name = experiment_name
        self.model_name = model_name
        self.client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.artifact_uri: str | None = None
        self.model_version: str | None = None
        self.model_uploaded = False
        self.checkpoints: LatestOnlyUploader | None = None
        self.pending: list[Metric] = []
        self.flushed_at = time.monotonic()

    @classmethod
    def from_settings(cls, settings) -> MlflowTracker:
        use_client_settings(settings)
        if settings.mlflow_tracking_uri:
            uri, artifacts = settings.mlflow_tracking_uri, None  # the server decides where artifacts go
        else:
            uri, artifacts = local_store(settings.artifacts_dir)
        return cls(uri, artifacts, settings.mlflow_experiment_name, settings.registered_model_name)

    def start_run(self, run_id: str, params: dict) -> None:
        with sqlite_setup_lock(self.tracking_uri):
            # The client creates (and migrates) the store's tables when constructed: keep that under the lock.
            self.client = self.retrying(MlflowClient, tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            self.experiment_id = self.retrying(self.ensure_experiment)
            self.retrying(self.client.search_registered_models, max_results=1)  # creates the registry tables
        run = self.retrying(
            self.client.create_run,
            self.experiment_id,
            run_name=readable_name(run_id, params),
            tags={RUN_ID_TAG: run_id},
        )
        self.run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri
        self.retrying(self.client.log_batch, self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def ensure_experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return self.client.create_experiment(
                self.experiment_name, artifact_location=self.artifact_location, tags=EXPERIMENT_KIND
            )
        if not set(EXPERIMENT_KIND.items()) <= set(experiment.tags.items()):  # created by an older version
            for key, value in EXPERIMENT_KIND.items():
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id

    def log_inputs(self, datasets: list[dict]) -> None:
        """Each split as an MLflow dataset input: its name, digest and source, tagged with its role."""
        inputs = [
            DatasetInput(
                Dataset(
                    name=d["name"],
                    digest=d["digest"],
                    source_type="local" if d["source"] != "hub" else "hugging_face",
                    source=json.dumps(
                        {"uri": d["source"]} | ({"sha256": d["file_sha256"]} if d.get("file_sha256") else {})
                    ),
                    profile=json.dumps({"num_rows": d["rows"]}),
                ),
                tags=[InputTag("mlflow.data.context", d["context"])],
            )
            for d in datasets
        ]
        self.retrying(self.client.log_inputs, self.run_id, datasets=inputs)

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        timestamp = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), timestamp, step or 0) for key, value in metrics.items()]
        due = len(self.pending) >= FLUSH_EVERY_METRICS or time.monotonic() - self.flushed_at >= FLUSH_EVERY_SECONDS
        if step is None or due:
            self.flush()

    def log_metric_history(self, key: str, points: list[tuple[int, float]]) -> None:
        timestamp = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), timestamp, step) for step, value in points]
        # A read-back's whole history is one call: send when a request fills up or the interval passes, so a
        # fast GPU loop does not wait on an HTTP round trip every 50 steps.
        if len(self.pending) >= LOG_BATCH_LIMIT or time.monotonic() - self.flushed_at >= FLUSH_EVERY_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Send buffered metrics in as few requests as MLflow allows."""
        while self.pending:
            batch = self.pending[:LOG_BATCH_LIMIT]
            self.retrying(self.client.log_batch, self.run_id, metrics=batch)
            del self.pending[: len(batch)]
        self.flushed_at = time.monotonic()

    def log_artifact(self, path: Path) -> None:
        self.retrying(self.client.log_artifact, self.run_id, str(path))

    def log_dict(self, data: dict, name: str) -> None:
        self.retrying(self.client.log_dict, self.run_id, data, name)

    @property
    def uses_server(self) -> bool:
        """A tracking server stores the artifacts (the local store leaves the model in the run folder)."""
        return self.artifact_location is None

    def log_model(self, model_dir: Path) -> None:
        """Upload the model folder to the run's ``model/`` on a tracking server, where other hosts fetch it."""
        if self.uses_server and not self.model_uploaded:
            self.retrying(self.client.log_artifacts, self.run_id, str(model_dir), MODEL_ARTIFACT_PATH)
            self.model_uploaded = True

    def log_checkpoint(self, path: Path) -> None:
        """Queue the training state for upload to the run's ``checkpoint/`` (server only), in the background."""
        if not self.uses_server:
            return
        if self.checkpoints is None:
            run_id, client = self.run_id, self.client
            self.checkpoints = LatestOnlyUploader(
                lambda file: client.log_artifact(run_id, str(file), CHECKPOINT_ARTIFACT_PATH)
            )
        self.checkpoints.submit(path)

    def register_model(self, model_dir: Path, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
        """Register the model folder as a new version, metrics and ``tags`` as its tags.

        With the local store the version points at the run folder's ``model/`` (one copy of the weights on
        disk); a tracking server cannot see this machine's disk, so there the version points at the run's
        uploaded ``model/`` (uploaded now unless it already is; ``model_dir`` None: it already is).
        """
        if self.uses_server:
            if model_dir is not None:
                self.log_model(model_dir)
            source = f"{self.artifact_uri}/{MODEL_ARTIFACT_PATH}"
        else:
            source = Path(model_dir).resolve().as_uri()
        self.ensure_registered_model()
        version = self.retrying(
            self.client.create_model_version,
            self.model_name,
            source=source,
            run_id=self.run_id,
            tags={key: str(value) for key, value in metrics.items()} | (tags or {}),
        )
        self.model_version = str(version.version)
        if self.run_id is not None:
            self.retrying(self.client.set_tag, self.run_id, "model_version", f"{self.model_name}/{self.model_version}")

    def ensure_registered_model(self) -> None:
        try:
            self.retrying(self.client.get_registered_model, self.model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            with contextlib.suppress(MlflowException):  # another worker may create it at the same moment
                self.retrying(self.client.create_registered_model, self.model_name)

    def end_run(self, status: str) -> dict:
        """Wait for a pending checkpoint upload, then close the run (FINISHED last: it marks a complete run)."""
        if self.checkpoints is not None:
            self.checkpoints.close()
            if status == "FINISHED":
                self.delete_checkpoints()
        if self.run_id is not None:
            self.flush()
            self.retrying(self.client.set_terminated, self.run_id, status)
        return self.references()

    def delete_checkpoints(self) -> None:
        """A finished run needs no training state; the server keeps no second copy of the weights and optimizer."""
        try:
            repository = get_artifact_repository(self.artifact_uri, tracking_uri=self.tracking_uri)
            repository.delete_artifacts(CHECKPOINT_ARTIFACT_PATH)
        except Exception as exc:  # only space is lost
            log.warning("could not delete the checkpoint of MLflow run %s: %s", self.run_id, exc)

    def references(self) -> dict:
        return {
            "tracking_uri": without_credentials(self.tracking_uri),
            "experiment_id": self.experiment_id,
            "mlflow_run_id": self.run_id,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "model_uri": f"models:/{self.model_name}/{self.model_version}" if self.model_version else None,
        }

    def close(self) -> None:
        self.pending.clear()
        if self.checkpoints is not None:
            self.checkpoints.close(wait=False)

    def retrying(self, call: Callable, *args, **kwargs):
        """``call(*args, **kwargs)``, retried with backoff while another process holds the SQLite write lock."""
        wait = LOCKED_FIRST_WAIT_S
        for attempt in range(LOCKED_RETRIES + 1):
            try:
                return call(*args, **kwargs)
            except Exception as exc:
                if attempt == LOCKED_RETRIES or "database is locked" not in str(exc):
                    raise
                log.info("MLflow store is locked by another process; retrying in %.2f s", wait)
                time.sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")


class LatestOnlyUploader:
    """Uploads files in a background thread through a queue of one: a file submitted while another waits
    replaces it (the newer checkpoint is the one worth having), so training never waits for the network."""

    def __init__(self, upload: Callable[[Path], None]):
        self.upload = upload
        self.pending: Path | None = None
        self.closed = False
        self.uploaded = 0
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self.run, name="checkpoint-upload", daemon=True)
        self.thread.start()

    def submit(self, path: Path) -> None:
        with self.condition:
            self.pending = path
            self.condition.notify()

    def run(self) -> None:
        while True:
            with self.condition:
                self.condition.wait_for(lambda: self.pending is not None or self.closed)
                if self.pending is None:
                    return
                path, self.pending = self.pending, None
            try:
                self.upload(path)
                self.uploaded += 1
            except Exception as exc:  # the next checkpoint may get through; the retry uses the last that did
                log.warning("checkpoint upload failed: %s", exc)

    def close(self, wait: bool = True) -> None:
        """Stop after the pending upload (``wait``) or drop it."""
        with self.condition:
            if not wait:
                self.pending = None
            self.closed = True
            self.condition.notify()
        if wait:
            self.thread.join()


@contextlib.contextmanager
def sqlite_setup_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise first-time schema creation of a SQLite store between processes (workers starting together)."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db_path = Path(tracking_uri.removeprefix("sqlite:///"))
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with open(db_path.with_name(db_path.name + ".lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
