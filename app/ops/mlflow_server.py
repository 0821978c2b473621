"""The MLflow tracking server the hosts share models through: ``mlflow server --serve-artifacts`` on a SQLite store,
behind MLflow's ``basic-auth`` app.

Workers upload runs (and checkpoints) through it and replicas download models from it, so no folder is shared
between them. ``python -m app stack --mlflow`` starts it as one of the stack's supervised children; the tests
start one the same way. Whoever can write to it can add runs, versions and aliases, so the stack's server asks
every request for the service's credentials (its admin user) and lets nobody else read or write anything.
"""

from __future__ import annotations

import configparser
import io
import json
import secrets
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from app.ops.private_files import write_private

# One web process: the server only relays uploads and downloads, and a busy machine has no cores to spare.
SERVER_WORKERS = 1
# The server's environment: no usage telemetry, and none of MLflow 3's job runners (GenAI evaluation jobs, a
# dozen processes we never use).
SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# MLflow's authentication app (`pip install mlflow[auth]`): HTTP basic auth, users and permissions in a database.
AUTH_APP = "basic-auth"
ADMIN_USERNAME = "admin"
# The auth app's config: who may do what (nothing but the admin), where its users are kept.
AUTH_CONFIG = Path(__file__).with_name("mlflow_basic_auth.ini")
# In the stack's server folder, private to its user: the admin's credentials.
CREDENTIALS_NAME = "credentials.json"


@dataclass(frozen=True)
class ServerCredentials:
    """The admin user the service's processes log in as, and the key MLflow's auth app signs its forms with."""

    username: str
    password: str = field(repr=False)
    secret_key: str = field(repr=False)

    def client_env(self) -> dict[str, str]:
        """What MLflow's client reads to log in (every process that talks to the server gets it)."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}


def mlflow_server_argv(folder: Path, port: int, host: str = "127.0.0.1", authenticated: bool = True) -> list[str]:
    """The command line of a tracking server keeping its runs in ``folder/mlflow.db`` and artifacts in
    ``folder/artifacts`` (served to clients through ``mlflow-artifacts:`` URIs, never a path on this disk); with
    ``authenticated``, behind MLflow's basic-auth app (``server_environment`` gives it its config)."""
    folder = Path(folder).resolve()
    argv = [
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
    return argv + ["--app-name", AUTH_APP] if authenticated else argv


def new_credentials(username: str = "", password: str = "") -> ServerCredentials:
    """Credentials for a new server: ``username`` (default ``admin``) and ``password``, or a random one."""
    return ServerCredentials(
        username or ADMIN_USERNAME, password or secrets.token_urlsafe(24), secrets.token_urlsafe(32)
    )


def read_credentials(folder: Path) -> ServerCredentials | None:
    """The credentials kept in ``folder`` for its server, if any."""
    path = Path(folder) / CREDENTIALS_NAME
    return ServerCredentials(**json.loads(path.read_text())) if path.exists() else None


def save_credentials(folder: Path, credentials: ServerCredentials) -> None:
    """Keep ``credentials`` in ``folder``, in a file only its owner reads."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_private(Path(folder) / CREDENTIALS_NAME, json.dumps(asdict(credentials)))


def server_environment(folder: Path, credentials: ServerCredentials) -> dict[str, str]:
    """The environment variables of an authenticated server on ``folder``: the image's auth config with its database
    in ``folder`` (a private copy), the admin user to create on the first start, and the static key MLflow's auth
    app requires."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    config = configparser.ConfigParser(interpolation=None)
    config.read(AUTH_CONFIG)
    config["mlflow"]["database_uri"] = f"sqlite:///{folder / 'basic_auth.db'}"
    text = io.StringIO()
    config.write(text)
    write_private(folder / AUTH_CONFIG.name, text.getvalue())
    return SERVER_ENV | {
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / AUTH_CONFIG.name),
        "MLFLOW_AUTH_ADMIN_USERNAME": credentials.username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": credentials.password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": credentials.secret_key,
    }


def server_answers(url: str) -> bool:
    """Whether the tracking server at ``url`` answers its health check (open to all, with or without auth)."""
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def credentials_accepted(url: str, credentials: ServerCredentials) -> bool:
    """Whether the server at ``url`` lets ``credentials`` in: False when its admin user has another password."""
    answer = requests.get(
        f"{url}/api/2.0/mlflow/users/get",
        params={"username": credentials.username},
        auth=(credentials.username, credentials.password),
        timeout=10,
    )
    return answer.status_code == 200


def change_password(url: str, credentials: ServerCredentials, new_password: str) -> None:
    """Give the admin user of the server at ``url`` a new password (the auth app reads its config's password only
    when it first creates the user)."""
    answer = requests.patch(
        f"{url}/api/2.0/mlflow/users/update-password",
        json={"username": credentials.username, "password": new_password, "current_password": credentials.password},
        auth=(credentials.username, credentials.password),
        timeout=10,
    )
    answer.raise_for_status()
