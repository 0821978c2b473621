"""The ``MLmodel`` of a fine-tuned model folder: what lets ``mlflow models serve -m models:/<name>@champion`` (and
``mlflow.pyfunc.load_model``) serve a registered version, written beside the weights so the folder replicas load
stays as it is.

The flavor is ``python_function`` with ``app.service.mlflow_pyfunc`` as its loader: MLflow then answers with this
service's predictor itself (same tokenization, truncation at the trained length, batching and precision), so
``/invocations`` and ``/predict`` agree to the last bit; no pickle, no second copy of the weights
(docs/serving.md says why not the ``transformers`` flavor).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # writing a file must not reach out to the network

log = logging.getLogger(__name__)

LOADER_MODULE = "app.service.mlflow_pyfunc"
MLMODEL = "MLmodel"


def write_mlmodel(model_folder: Path, label_names: tuple[str, ...], max_length: int, example: tuple[str, str | None]):
    """Write ``MLmodel`` (pyfunc flavor, signature, ``max_length`` as its model config, the label names as
    metadata) and an input example (one of the run's own val pairs) into ``model_folder``. Skipped, and logged,
    where MLflow is not installed (a GPU image with torch alone): the folder still serves here and everywhere."""
    if importlib.util.find_spec("mlflow") is None:
        log.info("MLflow is not installed: %s gets no MLmodel (mlflow models serve cannot load it)", model_folder)
        return
    # MLflow is optional (the GPU image has none): imported only once find_spec has found it.
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.models.utils import _save_example
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    model = Model(metadata={"task": "text-classification", "label_names": list(label_names)})
    mlflow.pyfunc.add_to_model(model, loader_module=LOADER_MODULE, model_config={"max_length": max_length})
    model.signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "text"), ColSpec(DataType.string, "text_pair", required=False)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.double, "score"),
                ColSpec(Array(DataType.double), "probabilities"),
            ]
        ),
    )
    text, pair = example
    frame = pd.DataFrame({"text": [text[:500]]} | ({"text_pair": [pair[:1000]]} if pair is not None else {}))
    _save_example(model, frame, str(model_folder))  # MLflow's own writer: input_example.json and its MLmodel entry
    model.save(str(model_folder / MLMODEL))
