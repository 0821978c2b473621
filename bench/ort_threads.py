"""Two processes running ONNX Runtime at once, as two gunicorn workers of one replica do: pairs/s summed over both,
for a given intra-op thread count (0: ORT's default pool, every core) with spinning on and off, alternating.

    .venv/bin/python bench/ort_threads.py --model-dir RUN_DIR --threads 1
    .venv/bin/python bench/ort_threads.py --model-dir RUN_DIR --threads 0
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/ort_threads.py` from anywhere

BATCH, WIDTH = 32, 200


def rate(model: str, threads: int, spinning: str, seconds: float, results) -> None:
    """One process: pairs/s of ``seconds`` of back-to-back 32-pair batches."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(1000, 20000, (BATCH, WIDTH)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feed = {i.name: feed[i.name] for i in session.get_inputs()}
    session.run(None, feed)  # warm
    pairs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feed)
        pairs += BATCH
    results.put(pairs / (time.perf_counter() - started))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a fine-tuned run folder's model/ folder")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per process (0: ORT's default)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    from transformers import AutoModelForSequenceClassification

    from app.engine.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        model = str(Path(folder) / "model.onnx")
        export_onnx(AutoModelForSequenceClassification.from_pretrained(options.model_dir).eval(), Path(model), 320)
        for round_ in range(options.rounds):
            for spinning in ("1", "0"):
                results = multiprocessing.Queue()
                workers = [
                    multiprocessing.Process(
                        target=rate, args=(model, options.threads, spinning, options.seconds, results)
                    )
                    for _ in range(2)
                ]
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
                total = sum(results.get() for _ in workers)
                print(
                    f"round {round_} threads={options.threads} allow_spinning={spinning}: {total:.1f} pairs/s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
