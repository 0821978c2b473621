"""The fine-tuning pipeline, top to bottom: data → split → tokenize → model → train → evaluate → outputs.

A plain PyTorch loop (the original tutorial recipe: AdamW, linear schedule, clipping at 1.0, dev accuracy
each epoch). Its speed comes from small helpers elsewhere: one fast-tokenizer call per split, length-grouped
batches and dynamic padding (``app.engine.encoding``), a fused AdamW, a last layer that computes only the [CLS]
position the classifier reads, and bf16 autocast where the CPU/GPU does bf16 natively (``app.engine.modeling``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import pickle
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from app.engine import distributed, run_folder
from app.engine.attention import use_cheap_cpu_attention
from app.engine.data import digest, load_boolq, split_train_dev
from app.engine.encoding import Encoded, device_batches, encode, length_grouped_batches, to_device, width_multiple
from app.engine.evaluation import (
    accuracy,
    classification_metrics,
    confusion_matrix_report,
    final_metrics,
    predict_probabilities,
)
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

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Progress], None]

# On a GPU the loop reads the losses back (one host sync) this often; the CPU has nothing to wait for: every step.
GPU_SYNC_EVERY_S = 1.0


def train_and_evaluate(
    params: TrainParams,
    data_dir: str | Path,
    output_dir: str | Path,
    *,
    run_id: str | None = None,
    num_threads: int = 0,
    device: str = "auto",
    on_progress: ProgressCallback | None = None,
    tracker: Tracker | None = None,
    checkpoint_every_s: float | None = None,
) -> RunResult | None:
    """Fine-tune ``params.model`` on BoolQ train, evaluate on val and write the run folder.

    Where a run can resume (a service job retried), pass ``checkpoint_every_s``: the training state is then saved
    in the run folder after every epoch and every ``checkpoint_every_s`` seconds (0: at epoch ends only), and a run
    folder holding one (a killed attempt) is resumed from it. None (a CLI run, never resumed): no training state.
    With ``params.devices`` > 1 every rank calls this inside ``distributed.process_group``; rank 0 alone writes,
    tracks, reports and evaluates on val, and returns the result (the other ranks return None).
    """
    started = time.perf_counter()
    run_id = run_id or run_folder.new_run_id()
    run_dir = Path(output_dir) / run_id
    resuming = run_folder.can_resume(run_dir)
    tracker = tracker or NullTracker()
    if not distributed.is_rank_zero():  # DDP: rank 0 alone writes the run folder, tracks and reports
        tracker, on_progress = NullTracker(), None
    checkpoints = None  # a run that can resume saves its training state (and the tracker uploads it)
    if checkpoint_every_s is not None:
        state = run_folder.training_state(run_dir)
        checkpoints = Checkpoints(state, checkpoint_every_s, on_saved=tracker.log_checkpoint)
    configure_torch(params.seed, num_threads)
    target = resolve_device(device)
    use_tf32(target)

    boolq = load_boolq(data_dir)
    train_rows = boolq.train[: params.train_limit] if params.train_limit else boolq.train
    val_rows = boolq.val[: params.eval_limit] if params.eval_limit else boolq.val
    train_rows, dev_rows = split_train_dev(train_rows, params.dev_size, params.seed)

    tracker.start_run(run_id, params.model_dump())
    tracker.log_inputs(
        [
            {
                "name": f"boolq-{context}",
                "context": context,
                "source": str(data_dir),
                "digest": digest(rows),
                "rows": len(rows),
            }
            for context, rows in (("train", train_rows), ("dev", dev_rows), ("validation", val_rows))
        ]
    )

    # A crash still closes the tracker run, as FAILED, and leaves no finished-looking run folder behind.
    with ended_on_error(tracker), run_folder.finished_only_if_completed(run_dir):
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(params.model)
        model = load_classifier(params.model).to(target)
        max_length = min(params.max_length, model.config.max_position_embeddings)
        train_set, dev_set, val_set = (encode(tokenizer, rows, max_length) for rows in (train_rows, dev_rows, val_rows))
        tokenize_s = time.perf_counter() - t0
        if distributed.is_rank_zero():  # only now: a run that fails to load its model or data leaves no folder
            run_dir.mkdir(parents=True, exist_ok=resuming)
            run_folder.write_params(run_dir, params.model_dump())

        t0 = time.perf_counter()
        history = fine_tune(
            model, tokenizer.pad_token_id, train_set, dev_set, params, on_progress, tracker, checkpoints, resuming
        )
        train_s = time.perf_counter() - t0
        if not distributed.is_rank_zero():  # DDP: the other ranks' work ends with training
            return None

        t0 = time.perf_counter()
        probabilities = predict_probabilities(model, tokenizer.pad_token_id, val_set)
        eval_s = time.perf_counter() - t0

        predictions = [int(p >= 0.5) for p in probabilities]
        metrics = classification_metrics(val_set.labels, predictions)
        metrics |= {
            "dev_accuracy_per_epoch": history["dev_accuracy"],
            "kept_epoch": history["kept_epoch"],
            "stopped_epoch": history["stopped_epoch"],
            "early_stopped": history["stopped_epoch"] < params.epochs,
            "resumed_from_step": history["resumed_from_step"],
            "loss_curve": history["loss"],
            "n_train": len(train_set),
            "n_dev": len(dev_set),
            "n_eval": len(val_set),
            "max_length": max_length,
            "precision_mode": "bf16" if bf16_supported(target.type) else "fp32",
            "device": str(target),
            "train_examples_per_s": history["examples_trained"] / train_s,
            "peak_rss_mb": peak_resident_mb(),  # this process's: a worker's job runs in its own work horse
            "timings_s": {
                "tokenize_and_load": tokenize_s,
                "train": train_s,
                "eval": eval_s,
            },
        }
        predictions_file = run_folder.write_predictions(run_dir, val_rows, predictions, probabilities)
        model_folder = run_folder.save_model(run_dir, model, tokenizer)
        metrics["timings_s"]["total"] = time.perf_counter() - started
        run_folder.write_metrics(run_dir, metrics)

        tracker.log_metrics(final_metrics(metrics), step=None)
        tracker.log_artifact(predictions_file)
        tracker.log_artifact(run_dir / run_folder.PARAMS)
        tracker.log_artifact(run_dir / run_folder.METRICS)
        tracker.log_model(model_folder)
        tracker.log_dict(confusion_matrix_report(metrics), "confusion_matrix.json")
        if params.register:
            tags = version_tags(run_id, params.model_dump(), metrics)
            tracker.register_model(model_folder, final_metrics(metrics), tags)
        tracking = tracker.end_run("FINISHED")
    if checkpoints is not None:
        checkpoints.remove()

    return RunResult(
        run_id=run_id,
        run_dir=str(run_dir),
        params=params.model_dump(),
        accuracy=metrics["accuracy"],
        n_eval=len(val_set),
        dev_accuracy=history["dev_accuracy"][history["kept_epoch"] - 1],
        predictions=predictions,
        metrics=metrics,
        tracking=tracking,
    )


def configure_torch(seed: int, num_threads: int) -> None:
    """Seed every generator and fix the thread count, so CPU runs are reproducible."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_KEEP_BYTES = 1 << 30
# Freed memory ``heap_limit_for`` lets the heap keep resident above the model, its gradients and AdamW state.
HEAP_SLACK_BYTES = 3 << 29  # 1.5 GiB


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``); None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory_in_heap() -> bool:
    """Let glibc keep freed activation buffers for reuse instead of unmapping them; True if applied.

    By default every block over the (at most 32 MiB) mmap threshold is mmap'd and returned to the kernel
    on free, so each training step faults in, and the kernel zeroes, its large activations again.
    Blocks up to 1 GiB now come from the heap and stay there (faster CPU steps), but the heap then grows all run
    long (bench/README.md "Memory": trimming it with ``trim_heap_above`` bounds that at a measured cost in speed,
    so the loop does not). A no-op where libc is not glibc. Process-wide, so the
    process that exists to train calls it (CLI train, the worker's job), not a library function.
    """
    libc = glibc()
    return libc is not None and bool(
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_KEEP_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, HEAP_KEEP_BYTES)
    )


def trim_heap_above(limit_bytes: int) -> bool:
    """Return the heap's free pages to the kernel (``malloc_trim``) if resident memory exceeds ``limit_bytes``;
    True if it did.

    With heap reuse every freed block stays resident, and batches of ever new widths leave holes that later
    blocks do not fit, so the heap grows all run long (to several GB for minilm over BoolQ). Trimming past a
    limit bounds that; bench/step_ablation.py's ``with heap_trim`` variant measures what it costs. Elsewhere than
    Linux with glibc this does nothing."""
    libc = glibc()
    if libc is None or resident_bytes() <= limit_bytes:
        return False
    libc.malloc_trim(0)
    return True


def heap_limit_for(model: torch.nn.Module) -> int:
    """A limit for ``trim_heap_above`` in a training process: what it holds now, plus the model's gradients and AdamW
    state still to come (3 × its weights), plus ``HEAP_SLACK_BYTES``."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return resident_bytes() + 3 * weights + HEAP_SLACK_BYTES


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_resident_mb() -> float:
    """This process's peak resident memory so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
) -> dict:
    """The training loop; returns the per-step loss curve, per-epoch dev accuracy, the epoch whose weights the
    model ends with (the last, or with ``keep_best_epoch``/early stopping the first with the best dev accuracy)
    and the epoch it stopped at. With ``resume`` it continues from the state ``checkpoints`` holds.

    Losses stay on the device and are read back, logged and reported every ``sync_every_s`` seconds (default:
    every step on the CPU, ``GPU_SYNC_EVERY_S`` on a GPU), at checkpoints and at each epoch's end."""
    generator = torch.Generator().manual_seed(params.seed)
    lengths = [len(ids) for ids in train_set.input_ids]
    steps_per_epoch = -(-len(train_set) // params.batch_size)
    total_steps = steps_per_epoch * params.epochs
    if device_of(model).type == "cpu":
        use_cheap_cpu_attention(model)  # before the [CLS]-only layer, which reads it
    compute_last_layer_for_first_token_only(model)
    optimizer = make_optimizer(model, params)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(params.warmup_ratio * total_steps), total_steps)
    keep_best = params.keep_best_epoch or params.early_stopping_patience is not None
    state = TrainingState(history={"loss": [], "dev_accuracy": [], "kept_epoch": params.epochs})
    restored = None
    if resume and checkpoints is not None:
        restored = checkpoints.restore(model, optimizer, scheduler, generator)
    resume = restored is not None
    if resume:
        state = restored
        log.info("resuming at epoch %d, step %d of %d", state.epoch, state.step, total_steps)
    history = state.history
    history["resumed_from_step"] = state.step if resume else None
    seen, started = 0, time.perf_counter()
    device = device_of(model)
    train_split = to_device(train_set, pad_id, device, with_prepared_mask=takes_prepared_mask(model))
    pad_multiple = width_multiple(device)
    losses = PendingLosses(sync_every_s if sync_every_s is not None else (GPU_SYNC_EVERY_S * (device.type == "cuda")))
    trained = distributed.wrap(model)  # DDP on several ranks (steps only); the model itself on one device

    def progress(epoch: int, step: int, dev_accuracy: float | None = None, recent=()) -> Progress:
        speed = seen / (time.perf_counter() - started)
        loss = history["loss"][step - 1]
        return Progress(epoch, params.epochs, step, total_steps, loss, dev_accuracy, speed, tuple(recent))

    def publish(epoch: int) -> None:
        """Read the pending losses back (one host sync), then log and report all of their steps in one call each."""
        drained = losses.drain()
        if drained:
            history["loss"] += [loss for _, loss in drained]
            tracker.log_metric_history("train_loss", drained)
            report(on_progress, progress(epoch, drained[-1][0], recent=drained))

    for epoch in range(state.epoch, params.epochs + 1):
        state.epoch, state.epoch_order = epoch, generator.get_state()  # the batch order is redrawn from here
        batches = length_grouped_batches(lengths, params.batch_size, generator)[state.batches_done :]
        shares = [distributed.share_of_batch(indices) for indices in batches]  # DDP: this rank's slices (all on one)
        trained.train()
        steps = device_batches(train_split, [share for share, _ in shares], pad_multiple)
        for indices, (_, weight), batch in zip(batches, shares, steps, strict=True):
            losses.add(state.step + 1, train_step(trained, batch, optimizer, scheduler, weight))
            state.step, state.batches_done, seen = state.step + 1, state.batches_done + 1, seen + len(indices)
            checkpoint_due = checkpoints is not None and checkpoints.due()
            if losses.due() or checkpoint_due:
                publish(epoch)
            if checkpoint_due:
                checkpoints.save(state, model, optimizer, scheduler)
        publish(epoch)

        dev_accuracy = distributed.computed_on_rank_zero(  # DDP: one figure on every rank, so they decide alike
            lambda: accuracy(dev_set.labels, predict_probabilities(model, pad_id, dev_set))
        )
        history["dev_accuracy"].append(dev_accuracy)
        tracker.log_metrics({"dev_accuracy": dev_accuracy}, step=state.step)
        log.info("epoch %d/%d: dev accuracy %.4f", epoch, params.epochs, dev_accuracy)
        if keep_best and dev_accuracy > max(history["dev_accuracy"][:-1], default=-1.0):
            state.best_weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
            history["kept_epoch"] = epoch
        report(on_progress, progress(epoch, state.step, dev_accuracy))
        patience = params.early_stopping_patience
        if patience is not None and epoch - history["kept_epoch"] >= patience and epoch < params.epochs:
            log.info("early stop after epoch %d: no better dev accuracy for %d epochs", epoch, patience)
            break
        state.epoch, state.batches_done, state.epoch_order = epoch + 1, 0, generator.get_state()
        if checkpoints is not None and epoch < params.epochs:
            checkpoints.save(state, model, optimizer, scheduler)
    history["stopped_epoch"] = epoch
    history["examples_trained"] = seen
    history["loss_syncs"] = losses.syncs
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
        log.info("kept the weights of epoch %d (best dev accuracy)", history["kept_epoch"])
    return history


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


@dataclass
class TrainingState:
    """Where the loop is: the epoch under way, its batches done, total steps, and the generator state its
    batch order was drawn from (so a resumed epoch redraws the same order and skips the batches done)."""

    history: dict
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
            "loop": dict(vars(state)),  # not asdict: that would deep-copy the best weights
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
        model.load_state_dict(snapshot["model"])
        optimizer.load_state_dict(snapshot["optimizer"])
        scheduler.load_state_dict(snapshot["scheduler"])
        rng = snapshot["rng"]
        restore_python_rng(rng["python"])
        restore_numpy_rng(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        state = TrainingState(**snapshot["loop"])
        generator.set_state(state.epoch_order)
        return state

    def remove(self) -> None:
        if distributed.is_rank_zero():
            self.path.unlink(missing_ok=True)


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


def make_optimizer(model: torch.nn.Module, params: TrainParams, fused: bool = True) -> torch.optim.Optimizer:
    # fused: one kernel over all parameters instead of ~10 elementwise passes each (~3x faster optimizer step
    # on CPU alone; within a whole training step the gain is small once freed memory is reused, bench/README.md).
    return torch.optim.AdamW(model.parameters(), lr=params.lr, eps=params.eps, fused=fused)


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


def report(on_progress: ProgressCallback | None, progress: Progress) -> None:
    if on_progress is not None:
        on_progress(progress)
