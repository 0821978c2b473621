"""Where the engine's per-step speed comes from: its training step with one speed feature removed at a time.

Every variant trains minilm on the same length-grouped batches (batch 32, max_length 256, real BoolQ rows)
in a fresh subprocess, so glibc's allocator settings and peak RSS are each variant's own; variants alternate,
round after round, so background load hits all alike. Reported: median seconds per optimisation step, the
slowdown against the full engine, and each variant's peak RSS (the highest over its rounds).

    python bench/step_ablation.py            # 6 variants x 2 rounds, ~12 min on 2 idle cores
    python bench/step_ablation.py --json
    # memory: the first 40 steps of an epoch over all of BoolQ train, with and without the heap trim
    python bench/step_ablation.py --rows 0 --steps 40 --variants engine "with heap_trim" "without heap_reuse"
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from app.engine.attention import use_cheap_cpu_attention  # noqa: E402
from app.engine.data import load_boolq  # noqa: E402
from app.engine.encoding import device_batches, encode, length_grouped_batches, to_device  # noqa: E402
from app.engine.memory import heap_limit_for, keep_freed_memory_in_heap, peak_resident_mb, trim_heap_above  # noqa: E402
from app.engine.modeling import (  # noqa: E402
    compute_last_layer_for_first_token_only,
    load_classifier,
    load_tokenizer,
    takes_prepared_mask,
)
from app.engine.training import make_optimizer, train_step  # noqa: E402
from app.params import TrainParams  # noqa: E402

FULL_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "boolq"
FEATURES = ("fused_adamw", "first_token_only", "heap_reuse", "cheap_cpu_attention")
VARIANTS = {"engine": set(FEATURES)} | {f"without {f}": set(FEATURES) - {f} for f in FEATURES}
# Not an engine feature: the heap trim after each step (training.trim_heap_above), which bounds memory at a cost.
VARIANTS["with heap_trim"] = set(FEATURES) | {"heap_trim"}


def prepare_steps(features: set[str], data_dir: str, rows: int, count: int, threads: int):
    """minilm with the given engine features, its optimizer, and ``count`` real BoolQ batches of 32 grouped by
    length, as the engine builds them (``bench/step_profile.py`` uses this too)."""
    if "heap_reuse" in features:
        keep_freed_memory_in_heap()
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer("minilm")
    model = load_classifier("minilm").train()
    if "cheap_cpu_attention" in features:
        use_cheap_cpu_attention(model)
    if "first_token_only" in features:
        compute_last_layer_for_first_token_only(model)
    optimizer = make_optimizer(model, TrainParams(lr=1e-4, eps=1e-8), fused="fused_adamw" in features)
    data = encode(tokenizer, load_boolq(data_dir).train[: rows or None], 256)
    batches = length_grouped_batches([len(i) for i in data.input_ids], 32, torch.Generator().manual_seed(0))
    split = to_device(data, tokenizer.pad_token_id, torch.device("cpu"), with_prepared_mask=takes_prepared_mask(model))
    return model, optimizer, list(device_batches(split, batches[:count]))


def time_steps(features: set[str], data_dir: str, rows: int, warmup: int, steps: int, threads: int) -> dict:
    """Seconds per step of the engine's own ``train_step`` (forward, backward, clip, AdamW, and the heap trim the
    loop does after it) with the given features, and the process's peak RSS."""
    model, optimizer, batches = prepare_steps(features, data_dir, rows, warmup + steps, threads)
    limit = heap_limit_for(model)
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        train_step(model, batch, optimizer).item()
        if "heap_trim" in features:
            trim_heap_above(limit)
        seconds.append(time.perf_counter() - started)
    return {"seconds": seconds[warmup:], "peak_rss_mb": peak_resident_mb()}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--variant", name, "--rows", str(args.rows), "--steps", str(args.steps)]
    command += ["--threads", str(args.threads), "--data-dir", args.data_dir]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1000, help="BoolQ train rows to draw batches from (0: all)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant and round (after 2 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=str(FULL_DATA_DIR))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(time_steps(VARIANTS[args.variant], args.data_dir, args.rows, 2, args.steps, args.threads)))
        return 0

    seconds: dict[str, list[float]] = {name: [] for name in args.variants}
    peaks: dict[str, list[float]] = {name: [] for name in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            run = run_variant(name, args)
            seconds[name] += run["seconds"]
            peaks[name].append(run["peak_rss_mb"])
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    reference = medians.get("engine", next(iter(medians.values())))
    summary = {
        name: {
            "s_per_step": medians[name],
            "slowdown_vs_engine": medians[name] / reference,
            "peak_rss_mb": max(peaks[name]),
        }
        for name in args.variants
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{'variant':<28} {'s/step':>8} {'vs engine':>10} {'peak RSS MB':>12}")
        for name, row in summary.items():
            seconds, slowdown, peak = row["s_per_step"], row["slowdown_vs_engine"], row["peak_rss_mb"]
            print(f"{name:<28} {seconds:>8.3f} {slowdown:>9.2f}x {peak:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
