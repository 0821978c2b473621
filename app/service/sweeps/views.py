"""What ``GET /sweeps`` and ``GET /sweeps/<id>`` show: status, counts, the best trial, the leaderboard."""

from __future__ import annotations

from datetime import UTC, datetime

from optuna.trial import TrialState
from rq import Queue

from app.config import Settings
from app.service.sweeps.driver import trial_job_status
from app.service.sweeps.study import load_study, owner_of


def describe_sweep(settings: Settings, queue: Queue | None, sweep_id: str, leaderboard_rows: bool = True) -> dict:
    """What ``GET /sweeps/<id>`` shows: status, spec, counts, the best trial and the leaderboard (best first)."""
    return view_of(load_study(settings, sweep_id, telling=True), queue, leaderboard_rows)


def view_of(study, queue: Queue | None, leaderboard_rows: bool = True) -> dict:
    spec, attrs = study.user_attrs["spec"], study.user_attrs
    board = leaderboard(study, queue)
    counts = dict.fromkeys(("queued", "running", "succeeded", "pruned", "failed", "cancelled"), 0)
    for row in board:
        counts[row["status"]] += 1
    status = "running"
    if attrs.get("ended_at"):
        status = "failed" if attrs.get("failure") else "cancelled" if attrs.get("cancelled") else "finished"
    view = {
        "sweep_id": study.study_name,
        "status": status,
        "owner": owner_of(study),
        "created_at": iso(attrs.get("created_at")),
        "ended_at": iso(attrs.get("ended_at")),
        "base": spec["base"],
        "space": spec["space"],
        "trials": spec["trials"],
        "parallel": spec["parallel"],
        "sampler": spec["sampler"],
        "pruner": spec["pruner"],
        "promote": spec["promote"],
        "counts": counts,
        "best": board[0] if board and board[0]["status"] == "succeeded" else None,
        "registration": attrs.get("registration"),
        "failure": attrs.get("failure"),
    }
    if leaderboard_rows:
        view["leaderboard"] = board
    return view


def leaderboard(study, queue: Queue | None) -> list[dict]:
    """Every trial: searched params, dev accuracy per epoch, status, val accuracy, job id; best dev accuracy first."""

    rows = []
    for t in study.get_trials(deepcopy=False):
        per_epoch = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        if t.state == TrialState.COMPLETE:
            status = "succeeded"
        elif t.state == TrialState.PRUNED:
            status = "pruned"
        elif t.state == TrialState.RUNNING:
            status = trial_job_status(queue, t.user_attrs.get("job_id")) if queue is not None else "running"
            status = status if status in ("queued", "running") else "running"
        else:
            status = t.user_attrs.get("outcome", "failed")
        rows.append(
            {
                "trial": t.number,
                "job_id": t.user_attrs.get("job_id"),
                "status": status,
                "params": t.params,
                "dev_accuracy": t.value if t.state == TrialState.COMPLETE else None,
                "dev_accuracy_per_epoch": per_epoch,
                "val_accuracy": t.user_attrs.get("val_accuracy"),
                "pruned_at_epoch": max(t.intermediate_values) if t.state == TrialState.PRUNED else None,
            }
        )
    order = {"succeeded": 0, "running": 1, "queued": 2, "pruned": 3, "failed": 4, "cancelled": 5}
    return sorted(rows, key=lambda r: (order[r["status"]], -(r["dev_accuracy"] or 0.0), r["trial"]))


def iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp else None
