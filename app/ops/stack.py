"""``python -m app stack``: the docker-compose topology without Docker, on one machine or one role per machine.

``--role all`` (the default): redis-server, N API replicas (``python -m app serve``), M RQ workers (``python -m app
worker``), nginx in front of the replicas and, with ``--mlflow``, an MLflow tracking server the workers upload
models to and the replicas fetch them from (as on several machines), all children of this one command.
``--role worker|api|edge``: one machine's part of a service spread over several (docs/several-machines.md), on
the Redis and MLflow server its settings name: the workers; the replicas on TCP (behind EDGE_SECRET off
loopback); nginx in front of replicas elsewhere (``--replica host:port``), sending EDGE_SECRET.

Each child runs in its own process group, so a Ctrl-C reaches only the stack, which then stops nginx, the replicas
and workers, and Redis (and MLflow) last, and makes sure no process of any group is left. While it runs, a child
that dies is restarted with backoff (``app/ops/supervisor.py``); Redis on the same append-only file, the replicas
answering 503 meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import http.client
import ipaddress
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
import requests
from rq import Worker

from app.config import PROJECT_ROOT, Settings, environment_with
from app.engine.lifetime import die_with_parent
from app.ops.mlflow_server import (
    CREDENTIALS_NAME,
    SERVER_ENV,
    ServerCredentials,
    change_password,
    credentials_accepted,
    mlflow_server_argv,
    new_credentials,
    read_credentials,
    save_credentials,
    server_answers,
    server_environment,
)
from app.ops.nginx_config import native_layout, render_nginx_conf
from app.ops.private_files import write_private
from app.ops.supervisor import Supervisor
from app.service.redis_connection import connect_redis

log = logging.getLogger(__name__)

STATE_FILE_NAME = "stack.json"
# The Redis URL with its password, readable by the stack's user alone (stack.json names it, never holds it).
REDIS_URL_FILE_NAME = "redis.url"
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.25
# sun_path holds 108 bytes, the last a NUL.
MAX_SOCKET_PATH = 107
# Debian installs nginx in /usr/sbin, which is not on an ordinary user's PATH.
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


# What one ``python -m app stack`` runs: everything on this machine, or one machine's part of the service.
ROLES = ("all", "worker", "api", "edge")


class StackError(Exception):
    """The stack cannot start or keep running; the message says which process and where its log is."""


@dataclass(frozen=True)
class StackOptions:
    replicas: int = 3
    workers: int = 2
    # Where nginx listens (all, edge) or the replicas do (api: on port, port + 1, ...).
    host: str = "127.0.0.1"
    port: int = 4000
    web_workers: int = 1
    state_dir: Path | None = None
    redis_port: int = 0
    # Run an MLflow tracking server too (all); the roles use the one MLFLOW_TRACKING_URI names.
    mlflow: bool = False
    role: str = "all"
    # edge: the replicas nginx sends requests to, ``host:port`` each.
    upstreams: tuple[str, ...] = ()


@dataclass
class Child:
    """One process of the stack, started in a new session (its own process group)."""

    name: str
    role: str  # redis | mlflow | api | worker | nginx
    argv: list[str]
    log_path: Path
    url: str = ""
    # Variables of this child alone, over the stack's (the MLflow server's auth config, the replicas' metrics folder).
    own_env: dict[str, str] = field(default_factory=dict, repr=False)
    process: subprocess.Popen | None = field(default=None, repr=False)
    exit_code: int | None = None
    restarts: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    @property
    def death_signal(self) -> int:
        """What the kernel sends this child when the stack dies. An RQ worker reads SIGTERM as "finish the job under
        way first" and would train on, its Redis gone, for minutes: SIGKILL ends it now (its work horse follows it,
        ``TrainingWorker``), and the job is re-run from its checkpoint once workers are back."""
        return signal.SIGKILL if self.role == "worker" else signal.SIGTERM

    def start(self, env: dict[str, str]) -> None:
        death_signal = self.death_signal
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.argv,
                cwd=PROJECT_ROOT,
                env=env | self.own_env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: die_with_parent(death_signal),
            )

    def exited(self) -> bool:
        """True once the group leader has exited (and is reaped); records its exit code."""
        if self.process is None:
            return True
        code = self.process.poll()
        if code is not None:
            self.exit_code = code
        return code is not None

    def group_alive(self) -> bool:
        """Whether any process of the child's group (gunicorn's workers, RQ's work horse, ...) is still there."""
        if self.process is None:
            return False
        self.exited()
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def signal_group(self, signum: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "pid": self.pid,
            "url": self.url,
            "log": str(self.log_path),
            "exit_code": self.exit_code,
            "restarts": self.restarts,
        }


def find_binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=SBIN_PATH)
    if path is None:
        raise StackError(f"{name} not found; install it with `sudo apt-get install nginx redis-server`")
    return path


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free now (held together while choosing, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ensure_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StackError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); choose another") from exc


class Stack:
    """Starts, watches and stops the stack's processes."""

    def __init__(self, options: StackOptions, settings: Settings):
        self.options = options
        self.settings = settings
        self.artifacts_dir = settings.artifacts_dir.resolve()
        # One state folder per role, so a machine can run a worker and a replica on one ARTIFACTS_DIR.
        default_state = ".stack" if options.role == "all" else f".stack-{options.role}"
        self.state_dir = (options.state_dir or self.artifacts_dir / default_state).resolve()
        self.logs_dir = self.state_dir / "logs"
        self.state_file = self.state_dir / STATE_FILE_NAME
        self.url = f"http://{address(probe_host(options.host), options.port)}"
        self.stopping = threading.Event()
        self.children: list[Child] = []
        self.redis_url = ""
        self.mlflow_url = ""
        self.mlflow_dir = self.state_dir / "mlflow"
        self.mlflow_credentials: ServerCredentials | None = None
        self.env: dict[str, str] = {}
        self.supervisor = Supervisor(self.restart_child)

    # --- planning ---------------------------------------------------------------------------------------

    def plan(self) -> None:
        """Build the children of this stack's role: their command lines, and nginx's config."""
        role = self.options.role
        if role == "all":
            self.plan_all()
            return
        self.redis_url = self.settings.redis_url
        if role == "worker":
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            self.plan_workers()
        elif role == "api":
            self.plan_tcp_replicas()
        elif role == "edge":
            self.plan_edge()
        else:
            raise StackError(f"--role {role!r}: must be one of {', '.join(ROLES)}")

    def plan_all(self) -> None:
        """Choose ports and build every child's command line; write the nginx config."""
        redis_bin, nginx_bin = find_binary("redis-server"), find_binary("nginx")
        ensure_port_free(self.options.host, self.options.port)
        ports = free_ports(2)
        redis_port = self.options.redis_port or ports.pop()
        mlflow_port = ports.pop()
        # Other local users can reach a loopback port; a per-stack password keeps them out of the job store.
        redis_password = secrets.token_hex(16)
        self.redis_url = f"redis://:{redis_password}@127.0.0.1:{redis_port}/0"
        for directory in (self.logs_dir, self.state_dir / "redis", self.state_dir / "nginx-temp"):
            directory.mkdir(parents=True, exist_ok=True)
        # The password goes in a private file, not on the command line: ps and our logs show command lines.
        redis_conf = self.state_dir / "redis.conf"
        write_private(redis_conf, f"requirepass {redis_password}\n")
        write_private(self.state_dir / REDIS_URL_FILE_NAME, self.redis_url + "\n")

        self.children.append(
            Child(
                "redis",
                "redis",
                [redis_bin, str(redis_conf), "--port", str(redis_port), "--bind", "127.0.0.1"]
                + ["--dir", str(self.state_dir / "redis")]
                + ["--appendonly", "yes", "--save", "", "--daemonize", "no", "--logfile", ""]
                + ["--maxmemory", f"{self.settings.redis_maxmemory_mb}mb", "--maxmemory-policy", "noeviction"],
                self.logs_dir / "redis.log",
                url=f"redis://127.0.0.1:{redis_port}/0",
            )
        )
        if self.options.mlflow:
            self.plan_mlflow(mlflow_port)
        # Replicas listen on unix sockets in the private state folder, not on loopback ports: no other local user
        # can reach one around nginx (forge X-Forwarded-For, skip its limits, hold a thread with half a request).
        sockets = [replica_socket(self.state_dir, number) for number in range(1, self.options.replicas + 1)]
        for path in sockets:
            self.add_replica(["--socket", str(path)], f"unix:{path}")
        self.plan_workers()
        self.add_nginx(nginx_bin, [f"unix:{path}" for path in sockets])

    def plan_workers(self) -> None:
        for number in range(1, self.options.workers + 1):
            self.children.append(
                Child(
                    f"worker-{number}",
                    "worker",
                    [sys.executable, "-m", "app", "worker"],
                    self.logs_dir / f"worker-{number}.log",
                )
            )

    def plan_tcp_replicas(self) -> None:
        """The api role: replicas on host:port, port + 1, ... for an edge on another machine. Off loopback, a
        replica without EDGE_SECRET would answer whoever reaches its port, around nginx's limits: refused."""
        host, first = self.options.host, self.options.port
        if not is_loopback(host) and not self.settings.edge_secret:
            raise StackError(
                f"--host {host} is reachable from other machines: set EDGE_SECRET (the edge sends it; the replicas "
                "refuse requests without it), or listen on 127.0.0.1"
            )
        ports = range(first, first + self.options.replicas)
        for port in ports:
            ensure_port_free(host, port)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        for port in ports:
            self.add_replica(["--host", host, "--port", str(port)], f"http://{address(probe_host(host), port)}")

    def add_replica(self, where: list[str], url: str) -> None:
        """One more ``python -m app serve`` listening ``where`` (``--socket PATH`` or ``--host H --port P``)."""
        metrics_dir = self.state_dir / "metrics"
        if not self.of_role("api"):
            # One metrics folder for every replica, emptied now: whichever replica answers /metrics (through nginx)
            # adds up all replicas' gunicorn workers, so counters never go back when the next scrape lands elsewhere.
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir(mode=0o700)
        number = len(self.of_role("api")) + 1
        self.children.append(
            Child(
                f"api-{number}",
                "api",
                [sys.executable, "-m", "app", "serve", *where, "--workers", str(self.options.web_workers)],
                self.logs_dir / f"api-{number}.log",
                url=url,
                own_env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
            )
        )

    def plan_edge(self) -> None:
        """The edge role: nginx in front of replicas on other machines, which it reaches over TCP."""
        nginx_bin = find_binary("nginx")
        ensure_port_free(self.options.host, self.options.port)
        for directory in (self.logs_dir, self.state_dir / "nginx-temp"):
            directory.mkdir(parents=True, exist_ok=True)
        self.add_nginx(nginx_bin, list(self.options.upstreams))

    def add_nginx(self, nginx_bin: str, upstreams: list[str]) -> None:
        conf_path = self.write_nginx_conf(upstreams)
        nginx_argv = [nginx_bin, "-c", str(conf_path), "-p", str(self.state_dir)]
        nginx_argv += ["-e", str(self.logs_dir / "nginx-error.log"), "-g", "daemon off;"]
        self.children.append(Child("nginx", "nginx", nginx_argv, self.logs_dir / "nginx.log", url=self.url))

    def plan_mlflow(self, port: int) -> None:
        """The tracking server on loopback behind MLflow's basic-auth app: only the stack's processes, which get its
        admin credentials, get in. They are made once per state folder (from MLFLOW_TRACKING_USERNAME/PASSWORD when
        set, else random) and kept there, before the server first starts, so its auth database never outlives them."""
        self.mlflow_url = f"http://127.0.0.1:{port}"
        self.mlflow_credentials = read_credentials(self.mlflow_dir)
        if self.mlflow_credentials is None:
            self.mlflow_credentials = new_credentials(
                self.settings.mlflow_tracking_username, self.settings.mlflow_tracking_password
            )
            save_credentials(self.mlflow_dir, self.mlflow_credentials)
        self.children.append(
            Child(
                "mlflow",
                "mlflow",
                mlflow_server_argv(self.mlflow_dir, port),
                self.logs_dir / "mlflow.log",
                url=self.mlflow_url,
                own_env=server_environment(self.mlflow_dir, self.mlflow_credentials),
            )
        )

    def nginx_conf(self, api_addresses: list[str]) -> str:
        """nginx's config for these replicas: ``unix:`` sockets (all) need no secret, TCP ones (edge) EDGE_SECRET."""
        over_tcp = any(not server.startswith("unix:") for server in api_addresses)
        if over_tcp and not self.settings.edge_secret:
            raise StackError(
                "the edge reaches its replicas over TCP: set EDGE_SECRET, the same as the replicas' (they answer "
                "403 without it)"
            )
        layout = native_layout(
            address(self.options.host, self.options.port),
            api_addresses,
            self.state_dir,
            self.settings.max_dataset_mb,
            edge_secret=self.settings.edge_secret if over_tcp else "",
        )
        return render_nginx_conf(layout)

    def write_nginx_conf(self, api_addresses: list[str]) -> Path:
        conf_path = self.state_dir / "nginx.conf"
        write_private(conf_path, self.nginx_conf(api_addresses))  # it may hold EDGE_SECRET
        return conf_path

    def of_role(self, role: str) -> list[Child]:
        return [child for child in self.children if child.role == role]

    # --- starting ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start in dependency order, each stage ready before the next: Redis (+ MLflow), replicas + workers, nginx.
        A role waits for the Redis it is given (started elsewhere, maybe at the same time) before starting anything."""
        env = self.env = self.child_environment()
        self.start_children(self.of_role("redis") + self.of_role("mlflow"), env)
        if self.options.role != "edge":
            where = redacted_url(self.redis_url) if self.options.role != "all" else "redis"
            self.wait_until(f"{where} answers PING", self.redis_answers, self.of_role("redis"))
        if self.options.role in ("worker", "api"):
            self.report_tracking_server()
        if self.mlflow_url:
            self.wait_until("the MLflow server answers /health", self.mlflow_answers, self.of_role("mlflow"))
            self.check_mlflow_credentials()
            env = self.env = self.child_environment()  # with the settled credentials
        self.start_children(self.of_role("api") + self.of_role("worker"), env)
        self.wait_until("every API replica answers /healthz", self.replicas_healthy, self.of_role("api"))
        self.wait_until("every worker is registered", self.workers_registered, self.of_role("worker"))
        self.start_children(self.of_role("nginx"), env)
        if self.options.role == "edge":  # its replicas are other machines': up now, or later
            self.wait_until("nginx answers", self.nginx_answers, self.of_role("nginx"))
            self.report_upstreams()
        elif self.of_role("nginx"):
            self.wait_until("nginx answers /healthz", self.nginx_healthy, self.of_role("nginx"))

    def check_mlflow_credentials(self) -> None:
        """Settle the password the children log in with: MLFLOW_TRACKING_PASSWORD when set (the admin's password is
        changed to it, from the kept one: a rotation), else the kept one. Fails now, saying so, rather than let
        every job fail on a 401."""
        kept = self.mlflow_credentials
        wanted = replace(kept, password=self.settings.mlflow_tracking_password or kept.password)
        if credentials_accepted(self.mlflow_url, wanted):
            pass
        elif wanted != kept and credentials_accepted(self.mlflow_url, kept):
            change_password(self.mlflow_url, kept, wanted.password)
            log.info("the MLflow admin %r now has the password MLFLOW_TRACKING_PASSWORD gives", kept.username)
        else:
            raise StackError(
                f"the MLflow server refuses user {kept.username!r} with the password of MLFLOW_TRACKING_PASSWORD or "
                f"of {self.mlflow_dir / CREDENTIALS_NAME}; set MLFLOW_TRACKING_PASSWORD to its current password"
            )
        if wanted != kept:
            save_credentials(self.mlflow_dir, wanted)
        self.mlflow_credentials = wanted

    def child_environment(self) -> dict[str, str]:
        """What every child gets: the stack's Redis and folder, and its MLflow server and credentials when it runs
        one, else the tracking server of its settings (``--mlflow URL`` included)."""
        tracking = {}
        if self.mlflow_url:
            tracking = {"MLFLOW_TRACKING_URI": self.mlflow_url} | SERVER_ENV | self.mlflow_credentials.client_env()
        elif self.settings.mlflow_tracking_uri:
            tracking = {"MLFLOW_TRACKING_URI": self.settings.mlflow_tracking_uri}
        return environment_with(
            REDIS_URL=self.redis_url, ARTIFACTS_DIR=str(self.artifacts_dir), PYTHONUNBUFFERED="1", **tracking
        )

    def start_children(self, children: list[Child], env: dict[str, str]) -> None:
        for child in children:
            child.start(env)
            log.info("started %s (pid %d): %s", child.name, child.pid, shlex.join(child.argv))

    def wait_until(self, what: str, is_ready, children: list[Child]) -> None:
        """Poll ``is_ready`` until it holds; fail at once, naming the log, if one of ``children`` exits."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not is_ready():
            for child in children:
                if child.exited():
                    raise StackError(
                        f"{child.name} exited with code {child.exit_code} while starting; see {child.log_path}"
                    )
            if self.stopping.is_set():
                raise StackError(f"stopped while waiting until {what}")
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {READY_TIMEOUT_S:.0f} s waiting until {what}; see {self.logs_dir}")
            time.sleep(POLL_INTERVAL_S)
        log.info("ready: %s", what)

    @functools.cached_property
    def redis_client(self) -> redis.Redis:
        """The stack's own Redis (once planned), or (a role) the service's, Sentinels included."""
        if self.options.role == "all":
            return redis.Redis.from_url(self.redis_url, socket_timeout=1)
        return connect_redis(self.settings)

    def redis_answers(self) -> bool:
        try:
            return self.redis_client.ping()
        except redis.RedisError:
            return False

    def mlflow_answers(self) -> bool:
        return server_answers(self.mlflow_url)

    def replicas_healthy(self) -> bool:
        return all(answers_healthz(child.url) for child in self.of_role("api"))

    def workers_registered(self) -> bool:
        """Whether each of our workers has a record in Redis (other machines' workers may share it)."""
        ours = {child.pid for child in self.of_role("worker")}
        if not ours:
            return True
        here = socket.gethostname()
        registered = {w.pid for w in Worker.all(connection=self.redis_client) if w.hostname == here}
        return ours <= registered

    def nginx_healthy(self) -> bool:
        return answers_healthz(self.url)

    def nginx_answers(self) -> bool:
        """Whether nginx answers at all (a 502 included: no replica answering yet)."""
        try:
            requests.get(f"{self.url}/healthz", timeout=2)
        except requests.RequestException:
            return False
        return True

    def report_tracking_server(self) -> None:
        """Warn now, not at the first job, when the MLflow server this role's settings name does not answer."""
        uri = self.settings.mlflow_tracking_uri
        if not uri.startswith(("http://", "https://")):
            log.warning(
                "MLFLOW_TRACKING_URI is %r: models stay on this machine; replicas and workers on other machines "
                "share them only through an MLflow server (--mlflow URL)",
                uri,
            )
        elif not server_answers(uri):
            log.warning("the MLflow server at %s does not answer /health yet", redacted_url(uri))

    def report_upstreams(self) -> None:
        """Say which of the edge's replicas answer now: one that does not is tried again by nginx, not fatal."""
        for upstream in self.options.upstreams:
            if answers_healthz(f"http://{upstream}"):
                log.info("replica %s answers /healthz", upstream)
            else:
                log.warning("replica %s does not answer /healthz yet; nginx tries it again on each request", upstream)

    # --- running ----------------------------------------------------------------------------------------

    def watch(self) -> None:
        """Until asked to stop: restart children that exit (with backoff, logged), and keep stack.json current."""
        while not self.stopping.wait(POLL_INTERVAL_S):
            for child in self.children:
                self.supervisor.tend(child)
            self.write_state()

    def restart_child(self, child: Child) -> None:
        child.start(self.env)
        child.restarts += 1

    def write_state(self) -> None:
        """stack.json: where everything is, for people and for tests (pids to signal, URLs, logs)."""
        state = {
            "pid": os.getpid(),
            "url": self.url,
            # No password: redis_url_file holds the stack's full URL; a role's is in its own settings.
            "redis_url": self.of_role("redis")[0].url if self.of_role("redis") else redacted_url(self.redis_url),
            "role": self.options.role,
            "redis_url_file": str(self.state_dir / REDIS_URL_FILE_NAME) if self.of_role("redis") else "",
            "mlflow_url": self.mlflow_url,
            # The server's admin credentials (JSON, readable by the stack's user alone).
            "mlflow_credentials_file": str(self.mlflow_dir / CREDENTIALS_NAME) if self.mlflow_url else "",
            "artifacts_dir": str(self.artifacts_dir),
            "state_dir": str(self.state_dir),
            "nginx_conf": str(self.state_dir / "nginx.conf") if self.of_role("nginx") else "",
            "children": [child.describe() for child in self.children],
        }
        temporary = self.state_file.with_suffix(".tmp")
        write_private(temporary, json.dumps(state, indent=2))
        temporary.replace(self.state_file)

    def summary(self, seconds: float) -> str:
        role = "" if self.options.role == "all" else f" ({self.options.role} role)"
        lines = [f"boolq stack{role} ready in {seconds:.1f} s; Ctrl-C (or SIGTERM to pid {os.getpid()}) stops it all."]
        if self.of_role("nginx"):
            lines.append(f"  {'API via nginx':<14} {self.url:<28} log {self.logs_dir / 'nginx-access.log'}")
        for upstream in self.options.upstreams:
            lines.append(f"  {'replica':<14} http://{upstream}")
        for child in self.children:
            if child.role != "nginx":
                lines.append(f"  {child.name:<14} {child.url or '-':<28} pid {child.pid:<7} log {child.log_path}")
        if self.options.role in ("worker", "api"):
            lines.append(f"  {'redis':<14} {redacted_url(self.redis_url)}")
            lines.append(f"  {'MLflow':<14} {redacted_url(self.settings.mlflow_tracking_uri) or '-'}")
        lines.append(f"  {'artifacts':<14} {self.artifacts_dir}")
        if self.mlflow_url:
            lines.append(f"  {'models via':<14} MLflow at {self.mlflow_url} (MLFLOW_TRACKING_URI of every process)")
            lines.append(f"  {'MLflow login':<14} {self.mlflow_dir / CREDENTIALS_NAME} (user and password)")
        lines.append(f"  {'state':<14} {self.state_file}")
        if self.options.role in ("all", "edge"):
            lines.append(f"Try: curl {self.url}/healthz")
        return "\n".join(lines)

    # --- stopping ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        """nginx first (no new requests), then replicas and workers, Redis and MLflow last (workers record job
        failures and finish uploads)."""
        for stage in (["nginx"], ["api", "worker"], ["redis", "mlflow"]):
            stop_groups([c for c in self.children if c.role in stage and c.process is not None])
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        log.info("stack stopped; no process left")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, assume other machines reach it


def probe_host(host: str) -> str:
    """The address to reach a server bound to ``host`` from this machine (a wildcard: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host)


def address(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def replica_address(raw: str) -> str:
    """A replica the edge sends requests to: ``host:port`` (``[v6]:port``), checked; raises ValueError."""
    host, _, port = raw.strip().rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535 or "/" in host or " " in host:
        raise ValueError(f"{raw!r} is not host:port (a replica's address and port, e.g. 10.0.0.7:5000)")
    return f"{host}:{int(port)}"


def redacted_url(url: str) -> str:
    """``redis://:pw@host:6379/0`` → ``redis://host:6379/0``: a URL as the stack prints and records it."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def replica_socket(state_dir: Path, number: int) -> Path:
    """Where replica ``number`` listens; a unix socket's path is limited to 107 bytes."""
    path = state_dir / f"api-{number}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise StackError(f"--state-dir {state_dir}: too long for the replicas' unix sockets; choose a shorter one")
    return path


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to a server listening on a unix socket (a replica of the native stack)."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def ask_replica(url: str, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """One request to a replica at ``unix:/path`` (the stack's) or ``http://host:port``: (status, body). Raises
    OSError or http.client.HTTPException when it cannot answer."""
    if not url.startswith("unix:"):
        response = requests.request(method, f"{url}{path}", json=body, timeout=timeout)
        return response.status_code, response.content
    connection = UnixHTTPConnection(url.removeprefix("unix:"), timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def answers_healthz(base_url: str) -> bool:
    """Whether ``http://host:port`` or ``unix:/path`` answers GET /healthz with 200."""
    try:
        return ask_replica(base_url, "GET", "/healthz", timeout=2)[0] == 200
    except (OSError, http.client.HTTPException, requests.RequestException):
        return False


def stop_groups(children: list[Child]) -> None:
    """SIGTERM every group, wait for all of them to empty, SIGKILL what is left after STOP_TIMEOUT_S."""
    for child in children:
        child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(child.group_alive() for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    for child in children:
        if child.group_alive():
            log.warning("%s did not stop within %.0f s; killing it", child.name, STOP_TIMEOUT_S)
            child.signal_group(signal.SIGKILL)
            child.process.wait()
        log.info("stopped %s (pid %d, exit code %s)", child.name, child.pid, child.exit_code)


@contextlib.contextmanager
def exclusive_state_dir(state_dir: Path):
    """One stack per state folder: two would share Redis' append-only file and nginx's pid file.

    The folder is its owner's alone (0700): it holds the Redis password, the logs and the nginx config."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    with open(state_dir / "stack.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StackError(f"another stack is running with state folder {state_dir}; use --state-dir") from exc
        yield


def print_edge_config(options: StackOptions, settings: Settings) -> int:
    """Print the nginx config ``--role edge`` would run (for teams who run their own nginx); starts nothing."""
    try:
        print(Stack(options, settings).nginx_conf(list(options.upstreams)), end="")
    except StackError as exc:
        log.error("%s", exc)
        return 1
    return 0


def run_stack(options: StackOptions, settings: Settings) -> int:
    """Start the stack, print where everything is, run until Ctrl-C/SIGTERM, stop everything. Exit code."""
    stack = Stack(options, settings)

    def request_stop(signum, _frame) -> None:
        log.info("received %s; stopping the stack", signal.Signals(signum).name)
        stack.stopping.set()

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        with exclusive_state_dir(stack.state_dir):
            try:
                stack.plan()
                stack.start()
                stack.write_state()
                print(stack.summary(time.monotonic() - started), flush=True)
                stack.watch()
                return 0
            except StackError as exc:
                if stack.stopping.is_set():  # Ctrl-C while starting: a normal stop
                    return 0
                log.error("%s", exc)
                return 1
            finally:
                stack.stop()
    except StackError as exc:
        log.error("%s", exc)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
