"""The GPU-ready parts of the training loop, exercised on the CPU: batches gathered from a split prebuilt on
the device, the prepared 4-D mask, widths rounded to GPU buckets, evaluation on the device-resident split, losses
read back once per interval, and no training state where a run cannot resume."""

import pytest
import torch

from app.config import SAMPLE_DATA_DIR, Settings
from app.engine.attention import use_cheap_cpu_attention
from app.engine.encoding import GPU_WIDTH_MULTIPLE, collate, device_batches, to_device, width_multiple
from app.engine.evaluation import predict_probabilities
from app.engine.modeling import compute_last_layer_for_first_token_only, takes_prepared_mask
from app.engine.training import PendingLosses, fine_tune, train_and_evaluate
from app.params import TrainParams
from app.tracking import NullTracker
from tests.helpers import random_split, seeded_tiny_bert, spread_tiny_bert, tiny_bert


def test_a_batch_gathered_on_the_device_equals_the_python_collated_one():
    data = random_split(50)
    split = to_device(data, pad_id=0, device=torch.device("cpu"))
    batches = [[4, 17, 9], [0], list(range(10, 42))]
    for indices, batch in zip(batches, device_batches(split, batches), strict=True):
        expected = collate(data, indices, pad_id=0)
        assert batch.keys() == expected.keys()
        for name in expected:
            assert torch.equal(batch[name], expected[name]), name


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_widths_are_rounded_to_buckets_on_gpus_only():
    assert width_multiple(torch.device("cpu")) == 1
    assert width_multiple(torch.device("cuda")) == GPU_WIDTH_MULTIPLE  # a device object needs no GPU


@pytest.mark.parametrize("prepared_mask", [False, True])
def test_bucket_padding_rounds_the_width_up_and_changes_no_logit(prepared_mask):
    data = random_split(50)
    data.input_ids[0] = list(range(1, 71))  # one row long enough that the longest width is not a bucket
    data.token_type_ids[0] = [0] * 70
    split = to_device(data, pad_id=0, device=torch.device("cpu"), with_prepared_mask=prepared_mask)
    indices = [3, 8, 20]
    exact = collate(data, indices, pad_id=0)
    padded = next(device_batches(split, [indices], pad_to_multiple_of=GPU_WIDTH_MULTIPLE))
    width = exact["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == -(-width // GPU_WIDTH_MULTIPLE) * GPU_WIDTH_MULTIPLE > width
    assert torch.equal(padded["input_ids"][:, :width], exact["input_ids"])
    assert not padded["attention_mask"][..., width:].any() and not padded["input_ids"][:, width:].any()
    model = seeded_tiny_bert().eval()  # the extra positions change nothing the classifier reads
    torch.testing.assert_close(logits_of(model, padded), logits_of(model, exact), rtol=0, atol=1e-5)


def test_the_prepared_mask_is_the_2d_mask_as_a_4d_boolean():
    data = random_split(50)
    plain = to_device(data, pad_id=0, device=torch.device("cpu"))
    prepared = to_device(data, pad_id=0, device=torch.device("cpu"), with_prepared_mask=True)
    indices = [[4, 17, 9], list(range(10, 42))]
    for a, b in zip(device_batches(plain, indices), device_batches(prepared, indices), strict=True):
        assert b["attention_mask"].dtype == torch.bool and b["attention_mask"].shape == (
            len(a["labels"]),
            1,
            1,
            a["attention_mask"].shape[1],
        )
        assert torch.equal(b["attention_mask"][:, 0, 0].long(), a["attention_mask"])


@pytest.mark.parametrize("setup", ["sdpa", "eager", "engine_cpu_training"])
def test_the_prepared_mask_gives_the_logits_of_transformers_own_mask(setup):
    """Fails when transformers changes how it applies a 4-D mask (masking_utils passes it through untouched)."""
    torch.manual_seed(0)
    model = tiny_bert(attn_implementation="eager" if setup == "eager" else "sdpa", dropout=0.1)
    assert takes_prepared_mask(model) == (setup != "eager")
    if setup == "engine_cpu_training":  # the merged attention and [CLS]-only last layer the CPU loop uses
        use_cheap_cpu_attention(model)
        compute_last_layer_for_first_token_only(model)
    model.eval()
    data = random_split(50)
    plain = to_device(data, pad_id=0, device=torch.device("cpu"))
    prepared = to_device(data, pad_id=0, device=torch.device("cpu"), with_prepared_mask=takes_prepared_mask(model))
    indices = [[4, 17, 9, 30], list(range(10, 42)), [5]]  # mixed lengths, and one row without padding
    for a, b in zip(device_batches(plain, indices), device_batches(prepared, indices), strict=True):
        torch.testing.assert_close(logits_of(model, b), logits_of(model, a), rtol=0, atol=1e-6)


def test_evaluation_on_the_device_resident_split_equals_the_collated_one():
    model = spread_tiny_bert()
    data = random_split(70, seed=4)
    collated = predict_probabilities(model, 0, data, on_device=False)
    resident = predict_probabilities(model, 0, data, on_device=True)  # the GPU default, here on the CPU
    assert sum(resident, []) == pytest.approx(sum(collated, []), abs=1e-5)


def test_pending_losses_are_read_back_all_at_once():
    losses = PendingLosses(every_s=3600)
    for step in range(1, 6):
        losses.add(step, torch.tensor(step / 10))
    assert not losses.due()
    assert losses.drain() == [(s, torch.tensor(s / 10).item()) for s in range(1, 6)]
    assert losses.syncs == 1 and losses.drain() == [] and losses.syncs == 1
    assert PendingLosses(every_s=0).due()


def test_reading_losses_once_per_interval_trains_and_reports_exactly_as_every_step():
    train, dev = random_split(40, seed=1), random_split(8, seed=2)
    params = TrainParams(batch_size=8, epochs=2, lr=1e-3)
    runs = {}
    for every_s in (0.0, 3600.0):  # the CPU default, and a GPU-like interval longer than the run
        progress = []
        model = seeded_tiny_bert()
        history = fine_tune(model, 0, train, dev, params, progress.append, NullTracker(), sync_every_s=every_s)
        runs[every_s] = history, progress
    (every_step, reports_a), (per_interval, reports_b) = runs[0.0], runs[3600.0]
    assert per_interval.loss == every_step.loss and len(every_step.loss) == 10  # 2 epochs of 5 steps
    assert per_interval.dev_accuracy == every_step.dev_accuracy
    replayed = [[pair for p in reports for pair in p.recent_losses] for reports in (reports_a, reports_b)]
    assert replayed[1] == replayed[0] == list(enumerate(every_step.loss, start=1))
    assert [p.step for p in reports_a if p.dev_accuracy is None] == list(range(1, 11))  # one report per read-back
    assert [p.step for p in reports_b if p.dev_accuracy is None] == [5, 10]
    dev = [
        [(p.step, p.dev_accuracy) for p in reports if p.dev_accuracy is not None] for reports in (reports_a, reports_b)
    ]
    assert dev[0] == dev[1]
    assert every_step.loss_syncs == 10 and per_interval.loss_syncs == 2  # one per epoch end


class TrackerOfHistories(NullTracker):
    def __init__(self):
        self.calls = []

    def log_metric_history(self, key, points):
        self.calls.append((key, list(points)))


def test_the_loss_history_is_tracked_in_one_call_per_read_back():
    tracker = TrackerOfHistories()
    params = TrainParams(batch_size=8, epochs=2, lr=1e-3)
    history = fine_tune(
        seeded_tiny_bert(), 0, random_split(40, 1), random_split(8, 2), params, None, tracker, sync_every_s=3600
    )
    assert [(key, len(points)) for key, points in tracker.calls] == [("train_loss", 5), ("train_loss", 5)]
    assert [loss for _, points in tracker.calls for _, loss in points] == history.loss


@pytest.mark.slow
def test_a_run_that_cannot_resume_saves_no_training_state(tmp_path, tiny_model_dir):
    state = tmp_path / "r" / "training_state.pt"
    seen = []
    params = TrainParams(model=str(tiny_model_dir), batch_size=8, epochs=2, max_length=32, train_limit=24, eval_limit=8)
    train_and_evaluate(params, SAMPLE_DATA_DIR, tmp_path, run_id="r", on_progress=lambda p: seen.append(state.exists()))
    assert seen and not any(seen)  # not even after the first epoch


def test_the_cli_checkpoints_only_when_checkpoint_every_s_is_set(monkeypatch):
    from app.engine.run import checkpoint_interval

    monkeypatch.delenv("CHECKPOINT_EVERY_S", raising=False)
    assert checkpoint_interval(Settings(), resumable=False) is None
    assert checkpoint_interval(Settings(), resumable=True) == Settings().checkpoint_every_s  # a job always saves
    monkeypatch.setenv("CHECKPOINT_EVERY_S", "30")
    assert checkpoint_interval(Settings(), resumable=False) == 30
