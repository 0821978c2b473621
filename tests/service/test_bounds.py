"""Bounded requests: a huge /predict is refused or stopped (and its CPU released), and wait=true waiters
never take every thread of a replica, so health and reads stay fast while 20 clients wait.

Real gunicorn processes, a real Redis and a real minilm-sized classifier (the session's tiny run with minilm's
weights), so that a huge request computes for minutes.
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from app.api import create_app
from tests.helpers import TINY_JOB, service_settings, wait_for

LONG_PASSAGE = " ".join(["the river runs past the old mill and under the stone bridge"] * 60)  # > 512 tokens
HUGE = {"items": [{"question": f"does the river run {i}", "passage": LONG_PASSAGE} for i in range(256)]}


def error_of(response) -> dict:
    body = response.json() if hasattr(response, "json") and callable(response.json) else response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "fields"}, body
    return body["error"]


@pytest.fixture(scope="module")
def wide_model_settings(tiny_run, redis_url, tmp_path_factory):
    """Settings whose ARTIFACTS_DIR holds 'wide': the tiny run's folder with minilm's weights in its model (the
    new head untrained: only the cost counts here), answering at 512 tokens per item."""
    from app.engine.modeling import load_classifier, load_tokenizer

    folder = tmp_path_factory.mktemp("bounds")
    settings = service_settings(redis_url, folder)
    wide = settings.artifacts_dir / "wide"
    shutil.copytree(tiny_run[0].run_dir, wide)
    shutil.rmtree(wide / "model")
    load_classifier("minilm").save_pretrained(wide / "model")
    load_tokenizer("minilm").save_pretrained(wide / "model")
    params = json.loads((wide / "params.json").read_text())
    (wide / "params.json").write_text(json.dumps(params | {"max_length": 512}))
    return settings


def test_predict_over_the_token_cap_is_422_before_any_compute(wide_model_settings):

    client = create_app(wide_model_settings.model_copy(update=dict(predict_max_tokens=10_000))).test_client()
    started = time.monotonic()
    response = client.post("/predict", json=HUGE | {"model": "wide"})
    assert response.status_code == 422 and error_of(response)["code"] == "too_many_tokens"
    assert "PREDICT_MAX_TOKENS" in error_of(response)["message"] and time.monotonic() - started < 30


def group_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (gunicorn's master and workers)."""
    parent = psutil.Process(pid)
    total = 0.0
    for process in [parent, *parent.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def idle_cpu_share(pid: int, seconds: float = 2.0) -> float:
    before = group_cpu_seconds(pid)
    time.sleep(seconds)
    return (group_cpu_seconds(pid) - before) / seconds


@pytest.fixture(scope="module")
def predict_server(launcher, wide_model_settings):

    settings = wide_model_settings.model_copy(update=dict(predict_timeout_s=3.0, predict_max_tokens=200_000))
    url = launcher.server(settings, workers=1)
    return url, launcher.processes[-1]


def test_a_huge_predict_is_stopped_at_the_deadline_with_503_and_its_cpu_released(predict_server):
    url, process = predict_server
    started = time.monotonic()
    response = requests.post(f"{url}/predict", json=HUGE | {"model": "wide"}, timeout=60)
    elapsed = time.monotonic() - started
    assert response.status_code == 503 and error_of(response)["code"] == "predict_timeout", response.text
    # The deadline plus one chunk and the model load: seconds on an idle machine, up to ~20 s at load 10 on
    # 2 cores; unbounded, this request computes for minutes.
    assert elapsed < 3.0 + 40, elapsed
    assert idle_cpu_share(process.pid) < 0.3
    small = requests.post(f"{url}/predict", json={"question": "q", "passage": "p", "model": "wide"}, timeout=30)
    assert small.status_code == 200


def test_a_predict_whose_client_went_away_stops_computing(predict_server):
    url, process = predict_server
    requests.post(f"{url}/predict", json={"question": "q", "passage": "p", "model": "wide"}, timeout=30)  # loaded
    with pytest.raises(requests.Timeout):
        requests.post(f"{url}/predict", json=HUGE | {"model": "wide"}, timeout=0.8)
    wait_for(lambda: "stopped: client gone" in process.log_path.read_text(), 10, "the replica to notice")
    assert idle_cpu_share(process.pid) < 0.3


def test_health_stays_fast_while_20_clients_wait_and_waiters_beyond_the_cap_get_429(launcher, redis_url, tmp_path):
    # No worker listens on this queue, so every waiter would wait its full timeout.
    settings = service_settings(redis_url, tmp_path, max_waiters=2, web_threads=4)
    url = launcher.server(settings, workers=1)
    stop = threading.Event()
    probes: list[float] = []

    def probe():
        while not stop.is_set():
            started = time.monotonic()
            assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
            assert requests.get(f"{url}/jobs?per_page=5", timeout=5).status_code == 200
            probes.append(time.monotonic() - started)
            time.sleep(0.05)

    def wait_for_job(i):
        return requests.post(f"{url}/train?wait=true&timeout=8", json=TINY_JOB, timeout=30)

    with ThreadPoolExecutor(21) as pool:
        prober = pool.submit(probe)
        answers = list(pool.map(wait_for_job, range(20)))
        stop.set()
        prober.result()
    codes = sorted(a.status_code for a in answers)
    assert codes == [202] * 2 + [429] * 18, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert "MAX_WAITERS" in error_of(refused)["message"] and "Retry-After" in refused.headers
    assert len(probes) > 10 and max(probes) < 1.0, (len(probes), max(probes), statistics.median(probes))
    print(f"\n20 waiters: {codes.count(429)} refused; {len(probes)} probes, max {max(probes) * 1000:.0f} ms")
