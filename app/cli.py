"""``python -m app``: train, predict (and the service commands). Parses arguments at the edge only."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import ValidationError
from tqdm import tqdm

from app.config import Settings
from app.engine.data import DataError
from app.engine.memory import keep_freed_memory_in_heap
from app.engine.model_names import ModelNotAvailable
from app.engine.run_folder import find_run
from app.ops.allocator import restart_with_allocator
from app.params import PER_DEVICE_BATCH_SIZE, TrainParams
from app.tracking import make_tracker

log = logging.getLogger("app")

EXIT_USAGE = 2
EXIT_FAILURE = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage dump) and exits with code 2."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


# The spellings Hugging Face's run_glue.py / TrainingArguments users type, accepted as aliases.
HF_ALIASES = {
    "lr": ["--learning-rate"],
    "epochs": ["--num-train-epochs"],
    "model": ["--model-name-or-path"],
    "eps": ["--adam-epsilon"],
    "max_length": ["--max-seq-length"],
}


def add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train",
        help="fine-tune on a dataset (default: BoolQ) and evaluate on its val split",
        description="Fine-tune on a dataset (default: the built-in BoolQ; --data for a file of your own, --dataset "
        "for one uploaded to the service) and evaluate on its val split. Each option is a field of TrainParams, the "
        "same parameters POST /train takes; they are validated by it, with the same rules.",
    )
    # Types are checked by TrainParams (one set of rules for CLI, API and jobs), so options stay strings.
    for name, info in TrainParams.model_fields.items():
        flags = [option_name(name), *HF_ALIASES.get(name, [])]
        if info.annotation is bool:  # a bare --flag means true; --flag true|false also works
            train.add_argument(*flags, dest=name, nargs="?", const="true", metavar="true|false", help=option_help(info))
        else:
            train.add_argument(*flags, dest=name, metavar=name.upper(), help=option_help(info))
    train.add_argument(
        "--per-device-train-batch-size",
        dest=PER_DEVICE_BATCH_SIZE,
        metavar="N",
        help="as in TrainingArguments: each device's batch (--batch-size = N x --devices; give one or the other)",
    )
    train.add_argument(
        "--data-dir",
        help="BoolQ: folder with train.jsonl and val.jsonl, or 'hub' (default: DATA_DIR)",
    )
    train.add_argument(
        "--data",
        help="your own dataset: a .csv, .tsv, .jsonl or .parquet file (map its columns with --text-column, "
        "--text-pair-column, --label-column; default columns: text, label), or hub:<name>[:<config>]",
    )
    train.add_argument("--val-data", help="with --data: a file of val rows (default: 10%% of --data, stratified)")
    train.add_argument(
        "--output-dir",
        help="where run folders, the local MLflow store and Neptune offline runs go (default: ARTIFACTS_DIR)",
    )
    train.add_argument("--tracker", help="mlflow, neptune, none, or a comma list (default: TRACKER)")
    train.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the results on stdout",
    )
    train.set_defaults(handler=run_train)


def add_sweep_parser(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="search hyperparameters locally (Optuna), no server; prints the leaderboard",
        description="Run a sweep in this process: the same request POST /sweeps takes, the same validation. "
        "The best trial is chosen on dev accuracy only; val accuracy is shown beside it.",
    )
    sweep.add_argument(
        "--space", required=True, type=Path, help="JSON file: a POST /sweeps body, or only its 'space' object"
    )
    sweep.add_argument("--trials", type=int, help="trials to run (default: the file's, else 8)")
    sweep.add_argument("--parallel", type=int, help="trials at once, as threads (default: the file's, else 1)")
    sweep.add_argument("--sampler", choices=("tpe", "random", "grid"), help="default: the file's, else tpe")
    sweep.add_argument("--pruner", choices=("median", "none"), help="default: the file's, else median")
    sweep.add_argument("--promote", action="store_true", help="promote the best trial to champion at the end")
    sweep.add_argument("--data-dir", help="folder with train.jsonl and val.jsonl, or 'hub' (default: DATA_DIR)")
    sweep.add_argument("--output-dir", help="where run folders and sweeps.journal go (default: ARTIFACTS_DIR)")
    sweep.add_argument("--tracker", help="mlflow, neptune, none, or a comma list (default: TRACKER)")
    sweep.add_argument("--json", action="store_true", help="print the sweep's view as one JSON object")
    sweep.set_defaults(handler=run_sweep)


def run_sweep(args: argparse.Namespace, settings: Settings) -> int:
    from app.service import sweeps  # why: optuna and redis, which `train --help` and a GPU image do without

    try:
        body = json.loads(args.space.read_text())
    except (OSError, ValueError) as exc:
        return usage_error(f"--space: {exc}")
    body = body if isinstance(body, dict) and "space" in body else {"space": body}
    overrides = {"trials": args.trials, "parallel": args.parallel, "sampler": args.sampler, "pruner": args.pruner}
    body |= {k: v for k, v in overrides.items() if v is not None} | ({"promote": True} if args.promote else {})
    overrides = dict(tracker=args.tracker, data_dir=args.data_dir, artifacts_dir=args.output_dir)
    settings = settings.model_copy(update={k: Path(v) if k.endswith("dir") else v for k, v in overrides.items() if v})
    try:
        request = sweeps.SweepRequest(**body)
        base = sweeps.validate_request(request, settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        return usage_error(f"{'.'.join(map(str, first['loc']))}: {first['msg']}")
    except sweeps.SweepError as exc:
        return usage_error(str(exc))
    quiet_libraries()
    from app.service.sweeps.trials import run_local_sweep  # why: torch loads here, once the request is valid

    view = run_local_sweep(request, base, settings)
    print(json.dumps(view) if args.json else leaderboard_table(view))
    return 0


def leaderboard_table(view: dict) -> str:
    """The sweep's leaderboard as text, best dev accuracy first."""
    lines = [f"sweep {view['sweep_id']}: {view['status']}, {view['trials']} trials, {view['sampler']} sampler"]
    lines.append(f"{'rank':>4} {'trial':>5} {'status':<9} {'dev acc':>7} {'val acc':>7}  dev per epoch  params")
    for rank, row in enumerate(view["leaderboard"], 1):
        dev = f"{row['dev_accuracy']:.4f}" if row["dev_accuracy"] is not None else "-"
        val = f"{row['val_accuracy']:.4f}" if row["val_accuracy"] is not None else "-"
        per_epoch = "[" + ", ".join(f"{a:.3f}" for a in row["dev_accuracy_per_epoch"]) + "]"
        lines.append(
            f"{rank:>4} {row['trial']:>5} {row['status']:<9} {dev:>7} {val:>7}  {per_epoch:<13}  "
            f"{json.dumps(row['params'])}"
        )
    best = view["best"]
    if best is None:
        lines.append("no trial succeeded")
    else:
        lines.append(f"best (chosen on dev accuracy): trial {best['trial']}, run folder {best['run_dir']}")
    registration = view.get("registration") or {}
    if registration.get("version"):
        promoted = ", promoted to champion" if registration.get("promoted") else ""
        lines.append(f"registered as version {registration['version']}{promoted}")
    return "\n".join(lines)


def add_predict_parser(commands) -> None:
    predict = commands.add_parser("predict", help="classify a text (or text pair) with a fine-tuned run")
    predict.add_argument(
        "--model",
        "--model-dir",
        dest="model",
        required=True,
        help="latest (the newest finished run under ARTIFACTS_DIR), a run or job id, or a run folder or its model/",
    )
    # --question/--passage: BoolQ's words for the text and its pair, kept for the commands users already have.
    predict.add_argument("--text", "--question", dest="text", required=True)
    predict.add_argument("--text-pair", "--passage", dest="text_pair")
    predict.add_argument("--top-k", type=int, help="also print the k most probable labels' scores")
    predict.set_defaults(handler=run_predict)


def add_export_parser(commands) -> None:
    export = commands.add_parser(
        "export",
        help="write a fine-tuned model as a folder ONNX Runtime and Optimum load as is",
        description="model.onnx + config.json (label names) + the tokenizer (truncating as the run trained): "
        "Optimum's ORTModelForSequenceClassification layout.",
    )
    export.add_argument("model", help="a job id, a run folder under ARTIFACTS_DIR or MODEL_ROOTS, or champion")
    export.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (the one format so far)")
    export.add_argument("--quantize", choices=("int8",), help="dynamic int8 quantization of the weights")
    export.add_argument("--output-dir", type=Path, help="where to write (default: exports/<model>-onnx[-int8])")
    export.set_defaults(handler=run_export)


def add_datasets_parser(commands) -> None:
    datasets = commands.add_parser(
        "datasets",
        help="upload a dataset to the service's store, or list the stored ones",
        description="The service's dataset store (ARTIFACTS_DIR and REDIS_URL, as its replicas use them): the same "
        "checks and the same ids as POST /datasets.",
    )
    actions = datasets.add_subparsers(dest="action", required=True)
    upload = actions.add_parser("upload", help="check a .csv, .tsv, .jsonl or .parquet file and store it")
    upload.add_argument("file", type=Path)
    upload.add_argument("--text-column", default="text")
    upload.add_argument("--text-pair-column")
    upload.add_argument("--label-column", default="label")
    actions.add_parser("list", help="the stored datasets, newest first")
    datasets.set_defaults(handler=run_datasets)


def run_datasets(args: argparse.Namespace, settings: Settings) -> int:
    # why (this command's imports): redis, which the other commands do without (a GPU image has none)
    from app.service import datasets
    from app.service.redis_connection import connect_redis

    store = datasets.DatasetStore(settings, connect_redis(settings))
    if args.action == "list":
        for record in store.records():
            print(f"{record.id}  {record.filename}  rows {record.rows}  labels {', '.join(record.label_names[:10])}")
        return 0
    mapping = datasets.ColumnMapping(
        text_column=args.text_column, text_pair_column=args.text_pair_column, label_column=args.label_column
    )
    try:
        with args.file.open("rb") as stream:
            record, created = store.store_upload(stream, args.file.name, None, mapping)
    except OSError as exc:
        return usage_error(f"file: {exc}")
    except (datasets.DatasetInvalid, datasets.DatasetTooLarge) as exc:
        return usage_error(str(exc))
    print(json.dumps(datasets.record_json(record) | {"created": created}))
    return 0


def add_keys_parser(commands) -> None:
    keys = commands.add_parser(
        "keys",
        help="create, list or revoke the service's API keys (each with a role: admin, trainer, reader)",
        description="The service's API keys, in its Redis (REDIS_URL, QUEUE_NAME): each has a name and a role "
        "(docs/security.md). Once one exists, every request needs a key, as with API_TOKEN.",
    )
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it (the only time it is shown)")
    create.add_argument("--name", required=True, help="lower-case letters, digits, '.', '_' or '-'; unique")
    create.add_argument("--role", required=True, choices=("admin", "trainer", "reader"))
    actions.add_parser("list", help="names, roles, when created and last used (never the keys)")
    revoke = actions.add_parser("revoke", help="revoke a key: refused from the next request on")
    revoke.add_argument("name")
    keys.set_defaults(handler=run_keys)


def run_keys(args: argparse.Namespace, settings: Settings) -> int:
    # why (this command's imports): redis, which the other commands do without (a GPU image has none)
    from app.service.audit import AuditLog
    from app.service.keys import KeyExists, KeyNotFound, KeyStore
    from app.service.redis_connection import connect_redis

    connection = connect_redis(settings)
    store, audit = KeyStore(settings, connection), AuditLog(settings, connection)
    if args.action == "list":
        for view in store.list():
            used = isoformat(view.last_used_at) if view.last_used_at else "never"
            print(f"{view.name}  {view.role}  created {isoformat(view.created_at)}  last used {used}")
        return 0
    try:
        if args.action == "create":
            print(store.create(args.name, args.role))
            audit.record("cli", None, "create_key", f"{args.name} ({args.role})")
        else:
            store.revoke(args.name)
            audit.record("cli", None, "revoke_key", args.name)
    except ValidationError:
        return usage_error(f"--name: {args.name!r} is not a key name (lower-case letters, digits, '.', '_', '-')")
    except (KeyExists, KeyNotFound) as exc:
        print(f"python -m app: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def isoformat(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="serve the REST API with gunicorn (app/ops/gunicorn_conf.py)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1; a container gives 0.0.0.0)"
    )
    serve.add_argument("--port", type=int, help="port (default: PORT or 5000)")
    serve.add_argument(
        "--socket",
        type=Path,
        help="listen on this unix socket instead of --host/--port (the native stack's replicas: only nginx, "
        "which shares the socket's private folder, reaches them)",
    )
    serve.add_argument("--workers", type=int, help="worker processes (default: WEB_WORKERS or 2)")
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Replace this process with gunicorn, so signals and exit codes are gunicorn's own."""
    config = Path(__file__).resolve().parent / "ops" / "gunicorn_conf.py"
    port = args.port if args.port is not None else settings.port
    bind = f"unix:{args.socket.resolve()}" if args.socket else f"{args.host}:{port}"
    if not args.socket and not settings.edge_secret:
        log.warning(
            "serving on %s:%d without EDGE_SECRET: whatever can connect there bypasses nginx's limits "
            '(fine for local development; see docs/security.md, "Replicas only behind nginx")',
            args.host,
            port,
        )
    argv = [sys.executable, "-m", "gunicorn", "--config", str(config), "--bind", bind]
    if args.workers is not None:
        if args.workers < 1:
            return usage_error("--workers: must be at least 1")
        argv += ["--workers", str(args.workers)]
    os.execv(sys.executable, [*argv, "app.api:create_app()"])


def add_worker_parser(commands) -> None:
    worker = commands.add_parser("worker", help="run an RQ worker for training jobs (REDIS_URL, QUEUE_NAME)")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    # why: torch, loaded once here (not by the other commands), so each forked job starts without importing it
    import app.service.tasks  # noqa: F401
    from app.service.jobs import training_queue
    from app.service.redis_connection import connect_redis
    from app.service.workers import make_worker, periodic_check

    quiet_libraries()
    queue = training_queue(settings, connect_redis(settings))
    worker = make_worker(settings, on_maintenance=lambda: periodic_check(settings, queue))
    worker.work(burst=args.burst, logging_level="INFO")
    return 0


def add_stack_parser(commands) -> None:
    stack = commands.add_parser(
        "stack",
        help="run redis, API replicas, workers and nginx locally (the docker-compose topology, no Docker), "
        "or one role of several machines (docs/several-machines.md)",
    )
    stack.add_argument(
        "--role",
        choices=("all", "worker", "api", "edge"),
        default="all",
        help="all: everything here (default); worker: RQ workers; api: replicas on TCP --host/--port (EDGE_SECRET "
        "off loopback); edge: nginx in front of --replica addresses, sending EDGE_SECRET",
    )
    stack.add_argument("--replicas", type=int_at_least(1), help="API replicas (default: 3; --role api: 1)")
    stack.add_argument("--workers", type=int_at_least(0), default=2, help="RQ worker processes (default: 2)")
    stack.add_argument(
        "--port",
        type=int_at_least(1),
        help="nginx port (default: 4000); --role api: the first replica's (default: PORT, 5000), the next +1",
    )
    stack.add_argument(
        "--host", default="127.0.0.1", help="nginx's (--role api: the replicas') address (default: 127.0.0.1)"
    )
    stack.add_argument(
        "--web-workers", type=int_at_least(1), default=1, help="gunicorn processes per replica (default: 1)"
    )
    stack.add_argument(
        "--state-dir", type=Path, help="config, logs and Redis data (default: ARTIFACTS_DIR/.stack[-ROLE])"
    )
    stack.add_argument("--redis-port", type=int_at_least(1), default=0, help="Redis port (default: a free one)")
    stack.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        metavar="URL",
        help="alone (--role all): also run an MLflow tracking server (artifacts served by it) that models travel "
        "through; with a URL (--role worker, api): that server, as MLFLOW_TRACKING_URI",
    )
    stack.add_argument("--redis", metavar="URL", help="--role worker, api: the service's Redis, as REDIS_URL")
    stack.add_argument(
        "--replica",
        dest="upstreams",
        type=replica_addresses,
        action="extend",
        metavar="HOST:PORT[,...]",
        help="--role edge: a replica nginx sends requests to (repeat it, or a comma list)",
    )
    stack.add_argument(
        "--print-config",
        action="store_true",
        help="--role edge: print the nginx config it would run (EDGE_SECRET included) and start nothing",
    )
    stack.set_defaults(handler=run_stack)


def replica_addresses(raw: str) -> list[str]:
    """An argparse type: ``host:port`` or a comma list of them, each checked."""
    from app.ops.stack import replica_address  # why: as in run_stack (redis, rq, requests)

    try:
        return [replica_address(part) for part in raw.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_gc_parser(commands) -> None:
    gc = commands.add_parser(
        "gc",
        help="delete old run folders here and old runs on MLflow, and what killed attempts left (docs/lifecycle.md)",
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted (paths, sizes), delete nothing")
    gc.add_argument(
        "--older-than", type=float, metavar="DAYS", help="finished runs older than this go (RETENTION_DAYS; 0: none)"
    )
    gc.add_argument(
        "--keep-last", type=int_at_least(0), metavar="N", help="the newest N finished runs stay (RETENTION_KEEP_LAST)"
    )
    gc.set_defaults(handler=run_gc)


def run_gc(args: argparse.Namespace, settings: Settings) -> int:
    from app.service.retention import Policy, collect_garbage  # why: rq, redis and MLflow's client, for gc alone

    if args.older_than is not None and args.older_than < 0:
        return usage_error("--older-than: must be 0 or more days")
    policy = Policy.from_settings(settings)
    policy = Policy(
        policy.older_than_days if args.older_than is None else args.older_than,
        policy.keep_last if args.keep_last is None else args.keep_last,
    )
    doomed = collect_garbage(settings, policy, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for item in doomed:
        print(f"{verb} {item.where} {item.name} (job {item.job_id}) {item.size / 1e6:.1f} MB: {item.reason}")
    local = sum(item.size for item in doomed if item.where == "local")
    remote = sum(item.size for item in doomed if item.where == "mlflow")
    print(f"{verb} {len(doomed)} item(s): {local / 1e6:.1f} MB on this host, {remote / 1e6:.1f} MB on MLflow")
    return 0


def add_demo_parser(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="start the stack, train minilm on the bundled sample through nginx, ask one question, stop",
    )
    demo.add_argument("--port", type=int_at_least(1), default=4000, help="nginx port (default: 4000)")
    demo.set_defaults(handler=run_demo)


def int_at_least(minimum: int):
    """An argparse type: an integer ≥ minimum, with a one-line error naming the rule."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {raw!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m app", description="Fine-tune and serve BERT on BoolQ.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    add_train_parser(commands)
    add_sweep_parser(commands)
    add_predict_parser(commands)
    add_export_parser(commands)
    add_datasets_parser(commands)
    add_keys_parser(commands)
    add_serve_parser(commands)
    add_worker_parser(commands)
    add_stack_parser(commands)
    add_demo_parser(commands)
    add_gc_parser(commands)
    return parser


def option_help(info) -> str:
    """The field's description, its default and its bounds, e.g. 'AdamW learning rate. (default: 5e-05; > 0, ≤ 1)'."""
    symbols = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥", "max_length": "length ≤"}
    bounds = [f"{symbols[key]} {getattr(rule, key)}" for rule in info.metadata for key in symbols if hasattr(rule, key)]
    default = "none" if info.default is None else info.default
    return f"{info.description} (default: {default}{'; ' + ', '.join(bounds) if bounds else ''})"


def parse_train_params(args: argparse.Namespace) -> TrainParams:
    """Validate the given options with TrainParams, parsing each string as its field's type ('32' → 32)."""
    names = [*TrainParams.model_fields, PER_DEVICE_BATCH_SIZE]
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return TrainParams.model_validate_strings(given)


def describe_validation_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "arguments"
    return f"{option_name(field)}: {first['msg']}"


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    try:
        params = parse_train_params(args)
    except ValidationError as exc:
        return usage_error(describe_validation_error(exc))
    if args.tracker:
        settings = settings.model_copy(update=dict(tracker=args.tracker))
    if args.output_dir:  # the local MLflow store and Neptune offline folder go with the run folders
        settings = settings.model_copy(update=dict(artifacts_dir=Path(args.output_dir)))
    if args.data_dir:
        settings = settings.model_copy(update=dict(data_dir=args.data_dir))
    try:
        params, dataset = dataset_to_train_on(args, params, settings)
    except ValueError as exc:  # DataError, DatasetNotFound: the data's problem, named
        return usage_error(str(exc))
    try:
        tracker = make_tracker(settings)
    except ValueError as exc:
        return usage_error(str(exc))
    quiet_libraries()
    from app.engine import distributed  # why: torch loads here, once the options are valid
    from app.engine.run import run_training

    if distributed.launched_by_torchrun():
        return train_as_rank(args, params, settings, tracker)
    if params.devices > 1:
        return launch_ranks(args, params, settings)
    keep_freed_memory_in_heap()

    with ProgressBar() as bar:
        result = run_training(
            params, settings, on_progress=bar.update, tracker=tracker, resumable=False, dataset=dataset
        )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(summary(result))
    return 0


def dataset_to_train_on(args: argparse.Namespace, params: TrainParams, settings: Settings):
    """``(params, spec)``: with ``--data``, the file checked now (exit 2 naming the problem) and ``params.dataset``
    set to its id; with ``--dataset``, the service's stored dataset; else BoolQ (spec None)."""
    if args.data:
        from app.service import datasets  # why: redis, which a BoolQ run does without (a GPU image has none)

        spec, dataset_id = datasets.local_file_spec(args.data, args.val_data, params)
        return params.model_copy(update={"dataset": dataset_id}), spec
    if params.dataset != params.model_fields["dataset"].default:
        from app.service import datasets  # why: as above
        from app.service.redis_connection import connect_redis

        return params, datasets.DatasetStore(settings, connect_redis(settings)).spec_for_training(params)
    return params, None


def launch_ranks(args: argparse.Namespace, params, settings: Settings) -> int:
    """``--devices N``: run this same command as N ranks through torchrun; its exit code (non-zero if a rank failed)."""
    from app.engine import distributed  # why: torch, which only training loads

    try:
        return distributed.launch_ranks(params.devices, ["app", *args.argv], settings)
    except distributed.DevicesNotAvailable as exc:
        return usage_error(f"--devices: {exc}")


def train_as_rank(args: argparse.Namespace, params, settings: Settings, tracker) -> int:
    """One of torchrun's ranks: train in its process group; rank 0 prints the results as a one-process run does."""
    from app.engine import distributed  # why: torch, which only training loads
    from app.engine.run import run_training

    keep_freed_memory_in_heap()
    with distributed.process_group(settings.device) as device, ProgressBar() as bar:
        ranks = distributed.world_size()
        if args.devices is not None and params.devices != ranks:
            return usage_error(f"--devices: {params.devices}, but torchrun started {ranks} processes")
        result = run_training(
            params.model_copy(update={"devices": ranks}),
            settings,
            on_progress=bar.update,
            tracker=tracker,
            rank_device=device,
            resumable=False,
        )
    if result is not None:  # rank 0
        print(json.dumps(result.to_dict()) if args.json else summary(result))
    return 0


def summary(result) -> str:
    m = result.metrics
    lines = [
        f"val accuracy {result.accuracy:.4f} on {result.n_eval} examples "
        f"({'F1' if len(m['label_names']) == 2 else 'macro-F1'} {m['f1']:.4f}, "
        f"majority baseline {m['majority_baseline']:.4f}); "
        f"dev accuracy per epoch {[round(a, 4) for a in m['dev_accuracy_per_epoch']]}; "
        f"{m['train_examples_per_s']:.1f} train examples/s",
    ]
    if not m["learned"]:
        lines.append(
            "WARNING: the model learned nothing: its accuracy is within 1 point of always answering the majority "
            "class. Train on more rows or for longer."
        )
    lines.append(f"run folder: {result.run_dir}")
    lines += [f"tracking ({name}): {json.dumps(refs)}" for name, refs in result.tracking.items() if refs]
    example = "--text 'is the sky blue' --text-pair 'The sky appears blue because of Rayleigh scattering.'"
    if result.params.get("dataset") != TrainParams.model_fields["dataset"].default:
        example = "--text '<a text>'" + (" --text-pair '<its pair>'" if result.params.get("text_pair_column") else "")
    lines.append(f"ask it: {as_pasted(sys.executable)} -m app predict --model {as_pasted(result.run_dir)} {example}")
    return "\n".join(lines)


def as_pasted(path: str | Path) -> str:
    """A path as a user can paste it here: relative when it is below the current folder (the venv's python)."""
    try:
        return shlex.quote(str(Path(path).absolute().relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(path))


class ProgressBar:
    """A tqdm bar over optimisation steps, on stderr, fed by the engine's progress callback."""

    def __enter__(self):
        self.bar = None
        return self

    def update(self, progress) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=progress.total_steps,
                desc="training",
                unit="step",
                file=sys.stderr,
            )
        self.bar.n = progress.step
        postfix = {
            "epoch": f"{progress.epoch}/{progress.epochs}",
            "loss": f"{progress.loss:.4f}",
        }
        if progress.dev_accuracy is not None:
            postfix["dev_acc"] = f"{progress.dev_accuracy:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def run_predict(args: argparse.Namespace, settings: Settings) -> int:
    quiet_libraries()
    from app.service.predict import ModelDirError, load_predictor  # why: torch, which only predicting loads
    from app.service.serve_backend import Backend  # why: redis, which the GPU image's `train` runs without

    try:
        folder = find_run(settings.artifacts_dir, args.model)
        predictor = load_predictor(
            folder, settings.predict_max_padding, settings.num_threads, Backend.from_settings(settings)
        )
    except (ModelDirError, FileNotFoundError) as exc:
        return usage_error(f"--model: {exc}")
    (answer,) = predictor.predict([(args.text, args.text_pair)])
    print(json.dumps(answer.to_dict(top_k=args.top_k or 0)))
    return 0


def run_export(args: argparse.Namespace, settings: Settings) -> int:
    quiet_libraries()
    # why (this command's imports): torch, ONNX and redis, which the other commands do without
    from redis.exceptions import RedisError

    from app.service.export import export_onnx_folder, model_to_export
    from app.service.jobs import training_queue
    from app.service.model_access import ModelNotAllowed
    from app.service.model_store import ModelRefused, ModelStoreUnavailable
    from app.service.redis_connection import connect_redis
    from app.service.serving import NoModelYet

    try:
        folder = model_to_export(args.model, settings, training_queue(settings, connect_redis(settings)))
    except (ModelNotAllowed, NoModelYet) as exc:
        return usage_error(f"model: {exc}")
    except (RedisError, ModelStoreUnavailable, ModelRefused) as exc:  # champion's pointer, or a model to fetch
        print(f"python -m app: error: {args.model}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    suffix = f"-{args.quantize}" if args.quantize else ""
    destination = args.output_dir or Path("exports") / f"{Path(args.model).name}-{args.format}{suffix}"
    written = export_onnx_folder(folder, destination, args.quantize or "none")
    print(json.dumps({"model": args.model, "exported_from": str(folder), "output_dir": str(written)}))
    return 0


def run_stack(args: argparse.Namespace, settings: Settings) -> int:
    from app.ops.stack import StackOptions, print_edge_config, run_stack  # why: redis, rq and requests, for stack alone

    role = args.role
    mistake = stack_flag_mistake(args)
    if mistake:
        return usage_error(mistake)
    # The flags are conveniences for the settings every process reads: the children get them as REDIS_URL and
    # MLFLOW_TRACKING_URI.
    updates = {"redis_url": args.redis, "mlflow_tracking_uri": args.mlflow or None}
    settings = settings.model_copy(update={name: value for name, value in updates.items() if value})
    options = StackOptions(
        replicas=args.replicas or (1 if role == "api" else 3),
        workers=args.workers,
        host=args.host,
        port=args.port or (settings.port if role == "api" else 4000),
        web_workers=args.web_workers,
        state_dir=args.state_dir,
        redis_port=args.redis_port,
        mlflow=args.mlflow == "",
        role=role,
        upstreams=tuple(args.upstreams or ()),
    )
    if args.redis and urlsplit(args.redis).password:
        log.warning("--redis shows its password to every local user (ps); REDIS_URL in the environment does not")
    if args.print_config:
        return print_edge_config(options, settings)
    return run_stack(options, settings)


def stack_flag_mistake(args: argparse.Namespace) -> str:
    """What is wrong with this combination of ``stack`` flags and ``--role``, or ''."""
    role = args.role
    if args.mlflow == "" and role != "all":
        return "--mlflow without a URL runs a tracking server with --role all only; give the server's URL"
    if args.mlflow and role not in ("worker", "api"):
        return "--mlflow URL: for --role worker or api (the processes that talk to the tracking server)"
    if args.mlflow and not args.mlflow.startswith(("http://", "https://")):
        return f"--mlflow {args.mlflow!r}: must be the tracking server's http:// or https:// URL"
    if args.redis and role not in ("worker", "api"):
        return "--redis: for --role worker or api (--role all runs its own Redis)"
    if args.redis and not args.redis.startswith(("redis://", "rediss://", "unix://")):
        return f"--redis {args.redis!r}: must be a redis://, rediss:// or unix:// URL"
    if (args.upstreams or args.print_config) and role != "edge":
        return "--replica and --print-config: for --role edge"
    if role == "edge" and not args.upstreams:
        return "--role edge needs its replicas: --replica HOST:PORT (repeat it, or a comma list)"
    if role in ("worker", "edge") and args.replicas:
        return f"--replicas: not for --role {role}"
    return ""


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from app.ops.demo import DemoOptions, run_demo  # why: requests, which training does without

    return run_demo(DemoOptions(port=args.port), settings)


def usage_error(message: str) -> int:
    print(f"python -m app: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def quiet_libraries() -> None:
    """Keep transformers' load reports and save progress bars off the user's terminal."""
    import transformers  # why: torch; `--help` and the service commands load neither

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --devices N runs again on each rank
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        return usage_error(f"environment variable {str(first['loc'][0]).upper()}: {first['msg']}")
    if argv is None and args.handler in (run_train, run_sweep, run_worker):  # a process of its own that trains
        restart_with_allocator(settings)
    try:
        return args.handler(args, settings)
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise
        print(f"python -m app: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that say what to fix in one line (exit 1, no traceback)."""
    from app.engine.modeling import DeviceNotAvailable  # why: torch, imported only once an error happened
    from app.ops.demo import DemoError  # why: requests, as in run_demo

    return DataError, DemoError, DeviceNotAvailable, ModelNotAvailable
