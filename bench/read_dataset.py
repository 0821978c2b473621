"""Reading and validating an uploaded dataset: the engine's reader (HF ``datasets`` + the checks + examples) against
``pandas.read_csv`` alone (what a Flask script would do, with no checks), alternating, each in a fresh process with
an empty Arrow cache (a first upload, not a cache hit).

    .venv/bin/python bench/read_dataset.py            # 100,000 rows, ~50 MB CSV, 3 rounds
    .venv/bin/python bench/read_dataset.py --rows 20000 --rounds 1 --json

Goal (issue 26): a 100,000-row, 50 MB CSV read and validated in under 10 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = "the of and to in is was for on as with by at from that this which are be or an it".split()  # noqa: SIM905


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    """A text-pair CSV of ``rows`` rows, ~500 bytes each (a question, a passage, one of 7 labels)."""
    rng = random.Random(seed)
    with path.open("w") as out:
        out.write("question,passage,label\n")
        for _ in range(rows):
            question = " ".join(rng.choices(WORDS, k=10))
            passage = " ".join(rng.choices(WORDS, k=110))
            out.write(f'"{question}","{passage}",class{rng.randrange(7)}\n')


def ours(path: str) -> dict:
    from app.engine.data import DatasetSpec, load_dataset

    spec = DatasetSpec(name="bench", source=path, format="csv", text_column="question",
                       text_pair_column="passage", label_column="label")  # fmt: skip
    dataset = load_dataset(spec, max_rows=1_000_000)
    return {"rows": len(dataset.train) + len(dataset.val), "labels": len(dataset.label_names)}


def pandas_only(path: str) -> dict:
    import pandas

    frame = pandas.read_csv(path)
    return {"rows": len(frame), "labels": int(frame["label"].nunique())}


def measure(side: str, path: Path) -> float:
    """Seconds one side takes in a fresh process with an empty ``datasets`` cache (imports excluded)."""
    with tempfile.TemporaryDirectory() as cache:
        code = (
            f"import sys, time, json; sys.path.insert(0, {str(REPO_ROOT)!r})\n"
            "import bench.read_dataset as b\n"
            "import datasets, pandas, app.engine.data\n"
            f"t = time.perf_counter(); out = getattr(b, {side!r})({str(path)!r})\n"
            "print(json.dumps([time.perf_counter() - t, out]))"
        )
        env = os.environ | {"HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        seconds, _ = json.loads(proc.stdout.strip().splitlines()[-1])
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.csv"
        write_csv(path, options.rows)
        times = {"ours": [], "pandas_only": []}
        for _ in range(options.rounds):
            for side in times:  # alternating
                times[side].append(measure(side, path))
        size_mb = path.stat().st_size / 1e6
    result = {
        "rows": options.rows,
        "size_mb": round(size_mb, 1),
        "ours_s": round(statistics.median(times["ours"]), 2),
        "pandas_only_s": round(statistics.median(times["pandas_only"]), 2),
        "all_s": times,
        "cpu_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text(),
    }
    result["ratio_ours_to_pandas"] = round(result["ours_s"] / result["pandas_only_s"], 2)
    result["goal_met"] = result["ours_s"] < 10
    print(json.dumps(result) if options.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
