"""gunicorn's configuration puts prometheus_client in multiprocess mode before the app (and the library) loads."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO_ROOT

CHECK = """
import os, runpy
conf = runpy.run_path("app/ops/gunicorn_conf.py")
from prometheus_client import values
folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
print(values.ValueClass is not values.MutexValue, os.path.isdir(folder), os.listdir(folder) == [])
conf["on_exit"](None)
print(os.path.exists(folder))
"""


def test_without_a_folder_each_replica_gets_a_new_one_in_multiprocess_mode_removed_at_exit():
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True", "True", "False"], out.stderr
