"""Issue 22: whoever can write to Redis, a run folder or a local file must not run code or read secrets, and every
door of the API has its lock. Each test reproduces one finding with the real component (Redis, worker, nginx)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from tests.helpers import service_settings, wait_for


class WritesFile:
    """A pickle that creates ``path`` when it is unpickled: the attacker's payload."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_pickle(path) -> bytes:
    return pickle.dumps(WritesFile(path))


@pytest.mark.slow
def test_a_worker_refuses_a_job_naming_a_function_that_is_not_a_project_task(launcher, redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path)
    launcher.worker(settings)
    marker = tmp_path / "owned"
    queue = Queue(settings.queue_name, connection=Redis.from_url(redis_url), serializer=JSONSerializer)
    job = queue.enqueue("os.system", f"touch {marker}")
    wait_for(lambda: job.get_status() in (JobStatus.FAILED, JobStatus.FINISHED), 60, "the planted job to end")
    assert job.get_status() == JobStatus.FAILED
    assert "os.system" in job.latest_result().exc_string
    assert "ForbiddenTask" in job.latest_result().exc_string
    assert not marker.exists()


SWEEP = {
    "base": dict(model="minilm", train_limit=40, eval_limit=8, max_length=32, epochs=1, batch_size=8),
    "space": {"lr": [1e-4, 2e-4]},
    "trials": 2,
    "parallel": 1,
}


def test_a_pickle_planted_as_the_optuna_snapshot_is_never_unpickled(redis_url, tmp_path):
    from app.api import create_app
    from app.service.sweeps import journal_on_redis

    settings = service_settings(redis_url, tmp_path)
    client = create_app(settings).test_client()
    sweep_id = client.post("/sweeps", json=SWEEP).get_json()["sweep_id"]
    marker = tmp_path / "owned"
    Redis.from_url(redis_url).set(f"boolq:{settings.queue_name}:optuna:snapshot", planted_pickle(marker))
    journal_on_redis.cache_clear()  # a new process: its storage replays the journal
    listed = client.get("/sweeps")
    assert listed.status_code == 200
    assert [s["sweep_id"] for s in listed.get_json()["sweeps"]] == [sweep_id]
    assert not marker.exists()


@pytest.mark.slow
def test_a_tampered_checkpoint_runs_no_code_and_the_run_starts_over(tmp_path):
    import torch

    from app.config import SAMPLE_DATA_DIR
    from app.engine import run_folder
    from app.engine.training import train_and_evaluate
    from app.params import TrainParams
    from tests.helpers import RESUMABLE

    marker = tmp_path / "owned"
    state = run_folder.training_state(tmp_path / "runs" / "r")
    state.parent.mkdir(parents=True)
    torch.save({"loop": WritesFile(marker)}, state)  # a killed attempt's checkpoint, rewritten by an attacker
    runs = tmp_path / "runs"
    result = train_and_evaluate(TrainParams(**RESUMABLE), SAMPLE_DATA_DIR, runs, run_id="r", checkpoint_every_s=0)
    assert not marker.exists()
    assert result.metrics["resumed_from_step"] is None  # refused: trained from the start
    assert not state.exists()


@pytest.mark.slow
def test_the_native_stack_keeps_the_redis_password_out_of_shared_files_logs_and_command_lines(tmp_path):
    import os
    import stat
    import sys

    from tests.helpers import free_port, running_stack, stack_redis_url

    state_dir, log_path = tmp_path / "state", tmp_path / "stack.log"
    env = os.environ | {"TRACKER": "none", "ARTIFACTS_DIR": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "app", "stack", "--replicas", "1", "--workers", "1", "--port", str(free_port())]
    with running_stack(argv, tmp_path, env) as (_, state):
        password = stack_redis_url(state).split(":")[2].split("@")[0]
        assert len(password) >= 16 and Redis.from_url(stack_redis_url(state)).ping()
        bounded = Redis.from_url(stack_redis_url(state)).config_get("maxmemory*")
        assert (bounded["maxmemory"], bounded["maxmemory-policy"]) == (str(1024**3), "noeviction"), bounded
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        for private in ("stack.json", "redis.url", "redis.conf"):
            assert stat.S_IMODE((state_dir / private).stat().st_mode) == 0o600, private
        assert password not in (state_dir / "stack.json").read_text()
        redis_pid = next(c["pid"] for c in state["children"] if c["role"] == "redis")
        assert password not in Path(f"/proc/{redis_pid}/cmdline").read_text()  # what ps shows every user
    logs = [log_path, *(state_dir / "logs").iterdir()]
    assert all(password not in path.read_text(errors="replace") for path in logs)


def test_two_sweeps_cannot_put_more_jobs_on_the_queue_than_max_queued_jobs(redis_url, tmp_path):
    from app.api import create_app

    settings = service_settings(redis_url, tmp_path, max_queued_jobs=2)
    client = create_app(settings).test_client()
    wide = SWEEP | {"trials": 6, "parallel": 6, "space": {"lr": {"low": 1e-5, "high": 1e-3}}}
    first = client.post("/sweeps", json=wide)
    second = client.post("/sweeps", json=wide)
    queue = Queue(settings.queue_name, connection=Redis.from_url(redis_url))
    assert first.status_code == 202 and queue.count == 2
    assert second.status_code == 429 and "MAX_QUEUED_JOBS" in second.get_json()["error"]["message"]
    assert client.post("/train", json=SWEEP["base"]).status_code == 429
    assert queue.count == 2


def test_a_sweep_whose_trials_exceed_the_token_budget_is_refused_naming_max_length(redis_url, tmp_path):
    from app.api import create_app

    # 40 rows × 1 epoch × 512 tokens = 20,480 tokens per trial, over a budget of 10,000.
    settings = service_settings(redis_url, tmp_path, max_job_tokens=10_000)
    client = create_app(settings).test_client()
    response = client.post("/sweeps", json=SWEEP | {"space": {"max_length": [32, 512]}})
    assert response.status_code == 422
    assert "MAX_JOB_TOKENS" in response.get_json()["error"]["fields"]["space.max_length"]


def test_without_api_token_rotating_bearer_strings_share_one_per_client_cap(redis_url, tmp_path):
    from app.api import create_app

    settings = service_settings(redis_url, tmp_path, max_jobs_per_client=2)
    client = create_app(settings).test_client()
    answers = [
        client.post("/train", json=SWEEP["base"], headers={"Authorization": f"Bearer fresh-{n}"}).status_code
        for n in range(4)
    ]
    assert answers == [202, 202, 429, 429]


@pytest.mark.slow
def test_a_spoofed_x_forwarded_for_straight_at_gunicorn_does_not_dodge_the_per_client_cap(
    launcher, redis_url, tmp_path
):
    import requests

    # The only trusted proxy is elsewhere: this test's requests come straight from 127.0.0.1.
    settings = service_settings(redis_url, tmp_path, max_jobs_per_client=2, trusted_proxies="10.9.9.9")
    url = launcher.server(settings, workers=1)
    answers = [
        requests.post(f"{url}/train", json=SWEEP["base"], headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
        for n in range(4)
    ]
    assert answers == [202, 202, 429, 429]


@pytest.mark.slow
def test_a_revoked_key_is_refused_at_once_by_every_gunicorn_worker(launcher, redis_url, tmp_path):
    import requests

    from app.service.keys import KeyStore

    settings = service_settings(redis_url, tmp_path)
    store = KeyStore(settings, Redis.from_url(redis_url))
    key = store.create("ci-bot", "trainer")
    store.create("ops", "admin")  # keys stay in use once ci-bot's is gone
    url = launcher.server(settings, workers=2)
    headers = {"Authorization": f"Bearer {key}"}
    assert {requests.get(f"{url}/jobs", headers=headers).status_code for _ in range(8)} == {200}
    store.revoke("ci-bot")
    after = [requests.get(f"{url}/jobs", headers=headers) for _ in range(8)]
    assert {a.status_code for a in after} == {401}, [a.text for a in after]


@pytest.mark.slow
def test_nginx_holds_train_and_sweeps_together_to_one_rate_limit(behind_nginx):
    """Both queue training: one limit for the two (a /sweeps with a zone of its own, or none, lets too many in)."""
    from tests.rate_limits import TRAIN_LIMIT, assert_held_to, paced_posts

    answers = paced_posts(behind_nginx, ["/sweeps", "/train"], b"{bad", 8, TRAIN_LIMIT, at_least_s=8, at_most_s=40)
    assert_held_to(TRAIN_LIMIT, answers)


@pytest.mark.slow
def test_nginx_hides_its_version_forbids_framing_and_sniffing_and_replicas_are_opaque(behind_nginx):
    import socket

    import requests

    answer = requests.get(f"{behind_nginx}/healthz")
    assert answer.headers["Server"] == "nginx"
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert "Strict-Transport-Security" not in answer.headers  # plain HTTP: HSTS only on a TLS server
    replica = answer.headers["X-Replica"]
    assert socket.gethostname() not in replica and ":" not in replica


def open_client(redis_url, tmp_path, **overrides):
    from app.api import create_app

    return create_app(service_settings(redis_url, tmp_path, **overrides)).test_client()


def test_a_cross_site_empty_text_plain_post_is_415(redis_url, tmp_path):
    client = open_client(redis_url, tmp_path)
    response = client.post("/train", data="", content_type="text/plain", headers={"Origin": "http://localhost"})
    assert response.status_code == 415 and response.get_json()["error"]["code"] == "unsupported_media_type"
    assert client.post("/train").status_code == 415  # no body, no content type: not JSON either


def test_without_a_token_a_post_from_a_foreign_origin_or_host_is_403(redis_url, tmp_path):
    client = open_client(redis_url, tmp_path)
    foreign = client.post("/train", json=SWEEP["base"], headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "evil.example" in foreign.get_json()["error"]["message"]
    rebound = client.post("/train", json=SWEEP["base"], headers={"Host": "evil.example"})  # DNS rebinding
    assert rebound.status_code == 403 and "ALLOWED_HOSTS" in rebound.get_json()["error"]["message"]
    assert client.post("/jobs/some-job/cancel", headers={"Origin": "http://evil.example"}).status_code == 403
    same_origin = client.post("/train", json=SWEEP["base"], headers={"Origin": "http://localhost"})
    assert same_origin.status_code == 202


def test_with_a_token_and_no_public_reads_sweeps_and_models_need_the_token(redis_url, tmp_path):
    client = open_client(redis_url, tmp_path, api_token="s3cret", tracker="mlflow")
    token = {"Authorization": "Bearer s3cret"}
    sweep_id = client.post("/sweeps", json=SWEEP, headers=token).get_json()["sweep_id"]
    for path in ("/sweeps", f"/sweeps/{sweep_id}", "/models"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=token).status_code == 200, path


def test_reading_a_sweep_changes_nothing_and_the_workers_check_notices_a_dead_trial(redis_url, tmp_path):
    from rq.job import Job

    from app.service import jobs, sweeps

    settings = service_settings(redis_url, tmp_path)
    client = open_client(redis_url, tmp_path, queue_name=settings.queue_name)
    sweep_id = client.post("/sweeps", json=SWEEP).get_json()["sweep_id"]
    queue = Queue(settings.queue_name, connection=Redis.from_url(redis_url), serializer=JSONSerializer)
    (first,) = queue.get_job_ids()
    Job.fetch(first, connection=queue.connection, serializer=JSONSerializer).cancel()  # its worker died, say
    for _ in range(3):
        assert client.get(f"/sweeps/{sweep_id}").status_code == 200
    assert queue.count == 0 and client.get(f"/sweeps/{sweep_id}").get_json()["leaderboard"][0]["status"] == "running"
    sweeps.advance_unfinished(settings, jobs.training_queue(settings, queue.connection))
    board = client.get(f"/sweeps/{sweep_id}").get_json()["leaderboard"]
    assert sorted(row["status"] for row in board) == ["cancelled", "queued"]
    assert queue.count == 1


def test_promote_refuses_a_job_id_that_is_not_a_job_id_before_it_reaches_mlflow(redis_url, tmp_path):
    client = open_client(redis_url, tmp_path, tracker="mlflow")
    response = client.post("/models/champion", json={"job_id": "x' or name != '"})
    assert response.status_code == 422 and "job_id" in response.get_json()["error"]["fields"]


@pytest.mark.slow
def test_the_micro_batcher_honours_predict_max_tokens(tiny_run, redis_url, tmp_path):
    run_dir = Path(tiny_run[0].run_dir)
    client = open_client(redis_url, tmp_path, artifacts_dir=run_dir.parent, predict_max_batch=8, predict_max_tokens=16)
    long_pair = {"question": "is the sky blue " * 5, "passage": "The sky is blue by day. " * 20}
    response = client.post("/predict", json=long_pair | {"model": run_dir.name})
    assert response.status_code == 422 and response.get_json()["error"]["code"] == "too_many_tokens"
    short = client.post("/predict", json={"question": "sky", "passage": "blue", "model": run_dir.name})
    assert short.status_code == 200


@pytest.mark.slow
def test_a_model_loading_does_not_stall_requests_for_a_loaded_one(tiny_run):
    import threading

    from app.service.serving import PredictorCache

    loaded_folder = Path(tiny_run[0].run_dir)
    slow_folder = Path("/nonexistent/slow-model")
    started, release = threading.Event(), threading.Event()

    class SlowLoads(PredictorCache):
        def load(self, folder):
            if folder == slow_folder:
                started.set()
                release.wait(60)  # a big model from a slow disk, say
                return "slow model"
            return super().load(folder)

    cache = SlowLoads(2)
    loaded = cache.get(loaded_folder)
    loading = threading.Thread(target=cache.get, args=(slow_folder,))
    loading.start()
    try:
        assert started.wait(10)
        answered = []
        reader = threading.Thread(target=lambda: answered.append(cache.get(loaded_folder)))
        reader.start()
        reader.join(timeout=10)
        assert answered == [loaded]  # served while the other folder is still loading
    finally:
        release.set()
        loading.join(timeout=60)
    assert cache.get(slow_folder) == "slow model"


@pytest.mark.slow
def test_a_worker_notices_a_dead_trial_in_its_periodic_check_and_starts_the_next(launcher, redis_url, tmp_path):
    from rq.job import Job

    settings = service_settings(redis_url, tmp_path)
    client = open_client(redis_url, tmp_path, queue_name=settings.queue_name)
    sweep_id = client.post("/sweeps", json=SWEEP).get_json()["sweep_id"]
    queue = Queue(settings.queue_name, connection=Redis.from_url(redis_url), serializer=JSONSerializer)
    (first,) = queue.get_job_ids()
    Job.fetch(first, connection=queue.connection, serializer=JSONSerializer).cancel()  # lost before any worker ran it
    launcher.worker(settings)  # its first maintenance runs at start

    def statuses():
        return sorted(row["status"] for row in client.get(f"/sweeps/{sweep_id}").get_json()["leaderboard"])

    wait_for(lambda: len(statuses()) == 2, 120, "the worker to start the next trial")
    assert statuses()[0] == "cancelled"


@pytest.mark.slow
def test_models_shows_no_server_path_and_reading_it_writes_nothing(tiny_run, redis_url, tmp_path):
    from app.engine import run_folder
    from app.service import registry

    run_dir = Path(tiny_run[0].run_dir)
    settings = service_settings(redis_url, tmp_path, tracker="mlflow")
    models = registry.ModelRegistry(settings)
    version = models.register(
        run_dir, run_dir.name, run_folder.read_params(run_dir), run_folder.read_metrics(run_dir), None
    )
    models.promote(version)  # in MLflow only, as `python -m app sweep --promote` or MLflow's UI would
    client = open_client(redis_url, tmp_path, queue_name=settings.queue_name, tracker="mlflow")
    listing = client.get("/models")
    assert listing.status_code == 200 and listing.get_json()["models"][0]["job_id"] == run_dir.name
    assert str(tmp_path) not in listing.text and "file:///" not in listing.text
    assert listing.get_json()["champion"] is None and "not serve" in listing.get_json()["alias_warning"]
    connection = Redis.from_url(redis_url)
    assert registry.read_champion_pointer(connection, settings) is None  # a GET changed nothing
    assert "not serve" in registry.report_foreign_alias(connection, settings)  # the workers' periodic check
    assert registry.read_champion_pointer(connection, settings) is None  # which reports the alias, never copies it
