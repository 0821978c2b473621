"""The fine-tuning pipeline, top to bottom: data → split → tokenize → model → train → evaluate → outputs.

A plain PyTorch loop (the original tutorial recipe: AdamW, linear schedule, clipping at 1.0, dev accuracy
each epoch). Its speed comes from small helpers elsewhere: one fast-tokenizer call per split, length-grouped
batches and dynamic padding (``app.engine.encoding``), a fused AdamW, a last layer that computes only the [CLS]
position the classifier reads, and bf16 autocast where the CPU/GPU does bf16 natively (``app.engine.modeling``).
The loop's state and its checkpoints, for resuming, are ``app.engine.checkpointing``'s.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from app.engine import distributed, run_folder
from app.engine.attention import use_cheap_cpu_attention
from app.engine.checkpointing import Checkpoints, TrainHistory, resume_or_start
from app.engine.data import Dataset, DatasetSpec, Example, digest, load_dataset, split_train_dev
from app.engine.encoding import (
    DeviceSplit,
    Encoded,
    device_batches,
    encode,
    length_grouped_batches,
    to_device,
    width_multiple,
)
from app.engine.evaluation import (
    accuracy,
    classification_metrics,
    confusion_matrix_report,
    final_metrics,
    predict_probabilities,
    predicted_labels,
)
from app.engine.memory import allocator_in_use, peak_resident_mb
from app.engine.model_card import write_model_card
from app.engine.modeling import (
    autocast,
    bf16_supported,
    compute_last_layer_for_first_token_only,
    device_of,
    load_classifier,
    load_tokenizer,
    resolve_device,
    takes_prepared_mask,
    use_tf32,
)
from app.engine.run_folder import Progress, RunResult
from app.params import TrainParams
from app.tracking import NullTracker, Tracker, ended_on_error, version_tags
from app.tracking.mlflow_model import write_mlmodel

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Progress], None]

# On a GPU the loop reads the losses back (one host sync) this often; the CPU has nothing to wait for: every step.
GPU_SYNC_EVERY_S = 1.0


def train_and_evaluate(
    params: TrainParams,
    data: DatasetSpec | str | Path,
    output_dir: str | Path,
    *,
    run_id: str | None = None,
    num_threads: int = 0,
    device: str = "auto",
    on_progress: ProgressCallback | None = None,
    tracker: Tracker | None = None,
    checkpoint_every_s: float | None = None,
    fence: Callable[[], None] | None = None,
) -> RunResult | None:
    """Fine-tune ``params.model`` on the dataset's train split, evaluate on val and write the run folder.

    ``data``: a dataset spec, or a BoolQ folder (or ``hub``) for the built-in ``boolq`` dataset.

    Where a run can resume (a service job retried), pass ``checkpoint_every_s``: the training state is then saved
    in the run folder after every epoch and every ``checkpoint_every_s`` seconds (0: at epoch ends only), and a run
    folder holding one (a killed attempt) is resumed from it. None (a CLI run, never resumed): no training state.
    With ``params.devices`` > 1 every rank calls this inside ``distributed.process_group``; rank 0 alone writes,
    tracks, reports and evaluates on val, and returns the result (the other ranks return None).
    ``fence``: called before each result the run writes (``metrics.json`` and the rest, the registry version, the
    tracker's finished run); it raises to stop an attempt that a newer one superseded (a service job re-run).
    """
    started = time.perf_counter()
    run_id = run_id or run_folder.new_run_id()
    run_dir = Path(output_dir) / run_id
    resuming = run_folder.can_resume(run_dir)
    tracker = tracker or NullTracker()
    fence = fence or (lambda: None)
    if not distributed.is_rank_zero():  # DDP: rank 0 alone writes the run folder, tracks and reports
        tracker, on_progress = NullTracker(), None
    checkpoints = None  # a run that can resume saves its training state (and the tracker uploads it)
    if checkpoint_every_s is not None:
        checkpoints = Checkpoints(run_folder.training_state(run_dir), checkpoint_every_s, tracker.log_checkpoint)
    configure_torch(params.seed, num_threads)
    target = resolve_device(device)
    use_tf32(target)
    splits = load_splits(params, as_spec(data))
    start_tracking(tracker, run_id, params, splits)

    # A crash still closes the tracker run, as FAILED, and leaves no finished-looking run folder behind.
    timings: dict[str, float] = {}
    with ended_on_error(tracker), run_folder.finished_only_if_completed(run_dir):
        with timed(timings, "tokenize_and_load"):
            prepared = load_and_encode(params, splits, target)
        if distributed.is_rank_zero():  # only now: a run that fails to load its model or data leaves no folder
            run_dir.mkdir(parents=True, exist_ok=resuming)
            run_folder.write_params(run_dir, params.model_dump())
        with timed(timings, "train"):
            history = fine_tune(
                prepared.model, prepared.pad_id, prepared.train, prepared.dev, params, on_progress, tracker,
                checkpoints, resuming,
            )  # fmt: skip
        if not distributed.is_rank_zero():  # DDP: the other ranks' work ends with training
            return None
        with timed(timings, "eval"):
            probabilities = predict_probabilities(prepared.model, prepared.pad_id, prepared.val)
        predictions = predicted_labels(probabilities)
        metrics = collect_metrics(prepared, splits, history, predictions, target, timings)
        fence()
        model_folder = write_outputs(run_dir, prepared, splits.val, predictions, probabilities)
        metrics["timings_s"]["total"] = time.perf_counter() - started
        run_folder.write_metrics(run_dir, metrics)
        describe_model(model_folder, params, metrics, splits)
        tracking = track_outputs(tracker, run_dir, model_folder, run_id, params, metrics, fence)
    if checkpoints is not None:
        checkpoints.remove()

    return RunResult(
        run_id=run_id,
        run_dir=str(run_dir),
        params=params.model_dump(),
        accuracy=metrics["accuracy"],
        n_eval=len(prepared.val),
        dev_accuracy=history.kept_dev_accuracy,
        predictions=predictions,
        metrics=metrics,
        tracking=tracking,
    )


@dataclass(frozen=True)
class Splits:
    """The rows a run uses: train (less the dev rows), dev (held out of train, for per-epoch accuracy) and val,
    and the dataset they come from."""

    dataset: Dataset
    train: list[Example]
    dev: list[Example]
    val: list[Example]

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.dataset.label_names


def as_spec(data: DatasetSpec | str | Path) -> DatasetSpec:
    """A dataset spec as it is, or a BoolQ folder (or ``hub``) as the built-in ``boolq`` entry."""
    if isinstance(data, DatasetSpec):
        return data
    return DatasetSpec(name="boolq", source=str(data), format="boolq")


def load_splits(params: TrainParams, spec: DatasetSpec) -> Splits:
    """The dataset's train and val, cut to ``train_limit``/``eval_limit``, with ``dev_size`` of train held out as
    dev."""
    dataset = load_dataset(spec)
    train_rows = dataset.train[: params.train_limit] if params.train_limit else dataset.train
    val_rows = dataset.val[: params.eval_limit] if params.eval_limit else dataset.val
    train_rows, dev_rows = split_train_dev(train_rows, params.dev_size, params.seed)
    return Splits(dataset, train_rows, dev_rows, val_rows)


def start_tracking(tracker: Tracker, run_id: str, params: TrainParams, splits: Splits) -> None:
    """Open the tracker's run with the parameters and each split as a dataset input (source, digest, rows)."""
    tracker.start_run(run_id, params.model_dump())
    name, source = splits.dataset.name, splits.dataset.source
    tracker.log_inputs(
        [
            {"name": f"{name}-{context}", "context": context, "source": source, "digest": digest(rows),
             "rows": len(rows), "file_sha256": splits.dataset.file_sha256}
            for context, rows in (("train", splits.train), ("dev", splits.dev), ("validation", splits.val))
        ]
    )  # fmt: skip


@dataclass
class Prepared:
    """The model on its device, its tokenizer, and the three splits tokenized at ``max_length``."""

    model: torch.nn.Module
    tokenizer: object
    train: Encoded
    dev: Encoded
    val: Encoded
    max_length: int

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def load_and_encode(params: TrainParams, splits: Splits, target: torch.device) -> Prepared:
    """Load the tokenizer and the classifier (onto ``target``) and tokenize every split, at most as long as the
    model's position embeddings allow."""
    tokenizer = load_tokenizer(params.model)
    model = load_classifier(params.model, splits.label_names).to(target)
    max_length = min(params.max_length, model.config.max_position_embeddings)
    train, dev, val = (encode(tokenizer, rows, max_length) for rows in (splits.train, splits.dev, splits.val))
    return Prepared(model, tokenizer, train, dev, val, max_length)


def collect_metrics(
    prepared: Prepared,
    splits: Splits,
    history: TrainHistory,
    predictions: list[int],
    target: torch.device,
    timings: dict,
) -> dict:
    """metrics.json's content: val classification metrics, the dataset, the training history, sizes, precision and
    timings."""
    return classification_metrics(prepared.val.labels, predictions, splits.label_names) | {
        "dataset": {
            "name": splits.dataset.name,
            "source": splits.dataset.source,
            "file_sha256": splits.dataset.file_sha256,
            "val_digest": digest(splits.val),
        },
        "dev_accuracy_per_epoch": history.dev_accuracy,
        "kept_epoch": history.kept_epoch,
        "stopped_epoch": history.stopped_epoch,
        "early_stopped": history.early_stopped,
        "resumed_from_step": history.resumed_from_step,
        "loss_curve": history.loss,
        "n_train": len(prepared.train),
        "n_dev": len(prepared.dev),
        "n_eval": len(prepared.val),
        "max_length": prepared.max_length,
        "precision_mode": "bf16" if bf16_supported(target.type) else "fp32",
        "device": str(target),
        "train_examples_per_s": history.examples_trained / timings["train"],
        "peak_rss_mb": peak_resident_mb(),  # this process's: a worker's job runs in its own work horse
        "allocator": allocator_in_use(),
        "timings_s": dict(timings),
    }


def write_outputs(
    run_dir: Path, prepared: Prepared, val_rows: list[Example], predictions: list[int], probabilities: list[list[float]]
) -> Path:
    """Write the val predictions and the fine-tuned model (with its tokenizer) into the run folder; the model's
    folder."""
    run_folder.write_predictions(run_dir, val_rows, predictions, probabilities)
    return run_folder.save_model(run_dir, prepared.model, prepared.tokenizer)


def describe_model(model_folder: Path, params: TrainParams, metrics: dict, splits: Splits) -> None:
    """The model folder's card (README.md) and MLmodel, written before any upload, so the digest a worker records
    (``app.service.model_records``) covers them like the weights."""
    write_model_card(model_folder, params.model_dump(), metrics)
    example = splits.val[0] if splits.val else Example(idx=0, text="is the sky blue", text_pair="It is.", label=0)
    write_mlmodel(model_folder, splits.label_names, metrics["max_length"], (example.text, example.text_pair))


def track_outputs(
    tracker: Tracker,
    run_dir: Path,
    model_folder: Path,
    run_id: str,
    params: TrainParams,
    metrics: dict,
    fence: Callable[[], None],
) -> dict:
    """Log the final metrics, the run folder's files and the model (registered if ``params.register``) and close
    the tracker's run; what the tracker says about it (run id, URL...). ``fence`` again before the version and
    the run's end: the uploads take a while."""
    tracker.log_metrics(final_metrics(metrics), step=None)
    for name in (run_folder.PREDICTIONS, run_folder.PARAMS, run_folder.METRICS):
        tracker.log_artifact(run_dir / name)
    tracker.log_model(model_folder)
    tracker.log_dict(confusion_matrix_report(metrics), "confusion_matrix.json")
    tracker.log_dict({"per_class": metrics["per_class"]}, "per_class_metrics.json")
    if params.register:
        tags = version_tags(run_id, params.model_dump(), metrics)
        fence()
        tracker.register_model(model_folder, final_metrics(metrics), tags)
    fence()
    return tracker.end_run("FINISHED")


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the block's wall time in ``timings[name]``."""
    started = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - started


def configure_torch(seed: int, num_threads: int) -> None:
    """Seed every generator and fix the thread count, so CPU runs are reproducible."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fine_tune(
    model: torch.nn.Module,
    pad_id: int,
    train_set: Encoded,
    dev_set: Encoded,
    params: TrainParams,
    on_progress: ProgressCallback | None,
    tracker: Tracker,
    checkpoints: Checkpoints | None = None,
    resume: bool = False,
    sync_every_s: float | None = None,
) -> TrainHistory:
    """The training loop: epochs of length-grouped batches, dev accuracy after each, the best epoch's weights kept
    with ``keep_best_epoch``/early stopping. With ``resume`` it continues from the state ``checkpoints`` holds.

    Losses stay on the device and are read back, logged and reported every ``sync_every_s`` seconds (default:
    every step on the CPU, ``GPU_SYNC_EVERY_S`` on a GPU), at checkpoints and at each epoch's end."""
    generator = torch.Generator().manual_seed(params.seed)
    total_steps = -(-len(train_set) // params.batch_size) * params.epochs
    prepare_for_training(model)
    optimizer = make_optimizer(model, params)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(params.warmup_ratio * total_steps), total_steps)
    state = resume_or_start(params.epochs, checkpoints if resume else None, model, optimizer, scheduler, generator)
    history, device = state.history, device_of(model)
    if sync_every_s is None:
        sync_every_s = GPU_SYNC_EVERY_S if device.type == "cuda" else 0.0
    reports = LossReports(sync_every_s, history, tracker, on_progress, total_steps)
    train_split = to_device(train_set, pad_id, device, with_prepared_mask=takes_prepared_mask(model))
    trained = distributed.wrap(model)  # DDP on several ranks (for the steps only); the model itself on one
    keep_best = params.keep_best_epoch or params.early_stopping_patience is not None
    for epoch in range(state.epoch, params.epochs + 1):
        state.epoch, state.epoch_order = epoch, generator.get_state()  # the batch order is redrawn from here
        trained.train()
        for rows, weight, batch in epoch_batches(train_split, params.batch_size, generator, state.batches_done):
            loss = train_step(trained, batch, optimizer, scheduler, weight)
            state.step, state.batches_done = state.step + 1, state.batches_done + 1
            reports.add(state.step, loss, rows)
            checkpoint_due = checkpoints is not None and checkpoints.due()
            if reports.due() or checkpoint_due:
                reports.publish(epoch)
            if checkpoint_due:
                checkpoints.save(state, model, optimizer, scheduler)
        reports.publish(epoch)
        dev_accuracy = distributed.computed_on_rank_zero(  # DDP: one figure on every rank, so they decide alike
            lambda: accuracy(dev_set.labels, predict_probabilities(model, pad_id, dev_set))
        )
        history.dev_accuracy.append(dev_accuracy)
        tracker.log_metrics({"dev_accuracy": dev_accuracy}, step=state.step)
        log.info("epoch %d/%d: dev accuracy %.4f", epoch, params.epochs, dev_accuracy)
        if keep_best and history.is_best_so_far():
            state.best_weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
            history.kept_epoch = epoch
        reports.report(epoch, state.step, dev_accuracy)
        history.stopped_epoch = epoch
        if stops_early(params, history):
            log.info(
                "early stop after epoch %d: no better dev accuracy for %d epochs", epoch, params.early_stopping_patience
            )
            break
        state.epoch, state.batches_done, state.epoch_order = epoch + 1, 0, generator.get_state()
        if checkpoints is not None and epoch < params.epochs:
            checkpoints.save(state, model, optimizer, scheduler)
    history.examples_trained, history.loss_syncs = reports.seen, reports.losses.syncs  # this process's, for its speed
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
        log.info("kept the weights of epoch %d (best dev accuracy)", history.kept_epoch)
    return history


def prepare_for_training(model: torch.nn.Module) -> None:
    """The engine's speed-ups that change no result: the cheap CPU attention, and a last layer computing only the
    [CLS] position the classifier reads."""
    if device_of(model).type == "cpu":
        use_cheap_cpu_attention(model)  # before the [CLS]-only layer, which reads it
    compute_last_layer_for_first_token_only(model)


def epoch_batches(
    split: DeviceSplit, batch_size: int, generator: torch.Generator, done: int
) -> Iterator[tuple[int, float, dict[str, torch.Tensor]]]:
    """The epoch's batches after the first ``done`` (a resumed epoch), each as its rows, the weight of this rank's
    share and that share on the device. The epoch's order is drawn from ``generator`` now, the tensors as they go."""
    batches = length_grouped_batches(split.host_lengths, batch_size, generator)[done:]
    shares = [distributed.share_of_batch(indices) for indices in batches]  # DDP: this rank's slices (all on one)
    steps = device_batches(split, [share for share, _ in shares], width_multiple(split.labels.device))
    return zip([len(indices) for indices in batches], [weight for _, weight in shares], steps, strict=True)


def stops_early(params: TrainParams, history: TrainHistory) -> bool:
    """True when early stopping is on and dev accuracy has not improved for ``early_stopping_patience`` epochs
    (never after the last epoch: there is nothing left to stop)."""
    patience, epoch = params.early_stopping_patience, history.stopped_epoch
    return patience is not None and epoch - history.kept_epoch >= patience and epoch < params.epochs


class LossReports:
    """The loop's losses on their way out: kept on the device until due, then read back in one sync, appended to
    the history, logged to the tracker in one call and reported to the progress callback once."""

    def __init__(
        self,
        sync_every_s: float,
        history: TrainHistory,
        tracker: Tracker,
        on_progress: ProgressCallback | None,
        total_steps: int,
    ):
        self.losses = PendingLosses(sync_every_s)
        self.history, self.tracker, self.on_progress = history, tracker, on_progress
        self.total_steps = total_steps
        self.seen, self.started = 0, time.perf_counter()  # this process's examples, for its speed

    def add(self, step: int, loss: torch.Tensor, examples: int) -> None:
        self.losses.add(step, loss)
        self.seen += examples

    def due(self) -> bool:
        return self.losses.due()

    def publish(self, epoch: int) -> None:
        """Read the pending losses back (one host sync), then log and report all of their steps in one call each."""
        drained = self.losses.drain()
        if drained:
            self.history.loss += [loss for _, loss in drained]
            self.tracker.log_metric_history("train_loss", drained)
            self.report(epoch, drained[-1][0], recent=drained)

    def report(self, epoch: int, step: int, dev_accuracy: float | None = None, recent=()) -> None:
        if self.on_progress is None:
            return
        speed = self.seen / (time.perf_counter() - self.started)
        loss = self.history.loss[step - 1]
        progress = Progress(
            epoch, self.history.epochs, step, self.total_steps, loss, dev_accuracy, speed, tuple(recent)
        )
        self.on_progress(progress)


class PendingLosses:
    """Per-step losses left on the device until the next host sync.

    Reading a GPU tensor (``.item()``) stalls the CPU until the GPU has caught up, so the GPU idles while the
    CPU prepares the next step. Read once per interval, all at once, the loop stays ahead of the GPU. On the
    CPU there is nothing to wait for: the interval is 0, every step.
    """

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.synced_at = time.monotonic()
        self.syncs = 0

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def due(self) -> bool:
        return time.monotonic() - self.synced_at >= self.every_s

    def drain(self) -> list[tuple[int, float]]:
        """The pending (step, loss) pairs as Python floats: one device-to-host copy for all of them."""
        if not self.pending:
            return []
        steps, tensors = zip(*self.pending, strict=True)
        values = torch.stack(tensors).tolist()
        self.pending.clear()
        self.synced_at = time.monotonic()
        self.syncs += 1
        return list(zip(steps, values, strict=True))


def make_optimizer(model: torch.nn.Module, params: TrainParams, fused: bool = True) -> torch.optim.Optimizer:
    # fused: one kernel over all parameters instead of ~10 elementwise passes each (~3x faster optimizer step
    # on CPU alone; within a whole training step the gain is small once freed memory is reused, bench/README.md).
    groups = layer_groups(model, params.lr, params.layer_lr_decay)
    return torch.optim.AdamW(groups, lr=params.lr, eps=params.eps, weight_decay=params.weight_decay, fused=fused)


# ``encoder.layer.3.`` (BERT, MiniLM), ``layers.3.`` (DistilBERT-style and others): the transformer block's number.
LAYER_NUMBER = re.compile(r"\.layers?\.(\d+)\.")


def layer_groups(model: torch.nn.Module, lr: float, decay: float) -> list[dict]:
    """Parameter groups for layer-wise lr decay: the head and pooler at ``lr``, block i of n at
    ``lr * decay ** (n - i)``, the embeddings at ``lr * decay ** (n + 1)``. One group when ``decay`` is 1."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if decay == 1.0:
        return [{"params": [p for _, p in named]}]
    depth = {name: int(m.group(1)) + 1 if (m := LAYER_NUMBER.search(name)) else None for name, _ in named}
    top = max((d for d in depth.values() if d is not None), default=0) + 1
    for name in depth:
        if depth[name] is None:
            depth[name] = 0 if "embeddings" in name else top
    by_depth: dict[int, list] = {}
    for name, p in named:
        by_depth.setdefault(depth[name], []).append(p)
    return [{"params": ps, "lr": lr * decay ** (top - d)} for d, ps in sorted(by_depth.items())]


def train_step(
    model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, scheduler=None, weight: float = 1.0
) -> torch.Tensor:
    """One optimisation step (forward, backward, clip at 1.0, AdamW, schedule); returns the batch's loss, still
    on the device (reading it is a host sync: ``PendingLosses`` batches those).

    ``weight``: this rank's share of a batch split over DDP ranks (``distributed.share_of_batch``)."""
    with autocast(device_of(model)):
        loss = model(**batch).loss
    if weight != 1.0:
        loss = loss * weight
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return distributed.mean_over_ranks(loss.detach())  # DDP: the whole batch's loss on every rank
