"""Training throughput: our engine against HF Trainer and the tutorial loop, side by side, plus the matmul peak.

All three sides train the same model on the same rows with the same hyperparameters, seed and thread count,
each in a fresh subprocess (so peak RSS is its own), alternating baseline, trainer, engine, baseline, ...
so that background load hits both alike. Ratios are the point; absolute numbers move with the machine.

    python bench/train_speed.py --quick --json   # ~8 min on 2 cores, one JSON object on stdout
    python bench/train_speed.py                  # the full comparison (>= 1,000 train rows, 2 epochs)

Training FLOPs are estimated as 6 x non-embedding parameters x tokens (forward + backward, attention
scores left out): "useful" counts real tokens, "raw" counts the tokens actually computed, padding included.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python bench/train_speed.py`, import the package from the repo
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, BertConfig  # noqa: E402

from app.engine.boolq import load_boolq  # noqa: E402
from app.engine.data import split_train_dev  # noqa: E402
from app.engine.encoding import encode, length_grouped_batches  # noqa: E402
from app.engine.memory import keep_freed_memory_in_heap  # noqa: E402
from app.engine.modeling import bf16_supported, load_classifier, load_tokenizer  # noqa: E402
from app.engine.training import configure_torch, fine_tune  # noqa: E402
from app.params import TrainParams  # noqa: E402
from app.tracking import NullTracker  # noqa: E402
from bench.trainer_peer import train_with_trainer  # noqa: E402
from bench.tutorial_loop import encode_padded, seed_everything, train_tutorial  # noqa: E402

log = logging.getLogger("bench.train_speed")

FULL_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "boolq"
SIDES = ("baseline", "trainer", "engine")
TARGET_SPEEDUP = 3.0  # vs the tutorial loop
TARGET_SPEEDUP_VS_TRAINER = 2.0
TARGET_ACCURACY_GAP_POINTS = 1.0
TARGET_PCT_OF_MODEL_SHAPE_PEAK = 80.0
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# hidden and intermediate sizes, for the model-shape matmul peak; a batch of 32 BoolQ pairs is ~4,300 tokens
MODEL_DIMS = {"minilm": (384, 1536), "base": (768, 3072), "tiny": (64, 128)}
MODEL_SHAPE_TOKENS = 4096
# Random-init BERT shapes for speed-only runs; "minilm" is the pretrained offline model.
RANDOM_CONFIGS = {
    "base": dict(),  # BertConfig() defaults: bert-base (12 layers, hidden 768)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}


@dataclass(frozen=True)
class BenchConfig:
    """What both sides share: data slice, hyperparameters, seed, threads and model."""

    data_dir: str
    train_rows: int
    dev_size: float
    max_length: int
    batch_size: int
    lr: float
    eps: float
    epochs: int
    seed: int
    threads: int
    model_size: str
    device: str = "cpu"
    model_path: str = "minilm"  # the pretrained model (and every side's tokenizer): an alias or a folder


MODES = {
    # Quick: the full mode's rows, one epoch, one round (~8 min on 2 cores). Fewer rows changed the ratios: the
    # Trainer's length grouping sorts within windows of min(rows / (4 x batch), 50) batches, so on a small slice
    # it pads more than on real data (bench/README.md: quick vs full).
    "quick": dict(train_rows=1250, dev_size=0.2, epochs=1, repeats=1),
    # Full: 1,000 train + 250 dev rows, two epochs, two rounds.
    "full": dict(train_rows=1250, dev_size=0.2, epochs=2, repeats=2),
}


# ---------------------------------------------------------------- one side, run inside its own subprocess


def load_rows(config: BenchConfig):
    """The first ``train_rows`` BoolQ train rows, split into train and dev as the engine splits them."""
    boolq = load_boolq(config.data_dir)
    return split_train_dev(boolq.train[: config.train_rows], config.dev_size, config.seed)


def load_model(config: BenchConfig):
    """minilm's tokenizer plus either pretrained minilm or a random-init BERT of the named size."""
    tokenizer = load_tokenizer(config.model_path)
    if config.model_size == "minilm":
        return tokenizer, load_classifier(config.model_path)
    bert = BertConfig(num_labels=2, vocab_size=tokenizer.vocab_size, **RANDOM_CONFIGS[config.model_size])
    return tokenizer, AutoModelForSequenceClassification.from_config(bert, attn_implementation="sdpa")


def nonembedding_params(model: torch.nn.Module) -> int:
    """Parameters that cost FLOPs per token (the embedding lookups do not)."""
    embeddings = sum(p.numel() for p in model.base_model.embeddings.parameters())
    return sum(p.numel() for p in model.parameters()) - embeddings


def run_baseline(config: BenchConfig) -> dict:
    """The tutorial loop: per-example tokenization padded to max_length, fp32, random batches."""
    seed_everything(config.seed)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    tokenizer, model = load_model(config)
    train_rows, dev_rows = load_rows(config)

    started = time.perf_counter()
    train_data = encode_padded(tokenizer, train_rows, config.max_length)
    dev_data = encode_padded(tokenizer, dev_rows, config.max_length)
    tokenize_s = time.perf_counter() - started

    result = train_tutorial(
        model,
        train_data,
        dev_data,
        batch_size=config.batch_size,
        lr=config.lr,
        eps=config.eps,
        epochs=config.epochs,
        device=config.device,
    )
    return side_report(
        "baseline",
        config,
        n_train=len(train_rows),
        n_dev=len(dev_rows),
        tokenize_s=tokenize_s,
        train_s=result.train_s,
        dev_eval_s=result.dev_eval_s,
        dev_accuracy=result.dev_accuracy,
        real_tokens=result.real_tokens,
        padded_tokens=result.padded_tokens,
        params=nonembedding_params(model),
        precision="fp32",
    )


def run_trainer(config: BenchConfig) -> dict:
    """HF Trainer configured well (bench/trainer_peer.py), bf16 exactly where the engine uses it."""
    configure_torch(config.seed, config.threads)
    tokenizer, model = load_model(config)
    train_rows, dev_rows = load_rows(config)
    bf16 = bf16_supported(torch.device(config.device).type)
    result = train_with_trainer(
        model,
        tokenizer,
        train_rows,
        dev_rows,
        max_length=config.max_length,
        batch_size=config.batch_size,
        lr=config.lr,
        eps=config.eps,
        epochs=config.epochs,
        seed=config.seed,
        bf16=bf16,
        device=config.device,
    )
    return side_report(
        "trainer",
        config,
        n_train=len(train_rows),
        n_dev=len(dev_rows),
        tokenize_s=result.tokenize_s,
        train_s=result.train_s,
        dev_eval_s=result.dev_eval_s,
        dev_accuracy=result.dev_accuracy,
        real_tokens=result.real_tokens,
        padded_tokens=result.padded_tokens,
        params=nonembedding_params(model),
        precision="bf16" if bf16 else "fp32",
    )


class ProgressClock:
    """Timestamps the engine's progress callbacks, to tell dev-evaluation time from training steps."""

    def __init__(self) -> None:
        self.events: list[tuple[float, float | None]] = []

    def __call__(self, progress) -> None:
        self.events.append((time.perf_counter(), progress.dev_accuracy))

    def dev_eval_s(self) -> float:
        """Sum over epochs of (dev report time - last step time); the engine reports right after each."""
        pairs = zip(self.events, self.events[1:], strict=False)
        return sum(t_dev - t_step for (t_step, _), (t_dev, acc) in pairs if acc is not None)


def engine_padded_tokens(lengths: list[int], batch_size: int, seed: int, epochs: int) -> int:
    """Tokens the engine computes, padding included: replays its length-grouped batch order."""
    generator = torch.Generator().manual_seed(seed)
    total = 0
    for _ in range(epochs):
        for batch in length_grouped_batches(lengths, batch_size, generator):
            total += max(lengths[i] for i in batch) * len(batch)
    return total


def run_engine(config: BenchConfig) -> dict:
    """Our engine's pieces (``encode`` + ``fine_tune``), exactly as ``train_and_evaluate`` calls them."""
    keep_freed_memory_in_heap()
    configure_torch(config.seed, config.threads)
    tokenizer, model = load_model(config)
    model.to(config.device)
    train_rows, dev_rows = load_rows(config)
    params = TrainParams(
        model=config.model_path,
        batch_size=config.batch_size,
        lr=config.lr,
        eps=config.eps,
        epochs=config.epochs,
        max_length=config.max_length,
        dev_size=config.dev_size,
        seed=config.seed,
    )

    started = time.perf_counter()
    train_set = encode(tokenizer, train_rows, config.max_length)
    dev_set = encode(tokenizer, dev_rows, config.max_length)
    tokenize_s = time.perf_counter() - started

    clock = ProgressClock()
    started = time.perf_counter()
    history = fine_tune(model, tokenizer.pad_token_id, train_set, dev_set, params, clock, NullTracker())
    train_s = time.perf_counter() - started

    lengths = [len(ids) for ids in train_set.input_ids]
    return side_report(
        "engine",
        config,
        n_train=len(train_rows),
        n_dev=len(dev_rows),
        tokenize_s=tokenize_s,
        train_s=train_s,
        dev_eval_s=clock.dev_eval_s(),
        dev_accuracy=history.dev_accuracy[-1],
        real_tokens=sum(lengths) * config.epochs,
        padded_tokens=engine_padded_tokens(lengths, config.batch_size, config.seed, config.epochs),
        params=nonembedding_params(model),
        precision="bf16" if bf16_supported(torch.device(config.device).type) else "fp32",
    )


def side_report(
    side: str,
    config: BenchConfig,
    *,
    n_train: int,
    n_dev: int,
    tokenize_s: float,
    train_s: float,
    dev_eval_s: float,
    dev_accuracy: float,
    real_tokens: int,
    padded_tokens: int,
    params: int,
    precision: str,
) -> dict:
    """Throughput and FLOP/s of one run. ``train_s`` includes the per-epoch dev evaluation both sides do."""
    examples = n_train * config.epochs
    step_s = train_s - dev_eval_s
    return {
        "side": side,
        "n_train": n_train,
        "n_dev": n_dev,
        "examples_trained": examples,
        "tokenize_s": tokenize_s,
        "train_s": train_s,
        "dev_eval_s": dev_eval_s,
        "examples_per_s": examples / (tokenize_s + train_s),
        "examples_per_s_excl_tokenization": examples / train_s,
        "dev_accuracy": dev_accuracy,
        "real_tokens": real_tokens,
        "padded_tokens": padded_tokens,
        "nonembedding_params": params,
        "useful_gflops": 6 * params * real_tokens / step_s / 1e9,
        "raw_gflops": 6 * params * padded_tokens / step_s / 1e9,
        "precision": precision,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


RUNNERS = {"baseline": run_baseline, "trainer": run_trainer, "engine": run_engine}


# ---------------------------------------------------------------- the parent: peak, alternation, summary


def time_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    synchronize(a.device)
    started = time.perf_counter()
    torch.mm(a, b)
    synchronize(a.device)
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype, max_n: int, device: str = "cpu", repeats: int = 5, min_s: float = 0.2) -> dict:
    """Best-of-``repeats`` square matmul GFLOP/s; the size grows to ``max_n`` or until one takes ``min_s``.

    The cap on time matters for bf16 on CPUs without native bf16, where a 2048² matmul takes ~20 s.
    """
    n = min(256, max_n)
    while True:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        if time_matmul(a, b) >= min_s or n >= max_n:
            break
        n *= 2
    best = min(time_matmul(a, b) for _ in range(repeats))
    return {"n": n, "gflops": 2 * n**3 / best / 1e9}


def layer_matmul_gflops(dtype: torch.dtype, model_size: str, device: str = "cpu", repeats: int = 3) -> dict:
    """GFLOP/s of the matmuls of one encoder layer's training step on the model's own shapes: the forward
    products (Q/K/V, output, feed-forward in and out) and their backward ones (input and weight gradients),
    for a batch of ``MODEL_SHAPE_TOKENS`` tokens; best of ``repeats`` per shape. Small or skinny products run
    below the square peak, so this is the ceiling a training step can actually reach."""
    hidden, intermediate = MODEL_DIMS[model_size]
    tokens = MODEL_SHAPE_TOKENS
    forward = [(tokens, hidden, 3 * hidden), (tokens, hidden, hidden), (tokens, hidden, intermediate)]
    forward.append((tokens, intermediate, hidden))
    shapes = forward + [(m, n, k) for m, k, n in forward] + [(k, m, n) for m, k, n in forward]
    flops, seconds = 0, 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
        seconds += min(time_matmul(a, b) for _ in range(repeats))
        flops += 2 * m * k * n
    return {"n": tokens, "gflops": flops / seconds / 1e9}


def measure_peaks(max_n: int, device: str = "cpu", model_size: str = "minilm") -> dict[str, dict]:
    """fp32 and bf16 matmul peaks on the runs' device, with the same thread count the runs use: square
    matmuls, and the model's own shapes (bf16 only where the device has it natively: elsewhere it is slow)."""
    peaks = {dtype_name: matmul_gflops(dtype, max_n, device) for dtype_name, dtype in PEAK_DTYPES.items()}
    for dtype_name, dtype in PEAK_DTYPES.items():
        if dtype != torch.bfloat16 or bf16_supported(torch.device(device).type):
            peaks[f"{dtype_name}_model_shapes"] = layer_matmul_gflops(dtype, model_size, device)
    log.info("matmul peak: %s", peaks)
    return peaks


def best_peaks(*measurements: dict[str, dict]) -> dict[str, dict]:
    """Per dtype, the best of measurements taken before and after the runs (load only ever lowers a peak)."""
    return {dtype: max((m[dtype] for m in measurements), key=lambda p: p["gflops"]) for dtype in measurements[0]}


def machine_description(threads: int) -> dict:
    """CPU model, core count, torch version and thread count, for the results table."""
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        model = names[0] if names else model
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "native_bf16": bf16_supported(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_in_subprocess(side: str, config: BenchConfig) -> dict:
    """One side in a fresh interpreter; its last stdout line is its JSON report."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--config", json.dumps(asdict(config))]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{side} run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_alternating(config: BenchConfig, repeats: int) -> list[dict]:
    """baseline, trainer, engine, baseline, ...: background load drifts over all sides alike."""
    runs = []
    for repeat in range(1, repeats + 1):
        for side in SIDES:
            started = time.perf_counter()
            run = run_in_subprocess(side, config)
            log.info(
                "repeat %d/%d %-8s %6.2f ex/s (%6.2f excl. tokenization), dev acc %.4f, %.0f s",
                repeat,
                repeats,
                side,
                run["examples_per_s"],
                run["examples_per_s_excl_tokenization"],
                run["dev_accuracy"],
                time.perf_counter() - started,
            )
            runs.append(run)
    return runs


def summarize(config: BenchConfig, runs: list[dict], peaks: dict, machine: dict) -> dict:
    """Medians per side, ratios engine/baseline, FLOP/s against the measured peak, and the targets."""
    summary: dict = {}
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        for key in ("examples_per_s", "examples_per_s_excl_tokenization", "useful_gflops", "raw_gflops"):
            summary[f"{side}_{key}"] = statistics.median(r[key] for r in mine)
        summary[f"{side}_dev_accuracy"] = mine[0]["dev_accuracy"]
        summary[f"{side}_peak_rss_mb"] = max(r["peak_rss_mb"] for r in mine)
        summary[f"{side}_precision"] = mine[0]["precision"]
        peak = peaks[mine[0]["precision"]]["gflops"]
        summary[f"{side}_useful_pct_of_peak"] = 100 * summary[f"{side}_useful_gflops"] / peak
        summary[f"{side}_raw_pct_of_peak"] = 100 * summary[f"{side}_raw_gflops"] / peak
        shape_peak = peaks.get(f"{mine[0]['precision']}_model_shapes")
        summary[f"{side}_useful_pct_of_model_shape_peak"] = (
            100 * summary[f"{side}_useful_gflops"] / shape_peak["gflops"] if shape_peak else None
        )
        summary[f"{side}_padding_share"] = 1 - mine[0]["real_tokens"] / mine[0]["padded_tokens"]
    summary["speedup"] = summary["engine_examples_per_s"] / summary["baseline_examples_per_s"]
    summary["speedup_excl_tokenization"] = (
        summary["engine_examples_per_s_excl_tokenization"] / summary["baseline_examples_per_s_excl_tokenization"]
    )
    summary["speedup_vs_trainer"] = summary["engine_examples_per_s"] / summary["trainer_examples_per_s"]
    summary["speedup_vs_trainer_excl_tokenization"] = (
        summary["engine_examples_per_s_excl_tokenization"] / summary["trainer_examples_per_s_excl_tokenization"]
    )
    # If two sides ran at equal FLOP/s per token, the speedup would be the ratio of tokens computed.
    first = {side: next(r for r in runs if r["side"] == side) for side in SIDES}
    summary["speedup_bound_from_padding"] = first["baseline"]["padded_tokens"] / first["engine"]["padded_tokens"]
    summary["trainer_vs_engine_tokens"] = first["trainer"]["padded_tokens"] / first["engine"]["padded_tokens"]
    repeats = [runs[i : i + len(SIDES)] for i in range(0, len(runs), len(SIDES))]
    summary["speedup_per_repeat"] = [r[2]["examples_per_s"] / r[0]["examples_per_s"] for r in repeats]
    summary["speedup_vs_trainer_per_repeat"] = [r[2]["examples_per_s"] / r[1]["examples_per_s"] for r in repeats]
    gap = 100 * (summary["engine_dev_accuracy"] - summary["baseline_dev_accuracy"])
    trainer_gap = 100 * (summary["engine_dev_accuracy"] - summary["trainer_dev_accuracy"])
    summary["dev_accuracy_gap_points"] = gap
    summary["dev_accuracy_gap_vs_trainer_points"] = trainer_gap
    summary["speedup_target_met"] = summary["speedup"] >= TARGET_SPEEDUP
    summary["speedup_vs_trainer_target_met"] = summary["speedup_vs_trainer"] >= TARGET_SPEEDUP_VS_TRAINER
    summary["accuracy_target_met"] = max(abs(gap), abs(trainer_gap)) <= TARGET_ACCURACY_GAP_POINTS
    summary["matmul_peak_gflops"] = {dtype: peak["gflops"] for dtype, peak in peaks.items()}
    summary["engine_useful_pct_of_model_shape_peak_target"] = TARGET_PCT_OF_MODEL_SHAPE_PEAK
    summary["matmul_sizes"] = {dtype: peak["n"] for dtype, peak in peaks.items()}
    summary["flops_note"] = (
        "training FLOPs = 6 x non-embedding params x tokens over training-step time (dev eval and tokenization "
        "excluded); useful = real tokens, raw = tokens computed incl. padding; % of the matmul peak of the "
        "precision each side trains in"
    )
    summary["examples_per_s_note"] = (
        "train examples x epochs / (tokenization + training loop incl. per-epoch dev eval); medians over repeats"
    )
    summary["config"] = asdict(config)
    summary["machine"] = machine
    summary["runs"] = runs
    return summary


def format_table(summary: dict) -> str:
    """The summary as a small text table: one metric a line, each side, then engine/baseline and engine/trainer."""
    rows = [
        ("examples/s (incl. tokenization)", "examples_per_s", "{:.2f}"),
        ("examples/s (excl. tokenization)", "examples_per_s_excl_tokenization", "{:.2f}"),
        ("dev accuracy", "dev_accuracy", "{:.4f}"),
        ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
        ("useful GFLOP/s (real tokens)", "useful_gflops", "{:.1f}"),
        ("raw GFLOP/s (incl. padding)", "raw_gflops", "{:.1f}"),
        ("useful % of matmul peak", "useful_pct_of_peak", "{:.1f}"),
        ("padding share of tokens", "padding_share", "{:.2f}"),
    ]
    lines = [f"{'metric':34} {'baseline':>10} {'trainer':>10} {'engine':>10} {'e/base':>7} {'e/trainer':>9}"]
    for label, key, fmt in rows:
        base, trainer, eng = (summary[f"{side}_{key}"] for side in SIDES)
        ratios = [f"{eng / other:.2f}x" if other else "-" for other in (base, trainer)]
        cells = " ".join(f"{fmt.format(v):>10}" for v in (base, trainer, eng))
        lines.append(f"{label:34} {cells} {ratios[0]:>7} {ratios[1]:>9}")
    peaks = summary["matmul_peak_gflops"]
    lines += [
        f"precision: baseline {summary['baseline_precision']}, trainer {summary['trainer_precision']}, "
        f"engine {summary['engine_precision']}; matmul peak fp32 {peaks['fp32']:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16']:.1f} GFLOP/s",
        "useful % of the model-shape matmul peak of its precision: "
        + ", ".join(f"{side} {share_text(summary[f'{side}_useful_pct_of_model_shape_peak'])}" for side in SIDES)
        + f" (target for the engine: {TARGET_PCT_OF_MODEL_SHAPE_PEAK:g} %)",
        f"tokens computed baseline/engine {summary['speedup_bound_from_padding']:.2f}x, "
        f"trainer/engine {summary['trainer_vs_engine_tokens']:.2f}x "
        "(the speedup if both ran at equal FLOP/s per token)",
        f"speedup vs tutorial {summary['speedup']:.2f}x incl. tokenization "
        f"({summary['speedup_excl_tokenization']:.2f}x excl.), target {TARGET_SPEEDUP}x: "
        f"{'met' if summary['speedup_target_met'] else 'NOT met'}",
        f"speedup vs Trainer {summary['speedup_vs_trainer']:.2f}x incl. tokenization "
        f"({summary['speedup_vs_trainer_excl_tokenization']:.2f}x excl.), target {TARGET_SPEEDUP_VS_TRAINER}x: "
        f"{'met' if summary['speedup_vs_trainer_target_met'] else 'NOT met'}",
        f"dev accuracy gap vs tutorial {summary['dev_accuracy_gap_points']:+.1f}, vs Trainer "
        f"{summary['dev_accuracy_gap_vs_trainer_points']:+.1f} points, target ±{TARGET_ACCURACY_GAP_POINTS:g}: "
        f"{'met' if summary['accuracy_target_met'] else 'NOT met'}",
    ]
    return "\n".join(lines)


def share_text(pct: float | None) -> str:
    return "-" if pct is None else f"{pct:.1f} %"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small slice, 1 epoch, 1 repeat (a few minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (table on stderr)")
    parser.add_argument("--repeats", type=int, help="alternating baseline/trainer/engine rounds (quick 1, full 2)")
    parser.add_argument("--train-rows", type=int, help="first N BoolQ train rows, before the dev split")
    parser.add_argument("--dev-size", type=float, help="share of those rows held out as dev (0.2)")
    parser.add_argument("--epochs", type=int, help="quick 1, full 2")
    parser.add_argument("--max-length", type=int, default=256, help="tokens; the baseline pads to it")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eps", type=float, default=1e-8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both sides; 0 = torch default")
    parser.add_argument("--data-dir", default=str(FULL_DATA_DIR), help="BoolQ folder with train.jsonl")
    parser.add_argument(
        "--model-size",
        choices=["minilm", *RANDOM_CONFIGS],
        default="minilm",
        help="pretrained minilm, or a random-init BERT (base = bert-base size) for speed only",
    )
    parser.add_argument("--matmul-size", type=int, default=2048, help="largest square matmul for the peak")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for both sides and the peak")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[BenchConfig, int]:
    """Mode presets, overridden by any option given explicitly."""
    preset = MODES["quick" if args.quick else "full"]
    config = BenchConfig(
        data_dir=str(Path(args.data_dir).expanduser().resolve()),
        train_rows=preset["train_rows"],
        dev_size=preset["dev_size"],
        max_length=args.max_length,
        batch_size=args.batch_size,
        lr=args.lr,
        eps=args.eps,
        epochs=preset["epochs"],
        seed=args.seed,
        threads=args.threads,
        model_size=args.model_size,
        device=args.device,
    )
    overrides = {"train_rows": args.train_rows, "dev_size": args.dev_size, "epochs": args.epochs}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    return config, args.repeats or preset["repeats"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.worker:
        print(json.dumps(RUNNERS[args.worker](BenchConfig(**json.loads(args.config)))))
        return 0

    config, repeats = config_from_args(args)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    log.info("config %s, %d repeat(s)", asdict(config), repeats)
    before = measure_peaks(args.matmul_size, config.device, config.model_size)
    runs = run_alternating(config, repeats)
    peaks = best_peaks(before, measure_peaks(args.matmul_size, config.device, config.model_size))
    summary = summarize(config, runs, peaks, machine_description(config.threads))
    if args.json:
        print(format_table(summary), file=sys.stderr)
        print(json.dumps(summary))
    else:
        print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
