"""The unit tier's fixtures: the tests' tiny BERT as a model folder, and ``tiny_run`` (minilm's in
tests/conftest.py) replaced here by one real fine-tuning run of that tiny model, so that tests/unit trains
nothing bigger and runs in a minute on any 2-core CPU (docs/development.md, "The unit tier's time")."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import SAMPLE_DATA_DIR
from app.params import TrainParams
from tests.helpers import TINY_PARAMS, one_torch_thread, save_tiny_model


@pytest.fixture(autouse=True)
def on_one_torch_thread():
    """Each unit test runs torch on one thread (``one_torch_thread``); tests elsewhere in the process keep theirs."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny BERT (random weights, seed 0) with minilm's tokenizer, saved as a model folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_params(tiny_model_dir) -> dict:
    """TINY_PARAMS on the tiny model: random weights need a higher learning rate and 6 epochs to fit the 43 rows
    (the loss falls from 0.69 to under 0.1, dev accuracy moves from epoch to epoch)."""
    return TINY_PARAMS | {"model": str(tiny_model_dir), "lr": 1e-2, "epochs": 6}


@pytest.fixture(scope="session")
def tiny_run(tiny_params, tmp_path_factory):
    """One real fine-tuning run of the tiny model, shared by the tests that read its outputs."""
    from app.engine.training import train_and_evaluate

    progress = []
    with one_torch_thread():  # set up before the autouse fixture above
        result = train_and_evaluate(
            TrainParams(**tiny_params), SAMPLE_DATA_DIR, tmp_path_factory.mktemp("runs"), on_progress=progress.append
        )
    return result, progress
