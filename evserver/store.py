"""The server's persistent store: SQLite in the data directory, replicated by record.

Domains, accounts, encoders, server pools, server capacity weights, the
audit log, cluster settings and join tokens live in
``<data dir>/evserver.sqlite3`` (WAL mode, foreign keys on).  The
schema is versioned with ``PRAGMA user_version`` and upgraded on open by an
ordered list of migrations, all applied in one transaction; a database newer
than this code is refused.

Passwords are stored as scrypt hashes (:mod:`evserver.passwords`).  Encoder
secrets are random high-entropy tokens, so a single SHA-256 compared in
constant time is enough for them and keeps verification fast, which matters
when hundreds of encoders reconnect at once after a failover.

Replication
-----------

Every table is a set of records with the semantics of
:mod:`evserver.state.replica`: each field carries the hybrid-logical-clock
stamp of the write that set it, a delete is a tombstone stamp, and a merge
keeps per field the value with the larger stamp.  The design:

* **The replica key is the natural key**: domain name, account name, encoder
  id, pool name, server id (of a capacity weight), audit entry id, setting
  key, join token id.  The same name created on
  both sides of a partition is one record and merges field by field.
* **References by name.**  Accounts and encoders name their domain (column
  ``domain``, a foreign key to ``domains.name``), so a record means the same
  on every server and needs no translation.  ``uid`` is an ordinary
  replicated field: a fresh random id given whenever the record is (re)created
  (concurrent creations converge on the later one's); nothing refers to it.
* **Columns.**  Every row has ``stamps`` (JSON: field name -> ``Stamp.encode()``
  text, whose string order is the stamp order) and ``deleted`` (the
  tombstone's stamp text or NULL), and two columns derived from them: ``fp``,
  the record's anti-entropy fingerprint, and ``live``, 1 when *every*
  field was written after the tombstone, that is when the record was
  (re)created after its last deletion.  This is stricter than
  ``Record.live`` on purpose: a lone field update that races a delete (a
  password set on one side while the account is deleted on the other) does
  not bring back half an account; it is kept and replicated, but hidden until
  the record is created again.
* **Deletes are tombstones**: the row stays.  Every read, list, verification
  and uniqueness check sees live rows only; adding a name whose row is dead
  revives the row with every field stamped after the tombstone.
* **Out of order.**  An account or encoder may arrive before its domain, or
  after its domain was deleted elsewhere: it is stored anyway.  A missing
  domain gets a placeholder row (no stamps, never live, not in the digest,
  filled in when the domain's record arrives) so the foreign key holds.  A
  domain is listed while it is live *or* still holds a live account or
  encoder: an encoder added to a domain on one side of a partition while the
  domain was deleted on the other keeps working after the heal and shows its
  domain (delete the domain again once it is empty).  Which rows are visible
  is a function of the replicated state alone, so every converged server
  lists the same.
* **Pools.**  A pool (``pools``: a name, the ids of its servers, a
  description) is named by encoders and domains in their column ``pool``
  (NULL: none), by name like the domain references, but *without* a foreign
  key and without placeholder rows: a pool record carries data a
  placeholder could not stand in for, and a reference may legitimately
  outlive its pool (deleted on one server while assigned on another).  A
  reference to a pool that is not live is *dangling*: it is kept and
  replicated, counts as no pool (:meth:`Store.encoder_pools` falls back to
  the domain's pool, then to none) and comes back to life if a pool of that
  name is created again.  :meth:`Store.delete_pool` refuses while a live
  encoder or domain uses the pool, so only concurrent changes leave a
  dangling reference.  The pool of a domain counts only while the domain
  record is live (not while it is listed only through its accounts or
  encoders).  ``server_weights`` holds each server's capacity weight for the
  balancer (a server without a record weighs 1; a delete resets to 1).
* **Stamps.**  One stamp per write call, from :attr:`Store.hlc`; a local
  write is always stamped later than the record's current state, so it takes
  effect.  Stamps found in the database and in merged updates are observed,
  so the clock never goes back across restarts.  The migration that added
  the columns stamped every existing row with one stamp from this clock: a
  standalone server that becomes a cluster keeps its data.  A migration that
  adds a field to a replicated table with a ``uid`` (``pool``, schema 4)
  stamps it in every existing record with the stamp of the record's ``uid``
  (the stamp of its last (re)creation), with a null value:
  which records are live does not change, and servers that held the same
  records before the upgrade hold the same fingerprints after it.

``subscribe`` gives the change feed (one :class:`~evserver.state.replica.Update`
per committed local write, to push to peers), ``apply_updates`` merges what
peers send, and ``digest`` / ``updates_for`` are anti-entropy: one query per
table whatever the number of records.

A ``Store`` is used from one thread (the reactor's); it does no slow work
except :meth:`Store.add_account` and :meth:`Store.set_password`, which hash
the password.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import attrs
from twisted.logger import Logger

from evserver.passwords import check_password, hash_password
from evserver.state.hlc import ZERO, HybridClock, Stamp
from evserver.state.replica import Update

log = Logger()

DB_FILENAME = "evserver.sqlite3"
MAX_NAME_CHARS = 64
ROLES = ("viewer", "admin")
Role = Literal["viewer", "admin"]
ENCODER_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_SECRET_CHARS = 16
MAX_SECRET_CHARS = 256
SECRET_PATTERN = re.compile(r"[!-~]+")  # printable ASCII, no spaces
SETTING_KEY_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
TOKEN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")
#: A server id, as ``evserver.config.SERVER_ID_PATTERN``.
SERVER_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: The most servers one pool may name.
MAX_POOL_SERVERS = 64
MAX_DESCRIPTION_CHARS = 256
#: Capacity weights: 0 < weight <= MAX_WEIGHT; a server without one weighs DEFAULT_WEIGHT.
MAX_WEIGHT = 1000.0
DEFAULT_WEIGHT = 1.0
#: The longest text a replicated field may hold (audit details, settings as JSON).
MAX_FIELD_CHARS = 65536
_SECRET_SCHEME = "sha256$"
#: The node id of the clock a Store makes when it is given none.
LOCAL_NODE = "local"


class StoreError(Exception):
    """Base class of every error the store reports.

    ``field`` names the input at fault when the error is about one
    (``"name"``, ``"servers"``, ``"weight"``, ``"pool"``...), so that a form
    can show the message next to that field; None otherwise.
    """

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Invalid(StoreError):
    """A name, id, password or secret that the store does not accept."""


class AlreadyExists(StoreError):
    """A record with that name or id exists already."""


class NotFound(StoreError):
    """No record with that name or id."""


class NotEmpty(StoreError):
    """A domain still has accounts or encoders, or a pool is still assigned."""


class SchemaTooNew(StoreError):
    """The database was written by a newer evserver."""


class NotADatabase(StoreError):
    """The file exists but is not an SQLite database."""


class BadUpdate(Invalid):
    """A replicated update that names an unknown table or field, or holds a bad stamp or value."""


_REPLICATION_COLUMNS = """
            stamps  TEXT NOT NULL DEFAULT '{}',
            deleted TEXT,
            live    INTEGER NOT NULL DEFAULT 0,
            fp      BLOB"""


# The ordered migrations.  Migration i (0-based) takes the schema from
# version i to version i + 1.  Never edit a released migration: append one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE domains (
            uid     TEXT PRIMARY KEY NOT NULL,
            name    TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),
            created REAL NOT NULL,
            updated REAL NOT NULL
        )
        """,
        """
        CREATE TABLE accounts (
            uid           TEXT PRIMARY KEY NOT NULL,
            name          TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),
            domain_uid    TEXT NOT NULL REFERENCES domains (uid) ON DELETE RESTRICT,
            password_hash TEXT NOT NULL,
            role          TEXT NOT NULL CHECK (role IN ('viewer', 'admin')),
            created       REAL NOT NULL,
            updated       REAL NOT NULL
        )
        """,
        "CREATE INDEX accounts_domain ON accounts (domain_uid)",
        """
        CREATE TABLE encoders (
            uid         TEXT PRIMARY KEY NOT NULL,
            encoder_id  TEXT NOT NULL UNIQUE CHECK (length(encoder_id) BETWEEN 1 AND 64),
            name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
            domain_uid  TEXT NOT NULL REFERENCES domains (uid) ON DELETE RESTRICT,
            secret_hash TEXT NOT NULL,
            created     REAL NOT NULL,
            updated     REAL NOT NULL
        )
        """,
        "CREATE INDEX encoders_domain ON encoders (domain_uid)",
    ),
    # 1 -> 2: the admin site's audit log (who changed what, when, on which server).
    (
        """
        CREATE TABLE audit_log (
            id        TEXT PRIMARY KEY NOT NULL,
            at        REAL NOT NULL,
            actor     TEXT NOT NULL,
            server_id TEXT NOT NULL,
            action    TEXT NOT NULL,
            target    TEXT NOT NULL,
            detail    TEXT NOT NULL DEFAULT ''
        )
        """,
        "CREATE INDEX audit_log_at ON audit_log (at)",
    ),
    # 2 -> 3: replication.  Every table gains ``stamps``, ``deleted``, ``live``
    # and ``fp`` (see the module docstring); every existing row is stamped,
    # all fields, with one stamp from the store's clock
    # (``evs_migration_stamps(field, ...)`` and ``evs_fingerprint(stamps,
    # deleted)`` are registered by Store).
    # Accounts and encoders are rebuilt to name their domain instead of
    # pointing at its uid (a replicated reference must mean the same on
    # every server); ``domain`` may be NULL only in a row that is not live
    # (a field update that arrived before the record's creation).  New
    # replicated tables: ``settings`` (JSON values) and ``join_tokens``.
    (
        "ALTER TABLE domains ADD COLUMN stamps TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE domains ADD COLUMN deleted TEXT",
        "ALTER TABLE domains ADD COLUMN live INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE domains ADD COLUMN fp BLOB",
        "UPDATE domains SET stamps = evs_migration_stamps('uid', 'created', 'updated'), live = 1",
        f"""
        CREATE TABLE accounts_v3 (
            uid           TEXT PRIMARY KEY NOT NULL,
            name          TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),
            domain        TEXT REFERENCES domains (name) ON DELETE RESTRICT,
            password_hash TEXT NOT NULL,
            role          TEXT NOT NULL CHECK (role IN ('viewer', 'admin')),
            created       REAL NOT NULL,
            updated       REAL NOT NULL,{_REPLICATION_COLUMNS}
        )
        """,
        """
        INSERT INTO accounts_v3 (uid, name, domain, password_hash, role, created, updated,
                                 stamps, deleted, live)
        SELECT a.uid, a.name, d.name, a.password_hash, a.role, a.created, a.updated,
               evs_migration_stamps('uid', 'domain', 'password_hash', 'role', 'created',
                                    'updated'),
               NULL, 1
        FROM accounts a JOIN domains d ON a.domain_uid = d.uid
        """,
        "DROP TABLE accounts",
        "ALTER TABLE accounts_v3 RENAME TO accounts",
        "CREATE INDEX accounts_domain ON accounts (domain, live)",
        f"""
        CREATE TABLE encoders_v3 (
            uid         TEXT PRIMARY KEY NOT NULL,
            encoder_id  TEXT NOT NULL UNIQUE CHECK (length(encoder_id) BETWEEN 1 AND 64),
            name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
            domain      TEXT REFERENCES domains (name) ON DELETE RESTRICT,
            secret_hash TEXT NOT NULL,
            created     REAL NOT NULL,
            updated     REAL NOT NULL,{_REPLICATION_COLUMNS}
        )
        """,
        """
        INSERT INTO encoders_v3 (uid, encoder_id, name, domain, secret_hash, created, updated,
                                 stamps, deleted, live)
        SELECT e.uid, e.encoder_id, e.name, d.name, e.secret_hash, e.created, e.updated,
               evs_migration_stamps('uid', 'name', 'domain', 'secret_hash', 'created',
                                    'updated'),
               NULL, 1
        FROM encoders e JOIN domains d ON e.domain_uid = d.uid
        """,
        "DROP TABLE encoders",
        "ALTER TABLE encoders_v3 RENAME TO encoders",
        "CREATE INDEX encoders_domain ON encoders (domain, live)",
        "ALTER TABLE audit_log ADD COLUMN stamps TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE audit_log ADD COLUMN deleted TEXT",
        "ALTER TABLE audit_log ADD COLUMN live INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE audit_log ADD COLUMN fp BLOB",
        """
        UPDATE audit_log SET live = 1, stamps = evs_migration_stamps(
            'at', 'actor', 'server_id', 'action', 'target', 'detail')
        """,
        f"""
        CREATE TABLE settings (
            key   TEXT PRIMARY KEY NOT NULL CHECK (length(key) BETWEEN 1 AND 64),
            value TEXT NOT NULL DEFAULT 'null',{_REPLICATION_COLUMNS}
        )
        """,
        f"""
        CREATE TABLE join_tokens (
            token_id    TEXT PRIMARY KEY NOT NULL CHECK (length(token_id) BETWEEN 1 AND 64),
            secret_hash TEXT NOT NULL DEFAULT '',
            expires     INTEGER NOT NULL DEFAULT 0,
            used        INTEGER NOT NULL DEFAULT 0 CHECK (used IN (0, 1)),{_REPLICATION_COLUMNS}
        )
        """,
        *(f"UPDATE {table} SET fp = evs_fingerprint(stamps, deleted)"
          for table in ("domains", "accounts", "encoders", "audit_log")),
    ),
    # 3 -> 4: server pools and capacity weights (requirement R9).  New
    # replicated tables ``pools`` (``servers``: a JSON array of server ids)
    # and ``server_weights``; encoders and domains gain ``pool``, a pool's
    # name or NULL, without a foreign key (see "Pools" in the module
    # docstring).  Every record's new ``pool`` field is stamped with the
    # stamp of its ``uid`` (a record without one is not live and stays so),
    # so liveness is unchanged and upgraded replicas agree on fingerprints.
    (
        "ALTER TABLE encoders ADD COLUMN pool TEXT "
        "CHECK (pool IS NULL OR length(pool) BETWEEN 1 AND 64)",
        "ALTER TABLE domains ADD COLUMN pool TEXT "
        "CHECK (pool IS NULL OR length(pool) BETWEEN 1 AND 64)",
        *(f"""
        UPDATE {table}
        SET stamps = json_set(stamps, '$.pool', json_extract(stamps, '$.uid')),
            fp = evs_fingerprint(json_set(stamps, '$.pool', json_extract(stamps, '$.uid')),
                                 deleted)
        WHERE json_extract(stamps, '$.uid') IS NOT NULL
        """ for table in ("encoders", "domains")),
        "CREATE INDEX encoders_pool ON encoders (pool, live)",
        f"""
        CREATE TABLE pools (
            name        TEXT PRIMARY KEY NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
            servers     TEXT NOT NULL DEFAULT '[]'
                        CHECK (json_valid(servers) AND json_type(servers) = 'array'),
            description TEXT NOT NULL DEFAULT '',{_REPLICATION_COLUMNS}
        )
        """,
        f"""
        CREATE TABLE server_weights (
            server_id TEXT PRIMARY KEY NOT NULL CHECK (length(server_id) BETWEEN 1 AND 64),
            weight    REAL NOT NULL DEFAULT 1 CHECK (weight > 0),{_REPLICATION_COLUMNS}
        )
        """,
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
#: The first schema version with replication columns.
REPLICATED_SCHEMA_VERSION = 3


@attrs.frozen
class Domain:
    uid: str
    name: str
    created: float
    updated: float
    #: The pool its encoders prefer (those without a pool of their own), or None.
    pool: str | None = None


@attrs.frozen
class Account:
    uid: str
    name: str
    domain: str
    role: Role
    password_hash: str = attrs.field(repr=False)
    created: float
    updated: float


@attrs.frozen
class Encoder:
    uid: str
    encoder_id: str
    name: str
    domain: str
    secret_hash: str = attrs.field(repr=False)
    created: float
    updated: float
    #: Its own pool (the name, possibly of a pool deleted meanwhile), or None.
    pool: str | None = None


@attrs.frozen
class Pool:
    """A server pool: the servers that encoders using it prefer (requirement R9)."""

    name: str
    servers: tuple[str, ...]
    description: str = ""


@attrs.frozen
class AuditEntry:
    """One change recorded by the admin site (never a password or secret)."""

    id: str
    at: float
    actor: str
    server_id: str
    action: str
    target: str
    detail: str


@attrs.frozen
class JoinTokenRow:
    """What the store keeps of a join token (see :mod:`evserver.cluster.tokens`)."""

    token_id: str
    secret_hash: str = attrs.field(repr=False)
    expires: int
    used: bool


def validate_name(what: str, name: object) -> str:
    """Return ``name`` if it is a valid domain, account or encoder name, else raise Invalid.

    Valid: text of 1..64 characters, all printable (no control, format,
    separator other than the ASCII space, or surrogate characters), with no
    leading or trailing space.
    """
    if not isinstance(name, str):
        raise Invalid(f"{what} must be text, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise Invalid(f"{what} must be 1 to {MAX_NAME_CHARS} characters long, not {len(name)}")
    if not name.isprintable():
        raise Invalid(f"{what} {name!r} contains control or other non-printable characters")
    if name != name.strip():
        raise Invalid(f"{what} {name!r} has leading or trailing spaces")
    return name


def validate_encoder_id(encoder_id: object) -> str:
    """Return ``encoder_id`` if it matches ``[A-Za-z0-9._-]{1,64}``, else raise Invalid."""
    if not isinstance(encoder_id, str) or not ENCODER_ID_PATTERN.fullmatch(encoder_id):
        raise Invalid(
            f"encoder id {encoder_id!r} is invalid: use 1 to 64 characters "
            "from A-Z, a-z, 0-9, '.', '_' and '-'"
        )
    return encoder_id


def validate_role(role: object) -> Role:
    if role == "viewer":
        return "viewer"
    if role == "admin":
        return "admin"
    raise Invalid(f"role {role!r} is invalid: use one of {', '.join(ROLES)}")


def validate_secret(secret: object) -> str:
    """Return an acceptable encoder secret, else raise Invalid."""
    if (
        not isinstance(secret, str)
        or not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS
        or not SECRET_PATTERN.fullmatch(secret)
    ):
        raise Invalid(
            f"encoder secret must be {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} printable "
            "ASCII characters without spaces (leave it out to generate a strong one)"
        )
    return secret


def validate_setting_key(key: object) -> str:
    """Return ``key`` if it matches ``[A-Za-z0-9._-]{1,64}``, else raise Invalid."""
    if not isinstance(key, str) or not SETTING_KEY_PATTERN.fullmatch(key):
        raise Invalid(
            f"setting key {key!r} is invalid: use 1 to 64 characters "
            "from A-Z, a-z, 0-9, '.', '_' and '-'"
        )
    return key


def validate_token_id(token_id: object) -> str:
    """Return ``token_id`` if it matches ``[A-Za-z0-9_-]{8,64}``, else raise Invalid."""
    if not isinstance(token_id, str) or not TOKEN_ID_PATTERN.fullmatch(token_id):
        raise Invalid(
            f"token id {token_id!r} is invalid: use 8 to 64 characters "
            "from A-Z, a-z, 0-9, '_' and '-'"
        )
    return token_id


def validate_server_id(server_id: object, field: str | None = None) -> str:
    """Return ``server_id`` if it matches ``[A-Za-z0-9._-]{1,64}``, else raise Invalid."""
    if not isinstance(server_id, str) or not SERVER_ID_PATTERN.fullmatch(server_id):
        raise Invalid(
            f"server id {server_id!r} is invalid: use 1 to 64 characters "
            "from A-Z, a-z, 0-9, '.', '_' and '-'",
            field=field,
        )
    return server_id


def validate_pool_name(name: object) -> str:
    """Return ``name`` if it is a valid pool name (the rule of :func:`validate_name`)."""
    try:
        return validate_name("pool name", name)
    except Invalid as e:
        raise Invalid(str(e), field="name") from None


def validate_pool_servers(servers: object) -> tuple[str, ...]:
    """Return the server ids of a pool, in order, if they are acceptable, else raise Invalid.

    Acceptable: a list (or tuple) of 1 to MAX_POOL_SERVERS distinct server ids.
    """
    if not isinstance(servers, list | tuple):
        raise Invalid(f"servers must be a list of server ids, not {type(servers).__name__}",
                      field="servers")
    if not 1 <= len(servers) <= MAX_POOL_SERVERS:
        raise Invalid(f"a pool has 1 to {MAX_POOL_SERVERS} servers, not {len(servers)}",
                      field="servers")
    seen: set[str] = set()
    for server_id in servers:
        validate_server_id(server_id, "servers")
        if server_id in seen:
            raise Invalid(f"server id {server_id!r} is listed twice", field="servers")
        seen.add(server_id)
    return tuple(servers)


def validate_description(description: object) -> str:
    """Return an acceptable pool description (0..256 printable characters), else raise Invalid."""
    if not isinstance(description, str):
        raise Invalid(f"description must be text, not {type(description).__name__}",
                      field="description")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise Invalid(f"description must be at most {MAX_DESCRIPTION_CHARS} characters long, "
                      f"not {len(description)}", field="description")
    if not description.isprintable():
        raise Invalid("description contains control or other non-printable characters",
                      field="description")
    return description


def validate_weight(weight: object) -> float:
    """Return a capacity weight (a number, 0 < weight <= MAX_WEIGHT) as a float, else Invalid."""
    if (isinstance(weight, bool) or not isinstance(weight, int | float)
            or not 0 < weight <= MAX_WEIGHT):  # (NaN compares false; no float(huge int))
        raise Invalid(f"weight must be a number greater than 0 and at most {MAX_WEIGHT:g}, "
                      f"not {weight!r}", field="weight")
    return float(weight)


def hash_secret(secret: str) -> str:
    """The stored form of an encoder secret."""
    return _SECRET_SCHEME + hashlib.sha256(secret.encode("ascii")).hexdigest()


def _secret_matches(stored: str, secret: str) -> bool:
    return hmac.compare_digest(stored.encode("ascii"), hash_secret(secret).encode("ascii"))


def generate_secret() -> str:
    """A fresh url-safe encoder secret carrying 32 random bytes.

    Never starting with "-", so that it can follow an option on a command line.
    """
    while True:
        secret = secrets.token_urlsafe(32)
        if not secret.startswith("-"):
            return secret


def _new_uid() -> str:
    return str(uuid.uuid4())


# -- replicated tables: what each field holds ---------------------------------------

_PLACEHOLDER_NAMESPACE = uuid.UUID("0b5c4bb8-43d6-4f5e-9d0e-4a52b9f8e0f1")
_MAX_WALL_MS = 10**13  # Stamp.encode() pads to 13 digits: text order = stamp order
_MAX_NODE_CHARS = 64
_MAX_HASH_CHARS = 1024
_ZERO_TEXT = ZERO.encode()
_MAX_TIME = 1e300


def _check_text(value: object, *, max_chars: int = MAX_FIELD_CHARS, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be text, not {type(value).__name__}")
    if len(value) > max_chars or (not empty and not value):
        raise Invalid(f"must be {0 if empty else 1} to {max_chars} characters long")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid("is not valid Unicode text (lone surrogate)") from None
    return value


def _check_uid(value: object) -> str:
    return _check_text(value, max_chars=64, empty=False)


def _check_hash(value: object) -> str:
    return _check_text(value, max_chars=_MAX_HASH_CHARS, empty=False)


def _check_time(value: object) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not -_MAX_TIME < value < _MAX_TIME):  # also NaN, infinities, huge integers
        raise Invalid(f"must be a finite number, not {value!r}")
    return float(value)


def _check_expires(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise Invalid(f"must be an integer 0 <= n < 2**53, not {value!r}")
    return value


def _check_used(value: object) -> int:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, not {value!r}")
    return int(value)


def _check_json(value: object) -> str:
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise Invalid(f"is not a JSON value ({e})") from None
    if len(text) > MAX_FIELD_CHARS:
        raise Invalid(f"is longer than {MAX_FIELD_CHARS} characters as JSON")
    return text


def _check_domain_ref(value: object) -> str:
    return validate_name("domain name", value)


def _check_encoder_name(value: object) -> str:
    return validate_name("encoder name", value)


def _check_pool_ref(value: object) -> str | None:
    return None if value is None else validate_name("pool name", value)


def _pool_servers_text(servers: Iterable[str]) -> str:
    return json.dumps(list(servers), separators=(",", ":"))


def _check_pool_servers(value: object) -> str:
    return _pool_servers_text(validate_pool_servers(value))


def _check_audit_id(value: object) -> str:
    text = _check_text(value, max_chars=64, empty=False)
    if not text.isprintable():
        raise Invalid(f"audit entry id {text!r} contains non-printable characters")
    return text


def _same(value: Any) -> Any:
    return value


def _constant(value: Any) -> Callable[[str], Any]:
    return lambda key: value


@attrs.frozen
class _Field:
    """One replicated field: its check (update value -> column value), the way
    back (column -> JSON-serialisable update value) and the column value of a
    row that lacks the field (a placeholder row, never live)."""

    check: Callable[[Any], Any]
    placeholder: Callable[[str], Any]
    to_json: Callable[[Any], Any] = _same


@attrs.frozen
class _Table:
    name: str
    key: str  # the natural key's column
    check_key: Callable[[Any], str]
    fields: Mapping[str, _Field]

    def select(self) -> str:
        return f"SELECT {', '.join([self.key, *self.fields])}, stamps, deleted FROM {self.name}"


def _uid_field(table: str) -> _Field:
    # A placeholder uid is a function of the key, so placeholder rows are the
    # same on every server (and never collide with a random uid4).
    return _Field(_check_uid, lambda key: str(uuid.uuid5(_PLACEHOLDER_NAMESPACE, f"{table}/{key}")))


_TIME = _Field(_check_time, _constant(0.0), float)
_TEXT = _Field(_check_text, _constant(""))

_POOL_REF = _Field(_check_pool_ref, _constant(None))

DOMAINS = _Table(
    "domains", "name", lambda k: validate_name("domain name", k),
    {"uid": _uid_field("domains"), "created": _TIME, "updated": _TIME, "pool": _POOL_REF},
)
ACCOUNTS = _Table(
    "accounts", "name", lambda k: validate_name("account name", k),
    {
        "uid": _uid_field("accounts"),
        "domain": _Field(_check_domain_ref, _constant(None)),
        "password_hash": _Field(_check_hash, _constant("")),
        "role": _Field(validate_role, _constant("viewer")),
        "created": _TIME,
        "updated": _TIME,
    },
)
ENCODERS = _Table(
    "encoders", "encoder_id", validate_encoder_id,
    {
        "uid": _uid_field("encoders"),
        "name": _Field(_check_encoder_name, _same),
        "domain": _Field(_check_domain_ref, _constant(None)),
        "secret_hash": _Field(_check_hash, _constant("")),
        "created": _TIME,
        "updated": _TIME,
        "pool": _POOL_REF,
    },
)
AUDIT_LOG = _Table(
    "audit_log", "id", _check_audit_id,
    {"at": _TIME, "actor": _TEXT, "server_id": _TEXT, "action": _TEXT, "target": _TEXT,
     "detail": _TEXT},
)
SETTINGS = _Table(
    "settings", "key", validate_setting_key,
    {"value": _Field(_check_json, _constant("null"), json.loads)},
)
JOIN_TOKENS = _Table(
    "join_tokens", "token_id", validate_token_id,
    {
        "secret_hash": _Field(_check_hash, _constant("")),
        "expires": _Field(_check_expires, _constant(0), int),
        "used": _Field(_check_used, _constant(0), bool),
    },
)
POOLS = _Table(
    "pools", "name", lambda k: validate_name("pool name", k),
    {
        "servers": _Field(_check_pool_servers, _constant("[]"), json.loads),
        "description": _Field(validate_description, _constant("")),
    },
)
SERVER_WEIGHTS = _Table(
    "server_weights", "server_id", validate_server_id,
    {"weight": _Field(validate_weight, _constant(DEFAULT_WEIGHT), float)},
)
#: Every replicated table, domains first (records refer to domains by name).
TABLES: Mapping[str, _Table] = {
    t.name: t for t in (DOMAINS, ACCOUNTS, ENCODERS, AUDIT_LOG, SETTINGS, JOIN_TOKENS, POOLS,
                        SERVER_WEIGHTS)
}
_REFERS_TO_DOMAIN = frozenset({"accounts", "encoders"})
#: SQL: the domain row ``d`` is visible (live, or holding a live account or encoder).
_DOMAIN_VISIBLE = (
    "(d.live OR EXISTS (SELECT 1 FROM accounts a WHERE a.domain = d.name AND a.live)"
    " OR EXISTS (SELECT 1 FROM encoders e WHERE e.domain = d.name AND e.live))"
)


def _stamp_text(stamp: object) -> str:
    """``stamp.encode()`` if ``stamp`` is a well-formed Stamp, else BadUpdate."""
    if (
        not isinstance(stamp, Stamp)
        or type(stamp.wall_ms) is not int
        or type(stamp.counter) is not int
        or not isinstance(stamp.node, str)
        or not 0 <= stamp.wall_ms < _MAX_WALL_MS
        or not 0 <= stamp.counter <= 0xFFFF
        or not 1 <= len(stamp.node) <= _MAX_NODE_CHARS
        or not stamp.node.isprintable()
    ):
        raise BadUpdate(f"bad stamp {stamp!r}")
    return stamp.encode()


def _dumps_stamps(stamps: Mapping[str, str]) -> str:
    return json.dumps(stamps, sort_keys=True, separators=(",", ":"))


def fingerprint(stamps: Mapping[str, str], deleted: str | None) -> bytes:
    """``Record.fingerprint`` computed from stamp texts (see evserver.state.replica)."""
    h = hashlib.blake2b(digest_size=16)
    h.update((deleted or _ZERO_TEXT).encode())
    for name in sorted(stamps):
        h.update(b"\0" + name.encode() + b"\0" + stamps[name].encode())
    return h.digest()


def _sql_fingerprint(stamps: str, deleted: str | None) -> bytes:
    return fingerprint(json.loads(stamps), deleted)


@attrs.define
class _Row:
    """A record being read or merged: column values of the fields it has, stamp texts."""

    key: str
    values: dict[str, Any] = attrs.field(factory=dict)
    stamps: dict[str, str] = attrs.field(factory=dict)
    deleted: str | None = None
    stored: bool = False

    def live(self, table: _Table) -> bool:
        deleted = self.deleted or _ZERO_TEXT
        stamps = self.stamps
        return all(name in stamps and stamps[name] > deleted for name in table.fields)

    def replicated(self) -> bool:
        return bool(self.stamps) or self.deleted is not None


@attrs.frozen
class _Checked:
    """A validated update: column values with stamp texts (and the stamps themselves)."""

    table: _Table
    key: str
    fields: dict[str, tuple[Any, str, Stamp]]
    deleted: tuple[str, Stamp] | None


Subscriber = Callable[[Update], object]


class Store:
    """Domains, accounts, encoders, pools, server weights, audit log, settings and join
    tokens in one SQLite file.

    ``path`` is the database file (normally ``data_dir / DB_FILENAME``); it is
    created, mode 0600, if missing.  ``clock`` gives the timestamps (seconds);
    ``hlc`` stamps the writes (default: node ``"local"`` on ``clock``; a
    cluster member passes one named by its server id).  ``password_hasher``
    exists so tests can use cheaper scrypt parameters.  ``migrations`` is for
    tests of the upgrade machinery.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        hlc: HybridClock | None = None,
        password_hasher: Callable[[str], str] = hash_password,
        migrations: Sequence[Sequence[str]] = MIGRATIONS,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self.hlc = hlc if hlc is not None else HybridClock(
            LOCAL_NODE, lambda: int(clock() * 1000)
        )
        self._hash_password = password_hasher
        self._migrations = tuple(tuple(m) for m in migrations)
        self._db: sqlite3.Connection | None = None
        self._subscribers: list[tuple[Subscriber, bool]] = []
        self._outbox: list[Update] = []
        self._migration_stamp: str | None = None
        try:
            if not self.path.exists():
                # Hashes live here: create the file private before SQLite
                # opens it (SQLite gives the -wal and -shm files its mode).
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open database {str(self.path)!r}: {e}") from e
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.create_function("evs_migration_stamps", -1, self._migration_stamps)
            self._db.create_function("evs_fingerprint", 2, _sql_fingerprint, deterministic=True)
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
            except sqlite3.DatabaseError as e:
                raise NotADatabase(f"{str(self.path)!r} is not an evserver database ({e})") from e
            try:
                self._migrate()
                self._observe_stored_stamps()
            except sqlite3.Error as e:
                raise StoreError(f"cannot upgrade database {str(self.path)!r}: {e}") from e
        except BaseException:
            self.close()
            raise

    @classmethod
    def in_data_dir(cls, data_dir: str | os.PathLike[str]) -> Store:
        """Open the store of a server data directory, stamping as that server.

        Writes are stamped with a hybrid logical clock named after the
        server's id (``DATA/server-id``), so that two servers' writes in the
        same millisecond are still ordered the same way everywhere.
        """
        from evserver.config import load_or_create_server_id

        server_id = load_or_create_server_id(data_dir)
        return cls(Path(data_dir) / DB_FILENAME, hlc=server_clock(server_id))

    # -- plumbing ---------------------------------------------------------

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the store is closed")
        return self._db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; the local updates it made are published after COMMIT."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        self._outbox = []
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            self._outbox = []
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        outbox, self._outbox = self._outbox, []
        self._publish(outbox, local=True)

    def _migrate(self) -> None:
        known = len(self._migrations)
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > known:
                raise SchemaTooNew(
                    f"database {str(self.path)!r} has schema version {version}, but this "
                    f"evserver knows only up to version {known}: upgrade evserver"
                )
            for statements in self._migrations[version:]:
                for statement in statements:
                    conn.execute(statement)
            if version != known:
                conn.execute(f"PRAGMA user_version = {int(known)}")

    def _migration_stamps(self, *fields: str) -> str:
        """SQL ``evs_migration_stamps(field, ...)``: one stamp for every row a migration stamps."""
        if self._migration_stamp is None:
            self._migration_stamp = self.hlc.now().encode()
        return _dumps_stamps({name: self._migration_stamp for name in fields})

    @property
    def replicated(self) -> bool:
        """Whether the schema has the replication columns (false only for test schemas)."""
        tables = {
            row[0]: row[1]
            for row in self._conn.execute(
                "SELECT m.name, count(*) FROM sqlite_master m, pragma_table_info(m.name) c "
                "WHERE m.type = 'table' AND c.name = 'stamps' GROUP BY m.name"
            )
        }
        return all(tables.get(name) for name in TABLES)

    def _observe_stored_stamps(self) -> None:
        """Move the clock past every stamp in the database (it may be ahead after a restart)."""
        if not self.replicated:
            return
        newest = _ZERO_TEXT
        for name in TABLES:
            for (text,) in self._conn.execute(
                f"SELECT max(j.value) FROM {name}, json_each({name}.stamps) j "
                f"UNION ALL SELECT max(deleted) FROM {name}"
            ):
                if text is not None and text > newest:
                    newest = text
        if newest > self.hlc.last.encode():
            self.hlc.observe(Stamp.decode(newest))

    @property
    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        """Close the database; further calls raise StoreError.  Idempotent."""
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- replicated rows ----------------------------------------------------

    def _rows(
        self, conn: sqlite3.Connection, table: _Table, where: str = "", params: Sequence[Any] = ()
    ) -> Iterator[_Row]:
        fields = list(table.fields)
        for row in conn.execute(f"{table.select()} {where}", params):
            stamps = json.loads(row["stamps"])
            values = {name: row[name] for name in fields if name in stamps}
            yield _Row(row[0], values, stamps, row["deleted"], stored=True)

    def _load(
        self, conn: sqlite3.Connection, table: _Table, keys: Collection[str]
    ) -> dict[str, _Row]:
        """The stored rows of ``keys`` (one query)."""
        if len(keys) == 1:
            where, params = f"WHERE {table.key} = ?", [next(iter(keys))]
        else:
            where = f"WHERE {table.key} IN (SELECT value FROM json_each(?))"
            params = [json.dumps(list(keys))]
        return {row.key: row for row in self._rows(conn, table, where, params)}

    def _save(self, conn: sqlite3.Connection, table: _Table, rows: Iterable[_Row]) -> None:
        """Write merged rows (every column), inserting placeholder domains they refer to."""
        inserts: list[list[Any]] = []
        updates: list[list[Any]] = []
        domains: set[str] = set()
        for row in rows:
            params = [
                row.values[name] if name in row.values else spec.placeholder(row.key)
                for name, spec in table.fields.items()
            ]
            params += [
                _dumps_stamps(row.stamps),
                row.deleted,
                int(row.live(table)),
                fingerprint(row.stamps, row.deleted) if row.replicated() else None,
            ]
            if row.stored:
                updates.append([*params, row.key])
            else:
                inserts.append([row.key, *params])
                row.stored = True
            if table.name in _REFERS_TO_DOMAIN and "domain" in row.values:
                domains.add(row.values["domain"])
        if domains:
            uid = DOMAINS.fields["uid"].placeholder
            conn.executemany(
                "INSERT OR IGNORE INTO domains (uid, name, created, updated, stamps, deleted, "
                "live, fp) VALUES (?, ?, 0, 0, '{}', NULL, 0, NULL)",
                [(uid(name), name) for name in sorted(domains)],
            )
        columns = [*table.fields, "stamps", "deleted", "live", "fp"]
        if updates:
            assignments = ", ".join(f"{c} = ?" for c in columns)
            conn.executemany(
                f"UPDATE {table.name} SET {assignments} WHERE {table.key} = ?", updates
            )
        if inserts:
            marks = ", ".join("?" * (len(columns) + 1))
            conn.executemany(
                f"INSERT INTO {table.name} ({table.key}, {', '.join(columns)}) VALUES ({marks})",
                inserts,
            )

    def _put(
        self,
        conn: sqlite3.Connection,
        table: _Table,
        key: str,
        values: Mapping[str, Any] | None,
    ) -> None:
        """A local write: set ``values`` (column form) with one new stamp, or delete (None)."""
        row = self._load(conn, table, (key,)).get(key) or _Row(key)
        stamp = self.hlc.now()
        newest = max([*row.stamps.values(), row.deleted or _ZERO_TEXT])
        if newest >= stamp.encode():
            # Written by another process on this file with a clock ahead of ours.
            self.hlc.observe(Stamp.decode(newest))
            stamp = self.hlc.now()
        text = stamp.encode()
        if values is None:
            row.deleted = text
            update = Update(table.name, key, {}, stamp)
        else:
            for name, value in values.items():
                row.values[name] = value
                row.stamps[name] = text
            fields = {name: (table.fields[name].to_json(value), stamp)
                      for name, value in values.items()}
            update = Update(table.name, key, fields)
        self._save(conn, table, [row])
        self._outbox.append(update)

    def _is_live(self, conn: sqlite3.Connection, table: _Table, key: str) -> bool:
        sql = f"SELECT 1 FROM {table.name} WHERE {table.key} = ? AND live"
        return conn.execute(sql, (key,)).fetchone() is not None

    def _publish(self, updates: list[Update], *, local: bool) -> None:
        for update in updates:
            for callback, remote in list(self._subscribers):
                if local or remote:
                    try:
                        callback(update)
                    except Exception:
                        log.failure("store subscriber {callback!r} failed on {update!r}",
                                    callback=callback, update=update)

    # -- change feed, merging, anti-entropy -----------------------------------

    def subscribe(self, callback: Subscriber, *, remote: bool = False) -> Callable[[], None]:
        """Call ``callback(update)`` after every committed local write; return an unsubscriber.

        The update holds the fields the write set (JSON-serialisable values,
        each with the write's stamp) or its tombstone: what to push to peers.
        With ``remote=True`` the callback also hears every merge of peers'
        updates that changed something (the fields that won, the tombstone if
        it won), for parts of the server that react to any change.  A failing
        callback is logged; it fails neither the write nor other callbacks.
        """
        entry = (callback, remote)
        self._subscribers.append(entry)

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)

        return unsubscribe

    @staticmethod
    def _check_update(update: object, texts: dict[int, str]) -> _Checked:
        """Validate one update; ``texts`` caches stamp texts by stamp identity
        (the stamps stay referenced by the result, so ids are not reused)."""

        def text_of(stamp: object) -> str:
            text = texts.get(id(stamp))
            if text is None:
                text = texts[id(stamp)] = _stamp_text(stamp)
            return text

        if not isinstance(update, Update):
            raise BadUpdate(f"not an Update: {type(update).__name__}")
        table = TABLES.get(update.table) if isinstance(update.table, str) else None
        if table is None:
            raise BadUpdate(f"unknown table {update.table!r}")
        try:
            key = table.check_key(update.key)
        except Invalid as e:
            raise BadUpdate(f"{table.name}: bad key: {e}") from None
        if not isinstance(update.fields, Mapping):
            raise BadUpdate(f"{table.name} {key!r}: fields is not a mapping")
        fields: dict[str, tuple[Any, str, Stamp]] = {}
        for name, pair in update.fields.items():
            spec = table.fields.get(name) if isinstance(name, str) else None
            if spec is None:
                raise BadUpdate(f"{table.name} {key!r}: unknown field {name!r}")
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise BadUpdate(f"{table.name} {key!r}: field {name} is not (value, stamp)")
            try:
                value = spec.check(pair[0])
            except Invalid as e:
                raise BadUpdate(f"{table.name} {key!r}: field {name}: {e}") from None
            fields[name] = (value, text_of(pair[1]), pair[1])
        deleted = None if update.deleted is None else (text_of(update.deleted), update.deleted)
        return _Checked(table, key, fields, deleted)

    def apply_updates(self, updates: Iterable[Update]) -> int:
        """Merge peers' updates in one transaction; return how many records changed.

        Per field the newer stamp wins; a newer tombstone wins; applying an
        update again, or updates in another order, changes nothing more.
        Every stamp is observed by :attr:`hlc`.  A malformed update (unknown
        table or field, bad key, value or stamp) raises BadUpdate and nothing
        of the batch is written.
        """
        by_table: dict[str, list[_Checked]] = {}
        texts: dict[int, str] = {}
        newest: tuple[str, Stamp | None] = (self.hlc.last.encode(), None)
        for update in updates:
            checked = self._check_update(update, texts)
            for _, text, stamp in checked.fields.values():
                if text > newest[0]:
                    newest = (text, stamp)
            if checked.deleted is not None and checked.deleted[0] > newest[0]:
                newest = checked.deleted
            if checked.fields or checked.deleted is not None:
                by_table.setdefault(checked.table.name, []).append(checked)
        if newest[1] is not None:
            self.hlc.observe(newest[1])
        if not by_table:
            return 0
        notify = any(remote for _, remote in self._subscribers)
        merged: list[Update] = []
        count = 0
        try:
            with self._write() as conn:
                for name, table in TABLES.items():  # domains first
                    if name in by_table:
                        count += self._merge(conn, table, by_table[name],
                                             merged if notify else None)
        except sqlite3.Error as e:
            raise StoreError(f"cannot merge updates: {e}") from e
        self._publish(merged, local=False)
        return count

    def _merge(
        self,
        conn: sqlite3.Connection,
        table: _Table,
        items: list[_Checked],
        merged: list[Update] | None,
    ) -> int:
        """Merge checked updates of one table; return how many records changed.

        With ``merged``, append to it what changed (the winning fields and
        tombstone of each changed record).
        """
        rows = self._load(conn, table, {item.key for item in items})
        won: dict[str, dict[str, tuple[Any, Stamp]]] = {}
        tombstones: dict[str, Stamp] = {}
        for item in items:
            row = rows.get(item.key)
            if row is None:
                row = rows[item.key] = _Row(item.key)
            fields = won.setdefault(item.key, {})
            for name, (value, text, stamp) in item.fields.items():
                current = row.stamps.get(name)
                if current is None or text > current:
                    row.values[name] = value
                    row.stamps[name] = text
                    fields[name] = (table.fields[name].to_json(value), stamp)
            if item.deleted is not None and (row.deleted is None or item.deleted[0] > row.deleted):
                row.deleted = item.deleted[0]
                tombstones[item.key] = item.deleted[1]
        changed = [key for key, fields in won.items() if fields or key in tombstones]
        self._save(conn, table, [rows[key] for key in changed])
        if merged is not None:
            merged.extend(Update(table.name, key, won[key], tombstones.get(key))
                          for key in changed)
        return len(changed)

    def data_version(self) -> int:
        """A number that changes when another process (evserver-ctl) commits to the database."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def digest(self) -> dict[tuple[str, str], bytes]:
        """``{(table, key): fingerprint}`` of every record (tombstones included).

        The fingerprint is ``replica.Record.fingerprint``: the stamps of every
        field and the tombstone (kept in column ``fp``, so this is one
        query per table).  Placeholder rows are no records and are left out.
        """
        out: dict[tuple[str, str], bytes] = {}
        conn = self._conn
        for name, table in TABLES.items():
            for key, fp in conn.execute(
                f"SELECT {table.key}, fp FROM {name} WHERE fp IS NOT NULL"
            ):
                out[(name, key)] = fp
        return out

    def updates_for(
        self, wanted: Mapping[tuple[str, str], bytes] | Iterable[tuple[str, str]]
    ) -> list[Update]:
        """Full records to send to a peer.

        Given the peer's digest (a mapping), every record of ours whose
        fingerprint differs from the peer's or that the peer lacks; given
        keys ``(table, key)``, those records (unknown keys are skipped).
        A query or two per table either way.
        """
        keys: dict[str, set[str]] = {}
        if isinstance(wanted, Mapping):
            for (name, key), fp in self.digest().items():
                if wanted.get((name, key)) != fp:
                    keys.setdefault(name, set()).add(key)
        else:
            for item in wanted:
                if (not isinstance(item, tuple) or len(item) != 2
                        or not all(isinstance(part, str) for part in item)):
                    raise StoreError(f"not a (table, key) pair: {item!r}")
                if item[0] in TABLES:
                    keys.setdefault(item[0], set()).add(item[1])
        conn = self._conn
        decoded: dict[str, Stamp] = {}
        out: list[Update] = []
        for name, table in TABLES.items():
            if keys.get(name):
                rows = self._load(conn, table, keys[name])
                out += [self._full_update(table, rows[key], decoded)
                        for key in sorted(rows) if rows[key].replicated()]
        return out

    @staticmethod
    def _full_update(table: _Table, row: _Row, decoded: dict[str, Stamp]) -> Update:
        def stamp(text: str) -> Stamp:
            found = decoded.get(text)
            if found is None:
                found = decoded[text] = Stamp.decode(text)
            return found

        return Update(
            table.name,
            row.key,
            {name: (table.fields[name].to_json(row.values[name]), stamp(text))
             for name, text in row.stamps.items()},
            None if row.deleted is None else stamp(row.deleted),
        )

    # -- domains ----------------------------------------------------------

    def _domain_visible(self, conn: sqlite3.Connection, name: str) -> bool:
        sql = f"SELECT 1 FROM domains d WHERE d.name = ? AND {_DOMAIN_VISIBLE}"
        return conn.execute(sql, (name,)).fetchone() is not None

    def _require_domain(self, conn: sqlite3.Connection, name: str) -> None:
        if not isinstance(name, str) or not self._domain_visible(conn, name):
            raise NotFound(f"no domain named {name!r}")

    def add_domain(self, name: str, pool: str | None = None) -> Domain:
        """Create a domain, optionally with a pool its encoders prefer (NotFound if none such)."""
        validate_name("domain name", name)
        checked_pool = self._check_pool_arg(pool)
        with self._write() as conn:
            if self._domain_visible(conn, name):
                raise AlreadyExists(f"domain {name!r} exists already")
            self._require_pool(conn, checked_pool)
            now = self._clock()
            domain = Domain(uid=_new_uid(), name=name, created=now, updated=now,
                            pool=checked_pool)
            self._put(conn, DOMAINS, name, {"uid": domain.uid, "created": now, "updated": now,
                                            "pool": checked_pool})
        return domain

    # A domain listed only through its accounts or encoders has no pool (see "Pools").
    _DOMAIN_SELECT = (
        "SELECT d.uid, d.name, d.created, d.updated, CASE WHEN d.live THEN d.pool END AS pool "
        f"FROM domains d WHERE {_DOMAIN_VISIBLE}"
    )

    def get_domain(self, name: str) -> Domain | None:
        row = self._conn.execute(self._DOMAIN_SELECT + " AND d.name = ?", (name,)).fetchone()
        return None if row is None else Domain(**dict(row))

    def list_domains(self) -> list[Domain]:
        rows = self._conn.execute(self._DOMAIN_SELECT + " ORDER BY d.name").fetchall()
        return [Domain(**dict(row)) for row in rows]

    def delete_domain(self, name: str) -> None:
        """Delete an empty domain; NotEmpty if it still has accounts or encoders."""
        with self._write() as conn:
            self._require_domain(conn, name)
            accounts = conn.execute(
                "SELECT count(*) FROM accounts WHERE domain = ? AND live", (name,)
            ).fetchone()[0]
            encoders = conn.execute(
                "SELECT count(*) FROM encoders WHERE domain = ? AND live", (name,)
            ).fetchone()[0]
            if accounts or encoders:
                raise NotEmpty(
                    f"domain {name!r} still has {accounts} account(s) and "
                    f"{encoders} encoder(s): delete them first"
                )
            self._put(conn, DOMAINS, name, None)

    # -- accounts ---------------------------------------------------------

    _ACCOUNT_SELECT = (
        "SELECT uid, name, domain, role, password_hash, created, updated FROM accounts WHERE live"
    )

    @staticmethod
    def _account(row: sqlite3.Row) -> Account:
        return Account(**dict(row))

    def _insert_account(
        self, domain: str, name: str, password_hash: str, role: Role
    ) -> Account:
        now = self._clock()
        account = Account(uid=_new_uid(), name=name, domain=domain, role=role,
                          password_hash=password_hash, created=now, updated=now)
        with self._write() as conn:
            self._require_domain(conn, domain)
            if self._is_live(conn, ACCOUNTS, name):
                raise AlreadyExists(f"account {name!r} exists already")
            self._put(conn, ACCOUNTS, name, {
                "uid": account.uid, "domain": domain, "password_hash": password_hash,
                "role": role, "created": now, "updated": now,
            })
        return account

    def add_account(
        self, domain: str, name: str, password: str, role: Role | str = "viewer"
    ) -> Account:
        validate_name("account name", name)
        checked_role = validate_role(role)
        try:
            check_password(password)
        except ValueError as e:
            raise Invalid(str(e)) from None
        # Fail fast on the cheap checks before spending time on the hash.
        conn = self._conn
        self._require_domain(conn, domain)
        if self._is_live(conn, ACCOUNTS, name):
            raise AlreadyExists(f"account {name!r} exists already")
        return self._insert_account(domain, name, self._hash_password(password), checked_role)

    def get_account(self, name: str) -> Account | None:
        row = self._conn.execute(self._ACCOUNT_SELECT + " AND name = ?", (name,)).fetchone()
        return None if row is None else self._account(row)

    def list_accounts(self, domain: str | None = None) -> list[Account]:
        """All accounts, or those of ``domain`` (NotFound if no such domain), by name."""
        conn = self._conn
        if domain is None:
            rows = conn.execute(self._ACCOUNT_SELECT + " ORDER BY name").fetchall()
        else:
            self._require_domain(conn, domain)
            rows = conn.execute(
                self._ACCOUNT_SELECT + " AND domain = ? ORDER BY name", (domain,)
            ).fetchall()
        return [self._account(row) for row in rows]

    def _update(self, table: _Table, key: str, values: Mapping[str, Any], missing: str) -> None:
        """Set some fields of a live record (and ``updated``); NotFound(missing) if none."""
        with self._write() as conn:
            if not self._is_live(conn, table, key):
                raise NotFound(missing)
            self._put(conn, table, key, {**values, "updated": self._clock()})

    def set_password(self, name: str, password: str) -> None:
        try:
            check_password(password)
        except ValueError as e:
            raise Invalid(str(e)) from None
        if self.get_account(name) is None:
            raise NotFound(f"no account named {name!r}")
        password_hash = self._hash_password(password)
        self._update(ACCOUNTS, name, {"password_hash": password_hash},
                     f"no account named {name!r}")

    def delete_account(self, name: str) -> None:
        with self._write() as conn:
            if not self._is_live(conn, ACCOUNTS, name):
                raise NotFound(f"no account named {name!r}")
            self._put(conn, ACCOUNTS, name, None)

    # -- encoders ---------------------------------------------------------

    _ENCODER_SELECT = (
        "SELECT uid, encoder_id, name, domain, secret_hash, created, updated, pool "
        "FROM encoders WHERE live"
    )

    @staticmethod
    def _encoder(row: sqlite3.Row) -> Encoder:
        return Encoder(**dict(row))

    def add_encoder(
        self, domain: str, encoder_id: str, name: str | None = None, secret: str | None = None,
        *, pool: str | None = None,
    ) -> tuple[Encoder, str]:
        """Register an encoder; return it and its secret (generated if not given).

        Only a hash of the secret is stored: the returned secret is the one
        chance to show it.  ``pool``: its own pool (NotFound if no such pool).
        """
        validate_encoder_id(encoder_id)
        display_name = encoder_id if name is None else validate_name("encoder name", name)
        checked_pool = self._check_pool_arg(pool)
        if secret is None:
            secret = generate_secret()
        else:
            validate_secret(secret)
        now = self._clock()
        encoder = Encoder(
            uid=_new_uid(),
            encoder_id=encoder_id,
            name=display_name,
            domain=domain,
            secret_hash=hash_secret(secret),
            created=now,
            updated=now,
            pool=checked_pool,
        )
        with self._write() as conn:
            self._require_domain(conn, domain)
            if self._is_live(conn, ENCODERS, encoder_id):
                raise AlreadyExists(f"encoder {encoder_id!r} exists already")
            self._require_pool(conn, checked_pool)
            self._put(conn, ENCODERS, encoder_id, {
                "uid": encoder.uid, "name": encoder.name, "domain": domain,
                "secret_hash": encoder.secret_hash, "created": now, "updated": now,
                "pool": checked_pool,
            })
        return encoder, secret

    def get_encoder(self, encoder_id: str) -> Encoder | None:
        row = self._conn.execute(
            self._ENCODER_SELECT + " AND encoder_id = ?", (encoder_id,)
        ).fetchone()
        return None if row is None else self._encoder(row)

    def verify_encoder(self, encoder_id: str, secret: str) -> Encoder | None:
        """The encoder if ``secret`` is its secret, else None (also for unknown ids)."""
        if not isinstance(secret, str) or not secret.isascii():
            return None
        encoder = self.get_encoder(encoder_id) if isinstance(encoder_id, str) else None
        # Compare against something even for an unknown id, so the time taken
        # says little about which ids exist.
        stored = encoder.secret_hash if encoder is not None else _SECRET_SCHEME + "0" * 64
        if _secret_matches(stored, secret) and encoder is not None:
            return encoder
        return None

    def list_encoders(self, domain: str | None = None) -> list[Encoder]:
        """All encoders, or those of ``domain`` (NotFound if no such domain), by id."""
        conn = self._conn
        if domain is None:
            rows = conn.execute(self._ENCODER_SELECT + " ORDER BY encoder_id").fetchall()
        else:
            self._require_domain(conn, domain)
            rows = conn.execute(
                self._ENCODER_SELECT + " AND domain = ? ORDER BY encoder_id", (domain,)
            ).fetchall()
        return [self._encoder(row) for row in rows]

    def delete_encoder(self, encoder_id: str) -> None:
        with self._write() as conn:
            if not self._is_live(conn, ENCODERS, encoder_id):
                raise NotFound(f"no encoder with id {encoder_id!r}")
            self._put(conn, ENCODERS, encoder_id, None)

    # -- admin site: edits and the audit log --------------------------------

    def add_account_hashed(
        self, domain: str, name: str, password_hash: str, role: Role | str = "viewer"
    ) -> Account:
        """Like :meth:`add_account` with the password already hashed (in a thread)."""
        validate_name("account name", name)
        checked_role = validate_role(role)
        if not isinstance(password_hash, str) or not password_hash:
            raise Invalid("password hash must be non-empty text")
        return self._insert_account(domain, name, password_hash, checked_role)

    def set_password_hash(self, name: str, password_hash: str) -> None:
        """Like :meth:`set_password` with the password already hashed (in a thread)."""
        if not isinstance(password_hash, str) or not password_hash:
            raise Invalid("password hash must be non-empty text")
        self._update(ACCOUNTS, name, {"password_hash": password_hash},
                     f"no account named {name!r}")

    def set_role(self, name: str, role: Role | str) -> Account:
        checked_role = validate_role(role)
        self._update(ACCOUNTS, name, {"role": checked_role}, f"no account named {name!r}")
        account = self.get_account(name)
        assert account is not None
        return account

    def set_encoder_name(self, encoder_id: str, name: str) -> Encoder:
        validate_name("encoder name", name)
        self._update(ENCODERS, encoder_id, {"name": name}, f"no encoder with id {encoder_id!r}")
        encoder = self.get_encoder(encoder_id)
        assert encoder is not None
        return encoder

    def set_encoder_secret(self, encoder_id: str, secret: str | None = None) -> str:
        """Replace an encoder's secret (generated if not given); return the new secret."""
        if secret is None:
            secret = generate_secret()
        else:
            validate_secret(secret)
        self._update(ENCODERS, encoder_id, {"secret_hash": hash_secret(secret)},
                     f"no encoder with id {encoder_id!r}")
        return secret

    def add_audit(
        self, actor: str, server_id: str, action: str, target: str, detail: str = ""
    ) -> AuditEntry:
        """Record a change in the audit log."""
        entry = AuditEntry(id=_new_uid(), at=self._clock(), actor=str(actor),
                           server_id=str(server_id), action=str(action), target=str(target),
                           detail=str(detail))
        with self._write() as conn:
            self._put(conn, AUDIT_LOG, entry.id, {
                "at": entry.at, "actor": entry.actor, "server_id": entry.server_id,
                "action": entry.action, "target": entry.target, "detail": entry.detail,
            })
        return entry

    def list_audit(self, limit: int = 100) -> list[AuditEntry]:
        """The latest ``limit`` audit entries, newest first."""
        rows = self._conn.execute(
            "SELECT id, at, actor, server_id, action, target, detail FROM audit_log "
            "WHERE live ORDER BY at DESC, rowid DESC LIMIT ?",
            (max(0, int(limit)),),
        ).fetchall()
        return [AuditEntry(**dict(row)) for row in rows]

    # -- server pools and capacity weights ---------------------------------------

    @staticmethod
    def _check_pool_arg(pool: object) -> str | None:
        """A pool argument: None (no pool) or a valid pool name (Invalid on field "pool")."""
        if pool is None:
            return None
        try:
            return validate_name("pool name", pool)
        except Invalid as e:
            raise Invalid(str(e), field="pool") from None

    def _require_pool(self, conn: sqlite3.Connection, name: str | None) -> None:
        if name is not None and not self._is_live(conn, POOLS, name):
            raise NotFound(f"no pool named {name!r}", field="pool")

    _POOL_SELECT = "SELECT name, servers, description FROM pools WHERE live"

    @staticmethod
    def _pool(row: sqlite3.Row) -> Pool:
        return Pool(row["name"], tuple(json.loads(row["servers"])), row["description"])

    def create_pool(self, name: str, servers: Sequence[str], description: str = "") -> Pool:
        """Create a pool of servers (ids, in order of preference); AlreadyExists if taken."""
        checked_name = validate_pool_name(name)
        checked = validate_pool_servers(servers)
        validate_description(description)
        with self._write() as conn:
            if self._is_live(conn, POOLS, checked_name):
                raise AlreadyExists(f"pool {checked_name!r} exists already", field="name")
            self._put(conn, POOLS, checked_name, {"servers": _pool_servers_text(checked),
                                                  "description": description})
        return Pool(checked_name, checked, description)

    def update_pool(
        self, name: str, *, servers: Sequence[str] | None = None, description: str | None = None
    ) -> Pool:
        """Change a pool's servers, description or both (what is None stays as it is)."""
        values: dict[str, Any] = {}
        if servers is not None:
            values["servers"] = _pool_servers_text(validate_pool_servers(servers))
        if description is not None:
            values["description"] = validate_description(description)
        with self._write() as conn:
            if not isinstance(name, str) or not self._is_live(conn, POOLS, name):
                raise NotFound(f"no pool named {name!r}")
            if values:
                self._put(conn, POOLS, name, values)
        pool = self.get_pool(name)
        assert pool is not None
        return pool

    def pool_users(self, name: str) -> tuple[list[str], list[str]]:
        """The ids of the live encoders and the names of the live domains that use a pool."""
        conn = self._conn
        encoders = [row[0] for row in conn.execute(
            "SELECT encoder_id FROM encoders WHERE pool = ? AND live ORDER BY encoder_id",
            (name,))]
        domains = [row[0] for row in conn.execute(
            "SELECT name FROM domains WHERE pool = ? AND live ORDER BY name", (name,))]
        return encoders, domains

    def delete_pool(self, name: str) -> None:
        """Delete a pool; NotEmpty while an encoder or a domain is assigned to it."""
        with self._write() as conn:
            if not isinstance(name, str) or not self._is_live(conn, POOLS, name):
                raise NotFound(f"no pool named {name!r}")
            encoders, domains = self.pool_users(name)
            if encoders or domains:
                users = []
                if encoders:
                    users.append(f"encoder(s) {_some(encoders)}")
                if domains:
                    users.append(f"domain(s) {_some(domains)}")
                raise NotEmpty(
                    f"pool {name!r} is still assigned to {' and '.join(users)}: "
                    "assign them another pool or none first"
                )
            self._put(conn, POOLS, name, None)

    def get_pool(self, name: str) -> Pool | None:
        row = self._conn.execute(self._POOL_SELECT + " AND name = ?", (name,)).fetchone()
        return None if row is None else self._pool(row)

    def list_pools(self) -> list[Pool]:
        rows = self._conn.execute(self._POOL_SELECT + " ORDER BY name").fetchall()
        return [self._pool(row) for row in rows]

    def set_encoder_pool(self, encoder_id: str, pool: str | None) -> Encoder:
        """Give an encoder its own pool (overriding its domain's), or none (None)."""
        checked = self._check_pool_arg(pool)
        with self._write() as conn:
            if not isinstance(encoder_id, str) or not self._is_live(conn, ENCODERS, encoder_id):
                raise NotFound(f"no encoder with id {encoder_id!r}")
            self._require_pool(conn, checked)
            self._put(conn, ENCODERS, encoder_id, {"pool": checked, "updated": self._clock()})
        encoder = self.get_encoder(encoder_id)
        assert encoder is not None
        return encoder

    def set_domain_pool(self, name: str, pool: str | None) -> Domain:
        """Give a domain a pool for its encoders that have none of their own, or none (None).

        A domain listed only through its accounts or encoders (deleted on
        another server while in use) is created again by this.
        """
        checked = self._check_pool_arg(pool)
        with self._write() as conn:
            self._require_domain(conn, name)
            self._require_pool(conn, checked)
            now = self._clock()
            if self._is_live(conn, DOMAINS, name):
                self._put(conn, DOMAINS, name, {"pool": checked, "updated": now})
            else:
                self._put(conn, DOMAINS, name, {"uid": _new_uid(), "created": now,
                                                "updated": now, "pool": checked})
        domain = self.get_domain(name)
        assert domain is not None
        return domain

    def set_server_weight(self, server_id: str, weight: float | None) -> None:
        """Set a server's capacity weight for the balancer; None resets it to the default (1)."""
        validate_server_id(server_id, "server_id")
        with self._write() as conn:
            if weight is None:
                if self._is_live(conn, SERVER_WEIGHTS, server_id):
                    self._put(conn, SERVER_WEIGHTS, server_id, None)
            else:
                self._put(conn, SERVER_WEIGHTS, server_id, {"weight": validate_weight(weight)})

    def server_weights(self) -> dict[str, float]:
        """``{server_id: weight}`` of the servers given one; any other server weighs 1."""
        rows = self._conn.execute(
            "SELECT server_id, weight FROM server_weights WHERE live ORDER BY server_id")
        return {server_id: float(weight) for server_id, weight in rows}

    def encoder_pools(self) -> dict[str, frozenset[str]]:
        """``{encoder_id: servers}`` for every encoder: the servers of its own pool, else
        of its domain's pool, else an empty set (no preference: any server).

        A pool that is not live (a dangling reference) counts as none.
        """
        rows = self._conn.execute(
            "SELECT e.encoder_id, own.servers, inherited.servers FROM encoders e "
            "LEFT JOIN pools own ON own.name = e.pool AND own.live "
            "LEFT JOIN domains d ON d.name = e.domain AND d.live "
            "LEFT JOIN pools inherited ON inherited.name = d.pool AND inherited.live "
            "WHERE e.live"
        )
        empty: frozenset[str] = frozenset()
        out: dict[str, frozenset[str]] = {}
        parsed: dict[str, frozenset[str]] = {}
        for encoder_id, own, inherited in rows:
            text = own if own is not None else inherited
            if text is None:
                out[encoder_id] = empty
            else:
                servers = parsed.get(text)
                if servers is None:
                    servers = parsed[text] = frozenset(json.loads(text))
                out[encoder_id] = servers
        return out

    # -- cluster settings ----------------------------------------------------

    def get_setting(self, key: str, default: Any = None) -> Any:
        """The JSON value of setting ``key``, or ``default`` if it is not set."""
        row = self._conn.execute(
            "SELECT value FROM settings WHERE key = ? AND live", (key,)
        ).fetchone()
        return default if row is None else json.loads(row[0])

    def list_settings(self) -> dict[str, Any]:
        rows = self._conn.execute("SELECT key, value FROM settings WHERE live ORDER BY key")
        return {key: json.loads(value) for key, value in rows}

    def set_setting(self, key: str, value: Any) -> None:
        """Set a cluster-wide setting to a JSON-serialisable value."""
        validate_setting_key(key)
        try:
            text = _check_json(value)
        except Invalid as e:
            raise Invalid(f"setting {key!r} {e}") from None
        with self._write() as conn:
            self._put(conn, SETTINGS, key, {"value": text})

    def delete_setting(self, key: str) -> None:
        with self._write() as conn:
            if not self._is_live(conn, SETTINGS, key):
                raise NotFound(f"no setting {key!r}")
            self._put(conn, SETTINGS, key, None)

    # -- join tokens -----------------------------------------------------------

    _TOKEN_SELECT = "SELECT token_id, secret_hash, expires, used FROM join_tokens WHERE live"

    @staticmethod
    def _token(row: sqlite3.Row) -> JoinTokenRow:
        return JoinTokenRow(row["token_id"], row["secret_hash"], int(row["expires"]),
                            bool(row["used"]))

    def add_join_token(self, token_id: str, secret_hash: str, expires: int) -> JoinTokenRow:
        """Keep a newly minted join token (its id, the hash of its secret, its expiry)."""
        validate_token_id(token_id)
        try:
            _check_hash(secret_hash)
            _check_expires(expires)
        except Invalid as e:
            raise Invalid(f"join token {token_id!r}: {e}") from None
        with self._write() as conn:
            if self._is_live(conn, JOIN_TOKENS, token_id):
                raise AlreadyExists(f"join token {token_id!r} exists already")
            self._put(conn, JOIN_TOKENS, token_id,
                      {"secret_hash": secret_hash, "expires": expires, "used": 0})
        return JoinTokenRow(token_id, secret_hash, expires, False)

    def get_join_token(self, token_id: str) -> JoinTokenRow | None:
        row = self._conn.execute(self._TOKEN_SELECT + " AND token_id = ?", (token_id,)).fetchone()
        return None if row is None else self._token(row)

    def list_join_tokens(self) -> list[JoinTokenRow]:
        rows = self._conn.execute(self._TOKEN_SELECT + " ORDER BY token_id").fetchall()
        return [self._token(row) for row in rows]

    def mark_join_token_used(self, token_id: str) -> JoinTokenRow:
        """Record that the token admitted a server (it admits no other)."""
        with self._write() as conn:
            if not self._is_live(conn, JOIN_TOKENS, token_id):
                raise NotFound(f"no join token {token_id!r}")
            self._put(conn, JOIN_TOKENS, token_id, {"used": 1})
        token = self.get_join_token(token_id)
        assert token is not None
        return token

    def delete_join_token(self, token_id: str) -> None:
        with self._write() as conn:
            if not self._is_live(conn, JOIN_TOKENS, token_id):
                raise NotFound(f"no join token {token_id!r}")
            self._put(conn, JOIN_TOKENS, token_id, None)


def _some(names: Sequence[str], shown: int = 5) -> str:
    """``'a', 'b', 'c'`` and, beyond ``shown`` names, how many more."""
    text = ", ".join(repr(n) for n in names[:shown])
    return text if len(names) <= shown else f"{text} and {len(names) - shown} more"


def server_clock(server_id: str, wall: Callable[[], float] = time.time) -> HybridClock:
    """The hybrid logical clock of a server: its id names the stamps."""
    return HybridClock(server_id.replace(".", "_"), lambda: int(wall() * 1000))
