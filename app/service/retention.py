"""Bounded disks: what ``python -m app gc`` deletes on this host and on the MLflow tracking server, and what it keeps.

Two kinds of things go:

- **Leftovers of attempts that ended without publishing**: a run folder without ``metrics.json`` (a killed
  attempt's ``training_state.pt``, hundreds of MB) and the MLflow runs that never FINISHED (their uploaded
  checkpoints), once the job they belong to has ended (succeeded on another worker, failed, cancelled). Nothing
  reads them again: only a queued or running job resumes from a checkpoint. These go whatever the policy says.
- **Finished runs the retention policy lets go**: older than ``RETENTION_DAYS`` days (0, the default: never) and
  not among the newest ``RETENTION_KEEP_LAST`` finished runs of the experiment (this host's ARTIFACTS_DIR is one).

Never deleted: the champion (the Redis pointer /predict serves), any version an MLflow alias points at, and every
run of a job that is queued or running. A run folder whose job Redis no longer knows (a CLI run, an expired
record) is treated as finished or not by its ``metrics.json``, and goes only by age. Deleting an MLflow run
deletes its artifacts through the server (``--serve-artifacts``), its registered versions and the worker's record
of it in Redis, then marks the run deleted; ``mlflow gc`` on the server's host purges deleted runs for good.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rq.job import JobStatus
from rq.serializers import JSONSerializer

from app.config import Settings
from app.engine import run_folder
from app.service import model_records, registry
from app.service.jobs import JOB_ID_RULE, ProjectJob, fetched_or_none
from app.service.redis_connection import connect_redis
from app.tracking import parse_tracker_names

log = logging.getLogger(__name__)

DAY_S = 24 * 3600
ACTIVE = {
    JobStatus.CREATED,
    JobStatus.QUEUED,
    JobStatus.DEFERRED,
    JobStatus.SCHEDULED,
    JobStatus.STARTED,
    JobStatus.READY_TO_ENQUEUE,
    JobStatus.RATE_LIMITED,
}
# The job's state as far as retention cares: running (keep all), ended (leftovers go), unknown (age decides).
RUNNING, ENDED, UNKNOWN = "running", "ended", "unknown"
LEFTOVER, EXPIRED = "an attempt that ended unfinished", "past the retention policy"


@dataclass(frozen=True)
class Policy:
    """How long finished runs are kept: ``older_than_days`` 0 keeps them forever; the newest ``keep_last`` always."""

    older_than_days: float
    keep_last: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(settings.retention_days, settings.retention_keep_last)

    def expired(self, ended_at: float, rank: int, now: float) -> bool:
        """Whether a finished run that ended at ``ended_at``, the ``rank``-th newest (0 = newest), may go."""
        if self.older_than_days <= 0 or rank < self.keep_last:
            return False
        return now - ended_at > self.older_than_days * DAY_S


@dataclass(frozen=True)
class Doomed:
    """One thing gc deletes: a run folder on this host or a run on the MLflow server, its size and why."""

    where: str  # "local" | "mlflow"
    job_id: str
    name: str  # the folder's path, or the MLflow run id
    size: int
    reason: str


class Retention:
    """What this host's gc sees: the jobs in Redis, the protected job ids, the run folders and the MLflow runs."""

    def __init__(self, settings: Settings, policy: Policy, now: float | None = None):
        self.settings = settings
        self.policy = policy
        self.now = time.time() if now is None else now
        self.redis = connect_redis(settings)
        self.states: dict[str, str] = {}

    def job_state(self, job_id: str) -> str:
        if job_id not in self.states:
            job = fetched_or_none(ProjectJob, job_id, self.redis, JSONSerializer)
            if job is None:
                self.states[job_id] = UNKNOWN
            else:
                self.states[job_id] = RUNNING if job.get_status(refresh=False) in ACTIVE else ENDED
        return self.states[job_id]

    def protected(self) -> set[str]:
        """The champion's job and every aliased version's job: never deleted."""
        kept = set()
        pointer = registry.read_champion_pointer(self.redis, self.settings)
        if pointer and pointer.get("job_id"):
            kept.add(pointer["job_id"])
        if uses_mlflow(self.settings):
            models = registry.ModelRegistry(self.settings)
            try:
                aliases = models.client.get_registered_model(models.name).aliases
            except Exception:  # no registered model yet
                aliases = {}
            for version in set(aliases.values()):
                kept.add(models.version(int(version)).job_id)
        return kept

    def local(self, protected: set[str]) -> list[Doomed]:
        """Run folders under ARTIFACTS_DIR that go: leftovers of ended jobs, finished runs past the policy."""
        doomed, finished = [], []
        for folder in run_folders(self.settings.artifacts_dir):
            job_id, state = folder.name, self.job_state(folder.name)
            if state == RUNNING:
                continue
            if not run_folder.is_finished(folder):
                if state == ENDED:
                    doomed.append(
                        Doomed("local", job_id, str(folder), tree_size(folder), "attempt that ended unfinished")
                    )
                else:
                    finished.append(folder)  # a CLI run (or an expired job) that never finished: by age only
            elif job_id not in protected:
                finished.append(folder)
        newest_first = sorted(finished, key=last_written, reverse=True)
        for rank, folder in enumerate(newest_first):
            if self.policy.expired(last_written(folder), rank, self.now):
                doomed.append(Doomed("local", folder.name, str(folder), tree_size(folder), EXPIRED))
        return doomed

    def mlflow(self, protected: set[str]) -> list[Doomed]:
        """Runs on the tracking server that go: attempts that never finished, of ended jobs; finished runs past the
        policy. Only runs tagged with a job id; the datasets' experiment is left alone."""
        from app.tracking.mlflow_tracker import RUN_ID_TAG  # mlflow: optional (gc of run folders runs without it)

        runs = mlflow_runs(self.settings)
        experiment = runs.client.get_experiment_by_name(self.settings.mlflow_experiment_name)
        if experiment is None:
            return []
        doomed, finished = [], []
        for run in runs.client.search_runs([experiment.experiment_id], max_results=50_000):
            job_id = run.data.tags.get(RUN_ID_TAG)
            if not job_id or self.job_state(job_id) == RUNNING:
                continue
            if run.info.status != "FINISHED":
                if self.job_state(job_id) == ENDED:
                    size = artifacts_size(runs.client, run.info.run_id)
                    doomed.append(Doomed("mlflow", job_id, run.info.run_id, size, LEFTOVER))
            elif job_id not in protected:
                finished.append(run)
        finished.sort(key=lambda run: run.info.end_time or run.info.start_time or 0, reverse=True)
        for rank, run in enumerate(finished):
            ended_at = (run.info.end_time or run.info.start_time or 0) / 1000
            if self.policy.expired(ended_at, rank, self.now):
                size = artifacts_size(runs.client, run.info.run_id)
                doomed.append(Doomed("mlflow", job_id_of(run), run.info.run_id, size, EXPIRED))
        return doomed

    def plan(self) -> list[Doomed]:
        """Everything gc would delete now, on this host and (with MLflow as the tracker) on the tracking server."""
        protected = self.protected()
        doomed = self.local(protected)
        if uses_mlflow(self.settings):
            doomed += self.mlflow(protected)
        return doomed

    def delete(self, doomed: list[Doomed]) -> None:
        """Delete what :meth:`plan` chose; one failure is logged and the rest still go."""
        for item in doomed:
            try:
                if item.where == "local":
                    shutil.rmtree(item.name)
                else:
                    self.delete_mlflow_run(item)
                log.info(
                    "gc: deleted %s %s (job %s, %d bytes): %s",
                    item.where,
                    item.name,
                    item.job_id,
                    item.size,
                    item.reason,
                )
            except Exception:
                log.exception("gc: could not delete %s %s", item.where, item.name)

    def delete_mlflow_run(self, item: Doomed) -> None:
        """The run's artifacts (through the server), its registered versions, the record of what a worker published
        from it, then the run itself (deleted; ``mlflow gc`` purges it)."""
        # mlflow: optional (gc of run folders runs without it)
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        runs = mlflow_runs(self.settings)
        client = runs.client
        run = client.get_run(item.name)
        get_artifact_repository(run.info.artifact_uri, tracking_uri=runs.tracking_uri).delete_artifacts()
        name = self.settings.registered_model_name
        for version in client.search_model_versions(f"name = '{name}' and run_id = '{item.name}'"):
            client.delete_model_version(name, version.version)
        published = model_records.read_published(self.redis, self.settings, item.job_id)
        if published is not None and published.mlflow_run_id == item.name:
            self.redis.hdel(model_records.published_key(self.settings), item.job_id)
        client.delete_run(item.name)


def mlflow_runs(settings: Settings):
    """The experiment's runs on the tracking server, or in the local store under ARTIFACTS_DIR without one."""
    # mlflow: optional (gc of run folders runs without it)
    from app.tracking.mlflow_runs import MlflowRuns
    from app.tracking.mlflow_tracker import local_store, use_client_settings

    use_client_settings(settings)
    uri = settings.mlflow_tracking_uri or local_store(settings.artifacts_dir)[0]
    return MlflowRuns(uri, settings.mlflow_experiment_name)


def uses_mlflow(settings: Settings) -> bool:
    return "mlflow" in parse_tracker_names(settings.tracker)


def run_folders(artifacts_dir: Path) -> list[Path]:
    """The run folders under ``artifacts_dir`` (named by a job or run id, holding a run's files); never the model
    cache, the local MLflow store, datasets or sweeps."""
    if not artifacts_dir.is_dir():
        return []
    names = (run_folder.PARAMS, run_folder.METRICS, run_folder.TRAINING_STATE)
    return [
        folder
        for folder in artifacts_dir.iterdir()
        if folder.is_dir() and re.fullmatch(JOB_ID_RULE, folder.name) and any((folder / n).exists() for n in names)
    ]


def last_written(folder: Path) -> float:
    """When the run last wrote: its metrics.json (written last), else its newest file."""
    metrics = folder / run_folder.METRICS
    if metrics.is_file():
        return metrics.stat().st_mtime
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=folder.stat().st_mtime)


def tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def artifacts_size(client, run_id: str, path: str | None = None) -> int:
    """The bytes of a run's artifacts, as the server lists them."""
    total = 0
    for artifact in client.list_artifacts(run_id, path):
        total += artifacts_size(client, run_id, artifact.path) if artifact.is_dir else (artifact.file_size or 0)
    return total


def job_id_of(run) -> str:
    from app.tracking.mlflow_tracker import RUN_ID_TAG  # mlflow: optional (gc of run folders runs without it)

    return run.data.tags.get(RUN_ID_TAG, "")


def collect_garbage(settings: Settings, policy: Policy, dry_run: bool) -> list[Doomed]:
    """``python -m app gc``: what goes (deleted unless ``dry_run``)."""
    retention = Retention(settings, policy)
    doomed = retention.plan()
    if not dry_run:
        retention.delete(doomed)
    return doomed
