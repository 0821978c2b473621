"""A team's API keys: named, each with a role, stored in Redis as the sha256 of the key (never the key itself); and
the role table, the one place that says what each role may do.

Redis is the source of truth and is read on every request (one GET), so a revoked key is refused at once by every
replica; nothing is cached. ``API_TOKEN``, when set, is one more admin key, named ``API_TOKEN``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis import Redis, WatchError

from app.config import Settings
from app.service.redis_connection import service_key

log = logging.getLogger(__name__)

# What a request may do, each with the endpoints it opens (docs/security.md's table is checked against this).
ACTIONS = {
    "read": "GET /models, /datasets, /jobs, /sweeps and each one's page",
    "predict": "POST /predict",
    "train": "POST /train, POST /predictions (queue a training or a batch prediction)",
    "sweep": "POST /sweeps",
    "upload": "POST /datasets",
    "cancel": "POST /jobs/{id}/cancel, POST /sweeps/{id}/cancel",
    "see_all": "see and cancel every key's jobs, sweeps and datasets (without it: only its own)",
    "promote": "POST /models/champion",
    "delete": "DELETE /datasets/{id}",
    "audit": "GET /audit",
}
Role = Literal["admin", "trainer", "reader"]
ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset(ACTIONS),
    "trainer": frozenset({"read", "predict", "train", "sweep", "upload", "cancel"}),
    "reader": frozenset({"read", "predict"}),
}
# Not a role a key can have: what a request without a key may do where PUBLIC_READS opens the reads.
PUBLIC_READS_ACTIONS = frozenset({"read", "see_all"})
# The principal API_TOKEN is: a name no created key can take (key names are lower case).
API_TOKEN_NAME = "API_TOKEN"
NAME_RULE = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# A key's "last used" is written at most this often per process and key (not one write per request).
LAST_USED_EVERY_S = 60.0


class KeyExists(Exception):
    """A key of that name exists already (revoke it first)."""


class KeyNotFound(Exception):
    """No key of that name."""


@dataclass(frozen=True)
class Principal:
    """Who a request is: a key's name and role, or ``anonymous`` (no key) with what the service lets it do."""

    name: str
    role: str | None
    actions: frozenset[str]
    authenticated: bool = True

    def may(self, action: str) -> bool:
        return action in self.actions

    def sees(self, owner: str | None) -> bool:
        """Whether this principal may see (and, with ``cancel``, cancel) what ``owner`` created."""
        return self.may("see_all") or (self.authenticated and owner == self.name)


def anonymous(auth_required: bool, public_reads: bool) -> Principal:
    """A request without a (valid) key: anything on an open service (no key, no API_TOKEN), the reads where
    PUBLIC_READS opens them, else nothing."""
    if not auth_required:
        return Principal("anonymous", "admin", ROLES["admin"], authenticated=False)
    return Principal("anonymous", None, PUBLIC_READS_ACTIONS if public_reads else frozenset(), authenticated=False)


class KeyRecord(BaseModel):
    """A key as stored (read back from Redis through this model: data to check, never trusted as is)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_RULE)
    role: Role
    created_at: float


class KeyView(KeyRecord):
    """``python -m app keys list``: a key's name, role, when it was created and last used; never the key."""

    last_used_at: float | None = None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The service's keys in Redis (keyed by its queue name): ``names`` maps a name to its key's sha256, and each
    sha256 has its record, so a request's key is found with one GET."""

    def __init__(self, settings: Settings, connection: Redis):
        self.settings = settings
        self.connection = connection
        self.names = service_key(settings.queue_name, "keys", "names")
        self.last_used = service_key(settings.queue_name, "keys", "last-used")
        self.written: dict[str, float] = {}  # name → when this process last wrote its last_used

    def record_key(self, sha256: str) -> str:
        return service_key(self.settings.queue_name, "keys", "by-hash", sha256)

    def create(self, name: str, role: Role) -> str:
        """Store a new key and return it: the only time it is ever seen (a name against NAME_RULE is a
        ValidationError, before anything is stored)."""
        record = KeyRecord(name=name, role=role, created_at=time.time())
        key = "bq_" + secrets.token_urlsafe(32)
        sha256 = digest(key)
        with self.connection.pipeline() as pipe:
            try:
                pipe.watch(self.names)
                if pipe.hexists(self.names, name):
                    raise KeyExists(f"a key named {name!r} exists; revoke it first")
                pipe.multi()
                pipe.hset(self.names, name, sha256)
                pipe.set(self.record_key(sha256), record.model_dump_json())
                pipe.execute()
            except WatchError as exc:  # another create or revoke at the same moment
                raise KeyExists(f"the keys changed while creating {name!r}; try again") from exc
        return key

    def revoke(self, name: str) -> None:
        """Remove the key: every replica refuses it from the next request on."""
        sha256 = self.connection.hget(self.names, name)
        if sha256 is None:
            raise KeyNotFound(f"no key named {name!r}")
        pipe = self.connection.pipeline()
        pipe.hdel(self.names, name).delete(self.record_key(sha256.decode())).hdel(self.last_used, name)
        pipe.execute()

    def list(self) -> list[KeyView]:
        """Every key, oldest first (records that do not read as a key are logged and left out)."""
        views = []
        for name, sha256 in self.connection.hgetall(self.names).items():
            record = self.read(sha256.decode())
            if record is None or record.name != name.decode():
                log.warning("key %r: its record is missing or does not match; not listed", name)
                continue
            used = self.connection.hget(self.last_used, record.name)
            views.append(KeyView(**record.model_dump(), last_used_at=float(used) if used else None))
        return sorted(views, key=lambda view: view.created_at)

    def any(self) -> bool:
        """Whether any key exists: then every request needs one (as with API_TOKEN)."""
        return self.connection.hlen(self.names) > 0

    def read(self, sha256: str) -> KeyRecord | None:
        raw = self.connection.get(self.record_key(sha256))
        if raw is None:
            return None
        try:
            return KeyRecord.model_validate_json(raw)
        except ValidationError:
            log.warning("the key record under %s is not a key record; refused", self.record_key(sha256))
            return None

    def principal_of(self, key: str) -> Principal | None:
        """Whom ``key`` names: API_TOKEN's admin, a stored key's name and role, or None (unknown or revoked)."""
        token = self.settings.api_token
        if token and hmac.compare_digest(key.encode(), token.encode()):
            return Principal(API_TOKEN_NAME, "admin", ROLES["admin"])
        record = self.read(digest(key))
        if record is None:
            return None
        self.note_use(record.name)
        return Principal(record.name, record.role, ROLES[record.role])

    def note_use(self, name: str) -> None:
        now = time.time()
        if now - self.written.get(name, 0.0) >= LAST_USED_EVERY_S:
            self.connection.hset(self.last_used, name, now)
            self.written[name] = now
