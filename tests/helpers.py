"""Helpers the tests share: parameters of tiny runs, polling, and real service processes (a worker,
gunicorn) configured through the same environment variables as in production."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.config import SAMPLE_DATA_DIR, Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
FULL_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "boolq"

# The tests' tiny BERT (``save_tiny_model``; the ``tiny_run`` fixture adds its folder as the model) on 48 train rows of
# 64 tokens: random weights fit them in 6 epochs at this rate (the loss falls from 0.69 to under 0.1), in seconds.
TINY_PARAMS = dict(batch_size=8, lr=1e-2, epochs=6, max_length=64, train_limit=48, eval_limit=24, seed=7)
# One tiny training job: a few seconds on a busy core.
TINY_JOB = dict(model="minilm", train_limit=16, eval_limit=8, max_length=32, epochs=1, batch_size=8)
# Headless chromium that touches no network of its own (updates, sync, first-run pages).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Two epochs of 4 steps (30 train rows after a quarter goes to dev), 32 tokens: resume and early stopping.
RESUMABLE = dict(
    model="minilm", batch_size=8, lr=1e-4, epochs=2, max_length=32, train_limit=40, eval_limit=8, dev_size=0.25, seed=7
)
# A job that runs for minutes, long enough to be cancelled or killed mid-run.
LONG_JOB = dict(model="minilm", train_limit=400, eval_limit=8, max_length=64, epochs=3, batch_size=8)


def mixed_length_pairs(n_long: int = 6) -> list[tuple[str, str]]:
    """BoolQ validation pairs (long passages) interleaved with one-line ones, so length order is not input order."""
    from app.engine.boolq import load_boolq

    long = [(row.text, row.text_pair) for row in load_boolq(SAMPLE_DATA_DIR).val[:n_long]]
    short = [("is it", "It is."), ("is water wet", "Water makes things wet."), ("is fire cold", "Fire is hot.")]
    return [pair for i, pair in enumerate(long) for pair in (pair, short[i % len(short)])]


@contextlib.contextmanager
def padding_per_forward_pass(model):
    """Collects the padding share of every forward pass of ``model`` (from its attention mask)."""
    shares: list[float] = []

    def record(_module, _args, kwargs):
        mask = kwargs["attention_mask"]
        shares.append(1 - mask.sum().item() / mask.numel())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield shares
    finally:
        handle.remove()


@contextlib.contextmanager
def one_torch_thread():
    """torch on one intra-op thread inside the block, as before after it. The tiny model's ops are too small to
    share, and on busy cores every op's second thread waits for a core: a 20-epoch tiny run took 52-60 s with two
    threads at a load of 8 on 2 cores, 5-6 s with one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll ``condition()`` until it returns something truthy; fail the test naming ``what`` otherwise."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class MlflowServer:
    """``mlflow server --serve-artifacts`` on a SQLite store in ``folder``; stopped and started again on its port.
    Open to anyone on its port, without the stack's basic auth (tests/system/test_mlflow_auth.py): the trust tests
    play whoever reached the server."""

    folder: Path
    port: int
    process: object = field(default=None, repr=False)  # its Popen while started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import subprocess

        from app.ops.mlflow_server import SERVER_ENV, mlflow_server_argv

        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(
            mlflow_server_argv(self.folder, self.port, authenticated=False),
            env=os.environ | SERVER_ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)

    def wait_until_answering(self) -> None:
        from app.ops.mlflow_server import server_answers

        def answers():
            if self.process.poll() is not None:
                pytest.fail("mlflow server exited:\n" + (self.folder / "server.log").read_text())
            return server_answers(self.url)

        wait_for(answers, 180, "the MLflow server to answer /health", interval_s=0.5)


def service_settings(redis_url: str, folder: Path, **overrides):
    """Settings for one isolated service: its own queue name and artifacts folder on the shared Redis."""
    import uuid

    defaults = dict(
        redis_url=redis_url,
        queue_name=f"test-{uuid.uuid4().hex[:8]}",
        artifacts_dir=folder / "runs",
        data_dir=SAMPLE_DATA_DIR,
        default_model="minilm",
        tracker="none",
        num_threads=1,
        max_wait=120,
    )
    return Settings().model_copy(update=defaults | overrides)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``Settings()`` in a child process equal ``settings`` (every field)."""
    env = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, tuple | list):
            value = os.pathsep.join(str(v) for v in value)
        env[name.upper()] = "" if value is None else str(value)
    return os.environ | env | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class HostUser:
    """The Unix user one simulated machine runs as (when the suite runs as root), so its processes cannot read or
    write another machine's folders; ``python`` is an interpreter with the suite's packages that this user may run."""

    name: str
    uid: int
    gid: int
    home: Path
    python: str
    python_env: dict[str, str] = field(default_factory=dict)

    def identity(self) -> dict:
        """subprocess.Popen's arguments that start a process as this user, without root's groups."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name} | self.python_env


def make_host_user(name: str, home: Path, python: tuple[str, dict[str, str]]) -> HostUser:
    """The system user ``name`` (created once, no login, no home of its own), owning ``home``; as root only."""
    import pwd
    import subprocess

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
            + ["--shell", "/usr/sbin/nologin", name],
            check=True,
        )
        entry = pwd.getpwnam(name)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    home.chmod(0o700)
    return HostUser(name, entry.pw_uid, entry.pw_gid, home, *python)


def python_for_other_users(folder: Path) -> tuple[str, dict[str, str]]:
    """An interpreter with this suite's packages that any user may run, and the variables it needs: this one, or
    where its installation sits in a folder others cannot enter (a pyenv under /root), the same installation
    hard-linked into ``folder`` (no copy; ``folder`` must be one others can enter), in a venv adding this one's
    site-packages."""
    import shutil
    import site
    import subprocess
    import sys

    def runs_for_nobody(python: str, env: dict[str, str]) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(
                [python, "-c", "import app.service.tasks"],
                cwd=REPO_ROOT,
                env=os.environ | env,
                capture_output=True,
                text=True,
                user="nobody",
                group="nogroup",
                extra_groups=[],
            )
        except PermissionError:  # the interpreter itself is out of reach
            return None

    if (ran := runs_for_nobody(sys.executable, {})) and ran.returncode == 0:
        return sys.executable, {}
    base, linked = Path(sys.base_prefix), folder / "python"
    stdlib = Path("lib") / f"python{sys.version_info.major}.{sys.version_info.minor}"
    link = {"copy_function": os.link, "symlinks": True}
    shutil.copytree(base / "bin", linked / "bin", **link)
    shutil.copytree(base / stdlib, linked / stdlib, ignore=shutil.ignore_patterns("site-packages"), **link)
    for library in (base / "lib").glob("libpython*"):
        if library.is_symlink():
            (linked / "lib" / library.name).symlink_to(library.readlink())
        else:
            os.link(library, linked / "lib" / library.name)
    env = {"LD_LIBRARY_PATH": str(linked / "lib")}  # before the interpreter's own runpath, under the closed folder
    venv = folder / "venv"
    subprocess.run(
        [str(linked / "bin" / "python3"), "-m", "venv", "--without-pip", str(venv)], env=os.environ | env, check=True
    )
    packages = next(path for path in site.getsitepackages() if path.startswith(sys.prefix))
    (venv / stdlib / "site-packages" / "suite.pth").write_text(f"import site; site.addsitedir({packages!r})\n")
    python = str(venv / "bin" / "python")
    ran = runs_for_nobody(python, env)
    assert ran is not None and ran.returncode == 0, ran and ran.stderr
    return python, env


class Launcher:
    """Starts service processes (each in its own process group) and stops every one of them at teardown."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.processes = []

    def start(self, name: str, argv: list[str], settings, env: dict | None = None, user: HostUser | None = None):
        """``python -m app`` with ``argv``, as ``user`` when given (the test runs as root)."""
        import subprocess
        import sys

        log = (self.folder / f"{name}-{len(self.processes)}.log").open("w")
        process = subprocess.Popen(
            [user.python if user else sys.executable, "-m", "app", *argv],
            cwd=REPO_ROOT,
            env=settings_env(settings) | (user.env() if user else {}) | (env or {}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **(user.identity() if user else {}),
        )
        process.log_path = Path(log.name)
        self.processes.append(process)
        return process

    def worker(self, settings, env: dict | None = None, user: HostUser | None = None):
        """A real ``python -m app worker``, returned once it has registered with Redis; ``env`` adds variables."""
        from redis import Redis
        from rq import Queue, Worker

        queue = Queue(settings.queue_name, connection=Redis.from_url(settings.redis_url))
        before = Worker.count(queue=queue)
        process = self.start("worker", ["worker"], settings, env, user)
        wait_for(lambda: Worker.count(queue=queue) > before or process.poll() is not None, 120, "the worker")
        assert process.poll() is None, process.log_path.read_text()
        return process

    def server(
        self,
        settings,
        workers: int = 2,
        env: dict | None = None,
        socket: Path | None = None,
        user: HostUser | None = None,
    ) -> str:
        """A real gunicorn (``python -m app serve``) on a free port, or on the unix socket ``socket`` as in the
        native stack; returns its URL (``http://…`` or ``unix:/…``) once it answers."""
        from app.ops.stack import answers_healthz

        if socket is None:
            port = free_port()
            where, url = ["--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}"
        else:
            where, url = ["--socket", str(socket)], f"unix:{socket}"
        process = self.start("serve", ["serve", *where, "--workers", str(workers)], settings, env, user)

        def healthy():
            if process.poll() is not None:
                pytest.fail("gunicorn exited:\n" + process.log_path.read_text())
            return answers_healthz(url)  # False while not listening yet, or still booting

        wait_for(healthy, 120, "gunicorn to answer /healthz")
        return url

    def stop_all(self) -> None:
        import os
        import signal
        import subprocess

        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextlib.contextmanager
def nginx_in_front(folder: Path, api_url: str | list[str], edge_secret: str = ""):
    """A real nginx (the template's native layout) in front of the replica(s) at ``api_url`` (``http://host:port``
    or ``unix:/path``), sending ``edge_secret``; yields nginx's URL."""
    import signal
    import subprocess

    import requests

    from app.ops.nginx_config import native_layout, render_nginx_conf
    from app.ops.stack import find_binary, free_ports

    (listen_port,) = free_ports(1)
    (folder / "logs").mkdir()
    (folder / "nginx-temp").mkdir()
    servers = [url.removeprefix("http://") for url in ([api_url] if isinstance(api_url, str) else api_url)]
    layout = native_layout(f"127.0.0.1:{listen_port}", servers, folder, edge_secret=edge_secret)
    conf = folder / "nginx.conf"
    conf.write_text(render_nginx_conf(layout))
    argv = [find_binary("nginx"), "-c", str(conf), "-p", str(folder), "-e", str(folder / "logs" / "error.log")]
    nginx = subprocess.Popen([*argv, "-g", "daemon off;"], start_new_session=True)
    url = f"http://127.0.0.1:{listen_port}"

    def answers():
        try:
            return requests.get(f"{url}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(answers, 20, "nginx in front of the replica")
        yield url
    finally:
        os.killpg(nginx.pid, signal.SIGTERM)
        nginx.wait(timeout=10)


def wait_for_state(process, state_file: Path, log_path: Path, timeout_s: float = 240) -> dict:
    """stack.json appears once Redis, every replica, the worker and nginx answer."""
    import time

    deadline = time.monotonic() + timeout_s
    while not state_file.exists():
        assert process.poll() is None, f"stack exited with {process.returncode}:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"stack not ready after {timeout_s} s:\n{log_path.read_text()}"
        time.sleep(0.25)
    return json.loads(state_file.read_text())


@contextlib.contextmanager
def running_stack(argv: list[str], folder: Path, env: dict):
    """The native stack started by ``argv`` (``python -m app stack …``) with its state and log in ``folder``;
    yields (process, the state from stack.json) once everything answers, and stops it (SIGTERM) at the end."""
    import signal
    import subprocess

    log_path = folder / "stack.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*argv, "--state-dir", str(folder / "state")], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield process, wait_for_state(process, folder / "state" / "stack.json", log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def stack_redis_url(state: dict) -> str:
    """The stack's Redis URL with its password (stack.json names the private file that holds it)."""
    return Path(state["redis_url_file"]).read_text().strip()


def work_horse_pids(worker_pid: int) -> list[int]:
    """The work horses (forked children, each running one job) of an RQ worker process."""
    children = Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def tiny_bert(attn_implementation: str = "sdpa", dropout: float = 0.0):
    """A random-init 3-layer BERT classifier (vocabulary of 100) for tests of the model code."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification._from_config(config, attn_implementation=attn_implementation)


def random_split(rows: int, seed: int = 0):
    """An encoded split of ``rows`` random token sequences (3 to 40 tokens, vocabulary of 100) with random labels."""
    import random

    from app.engine.encoding import Encoded

    rng = random.Random(seed)
    lengths = [rng.randint(3, 40) for _ in range(rows)]
    return Encoded(
        input_ids=[[rng.randint(1, 99) for _ in range(n)] for n in lengths],
        token_type_ids=[[int(i > n // 2) for i in range(n)] for n in lengths],
        labels=[rng.randint(0, 1) for _ in range(rows)],
    )


def seeded_tiny_bert(seed: int = 0):
    """``tiny_bert`` with dropout, its weights drawn from ``seed``."""
    import torch

    torch.manual_seed(seed)
    return tiny_bert(dropout=0.1)


def spread_tiny_bert(seed: int = 0):
    """``seeded_tiny_bert`` whose classifier is scaled 60x, so its probabilities spread over about 0.23-0.88 on
    ``random_split`` rows instead of 0.5 +- 0.01: a test comparing answers then catches a row answered for another
    at a tolerance that still allows bf16 rounding."""
    import torch

    model = seeded_tiny_bert(seed)
    with torch.no_grad():
        model.classifier.weight.mul_(60)
    return model


def save_tiny_checkpoint(folder, dtype, vocab_size: int = 100):
    """The same random-init tiny BERT (seed 0) saved in ``folder`` with its weights in ``dtype``."""
    import torch

    torch.manual_seed(0)
    model = tiny_bert(dropout=0.1)
    if vocab_size != model.config.vocab_size:
        model.resize_token_embeddings(vocab_size)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_model(folder, dtype=None):
    """The tiny BERT of ``save_tiny_checkpoint`` with minilm's tokenizer (and so its vocabulary): a model folder
    that training, prediction and export take like minilm's, at a few hundredths of its cost (tests/unit's
    model: a real fine-tuning run of it takes seconds on any CPU)."""
    import torch

    from app.engine.modeling import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    save_tiny_checkpoint(folder, dtype or torch.float32, len(tokenizer))
    tokenizer.save_pretrained(folder)
    return folder


def write_relation_pairs(path: Path, rows: int, seed: int = 0, source: Path | None = None) -> Path:
    """A 3-class text-pair set built from BoolQ rows (no other text classification set installs here): a question
    with its own passage is labelled by BoolQ's answer ("yes"/"no"), with an unrelated passage "unrelated". Own
    column names (query, doc, relation); CSV or JSON Lines by ``path``'s suffix."""
    import csv
    import random

    from app.engine.boolq import load_boolq

    boolq = load_boolq(source or SAMPLE_DATA_DIR)
    pool = boolq.train + boolq.val
    rng = random.Random(seed)
    records = []
    for i in range(rows):
        row = pool[i % len(pool)]
        if i % 3 == 2:
            other = pool[(i * 7 + 11) % len(pool)]
            records.append({"query": row.text, "doc": other.text_pair, "relation": "unrelated"})
        else:
            records.append({"query": row.text, "doc": row.text_pair, "relation": ("no", "yes")[row.label]})
    rng.shuffle(records)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        with path.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=["query", "doc", "relation"])
            writer.writeheader()
            writer.writerows(records)
    return path


def leave_a_mark(job, connection, *args) -> None:
    """A function an attacker names as a job's callback in Redis: it only records that it ran."""
    connection.set(f"planted-ran:{job.id}", "1")


def end_the_process(*args) -> None:
    """A callback named in Redis that ends the process calling it (RQ's handlers catch Exception, not this)."""
    raise SystemExit("a callback planted in Redis ended this process")


@contextlib.contextmanager
def webhook_listener():
    """A local HTTP server that records every request (the URL a planted webhook names); yields (url, paths)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    paths = []

    class Record(BaseHTTPRequestHandler):
        def do_POST(self):
            paths.append(self.path)
            self.send_response(204)
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()


def plant_job(connection, queue_name: str, job_id: str, status: str = "queued", **behaviour):
    """A job record written straight into Redis, as whoever can write there could: a real task of the service,
    with ``behaviour`` (RQ's ``on_failure``, ``on_success``, ``webhooks``...) naming code or a URL. A started one is
    put in the started registry already expired, as if its worker had died: maintenance will fail it."""
    from rq import Queue
    from rq.job import Job, JobStatus
    from rq.serializers import JSONSerializer

    from app.service.jobs import TRAIN_TASK

    job = Job.create(
        TRAIN_TASK,
        args=[TINY_JOB],
        connection=connection,
        serializer=JSONSerializer,
        id=job_id,
        origin=queue_name,
        status=JobStatus(status),
        **behaviour,
    )
    job.save()
    queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    if status == "started":
        connection.zadd(queue.started_job_registry.key, {job_id: 1})
    else:
        connection.rpush(queue.key, job_id)
    return job
