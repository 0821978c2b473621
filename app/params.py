"""The training parameters: one typed model shared by the CLI, the REST API and the jobs."""

from __future__ import annotations

import functools
import warnings
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

DEFAULT_MODEL = "bert-base-multilingual-cased"
# Most processes one run may train on (a rule of the parameter; a machine may give fewer, see MAX_DEVICES).
MAX_DEVICES = 64

# `register` is the API's word (issue 11); it shadows only ABCMeta.register, which no one calls on a params object.
warnings.filterwarnings("ignore", message='Field name "register" in "TrainParams"', category=UserWarning)

# Strict types: JSON `true` is not an int and "32" is not an int; an int is accepted for a float (as a float).
# One type, not a union, so bounds become JSON Schema's exclusiveMinimum/maximum in /openapi.json.
PositiveCount = Annotated[StrictInt, Field(ge=1)]
ColumnName = Annotated[str, Field(min_length=1, max_length=255)]
# The built-in dataset, or an uploaded one's id (the first 16 hex digits of its content's sha256).
BUILTIN_DATASET = "boolq"
DATASET_ID_PATTERN = r"^(boolq|[0-9a-f]{16})$"
Number = StrictFloat


class StrictModel(BaseModel):
    """A request's model: unknown fields are refused (a typo is an error, not a default), values are final."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainParams(BaseModel):
    """Hyperparameters of one fine-tuning run. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    batch_size: Annotated[StrictInt, Field(ge=1, le=512, description="Examples per optimisation step.")] = 32
    lr: Annotated[Number, Field(gt=0, le=1, description="AdamW learning rate.")] = 5e-5
    eps: Annotated[Number, Field(gt=0, le=1e-2, description="AdamW epsilon.")] = 1e-8
    weight_decay: Annotated[Number, Field(ge=0, le=1, description="AdamW weight decay (torch's default).")] = 0.01
    layer_lr_decay: Annotated[
        Number,
        Field(
            gt=0,
            le=1,
            description="Layer-wise learning-rate decay: each layer below the top trains at this times the lr of "
            "the one above (1: one lr for all).",
        ),
    ] = 1.0
    epochs: Annotated[StrictInt, Field(ge=1, le=100, description="Passes over the training split.")] = 2
    model: Annotated[
        str,
        Field(
            min_length=1,
            max_length=255,
            description="Hub name, local folder, or the alias 'minilm' (offline all-MiniLM-L6-v2).",
        ),
    ] = DEFAULT_MODEL
    max_length: Annotated[
        StrictInt, Field(ge=16, le=512, description="Tokens per example (text, or text and text pair together).")
    ] = 256
    dev_size: Annotated[Number, Field(gt=0, lt=0.5, description="Share of train held out as dev.")] = 0.1
    seed: Annotated[
        StrictInt,
        Field(ge=0, le=2**32 - 1, description="Seed for split, init and order."),
    ] = 42
    train_limit: Annotated[PositiveCount | None, Field(description="Use the first N train rows.")] = None
    eval_limit: Annotated[PositiveCount | None, Field(description="Evaluate on the first N val rows.")] = None
    warmup_ratio: Annotated[Number, Field(ge=0, le=0.5, description="Share of steps for LR warm-up.")] = 0.0
    keep_best_epoch: Annotated[
        StrictBool,
        Field(description="Keep the weights of the epoch with the best dev accuracy, not the last epoch's."),
    ] = False
    early_stopping_patience: Annotated[
        PositiveCount | None,
        Field(
            description="Stop after this many epochs without a better dev accuracy, keeping the best epoch's "
            "weights (default: off)."
        ),
    ] = None
    devices: Annotated[
        StrictInt,
        Field(
            ge=1,
            le=MAX_DEVICES,
            description="Processes training this one model together (PyTorch DDP): GPUs, or groups of CPU cores.",
        ),
    ] = 1
    accelerator: Annotated[
        Literal["any", "cpu", "gpu"],
        Field(
            description="Which workers may take the job: any, only GPU workers (it waits for one), or only CPU "
            "workers. Jobs only; a local run trains where it is (DEVICE)."
        ),
    ] = "any"
    register: Annotated[
        StrictBool,
        Field(description="Register the fine-tuned model as a version in the MLflow model registry."),
    ] = True
    dataset: Annotated[
        str,
        Field(
            pattern=DATASET_ID_PATTERN,
            description="What to train on: 'boolq' (built in) or the id of an uploaded dataset (POST /datasets).",
        ),
    ] = BUILTIN_DATASET
    text_column: Annotated[
        ColumnName | None, Field(description="Column holding the text (default: the dataset's).")
    ] = None
    text_pair_column: Annotated[
        ColumnName | None, Field(description="Column holding the second text of a pair (default: the dataset's).")
    ] = None
    label_column: Annotated[
        ColumnName | None, Field(description="Column holding the label (default: the dataset's).")
    ] = None

    @property
    def column_mapping(self) -> dict[str, str]:
        """The columns this request maps itself (the dataset's own mapping fills in the rest)."""
        given = {"text_column": self.text_column, "text_pair_column": self.text_pair_column}
        return {k: v for k, v in (given | {"label_column": self.label_column}).items() if v is not None}


class PredictionParams(StrictModel):
    """A batch prediction (``POST /predictions``): which model scores every row of which dataset's split."""

    model: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=255,
            description="A succeeded job id, 'champion', or a model folder under the model roots (default: the "
            "champion, else the latest succeeded training job). The job keeps the model it resolved to at submit.",
        ),
    ] = None
    dataset: Annotated[
        str,
        Field(pattern=DATASET_ID_PATTERN, description="'boolq' (built in) or the id of an uploaded dataset."),
    ] = BUILTIN_DATASET
    split: Annotated[Literal["val", "train"], Field(description="Which split's rows to score.")] = "val"
    accelerator: Annotated[
        Literal["any", "cpu", "gpu"], Field(description="Which workers may take the job (as for training).")
    ] = "any"


@functools.cache
def field_kinds() -> dict[str, str]:
    """Each field's JSON type without its null ("integer", "number", "string", "boolean"), read from the schema
    once: the console's form and a sweep's search space both go by it."""
    kinds = {}
    for name, prop in TrainParams.model_json_schema()["properties"].items():
        types = [option.get("type") for option in prop.get("anyOf", [prop])]
        kinds[name] = "number" if "number" in types else next((k for k in types if k not in (None, "null")), "string")
    return kinds
