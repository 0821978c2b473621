"""The training parameters: one typed model shared by the CLI, the REST API and the jobs."""

from __future__ import annotations

import functools
import json
import warnings
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

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
# Hugging Face's names (TrainingArguments, run_glue.py) for our fields: a request may use either, not both apart.
HUGGING_FACE_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "max_seq_length": "max_length"}
# TrainingArguments' batch size counts one device's examples; ours (batch_size) counts the whole step's, which the
# ``devices`` ranks share: batch_size = per_device_train_batch_size × devices.
PER_DEVICE_BATCH_SIZE = "per_device_train_batch_size"


class StrictModel(BaseModel):
    """A request's model: unknown fields are refused (a typo is an error, not a default), values are final."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainParams(BaseModel):
    """Hyperparameters of one fine-tuning run. Unknown fields are rejected; Hugging Face's names for four of them
    (``learning_rate``, ``num_train_epochs``, ``max_seq_length``, ``per_device_train_batch_size``) are accepted."""

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

    @model_validator(mode="wrap")
    @classmethod
    def accept_hugging_face_names(cls, data, handler, info: ValidationInfo):
        """Hugging Face's names as aliases of ours: renamed before validation; an error names the field as the
        request spelled it, and two spellings of one field that disagree are an error naming both."""
        from_strings = info.mode not in ("python", "json")  # model_validate_strings (pydantic-core says "string")
        if not isinstance(data, dict):
            return handler(data)
        ours, spelled_as = with_our_names(data, from_strings)
        try:
            if from_strings:  # a model validator turns strings back into plain input: parse them without one first
                ours = FIELDS_FROM_STRINGS.model_validate_strings(ours).model_dump()
            return handler(ours)
        except ValidationError as exc:
            raise (errors_as_spelled(exc, spelled_as) if spelled_as else exc) from None


# TrainParams' fields without its validator: pydantic parses strings (``model_validate_strings``, the CLI's options)
# only where no model validator stands between them and the fields.
FIELDS_FROM_STRINGS = create_model(
    TrainParams.__name__,
    __config__=TrainParams.model_config,
    **{name: (info.annotation, info) for name, info in TrainParams.model_fields.items()},
)


def with_our_names(data: dict, from_strings: bool = False) -> tuple[dict, dict[str, tuple[str, str]]]:
    """``data`` with Hugging Face's names replaced by ours, and for each field given so, the name used and a note
    for its errors. Both spellings of one field with different values raise a ValidationError naming both.
    ``from_strings``: values are strings to parse (the CLI's ``model_validate_strings``)."""
    ours, spelled_as, conflicts = dict(data), {}, []
    for alias, name in HUGGING_FACE_NAMES.items():
        if alias in ours:
            value = ours.pop(alias)
            if name in ours and not same_value(ours[name], value):
                conflicts += disagreement(name, ours[name], alias, json.dumps(value), value)
            else:
                ours[name], spelled_as[name] = value, (alias, "")
    if PER_DEVICE_BATCH_SIZE in ours:
        conflicts += take_per_device_batch_size(ours, spelled_as, from_strings)
    if conflicts:
        raise ValidationError.from_exception_data(TrainParams.__name__, conflicts)
    return ours, spelled_as


def take_per_device_batch_size(ours: dict, spelled_as: dict, from_strings: bool) -> list[dict]:
    """Replace ``per_device_train_batch_size`` in ``ours`` by the step's ``batch_size`` (it × ``devices``); the
    errors naming both when ``batch_size`` is given too and differs."""
    per_device, devices = ours.pop(PER_DEVICE_BATCH_SIZE), ours.get("devices", 1)
    given = ours.get("batch_size")
    if from_strings:
        per_device, devices, given = parsed_count(per_device), parsed_count(devices), parsed_count(given)
    counts = all(type(v) is int for v in (per_device, devices))  # else the field's own check says what is wrong
    batch_size = per_device * devices if counts else per_device
    product = f"{per_device} per device × {devices} devices = {batch_size} per step"
    if "batch_size" in ours and not same_value(given, batch_size):
        shown = product if counts else json.dumps(per_device)
        return disagreement("batch_size", given, PER_DEVICE_BATCH_SIZE, shown, per_device)
    ours["batch_size"] = str(batch_size) if from_strings else batch_size
    spelled_as["batch_size"] = (PER_DEVICE_BATCH_SIZE, f" (batch_size = {product})" if counts else "")
    return []


COUNT_FROM_STRING = TypeAdapter(StrictInt)


def parsed_count(value):
    """A string holding an integer as that integer (as strings mode parses it); anything else as it is."""
    try:
        return COUNT_FROM_STRING.validate_strings(value) if isinstance(value, str) else value
    except ValidationError:
        return value


def same_value(ours, theirs) -> bool:
    """Equal as JSON values (so 1 and 1.0 agree, 1 and true do not)."""
    return ours == theirs and isinstance(ours, bool) == isinstance(theirs, bool)


def disagreement(name: str, value, alias: str, alias_shown: str, alias_value) -> list[dict]:
    """One error on each of the two spellings, each naming both."""
    message = (
        f"{name} ({json.dumps(value)}) and {alias} ({alias_shown}) set the same parameter to different values; "
        "give one of them"
    )
    error = PydanticCustomError("alias_conflict", message)
    return [{"type": error, "loc": (name,), "input": value}, {"type": error, "loc": (alias,), "input": alias_value}]


def errors_as_spelled(exc: ValidationError, spelled_as: dict[str, tuple[str, str]]) -> ValidationError:
    """``exc`` with each error on a field given under Hugging Face's name moved to that name (with its note)."""
    errors = []
    for error in exc.errors(include_url=False):
        loc, message = error["loc"], error["msg"]
        if loc and loc[0] in spelled_as:
            alias, note = spelled_as[loc[0]]
            loc, message = (alias, *loc[1:]), message + note
        errors.append({"type": PydanticCustomError(error["type"], message), "loc": loc, "input": error["input"]})
    return ValidationError.from_exception_data(TrainParams.__name__, errors)


def with_hugging_face_names(schema: dict) -> dict:
    """TrainParams' JSON Schema with Hugging Face's names beside ours (for /openapi.json; the console's form and
    the CLI show our names only)."""
    properties = schema["properties"]
    for alias, name in HUGGING_FACE_NAMES.items():
        alias_of = {k: v for k, v in properties[name].items() if k not in ("default", "title")}
        alias_of["description"] = f"Hugging Face's name for {name}: {alias_of.get('description', '')}"
        properties[alias] = alias_of
    properties[PER_DEVICE_BATCH_SIZE] = {
        "type": "integer",
        "minimum": 1,
        "description": "Examples per device per step, as in Hugging Face's TrainingArguments: batch_size = this × "
        "devices. Give this or batch_size.",
    }
    return schema


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
