"""What the engine tells a tracker during one run (:class:`Tracker`), what a tracking service adds to that
(:class:`Backend`), the tracker that tracks nothing, and ending a run when its body raises."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


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
