"""A run's folder on disk, and the records a run produces: the only module that knows the folder's layout.

    <ARTIFACTS_DIR>/<run id>/
        params.json         the TrainParams of the run
        metrics.json        final metrics; its presence marks a finished run
        predictions.jsonl   one line per val example: idx, label, prediction, probability; in a batch
                            prediction's folder, one per scored row: idx, label and prediction by name, score
        model/              the fine-tuned checkpoint (config.json, safetensors weights, tokenizer)
        training_state.pt   while training: the state to resume from (model, optimizer, scheduler, RNG,
                            epoch, step); deleted when the run succeeds

The engine writes it, the jobs clean it up, ``predict`` and the API read it. Nothing here imports torch.
Every file is written atomically (temp file, then rename), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PARAMS = "params.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
MODEL = "model"
TRAINING_STATE = "training_state.pt"


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives after each read-back of the losses and after each dev evaluation.

    ``step`` and ``loss`` are the latest; ``recent_losses`` holds every (step, loss) since the last report
    (one per report on the CPU, where each step is read back; a second's worth on a GPU)."""

    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float
    dev_accuracy: float | None
    examples_per_s: float
    recent_losses: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ScoringProgress:
    """What a batch prediction job reports as it scores a dataset's rows."""

    rows: int
    total_rows: int
    rows_per_s: float


@dataclass
class RunResult:
    """Everything a caller needs from one run; ``run_dir`` holds the same on disk."""

    run_id: str
    run_dir: str
    params: dict
    accuracy: float
    n_eval: int
    dev_accuracy: float
    predictions: list[int]
    metrics: dict
    tracking: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def is_finished(run_dir: Path) -> bool:
    return (run_dir / METRICS).is_file()


def latest_finished_run(artifacts_dir: Path) -> Path | None:
    """The run folder under ``artifacts_dir`` that finished last (tracking stores and unfinished runs are skipped)."""
    finished = [d for d in Path(artifacts_dir).glob("*/") if (d / PARAMS).is_file() and is_finished(d)]
    return max(finished, key=lambda d: (d / METRICS).stat().st_mtime, default=None)


def find_run(artifacts_dir: Path, model: str) -> Path:
    """Where ``--model`` points: ``latest``, a run or job id under ``artifacts_dir``, or a folder path."""
    if model == "latest":
        latest = latest_finished_run(artifacts_dir)
        if latest is None:
            raise FileNotFoundError(f"no finished run under {artifacts_dir} yet (train one first)")
        return latest
    by_id = Path(artifacts_dir) / model
    if "/" not in model and by_id.is_dir():
        return by_id
    return Path(model)


def checkpoint_folder(folder: Path) -> Path | None:
    """The Hugging Face checkpoint inside a run folder (``model/``) or the folder itself, if there is one.

    A run folder without ``metrics.json`` (written last) is unfinished: its job was killed or is still
    running, so whatever weights it holds are never taken for a model.
    """
    if (folder / PARAMS).is_file() and not is_finished(folder):
        return None
    for candidate in (folder / MODEL, folder):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def training_state(run_dir: Path) -> Path:
    """Where a run keeps the state it can resume from (written by the engine with ``write_atomically``)."""
    return run_dir / TRAINING_STATE


def can_resume(run_dir: Path) -> bool:
    """An earlier attempt of this run died and left a training state to resume from."""
    return not is_finished(run_dir) and training_state(run_dir).is_file()


def remove_training_state(run_dir: Path) -> None:
    training_state(run_dir).unlink(missing_ok=True)


def remove_unfinished(run_dir: Path) -> None:
    """Drop a folder that a killed attempt left without metrics.json, so it is never mistaken for a model."""
    if run_dir.is_dir() and not is_finished(run_dir):
        log.warning("removing unfinished run folder %s from an earlier attempt", run_dir)
        shutil.rmtree(run_dir)


class RunSuperseded(RuntimeError):
    """Raised by a run's fence: a newer attempt of the same run owns its folder and its records now, so this one
    stops and leaves them alone."""

    run_status = "KILLED"  # what the tracker records of this attempt's run: stopped, not failed


@contextlib.contextmanager
def finished_only_if_completed(run_dir: Path) -> Iterator[None]:
    """If the body raises after metrics.json was written (its upload to the tracking server failed), remove that
    file again: the run is unfinished, nothing serves its model, and a retry may resume from its checkpoint. A
    superseded attempt leaves the folder alone: the metrics.json there is the newer attempt's."""
    try:
        yield
    except RunSuperseded:
        raise
    except BaseException:
        (run_dir / METRICS).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temp path)``, then rename it to ``path``: readers see the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_params(run_dir: Path, params: dict) -> None:
    write_json(run_dir / PARAMS, params)


def write_metrics(run_dir: Path, metrics: dict) -> None:
    write_json(run_dir / METRICS, metrics)


def write_predictions(run_dir: Path, rows: list, predictions: list[int], probabilities: list[list[float]]) -> Path:
    """One JSON line per val example (``rows`` are ``data.Example`` records), in val order: label and prediction
    ids, every class's probability (``scores``) and ``probability``, that of label 1 for two labels (P(yes) on
    BoolQ), else that of the prediction."""
    path = run_dir / PREDICTIONS
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as out:
        for row, pred, scores in zip(rows, predictions, probabilities, strict=True):
            prob = scores[1] if len(scores) == 2 else scores[pred]
            line = {"idx": row.idx, "label": row.label, "prediction": pred, "probability": prob, "scores": scores}
            out.write(json.dumps(line) + "\n")
    os.replace(tmp, path)
    return path


def write_scored_rows(run_dir: Path, rows: list, label_names: tuple[str, ...], probabilities: list) -> Path:
    """A batch prediction's lines, one per row (``data.Example`` records) in the dataset's order: its label by name
    (when the row has one), the predicted label's name, its probability (``score``) and every label's (``scores``)."""
    path = run_dir / PREDICTIONS
    with path.with_suffix(".tmp").open("w") as out:
        for row, scores in zip(rows, probabilities, strict=True):
            best = max(range(len(scores)), key=scores.__getitem__)
            line = {"idx": row.idx} | ({"label": label_names[row.label]} if row.label is not None else {})
            line |= {"prediction": label_names[best], "score": scores[best], "scores": list(scores)}
            out.write(json.dumps(line) + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    return path


def save_model(run_dir: Path, model, tokenizer) -> Path:
    """``save_pretrained`` (safetensors) into a temp folder renamed into place when complete."""
    folder = run_dir / MODEL
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def read_params(run_dir: Path) -> dict | None:
    path = run_dir / PARAMS
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(run_dir: Path) -> dict | None:
    path = run_dir / METRICS
    return json.loads(path.read_text()) if path.is_file() else None


def read_predictions(run_dir: Path) -> Iterator[dict] | None:
    """The val predictions line by line, or None when the run has none (unfinished or deleted)."""
    path = run_dir / PREDICTIONS
    if not path.is_file():
        return None
    return (json.loads(line) for line in path.read_text().splitlines() if line.strip())
