"""The GPU-ready parts of the training loop, exercised on the CPU: batches gathered from a split prebuilt on
the device, padding to a multiple for GPU-friendly shapes, and losses read back once per interval."""

import random

import torch

from app.engine.encoding import Encoded, collate, device_batches, to_device
from app.engine.training import PendingLosses, fine_tune
from app.params import TrainParams
from app.tracking import NullTracker
from tests.helpers import tiny_bert


def random_split(rows: int, seed: int = 0) -> Encoded:
    rng = random.Random(seed)
    lengths = [rng.randint(3, 40) for _ in range(rows)]
    return Encoded(
        input_ids=[[rng.randint(1, 99) for _ in range(n)] for n in lengths],
        token_type_ids=[[int(i > n // 2) for i in range(n)] for n in lengths],
        labels=[rng.randint(0, 1) for _ in range(rows)],
    )


def seeded_tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_bert(dropout=0.1)


def test_a_batch_gathered_on_the_device_equals_the_python_collated_one():
    data = random_split(50)
    split = to_device(data, pad_id=0, device=torch.device("cpu"))
    batches = [[4, 17, 9], [0], list(range(10, 42))]
    for indices, batch in zip(batches, device_batches(split, batches), strict=True):
        expected = collate(data, indices, pad_id=0)
        assert batch.keys() == expected.keys()
        for name in expected:
            assert torch.equal(batch[name], expected[name]), name


def test_padding_to_a_multiple_rounds_the_width_up_and_masks_the_extra_positions():
    data = random_split(50)
    split = to_device(data, pad_id=0, device=torch.device("cpu"))
    indices = [3, 8, 20]
    exact = collate(data, indices, pad_id=0)
    padded = next(device_batches(split, [indices], pad_to_multiple_of=8))
    width = exact["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == min(-(-width // 8) * 8, split.input_ids.shape[1])
    assert torch.equal(padded["input_ids"][:, :width], exact["input_ids"])
    assert not padded["attention_mask"][:, width:].any() and not padded["input_ids"][:, width:].any()
    model = seeded_tiny_bert().eval()  # the extra positions change nothing the classifier reads
    with torch.no_grad():
        logits = [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in (exact, padded)]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)


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
    assert per_interval["loss"] == every_step["loss"] and len(every_step["loss"]) == 10  # 2 epochs of 5 steps
    assert per_interval["dev_accuracy"] == every_step["dev_accuracy"]
    seen = [[(p.step, p.loss, p.dev_accuracy) for p in reports] for reports in (reports_a, reports_b)]
    assert seen[1] == seen[0] and [step for step, _, acc in seen[0] if acc is None] == list(range(1, 11))
    assert every_step["loss_syncs"] == 10 and per_interval["loss_syncs"] == 2  # one per epoch end
