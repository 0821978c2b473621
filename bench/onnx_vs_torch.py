"""ONNX Runtime vs torch eager for the ``/predict`` workload (after length sorting), same thread count.

Exports the fine-tuned classifier as ``Predictor`` loads it (SDPA, [CLS]-only last layer) to ONNX with dynamic
batch and sequence axes (``export_onnx``), then answers the same
requests both ways: tokenize, order by length, forward passes with bounded padding (``padding_bounded_batches``,
PREDICT_MAX_PADDING's default), P(yes). Requests of one pair and of 32 validation pairs, the two engines
alternating, medians; answers compared (max |dp|).

    .venv/bin/pip install onnxruntime onnx          # requirements-dev.txt: a benchmark's dependency only
    .venv/bin/python bench/onnx_vs_torch.py --model-dir RUN_DIR [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/onnx_vs_torch.py` from anywhere

from app.config import SAMPLE_DATA_DIR  # noqa: E402
from app.engine.boolq import load_boolq  # noqa: E402
from app.engine.data import Example  # noqa: E402

INPUTS = ("input_ids", "token_type_ids", "attention_mask")


class AdditiveMask(torch.nn.Module):
    """``model`` taking the 0/1 attention mask and handing it on as a 4-D additive mask.

    Traced as is, transformers' mask construction (advanced indexing) exports to a graph whose logits are off
    by 0.01-0.03 at every length; a mask built here exports exactly (max |dp| ~1e-7).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask):
        blocked = 1.0 - attention_mask[:, None, None, :].to(torch.float32)
        mask = blocked * torch.finfo(torch.float32).min
        return self.model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=mask).logits


def export_onnx(model: torch.nn.Module, path: Path, max_length: int) -> None:
    """The model as loaded for serving, traced with a padded example; batch and sequence axes stay dynamic."""
    example = {
        "input_ids": torch.ones((2, max_length), dtype=torch.long),
        "token_type_ids": torch.zeros((2, max_length), dtype=torch.long),
        "attention_mask": torch.ones((2, max_length), dtype=torch.long),
    }
    example["attention_mask"][1, max_length // 2 :] = 0  # a padded row, so the mask's path is traced
    axes = {name: {0: "batch", 1: "sequence"} for name in example} | {"logits": {0: "batch"}}
    with torch.inference_mode():
        torch.onnx.export(
            AdditiveMask(model).eval(),
            (),
            str(path),
            kwargs=example,
            input_names=list(example),
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batches_of(predictor, pairs):
    """The padded batches ``Predictor.predict`` would run for ``pairs``, with their row indices."""
    from app.engine.encoding import collate, encode, padding_bounded_batches
    from app.engine.evaluation import EVAL_BATCH_SIZE

    rows = [Example(idx=i, text=q, text_pair=p, label=0) for i, (q, p) in enumerate(pairs)]
    encoded = encode(predictor.tokenizer, rows, predictor.max_length)
    lengths = [len(ids) for ids in encoded.input_ids]
    for indices in padding_bounded_batches(lengths, predictor.max_padding, EVAL_BATCH_SIZE):
        batch = collate(encoded, indices, predictor.tokenizer.pad_token_id)
        batch.pop("labels")
        yield indices, batch


def torch_probabilities(predictor, pairs) -> list[float]:
    probabilities = [0.0] * len(pairs)
    with torch.inference_mode():
        for indices, batch in batches_of(predictor, pairs):
            for i, p in zip(indices, torch.softmax(predictor.model(**batch).logits, -1)[:, 1].tolist(), strict=True):
                probabilities[i] = p
    return probabilities


def ort_probabilities(predictor, session, pairs) -> list[float]:
    import numpy as np

    probabilities = [0.0] * len(pairs)
    for indices, batch in batches_of(predictor, pairs):
        (logits,) = session.run(["logits"], {name: batch[name].numpy() for name in INPUTS})
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        for i, p in zip(indices, (exp[:, 1] / exp.sum(axis=-1)).tolist(), strict=True):
            probabilities[i] = p
    return probabilities


def alternate(engines: dict, requests: list, repeats: int) -> dict[str, float]:
    """Median ms per request for each engine, the engines taking turns on every request."""
    times = {name: [] for name in engines}
    for _ in range(repeats):
        for request in requests:
            for name, answer in engines.items():
                started = time.perf_counter()
                answer(request)
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(ms) for name, ms in times.items()}


def run(options) -> dict:
    import onnxruntime

    from app.service.predict import Predictor

    torch.set_num_threads(options.threads)
    predictor = Predictor(options.model_dir)
    pairs = [(r.text, r.text_pair) for r in load_boolq(options.data_dir).val[: options.rows * 4]]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(predictor.model, path, predictor.max_length)
        session = ort_session(path, options.threads)
        engines = {
            "torch": lambda request: torch_probabilities(predictor, request),
            "onnxruntime": lambda request: ort_probabilities(predictor, session, request),
        }
        differences = [abs(a - b) for a, b in zip(engines["torch"](pairs), engines["onnxruntime"](pairs), strict=True)]
        workloads = {
            "single": [[pair] for pair in pairs[: options.rows]],
            f"batch{options.rows}": [pairs[i : i + options.rows] for i in range(0, len(pairs), options.rows)],
        }
        loads = [os.getloadavg()[0]]
        results = {}
        for name, requests in workloads.items():
            engines["torch"](requests[0]), engines["onnxruntime"](requests[0])  # warm-up
            medians = alternate(
                engines, requests, options.repeats if name != "single" else max(options.repeats // 4, 1)
            )
            loads.append(os.getloadavg()[0])
            results[name] = {
                "torch_ms": round(medians["torch"], 2),
                "onnxruntime_ms": round(medians["onnxruntime"], 2),
                "speedup": round(medians["torch"] / medians["onnxruntime"], 2),
            }
    return {
        "command": "python bench/onnx_vs_torch.py " + " ".join(sys.argv[1:]),
        "threads": options.threads,
        "max_length": predictor.max_length,
        "max_padding": predictor.max_padding,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "max_probability_difference": max(differences),
        "same_answers": all(d < 1e-4 for d in differences),
        "load_average_1m": [round(min(loads), 2), round(max(loads), 2)],
        "workloads": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a fine-tuned run folder (or its model/ folder)")
    parser.add_argument("--data-dir", default=str(SAMPLE_DATA_DIR), help="BoolQ folder (default: the bundled sample)")
    parser.add_argument("--rows", type=int, default=32, help="pairs per batch request (default: 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over the requests (default: 5)")
    options = parser.parse_args()
    print(json.dumps(run(options), indent=2))


if __name__ == "__main__":
    main()
