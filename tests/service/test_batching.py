"""Micro-batching of concurrent /predict calls: shared forward passes, same answers as one call at a time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.api import create_app
from app.engine.boolq import load_boolq
from app.service.batching import MicroBatcher
from app.service.jobs import connect_redis, training_queue
from app.service.predict import Predictor
from tests.helpers import mixed_length_pairs, padding_per_forward_pass, service_settings

CALLERS = 8


@pytest.fixture(scope="module")
def predictor(tiny_run) -> Predictor:
    result, _ = tiny_run
    return Predictor(result.run_dir)


@pytest.fixture(scope="module")
def pairs(sample_data_dir) -> list[tuple[str, str]]:
    return [(row.text, row.text_pair) for row in load_boolq(sample_data_dir).val[:CALLERS]]


def call_together(batcher: MicroBatcher, requests: list[list[tuple[str, str]]]) -> list:
    """Each request from its own thread, released at the same moment (as gunicorn's threads would)."""
    start = threading.Barrier(len(requests))

    def call(request):
        start.wait()
        return batcher.predict(request)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(call, requests))


def assert_same_answers(batched, alone) -> None:
    """Padding next to longer inputs changes the float sums a little, never the answer."""
    assert [a.best for a in batched] == [a.best for a in alone]
    assert [s for a in batched for s in a.scores] == pytest.approx([s for a in alone for s in a.scores], abs=1e-4)


def test_concurrent_calls_share_forward_passes_and_get_their_own_answers(predictor, pairs):
    sizes = []
    batcher = MicroBatcher(predictor.predict, max_batch=32, wait_s=0.5, on_batch=sizes.append)
    answers = call_together(batcher, [[pair] for pair in pairs])
    assert sum(sizes) == CALLERS and max(sizes) > 1 and len(sizes) < CALLERS, sizes
    for pair, (answer,) in zip(pairs, answers, strict=True):
        assert_same_answers([answer], predictor.predict([pair]))
    batcher.close()


def test_a_batch_never_collects_more_than_max_batch_single_pairs(predictor, pairs):
    sizes = []
    batcher = MicroBatcher(predictor.predict, max_batch=3, wait_s=0.5, on_batch=sizes.append)
    call_together(batcher, [[pair] for pair in pairs])
    assert sum(sizes) == CALLERS and max(sizes) <= 3 and len(sizes) >= 3, sizes
    batcher.close()


def test_calls_with_several_pairs_get_their_slice_in_order(predictor, pairs):
    batcher = MicroBatcher(predictor.predict, max_batch=32, wait_s=0.5)
    requests = [pairs[0:3], pairs[3:4], pairs[4:8]]
    answers = call_together(batcher, requests)
    for request, answer in zip(requests, answers, strict=True):
        assert len(answer) == len(request)
        assert_same_answers(answer, predictor.predict(request))
    batcher.close()


def test_a_micro_batch_of_mixed_lengths_runs_in_length_order_and_answers_each_call_as_alone(predictor):
    mixed = mixed_length_pairs(4)
    sizes = []
    batcher = MicroBatcher(predictor.predict, max_batch=32, wait_s=0.5, on_batch=sizes.append)
    with padding_per_forward_pass(predictor.model) as padding:
        answers = call_together(batcher, [[pair] for pair in mixed])
    batcher.close()
    assert max(sizes) > 1, sizes
    assert max(padding) <= predictor.max_padding, padding  # the short questions were not padded to the long ones
    for pair, (answer,) in zip(mixed, answers, strict=True):
        (alone,) = predictor.predict([pair])
        assert answer.best == alone.best
        assert answer.scores == pytest.approx(alone.scores, abs=1e-5)


def test_an_error_in_the_forward_pass_reaches_every_caller_of_that_batch():
    def failing(pairs):
        raise ValueError(f"cannot answer {len(pairs)} pairs")

    batcher = MicroBatcher(failing, max_batch=32, wait_s=0.5)
    start = threading.Barrier(4)

    def call(_):
        start.wait()
        with pytest.raises(ValueError, match="cannot answer"):
            batcher.predict([("q", "p")])
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(call, range(4)))
    batcher.close()


def test_after_close_the_thread_ends_and_calls_are_answered_unbatched(predictor, pairs):
    sizes = []
    batcher = MicroBatcher(predictor.predict, max_batch=32, wait_s=0.0, on_batch=sizes.append)
    first = batcher.predict(pairs[:1])
    batcher.close()
    batcher.thread.join(timeout=10)
    assert not batcher.thread.is_alive()
    assert_same_answers(batcher.predict(pairs[:1]), first)
    assert sizes == [1]  # the call after close did not go through the batcher


def test_predict_endpoint_batches_concurrent_requests(tiny_run, redis_url, tmp_path, pairs):
    """Through the Flask app: concurrent one-item requests, fewer forward passes (seen in /metrics)."""
    run_dir = Path(tiny_run[0].run_dir)
    settings = service_settings(redis_url, tmp_path, model_roots=(run_dir.parent,))
    app = create_app(settings.model_copy(update=dict(predict_max_batch=32, predict_batch_wait_ms=500)))
    model = run_dir.name
    start = threading.Barrier(CALLERS)

    def ask(pair):
        client = app.test_client()
        start.wait()
        return client.post("/predict", json={"question": pair[0], "passage": pair[1], "model": model})

    app.test_client().post("/predict", json={"question": "q", "passage": "p", "model": model})  # loads the model
    with ThreadPoolExecutor(CALLERS) as pool:
        responses = list(pool.map(ask, pairs))
    assert [r.status_code for r in responses] == [200] * CALLERS
    alone = Predictor(run_dir).predict(pairs)
    assert [r.get_json()["answer"] for r in responses] == [a.to_yes_no()["answer"] for a in alone]
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    passes = metric_value(metrics, "boolq_predict_batch_size_count")
    answered = metric_value(metrics, "boolq_predict_batch_size_sum")
    assert answered == CALLERS + 1 and passes < CALLERS + 1, metrics


def metric_value(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_predictor_cache_answers_through_a_batcher_and_applies_num_threads(tiny_run):
    import torch

    from app.service.serving import PredictorCache

    before = torch.get_num_threads()
    try:
        batched = PredictorCache(1, max_batch=8, wait_s=0.0, num_threads=1).get(Path(tiny_run[0].run_dir))
        assert isinstance(batched, MicroBatcher) and torch.get_num_threads() == 1
        plain = PredictorCache(1, max_batch=1).get(Path(tiny_run[0].run_dir))
        assert isinstance(plain, Predictor)
        pair = [("is it", "It is.")]  # the cache's batcher takes pairs tokenized (each request is tokenized once)
        assert_same_answers(batched.predict(plain.encode_pairs(pair)), plain.predict(pair))
        batched.close()
    finally:
        torch.set_num_threads(before)


def test_a_web_process_without_num_threads_takes_its_share_of_the_cores(tiny_run, redis_url, tmp_path):
    """NUM_THREADS 0: each of a replica's WEB_WORKERS processes gets cores // WEB_WORKERS threads (at least 1), so the
    replica's processes do not run more threads than there are cores; NUM_THREADS, when set, wins."""
    import os

    import torch

    from app.service.serving import Serving

    cores, before = len(os.sched_getaffinity(0)), torch.get_num_threads()
    folder = Path(tiny_run[0].run_dir)
    try:
        for workers, threads, expected in ((2, 0, max(1, cores // 2)), (1, 0, cores), (2, 3, 3)):
            torch.set_num_threads(7)
            settings = service_settings(redis_url, tmp_path, web_workers=workers, num_threads=threads)
            Serving(settings, training_queue(settings, connect_redis(settings))).predictors.get(folder)
            assert torch.get_num_threads() == expected, (workers, threads)
    finally:
        torch.set_num_threads(before)
