"""Serving fine-tuned models in a web process: which model answers, the models kept loaded, micro-batching, and
the bounds on one request (tokens, time, a client that went away). The API's ``/predict`` calls :meth:`Serving.answer`.

Torch-free at import: the model code (``app.service.predict``) is imported when the first model loads.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rq import Queue

from app.config import Settings
from app.service import jobs
from app.service.batching import MicroBatcher
from app.service.model_access import fine_tuned_model
from app.service.registry import CHAMPION, read_champion_pointer
from app.service.serve_backend import TORCH, Backend

if TYPE_CHECKING:
    from app.service.predict import Answer, Pair

log = logging.getLogger(__name__)


class NoModelYet(LookupError):
    """No model was named and there is none to default to (no champion, no succeeded training job)."""


class TooManyTokens(ValueError):
    """A request holds more tokens than PREDICT_MAX_TOKENS; ``detail`` says how many."""

    def __init__(self, detail: str):
        super().__init__(f"{detail} (PREDICT_MAX_TOKENS); send fewer or shorter items")
        self.detail = detail


class AnswerTimedOut(RuntimeError):
    """The answer was not ready within PREDICT_TIMEOUT_S; its work was stopped."""


class PredictorCache:
    """Up to ``size`` loaded models per process, least recently used evicted first; thread-safe.

    With ``max_batch`` > 1 each model answers through a :class:`MicroBatcher`, so concurrent requests
    share forward passes; ``get`` returns an object with ``predict(pairs)`` either way.
    """

    def __init__(
        self,
        size: int,
        max_batch: int = 1,
        wait_s: float = 0.0,
        on_batch=None,
        num_threads: int = 0,
        max_padding: float | None = None,
        backend: Backend = TORCH,
        processes: int = 1,
    ):
        self.size = max(size, 1)
        self.processes = processes
        self.backend = backend
        self.max_padding = max_padding
        self.num_threads = num_threads
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.on_batch = on_batch
        self.loaded: OrderedDict[Path, object] = OrderedDict()
        self.lock = threading.Lock()  # guards `loaded` and `loading`; never held while a model loads
        self.loading: dict[Path, threading.Lock] = {}

    def get(self, folder: Path):
        """The folder's model, loaded on first use. A load holds only that folder's lock: requests for loaded
        models keep being answered meanwhile, and concurrent requests for the same folder load it once."""
        with self.lock:
            model = self.cached(folder)
            if model is not None:
                return model
            loading = self.loading.setdefault(folder, threading.Lock())
        with loading:
            with self.lock:
                model = self.cached(folder)
            if model is not None:  # another thread loaded it while this one waited
                return model
            try:
                model = self.load(folder)
            finally:
                with self.lock:
                    self.loading.pop(folder, None)
            with self.lock:
                self.loaded[folder] = model
                while len(self.loaded) > self.size:
                    _, evicted = self.loaded.popitem(last=False)
                    if isinstance(evicted, MicroBatcher):
                        evicted.close()
            return model

    def cached(self, folder: Path):
        if folder in self.loaded:
            self.loaded.move_to_end(folder)
            return self.loaded[folder]
        return None

    def predictor(self, folder: Path):
        """The model itself, without micro-batching: for requests large enough to fill a forward pass alone."""
        model = self.get(folder)
        return model.predict_fn.__self__ if isinstance(model, MicroBatcher) else model

    def load(self, folder: Path):
        # torch: the web process loads it only once it serves a model
        from app.engine.distributed import threads_per_rank
        from app.service.predict import load_predictor

        # NUM_THREADS, else the host's cores shared among the replica's web processes: more threads than cores made
        # every process wait at each op (bench/README.md, "Serving backends measured").
        threads = threads_per_rank(self.processes, self.num_threads)
        predictor = load_predictor(folder, self.max_padding, threads, self.backend)
        if self.max_batch <= 1:
            return predictor
        # The batcher gets tokenized pairs: each request is tokenized once, as it is checked against the token cap.
        return MicroBatcher(predictor.predict_encoded, self.max_batch, self.wait_s, on_batch=self.on_batch)


class Serving:
    """What one web process serves: the model a request asks for (or the default), from its cache of loaded
    models, within the request's bounds."""

    def __init__(self, settings: Settings, queue: Queue, on_batch: Callable[[int], None] | None = None):
        self.settings = settings
        self.queue = queue
        self.predictors = PredictorCache(
            settings.predict_cache_size,
            max_batch=settings.predict_max_batch,
            wait_s=settings.predict_batch_wait_ms / 1000,
            on_batch=on_batch,
            num_threads=settings.num_threads,
            max_padding=settings.predict_max_padding,
            backend=Backend.from_settings(settings),
            processes=settings.web_workers,
        )

    def answer(
        self, requested: str | None, pairs: list[Pair], client_gone: Callable[[], bool] | None = None
    ) -> tuple[str, list[Answer]]:
        """The served model's name and its answers to ``pairs``, in order."""
        name = served_model(requested, self.settings, self.queue)
        return name, self.bounded_answers(fine_tuned_model(name, self.settings), pairs, client_gone)

    def bounded_answers(
        self, folder: Path, pairs: list[Pair], client_gone: Callable[[], bool] | None = None
    ) -> list[Answer]:
        """Answers within PREDICT_MAX_TOKENS (refused before any compute) and PREDICT_TIMEOUT_S (stopped after,
        as when ``client_gone()`` says the client closed its connection)."""
        from app.service import predict  # torch: the API loads it only once it serves a model

        settings = self.settings
        deadline = time.monotonic() + settings.predict_timeout_s

        def should_stop() -> str | None:
            if client_gone is not None and client_gone():
                return "client gone"
            if time.monotonic() > deadline:
                return "deadline"
            return None

        try:
            predictor = self.predictors.predictor(folder)
            rows = predictor.encode_pairs(pairs, settings.predict_max_tokens)  # the only tokenization of the pairs
            if len(pairs) < self.predictors.max_batch:  # small: share forward passes with concurrent requests
                if reason := should_stop():  # a shared pass cannot stop for one client: do not join one for nobody
                    raise predict.PredictionStopped(reason)
                return self.predictors.get(folder).predict(rows, timeout_s=max(deadline - time.monotonic(), 0))
            return predictor.predict_encoded(rows, should_stop=should_stop)
        except predict.TooManyTokens as exc:
            raise TooManyTokens(str(exc)) from exc
        except (predict.PredictionStopped, TimeoutError) as exc:  # TimeoutError: a micro-batched answer was late
            log.warning("/predict of %d items stopped: %s", len(pairs), exc or "deadline")
            raise AnswerTimedOut(
                f"the answer took longer than PREDICT_TIMEOUT_S ({settings.predict_timeout_s:g} s) and was stopped; "
                "send fewer or shorter items"
            ) from exc


def served_model(requested: str | None, settings: Settings, queue: Queue) -> str:
    """A named model as it is; otherwise (or for "champion") the champion's job, read from Redis on every request
    so a new champion is served at once (never from the tracking server's alias: whoever reaches MLflow could
    move it); with no champion yet, the latest succeeded training job."""
    if requested not in (None, CHAMPION):
        return requested
    pointer = read_champion_pointer(queue.connection, settings)
    if pointer and pointer.get("job_id"):
        return pointer["job_id"]
    if requested == CHAMPION:
        raise NoModelYet("no champion yet: POST /models/champion first")
    job_id = jobs.latest_succeeded_job_id(queue)
    if job_id is None:
        raise NoModelYet("no training job has succeeded yet: POST /train first, or name a model")
    return job_id


def socket_closed(sock: socket.socket) -> bool:
    """Whether the peer closed its connection (readable with nothing to read) while we computed."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True
