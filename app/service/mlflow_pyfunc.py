"""The loader MLflow calls for a registered version's ``MLmodel`` (``python_function`` flavor, ``loader_module``):
``mlflow models serve`` and ``mlflow.pyfunc.load_model`` answer with this service's :class:`Predictor`.

Input: a DataFrame with ``text`` and optionally ``text_pair``; output: one row per input with the best ``label``,
its ``score`` and every label's ``probabilities`` in label id order (the label names are the MLmodel's metadata).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from app.service.predict import Predictor


class ServedModel:
    """A predictor behind MLflow's ``predict(model_input, params)``."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def predict(self, model_input, params=None):
        frame = pd.DataFrame(model_input)
        pairs = frame["text_pair"].tolist() if "text_pair" in frame else [None] * len(frame)
        texts = frame["text"].tolist()
        items = [(str(text), None if missing(pair) else str(pair)) for text, pair in zip(texts, pairs, strict=True)]
        answers = self.predictor.predict(items)
        return pd.DataFrame(
            {
                "label": [a.label_names[a.best] for a in answers],
                "score": [a.scores[a.best] for a in answers],
                "probabilities": [list(a.scores) for a in answers],
            }
        )


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> ServedModel:
    """MLflow's entry point: ``data_path`` is the downloaded model folder; ``model_config`` holds ``max_length``
    (the folder alone, without its run's params.json, does not say where the run truncated)."""
    max_length = int((model_config or {}).get("max_length") or 0) or None
    return ServedModel(Predictor(Path(data_path), max_length=max_length))
