"""`make demo` as users run it (`HF_HUB_OFFLINE=1 python -m app demo`), on a free port instead of 4000: the
native stack comes up, one job is trained through nginx, its accuracy is printed beside the majority class and
matches the predictions the run wrote, /predict answers, and the stack leaves nothing running."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

from mlflow.tracking import MlflowClient

from app.engine.evaluation import LEARNED_MARGIN
from app.ops.stack import free_ports
from app.tracking.mlflow_tracker import RUN_ID_TAG, local_store
from tests.helpers import REPO_ROOT


def test_the_demo_trains_through_nginx_answers_one_question_and_stops_the_stack(tmp_path):
    (port,) = free_ports(1)
    env = os.environ | {"ARTIFACTS_DIR": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"}
    demo = [sys.executable, "-m", "app", "demo", "--port", str(port)]
    proc = subprocess.run(demo, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]

    assert "== the service answered HTTP 200 with the finished job" in log, log[-3000:]  # wait=true, not the 202 path
    trained = re.search(r"job (\S+) succeeded: val accuracy ([\d.]+) against ([\d.]+) for always answering", log)
    assert trained, log[-3000:]
    job_id, accuracy, majority = trained.group(1), float(trained.group(2)), float(trained.group(3))
    rows = [json.loads(line) for line in (tmp_path / "runs" / job_id / "predictions.jsonl").read_text().splitlines()]
    assert accuracy == round(sum(r["label"] == r["prediction"] for r in rows) / len(rows), 4)
    labels = [r["label"] for r in rows]
    assert majority == round(max(labels.count(0), labels.count(1)) / len(labels), 4)
    warned = "WARNING: the model learned nothing" in log
    assert warned == (accuracy <= majority + LEARNED_MARGIN), log[-3000:]  # the warning exactly when it learned nothing

    assert "WARNING: tracking" not in log, log[-3000:]
    tracked = re.search(r"== tracked in MLflow: run (\w+), registered as (\S+) version (\d+)", log)
    assert tracked, log[-3000:]
    client = MlflowClient(local_store(tmp_path / "runs")[0])  # the default: MLflow's local store under ARTIFACTS_DIR
    run = client.get_run(tracked.group(1))
    assert run.info.status == "FINISHED" and run.data.tags[RUN_ID_TAG] == job_id
    version = client.get_model_version(tracked.group(2), tracked.group(3))
    assert version.run_id == run.info.run_id

    answered = re.search(r"is the sky blue\? (yes|no) \(score [\d.]+, model (\S+)\)", log)
    assert answered and answered.group(2) == job_id, log[-3000:]  # /predict serves the model the demo trained
    assert "stack stopped" in log

    with socket.socket() as probe:  # nginx is gone: nothing answers on the demo's port
        assert probe.connect_ex(("127.0.0.1", port)) != 0
