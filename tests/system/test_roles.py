"""``python -m app stack --role worker|api|edge``: one machine's part each, as separate processes with their own
ARTIFACTS_DIR and HF home, sharing only Redis and an MLflow server (docs/several-machines.md). The edge starts
first, before any replica answers, as a team bringing machines up in any order would; a tiny job trained through it
runs on the worker role and is served by the api role, which fetched the model from MLflow."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import uuid

import pytest
import requests

from app.ops.stack import free_ports
from tests.helpers import REPO_ROOT, TINY_JOB, running_stack

EDGE_SECRET = "roles-" + "0123456789abcdef"
QUESTION = {"question": "is the sky blue", "passage": "The sky appears blue because of Rayleigh scattering."}


def stack(*flags: str) -> list[str]:
    return [sys.executable, "-m", "app", "stack", *flags]


def machine_env(folder, queue_name: str, **extra: str) -> dict[str, str]:
    """One machine's environment: its own folders, the service's queue, the test's light settings."""
    own = {
        "ARTIFACTS_DIR": str(folder / "runs"),
        "HF_HOME": str(folder / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "QUEUE_NAME": queue_name,
        "NUM_THREADS": "1",
        "TRACKER": "mlflow",
        "CHECKPOINT_EVERY_S": "0",
    }
    return os.environ | own | extra


@pytest.fixture(scope="module")
def roles(redis_url, mlflow_server, tmp_path_factory):
    """The edge, then one replica, then one worker, each its own ``stack --role``; yields their states by role."""
    queue_name = f"test-{uuid.uuid4().hex[:8]}"
    edge_port, api_port = free_ports(2)
    secret = {"EDGE_SECRET": EDGE_SECRET}
    commands = {
        "edge": stack("--role", "edge", "--port", str(edge_port), "--replica", f"127.0.0.1:{api_port}"),
        "api": stack("--role", "api", "--host", "0.0.0.0", "--port", str(api_port))
        + ["--redis", redis_url, "--mlflow", mlflow_server.url],
        "worker": stack("--role", "worker", "--workers", "1", "--redis", redis_url, "--mlflow", mlflow_server.url),
    }
    states = {}
    with contextlib.ExitStack() as running:
        for role, argv in commands.items():
            folder = tmp_path_factory.mktemp(role)
            env = machine_env(folder, queue_name, **(secret if role != "worker" else {}))
            _, state = running.enter_context(running_stack(argv, folder, env))
            states[role] = state | {"folder": folder, "argv": argv, "env": env}
        mlflow_server.wait_until_answering()
        yield states


@pytest.mark.slow
def test_a_job_trained_through_the_edge_runs_on_the_worker_role_and_the_api_role_serves_it(roles):
    edge = roles["edge"]["url"]
    trained = requests.post(f"{edge}/train", params={"wait": "true"}, json=TINY_JOB, timeout=600)
    assert trained.status_code == 200 and trained.json()["status"] == "succeeded", trained.text
    job_id = trained.json()["job_id"]
    worker_runs, api_runs = (roles[role]["folder"] / "runs" for role in ("worker", "api"))
    assert (worker_runs / job_id / "metrics.json").is_file() and not (api_runs / job_id).exists()

    served = requests.post(f"{edge}/predict", json=QUESTION | {"model": job_id}, timeout=300)
    assert served.status_code == 200 and served.json()["model"] == job_id, served.text
    assert (api_runs / ".model-cache" / job_id / "model" / "config.json").is_file()  # fetched from MLflow


@pytest.mark.slow
def test_the_api_role_listens_on_every_interface_and_answers_only_the_edge(roles):
    (replica,) = [child for child in roles["api"]["children"] if child["role"] == "api"]
    assert replica["url"].startswith("http://127.0.0.1:")
    direct = requests.get(f"{replica['url']}/jobs", timeout=30)
    assert direct.status_code == 403 and direct.json()["error"]["code"] == "not_through_the_edge", direct.text
    assert requests.get(f"{replica['url']}/healthz", timeout=30).status_code == 200  # probes ask it directly
    assert requests.get(f"{roles['edge']['url']}/jobs", timeout=30).status_code == 200


@pytest.mark.slow
def test_print_config_prints_the_config_the_edge_runs_which_only_its_user_reads(roles):
    edge = roles["edge"]
    argv = [*edge["argv"], "--state-dir", str(edge["state_dir"]), "--print-config"]
    printed = subprocess.run(argv, cwd=REPO_ROOT, env=edge["env"], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    conf_path = edge["folder"] / "state" / "nginx.conf"
    assert printed.stdout == conf_path.read_text()
    assert f'proxy_set_header X-Edge-Secret "{EDGE_SECRET}";' in printed.stdout
    assert os.stat(conf_path).st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("flags", "env", "code", "said"),
    [
        (["--role", "api", "--host", "0.0.0.0", "--port", "1"], {}, 1, "set EDGE_SECRET"),
        (["--role", "edge", "--replica", "10.0.0.7:5000", "--print-config"], {}, 1, "set EDGE_SECRET"),
        (["--role", "edge"], {"EDGE_SECRET": EDGE_SECRET}, 2, "--role edge needs its replicas"),
        (["--role", "edge", "--replica", "10.0.0.7"], {"EDGE_SECRET": EDGE_SECRET}, 2, "is not host:port"),
        (["--role", "worker", "--mlflow"], {}, 2, "--mlflow without a URL"),
        (["--role", "worker", "--redis", "localhost:6379"], {}, 2, "must be a redis://"),
    ],
)
def test_a_role_started_wrongly_says_what_to_set_and_starts_nothing(flags, env, code, said, tmp_path):
    env = os.environ | {"ARTIFACTS_DIR": str(tmp_path / "runs"), "EDGE_SECRET": ""} | env
    argv = stack(*flags, "--state-dir", str(tmp_path / "state"))
    refused = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == code and said in refused.stderr, refused.stderr
    assert not (tmp_path / "state" / "logs").exists() or not any((tmp_path / "state" / "logs").iterdir())


def documented_stack_commands() -> list[list[str]]:
    """Every ``python -m app stack`` command of the docs' shell blocks, its arguments after ``stack`` (variables
    given an address, continuation lines joined, pipes and ``&`` cut off)."""
    commands = []
    for doc in ("several-machines.md", "cluster.md", "deploy.md"):
        text = (REPO_ROOT / "docs" / doc).read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                if "-m app stack" in line:
                    command = re.split(r"[|&#]", line.split("-m app stack", 1)[1])[0]
                    commands.append(shlex.split(re.sub(r"\$\w+", "10.0.0.2", command)))
    return commands


def test_every_stack_command_in_the_docs_is_one_the_cli_accepts():
    from app.cli import build_parser, stack_flag_mistake

    commands = documented_stack_commands()
    roles = {argv[argv.index("--role") + 1] for argv in commands if "--role" in argv}
    assert {"worker", "api", "edge"} <= roles, commands
    for argv in commands:
        args = build_parser().parse_args(["stack", *argv])
        assert stack_flag_mistake(args) == "", argv
