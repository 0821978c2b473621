"""Checkpoints stored in fp16 or bf16 fine-tune with fp32 master weights, and the fine-tuned weights come out fp32."""

import json

import pytest
import torch
from safetensors import safe_open

from app.config import SAMPLE_DATA_DIR
from app.engine.modeling import load_classifier
from app.engine.training import fine_tune, train_and_evaluate
from app.params import TrainParams
from app.tracking import NullTracker
from tests.helpers import random_split, save_tiny_checkpoint, save_tiny_model

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def stored_dtypes(folder) -> set[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        return {str(weights.get_slice(name).get_dtype()) for name in weights.keys()}  # noqa: SIM118 (not iterable)


def loss_curve(folder) -> list[float]:
    torch.manual_seed(1)  # the same dropout masks for every start
    model = load_classifier(str(folder))
    params = TrainParams(batch_size=8, epochs=2, lr=1e-3)
    history = fine_tune(model, 0, random_split(40, seed=1), random_split(8, seed=2), params, None, NullTracker())
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights stayed fp32
    return history.loss


@pytest.mark.parametrize("half", HALF)
def test_a_half_precision_checkpoint_loads_for_training_in_fp32(tmp_path, half):
    folder = save_tiny_checkpoint(tmp_path / half, HALF[half])
    assert stored_dtypes(folder) == {{"fp16": "F16", "bf16": "BF16"}[half]}
    assert {p.dtype for p in load_classifier(str(folder)).parameters()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("half", HALF)
def test_a_half_precision_checkpoint_fine_tunes_like_its_fp32_original(tmp_path, half):
    fp32 = loss_curve(save_tiny_checkpoint(tmp_path / "fp32", torch.float32))
    curve = loss_curve(save_tiny_checkpoint(tmp_path / half, HALF[half]))
    assert len(curve) == len(fp32) == 10
    # The start differs only by the weights' rounding to 8 (bf16) or 11 (fp16) significant bits: ~3e-5 in the loss;
    # different random weights move it by 3e-3 or more, so 1e-3 catches a checkpoint that was not loaded.
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(fp32), rtol=0, atol=1e-3)


@pytest.mark.slow
def test_a_bf16_checkpoint_trained_end_to_end_is_saved_in_fp32(tmp_path):
    folder = save_tiny_model(tmp_path / "bf16", torch.bfloat16)
    params = TrainParams(model=str(folder), batch_size=8, epochs=1, max_length=32, train_limit=24, eval_limit=8)
    result = train_and_evaluate(params, SAMPLE_DATA_DIR, tmp_path / "runs", run_id="half")
    saved = tmp_path / "runs" / "half" / "model"
    assert stored_dtypes(saved) == {"F32"}
    assert json.loads((saved / "config.json").read_text()).get("dtype", "float32") == "float32"
    assert all(loss == loss for loss in result.metrics["loss_curve"])  # no NaN
    assert result.metrics["peak_rss_mb"] > 100  # this process's peak: a worker's job view shows it
