"""The worker's task: its progress reporter's live curves, a job whose worker is killed mid-training
being re-run by default (JOB_RETRIES) and resuming from its last checkpoint, ending as an uninterrupted run of the
same seed does, a job that raises failing at once, and job records planted in Redis that name code or a URL, which
neither the API nor a worker ever runs or calls."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from redis import Redis
from rq import Callback, Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.webhook import Webhook

from app.api import create_app
from app.config import SAMPLE_DATA_DIR, Settings
from app.engine.run_folder import Progress
from app.engine.training import train_and_evaluate
from app.params import TrainParams
from app.service.jobs import describe_job, enqueue_training, training_queue
from app.service.tasks import CURVE_POINTS, ProgressReporter
from tests.helpers import RESUMABLE, TINY_JOB, plant_job, service_settings, wait_for, webhook_listener, work_horse_pids


class CountingJob:
    """What the reporter touches of an RQ job: its meta, save_meta() (counted here, not written) and, for the
    attempt's lease it checks before each save, its id, queue and a real Redis connection."""

    def __init__(self, redis_url: str):
        self.meta = {}
        self.saves = 0
        self.id, self.origin, self.connection = "reporter-job", "reporter-queue", Redis.from_url(redis_url)

    def save_meta(self):
        self.saves += 1


def test_the_reporter_keeps_every_step_loss_and_each_epochs_dev_accuracy_in_the_meta(redis_url):
    job = CountingJob(redis_url)
    report = ProgressReporter(job)
    for step in range(1, 5):
        report(Progress(1, 1, step, 4, 1.0 / step, None, 10.0))
    report(Progress(1, 1, 4, 4, 0.25, 0.6, 10.0))  # the epoch's dev evaluation repeats the last step
    assert job.meta["curves"] == {"loss": [[1, 1.0], [2, 0.5], [3, 1 / 3], [4, 0.25]], "dev_accuracy": [[1, 0.6]]}
    assert job.saves <= 3  # throttled: the first step, the last step, the dev evaluation


def test_a_report_of_several_read_back_steps_puts_each_in_the_curve_and_only_the_latest_in_the_progress(redis_url):
    job = CountingJob(redis_url)
    report = ProgressReporter(job)
    report(Progress(1, 1, 3, 3, 0.3, None, 10.0, recent_losses=((1, 0.5), (2, 0.4), (3, 0.3))))  # a GPU read-back
    assert job.meta["curves"]["loss"] == [[1, 0.5], [2, 0.4], [3, 0.3]]
    assert job.meta["progress"]["step"] == 3 and "recent_losses" not in job.meta["progress"]


def test_a_long_run_keeps_a_bounded_curve_with_its_first_and_last_steps(redis_url):
    job = CountingJob(redis_url)
    report = ProgressReporter(job)
    steps = 5 * CURVE_POINTS
    for step in range(1, steps + 1):
        report(Progress(1, 1, step, steps, 1.0, None, 10.0))
    loss = job.meta["curves"]["loss"]
    assert len(loss) <= CURVE_POINTS
    assert loss[0][0] == 1 and loss[-1][0] == steps
    assert [p[0] for p in loss] == sorted(p[0] for p in loss)


# 90 train rows: two epochs of 12 steps, long enough to be killed in the middle.
KILLED_JOB = RESUMABLE | {"train_limit": 120}


def test_a_job_killed_mid_training_resumes_from_its_checkpoint(launcher, redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path, checkpoint_every_s=1)  # JOB_RETRIES as it comes
    worker = launcher.worker(settings)
    client = create_app(settings).test_client()
    job_id = client.post("/train", json=KILLED_JOB).get_json()["job_id"]
    state_file = settings.artifacts_dir / job_id / "training_state.pt"

    def checkpointed_mid_run():
        view = client.get(f"/jobs/{job_id}").get_json()
        progress = view["progress"] or {}
        return state_file.is_file() and 4 <= progress.get("step", 0) < progress["total_steps"] - 6

    wait_for(checkpointed_mid_run, 300, "a checkpoint in the middle of training", interval_s=0.1)
    for pid in work_horse_pids(worker.pid):
        os.kill(pid, signal.SIGKILL)  # the training process dies as under the OOM killer
    killed_at = torch.load(state_file, weights_only=False)["loop"]["step"]

    def ended():
        view = client.get(f"/jobs/{job_id}").get_json()
        return view if view["status"] in ("succeeded", "failed", "cancelled") else None

    view = wait_for(ended, 300, f"job {job_id} to end after its retry")
    assert view["status"] == "succeeded", view
    assert (view["attempt"], view["max_attempts"]) == (2, 1 + Settings().job_retries)
    assert view["previous_attempt"]["type"] == "WorkerKilled" and "signal 9" in view["previous_attempt"]["message"]
    metrics = view["result"]["metrics"]
    assert 0 < killed_at < 24 and metrics["resumed_from_step"] == killed_at
    assert not state_file.exists()  # deleted once the job succeeded

    whole = train_and_evaluate(TrainParams(**KILLED_JOB), SAMPLE_DATA_DIR, tmp_path / "whole", num_threads=1)
    assert len(metrics["loss_curve"]) == 24
    assert metrics["loss_curve"] == pytest.approx(whole.metrics["loss_curve"], abs=1e-4)
    assert abs(metrics["accuracy"] - whole.metrics["accuracy"]) <= 1 / 8  # one val answer of 8 at most
    assert metrics["dev_accuracy_per_epoch"] == whole.metrics["dev_accuracy_per_epoch"]


def test_a_job_whose_whole_worker_died_is_retried_by_another_worker_and_resumes(launcher, redis_url, tmp_path):
    """Worker and work horse killed together (the machine is lost): once the heartbeat and its grace lapse, reading
    the job re-queues it (JOB_RETRIES), and a worker started later resumes it from the last checkpoint."""
    settings = service_settings(redis_url, tmp_path, checkpoint_every_s=1, worker_heartbeat=2, worker_grace_s=3)
    worker = launcher.worker(settings)
    client = create_app(settings).test_client()
    job_id = client.post("/train", json=KILLED_JOB).get_json()["job_id"]
    state_file = settings.artifacts_dir / job_id / "training_state.pt"

    def checkpointed_mid_run():
        progress = client.get(f"/jobs/{job_id}").get_json()["progress"] or {}
        return state_file.is_file() and 4 <= progress.get("step", 0) < progress["total_steps"] - 6

    wait_for(checkpointed_mid_run, 300, "a checkpoint in the middle of training", interval_s=0.1)
    horses = work_horse_pids(worker.pid)
    os.killpg(worker.pid, signal.SIGKILL)
    for pid in horses:
        os.kill(pid, signal.SIGKILL)
    worker.wait()
    killed_at = torch.load(state_file, weights_only=False)["loop"]["step"]
    launcher.start("worker", ["worker"], settings, None)  # the replacement (the dead one is still registered)

    def ended():
        view = client.get(f"/jobs/{job_id}").get_json()
        return view if view["status"] in ("succeeded", "failed", "cancelled") else None

    view = wait_for(ended, 300, f"job {job_id} to end on the second worker")
    assert view["status"] == "succeeded", view
    assert view["result"]["metrics"]["resumed_from_step"] == killed_at > 0
    assert view["attempt"] == 2 and view["previous_attempt"]["type"] == "WorkerLost", view


def test_a_job_that_raises_fails_at_once_with_its_error_though_it_has_retries_left(launcher, redis_url, tmp_path):
    """Re-running would raise again: only a worker's death re-runs a job."""
    settings = service_settings(redis_url, tmp_path, job_retries=2)
    launcher.worker(settings)
    queue = training_queue(settings, Redis.from_url(redis_url))
    # The API refuses a model that does not exist; a job already queued meets it on the worker.
    job = enqueue_training(queue, TrainParams(**TINY_JOB | {"model": "no/such-model"}), settings)
    wait_for(lambda: job.get_status() in (JobStatus.FAILED, JobStatus.FINISHED), 120, "the job to end")
    job.refresh()
    view = describe_job(job)
    assert view["status"] == "failed" and view["error"]["type"] != "WorkerKilled", view
    assert (view["attempt"], view["max_attempts"], view["previous_attempt"]) == (1, 3, None), view
    assert job.retries_left == 2


def planted_behaviour(hook_url: str, callback: str = "tests.helpers.leave_a_mark") -> dict:
    """What a record planted in Redis may ask RQ for: callbacks of every kind, and webhooks with chosen headers."""
    return dict(
        on_success=Callback(callback),
        on_failure=Callback(callback),
        on_stopped=Callback(callback),
        webhooks=[
            Webhook(f"{hook_url}/{status}", status, method="POST", headers={"X-Stolen": "1"})
            for status in ("finished", "failed")
        ],
    )


def test_the_api_never_runs_a_callback_or_calls_a_webhook_planted_on_a_job(settings, client, redis_url):
    """Counting jobs for /metrics lets RQ fail a started job whose worker is gone; that must not run what it names."""
    connection = Redis.from_url(redis_url)
    with webhook_listener() as (hook_url, calls):
        job = plant_job(connection, settings.queue_name, "planted-api", "started", **planted_behaviour(hook_url))
        assert client.get("/metrics").status_code == 200
        assert client.get(f"/jobs/{job.id}").get_json()["status"] == "failed"
    assert not connection.exists(f"planted-ran:{job.id}")
    assert calls == []


def test_a_job_record_rq_cannot_read_is_left_out_of_the_job_list_never_a_500(settings, client, redis_url):
    from app.service.job_index import JobIndex
    from app.service.jobs import training_queue

    connection = Redis.from_url(redis_url)
    listed = client.post("/train", json=TINY_JOB).get_json()["job_id"]
    connection.hset("rq:job:planted-unreadable-api", mapping={"data": b"[]", "status": "no-such-status"})
    connection.zadd(JobIndex(training_queue(settings, connection)).key, {"planted-unreadable-api": 2e9})
    response = client.get("/jobs")
    assert response.status_code == 200, response.get_json()
    assert [job["job_id"] for job in response.get_json()["jobs"]] == [listed]


def test_a_worker_refuses_planted_callbacks_webhooks_and_unreadable_records_and_goes_on(launcher, redis_url, tmp_path):
    """Its maintenance fails two abandoned records (one whose callback would end the process), its dequeue skips
    a record RQ cannot read and refuses a job asking for callbacks and webhooks; none runs, the worker lives on."""
    settings = service_settings(redis_url, tmp_path)
    connection = Redis.from_url(redis_url)
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    with webhook_listener() as (hook_url, calls):
        abandoned = [
            plant_job(connection, settings.queue_name, "planted-abandoned", "started", **planted_behaviour(hook_url)),
            plant_job(
                connection,
                settings.queue_name,
                "planted-exit",
                "started",
                **planted_behaviour(hook_url, "tests.helpers.end_the_process"),
            ),
        ]
        connection.hset("rq:job:planted-unreadable", mapping={"data": b"[]", "status": "no-such-status"})
        connection.rpush(queue.key, "planted-unreadable")
        queued = plant_job(connection, settings.queue_name, "planted-queued", **planted_behaviour(hook_url))
        worker = launcher.worker(settings)
        wait_for(
            lambda: worker.poll() is not None or queued.get_status() == JobStatus.FAILED,
            120,
            "the worker to refuse the planted job",
        )
        assert worker.poll() is None, worker.log_path.read_text()[-3000:]
        assert [job.get_status() for job in abandoned] == [JobStatus.FAILED] * 2
        refusal = queued.latest_result().exc_string
        assert "ForbiddenTask" in refusal and "webhooks" in refusal and "failure_callback_name" in refusal
    assert not any(connection.exists(f"planted-ran:{job_id}") for job_id in ("planted-abandoned", "planted-queued"))
    assert calls == []
