"""Neptune backend (``neptune`` 1.x client): async with a project and token, offline otherwise.

Offline runs are written under ``NEPTUNE_DATA_DIRECTORY`` (default ``ARTIFACTS_DIR/.neptune``) and can be
uploaded later with ``neptune sync --path ARTIFACTS_DIR --project WORKSPACE/PROJECT``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import neptune
from neptune.types import File

log = logging.getLogger(__name__)

OFFLINE_NOTE = "model versions need a Neptune server; offline run records the model path"
ONLINE_NOTE = "no Neptune model version is created; the run records the model path (model versions live in MLflow)"
STOP_TIMEOUT_S = 30


def send_neptune_logs_to_stderr() -> None:
    """Neptune's client logs to stdout, which would corrupt ``--json`` output; route it through our logging."""
    for name in ("neptune", "neptune_no_prefix"):
        client_log = logging.getLogger(name)
        for handler in list(client_log.handlers):
            client_log.removeHandler(handler)
        client_log.propagate = True


send_neptune_logs_to_stderr()


def neptune_value(value):
    """Neptune rejects None (and other non-scalars) as field values; record them as text."""
    return value if isinstance(value, bool | int | float | str) else str(value)


class NeptuneTracker:
    """One Neptune run per training run; metrics at ``metrics/<name>``, params at ``parameters/<name>``."""

    def __init__(self, project: str, api_token: str, mode: str, data_dir: Path):
        self.project = project
        self.api_token = api_token
        self.mode = mode
        self.data_dir = Path(data_dir).resolve()
        self.run = None
        self.run_ref: str | None = None
        self.url: str | None = None
        self.offline_dir: str | None = None
        self.model_path: str | None = None

    @classmethod
    def from_settings(cls, settings) -> NeptuneTracker:
        connected = bool(settings.neptune_project and settings.neptune_api_token)
        mode = settings.neptune_mode or ("async" if connected else "offline")
        data_dir = settings.neptune_data_directory or Path(settings.artifacts_dir) / ".neptune"
        return cls(settings.neptune_project, settings.neptune_api_token, mode, data_dir)

    def start_run(self, run_id: str, params: dict) -> None:
        # The client reads its data folder from this variable only (no argument), at init_run.
        os.environ["NEPTUNE_DATA_DIRECTORY"] = str(self.data_dir)
        self.run = neptune.init_run(
            project=self.project or None,
            api_token=self.api_token or None,
            mode=self.mode,
            name=run_id,
            tags=["boolq"],
            capture_stdout=False,
            capture_stderr=False,
            capture_hardware_metrics=False,
            capture_traceback=False,
            git_ref=False,
            source_files=[],
        )
        self.run["parameters"] = {key: neptune_value(value) for key, value in params.items()}
        self.run["boolq_run_id"] = run_id
        self.run_ref = self.run_reference()

    def run_reference(self) -> str:
        """``offline/<uuid>`` offline (what ``neptune sync`` lists), the ``PROJ-123`` id when connected."""
        if self.mode == "offline":
            return self.run.get_url()
        self.url = self.run.get_url()
        return self.run["sys/id"].fetch()

    def log_inputs(self, datasets: list[dict]) -> None:
        for dataset in datasets:
            self.run[f"data/{dataset['context']}"] = {key: neptune_value(value) for key, value in dataset.items()}

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        for key, value in metrics.items():
            if step is None:
                self.run[f"metrics/{key}"] = float(value)
            else:
                self.run[f"metrics/{key}"].append(float(value), step=step)

    def log_metric_history(self, key: str, points: list[tuple[int, float]]) -> None:
        steps, values = zip(*points, strict=True) if points else ((), ())
        self.run[f"metrics/{key}"].extend([float(v) for v in values], steps=list(steps))

    def log_artifact(self, path: Path) -> None:
        # Uploaded from content, so an offline run keeps its own copy and syncs even if the run folder is gone.
        path = Path(path)
        field = f"artifacts/{path.name.replace('.', '_')}"
        self.run[field].upload(File.from_content(path.read_bytes(), extension=path.suffix.lstrip(".")))

    def log_dict(self, data: dict, name: str) -> None:
        field = f"artifacts/{name.replace('.', '_')}"
        self.run[field].upload(File.from_content(json.dumps(data, indent=2), extension="json"))

    def log_model(self, model_dir: Path) -> None:
        pass  # the weights stay in the run folder; register_model records where

    def log_checkpoint(self, path: Path) -> None:
        pass  # checkpoints travel through MLflow only

    def register_model(self, model_dir: Path, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
        """Record the model folder on the run (a Neptune model registry entry needs a server and a model key)."""
        self.model_path = str(Path(model_dir).resolve())
        self.run["model/path"] = self.model_path
        self.run["model/metrics"] = {key: float(value) for key, value in metrics.items()}
        if tags:
            self.run["model/tags"] = dict(tags)

    def end_run(self, status: str) -> dict:
        self.run["status"] = status
        if status != "FINISHED":
            self.run["sys/failed"] = True
        self.stop()
        return self.references()

    def stop(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.stop(seconds=STOP_TIMEOUT_S)
        if self.mode == "offline" and self.run_ref:
            uuid = self.run_ref.removeprefix("offline/")
            folders = sorted((self.data_dir / "offline").glob(f"run__{uuid}__*"))
            self.offline_dir = str(folders[0]) if folders else None

    def references(self) -> dict:
        return {
            "mode": self.mode,
            "neptune_run_id": self.run_ref,
            "url": self.url,
            "offline_dir": self.offline_dir,
            "model_path": self.model_path,
            "model_version": None,
            "note": OFFLINE_NOTE if self.mode == "offline" else ONLINE_NOTE,
        }

    def close(self) -> None:
        self.stop()
