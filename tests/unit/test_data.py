import json
from collections import Counter

import pytest

from app.engine.boolq import load_boolq, read_jsonl
from app.engine.data import DataError, split_train_dev
from tests.helpers import FULL_DATA_DIR, write_jsonl


def test_bundled_sample_loads(sample_data_dir):
    boolq = load_boolq(sample_data_dir)
    assert (len(boolq.train), len(boolq.val)) == (400, 200)
    assert boolq.val[0].idx == 0 and boolq.val[0].label in (0, 1) and boolq.label_names == ("no", "yes")


def test_sample_is_taken_from_the_full_data(sample_data_dir):
    full = (FULL_DATA_DIR / "train.jsonl").read_text().splitlines()[:400]
    assert (sample_data_dir / "train.jsonl").read_text().splitlines() == full


def test_superglue_format(tmp_path):
    row = {"question": "is it", "passage": "T -- text", "idx": 7, "label": True}
    (example,) = read_jsonl(write_jsonl(tmp_path / "val.jsonl", [row]))
    assert (example.idx, example.text, example.text_pair, example.label) == (7, "is it", "T -- text", 1)


def test_original_boolq_format_joins_title_and_numbers_rows(tmp_path):
    rows = [
        {"question": "q0", "title": "Title", "passage": "text", "answer": False},
        {"question": "q1", "title": "Other", "passage": "more", "answer": True},
    ]
    examples = read_jsonl(write_jsonl(tmp_path / "train.jsonl", rows))
    assert [(e.idx, e.text_pair, e.label) for e in examples] == [(0, "Title -- text", 0), (1, "Other -- more", 1)]


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"passage": "p", "label": True}), "missing field 'question'"),
        (json.dumps({"question": "q", "passage": "p", "label": "yes"}), "field 'label' must be bool"),
        (json.dumps({"question": "q", "passage": "p", "label": 1}), "field 'label' must be bool"),
        (json.dumps({"question": "q", "passage": "p", "answer": None}), "field 'answer' must be bool"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_line_and_reason(tmp_path, bad_line, reason):
    good = json.dumps({"question": "q", "passage": "p", "idx": 0, "label": True})
    path = write_jsonl(tmp_path / "train.jsonl", [good, bad_line])
    with pytest.raises(DataError) as exc:
        read_jsonl(path)
    assert f"{path}:2: " in str(exc.value)
    assert reason in str(exc.value)


def test_missing_folder_and_file_say_what_is_needed(tmp_path):
    with pytest.raises(DataError, match="train.jsonl and val.jsonl"):
        load_boolq(tmp_path / "nope")
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "passage": "p", "label": True}])
    with pytest.raises(DataError, match="val.jsonl: file not found"):
        load_boolq(tmp_path)


def test_hub_offline_fails_fast_with_a_pointer_to_local_files(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="--data-dir"):
        load_boolq("hub")


def test_split_is_stratified_and_deterministic(sample_data_dir):
    train = load_boolq(sample_data_dir).train
    a_train, a_dev = split_train_dev(train, 0.1, seed=1)
    b_train, b_dev = split_train_dev(train, 0.1, seed=1)
    _, c_dev = split_train_dev(train, 0.1, seed=2)
    assert a_dev == b_dev and a_train == b_train
    assert a_dev != c_dev
    assert len(a_dev) == 40 and len(a_train) == 360
    assert {e.idx for e in a_train}.isdisjoint({e.idx for e in a_dev})
    share = Counter(e.label for e in train)[True] / len(train)
    dev_share = Counter(e.label for e in a_dev)[True] / len(a_dev)
    assert abs(dev_share - share) <= 1 / len(a_dev)


def test_split_needs_two_examples(sample_data_dir):
    with pytest.raises(DataError, match="at least 2"):
        split_train_dev(load_boolq(sample_data_dir).train[:1], 0.1, seed=0)
