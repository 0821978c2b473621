"""``python -m app export``: a folder that ONNX Runtime loads as is (model.onnx, config.json's label names, the
tokenizer truncating as the run trained) and that answers as the served torch model does in fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.service.export import export_onnx_folder
from app.service.predict import Predictor
from app.service.serve_backend import Backend
from tests.helpers import REPO_ROOT, mixed_length_pairs


def onnx_runtime_answers(folder: Path, pairs: list[tuple[str, str]]) -> tuple[list[str], np.ndarray]:
    """What a user of the folder gets with onnxruntime and the tokenizer alone (numpy, no torch): label names from
    config.json and each pair's probabilities."""
    import onnxruntime
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    id2label = json.loads((folder / "config.json").read_text())["id2label"]
    probabilities = []
    for text, pair in pairs:  # one at a time: no padding, nothing of our batching
        inputs = tokenizer(text, pair, truncation=True, return_tensors="np")
        (logits,) = session.run(["logits"], {name: inputs[name].astype(np.int64) for name in session_inputs(session)})
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities.append((exp / exp.sum(axis=-1, keepdims=True))[0])
    return [id2label[str(i)] for i in range(len(id2label))], np.array(probabilities)


def session_inputs(session) -> list[str]:
    return [i.name for i in session.get_inputs()]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported by the real command line, as a user runs it."""
    run_dir = Path(tiny_run[0].run_dir)
    output = tmp_path_factory.mktemp("export") / "onnx"
    env = os.environ | {"ARTIFACTS_DIR": str(run_dir.parent), "TRACKER": "none", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "app", "export", run_dir.name, "--format", "onnx", "--output-dir", str(output)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["output_dir"] == str(output)
    return output


def test_an_exported_folder_answers_in_onnx_runtime_alone_as_torch_fp32_does(exported, tiny_run):
    files = {p.name for p in exported.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    pairs = mixed_length_pairs(3)  # BoolQ passages longer than the 64 tokens the run trained with: truncated
    labels, probabilities = onnx_runtime_answers(exported, pairs)
    torch_fp32 = Predictor(tiny_run[0].run_dir, backend=Backend(precision="fp32")).predict(pairs)
    assert labels == list(torch_fp32[0].label_names) == ["no", "yes"]
    assert probabilities.flatten().tolist() == pytest.approx([s for a in torch_fp32 for s in a.scores], abs=1e-4)


def test_an_int8_export_loads_and_answers_close_to_fp32(tiny_run, tmp_path):
    folder = export_onnx_folder(Path(tiny_run[0].run_dir) / "model", tmp_path / "int8", quantize="int8")
    fp32_size = sum(p.stat().st_size for p in (Path(tiny_run[0].run_dir) / "model").glob("*.safetensors"))
    assert (folder / "model.onnx").stat().st_size < fp32_size / 3  # int8 weights: a quarter of fp32's
    pairs = mixed_length_pairs(3)
    _, probabilities = onnx_runtime_answers(folder, pairs)
    torch_fp32 = Predictor(tiny_run[0].run_dir, backend=Backend(precision="fp32")).predict(pairs)
    assert np.allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    assert probabilities.flatten().tolist() == pytest.approx([s for a in torch_fp32 for s in a.scores], abs=0.05)
