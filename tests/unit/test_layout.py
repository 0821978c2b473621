"""The code's shape that import-linter cannot check (`make lint` checks the layering): one module owns the run
folder's file names."""

from __future__ import annotations

import ast
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


# Where an import inside a function is allowed: it keeps a heavy or optional library (torch, transformers, mlflow,
# optuna, ...) out of a process that must not load it, or breaks a cycle; a comment on its line, or on the line
# above a block of them, says which. (app/engine and app/cli.py: not yet held to it.)
HELD_TO_TOP_LEVEL_IMPORTS = ("app/api", "app/service", "app/tracking", "app/ops")


def test_every_import_inside_a_function_says_why_it_is_not_at_the_top():
    unexplained = []
    for folder in HELD_TO_TOP_LEVEL_IMPORTS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            lines = path.read_text().splitlines()
            for lineno in function_level_imports(ast.parse(path.read_text())):
                if not explained(lines, lineno):
                    unexplained.append(f"{path.relative_to(REPO_ROOT)}:{lineno}: {lines[lineno - 1].strip()}")
    assert unexplained == []


def function_level_imports(tree: ast.Module) -> list[int]:
    """The line of each import statement inside a function (nested functions included)."""
    found = {
        node.lineno
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.Import | ast.ImportFrom)
    }
    return sorted(found)


def explained(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or on the line above the block of imports it belongs to."""
    if "#" in lines[lineno - 1]:
        return True
    above = lineno - 2
    while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
        above -= 1
    return above >= 0 and lines[above].strip().startswith("#")
