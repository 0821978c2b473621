"""Hosts that share nothing but Redis and an MLflow tracking server: worker A, worker B and API replica C, each with
its own ARTIFACTS_DIR, MODEL_CACHE_DIR and HF home that none of the others is given and, when the suite runs as root,
its own Unix user owning them, so a host cannot even read another's folder. Models, predictions and checkpoints reach
the other hosts only through ``mlflow server --serve-artifacts``.

The tests run in file order on one cluster: B is started (and A stopped) where a test needs the other host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from redis import Redis
from rq import Queue

from app.config import SAMPLE_DATA_DIR, Settings
from app.engine.training import train_and_evaluate
from app.params import TrainParams
from tests.helpers import (
    REPO_ROOT,
    TINY_JOB,
    HostUser,
    MlflowServer,
    make_host_user,
    python_for_other_users,
    service_settings,
    wait_for,
    work_horse_pids,
)

pytestmark = pytest.mark.slow

QUESTION = "is the sky blue on a clear day"
PASSAGE = "On a clear day the sky looks blue because air scatters blue light more than red light."
# Three epochs of 23 steps (180 train rows after a quarter goes to dev), 32 tokens: checkpointed after each epoch.
RESUMED_JOB = dict(
    model="minilm", batch_size=8, lr=1e-4, epochs=3, max_length=32, train_limit=240, eval_limit=8, dev_size=0.25, seed=7
)
FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Host:
    """One machine of the cluster: its own folders, its settings, and the process it runs now."""

    name: str
    folder: Path
    settings: Settings
    user: HostUser | None = None  # as root: the host's own Unix user
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        return {"HF_HOME": str(self.folder / "hf-home")} | (self.user.env() if self.user else {})

    def run(self, argv: list[str], **options) -> subprocess.CompletedProcess:
        """``python argv`` on this host: as its user, with its environment."""
        python, identity = (self.user.python, self.user.identity()) if self.user else (sys.executable, {})
        env = os.environ | {"HF_HUB_OFFLINE": "1", "NUM_THREADS": "1"} | self.env
        return subprocess.run([python, *argv], cwd=REPO_ROOT, env=env, **identity, **options)

    @property
    def runs(self) -> Path:
        return self.settings.artifacts_dir

    def has_finished_run(self, job_id: str) -> bool:
        return (self.runs / job_id / "metrics.json").is_file()


@dataclass
class Cluster:
    url: str  # replica C
    mlflow: MlflowServer
    hosts: dict[str, Host]
    queue: Queue
    launcher: object

    def start_worker(self, name: str) -> None:
        host = self.hosts[name]
        host.process = self.launcher.worker(host.settings, host.env, host.user)

    def stop_worker(self, name: str) -> None:
        """SIGTERM: RQ's warm shutdown, finishing (or failing) the job under way and then taking no other."""
        host = self.hosts[name]
        os.kill(host.process.pid, signal.SIGTERM)
        host.process.wait(timeout=120)

    def job(self, job_id: str) -> dict:
        return requests.get(f"{self.url}/jobs/{job_id}", timeout=30).json()

    def ended(self, job_id: str, timeout_s: float = 300) -> dict:
        return wait_for(
            lambda: (view := self.job(job_id))["status"] in FINAL and view, timeout_s, f"job {job_id} to end", 0.5
        )

    def train(self, params: dict) -> str:
        answer = requests.post(f"{self.url}/train", json=params, timeout=30)
        assert answer.status_code == 202, answer.text
        return answer.json()["job_id"]

    def predict(self, **body) -> requests.Response:
        return requests.post(f"{self.url}/predict", json={"question": QUESTION, "passage": PASSAGE} | body, timeout=120)


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    """Each host's folder (0700) and user: as root, a system user per host (boolq-host-a, -b, -c) owning a folder in
    /tmp (pytest's folders are root's alone); otherwise the test's own user and folders."""
    if os.geteuid() != 0:
        yield {name: (tmp_path_factory.mktemp(f"host-{name}"), None) for name in "ABC"}
        return
    shared = Path(tempfile.mkdtemp(prefix="boolq-multihost-"))
    shared.chmod(0o755)
    try:
        python = python_for_other_users(shared)
        homes = {name: shared / f"host-{name}" for name in "ABC"}
        for home in homes.values():
            home.mkdir()
        yield {name: (home, make_host_user(f"boolq-host-{name.lower()}", home, python)) for name, home in homes.items()}
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(mlflow_server, redis_url, machines, launcher, tmp_path_factory):  # machines' folders outlive processes
    """Worker A and replica C running; B defined (started by the tests that need it)."""
    common = service_settings(
        redis_url,
        tmp_path_factory.mktemp("common"),
        tracker="mlflow",
        mlflow_tracking_uri=mlflow_server.url,
        checkpoint_every_s=0,
    )
    hosts = {}
    for name, (folder, user) in machines.items():
        folder.chmod(0o700)
        settings = common.model_copy(
            update={"artifacts_dir": folder / "runs", "model_cache_dir": folder / "model-cache"}
        )
        hosts[name] = Host(name, folder, settings, user)
    queue = Queue(common.queue_name, connection=Redis.from_url(redis_url))
    api = launcher.server(hosts["C"].settings, workers=1, env=hosts["C"].env, user=hosts["C"].user)
    cluster = Cluster(api, mlflow_server, hosts, queue, launcher)
    cluster.start_worker("A")
    mlflow_server.wait_until_answering()
    return cluster


@pytest.fixture(scope="module")
def tiny_job(cluster):
    job_id = cluster.train(TINY_JOB)
    view = cluster.ended(job_id)
    assert view["status"] == "succeeded", view["error"]
    return job_id


def test_a_job_trained_on_a_is_served_by_c_as_a_itself_predicts(cluster, tiny_job):
    a, c = cluster.hosts["A"], cluster.hosts["C"]
    assert a.has_finished_run(tiny_job) and not (c.runs / tiny_job).exists()

    served = cluster.predict(model=tiny_job)
    assert served.status_code == 200, served.text
    local = a.run(
        ["-m", "app", "predict", "--model-dir", str(a.runs / tiny_job)]
        + ["--text", QUESTION, "--text-pair", PASSAGE, "--top-k", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    on_a = {s["label"]: s["score"] for s in json.loads(local.stdout.splitlines()[-1])["scores"]}
    assert served.json()["probability"] == pytest.approx(on_a["yes"], abs=1e-6)
    assert served.json()["answer"] == (on_a["yes"] >= 0.5)
    assert (c.settings.model_cache_dir / tiny_job / "model" / "config.json").is_file()  # fetched from MLflow


def test_as_root_each_host_runs_as_its_own_user_and_cannot_read_another_hosts_folder(cluster, tiny_job):
    a, c = cluster.hosts["A"], cluster.hosts["C"]
    if os.geteuid() != 0:  # one user for all: what the folders' 0700 alone keeps apart is nothing
        assert a.user is None and os.stat(f"/proc/{a.process.pid}").st_uid == os.geteuid()
        return
    assert os.stat(f"/proc/{a.process.pid}").st_uid == a.user.uid != c.user.uid
    assert {p.stat().st_uid for p in (a.runs, a.runs / tiny_job, a.runs / tiny_job / "model")} == {a.user.uid}
    assert cluster.predict(model=tiny_job).status_code == 200
    assert (c.settings.model_cache_dir / tiny_job).stat().st_uid == c.user.uid  # fetched by C's replica
    peek = ["-c", f"import os; os.listdir({str(a.runs)!r})"]
    refused = c.run(peek, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "PermissionError" in refused.stderr, refused.stderr


def test_c_returns_the_predictions_a_wrote(cluster, tiny_job):
    a = cluster.hosts["A"]
    answer = requests.get(f"{cluster.url}/jobs/{tiny_job}/predictions", timeout=30)
    assert answer.status_code == 200, answer.text
    written = [json.loads(line) for line in (a.runs / tiny_job / "predictions.jsonl").read_text().splitlines()]
    assert answer.json()["predictions"] == written and len(written) == TINY_JOB["eval_limit"]


def test_c_returns_the_rows_of_a_batch_prediction_a_ran(cluster, tiny_job):
    a, c = cluster.hosts["A"], cluster.hosts["C"]
    queued = requests.post(f"{cluster.url}/predictions", json={"model": tiny_job}, timeout=60)
    assert queued.status_code == 202, queued.text
    job_id = queued.json()["job_id"]
    view = cluster.ended(job_id)
    assert view["status"] == "succeeded", view["error"]
    assert a.has_finished_run(job_id) and not (c.runs / job_id).exists()
    answer = requests.get(f"{cluster.url}/jobs/{job_id}/predictions", timeout=60)
    assert answer.status_code == 200, answer.text
    written = [json.loads(line) for line in (a.runs / job_id / "predictions.jsonl").read_text().splitlines()]
    assert answer.json()["predictions"] == written and len(written) == view["result"]["rows"] > 0


def test_a_dataset_uploaded_at_c_is_trained_on_a_and_served_by_c_with_its_label_names(cluster, tmp_path):
    """The file travels through the MLflow server only: A's ARTIFACTS_DIR is not C's."""
    from tests.helpers import write_relation_pairs

    path = write_relation_pairs(tmp_path / "relations.csv", 150, seed=3)
    query = {"text_column": "query", "text_pair_column": "doc", "label_column": "relation"}
    with path.open("rb") as data:
        uploaded = requests.post(f"{cluster.url}/datasets", params=query, files={"file": data}, timeout=120)
    assert uploaded.status_code == 201, uploaded.text
    record = uploaded.json()
    assert record["mlflow_run_id"], record
    job_id = cluster.train(
        {"model": "minilm", "dataset": record["id"], "epochs": 1, "max_length": 32, "batch_size": 16, "eval_limit": 8}
    )
    view = cluster.ended(job_id)
    assert view["status"] == "succeeded", view["error"]
    a, c = cluster.hosts["A"], cluster.hosts["C"]
    assert (a.runs / "datasets" / "files" / f"{record['sha256']}.csv").is_file()  # fetched by A from MLflow
    assert view["result"]["metrics"]["label_names"] == ["no", "unrelated", "yes"]
    served = requests.post(
        f"{cluster.url}/predict", json={"text": QUESTION, "text_pair": PASSAGE, "model": job_id}, timeout=120
    )
    assert served.status_code == 200 and served.json()["label"] in ("no", "unrelated", "yes"), served.text
    assert not (c.runs / job_id).exists()


def test_a_sweep_whose_best_trial_ran_on_a_and_that_b_finishes_registers_and_promotes_that_trial(cluster):
    # One lr and one seed: both trials learn the same, and a tie goes to the earlier trial (the one on A).
    body = {
        "base": TINY_JOB,
        "space": {"lr": [1e-4]},
        "trials": 2,
        "parallel": 1,
        "sampler": "random",
        "pruner": "none",
        "promote": True,
        "seed": 1,
    }
    answer = requests.post(f"{cluster.url}/sweeps", json=body, timeout=30)
    assert answer.status_code == 202, answer.text
    sweep_id = answer.json()["sweep_id"]
    first = wait_for(lambda: cluster.queue.started_job_registry.get_job_ids(), 120, "the first trial to start", 0.1)
    cluster.stop_worker("A")  # A finishes trial 0 (which queues trial 1) and takes nothing more
    cluster.start_worker("B")

    def ended():
        view = requests.get(f"{cluster.url}/sweeps/{sweep_id}", timeout=30).json()
        return view if view["status"] != "running" else None

    view = wait_for(ended, 300, f"sweep {sweep_id} to end", interval_s=0.5)
    trials = {row["trial"]: row["job_id"] for row in view["leaderboard"]}
    assert trials[0] == first[0] and view["counts"]["succeeded"] == 2, view
    assert cluster.hosts["A"].has_finished_run(trials[0]) and not cluster.hosts["B"].has_finished_run(trials[0])
    assert cluster.hosts["B"].has_finished_run(trials[1])
    registration = view["registration"]
    assert registration["job_id"] == trials[0] and registration["promoted"] is True, registration
    assert cluster.predict().json()["model"] == trials[0]  # the new champion, fetched by C


def test_after_promoting_a_job_c_serves_the_champion_when_no_model_is_named(cluster, tiny_job):
    promoted = requests.post(f"{cluster.url}/models/champion", json={"job_id": tiny_job, "force": True}, timeout=60)
    assert promoted.status_code == 200, promoted.text
    served = cluster.predict()
    assert served.status_code == 200 and served.json()["model"] == tiny_job
    assert served.json()["probability"] == pytest.approx(cluster.predict(model=tiny_job).json()["probability"])


def uploaded_checkpoint(cluster: Cluster, job_id: str) -> bool:
    from app.tracking.mlflow_runs import MlflowRuns

    runs = MlflowRuns(cluster.mlflow.url, cluster.hosts["A"].settings.mlflow_experiment_name)
    return any(runs.client.list_artifacts(run.info.run_id, "checkpoint") for run in runs.runs_of_job(job_id, False))


def test_a_job_killed_on_a_after_its_first_checkpoint_resumes_on_b_as_if_never_killed(cluster, tmp_path):
    cluster.stop_worker("B")
    cluster.start_worker("A")
    a = cluster.hosts["A"]
    job_id = cluster.train(RESUMED_JOB)
    wait_for(lambda: cluster.job(job_id)["status"] == "running", 120, "the job to start on A", 0.1)
    (horse,) = work_horse_pids(a.process.pid)
    wait_for(lambda: uploaded_checkpoint(cluster, job_id), 300, "A's first checkpoint on the MLflow server", 0.1)
    os.killpg(horse, signal.SIGSTOP)  # hold A's training where it is while B starts
    cluster.start_worker("B")
    os.kill(a.process.pid, signal.SIGTERM)  # A: fail (and so retry) the job under way, then take no other
    os.killpg(horse, signal.SIGKILL)
    a.process.wait(timeout=120)

    view = cluster.ended(job_id)
    assert view["status"] == "succeeded", view["error"]
    assert view["attempt"] == 2 and view["previous_attempt"]["type"] == "WorkerKilled", view  # JOB_RETRIES's default
    assert cluster.hosts["B"].has_finished_run(job_id) and not a.has_finished_run(job_id)
    metrics = view["result"]["metrics"]
    assert metrics["resumed_from_step"] > 0
    whole = train_and_evaluate(TrainParams(**RESUMED_JOB), SAMPLE_DATA_DIR, tmp_path / "whole", num_threads=1)
    assert len(metrics["loss_curve"]) == len(whole.metrics["loss_curve"]) == 3 * 23
    assert metrics["loss_curve"] == pytest.approx(whole.metrics["loss_curve"], abs=1e-4)


def readiness(cluster: Cluster) -> tuple[int, str, str]:
    answer = requests.get(f"{cluster.url}/readyz", timeout=30)
    return answer.status_code, answer.json()["status"], answer.json()["checks"]["mlflow"]


def test_with_mlflow_stopped_mid_run_the_job_fails_fast_c_answers_503_and_all_recovers_when_it_returns(cluster):
    """The service's own MLflow client settings (no MLFLOW_HTTP_* in any host's environment): seconds, not minutes.
    The job is not re-run (it raised), C serves nothing it cannot fetch, and nothing needs a restart afterwards."""
    assert readiness(cluster) == (200, "ok", "ok")
    uncached = cluster.train(TINY_JOB)
    assert cluster.ended(uncached)["status"] == "succeeded"
    job_id = cluster.train(RESUMED_JOB)
    wait_for(lambda: (cluster.job(job_id)["progress"] or {}).get("step", 0) >= 1, 300, "the job to train", 0.1)
    cluster.mlflow.stop()
    stopped = time.monotonic()
    view = cluster.ended(job_id, timeout_s=120)
    assert time.monotonic() - stopped < 60
    assert view["status"] == "failed" and view["attempt"] == 1, view
    assert view["error"]["type"] == "TrackingFailed", view["error"]
    assert "mlflow tracking server failed" in view["error"]["message"]
    served = cluster.predict(model=job_id)  # no worker recorded a model of it: C need not ask the server to know
    assert served.status_code == 422 and "not a succeeded job id" in served.json()["error"]["message"], served.text
    asked = time.monotonic()
    served = cluster.predict(model=uncached)  # recorded, but C never fetched it and cannot now
    assert time.monotonic() - asked < 30
    assert served.status_code == 503 and served.json()["error"]["code"] == "model_store_unavailable", served.text
    assert requests.get(f"{cluster.url}/jobs/{job_id}/predictions", timeout=30).status_code == 409
    status, overall, mlflow = readiness(cluster)
    assert (status, overall) == (200, "degraded") and mlflow.startswith("unreachable"), mlflow
    for host in cluster.hosts.values():
        assert not host.has_finished_run(job_id)
        assert not (host.settings.model_cache_dir / job_id).exists()

    cluster.mlflow.start()
    cluster.mlflow.wait_until_answering()
    assert readiness(cluster) == (200, "ok", "ok")
    assert cluster.predict(model=uncached).status_code == 200
    again = cluster.train(TINY_JOB)
    assert cluster.ended(again)["status"] == "succeeded"


WEIGHTS = "model.safetensors"
# Staging files of an upload under way on the server (MLflow's local artifact store renames them when complete).
STAGING_PREFIX = ".artifact.uploading."


def live_worker(cluster: Cluster) -> Host:
    """The host whose worker runs now (the tests before this one start and stop A and B)."""
    (host,) = [h for h in cluster.hosts.values() if h.process is not None and h.process.poll() is None]
    return host


def run_artifacts_on_server(cluster: Cluster, job_id: str) -> Path | None:
    """Where the MLflow server keeps the artifacts of the job's run (``mlflow-artifacts:/<experiment>/<run>/…``
    under its ``--artifacts-destination``), once the worker has created that run."""
    from urllib.parse import urlsplit

    from app.tracking.mlflow_runs import MlflowRuns

    runs = MlflowRuns(cluster.mlflow.url, cluster.hosts["A"].settings.mlflow_experiment_name).runs_of_job(job_id, False)
    if not runs:
        return None
    return cluster.mlflow.folder / "artifacts" / urlsplit(runs[0].info.artifact_uri).path.lstrip("/")


def is_reading(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds ``path`` open for reading only: MLflow's client opens each file it uploads
    and closes it once the server has answered that file's PUT."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fds):
        try:
            if os.readlink(fds / fd) != str(path):
                continue
            info = dict(line.split(":", 1) for line in (fds.parent / "fdinfo" / fd).read_text().splitlines())
        except FileNotFoundError:  # closed meanwhile
            continue
        if int(info["flags"].strip(), 8) & os.O_ACCMODE == os.O_RDONLY:
            return True
    return False


def complete_files(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {path.name for path in folder.iterdir() if not path.name.startswith(STAGING_PREFIX)}


def test_with_mlflow_killed_while_the_model_uploads_the_job_fails_and_its_run_folder_is_unfinished(cluster):
    """The server dies in the middle of the finished model's upload: held there (SIGSTOP) the moment the worker
    sends the weights, checked to be short of the model's files, then killed (SIGKILL). The job fails
    TrackingFailed and is not re-run, and the worker's run folder loses the metrics.json it had written, so
    nothing takes the half-uploaded run for a finished one (docs/several-machines.md)."""
    host = live_worker(cluster)
    job_id = cluster.train(TINY_JOB)
    wait_for(lambda: cluster.job(job_id)["status"] == "running", 120, "the job to start", 0.1)
    (horse,) = work_horse_pids(host.process.pid)
    on_server = wait_for(lambda: run_artifacts_on_server(cluster, job_id), 120, "the job's MLflow run", 0.2)
    model = (host.runs / job_id / "model").resolve()
    # metrics.json is written last, then the run's files and the model are uploaded: from then on, watch closely.
    wait_for(lambda: host.has_finished_run(job_id), 300, "the job to finish training", 0.05)
    wait_for(lambda: is_reading(horse, model / WEIGHTS), 60, "the worker to send the model's weights", 0.002)
    server = cluster.mlflow.process
    os.killpg(server.pid, signal.SIGSTOP)
    try:
        assert (on_server / "metrics.json").is_file()  # the run's own files went first
        uploaded, local = complete_files(on_server / "model"), complete_files(model)
        assert uploaded < local, f"not stopped mid-upload: the server had {sorted(uploaded)} of {sorted(local)}"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    killed = time.monotonic()
    try:
        view = cluster.ended(job_id, timeout_s=120)
        print(f"killed with {len(uploaded)} of the model's {len(local)} files on the server; job ended after "
              f"{time.monotonic() - killed:.1f} s")  # fmt: skip
    finally:
        cluster.mlflow.start()
        cluster.mlflow.wait_until_answering()

    assert view["status"] == "failed" and view["attempt"] == 1, view
    assert view["error"]["type"] == "TrackingFailed", view["error"]
    assert "mlflow tracking server failed" in view["error"]["message"]
    assert not host.has_finished_run(job_id) and (host.runs / job_id / "params.json").is_file()
    served = cluster.predict(model=job_id)
    assert served.status_code == 422 and "not a succeeded job id" in served.json()["error"]["message"], served.text
    from app.tracking.mlflow_runs import MlflowRuns

    runs = MlflowRuns(cluster.mlflow.url, host.settings.mlflow_experiment_name)
    assert runs.runs_of_job(job_id, finished_only=False) and not runs.runs_of_job(job_id, finished_only=True)
