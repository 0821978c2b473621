"""Issue 28 item 4, in the app: without a token every request names an allowed host (probes excepted), and no
error body names a back-end's address (the log keeps it)."""

from __future__ import annotations

import logging

import pytest
import requests

from app.service.model_store import ModelStoreUnavailable, refusals_explained
from tests.helpers import TINY_JOB, free_port, service_settings


@pytest.fixture
def open_client(redis_url, tmp_path):
    from app.api import create_app

    return create_app(service_settings(redis_url, tmp_path)).test_client()


@pytest.mark.parametrize("path", ["/jobs", "/", "/metrics", "/sweeps", "/openapi.json"])
def test_without_a_token_a_get_naming_a_foreign_host_is_403(open_client, path):
    rebound = open_client.get(path, headers={"Host": "evil.example"})  # DNS rebinding: the page's own name
    assert rebound.status_code == 403 and "ALLOWED_HOSTS" in rebound.get_json()["error"]["message"]
    assert open_client.get(path, headers={"Host": "localhost:4000"}).status_code == 200


def test_probes_answer_whatever_host_they_name(open_client):
    for path in ("/healthz", "/readyz"):  # a kubelet asks by the pod's address
        assert open_client.get(path, headers={"Host": "10.1.2.3:5000"}).status_code == 200, path


def test_with_a_token_the_host_is_not_checked(redis_url, tmp_path):
    from app.api import create_app

    client = create_app(service_settings(redis_url, tmp_path, api_token="s3cret")).test_client()
    answer = client.get("/jobs", headers={"Host": "api.example.org", "Authorization": "Bearer s3cret"})
    assert answer.status_code == 200


def test_readyz_and_predict_with_redis_down_do_not_name_its_address(tmp_path, caplog):
    from app.api import create_app

    port = free_port()  # nothing listens there
    client = create_app(service_settings(f"redis://127.0.0.1:{port}/0", tmp_path)).test_client()
    with caplog.at_level(logging.WARNING):
        ready = client.get("/readyz")
        predicted = client.post("/predict", json={"question": "is it", "passage": "it is"})
        trained = client.post("/train", json=TINY_JOB)
    assert ready.status_code == 503 and ready.get_json()["checks"]["redis"].startswith("unreachable")
    for answer in (ready, predicted, trained):
        assert answer.status_code == 503 and str(port) not in answer.get_data(as_text=True), answer.get_data()
    assert str(port) in caplog.text  # the log keeps it


def test_a_model_store_failure_names_no_server_address(tmp_path):
    settings = service_settings("redis://127.0.0.1:1/0", tmp_path, mlflow_tracking_uri="http://mlflow.internal:5123")
    with pytest.raises(ModelStoreUnavailable) as refused, refusals_explained("job-1", settings):
        raise requests.ConnectionError("HTTPConnectionPool(host='mlflow.internal', port=5123): Max retries exceeded")
    assert "mlflow.internal" not in str(refused.value) and "5123" not in str(refused.value)


def test_a_failed_jobs_error_names_no_back_end_address(redis_url, tmp_path):
    """A worker's error text (MLflow's and Redis's exceptions name their servers) reaches clients without them."""
    from redis import Redis
    from rq import Queue
    from rq.results import Result
    from rq.serializers import JSONSerializer

    from app.api import create_app
    from app.service import jobs

    settings = service_settings(redis_url, tmp_path)
    queue = Queue(settings.queue_name, connection=Redis.from_url(redis_url), serializer=JSONSerializer)
    job = jobs.enqueue_training(jobs.training_queue(settings, queue.connection), jobs.TrainParams(**TINY_JOB), settings)
    failure = "TrackingFailed: API request to http://mlflow.internal:5123/api/2.0/mlflow/runs/create failed"
    job.connection.hset(job.key, "status", "failed")

    traceback = f'Traceback (most recent call last):\n  File "tasks.py", line 1, in train_job\n{failure}'
    Result.create_failure(job, ttl=60, exc_string=traceback)
    job.get_status(refresh=True)
    error = create_app(settings).test_client().get(f"/jobs/{job.id}").get_json()["error"]
    assert error["type"] == "TrackingFailed" and "mlflow.internal" not in error["message"], error
