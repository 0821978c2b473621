"""Experiment tracking interface the engine calls; backends live behind ``make_tracker``."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tracker(Protocol):
    """What the engine tells a tracker during one run."""

    def start_run(self, run_id: str, params: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def register_model(self, model_dir: Path, metrics: dict[str, float]) -> None: ...
    def end_run(self, status: str) -> dict:
        """Close the run; return the references (run ids, model version) and any errors."""
        ...


class NullTracker:
    """Tracks nothing (``TRACKER=none``)."""

    def start_run(self, run_id: str, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def register_model(self, model_dir: Path, metrics: dict[str, float]) -> None:
        pass

    def end_run(self, status: str) -> dict:
        return {}


def make_tracker(settings) -> Tracker:
    """The tracker(s) named by ``settings.tracker``; backends are added in this module."""
    return NullTracker()
