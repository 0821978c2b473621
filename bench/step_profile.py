"""Where a CPU training step's time goes: torch.profiler over the engine's own ``train_step``, by kind of op.

Profiles a few steps of minilm on real BoolQ batches (32 rows grouped by length) twice, in fresh processes:
with the engine's stock attention and dropout ("before") and with ``app.engine.attention`` ("after"). Self CPU time
of each op is put in one of: matmuls, dropout's random numbers (torch's ``bernoulli_`` or our mask), softmax,
and everything else (elementwise ops, copies, layer norms, the optimizer, autograd bookkeeping).

    python bench/step_profile.py            # ~3 min on 2 idle cores
    python bench/step_profile.py --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from torch.profiler import ProfilerActivity, profile  # noqa: E402

from app.engine.training import train_step  # noqa: E402
from bench.step_ablation import VARIANTS, prepare_steps  # noqa: E402

FULL_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "boolq"
KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn_matmul", "aten::linear"),
    "dropout random numbers": ("aten::bernoulli_", "dropout_mask"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
}


def kind_of(op: str) -> str:
    return next((kind for kind, ops in KINDS.items() if op in ops), "other")


def profile_steps(variant: str, data_dir: str, rows: int, steps: int, threads: int) -> dict:
    """Self CPU seconds per kind of op over ``steps`` steps (after 2 warm-up steps), and the real tokens."""
    features = VARIANTS["engine" if variant == "after" else "without cheap_cpu_attention"]
    model, optimizer, batches = prepare_steps(features, data_dir, rows, 2 + steps, threads)
    for batch in batches[:2]:
        train_step(model, batch, optimizer)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[2:]:
            train_step(model, batch, optimizer).item()
    seconds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        seconds[kind_of(event.key)] += event.self_cpu_time_total / 1e6
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[2:])
    return {"seconds_by_kind": dict(seconds), "total_s": sum(seconds.values()), "tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=str(FULL_DATA_DIR))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--variant", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(profile_steps(args.variant, args.data_dir, args.rows, args.steps, args.threads)))
        return 0

    results = {}
    for variant in ("before", "after"):
        command = [sys.executable, __file__, "--variant", variant, "--rows", str(args.rows)]
        command += ["--steps", str(args.steps), "--threads", str(args.threads), "--data-dir", args.data_dir]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(results))
        return 0
    kinds = [*KINDS, "other"]
    print(f"{'self CPU time':<24} {'before':>16} {'after':>16}")
    for kind in [*kinds, "total"]:
        cells = []
        for variant in ("before", "after"):
            run = results[variant]
            s = run["total_s"] if kind == "total" else run["seconds_by_kind"].get(kind, 0.0)
            cells.append(f"{s:7.2f} s {100 * s / run['total_s']:5.1f} %")
        print(f"{kind:<24} {cells[0]:>16} {cells[1]:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
