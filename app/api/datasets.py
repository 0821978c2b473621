"""Dataset endpoints: upload a file (multipart ``file`` or the raw body), list, show with a preview, delete."""

from __future__ import annotations

from flask import Blueprint, request, url_for

from app.api.auth import allowed, audit, owner_name, visible
from app.api.body import parse
from app.api.context import current_service
from app.api.errors import ApiError
from app.api.openapi import documented
from app.api.schemas import DatasetList, DatasetUploadQuery, DatasetView, respond
from app.service import datasets, jobs

bp = Blueprint("datasets", __name__)
DATASET_ID = "<dataset_id>"


@bp.post("/datasets")
@documented(
    "Upload a CSV, TSV, JSON Lines or Parquet file as a dataset (multipart field `file`, or the raw body with its "
    "Content-Type); the same file with the same mapping is the same dataset",
    {201: ("Stored (Location: /datasets/<id>)", DatasetView), 200: ("Already stored", DatasetView)},
    query=DatasetUploadQuery,
)
@allowed("upload")
def upload():
    service = current_service()
    query = parse(DatasetUploadQuery, request.args.to_dict(), where="query")
    limit = service.settings.max_dataset_mb * 1024 * 1024 + 64 * 1024  # the file and its multipart framing
    if request.content_length is not None and request.content_length > limit:
        raise datasets.DatasetTooLarge(f"the file is larger than MAX_DATASET_MB ({service.settings.max_dataset_mb} MB)")
    request.max_content_length = limit  # a chunked body: the store stops copying at MAX_DATASET_MB
    stream, filename, content_type = uploaded_file(query.filename)
    record, created = store().store_upload(stream, filename, content_type, query.mapping(), owner_name())
    headers = {"Location": url_for("datasets.show", dataset_id=record.id)}
    return respond(DatasetView, 201 if created else 200, headers, **datasets.record_json(record))


def uploaded_file(name: str | None):
    """The upload's stream, file name and content type: the multipart ``file`` field, else the body itself."""
    if request.mimetype == "multipart/form-data":
        part = request.files.get("file")
        if part is None:
            raise ApiError(422, "send the file in the multipart field 'file'", {"file": "missing"})
        return part.stream, name or part.filename or "", part.mimetype
    if not request.content_length and request.content_length is not None:
        raise ApiError(422, "the body is empty: send the file's bytes", {"file": "empty"})
    return request.stream, name or "", request.mimetype


@bp.get("/datasets")
@documented("Uploaded datasets, newest first (without previews)", {200: ("The datasets", DatasetList)})
@allowed("read")
def index():
    records = [r for r in store().records() if visible(r.owner)]
    return respond(DatasetList, datasets=[datasets.record_json(r) | {"preview": []} for r in records])


@bp.get(f"/datasets/{DATASET_ID}")
@documented(
    "One dataset: columns, mapping, rows per split, label histogram, baseline, first rows",
    {200: ("The dataset", DatasetView)},
)
@allowed("read")
def show(dataset_id: str):
    record = store().get(dataset_id)
    return respond(DatasetView, **datasets.record_json(record))


@bp.delete(f"/datasets/{DATASET_ID}")
@documented("Delete a dataset (refused while a queued or running job trains on it)", {204: ("Deleted", None)})
@allowed("delete")
def delete(dataset_id: str):
    store().delete(dataset_id, in_use=jobs.uses_dataset(current_service().queue, dataset_id))
    audit("delete_dataset", dataset_id)
    return "", 204


def store() -> datasets.DatasetStore:
    service = current_service()
    return datasets.DatasetStore(service.settings, service.queue.connection)
