"""Gunicorn configuration for ``python -m app serve`` (``gunicorn -c app/ops/gunicorn_conf.py 'app.api:create_app()'``).

Threaded workers, so a ``POST /train?wait=true`` holds one thread, not a whole process; the timeout is
above the longest allowed wait. Command-line options (``--bind``, ``--workers``) override these values.
"""

import os
import shutil
import tempfile
from pathlib import Path

from app.config import Settings

_settings = Settings()

bind = f"127.0.0.1:{_settings.port}"  # only nginx (or a container network) should reach it
workers = _settings.web_workers
worker_class = "gthread"
threads = _settings.web_threads
timeout = _settings.max_wait + 60
graceful_timeout = 30
# Import the app (torch, transformers) once in the master; workers fork with it loaded.
preload_app = True
accesslog = "-"
errorlog = "-"
loglevel = "info"
# No runtime control socket: several servers on one host would fight over its default path.
control_socket_disable = True
# A unix socket (--socket) is for the stack's user alone, whatever the umask; its folder is private too.
umask = 0o077


def metrics_folder(settings: Settings) -> tuple[Path, bool]:
    """This replica's PROMETHEUS_MULTIPROC_DIR and whether it was made here (new, so empty; removed at exit). A
    folder given is used as it is: whoever gives it empties it when its service starts (the native stack gives all
    its replicas one, so each /metrics adds up every replica's workers, restarted ones included)."""
    if settings.prometheus_multiproc_dir is None:
        return Path(tempfile.mkdtemp(prefix="boolq-metrics-")), True
    settings.prometheus_multiproc_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return settings.prometheus_multiproc_dir, False


# Every worker writes its counts to files here and /metrics adds them up (prometheus_client's multiprocess mode).
# Set before the app (and prometheus_client) is imported: the library picks its mode at import.
_metrics_dir, _made_here = metrics_folder(_settings)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)


def child_exit(server, worker):
    """A dead worker's counters stay in the sum (they are monotonic); only its live gauges are dropped."""
    from prometheus_client import multiprocess  # only after PROMETHEUS_MULTIPROC_DIR is set: it picks its mode then

    multiprocess.mark_process_dead(worker.pid, str(_metrics_dir))


def on_exit(server):
    if _made_here:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
