"""``python -m app``: train, predict (and the service commands). Parses arguments at the edge only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from pydantic import ValidationError

from app.config import Settings
from app.params import TrainParams

log = logging.getLogger("app")

EXIT_USAGE = 2
EXIT_FAILURE = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage dump) and exits with code 2."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_train_parser(commands) -> None:
    train = commands.add_parser("train", help="fine-tune on BoolQ and evaluate on val")
    # Types are checked by TrainParams (one set of rules for CLI, API and jobs), so options stay strings.
    for name, info in TrainParams.model_fields.items():
        train.add_argument(option_name(name), dest=name, metavar=name.upper(), help=info.description)
    train.add_argument(
        "--data-dir",
        help="folder with train.jsonl and val.jsonl, or 'hub' (default: DATA_DIR)",
    )
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


def add_predict_parser(commands) -> None:
    predict = commands.add_parser("predict", help="answer a yes/no question with a fine-tuned run")
    predict.add_argument(
        "--model-dir",
        required=True,
        help="a run folder (runs/<id>) or its model/ folder",
    )
    predict.add_argument("--question", required=True)
    predict.add_argument("--passage", required=True)
    predict.set_defaults(handler=run_predict)


def add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="serve the REST API with gunicorn (app/gunicorn_conf.py)")
    serve.add_argument("--host", default="0.0.0.0", help="interface to bind (default: 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default: PORT or 5000)")
    serve.add_argument("--workers", type=int, help="worker processes (default: WEB_WORKERS or 2)")
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Replace this process with gunicorn, so signals and exit codes are gunicorn's own."""
    import os

    config = Path(__file__).resolve().parent / "gunicorn_conf.py"
    port = args.port if args.port is not None else settings.port
    argv = [sys.executable, "-m", "gunicorn", "--config", str(config), "--bind", f"{args.host}:{port}"]
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
    import app.training  # noqa: F401  (loaded once here, so each forked job starts without importing torch)
    from app.jobs import make_worker

    quiet_libraries()
    worker = make_worker(settings)
    worker.work(burst=args.burst, logging_level="INFO")
    return 0


def add_stack_parser(commands) -> None:
    stack = commands.add_parser(
        "stack",
        help="run redis, API replicas, workers and nginx locally (the docker-compose topology, no Docker)",
    )
    stack.add_argument("--replicas", type=int_at_least(1), default=3, help="API replicas (default: 3)")
    stack.add_argument("--workers", type=int_at_least(0), default=2, help="RQ worker processes (default: 2)")
    stack.add_argument("--port", type=int_at_least(1), default=4000, help="nginx port (default: 4000)")
    stack.add_argument("--host", default="127.0.0.1", help="nginx address (default: 127.0.0.1; 0.0.0.0 for all)")
    stack.add_argument(
        "--web-workers", type=int_at_least(1), default=1, help="gunicorn processes per replica (default: 1)"
    )
    stack.add_argument("--state-dir", type=Path, help="config, logs and Redis data (default: ARTIFACTS_DIR/stack)")
    stack.add_argument("--redis-port", type=int_at_least(1), default=0, help="Redis port (default: a free one)")
    stack.set_defaults(handler=run_stack)


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
    add_predict_parser(commands)
    add_serve_parser(commands)
    add_worker_parser(commands)
    add_stack_parser(commands)
    return parser


def parse_train_params(args: argparse.Namespace) -> TrainParams:
    """Coerce the given options to the model's types, then validate with TrainParams."""
    given = {}
    for name, info in TrainParams.model_fields.items():
        raw = getattr(args, name)
        if raw is None:
            continue
        given[name] = coerce_option(raw, info.annotation)
    return TrainParams(**given)


BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def coerce_option(raw: str, annotation) -> object:
    """'32' → 32, '5e-5' → 5e-05, 'true' → True; anything unparsable stays a string for pydantic to reject by name."""
    text = str(annotation)
    if "bool" in text:
        return BOOLEAN_WORDS.get(raw.lower(), raw)
    for kind in (int, float):
        if kind.__name__ in text:
            try:
                return kind(raw)
            except ValueError:
                continue
    return raw


def describe_validation_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "arguments"
    return f"{option_name(field)}: {first['msg']}"


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    from app.tracking import make_tracker
    from app.training import train_and_evaluate

    try:
        params = parse_train_params(args)
    except ValidationError as exc:
        return usage_error(describe_validation_error(exc))
    if args.tracker:
        settings = replace(settings, tracker=args.tracker)
    if args.output_dir:  # the local MLflow store and Neptune offline folder go with the run folders
        settings = replace(settings, artifacts_dir=Path(args.output_dir))
    try:
        tracker = make_tracker(settings)
    except ValueError as exc:
        return usage_error(str(exc))
    data_dir = args.data_dir or settings.data_dir
    output_dir = settings.artifacts_dir
    with ProgressBar() as bar:
        result = train_and_evaluate(
            params,
            data_dir,
            output_dir,
            num_threads=settings.num_threads,
            device=settings.device,
            on_progress=bar.update,
            tracker=tracker,
        )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(summary(result))
    return 0


def summary(result) -> str:
    m = result.metrics
    return (
        f"val accuracy {result.accuracy:.4f} on {result.n_eval} examples "
        f"(F1 {m['f1']:.4f}, majority baseline {m['majority_baseline']:.4f}); "
        f"dev accuracy per epoch {[round(a, 4) for a in m['dev_accuracy_per_epoch']]}; "
        f"{m['train_examples_per_s']:.1f} train examples/s\n"
        f"run folder: {result.run_dir} (params.json, metrics.json, predictions.jsonl, model/)"
        + "".join(f"\ntracking ({name}): {json.dumps(refs)}" for name, refs in result.tracking.items() if refs)
    )


class ProgressBar:
    """A tqdm bar over optimisation steps, on stderr, fed by the engine's progress callback."""

    def __enter__(self):
        self.bar = None
        return self

    def update(self, progress) -> None:
        from tqdm import tqdm

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
    from app.predict import ModelDirError, Predictor

    try:
        predictor = Predictor(args.model_dir)
    except ModelDirError as exc:
        return usage_error(f"--model-dir: {exc}")
    if settings.num_threads > 0:
        import torch

        torch.set_num_threads(settings.num_threads)
    (answer,) = predictor.predict([(args.question, args.passage)])
    print(json.dumps(answer.to_dict()))
    return 0


def run_stack(args: argparse.Namespace, settings: Settings) -> int:
    from app.stack import StackOptions, run_stack

    options = StackOptions(
        replicas=args.replicas,
        workers=args.workers,
        host=args.host,
        port=args.port,
        web_workers=args.web_workers,
        state_dir=args.state_dir,
        redis_port=args.redis_port,
    )
    return run_stack(options, settings)


def usage_error(message: str) -> int:
    print(f"python -m app: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def quiet_libraries() -> None:
    """Keep transformers' load reports and save progress bars off the user's terminal."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from app.data import DataError
    from app.modeling import DeviceNotAvailable, ModelNotAvailable

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        return usage_error(str(exc))
    if args.command in ("train", "predict"):
        quiet_libraries()
    try:
        return args.handler(args, settings)
    except (DataError, DeviceNotAvailable, ModelNotAvailable) as exc:
        print(f"python -m app: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
