"""Datasets as data through the service: uploads checked and stored by content, bad data refused with the file, the
line and the fix (nothing left behind), a job trained on an uploaded 3-class text-pair set by a real worker, and
answers with its label names. Real Redis, real `python -m app worker`, real training; the test set is built from
BoolQ rows (``write_relation_pairs``), as no other text classification set installs here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from app.api import create_app
from tests.helpers import service_settings, wait_for, write_relation_pairs

MAPPING = {"text_column": "query", "text_pair_column": "doc", "label_column": "relation"}
# Learns related/unrelated in ~30 s on 2 cores: ≥ 15 points over the majority class on held-out val rows.
RELATION_JOB = {"model": "minilm", "epochs": 3, "lr": 2e-4, "batch_size": 16, "max_length": 64}


@pytest.fixture(scope="module")
def settings(redis_url, tmp_path_factory):
    return service_settings(redis_url, tmp_path_factory.mktemp("datasets"), max_dataset_mb=1, max_dataset_rows=2_000)


@pytest.fixture(scope="module")
def client(settings):
    return create_app(settings).test_client()


@pytest.fixture(scope="module")
def relation_csv(tmp_path_factory) -> Path:
    return write_relation_pairs(tmp_path_factory.mktemp("files") / "relations.csv", 450)


def upload(client, path: Path, query: dict | None = None, name: str | None = None):
    data = {"file": (io.BytesIO(path.read_bytes()), name or path.name)}
    return client.post("/datasets", query_string=query or {}, data=data, content_type="multipart/form-data")


def stored_files(settings) -> list[str]:
    folder = Path(settings.artifacts_dir) / "datasets" / "files"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_an_upload_is_described_and_the_same_file_twice_is_one_dataset(client, relation_csv, settings):
    first = upload(client, relation_csv, MAPPING)
    body = first.get_json()
    assert first.status_code == 201, body
    assert first.headers["Location"] == f"/datasets/{body['id']}" and len(body["id"]) == 16
    assert body["columns"] == ["query", "doc", "relation"] and body["label_names"] == ["no", "unrelated", "yes"]
    assert body["rows"] == {"train": 405, "val": 45}  # a stratified 10 % val split
    assert sum(body["label_histogram"]["train"].values()) == 405 and body["label_histogram"]["val"]["unrelated"] == 15
    assert body["majority_baseline"] == pytest.approx(max(body["label_histogram"]["val"].values()) / 45)
    assert len(body["preview"]) == 5 and set(body["preview"][0]) == {"query", "doc", "relation"}
    again = upload(client, relation_csv, MAPPING, name="renamed.csv")
    assert again.status_code == 200 and again.get_json()["id"] == body["id"]
    raw = client.post(
        "/datasets",
        query_string=MAPPING | {"filename": "relations.csv"},
        data=relation_csv.read_bytes(),
        content_type="text/csv",
    )
    assert raw.status_code == 200 and raw.get_json()["id"] == body["id"]
    listed = client.get("/datasets").get_json()["datasets"]
    assert [d["id"] for d in listed].count(body["id"]) == 1
    shown = client.get(f"/datasets/{body['id']}").get_json()
    assert shown["sha256"] == body["sha256"] and shown["preview"] == body["preview"]
    assert stored_files(settings).count(f"{body['sha256']}.csv") == 1


BAD_FILES = {
    "a misspelled column": (b"text,label\na,x\nb,y\n", {"label_column": "lable"}, 422, ["'lable'", "text, label"]),
    "an empty text": (b"text,label\na,x\n ,y\nc,x\n", {}, 422, ["row 2 (line 3)", "empty text in column 'text'"]),
    "one class": (b"text,label\na,x\nb,x\nc,x\n", {}, 422, ["1 class", "at least 2"]),
    "more than 1,000 classes": (
        b"text,label\n" + b"".join(b"t%d,c%d\n" % (i, i) for i in range(1_001)),
        {},
        422,
        ["1,001 classes", "more than 1,000"],
    ),
    "non-UTF-8 bytes": (b"text,label\na,x\nb\xff,y\n", {}, 422, ["line 3", "not UTF-8"]),
    "a ragged row": (b"text,label\na,x\nb,y,z\nc,x\n", {}, 422, ["line 3 has 3 fields", "header has 2"]),
    "an empty file": (b"", {}, 422, ["empty"]),
    "too many rows": (
        b"text,label\n" + b"".join(b"t%d,%d\n" % (i, i % 2) for i in range(2_001)),
        {},
        422,
        ["2,001 rows", "MAX_DATASET_ROWS"],
    ),
    "over MAX_DATASET_MB": (b"text,label\n" + b"a long text,x\n" * 90_000, {}, 413, ["MAX_DATASET_MB"]),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_data_is_refused_naming_the_problem_and_leaves_nothing_behind(client, settings, tmp_path, case):
    content, query, status, words = BAD_FILES[case]
    before_files, before = stored_files(settings), client.get("/datasets").get_json()["datasets"]
    path = tmp_path / "mine.csv"
    path.write_bytes(content)
    response = upload(client, path, query)
    error = response.get_json()["error"]
    assert response.status_code == status, error
    for word in words:
        assert word in error["message"], error
    assert "mine.csv" in error["message"] or status == 413
    assert stored_files(settings) == before_files and client.get("/datasets").get_json()["datasets"] == before


def test_an_unknown_type_is_refused_naming_the_formats(client, tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK\x03\x04")
    response = upload(client, path)
    assert response.status_code == 422 and ".csv, .tsv, .jsonl or .parquet" in response.get_json()["error"]["message"]


def test_train_refuses_a_mapping_that_does_not_fit_before_anything_is_queued(client, relation_csv, settings):
    dataset = upload(client, relation_csv, MAPPING).get_json()["id"]
    queued_before = client.get("/jobs").get_json()["total"]
    cases = [
        ({"dataset": dataset, "label_column": "answer"}, "label_column", "query, doc, relation"),
        ({"dataset": "0123456789abcdef"}, "dataset", "no dataset"),
        ({"text_column": "question"}, "text_column", "fixed mapping"),
    ]
    for extra, field, words in cases:
        response = client.post("/train", json={"model": "minilm"} | extra)
        error = response.get_json()["error"]
        assert response.status_code == 422 and field in error["fields"] and words in error["message"], error
    assert client.get("/jobs").get_json()["total"] == queued_before


@pytest.fixture(scope="module")
def relation_job(launcher, settings, client, relation_csv):
    """One job trained by a real worker on the uploaded 3-class set, followed to its end."""
    launcher.worker(settings)
    dataset = upload(client, relation_csv, MAPPING).get_json()["id"]
    submitted = client.post("/train", json=RELATION_JOB | {"dataset": dataset})
    assert submitted.status_code == 202, submitted.get_json()
    job_id = submitted.get_json()["job_id"]

    def ended():
        view = client.get(f"/jobs/{job_id}").get_json()
        return view if view["status"] in ("succeeded", "failed", "cancelled") else None

    return dataset, wait_for(ended, 600, f"job {job_id} to end", interval_s=0.5)


def test_a_worker_trains_an_uploaded_three_class_pair_set_and_beats_its_majority_class(relation_job):
    dataset, view = relation_job
    assert view["status"] == "succeeded", view.get("error")
    metrics = view["result"]["metrics"]
    assert view["params"]["dataset"] == dataset and metrics["label_names"] == ["no", "unrelated", "yes"]
    assert len(metrics["confusion_matrix"]) == 3 and len(metrics["per_class"]) == 3 and "macro_f1" in metrics
    assert view["result"]["n_eval"] == 45  # the dataset's held-out val split
    assert metrics["accuracy"] >= metrics["majority_baseline"] + 0.15, metrics


def test_predict_answers_with_the_datasets_label_names(client, relation_job, settings):
    _, view = relation_job
    one = client.post(
        "/predict",
        json={"text": "is the sky blue", "text_pair": "Sky -- The sky is blue by day.", "model": view["job_id"]},
    )
    assert one.status_code == 200, one.get_json()
    assert one.get_json()["label"] in ("no", "unrelated", "yes") and 1 / 3 <= one.get_json()["score"] <= 1
    ranked = client.post(
        "/predict", json={"items": [{"text": "a", "text_pair": "b"}], "top_k": 3, "model": view["job_id"]}
    )
    scores = ranked.get_json()["answers"][0]["scores"]
    assert sorted(s["label"] for s in scores) == ["no", "unrelated", "yes"]
    assert sum(s["score"] for s in scores) == pytest.approx(1, abs=1e-5) and scores[0]["score"] >= scores[-1]["score"]
    yes_no = client.post("/predict", json={"question": "q", "passage": "p", "model": view["job_id"]})
    assert yes_no.status_code == 422 and "3 labels" in yes_no.get_json()["error"]["message"]


def test_the_saved_folder_loads_in_a_transformers_pipeline_with_label_names(relation_job, settings):
    from transformers import pipeline

    _, view = relation_job
    classify = pipeline("text-classification", model=str(Path(settings.artifacts_dir) / view["job_id"] / "model"))
    answer = classify({"text": "is the sky blue", "text_pair": "Sky -- The sky is blue."})
    assert answer["label"] in ("no", "unrelated", "yes")
    rows = [json.loads(line) for line in (Path(settings.artifacts_dir) / view["job_id"] / "predictions.jsonl").open()]
    assert len(rows[0]["scores"]) == 3


def test_a_dataset_in_use_is_not_deleted_and_a_deleted_one_leaves_no_file(client, settings, tmp_path, relation_job):
    path = write_relation_pairs(tmp_path / "small.csv", 60, seed=5)
    record = upload(client, path, MAPPING).get_json()
    job = client.post("/train", json={"model": "minilm", "dataset": record["id"], "epochs": 50}).get_json()
    refused = client.delete(f"/datasets/{record['id']}")
    assert refused.status_code == 409 and "queued or running" in refused.get_json()["error"]["message"]
    cancelled = client.post(f"/jobs/{job['job_id']}/cancel")
    assert cancelled.status_code in (200, 202), cancelled.get_json()
    wait_for(lambda: client.delete(f"/datasets/{record['id']}").status_code == 204, 60, "the delete")
    assert client.get(f"/datasets/{record['id']}").status_code == 404
    assert f"{record['sha256']}.csv" not in stored_files(settings)
