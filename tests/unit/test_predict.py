"""``Predictor``: a request's pairs are computed in order of length, in forward passes with little padding,
and answered in the request's order with the answers each pair gets alone."""

from __future__ import annotations

import pytest

from app.engine.encoding import padding_bounded_batches, padding_share
from app.service import predict
from app.service.predict import Predictor, token_chunks
from tests.helpers import mixed_length_pairs, padding_per_forward_pass

MAX_PADDING = 0.1


@pytest.fixture(scope="module")
def predictor(tiny_run) -> Predictor:
    return Predictor(tiny_run[0].run_dir, max_padding=MAX_PADDING)


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return mixed_length_pairs()


def probabilities(answers) -> list[float]:
    return [a.scores[1] for a in answers]


def test_a_mixed_length_request_gets_each_pairs_own_answer_in_its_order(predictor, pairs):
    alone = [predictor.predict([pair])[0] for pair in pairs]
    answers = predictor.predict(pairs)
    assert [a.best for a in answers] == [a.best for a in alone]
    assert probabilities(answers) == pytest.approx(probabilities(alone), abs=1e-5)


def test_sorted_and_padding_bounded_passes_answer_as_one_padded_batch_did(tiny_run, predictor, pairs):
    one_batch = Predictor(tiny_run[0].run_dir, max_padding=1.0)
    with padding_per_forward_pass(one_batch.model) as before:
        unbounded = one_batch.predict(pairs)
    with padding_per_forward_pass(predictor.model) as after:
        bounded = predictor.predict(pairs)
    # One padded batch is itself up to ~3e-4 off each pair alone (float sums over padded rows); the bounded
    # passes are within 1e-5 of them (test above).
    assert [a.best for a in bounded] == [a.best for a in unbounded]
    assert probabilities(bounded) == pytest.approx(probabilities(unbounded), abs=1e-3)
    assert len(before) == 1 and before[0] > 0.3, before  # short pairs padded to the long ones' width
    assert len(after) > 1 and max(after) <= MAX_PADDING, after


def test_padding_bounded_batches_cover_every_index_once_in_length_order():
    lengths = [36, 256, 71, 76, 239, 128, 129, 5, 256, 90]
    batches = padding_bounded_batches(lengths, 0.1, max_batch=3)
    order = [i for batch in batches for i in batch]
    assert sorted(order) == list(range(len(lengths)))
    assert [lengths[i] for i in order] == sorted(lengths)
    for batch in batches:
        assert len(batch) <= 3
        widths = [lengths[i] for i in batch]
        assert padding_share(sum(widths), len(batch), max(widths)) <= 0.1
    assert padding_bounded_batches(lengths, 1.0, max_batch=64) == [sorted(range(10), key=lengths.__getitem__)]


def test_token_chunks_keep_the_token_cap_after_sorting():
    lengths = [256, 12, 200, 64, 64, 180, 3000, 40]
    chunks = token_chunks(lengths, 300)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    for chunk in chunks:
        assert len(chunk) == 1 or sum(lengths[i] for i in chunk) <= 300


def test_small_chunks_give_the_same_answers_and_the_token_cap_counts_real_tokens(predictor, pairs, monkeypatch):
    whole = predictor.predict(pairs)
    monkeypatch.setattr(predict, "CHUNK_TOKENS", 100)
    assert probabilities(predictor.predict(pairs)) == pytest.approx(probabilities(whole), abs=1e-5)
    questions, passages = zip(*pairs, strict=True)
    encoded = predictor.tokenizer(list(questions), list(passages), truncation=True, max_length=predictor.max_length)
    tokens = sum(len(ids) for ids in encoded["input_ids"])
    assert len(predictor.predict(pairs, max_tokens=tokens)) == len(pairs)  # padding is not counted
    with pytest.raises(predict.TooManyTokens):
        predictor.predict(pairs, max_tokens=tokens - 1)
