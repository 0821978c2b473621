"""Scoring a classifier: class probabilities per example, and the metrics a run reports (via scikit-learn)."""

from __future__ import annotations

import contextlib

import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from app.engine.encoding import (
    Encoded,
    collate,
    device_batches,
    padding_bounded_batches,
    to_device,
    width_multiple,
)
from app.engine.modeling import autocast, device_of, takes_prepared_mask

EVAL_BATCH_SIZE = 64
# Rows per evaluation batch on a GPU, where a batch of 64 leaves most of the chip idle between launches.
DEVICE_EVAL_BATCH_SIZE = 512
# A run "learned nothing" when its accuracy is within this of always answering the majority class.
LEARNED_MARGIN = 0.01


@torch.inference_mode()
def predict_probabilities(
    model: torch.nn.Module,
    pad_id: int,
    data: Encoded,
    max_padding: float = 1.0,
    on_device: bool | None = None,
    bf16: bool = True,
) -> list[list[float]]:
    """Each example's probability per class (label id order), in input order; batches are formed by length to pad
    little, and cut where their padding share would pass ``max_padding`` (1: sorted batches of EVAL_BATCH_SIZE).

    ``on_device`` (default: on GPUs) evaluates as training batches: the split copied to the device once, batches
    of DEVICE_EVAL_BATCH_SIZE gathered there (no per-batch Python collation or copy), widths in GPU buckets.
    ``bf16`` False: fp32 even where the device has native bf16 (the answers an fp32 ONNX export gives)."""
    model.eval()
    device = device_of(model)
    lengths = [len(ids) for ids in data.input_ids]
    if on_device if on_device is not None else device.type == "cuda":
        batches = padding_bounded_batches(lengths, 1.0, DEVICE_EVAL_BATCH_SIZE)
        split = to_device(data, pad_id, device, with_prepared_mask=takes_prepared_mask(model))
        inputs = device_batches(split, batches, width_multiple(device))
    else:
        batches = padding_bounded_batches(lengths, max_padding, EVAL_BATCH_SIZE)
        inputs = (collate(data, indices, pad_id, device) for indices in batches)
    scores = []  # per batch, left on the device: one host sync at the end, not one per batch
    for batch in inputs:
        batch.pop("labels")
        with autocast(device) if bf16 else contextlib.nullcontext():
            scores.append(torch.softmax(model(**batch).logits.float(), dim=-1))
    probabilities: list[list[float]] = [[]] * len(data)
    if scores:
        for i, p in zip((i for indices in batches for i in indices), torch.cat(scores).tolist(), strict=True):
            probabilities[i] = p
    return probabilities


def predicted_labels(probabilities: list[list[float]]) -> list[int]:
    """The most probable label id of each example."""
    return [max(range(len(p)), key=p.__getitem__) for p in probabilities]


def accuracy(labels: list[int], probabilities: list[list[float]]) -> float:
    return float(accuracy_score(labels, predicted_labels(probabilities)))


def classification_metrics(
    labels: list[int], predictions: list[int], label_names: tuple[str, ...] = ("no", "yes")
) -> dict:
    """Accuracy, macro-F1, precision/recall/F1 per class (and of class 1 for two labels, as binary metrics are
    read), the confusion matrix, and the majority baseline the "learned" flag compares with."""
    ids = list(range(len(label_names)))
    per_class = precision_recall_fscore_support(labels, predictions, labels=ids, average=None, zero_division=0)
    binary = len(ids) == 2
    average = precision_recall_fscore_support(
        labels, predictions, labels=ids, average="binary" if binary else "macro", zero_division=0
    )
    acc = float(accuracy_score(labels, predictions))
    majority = max(labels.count(i) for i in ids) / len(labels)
    return {
        "accuracy": acc,
        "macro_f1": float(
            precision_recall_fscore_support(labels, predictions, labels=ids, average="macro", zero_division=0)[2]
        ),
        "precision": float(average[0]),
        "recall": float(average[1]),
        "f1": float(average[2]),
        "per_class": [
            {"label": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for name, p, r, f, n in zip(label_names, *per_class, strict=True)
        ],
        "label_names": list(label_names),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
        "majority_baseline": majority,
        "learned": acc > majority + LEARNED_MARGIN,
    }


def final_metrics(metrics: dict) -> dict[str, float]:
    """The scalar metrics worth a tracker's chart."""
    keys = ("accuracy", "macro_f1", "precision", "recall", "f1", "majority_baseline", "train_examples_per_s")
    return {k: float(metrics[k]) for k in keys if k in metrics}


def confusion_matrix_report(metrics: dict) -> dict:
    """The confusion matrix with its axes named, as trackers store it (rows: label, columns: prediction)."""
    labels = metrics.get("label_names", ["no", "yes"])
    return {"labels": labels, "rows": "label", "columns": "prediction", "matrix": metrics["confusion_matrix"]}
