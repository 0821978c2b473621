"""``GET /audit``: the newest entries of the audit stream (who trained, swept, promoted, cancelled, deleted)."""

from __future__ import annotations

from flask import Blueprint, request

from app.api.auth import allowed
from app.api.body import parse
from app.api.context import current_service
from app.api.openapi import documented
from app.api.schemas import AuditList, AuditQuery, respond

bp = Blueprint("audit", __name__)


@bp.get("/audit")
@documented("The audit trail, newest first (admin keys only)", {200: ("The entries", AuditList)}, query=AuditQuery)
@allowed("audit")
def index():
    query = parse(AuditQuery, request.args.to_dict(), where="query")
    return respond(AuditList, entries=[entry.model_dump() for entry in current_service().audit.latest(query.count)])
