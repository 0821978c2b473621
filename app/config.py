"""Configuration from environment variables (12-factor); the only module that reads ``os.environ``.

Every setting has a documented default so that ``python -m app train`` works on a fresh machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data" / "boolq"


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def _env_float(name: str, default: float) -> float:
    raw = _env(name, str(default))
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from exc


def _env_bool(name: str, default: bool) -> bool:
    raw = _env(name, "1" if default else "0").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be 1/0 (true/false), got {raw!r}")


def _env_paths(name: str, default: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser() for p in _env(name, default).split(os.pathsep) if p)


def _env_optional_path(name: str) -> Path | None:
    raw = _env(name, "")
    return Path(raw).expanduser() if raw else None


@dataclass(frozen=True)
class Settings:
    """All runtime settings. Build with :meth:`from_env`; override fields with ``dataclasses.replace``."""

    # Where run folders (params, metrics, predictions, fine-tuned model) are written. Shared by API and workers.
    artifacts_dir: Path = PROJECT_ROOT / "runs"
    # BoolQ folder with train.jsonl and val.jsonl; empty = the bundled sample.
    data_dir: Path = SAMPLE_DATA_DIR
    # Model used when a request does not name one.
    default_model: str = "bert-base-multilingual-cased"
    # Intra-op threads for torch in training jobs and API processes; 0 = torch's default (all cores).
    num_threads: int = 0
    # Where training runs: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N.
    device: str = "auto"
    # Redis holding the job queue and job state.
    redis_url: str = "redis://localhost:6379/0"
    # RQ queue name.
    queue_name: str = "boolq-train"
    # Seconds a training job may run before RQ stops it (default 24 h).
    job_timeout: int = 24 * 3600
    # Seconds a finished job's result stays in Redis (default 30 days).
    result_ttl: int = 30 * 24 * 3600
    # Bearer token required for POST /train, cancel and /predict; empty = no auth.
    api_token: str = field(default="", repr=False)
    # Largest accepted request body in bytes.
    max_content_length: int = 1024 * 1024
    # Folders (besides ARTIFACTS_DIR) under which a request may name a local model folder.
    model_roots: tuple[Path, ...] = ()
    # Fine-tuned models kept in memory per API process.
    predict_cache_size: int = 2
    # Micro-batching of concurrent /predict requests per API process: at most PREDICT_MAX_BATCH pairs per
    # forward pass, collected for up to PREDICT_BATCH_WAIT_MS after the first; 1 = off (the default: it pays
    # only with NUM_THREADS=1, see bench/README.md "Serving").
    predict_max_batch: int = 1
    predict_batch_wait_ms: int = 2
    # Experiment trackers: comma-separated list of mlflow, neptune, none.
    tracker: str = "mlflow"
    # MLflow tracking URI; empty = SQLite store under ARTIFACTS_DIR/mlflow.
    mlflow_tracking_uri: str = ""
    # MLflow experiment the runs are logged to (created on first use).
    mlflow_experiment_name: str = "boolq"
    # Registered model name for model versions.
    registered_model_name: str = "boolq-bert"
    # Neptune project and token; without both, Neptune runs offline.
    neptune_project: str = ""
    neptune_api_token: str = field(default="", repr=False)
    # Neptune connection mode; empty = async with project and token, offline without.
    neptune_mode: str = ""
    # Folder holding Neptune's .neptune data (offline runs); empty = ARTIFACTS_DIR/.neptune.
    neptune_data_dir: Path | None = None
    # HTTP port of ``python -m app serve`` (gunicorn binds 0.0.0.0:PORT).
    port: int = 5000
    # Gunicorn worker processes and threads per process.
    web_workers: int = 2
    web_threads: int = 4
    # Longest ``POST /train?wait=true`` wait in seconds; gunicorn's timeout is set above it.
    max_wait: int = 600
    # Seconds between an RQ worker's heartbeats while a job runs; a killed worker's job is failed
    # about WORKER_HEARTBEAT + 60 s after its last heartbeat (RQ's abandoned-job handling).
    worker_heartbeat: int = 30
    # Times RQ re-runs a job whose worker died (0: it is failed at once, with the reason).
    job_retries: int = 0
    # --- Admission control and bounded work (issue 10; field name = env var lowercased) ---
    # Queued jobs the service accepts; POST /train answers 429 with Retry-After above it.
    max_queued_jobs: int = 50
    # Queued + running jobs per client (its bearer token, else its address); 429 above it.
    max_jobs_per_client: int = 10
    # Compute budget of one job: epochs × training rows × max_length (default: 10 epochs of full BoolQ at 512).
    max_job_tokens: int = 50_000_000
    # Tokens (items × tokens per item after truncation) one /predict may ask for; 422 above it.
    predict_max_tokens: int = 32_768
    # Seconds a /predict may compute; then it stops between chunks and answers 503 (below nginx's 90 s).
    predict_timeout_s: float = 60.0
    # Concurrent POST /train?wait=true waiters per API process; 429 beyond, so waiters never take every thread.
    max_waiters: int = 2
    # 1: GET /jobs* are open to everyone even when API_TOKEN is set (by default they need the token too).
    public_reads: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        """Read every setting from its environment variable, falling back to the defaults above."""
        default = cls()
        return cls(
            artifacts_dir=Path(_env("ARTIFACTS_DIR", str(default.artifacts_dir))).expanduser(),
            data_dir=Path(_env("DATA_DIR", str(default.data_dir))).expanduser(),
            default_model=_env("DEFAULT_MODEL", default.default_model),
            num_threads=_env_int("NUM_THREADS", default.num_threads),
            device=_env("DEVICE", default.device),
            redis_url=_env("REDIS_URL", default.redis_url),
            queue_name=_env("QUEUE_NAME", default.queue_name),
            job_timeout=_env_int("JOB_TIMEOUT", default.job_timeout),
            result_ttl=_env_int("RESULT_TTL", default.result_ttl),
            api_token=_env("API_TOKEN", ""),
            max_content_length=_env_int("MAX_CONTENT_LENGTH", default.max_content_length),
            model_roots=_env_paths("MODEL_ROOTS", ""),
            predict_cache_size=_env_int("PREDICT_CACHE_SIZE", default.predict_cache_size),
            predict_max_batch=_env_int("PREDICT_MAX_BATCH", default.predict_max_batch),
            predict_batch_wait_ms=_env_int("PREDICT_BATCH_WAIT_MS", default.predict_batch_wait_ms),
            tracker=_env("TRACKER", default.tracker),
            mlflow_tracking_uri=_env("MLFLOW_TRACKING_URI", ""),
            mlflow_experiment_name=_env("MLFLOW_EXPERIMENT_NAME", default.mlflow_experiment_name),
            registered_model_name=_env("REGISTERED_MODEL_NAME", default.registered_model_name),
            neptune_project=_env("NEPTUNE_PROJECT", ""),
            neptune_api_token=_env("NEPTUNE_API_TOKEN", ""),
            neptune_mode=_env("NEPTUNE_MODE", ""),
            neptune_data_dir=_env_optional_path("NEPTUNE_DATA_DIRECTORY"),
            port=_env_int("PORT", default.port),
            web_workers=_env_int("WEB_WORKERS", default.web_workers),
            web_threads=_env_int("WEB_THREADS", default.web_threads),
            max_wait=_env_int("MAX_WAIT", default.max_wait),
            worker_heartbeat=_env_int("WORKER_HEARTBEAT", default.worker_heartbeat),
            job_retries=_env_int("JOB_RETRIES", default.job_retries),
            max_queued_jobs=_env_int("MAX_QUEUED_JOBS", default.max_queued_jobs),
            max_jobs_per_client=_env_int("MAX_JOBS_PER_CLIENT", default.max_jobs_per_client),
            max_job_tokens=_env_int("MAX_JOB_TOKENS", default.max_job_tokens),
            predict_max_tokens=_env_int("PREDICT_MAX_TOKENS", default.predict_max_tokens),
            predict_timeout_s=_env_float("PREDICT_TIMEOUT_S", default.predict_timeout_s),
            max_waiters=_env_int("MAX_WAITERS", default.max_waiters),
            public_reads=_env_bool("PUBLIC_READS", default.public_reads),
        )


def environment_with(**overrides: str) -> dict[str, str]:
    """This process's environment plus ``overrides``: what a child process (``python -m app stack``) gets."""
    return {**os.environ, **overrides}
