"""Serving as a service: the choice of model, the cache and the bounds answer without HTTP, in domain errors that
only ``app/api/errors.py`` turns into status codes. Real Redis, the session's tiny fine-tuned minilm."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from app.service.jobs import connect_redis, training_queue
from app.service.model_access import fine_tuned_model
from app.service.predict import Predictor
from app.service.serving import AnswerTimedOut, NoModelYet, Serving, TooManyTokens
from tests.helpers import REPO_ROOT, mixed_length_pairs, service_settings


@pytest.fixture
def serving(tiny_run, redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path, model_roots=(Path(tiny_run[0].run_dir).parent,))
    return Serving(settings, training_queue(settings, connect_redis(settings)))


def test_a_named_model_answers_as_the_predictor_does(serving, tiny_run):
    pairs = mixed_length_pairs(2)
    name, answers = serving.answer(Path(tiny_run[0].run_dir).name, pairs)
    assert name == Path(tiny_run[0].run_dir).name
    alone = Predictor(tiny_run[0].run_dir).predict(pairs)
    assert [s for a in answers for s in a.scores] == pytest.approx([s for a in alone for s in a.scores], abs=1e-5)


def test_no_model_named_and_none_to_default_to_is_a_domain_error(redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path)
    serving = Serving(settings, training_queue(settings, connect_redis(settings)))
    with pytest.raises(NoModelYet, match="POST /train"):
        serving.answer(None, [("q", "p")])
    with pytest.raises(NoModelYet, match="champion"):
        serving.answer("champion", [("q", "p")])


def test_over_the_token_cap_and_a_gone_client_are_domain_errors(serving, tiny_run):
    name = Path(tiny_run[0].run_dir).name
    capped = Serving(serving.settings.model_copy(update=dict(predict_max_tokens=50)), serving.queue)
    with pytest.raises(TooManyTokens, match="PREDICT_MAX_TOKENS"):
        capped.answer(name, mixed_length_pairs(2))
    with pytest.raises(AnswerTimedOut, match="PREDICT_TIMEOUT_S"):
        serving.answer(name, mixed_length_pairs(2), client_gone=lambda: True)


def test_the_predict_view_holds_no_cache_choice_or_status_code():
    source = (REPO_ROOT / "app/api/predict.py").read_text()
    view = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "predict")
    assert view.end_lineno - view.lineno + 1 + len(view.decorator_list) < 40
    for leak in ("ApiError", "PredictorCache", "MicroBatcher", "CHAMPION", "latest_succeeded"):
        assert leak not in source, leak


class CountingTokenizer:
    """A tokenizer that counts its calls."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_micro_batched_pair_is_tokenized_once(tiny_run, redis_url, tmp_path):
    roots = (Path(tiny_run[0].run_dir).parent,)
    settings = service_settings(redis_url, tmp_path, model_roots=roots, predict_max_batch=8)
    serving = Serving(settings, training_queue(settings, connect_redis(settings)))
    name = Path(tiny_run[0].run_dir).name
    predictor = serving.predictors.predictor(fine_tuned_model(name, settings))
    predictor.tokenizer = counting = CountingTokenizer(predictor.tokenizer)
    _, (answer,) = serving.answer(name, [("is it", "It is.")])
    assert counting.calls == 1
    assert answer.scores == pytest.approx(predictor.predict([("is it", "It is.")])[0].scores, abs=1e-6)


def test_a_replica_with_the_onnx_backend_answers_predict_as_torch_fp32_does(tiny_run, redis_url, tmp_path):
    from app.api import create_app

    roots = (Path(tiny_run[0].run_dir).parent,)
    body = {"model": Path(tiny_run[0].run_dir).name, "top_k": 2}
    body["items"] = [{"text": text, "text_pair": pair} for text, pair in mixed_length_pairs(3)]
    backends = {
        "torch": {"serve_precision": "fp32"},
        "onnx": {"serve_backend": "onnx"},
        "int8": {"serve_backend": "onnx", "serve_quantize": "int8"},
    }
    answers = {}
    for name, backend in backends.items():
        settings = service_settings(redis_url, tmp_path / name, model_roots=roots, **backend)
        response = create_app(settings).test_client().post("/predict", json=body)
        assert response.status_code == 200, response.get_json()
        answers[name] = response.get_json()["answers"]
    assert len(list((tmp_path / "onnx" / "runs" / ".model-cache" / "onnx").iterdir())) == 1  # one export, on disk

    def scores(name):
        return [s["score"] for a in answers[name] for s in sorted(a["scores"], key=lambda s: s["label"])]

    assert [a["label"] for a in answers["onnx"]] == [a["label"] for a in answers["torch"]]
    assert scores("onnx") == pytest.approx(scores("torch"), abs=1e-4)
    assert scores("int8") == pytest.approx(scores("torch"), abs=0.05)  # int8 answers, near fp32's
