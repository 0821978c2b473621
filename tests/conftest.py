"""Fixtures (helpers live in tests/helpers.py): the bundled sample, the tests' tiny BERT and one real fine-tuning
run of it, a private redis-server, an MLflow tracking server, and a launcher of real service processes; and the
run's hooks: the peak memory of the test processes, and skips only where ALLOWED_SKIPS says."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from app.config import SAMPLE_DATA_DIR
from app.params import TrainParams
from tests.helpers import (
    CHROMIUM_ARGS,
    TINY_PARAMS,
    Launcher,
    MlflowServer,
    free_port,
    nginx_in_front,
    one_torch_thread,
    save_tiny_model,
    service_settings,
    wait_for,
)


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    return SAMPLE_DATA_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tests' tiny BERT (random weights, seed 0) with minilm's tokenizer, saved as a model folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_params(tiny_model_dir) -> dict:
    return TINY_PARAMS | {"model": str(tiny_model_dir)}


@pytest.fixture(scope="session")
def tiny_run(tiny_params, tmp_path_factory):
    """One real fine-tuning run of the tiny model, shared by the tests that read its outputs or serve it: seconds
    on any CPU, where minilm's took minutes on 2 busy cores without bf16."""
    from app.engine.training import train_and_evaluate

    progress = []
    with one_torch_thread():
        result = train_and_evaluate(
            TrainParams(**tiny_params), SAMPLE_DATA_DIR, tmp_path_factory.mktemp("runs"), on_progress=progress.append
        )
    return result, progress


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private redis-server on a free port (no persistence); the tests fail if the binary is missing."""
    import shutil
    import subprocess

    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (Debian package redis-server); the service tests need it")
    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
    ]
    process = subprocess.Popen(argv, stdout=(folder / "redis.log").open("w"), stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"

    def answers():
        try:
            return Redis.from_url(url).ping()
        except RedisConnectionError:
            return False

    try:
        wait_for(answers, 20, "redis-server to answer PING")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("processes"))
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server --serve-artifacts`` on a free port with a SQLite store, started (the service boots while it
    does: ``wait_until_answering``); fails the tests if mlflow is missing."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        pytest.fail("mlflow is not installed (requirements.txt); the multi-host tests need its tracking server")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(redis_url, tmp_path):
    """Settings of a service on the private Redis (modules needing others define their own)."""
    return service_settings(redis_url, tmp_path)


@pytest.fixture
def client(settings):
    """A test client of the app with ``settings``: the real Flask app and Redis, no HTTP server."""
    from app.api import create_app

    return create_app(settings).test_client()


@pytest.fixture(scope="module")
def replica_behind_nginx(launcher, redis_url, tmp_path_factory):
    """A real gunicorn replica on a unix socket in a private folder behind the real nginx of the template (the
    native stack's layout); yields the replica's ``unix:/…`` URL and nginx's."""
    folder = tmp_path_factory.mktemp("behind-nginx")
    folder.chmod(0o700)
    api_url = launcher.server(service_settings(redis_url, folder), workers=1, socket=folder / "api.sock")
    with nginx_in_front(folder, api_url) as url:
        yield api_url, url


@pytest.fixture(scope="module")
def behind_nginx(replica_behind_nginx):
    """nginx's URL, in front of a real gunicorn replica."""
    return replica_behind_nginx[1]


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (its own browser download cannot work offline); headless."""
    import shutil

    from playwright import sync_api as playwright_api  # a missing Playwright fails the browser tests, never skips

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed (Debian package chromium); the console's browser tests need it")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


pytest_plugins = ("pytester",)  # tests/unit/test_skips.py runs these hooks on planted tests


def no_cuda_device() -> bool:
    import torch  # here, not at the top: only a run that skips something pays for it

    return not torch.cuda.is_available()


# The skips a run may have, and when: (test file, reason) -> whether it is allowed now. Any other skip fails its
# test, so a test that quietly stops running is seen (issue 29).
ALLOWED_SKIPS: dict[tuple[str, str], Callable[[], bool]] = {
    ("tests/unit/test_gpu_only.py", "needs a CUDA GPU"): no_cuda_device,
}


def skipped_where_and_why(report: pytest.TestReport | pytest.CollectReport) -> tuple[str, str]:
    """The test file of a skip's report and its reason (a skip's longrepr is ``(path, line, "Skipped: reason")``)."""
    return report.nodeid.split("::")[0], str(report.longrepr[2]).removeprefix("Skipped: ")


def fail_if_not_allowed(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        where, why = skipped_where_and_why(report)
        allowed = ALLOWED_SKIPS.get((where, why))
        if allowed is None or not allowed():
            report.outcome = "failed"
            report.longrepr = f"skipped ({why}), and this skip is not allowed by ALLOWED_SKIPS in tests/conftest.py"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    fail_if_not_allowed(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield  # a module that skips itself (pytest.skip(allow_module_level=True), importorskip)
    fail_if_not_allowed(report)
    return report


WORKER_PEAKS = pytest.StashKey[list]()  # each xdist worker's peak memory, gathered by the controller


def peak_resident_mb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def pytest_sessionfinish(session):
    """Under pytest-xdist (``make test``), each worker hands its peak memory to the controller."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["peak_mb"] = peak_resident_mb()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    node.config.stash.setdefault(WORKER_PEAKS, []).append(node.workeroutput.get("peak_mb", 0))


def pytest_terminal_summary(terminalreporter):
    """Say what the run skipped and why, and what the suite cost the test processes themselves (the budget is
    < 3 GB each; workers and servers are separate)."""
    skips = Counter(
        skipped_where_and_why(report)
        for report in terminalreporter.stats.get("skipped", [])
        if not hasattr(report, "wasxfail")
    )
    for (where, why), count in sorted(skips.items()):
        terminalreporter.write_line(f"skipped, as ALLOWED_SKIPS allows: {count} in {where}: {why}")
    if not skips:
        terminalreporter.write_line("skipped: nothing")
    peaks = terminalreporter.config.stash.get(WORKER_PEAKS, [])
    if peaks:
        listed = ", ".join(f"{mb} MB" for mb in peaks)
        terminalreporter.write_line(f"peak memory of the test processes: {listed} (together {sum(peaks)} MB)")
    else:
        terminalreporter.write_line(f"peak memory of the test process: {peak_resident_mb()} MB")
