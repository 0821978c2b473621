"""Micro-batching for ``/predict``: concurrent requests in one process share one forward pass.

A one-item request uses a small part of what one forward pass can do on a CPU (a batch of 32 costs far less
than 32 batches of one), and gunicorn's threads would otherwise run their forward passes side by side,
competing for the same cores. A :class:`MicroBatcher` queues the pairs of concurrent calls; one thread takes
the oldest call, waits up to ``wait_s`` for more (until ``max_batch`` pairs), runs the model once and hands
every call its own answers. With no concurrent calls a request waits at most ``wait_s`` extra.

The combined batch is one ``predict_fn`` call, and ``Predictor.predict`` computes it in order of length with
bounded padding (``PREDICT_MAX_PADDING``), so a short pair batched with long ones is not padded to them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing app.service.predict loads torch; the API imports this module before any model is needed
    from app.service.predict import Answer

# One item of a call: whatever ``predict_fn`` takes per pair (the service's batcher takes pairs already tokenized).
Pair = tuple


@dataclass
class PendingCall:
    pairs: list[Pair]
    answers: Future = field(default_factory=Future)


class MicroBatcher:
    """Answers ``predict(pairs)`` from many threads with shared forward passes of ``predict_fn``.

    The batching thread starts on the first call (so after gunicorn forks its workers). ``on_batch`` is
    told each batch's size in pairs (for metrics and tests).
    """

    def __init__(
        self,
        predict_fn: Callable[[list[Pair]], list[Answer]],
        max_batch: int,
        wait_s: float,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.predict_fn = predict_fn
        self.max_batch = max(max_batch, 1)
        self.wait_s = max(wait_s, 0.0)
        self.on_batch = on_batch
        self.calls: queue.SimpleQueue[PendingCall | None] = queue.SimpleQueue()
        # Guards `closed` and enqueuing, so no call can be queued behind the stop marker and wait forever.
        self.lock = threading.Lock()
        self.closed = False
        self.thread: threading.Thread | None = None

    def predict(self, pairs: list[Pair], timeout_s: float | None = None) -> list[Answer]:
        """Answers for ``pairs``, computed together with those of concurrent calls; :class:`TimeoutError` when
        they are not ready within ``timeout_s`` (the caller's deadline; the shared pass itself runs on)."""
        call = PendingCall(list(pairs))
        with self.lock:
            if self.closed:
                return self.predict_fn(call.pairs)
            if self.thread is None:
                self.thread = threading.Thread(target=self.serve, name="predict-batcher", daemon=True)
                self.thread.start()
            self.calls.put(call)
        return call.answers.result(timeout=timeout_s)

    def close(self) -> None:
        """Answer the calls already queued, then stop the thread; later calls run unbatched."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self.calls.put(None)

    def serve(self) -> None:
        while True:
            first = self.calls.get()
            if first is None:
                return
            batch = self.collect(first)
            self.answer(batch)

    def collect(self, first: PendingCall) -> list[PendingCall]:
        """``first`` plus the calls that arrive within ``wait_s``, until the batch holds ``max_batch`` pairs."""
        batch, size = [first], len(first.pairs)
        deadline = time.monotonic() + self.wait_s
        while size < self.max_batch:
            try:
                call = self.calls.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if call is None:  # closing: answer this batch, leave the marker for serve()
                self.calls.put(None)
                break
            batch.append(call)
            size += len(call.pairs)
        return batch

    def answer(self, batch: list[PendingCall]) -> None:
        """One forward pass for the whole batch; each call gets its slice of the answers (or the error)."""
        pairs = [pair for call in batch for pair in call.pairs]
        try:
            answers = self.predict_fn(pairs)
        except Exception as exc:  # the callers' threads re-raise it, where the API's error handler sees it
            for call in batch:
                call.answers.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(pairs))
        start = 0
        for call in batch:
            call.answers.set_result(answers[start : start + len(call.pairs)])
            start += len(call.pairs)
