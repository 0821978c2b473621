"""What computes a predictor's answers (SERVE_BACKEND, SERVE_PRECISION, SERVE_QUANTIZE), chosen here from the
settings for every process that serves (API replicas, batch predictions). Torch-free: the web process imports it
before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.service.model_store import cache_dir


@dataclass(frozen=True)
class Backend:
    """torch, in bf16 autocast where the CPU has native bf16 (``precision`` "auto") or in fp32; or ONNX Runtime on
    the model exported once per host into ``onnx_cache`` (fp32, or int8 with ``quantize``)."""

    kind: str = "torch"
    precision: str = "auto"
    quantize: str = "none"
    onnx_cache: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Backend:
        return cls(settings.serve_backend, settings.serve_precision, settings.serve_quantize, cache_dir(settings))


TORCH = Backend()
