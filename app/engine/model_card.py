"""The model card (``model/README.md``) of a fine-tuned run: what it was trained from and on, how well it did on
val against the majority baseline, and what it is for. Hugging Face's card layout (YAML metadata, then prose), so
the folder reads the same on the hub, in MLflow's artifact view and on disk."""

from __future__ import annotations

import json
from pathlib import Path

from app.engine.model_names import MINILM_ALIAS

CARD = "README.md"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
HYPERPARAMETERS = (
    "lr",
    "epochs",
    "batch_size",
    "max_length",
    "warmup_ratio",
    "eps",
    "weight_decay",
    "layer_lr_decay",
    "dev_size",
    "seed",
)
VAL_METRICS = ("accuracy", "macro_f1", "precision", "recall", "f1")


def write_model_card(model_folder: Path, params: dict, metrics: dict) -> Path:
    """Write ``model_folder/README.md`` from the run's params and metrics (as in params.json and metrics.json)."""
    path = model_folder / CARD
    path.write_text(model_card(params, metrics))
    return path


def model_card(params: dict, metrics: dict) -> str:
    base = str(params.get("model"))
    base_id = MINILM_HUB_ID if base == MINILM_ALIAS else base
    dataset = metrics.get("dataset") or {}
    labels = metrics.get("label_names") or []
    dev = metrics.get("dev_accuracy_per_epoch") or []
    kept = metrics.get("kept_epoch")
    header = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "base_model": base_id,
        "datasets": [dataset.get("name", "?")],
        "metrics": ["accuracy", "f1"],
    }
    lines = ["---", *(f"{key}: {json.dumps(value)}" for key, value in header.items()), "---", ""]
    lines += [
        f"# {dataset.get('name', 'text')} classifier fine-tuned from {base_id}",
        "",
        "## Training",
        "",
        f"- Base model: `{base_id}`" + (f" (alias `{base}`)" if base != base_id else ""),
        f"- Dataset: `{dataset.get('name')}` from `{dataset.get('source')}`",
        f"  - file sha256: `{dataset.get('file_sha256') or 'n/a (a folder or the hub)'}`",
        f"  - val rows digest: `{dataset.get('val_digest')}`",
        f"- Rows: {metrics.get('n_train')} train, {metrics.get('n_dev')} dev, {metrics.get('n_eval')} val",
        "- Hyperparameters: " + ", ".join(f"{k}={params[k]}" for k in HYPERPARAMETERS if k in params),
        f"- Kept epoch: {kept}" + (f" (dev accuracy {dev[kept - 1]:.4f})" if kept and len(dev) >= kept else ""),
        f"- Precision: {metrics.get('precision_mode')} on {metrics.get('device')}",
        "",
        "## Validation",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {metrics[k]:.4f} |" for k in VAL_METRICS if k in metrics),
        f"| majority baseline | {metrics.get('majority_baseline', float('nan')):.4f} |",
        "",
        "Learned something beyond the majority class: " + ("yes" if metrics.get("learned") else "**no**") + ".",
        "",
        "## Labels",
        "",
        *(f"- {i}: `{name}`" for i, name in enumerate(labels)),
        "",
        "## Intended use and limits",
        "",
        "Classifies a text, or a pair of texts (read together, first then second), into the labels "
        f"above, as the `{dataset.get('name')}` data labelled them. Inputs are cut to {params.get('max_length')} "
        "tokens together (longest first), as in training: evidence past that point is not seen. English only if the "
        "base model is; the val figures hold for data like the val split, not for other domains. Not for decisions "
        "about people without a human review; the scores are softmax outputs, not calibrated probabilities.",
        "",
        "Serve it with this service (`/predict`), `mlflow models serve` (the `MLmodel` beside this card), or export "
        "it for ONNX Runtime with `python -m app export` (docs/serving.md).",
        "",
    ]
    return "\n".join(lines)
