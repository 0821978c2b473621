"""Serving benchmark through nginx on the native stack (``python -m app stack``), loopback only.

1. Trains one tiny model through the stack (``POST /train?wait=true``).
2. For 1, 2 and 3 API replicas, with micro-batching off (``PREDICT_MAX_BATCH=1``) and on, alternating:
   starts the stack, warms every replica, measures the raw model's batched forward throughput in this
   process (``Predictor.predict`` on batches of 32 of the same inputs) while the stack idles, then drives
   ``POST /predict`` (one BoolQ validation question + passage per request) through nginx from this process
   at a fixed concurrency for a fixed time: p50/p95/p99 latency, requests/s, served/raw ratio.
3. Submits N ``POST /train`` (tiny jobs) at the same moment, then polls every returned job id with
   ``GET /jobs/<id>`` until it is terminal: submit latency, succeeded/failed/lost, wall time.

    .venv/bin/python bench/serve_load.py [--quick] [--json] [--replicas 1,2,3] [--concurrency 8] [--duration 20]

With ``--compare PREDICT_MAX_PADDING=1.0,0.1`` (any setting) it instead starts one stack per value side by side
(same model, same replicas) and drives them in turn, several rounds, with requests of 32 validation pairs and of
one pair: medians per variant and their ratios to the first (``--model-dir`` serves a run folder you trained).
``--compare SERVE_BACKEND=torch,onnx,onnx-int8`` compares the serving backends so (``onnx-int8``: SERVE_BACKEND=onnx
with SERVE_QUANTIZE=int8; ``torch-fp32``: SERVE_PRECISION=fp32), and also measures each backend's raw
in-process pairs/s (batches of 32 and of 1) in this process with the replicas' thread count.

Every stack is stopped with SIGTERM before the script exits (the stack stops all its children).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/serve_load.py` from anywhere

from app.config import SAMPLE_DATA_DIR  # noqa: E402
from app.engine.boolq import load_boolq  # noqa: E402
from app.ops.stack import ask_replica, free_ports  # noqa: E402

MAX_LENGTH = 64
MODEL_JOB = {"model": "minilm", "train_limit": 32, "eval_limit": 8, "max_length": MAX_LENGTH, "epochs": 1}
TINY_JOB = {"model": "minilm", "train_limit": 8, "eval_limit": 4, "max_length": 32, "epochs": 1, "batch_size": 8}
TERMINAL = {"succeeded", "failed", "cancelled"}
RAW_BATCH_SIZE = 32
STACK_START_TIMEOUT_S = 300
STACK_STOP_TIMEOUT_S = 60
BATCH_WAIT_MS = 2
MAX_BATCH = 32


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def sample_pairs(n: int) -> list[tuple[str, str]]:
    """Real BoolQ validation questions and passages from the bundled sample."""
    return [(row.text, row.text_pair) for row in load_boolq(SAMPLE_DATA_DIR).val[:n]]


# --- the stack ----------------------------------------------------------------------------------------------


def stack_env(
    workdir: Path, max_batch: int, web_threads: int, torch_threads: int, extra: dict[str, str] | None = None
) -> dict[str, str]:
    return (
        os.environ
        | (extra or {})
        | {
            "ARTIFACTS_DIR": str(workdir / "artifacts"),
            "TRACKER": "none",
            "HF_HUB_OFFLINE": "1",
            "DEFAULT_MODEL": "minilm",
            "NUM_THREADS": str(torch_threads),  # torch intra-op threads in API processes and training jobs
            "WEB_THREADS": str(web_threads),
            "PREDICT_MAX_BATCH": str(max_batch),
            "PREDICT_BATCH_WAIT_MS": str(BATCH_WAIT_MS),
            # One address submits every job: lift the app's admission caps so the load is what is measured. nginx's
            # per-address burst on POST /train (20) still answers the rest of a larger burst 429 ("rejected").
            "MAX_QUEUED_JOBS": "1000",
            "MAX_JOBS_PER_CLIENT": "1000",
        }
    )


@contextlib.contextmanager
def native_stack(name: str, replicas: int, workers: int, env: dict[str, str], workdir: Path):
    """``python -m app stack`` as a user runs it; yields its stack.json; SIGTERM (then SIGKILL) at the end."""
    (port,) = free_ports(1)
    state_dir = workdir / f"stack-{name}"
    log_path = workdir / f"stack-{name}.log"
    argv = [sys.executable, "-m", "app", "stack", "--replicas", str(replicas), "--workers", str(workers)]
    argv += ["--port", str(port), "--state-dir", str(state_dir)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield wait_for_state(process, state_dir / "stack.json", log_path)
    finally:
        stop_stack(process)


def wait_for_state(process: subprocess.Popen, state_file: Path, log_path: Path) -> dict:
    deadline = time.monotonic() + STACK_START_TIMEOUT_S
    while not state_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"stack exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"stack not ready after {STACK_START_TIMEOUT_S} s; see {log_path}")
        time.sleep(0.25)
    return json.loads(state_file.read_text())


def stop_stack(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STACK_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()  # its children get SIGTERM from the kernel (PR_SET_PDEATHSIG)
        process.wait()


def replica_urls(state: dict) -> list[str]:
    return [child["url"] for child in state["children"] if child["role"] == "api"]


# --- /predict -----------------------------------------------------------------------------------------------


def train_model(url: str) -> str:
    """One tiny fine-tuning job through the stack; its job id names the model (a run folder in ARTIFACTS_DIR)."""
    response = requests.post(f"{url}/train?wait=true&timeout=600", json=MODEL_JOB, timeout=660)
    body = response.json()
    if response.status_code != 200 or body.get("status") != "succeeded":
        raise RuntimeError(f"training the benchmark model failed: {response.status_code} {body}")
    return body["job_id"]


def predict_bodies(pairs: list[tuple[str, str]], model: str) -> list[dict]:
    return [{"question": q, "passage": p, "model": model} for q, p in pairs]


def batch_bodies(pairs: list[tuple[str, str]], model: str, size: int) -> list[dict]:
    """Requests of ``size`` consecutive validation pairs (mixed lengths, as they come)."""
    windows = [pairs[i : i + size] for i in range(0, len(pairs) - size + 1, size)]
    return [{"items": [{"question": q, "passage": p} for q, p in window], "model": model} for window in windows]


def warm_up(state: dict, bodies: list[dict], concurrency: int) -> None:
    """Load the model in every replica (asked directly), then a round through nginx."""
    for url in replica_urls(state):
        for body in bodies[:3]:
            status, answer = ask_replica(url, "POST", "/predict", body, timeout=300)
            if status != 200:
                raise RuntimeError(f"warming up {url}: {status} {answer[:300]!r}")
    drive_predict(state["url"], bodies, concurrency, duration_s=2.0, max_requests=4 * concurrency)


def drive_predict(url: str, bodies: list[dict], concurrency: int, duration_s: float, max_requests: int) -> dict:
    """``concurrency`` client threads, one keep-alive session each, until ``duration_s`` or ``max_requests``."""
    numbers = itertools.count()
    latencies_ms: list[float] = []
    errors: Counter[str] = Counter()
    replicas: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s

    def client() -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                number = next(numbers)
                if number >= max_requests:
                    return
                started = time.perf_counter()
                try:
                    response = session.post(f"{url}/predict", json=bodies[number % len(bodies)], timeout=60)
                    outcome = "ok" if response.status_code == 200 else f"HTTP {response.status_code}"
                except requests.RequestException as exc:
                    response, outcome = None, type(exc).__name__
                elapsed_ms = (time.perf_counter() - started) * 1000
                with lock:
                    if outcome == "ok":
                        latencies_ms.append(elapsed_ms)
                        replicas[response.headers.get("X-Replica", "?")] += 1
                    else:
                        errors[outcome] += 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    return {
        "requests": len(latencies_ms),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "wall_s": round(wall_s, 2),
        "rps": round(len(latencies_ms) / wall_s, 2),
        "p50_ms": round(percentile(latencies_ms, 0.50), 1) if latencies_ms else None,
        "p95_ms": round(percentile(latencies_ms, 0.95), 1) if latencies_ms else None,
        "p99_ms": round(percentile(latencies_ms, 0.99), 1) if latencies_ms else None,
        "mean_ms": round(statistics.fmean(latencies_ms), 1) if latencies_ms else None,
        "requests_per_replica": sorted(replicas.values(), reverse=True),
    }


def batch_counters(state: dict) -> tuple[float, float]:
    """(pairs answered, forward passes) of the micro-batchers, summed over replicas (each replica's /metrics adds
    up its gunicorn workers)."""
    pairs = passes = 0.0
    for url in replica_urls(state):
        for line in ask_replica(url, "GET", "/metrics", timeout=10)[1].decode().splitlines():
            if line.startswith("boolq_predict_batch_size_sum "):
                pairs += float(line.split()[-1])
            elif line.startswith("boolq_predict_batch_size_count "):
                passes += float(line.split()[-1])
    return pairs, passes


def raw_throughput(predictor, pairs: list[tuple[str, str]], batch_size: int, seconds: float) -> float:
    """Examples/s of ``Predictor.predict`` (tokenize + forward) on batches of ``batch_size``, in this process."""
    batches = itertools.cycle([pairs[i : i + batch_size] for i in range(0, len(pairs) - batch_size + 1, batch_size)])
    predictor.predict(next(batches))
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        done += len(predictor.predict(next(batches)))
    return round(done / elapsed, 1)


def measure_predict(state: dict, predictor, pairs, model: str, options) -> dict:
    bodies = predict_bodies(pairs, model)
    warm_up(state, bodies, options.concurrency)
    raw = raw_throughput(predictor, pairs, RAW_BATCH_SIZE, options.raw_seconds)
    raw_one = raw_throughput(predictor, pairs, 1, options.raw_seconds)
    before = batch_counters(state)
    load_average = os.getloadavg()[0]
    load = drive_predict(state["url"], bodies, options.concurrency, options.duration, options.max_requests)
    after = batch_counters(state)
    passes = after[1] - before[1]
    return load | {
        "raw_batch32_examples_per_s": raw,
        "raw_batch1_examples_per_s": raw_one,
        "served_over_raw": round(load["rps"] / raw, 3),
        "mean_batch_size": round((after[0] - before[0]) / passes, 2) if passes else None,
        "load_average_1m": round(load_average, 1),
    }


# --- one setting, several values side by side -------------------------------------------------------------------------


# The serving backends by name, as the settings that choose them (``--compare SERVE_BACKEND=...``).
BACKEND_SETTINGS = {
    "torch": {"SERVE_BACKEND": "torch"},
    "torch-fp32": {"SERVE_BACKEND": "torch", "SERVE_PRECISION": "fp32"},
    "onnx": {"SERVE_BACKEND": "onnx"},
    "onnx-int8": {"SERVE_BACKEND": "onnx", "SERVE_QUANTIZE": "int8"},
}


def variant_settings(name: str, value: str) -> dict[str, str]:
    """The environment of one compared variant: ``name=value``, or a backend's settings by its name."""
    if name == "SERVE_BACKEND":
        return BACKEND_SETTINGS[value]
    return {name: value}


def raw_backends(options, model_dir: Path, pairs: list[tuple[str, str]], workdir: Path) -> list[dict]:
    """Each compared backend's raw pairs/s in this process (tokenize + forward), batches of 32 and of 1."""
    from app.config import Settings
    from app.service.predict import load_predictor
    from app.service.serve_backend import Backend

    rows = []
    for value in options.compare_values:
        env = {k.lower(): v for k, v in variant_settings("SERVE_BACKEND", value).items()}
        settings = Settings(artifacts_dir=workdir / "artifacts", num_threads=options.torch_threads, **env)
        predictor = load_predictor(model_dir, None, options.torch_threads, Backend.from_settings(settings))
        batch = raw_throughput(predictor, pairs, RAW_BATCH_SIZE, options.raw_seconds)
        rows.append({"backend": value, "raw_batch32_pairs_per_s": batch})
        rows[-1]["raw_batch1_pairs_per_s"] = raw_throughput(predictor, pairs, 1, options.raw_seconds)
        log(json.dumps(rows[-1]))
    return rows


def compare_setting(options, pairs: list[tuple[str, str]], workdir: Path) -> dict:
    """One stack per value of the compared setting, all up at once, driven in turn (rounds × variants × workloads)."""
    model_dir = Path(options.model_dir).resolve()
    extra = {"MODEL_ROOTS": str(model_dir.parent)}
    workloads = {
        f"batch{RAW_BATCH_SIZE}": (batch_bodies(pairs, model_dir.name, RAW_BATCH_SIZE), options.batch_concurrency),
        "single": (predict_bodies(pairs, model_dir.name), options.concurrency),
    }
    phases: list[dict] = []
    with contextlib.ExitStack() as stacks:
        states = {}
        for value in options.compare_values:
            env = stack_env(workdir, 1, options.web_threads, options.torch_threads, extra)
            env |= variant_settings(options.compare_name, value)
            log(f"stack: {options.replicas[0]} replica(s), {options.compare_name}={value}")
            states[value] = stacks.enter_context(native_stack(f"v-{value}", options.replicas[0], 1, env, workdir))
        for state in states.values():
            for bodies, concurrency in workloads.values():
                warm_up(state, bodies, concurrency)
        for round_ in range(options.rounds):  # alternating, so a change in the machine's load hits every variant
            for value, state in states.items():
                for workload, (bodies, concurrency) in workloads.items():
                    load_average = os.getloadavg()[0]
                    row = drive_predict(state["url"], bodies, concurrency, options.duration, options.max_requests)
                    phase = {"round": round_, "value": value, "workload": workload, "concurrency": concurrency}
                    phases.append(phase | row | {"load_average_1m": round(load_average, 1)})
                    log(json.dumps(phases[-1]))
    summary = compare_summary(phases, options)
    compared = {"setting": options.compare_name, "model_dir": str(model_dir), "phases": phases, "summary": summary}
    if options.compare_name == "SERVE_BACKEND":  # with the stacks down: the raw rates on an idle machine
        compared["raw"] = raw_backends(options, model_dir, pairs, workdir)
    return compared


def compare_summary(phases: list[dict], options) -> list[dict]:
    """Per workload and variant: medians over rounds of requests/s and latency, and ratios to the first variant."""
    rows = []
    for workload in dict.fromkeys(p["workload"] for p in phases):
        baseline = None
        for value in options.compare_values:
            mine = [p for p in phases if p["workload"] == workload and p["value"] == value]
            row = {"workload": workload, "value": value, "rounds": len(mine)}
            for key in ("rps", "p50_ms", "p95_ms"):
                row[key] = round(statistics.median(p[key] for p in mine if p[key] is not None), 2)
            row["errors"] = sum(p["errors"] for p in mine)
            row["load_average_1m"] = [min(p["load_average_1m"] for p in mine), max(p["load_average_1m"] for p in mine)]
            baseline = baseline or row
            row["rps_ratio"] = round(row["rps"] / baseline["rps"], 2)
            row["p50_ratio"] = round(baseline["p50_ms"] / row["p50_ms"], 2)  # > 1: faster than the first variant
            rows.append(row)
    return rows


# --- POST /train ----------------------------------------------------------------------------------------------


def drive_train(url: str, jobs: int, timeout_s: float) -> dict:
    """``jobs`` submissions released together, then every returned id polled until terminal (or timeout)."""
    release = threading.Barrier(jobs)

    def submit(_) -> tuple[float, int, str | None]:
        with requests.Session() as session:
            release.wait()
            started = time.perf_counter()
            try:
                response = session.post(f"{url}/train", json=TINY_JOB, timeout=60)
            except requests.RequestException:
                return (time.perf_counter() - started) * 1000, 0, None
            job_id = response.json().get("job_id") if response.status_code == 202 else None
            return (time.perf_counter() - started) * 1000, response.status_code, job_id

    started = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        submissions = list(pool.map(submit, range(jobs)))
    job_ids = [job_id for _, _, job_id in submissions if job_id]
    final, not_found = poll_jobs(url, job_ids, time.monotonic() + timeout_s)
    wall_s = time.perf_counter() - started
    latencies = [ms for ms, _, _ in submissions]
    statuses = Counter(final.values())
    unfinished = [job_id for job_id in job_ids if job_id not in final]
    return {
        "submitted": jobs,
        "accepted": len(job_ids),
        "rejected": jobs - len(job_ids),
        "submit_codes": dict(Counter(str(code) for _, code, _ in submissions)),
        "submit_p50_ms": round(percentile(latencies, 0.50), 1),
        "submit_p95_ms": round(percentile(latencies, 0.95), 1),
        "succeeded": statuses["succeeded"],
        "failed": statuses["failed"],
        "cancelled": statuses["cancelled"],
        "lost": len(set(unfinished) | not_found),
        "wall_s": round(wall_s, 1),
        "jobs_per_min": round(60 * len(final) / wall_s, 1),
    }


def poll_jobs(url: str, job_ids: list[str], deadline: float) -> tuple[dict[str, str], set[str]]:
    """Terminal status of each job id, and the ids ``GET /jobs/<id>`` ever answered 404 for."""
    final: dict[str, str] = {}
    not_found: set[str] = set()
    with requests.Session() as session:
        while len(final) < len(job_ids) and time.monotonic() < deadline:
            for job_id in job_ids:
                if job_id in final:
                    continue
                response = session.get(f"{url}/jobs/{job_id}", timeout=30)
                if response.status_code == 404:
                    not_found.add(job_id)
                elif response.status_code == 200 and response.json()["status"] in TERMINAL:
                    final[job_id] = response.json()["status"]
            time.sleep(1.0)
    return final, not_found


# --- the run --------------------------------------------------------------------------------------------------


def run(options) -> dict:
    import torch

    from app.service.predict import Predictor

    if options.torch_threads > 0:
        torch.set_num_threads(options.torch_threads)  # the raw model gets what each API process gets
    pairs = sample_pairs(200)
    results: dict = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/serve_load.py " + " ".join(sys.argv[1:]),
        "concurrency": options.concurrency,
        "duration_s": options.duration,
        "web_threads": options.web_threads,
        "torch_threads": options.torch_threads,
        "max_length": MAX_LENGTH,
        "batch_wait_ms": BATCH_WAIT_MS,
        "max_batch": MAX_BATCH,
        "predict": [],
    }
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if options.compare_values:
        return results | {"compare": compare_setting(options, pairs, workdir)}
    modes = [("off", 1), ("on", MAX_BATCH)] if not options.batching_only else [("on", MAX_BATCH)]
    model = predictor = None
    for replicas in options.replicas:
        for mode, max_batch in modes:
            env = stack_env(workdir, max_batch, options.web_threads, options.torch_threads)
            log(f"stack: {replicas} replica(s), micro-batching {mode}")
            with native_stack(f"r{replicas}-{mode}", replicas, 1, env, workdir) as state:
                if model is None:
                    log("training the benchmark model (POST /train?wait=true)")
                    model = train_model(state["url"])
                    predictor = Predictor(Path(state["artifacts_dir"]) / model)
                row = measure_predict(state, predictor, pairs, model, options)
            results["predict"].append({"replicas": replicas, "batching": mode} | row)
            log(json.dumps(results["predict"][-1]))
    if options.train_jobs:
        log(f"stack: 2 replicas, {options.train_workers} workers; {options.train_jobs} concurrent POST /train")
        env = stack_env(workdir, MAX_BATCH, options.web_threads, options.torch_threads)
        with native_stack("train", 2, options.train_workers, env, workdir) as state:
            results["train"] = drive_train(state["url"], options.train_jobs, options.train_timeout)
            results["train"] |= {"workers": options.train_workers, "replicas": 2, "job": TINY_JOB}
    return results


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load} at start"


def log(message: str) -> None:
    print(f"[serve_load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def print_compare_table(results: dict) -> None:
    print(f"# {results['date']} - {results['machine']}")
    print(f"# {results['command']}")
    header = f"| workload | {results['compare']['setting']} | rounds | req/s | p50 ms | p95 ms | errors |"
    print(header + " req/s ratio | p50 ratio | load 1m |")
    print("|" + "---|" * 10)
    for row in results["compare"]["summary"]:
        cells = [row["workload"], row["value"], row["rounds"], row["rps"], row["p50_ms"], row["p95_ms"]]
        cells += [row["errors"], row["rps_ratio"], row["p50_ratio"], "-".join(map(str, row["load_average_1m"]))]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if results["compare"].get("raw"):
        print("\n| backend | raw pairs/s, batch 32 (in process) | raw pairs/s, batch 1 |\n|---|---|---|")
        for row in results["compare"]["raw"]:
            print(f"| {row['backend']} | {row['raw_batch32_pairs_per_s']} | {row['raw_batch1_pairs_per_s']} |")


def print_table(results: dict) -> None:
    if "compare" in results:
        return print_compare_table(results)
    print(f"# {results['date']} - {results['machine']}")
    print(f"# {results['command']}")
    print(
        f"# /predict: 1 item, max_length {results['max_length']}, concurrency {results['concurrency']}, "
        f"{results['duration_s']} s per row, {results['web_threads']} gunicorn threads per replica, "
        f"{results['torch_threads']} torch thread(s) per process"
    )
    header = "| replicas | batching | requests | errors | req/s | p50 ms | p95 ms | p99 ms | mean batch |"
    header += " raw b32 ex/s | raw b1 ex/s | served/raw | load 1m |"
    print(header)
    print("|" + "---|" * 13)
    for row in results["predict"]:
        cells = [row["replicas"], row["batching"], row["requests"], row["errors"], row["rps"], row["p50_ms"]]
        cells += [row["p95_ms"], row["p99_ms"], row["mean_batch_size"] or "-", row["raw_batch32_examples_per_s"]]
        cells += [row["raw_batch1_examples_per_s"], row["served_over_raw"], row["load_average_1m"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if "train" in results:
        t = results["train"]
        print()
        print(
            f"# POST /train x {t['submitted']} at once ({t['replicas']} replicas, {t['workers']} workers, "
            f"job {json.dumps(t['job'])})"
        )
        header = "| submitted | accepted | submit p50 ms | submit p95 ms | succeeded | failed | lost |"
        print(header + " wall s | jobs/min |")
        print("|" + "---|" * 9)
        cells = [t["submitted"], t["accepted"], t["submit_p50_ms"], t["submit_p95_ms"], t["succeeded"]]
        cells += [t["failed"], t["lost"], t["wall_s"], t["jobs_per_min"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 s per load, 10 training jobs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--replicas", default="1,2,3", help="comma-separated replica counts (default: 1,2,3)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default: 8)")
    parser.add_argument("--duration", type=float, help="seconds of load per row (default: 20, quick: 8)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap on requests per row")
    parser.add_argument("--raw-seconds", type=float, help="seconds per raw-throughput measurement (default: 5)")
    parser.add_argument("--web-threads", type=int, help="gunicorn threads per replica (default: --concurrency)")
    threads_help = "NUM_THREADS of the API processes, also used for the raw model (default: 1; 0: torch's default)"
    parser.add_argument("--torch-threads", type=int, default=1, help=threads_help)
    parser.add_argument("--batching-only", action="store_true", help="skip the rows with micro-batching off")
    parser.add_argument("--train-jobs", type=int, help="concurrent POST /train (default: 50, quick: 10; 0 skips)")
    parser.add_argument("--train-workers", type=int, default=2, help="RQ workers for the training load (default: 2)")
    parser.add_argument("--train-timeout", type=float, default=900, help="seconds to wait for all jobs to end")
    compare_help = "SETTING=V1,V2: one stack per value side by side, e.g. PREDICT_MAX_PADDING=1.0,0.1 (first: baseline)"
    parser.add_argument("--compare", help=compare_help)
    parser.add_argument("--model-dir", help="with --compare: the fine-tuned run folder to serve")
    parser.add_argument("--rounds", type=int, default=3, help="with --compare: alternations (default: 3)")
    parser.add_argument("--batch-concurrency", type=int, default=2, help="client threads for 32-pair requests")
    parser.add_argument("--save", help="also write the JSON object to this file")
    parser.add_argument("--workdir", help="keep artifacts, stack state and logs here (default: a temporary folder)")
    options = parser.parse_args()
    options.replicas = [int(n) for n in options.replicas.split(",")]
    options.compare_name, _, values = (options.compare or "").partition("=")
    options.compare_values = values.split(",") if values else []
    unknown = set(options.compare_values) - set(BACKEND_SETTINGS)
    if options.compare_name == "SERVE_BACKEND" and unknown:
        parser.error(f"--compare SERVE_BACKEND=: {', '.join(sorted(unknown))} not among {', '.join(BACKEND_SETTINGS)}")
    if options.compare and (len(options.compare_values) < 2 or not options.model_dir):
        parser.error("--compare needs SETTING=V1,V2 and --model-dir (a run folder, e.g. from `python -m app train`)")
    options.duration = options.duration or (8.0 if options.quick else 20.0)
    options.raw_seconds = options.raw_seconds or (3.0 if options.quick else 5.0)
    options.web_threads = options.web_threads or options.concurrency
    if options.train_jobs is None:
        options.train_jobs = 10 if options.quick else 50
    return options


def main() -> None:
    options = parse_args()
    with contextlib.ExitStack() as cleanup:
        if options.workdir is None:
            options.workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="serve-load-"))
        results = run(options)
    if options.save:
        Path(options.save).write_text(json.dumps(results, indent=2))
    if options.json:
        print(json.dumps(results))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
