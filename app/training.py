"""The fine-tuning pipeline, top to bottom: data → split → tokenize → model → train → evaluate → outputs.

A plain PyTorch loop (the seed's recipe: AdamW, linear schedule, clipping at 1.0, dev accuracy each
epoch) with the speed features as small helpers: one fast-tokenizer call per split, length-grouped
batches, dynamic padding, a fused AdamW, a last layer that computes only the [CLS] position the
classifier reads, and bf16 autocast where the CPU/GPU does bf16 natively.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
)
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from app.data import BoolQExample, load_boolq, split_train_dev
from app.modeling import (
    bf16_supported,
    compute_last_layer_for_first_token_only,
    load_classifier,
    load_tokenizer,
    resolve_device,
)
from app.params import TrainParams
from app.tracking import NullTracker, Tracker, ended_on_error

log = logging.getLogger(__name__)

# Length-grouped sampling sorts within windows of this many batches (as HF's LengthGroupedSampler).
MEGABATCH_FACTOR = 50
EVAL_BATCH_SIZE = 64


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives after each optimisation step and after each dev evaluation."""

    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float
    dev_accuracy: float | None
    examples_per_s: float


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


@dataclass
class Encoded:
    """A tokenized split: unpadded token ids per example, plus labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


ProgressCallback = Callable[[Progress], None]


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


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
) -> RunResult:
    """Fine-tune ``params.model`` on BoolQ train, evaluate on val and write the run folder."""
    started = time.perf_counter()
    run_id = run_id or new_run_id()
    run_dir = Path(output_dir) / run_id
    tracker = tracker or NullTracker()
    configure_torch(params.seed, num_threads)
    target = resolve_device(device)

    boolq = load_boolq(data_dir)
    train_rows = boolq.train[: params.train_limit] if params.train_limit else boolq.train
    val_rows = boolq.val[: params.eval_limit] if params.eval_limit else boolq.val
    train_rows, dev_rows = split_train_dev(train_rows, params.dev_size, params.seed)

    run_dir.mkdir(parents=True, exist_ok=False)
    write_json(run_dir / "params.json", params.model_dump())
    tracker.start_run(run_id, params.model_dump())

    with ended_on_error(tracker):  # a crash still closes the tracker run, as FAILED
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(params.model)
        model = load_classifier(params.model).to(target)
        max_length = min(params.max_length, model.config.max_position_embeddings)
        train_set, dev_set, val_set = (encode(tokenizer, rows, max_length) for rows in (train_rows, dev_rows, val_rows))
        tokenize_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        history = fine_tune(model, tokenizer.pad_token_id, train_set, dev_set, params, on_progress, tracker)
        train_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        probabilities = predict_probabilities(model, tokenizer.pad_token_id, val_set)
        eval_s = time.perf_counter() - t0

        predictions = [int(p >= 0.5) for p in probabilities]
        metrics = classification_metrics(val_set.labels, predictions)
        metrics |= {
            "dev_accuracy_per_epoch": history["dev_accuracy"],
            "kept_epoch": history["kept_epoch"],
            "loss_curve": history["loss"],
            "n_train": len(train_set),
            "n_dev": len(dev_set),
            "n_eval": len(val_set),
            "max_length": max_length,
            "precision_mode": "bf16" if bf16_supported(target.type) else "fp32",
            "device": str(target),
            "train_examples_per_s": len(train_set) * params.epochs / train_s,
            "timings_s": {
                "tokenize_and_load": tokenize_s,
                "train": train_s,
                "eval": eval_s,
            },
        }
        write_predictions(run_dir / "predictions.jsonl", val_rows, predictions, probabilities)
        save_model(model, tokenizer, run_dir / "model")
        metrics["timings_s"]["total"] = time.perf_counter() - started
        write_json(run_dir / "metrics.json", metrics)

        tracker.log_metrics(final_metrics(metrics), step=None)
        tracker.log_artifact(run_dir / "predictions.jsonl")
        tracker.log_artifact(run_dir / "metrics.json")
        tracker.log_dict(confusion_matrix_report(metrics), "confusion_matrix.json")
        tracker.register_model(run_dir / "model", final_metrics(metrics))
        tracking = tracker.end_run("FINISHED")

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
    keep_freed_memory_in_heap()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_KEEP_BYTES = 1 << 30


def keep_freed_memory_in_heap() -> bool:
    """Let glibc keep freed activation buffers for reuse instead of unmapping them; True if applied.

    By default every block over the (at most 32 MiB) mmap threshold is mmap'd and returned to the kernel
    on free, so each training step faults in, and the kernel zeroes, its large activations again.
    Blocks up to 1 GiB now come from the heap and stay there: about 12 % faster CPU training steps
    for about 6 % more peak RSS (bench/README.md). A no-op where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_KEEP_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, HEAP_KEEP_BYTES))
    except (OSError, AttributeError):
        return False


def encode(tokenizer: PreTrainedTokenizerBase, rows: list[BoolQExample], max_length: int) -> Encoded:
    """Tokenize question+passage pairs in one batched fast-tokenizer call, without padding."""
    enc = tokenizer(
        [r.question for r in rows],
        [r.passage for r in rows],
        truncation="longest_first",
        max_length=max_length,
        return_token_type_ids=True,
        return_attention_mask=False,
    )
    return Encoded(enc["input_ids"], enc["token_type_ids"], [int(r.label) for r in rows])


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffle, sort by length inside windows of ``MEGABATCH_FACTOR`` batches, shuffle the batches.

    Batches then hold similar lengths, so dynamic padding wastes little, yet the order stays random.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * MEGABATCH_FACTOR
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def collate(
    data: Encoded, indices: list[int], pad_id: int, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Pad one batch to its longest member (dynamic padding), on ``device`` (default: the CPU)."""
    width = max(len(data.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(indices), width), dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        input_ids[row, :n] = torch.tensor(data.input_ids[i])
        token_type_ids[row, :n] = torch.tensor(data.token_type_ids[i])
        attention_mask[row, :n] = 1
    labels = torch.tensor([data.labels[i] for i in indices])
    batch = {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }
    if device is not None:  # .to() returns the tensor itself when it is already there
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
    return batch


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where the device computes bf16 natively; fp32 elsewhere."""
    if bf16_supported(device.type):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fine_tune(
    model: torch.nn.Module,
    pad_id: int,
    train_set: Encoded,
    dev_set: Encoded,
    params: TrainParams,
    on_progress: ProgressCallback | None,
    tracker: Tracker,
) -> dict[str, list]:
    """The training loop; returns the per-step loss curve, per-epoch dev accuracy and the epoch whose weights
    the model ends with (the last, or with ``keep_best_epoch`` the first with the best dev accuracy)."""
    generator = torch.Generator().manual_seed(params.seed)
    lengths = [len(ids) for ids in train_set.input_ids]
    steps_per_epoch = -(-len(train_set) // params.batch_size)
    total_steps = steps_per_epoch * params.epochs
    compute_last_layer_for_first_token_only(model)
    # fused: one kernel over all parameters instead of ~10 elementwise passes each (~3x faster optimizer step
    # on CPU alone; within a whole training step the gain is small once freed memory is reused, bench/README.md).
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, eps=params.eps, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(params.warmup_ratio * total_steps), total_steps)
    history: dict = {"loss": [], "dev_accuracy": [], "kept_epoch": params.epochs}
    best_state: dict[str, torch.Tensor] | None = None
    step, seen, started = 0, 0, time.perf_counter()
    device = device_of(model)

    for epoch in range(1, params.epochs + 1):
        model.train()
        for indices in length_grouped_batches(lengths, params.batch_size, generator):
            with autocast(device):
                loss = model(**collate(train_set, indices, pad_id, device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, seen = step + 1, seen + len(indices)
            history["loss"].append(loss.item())
            tracker.log_metrics({"train_loss": loss.item()}, step=step)
            report(
                on_progress,
                Progress(
                    epoch,
                    params.epochs,
                    step,
                    total_steps,
                    loss.item(),
                    None,
                    seen / (time.perf_counter() - started),
                ),
            )

        dev_probabilities = predict_probabilities(model, pad_id, dev_set)
        dev_accuracy = accuracy_score(dev_set.labels, [int(p >= 0.5) for p in dev_probabilities])
        history["dev_accuracy"].append(float(dev_accuracy))
        tracker.log_metrics({"dev_accuracy": float(dev_accuracy)}, step=step)
        log.info("epoch %d/%d: dev accuracy %.4f", epoch, params.epochs, dev_accuracy)
        if params.keep_best_epoch and dev_accuracy > max(history["dev_accuracy"][:-1], default=-1.0):
            best_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
            history["kept_epoch"] = epoch
        report(
            on_progress,
            Progress(
                epoch,
                params.epochs,
                step,
                total_steps,
                history["loss"][-1],
                float(dev_accuracy),
                seen / (time.perf_counter() - started),
            ),
        )
    if best_state is not None:
        model.load_state_dict(best_state)
        log.info("kept the weights of epoch %d (best dev accuracy)", history["kept_epoch"])
    return history


def report(on_progress: ProgressCallback | None, progress: Progress) -> None:
    if on_progress is not None:
        on_progress(progress)


@torch.inference_mode()
def predict_probabilities(model: torch.nn.Module, pad_id: int, data: Encoded) -> list[float]:
    """P(answer is yes) for each example, in input order; batches are formed by length to pad little."""
    model.eval()
    device = device_of(model)
    by_length = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    probabilities = [0.0] * len(data)
    for start in range(0, len(by_length), EVAL_BATCH_SIZE):
        indices = by_length[start : start + EVAL_BATCH_SIZE]
        batch = collate(data, indices, pad_id, device)
        batch.pop("labels")
        with autocast(device):
            logits = model(**batch).logits.float()
        for i, p in zip(indices, torch.softmax(logits, dim=-1)[:, 1].tolist(), strict=True):
            probabilities[i] = p
    return probabilities


def classification_metrics(labels: list[int], predictions: list[int]) -> dict:
    """Accuracy, precision/recall/F1 of the 'yes' class and the confusion matrix, via scikit-learn."""
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="binary", zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=[0, 1]).tolist(),
        "majority_baseline": max(sum(labels), len(labels) - sum(labels)) / len(labels),
    }


def final_metrics(metrics: dict) -> dict[str, float]:
    """The scalar metrics worth a tracker's chart."""
    keys = ("accuracy", "precision", "recall", "f1", "train_examples_per_s")
    return {k: float(metrics[k]) for k in keys}


def confusion_matrix_report(metrics: dict) -> dict:
    """The confusion matrix with its axes named, as trackers store it (rows: label, columns: prediction)."""
    return {"labels": ["no", "yes"], "rows": "label", "columns": "prediction", "matrix": metrics["confusion_matrix"]}


def write_json(path: Path, data: dict) -> None:
    """Write atomically (temp file + rename): a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_predictions(
    path: Path,
    rows: list[BoolQExample],
    predictions: list[int],
    probabilities: list[float],
) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as out:
        for row, pred, prob in zip(rows, predictions, probabilities, strict=True):
            out.write(
                json.dumps(
                    {
                        "idx": row.idx,
                        "label": int(row.label),
                        "prediction": pred,
                        "probability": prob,
                    }
                )
                + "\n"
            )
    os.replace(tmp, path)


def save_model(model, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """``save_pretrained`` (safetensors) into a temp folder renamed into place when complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
