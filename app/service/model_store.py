"""Models and checkpoints from the MLflow tracking server, for hosts that did not train them.

With a tracking server (``models_travel_through_mlflow``) a worker uploads each run's folder and checkpoints
there, and records in Redis which run and which bytes it uploaded (``app.service.model_records``). Here a replica
(or a worker training from a fine-tuned model) downloads exactly those files of exactly that run into
``MODEL_CACHE_DIR/<job id>/``, and a retried job fetches its last recorded checkpoint. The server is not trusted:
a run that is not the recorded one or not FINISHED, and any file whose size or sha256 differs, is refused.

Every fetch is bounded: at most ``MODEL_MAX_MB`` (and never more than the cache holds, ``MODEL_CACHE_MAX_MB``),
checked before the download and enforced byte by byte while it runs; ``config.json`` is checked against
``CONFIG_BOUNDS`` before any weights are downloaded, let alone allocated; and ``MODEL_FETCH_TIMEOUT_S`` bounds the
whole fetch, the wait for the host's download lock included. Downloads go to a temporary folder renamed into
place, one at a time per host (a file lock), and the cache stays under ``MODEL_CACHE_MAX_MB`` by evicting the
least recently used run folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from app.config import Settings
from app.engine import run_folder
from app.service import model_records
from app.service.model_records import CheckpointRecord, FileDigest, PublishedModel
from app.service.redis_connection import connect_redis
from app.tracking import models_travel_through_mlflow

log = logging.getLogger(__name__)

# Job ids are RQ's uuid4 strings or the CLI's run ids; anything else never names a run on the server.
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LOCK_FILE = ".download.lock"
PARTIAL_PREFIX = ".partial-"
# Written into a cached run folder once every file matched its worker's record: a folder without it is fetched again.
VERIFIED = ".verified-digest"
CONFIG = f"{run_folder.MODEL}/config.json"
# The largest dimensions a model's config.json may ask for (a BERT-large is 1024 wide, 24 layers, 512 positions,
# a multilingual vocabulary 120k): a lie about them allocates gigabytes before a single weight is read.
CONFIG_BOUNDS = {
    "vocab_size": 262_144,
    "hidden_size": 4096,
    "num_hidden_layers": 48,
    "num_attention_heads": 64,
    "intermediate_size": 16_384,
    "max_position_embeddings": 8192,
    "type_vocab_size": 16,
}
MB = 1024 * 1024
LOCK_POLL_S = 0.1


class ModelStoreUnavailable(RuntimeError):
    """The tracking server could not be asked or could not deliver a model (down, too slow, or a download broke)."""


class ModelRefused(RuntimeError):
    """The tracking server's copy of a job's model is not what its worker recorded (another run, not finished, a
    file that differs): it is not served."""


class ModelTooLarge(ModelRefused):
    """A model over ``MODEL_MAX_MB`` or ``MODEL_CACHE_MAX_MB``, or whose config.json asks for more than the bounds."""


def cache_dir(settings: Settings) -> Path:
    return (settings.model_cache_dir or settings.artifacts_dir / ".model-cache").expanduser().resolve()


def fetched_run_folder(job_id: str, settings: Settings) -> Path | None:
    """The job's run folder in this host's cache, downloaded from the tracking server if missing; None when
    models do not travel through MLflow or no worker recorded a published model for that job."""
    if not models_travel_through_mlflow(settings) or not JOB_ID.match(job_id):
        return None
    cache = cache_dir(settings)
    folder = cache / job_id
    if is_verified(folder):
        mark_used(folder)
        return folder
    published = model_records.read_published(records_redis(settings), settings, job_id)
    if published is None:
        return None
    refuse_if_too_large(job_id, published, settings)
    deadline = time.monotonic() + settings.model_fetch_timeout_s
    with download_lock(cache, deadline):
        if is_verified(folder):  # another process of this host fetched it while we waited
            mark_used(folder)
            return folder
        with refusals_explained(job_id, settings):
            runs = mlflow_runs(settings)
            run = runs.run_info(published.mlflow_run_id, deadline)
            if run.status != "FINISHED" or run.job_id != job_id:
                raise ModelRefused(
                    f"the MLflow run {run.run_id} recorded for job {job_id} is {run.status} and tagged with job "
                    f"{run.job_id}, not FINISHED and tagged with job {job_id}"
                )
            download_into(folder, lambda tmp: download_published(runs, run, published, tmp, deadline, settings))
        evict_least_recently_used(cache, settings.model_cache_max_mb * MB, keep=folder)
    log.info("fetched the model of job %s from MLflow run %s into %s", job_id, published.mlflow_run_id, folder)
    return folder


def is_verified(folder: Path) -> bool:
    return run_folder.is_finished(folder) and (folder / VERIFIED).is_file()


def refuse_if_too_large(job_id: str, published: PublishedModel, settings: Settings) -> None:
    """Before any download: a model over MODEL_MAX_MB, or one that alone would overflow the cache, is refused
    (the cache keeps the models it holds rather than evicting them for one it cannot keep)."""
    limit_mb = min(settings.model_max_mb, settings.model_cache_max_mb)
    if published.size > limit_mb * MB:
        name = "MODEL_MAX_MB" if settings.model_max_mb <= settings.model_cache_max_mb else "MODEL_CACHE_MAX_MB"
        log.warning("refused the model of job %s: %d MB, over %s (%d)", job_id, published.size // MB, name, limit_mb)
        raise ModelTooLarge(f"the model of job {job_id} is {published.size / MB:.0f} MB, over {name} ({limit_mb})")


def download_published(runs, run, published: PublishedModel, folder: Path, deadline: float, settings: Settings):
    """The recorded files of ``run`` into ``folder``, config.json first and the weights last, each stopped at its
    recorded size and checked against its recorded sha256; then the folder's digest against the record's."""
    from app.tracking.mlflow_runs import ArtifactTooLarge  # mlflow: heavy, and the API imports this module

    got = []
    for file in sorted(published.files, key=lambda f: (f.path != CONFIG, f.size)):
        try:
            sha256 = runs.download_file(run, file.path, folder / file.path, file.size, deadline)
        except ArtifactTooLarge as exc:
            raise ModelRefused(f"{exc}, the size its worker recorded") from exc
        if sha256 != file.sha256:
            raise ModelRefused(f"{file.path} on the tracking server is not the file its worker recorded (sha256)")
        got.append(FileDigest(file.path, (folder / file.path).stat().st_size, sha256))
        if file.path == CONFIG:
            check_config(json.loads((folder / CONFIG).read_text()), settings)
    if model_records.folder_digest(tuple(got)) != published.digest:
        raise ModelRefused("the downloaded folder's digest is not the one its worker recorded")
    (folder / VERIFIED).write_text(published.digest)


def check_config(config: dict, settings: Settings) -> None:
    """Refuse a config.json whose dimensions pass ``CONFIG_BOUNDS`` or whose float32 weights would pass
    MODEL_MAX_MB: what loading it would allocate, judged before a byte of weights is read."""
    dims = {}
    for name, bound in CONFIG_BOUNDS.items():
        value = config.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= bound:
            raise ModelTooLarge(f"config.json's {name} is {value!r}; at most {bound} is accepted")
        dims[name] = value
    width, layers = dims["hidden_size"], dims["num_hidden_layers"]
    embeddings = (dims["vocab_size"] + dims["max_position_embeddings"] + dims["type_vocab_size"]) * width
    parameters = embeddings + layers * (4 * width * width + 2 * width * dims["intermediate_size"])
    if parameters * 4 > settings.model_max_mb * MB:
        raise ModelTooLarge(
            f"config.json describes {parameters:,} parameters ({parameters * 4 / MB:.0f} MB in float32), "
            f"over MODEL_MAX_MB ({settings.model_max_mb})"
        )


@contextlib.contextmanager
def refusals_explained(job_id: str, settings: Settings) -> Iterator[None]:
    """A refusal stays a refusal (logged with its run); anything else the server did is ModelStoreUnavailable."""
    from app.tracking.mlflow_runs import RunNotFound  # mlflow: heavy, and the API imports this module

    try:
        yield
    except ModelRefused as exc:
        log.warning("refused the model of job %s from %s: %s", job_id, settings.mlflow_tracking_uri, exc)
        raise
    except RunNotFound as exc:
        log.warning("refused the model of job %s: %s", job_id, exc)
        raise ModelRefused(f"the MLflow run recorded for job {job_id} is gone: {exc}") from exc
    except Exception as exc:  # the message is a client's: the server's URL stays in the log
        log.warning("the model of job %s could not be fetched from %s: %s", job_id, settings.mlflow_tracking_uri, exc)
        raise ModelStoreUnavailable(
            f"the model of job {job_id} could not be fetched from MLflow ({type(exc).__name__})"
        ) from exc


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
    """Before a retry: put the job's last recorded training state into ``run_dir`` unless one is already there.
    True if the run folder can now resume. A server that cannot be asked, or holds no recorded state with its
    recorded digest, means starting over, said in the log."""
    if run_folder.can_resume(run_dir) or not models_travel_through_mlflow(settings):
        return run_folder.can_resume(run_dir)
    records = model_records.read_checkpoints(records_redis(settings), settings, job_id)
    deadline = time.monotonic() + settings.model_fetch_timeout_s
    with tempfile.TemporaryDirectory(prefix="boolq-checkpoint-") as tmp:
        state = None
        for record in records:
            state = download_checkpoint(job_id, record, Path(tmp) / record.name, deadline, settings)
            if state is not None:
                break
        if state is None:
            return False
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(state, run_folder.training_state(run_dir))
    log.info("fetched the checkpoint of job %s from MLflow", job_id)
    return run_folder.can_resume(run_dir)


def download_checkpoint(
    job_id: str, record: CheckpointRecord, destination: Path, deadline: float, settings: Settings
) -> Path | None:
    """One recorded training state from its attempt's run, or None (logged) if the server has not that file."""
    from app.tracking.mlflow_runs import ArtifactTooLarge  # mlflow: heavy, and the API imports this module
    from app.tracking.mlflow_tracker import CHECKPOINT_ARTIFACT_PATH  # mlflow: heavy, and the API imports this module

    runs = mlflow_runs(settings)
    try:
        run = runs.run_info(record.mlflow_run_id, deadline)
        if run.job_id != job_id:
            raise ModelRefused(f"MLflow run {run.run_id} is tagged with job {run.job_id}")
        path = f"{CHECKPOINT_ARTIFACT_PATH}/{record.name}"
        sha256 = runs.download_file(run, path, destination, record.size, deadline)
        if sha256 != record.sha256:
            raise ModelRefused(f"{path} of MLflow run {run.run_id} is not the file its worker recorded (sha256)")
    except (ModelRefused, ArtifactTooLarge) as exc:
        log.warning("refused a checkpoint of job %s (starting over unless an older one matches): %s", job_id, exc)
        return None
    except Exception as exc:
        log.warning("could not fetch a checkpoint of job %s from MLflow: %s", job_id, exc)
        return None
    return destination


@functools.lru_cache(maxsize=4)
def records_redis(settings: Settings):
    """The Redis holding what the workers published (one client per settings, reused by every fetch)."""
    return connect_redis(settings)


def mlflow_runs(settings: Settings):
    from app.tracking.mlflow_runs import MlflowRuns  # mlflow: heavy, and the API imports this module

    return MlflowRuns.from_settings(settings)


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
def download_lock(cache: Path, deadline: float | None = None) -> Iterator[None]:
    """One download per host at a time: models are large, and two processes wanting one model fetch it once.
    Waited for until the ``time.monotonic()`` deadline at most (then ModelStoreUnavailable)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / LOCK_FILE, "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise ModelStoreUnavailable(
                        "another download on this host outlasted MODEL_FETCH_TIMEOUT_S; try again later"
                    ) from None
                time.sleep(LOCK_POLL_S)
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
