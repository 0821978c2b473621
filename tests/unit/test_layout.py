"""The code's shape that import-linter cannot check (`make lint` checks the layering): one module owns the run
folder's file names."""

from __future__ import annotations

from tests.helpers import REPO_ROOT

RUN_FOLDER_FILES = ("params.json", "metrics.json", "predictions.jsonl")


def test_only_run_folder_knows_the_run_folders_file_names():
    knowing = [
        str(path.relative_to(REPO_ROOT))
        for path in sorted((REPO_ROOT / "app").rglob("*.py"))
        if path.name != "run_folder.py" and any(f'"{name}"' in path.read_text() for name in RUN_FOLDER_FILES)
    ]
    assert knowing == []
