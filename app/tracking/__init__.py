"""Experiment tracking: the interface the engine calls and ``make_tracker``, which picks the backends.

Backends (MLflow, Neptune) sit behind :class:`CompositeTracker`, which does not let a tracking failure fail
a training run: the failing backend is switched off, a warning is logged and ``end_run`` reports it. One
exception: with an MLflow tracking server (``models_travel_through_mlflow``) the models, predictions and
checkpoints reach the other hosts only through it, so there MLflow is *required* and its failure fails the run
(:class:`TrackingFailed`) before a model that no replica could serve is called a success.
"""

from app.tracking.composite import MAX_ERROR_CHARS, CompositeTracker, TrackingFailed, one_line, redact
from app.tracking.configured import (
    KNOWN_TRACKERS,
    make_tracker,
    models_travel_through_mlflow,
    parse_tracker_names,
    tracking_server_check,
    uri_password,
)
from app.tracking.model_versions import version_tags
from app.tracking.tracker import Backend, NullTracker, Tracker, ended_on_error, run_status

__all__ = [
    "KNOWN_TRACKERS",
    "MAX_ERROR_CHARS",
    "Backend",
    "CompositeTracker",
    "NullTracker",
    "Tracker",
    "TrackingFailed",
    "ended_on_error",
    "make_tracker",
    "models_travel_through_mlflow",
    "one_line",
    "parse_tracker_names",
    "redact",
    "run_status",
    "tracking_server_check",
    "uri_password",
    "version_tags",
]
