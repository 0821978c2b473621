"""Everything a GPU run should show (issues 20 and 30), in one command; each section is written the moment it ends.

    python bench/gpu_check.py --model /path/to/minilm-folder --data-dir /path/to/boolq            # ~6 min, one H200
    python bench/gpu_check.py --model /path/to/minilm-folder --data-dir /path/to/boolq --sweep    # + 12 trials

Each finished section goes out at once, flushed, so a run killed at its time limit keeps what it measured: a line
``{"section": NAME, "value": ...}`` on stdout and ``gpu-check-NAME.json`` under ``--out`` (default ``$OUT``). The
last line, section ``report``, holds them all (also ``gpu-check-report.json``).

Sections, each timed and skipped (with the reason) once ``--budget-s`` is spent:
- ``peak``: bf16 matmul TFLOP/s, CUDA events around many repetitions of one 8192³ product (no sync between them);
- ``full_run``: the CLI run a user makes (``python -m app train`` on the full data, minilm, 3 epochs, batch 32,
  max_length 256): val accuracy, training examples/s, the whole command's wall time;
- ``probe``: the engine's steps on minilm: step time per epoch (first vs steady), tracking on vs off, the whole
  run's examples/s beside the steady state's (every (batch, width) shape warmed before the clock starts), per step
  CPU-ms vs GPU ms (CUDA events around it; the profiler's busy ms), host syncs per step
  (``torch.cuda.set_sync_debug_mode``), and the profiler's share of GPU idle time;
- ``sides``: engine vs the fair Trainer peer vs the tutorial loop (bench/train_speed.py's sides, each in a fresh
  process) on minilm and on a random-init bert-base; ``--full-train-sides`` trains them on the whole train split;
- ``sweep`` (``--sweep``): 12 trials over lr, warm-up, epochs and max_length on the full data, ranked by dev accuracy.

Runs where only torch, transformers, numpy, scikit-learn, tqdm, pydantic and pydantic-settings are installed
(no network; minilm as a folder, bench/make_fp16_minilm.py). Without ``accelerate`` the Trainer side reports why
it did not run. ``--smoke`` does every section on the CPU at toy sizes (tests/bench/test_bench.py runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from app.config import Settings, environment_with  # noqa: E402
from app.engine.boolq import load_boolq  # noqa: E402
from app.engine.data import split_train_dev  # noqa: E402
from app.engine.encoding import device_batches, encode, length_grouped_batches, to_device, width_multiple  # noqa: E402
from app.engine.modeling import (  # noqa: E402
    compute_last_layer_for_first_token_only,
    load_classifier,
    load_tokenizer,
    takes_prepared_mask,
    use_tf32,
)
from app.engine.training import configure_torch, fine_tune, make_optimizer, train_step  # noqa: E402
from app.params import TrainParams  # noqa: E402
from app.tracking import NullTracker, make_tracker  # noqa: E402
from bench.train_speed import SIDES, BenchConfig, run_in_subprocess  # noqa: E402

log = logging.getLogger("bench.gpu_check")

# The GPU run of 2026-11 (bench/README.md "GPU"): what the goals are measured against.
BEFORE = {"minilm_examples_per_s": 708, "minilm_val_accuracy": 0.6884, "cli_wall_s": 47.5}
GOALS = {"minilm_examples_per_s": 5000, "accuracy_within": 0.01, "cli_wall_s": 20, "base_examples_per_s": 3000}
SWEEP = [  # (lr, warmup_ratio, epochs, max_length): around the recipe that reached 68.8 %
    (1e-4, 0.1, 3, 256),
    (5e-5, 0.1, 3, 256),
    (2e-4, 0.1, 3, 256),
    (1e-4, 0.0, 3, 256),
    (1e-4, 0.2, 3, 256),
    (1e-4, 0.1, 2, 256),
    (1e-4, 0.1, 4, 256),
    (5e-5, 0.1, 4, 256),
    (1e-4, 0.1, 3, 384),
    (5e-5, 0.1, 3, 384),
    (2e-4, 0.1, 4, 384),
    (5e-5, 0.1, 5, 384),
]


@dataclass(frozen=True)
class Sizes:
    """How big each section is: the GPU run's, or toy ones for ``--smoke`` on the CPU."""

    device: str
    matmul_n: int
    matmul_repeats: int
    epochs: int
    batch_size: int
    max_length: int
    train_limit: int  # 0: all rows
    probe_rows: int
    profile_steps: int
    side_rows: int
    side_models: tuple[str, ...]
    sweep_trials: int


GPU = Sizes("cuda", 8192, 200, 3, 32, 256, 0, 4000, 30, 4000, ("minilm", "base"), len(SWEEP))
SMOKE = Sizes("cpu", 128, 3, 1, 8, 32, 40, 40, 3, 30, ("minilm",), 2)


# ---------------------------------------------------------------- peak


def matmul_peak(device: torch.device, n: int, repeats: int) -> dict:
    """bf16 TFLOP/s of ``repeats`` back-to-back n³ products, timed by CUDA events around all of them (a sync per
    product, or a short one, understates the peak); on the CPU by the wall clock."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel, clocks ramp up
        torch.mm(a, b, out=out)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        seconds = time.perf_counter() - started
    return {"n": n, "repeats": repeats, "tflops": 2 * n**3 * repeats / seconds / 1e12}


# ---------------------------------------------------------------- the user's CLI run


def cli_run(model: str, data_dir: str, sizes: Sizes) -> dict:
    """``python -m app train`` as a user types it; its metrics plus the whole command's wall time."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out:
        command = [sys.executable, "-m", "app", "train", "--model", model, "--data-dir", data_dir]
        command += ["--epochs", str(sizes.epochs), "--lr", "1e-4", "--warmup-ratio", "0.1"]
        command += ["--batch-size", str(sizes.batch_size), "--max-length", str(sizes.max_length)]
        command += ["--tracker", "none", "--json", "--output-dir", out]
        if sizes.train_limit:
            command += ["--train-limit", str(sizes.train_limit), "--eval-limit", str(sizes.train_limit)]
        env = environment_with(HF_HUB_OFFLINE="1", DEVICE=sizes.device)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
        wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the CLI run failed (exit {done.returncode}): {done.stderr[-2000:]}")
    metrics = json.loads(done.stdout.strip().splitlines()[-1])["metrics"]
    return {
        "command": " ".join(command[1:]),
        "wall_s": wall_s,
        "val_accuracy": metrics["accuracy"],
        "majority_baseline": metrics["majority_baseline"],
        "dev_accuracy_per_epoch": metrics["dev_accuracy_per_epoch"],
        "train_examples_per_s": metrics["train_examples_per_s"],
        "timings_s": metrics["timings_s"],
        "peak_rss_mb": metrics.get("peak_rss_mb"),
        "precision_mode": metrics["precision_mode"],
    }


# ---------------------------------------------------------------- the engine's steps, looked at closely


class EpochClock:
    """The engine's progress callback: when each epoch's last step was read back, and each dev evaluation ended."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.started = time.perf_counter()
        self.epoch_ends: list[float] = []  # the read-back that includes the epoch's last step
        self.dev_ends: list[float] = []

    def __call__(self, progress) -> None:
        if progress.dev_accuracy is not None:
            self.dev_ends.append(time.perf_counter())
        elif progress.step % self.steps_per_epoch == 0:
            self.epoch_ends.append(time.perf_counter())

    def step_ms_per_epoch(self) -> list[float]:
        starts = [self.started, *self.dev_ends]
        return [
            (end - start) * 1000 / self.steps_per_epoch for start, end in zip(starts, self.epoch_ends, strict=False)
        ]


class RecordingTracker(NullTracker):
    """Stands in for MLflow where it is not installed: takes every call the engine makes, and keeps the points."""

    def __init__(self):
        self.points = 0

    def log_metrics(self, metrics, step):
        self.points += len(metrics)

    def log_metric_history(self, key, points):
        self.points += len(points)


def tracker_for_probe(folder: Path):
    """MLflow on a local store where the library is installed, else the recording stand-in; and its name."""
    if importlib.util.find_spec("mlflow") is not None:
        return make_tracker(Settings(tracker="mlflow", artifacts_dir=folder)), "mlflow (local store)"
    return RecordingTracker(), "recording stand-in (mlflow not installed)"


def probe(model_path: str, data_dir: str, sizes: Sizes) -> dict:
    """Step time per epoch with tracking off and on, host syncs per step, and the GPU's idle share."""
    device = torch.device(sizes.device)
    use_tf32(device)
    tokenizer = load_tokenizer(model_path)
    train_rows, dev_rows = split_train_dev(load_boolq(data_dir).train[: sizes.probe_rows], 0.1, 42)
    train_set, dev_set = (encode(tokenizer, rows, sizes.max_length) for rows in (train_rows, dev_rows))
    params = TrainParams(model=model_path, batch_size=sizes.batch_size, lr=1e-4, epochs=2, seed=42)
    steps_per_epoch = -(-len(train_set) // params.batch_size)
    result: dict = {"rows": len(train_set), "steps_per_epoch": steps_per_epoch}
    with tempfile.TemporaryDirectory(prefix="gpu-check-tracking-") as folder:
        for label, (tracker, name) in (
            ("tracking_off", (NullTracker(), "none")),
            ("tracking_on", tracker_for_probe(Path(folder))),
        ):
            configure_torch(42, 0)
            model = load_classifier(model_path).to(device)
            clock = EpochClock(steps_per_epoch)
            tracker.start_run(label, params.model_dump())
            fine_tune(model, tokenizer.pad_token_id, train_set, dev_set, params, clock, tracker)
            tracker.end_run("FINISHED")
            whole_run_s = time.perf_counter() - clock.started  # dev evaluations included, as a user's run has them
            result[label] = {
                "tracker": name,
                "step_ms_per_epoch": clock.step_ms_per_epoch(),
                "whole_run_examples_per_s": len(train_set) * params.epochs / whole_run_s,
            }
    compute_last_layer_for_first_token_only(model)
    optimizer = make_optimizer(model, TrainParams(lr=1e-5))
    batches = one_epoch_on_device(model, tokenizer.pad_token_id, train_set, sizes)
    model.train()
    result["shapes_warmed"] = warm_every_shape(model, batches, optimizer)
    result["steady_state"] = steady_state(model, batches, optimizer)
    result |= step_syncs_and_idle(model, batches, optimizer, sizes)
    return result


def one_epoch_on_device(model, pad_id: int, train_set, sizes: Sizes) -> list[dict]:
    """One epoch's batches as the engine builds them (length-grouped, widths in the device's buckets), on the device."""
    device = torch.device(sizes.device)
    split = to_device(train_set, pad_id, device, with_prepared_mask=takes_prepared_mask(model))
    order = length_grouped_batches(
        [len(i) for i in train_set.input_ids], sizes.batch_size, torch.Generator().manual_seed(0)
    )
    return list(device_batches(split, order, width_multiple(device)))


def warm_every_shape(model, batches: list[dict], optimizer) -> int:
    """One step on each (batch, width) shape the epoch has, so no clock after this times a kernel's first use
    (cuBLAS's choice, the allocator's first blocks, autotuning); the number of shapes."""
    shapes = {}
    for batch in batches:
        shapes.setdefault(tuple(batch["input_ids"].shape), batch)
    for batch in shapes.values():
        train_step(model, batch, optimizer)
    synchronize(model)
    return len(shapes)


def steady_state(model, batches: list[dict], optimizer) -> dict:
    """A warm epoch of training steps: examples/s, and per step the CPU's ms (issuing it) against the ms from the
    GPU starting the step's work to ending it (CUDA events; None on the CPU, where issuing is doing). Beside the
    profiler's GPU-busy ms: a span near the CPU's ms and well over the busy ms means launch-bound."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    events = (
        [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in batches]
        if on_cuda
        else []
    )
    cpu_s = 0.0
    started = time.perf_counter()
    for i, batch in enumerate(batches):
        issued = time.perf_counter()
        if on_cuda:
            events[i][0].record()
        train_step(model, batch, optimizer)
        if on_cuda:
            events[i][1].record()
        cpu_s += time.perf_counter() - issued
    synchronize(model)
    wall_s = time.perf_counter() - started
    rows = sum(len(batch["labels"]) for batch in batches)
    return {
        "steps": len(batches),
        "examples_per_s": rows / wall_s,
        "cpu_ms_per_step": cpu_s * 1000 / len(batches),
        "gpu_span_ms_per_step": sum(a.elapsed_time(b) for a, b in events) / len(batches) if on_cuda else None,
    }


def synchronize(model) -> None:
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def step_syncs_and_idle(model, batches: list[dict], optimizer, sizes: Sizes) -> dict:
    """Host syncs per warm training step, and from the profiler the GPU's busy ms per step (kernels running) and the
    share of the profiled window it had none running (None on the CPU, which has neither)."""
    if sizes.device != "cuda":
        return {"syncs_per_step": None, "gpu_busy_ms_per_step": None, "gpu_idle_share": None}
    counted = batches[: sizes.profile_steps]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in counted:
                train_step(model, batch, optimizer)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught) / len(counted)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    profiled = batches[sizes.profile_steps : 2 * sizes.profile_steps]
    with torch.profiler.profile(activities=activities) as profile:
        for batch in profiled:
            train_step(model, batch, optimizer)
        torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end) for e in profile.events() if e.device_type.name == "CUDA"]
    return {
        "syncs_per_step": syncs,
        "gpu_busy_ms_per_step": busy_time(kernels) / 1000 / len(profiled),  # the profiler's times are in µs
        "gpu_idle_share": idle_share(kernels),
    }


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """How long at least one of the intervals was running (overlaps counted once)."""
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    return busy


def idle_share(intervals: list[tuple[float, float]]) -> float | None:
    """The share of the span from the first kernel's start to the last one's end when no kernel ran."""
    if not intervals:
        return None
    span = max(e for _, e in intervals) - min(s for s, _ in intervals)
    return 1 - busy_time(intervals) / span if span > 0 else 0.0


# ---------------------------------------------------------------- the three sides


def sides(model_path: str, data_dir: str, sizes: Sizes, full_train: bool) -> dict:
    """Engine vs fair Trainer vs tutorial loop per model, each side in a fresh process, on ``sizes.side_rows`` rows
    or the whole train split; a side that cannot run (the Trainer without ``accelerate``) says why."""
    rows = len(load_boolq(data_dir).train) if full_train else sizes.side_rows
    report = {}
    for model_size in sizes.side_models:
        config = BenchConfig(
            data_dir=data_dir,
            train_rows=rows,
            dev_size=0.2,
            max_length=sizes.max_length,
            batch_size=sizes.batch_size,
            lr=1e-4,
            eps=1e-8,
            epochs=1,
            seed=42,
            threads=0,
            model_size=model_size,
            device=sizes.device,
            model_path=model_path,
        )
        runs = {}
        for side in SIDES:
            try:
                run = run_in_subprocess(side, config)
                keys = ("examples_per_s", "examples_per_s_excl_tokenization", "dev_accuracy", "train_s", "precision")
                runs[side] = {key: run[key] for key in keys} | {"peak_rss_mb": run["peak_rss_mb"]}
            except RuntimeError as exc:
                runs[side] = {"error": str(exc).strip().splitlines()[-1][:300]}
        speed = {side: run.get("examples_per_s_excl_tokenization") for side, run in runs.items()}
        report[model_size] = {
            "config": asdict(config),
            "runs": runs,
            "engine_vs_trainer": ratio(speed["engine"], speed["trainer"]),
            "engine_vs_tutorial": ratio(speed["engine"], speed["baseline"]),
        }
    return report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# ---------------------------------------------------------------- sweep


def sweep(model_path: str, data_dir: str, sizes: Sizes) -> dict:
    """Trials of the engine (in this process) over lr, warm-up, epochs and max_length; ranked by dev accuracy."""
    from app.engine.training import train_and_evaluate

    trials = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-sweep-") as out:
        for lr, warmup, epochs, max_length in SWEEP[: sizes.sweep_trials]:
            params = TrainParams(
                model=model_path,
                lr=lr,
                warmup_ratio=warmup,
                epochs=epochs if sizes.device != "cpu" else 1,
                max_length=max_length if sizes.device != "cpu" else sizes.max_length,
                batch_size=sizes.batch_size,
                train_limit=sizes.train_limit or None,
                eval_limit=sizes.train_limit or None,
            )
            started = time.perf_counter()
            result = train_and_evaluate(params, data_dir, out, device=sizes.device)
            trials.append(
                {
                    "lr": lr,
                    "warmup_ratio": warmup,
                    "epochs": params.epochs,
                    "max_length": params.max_length,
                    "dev_accuracy": result.dev_accuracy,
                    "val_accuracy": result.accuracy,
                    "wall_s": time.perf_counter() - started,
                }
            )
    leaderboard = sorted(trials, key=lambda t: -t["dev_accuracy"])
    return {"leaderboard": leaderboard, "chosen_on_dev": leaderboard[0], "goal_val_accuracy": 0.72}


# ---------------------------------------------------------------- the whole check


def goals(report: dict) -> dict:
    """The issue's GPU goals, met or not, from what the sections measured (None where a section did not run)."""
    full, base = report.get("full_run") or {}, (report.get("sides") or {}).get("base") or {}
    minilm = (report.get("sides") or {}).get("minilm") or {}
    speed = full.get("train_examples_per_s")
    accuracy = full.get("val_accuracy")
    base_speed = ((base.get("runs") or {}).get("engine") or {}).get("examples_per_s_excl_tokenization")
    return {
        "minilm_examples_per_s_ge_5000": None if speed is None else speed >= GOALS["minilm_examples_per_s"],
        "minilm_accuracy_within_1_point": None
        if accuracy is None
        else abs(accuracy - BEFORE["minilm_val_accuracy"]) <= GOALS["accuracy_within"],
        "cli_wall_le_20_s": None if "wall_s" not in full else full["wall_s"] <= GOALS["cli_wall_s"],
        "base_examples_per_s_ge_3000": None if base_speed is None else base_speed >= GOALS["base_examples_per_s"],
        "engine_ge_2x_trainer_minilm": None
        if minilm.get("engine_vs_trainer") is None
        else minilm["engine_vs_trainer"] >= 2,
    }


class SectionWriter:
    """Sends each section out the moment it ends: a flushed stdout line, and a file under ``folder`` when given."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, value) -> None:
        print(json.dumps({"section": name, "value": value}), flush=True)
        if self.folder is not None:
            with (self.folder / f"gpu-check-{name}.json").open("w") as file:
                json.dump(value, file)
                file.flush()
                os.fsync(file.fileno())  # the machine may be taken back right after a kill


def run_sections(args: argparse.Namespace, sizes: Sizes, writer: SectionWriter) -> dict:
    started = time.perf_counter()
    report: dict = {
        "device": torch.cuda.get_device_name() if sizes.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "smoke": args.smoke,
        "before": BEFORE,
    }
    writer.write("machine", report)
    sections: list[tuple[str, Callable[[], dict]]] = [
        ("peak", lambda: matmul_peak(torch.device(sizes.device), sizes.matmul_n, sizes.matmul_repeats)),
        ("full_run", lambda: cli_run(args.model, args.data_dir, sizes)),
        ("probe", lambda: probe(args.model, args.data_dir, sizes)),
        ("sides", lambda: sides(args.model, args.data_dir, sizes, args.full_train_sides)),
    ]
    if args.sweep:
        sections.append(("sweep", lambda: sweep(args.model, args.data_dir, sizes)))
    for name, section in sections:
        section_started = time.perf_counter()
        if section_started - started > args.budget_s:
            report[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
        else:
            try:
                report[name] = section()
            except Exception as exc:  # one failing section must not cost the others' figures
                log.exception("section %s failed", name)
                report[name] = {"error": f"{type(exc).__name__}: {str(exc)[-500:]}"}
            log.info("%s done in %.0f s", name, time.perf_counter() - section_started)
            report.setdefault("section_s", {})[name] = time.perf_counter() - section_started
        writer.write(name, report[name])
    report["goals"] = goals(report)
    report["wall_s"] = time.perf_counter() - started
    writer.write("report", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="minilm as a folder (or the alias where its package is)")
    parser.add_argument("--data-dir", required=True, help="BoolQ folder with train.jsonl and val.jsonl")
    parser.add_argument("--sweep", action="store_true", help="also the 12-trial sweep on the full data")
    parser.add_argument("--full-train-sides", action="store_true", help="the sides train on the whole train split")
    parser.add_argument("--budget-s", type=float, default=420, help="start no section after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="every section on the CPU at toy sizes (the test)")
    parser.add_argument(
        "--out",
        type=Path,
        default=os.environ.get("OUT") or None,  # the device machine's folder that comes back
        help="also write each section to gpu-check-SECTION.json here (default: $OUT; stdout only without either)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("torch sees no CUDA GPU here; --smoke runs the check on the CPU at toy sizes")
    run_sections(args, SMOKE if args.smoke else GPU, SectionWriter(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
