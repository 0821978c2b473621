"""Experiment tracking with real backends: a local MLflow store, Neptune offline files, trackers that fail.

Training runs are tiny (minilm, 24 rows, 32 tokens, 2 epochs = 6 steps) and there are only three of them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.config import Settings
from app.engine.model_names import ModelNotAvailable
from app.engine.training import train_and_evaluate
from app.params import TrainParams
from app.tracking import CompositeTracker, NullTracker, TrackingFailed, make_tracker, parse_tracker_names

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(model="minilm", batch_size=8, lr=1e-4, epochs=2, max_length=32, train_limit=24, eval_limit=8, seed=7)
TINY_STEPS = 6  # 21 train rows (3 go to dev) / batch 8 = 3 steps per epoch, 2 epochs
TRACKING_ENV = ("TRACKER", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "REGISTERED_MODEL_NAME", "ARTIFACTS_DIR")


def settings_for(artifacts_dir: Path, tracker: str, **fields) -> Settings:
    return Settings().model_copy(update=dict(artifacts_dir=artifacts_dir, tracker=tracker, **fields))


def clean_env(**extra: str) -> dict:
    """This process's environment without tracking settings, so a developer's TRACKER cannot leak in."""
    env = {k: v for k, v in os.environ.items() if k not in TRACKING_ENV and not k.startswith("NEPTUNE_")}
    return env | {"HF_HUB_OFFLINE": "1"} | extra


def closed_port() -> int:
    """A local port with nothing listening (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_store_uri(artifacts_dir: Path) -> str:
    return f"sqlite:///{(artifacts_dir / '.mlflow' / 'mlflow.db').resolve()}"


def mlflow_client(artifacts_dir: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=local_store_uri(artifacts_dir), registry_uri=local_store_uri(artifacts_dir))


# --- choosing trackers ------------------------------------------------------------------------------------


def test_tracker_names_are_parsed_case_and_space_insensitive():
    assert parse_tracker_names("mlflow") == ("mlflow",)
    assert parse_tracker_names(" MLflow , neptune,mlflow") == ("mlflow", "neptune")
    assert parse_tracker_names("none") == ()


@pytest.mark.parametrize("value", ["wandb", "mlflow,wandb", "", " , "])
def test_unknown_tracker_names_the_field_and_allowed_values(value):
    with pytest.raises(ValueError) as info:
        parse_tracker_names(value)
    assert "TRACKER" in str(info.value) and "mlflow, neptune, none" in str(info.value)


def test_make_tracker_builds_the_named_backends(tmp_path):
    assert isinstance(make_tracker(settings_for(tmp_path, "none")), NullTracker)
    tracker = make_tracker(settings_for(tmp_path, "mlflow,neptune"))
    assert isinstance(tracker, CompositeTracker) and tracker.names == ("mlflow", "neptune")


def test_cli_rejects_unknown_tracker_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "app", "train", "--model", "minilm", "--tracker", "wandb"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tracker" in lines[0] and "mlflow, neptune, none" in lines[0]


# --- MLflow: one CLI run into a fresh local store, read back with MlflowClient -------------------------------


@pytest.fixture(scope="module")
def mlflow_cli_run(tmp_path_factory):
    """``python -m app train --tracker mlflow --json`` with the default local store under --output-dir."""
    out = tmp_path_factory.mktemp("mlflow-cli")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "app", "train", *args, "--output-dir", str(out), "--tracker", "mlflow", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), out  # stdout is exactly one JSON object, no tracker chatter


def test_cli_json_carries_the_mlflow_references(mlflow_cli_run):
    result, out = mlflow_cli_run
    tracking = result["tracking"]
    assert tracking["errors"] == {}
    refs = tracking["mlflow"]
    assert refs["tracking_uri"] == local_store_uri(out)
    assert refs["mlflow_run_id"] and refs["experiment_id"]
    assert refs["model_name"] == "boolq-bert" and refs["model_version"] == "1"
    assert refs["model_uri"] == "models:/boolq-bert/1"


def test_mlflow_run_has_params_status_and_local_artifact_folder(mlflow_cli_run):
    result, out = mlflow_cli_run
    client = mlflow_client(out)
    run = client.get_run(result["tracking"]["mlflow"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"minilm-lr1e-04-ep{TINY['epochs']}-ml{TINY['max_length']}-{result['run_id'][-6:]}"
    assert run.data.tags["boolq.run_id"] == result["run_id"]
    assert run.data.params["lr"] == "0.0001" and run.data.params["model"] == "minilm"
    assert run.data.params["train_limit"] == "24"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "boolq"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    assert experiment.artifact_location == (out / ".mlflow" / "artifacts").resolve().as_uri()


def test_mlflow_metric_history_has_loss_per_step_and_dev_accuracy_per_epoch(mlflow_cli_run):
    result, out = mlflow_cli_run
    client = mlflow_client(out)
    run_id = result["tracking"]["mlflow"]["mlflow_run_id"]
    loss = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(1, TINY_STEPS + 1))
    assert [m.value for m in loss] == pytest.approx(result["metrics"]["loss_curve"])
    dev = sorted(client.get_metric_history(run_id, "dev_accuracy"), key=lambda m: m.step)
    assert [m.step for m in dev] == [TINY_STEPS // 2, TINY_STEPS]
    assert [m.value for m in dev] == pytest.approx(result["metrics"]["dev_accuracy_per_epoch"])
    final = client.get_run(run_id).data.metrics
    assert final["accuracy"] == pytest.approx(result["accuracy"])
    assert final["f1"] == pytest.approx(result["metrics"]["f1"])


def test_mlflow_run_logs_the_data_splits_as_inputs_with_digests(mlflow_cli_run):
    from app.config import SAMPLE_DATA_DIR
    from app.engine.boolq import load_boolq
    from app.engine.data import digest

    result, out = mlflow_cli_run
    run = mlflow_client(out).get_run(result["tracking"]["mlflow"]["mlflow_run_id"])
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "dev", "validation"}
    val = load_boolq(SAMPLE_DATA_DIR).val[: TINY["eval_limit"]]
    assert inputs["validation"].digest == digest(val) and inputs["validation"].name == "boolq-validation"
    assert json.loads(inputs["validation"].profile) == {"num_rows": TINY["eval_limit"]}


def test_mlflow_artifacts_hold_predictions_metrics_and_confusion_matrix_without_a_second_model_copy(
    mlflow_cli_run, tmp_path
):
    result, out = mlflow_cli_run
    client = mlflow_client(out)
    run_id = result["tracking"]["mlflow"]["mlflow_run_id"]
    assert {a.path for a in client.list_artifacts(run_id)} == {
        "predictions.jsonl",
        "params.json",
        "metrics.json",
        "confusion_matrix.json",
        "per_class_metrics.json",
    }
    weights = list(out.rglob("model.safetensors"))
    assert [w.parent.parent.name for w in weights] == [result["run_id"]], weights  # one copy: the run folder's
    matrix = json.loads(Path(client.download_artifacts(run_id, "confusion_matrix.json", str(tmp_path))).read_text())
    assert matrix["matrix"] == result["metrics"]["confusion_matrix"] and matrix["labels"] == ["no", "yes"]
    predictions = Path(client.download_artifacts(run_id, "predictions.jsonl", str(tmp_path))).read_text()
    assert [json.loads(line)["prediction"] for line in predictions.splitlines()] == result["predictions"]


def test_registered_model_version_has_metric_tags_and_loads_for_prediction(mlflow_cli_run, tmp_path, monkeypatch):
    from mlflow.artifacts import download_artifacts

    from app.service.predict import Predictor

    result, out = mlflow_cli_run
    client = mlflow_client(out)
    version = client.get_model_version("boolq-bert", "1")
    assert version.run_id == result["tracking"]["mlflow"]["mlflow_run_id"]
    assert version.source == (Path(result["run_dir"]) / "model").resolve().as_uri()
    assert float(version.tags["accuracy"]) == pytest.approx(result["accuracy"])
    assert {"precision", "recall", "f1"} <= set(version.tags)
    # MLflow resolves models:/ URIs against the process-wide registry (it ignores registry_uri=), i.e. the env.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_store_uri(out))
    model_dir = download_artifacts("models:/boolq-bert/1", dst_path=str(tmp_path))
    (answer,) = Predictor(model_dir).predict([("is the sky blue", "The sky is blue on a clear day.")])
    assert answer.to_dict()["label"] in ("no", "yes") and 0.5 <= answer.to_dict()["score"] <= 1.0


def test_crashed_training_is_recorded_as_failed_in_mlflow(tmp_path):
    tracker = make_tracker(settings_for(tmp_path, "mlflow"))
    params = TrainParams(**(TINY | {"model": str(tmp_path / "no-such-model")}))
    with pytest.raises(ModelNotAvailable):
        train_and_evaluate(params, Settings().data_dir, tmp_path, run_id="crashes", tracker=tracker)
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs(experiment_ids=[client.get_experiment_by_name("boolq").experiment_id])
    assert run.info.run_name.endswith("-rashes") and run.info.status == "FAILED"


CONCURRENT_WORKER = """
import json, sys
from dataclasses import replace
from pathlib import Path
from app.config import Settings
from app.tracking import make_tracker
store, name = Path(sys.argv[1]), sys.argv[2]
tracker = make_tracker(Settings().model_copy(update=dict(artifacts_dir=store, tracker="mlflow")))
tracker.start_run(name, {"worker": name})
for step in range(1, 201):
    tracker.log_metrics({"train_loss": 1.0 / step}, step=step)
model = store / name
model.mkdir()
(model / "config.json").write_text("{}")
tracker.register_model(model, {"accuracy": 0.5})
print(json.dumps(tracker.end_run("FINISHED")))
"""


@pytest.mark.slow
def test_worker_processes_share_one_sqlite_store(tmp_path):
    """RQ workers start together against a fresh store: schema creation and writes must not collide."""
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WORKER, str(tmp_path), f"worker-{i}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        for i in range(3)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["errors"] for r in results] == [{}, {}, {}]
    assert sorted(r["mlflow"]["model_version"] for r in results) == ["1", "2", "3"]
    client = mlflow_client(tmp_path)
    for r in results:
        assert len(client.get_metric_history(r["mlflow"]["mlflow_run_id"], "train_loss")) == 200


# --- Neptune offline ------------------------------------------------------------------------------------------


def read_offline_operations(neptune_dir: Path) -> tuple[str, list]:
    """The run's queued operations, read the way ``neptune sync`` reads them (its collector and disk queue)."""
    from neptune.cli.collect import collect_offline_containers
    from neptune.core.components.queue.disk_queue import DiskQueue
    from neptune.internal.operation import Operation

    (container,) = collect_offline_containers(path=neptune_dir)
    (execution_dir,) = container.execution_dirs
    queue = DiskQueue(
        data_path=execution_dir.path,
        to_dict=lambda op: op.to_dict(),
        from_dict=Operation.from_dict,
        lock=threading.RLock(),
    )
    with queue:
        operations = [element.obj for element in queue.get_batch(100_000)]
    return str(container.container_id), [op.to_dict() for op in operations]


@pytest.fixture(scope="module")
def neptune_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("neptune")
    tracker = make_tracker(settings_for(out, "neptune"))
    result = train_and_evaluate(TrainParams(**TINY), Settings().data_dir, out, tracker=tracker)
    return result, out


def test_neptune_offline_run_is_reported_with_its_folder(neptune_run):
    result, out = neptune_run
    refs = result.tracking["neptune"]
    assert result.tracking["errors"] == {}
    assert refs["mode"] == "offline" and refs["neptune_run_id"].startswith("offline/")
    assert Path(refs["offline_dir"]).parent == (out / ".neptune" / "offline").resolve()
    assert refs["model_version"] is None and "model path" in refs["note"]
    assert refs["model_path"] == str((Path(result.run_dir) / "model").resolve())


def test_neptune_offline_files_hold_params_and_metrics(neptune_run):
    result, out = neptune_run
    container_id, ops = read_offline_operations(out / ".neptune")
    assert result.tracking["neptune"]["neptune_run_id"] == f"offline/{container_id}"
    assigned = {"/".join(op["path"]): op.get("value") for op in ops if op["type"].startswith("Assign")}
    assert assigned["parameters/lr"] == 1e-4 and assigned["parameters/model"] == "minilm"
    assert assigned["parameters/batch_size"] == 8 and assigned["sys/name"] == result.run_id
    assert assigned["metrics/accuracy"] == pytest.approx(result.accuracy)
    assert assigned["model/path"] == result.tracking["neptune"]["model_path"]
    assert assigned["status"] == "FINISHED"

    def series(name):
        points = [
            v for op in ops if op["type"] == "LogFloats" and op["path"] == ["metrics", name] for v in op["values"]
        ]
        return [p["step"] for p in points], [p["value"] for p in points]

    steps, losses = series("train_loss")
    assert steps == list(range(1, TINY_STEPS + 1)) and losses == pytest.approx(result.metrics["loss_curve"])
    steps, accuracies = series("dev_accuracy")
    assert steps == [TINY_STEPS // 2, TINY_STEPS]
    assert accuracies == pytest.approx(result.metrics["dev_accuracy_per_epoch"])


def test_neptune_offline_run_keeps_copies_of_its_artifacts(neptune_run):
    result, _ = neptune_run
    upload_dir = Path(result.tracking["neptune"]["offline_dir"]) / "upload_path"
    files = {p.name.split("-")[0]: p for p in upload_dir.iterdir()}
    assert set(files) == {
        "artifacts_predictions_jsonl",
        "artifacts_params_json",
        "artifacts_metrics_json",
        "artifacts_confusion_matrix_json",
        "artifacts_per_class_metrics_json",
    }
    assert (
        json.loads(files["artifacts_confusion_matrix_json"].read_text())["matrix"]
        == (result.metrics["confusion_matrix"])
    )
    assert len(files["artifacts_predictions_jsonl"].read_text().splitlines()) == result.n_eval


def test_neptune_sync_cli_starts():
    """``neptune sync`` imports pkg_resources: it breaks when setuptools>=81 sneaks in."""
    neptune_cli = Path(sys.executable).parent / "neptune"
    proc = subprocess.run([str(neptune_cli), "sync", "--help"], capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--offline-only" in proc.stdout


# --- failures: contained, except for the tracking server that models travel through ----------------------------


@pytest.mark.slow
def test_unreachable_mlflow_server_fails_the_run_before_training_with_the_cause_and_no_password(
    tmp_path, monkeypatch, caplog
):
    """With a tracking server, models reach the other hosts only through it: its failure fails the run at once,
    and the run folder holds no model anyone could serve."""
    uri = f"http://trainer:s3cret-pw@127.0.0.1:{closed_port()}"
    # No retries and a short timeout, so the unreachable server costs a second, not MLflow's default minutes.
    settings = settings_for(tmp_path, "mlflow,neptune", mlflow_tracking_uri=uri, mlflow_http_retries=0)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # MLflow's defaults (minutes): the settings replace them
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    tracker = make_tracker(settings)
    params = TrainParams(**(TINY | {"epochs": 1}))
    started = time.monotonic()
    with pytest.raises(TrackingFailed) as failed:
        train_and_evaluate(params, Settings().data_dir, tmp_path, run_id="no-server", tracker=tracker)
    assert time.monotonic() - started < 30

    message = str(failed.value)
    assert message.startswith("the mlflow tracking server failed") and "MlflowException" in message
    assert "127.0.0.1" in message and "s3cret-pw" not in message and "s3cret-pw" not in caplog.text
    run_dir = tmp_path / "no-server"
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model").exists()


class UploadBreaks(NullTracker):
    """A tracking server that accepts the run and its metrics, then breaks while the model is uploaded."""

    def log_model(self, model_dir: Path) -> None:
        raise ConnectionError("connection reset while uploading model.safetensors")

    def references(self) -> dict:
        return {}

    def close(self) -> None:
        pass


@pytest.mark.slow
def test_a_model_upload_that_fails_leaves_an_unfinished_run_folder_that_nothing_serves(tmp_path):
    from app.engine.run_folder import checkpoint_folder, is_finished

    tracker = CompositeTracker({"mlflow": UploadBreaks}, required=("mlflow",))
    with pytest.raises(TrackingFailed, match="connection reset while uploading"):
        # A service job's run: it saves its training state at epoch ends.
        train_and_evaluate(
            TrainParams(**TINY), Settings().data_dir, tmp_path, run_id="upload-breaks", tracker=tracker,
            checkpoint_every_s=0,
        )  # fmt: skip
    run_dir = tmp_path / "upload-breaks"
    assert (run_dir / "model" / "config.json").is_file()  # written before the upload broke...
    assert not is_finished(run_dir) and checkpoint_folder(run_dir) is None  # ...but never taken for a model
    assert (run_dir / "training_state.pt").is_file()  # a retry resumes from the last epoch's checkpoint


@pytest.mark.slow
def test_bad_neptune_token_is_reported_without_the_token(tmp_path, caplog):
    token = "not-a-real-token-4f1d2c"
    settings = settings_for(tmp_path, "neptune", neptune_project="ws/boolq", neptune_api_token=token)
    tracker = make_tracker(settings)
    with caplog.at_level(logging.WARNING, logger="app.tracking"):
        tracker.start_run("bad-token", {"lr": 1e-4})
        tracker.log_metrics({"train_loss": 0.7}, step=1)
        tracking = tracker.end_run("FINISHED")
    assert tracking["neptune"]["mode"] == "async"
    assert tracking["errors"]["neptune"].startswith("NeptuneInvalidApiTokenException")
    assert token not in json.dumps(tracking) and token not in caplog.text
    assert token not in repr(settings)


# --- jobs: the worker's result and GET /jobs/<id> carry the same tracking object --------------------------------


def test_training_job_reports_tracking_references(redis_url, launcher, tmp_path):
    from app.api import create_app
    from tests.helpers import TINY_JOB, service_settings, wait_for

    settings = service_settings(redis_url, tmp_path, tracker="mlflow,neptune")
    launcher.worker(settings)
    client = create_app(settings).test_client()
    job_id = client.post("/train", json=TINY_JOB).get_json()["job_id"]

    def ended():
        view = client.get(f"/jobs/{job_id}").get_json()
        return view if view["status"] in ("succeeded", "failed", "cancelled") else None

    view = wait_for(ended, 300, f"job {job_id} to end", interval_s=0.5)
    assert view["status"] == "succeeded", view["error"]
    tracking = view["result"]["tracking"]
    assert tracking["errors"] == {}
    assert tracking["mlflow"]["model_version"] == "1" and tracking["mlflow"]["mlflow_run_id"]
    assert tracking["neptune"]["neptune_run_id"].startswith("offline/")
    run = mlflow_client(settings.artifacts_dir).get_run(tracking["mlflow"]["mlflow_run_id"])
    assert run.data.tags["boolq.run_id"] == job_id and run.info.status == "FINISHED"
