"""Driving a sweep over RQ: top trials up to ``parallel``, notice dead ones, register the best at the end."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

import optuna
from optuna.trial import TrialState
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue
from rq.job import Job

from app.config import Settings
from app.engine import run_folder
from app.params import TrainParams
from app.service import jobs, model_store, registry
from app.service.admission import Admission, NoRoom
from app.service.redaction import without_server_addresses, without_server_paths
from app.service.redis_connection import service_key
from app.service.sweeps.spec import TRIAL_TASK, SweepRequest
from app.service.sweeps.study import distributions, load_study, owner_of, storage, sweep_ids, trial_params
from app.tracking import models_travel_through_mlflow

log = logging.getLogger(__name__)


def create_sweep(
    request: SweepRequest,
    base: TrainParams,
    settings: Settings,
    queue: Queue | None,
    client: str = "local",
    owner: str | None = None,
) -> str:
    """Create the study (its spec in user attributes) and, with a queue, start its first trials.

    Its trials are admitted like any job, counted against ``client``, and owned by ``owner`` (the key that asked);
    with no room for even one now, nothing is created (:class:`NoRoom`)."""

    if queue is not None:
        Admission(queue, settings).check_room(client)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_id = str(uuid.uuid4())
    study = optuna.create_study(study_name=sweep_id, storage=storage(settings), direction="maximize")
    spec = request.model_dump(mode="json", exclude_none=True) | {"base": base.model_dump()}
    study.set_user_attr("spec", spec)
    study.set_user_attr("client", client)
    study.set_user_attr("owner", owner)
    study.set_user_attr("created_at", time.time())
    if queue is not None:
        advance(settings, queue, sweep_id)
    return sweep_id


def advance_unfinished(settings: Settings, queue: Queue) -> None:
    """Advance every sweep that has not ended: the workers' periodic check (a trial whose worker died, a trial
    the full queue kept from starting). One sweep's error is logged and never keeps the check from the others."""
    for sweep_id in sweep_ids(settings):
        try:
            if not load_study(settings, sweep_id, telling=True).user_attrs.get("ended_at"):
                advance(settings, queue, sweep_id)
        except (RedisConnectionError, RedisTimeoutError):
            raise  # Redis is away for every sweep: the next check tries again
        except Exception:
            log.exception("sweep %s: the periodic check failed on it", sweep_id)


def advance(settings: Settings, queue: Queue, sweep_id: str, ending: str | None = None) -> None:
    """Reconcile trials whose job died, start trials up to ``parallel`` as admission allows, finish the sweep
    when all have ended. ``ending``: the trial job calling this as it ends (not counted against the client).
    A sweep whose driving fails (not for a Redis gap) ends ``failed``, never stays running."""
    with queue.connection.lock(service_key(settings.queue_name, "sweep-lock", sweep_id), timeout=120):
        study = load_study(settings, sweep_id, telling=True)
        if study.user_attrs.get("ended_at"):
            return
        try:
            top_up(settings, queue, study, ending)
        except (RedisConnectionError, RedisTimeoutError):
            raise  # a gap (a failover): the next trial end or periodic check tries again
        except Exception as exc:
            log.exception("sweep %s: driving it failed; it ends failed", sweep_id)
            fail(study, queue, f"{type(exc).__name__}: {exc}")


def top_up(settings: Settings, queue: Queue, study, ending: str | None) -> None:
    sweep_id = study.study_name
    spec, attrs = study.user_attrs["spec"], study.user_attrs
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            status = trial_job_status(queue, trial.user_attrs.get("job_id"))
            if status in ("failed", "cancelled"):
                end_trial(study, trial.number, TrialState.FAIL, outcome=status)
    trials = study.get_trials(deepcopy=False)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    asked = len(trials)
    while not attrs.get("cancelled") and running < spec["parallel"] and asked < spec["trials"]:
        try:
            start_trial(settings, queue, sweep_id, asked, attrs.get("client") or f"sweep:{sweep_id}", ending)
        except NoRoom as exc:  # the next trial end, a POST or the workers' periodic check tries again
            log.info("sweep %s: trial %d waits: %s", sweep_id, asked, exc.message)
            break
        running, asked = running + 1, asked + 1
    if running == 0 and (asked >= spec["trials"] or attrs.get("cancelled")):
        finish(settings, queue, sweep_id)


def fail(study, queue: Queue, reason: str) -> None:
    """End a sweep its driver cannot go on with: record why, stop its trials; nothing is registered."""
    study.set_user_attr("failure", without_server_addresses(without_server_paths(reason))[:500])
    try:
        stop_trials(study, queue)
    finally:
        study.set_user_attr("ended_at", time.time())


def start_trial(
    settings: Settings, queue: Queue, sweep_id: str, asked: int, client: str, ending: str | None = None
) -> Job:
    """Admit and enqueue the next trial (a job like any other: admitted, listed in GET /jobs); the trial is asked
    of Optuna only once admitted, so a refused one leaves no trace."""
    admission = Admission(queue, settings)

    def enqueue() -> Job:
        study = load_study(settings, sweep_id, asked)
        spec = study.user_attrs["spec"]
        trial = study.ask(fixed_distributions=distributions(spec["space"]))
        job_id = str(uuid.uuid4())
        trial.set_user_attr("job_id", job_id)
        return jobs.enqueue_job(
            queue,
            TRIAL_TASK,
            [trial_params(spec, trial.params), sweep_id, trial.number],
            settings,
            job_id=job_id,
            meta={"sweep": {"sweep_id": sweep_id, "trial": trial.number}},
            description=f"sweep {sweep_id} trial {trial.number}",
            owner=owner_of(study),
        )

    return admission.admit(client, enqueue, ending)


def trial_job_status(queue: Queue, job_id: str | None) -> str:
    try:
        return jobs.public_status(jobs.fetch_job(queue, job_id)) if job_id else "failed"
    except jobs.JobNotFound:
        return "failed"


def end_trial(study, number: int, state, value: float | None = None, outcome: str | None = None, **attrs) -> bool:
    """Tell Optuna how a trial ended (once; False if it had already been told) and record what goes with it."""

    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    for key, item in (attrs | ({"outcome": outcome} if outcome else {})).items():
        study._storage.set_trial_user_attr(trial_id, key, item)
    try:
        study.tell(number, state=state, values=value if state == TrialState.COMPLETE else None)
    except (RuntimeError, ValueError):  # already ended (cancelled by the API while its job was finishing)
        return False
    return True


def finish(settings: Settings, queue: Queue | None, sweep_id: str) -> None:
    """Mark the sweep ended; unless cancelled, register its best trial (by dev accuracy) and maybe promote it."""
    conclude(load_study(settings, sweep_id, telling=True), settings, queue)


def conclude(study, settings: Settings, queue: Queue | None) -> None:
    spec, attrs = study.user_attrs["spec"], study.user_attrs
    if not attrs.get("cancelled"):
        best = best_trial(study)
        if best is not None:
            try:
                study.set_user_attr("registration", register_best(settings, queue, best, spec))
            except registry.RegistryOff:
                pass  # no MLflow tracker, no registry: the leaderboard still names the best trial
            except Exception as exc:  # the sweep must still end; the failure is shown in its view
                log.exception("sweep %s: registering the best trial failed", study.study_name)
                reason = without_server_addresses(str(exc))[:500]
                study.set_user_attr("registration", {"version": None, "promoted": False, "reason": reason})
    study.set_user_attr("ended_at", time.time())


def register_best(settings: Settings, queue: Queue | None, best, spec: dict) -> dict:
    """Register the best trial's model, promote it if asked; what happened, for the sweep's view."""
    models = registry.ModelRegistry(settings)
    job_id, mlflow_run_id = best.user_attrs["job_id"], best.user_attrs.get("mlflow_run_id")
    if models_travel_through_mlflow(settings):  # the trial may have run on another host: read its MLflow run
        model_dir = None
        params, metrics = model_store.published_records(mlflow_run_id, settings)
    else:
        run_dir = settings.artifacts_dir / job_id
        model_dir, params = run_dir / run_folder.MODEL, run_folder.read_params(run_dir)
        metrics = run_folder.read_metrics(run_dir)
    if metrics is None:
        return {"version": None, "promoted": False, "reason": f"the run of job {job_id} has no metrics"}
    version = models.register(model_dir, job_id, params, metrics, mlflow_run_id)
    outcome = {"version": version.version, "job_id": job_id, "promoted": False, "reason": None}
    if spec["promote"]:
        try:
            champion = models.promote(version)
            if queue is not None:
                registry.write_champion_pointer(queue.connection, settings, champion)
            outcome["promoted"] = True
        except registry.NotBetter as exc:
            outcome["reason"] = str(exc)
    return outcome


def best_trial(study):
    """The completed trial with the highest dev accuracy (the earliest among equals); val plays no part."""

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    return max(done, key=lambda t: (t.value, -t.number), default=None)


def cancel_sweep(settings: Settings, queue: Queue, sweep_id: str) -> None:
    """Stop starting trials, cancel the queued and running ones, and end the sweep (nothing is registered)."""
    with queue.connection.lock(service_key(settings.queue_name, "sweep-lock", sweep_id), timeout=120):
        study = load_study(settings, sweep_id, telling=True)
        if study.user_attrs.get("ended_at"):
            raise jobs.JobAlreadyFinished(f"sweep {sweep_id} has already ended")
        study.set_user_attr("cancelled", True)
        stop_trials(study, queue)
        finish(settings, queue, sweep_id)


def stop_trials(study, queue: Queue) -> None:
    """Cancel the sweep's queued and running trials, their jobs too."""

    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.RUNNING:
            job_id = trial.user_attrs.get("job_id")
            with contextlib.suppress(jobs.JobNotFound, jobs.JobAlreadyFinished):
                if job_id:
                    jobs.cancel_training(queue, jobs.fetch_job(queue, job_id))
            end_trial(study, trial.number, TrialState.FAIL, outcome="cancelled")
