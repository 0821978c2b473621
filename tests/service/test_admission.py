"""Admission control: the queue and each client have a cap (429), a job has a compute budget (422), and
whatever is knowable at submit is refused at submit (422, never a 500, never a job that fails later).

Jobs go to queues no worker listens on, so they stay queued; a real Redis counts them.
"""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest

from app.api import create_app
from app.params import TrainParams
from tests.helpers import TINY_JOB, service_settings


def client_for(redis_url, tmp_path, **overrides):
    return create_app(service_settings(redis_url, tmp_path, **overrides)).test_client()


def submit(client, address="10.0.0.1", **fields):
    return client.post("/train", json=TINY_JOB | fields, headers={"X-Forwarded-For": address})


def error_of(response) -> dict:
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "fields"}, body
    return body["error"]


def test_a_full_queue_answers_429_with_retry_after_and_loses_no_accepted_job(redis_url, tmp_path):
    client = client_for(redis_url, tmp_path, max_queued_jobs=5, max_jobs_per_client=100)
    answers = [submit(client, address=f"10.0.0.{i}") for i in range(8)]
    assert [a.status_code for a in answers] == [202] * 5 + [429] * 3
    refused = answers[-1]
    assert int(refused.headers["Retry-After"]) > 0 and error_of(refused)["code"] == "too_many_requests"
    assert "MAX_QUEUED_JOBS" in error_of(refused)["message"]
    listed = client.get("/jobs").get_json()
    assert listed["total"] == 5
    assert {j["job_id"] for j in listed["jobs"]} == {a.get_json()["job_id"] for a in answers[:5]}


def test_each_client_has_its_own_cap_and_regains_room_when_a_job_ends(redis_url, tmp_path):
    client = client_for(redis_url, tmp_path, max_jobs_per_client=3)
    first = [submit(client, address="10.0.0.1") for _ in range(3)]
    assert [a.status_code for a in first] == [202] * 3
    over = submit(client, address="10.0.0.1")
    assert over.status_code == 429 and "MAX_JOBS_PER_CLIENT" in error_of(over)["message"]
    assert "Retry-After" in over.headers
    assert submit(client, address="10.0.0.2").status_code == 202  # another client is not held back
    client.post(f"/jobs/{first[0].get_json()['job_id']}/cancel")
    assert submit(client, address="10.0.0.1").status_code == 202


def test_with_keys_the_cap_is_per_key_whatever_the_address_and_api_token_is_one_key(redis_url, tmp_path):
    from redis import Redis

    from app.service.keys import KeyStore

    settings = service_settings(redis_url, tmp_path, api_token="s3cret", max_jobs_per_client=2)
    store = KeyStore(settings, Redis.from_url(redis_url))
    alice, bob = store.create("alice", "trainer"), store.create("bob", "trainer")
    client = create_app(settings).test_client()

    def train(key, address):
        headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": address}
        return client.post("/train", json=TINY_JOB, headers=headers).status_code

    assert [train(alice, f"10.0.0.{i}") for i in range(3)] == [202, 202, 429]  # a new address is no new room
    assert train(bob, "10.0.0.1") == 202  # another key has its own
    assert [train("s3cret", f"10.0.1.{i}") for i in range(3)] == [202, 202, 429]


def test_a_job_over_the_token_budget_is_422_naming_the_fields(redis_url, tmp_path):
    client = client_for(redis_url, tmp_path, max_job_tokens=100_000)
    response = submit(client, epochs=100, max_length=512, train_limit=None)
    error = error_of(response)
    assert response.status_code == 422
    assert {"epochs", "max_length", "train_limit"} <= set(error["fields"])
    assert "MAX_JOB_TOKENS" in error["message"]


def test_the_default_budget_admits_ten_epochs_of_full_boolq_at_512(redis_url, tmp_path):
    from app.service.admission import HUB_TRAIN_ROWS

    client = client_for(redis_url, tmp_path, data_dir="hub")
    assert submit(client, epochs=10, max_length=512, train_limit=None).status_code == 202
    assert submit(client, epochs=11, max_length=512, train_limit=None).status_code == 422
    assert HUB_TRAIN_ROWS == 9427


def test_a_step_over_the_step_token_cap_is_422_naming_batch_size_and_max_length(redis_url, tmp_path):
    """512 × 512 is far within the total budget, yet one step of it asks a worker for gigabytes of activations."""
    response = submit(client_for(redis_url, tmp_path), batch_size=512, max_length=512)
    error = error_of(response)
    assert response.status_code == 422
    assert set(error["fields"]) == {"batch_size", "max_length"}
    assert "262,144 tokens" in error["message"] and "MAX_STEP_TOKENS" in error["message"]


def test_the_default_step_cap_admits_the_defaults_and_the_documented_examples(redis_url, tmp_path):
    client = client_for(redis_url, tmp_path, data_dir="hub", max_jobs_per_client=100)
    defaults = {name: TrainParams.model_fields[name].default for name in ("batch_size", "max_length", "epochs")}
    assert defaults == {"batch_size": 32, "max_length": 256, "epochs": 2}
    examples = [defaults, dict(batch_size=64, max_length=256), dict(epochs=10, max_length=512, batch_size=32)]
    for fields in examples + [dict(batch_size=64, max_length=512), dict(batch_size=128, max_length=256)]:
        assert submit(client, **fields | {"train_limit": None}).status_code == 202, fields
    assert submit(client, batch_size=65, max_length=512).status_code == 422


def test_too_few_rows_to_split_off_a_dev_set_is_422(redis_url, tmp_path):
    response = submit(client_for(redis_url, tmp_path), train_limit=1)
    assert response.status_code == 422 and set(error_of(response)["fields"]) == {"train_limit"}


def test_a_hub_model_that_cannot_load_offline_is_refused_at_submit(redis_url, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    response = submit(client_for(redis_url, tmp_path), model="nobody-here/not-a-cached-model")
    assert response.status_code == 422 and set(error_of(response)["fields"]) == {"model"}
    assert "HF_HUB_OFFLINE" in error_of(response)["message"]


def test_a_hub_model_is_refused_at_submit_when_the_hub_cannot_be_reached(redis_url, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset, but the hub's address answers nothing (a closed local port): 422 in the API's words."""
    from tests.helpers import free_port

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    response = submit(client_for(redis_url, tmp_path), model="nobody-here/not-a-cached-model")
    assert response.status_code == 422 and set(error_of(response)["fields"]) == {"model"}
    message = error_of(response)["message"]
    assert "cannot be reached" in message and "--model" not in message


@pytest.mark.parametrize(
    "model",
    ["a" * 256, "a" * 5000, "runs/" + "b" * 300, "minilm\x00", "bad\nname", "~nosuchuser/x"],
    ids=["256-chars", "5000-chars", "long-component", "nul", "newline", "unknown-home"],
)
@pytest.mark.parametrize("path", ["/train", "/predict"])
def test_overlong_or_malformed_model_names_are_422_never_500(redis_url, tmp_path, model, path):
    client = client_for(redis_url, tmp_path)
    (tmp_path / "runs").mkdir(exist_ok=True)  # the names are resolved against an existing folder
    body = TINY_JOB if path == "/train" else {"question": "q", "passage": "p"}
    response = client.post(path, json=body | {"model": model})
    assert response.status_code == 422 and set(error_of(response)["fields"]) == {"model"}


def test_a_job_names_its_model_as_the_client_did_never_by_server_path(redis_url, tmp_path):
    client = client_for(redis_url, tmp_path)
    run = tmp_path / "runs" / "earlier-run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "params.json").write_text("{}")
    (run / "metrics.json").write_text("{}")
    job_id = submit(client, model="earlier-run").get_json()["job_id"]
    shown = json.dumps(client.get(f"/jobs/{job_id}").get_json()) + json.dumps(client.get("/jobs").get_json())
    assert client.get(f"/jobs/{job_id}").get_json()["params"]["model"] == "earlier-run"
    assert str(tmp_path) not in shown


def test_an_unfinished_run_folder_is_never_taken_for_a_model(redis_url, tmp_path):
    client = client_for(redis_url, tmp_path)
    run = tmp_path / "runs" / "killed-run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "params.json").write_text("{}")  # no metrics.json: the job never finished
    for path, body in (("/predict", {"question": "q", "passage": "p"}), ("/train", TINY_JOB)):
        response = client.post(path, json=body | {"model": "killed-run"})
        assert response.status_code == 422 and set(error_of(response)["fields"]) == {"model"}, path


@pytest.mark.parametrize(
    "body",
    ["[" * 100_000, '{"a":' * 50_000, '{"epochs": 1e999}', '{"lr": NaN}', '{"seed": ' + "9" * 5000 + "}", '"\\ud800"'],
    ids=["deep-array", "deep-object", "huge-float", "nan", "huge-int", "lone-surrogate"],
)
def test_hostile_json_bodies_get_a_4xx_never_a_500(redis_url, tmp_path, body):
    response = client_for(redis_url, tmp_path).post("/train", data=body, content_type="application/json")
    assert 400 <= response.status_code < 500, response.get_data()[:300]
    error_of(response)


@pytest.mark.parametrize(
    "text, shown",
    [
        ("DataError: /srv/data/boolq/train.jsonl:3: invalid JSON", "DataError: …/train.jsonl:3: invalid JSON"),
        ("sqlite:////srv/runs/mlflow/mlflow.db", "sqlite:…/mlflow.db"),
        ("model folder '/srv/models/x' holds nothing", "model folder '…/x' holds nothing"),
        ("http://mlflow:5000/api/2.0", "http://mlflow:5000/api/2.0"),
        ("models:/boolq-bert/3", "models:/boolq-bert/3"),
        ("google-bert/bert-base-uncased", "google-bert/bert-base-uncased"),
    ],
)
def test_job_errors_and_tracking_links_name_files_never_where_they_live(text, shown):
    from app.service.redaction import without_server_paths

    assert without_server_paths({"error": {"message": text}, "n": [text, 1]}) == {
        "error": {"message": shown},
        "n": [shown, 1],
    }
