"""Models and checkpoints from the MLflow tracking server, for hosts that did not train them.

With a tracking server (``models_travel_through_mlflow``) a worker uploads each run's folder and checkpoints
there; here a replica (or a worker training from a fine-tuned model) downloads a job's run folder into
``MODEL_CACHE_DIR/<job id>/``, and a retried job fetches its last checkpoint. Downloads go to a temporary folder
renamed into place, one at a time per host (a file lock), and the cache stays under ``MODEL_CACHE_MAX_MB`` by
evicting the least recently used run folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from app.config import Settings
from app.engine import run_folder
from app.tracking import models_travel_through_mlflow

log = logging.getLogger(__name__)

# Job ids are RQ's uuid4 strings or the CLI's run ids; anything else never names a run on the server.
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LOCK_FILE = ".download.lock"
PARTIAL_PREFIX = ".partial-"
# What a replica needs of a run folder: the model, and the files predict and GET /jobs/<id>/predictions read.
RUN_FOLDER_PARTS = (run_folder.PARAMS, run_folder.METRICS, run_folder.PREDICTIONS, run_folder.MODEL)


class ModelStoreUnavailable(RuntimeError):
    """The tracking server could not be asked or could not deliver a model (down, or a download broke)."""


def cache_dir(settings: Settings) -> Path:
    return (settings.model_cache_dir or settings.artifacts_dir / ".model-cache").expanduser().resolve()


def fetched_run_folder(job_id: str, settings: Settings) -> Path | None:
    """The job's run folder in this host's cache, downloaded from the tracking server if missing; None when
    models do not travel through MLflow or no finished run of that job exists there."""
    if not models_travel_through_mlflow(settings) or not JOB_ID.match(job_id):
        return None
    cache = cache_dir(settings)
    folder = cache / job_id
    if run_folder.is_finished(folder):
        mark_used(folder)
        return folder
    with download_lock(cache):
        if run_folder.is_finished(folder):  # another process of this host fetched it while we waited
            mark_used(folder)
            return folder
        runs = mlflow_runs(settings)
        try:
            run_id = runs.finished_run_id(job_id)
            if run_id is None:
                return None
            download_into(folder, lambda tmp: runs.download(run_id, RUN_FOLDER_PARTS, tmp))
        except Exception as exc:
            raise ModelStoreUnavailable(f"the model of job {job_id} could not be fetched from MLflow: {exc}") from exc
        evict_least_recently_used(cache, settings.model_cache_max_mb * 1024 * 1024, keep=folder)
    log.info("fetched the model of job %s from MLflow into %s", job_id, folder)
    return folder


def champion_job_id(settings: Settings) -> str | None:
    """The job of the registry's ``champion`` alias on the tracking server (when Redis has no pointer to it)."""
    from app.service.registry import CHAMPION

    if not models_travel_through_mlflow(settings):
        return None
    try:
        return mlflow_runs(settings).job_of_alias(settings.registered_model_name, CHAMPION)
    except Exception as exc:
        log.info("no champion alias on the tracking server: %s", exc)
        return None


def published_records(mlflow_run_id: str | None, settings: Settings) -> tuple[dict | None, dict | None]:
    """A finished run's params and metrics, from its files on the tracking server (wherever it ran)."""
    if mlflow_run_id is None:
        return None, None
    runs = mlflow_runs(settings)
    return runs.read_json(mlflow_run_id, run_folder.PARAMS), runs.read_json(mlflow_run_id, run_folder.METRICS)


def resume_or_start_over(job_id: str, settings: Settings) -> Path:
    """The run folder of a job about to run: resumable from its last checkpoint (here, or the last one uploaded from
    another host), or cleared of what a killed attempt left, so nothing half-written is ever taken for a model."""
    run_dir = settings.artifacts_dir / job_id
    if not fetch_checkpoint(job_id, run_dir, settings):
        run_folder.remove_unfinished(run_dir)
    return run_dir


def fetch_checkpoint(job_id: str, run_dir: Path, settings: Settings) -> bool:
    """Before a retry: put the job's last uploaded training state into ``run_dir`` unless one is already there.
    True if the run folder can now resume. A server that cannot be asked means starting over, said in the log."""
    if run_folder.can_resume(run_dir) or not models_travel_through_mlflow(settings):
        return run_folder.can_resume(run_dir)
    with tempfile.TemporaryDirectory(prefix="boolq-checkpoint-") as tmp:
        try:
            state = mlflow_runs(settings).download_latest_checkpoint(job_id, Path(tmp))
        except Exception as exc:
            log.warning("could not fetch a checkpoint of job %s from MLflow (starting over): %s", job_id, exc)
            return False
        if state is None:
            return False
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(state, run_folder.training_state(run_dir))
    log.info("fetched the checkpoint of job %s from MLflow", job_id)
    return run_folder.can_resume(run_dir)


def mlflow_runs(settings: Settings):
    from app.tracking.mlflow_runs import MlflowRuns

    return MlflowRuns(settings.mlflow_tracking_uri, settings.mlflow_experiment_name)


def download_into(folder: Path, download) -> None:
    """``download(temporary folder)`` next to ``folder``, then one rename: readers never see half a model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=folder.parent))
    try:
        download(tmp)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder (no metrics.json) left by hand
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def download_lock(cache: Path) -> Iterator[None]:
    """One download per host at a time: models are large, and two processes wanting one model fetch it once."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def mark_used(folder: Path) -> None:
    """The folder's modification time is its last use, for the least-recently-used eviction."""
    with contextlib.suppress(OSError):
        os.utime(folder)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def evict_least_recently_used(cache: Path, max_bytes: int, keep: Path) -> None:
    """Delete cached run folders, least recently used first, until the cache fits ``max_bytes`` (``keep`` stays).

    A process serving an evicted model keeps it in memory; the next one to need it downloads it again."""
    folders = [f for f in cache.iterdir() if f.is_dir() and not f.name.startswith(".")]
    sizes = {f: folder_bytes(f) for f in folders}
    total = sum(sizes.values())
    for folder in sorted(folders, key=lambda f: f.stat().st_mtime):
        if total <= max_bytes:
            break
        if folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= sizes[folder]
        log.info("evicted %s from the model cache (least recently used; MODEL_CACHE_MAX_MB)", folder.name)
