"""Exporting a fine-tuned model for other runtimes (``python -m app export``), and the per-host ONNX copies that
``SERVE_BACKEND=onnx`` serves.

An exported folder is Optimum's ``ORTModelForSequenceClassification`` layout: ``model.onnx`` (fp32, or int8 by
dynamic quantization) beside the model's ``config.json`` (label names in ``id2label``) and its tokenizer, whose
``model_max_length`` is the length the run trained with, so ``tokenizer(text, pair, truncation=True)`` cuts pairs
as this service does.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from rq import Queue

from app.config import Settings
from app.engine.onnx_export import ONNX_FILE, export_onnx, quantize_int8
from app.service.model_access import fine_tuned_model
from app.service.model_records import digest_files, folder_digest
from app.service.model_store import download_lock
from app.service.predict import Predictor
from app.service.serving import served_model

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("none", "int8")
# The model files an export is made of: what its cache key covers (the weights, their shape, the tokenizer).
EXPORTED_FROM = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def export_onnx_folder(model_folder: Path, destination: Path, quantize: str = "none", max_length: int | None = None):
    """Write ``model_folder``'s classifier as ``destination/model.onnx`` (+ config.json and the tokenizer), the
    graph ``SERVE_BACKEND=onnx`` runs; written into a temporary folder renamed into place when complete."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {quantize!r}")
    predictor = Predictor(model_folder, max_length=max_length)
    destination = destination.expanduser().resolve()
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=destination.parent))
    try:
        export_onnx(predictor.model, tmp / ONNX_FILE, predictor.max_length)
        if quantize == "int8":
            fp32 = tmp / "model-fp32.onnx"
            os.replace(tmp / ONNX_FILE, fp32)
            quantize_int8(fp32, tmp / ONNX_FILE)
            fp32.unlink()
        predictor.model.config.save_pretrained(tmp)
        predictor.tokenizer.model_max_length = predictor.max_length
        predictor.tokenizer.save_pretrained(tmp)
        shutil.rmtree(destination, ignore_errors=True)
        os.replace(tmp, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s as ONNX (%s) into %s", model_folder, quantize, destination)
    return destination


def cached_onnx_folder(model_folder: Path, cache: Path, quantize: str, max_length: int) -> Path:
    """This host's export of ``model_folder`` under ``cache/onnx/``, made on first use: keyed by the digest of the
    files it is made of, so a model changed in place (or another with the same name) is exported anew, and
    every process of the host reuses one export."""
    names = tuple(name for name in EXPORTED_FROM if (model_folder / name).is_file())
    key = folder_digest(digest_files(model_folder, names))[:24]
    folder = cache / "onnx" / f"{key}-{quantize}-{max_length}"
    if (folder / ONNX_FILE).is_file():
        return folder
    with download_lock(cache):  # one export per host at a time; the others wait, then find it done
        if not (folder / ONNX_FILE).is_file():
            export_onnx_folder(model_folder, folder, quantize, max_length)
    return folder


def model_to_export(name: str, settings: Settings, queue: Queue) -> Path:
    """The checkpoint folder ``python -m app export`` reads: a job id (here or on the tracking server), a model
    folder under the roots, or ``champion`` (what /predict serves by default)."""
    return fine_tuned_model(served_model(name, settings, queue), settings)
