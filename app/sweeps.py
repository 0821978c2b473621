"""Hyperparameter sweeps: an Optuna study whose trials run as ordinary training jobs on the RQ workers.

The study lives in Optuna's journal storage on the service's Redis, so every API replica and worker sees
the same sweep. Nothing here waits for a trial: :func:`advance` (run when a sweep is created, when a trial
ends in its worker, and when a sweep is read) tells Optuna about trials whose job died, tops the running
trials up to ``parallel`` with new jobs, and finishes the sweep when the last trial has ended: the best
trial **by dev accuracy** is registered (the only version a sweep registers) and, with ``promote``, made
champion. Val accuracy is shown beside dev accuracy and never used to choose. No torch here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import uuid
import warnings
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tag,
    ValidationError,
    model_validator,
)
from rq import Queue, Retry
from rq.job import Job

from app import jobs, registry, run_folder
from app.config import Settings
from app.job_index import JobIndex
from app.model_access import ModelNotAllowed, model_for_training
from app.params import TrainParams

log = logging.getLogger(__name__)

TRIAL_TASK = "app.trials.trial_job"
# BoolQ's train split, for the compute budget when DATA_DIR is the hub.
BOOLQ_TRAIN_ROWS = 9427
# The median pruner compares a trial with the trials before it only once this many have finished.
MEDIAN_STARTUP_TRIALS = 2
Number = StrictFloat | StrictInt
# Trials run in one process each (a sweep spreads over workers instead), so `devices` is not searched either.
SearchableFields = tuple(name for name in TrainParams.model_fields if name not in ("register", "devices"))


class SweepError(ValueError):
    """A sweep request breaks a rule; ``fields`` maps each offending field to its rule."""

    def __init__(self, fields: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in fields.items()))
        self.fields = fields


class SweepNotFound(LookupError):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(Strict):
    """A numeric range: uniform, ``log``-uniform, or on a grid of ``step``."""

    low: Number
    high: Number
    log: StrictBool = False
    step: Number | None = Field(None, gt=0)

    @model_validator(mode="after")
    def ordered(self):
        if self.low > self.high:
            raise ValueError("low must not exceed high")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


Choices = Annotated[list[Any], Field(min_length=1, max_length=100)]
# A list is choices and anything else a range, so an error names that one rule, not both union members'.
# The tags are spelt like pydantic's own union labels ("list[...]"), which error messages leave out of field names.
SpaceEntry = Annotated[
    Annotated[Choices, Tag("list[choices]")] | Annotated[Range, Tag("dict[range]")],
    Discriminator(lambda v: "list[choices]" if isinstance(v, list) else "dict[range]"),
]


class Threshold(Strict):
    """Prune a trial as soon as its dev accuracy after an epoch is below ``threshold``."""

    threshold: Annotated[Number, Field(ge=0, le=1)]


class SweepRequest(Strict):
    """``POST /sweeps`` (and the CLI's ``--space`` file): fixed params, the searched space, and how to search it."""

    base: dict[str, Any] = Field(default_factory=dict, description="TrainParams every trial shares.")
    space: Annotated[
        dict[str, SpaceEntry],
        Field(min_length=1, description="TrainParams fields to search: {low, high, log?, step?} or a list of choices."),
    ]
    trials: Annotated[StrictInt, Field(ge=1, le=500, description="Trials to run.")] = 8
    parallel: Annotated[StrictInt, Field(ge=1, le=64, description="Trials running at once, at most.")] = 1
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "none"] | Threshold = "median"
    promote: StrictBool = Field(False, description="Promote the best trial to champion when the sweep ends.")
    seed: Annotated[StrictInt | None, Field(ge=0, description="Seed of the sampler (default: random).")] = None


def validate_request(request: SweepRequest, settings: Settings) -> TrainParams:
    """The rules beyond the shapes: each field searchable, each bound and choice a valid value of its field,
    grid on lists only, the compute budget. Returns the base params; raises SweepError naming each field."""
    errors: dict[str, str] = {}
    try:
        base = TrainParams(**({"model": settings.default_model} | request.base))
        model_for_training(base.model, settings)
    except ValidationError as exc:
        errors |= {f"base.{'.'.join(map(str, e['loc']))}": e["msg"] for e in exc.errors(include_url=False)}
        base = TrainParams()
    except ModelNotAllowed as exc:
        errors["base.model"] = str(exc)
    if base.devices > 1:
        errors["base.devices"] = "sweep trials train on one device each; leave devices at 1"
    for name, entry in request.space.items():
        where = f"space.{name}"
        if name not in SearchableFields:
            errors[where] = f"not a searchable field; searchable: {', '.join(SearchableFields)}"
            continue
        if isinstance(entry, Range):
            rule = range_rule(name, entry)
            values = [entry.low, entry.high]
        else:
            rule, values = None, entry
            if len({repr(v) for v in entry}) != len(entry):
                rule = "choices must be distinct"
        if request.sampler == "grid" and isinstance(entry, Range):
            rule = "the grid sampler needs a list of choices, not a range"
        for value in values:
            rule = rule or value_rule(base, name, value, settings)
        if rule:
            errors[where] = rule
    if request.sampler == "grid" and not errors:
        combinations = math.prod(len(entry) for entry in request.space.values())
        if request.trials > combinations:
            errors["trials"] = f"the grid has {combinations} combinations; ask for at most that many trials"
    if not errors:
        cost, limit = examples_to_train(request, base, settings), settings.sweep_max_examples
        if cost > limit:
            errors["trials"] = (
                f"the sweep may train up to {cost} examples (trials × epochs × train rows), "
                f"over the budget SWEEP_MAX_EXAMPLES={limit}"
            )
    if errors:
        raise SweepError(errors)
    return base


def range_rule(name: str, entry: Range) -> str | None:
    kind = field_kind(name)
    if kind not in ("integer", "number"):
        return "a range needs a numeric field; give a list of choices"
    ints = [entry.low, entry.high] + ([entry.step] if entry.step is not None else [])
    if kind == "integer" and not all(isinstance(v, int) for v in ints):
        return "an integer field needs integer low, high and step"
    return None


@functools.cache
def field_kind(name: str) -> str:
    """The JSON type of a TrainParams field without its null: "integer", "number" (float or int), or another."""
    schema = TrainParams.model_json_schema()["properties"][name]
    types = {option.get("type") for option in schema.get("anyOf", [schema])} - {"null"}
    return "number" if "number" in types else "integer" if types == {"integer"} else "other"


def value_rule(base: TrainParams, name: str, value: Any, settings: Settings) -> str | None:
    try:
        TrainParams(**(base.model_dump() | {name: value}))
        if name == "model":
            model_for_training(value, settings)
    except ValidationError as exc:
        return f"{value!r}: {exc.errors(include_url=False)[0]['msg']}"
    except ModelNotAllowed as exc:
        return str(exc)
    return None


def examples_to_train(request: SweepRequest, base: TrainParams, settings: Settings) -> int:
    """The most training examples the sweep can take: trials × the largest epochs × the largest train rows."""

    def largest(name: str, default):
        entry = request.space.get(name)
        if entry is None:
            return default
        values = [entry.high] if isinstance(entry, Range) else entry
        return max(default if v is None else v for v in values)

    rows = available_train_rows(settings)
    return int(
        request.trials * largest("epochs", base.epochs) * min(largest("train_limit", base.train_limit or rows), rows)
    )


def available_train_rows(settings: Settings) -> int:
    train = settings.data_dir / "train.jsonl"
    if not train.is_file():
        return BOOLQ_TRAIN_ROWS
    with train.open("rb") as lines:
        return sum(1 for line in lines if line.strip())


# --- Optuna ---------------------------------------------------------------------------------------------------


def storage(settings: Settings):
    """The journal storage on the service's Redis, one journal per queue (so services sharing a Redis stay apart)."""
    return journal_on_redis(settings.redis_url, f"boolq:{settings.queue_name}:optuna")


@functools.lru_cache(maxsize=8)
def journal_on_redis(redis_url: str, prefix: str):
    """One storage per process: a new one replays the whole journal, a kept one reads only what was appended."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalRedisBackend

    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # the Redis journal, stable in use since v3.1
    return JournalStorage(JournalRedisBackend(redis_url, prefix=prefix))


def distributions(space: dict) -> dict:
    """Optuna distributions of the space (integer fields get integer distributions)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    found = {}
    for name, entry in space.items():
        entry = Range(**entry) if isinstance(entry, dict) else entry
        if isinstance(entry, list):
            found[name] = CategoricalDistribution(entry)
        elif field_kind(name) == "integer":
            found[name] = IntDistribution(entry.low, entry.high, log=entry.log, step=entry.step or 1)
        else:
            found[name] = FloatDistribution(entry.low, entry.high, log=entry.log, step=entry.step)
    return found


def suggest(trial, space: dict) -> dict:
    """Draw the space's values through ``trial``'s suggest API (the in-process loop of ``python -m app sweep``)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    drawn = {}
    for name, dist in distributions(space).items():
        if isinstance(dist, CategoricalDistribution):
            drawn[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, IntDistribution):
            drawn[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            drawn[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return drawn


def local_storage(folder):
    """A journal file for a sweep run without a server (``python -m app sweep``)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    folder.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(folder / "sweeps.journal")))


def make_sampler(spec: dict, asked: int):
    """The sampler, rebuilt for each ask (any process may ask); a seed is offset by the trials asked so far,
    so a seeded sampler draws a new point each time yet the sweep stays reproducible."""
    import optuna

    seed = None if spec.get("seed") is None else spec["seed"] + asked
    if spec["sampler"] == "grid":
        return optuna.samplers.GridSampler(spec["space"], seed=seed)
    if spec["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(spec: dict):
    import optuna

    pruner = spec["pruner"]
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=0)
    if isinstance(pruner, dict):
        return optuna.pruners.ThresholdPruner(lower=pruner["threshold"])
    return optuna.pruners.NopPruner()


def load_study(settings: Settings, sweep_id: str, asked: int = 0, telling: bool = False):
    """The sweep's study with its sampler and pruner. ``telling``: to report and tell only, so a plain sampler
    (the grid sampler would try to stop an optimize loop that does not exist here when the grid is done)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        summary = optuna.load_study(study_name=sweep_id, storage=storage(settings))
    except KeyError as exc:
        raise SweepNotFound(sweep_id) from exc
    spec = summary.user_attrs["spec"]
    return optuna.load_study(
        study_name=sweep_id,
        storage=summary._storage,
        sampler=optuna.samplers.RandomSampler() if telling else make_sampler(spec, asked),
        pruner=make_pruner(spec),
    )


def create_sweep(request: SweepRequest, base: TrainParams, settings: Settings, queue: Queue | None) -> str:
    """Create the study (its spec in user attributes) and, with a queue, start its first trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_id = str(uuid.uuid4())
    study = optuna.create_study(study_name=sweep_id, storage=storage(settings), direction="maximize")
    spec = request.model_dump(mode="json", exclude_none=True) | {"base": base.model_dump()}
    study.set_user_attr("spec", spec)
    study.set_user_attr("created_at", time.time())
    if queue is not None:
        advance(settings, queue, sweep_id)
    return sweep_id


def trial_params(spec: dict, sampled: dict) -> dict:
    """A trial's TrainParams: the base, the sampled values, and no registration (a sweep registers its best)."""
    return spec["base"] | sampled | {"register": False}


# --- Driving a sweep over RQ --------------------------------------------------------------------------------------


def advance(settings: Settings, queue: Queue, sweep_id: str) -> None:
    """Reconcile trials whose job died, start trials up to ``parallel``, finish the sweep when all have ended."""
    from optuna.trial import TrialState

    with queue.connection.lock(f"boolq:{settings.queue_name}:sweep-lock:{sweep_id}", timeout=120):
        study = load_study(settings, sweep_id, telling=True)
        spec, attrs = study.user_attrs["spec"], study.user_attrs
        if attrs.get("ended_at"):
            return
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
            start_trial(settings, queue, sweep_id, asked)
            running, asked = running + 1, asked + 1
        if running == 0 and (asked >= spec["trials"] or attrs.get("cancelled")):
            finish(settings, queue, sweep_id)


def start_trial(settings: Settings, queue: Queue, sweep_id: str, asked: int) -> Job:
    study = load_study(settings, sweep_id, asked)
    spec = study.user_attrs["spec"]
    trial = study.ask(fixed_distributions=distributions(spec["space"]))
    job_id = str(uuid.uuid4())
    trial.set_user_attr("job_id", job_id)
    job = queue.enqueue(
        TRIAL_TASK,
        trial_params(spec, trial.params),
        sweep_id,
        trial.number,
        job_id=job_id,
        job_timeout=settings.job_timeout,
        result_ttl=settings.result_ttl,
        failure_ttl=settings.result_ttl,
        retry=Retry(max=settings.job_retries) if settings.job_retries > 0 else None,
        meta={"progress": None, "sweep": {"sweep_id": sweep_id, "trial": trial.number}},
        description=f"sweep {sweep_id} trial {trial.number}",
    )
    JobIndex(queue).add(job)  # a trial is a job like any other: listed in GET /jobs
    return job


def trial_job_status(queue: Queue, job_id: str | None) -> str:
    try:
        return jobs.public_status(jobs.fetch_job(queue, job_id)) if job_id else "failed"
    except jobs.JobNotFound:
        return "failed"


def end_trial(study, number: int, state, value: float | None = None, outcome: str | None = None, **attrs) -> bool:
    """Tell Optuna how a trial ended (once; False if it had already been told) and record what goes with it."""
    from optuna.trial import TrialState

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
                study.set_user_attr("registration", {"version": None, "promoted": False, "reason": str(exc)[:500]})
    study.set_user_attr("ended_at", time.time())


def register_best(settings: Settings, queue: Queue | None, best, spec: dict) -> dict:
    """Register the best trial's model, promote it if asked; what happened, for the sweep's view."""
    models = registry.ModelRegistry(settings)
    job_id = best.user_attrs["job_id"]
    run_dir = settings.artifacts_dir / job_id
    metrics = run_folder.read_metrics(run_dir)
    if metrics is None:
        return {"version": None, "promoted": False, "reason": f"the run folder of job {job_id} has no metrics"}
    version = models.register(
        run_dir, job_id, run_folder.read_params(run_dir), metrics, best.user_attrs.get("mlflow_run_id")
    )
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
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    return max(done, key=lambda t: (t.value, -t.number), default=None)


def cancel_sweep(settings: Settings, queue: Queue, sweep_id: str) -> None:
    """Stop starting trials, cancel the queued and running ones, and end the sweep (nothing is registered)."""
    from optuna.trial import TrialState

    with queue.connection.lock(f"boolq:{settings.queue_name}:sweep-lock:{sweep_id}", timeout=120):
        study = load_study(settings, sweep_id, telling=True)
        if study.user_attrs.get("ended_at"):
            raise jobs.JobAlreadyFinished(f"sweep {sweep_id} has already ended")
        study.set_user_attr("cancelled", True)
        for trial in study.get_trials(deepcopy=False):
            if trial.state == TrialState.RUNNING:
                with contextlib.suppress(jobs.JobNotFound, jobs.JobAlreadyFinished):
                    jobs.cancel_training(queue, jobs.fetch_job(queue, trial.user_attrs["job_id"]))
                end_trial(study, trial.number, TrialState.FAIL, outcome="cancelled")
        finish(settings, queue, sweep_id)


# --- Views --------------------------------------------------------------------------------------------------------


def describe_sweep(settings: Settings, queue: Queue | None, sweep_id: str, leaderboard_rows: bool = True) -> dict:
    """What ``GET /sweeps/<id>`` shows: status, spec, counts, the best trial and the leaderboard (best first)."""
    return view_of(load_study(settings, sweep_id, telling=True), queue, leaderboard_rows)


def view_of(study, queue: Queue | None, leaderboard_rows: bool = True) -> dict:
    spec, attrs = study.user_attrs["spec"], study.user_attrs
    board = leaderboard(study, queue)
    counts = dict.fromkeys(("queued", "running", "succeeded", "pruned", "failed", "cancelled"), 0)
    for row in board:
        counts[row["status"]] += 1
    status = "running"
    if attrs.get("ended_at"):
        status = "cancelled" if attrs.get("cancelled") else "finished"
    view = {
        "sweep_id": study.study_name,
        "status": status,
        "created_at": iso(attrs.get("created_at")),
        "ended_at": iso(attrs.get("ended_at")),
        "base": spec["base"],
        "space": spec["space"],
        "trials": spec["trials"],
        "parallel": spec["parallel"],
        "sampler": spec["sampler"],
        "pruner": spec["pruner"],
        "promote": spec["promote"],
        "counts": counts,
        "best": board[0] if board and board[0]["status"] == "succeeded" else None,
        "registration": attrs.get("registration"),
    }
    if leaderboard_rows:
        view["leaderboard"] = board
    return view


def leaderboard(study, queue: Queue | None) -> list[dict]:
    """Every trial: searched params, dev accuracy per epoch, status, val accuracy, job id; best dev accuracy first."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        per_epoch = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        if t.state == TrialState.COMPLETE:
            status = "succeeded"
        elif t.state == TrialState.PRUNED:
            status = "pruned"
        elif t.state == TrialState.RUNNING:
            status = trial_job_status(queue, t.user_attrs.get("job_id")) if queue is not None else "running"
            status = status if status in ("queued", "running") else "running"
        else:
            status = t.user_attrs.get("outcome", "failed")
        rows.append(
            {
                "trial": t.number,
                "job_id": t.user_attrs.get("job_id"),
                "status": status,
                "params": t.params,
                "dev_accuracy": t.value if t.state == TrialState.COMPLETE else None,
                "dev_accuracy_per_epoch": per_epoch,
                "val_accuracy": t.user_attrs.get("val_accuracy"),
                "pruned_at_epoch": max(t.intermediate_values) if t.state == TrialState.PRUNED else None,
            }
        )
    order = {"succeeded": 0, "running": 1, "queued": 2, "pruned": 3, "failed": 4, "cancelled": 5}
    return sorted(rows, key=lambda r: (order[r["status"]], -(r["dev_accuracy"] or 0.0), r["trial"]))


def sweep_ids(settings: Settings) -> list[str]:
    """Every sweep of this service, newest first."""
    studies = storage(settings).get_all_studies()
    studies.sort(key=lambda s: s.user_attrs.get("created_at", 0), reverse=True)
    return [s.study_name for s in studies]


def iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp else None
