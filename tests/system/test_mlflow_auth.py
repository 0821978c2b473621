"""The stack's MLflow server lets in the service and nobody else (issue 28): ``python -m app stack --mlflow`` runs it
behind MLflow's basic-auth app on loopback. The stack's worker trains and registers a model with the credentials
the stack gives it; an outsider on the server's port with no credential, or a wrong password, is refused (401)
whatever it asks through MLflow's REST API. The credentials stay in the stack's private folder, off every command
line and log, and a restart with a new ``MLFLOW_TRACKING_PASSWORD`` rotates the server's password.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from app.ops.mlflow_server import AUTH_CONFIG, CREDENTIALS_NAME
from tests.helpers import REPO_ROOT, TINY_JOB, free_port, running_stack, wait_for

pytestmark = pytest.mark.slow

MODEL_NAME = "boolq-bert"  # REGISTERED_MODEL_NAME's default
# Changes to the registry and the runs that decide what is served, and reads, as an outsider would send them.
OUTSIDER_CALLS = [
    ("POST", "/api/2.0/mlflow/registered-models/create", {"name": "outsider-model"}),
    ("POST", "/api/2.0/mlflow/model-versions/create", {"name": MODEL_NAME, "source": "mlflow-artifacts:/x/model"}),
    ("POST", "/api/2.0/mlflow/registered-models/alias", {"name": MODEL_NAME, "alias": "champion", "version": "1"}),
    ("POST", "/api/2.0/mlflow/runs/create", {"experiment_id": "1", "tags": [{"key": "boolq.run_id", "value": "j"}]}),
    ("POST", "/api/2.0/mlflow/experiments/search", {"max_results": 10}),
    ("GET", "/api/2.0/mlflow/registered-models/get", {"name": MODEL_NAME}),
]


@dataclass
class Stack:
    folder: Path
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen
    state: dict

    @property
    def mlflow_dir(self) -> Path:
        return Path(self.state["state_dir"]) / "mlflow"

    def credentials(self) -> dict:
        return json.loads(Path(self.state["mlflow_credentials_file"]).read_text())

    def auth(self) -> tuple[str, str]:
        credentials = self.credentials()
        return credentials["username"], credentials["password"]

    def mlflow(self, method: str, path: str, body: dict, auth=None) -> requests.Response:
        params, payload = (body, None) if method == "GET" else (None, body)
        url = self.state["mlflow_url"] + path
        return requests.request(method, url, params=params, json=payload, auth=auth, timeout=30)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stack")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "TRACKER": "mlflow",
        "ARTIFACTS_DIR": str(folder / "runs"),
        "HF_HOME": str(folder / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "app", "stack", "--mlflow", "--replicas", "1", "--workers", "1"]
    argv += ["--port", str(free_port())]
    try:
        with running_stack(argv, folder, env) as (process, state):
            yield Stack(folder, argv, env, process, state)
    finally:
        print((folder / "stack.log").read_text()[-5000:])


def test_the_service_trains_and_registers_a_model_with_the_credentials_the_stack_gives_it(stack):
    submitted = requests.post(f"{stack.state['url']}/train", json=TINY_JOB, timeout=60)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]

    def ended():
        view = requests.get(f"{stack.state['url']}/jobs/{job_id}", timeout=60).json()
        return view if view["status"] in ("succeeded", "failed", "cancelled") else None

    view = wait_for(ended, 300, f"job {job_id} to end", 0.5)
    assert view["status"] == "succeeded", view["error"]
    versions = stack.mlflow(
        "GET", "/api/2.0/mlflow/model-versions/search", {"filter": f"name='{MODEL_NAME}'"}, auth=stack.auth()
    )
    assert versions.status_code == 200, versions.text
    tagged = [v for v in versions.json()["model_versions"] if {"key": "job_id", "value": job_id} in v["tags"]]
    assert len(tagged) == 1, versions.json()


@pytest.mark.parametrize("who", ["no credential", "a wrong password"])
def test_an_outsider_on_the_port_is_refused_every_call(stack, who):
    auth = None if who == "no credential" else (stack.auth()[0], "guessed-password")
    for method, path, body in OUTSIDER_CALLS:
        answer = stack.mlflow(method, path, body, auth=auth)
        assert answer.status_code == 401, (method, path, answer.status_code, answer.text[:200])
    upload = requests.put(
        f"{stack.state['mlflow_url']}/api/2.0/mlflow-artifacts/artifacts/1/planted/model.safetensors",
        data=b"planted weights",
        auth=auth,
        timeout=30,
    )
    assert upload.status_code == 401
    assert requests.get(f"{stack.state['mlflow_url']}/health", timeout=30).status_code == 200  # the probes' check
    # Nothing the outsider asked for happened.
    model = stack.mlflow("GET", "/api/2.0/mlflow/registered-models/get", {"name": MODEL_NAME}, auth=stack.auth())
    assert model.status_code == 404 or "aliases" not in model.json()["registered_model"], model.text
    outsiders = stack.mlflow("GET", "/api/2.0/mlflow/registered-models/get", {"name": "outsider-model"}, stack.auth())
    assert outsiders.status_code == 404


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as the kernel lists them) with a socket listening on ``port``."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                addresses.add(address)
    return addresses


def test_the_server_listens_on_loopback_and_its_password_is_in_private_files_only(stack):
    port = int(stack.state["mlflow_url"].rsplit(":", 1)[1])
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing else
    username, password = stack.auth()
    assert len(password) >= 24
    for private in (CREDENTIALS_NAME, AUTH_CONFIG.name):
        assert stat.S_IMODE((stack.mlflow_dir / private).stat().st_mode) == 0o600, private
    assert stat.S_IMODE(Path(stack.state["state_dir"]).stat().st_mode) == 0o700
    assert password not in Path(stack.state["state_dir"], "stack.json").read_text()
    command_lines = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists()]
    assert not [line for line in command_lines if password.encode() in line]  # what ps shows every user
    logs = [stack.folder / "stack.log", *(Path(stack.state["state_dir"]) / "logs").iterdir()]
    assert [log.name for log in logs if password in log.read_text(errors="replace")] == []


def test_a_restart_with_a_new_password_rotates_it_and_one_with_a_stale_password_stops_saying_so(stack):
    old = stack.auth()
    stack.stop()
    rotated = stack.env | {"MLFLOW_TRACKING_PASSWORD": "a-new-password-from-the-secret-store"}
    with running_stack(stack.argv, stack.folder, rotated) as (_, state):
        stack.state = state
        assert stack.credentials()["password"] == rotated["MLFLOW_TRACKING_PASSWORD"]
        admin = ("GET", "/api/2.0/mlflow/users/get", {"username": old[0]})
        assert stack.mlflow(*admin, auth=old).status_code == 401
        assert stack.mlflow(*admin, auth=stack.auth()).status_code == 200
        # Someone changes it in MLflow itself, so the password the stack keeps is stale.
        changed = requests.patch(
            f"{state['mlflow_url']}/api/2.0/mlflow/users/update-password",
            json={"username": old[0], "password": "changed-elsewhere-1234", "current_password": stack.auth()[1]},
            auth=stack.auth(),
            timeout=30,
        )
        assert changed.status_code == 200, changed.text

    refused = subprocess.run(
        [*stack.argv, "--state-dir", str(stack.folder / "state")],
        cwd=REPO_ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 1
    assert "the MLflow server refuses user 'admin'" in refused.stderr
    assert "set MLFLOW_TRACKING_PASSWORD to its current password" in refused.stderr
