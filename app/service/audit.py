"""The audit trail: who trained, swept, promoted, cancelled, deleted, created or revoked a key, when, and on what.

One capped Redis stream per service (``XADD MAXLEN ~ AUDIT_MAX_ENTRIES``), so it never grows without bound and
every replica writes to and reads the same one.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis import Redis

from app.config import Settings
from app.service.redis_connection import service_key

log = logging.getLogger(__name__)


class AuditEntry(BaseModel):
    """One entry, as ``GET /audit`` shows it (read back from Redis through this model)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="The stream entry's id (milliseconds-sequence).")
    time: str = Field(description="When, in ISO 8601 (UTC).")
    actor: str = Field(description="The key's name (API_TOKEN, anonymous on an open service, cli).")
    role: str
    action: str
    target: str = Field(description="A job, sweep, dataset or key name; a model version.")
    address: str = Field(description="The client's address ('' from the command line).")


class AuditLog:
    def __init__(self, settings: Settings, connection: Redis):
        self.connection = connection
        self.key = service_key(settings.queue_name, "audit")
        self.max_entries = settings.audit_max_entries

    def record(self, actor: str, role: str | None, action: str, target: str, address: str | None = None) -> None:
        fields = {"actor": actor, "role": role or "", "action": action, "target": target, "address": address or ""}
        self.connection.xadd(self.key, fields, maxlen=self.max_entries, approximate=True)

    def latest(self, count: int) -> list[AuditEntry]:
        """The ``count`` newest entries, newest first; an entry that does not read as one is logged and skipped."""
        entries = []
        for entry_id, fields in self.connection.xrevrange(self.key, count=count):
            values = {k.decode(): v.decode() for k, v in fields.items()}
            stream_id = entry_id.decode()
            moment = datetime.fromtimestamp(int(stream_id.split("-")[0]) / 1000, UTC).isoformat()
            try:
                entries.append(AuditEntry(id=stream_id, time=moment, **values))
            except (ValidationError, TypeError):
                log.warning("audit entry %s is not an audit entry; skipped", stream_id)
        return entries
