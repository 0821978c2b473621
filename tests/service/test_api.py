"""The REST API's contract without training: health, errors, auth, queued jobs, metrics, OpenAPI, gunicorn.

Jobs here go to queues no worker listens on, so they stay queued (no training runs in this module).
"""

from __future__ import annotations

import os
import re
import time

import pytest
import requests
from redis import Redis

from app.api import create_app
from app.api.schemas import MAX_ITEMS
from app.service.keys import KeyStore
from tests.helpers import TINY_JOB, free_port, service_settings


def error_of(response) -> dict:
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "fields"}, body
    return body["error"]


def test_healthz_answers_ok_with_the_replica_header(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}
    assert response.headers["X-Replica"] == client.get("/healthz").headers["X-Replica"]  # one opaque id per process
    assert str(os.getpid()) not in response.headers["X-Replica"]


def test_readyz_is_ok_when_redis_answers_and_artifacts_are_writable(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["checks"] == {"redis": "ok", "artifacts": "ok"}


def test_readyz_is_200_degraded_naming_mlflow_when_the_tracking_server_does_not_answer(settings):
    """Replicas still serve what they hold; the check names the dependency, never its address or password."""
    uri = f"http://trainer:s3cret-pw@127.0.0.1:{free_port()}"
    client = create_app(settings.model_copy(update=dict(tracker="mlflow", mlflow_tracking_uri=uri))).test_client()
    response = client.get("/readyz")
    assert response.status_code == 200 and response.get_json()["status"] == "degraded", response.get_json()
    mlflow = response.get_json()["checks"]["mlflow"]
    assert mlflow.startswith("unreachable") and "s3cret" not in mlflow and "127.0.0.1" not in mlflow


def test_redis_down_gives_503_on_readyz_and_train_without_hanging(settings):
    down = create_app(settings.model_copy(update=dict(redis_url=f"redis://127.0.0.1:{free_port()}/0"))).test_client()
    started = time.monotonic()
    ready = down.get("/readyz")
    train = down.post("/train", json=TINY_JOB)
    assert time.monotonic() - started < 10
    assert ready.status_code == 503 and ready.get_json()["checks"]["redis"].startswith("unreachable")
    assert train.status_code == 503 and error_of(train)["code"] == "redis_unavailable"
    assert "X-Replica" in train.headers


def test_malformed_json_is_400(client):
    response = client.post("/train", data="{not json", content_type="application/json")
    assert response.status_code == 400 and "JSON" in error_of(response)["message"]


def test_wrong_content_type_is_415(client):
    response = client.post("/train", data="batch_size=8", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415 and error_of(response)["code"] == "unsupported_media_type"


def test_body_over_the_limit_is_413(redis_url, tmp_path):
    client = create_app(service_settings(redis_url, tmp_path, max_content_length=1000)).test_client()
    response = client.post("/predict", json={"question": "q", "passage": "x" * 2000})
    assert response.status_code == 413 and error_of(response)["code"] == "payload_too_large"


def test_schema_violations_are_422_naming_each_field_and_rule(client):
    response = client.post("/train", json={"batch_size": 0, "lr": "fast", "epochs": True, "colour": "red"})
    error = error_of(response)
    assert response.status_code == 422
    assert set(error["fields"]) == {"batch_size", "lr", "epochs", "colour"}
    assert "greater than or equal to 1" in error["fields"]["batch_size"]
    assert "Extra inputs are not permitted" in error["fields"]["colour"]


def test_train_takes_hugging_face_names_and_refuses_two_values_for_one_parameter(redis_url, tmp_path):
    client = create_app(service_settings(redis_url, tmp_path, max_devices=2)).test_client()
    names = {"learning_rate": 1e-4, "num_train_epochs": 1, "max_seq_length": 32, "per_device_train_batch_size": 4}
    response = client.post("/train", json={"model": "minilm", "train_limit": 16, "devices": 2} | names)
    assert response.status_code == 202, response.get_json()
    params = client.get(f"/jobs/{response.get_json()['job_id']}").get_json()["params"]
    assert (params["lr"], params["epochs"], params["max_length"], params["batch_size"]) == (1e-4, 1, 32, 8)
    clash = client.post("/train", json=TINY_JOB | {"max_seq_length": 64})  # TINY_JOB's max_length is 32
    assert clash.status_code == 422 and set(error_of(clash)["fields"]) == {"max_length", "max_seq_length"}
    properties = client.get("/openapi.json").get_json()["components"]["schemas"]["TrainParams"]["properties"]
    assert properties["learning_rate"]["exclusiveMinimum"] == 0 and "per_device_train_batch_size" in properties


def test_bad_query_parameter_is_422_naming_it(client):
    response = client.post("/train?wait=perhaps", json=TINY_JOB)
    assert response.status_code == 422 and set(error_of(response)["fields"]) == {"wait"}


def test_a_body_that_is_not_an_object_is_422(client):
    response = client.post("/train", json=[1, 2])
    assert response.status_code == 422 and set(error_of(response)["fields"]) == {"body"}


@pytest.mark.parametrize("model", ["/etc", "../../etc", "~/.ssh", "runs/../../etc", "not a model!"])
def test_train_rejects_models_outside_aliases_hub_ids_and_model_roots(client, model):
    response = client.post("/train", json=TINY_JOB | {"model": model})
    assert response.status_code == 422 and set(error_of(response)["fields"]) == {"model"}


@pytest.mark.parametrize("model", ["/etc", "../etc", "minilm", "bert-base-uncased", "no-such-job"])
def test_predict_rejects_models_that_are_not_fine_tuned_runs_under_the_roots(client, model):
    response = client.post("/predict", json={"question": "q", "passage": "p", "model": model})
    assert response.status_code == 422 and set(error_of(response)["fields"]) == {"model"}


def test_predict_with_no_succeeded_job_is_404(client):
    response = client.post("/predict", json={"question": "q", "passage": "p"})
    assert response.status_code == 404 and error_of(response)["code"] == "no_model"


def test_predict_limits_a_batch_to_256_items(client):
    items = [{"question": "q", "passage": "p"}] * (MAX_ITEMS + 1)
    response = client.post("/predict", json={"items": items})
    assert response.status_code == 422 and set(error_of(response)["fields"]) == {"items"}


def test_predict_names_a_missing_field_inside_items(client):
    response = client.post("/predict", json={"items": [{"question": "q", "passage": "p"}, {"question": "q"}]})
    assert response.status_code == 422 and set(error_of(response)["fields"]) == {"items.1.passage"}


def test_unknown_job_is_404(client):
    for path in ("/jobs/no-such-job", "/jobs/no-such-job/predictions", "/jobs/bad%20id"):
        response = client.get(path)
        assert response.status_code == 404 and "job_id" in error_of(response)["fields"], path


def test_unknown_route_is_404_json(client):
    response = client.get("/no/such/route")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


def test_wrong_method_is_405_json(client):
    response = client.get("/train")
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_an_unexpected_error_is_500_without_details(settings):
    app = create_app(settings)

    def explode():
        raise RuntimeError("secret internal detail")

    app.add_url_rule("/explode", view_func=explode)
    response = app.test_client().get("/explode")
    assert response.status_code == 500
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in response.get_data(as_text=True)
    assert error_of(response)["code"] == "internal_error"


def test_without_api_token_no_auth_is_needed(client):
    assert client.post("/train", json=TINY_JOB).status_code == 202


def test_with_api_token_train_cancel_predict_and_job_reads_need_the_bearer_token(redis_url, tmp_path):
    client = create_app(service_settings(redis_url, tmp_path, api_token="s3cret")).test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        for path, body in (("/train", TINY_JOB), ("/predict", {"question": "q", "passage": "p"})):
            response = client.post(path, json=body, headers=headers)
            assert response.status_code == 401 and error_of(response)["code"] == "unauthorized", (path, headers)
            assert response.headers["WWW-Authenticate"] == "Bearer"
    good = {"Authorization": "Bearer s3cret"}
    job_id = client.post("/train", json=TINY_JOB, headers=good).get_json()["job_id"]
    for path in ("/jobs", f"/jobs/{job_id}", f"/jobs/{job_id}/predictions"):
        assert client.get(path).status_code == 401, path
    assert client.get(f"/jobs/{job_id}", headers=good).status_code == 200
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 401
    assert client.post(f"/jobs/{job_id}/cancel", headers=good).status_code == 200


def test_public_reads_open_job_reads_but_not_what_spends_compute(redis_url, tmp_path):
    client = create_app(service_settings(redis_url, tmp_path, api_token="s3cret", public_reads=True)).test_client()
    job_id = client.post("/train", json=TINY_JOB, headers={"Authorization": "Bearer s3cret"}).get_json()["job_id"]
    assert client.get("/jobs").status_code == 200 and client.get(f"/jobs/{job_id}").status_code == 200
    assert client.post("/train", json=TINY_JOB).status_code == 401


def test_a_queued_job_can_be_cancelled_and_then_not_again(client):
    job_id = client.post("/train", json=TINY_JOB).get_json()["job_id"]
    assert client.get(f"/jobs/{job_id}").get_json()["status"] == "queued"
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
    assert client.get(f"/jobs/{job_id}").get_json()["status"] == "cancelled"
    again = client.post(f"/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "cancelled" in error_of(again)["message"]


def test_a_train_body_naming_no_model_queues_the_servers_default_model(client):
    body = {name: value for name, value in TINY_JOB.items() if name != "model"}
    response = client.post("/train", json=body)
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["job_id"]
    assert client.get(f"/jobs/{job_id}").get_json()["params"]["model"] == "minilm"  # DEFAULT_MODEL, not TrainParams'
    client.post(f"/jobs/{job_id}/cancel")


def test_wait_true_answers_202_with_the_job_id_when_the_timeout_passes(client):
    started = time.monotonic()
    response = client.post("/train?wait=true&timeout=0.5", json=TINY_JOB)
    assert response.status_code == 202 and response.get_json()["status"] == "queued"
    assert response.headers["Location"] == f"/jobs/{response.get_json()['job_id']}"
    assert time.monotonic() - started < 5


def test_two_app_instances_on_one_redis_agree_about_a_job(settings):
    first, second = create_app(settings).test_client(), create_app(settings).test_client()
    job_id = first.post("/train", json=TINY_JOB).get_json()["job_id"]
    assert second.get(f"/jobs/{job_id}").get_json()["params"]["train_limit"] == TINY_JOB["train_limit"]
    assert job_id in [j["job_id"] for j in second.get("/jobs").get_json()["jobs"]]
    assert second.post(f"/jobs/{job_id}/cancel").status_code == 200
    assert first.get(f"/jobs/{job_id}").get_json()["status"] == "cancelled"


def test_jobs_listing_is_paged_newest_first(client):
    ids = [client.post("/train", json=TINY_JOB).get_json()["job_id"] for _ in range(3)]
    first_page = client.get("/jobs?per_page=2").get_json()
    second_page = client.get("/jobs?per_page=2&page=2").get_json()
    assert first_page["total"] == 3
    assert [j["job_id"] for j in first_page["jobs"] + second_page["jobs"]] == ids[::-1]
    assert client.get("/jobs?per_page=1000").status_code == 422


def test_metrics_count_requests_and_jobs_by_status(client):
    client.post("/train", json=TINY_JOB)
    client.get("/no/such/route")
    response = client.get("/metrics")
    text = response.get_data(as_text=True)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert 'boolq_http_requests_total{endpoint="/train",method="POST",status="202"} 1.0' in text
    assert 'boolq_http_requests_total{endpoint="unmatched",method="GET",status="404"} 1.0' in text
    assert 'boolq_jobs{status="queued"} 1.0' in text
    assert "boolq_http_request_duration_seconds_bucket" in text


def test_openapi_describes_every_route_with_generated_schemas(client):
    document = client.get("/openapi.json").get_json()
    app_routes = {
        str(rule)
        for rule in client.application.url_map.iter_rules()
        if rule.endpoint != "static" and not rule.endpoint.startswith("console.")  # the console's HTML pages
    }
    documented = {re.sub(r"\{(\w+)\}", r"<\1>", path) for path in document["paths"]}
    assert app_routes == documented
    schemas = document["components"]["schemas"]
    assert schemas["TrainParams"]["properties"]["batch_size"]["maximum"] == 512
    assert schemas["PredictBatch"]["properties"]["items"]["maxItems"] == MAX_ITEMS
    assert set(references(document)) <= {f"#/components/schemas/{name}" for name in schemas}


@pytest.mark.parametrize(("api_token", "public_reads"), [("s3cret", False), ("s3cret", True), ("", False)])
def test_openapi_asks_for_a_key_exactly_where_the_service_does(settings, api_token, public_reads):
    """With API_TOKEN, or with only a created key: ``security`` where a request without a key is 401, and 401
    documented wherever a wrong key is 401 (a public read checks a key it is given)."""
    configured = settings.model_copy(update={"api_token": api_token, "public_reads": public_reads})
    key = api_token or KeyStore(configured, Redis.from_url(configured.redis_url)).create("ops", "admin")
    client = create_app(configured).test_client()
    document = client.get("/openapi.json", headers={"Authorization": f"Bearer {key}"}).get_json()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            url = re.sub(r"\{\w+\}", "no-such-id", path)
            without = client.open(url, method=method.upper(), json={})
            wrong = client.open(url, method=method.upper(), json={}, headers={"Authorization": "Bearer wrong"})
            assert ("security" in operation) == (without.status_code == 401), (method, path)
            assert ("401" in operation["responses"]) == (wrong.status_code == 401), (method, path)
    secured = {(m, p) for p, item in document["paths"].items() for m, op in item.items() if "security" in op}
    assert ("post", "/train") in secured and (("get", "/models") in secured) is not public_reads
    assert ("get", "/audit") in secured
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}


def references(node):
    """Every ``$ref`` anywhere in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from [value] if key == "$ref" else references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


@pytest.fixture(scope="module")
def served(launcher, redis_url, tmp_path_factory):
    """A real gunicorn (`python -m app serve`, 2 worker processes) on a free port."""
    settings = service_settings(redis_url, tmp_path_factory.mktemp("served"))
    return settings, launcher.server(settings, workers=2)


def test_gunicorn_serves_the_app_from_several_worker_processes(served):
    _, url = served
    replicas = {requests.get(f"{url}/healthz", timeout=10).headers["X-Replica"] for _ in range(20)}
    assert all(not r.endswith(f":{os.getpid()}") for r in replicas)
    assert requests.get(f"{url}/readyz", timeout=10).json()["checks"]["redis"] == "ok"
    missing = requests.get(f"{url}/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_job_submitted_through_gunicorn_is_seen_by_another_instance(served):
    settings, url = served
    response = requests.post(f"{url}/train", json=TINY_JOB, timeout=10)
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    view = create_app(settings).test_client().get(f"/jobs/{job_id}").get_json()
    assert view["status"] == "queued" and view["job_id"] == job_id


def test_the_api_imports_no_torch():
    """Web processes stay light: the worker's task is enqueued by name, run folders are read without torch."""
    import subprocess
    import sys

    probe = (
        "import sys, app.api, app.service.jobs; print(sorted({'torch', 'sklearn', 'transformers'} & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
