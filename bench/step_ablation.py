"""Where the engine's per-step speed comes from: its training step with one speed feature removed at a time.

Every variant trains minilm on the same length-grouped batches (batch 32, max_length 256, real BoolQ rows)
in a fresh subprocess, so the allocator (jemalloc preloaded as training processes run, or glibc) and peak RSS are
each variant's own; variants alternate,
round after round, so background load hits all alike. Reported: median seconds per optimisation step, the
slowdown against the full engine, and each variant's peak RSS (the highest over its rounds).

    python bench/step_ablation.py            # 6 variants x 2 rounds, ~12 min on 2 idle cores
    python bench/step_ablation.py --json
    # memory: the first 100 steps of an epoch over all of BoolQ train, jemalloc against glibc's heap reuse
    python bench/step_ablation.py --rows 0 --steps 100 --threads 0 --variants engine "without jemalloc"
"""

from __future__ import annotations

import argparse
import ctypes.util
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

from app.config import environment_with  # noqa: E402
from app.engine.attention import use_cheap_cpu_attention  # noqa: E402
from app.engine.boolq import load_boolq  # noqa: E402
from app.engine.encoding import device_batches, encode, length_grouped_batches, to_device  # noqa: E402
from app.engine.memory import (  # noqa: E402
    allocator_in_use,
    heap_limit_for,
    keep_freed_memory_in_heap,
    peak_resident_mb,
    trim_heap_above,
)
from app.engine.modeling import (  # noqa: E402
    compute_last_layer_for_first_token_only,
    load_classifier,
    load_tokenizer,
    takes_prepared_mask,
)
from app.engine.training import make_optimizer, train_step  # noqa: E402
from app.ops.allocator import JEMALLOC_CONF  # noqa: E402
from app.params import TrainParams  # noqa: E402

FULL_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "boolq"
# jemalloc: what training processes run with (app/ops/allocator.py); without it, glibc keeps freed blocks for reuse.
FEATURES = ("fused_adamw", "first_token_only", "jemalloc", "cheap_cpu_attention")
VARIANTS = {"engine": set(FEATURES)} | {f"without {f}": set(FEATURES) - {f} for f in FEATURES}
# Not engine features, on glibc: its default (large blocks back to the kernel on free), and the heap trim after
# each step (memory.trim_heap_above), which bounds the heap reuse's growth at a cost.
VARIANTS["glibc default"] = set(FEATURES) - {"jemalloc"} | {"glibc_default"}
VARIANTS["with heap_trim"] = set(FEATURES) | {"heap_trim"}
VARIANTS["glibc with heap_trim"] = set(FEATURES) - {"jemalloc"} | {"heap_trim"}


def prepare_steps(features: set[str], data_dir: str, rows: int, count: int, threads: int):
    """minilm with the given engine features, its optimizer, and ``count`` real BoolQ batches of 32 grouped by
    length, as the engine builds them (``bench/step_profile.py`` uses this too)."""
    if "glibc_default" not in features:
        keep_freed_memory_in_heap()  # a no-op under jemalloc
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


def time_steps(
    features: set[str], data_dir: str, rows: int, warmup: int, steps: int, threads: int, trim_above_mb: int = 0
) -> dict:
    """Seconds per step of the engine's own ``train_step`` (forward, backward, clip, AdamW, and the heap trim the
    loop does after it) with the given features, and the process's peak RSS."""
    model, optimizer, batches = prepare_steps(features, data_dir, rows, warmup + steps, threads)
    limit = trim_above_mb << 20 if trim_above_mb else heap_limit_for(model)
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        train_step(model, batch, optimizer).item()
        if "heap_trim" in features:
            trim_heap_above(limit)
        seconds.append(time.perf_counter() - started)
    return {"seconds": seconds[warmup:], "peak_rss_mb": peak_resident_mb(), "allocator": allocator_in_use()}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--variant", name, "--rows", str(args.rows), "--steps", str(args.steps)]
    command += ["--threads", str(args.threads), "--data-dir", args.data_dir, "--trim-above-mb", str(args.trim_above_mb)]
    preload = {"LD_PRELOAD": "", "MALLOC_CONF": ""}
    if "jemalloc" in VARIANTS[name]:
        preload = {"LD_PRELOAD": ctypes.util.find_library("jemalloc") or "", "MALLOC_CONF": JEMALLOC_CONF}
    env = environment_with(**preload)
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
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
    parser.add_argument("--trim-above-mb", type=int, default=0, help="heap_trim's limit (default: heap_limit_for)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.variant:
        print(
            json.dumps(
                time_steps(
                    VARIANTS[args.variant], args.data_dir, args.rows, 2, args.steps, args.threads, args.trim_above_mb
                )
            )
        )
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
