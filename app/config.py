"""Configuration from environment variables (12-factor); the only module that reads ``os.environ``.

Each field of :class:`Settings` is read from the variable of the same name in capitals (``redis_url`` ←
``REDIS_URL``); an unset or empty variable means the default written here, so ``python -m app train``
works on a fresh machine. A malformed value is a one-line error naming the variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.params import DEFAULT_MODEL

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data" / "boolq"


class Settings(BaseSettings):
    """All runtime settings: ``Settings()`` reads the environment; ``model_copy(update=...)`` overrides."""

    # hide_input_in_errors: a malformed secret (EDGE_SECRET) must not be echoed into a log.
    model_config = SettingsConfigDict(frozen=True, env_ignore_empty=True, extra="ignore", hide_input_in_errors=True)

    # Where run folders (params, metrics, predictions, fine-tuned model) are written. Shared by API and workers on
    # one machine; across machines models travel through an MLflow tracking server instead (docs/several-machines.md).
    artifacts_dir: Path = PROJECT_ROOT / "runs"
    # BoolQ folder with train.jsonl and val.jsonl (default: the bundled sample); `hub` = google/boolq.
    data_dir: Path = SAMPLE_DATA_DIR
    # Model used when a request does not name one.
    default_model: str = DEFAULT_MODEL
    # Intra-op threads for torch in training jobs and API processes (ONNX Runtime's too); 0 = training: torch's
    # default (all cores), API: the cores divided among WEB_WORKERS.
    num_threads: int = 0
    # Where training runs: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N.
    device: str = "auto"
    # The memory allocator of training processes (train, sweep, worker): jemalloc (Debian's libjemalloc2, preloaded
    # by restarting the process) keeps a CPU run's memory near its working set at full speed; glibc keeps freed
    # blocks for reuse, as fast, but its heap grows all run long. Without libjemalloc2: glibc, with a warning.
    allocator: Literal["jemalloc", "glibc"] = "jemalloc"
    # Redis holding the job queue and job state.
    redis_url: str = "redis://localhost:6379/0"
    # Redis Sentinels watching that Redis, comma-separated host:port; set, the service asks them for the master
    # named REDIS_SENTINEL_MASTER (and follows a failover), and REDIS_URL gives only the password and the db.
    redis_sentinels: str = ""
    redis_sentinel_master: str = "mymaster"
    # Password of the Sentinels themselves; empty = they ask none.
    redis_sentinel_password: str = Field(default="", repr=False)
    # RQ queue name.
    queue_name: str = "boolq-train"
    # Seconds a training job may run before RQ stops it (default 24 h).
    job_timeout: int = 24 * 3600
    # Seconds a finished job's result stays in Redis (default 30 days).
    result_ttl: int = 30 * 24 * 3600
    # Bearer token required for POST /train, cancel and /predict; empty = no auth. With it set, or once a key
    # exists (`python -m app keys create`), every request but the health checks needs a key; API_TOKEN is an admin's.
    api_token: str = Field(default="", repr=False)
    # Entries the audit stream keeps (who trained, swept, promoted, cancelled, deleted, managed keys); about.
    audit_max_entries: int = Field(default=10_000, ge=100, le=1_000_000)
    # Largest accepted request body in bytes.
    max_content_length: int = 1024 * 1024
    # Uploaded datasets (POST /datasets): the largest file, in MB (nginx refuses larger bodies too), and the most rows.
    max_dataset_mb: int = Field(default=100, ge=1, le=10_240)
    max_dataset_rows: int = Field(default=1_000_000, ge=10)
    # Folders (besides ARTIFACTS_DIR) under which a request may name a local model folder, `:`-separated.
    model_roots: Annotated[tuple[Path, ...], NoDecode] = ()
    # Fine-tuned models kept in memory per API process.
    predict_cache_size: int = 2
    # Micro-batching of concurrent /predict requests per API process: at most PREDICT_MAX_BATCH pairs per
    # forward pass, collected for up to PREDICT_BATCH_WAIT_MS after the first; 1 = off. On by default since each
    # web process gets its share of the cores (NUM_THREADS): 1.18x the requests/s of one replica, p50 -16 %
    # (bench/README.md, "Serving backends measured").
    predict_max_batch: int = 32
    predict_batch_wait_ms: int = 2
    # /predict orders a request's pairs (and a micro-batch's) by length and cuts forward passes where padding
    # would pass this share of the tokens computed; 1 = one pass per 64 sorted pairs (see bench/README.md "Serving").
    predict_max_padding: float = Field(default=0.1, ge=0.0, le=1.0)
    # What computes /predict's answers (and batch predictions'): torch, or ONNX Runtime on the model exported once
    # per host into MODEL_CACHE_DIR/onnx (docs/serving.md). torch is the default: no equal-answer backend was faster
    # through nginx on both one-pair and 32-pair requests (bench/README.md, "Serving backends measured").
    serve_backend: Literal["torch", "onnx"] = "torch"
    # torch only: auto = bf16 autocast where the CPU has native bf16 (AVX512-BF16/AMX), fp32 elsewhere; fp32 =
    # always fp32 (the answers an fp32 ONNX export gives, within 1e-4).
    serve_precision: Literal["auto", "fp32"] = "auto"
    # onnx only: int8 = dynamic int8 quantization of the exported model (smaller, faster, answers move by ~1e-2).
    serve_quantize: Literal["none", "int8"] = "none"
    # Experiment trackers: comma-separated list of mlflow, neptune, none.
    tracker: str = "mlflow"
    # MLflow tracking URI; empty = SQLite store under ARTIFACTS_DIR/mlflow.
    mlflow_tracking_uri: str = ""
    # The user and password of a tracking server behind MLflow's basic-auth app (MLflow's client reads the same two
    # variables itself). `python -m app stack --mlflow` makes its server's admin with them, or with a password of
    # its own kept in its state folder, and gives them to its processes.
    mlflow_tracking_username: str = ""
    mlflow_tracking_password: str = Field("", repr=False)
    # With an http(s) MLFLOW_TRACKING_URI, models come from the server into this cache on hosts that did not train
    # them (empty = ARTIFACTS_DIR/.model-cache), least recently used first evicted above MODEL_CACHE_MAX_MB.
    model_cache_dir: Path | None = None
    model_cache_max_mb: int = Field(default=10_240, ge=1)
    # The largest model a host fetches from the tracking server (its files, and the float32 weights its config.json
    # describes), and the longest a fetch may take, the wait for this host's download lock included.
    model_max_mb: int = Field(default=2048, ge=1)
    model_fetch_timeout_s: float = Field(default=120.0, gt=0)
    # MLflow's HTTP client as the service sets it (MLflow's own defaults, 120 s a request and 7 retries with backoff,
    # hold a job or an uncached /predict for minutes when the server is down): seconds a request may wait to connect
    # and for each read, and retries of a refused connection or a 5xx answer.
    mlflow_http_timeout_s: int = Field(10, ge=1)
    mlflow_http_retries: int = Field(1, ge=0)
    # MLflow experiment the runs are logged to (created on first use).
    mlflow_experiment_name: str = "boolq"
    # Registered model name for model versions.
    registered_model_name: str = "boolq-bert"
    # Neptune project and token; without both, Neptune runs offline.
    neptune_project: str = ""
    neptune_api_token: str = Field(default="", repr=False)
    # Neptune connection mode; empty = async with project and token, offline without.
    neptune_mode: str = ""
    # Folder holding Neptune's .neptune data (offline runs); empty = ARTIFACTS_DIR/.neptune.
    neptune_data_directory: Path | None = None
    # HTTP port of ``python -m app serve`` (gunicorn binds 127.0.0.1:PORT unless --host or --socket says otherwise).
    port: int = 5000
    # Shared secret of the edge (nginx) and the replicas where nginx reaches them over TCP (compose, several
    # machines): nginx sends it as X-Edge-Secret and a replica answers every other request 403, except /healthz and
    # /readyz (probes). Empty: not checked (the native stack's replicas listen on unix sockets in its private folder).
    edge_secret: str = Field(default="", repr=False, pattern=r"^([A-Za-z0-9_-]{16,256})?$")
    # Where each gunicorn worker of a replica writes its metrics, so /metrics adds up all of them (prometheus_client's
    # multiprocess mode). Empty: a new temporary folder per replica; one given is emptied by whoever gives it (the
    # native stack, whose replicas share one).
    prometheus_multiproc_dir: Path | None = None
    # Gunicorn worker processes and threads per process.
    web_workers: int = 2
    web_threads: int = 4
    # Longest ``POST /train?wait=true`` wait in seconds; gunicorn's timeout is set above it.
    max_wait: int = 600
    # Seconds between an RQ worker's heartbeats while a job runs (an idle worker beats twice as often); a killed worker
    # leaves the live count WORKER_HEARTBEAT + 15 s after its last heartbeat, and its job is re-run (or failed) about
    # WORKER_HEARTBEAT + WORKER_GRACE_S after it (RQ's abandoned-job handling).
    worker_heartbeat: int = 30
    # How long past a missed heartbeat a worker's job still counts as running (RQ's own grace is 60 s).
    worker_grace_s: int = Field(60, ge=1)
    # Seconds a queued job waits while no live worker of its class (gpu, cpu, any) exists, none having been seen for
    # as long; then it fails (NoWorker) instead of waiting forever under the queue's caps.
    worker_wait_s: int = Field(900, ge=1)
    # Times a job whose worker died (killed, out of memory, its machine lost) is re-run, each from the job's last
    # checkpoint; 0 = failed at once, with the reason. A job that raises (bad data, a model that does not exist,
    # TrackingFailed) is never re-run. The limit is written into each job as it is enqueued (by the replica, or by
    # the worker starting a sweep's trial), so set it alike on every host, or leave the default.
    job_retries: int = Field(2, ge=0)
    # --- Retention (``python -m app gc``, docs/lifecycle.md) ---
    # Days a finished run (its folder here, its MLflow run and artifacts) is kept; 0 = forever. The champion, aliased
    # versions and running jobs are never deleted; leftovers of attempts that ended unfinished always go.
    retention_days: float = Field(0, ge=0)
    # The newest finished runs per experiment (per ARTIFACTS_DIR on a host) kept whatever their age.
    retention_keep_last: int = Field(10, ge=0)
    # --- Admission control and bounded work ---
    # The memory the Redis started by `python -m app stack` may hold (MB). Nothing is evicted (a job record
    # evicted would be a job lost): past it, writes fail with an error the API answers 503, and the host lives.
    redis_maxmemory_mb: int = Field(1024, ge=16)
    # Queued jobs the service accepts; POST /train answers 429 with Retry-After above it.
    max_queued_jobs: int = 50
    # Queued + running jobs per client (its bearer token, else its address); 429 above it.
    max_jobs_per_client: int = 10
    # Compute budget of one job: epochs × training rows × max_length (default: 10 epochs of full BoolQ at 512).
    max_job_tokens: int = 50_000_000
    # Tokens one training step holds in one process: batch_size (its share per device) × max_length. Peak
    # activation memory grows with it; the default admits 64 × 512 or 128 × 256 (and the default 32 × 256).
    max_step_tokens: int = Field(32_768, ge=16)
    # Tokens (items × tokens per item after truncation) one /predict may ask for; 422 above it.
    predict_max_tokens: int = 32_768
    # Seconds a /predict may compute; then it stops between chunks and answers 503 (below nginx's 90 s).
    predict_timeout_s: float = 60.0
    # Concurrent POST /train?wait=true waiters per API process; 429 beyond, so waiters never take every thread.
    max_waiters: int = 2
    # Addresses or networks (comma-separated; `*` = any) whose X-Forwarded-For the API believes: the nginx hop.
    # A request from elsewhere is counted by its own address, so a client cannot choose its per-client key.
    trusted_proxies: str = "127.0.0.1,::1"
    # Host names (comma-separated) a browser may reach the API by when API_TOKEN is empty: a POST's Host and
    # Origin must name one of them, so a web page elsewhere (or a DNS-rebinding name) cannot queue jobs.
    allowed_hosts: str = "localhost,127.0.0.1,[::1]"
    # 1: the reads (GET /jobs*, /sweeps*, /models) are open to everyone even when API_TOKEN is set (by default
    # they need the token too).
    public_reads: bool = False
    # Most devices (`devices` of POST /train: ranks of one DDP run) a job may ask for; 422 above it. Set it to
    # what each worker can give: its GPUs, or on CPU-only workers at most its cores. Default 1: one process.
    max_devices: int = 1
    # Set by torchrun in each rank of a multi-device run: the ranks on this machine (they share its cores).
    local_world_size: int = 1
    # Seconds between a training job's checkpoints within an epoch (one is also saved after every epoch);
    # 0 = after epochs only.
    checkpoint_every_s: float = 600
    # Compute budget of one sweep, checked at submit: at most this many training examples (trials × epochs ×
    # train rows, counted at the largest values the space allows). Default: ~120 epochs of full BoolQ.
    sweep_max_examples: int = 1_000_000
    # Most combinations a grid sweep's space may have (the grid sampler lists them all, on every trial's ask).
    sweep_max_grid: int = Field(10_000, ge=1)
    # Largest sweep spec (base, space and settings, JSON-encoded): every process reading the sweep replays it.
    sweep_max_spec_bytes: int = Field(32_768, ge=1)

    @field_validator("model_roots", mode="before")
    @classmethod
    def split_path_list(cls, value):
        if isinstance(value, str):
            return tuple(Path(p).expanduser() for p in value.split(os.pathsep) if p)
        return value

    @field_validator("redis_sentinels", mode="after")
    @classmethod
    def check_host_ports(cls, value: str) -> str:
        for address in filter(None, (a.strip() for a in value.split(","))):
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{address!r} is not host:port (REDIS_SENTINELS is a comma-separated host:port list)")
        return value

    @model_validator(mode="after")
    def check_quantize_backend(self) -> Settings:
        if self.serve_quantize != "none" and self.serve_backend != "onnx":
            raise ValueError("SERVE_QUANTIZE applies to SERVE_BACKEND=onnx only (torch serves the fp32 weights)")
        return self

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs; empty when Sentinel is not used."""
        pairs = (a.strip().rpartition(":") for a in self.redis_sentinels.split(",") if a.strip())
        return [(host, int(port)) for host, _, port in pairs]

    @field_validator(
        "artifacts_dir",
        "data_dir",
        "neptune_data_directory",
        "model_cache_dir",
        "prometheus_multiproc_dir",
        mode="after",
    )
    @classmethod
    def expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


def preloaded_libraries() -> list[str]:
    """The libraries ``LD_PRELOAD`` asks the dynamic loader to load first (``app.ops.allocator`` sets it)."""
    return os.environ.get("LD_PRELOAD", "").replace(":", " ").split()


def environment_with(**overrides: str) -> dict[str, str]:
    """This process's environment plus ``overrides``: what a child process (``python -m app stack``) gets."""
    return {**os.environ, **overrides}
