"""The dataset store: uploaded files kept content-addressed, checked once on upload, described in Redis.

A dataset is a file plus its column mapping. Its id is the first 16 hex digits of the sha256 of both, so the same
file uploaded twice (with the same mapping) is one dataset. The file lives once per content under
``ARTIFACTS_DIR/datasets/files/<sha256>.<format>``; its description (columns, rows per split, label histogram,
majority baseline) is a JSON record in Redis, which replicas list and admission reads (no file is counted on the API
host). A worker reads the file by its sha256 and checks the digest before training on it: a record from Redis names
a file, it does not vouch for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis import Redis

from app.config import Settings
from app.engine.data import DataError, Dataset, DatasetSpec, format_of, load_dataset, read_table
from app.params import BUILTIN_DATASET, TrainParams
from app.service.model_store import ModelStoreUnavailable, mlflow_runs
from app.service.redis_connection import service_key
from app.tracking import models_travel_through_mlflow

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PREVIEW_ROWS = 5
CONTENT_TYPES = {
    "text/csv": "csv",
    "text/tab-separated-values": "tsv",
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/json-lines": "jsonl",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
}


class DatasetNotFound(LookupError):
    """No dataset has this id."""


class DatasetInvalid(ValueError):
    """The upload (or a mapping asked of a stored dataset) does not make a dataset; the message says why."""

    def __init__(self, message: str, field: str = "file"):
        super().__init__(message)
        self.fields = {field: message}


class DatasetTooLarge(ValueError):
    """The upload is larger than MAX_DATASET_MB."""


class DatasetInUse(RuntimeError):
    """A queued or running job trains on the dataset."""


class ColumnMapping(BaseModel):
    """Which columns hold the text, the optional text pair and the label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_column: str = Field("text", min_length=1, max_length=255)
    text_pair_column: str | None = Field(None, min_length=1, max_length=255)
    label_column: str = Field("label", min_length=1, max_length=255)


class DatasetRecord(BaseModel):
    """What the store knows of a dataset (``GET /datasets/<id>``); read back from Redis through this model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[0-9a-f]{16}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Of the file's bytes.")
    filename: str
    format: str
    size_bytes: int
    columns: list[str]
    mapping: ColumnMapping
    label_names: list[str]
    rows: dict[str, int] = Field(description="Rows per split (val: split off train, stratified, when not given).")
    label_histogram: dict[str, dict[str, int]] = Field(description="Per split: label → rows.")
    majority_baseline: float = Field(description="Val accuracy of always answering the most common train label.")
    preview: list[dict] = Field(description="The first rows of the file, as read.")
    created_at: float
    owner: str | None = None
    mlflow_run_id: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{32}$",
        description="The MLflow run holding the file, where files travel through MLflow.",
    )


class DatasetStore:
    """The service's datasets: files under ``ARTIFACTS_DIR/datasets/files``, records in one Redis hash per
    service (keyed by its queue name, as admission's keys are)."""

    def __init__(self, settings: Settings, connection: Redis):
        self.settings = settings
        self.connection = connection
        self.key = service_key(settings.queue_name) + ":datasets"
        self.files = Path(settings.artifacts_dir) / "datasets" / "files"

    def file_path(self, record: DatasetRecord) -> Path:
        return self.files / f"{record.sha256}.{record.format}"

    def store_upload(
        self,
        stream: IO[bytes],
        filename: str,
        content_type: str | None,
        mapping: ColumnMapping,
        owner: str | None = None,
    ) -> tuple[DatasetRecord, bool]:
        """Check the upload and keep it: ``(record, created)``. Nothing is left behind when it is refused."""
        fmt = upload_format(filename, content_type)
        self.files.mkdir(parents=True, exist_ok=True)
        partial = self.files / f".partial-{uuid.uuid4().hex}.{fmt}"
        try:
            sha256, size = write_capped(stream, partial, self.settings.max_dataset_mb)
            dataset_id = id_of(sha256, mapping)
            existing = self.read(dataset_id)
            if existing is not None and (self.file_path(existing).is_file() or existing.mlflow_run_id):
                return existing, False
            spec = DatasetSpec(name=dataset_id, source=str(partial), format=fmt, **mapping.model_dump())
            try:
                dataset = load_dataset(spec, max_rows=self.settings.max_dataset_rows)
                columns, preview = peek(partial, fmt)
            except DataError as exc:
                raise DatasetInvalid(str(exc).replace(partial.name, filename or "the upload")) from exc
            record = describe(dataset_id, sha256, filename, fmt, size, columns, mapping, dataset, preview, owner)
            os.replace(partial, self.file_path(record))
            record = self.published(record)
        finally:
            partial.unlink(missing_ok=True)
        self.connection.hset(self.key, record.id, record.model_dump_json())
        log.info("dataset %s stored: %s, %d rows", record.id, filename, sum(record.rows.values()))
        return record, True

    def published(self, record: DatasetRecord) -> DatasetRecord:
        """With an MLflow tracking server (as models travel), the file uploaded there too, its run in the record,
        so workers on other hosts can fetch it; the record unchanged otherwise."""
        if not models_travel_through_mlflow(self.settings):
            return record
        try:
            run_id = mlflow_runs(self.settings).publish_dataset(self.file_path(record), record.sha256)
        except Exception as exc:  # any client or server failure means the same: the file cannot travel now
            self.file_path(record).unlink(missing_ok=True)
            raise ModelStoreUnavailable(f"the MLflow server could not take the dataset ({type(exc).__name__})") from exc
        return record.model_copy(update={"mlflow_run_id": run_id})

    def local_file(self, record: DatasetRecord) -> Path:
        """The record's file on this host, fetched from the MLflow server when it is not here, its sha256 checked:
        a record from Redis names a file, it does not vouch for it."""
        path = self.file_path(record)
        if not path.is_file() and record.mlflow_run_id and models_travel_through_mlflow(self.settings):
            self.files.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".fetch-", dir=self.files) as tmp:
                fetched = mlflow_runs(self.settings).download_dataset(record.mlflow_run_id, path.name, Path(tmp))
                if file_sha256(fetched) == record.sha256:
                    os.replace(fetched, path)
        if not path.is_file():
            raise DataError(f"dataset {record.id}: its file is neither on this host ({path}) nor on the MLflow server")
        if file_sha256(path) != record.sha256:
            raise DataError(f"dataset {record.id}: the file's sha256 differs from the one recorded at upload; refused")
        return path

    def read(self, dataset_id: str) -> DatasetRecord | None:
        """The stored record, checked against its model (a malformed one is logged and treated as absent)."""
        raw = self.connection.hget(self.key, dataset_id)
        if raw is None:
            return None
        try:
            return DatasetRecord.model_validate_json(raw)
        except ValidationError as exc:
            log.warning("dataset record %s in Redis is malformed, ignored: %s", dataset_id, exc)
            return None

    def get(self, dataset_id: str) -> DatasetRecord:
        record = self.read(dataset_id)
        if record is None:
            raise DatasetNotFound(f"no dataset {dataset_id!r}: GET /datasets lists them, POST /datasets uploads one")
        return record

    def records(self) -> list[DatasetRecord]:
        """Every stored dataset, newest first."""
        keys = (key.decode() if isinstance(key, bytes) else key for key in self.connection.hkeys(self.key))
        return sorted((r for r in map(self.read, keys) if r is not None), key=lambda r: -r.created_at)

    def delete(self, dataset_id: str, in_use: bool) -> None:
        """Remove the record, and the file when no other dataset shares it; refused while ``in_use``."""
        record = self.get(dataset_id)
        if in_use:
            raise DatasetInUse(f"dataset {dataset_id} is used by a queued or running job; cancel it or wait")
        self.connection.hdel(self.key, dataset_id)
        if not any(other.sha256 == record.sha256 for other in self.records()):
            self.file_path(record).unlink(missing_ok=True)

    def check_mapping(self, params: TrainParams) -> DatasetRecord | None:
        """Before a job is queued: the dataset exists and the columns the request maps are in its file (422
        naming them, with the columns there are). None for the built-in dataset."""
        if params.dataset == BUILTIN_DATASET:
            if params.column_mapping:
                field = next(iter(params.column_mapping))
                raise DatasetInvalid(f"{field}: the built-in boolq dataset has a fixed mapping", field)
            return None
        try:
            record = self.get(params.dataset)
        except DatasetNotFound as exc:
            raise DatasetInvalid(str(exc), "dataset") from exc
        for field, column in params.column_mapping.items():
            if column not in record.columns:
                raise DatasetInvalid(
                    f"{field}: no column {column!r} in {record.filename}; its columns are: {', '.join(record.columns)}",
                    field,
                )
        return record

    def spec_for_training(self, params: TrainParams) -> DatasetSpec:
        """The spec a worker trains ``params.dataset`` with: the stored file (its digest checked) and mapping,
        with the request's own column choices over the stored ones."""
        record = self.get(params.dataset)
        path = self.local_file(record)
        mapping = record.mapping.model_dump() | params.column_mapping
        return DatasetSpec(name=record.id, source=str(path), format=record.format, file_sha256=record.sha256, **mapping)


def upload_format(filename: str, content_type: str | None) -> str:
    """The file's format from its name, else from its Content-Type."""
    try:
        return format_of(filename)
    except DataError:
        fmt = CONTENT_TYPES.get((content_type or "").split(";")[0].strip().lower())
        if fmt is None:
            raise DatasetInvalid(
                f"{filename or 'the upload'}: unknown file type; name it .csv, .tsv, .jsonl or .parquet, or send "
                f"Content-Type one of {', '.join(CONTENT_TYPES)}"
            ) from None
        return fmt


def write_capped(stream: IO[bytes], path: Path, max_mb: int) -> tuple[str, int]:
    """Copy ``stream`` to ``path`` hashing as it goes; DatasetTooLarge as soon as it passes ``max_mb``."""
    digest, size, limit = hashlib.sha256(), 0, max_mb * 1024 * 1024
    with path.open("wb") as out:
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise DatasetTooLarge(f"the file is larger than MAX_DATASET_MB ({max_mb} MB)")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), size


def peek(path: Path, fmt: str) -> tuple[list[str], list[dict]]:
    """The file's columns and first rows (the reader has just read it; this reads its cache)."""
    table = read_table(path, fmt)
    preview = table.select(range(min(PREVIEW_ROWS, len(table)))).to_list()
    return list(table.column_names), [{k: clip(v) for k, v in row.items()} for row in preview]


def clip(value):
    """A preview cell as JSON can hold it: long texts cut, other types (dates, bytes, lists) as text."""
    if value is not None and not isinstance(value, str | int | float | bool):
        value = str(value)
    return value[:300] + "…" if isinstance(value, str) and len(value) > 300 else value


def describe(
    dataset_id: str,
    sha256: str,
    filename: str,
    fmt: str,
    size: int,
    columns: list[str],
    mapping: ColumnMapping,
    dataset: Dataset,
    preview: list[dict],
    owner: str | None,
) -> DatasetRecord:
    names = dataset.label_names
    histogram = {
        split: {names[label]: n for label, n in sorted(Counter(e.label for e in rows).items())}
        for split, rows in (("train", dataset.train), ("val", dataset.val))
    }
    most_common = max(histogram["train"], key=histogram["train"].get)
    return DatasetRecord(
        id=dataset_id,
        sha256=sha256,
        filename=Path(filename).name[:255] or f"upload.{fmt}",
        format=fmt,
        size_bytes=size,
        columns=columns,
        mapping=mapping,
        label_names=list(names),
        rows={"train": len(dataset.train), "val": len(dataset.val)},
        label_histogram=histogram,
        majority_baseline=histogram["val"].get(most_common, 0) / len(dataset.val),
        preview=preview,
        created_at=time.time(),
        owner=owner,
    )


def id_of(content: str, mapping: ColumnMapping) -> str:
    """A dataset's id: its content (the file's sha256, or a hub name) and its mapping, so the same file mapped
    the same way is one dataset."""
    return hashlib.sha256(f"{content}\n{mapping.model_dump_json()}".encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_file_spec(data: str, val_data: str | None, params: TrainParams) -> tuple[DatasetSpec, str]:
    """The CLI's ``--data FILE``: its spec (with the request's columns, default text/label) and its id, the
    file's content digest as the store would name it."""
    if data.startswith("hub:"):
        mapping = ColumnMapping(**params.column_mapping)
        spec = DatasetSpec(name=data, source=data, format="hub", **mapping.model_dump())
        return spec, id_of(data, mapping)
    path = Path(data).expanduser()
    if not path.is_file():
        raise DataError(f"--data: {path}: file not found")
    mapping = ColumnMapping(**params.column_mapping)
    sha256 = file_sha256(path)
    spec = DatasetSpec(
        name=path.name, source=str(path), format=format_of(path), val_source=val_data, file_sha256=sha256,
        **mapping.model_dump(),
    )  # fmt: skip
    load_dataset(spec, max_rows=0)  # every data problem now, named, before a model loads
    dataset_id = id_of(sha256, mapping)
    return spec, dataset_id


def record_json(record: DatasetRecord) -> dict:
    return json.loads(record.model_dump_json())
