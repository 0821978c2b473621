"""``pip install .`` gives the ``boolq`` command, and the installed package holds every file the code reads beside
itself (the console's templates and scripts, the bundled sample data, MLflow's auth config)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def files_under(folder: Path) -> set[str]:
    return {
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_pip_install_gives_the_boolq_command_and_every_file_of_the_package(tmp_path):
    source = tmp_path / "source"  # a copy: a build writes build/ and *.egg-info beside the pyproject.toml
    shutil.copytree(ROOT / "app", source / "app", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / "installed"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    built = subprocess.run([*pip, "--target", str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert files_under(target / "app") == files_under(source / "app")

    env = os.environ | {"PYTHONPATH": str(target)}
    command = [str(target / "bin" / "boolq"), "train", "--help"]
    helped = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--per-device-train-batch-size" in helped.stdout and "--learning-rate" in helped.stdout
    where = [sys.executable, "-c", "import app; print(app.__file__)"]
    imported = subprocess.run(where, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == str(target / "app" / "__init__.py")  # the installed copy ran, not this one
