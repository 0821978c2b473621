"""The code's shape that import-linter cannot check (`make lint` checks the layering): one module owns the run
folder's file names."""

from __future__ import annotations

import re

from tests.helpers import REPO_ROOT

RUN_FOLDER_FILES = ("params.json", "metrics.json", "predictions.jsonl")


def test_only_run_folder_knows_the_run_folders_file_names():
    knowing = [
        str(path.relative_to(REPO_ROOT))
        for path in sorted((REPO_ROOT / "app").rglob("*.py"))
        if path.name != "run_folder.py" and any(f'"{name}"' in path.read_text() for name in RUN_FOLDER_FILES)
    ]
    assert knowing == []


# BoolQ's field names live in its dataset entry, in /predict's old request shape (and its choice of shape), and in
# the CLI's --question/--passage aliases; everywhere else a dataset is text, text pair and label.
BOOLQ_WORDS = re.compile(r"\b(question|passage)s?\b", re.IGNORECASE)
KNOWS_BOOLQ = {"app/engine/boolq.py", "app/api/schemas.py", "app/api/predict.py", "app/cli.py"}


def test_no_module_but_the_boolq_entry_and_the_predict_compatibility_layer_names_question_or_passage():
    naming = [
        str(path.relative_to(REPO_ROOT))
        for path in sorted((REPO_ROOT / "app").rglob("*.py"))
        if str(path.relative_to(REPO_ROOT)) not in KNOWS_BOOLQ and BOOLQ_WORDS.search(path.read_text())
    ]
    assert naming == []
