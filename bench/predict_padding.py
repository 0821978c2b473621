"""Padding share and in-process time of one ``Predictor.predict`` of N validation pairs, for several
``PREDICT_MAX_PADDING`` values, alternating in one run (medians), with the load average next to them.

    .venv/bin/python bench/predict_padding.py --model-dir RUN_DIR [--rows 32] [--repeats 7] [--threads 1]

``1.0`` is the behaviour before bounded padding: the pairs sorted by length in one padded batch (for 64 pairs
or fewer, the same padding as unsorted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/predict_padding.py` from anywhere

from app.config import SAMPLE_DATA_DIR  # noqa: E402
from app.engine.boolq import load_boolq  # noqa: E402


def padding_of_passes(predictor, pairs) -> tuple[float, int]:
    """(padding share of all tokens computed, forward passes) for one predict of ``pairs``."""
    real = computed = passes = 0

    def record(_module, _args, kwargs):
        nonlocal real, computed, passes
        mask = kwargs["attention_mask"]
        real, computed, passes = real + int(mask.sum()), computed + mask.numel(), passes + 1

    handle = predictor.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        predictor.predict(pairs)
    finally:
        handle.remove()
    return 1 - real / computed, passes


def timed_ms(predictor, pairs) -> float:
    started = time.perf_counter()
    predictor.predict(pairs)
    return (time.perf_counter() - started) * 1000


def run(options) -> dict:
    import torch

    from app.service.predict import Predictor

    torch.set_num_threads(options.threads)
    pairs = [(r.text, r.text_pair) for r in load_boolq(options.data_dir).val[: options.rows]]
    predictors = {limit: Predictor(options.model_dir, max_padding=limit) for limit in options.max_padding}
    rows = {}
    for limit, predictor in predictors.items():
        share, passes = padding_of_passes(predictor, pairs)
        rows[limit] = {"padding_share": round(share, 3), "forward_passes": passes, "ms": []}
    loads = [os.getloadavg()[0]]
    for _ in range(options.repeats):  # alternating, so a change in the machine's load hits every variant alike
        for limit, predictor in predictors.items():
            rows[limit]["ms"].append(timed_ms(predictor, pairs))
        loads.append(os.getloadavg()[0])
    baseline = statistics.median(rows[options.max_padding[0]]["ms"])
    for row in rows.values():
        row["median_ms"] = round(statistics.median(row.pop("ms")), 1)
        row["speedup_vs_first"] = round(baseline / row["median_ms"], 2)
    return {
        "command": "python bench/predict_padding.py " + " ".join(sys.argv[1:]),
        "rows": options.rows,
        "max_length": predictors[options.max_padding[0]].max_length,
        "threads": options.threads,
        "load_average_1m": [round(min(loads), 2), round(max(loads), 2)],
        "by_max_padding": {str(limit): row for limit, row in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a fine-tuned run folder (or its model/ folder)")
    parser.add_argument("--data-dir", default=str(SAMPLE_DATA_DIR), help="BoolQ folder (default: the bundled sample)")
    parser.add_argument("--rows", type=int, default=32, help="validation pairs in the one request (default: 32)")
    parser.add_argument("--repeats", type=int, default=7, help="timed predicts per variant (default: 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as NUM_THREADS=1)")
    parser.add_argument("--max-padding", default="1.0,0.1", help="comma list; the first is the baseline")
    options = parser.parse_args()
    options.max_padding = [float(x) for x in options.max_padding.split(",")]
    print(json.dumps(run(options), indent=2))


if __name__ == "__main__":
    main()
