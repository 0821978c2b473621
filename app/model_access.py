"""Which model names a request may use: aliases, hub ids and folders under the configured roots only.

A request must never make the service read an arbitrary path, so folder names are resolved against
``ARTIFACTS_DIR`` and ``MODEL_ROOTS`` and rejected when they resolve anywhere else.
"""

from __future__ import annotations

from pathlib import Path

from app.config import Settings
from app.model_names import MINILM_ALIAS, is_hub_id
from app.run_folder import checkpoint_folder


class ModelNotAllowed(ValueError):
    """The model name is not an alias, a hub id, nor a folder under the model roots."""


def model_roots(settings: Settings) -> tuple[Path, ...]:
    """Folders a request may name models in: the run folders first, then ``MODEL_ROOTS``."""
    return tuple(root.expanduser().resolve() for root in (settings.artifacts_dir, *settings.model_roots))


def folder_under_roots(name: str, roots: tuple[Path, ...]) -> Path | None:
    """The existing folder ``name`` names inside one of ``roots`` (a job id is a run folder), else None."""
    candidates = [Path(name).expanduser()] if Path(name).expanduser().is_absolute() else [r / name for r in roots]
    for candidate in candidates:
        folder = candidate.resolve()
        if folder.is_dir() and any(folder.is_relative_to(root) for root in roots):
            return folder
    return None


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or ".." in name or "\\" in name


def model_for_training(name: str, settings: Settings) -> str:
    """What the engine should load for a training request: the alias, a hub id, or an absolute checkpoint path."""
    if name == MINILM_ALIAS:
        return name
    folder = folder_under_roots(name, model_roots(settings))
    if folder is not None:
        checkpoint = checkpoint_folder(folder)
        if checkpoint is None:
            raise ModelNotAllowed(f"model folder '{name}' holds no checkpoint (config.json)")
        return str(checkpoint)
    if looks_like_path(name) or Path(name).exists():
        raise ModelNotAllowed(f"model '{name}' is not a folder under ARTIFACTS_DIR or MODEL_ROOTS")
    if not is_hub_id(name):
        raise ModelNotAllowed(f"model '{name}' is neither the alias '{MINILM_ALIAS}', a hub id, nor a model folder")
    return name


def fine_tuned_model(name: str, settings: Settings) -> Path:
    """The checkpoint folder of a fine-tuned model: a succeeded job id or a folder under the model roots."""
    folder = folder_under_roots(name, model_roots(settings))
    checkpoint = checkpoint_folder(folder) if folder is not None else None
    if checkpoint is None:
        raise ModelNotAllowed(
            f"model '{name}' is not a succeeded job id nor a fine-tuned model folder under ARTIFACTS_DIR or MODEL_ROOTS"
        )
    return checkpoint
