"""The contract: /openapi.json is valid OpenAPI 3.1, and the real app (gunicorn, Redis) passes schemathesis's
checks on generated requests, valid and invalid, with zero failures. Bounded: a fixed seed and few examples
per operation; the queue cap is tiny and waits last 1 s, so fuzzing POST /train cannot flood anything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from openapi_spec_validator import validate

from tests.helpers import service_settings

TOKEN = "contract-token"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"


def test_openapi_document_is_valid_openapi_3_1(redis_url, tmp_path):
    from app.api import create_app

    document = create_app(service_settings(redis_url, tmp_path)).test_client().get("/openapi.json").get_json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    for path, item in document["paths"].items():
        for operation in (op for method, op in item.items() if method != "parameters"):
            for parameter in operation.get("parameters", []):
                assert "schema" in parameter, (path, parameter["name"])
    lr = document["components"]["schemas"]["TrainParams"]["properties"]["lr"]
    assert lr["exclusiveMinimum"] == 0 and lr["maximum"] == 1 and "gt" not in lr


@pytest.fixture(scope="module")
def url(launcher, redis_url, tmp_path_factory):
    """A real gunicorn with a token, a queue cap of 5 and 1 s waits (no worker: jobs stay queued)."""
    settings = service_settings(
        redis_url, tmp_path_factory.mktemp("contract"), api_token=TOKEN, max_queued_jobs=5, max_wait=1
    )
    return launcher.server(settings, workers=1)


def test_schemathesis_finds_no_failure_against_the_real_app(url, tmp_path):
    assert requests.get(f"{url}/openapi.json", timeout=10).status_code == 200
    argv = [str(SCHEMATHESIS), "--config-file", str(CONFIG), "run", f"{url}/openapi.json"]
    argv += ["--max-examples", "15", "--seed", "1", "--header", f"Authorization: Bearer {TOKEN}"]
    argv += ["--request-timeout", "20", "--no-color"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    failures = run.stdout[run.stdout.find("FAILURES") :] if "FAILURES" in run.stdout else run.stdout
    assert run.returncode == 0, failures[:3000] + "\n…\n" + run.stdout[-3000:] + run.stderr[-2000:]


@pytest.mark.parametrize("path", ["/train", "/predict"])
def test_an_over_limit_chunked_body_is_413_not_400(url, path):
    def chunks():  # no Content-Length: requests sends it chunked
        yield b'{"model": "'
        for _ in range(120):
            yield b"a" * 10_000
        yield b'"}'

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    response = requests.post(f"{url}{path}", data=chunks(), headers=headers, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_a_chunked_body_under_the_limit_is_read_whole(url):
    def chunks():
        yield b'{"model": "minilm", '
        yield b'"train_limit": 1}'

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    response = requests.post(f"{url}/train", data=chunks(), headers=headers, timeout=30)
    assert response.status_code == 422 and set(response.json()["error"]["fields"]) == {"train_limit"}
