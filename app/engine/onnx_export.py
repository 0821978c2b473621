"""A fine-tuned classifier as an ONNX graph, and ONNX Runtime answering as ``predict_probabilities`` does.

The graph takes Optimum's ``ORTModelForSequenceClassification`` inputs (``input_ids``, ``token_type_ids``,
``attention_mask``, int64, dynamic batch and sequence axes) and returns ``logits``, so an exported folder
(``model.onnx`` beside ``config.json`` and the tokenizer) loads in ONNX Runtime and Optimum as it is.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from app.engine.encoding import Encoded, padding_bounded_batches
from app.engine.evaluation import EVAL_BATCH_SIZE

ONNX_FILE = "model.onnx"
INPUTS = ("input_ids", "token_type_ids", "attention_mask")
# 17: LayerNormalization as one op, and what ONNX Runtime and Optimum's BERT exports use.
OPSET = 17


class AdditiveMask(torch.nn.Module):
    """``model`` taking the 0/1 attention mask and handing it on as a 4-D additive mask.

    Traced as is, transformers' mask construction (advanced indexing) exports to a graph whose logits are off by
    0.01-0.03 at every length; a mask built here exports exactly (bench/README.md, "ONNX Runtime")."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask):
        blocked = 1.0 - attention_mask[:, None, None, :].to(torch.float32)
        mask = blocked * torch.finfo(torch.float32).min
        return self.model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=mask).logits


def export_onnx(model: torch.nn.Module, path: Path, max_length: int) -> None:
    """``model`` (fp32, as loaded for serving) traced with a padded example into ``path``; batch and sequence axes
    stay dynamic. The TorchScript exporter (``dynamo=False``): it needs no network and no onnxscript."""
    example = {
        "input_ids": torch.ones((2, max_length), dtype=torch.long),
        "token_type_ids": torch.zeros((2, max_length), dtype=torch.long),
        "attention_mask": torch.ones((2, max_length), dtype=torch.long),
    }
    example["attention_mask"][1, max_length // 2 :] = 0  # a padded row, so the mask's path is traced
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in example} | {"logits": {0: "batch_size"}}
    # The tracer warns that SDPA's is_causal becomes a constant: False, right for an encoder always given a mask.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            AdditiveMask(model.float()).eval(),
            (),
            str(path),
            kwargs=example,
            input_names=list(example),
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def quantize_int8(source: Path, destination: Path) -> None:
    """Dynamic int8 quantization (weights int8, activations quantized per batch): ONNX Runtime's CPU recipe for
    transformer encoders, no calibration data needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # why: as in ort_session

    quantize_dynamic(str(source), str(destination), weight_type=QuantType.QInt8)


def ort_session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session of ``path``; ``threads`` > 0 caps its intra-op threads (0: ORT's default, the
    cores), one inter-op thread (a BERT graph is a chain: parallel branches gain nothing)."""
    import onnxruntime as ort  # why: only SERVE_BACKEND=onnx and export need it; every serving process imports this

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(threads, 0)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_probabilities(session, pad_id: int, data: Encoded, max_padding: float = 1.0) -> list[list[float]]:
    """``predict_probabilities`` through ONNX Runtime: the same length-sorted batches with bounded padding, in fp32."""
    lengths = [len(ids) for ids in data.input_ids]
    probabilities: list[list[float]] = [[]] * len(data)
    for indices in padding_bounded_batches(lengths, max_padding, EVAL_BATCH_SIZE):
        (logits,) = session.run(["logits"], padded_batch(data, indices, pad_id))
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        for i, p in zip(indices, (exp / exp.sum(axis=-1, keepdims=True)).tolist(), strict=True):
            probabilities[i] = p
    return probabilities


def padded_batch(data: Encoded, indices: list[int], pad_id: int) -> dict[str, np.ndarray]:
    """``encoding.collate`` in numpy: one batch padded to its longest member."""
    width = max(len(data.input_ids[i]) for i in indices)
    batch = {
        "input_ids": np.full((len(indices), width), pad_id, dtype=np.int64),
        "token_type_ids": np.zeros((len(indices), width), dtype=np.int64),
        "attention_mask": np.zeros((len(indices), width), dtype=np.int64),
    }
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        batch["input_ids"][row, :n] = data.input_ids[i]
        batch["token_type_ids"][row, :n] = data.token_type_ids[i]
        batch["attention_mask"][row, :n] = 1
    return batch
