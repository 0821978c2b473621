"""One way to run a training from the settings: the CLI, a worker's job, a sweep trial and every DDP rank call
:func:`run_training`, so the data, the run folder, threads, device, checkpoints and tracker come from one place."""

from __future__ import annotations

from collections.abc import Callable

from app.config import Settings
from app.engine import distributed
from app.engine.data import DatasetSpec
from app.engine.run_folder import RunResult
from app.engine.training import ProgressCallback, train_and_evaluate
from app.params import TrainParams
from app.tracking import Tracker, make_tracker


def run_training(
    params: TrainParams,
    settings: Settings,
    *,
    run_id: str | None = None,
    on_progress: ProgressCallback | None = None,
    tracker: Tracker | None = None,
    rank_device=None,
    resumable: bool = True,
    dataset: DatasetSpec | None = None,
    fence: Callable[[], None] | None = None,
) -> RunResult | None:
    """Fine-tune and evaluate ``params`` as ``settings`` say; the result (None on DDP ranks other than 0).

    ``rank_device``: inside a DDP process group, the device it gave this rank (whose threads are then its share
    of the machine's cores). ``resumable``: a service job may be retried, so it saves its training state; a CLI
    run never resumes and saves none unless CHECKPOINT_EVERY_S is set. ``dataset``: what to train on (default: the
    built-in ``boolq`` from DATA_DIR). ``fence``: raises when a newer attempt of a job superseded this one
    (``train_and_evaluate``).
    """
    in_group = rank_device is not None
    threads = settings.num_threads
    if in_group:
        threads = distributed.threads_per_rank(settings.local_world_size, settings.num_threads)
    return train_and_evaluate(
        params,
        dataset or settings.data_dir,
        settings.artifacts_dir,
        run_id=run_id,
        num_threads=threads,
        device=str(rank_device) if in_group else settings.device,
        on_progress=on_progress,
        tracker=tracker if tracker is not None else make_tracker(settings),
        checkpoint_every_s=checkpoint_interval(settings, resumable),
        fence=fence,
    )


def checkpoint_interval(settings: Settings, resumable: bool) -> float | None:
    """Seconds between training-state saves, or None for none: a run that is never resumed (the CLI) saves none
    unless CHECKPOINT_EVERY_S is set explicitly."""
    if resumable or "checkpoint_every_s" in settings.model_fields_set:
        return settings.checkpoint_every_s
    return None
