"""Request and response shapes of the API as pydantic models; ``/openapi.json`` is generated from them."""

from __future__ import annotations

from typing import Annotated, Literal

from flask import jsonify
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from app.params import StrictModel
from app.service.audit import AuditEntry
from app.service.datasets import ColumnMapping, DatasetRecord
from app.service.jobs import JOB_ID_RULE, Progress, ScoringProgress
from app.service.registry import ModelVersion

MAX_ITEMS = 256
Text = Annotated[str, Field(min_length=1, max_length=20_000)]
ModelName = Annotated[
    str,
    Field(min_length=1, max_length=255, description="A succeeded job id or a model folder under the model roots."),
]


class TrainQuery(StrictModel):
    """Query string of ``POST /train``."""

    wait: bool = Field(False, description="Wait for the job to finish (up to `timeout` seconds).")
    timeout: float | None = Field(None, gt=0, description="Seconds to wait when wait=true (capped by MAX_WAIT).")


class JobsQuery(StrictModel):
    """Query string of ``GET /jobs``."""

    page: int = Field(1, ge=1, le=100_000)
    per_page: int = Field(20, ge=1, le=100)


TopK = Annotated[int | None, Field(ge=1, le=1_000, description="Also answer the k most probable labels' scores.")]


class TextItem(StrictModel):
    text: Text
    text_pair: Text | None = None

    def as_pair(self) -> tuple[str, str | None]:
        return self.text, self.text_pair


class PredictText(TextItem):
    """``POST /predict`` with one text (or text pair)."""

    model: ModelName | None = None
    top_k: TopK = None


class PredictTextBatch(StrictModel):
    """``POST /predict`` with up to 256 texts (or text pairs)."""

    items: Annotated[list[TextItem], Field(min_length=1, max_length=MAX_ITEMS)]
    model: ModelName | None = None
    top_k: TopK = None


class QuestionPassage(StrictModel):
    """BoolQ's request shape, kept for yes/no models: question → text, passage → text pair."""

    question: Annotated[str, Field(min_length=1, max_length=2_000)]
    passage: Text

    def as_pair(self) -> tuple[str, str | None]:
        return self.question, self.passage


class PredictOne(QuestionPassage):
    """``POST /predict`` with one question (a yes/no model)."""

    model: ModelName | None = None


class PredictBatch(StrictModel):
    """``POST /predict`` with up to 256 questions (a yes/no model)."""

    items: Annotated[list[QuestionPassage], Field(min_length=1, max_length=MAX_ITEMS)]
    model: ModelName | None = None


class ResponseModel(BaseModel):
    """A response body: ``respond`` builds every one through its model, and a key the model does not declare is an
    error (a test's 500), not a field silently sent or dropped."""

    model_config = ConfigDict(extra="forbid")


class Answer(ResponseModel):
    answer: bool
    probability: float


class PredictOneResponse(Answer):
    model: str


class PredictBatchResponse(ResponseModel):
    answers: list[Answer]
    model: str


class LabelScore(ResponseModel):
    label: str
    score: float


class LabelAnswer(LabelScore):
    scores: list[LabelScore] | None = Field(None, description="The top_k most probable labels, best first.")


class PredictTextResponse(LabelAnswer):
    model: str


class PredictTextBatchResponse(ResponseModel):
    answers: list[LabelAnswer]
    model: str


Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "pruned"]


class JobAccepted(ResponseModel):
    job_id: str
    status: Status
    reason: str | None = Field(
        None,
        description='wait=true only: why the job had not ended when the wait ran out ("waiting for a gpu worker", '
        '"still running after 600 s").',
    )


class JobResult(ResponseModel):
    accuracy: float
    n_eval: int
    dev_accuracy: float
    metrics: dict
    tracking: dict | None
    model: str = Field(description="Name this model in POST /predict (the job id = its run folder).")
    warning: str | None = Field(None, description="Set when the model learned nothing (accuracy ≈ majority class).")


class PredictionsResult(ResponseModel):
    """A batch prediction's result (``POST /predictions``); its rows are at /jobs/<id>/predictions."""

    rows: int
    model: str = Field(description="The model that scored the rows (a champion is resolved at submit).")
    dataset: str
    split: str
    metrics: dict | None = Field(description="Accuracy, macro-F1 and the rest, when the rows have labels.")


class JobError(ResponseModel):
    type: str
    message: str


class JobView(ResponseModel):
    job_id: str
    status: Status
    owner: str | None = Field(description="The key that created it (None: before keys, or an open service's CLI).")
    params: dict
    progress: Progress | ScoringProgress | None
    waiting: str | None = Field(
        description='For a queued job no live worker can take: why ("waiting for a gpu worker").'
    )
    attempt: int = Field(description="Which run of the job this is: 1, or more after its worker died (JOB_RETRIES).")
    max_attempts: int = Field(description="1 + the re-runs the job is allowed after its worker dies.")
    previous_attempt: JobError | None = Field(description="Why the previous run ended (None on the first run).")
    created_at: str | None
    enqueued_at: str | None
    started_at: str | None
    ended_at: str | None
    result: JobResult | PredictionsResult | None
    error: JobError | None


class JobList(ResponseModel):
    jobs: list[JobView]
    page: int
    per_page: int
    total: int


class TrainResult(ResponseModel):
    """``POST /train?wait=true`` when the job succeeded in time (the original tutorial script's contract)."""

    job_id: str
    status: Status
    accuracy: float
    n_eval: int
    dev_accuracy: float
    predictions: list[int]
    metrics: dict
    tracking: dict | None = Field(None, description="Where the run was tracked (MLflow run id and URL), if it was.")


class Prediction(ResponseModel):
    idx: int | str
    label: int = Field(description="The label id (the job's metrics name it: label_names).")
    prediction: int
    probability: float = Field(description="Two labels: of label 1 (P(yes) on BoolQ); more: of the prediction.")
    scores: list[float] | None = Field(None, description="Every label's probability, in label id order.")


class ScoredRow(ResponseModel):
    """One row of a batch prediction, labels by name."""

    idx: int | str
    label: str | None = Field(None, description="The row's label, when the dataset has labels.")
    prediction: str
    score: float = Field(description="The probability of the prediction.")
    scores: list[float] = Field(description="Every label's probability, in the model's label order.")


class PredictionList(ResponseModel):
    job_id: str
    predictions: list[Prediction] | list[ScoredRow]


class ErrorDetail(ResponseModel):
    code: str
    message: str
    fields: dict[str, str]


class ErrorBody(ResponseModel):
    error: ErrorDetail


class Health(ResponseModel):
    status: str
    checks: dict[str, str] | None = None


def require_exactly_one(schema: dict, *names: str) -> None:
    """Make optional fields ``names`` non-nullable in ``schema`` and require exactly one of them (``oneOf``)."""
    for name in names:
        field = schema["properties"][name]
        schema["properties"][name] = {key: value for key, value in field.items() if key != "anyOf"} | field["anyOf"][0]
        schema["properties"][name].pop("default", None)
    schema["oneOf"] = [{"required": [name]} for name in names]


class PromoteRequest(StrictModel):
    """``POST /models/champion``: name the version by its job id or its number (one of the two)."""

    job_id: Annotated[
        str | None,
        Field(pattern=f"^{JOB_ID_RULE}$", description="A job that registered a version (letters, digits, - and _)."),
    ] = None
    version: Annotated[StrictInt | None, Field(ge=1, description="A version number of the registered model.")] = None
    force: StrictBool = Field(False, description="Promote even if its val accuracy is below the champion's.")

    # The rule the validator below keeps, said in the schema too: exactly one of the two names, never null.
    model_config = ConfigDict(json_schema_extra=lambda schema: require_exactly_one(schema, "job_id", "version"))

    @model_validator(mode="after")
    def one_name(self):
        given = {name for name in ("job_id", "version") if name in self.model_fields_set}
        if len(given) != 1 or getattr(self, given.pop()) is None:
            raise ValueError("give exactly one of job_id and version (not null)")
        return self


class ModelList(ResponseModel):
    registered_model: str
    champion: ModelVersion | None = Field(description="what /predict serves: the version POST /models/champion set")
    models: list[ModelVersion]
    alias_warning: str | None = Field(
        default=None, description="set when MLflow's champion alias was moved outside this service (not served)"
    )


class ChampionView(ResponseModel):
    champion: ModelVersion


TrialStatus = Literal["queued", "running", "succeeded", "pruned", "failed", "cancelled"]


class TrialRow(ResponseModel):
    """One trial of a sweep's leaderboard."""

    trial: int
    job_id: str | None
    status: TrialStatus
    params: dict = Field(description="The searched values this trial drew.")
    dev_accuracy: float | None = Field(description="What the sweep chooses on (the kept epoch's dev accuracy).")
    dev_accuracy_per_epoch: list[float]
    val_accuracy: float | None = Field(description="Shown beside dev accuracy; never used to choose.")
    pruned_at_epoch: int | None


class SweepAccepted(ResponseModel):
    sweep_id: str
    status: Literal["running"]


class SweepView(ResponseModel):
    sweep_id: str
    status: Literal["running", "finished", "cancelled", "failed"]
    owner: str | None = Field(description="The key that created it (None: before keys, or an open service's CLI).")
    created_at: str | None
    ended_at: str | None
    base: dict
    space: dict
    trials: int
    parallel: int
    sampler: str
    pruner: str | dict
    promote: bool
    counts: dict[str, int]
    best: TrialRow | None
    registration: dict | None = Field(description="The best trial's registered version, and whether it was promoted.")
    failure: str | None = Field(None, description="Why the sweep failed (status failed): its driver's error.")
    leaderboard: list[TrialRow] | None = Field(None, description="Best dev accuracy first (absent in GET /sweeps).")


class SweepList(ResponseModel):
    sweeps: list[SweepView]
    page: int
    per_page: int
    total: int


def respond(model: type[BaseModel], http_status: int = 200, headers: dict | None = None, /, **fields):
    """A response built by its OpenAPI model, so what the spec says and what is sent cannot drift apart."""
    return jsonify(model(**fields).model_dump(mode="json", exclude_unset=True)), http_status, headers or {}


class DatasetUploadQuery(StrictModel):
    """Query string of ``POST /datasets``: the file's name (for a raw body) and its column mapping."""

    filename: str | None = Field(None, min_length=1, max_length=255, description="Its suffix names the format.")
    text_column: str = Field("text", min_length=1, max_length=255)
    text_pair_column: str | None = Field(None, min_length=1, max_length=255)
    label_column: str = Field("label", min_length=1, max_length=255)

    def mapping(self) -> ColumnMapping:
        return ColumnMapping(**self.model_dump(exclude={"filename"}))


class DatasetView(ResponseModel, DatasetRecord):
    """A stored dataset (``GET /datasets/<id>``)."""


class DatasetList(ResponseModel):
    datasets: list[DatasetView]


class AuditQuery(StrictModel):
    """Query string of ``GET /audit``."""

    count: int = Field(100, ge=1, le=1_000, description="How many of the newest entries.")


class AuditList(ResponseModel):
    entries: list[AuditEntry] = Field(description="Newest first.")
