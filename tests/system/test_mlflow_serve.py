"""MLflow model serving of a registered version: ``mlflow models serve -m models:/<name>@champion`` (a real
tracking server as the registry, the real command) answers ``/invocations`` with the probabilities our
``/predict`` gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from app.engine.run_folder import read_metrics
from app.engine.training import track_outputs
from app.params import TrainParams
from app.service.registry import ModelRegistry
from app.tracking.mlflow_tracker import MlflowTracker
from tests.helpers import REPO_ROOT, free_port, mixed_length_pairs, service_settings, wait_for


@pytest.fixture
def champion_served_by_mlflow(tiny_run, mlflow_server, redis_url, tmp_path):
    """The tiny run logged and registered as a worker does (``track_outputs``), made champion, and served by
    ``mlflow models serve`` from the registry; yields (settings, the server's URL)."""
    mlflow_server.wait_until_answering()
    result = tiny_run[0]
    run_dir = Path(result.run_dir)
    settings = service_settings(
        redis_url, tmp_path, tracker="mlflow", mlflow_tracking_uri=mlflow_server.url, model_roots=(run_dir.parent,)
    )
    tracker = MlflowTracker.from_settings(settings)
    params = TrainParams(**result.params)
    tracker.start_run(run_dir.name, params.model_dump())
    track_outputs(tracker, run_dir, run_dir / "model", run_dir.name, params, read_metrics(run_dir), fence=lambda: None)
    registry = ModelRegistry(settings)
    registry.promote(registry.version_of_job(run_dir.name), force=True)

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # the scoring server (uvicorn) is the environment's own
    env = os.environ | {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO_ROOT),  # the MLmodel's loader module, app.service.mlflow_pyfunc
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    model_uri = f"models:/{settings.registered_model_name}@champion"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
    )
    url = f"http://127.0.0.1:{port}"

    def answers():
        if process.poll() is not None:
            pytest.fail("mlflow models serve exited:\n" + (tmp_path / "serve.log").read_text()[-3000:])
        try:
            return requests.get(f"{url}/ping", timeout=2).ok
        except requests.ConnectionError:
            return False

    try:
        wait_for(answers, 240, "mlflow models serve to answer /ping", interval_s=0.5)
        yield settings, url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_mlflow_serving_the_champion_answers_as_predict_does(champion_served_by_mlflow, tiny_run):
    from app.api import create_app

    settings, url = champion_served_by_mlflow
    pairs = mixed_length_pairs(3)
    records = [{"text": text, "text_pair": pair} for text, pair in pairs]
    served = requests.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=120)
    assert served.status_code == 200, served.text
    predictions = served.json()["predictions"]

    body = {"model": Path(tiny_run[0].run_dir).name, "items": records, "top_k": 2}
    ours = create_app(settings).test_client().post("/predict", json=body).get_json()["answers"]
    assert [p["label"] for p in predictions] == [a["label"] for a in ours]
    ours_by_id = [[next(s["score"] for s in a["scores"] if s["label"] == name) for name in ("no", "yes")] for a in ours]
    assert [p for row in predictions for p in row["probabilities"]] == pytest.approx(
        [p for row in ours_by_id for p in row], abs=1e-5
    )
