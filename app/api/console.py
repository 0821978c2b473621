"""The web console: server-rendered pages (Jinja) over the JSON API, plus the two views the pages need that
the API does not offer: a job's live curves and its predictions joined with the val rows' texts.

Every URL the pages use is built from ``request.script_root``, so the console works on gunicorn's port and
behind nginx alike. Templates autoescape; the scripts write user strings with ``textContent`` only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from flask import Blueprint, jsonify, render_template, request, url_for
from pydantic import Field, field_validator

from app.api.auth import allowed, auth_required, may, owner_scope
from app.api.body import parse
from app.api.context import current_service
from app.api.jobs import find_job
from app.params import StrictModel, TrainParams, field_kinds
from app.service import jobs
from app.service.model_access import with_default_model
from app.service.predictions import read_job_predictions, val_examples_by_idx

APP_DIR = Path(__file__).resolve().parent.parent
bp = Blueprint(
    "console",
    __name__,
    template_folder=str(APP_DIR / "templates"),
    static_folder=str(APP_DIR / "static"),
    static_url_path="/console/static",
)

# Scripts and styles come from this origin only; Swagger UI and uPlot set inline styles.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")  # the filter's options
TEXT_EXCERPT = 240
BOUND_KEYWORDS = {
    "ge": ("minimum", "ge"),
    "gt": ("exclusiveMinimum", "gt"),
    "le": ("maximum", "le"),
    "lt": ("exclusiveMaximum", "lt"),
}


class ConsoleJobsQuery(StrictModel):
    """Query string of the Jobs page and its data."""

    page: int = Field(1, ge=1)
    per_page: int = Field(20, ge=1, le=100)
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None

    @field_validator("status", mode="before")
    @classmethod
    def all_statuses(cls, value):
        return value or None  # the filter's "all" option sends status=


class ConsolePredictionsQuery(StrictModel):
    """Query string of a job's predictions table."""

    page: int = Field(1, ge=1)
    per_page: int = Field(20, ge=1, le=200)
    wrong_only: bool = False


@bp.after_request
def protect(response):
    if response.mimetype == "text/html":
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
    return response


@bp.app_context_processor
def console_globals():
    return {"auth_required": auth_required(), "api_root": request.script_root}


@bp.get("/")
def jobs_page():
    query = parse(ConsoleJobsQuery, request.args.to_dict(), where="query")
    if may("read"):  # else the page carries no job data: its script fetches it with the key
        listing = job_listing(query)
    else:
        listing = {"jobs": [], "page": query.page, "per_page": query.per_page, "pages": 1, "total": 0, "hidden": True}
    return render_template("console/jobs.html", listing=listing, statuses=JOB_STATUSES, query=query)


@bp.get("/console/jobs")
@allowed("read")
def jobs_rows():
    """The Jobs table's data (what ``/`` renders), for its live updates."""
    return jsonify(job_listing(parse(ConsoleJobsQuery, request.args.to_dict(), where="query")))


def job_listing(query: ConsoleJobsQuery) -> dict:
    queue = current_service().queue
    owner = owner_scope()
    if query.status:
        page, total = jobs.recent_jobs_with_status(queue, query.status, query.page, query.per_page, owner)
    else:
        page, total = jobs.recent_jobs(queue, query.page, query.per_page, owner)
    return {
        "jobs": [job_row(jobs.describe_job(job)) for job in page],
        "page": query.page,
        "per_page": query.per_page,
        "pages": max(1, math.ceil(total / query.per_page)),
        "total": total,
        "status": query.status,
    }


def job_row(view: dict) -> dict:
    """One line of the Jobs table: the job's view cut down to what the table shows."""
    params, progress, result = view["params"], view["progress"] or {}, view["result"] or {}
    metrics = result.get("metrics") or {}
    steps = progress.get("total_steps")
    return {
        "job_id": view["job_id"],
        "status": view["status"],
        "model": params.get("model"),
        "params": {k: params.get(k) for k in ("lr", "batch_size", "epochs", "max_length", "train_limit")},
        "progress": 1.0 if view["status"] == "succeeded" else progress.get("step", 0) / steps if steps else 0.0,
        "dev_accuracy": result.get("dev_accuracy", progress.get("dev_accuracy")),
        "accuracy": result.get("accuracy"),
        "learned_nothing": metrics.get("learned") is False,
        "majority_baseline": metrics.get("majority_baseline"),
        "created_at": view["created_at"],
    }


@bp.get("/console/new")
def new_job_page():
    settings = current_service().settings
    return render_template("console/new_job.html", fields=form_fields(with_default_model({}, settings)))


def form_fields(defaults: dict) -> list[dict]:
    """The new-job form, one entry per ``TrainParams`` field, read from its JSON Schema (type, bounds, help); a
    field's value is ``defaults``' where it has one (the server's choices), else the schema's default."""
    schema = TrainParams.model_json_schema()
    fields = []
    for name, prop in schema["properties"].items():
        kind = picked_from_datasets(name) or field_kinds()[name]
        default = defaults.get(name, prop.get("default"))
        fields.append(
            {
                "name": name,
                "label": prop.get("title", name),
                "kind": kind,
                "optional": any(option.get("type") == "null" for option in prop.get("anyOf", [])),
                "default": default,
                "bounds": bounds_text(prop),
                "description": prop.get("description", ""),
            }
        )
    return fields


def picked_from_datasets(name: str) -> str | None:
    """``dataset`` is picked from the datasets, a ``*_column`` field from the chosen dataset's columns (the form's
    script fills both lists from ``GET /datasets``); None for any other field."""
    if name == "dataset":
        return "dataset"
    return "column" if name.endswith("_column") else None


def bounds_text(prop: dict) -> str:
    """The rule as the server checks it: ``1 ≤ x ≤ 512``, ``0 < x ≤ 1``, ``x ≥ 1``, or ``""`` for none."""
    bounds = {}
    for part in (prop, *prop.get("anyOf", ())):  # pydantic puts a union's bounds beside anyOf, as gt/le
        for name, aliases in BOUND_KEYWORDS.items():
            for key in aliases:
                if key in part:
                    bounds[name] = part[key]
    low = next(((f"{number(bounds[k])} {sign} ") for k, sign in (("ge", "≤"), ("gt", "<")) if k in bounds), "")
    high = next(((f" {sign} {number(bounds[k])}") for k, sign in (("le", "≤"), ("lt", "<")) if k in bounds), "")
    if low and not high:
        value, sign = low.split(" ")[:2]
        return f"x {'≥' if sign == '≤' else '>'} {value}"
    return f"{low}x{high}" if low or high else ""


def number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@bp.get("/console/jobs/<job_id>")
def job_page(job_id: str):
    if not may("read"):  # the page's script reads the job with the key
        view = {"job_id": job_id, "status": "…", "params": {}, "result": None, "error": None}
        return render_template("console/job.html", job=view, mlflow_url=None)
    view = jobs.describe_job(find_job(job_id))
    return render_template("console/job.html", job=view, mlflow_url=mlflow_run_url(view))


def mlflow_run_url(view: dict) -> str | None:
    """The MLflow UI page of the job's run when the tracking URI is a server (a local store has no UI)."""
    mlflow = ((view.get("result") or {}).get("tracking") or {}).get("mlflow") or {}
    uri = mlflow.get("tracking_uri") or ""
    if not uri.startswith(("http://", "https://")) or not mlflow.get("mlflow_run_id"):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{mlflow.get('experiment_id')}/runs/{mlflow['mlflow_run_id']}"


@bp.get("/console/jobs/<job_id>/live")
@allowed("read")
def job_live(job_id: str):
    """The job's view plus its curves: from the worker's progress while it runs, from the run's metrics after."""
    job = find_job(job_id)
    view = jobs.describe_job(job)
    metrics = (view["result"] or {}).get("metrics") or {}
    if metrics.get("loss_curve") is not None:
        curves = {
            "loss": [[step, loss] for step, loss in enumerate(metrics["loss_curve"], start=1)],
            "dev_accuracy": [[e, a] for e, a in enumerate(metrics.get("dev_accuracy_per_epoch") or [], start=1)],
        }
    else:
        curves = job.meta.get("curves") or {"loss": [], "dev_accuracy": []}
    return jsonify(job=view, curves=curves)


@bp.get("/console/jobs/<job_id>/predictions")
@allowed("read")
def job_predictions(job_id: str):
    """A page of the job's val predictions with each row's text and a text pair excerpt; optionally wrong only."""
    query = parse(ConsolePredictionsQuery, request.args.to_dict(), where="query")
    service = current_service()
    job = find_job(job_id)
    rows = read_job_predictions(job, service.settings)
    rows = [r for r in rows if not query.wrong_only or r["label"] != r["prediction"]]
    start = (query.page - 1) * query.per_page
    params = jobs.describe_job(job)["params"]
    texts = val_examples_by_idx(params, service.settings, service.queue.connection)
    page = []
    for row in rows[start : start + query.per_page]:
        example = texts.get(row["idx"])
        pair = example.text_pair if example else None
        page.append(row | {"text": example.text if example else None, "text_pair": excerpt(pair) if pair else None})
    return jsonify(
        predictions=page,
        page=query.page,
        per_page=query.per_page,
        total=len(rows),
        pages=max(1, math.ceil(len(rows) / query.per_page)),
        texts=bool(texts),
    )


def excerpt(text: str, limit: int = TEXT_EXCERPT) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


@bp.get("/console/datasets")
def datasets_page():
    return render_template("console/datasets.html")


@bp.get("/console/sweeps")
def sweeps_page():
    return render_template("console/sweeps.html")


@bp.get("/console/models")
def models_page():
    return render_template("console/models.html")


@bp.get("/console/audit")
def audit_page():
    return render_template("console/audit.html")


@bp.get("/console/ask")
def ask_page():
    return render_template("console/ask.html")


@bp.get("/docs")
def docs_page():
    return render_template("console/docs.html", openapi_url=url_for("openapi.openapi"))
