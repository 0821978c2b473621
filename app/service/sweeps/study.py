"""The Optuna side of a sweep: the study in a journal on the service's Redis, its sampler and pruner, which sweeps
exist and whose they are."""

from __future__ import annotations

import functools
import warnings

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

from app.config import Settings
from app.service.redis_connection import connect_redis, service_key
from app.service.sweeps.spec import MEDIAN_STARTUP_TRIALS, Range, SweepNotFound, field_kind


def storage(settings: Settings):
    """The journal storage on the service's Redis, one journal per queue (so services sharing a Redis stay apart)."""
    return journal_on_redis(settings, service_key(settings.queue_name, "optuna"))


@functools.lru_cache(maxsize=8)
def journal_on_redis(settings: Settings, prefix: str):
    """One storage per process: a new one replays the whole journal, a kept one reads only what was appended."""

    return JournalStorage(JsonJournalOnRedis(connect_redis(settings), prefix))


class JsonJournalOnRedis:
    """Optuna's journal backend (``read_logs``/``append_logs``) on Redis, JSON log entries only, on a client given
    to it (a Sentinel's master follows a failover), not on a URL it connects to.

    Optuna's own Redis backend also keeps a pickled snapshot that every new storage unpickles: whoever can
    write to Redis would run code in the API and the workers. Without ``save_snapshot``/``load_snapshot`` Optuna
    replays the JSON log instead; the keys are the same as its backend's, so existing sweeps stay readable.
    """

    def __init__(self, connection, prefix: str):
        warnings.filterwarnings("ignore", category=ExperimentalWarning)  # the Redis journal, stable in use since v3.1
        self._logs = JournalRedisBackend("redis://", prefix=prefix)  # redis-py connects lazily: never used
        self._logs._redis = connection

    def read_logs(self, log_number_from: int):
        return self._logs.read_logs(log_number_from)

    def append_logs(self, logs: list) -> None:
        self._logs.append_logs(logs)


def distributions(space: dict) -> dict:
    """Optuna distributions of the space (integer fields get integer distributions)."""

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

    folder.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(folder / "sweeps.journal")))


def make_sampler(spec: dict, asked: int):
    """The sampler, rebuilt for each ask (any process may ask); a seed is offset by the trials asked so far,
    so a seeded sampler draws a new point each time yet the sweep stays reproducible.

    Not the grid's: a GridSampler shuffles its grid by its seed and records each trial's place in that order, so
    every ask must see the same order (seed 0 when none is given), or a place names another point and a
    combination runs twice while another never does."""

    if spec["sampler"] == "grid":
        return optuna.samplers.GridSampler(spec["space"], seed=spec.get("seed") or 0)
    seed = None if spec.get("seed") is None else spec["seed"] + asked
    if spec["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(spec: dict):
    pruner = spec["pruner"]
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=0)
    if isinstance(pruner, dict):
        return optuna.pruners.ThresholdPruner(lower=pruner["threshold"])
    return optuna.pruners.NopPruner()


def load_study(settings: Settings, sweep_id: str, asked: int = 0, telling: bool = False):
    """The sweep's study with its sampler and pruner. ``telling``: to report and tell only, so a plain sampler
    (the grid sampler would try to stop an optimize loop that does not exist here when the grid is done)."""

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        summary = optuna.load_study(study_name=sweep_id, storage=storage(settings))
    except KeyError as exc:
        raise SweepNotFound(f"no sweep {sweep_id}") from exc
    spec = summary.user_attrs["spec"]
    return optuna.load_study(
        study_name=sweep_id,
        storage=summary._storage,
        sampler=optuna.samplers.RandomSampler() if telling else make_sampler(spec, asked),
        pruner=make_pruner(spec),
    )


def sweep_ids(settings: Settings, owner: str | None = None) -> list[str]:
    """Every sweep of this service (``owner``'s only, if given), newest first."""
    studies = storage(settings).get_all_studies()
    if owner is not None:
        studies = [s for s in studies if owner_of(s) == owner]
    studies.sort(key=lambda s: s.user_attrs.get("created_at", 0), reverse=True)
    return [s.study_name for s in studies]


def owner_of(study) -> str | None:
    """The key that created the sweep (None: before keys, or from the command line); its trials are the key's too."""
    owner = study.user_attrs.get("owner")
    return owner if isinstance(owner, str) else None


def trial_params(spec: dict, sampled: dict) -> dict:
    """A trial's TrainParams: the base, the sampled values, and no registration (a sweep registers its best)."""
    return spec["base"] | sampled | {"register": False}
