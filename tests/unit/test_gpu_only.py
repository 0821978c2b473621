"""What only a CUDA GPU can show: a training step that never waits on the host, and the GPU branches agreeing with
the CPU-tested ones on the device. Skipped where torch sees no GPU (the CPU tests of the same logic are in
tests/test_gpu_path.py); bench/gpu_check.py measures the speed."""

import statistics

import pytest
import torch

from app.engine.encoding import device_batches, length_grouped_batches, to_device, width_multiple
from app.engine.evaluation import predict_probabilities
from app.engine.modeling import compute_last_layer_for_first_token_only, takes_prepared_mask
from app.engine.training import fine_tune, make_optimizer, train_step
from app.params import TrainParams
from app.tracking import NullTracker
from tests.helpers import random_split, seeded_tiny_bert, spread_tiny_bert

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def tiny_on_gpu():
    model = seeded_tiny_bert().to(CUDA)
    compute_last_layer_for_first_token_only(model)
    return model


def test_a_training_step_does_not_sync_with_the_host():
    model = tiny_on_gpu().train()
    data = random_split(64)
    split = to_device(data, 0, CUDA, with_prepared_mask=takes_prepared_mask(model))
    order = length_grouped_batches([len(i) for i in data.input_ids], 8, torch.Generator().manual_seed(0))
    batches = device_batches(split, order, width_multiple(CUDA))
    optimizer = make_optimizer(model, TrainParams(lr=1e-3))
    train_step(model, next(batches), optimizer)  # warm-up: lazy state (AdamW's, cuBLAS handles) may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:  # gather, forward, backward, clip, fused AdamW, the loss left on the device
            train_step(model, batch, optimizer)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bucket_padding_and_the_prepared_mask_change_no_logit_on_the_gpu():
    model = tiny_on_gpu().eval()
    data = random_split(50)
    plain = to_device(data, 0, CUDA)
    prepared = to_device(data, 0, CUDA, with_prepared_mask=True)
    indices = [[3, 8, 20], list(range(10, 42))]
    with torch.no_grad():
        for a, b in zip(device_batches(plain, indices), device_batches(prepared, indices, 32), strict=True):
            logits = [model(**{k: v for k, v in x.items() if k != "labels"}).logits for x in (a, b)]
            torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)


def test_evaluation_on_the_device_resident_split_matches_the_collated_one_on_the_gpu():
    model = spread_tiny_bert().to(CUDA)
    compute_last_layer_for_first_token_only(model)
    data = random_split(70, seed=4)
    resident = [p[1] for p in predict_probabilities(model, 0, data)]  # the GPU default
    collated = [p[1] for p in predict_probabilities(model, 0, data, on_device=False)]
    assert statistics.pstdev(collated) > 0.1, "outputs too close together to tell one row's answer from another's"
    # bf16 autocast rounds differently with the batch shapes (~3e-3 here); a row answered for another moves by ~0.2
    assert resident == pytest.approx(collated, abs=1e-2)


def test_training_on_the_gpu_reads_losses_back_once_per_interval():
    params = TrainParams(batch_size=8, epochs=2, lr=1e-3)
    history = fine_tune(tiny_on_gpu(), 0, random_split(40, 1), random_split(8, 2), params, None, NullTracker())
    assert len(history.loss) == 10 and history.loss_syncs <= 4  # epoch ends, plus at most a timed one each
