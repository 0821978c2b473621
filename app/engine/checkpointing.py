"""Where the training loop is, and that state on disk, so a killed run resumes and ends as an uninterrupted one.

:class:`TrainingState` (with its :class:`TrainHistory`, the loop's record, as Hugging Face's ``TrainerState``
keeps its log history) is what a checkpoint saves beside the model, optimizer, scheduler and every random
generator; :class:`Checkpoints` writes it into the run folder (``run_folder.training_state``) and reads it back.
"""

from __future__ import annotations

import logging
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from app.engine import distributed, run_folder

log = logging.getLogger(__name__)


@dataclass
class TrainHistory:
    """What ``fine_tune`` did: the per-step loss curve, dev accuracy after each epoch, the epoch whose weights the
    model ends with, the epoch it stopped at, where it resumed (None: from the start) and how it went."""

    epochs: int
    loss: list[float] = field(default_factory=list)
    dev_accuracy: list[float] = field(default_factory=list)
    kept_epoch: int = 0
    stopped_epoch: int = 0
    resumed_from_step: int | None = None
    examples_trained: int = 0
    loss_syncs: int = 0

    def __post_init__(self):
        self.kept_epoch = self.kept_epoch or self.epochs  # without keep-best: the last epoch's weights

    @property
    def kept_dev_accuracy(self) -> float:
        return self.dev_accuracy[self.kept_epoch - 1]

    @property
    def early_stopped(self) -> bool:
        return self.stopped_epoch < self.epochs

    def is_best_so_far(self) -> bool:
        """True when the latest dev accuracy beats every earlier one (a tie keeps the earlier epoch)."""
        return self.dev_accuracy[-1] > max(self.dev_accuracy[:-1], default=-1.0)


@dataclass
class TrainingState:
    """Where the loop is: the epoch under way, its batches done, total steps, and the generator state its
    batch order was drawn from (so a resumed epoch redraws the same order and skips the batches done)."""

    history: TrainHistory
    epoch: int = 1
    batches_done: int = 0
    step: int = 0
    epoch_order: torch.Tensor | None = None
    best_weights: dict[str, torch.Tensor] | None = None


class Checkpoints:
    """The run's training state on disk: saved after each epoch and every ``every_s`` seconds (0: epoch ends only),
    with the model, optimizer, scheduler and every random generator, so a resumed run continues identically."""

    def __init__(self, path: Path, every_s: float = 0, on_saved: Callable[[Path], None] | None = None):
        self.path = path
        self.every_s = every_s
        self.on_saved = on_saved  # the tracker's upload, so a retry on another host can resume too
        self.saved_at = time.monotonic()

    def due(self) -> bool:
        return self.every_s > 0 and time.monotonic() - self.saved_at >= self.every_s

    def save(self, state: TrainingState, model, optimizer, scheduler) -> None:
        if not distributed.is_rank_zero():  # DDP: every rank holds the same state; rank 0 keeps the one copy
            return
        snapshot = {
            "loop": dict(vars(state)) | {"history": asdict(state.history)},  # not asdict(state): no copy of weights
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"python": python_rng_state(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            snapshot["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        run_folder.write_atomically(self.path, lambda tmp: torch.save(snapshot, tmp))
        self.saved_at = time.monotonic()
        if self.on_saved is not None:
            self.on_saved(self.path)
        log.debug("checkpoint at epoch %d, step %d", state.epoch, state.step)

    def restore(self, model, optimizer, scheduler, generator: torch.Generator) -> TrainingState | None:
        """Load the saved state into the model, optimizer, scheduler and generators; return the loop's state,
        or None (nothing loaded: the run starts over) when the file holds more than tensors and plain data."""
        try:
            # weights_only: whoever can write the run folder must not run code in the worker through a pickle.
            snapshot = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            log.warning("checkpoint %s refused (not tensors and plain data), starting over: %s", self.path, exc)
            return None
        loop = snapshot["loop"]
        try:
            state = TrainingState(**loop | {"history": TrainHistory(**loop["history"])})
        except TypeError as exc:  # written by a version whose loop state had other fields
            log.warning("checkpoint %s is of another version, starting over: %s", self.path, exc)
            return None
        model.load_state_dict(snapshot["model"])
        optimizer.load_state_dict(snapshot["optimizer"])
        scheduler.load_state_dict(snapshot["scheduler"])
        rng = snapshot["rng"]
        restore_python_rng(rng["python"])
        restore_numpy_rng(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        generator.set_state(state.epoch_order)
        return state

    def remove(self) -> None:
        if distributed.is_rank_zero():
            self.path.unlink(missing_ok=True)


def resume_or_start(
    epochs: int, checkpoints: Checkpoints | None, model, optimizer, scheduler, generator: torch.Generator
) -> TrainingState:
    """The saved training state loaded into the model, optimizer, scheduler and generators, or a fresh start when
    there is none (or it was refused)."""
    restored = checkpoints.restore(model, optimizer, scheduler, generator) if checkpoints is not None else None
    if restored is None:
        return TrainingState(history=TrainHistory(epochs=epochs))
    log.info("resuming at epoch %d, step %d", restored.epoch, restored.step)
    restored.history.resumed_from_step = restored.step
    return restored


def python_rng_state() -> dict:
    """``random``'s state as plain data (a checkpoint loads with ``weights_only``)."""
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def restore_python_rng(state: dict) -> None:
    random.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


def numpy_rng_state() -> dict:
    """numpy's global generator state as a tensor and numbers (a checkpoint loads with ``weights_only``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    keys = torch.from_numpy(keys.astype(np.int64))
    return {"name": name, "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def restore_numpy_rng(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached"]))
