"""Which model names a request may use: aliases, hub ids and folders under the configured roots only.

A request must never make the service read an arbitrary path, so folder names are resolved against
``ARTIFACTS_DIR`` and ``MODEL_ROOTS`` and rejected when they resolve anywhere else. A job id trained on another
host is fetched from the MLflow tracking server into this host's model cache (``app.service.model_store``).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants

from app.config import Settings
from app.engine.model_names import MINILM_ALIAS, hub_reachable, in_hub_cache, is_hub_id
from app.engine.run_folder import checkpoint_folder
from app.params import TrainParams
from app.service.model_store import fetched_run_folder

# Longest model name a request may use: a file name's limit on Linux, so no name can make a path too long.
MAX_MODEL_NAME = 255


class ModelNotAllowed(ValueError):
    """The model name is not an alias, a hub id, nor a folder under the model roots."""


def check_name_shape(name: str) -> None:
    """Refuse names no file system or hub could hold (over-long, control characters) before touching the disk."""
    if len(name) > MAX_MODEL_NAME:
        raise ModelNotAllowed(f"model name is {len(name)} characters long; at most {MAX_MODEL_NAME} are allowed")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ModelNotAllowed("model name contains control characters")


def model_roots(settings: Settings) -> tuple[Path, ...]:
    """Folders a request may name models in: the run folders first, then ``MODEL_ROOTS``."""
    return tuple(root.expanduser().resolve() for root in (settings.artifacts_dir, *settings.model_roots))


def folder_under_roots(name: str, roots: tuple[Path, ...]) -> Path | None:
    """The existing folder ``name`` names inside one of ``roots`` (a job id is a run folder), else None."""
    check_name_shape(name)
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # "~nosuchuser/..."
        return None
    candidates = [path] if path.is_absolute() else [r / name for r in roots]
    for candidate in candidates:
        try:
            folder = candidate.resolve()
            if folder.is_dir() and any(folder.is_relative_to(root) for root in roots):
                return folder
        except (OSError, ValueError):  # a component too long for the file system, a loop of links
            continue
    return None


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or ".." in name or "\\" in name


def exists_quietly(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def loadable_here(name: str) -> None:
    """Refuse a hub model no worker could load: not in the local cache while the hub is off or unreachable."""

    if name == MINILM_ALIAS or Path(name).is_absolute() or in_hub_cache(name):
        return
    if constants.HF_HUB_OFFLINE:
        why = "the hub is off (HF_HUB_OFFLINE)"
    elif not hub_reachable(constants.ENDPOINT):
        why = "the Hugging Face hub cannot be reached from this service"
    else:
        return
    raise ModelNotAllowed(
        f"model '{name}' is not in this service's Hugging Face cache and {why}; "
        f"use '{MINILM_ALIAS}', a fine-tuned job id, or a cached hub model"
    )


def model_for_training(name: str, settings: Settings) -> str:
    """What the engine should load for a training request: the alias, a hub id, or an absolute checkpoint path."""
    if name == MINILM_ALIAS:
        return name
    folder = folder_under_roots(name, model_roots(settings)) or fetched_run_folder(name, settings)
    if folder is not None:
        checkpoint = checkpoint_folder(folder)
        if checkpoint is None:
            raise ModelNotAllowed(f"model folder '{name}' holds no finished checkpoint (config.json, metrics.json)")
        return str(checkpoint)
    if looks_like_path(name) or exists_quietly(Path(name)):
        raise ModelNotAllowed(f"model '{name}' is not a folder under ARTIFACTS_DIR or MODEL_ROOTS")
    if not is_hub_id(name):
        raise ModelNotAllowed(f"model '{name}' is neither the alias '{MINILM_ALIAS}', a hub id, nor a model folder")
    return name


def with_default_model(fields: dict, settings: Settings) -> dict:
    """A training request's fields (a ``POST /train`` body, a sweep's base, the console's form), with DEFAULT_MODEL
    where they name no model: the one place that setting applies."""
    return {"model": settings.default_model} | fields


def resolve_for_training(params: TrainParams, settings: Settings) -> TrainParams:
    """``params`` with its model as the engine loads it (a job keeps the name as the client gave it)."""
    return params.model_copy(update={"model": model_for_training(params.model, settings)})


def fine_tuned_model(name: str, settings: Settings) -> Path:
    """The checkpoint folder of a fine-tuned model: a succeeded job id (here, or on the tracking server) or a folder
    under the model roots. Raises ModelStoreUnavailable when the tracking server cannot deliver it."""
    folder = folder_under_roots(name, model_roots(settings)) or fetched_run_folder(name, settings)
    checkpoint = checkpoint_folder(folder) if folder is not None else None
    if checkpoint is None:
        raise ModelNotAllowed(
            f"model '{name}' is not a succeeded job id nor a fine-tuned model folder under ARTIFACTS_DIR or MODEL_ROOTS"
        )
    return checkpoint


class NotYesNo(ValueError):
    """A yes/no answer (BoolQ's request shape) was asked of a model whose labels are not two."""
