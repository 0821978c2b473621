"""Answering questions with a fine-tuned run folder (CLI ``predict`` and the API's ``/predict``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from app import run_folder
from app.data import BoolQExample
from app.encoding import encode
from app.evaluation import predict_probabilities
from app.modeling import compute_last_layer_for_first_token_only
from app.params import TrainParams


class ModelDirError(ValueError):
    """The folder is not a fine-tuned run or model folder."""


@dataclass(frozen=True)
class Answer:
    answer: bool
    probability: float

    def to_dict(self) -> dict:
        return {"answer": self.answer, "probability": self.probability}


def find_model_folder(path: str | Path) -> Path:
    """Accept a run folder (holding ``model/``) or the model folder itself."""
    path = Path(path).expanduser()
    folder = run_folder.checkpoint_folder(path)
    if folder is not None:
        return folder
    raise ModelDirError(f"{path} is neither a run folder with model/ nor a model folder with config.json")


class Predictor:
    """A fine-tuned classifier loaded once, answering batches of (question, passage) pairs."""

    def __init__(self, path: str | Path):
        folder = find_model_folder(path)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="sdpa")
        self.model.eval()
        compute_last_layer_for_first_token_only(self.model)
        self.max_length = min(trained_max_length(folder), self.model.config.max_position_embeddings)

    def predict(self, pairs: list[tuple[str, str]]) -> list[Answer]:
        rows = [BoolQExample(idx=i, question=q, passage=p, label=False) for i, (q, p) in enumerate(pairs)]
        encoded = encode(self.tokenizer, rows, self.max_length)
        probabilities = predict_probabilities(self.model, self.tokenizer.pad_token_id, encoded)
        return [Answer(answer=p >= 0.5, probability=p) for p in probabilities]


def trained_max_length(model_folder: Path) -> int:
    """The ``max_length`` the run trained with (from its params.json), so inference truncates the same way."""
    default = TrainParams.model_fields["max_length"].default
    params = run_folder.read_params(model_folder.parent) or {}
    return int(params.get("max_length", default))
