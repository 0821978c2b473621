"""The MLflow tracking server the hosts share models through: ``mlflow server --serve-artifacts`` on a SQLite store.

Workers upload runs (and checkpoints) through it and replicas download models from it, so no folder is shared
between them. ``python -m app stack --mlflow`` starts it as one of the stack's supervised children; the tests
start one the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import requests

# One web process: the server only relays uploads and downloads, and a busy machine has no cores to spare.
SERVER_WORKERS = 1
# The server's environment: no usage telemetry, and none of MLflow 3's job runners (GenAI evaluation jobs, a
# dozen processes we never use).
SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_argv(folder: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of a tracking server keeping its runs in ``folder/mlflow.db`` and artifacts in
    ``folder/artifacts`` (served to clients through ``mlflow-artifacts:`` URIs, never a path on this disk)."""
    folder = Path(folder).resolve()
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--serve-artifacts",
        "--workers",
        str(SERVER_WORKERS),
    ]


def server_answers(url: str) -> bool:
    """Whether the tracking server at ``url`` answers its health check."""
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False
