import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    "args, option",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "abc"], "--lr"),
        (["--eps", "1"], "--eps"),
        (["--epochs", "2.5"], "--epochs"),
        (["--max-length", "8"], "--max-length"),
        (["--keep-best-epoch", "maybe"], "--keep-best-epoch"),
    ],
)
def test_bad_option_is_one_line_naming_it_exit_2(args, option):
    proc = run_cli("train", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0]


def test_unknown_option_exit_2():
    proc = run_cli("train", "--label-smoothing", "1")
    assert proc.returncode == 2 and "--label-smoothing" in proc.stderr


def test_help_shows_defaults_and_ranges_without_loading_torch():
    probe = (
        "import sys, contextlib, io\n"
        "from app.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    main(['train', '--help'])\n"
        "print(out.getvalue())\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert "torch loaded: False" in proc.stdout
    help_text = " ".join(proc.stdout.split())
    assert "AdamW learning rate. (default: 5e-05; > 0, ≤ 1)" in help_text
    assert "--learning-rate" in help_text and "--num-train-epochs" in help_text


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--keep-best-epoch"], {"keep_best_epoch": True}),
        (["--keep-best-epoch", "false"], {"keep_best_epoch": False}),
        (["--keep-best-epoch", "true", "--epochs", "3"], {"keep_best_epoch": True, "epochs": 3}),
        (
            ["--learning-rate", "1e-4", "--num-train-epochs", "3", "--model-name-or-path", "minilm"],
            {"lr": 1e-4, "epochs": 3, "model": "minilm"},
        ),
        (["--per-device-train-batch-size", "8", "--adam-epsilon", "1e-6"], {"batch_size": 8, "eps": 1e-6}),
        # per device, as in TrainingArguments and POST /train: the step's batch is it x --devices
        (["--per-device-train-batch-size", "8", "--devices", "2"], {"batch_size": 16, "devices": 2}),
    ],
)
def test_boolean_flags_and_hugging_face_spellings(argv, expected):
    from app.cli import build_parser, parse_train_params

    params = parse_train_params(build_parser().parse_args(["train", *argv]))
    assert {name: getattr(params, name) for name in expected} == expected


def test_offline_default_model_fails_fast(tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli("train", "--train-limit", "8", "--output-dir", str(tmp_path), env=env)
    assert proc.returncode == 1
    assert "minilm" in proc.stderr and "--model PATH" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_json_then_predict(tmp_path):
    """With the default tracker, as users run it: MLflow's store sits in ARTIFACTS_DIR beside the run folders."""
    import os

    env = {**os.environ, "ARTIFACTS_DIR": str(tmp_path)}
    proc = run_cli(
        "train", "--model", "minilm", "--train-limit", "16", "--eval-limit", "6", "--max-length", "32",
        "--epochs", "1", "--batch-size", "8", "--json", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("accuracy", "predictions", "n_eval", "dev_accuracy", "run_dir", "params"):
        assert key in out
    assert out["n_eval"] == len(out["predictions"]) == 6 and set(out["predictions"]) <= {0, 1}
    assert out["params"]["model"] == "minilm"
    assert out["metrics"]["allocator"] == "jemalloc"  # the default: the command restarted itself with it preloaded

    proc = run_cli(
        "predict", "--model-dir", out["run_dir"], "--question", "is the sky blue", "--passage", "Sky -- blue"
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["label"] in ("no", "yes") and 0.5 <= answer["score"] <= 1
    run_id = Path(out["run_dir"]).name
    for model in ("latest", run_id):  # the newest run, by name, with the tracking store beside the run folders
        again = run_cli(
            "predict", "--model", model, "--question", "is the sky blue", "--passage", "Sky -- blue", env=env
        )
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout) == answer


def test_predict_with_a_folder_that_is_not_a_model(tmp_path):
    proc = run_cli("predict", "--model-dir", str(tmp_path), "--question", "q", "--passage", "p")
    assert proc.returncode == 2 and "--model" in proc.stderr


def test_predict_latest_without_any_run_names_the_folder(tmp_path):
    import os

    env = {**os.environ, "ARTIFACTS_DIR": str(tmp_path)}
    proc = run_cli("predict", "--model", "latest", "--question", "q", "--passage", "p", env=env)
    assert proc.returncode == 2 and "no finished run under" in proc.stderr


def test_boolean_options_read_true_and_false():
    from app.cli import build_parser, parse_train_params

    parse = build_parser().parse_args
    assert parse_train_params(parse(["train", "--keep-best-epoch", "true"])).keep_best_epoch is True
    assert parse_train_params(parse(["train", "--keep-best-epoch", "No"])).keep_best_epoch is False


def test_an_unknown_device_is_one_line_naming_device_and_writes_nothing(tmp_path):
    import os

    env = {**os.environ, "DEVICE": "tpu", "ARTIFACTS_DIR": str(tmp_path)}
    proc = run_cli("train", "--model", "minilm", "--tracker", "none", env=env)
    assert proc.returncode == 1
    assert "DEVICE='tpu'" in proc.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_cannot_load_its_model_leaves_no_run_folder(tmp_path):
    import os

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a folder that looks like a checkpoint but holds no model
    env = {**os.environ, "ARTIFACTS_DIR": str(tmp_path / "runs")}
    proc = run_cli("train", "--model", str(broken), "--train-limit", "8", "--tracker", "none", env=env)
    assert proc.returncode != 0
    assert list((tmp_path / "runs").glob("*/params.json")) == []


def test_train_on_a_json_lines_file_with_integer_labels_from_the_cli(tmp_path):
    """A single-text set of our own (BoolQ's questions, label = the answer as an integer): --data and the mapping."""
    from app.config import SAMPLE_DATA_DIR
    from app.engine.boolq import load_boolq

    rows = load_boolq(SAMPLE_DATA_DIR).train[:80]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"q": r.text, "answer": r.label}) + "\n" for r in rows))
    proc = run_cli(
        "train", "--model", "minilm", "--data", str(path), "--text-column", "q", "--label-column", "answer",
        "--epochs", "1", "--max-length", "32", "--tracker", "none", "--output-dir", str(tmp_path / "runs"), "--json",
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["metrics"]["label_names"] == ["0", "1"] and out["n_eval"] == 8  # 10 % held out as val
    assert len(out["params"]["dataset"]) == 16 and out["params"]["text_column"] == "q"
    config = json.loads((Path(out["run_dir"]) / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}
    asked = run_cli(
        "predict", "--model", out["run_dir"], "--text", "is the sky blue", env=os.environ | {"HF_HUB_OFFLINE": "1"}
    )
    assert asked.returncode == 0 and json.loads(asked.stdout)["label"] in ("0", "1"), asked.stderr[-2000:]


@pytest.mark.parametrize(
    "train, val, args, words",
    [
        ("text,label\na,x\nb,y\n", None, ["--label-column", "lable"], ["'lable'", "text, label"]),
        ("text,label\na,x\nb,y\nc,x\nd,y\n", "text,label\ne,z\n", [], ["val.csv: row 1 (line 2)", "'z'", "train"]),
        ("text,label\na,x\n,y\n", None, [], ["row 2 (line 3)", "empty text"]),
    ],
    ids=["misspelled column", "val label unseen in train", "empty text"],
)
def test_bad_data_from_the_cli_is_exit_2_naming_file_and_line_before_a_model_loads(tmp_path, train, val, args, words):
    (tmp_path / "train.csv").write_text(train)
    extra = ["--val-data", str(tmp_path / "val.csv")] if val else []
    if val:
        (tmp_path / "val.csv").write_text(val)
    proc = run_cli(
        "train", "--model", "bert-base-uncased", "--data", str(tmp_path / "train.csv"), *extra, *args,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    for word in words:
        assert word in proc.stderr, proc.stderr[-2000:]


def test_keys_create_list_and_revoke_from_the_command_line(redis_url, tmp_path):
    from app.api import create_app
    from tests.helpers import TINY_JOB, service_settings, settings_env

    settings = service_settings(redis_url, tmp_path)
    env = os.environ | settings_env(settings)
    created = run_cli("keys", "create", "--name", "ci-bot", "--role", "trainer", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("bq_") and len(key) > 40
    listed = run_cli("keys", "list", env=env)
    assert listed.returncode == 0 and listed.stdout.startswith("ci-bot  trainer  created 20"), listed.stdout
    assert "last used never" in listed.stdout and key not in listed.stdout
    client = create_app(settings).test_client()
    job_id = client.post("/train", json=TINY_JOB, headers={"Authorization": f"Bearer {key}"}).get_json()["job_id"]
    assert "last used 20" in run_cli("keys", "list", env=env).stdout
    again = run_cli("keys", "create", "--name", "ci-bot", "--role", "admin", env=env)
    assert again.returncode == 1 and "exists" in again.stderr
    for bad in (["--name", "CI Bot", "--role", "reader"], ["--name", "x", "--role", "root"]):
        refused = run_cli("keys", "create", *bad, env=env)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert run_cli("keys", "revoke", "ci-bot", env=env).returncode == 0
    assert client.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200  # open again: no key left
    assert run_cli("keys", "list", env=env).stdout == ""
    missing = run_cli("keys", "revoke", "ci-bot", env=env)
    assert missing.returncode == 1 and "no key named 'ci-bot'" in missing.stderr
    audit = create_app(settings).extensions["boolq"].audit.latest(3)
    assert [(e.actor, e.action, e.target) for e in audit] == [
        ("cli", "revoke_key", "ci-bot"),
        ("ci-bot", "train", job_id),
        ("cli", "create_key", "ci-bot (trainer)"),
    ]
