"""The trackers a process's settings name (``TRACKER``, ``MLFLOW_TRACKING_URI``): which backends a run logs to,
which of them it cannot do without, and whether the tracking server is up."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from app.tracking.composite import CompositeTracker
from app.tracking.tracker import Backend, NullTracker, Tracker

KNOWN_TRACKERS = ("mlflow", "neptune", "none")


def models_travel_through_mlflow(settings) -> bool:
    """True with an MLflow tracking server (an http(s) ``MLFLOW_TRACKING_URI``): hosts share models through it."""
    uri = settings.mlflow_tracking_uri.lower()
    return "mlflow" in parse_tracker_names(settings.tracker) and uri.startswith(("http://", "https://"))


def tracking_server_check(settings, timeout_s: float = 2.0) -> str:
    """``ok`` when the tracking server answers its health check, else why not (never its address, which may carry
    a password)."""
    import requests  # here: the GPU image, which trains without a tracking server, has no requests

    try:
        answer = requests.get(f"{settings.mlflow_tracking_uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok" if answer.status_code == 200 else f"unhealthy (HTTP {answer.status_code})"


def uri_password(uri: str) -> str:
    """The password embedded in ``scheme://user:password@host``, if any (so it can be redacted)."""
    try:
        return urlsplit(uri).password or ""
    except ValueError:
        return ""


def parse_tracker_names(value: str) -> tuple[str, ...]:
    """``"MLflow, neptune"`` → ``("mlflow", "neptune")``; ``"none"`` → ``()``; unknown names raise ValueError."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN_TRACKERS]
    if unknown or not names:
        raise ValueError(
            f"TRACKER (--tracker) must be a comma-separated list of {', '.join(KNOWN_TRACKERS)}; got {value!r}"
        )
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def make_tracker(settings) -> Tracker:
    """The tracker(s) named by ``settings.tracker``; ValueError names the field and allowed values."""
    names = parse_tracker_names(settings.tracker)
    if not names:
        return NullTracker()
    factories = {name: backend_factory(name, settings) for name in names}
    secrets = (settings.neptune_api_token, settings.api_token, uri_password(settings.mlflow_tracking_uri))
    required = ("mlflow",) if models_travel_through_mlflow(settings) else ()
    return CompositeTracker(factories, secrets, required)


def backend_factory(name: str, settings) -> Callable[[], Backend]:
    """A zero-argument constructor, so the client library is imported only when a run starts."""
    if name == "mlflow":

        def build_mlflow() -> Backend:
            from app.tracking.mlflow_tracker import MlflowTracker  # mlflow: heavy, and missing is a tracking error

            return MlflowTracker.from_settings(settings)

        return build_mlflow

    def build_neptune() -> Backend:
        from app.tracking.neptune_tracker import NeptuneTracker  # neptune: optional, missing is a tracking error

        return NeptuneTracker.from_settings(settings)

    return build_neptune
