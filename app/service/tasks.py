"""The tasks an RQ worker runs. The API enqueues them by name (``app.service.tasks.train_job``, ``predict_job``), so
web processes never import them, nor torch; a worker anywhere imports them when it takes a job.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import get_current_job
from rq.job import Job
from rq.serializers import JSONSerializer

from app.config import Settings
from app.engine import distributed, run_folder
from app.engine.data import DatasetSpec, Example, load_dataset
from app.engine.evaluation import classification_metrics
from app.engine.memory import keep_freed_memory_in_heap
from app.engine.run import run_training
from app.params import BUILTIN_DATASET, PredictionParams, TrainParams
from app.service import attempts, batch_predictions, datasets
from app.service.jobs import ProjectJob
from app.service.model_access import fine_tuned_model, resolve_for_training
from app.service.model_records import publishing_tracker
from app.service.model_store import resume_or_start_over
from app.service.predict import load_predictor
from app.service.redis_connection import connect_redis
from app.service.serve_backend import Backend

log = logging.getLogger(__name__)

# Progress is written to Redis at most this often (plus after every dev evaluation and the last step).
PROGRESS_INTERVAL_S = 0.5
# Rows a batch prediction scores per predict call (and progress report): /predict's largest request, so a row's
# answer is the one /predict gives in a request of the same rows (bf16 sums shift with a pass's padding).
SCORING_CHUNK_ROWS = 256
# The live loss curve in the job's meta keeps at most this many points (every other one is dropped when full).
CURVE_POINTS = 1000


def train_job(params_dict: dict) -> dict:
    """Fine-tune, evaluate, write ``ARTIFACTS_DIR/<job id>/`` and return the results."""
    keep_freed_memory_in_heap()  # this work horse exists to train: faster steps for a little more memory
    settings = Settings()
    job = get_current_job()
    params = TrainParams(**params_dict)
    params = resolve_for_training(params, settings)
    resume_or_start_over(job.id, settings)
    if params.devices > 1:
        return train_on_ranks(job, params, settings)
    dataset = dataset_of(params, settings, job.connection)
    tracker = publishing_tracker(job.connection, settings, job.id)
    result = run_training(
        params,
        settings,
        run_id=job.id,
        on_progress=ProgressReporter(job),
        tracker=tracker,
        dataset=dataset,
        fence=fence_of(job),
    )
    return result.to_dict()


def fence_of(job: Job):
    """What a run calls before it writes a result: raises ``AttemptSuperseded`` once a newer attempt of ``job`` runs."""
    return lambda: attempts.ensure_held(job.connection, job.origin, job.id)


def predict_job(params_dict: dict) -> dict:
    """Score every row of a dataset's split with a fine-tuned model; write ``predictions.jsonl`` and ``metrics.json``
    into ``ARTIFACTS_DIR/<job id>/`` and return the metrics (when the rows have labels)."""
    settings = Settings()
    job = get_current_job()
    params = PredictionParams(**params_dict)
    spec = dataset_of(TrainParams(dataset=params.dataset), settings, job.connection) or as_builtin(settings)
    dataset = load_dataset(spec)
    rows = dataset.val if params.split == "val" else dataset.train
    folder = fine_tuned_model(params.model, settings)
    backend = Backend.from_settings(settings)  # /predict's, so a row's answer is the one /predict gives
    predictor = load_predictor(folder, settings.predict_max_padding, settings.num_threads, backend)
    if predictor.label_names != dataset.label_names:  # checked at submit from config.json; here on the loaded model
        raise batch_predictions.LabelsDiffer(
            f"model {params.model} answers {predictor.label_names}, not {dataset.label_names}"
        )
    reporter = ScoringReporter(job, len(rows))
    probabilities = []
    for start in range(0, len(rows), SCORING_CHUNK_ROWS):
        chunk = rows[start : start + SCORING_CHUNK_ROWS]
        probabilities += [answer.scores for answer in predictor.predict([(r.text, r.text_pair) for r in chunk])]
        reporter(len(probabilities))
    fence_of(job)()
    run_dir = settings.artifacts_dir / job.id
    run_dir.mkdir(parents=True, exist_ok=True)
    run_folder.write_scored_rows(run_dir, rows, dataset.label_names, probabilities)
    metrics = scored_metrics(rows, probabilities, dataset.label_names)
    summary = params.model_dump() | {"rows": len(rows)}
    run_folder.write_metrics(run_dir, summary | (metrics or {}))  # last: its presence marks the folder finished
    batch_predictions.publish(job.id, run_dir, settings, job.connection)
    return summary | {"metrics": metrics}


def as_builtin(settings: Settings) -> DatasetSpec:
    return DatasetSpec(name=BUILTIN_DATASET, source=str(settings.data_dir), format="boolq")


def scored_metrics(rows: list[Example], probabilities: list, label_names: tuple[str, ...]) -> dict | None:
    """Accuracy, macro-F1 and the rest against the rows' labels; None when the rows have none."""
    if not rows or any(row.label is None for row in rows):
        return None
    predictions = [max(range(len(p)), key=p.__getitem__) for p in probabilities]
    return classification_metrics([row.label for row in rows], predictions, label_names)


def train_on_ranks(job: Job, params: TrainParams, settings: Settings) -> dict:
    """``devices`` N > 1: run the job as N torchrun ranks (``python -m app.service.tasks``); return rank 0's result.

    This work horse only launches and waits, so a cancel or timeout (RQ kills its process group) kills torchrun,
    and the kernel then kills the ranks (``distributed.die_with_torchrun``)."""
    with tempfile.TemporaryDirectory(prefix="boolq-ranks-") as folder:
        result_file = Path(folder) / "result.json"
        token = attempts.held.get(job.id, "")
        rank_args = ["app.service.tasks", job.id, str(result_file), token]
        code = distributed.launch_ranks(params.devices, rank_args, settings)
        if code != 0 or not result_file.is_file():
            raise distributed.RanksFailed(
                f"a rank of {params.devices} failed (torchrun exit code {code}); see the worker's log"
            )
        return json.loads(result_file.read_text())


def run_rank(job_id: str, result_file: str, token: str = "") -> None:
    """One rank of a multi-device job (``train_on_ranks``): rank 0 reports progress to the job and writes the result.
    ``token``: the attempt's lease, as its worker claimed it (``attempts``)."""
    keep_freed_memory_in_heap()
    settings = Settings()
    if token:
        attempts.held[job_id] = token
    job = ProjectJob.fetch(job_id, connection=connect_redis(settings, for_worker=True), serializer=JSONSerializer)
    params = TrainParams(**job.args[0])
    params = resolve_for_training(params, settings)
    with distributed.process_group(settings.device) as device:
        reporter = ProgressReporter(job) if distributed.is_rank_zero() else None
        dataset = dataset_of(params, settings, job.connection)
        tracker = publishing_tracker(job.connection, settings, job.id)
        result = run_training(
            params,
            settings,
            run_id=job.id,
            on_progress=reporter,
            tracker=tracker,
            rank_device=device,
            dataset=dataset,
            fence=fence_of(job),
        )
    if result is not None:  # rank 0
        text = json.dumps(result.to_dict())
        run_folder.write_atomically(Path(result_file), lambda tmp: tmp.write_text(text))


def dataset_of(params: TrainParams, settings: Settings, connection) -> DatasetSpec | None:
    """The uploaded dataset the job trains on (its file checked against its digest); None for the built-in."""
    if params.dataset == BUILTIN_DATASET:
        return None
    return datasets.DatasetStore(settings, connection).spec_for_training(params)


class ScoringReporter:
    """A batch prediction's progress in the job's meta (``ScoringProgress``), throttled like training's; it stops a
    superseded attempt (``saved_meta``)."""

    def __init__(self, job: Job, total_rows: int):
        self.job = job
        self.total_rows = total_rows
        self.started = self.last_write = time.monotonic()

    def __call__(self, rows: int) -> None:
        now = time.monotonic()
        if rows < self.total_rows and now - self.last_write < PROGRESS_INTERVAL_S:
            return
        progress = run_folder.ScoringProgress(rows, self.total_rows, rows / max(now - self.started, 1e-9))
        self.job.meta["progress"] = asdict(progress)
        if saved_meta(self.job):
            self.last_write = now


def saved_meta(job: Job) -> bool:
    """Save the job's progress meta; False (logged) during a Redis failover's gap, when the work goes on unsaved.
    Raises ``AttemptSuperseded`` instead of saving if a newer attempt runs the job: the meta is that attempt's now,
    and this one stops training."""
    try:
        attempts.ensure_held(job.connection, job.origin, job.id)
        job.save_meta()
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("job %s: progress not saved, Redis unreachable: %s", job.id, exc)
        return False
    return True


class ProgressReporter:
    """The engine's progress callback: stores progress and the curves so far in the job's meta, throttled to
    spare Redis; a superseded attempt stops at its next report (``saved_meta``).
    ``meta["curves"]`` = ``{"loss": [[step, loss], ...], "dev_accuracy": [[epoch, acc], ...]}``."""

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
        latest = {key: value for key, value in asdict(progress).items() if key != "recent_losses"}  # in the curves
        self.job.meta["progress"] = latest
        self.job.meta["curves"] = self.curves
        if saved_meta(self.job):
            self.last_write = now

    def record(self, progress) -> None:
        if progress.dev_accuracy is not None:
            self.curves["dev_accuracy"].append([progress.epoch, progress.dev_accuracy])
            return  # the epoch's last step was reported just before, with the same loss
        loss = self.curves["loss"]
        loss += [[step, value] for step, value in progress.recent_losses or [(progress.step, progress.loss)]]
        while len(loss) > CURVE_POINTS:
            # Thin the older half, keep the newest point: the curve's shape survives long runs.
            loss[:] = loss[:-1:2] + loss[-1:]


if __name__ == "__main__":  # a rank started by train_on_ranks: python -m app.service.tasks JOB_ID RESULT_FILE TOKEN
    run_rank(*sys.argv[1:])
