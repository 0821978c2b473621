"""Batch predictions (``POST /predictions``): bad requests are refused naming the field before anything is queued;
a real ``python -m app worker`` scores every row of a 1,000-row split into the job's run folder, with the answers
``/predict`` gives for the same rows. Real Redis, the session's tiny fine-tuned minilm, BoolQ's sample val rows
repeated to 1,000."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from app.api import create_app
from app.config import SAMPLE_DATA_DIR
from app.engine.boolq import load_boolq
from tests.helpers import service_settings, wait_for, write_jsonl, write_relation_pairs

ROWS = 1_000


@pytest.fixture(scope="module")
def thousand_rows(tmp_path_factory) -> Path:
    """A BoolQ folder whose val split is the sample's val rows repeated to 1,000, each with its own idx."""
    folder = tmp_path_factory.mktemp("boolq-1000")
    shutil.copy(SAMPLE_DATA_DIR / "train.jsonl", folder / "train.jsonl")
    val = load_boolq(SAMPLE_DATA_DIR).val
    rows = [val[i % len(val)] for i in range(ROWS)]
    write_jsonl(
        folder / "val.jsonl",
        [{"idx": i, "question": r.text, "passage": r.text_pair, "label": bool(r.label)} for i, r in enumerate(rows)],
    )
    return folder


@pytest.fixture(scope="module")
def model(tiny_run) -> str:
    return Path(tiny_run[0].run_dir).name


@pytest.fixture(scope="module")
def settings(tiny_run, thousand_rows, redis_url, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch-predictions")
    roots = (Path(tiny_run[0].run_dir).parent,)
    return service_settings(redis_url, folder, data_dir=thousand_rows, model_roots=roots)


@pytest.fixture(scope="module")
def client(settings):
    return create_app(settings).test_client()


def error_of(response) -> dict:
    body = response.get_json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_bad_requests_name_the_field_and_queue_nothing(client, model, tmp_path):
    relations = write_relation_pairs(tmp_path / "relations.csv", 60)
    upload = client.post(
        "/datasets",
        query_string={"text_column": "query", "text_pair_column": "doc", "label_column": "relation"},
        data={"file": (io.BytesIO(relations.read_bytes()), "relations.csv")},
        content_type="multipart/form-data",
    )
    three_labels = upload.get_json()["id"]
    cases = {
        "unknown dataset": ({"model": model, "dataset": "0123456789abcdef"}, 422, {"dataset"}),
        "unknown model": ({"model": "no-such-model"}, 422, {"model"}),
        "no model to default to": ({}, 404, {"model"}),
        "labels differ": ({"model": model, "dataset": three_labels}, 422, {"model", "dataset"}),
        "unknown split": ({"model": model, "split": "test"}, 422, {"split"}),
    }
    for case, (body, status, fields) in cases.items():
        response = client.post("/predictions", json=body)
        assert response.status_code == status, (case, response.get_json())
        assert set(error_of(response)["fields"]) == fields, case
    assert error_of(client.post("/predictions", json=cases["labels differ"][0]))["code"] == "labels_differ"
    assert client.get("/jobs").get_json()["total"] == 0


def predict_answers(client, model: str, lines: list[dict], pairs: dict) -> list[dict]:
    """``/predict``'s answers for the rows of ``lines``, 256 items a request: the job's chunks of rows, so the same
    forward passes (bf16 on CPUs that have it gives a row other sums next to other rows' padding, ~4e-4)."""
    answers = []
    for start in range(0, len(lines), 256):
        items = [{"text": pairs[line["idx"]][0], "text_pair": pairs[line["idx"]][1]} for line in lines[start:][:256]]
        response = client.post("/predict", json={"items": items, "model": model, "top_k": 2})
        assert response.status_code == 200, response.get_json()
        answers += response.get_json()["answers"]
    return answers


def test_a_worker_scores_every_row_as_predict_answers_it(client, settings, launcher, model, thousand_rows):
    launcher.worker(settings)
    response = client.post("/predictions", json={"model": model})
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["job_id"]
    assert response.headers["Location"] == f"/jobs/{job_id}"

    def ended():
        view = client.get(f"/jobs/{job_id}").get_json()
        return view if view["status"] in ("succeeded", "failed") else None

    view = wait_for(ended, 600, "the batch prediction job")
    assert view["status"] == "succeeded", view["error"]
    assert view["progress"]["rows"] == view["progress"]["total_rows"] == ROWS
    lines = client.get(f"/jobs/{job_id}/predictions").get_json()["predictions"]
    on_disk = (settings.artifacts_dir / job_id / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(on_disk) == ROWS and [line["idx"] for line in lines] == list(range(ROWS))

    pairs = {r.idx: (r.text, r.text_pair) for r in load_boolq(thousand_rows).val}
    answers = predict_answers(client, model, lines, pairs)
    assert [line["prediction"] for line in lines] == [answer["label"] for answer in answers]
    assert [line["score"] for line in lines] == pytest.approx([answer["score"] for answer in answers], abs=1e-6)
    by_label = [{s["label"]: s["score"] for s in answer["scores"]} for answer in answers]
    assert [line["scores"] for line in lines] == [pytest.approx([s["no"], s["yes"]], abs=1e-6) for s in by_label]

    labels = {r.idx: ("no", "yes")[r.label] for r in load_boolq(thousand_rows).val}
    assert [line["label"] for line in lines] == [labels[line["idx"]] for line in lines]
    accuracy = sum(line["label"] == line["prediction"] for line in lines) / ROWS
    metrics = json.loads((settings.artifacts_dir / job_id / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(accuracy) and "macro_f1" in metrics and metrics["rows"] == ROWS
    result = view["result"]
    assert (result["rows"], result["model"], result["dataset"], result["split"]) == (ROWS, model, "boolq", "val")
    assert result["metrics"]["accuracy"] == metrics["accuracy"]

    # A batch prediction made no model: /predict still has no job to default to.
    assert error_of(client.post("/predict", json={"text": "is it", "text_pair": "It is."}))["code"] == "no_model"
