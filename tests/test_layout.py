"""The code's shape, as the README's Code map states it: imports run one way, and one module owns the run folder."""

from __future__ import annotations

import ast

from tests.helpers import REPO_ROOT

# The Code map's order: a module may import only modules listed before it.
LAYERS = [
    "params",
    "config",
    "data",
    "redaction",
    "run_folder",
    "model_names",
    "attention",
    "modeling",
    "encoding",
    "evaluation",
    "tracking",
    "registry",
    "distributed",
    "training",
    "predict",
    "model_access",
    "tasks",
    "admission",
    "job_index",
    "jobs",
    "sweeps",
    "trials",
    "batching",
    "api",
    "nginx_config",
    "supervisor",
    "stack",
    "gunicorn_conf",
    "cli",
    "__main__",
]
RUN_FOLDER_FILES = ("params.json", "metrics.json", "predictions.jsonl")


def app_modules():
    for path in sorted((REPO_ROOT / "app").rglob("*.py")):
        parts = path.relative_to(REPO_ROOT / "app").with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) == 1:
            continue
        yield parts[0], path


def imported_layers(path) -> set[str]:
    """The top-level ``app`` modules that ``path`` imports (anywhere in the file, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "app":
            names = [node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("app."))
    return found


def test_every_module_is_in_the_code_map():
    assert {layer for layer, _ in app_modules()} <= set(LAYERS)


def test_imports_run_one_way():
    upward = [
        f"{path.relative_to(REPO_ROOT)} imports app.{imported}"
        for layer, path in app_modules()
        for imported in imported_layers(path)
        if imported != layer and LAYERS.index(imported) > LAYERS.index(layer)
    ]
    assert upward == []


def test_only_run_folder_knows_the_run_folders_file_names():
    knowing = [
        str(path.relative_to(REPO_ROOT))
        for _, path in app_modules()
        if path.name != "run_folder.py" and any(f'"{name}"' in path.read_text() for name in RUN_FOLDER_FILES)
    ]
    assert knowing == []
