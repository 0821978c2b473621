"""What a sweep request may ask for: the search space, its rules, and the compute budget it must fit."""

from __future__ import annotations

import functools
import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tag,
    ValidationError,
    model_validator,
)

from app.config import Settings
from app.params import StrictModel, TrainParams, field_kinds
from app.service.admission import HUB_TRAIN_ROWS, OverLimit, available_train_rows, check_cost
from app.service.jobs import TRIAL_TASK as TRIAL_TASK  # the trial task's name, for the driver
from app.service.model_access import ModelNotAllowed, model_for_training, with_default_model

# The TrainParams fields that set a trial's cost (check_cost).
COST_FIELDS = ("epochs", "train_limit", "max_length", "batch_size")
# Trial n's sampler is seeded with seed + n, and numpy takes seeds below 2**32.
SEED_LIMIT = 2**32
# The median pruner compares a trial with the trials before it only once this many have finished.
MEDIAN_STARTUP_TRIALS = 2
# A searched value keeps its type: an int range (epochs) stays int, a float one (lr) float.
IntOrFloat = StrictFloat | StrictInt
# Trials run in one process each (a sweep spreads over workers instead), so `devices` is not searched either;
# trials go to any worker (the queue every class listens to), so neither is `accelerator`.
SearchableFields = tuple(
    name for name in TrainParams.model_fields if name not in ("register", "devices", "accelerator")
)


class SweepError(ValueError):
    """A sweep request breaks a rule; ``fields`` maps each offending field to its rule."""

    def __init__(self, fields: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in fields.items()))
        self.fields = fields


class SweepNotFound(LookupError):
    pass


class Range(StrictModel):
    """A numeric range: uniform, ``log``-uniform, or on a grid of ``step``."""

    low: IntOrFloat
    high: IntOrFloat
    log: StrictBool = False
    step: IntOrFloat | None = Field(None, gt=0)

    @model_validator(mode="after")
    def ordered(self):
        if self.low > self.high:
            raise ValueError("low must not exceed high")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


Choices = Annotated[list[Any], Field(min_length=1, max_length=100)]
# A list is choices and anything else a range, so an error names that one rule, not both union members'.
# The tags are spelt like pydantic's own union labels ("list[...]"), which error messages leave out of field names.
SpaceEntry = Annotated[
    Annotated[Choices, Tag("list[choices]")] | Annotated[Range, Tag("dict[range]")],
    Discriminator(lambda v: "list[choices]" if isinstance(v, list) else "dict[range]"),
]


class Threshold(StrictModel):
    """Prune a trial as soon as its dev accuracy after an epoch is below ``threshold``."""

    threshold: Annotated[IntOrFloat, Field(ge=0, le=1)]


class SweepRequest(StrictModel):
    """``POST /sweeps`` (and the CLI's ``--space`` file): fixed params, the searched space, and how to search it."""

    base: dict[str, Any] = Field(default_factory=dict, description="TrainParams every trial shares.")
    space: Annotated[
        dict[str, SpaceEntry],
        Field(min_length=1, description="TrainParams fields to search: {low, high, log?, step?} or a list of choices."),
    ]
    trials: Annotated[StrictInt, Field(ge=1, le=500, description="Trials to run.")] = 8
    parallel: Annotated[StrictInt, Field(ge=1, le=64, description="Trials running at once, at most.")] = 1
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "none"] | Threshold = "median"
    promote: StrictBool = Field(False, description="Promote the best trial to champion when the sweep ends.")
    seed: Annotated[
        StrictInt | None,
        Field(ge=0, le=SEED_LIMIT - 1, description="Seed of the sampler (default: random); seed + trials ≤ 2³²."),
    ] = None


def validate_request(request: SweepRequest, settings: Settings, dataset_rows: int | None = None) -> TrainParams:
    """The rules beyond the shapes: each field searchable, each bound and choice a valid value of its field,
    grid on lists only, the size of the spec and of the grid, the seed, the compute budget (over ``dataset_rows``
    train rows: an uploaded dataset's, as its record says; default BoolQ's). Returns the base params; raises
    SweepError naming each field."""
    errors = size_rules(request, settings)
    if errors:  # the rules below read every value: not for a spec over its size
        raise SweepError(errors)
    try:
        base = TrainParams(**with_default_model(request.base, settings))
        model_for_training(base.model, settings)
    except ValidationError as exc:
        errors |= {f"base.{'.'.join(map(str, e['loc']))}": e["msg"] for e in exc.errors(include_url=False)}
        base = TrainParams()
    except ModelNotAllowed as exc:
        errors["base.model"] = str(exc)
    if base.devices > 1:
        errors["base.devices"] = "sweep trials train on one device each; leave devices at 1"
    for name, entry in request.space.items():
        where = f"space.{name}"
        if name not in SearchableFields:
            errors[where] = f"not a searchable field; searchable: {', '.join(SearchableFields)}"
            continue
        if isinstance(entry, Range):
            rule = range_rule(name, entry)
            values = [entry.low, entry.high]
        else:
            rule, values = None, entry
            if len({repr(v) for v in entry}) != len(entry):
                rule = "choices must be distinct"
        if request.sampler == "grid" and isinstance(entry, Range):
            rule = "the grid sampler needs a list of choices, not a range"
        for value in values:
            rule = rule or value_rule(base, name, value, settings)
        if rule:
            errors[where] = rule
    if request.sampler == "grid" and not errors:
        combinations = grid_size(request)
        if request.trials > combinations:
            errors["trials"] = f"the grid has {combinations} combinations; ask for at most that many trials"
    if not errors:
        cost, limit = examples_to_train(request, base, settings, dataset_rows), settings.sweep_max_examples
        if cost > limit:
            errors["trials"] = (
                f"the sweep may train up to {cost} examples (trials × epochs × train rows), "
                f"over the budget SWEEP_MAX_EXAMPLES={limit}"
            )
    if not errors:
        errors |= largest_trial_rule(request, base, settings, dataset_rows)
    if errors:
        raise SweepError(errors)
    return base


def size_rules(request: SweepRequest, settings: Settings) -> dict[str, str]:
    """What bounds a sweep's footprint in every process that reads it: the spec is stored and replayed whole,
    the grid sampler lists every combination of its space (on each trial's ask), and each trial's sampler is
    seeded with seed + its number."""
    errors = {}
    size = len(json.dumps(request.model_dump(mode="json", exclude_none=True)).encode())
    if size > settings.sweep_max_spec_bytes:
        errors["space"] = (
            f"the sweep's spec takes {size:,} bytes JSON-encoded, "
            f"over SWEEP_MAX_SPEC_BYTES={settings.sweep_max_spec_bytes:,}"
        )
    elif request.sampler == "grid" and (combinations := grid_size(request)) > settings.sweep_max_grid:
        errors["space"] = (
            f"the grid has {combinations:,} combinations, over SWEEP_MAX_GRID={settings.sweep_max_grid:,}; "
            "search fewer choices, or use the tpe or random sampler"
        )
    if request.seed is not None and request.seed + request.trials > SEED_LIMIT:
        errors["seed"] = (
            f"seed + trials must not exceed 2**32 (trial n is seeded with seed + n): "
            f"seed at most {SEED_LIMIT - request.trials} for {request.trials} trials"
        )
    return errors


def grid_size(request: SweepRequest) -> int:
    """The grid's combinations, counted without listing them (a range counts as one entry: it is refused on a grid)."""
    return math.prod(len(entry) if isinstance(entry, list) else 1 for entry in request.space.values())


def largest_trial_rule(
    request: SweepRequest, base: TrainParams, settings: Settings, dataset_rows: int | None = None
) -> dict[str, str]:
    """The per-job rules (MAX_JOB_TOKENS, MAX_STEP_TOKENS, MAX_DEVICES: the same ``check_cost`` as ``POST /train``)
    for the costliest trial the space allows; its errors name the base or space fields that set each value."""
    largest = {name: largest_value(request, name, getattr(base, name)) for name in COST_FIELDS}
    try:
        check_cost(base.model_copy(update=largest), settings, dataset_rows)
    except OverLimit as exc:
        where = {name: f"space.{name}" if name in request.space else f"base.{name}" for name in COST_FIELDS}
        return {where.get(name, name): rule for name, rule in exc.fields.items()}
    return {}


def largest_value(request: SweepRequest, name: str, default):
    """The largest value the space gives field ``name`` (``default``, the base's, when it is not searched)."""
    entry = request.space.get(name)
    if entry is None:
        return default
    values = [entry.high] if isinstance(entry, Range) else entry
    return max((default if v is None else v for v in values), key=lambda v: float("inf") if v is None else v)


def range_rule(name: str, entry: Range) -> str | None:
    kind = field_kind(name)
    if kind not in ("integer", "number"):
        return "a range needs a numeric field; give a list of choices"
    ints = [entry.low, entry.high] + ([entry.step] if entry.step is not None else [])
    if kind == "integer" and not all(isinstance(v, int) for v in ints):
        return "an integer field needs integer low, high and step"
    return None


@functools.cache
def field_kind(name: str) -> str:
    """The JSON type of a TrainParams field without its null: "integer", "number" (float or int), or another."""
    kind = field_kinds()[name]
    return kind if kind in ("number", "integer") else "other"


def value_rule(base: TrainParams, name: str, value: Any, settings: Settings) -> str | None:
    try:
        TrainParams(**(base.model_dump() | {name: value}))
        if name == "model":
            model_for_training(value, settings)
    except ValidationError as exc:
        return f"{value!r}: {exc.errors(include_url=False)[0]['msg']}"
    except ModelNotAllowed as exc:
        return str(exc)
    return None


def examples_to_train(
    request: SweepRequest, base: TrainParams, settings: Settings, dataset_rows: int | None = None
) -> int:
    """The most training examples the sweep can take: trials × the largest epochs × the largest train rows."""

    def largest(name: str, default):
        entry = request.space.get(name)
        if entry is None:
            return default
        values = [entry.high] if isinstance(entry, Range) else entry
        return max(default if v is None else v for v in values)

    # Unreadable here (the workers will say why): budget for the whole of BoolQ's train split.
    rows = dataset_rows or available_train_rows(settings.data_dir) or HUB_TRAIN_ROWS
    return int(
        request.trials * largest("epochs", base.epochs) * min(largest("train_limit", base.train_limit or rows), rows)
    )
