"""Experiment tracking: the interface the engine calls and ``make_tracker``, which picks the backends.

Backends (MLflow, Neptune) sit behind :class:`CompositeTracker`, which does not let a tracking failure fail
a training run: the failing backend is switched off, a warning is logged and ``end_run`` reports it. One
exception: with an MLflow tracking server (``models_travel_through_mlflow``) the models, predictions and
checkpoints reach the other hosts only through it, so there MLflow is *required* and its failure fails the run
(:class:`TrackingFailed`) before a model that no replica could serve is called a success.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

KNOWN_TRACKERS = ("mlflow", "neptune", "none")
# Longest tracker error kept in a job result (MLflow server errors can carry whole HTML pages).
MAX_ERROR_CHARS = 500
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def version_tags(job_id: str, params: dict, metrics: dict) -> dict[str, str]:
    """The tags a registered version carries: job id, params, dev accuracy (of the kept epoch), val accuracy."""
    dev = metrics["dev_accuracy_per_epoch"][metrics["kept_epoch"] - 1]
    return {
        "job_id": job_id,
        "params": json.dumps(params, sort_keys=True),
        "dev_accuracy": str(dev),
        "val_accuracy": str(metrics["accuracy"]),
    }


class TrackingFailed(RuntimeError):
    """A required tracker (the MLflow server that models travel through) failed: the run cannot be published."""


def models_travel_through_mlflow(settings) -> bool:
    """True with an MLflow tracking server (an http(s) ``MLFLOW_TRACKING_URI``): hosts share models through it."""
    uri = settings.mlflow_tracking_uri.lower()
    return "mlflow" in parse_tracker_names(settings.tracker) and uri.startswith(("http://", "https://"))


def tracking_server_check(settings, timeout_s: float = 2.0) -> str:
    """``ok`` when the tracking server answers its health check, else why not (never its address, which may carry
    a password)."""
    import requests

    try:
        answer = requests.get(f"{settings.mlflow_tracking_uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok" if answer.status_code == 200 else f"unhealthy (HTTP {answer.status_code})"


class Tracker(Protocol):
    """What the engine tells a tracker during one run."""

    def start_run(self, run_id: str, params: dict) -> None: ...
    def log_inputs(self, datasets: list[dict]) -> None:
        """The data the run used: one dict per split (name, context, source, digest, rows)."""
        ...

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None: ...
    def log_metric_history(self, key: str, points: list[tuple[int, float]]) -> None:
        """Several steps of one metric, ``(step, value)`` pairs, in one call (the losses of one read-back)."""
        ...

    def log_artifact(self, path: Path) -> None: ...
    def log_dict(self, data: dict, name: str) -> None: ...
    def log_model(self, model_dir: Path) -> None:
        """The run's fine-tuned model folder (uploaded only where other hosts need it: a tracking server)."""
        ...

    def log_checkpoint(self, path: Path) -> None:
        """A training state just saved; uploaded in the background where a retry on another host needs it."""
        ...

    def register_model(self, model_dir: Path, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
        """Register the model folder as a new version; ``tags`` (job id, params, dev/val accuracy) go with it."""
        ...

    def end_run(self, status: str) -> dict:
        """Close the run; return the references (run ids, model version) and any errors."""
        ...


class Backend(Tracker, Protocol):
    """One tracking service. It may raise anywhere; :class:`CompositeTracker` contains that."""

    def references(self) -> dict:
        """What is known so far (run id, model version, ...), without any I/O."""
        ...

    def close(self) -> None:
        """Release resources after a failure, without waiting for a remote service."""
        ...


class NullTracker:
    """Tracks nothing (``TRACKER=none``)."""

    def start_run(self, run_id: str, params: dict) -> None:
        pass

    def log_inputs(self, datasets: list[dict]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        pass

    def log_metric_history(self, key: str, points: list[tuple[int, float]]) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def log_dict(self, data: dict, name: str) -> None:
        pass

    def log_model(self, model_dir: Path) -> None:
        pass

    def log_checkpoint(self, path: Path) -> None:
        pass

    def register_model(self, model_dir: Path, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
        pass

    def end_run(self, status: str) -> dict:
        return {}


class CompositeTracker:
    """Logs to every configured backend; a backend that raises is reported and switched off, not raised, unless
    it is ``required``: then :class:`TrackingFailed` is raised (the other backends are closed first).

    ``end_run`` returns ``{<backend>: {references}, ..., "errors": {<backend>: "Type: message"}}``.
    Backends are built in ``start_run`` (not here), so a missing client library is a tracking error too.
    """

    def __init__(
        self,
        factories: dict[str, Callable[[], Backend]],
        secrets: tuple[str, ...] = (),
        required: tuple[str, ...] = (),
    ):
        self.factories = factories
        self.required = required
        self.secrets = tuple(s for s in secrets if s)
        self.backends: dict[str, Backend] = {}
        self.errors: dict[str, str] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.factories)

    def start_run(self, run_id: str, params: dict) -> None:
        self.backends, self.errors = {}, {}
        for name, factory in self.factories.items():
            with self.contained(name):
                self.backends[name] = factory()
                self.backends[name].start_run(run_id, params)

    def log_inputs(self, datasets: list[dict]) -> None:
        for name, backend in self.working():
            with self.contained(name):
                backend.log_inputs(datasets)

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        for name, backend in self.working():
            with self.contained(name):
                backend.log_metrics(metrics, step)

    def log_metric_history(self, key: str, points: list[tuple[int, float]]) -> None:
        for name, backend in self.working():
            with self.contained(name):
                backend.log_metric_history(key, points)

    def log_artifact(self, path: Path) -> None:
        for name, backend in self.working():
            with self.contained(name):
                backend.log_artifact(path)

    def log_dict(self, data: dict, name: str) -> None:
        for backend_name, backend in self.working():
            with self.contained(backend_name):
                backend.log_dict(data, name)

    def log_model(self, model_dir: Path) -> None:
        for name, backend in self.working():
            with self.contained(name):
                backend.log_model(model_dir)

    def log_checkpoint(self, path: Path) -> None:
        for name, backend in self.working():
            with self.contained(name):
                backend.log_checkpoint(path)

    def register_model(self, model_dir: Path, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
        for name, backend in self.working():
            with self.contained(name):
                backend.register_model(model_dir, metrics, tags)

    def end_run(self, status: str) -> dict:
        for name, backend in self.backends.items():
            if name in self.errors:
                close_quietly(name, backend)
            else:
                with self.contained(name):
                    backend.end_run(status)
        result = {name: self.references(name) for name in self.factories}
        result["errors"] = dict(self.errors)
        return result

    def working(self) -> list[tuple[str, Backend]]:
        return [(name, b) for name, b in self.backends.items() if name not in self.errors]

    def references(self, name: str) -> dict:
        backend = self.backends.get(name)
        if backend is None:
            return {}
        try:
            return backend.references()
        except Exception:  # references() does no I/O; a bug there must still not fail the run
            log.exception("tracker %s: could not collect references", name)
            return {}

    @contextlib.contextmanager
    def contained(self, name: str) -> Iterator[None]:
        """Run one backend call; on error record it, warn once and switch the backend off (or raise, if required)."""
        try:
            yield
        except Exception as exc:
            message = one_line(redact(f"{type(exc).__name__}: {exc}", self.secrets))[:MAX_ERROR_CHARS]
            self.errors[name] = message
            if name in self.required:  # the run ends here: no backend is used again
                for other, backend in self.backends.items():
                    self.errors.setdefault(other, f"stopped: the required {name} tracker failed")
                    close_quietly(other, backend)
                raise TrackingFailed(
                    f"the {name} tracking server failed, and models travel through it to the other hosts, so this "
                    f"run cannot be published: {message}"
                ) from None
            log.warning("tracker %s failed and is switched off for this run (training continues): %s", name, message)


def close_quietly(name: str, backend: Backend) -> None:
    try:
        backend.close()
    except Exception as exc:
        log.debug("tracker %s: close after failure raised %s", name, type(exc).__name__)


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Replace every secret (token, URI password) in ``text`` with ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def one_line(text: str) -> str:
    """Client errors come with colour codes and banners; a job result wants one plain line."""
    return " ".join(ANSI_ESCAPE.sub("", text).split())


def uri_password(uri: str) -> str:
    """The password embedded in ``scheme://user:password@host``, if any (so it can be redacted)."""
    try:
        return urlsplit(uri).password or ""
    except ValueError:
        return ""


def parse_tracker_names(value: str) -> tuple[str, ...]:
    """``"MLflow, neptune"`` → ``("mlflow", "neptune")``; ``"none"`` → ``()``; unknown names raise ValueError."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN_TRACKERS]
    if unknown or not names:
        raise ValueError(
            f"TRACKER (--tracker) must be a comma-separated list of {', '.join(KNOWN_TRACKERS)}; got {value!r}"
        )
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def make_tracker(settings) -> Tracker:
    """The tracker(s) named by ``settings.tracker``; ValueError names the field and allowed values."""
    names = parse_tracker_names(settings.tracker)
    if not names:
        return NullTracker()
    factories = {name: backend_factory(name, settings) for name in names}
    secrets = (settings.neptune_api_token, settings.api_token, uri_password(settings.mlflow_tracking_uri))
    required = ("mlflow",) if models_travel_through_mlflow(settings) else ()
    return CompositeTracker(factories, secrets, required)


def backend_factory(name: str, settings) -> Callable[[], Backend]:
    """A zero-argument constructor, so the client library is imported only when a run starts."""
    if name == "mlflow":

        def build_mlflow() -> Backend:
            from app.tracking.mlflow_tracker import MlflowTracker

            return MlflowTracker.from_settings(settings)

        return build_mlflow

    def build_neptune() -> Backend:
        from app.tracking.neptune_tracker import NeptuneTracker

        return NeptuneTracker.from_settings(settings)

    return build_neptune


def run_status(exc: BaseException) -> str:
    """MLflow's run status for a run that ended with ``exc`` (an exception may name its own, as a pruned trial does)."""
    if hasattr(exc, "run_status"):
        return exc.run_status
    return "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"


@contextlib.contextmanager
def ended_on_error(tracker: Tracker) -> Iterator[None]:
    """If the body raises, end the tracker run as FAILED (or KILLED) before re-raising."""
    try:
        yield
    except BaseException as exc:
        tracker.end_run(run_status(exc))
        raise
