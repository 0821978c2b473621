"""The contract as users meet it: schemathesis (every check) through nginx, against the native stack with the
default settings (no API_TOKEN), so the spec must describe the service as configured and every error, nginx's
own included, must be JSON. No worker runs: accepted jobs stay queued, and `wait=true` gives up after 1 s."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from app.ops.stack import free_ports
from tests.helpers import REPO_ROOT, running_stack

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CONFIG = REPO_ROOT / "tests" / "service" / "schemathesis.toml"


@pytest.fixture(scope="module")
def nginx_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("contract-nginx")
    (port,) = free_ports(1)
    env = os.environ | {"ARTIFACTS_DIR": str(folder / "runs"), "MAX_WAIT": "1"}
    argv = [sys.executable, "-m", "app", "stack", "--replicas", "1", "--workers", "0", "--port", str(port)]
    with running_stack(argv, folder, env):
        yield f"http://127.0.0.1:{port}"


def test_the_spec_asks_for_no_token_when_the_service_has_none(nginx_url):
    document = requests.get(f"{nginx_url}/openapi.json", timeout=10).json()
    operations = [op for item in document["paths"].values() for method, op in item.items() if method != "parameters"]
    assert not any("security" in op or "401" in op["responses"] for op in operations)
    assert "securitySchemes" not in document["components"]


def test_an_undeclared_method_through_nginx_is_a_json_405_with_allow(nginx_url):
    response = requests.request("TRACE", f"{nginx_url}/jobs", timeout=10)
    assert response.status_code == 405
    assert response.headers["Content-Type"].startswith("application/json") and "Allow" in response.headers
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_schemathesis_with_every_check_finds_no_failure_through_nginx(nginx_url, tmp_path):
    argv = [str(SCHEMATHESIS), "--config-file", str(CONFIG), "run", f"{nginx_url}/openapi.json", "--checks", "all"]
    argv += ["--max-examples", "10", "--seed", "1", "--request-timeout", "20", "--no-color"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=480, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
