"""Shared fixtures: the bundled BoolQ sample and one real, tiny fine-tuning run of minilm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.config import SAMPLE_DATA_DIR
from app.params import TrainParams

FULL_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "boolq"

# Small enough for CI on 2 cores, large enough for the loss to fall: 48 train rows, 64 tokens, 4 epochs.
TINY_PARAMS = dict(
    model="minilm", batch_size=8, lr=1e-4, epochs=4, max_length=64, train_limit=48, eval_limit=24, seed=7
)


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    return SAMPLE_DATA_DIR


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One real fine-tuning run of minilm, shared by the tests that read its outputs."""
    from app.training import train_and_evaluate

    progress = []
    result = train_and_evaluate(
        TrainParams(**TINY_PARAMS),
        SAMPLE_DATA_DIR,
        tmp_path_factory.mktemp("runs"),
        on_progress=progress.append,
    )
    return result, progress


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
