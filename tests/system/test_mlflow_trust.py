"""Whoever reaches the MLflow server does not choose what the service serves (issue 28): a real ``mlflow server``,
Redis, a worker that trains and a gunicorn replica that has none of its files. The outsider tampers only through
MLflow's client, as anyone on its port could: newer runs tagged with a real job id, a moved ``champion`` alias,
files written over a worker's own run. Model downloads are bounded in size, in config dimensions and in time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from redis import Redis

from app.config import Settings
from app.engine import run_folder
from app.service import model_records, model_store
from app.service.registry import champion_key, read_champion_pointer
from app.tracking.mlflow_tracker import RUN_ID_TAG
from tests.helpers import TINY_JOB, service_settings, wait_for

pytestmark = pytest.mark.slow

QUESTION = "is the sky blue on a clear day"
PASSAGE = "On a clear day the sky looks blue because air scatters blue light more than red light."
# The worker's MLflow client should fail a dead server in seconds, not retry it for minutes.
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@dataclass
class Service:
    url: str  # replica C: no run folders, an empty model cache
    mlflow_url: str
    mlflow: object  # the server's process
    worker: Settings  # host A, which trains
    replica: Settings
    job_id: str  # a tiny job A trained, published and recorded
    launcher: object

    @property
    def trained(self) -> Path:
        return self.worker.artifacts_dir / self.job_id

    def outsider(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_url, registry_uri=self.mlflow_url)

    def host(self, folder: Path, **overrides) -> Settings:
        """Another host's settings: its own run folders and an empty model cache."""
        folders = {"artifacts_dir": folder / "runs", "model_cache_dir": folder / "model-cache"}
        return self.replica.model_copy(update=folders | overrides)

    def predict(self, **body) -> requests.Response:
        return requests.post(f"{self.url}/predict", json={"question": QUESTION, "passage": PASSAGE} | body, timeout=120)


@pytest.fixture(scope="module")
def service(mlflow_server, redis_url, launcher, tmp_path_factory):
    url, process, wait_until_answering = mlflow_server.url, mlflow_server.process, mlflow_server.wait_until_answering
    common = service_settings(redis_url, tmp_path_factory.mktemp("common"), tracker="mlflow", mlflow_tracking_uri=url)
    hosts = {}
    for name in "AC":
        folder = tmp_path_factory.mktemp(f"host-{name}")
        hosts[name] = common.model_copy(
            update={"artifacts_dir": folder / "runs", "model_cache_dir": folder / "model-cache"}
        )
    env = MLFLOW_CLIENT_ENV | {"HF_HOME": str(tmp_path_factory.mktemp("hf-home"))}
    api = launcher.server(hosts["C"], workers=1, env=env)
    launcher.worker(hosts["A"], env)
    wait_until_answering()
    answer = requests.post(f"{api}/train", json=TINY_JOB, timeout=30)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]

    def ended():
        view = requests.get(f"{api}/jobs/{job_id}", timeout=30).json()
        return view if view["status"] in ("succeeded", "failed", "cancelled") else None

    view = wait_for(ended, 300, f"job {job_id} to end", 0.5)
    assert view["status"] == "succeeded", view["error"]
    return Service(api, url, process, hosts["A"], hosts["C"], job_id, launcher)


def always_yes_copy(run_dir: Path, folder: Path) -> Path:
    """A copy of a run folder whose classifier answers yes to anything, with predictions that say so."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run_dir, folder)
    weights = folder / run_folder.MODEL / "model.safetensors"
    tensors = load_file(weights)
    tensors["classifier.weight"].zero_()
    tensors["classifier.bias"].copy_(tensors["classifier.bias"].new_tensor([-20.0, 20.0]))
    save_file(tensors, weights, metadata={"format": "pt"})
    rows = [json.loads(line) for line in (folder / run_folder.PREDICTIONS).read_text().splitlines()]
    lines = [json.dumps(row | {"prediction": 1, "probability": 1.0}) + "\n" for row in rows]
    (folder / run_folder.PREDICTIONS).write_text("".join(lines))
    return folder


def upload_finished_run(client, experiment_name: str, folder: Path, job_id: str) -> str:
    """A FINISHED run tagged with ``job_id`` holding ``folder``'s files, as a worker's upload looks."""
    experiment = client.get_experiment_by_name(experiment_name)
    run_id = client.create_run(experiment.experiment_id, tags={RUN_ID_TAG: job_id}).info.run_id
    for name in (run_folder.PARAMS, run_folder.METRICS, run_folder.PREDICTIONS):
        client.log_artifact(run_id, str(folder / name))
    client.log_artifacts(run_id, str(folder / run_folder.MODEL), run_folder.MODEL)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def published(service: Service) -> model_records.PublishedModel:
    return model_records.read_published(Redis.from_url(service.worker.redis_url), service.worker, service.job_id)


def test_a_newer_finished_run_tagged_with_a_job_id_is_neither_served_nor_its_predictions_returned(service, tmp_path):
    from app.service.predict import load_predictor

    fake = always_yes_copy(service.trained, tmp_path / "fake")
    upload_finished_run(service.outsider(), service.worker.mlflow_experiment_name, fake, service.job_id)

    answer = requests.get(f"{service.url}/jobs/{service.job_id}/predictions", timeout=60)
    assert answer.status_code == 200, answer.text
    written = [json.loads(line) for line in (service.trained / run_folder.PREDICTIONS).read_text().splitlines()]
    assert answer.json()["predictions"] == written
    served = service.predict(model=service.job_id)
    assert served.status_code == 200, served.text
    (on_a,) = load_predictor(service.trained).predict([(QUESTION, PASSAGE)])
    assert served.json()["probability"] == pytest.approx(on_a.to_yes_no()["probability"], abs=1e-6)
    cached = service.replica.model_cache_dir / service.job_id
    assert (cached / model_store.VERIFIED).read_text() == published(service).digest


def test_a_checkpoint_planted_in_a_run_tagged_with_the_job_id_or_over_the_recorded_one_is_not_resumed(
    service, tmp_path
):
    job_id = "retried-job"
    client = service.outsider()
    experiment = client.get_experiment_by_name(service.worker.mlflow_experiment_name).experiment_id
    state = tmp_path / "worker" / run_folder.TRAINING_STATE
    state.parent.mkdir()
    state.write_bytes(b"the worker's training state" * 1000)
    # The worker's attempt: its run, its upload, its record in Redis (what PublishingTracker does for a job).
    attempt = client.create_run(experiment, tags={RUN_ID_TAG: job_id}).info.run_id
    client.log_artifact(attempt, str(state), "checkpoint")
    model_records.record_checkpoint(Redis.from_url(service.worker.redis_url), service.worker, job_id, attempt, state)
    # The outsider's newer run with the same tag and a checkpoint of its own.
    planted = tmp_path / "outsider" / run_folder.TRAINING_STATE
    planted.parent.mkdir()
    planted.write_bytes(b"planted weights" * 1000)
    newer = client.create_run(experiment, tags={RUN_ID_TAG: job_id}).info.run_id
    client.log_artifact(newer, str(planted), "checkpoint")

    settings = service.host(tmp_path)
    run_dir = settings.artifacts_dir / job_id
    assert model_store.fetch_checkpoint(job_id, run_dir, settings)
    assert run_folder.training_state(run_dir).read_bytes() == state.read_bytes()

    shutil.rmtree(run_dir)
    same_size = tmp_path / "same-size" / run_folder.TRAINING_STATE
    same_size.parent.mkdir()
    same_size.write_bytes(b"X" * state.stat().st_size)
    client.log_artifact(attempt, str(same_size), "checkpoint")  # written over the worker's own upload
    assert not model_store.fetch_checkpoint(job_id, run_dir, settings)
    assert not run_folder.training_state(run_dir).exists()


def test_a_champion_alias_moved_in_mlflow_is_reported_and_never_served(service, tmp_path):
    promoted = requests.post(
        f"{service.url}/models/champion", json={"job_id": service.job_id, "force": True}, timeout=60
    )
    assert promoted.status_code == 200, promoted.text
    client = service.outsider()
    fake = always_yes_copy(service.trained, tmp_path / "fake")
    run_id = upload_finished_run(client, service.worker.mlflow_experiment_name, fake, "outsider-job")
    source = f"{client.get_run(run_id).info.artifact_uri}/{run_folder.MODEL}"
    tags = {"job_id": "outsider-job", "val_accuracy": "1.0", "dev_accuracy": "1.0"}
    name = service.worker.registered_model_name
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags).version
    client.set_registered_model_alias(name, "champion", version)

    # A worker's periodic check (it runs one as it starts) meets the moved alias.
    worker = service.launcher.worker(service.worker.model_copy(update={"artifacts_dir": tmp_path / "runs-b"}))
    redis = Redis.from_url(service.worker.redis_url)

    def checked():
        moved = (read_champion_pointer(redis, service.worker) or {}).get("job_id") != service.job_id
        return moved or "which this service does not serve" in worker.log_path.read_text()

    wait_for(checked, 120, "the new worker's periodic check")
    served = service.predict()
    assert served.status_code == 200 and served.json()["model"] == service.job_id, served.text
    listing = requests.get(f"{service.url}/models", timeout=60).json()
    assert listing["champion"]["job_id"] == service.job_id
    assert f"points at version {version} (job outsider-job)" in listing["alias_warning"]
    # The outsider's version claims val accuracy 1.0; a promotion is compared with the served champion, not with it.
    again = requests.post(f"{service.url}/models/champion", json={"job_id": service.job_id}, timeout=60)
    assert again.status_code == 200, again.text
    assert requests.get(f"{service.url}/models", timeout=60).json()["alias_warning"] is None

    redis.delete(champion_key(service.worker))  # Redis lost its pointer: the alias is still no champion
    assert service.predict(model="champion").status_code == 404


def test_a_model_over_model_max_mb_is_refused_before_any_download(service, tmp_path):
    settings = service.host(tmp_path, model_max_mb=1)
    assert published(service).size > 1024 * 1024
    with pytest.raises(model_store.ModelTooLarge, match="MODEL_MAX_MB"):
        model_store.fetched_run_folder(service.job_id, settings)
    assert not settings.model_cache_dir.exists()


def test_a_model_larger_than_the_whole_cache_is_refused_and_the_cached_model_stays(service, tmp_path):
    size_mb = published(service).size // (1024 * 1024)
    settings = service.host(tmp_path, model_cache_max_mb=size_mb)
    kept = settings.model_cache_dir / "kept-job"
    kept.mkdir(parents=True)
    (kept / run_folder.METRICS).write_text("{}")
    (kept / model_store.VERIFIED).write_text("digest")
    with pytest.raises(model_store.ModelTooLarge, match="MODEL_CACHE_MAX_MB"):
        model_store.fetched_run_folder(service.job_id, settings)
    assert kept.is_dir() and not (settings.model_cache_dir / service.job_id).exists()


def test_a_config_asking_for_a_huge_vocabulary_is_refused_before_its_weights_are_read(service, tmp_path):
    job_id = "huge-vocabulary"
    folder = shutil.copytree(service.trained, tmp_path / job_id)
    config = folder / run_folder.MODEL / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"vocab_size": 2_000_000}))
    run_id = upload_finished_run(service.outsider(), service.worker.mlflow_experiment_name, folder, job_id)
    redis = Redis.from_url(service.worker.redis_url)
    model_records.record_published(redis, service.worker, job_id, run_id, folder)  # as its worker would

    settings = service.host(tmp_path)
    with pytest.raises(model_store.ModelTooLarge, match="vocab_size is 2000000"):
        model_store.fetched_run_folder(job_id, settings)
    assert [p.name for p in settings.model_cache_dir.iterdir()] == [model_store.LOCK_FILE]


def test_a_fetch_from_a_hung_server_gives_up_at_its_deadline(service, tmp_path):
    settings = service.host(tmp_path, model_fetch_timeout_s=3)
    outcome = []

    def fetch():
        try:
            outcome.append(model_store.fetched_run_folder(service.job_id, settings))
        except Exception as exc:
            outcome.append(exc)

    os.killpg(service.mlflow.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        started = time.monotonic()
        thread = threading.Thread(target=fetch, daemon=True)
        thread.start()
        thread.join(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        os.killpg(service.mlflow.pid, signal.SIGCONT)
    assert not thread.is_alive(), "the fetch was still waiting for the server after 30 s"
    assert isinstance(outcome[0], model_store.ModelStoreUnavailable) and elapsed < 10, (outcome, elapsed)


def test_a_file_written_over_the_workers_own_run_is_refused(service, tmp_path):
    run = published(service).mlflow_run_id
    weights = service.trained / run_folder.MODEL / "model.safetensors"
    forged = tmp_path / "model.safetensors"
    forged.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    service.outsider().log_artifact(run, str(forged), run_folder.MODEL)

    with pytest.raises(model_store.ModelRefused, match="model.safetensors .* not the file its worker recorded"):
        model_store.fetched_run_folder(service.job_id, service.host(tmp_path))
    shutil.rmtree(service.replica.model_cache_dir / service.job_id)  # the replica's cache lost it: fetched again
    served = service.predict(model=service.job_id)
    assert served.status_code == 409 and served.json()["error"]["code"] == "model_refused", served.text


def test_a_file_grown_on_the_server_is_cut_off_at_its_recorded_size(service, tmp_path):
    run = published(service).mlflow_run_id
    recorded = next(f.size for f in published(service).files if f.path.endswith("model.safetensors"))
    grown = tmp_path / "model.safetensors"
    with open(grown, "wb") as file:
        file.truncate(recorded + 64 * 1024 * 1024)  # 64 MiB more than its worker recorded
    service.outsider().log_artifact(run, str(grown), run_folder.MODEL)

    settings = service.host(tmp_path)
    with pytest.raises(model_store.ModelRefused, match="larger than .* the size its worker recorded"):
        model_store.fetched_run_folder(service.job_id, settings)
    assert [p.name for p in settings.model_cache_dir.iterdir()] == [model_store.LOCK_FILE]
