"""Scoring a classifier: P(yes) per example, and the metrics a run reports (via scikit-learn)."""

from __future__ import annotations

import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from app.engine.encoding import Encoded, collate, padding_bounded_batches
from app.engine.modeling import autocast, device_of

EVAL_BATCH_SIZE = 64
# A run "learned nothing" when its accuracy is within this of always answering the majority class.
LEARNED_MARGIN = 0.01


@torch.inference_mode()
def predict_probabilities(model: torch.nn.Module, pad_id: int, data: Encoded, max_padding: float = 1.0) -> list[float]:
    """P(answer is yes) for each example, in input order; batches are formed by length to pad little, and cut
    where their padding share would pass ``max_padding`` (1: sorted batches of EVAL_BATCH_SIZE)."""
    model.eval()
    device = device_of(model)
    lengths = [len(ids) for ids in data.input_ids]
    batches = padding_bounded_batches(lengths, max_padding, EVAL_BATCH_SIZE)
    yes = []  # P(yes) per batch, left on the device: one host sync at the end, not one per batch
    for indices in batches:
        batch = collate(data, indices, pad_id, device)
        batch.pop("labels")
        with autocast(device):
            yes.append(torch.softmax(model(**batch).logits.float(), dim=-1)[:, 1])
    probabilities = [0.0] * len(data)
    if yes:
        for i, p in zip((i for indices in batches for i in indices), torch.cat(yes).tolist(), strict=True):
            probabilities[i] = p
    return probabilities


def accuracy(labels: list[int], probabilities: list[float]) -> float:
    return float(accuracy_score(labels, [int(p >= 0.5) for p in probabilities]))


def classification_metrics(labels: list[int], predictions: list[int]) -> dict:
    """Accuracy, precision/recall/F1 of the 'yes' class, the confusion matrix, and the majority baseline."""
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="binary", zero_division=0)
    acc = float(accuracy_score(labels, predictions))
    majority = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    return {
        "accuracy": acc,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=[0, 1]).tolist(),
        "majority_baseline": majority,
        "learned": acc > majority + LEARNED_MARGIN,
    }


def final_metrics(metrics: dict) -> dict[str, float]:
    """The scalar metrics worth a tracker's chart."""
    keys = ("accuracy", "precision", "recall", "f1", "majority_baseline", "train_examples_per_s")
    return {k: float(metrics[k]) for k in keys}


def confusion_matrix_report(metrics: dict) -> dict:
    """The confusion matrix with its axes named, as trackers store it (rows: label, columns: prediction)."""
    return {"labels": ["no", "yes"], "rows": "label", "columns": "prediction", "matrix": metrics["confusion_matrix"]}
