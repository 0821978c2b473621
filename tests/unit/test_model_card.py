"""A fine-tuned model folder describes itself: a model card and an ``MLmodel`` that MLflow loads, written before
the worker records the folder's digest, so the digest covers them like the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.engine.model_card import model_card
from app.service.model_records import digest_files
from app.service.predict import Predictor
from tests.helpers import mixed_length_pairs


def test_the_model_card_says_what_the_model_is_how_well_it_does_and_what_for(tiny_run, tiny_model_dir):
    run_dir = Path(tiny_run[0].run_dir)
    card = (run_dir / "model" / "README.md").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 'pipeline_tag: "text-classification"' in card
    assert f"base_model: {json.dumps(str(tiny_model_dir))}" in card  # a folder is named as given
    assert metrics["dataset"]["val_digest"] in card
    assert f"| accuracy | {metrics['accuracy']:.4f} |" in card
    assert f"| majority baseline | {metrics['majority_baseline']:.4f} |" in card
    assert "- 0: `no`" in card and "- 1: `yes`" in card
    assert "lr=0.01" in card and "max_length=64" in card
    assert "## Intended use and limits" in card


def test_the_model_card_names_minilm_by_its_hub_id_and_its_alias():
    card = model_card({"model": "minilm"}, {})
    assert 'base_model: "sentence-transformers/all-MiniLM-L6-v2"' in card
    assert "- Base model: `sentence-transformers/all-MiniLM-L6-v2` (alias `minilm`)" in card


def test_mlflow_loads_the_model_folder_and_answers_as_the_predictor(tiny_run):
    import mlflow.pyfunc
    import pandas as pd

    model_dir = Path(tiny_run[0].run_dir) / "model"
    model = mlflow.pyfunc.load_model(str(model_dir))
    assert model.metadata.get_input_schema().input_names() == ["text", "text_pair"]
    assert model.metadata.metadata["label_names"] == ["no", "yes"]
    assert model.metadata.load_input_example(str(model_dir)).columns.tolist() == ["text", "text_pair"]
    pairs = mixed_length_pairs(3)
    answers = model.predict(pd.DataFrame({"text": [t for t, _ in pairs], "text_pair": [p for _, p in pairs]}))
    ours = Predictor(tiny_run[0].run_dir).predict(pairs)
    assert answers["label"].tolist() == [a.label_names[a.best] for a in ours]
    flat = [p for row in answers["probabilities"] for p in row]
    assert flat == pytest.approx([s for a in ours for s in a.scores], abs=1e-5)


def test_the_published_digest_covers_the_card_and_the_mlmodel(tiny_run):
    paths = {f.path for f in digest_files(Path(tiny_run[0].run_dir))}
    assert {"model/MLmodel", "model/README.md", "model/input_example.json", "model/model.safetensors"} <= paths
