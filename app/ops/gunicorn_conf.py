"""Gunicorn configuration for ``python -m app serve`` (``gunicorn -c app/ops/gunicorn_conf.py 'app.api:create_app()'``).

Threaded workers, so a ``POST /train?wait=true`` holds one thread, not a whole process; the timeout is
above the longest allowed wait. Command-line options (``--bind``, ``--workers``) override these values.
"""

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
