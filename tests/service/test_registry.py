"""The registry over HTTP: versions with their tags, promotion to champion (the val-accuracy rule and force),
and `/predict` serving the champion from two gunicorn replicas, switching within seconds without a restart.
Real Redis, a real worker, real MLflow (SQLite) and real tiny training."""

from __future__ import annotations

import pytest
import requests

from app.api import create_app
from tests.helpers import TINY_JOB, service_settings, wait_for

QUESTION = {"question": "is the sky blue", "passage": "The sky is blue by day."}


@pytest.fixture(scope="module")
def settings(redis_url, tmp_path_factory):
    return service_settings(redis_url, tmp_path_factory.mktemp("registry"), tracker="mlflow")


@pytest.fixture(scope="module")
def client(settings, launcher):
    launcher.worker(settings)
    return create_app(settings).test_client()


@pytest.fixture(scope="module")
def trained(client):
    """Two registered jobs and one that asked not to be registered, in that order."""
    bodies = [TINY_JOB, TINY_JOB | {"seed": 8}, TINY_JOB | {"register": False}]
    ids = []
    for body in bodies:
        response = client.post("/train?wait=true&timeout=300", json=body)
        assert response.status_code == 200 and response.get_json()["status"] == "succeeded", response.get_json()
        ids.append(response.get_json()["job_id"])
    return ids


@pytest.fixture(scope="module")
def replicas(launcher, settings, trained):
    return [launcher.server(settings, workers=1) for _ in range(2)]


def predict(url: str, **body) -> str:
    response = requests.post(f"{url}/predict", json=QUESTION | body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["model"]


def test_models_lists_registered_versions_with_job_id_params_and_metrics(client, trained):
    listing = client.get("/models").get_json()
    assert listing["registered_model"] == "boolq-bert" and listing["champion"] is None
    versions = {m["job_id"]: m for m in listing["models"]}
    assert set(versions) == set(trained[:2])  # register: false made no version
    first = versions[trained[0]]
    assert first["params"]["train_limit"] == TINY_JOB["train_limit"] and first["params"]["register"] is True
    assert 0 <= first["dev_accuracy"] <= 1 and 0 <= first["val_accuracy"] <= 1
    assert first["metrics"]["accuracy"] == first["val_accuracy"] and first["created_at"]
    assert [m["version"] for m in listing["models"]] == [2, 1]  # newest first


def test_promoting_needs_a_registered_version_and_one_name(client, trained):
    unregistered = client.post("/models/champion", json={"job_id": trained[2]})
    assert unregistered.status_code == 404 and "no registered version" in unregistered.get_json()["error"]["message"]
    assert client.post("/models/champion", json={"version": 99}).status_code == 404
    both = client.post("/models/champion", json={"version": 1, "job_id": trained[0]})
    assert both.status_code == 422 and "exactly one" in both.get_json()["error"]["message"]
    assert client.post("/models/champion", json={"version": "1"}).status_code == 422


def test_predict_serves_the_latest_job_until_a_champion_is_promoted_then_the_champion(
    client, trained, replicas, settings
):
    first, second = replicas
    assert predict(first) == trained[2]  # no champion yet: the latest succeeded job, as before
    response = requests.post(f"{first}/predict", json=QUESTION | {"model": "champion"}, timeout=60)
    assert response.status_code == 404

    promoted = requests.post(f"{first}/models/champion", json={"job_id": trained[0]}, timeout=60)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["champion"]["version"] == 1 and promoted.json()["champion"]["champion"] is True
    assert predict(second) == trained[0]  # the other replica, at once
    assert predict(second, model="champion") == trained[0]
    assert predict(second, model=trained[1]) == trained[1]  # a job id still names that job's model

    listing = requests.get(f"{second}/models", timeout=60).json()
    assert listing["champion"]["job_id"] == trained[0]
    assert [m["version"] for m in listing["models"] if m["champion"]] == [1]


def test_a_version_with_lower_val_accuracy_needs_force_and_replicas_switch_within_seconds(
    client, trained, replicas, settings
):
    from mlflow import MlflowClient

    from app.tracking.mlflow_tracker import local_store

    first, second = replicas
    assert client.post("/models/champion", json={"version": 1}).status_code == 200
    champion = client.get("/models").get_json()["champion"]
    # Arrange a challenger that is worse on val than the champion (tiny runs often tie).
    uri, _ = local_store(settings.artifacts_dir)
    lower = str(champion["val_accuracy"] - 0.1)
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_model_version_tag("boolq-bert", "2", "val_accuracy", lower)

    refused = requests.post(f"{first}/models/champion", json={"version": 2}, timeout=60)
    assert refused.status_code == 409 and "force" in refused.json()["error"]["fields"]
    assert predict(second) == trained[0]
    forced = requests.post(f"{first}/models/champion", json={"version": 2, "force": True}, timeout=60)
    assert forced.status_code == 200, forced.text
    wait_for(lambda: predict(second) == trained[1], 5, "the other replica to serve the new champion")
    assert client.get("/models").get_json()["champion"]["version"] == 2
