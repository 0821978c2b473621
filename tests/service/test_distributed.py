"""Training one model on several processes (DDP through torchrun): on CPU, 2 processes × 1 thread, as in CI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.config import SAMPLE_DATA_DIR, Settings
from tests.helpers import LONG_JOB, REPO_ROOT, TINY_JOB, service_settings, settings_env, wait_for

# 64 rows (57 train, 7 dev), batches of 8 split 4 + 4 over 2 ranks, then a last batch of 1 (one rank computes
# it, the other a row weighing nothing), 3 epochs: 24 steps.
EQUIVALENCE = dict(batch_size=8, lr=3e-4, epochs=3, max_length=64, train_limit=64, eval_limit=32, seed=3)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A small randomly initialised BERT saved as a local model folder, with minilm's tokenizer, dropout off.

    Dropout off because each rank draws its own dropout masks: with dropout two ranks cannot reproduce the
    masks one process draws for the whole batch, and the loss curves would differ by the noise, not the code."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from app.engine.model_names import minilm_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_cli(args: list[str], output_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m app train ARGS --json`` in a child process (1 thread per process); the process and its wall time."""
    # DEVICE=cpu: these are gloo runs of 2 ranks; on a 1-GPU host `auto` would pick CUDA and refuse the second rank.
    settings = Settings().model_copy(update=dict(tracker="none", num_threads=1, artifacts_dir=output_dir, device="cpu"))
    env = settings_env(settings) | {"DATA_DIR": str(SAMPLE_DATA_DIR)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "app", "train", *args, "--json"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, time.perf_counter() - started


def as_options(params: dict) -> list[str]:
    return [part for name, value in params.items() for part in (f"--{name.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def one_and_two_processes(tiny_bert, tmp_path_factory):
    """The same run (same global batch, seed and data) on 1 process and on 2 ranks."""
    runs = {}
    for devices in (1, 2):
        output_dir = tmp_path_factory.mktemp(f"devices-{devices}")
        done, wall_s = train_cli(as_options(EQUIVALENCE | dict(model=tiny_bert, devices=devices)), output_dir)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[devices] = (json.loads(done.stdout), output_dir, wall_s, done.stderr)
    return runs


def test_two_processes_train_one_model_and_rank_zero_alone_writes_the_run_folder(one_and_two_processes):
    result, output_dir, _, stderr = one_and_two_processes[2]
    assert result["params"]["devices"] == 2
    assert "rank 0 of 2" in stderr and "rank 1 of 2" in stderr
    assert [p.name for p in output_dir.iterdir()] == [result["run_id"]]  # one run folder, not one per rank
    run_dir = output_dir / result["run_id"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json", "model", "params.json", "predictions.jsonl"]
    assert json.loads((run_dir / "params.json").read_text())["devices"] == 2
    rows = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == result["n_eval"] == EQUIVALENCE["eval_limit"]


def test_two_processes_follow_the_loss_curve_of_one_process_on_the_same_global_batch(one_and_two_processes):
    one, one_dir, one_s, _ = one_and_two_processes[1]
    two, two_dir, two_s, _ = one_and_two_processes[2]
    curve_1, curve_2 = one["metrics"]["loss_curve"], two["metrics"]["loss_curve"]
    assert len(curve_1) == len(curve_2) == 24
    max_diff = max(abs(a - b) for a, b in zip(curve_1, curve_2, strict=True))
    p_1, p_2 = (probabilities(folder / run["run_id"]) for folder, run in ((one_dir, one), (two_dir, two)))
    p_diff = max(abs(a - b) for a, b in zip(p_1, p_2, strict=True))
    print(
        f"\n1 process vs 2: max loss diff {max_diff:.2e}, max val P(yes) diff {p_diff:.2e}, "
        f"accuracy {one['accuracy']:.4f} vs {two['accuracy']:.4f}, "
        f"dev {one['metrics']['dev_accuracy_per_epoch']} vs {two['metrics']['dev_accuracy_per_epoch']}, "
        f"wall {one_s:.1f} s vs {two_s:.1f} s (training {one['metrics']['timings_s']['train']:.1f} s vs "
        f"{two['metrics']['timings_s']['train']:.1f} s)"
    )
    assert max_diff < 1e-3 and p_diff < 1e-3
    assert curve_1[-1] < curve_1[0] - 0.01  # it learned something, so the match means something
    assert two["accuracy"] == one["accuracy"]
    assert two["metrics"]["dev_accuracy_per_epoch"] == one["metrics"]["dev_accuracy_per_epoch"]


def probabilities(run_dir: Path) -> list[float]:
    return [json.loads(line)["probability"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def test_more_devices_than_the_machine_has_is_refused_before_any_process_starts(tmp_path):
    done, _ = train_cli(["--devices", "64", "--model", "minilm"], tmp_path)
    assert done.returncode == 2
    assert "--devices: 64 devices asked, this machine has" in done.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # torchrun and two ranks start
def test_a_failing_rank_fails_the_command(tmp_path):
    done, _ = train_cli(["--devices", "2", "--model", str(tmp_path / "no-such-model")], tmp_path)
    assert done.returncode != 0
    assert "does not exist" in done.stderr and done.stdout == ""


def test_share_of_batch_gives_each_rank_a_slice_weighted_to_the_whole_batch_mean(monkeypatch):
    from app.engine import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shares = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.share_of_batch(list(range(10, 17))))  # 7 rows over 3 ranks
    assert [indices for indices, _ in shares] == [[10, 11], [12, 13], [14, 15, 16]]
    assert sum(weight for _, weight in shares) == pytest.approx(3)  # DDP divides the sum by 3: the batch mean
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert distributed.share_of_batch([5, 6]) == ([5], 0.0)  # fewer rows than ranks: one row, weighing nothing


def test_a_job_over_max_devices_is_422_naming_devices(redis_url, tmp_path):
    from app.api import create_app

    client = create_app(service_settings(redis_url, tmp_path)).test_client()  # MAX_DEVICES: 1 by default
    response = client.post("/train", json=TINY_JOB | {"devices": 2})
    error = response.get_json()["error"]
    assert response.status_code == 422 and set(error["fields"]) == {"devices"}
    assert "MAX_DEVICES" in error["fields"]["devices"]
    client = create_app(service_settings(redis_url, tmp_path, max_devices=2)).test_client()
    assert client.post("/train", json=TINY_JOB | {"devices": 2}).status_code == 202  # no worker: stays queued
    assert client.post("/train", json=TINY_JOB | {"devices": 3}).status_code == 422


@pytest.fixture(scope="module")
def service(launcher, redis_url, tmp_path_factory):
    """A real worker, and the API in this process told that workers give up to 64 devices."""
    from app.api import create_app

    settings = service_settings(redis_url, tmp_path_factory.mktemp("ddp-jobs"), max_devices=64, device="cpu")
    launcher.worker(settings)
    return settings, create_app(settings).test_client()


def ended(client, job_id: str, timeout_s: float = 240) -> dict:
    def final():
        view = client.get(f"/jobs/{job_id}").get_json()
        return view if view["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(final, timeout_s, f"job {job_id} to end", interval_s=0.5)


def test_a_job_on_two_devices_runs_as_two_ranks_and_reports_like_a_one_device_job(service):
    from app.api.schemas import JobView

    settings, client = service
    one = ended(client, client.post("/train", json=TINY_JOB).get_json()["job_id"])
    two = ended(client, client.post("/train", json=TINY_JOB | {"devices": 2}).get_json()["job_id"])
    assert two["status"] == "succeeded", two["error"]
    JobView.model_validate(two)
    assert two["params"]["devices"] == 2
    assert two["progress"]["step"] == two["progress"]["total_steps"] == one["progress"]["total_steps"]
    assert two["progress"]["dev_accuracy"] is not None
    assert set(two["result"]) == set(one["result"]) and two["result"]["n_eval"] == TINY_JOB["eval_limit"]
    assert two["result"]["model"] == two["job_id"]
    run_dir = settings.artifacts_dir / two["job_id"]
    assert (run_dir / "metrics.json").is_file() and not (run_dir / "training_state.pt").exists()
    predictions = client.get(f"/jobs/{two['job_id']}/predictions").get_json()["predictions"]
    assert len(predictions) == TINY_JOB["eval_limit"]


def test_a_job_asking_more_devices_than_its_worker_has_fails_saying_so(service):
    _, client = service
    final = ended(client, client.post("/train", json=TINY_JOB | {"devices": 64}).get_json()["job_id"], 60)
    assert final["status"] == "failed"
    assert final["error"]["type"] == "DevicesNotAvailable"
    assert "64 devices asked, this machine has" in final["error"]["message"]


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (a job's ranks name its id)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # it ended meanwhile
            pass
    return pids


def test_cancelling_a_two_device_job_stops_every_rank(service):
    _, client = service
    job_id = client.post("/train", json=LONG_JOB | {"devices": 2}).get_json()["job_id"]

    def running_with_progress():
        view = client.get(f"/jobs/{job_id}").get_json()
        return view["status"] == "running" and view["progress"]

    wait_for(running_with_progress, 240, f"job {job_id} to report progress", interval_s=0.5)
    assert len(processes_naming(job_id)) >= 2  # torchrun and its ranks
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
    wait_for(lambda: not processes_naming(job_id), 20, "every rank of the cancelled job to exit")
