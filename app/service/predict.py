"""Classifying texts (or text pairs) with a fine-tuned run folder (CLI ``predict`` and the API's ``/predict``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from app.config import Settings
from app.engine import run_folder
from app.engine.data import Example
from app.engine.encoding import Encoded, encode
from app.engine.evaluation import predict_probabilities
from app.engine.modeling import compute_last_layer_for_first_token_only
from app.engine.onnx_export import ONNX_FILE, onnx_probabilities, ort_session
from app.params import TrainParams
from app.service.model_access import NotYesNo
from app.service.serve_backend import TORCH, Backend

# Tokens per chunk (a few forward passes) of a large request: the granularity at which a deadline or a gone
# client stops it.
CHUNK_TOKENS = 4096
MAX_PADDING = Settings.model_fields["predict_max_padding"].default


class ModelDirError(ValueError):
    """The folder is not a fine-tuned run or model folder."""


class TooManyTokens(ValueError):
    """A request asks for more tokens (items × tokens after truncation) than allowed."""

    def __init__(self, tokens: int, limit: int):
        super().__init__(f"{tokens:,} tokens after truncation exceed the limit of {limit:,} per request")
        self.tokens = tokens
        self.limit = limit


class PredictionStopped(RuntimeError):
    """Work stopped between chunks because ``should_stop`` said why (deadline passed, client gone)."""


# A text and its optional second text; and that pair tokenized (token ids, token type ids).
Pair = tuple[str, str | None]
EncodedPair = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Answer:
    """One example's probability per label, in label id order."""

    scores: tuple[float, ...]
    label_names: tuple[str, ...]

    @property
    def best(self) -> int:
        return max(range(len(self.scores)), key=self.scores.__getitem__)

    def to_dict(self, top_k: int = 0) -> dict:
        """``{"label", "score"}`` of the most probable label; with ``top_k``, the ``top_k`` best as ``scores``."""
        answer = {"label": self.label_names[self.best], "score": self.scores[self.best]}
        if top_k:
            ranked = sorted(range(len(self.scores)), key=lambda i: -self.scores[i])[:top_k]
            answer["scores"] = [{"label": self.label_names[i], "score": self.scores[i]} for i in ranked]
        return answer

    def to_yes_no(self) -> dict:
        """A two-label model's answer as BoolQ's ``{"answer", "probability"}``: the probability of label 1."""
        if len(self.scores) != 2:
            raise NotYesNo(
                f"this model has {len(self.scores)} labels ({', '.join(self.label_names[:10])}), not a yes/no "
                'answer: send {"text", "text_pair"} items'
            )
        return {"answer": self.scores[1] >= 0.5, "probability": self.scores[1]}


def find_model_folder(path: str | Path) -> Path:
    """Accept a run folder (holding ``model/``) or the model folder itself."""
    path = Path(path).expanduser()
    folder = run_folder.checkpoint_folder(path)
    if folder is not None:
        return folder
    raise ModelDirError(f"{path} is neither a run folder with model/ nor a model folder with config.json")


class Predictor:
    """A fine-tuned classifier loaded once, answering batches of (text, text pair) pairs."""

    def __init__(
        self,
        path: str | Path,
        max_padding: float = MAX_PADDING,
        max_length: int | None = None,
        backend: Backend = TORCH,
        num_threads: int = 0,
    ):
        """``max_length``: truncate there (default: as the run trained, from its params.json)."""
        folder = find_model_folder(path)
        self.max_padding = max_padding
        self.backend = backend
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
        self.max_length = min(max_length or trained_max_length(folder), config.max_position_embeddings)
        id2label = config.id2label
        self.label_names = tuple(str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label)))
        self.model = None if backend.kind == "onnx" else load_serving_model(folder)
        self.session = onnx_session(folder, backend, self.max_length, num_threads) if self.model is None else None

    def predict(self, pairs: list[Pair], max_tokens: int = 0, should_stop=None) -> list[Answer]:
        """Answers in input order, computed in order of length (``padding_bounded_batches``). Refuses more than
        ``max_tokens`` tokens (0: no limit) before computing; between chunks of about CHUNK_TOKENS, stops with
        :class:`PredictionStopped` when ``should_stop()`` returns a reason."""
        return self.predict_encoded(self.encode_pairs(pairs, max_tokens), should_stop)

    def predict_encoded(self, rows: list[EncodedPair], should_stop=None) -> list[Answer]:
        """:meth:`predict` for pairs already tokenized by :meth:`encode_pairs` (a micro-batch of several requests)."""
        lengths = [len(input_ids) for input_ids, _ in rows]
        probabilities: list[list[float]] = [[]] * len(rows)
        for chunk in token_chunks(lengths, CHUNK_TOKENS):
            reason = should_stop() if should_stop is not None else None
            if reason:
                raise PredictionStopped(reason)
            part = Encoded([rows[i][0] for i in chunk], [rows[i][1] for i in chunk], [0] * len(chunk))
            for i, p in zip(chunk, self.probabilities(part), strict=True):
                probabilities[i] = p
        return [Answer(tuple(p), self.label_names) for p in probabilities]

    def probabilities(self, part: Encoded) -> list[list[float]]:
        """Each row's probability per label, by the backend's model."""
        pad_id = self.tokenizer.pad_token_id
        if self.session is not None:
            return onnx_probabilities(self.session, pad_id, part, self.max_padding)
        bf16 = self.backend.precision == "auto"
        return predict_probabilities(self.model, pad_id, part, self.max_padding, bf16=bf16)

    def encode_pairs(self, pairs: list[Pair], max_tokens: int = 0) -> list[EncodedPair]:
        """Each pair's token ids and token type ids, truncated as the model trained; :class:`TooManyTokens` when
        they hold more than ``max_tokens`` tokens together (0: no limit)."""
        rows = [Example(idx=i, text=text, text_pair=pair, label=0) for i, (text, pair) in enumerate(pairs)]
        encoded = encode(self.tokenizer, rows, self.max_length)
        tokens = sum(len(ids) for ids in encoded.input_ids)
        if max_tokens and tokens > max_tokens:
            raise TooManyTokens(tokens, max_tokens)
        return list(zip(encoded.input_ids, encoded.token_type_ids, strict=True))


def load_serving_model(folder: Path) -> torch.nn.Module:
    """The classifier as served: SDPA attention, eval mode, the last layer computing [CLS] only."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="sdpa")
    model.eval()
    compute_last_layer_for_first_token_only(model)
    return model


def onnx_session(folder: Path, backend: Backend, max_length: int, num_threads: int):
    """An ONNX Runtime session of the model in ``folder``, exported (and quantized) on first use on this host."""
    from app.service.export import cached_onnx_folder  # export loads models through Predictor: a cycle at the top

    exported = cached_onnx_folder(folder, backend.onnx_cache, backend.quantize, max_length)
    return ort_session(exported / ONNX_FILE, num_threads)


def token_chunks(lengths: list[int], chunk_tokens: int) -> list[list[int]]:
    """Indices grouped by length (little padding) into chunks of about ``chunk_tokens`` tokens each."""
    chunks, current, size = [], [], 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and size + lengths[i] > chunk_tokens:
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += lengths[i]
    return chunks + [current] if current else chunks


def trained_max_length(model_folder: Path) -> int:
    """The ``max_length`` the run trained with (from its params.json), so inference truncates the same way."""
    default = TrainParams.model_fields["max_length"].default
    params = run_folder.read_params(model_folder.parent) or {}
    return int(params.get("max_length", default))


def load_predictor(
    folder: Path, max_padding: float | None = None, num_threads: int = 0, backend: Backend = TORCH
) -> Predictor:
    """A predictor for ``folder``; ``num_threads`` > 0 caps torch's (or ONNX Runtime's) threads in this process."""
    if num_threads > 0:
        # On a busy machine, a forward pass split over more threads than free cores waits at every op.
        torch.set_num_threads(num_threads)
    padding = MAX_PADDING if max_padding is None else max_padding
    return Predictor(folder, padding, backend=backend, num_threads=num_threads)
