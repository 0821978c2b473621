"""The serving backends side by side in one process: torch (bf16 autocast where native), torch fp32, ONNX Runtime
fp32 and ONNX Runtime int8 (``SERVE_BACKEND`` / ``SERVE_PRECISION`` / ``SERVE_QUANTIZE``), each loaded as a replica
loads it (``load_predictor``; ONNX exported once into a temporary cache).

For each: accuracy on the val split (every row unless ``--rows``), answered in requests of 32 pairs; the largest
probability difference and the share of equal labels against torch fp32; and pairs/s (tokenize + forward) in
requests of 32 pairs and of 1, the backends taking turns on every request, medians over ``--repeats`` rounds.

    .venv/bin/python bench/onnx_vs_torch.py --model-dir RUN_DIR [--data-dir ../shared/data/boolq] [--threads 1]

Through nginx, the same backends: ``bench/serve_load.py --compare SERVE_BACKEND=torch,onnx,onnx-int8``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/onnx_vs_torch.py` from anywhere

from app.config import SAMPLE_DATA_DIR  # noqa: E402
from app.engine.data import DatasetSpec, load_dataset  # noqa: E402

BACKENDS = {
    "torch": dict(kind="torch"),
    "torch-fp32": dict(kind="torch", precision="fp32"),
    "onnx": dict(kind="onnx"),
    "onnx-int8": dict(kind="onnx", quantize="int8"),
}
REQUEST_PAIRS = 32


def answers(predictor, pairs: list[tuple[str, str | None]]) -> list[tuple[float, ...]]:
    """Every pair's probabilities, asked in requests of REQUEST_PAIRS as /predict would be."""
    found = []
    for start in range(0, len(pairs), REQUEST_PAIRS):
        found += [a.scores for a in predictor.predict(pairs[start : start + REQUEST_PAIRS])]
    return found


def pairs_per_s(predictors: dict, requests: list, repeats: int) -> dict[str, float]:
    """Median pairs/s of each backend, the backends taking turns on every request."""
    rates = {name: [] for name in predictors}
    for _ in range(repeats):
        for request in requests:
            for name, predictor in predictors.items():
                started = time.perf_counter()
                predictor.predict(request)
                rates[name].append(len(request) / (time.perf_counter() - started))
    return {name: round(statistics.median(r), 1) for name, r in rates.items()}


def argmax(scores) -> int:
    return max(range(len(scores)), key=scores.__getitem__)


def run(options) -> dict:
    import torch

    from app.service.predict import load_predictor
    from app.service.serve_backend import Backend

    dataset = load_dataset(DatasetSpec(name="boolq", source=options.data_dir, format="boolq"))
    rows = dataset.val[: options.rows] if options.rows else dataset.val
    pairs = [(r.text, r.text_pair) for r in rows]
    labels = [r.label for r in rows]
    with tempfile.TemporaryDirectory() as cache:
        predictors = {
            name: load_predictor(Path(options.model_dir), None, options.threads, Backend(**kw, onnx_cache=Path(cache)))
            for name, kw in BACKENDS.items()
        }
        loads = [os.getloadavg()[0]]
        probabilities = {name: answers(p, pairs) for name, p in predictors.items()}
        loads.append(os.getloadavg()[0])
        batch = [pairs[i : i + REQUEST_PAIRS] for i in range(0, min(len(pairs), 8 * REQUEST_PAIRS), REQUEST_PAIRS)]
        rates32 = pairs_per_s(predictors, batch, options.repeats)
        rates1 = pairs_per_s(predictors, [[pair] for pair in pairs[:64]], options.repeats)
        loads.append(os.getloadavg()[0])
    reference = probabilities["torch-fp32"]
    results = {}
    for name, found in probabilities.items():
        best = [argmax(p) for p in found]
        results[name] = {
            "val_accuracy": round(sum(b == y for b, y in zip(best, labels, strict=True)) / len(labels), 4),
            "max_probability_difference_vs_torch_fp32": max(
                abs(a - b) for p, q in zip(found, reference, strict=True) for a, b in zip(p, q, strict=True)
            ),
            "same_label_as_torch_fp32": round(
                sum(b == argmax(q) for b, q in zip(best, reference, strict=True)) / len(found), 4
            ),
            "pairs_per_s_batch32": rates32[name],
            "pairs_per_s_batch1": rates1[name],
            "batch32_speedup_vs_torch": round(rates32[name] / rates32["torch"], 2),
        }
    return {
        "command": "python bench/onnx_vs_torch.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": options.threads,
        "val_rows": len(rows),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "load_average_1m": [round(min(loads), 2), round(max(loads), 2)],
        "backends": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a fine-tuned run folder (or its model/ folder)")
    parser.add_argument("--data-dir", default=str(SAMPLE_DATA_DIR), help="BoolQ folder (default: the bundled sample)")
    parser.add_argument("--rows", type=int, default=0, help="val rows to score (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the timed requests (default: 3)")
    options = parser.parse_args()
    print(json.dumps(run(options), indent=2))


if __name__ == "__main__":
    main()
