"""Several backends behind one tracker: a backend that fails is switched off and reported, never allowed to fail
the training run, unless the run cannot be published without it (then :class:`TrackingFailed`)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from app.tracking.tracker import Backend

log = logging.getLogger(__name__)

# Longest tracker error kept in a job result (MLflow server errors can carry whole HTML pages).
MAX_ERROR_CHARS = 500
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class TrackingFailed(RuntimeError):
    """A required tracker (the MLflow server that models travel through) failed: the run cannot be published."""


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
