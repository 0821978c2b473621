"""``python -m app demo``: the service as its users run it, end to end and then gone.

The native stack (Redis, API replicas, a worker, nginx) comes up on the given port, one training job goes in
through nginx as ``POST /train?wait=true``, its val accuracy is printed beside the majority baseline, one
text pair goes to ``/predict``, and the stack stops. Everything a user would type is printed as it happens.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from app.config import Settings

log = logging.getLogger(__name__)

TEXT = "is the sky blue"
TEXT_PAIR = "Sky -- The sky appears blue because of Rayleigh scattering of sunlight by the atmosphere."
STACK_START_TIMEOUT_S = 240
STACK_STOP_TIMEOUT_S = 60


class DemoError(RuntimeError):
    """The demo could not complete; the message says which step failed and where its logs are."""


@dataclass(frozen=True)
class DemoOptions:
    port: int = 4000
    replicas: int = 2
    workers: int = 1
    train: dict = field(
        default_factory=lambda: {"model": "minilm", "epochs": 1, "batch_size": 16, "lr": 1e-4, "max_length": 128}
    )
    wait_s: float = 1800.0


def run_demo(options: DemoOptions, settings: Settings) -> int:
    """Start the stack, train through it, ask it about one text pair, stop it; exit code 0 when every step worked."""
    log_path = Path(settings.artifacts_dir) / ".demo-stack.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{options.port}"
    stack = start_stack(options, log_path)
    try:
        wait_for_stack(stack, base, log_path)
        result = train_through_service(base, options)
        print(describe_result(result))
        print(describe_answer(ask_one_pair(base)))
        return 0
    finally:
        stop_stack(stack)
        print(f"== stack stopped (its log: {log_path})")


def start_stack(options: DemoOptions, log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "app", "stack",
        "--replicas", str(options.replicas), "--workers", str(options.workers), "--port", str(options.port),
    ]  # fmt: skip
    print(f"== starting the stack: {' '.join(['python', *command[1:]])}  (log: {log_path})")
    with log_path.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ)


def wait_for_stack(stack: subprocess.Popen, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + STACK_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if stack.poll() is not None:
            raise DemoError(f"the stack exited ({stack.returncode}); the end of {log_path}:\n{tail(log_path)}")
        if healthy(base):
            print(f"== the service answers on {base} (nginx in front of the API replicas)")
            return
        time.sleep(0.5)
    raise DemoError(f"the stack did not answer {base}/healthz within {STACK_START_TIMEOUT_S} s; see {log_path}")


def healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=2).ok
    except requests.RequestException:
        return False


def train_through_service(base: str, options: DemoOptions) -> dict:
    """``POST /train?wait=true``; past the service's MAX_WAIT (202) the job is followed on ``GET /jobs/<id>``.
    Returns the job's accuracy and metrics."""
    body = json.dumps(options.train)
    print(f"== curl -X POST '{base}/train?wait=true' -H 'Content-Type: application/json' -d '{body}'")
    print("   (minilm on the bundled 400-row sample: about a minute of training on 2 cores)")
    response = requests.post(f"{base}/train", params={"wait": "true"}, json=options.train, timeout=options.wait_s + 60)
    answer = response.json()
    if response.status_code == 200 and answer.get("status") == "succeeded":
        print("== the service answered HTTP 200 with the finished job")
        return {key: answer.get(key) for key in ("job_id", "accuracy", "metrics", "tracking")}
    if response.status_code != 202:
        raise DemoError(f"training did not succeed: HTTP {response.status_code} {json.dumps(answer)[:500]}")
    print("== the service answered HTTP 202 (the job outlived MAX_WAIT); following it on GET /jobs/<id>")
    view = follow_job(base, answer["job_id"], options.wait_s)
    if view["status"] != "succeeded":
        raise DemoError(f"job {view['job_id']} ended {view['status']}: {json.dumps(view.get('error'))}")
    result = view["result"]
    return {"job_id": view["job_id"]} | {key: result.get(key) for key in ("accuracy", "metrics", "tracking")}


def follow_job(base: str, job_id: str, wait_s: float) -> dict:
    """Poll the job's view until it ends, printing its progress; its final view."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        view = requests.get(f"{base}/jobs/{job_id}", timeout=10).json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            return view
        progress = view.get("progress") or {}
        if progress:
            step = f"{progress['step']}/{progress['total_steps']}"
            print(f"   epoch {progress['epoch']}/{progress['epochs']}, step {step}")
        time.sleep(10)
    raise DemoError(f"job {job_id} had not ended after {wait_s:.0f} s; see GET {base}/jobs/{job_id}")


def describe_result(result: dict) -> str:
    metrics = result["metrics"]
    line = f"== job {result['job_id']} succeeded: val accuracy {result['accuracy']:.4f}"
    line += f" against {metrics['majority_baseline']:.4f} for always answering the majority class"
    if not metrics.get("learned", True):
        line += "\n   WARNING: the model learned nothing (400 rows are too few to learn BoolQ; `make demo-full` learns)"
    return line + "\n" + describe_tracking(result.get("tracking") or {})


def describe_tracking(tracking: dict) -> str:
    """Where the run went (MLflow run and registered version), and every tracking error: the default path tracks."""
    mlflow = tracking.get("mlflow") or {}
    line = f"== tracked in MLflow: run {mlflow.get('mlflow_run_id')}"
    if mlflow.get("model_version"):
        line += f", registered as {mlflow['model_name']} version {mlflow['model_version']}"
    errors = tracking.get("errors") or {}
    return line + "".join(f"\n   WARNING: tracking with {name} failed: {error}" for name, error in errors.items())


def ask_one_pair(base: str) -> dict:
    print(f'== curl -X POST {base}/predict -d \'{{"text": "{TEXT}", "text_pair": "..."}}\'')
    response = requests.post(f"{base}/predict", json={"text": TEXT, "text_pair": TEXT_PAIR}, timeout=60)
    if response.status_code != 200:
        raise DemoError(f"/predict answered HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


def describe_answer(answer: dict) -> str:
    return f"== {TEXT}? {answer['label']} (score {answer['score']:.2f}, model {answer['model']})"


def stop_stack(stack: subprocess.Popen) -> None:
    if stack.poll() is None:
        stack.send_signal(signal.SIGTERM)
        try:
            stack.wait(STACK_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
            stack.wait()


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
