"""One sweep trial: a training run that reports dev accuracy to its Optuna trial after every epoch and stops
when the pruner says so. ``trial_job`` is the worker's task (enqueued by name by ``app.service.sweeps``);
``run_trial`` is shared with the CLI's local sweep.
"""

from __future__ import annotations

import logging
import time
import uuid

import optuna
from optuna.trial import TrialState
from rq import get_current_job

from app.config import Settings
from app.engine import run_folder
from app.engine.run import run_training
from app.engine.run_folder import RunResult
from app.params import TrainParams
from app.service import attempts, sweeps
from app.service.jobs import training_queue
from app.service.model_access import resolve_for_training
from app.service.model_records import publishing_tracker
from app.service.model_store import resume_or_start_over
from app.service.tasks import ProgressReporter, dataset_of, fence_of

log = logging.getLogger(__name__)


class Pruned(optuna.TrialPruned):
    """The pruner stopped the trial after ``epoch``."""

    run_status = "KILLED"  # what the tracker records: stopped on purpose, not failed

    def __init__(self, epoch: int):
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch = epoch


def run_trial(
    trial: optuna.Trial,
    params: TrainParams,
    settings: Settings,
    run_id: str,
    on_progress=None,
    tracker=None,
    dataset=None,
    fence=None,
) -> RunResult:
    """Train with ``params`` on ``dataset`` (an uploaded one's spec; None: the built-in), reporting each epoch's dev
    accuracy to ``trial``; raises :class:`Pruned`. ``fence``: as ``run_training``'s."""

    def report(progress) -> None:
        if on_progress is not None:
            on_progress(progress)
        if progress.dev_accuracy is not None:
            trial.report(progress.dev_accuracy, progress.epoch)
            if trial.should_prune():
                raise Pruned(progress.epoch)

    params = resolve_for_training(params, settings)
    try:
        return run_training(
            params, settings, run_id=run_id, on_progress=report, tracker=tracker, dataset=dataset, fence=fence
        )
    except Pruned:
        run_folder.remove_training_state(settings.artifacts_dir / run_id)
        run_folder.remove_unfinished(settings.artifacts_dir / run_id)  # a pruned trial leaves no model
        raise


def trial_job(params_dict: dict, sweep_id: str, number: int) -> dict:
    """Run trial ``number`` of the sweep, tell the study how it ended, and let the sweep start the next one."""
    settings = Settings()
    job = get_current_job()
    queue = training_queue(settings, job.connection)
    study = sweeps.load_study(settings, sweep_id, telling=True)
    trial = optuna.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
    resume_or_start_over(job.id, settings)
    try:
        params = TrainParams(**params_dict)
        tracker = publishing_tracker(job.connection, settings, job.id)
        dataset = dataset_of(params, settings, job.connection)
        result = run_trial(trial, params, settings, job.id, ProgressReporter(job), tracker, dataset, fence_of(job))
    except attempts.AttemptSuperseded:
        raise  # the newer attempt tells the study how the trial ended
    except Pruned as pruned:
        job.meta["pruned_at_epoch"] = pruned.epoch
        job.save_meta()
        sweeps.end_trial(study, number, TrialState.PRUNED)
        sweeps.advance(settings, queue, sweep_id, ending=job.id)
        return {"status": "pruned", "pruned_at_epoch": pruned.epoch}
    except Exception:  # never re-run (only a worker's death is): the trial has failed
        sweeps.end_trial(study, number, TrialState.FAIL, outcome="failed")
        sweeps.advance(settings, queue, sweep_id, ending=job.id)
        raise
    sweeps.end_trial(
        study,
        number,
        TrialState.COMPLETE,
        value=result.dev_accuracy,
        val_accuracy=result.accuracy,
        mlflow_run_id=(result.tracking.get("mlflow") or {}).get("mlflow_run_id"),
    )
    sweeps.advance(settings, queue, sweep_id, ending=job.id)
    return result.to_dict()


def run_local_sweep(request: sweeps.SweepRequest, base: TrainParams, settings: Settings) -> dict:
    """``python -m app sweep``: the sweep in this process (``parallel`` threads), on a journal file under
    ARTIFACTS_DIR/sweeps; registers (and with ``promote`` promotes) the best trial. Returns the sweep's view."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = request.model_dump(mode="json", exclude_none=True) | {"base": base.model_dump()}
    sweep_id = str(uuid.uuid4())
    study = optuna.create_study(
        study_name=sweep_id,
        storage=sweeps.local_storage(settings.artifacts_dir / "sweeps"),
        direction="maximize",
        sampler=sweeps.make_sampler(spec, 0),
        pruner=sweeps.make_pruner(spec),
    )
    study.set_user_attr("spec", spec)
    study.set_user_attr("created_at", time.time())

    def objective(trial: optuna.Trial) -> float:
        run_id = run_folder.new_run_id()
        trial.set_user_attr("job_id", run_id)
        params = TrainParams(**sweeps.trial_params(spec, sweeps.suggest(trial, spec["space"])))
        result = run_trial(trial, params, settings, run_id)
        trial.set_user_attr("val_accuracy", result.accuracy)
        trial.set_user_attr("mlflow_run_id", (result.tracking.get("mlflow") or {}).get("mlflow_run_id"))
        return result.dev_accuracy

    def announce(study, trial) -> None:
        log.info(
            "trial %d %s: dev accuracy per epoch %s",
            trial.number,
            trial.state.name.lower(),
            [round(v, 4) for _, v in sorted(trial.intermediate_values.items())],
        )

    study.optimize(
        objective, n_trials=request.trials, n_jobs=request.parallel, catch=(Exception,), callbacks=[announce]
    )
    sweeps.conclude(study, settings, None)
    view = sweeps.view_of(study, None)
    if view["best"] is not None:
        view["best"]["run_dir"] = str(settings.artifacts_dir / view["best"]["job_id"])
    return view
