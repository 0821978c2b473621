"""The task an RQ worker runs. The API enqueues it by name (``app.tasks.train_job``), so web processes never
import it, nor torch; a worker anywhere imports it when it takes a job.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from rq import get_current_job
from rq.job import Job

from app import run_folder
from app.config import Settings
from app.model_access import model_for_training
from app.params import TrainParams
from app.tracking import make_tracker
from app.training import keep_freed_memory_in_heap, train_and_evaluate

# Progress is written to Redis at most this often (plus after every dev evaluation and the last step).
PROGRESS_INTERVAL_S = 0.5
# The live loss curve in the job's meta keeps at most this many points (every other one is dropped when full).
CURVE_POINTS = 1000


def train_job(params_dict: dict) -> dict:
    """Fine-tune, evaluate, write ``ARTIFACTS_DIR/<job id>/`` and return the results."""
    keep_freed_memory_in_heap()  # this work horse exists to train: faster steps for a little more memory
    settings = Settings()
    job = get_current_job()
    params = TrainParams(**params_dict)
    params = params.model_copy(update={"model": model_for_training(params.model, settings)})
    run_folder.remove_unfinished(settings.artifacts_dir / job.id)  # a retried job starts over
    result = train_and_evaluate(
        params,
        settings.data_dir,
        settings.artifacts_dir,
        run_id=job.id,
        num_threads=settings.num_threads,
        device=settings.device,
        on_progress=ProgressReporter(job),
        tracker=make_tracker(settings),
    )
    return result.to_dict()


class ProgressReporter:
    """The engine's progress callback: stores progress and the curves so far in the job's meta, throttled to
    spare Redis. ``meta["curves"]`` = ``{"loss": [[step, loss], ...], "dev_accuracy": [[epoch, acc], ...]}``."""

    def __init__(self, job: Job):
        self.job = job
        self.last_write = 0.0
        self.curves = {"loss": [], "dev_accuracy": []}

    def __call__(self, progress) -> None:
        self.record(progress)
        now = time.monotonic()
        epoch_end = progress.dev_accuracy is not None or progress.step == progress.total_steps
        if not epoch_end and now - self.last_write < PROGRESS_INTERVAL_S:
            return
        self.job.meta["progress"] = asdict(progress)
        self.job.meta["curves"] = self.curves
        self.job.save_meta()
        self.last_write = now

    def record(self, progress) -> None:
        if progress.dev_accuracy is not None:
            self.curves["dev_accuracy"].append([progress.epoch, progress.dev_accuracy])
            return  # the epoch's last step was reported just before, with the same loss
        loss = self.curves["loss"]
        loss.append([progress.step, progress.loss])
        if len(loss) > CURVE_POINTS:
            # Thin the older half, keep the newest point: the curve's shape survives long runs.
            loss[:] = loss[:-1:2] + loss[-1:]
