"""Hyperparameter sweeps: an Optuna study whose trials run as ordinary training jobs on the RQ workers.

The study lives in Optuna's journal storage on the service's Redis, so every API replica and worker sees
the same sweep. Nothing here waits for a trial: :func:`advance` (run when a sweep is created, when a trial
ends in its worker, on a POST that concerns it, and periodically in the workers) tells Optuna about trials
whose job died, admits trials up to ``parallel`` as new jobs (through the same admission as any job), and
finishes the sweep when the last trial has ended: the best trial **by dev accuracy** is registered (the only
version a sweep registers) and, with ``promote``, made champion. Val accuracy is shown beside dev accuracy
and never used to choose. No torch here.
"""

from app.service.sweeps.driver import (
    advance,
    advance_unfinished,
    cancel_sweep,
    conclude,
    create_sweep,
    end_trial,
    finish,
)
from app.service.sweeps.spec import SweepError, SweepNotFound, SweepRequest, validate_request
from app.service.sweeps.study import (
    journal_on_redis,
    load_study,
    local_storage,
    make_pruner,
    make_sampler,
    owner_of,
    storage,
    suggest,
    sweep_ids,
    trial_params,
)
from app.service.sweeps.views import describe_sweep, view_of

__all__ = [
    "SweepError",
    "SweepNotFound",
    "SweepRequest",
    "advance",
    "advance_unfinished",
    "cancel_sweep",
    "conclude",
    "create_sweep",
    "describe_sweep",
    "end_trial",
    "finish",
    "journal_on_redis",
    "load_study",
    "local_storage",
    "make_pruner",
    "make_sampler",
    "owner_of",
    "storage",
    "suggest",
    "sweep_ids",
    "trial_params",
    "validate_request",
    "view_of",
]
