"""The training benchmark: all three sides really train, and the script prints one JSON object with the ratios."""

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from app.config import PROJECT_ROOT, SAMPLE_DATA_DIR
from bench.step_ablation import run_variant
from bench.train_speed import (
    BenchConfig,
    best_peaks,
    engine_padded_tokens,
    format_table,
    load_model,
    load_rows,
    summarize,
)
from bench.tutorial_loop import encode_padded, train_tutorial

TINY = BenchConfig(
    data_dir=str(SAMPLE_DATA_DIR),
    train_rows=20,
    dev_size=0.2,
    max_length=32,
    batch_size=8,
    lr=1e-4,
    eps=1e-8,
    epochs=1,
    seed=3,
    threads=0,
    model_size="minilm",
)
PEAKS = {
    "fp32": {"n": 256, "gflops": 100.0},
    "bf16": {"n": 256, "gflops": 1.0},
    "fp32_model_shapes": {"n": 4096, "gflops": 50.0},
}


def in_fresh_process(code: str):
    """Run bench code in its own process and return what it prints as JSON: the engine side sets process-wide
    allocator options (heap reuse) that would otherwise stay with the test process and inflate its memory."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    config = repr(asdict(TINY))
    return in_fresh_process(
        "import json\n"
        "from bench.train_speed import BenchConfig, run_baseline, run_engine, run_trainer\n"
        f"config = BenchConfig(**{config})\n"
        "print(json.dumps([run_baseline(config), run_trainer(config), run_engine(config)]))\n"
    )


def test_all_sides_train_the_same_rows(runs):
    baseline, trainer, engine = runs
    for run in runs:
        assert run["n_train"] == 16 and run["n_dev"] == 4
        assert run["examples_per_s"] > 0 and run["examples_per_s_excl_tokenization"] >= run["examples_per_s"]
        assert 0 <= run["dev_accuracy"] <= 1
        assert 0 < run["dev_eval_s"] < run["train_s"]
        assert 0 < run["real_tokens"] <= run["padded_tokens"]
        assert run["useful_gflops"] > 0 and run["peak_rss_mb"] > 100
    assert baseline["real_tokens"] == engine["real_tokens"] == trainer["real_tokens"]  # one epoch, the same rows
    assert trainer["padded_tokens"] <= baseline["padded_tokens"]  # the Trainer pads dynamically (all rows hit 32 here)
    assert baseline["padded_tokens"] == 16 * TINY.max_length  # the tutorial pads every example to max_length


def test_summary_reports_ratios_and_targets(runs):
    summary = summarize(TINY, runs, PEAKS, machine={"cpu": "test"})
    for key in ("baseline_examples_per_s", "trainer_examples_per_s", "engine_examples_per_s", "trainer_dev_accuracy"):
        assert key in summary
    assert summary["speedup"] == pytest.approx(summary["engine_examples_per_s"] / summary["baseline_examples_per_s"])
    assert summary["speedup_target_met"] == (summary["speedup"] >= 3.0)
    assert summary["speedup_vs_trainer"] == pytest.approx(
        summary["engine_examples_per_s"] / summary["trainer_examples_per_s"]
    )
    assert summary["speedup_vs_trainer_target_met"] == (summary["speedup_vs_trainer"] >= 2.0)
    assert 0 <= summary["trainer_dev_accuracy"] <= 1
    fp32_side = next(side for side in ("baseline", "trainer", "engine") if summary[f"{side}_precision"] == "fp32")
    assert summary[f"{fp32_side}_useful_pct_of_model_shape_peak"] == pytest.approx(
        2 * summary[f"{fp32_side}_useful_pct_of_peak"]  # the model-shape peak (50) is half the square one (100)
    )
    assert "speedup" in format_table(summary)
    json.dumps(summary)


@pytest.mark.slow
def test_tutorial_loop_updates_the_weights():
    config = replace(TINY, model_size="tiny")
    torch.manual_seed(0)
    tokenizer, model = load_model(config)
    train_rows, dev_rows = load_rows(config)
    before = [p.detach().clone() for p in model.parameters()]
    result = train_tutorial(
        model,
        encode_padded(tokenizer, train_rows, 32),
        encode_padded(tokenizer, dev_rows, 32),
        batch_size=8,
        lr=1e-3,
        eps=1e-8,
        epochs=1,
    )
    assert len(result.losses) == 2 and all(loss == loss for loss in result.losses)  # 16 rows / 8, no NaN
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_engine_padded_tokens_counts_batch_widths():
    lengths = [5, 9, 3, 7]
    assert engine_padded_tokens(lengths, batch_size=1, seed=0, epochs=2) == 2 * sum(lengths)
    assert engine_padded_tokens(lengths, batch_size=4, seed=0, epochs=1) == 4 * 9


@pytest.mark.slow
def test_script_prints_one_json_object():
    command = [
        sys.executable,
        "bench/train_speed.py",
        "--json",
        "--model-size=tiny",
        "--train-rows=20",
        "--max-length=32",
        "--epochs=1",
        "--repeats=1",
        "--matmul-size=128",
        f"--data-dir={SAMPLE_DATA_DIR}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["baseline_examples_per_s"] > 0 and summary["engine_examples_per_s"] > 0
    assert summary["trainer_examples_per_s"] > 0 and summary["speedup_vs_trainer"] > 0
    assert summary["speedup"] > 0 and [r["side"] for r in summary["runs"]] == ["baseline", "trainer", "engine"]
    assert summary["matmul_peak_gflops"]["fp32"] > 0 and summary["matmul_peak_gflops"]["bf16"] > 0


def test_model_shape_peak_times_a_layers_forward_and_backward_matmuls():
    from bench.train_speed import layer_matmul_gflops

    peak = layer_matmul_gflops(torch.float32, "tiny", repeats=1)
    assert peak["n"] == 4096 and peak["gflops"] > 0


def test_peak_is_the_best_measurement_per_dtype():
    before = {"fp32": {"n": 2048, "gflops": 50.0}, "bf16": {"n": 512, "gflops": 1.0}}
    after = {"fp32": {"n": 2048, "gflops": 150.0}, "bf16": {"n": 512, "gflops": 0.5}}
    assert best_peaks(before, after) == {"fp32": after["fp32"], "bf16": before["bf16"]}


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "allocator"), [("engine", "jemalloc"), ("without jemalloc", "glibc")])
def test_step_ablation_times_real_training_steps_with_each_variants_allocator(variant, allocator):
    args = argparse.Namespace(rows=100, steps=2, threads=0, data_dir=str(SAMPLE_DATA_DIR), trim_above_mb=0)
    run = run_variant(variant, args)  # in its own process, as the script runs each variant
    assert len(run["seconds"]) == 2 and all(s > 0 for s in run["seconds"]) and run["peak_rss_mb"] > 100
    assert run["allocator"] == allocator


# What the GPU machine has: these distributions and what they require, nothing else (no datasets, mlflow, redis,
# accelerate, nor minilm's package: the model comes as a folder).
GPU_MACHINE_PACKAGES = ("torch", "transformers", "numpy", "scikit-learn", "tqdm", "pydantic", "pydantic-settings")


def requirement_closure(roots: tuple[str, ...]) -> list:
    """The installed distributions ``roots`` need, transitively (extras left out)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = {}, [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            seen[name] = dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a platform-specific requirement this machine does not install
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return list(seen.values())


def python_with_only(roots: tuple[str, ...], folder) -> str:
    """A venv whose site-packages links only the files of ``roots`` and their requirements; its python."""
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True
        ).stdout.strip()
    )
    source = Path(sysconfig.get_path("purelib"))
    for dist in requirement_closure(roots):
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            if top != ".." and (source / top).exists() and not (site / top).exists():
                (site / top).symlink_to(source / top)
    return str(python)


@pytest.mark.slow
def test_gpu_check_runs_every_section_where_only_the_gpu_machines_packages_are(tmp_path):
    from transformers import AutoTokenizer

    from app.engine.model_names import resolve_model
    from tests.helpers import save_tiny_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    model_folder = save_tiny_checkpoint(tmp_path / "tiny-minilm", torch.float16, len(tokenizer))  # like the fp16 copy
    tokenizer.save_pretrained(model_folder)
    python = python_with_only(GPU_MACHINE_PACKAGES, tmp_path / "venv")
    command = [python, "bench/gpu_check.py", "--smoke", "--sweep", "--model", str(model_folder)]
    command += ["--data-dir", str(SAMPLE_DATA_DIR), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    sections = ["machine", "peak", "full_run", "probe", "sides", "sweep", "report"]
    assert [line["section"] for line in lines] == sections  # each on its own line, as it ended
    for line in lines:  # and in its own file, so a run killed at its time limit keeps what it measured
        assert json.loads((tmp_path / "out" / f"gpu-check-{line['section']}.json").read_text()) == line["value"]
    report = lines[-1]["value"]
    assert report["peak"]["tflops"] > 0
    assert 0 <= report["full_run"]["val_accuracy"] <= 1 and report["full_run"]["wall_s"] > 0
    assert report["full_run"]["train_examples_per_s"] > 0
    for side in ("tracking_off", "tracking_on"):
        assert len(report["probe"][side]["step_ms_per_epoch"]) == 2  # first and steady epoch
        assert report["probe"][side]["whole_run_examples_per_s"] > 0
    steady = report["probe"]["steady_state"]
    assert report["probe"]["shapes_warmed"] >= 1 and steady["steps"] == report["probe"]["steps_per_epoch"]
    assert steady["examples_per_s"] > 0 and steady["cpu_ms_per_step"] > 0
    assert steady["gpu_span_ms_per_step"] is None and report["probe"]["gpu_busy_ms_per_step"] is None  # GPU figures
    assert report["probe"]["tracking_on"]["tracker"].startswith("recording")  # no mlflow there
    assert report["probe"]["syncs_per_step"] is None  # a GPU figure
    runs = report["sides"]["minilm"]["runs"]
    assert runs["engine"]["examples_per_s"] > 0 and runs["baseline"]["examples_per_s"] > 0
    assert "accelerate" in runs["trainer"]["error"]  # the Trainer needs it; the check says so and goes on
    assert len(report["sweep"]["leaderboard"]) == 2
    assert set(report["goals"]) >= {"minilm_examples_per_s_ge_5000", "cli_wall_le_20_s"}


def test_the_trainer_gets_the_engines_eval_batch_and_on_a_gpu_two_loader_workers(tmp_path):
    from app.engine.evaluation import DEVICE_EVAL_BATCH_SIZE, EVAL_BATCH_SIZE
    from bench.trainer_peer import training_arguments

    recipe = dict(batch_size=32, lr=1e-4, eps=1e-8, epochs=1, seed=42, bf16=False)
    on_gpu = training_arguments(str(tmp_path), **recipe, device="cuda")
    assert on_gpu.per_device_eval_batch_size == DEVICE_EVAL_BATCH_SIZE and on_gpu.dataloader_num_workers == 2
    on_cpu = training_arguments(str(tmp_path), **recipe, device="cpu")
    assert on_cpu.per_device_eval_batch_size == EVAL_BATCH_SIZE and on_cpu.dataloader_num_workers == 0


def test_gpu_idle_share_counts_the_gaps_between_kernels():
    from bench.gpu_check import busy_time, idle_share

    assert busy_time([(0, 4), (2, 5), (8, 10), (8.5, 9)]) == 7  # overlaps and nested kernels counted once
    assert idle_share([]) is None
    assert idle_share([(0, 10)]) == 0.0
    assert idle_share([(0, 4), (2, 5), (8, 10)]) == pytest.approx(0.3)  # busy 0-5 and 8-10 of 0-10
