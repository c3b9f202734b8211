"""The server's persistent store: SQLite in the data directory.

Domains, accounts and encoders live in ``<data dir>/evserver.sqlite3`` (WAL
mode, foreign keys on).  The schema is versioned with ``PRAGMA user_version``
and upgraded on open by an ordered list of migrations, all applied in one
transaction; a database newer than this code is refused.

Every row has a stable random text id (``uid``) and ``created``/``updated``
timestamps (seconds since the epoch), so that replication metadata can be
added by a later migration without re-keying anything.  Rows refer to their
domain by the domain's ``uid``; the API speaks domain names.

Passwords are stored as scrypt hashes (:mod:`evserver.passwords`).  Encoder
secrets are random high-entropy tokens, so a single SHA-256 compared in
constant time is enough for them and keeps verification fast, which matters
when hundreds of encoders reconnect at once after a failover.

A ``Store`` is used from one thread (the reactor's); it does no slow work
except :meth:`Store.add_account` and :meth:`Store.set_password`, which hash
the password.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import attrs

from evserver.passwords import check_password, hash_password

DB_FILENAME = "evserver.sqlite3"
MAX_NAME_CHARS = 64
ROLES = ("viewer", "admin")
Role = Literal["viewer", "admin"]
ENCODER_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_SECRET_CHARS = 16
MAX_SECRET_CHARS = 256
SECRET_PATTERN = re.compile(r"[!-~]+")  # printable ASCII, no spaces
_SECRET_SCHEME = "sha256$"


class StoreError(Exception):
    """Base class of every error the store reports."""


class Invalid(StoreError):
    """A name, id, password or secret that the store does not accept."""


class AlreadyExists(StoreError):
    """A record with that name or id exists already."""


class NotFound(StoreError):
    """No record with that name or id."""


class NotEmpty(StoreError):
    """A domain still has accounts or encoders."""


class SchemaTooNew(StoreError):
    """The database was written by a newer evserver."""


class NotADatabase(StoreError):
    """The file exists but is not an SQLite database."""


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
)

SCHEMA_VERSION = len(MIGRATIONS)


@attrs.frozen
class Domain:
    uid: str
    name: str
    created: float
    updated: float


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


class Store:
    """Domains, accounts and encoders in one SQLite file.

    ``path`` is the database file (normally ``data_dir / DB_FILENAME``); it is
    created, mode 0600, if missing.  ``clock`` gives the timestamps;
    ``password_hasher`` exists so tests can use cheaper scrypt parameters.
    ``migrations`` is for tests of the upgrade machinery.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        password_hasher: Callable[[str], str] = hash_password,
        migrations: Sequence[Sequence[str]] = MIGRATIONS,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._hash_password = password_hasher
        self._migrations = tuple(tuple(m) for m in migrations)
        self._db: sqlite3.Connection | None = None
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
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
            except sqlite3.DatabaseError as e:
                raise NotADatabase(f"{str(self.path)!r} is not an evserver database ({e})") from e
            try:
                self._migrate()
            except sqlite3.Error as e:
                raise StoreError(f"cannot upgrade database {str(self.path)!r}: {e}") from e
        except BaseException:
            self.close()
            raise

    @classmethod
    def in_data_dir(cls, data_dir: str | os.PathLike[str]) -> Store:
        """Open the store of a server data directory."""
        return cls(Path(data_dir) / DB_FILENAME)

    # -- plumbing ---------------------------------------------------------

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the store is closed")
        return self._db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

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

    def _domain_uid(self, conn: sqlite3.Connection, name: str) -> str:
        row = conn.execute("SELECT uid FROM domains WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no domain named {name!r}")
        return str(row["uid"])

    # -- domains ----------------------------------------------------------

    def add_domain(self, name: str) -> Domain:
        validate_name("domain name", name)
        now = self._clock()
        domain = Domain(uid=_new_uid(), name=name, created=now, updated=now)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"domain {name!r} exists already")
            conn.execute(
                "INSERT INTO domains (uid, name, created, updated) VALUES (?, ?, ?, ?)",
                (domain.uid, domain.name, domain.created, domain.updated),
            )
        return domain

    def get_domain(self, name: str) -> Domain | None:
        row = self._conn.execute(
            "SELECT uid, name, created, updated FROM domains WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else Domain(**dict(row))

    def list_domains(self) -> list[Domain]:
        rows = self._conn.execute(
            "SELECT uid, name, created, updated FROM domains ORDER BY name"
        ).fetchall()
        return [Domain(**dict(row)) for row in rows]

    def delete_domain(self, name: str) -> None:
        """Delete an empty domain; NotEmpty if it still has accounts or encoders."""
        with self._write() as conn:
            uid = self._domain_uid(conn, name)
            accounts = conn.execute(
                "SELECT count(*) FROM accounts WHERE domain_uid = ?", (uid,)
            ).fetchone()[0]
            encoders = conn.execute(
                "SELECT count(*) FROM encoders WHERE domain_uid = ?", (uid,)
            ).fetchone()[0]
            if accounts or encoders:
                raise NotEmpty(
                    f"domain {name!r} still has {accounts} account(s) and "
                    f"{encoders} encoder(s): delete them first"
                )
            conn.execute("DELETE FROM domains WHERE uid = ?", (uid,))

    # -- accounts ---------------------------------------------------------

    _ACCOUNT_SELECT = (
        "SELECT a.uid, a.name, d.name AS domain, a.role, a.password_hash, a.created, a.updated "
        "FROM accounts a JOIN domains d ON a.domain_uid = d.uid"
    )

    @staticmethod
    def _account(row: sqlite3.Row) -> Account:
        return Account(**dict(row))

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
        with self._write() as conn:
            self._domain_uid(conn, domain)
            if conn.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"account {name!r} exists already")
        password_hash = self._hash_password(password)
        now = self._clock()
        uid = _new_uid()
        with self._write() as conn:
            domain_uid = self._domain_uid(conn, domain)
            if conn.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"account {name!r} exists already")
            conn.execute(
                "INSERT INTO accounts (uid, name, domain_uid, password_hash, role, created, "
                "updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (uid, name, domain_uid, password_hash, checked_role, now, now),
            )
        return Account(
            uid=uid,
            name=name,
            domain=domain,
            role=checked_role,
            password_hash=password_hash,
            created=now,
            updated=now,
        )

    def get_account(self, name: str) -> Account | None:
        row = self._conn.execute(self._ACCOUNT_SELECT + " WHERE a.name = ?", (name,)).fetchone()
        return None if row is None else self._account(row)

    def list_accounts(self, domain: str | None = None) -> list[Account]:
        """All accounts, or those of ``domain`` (NotFound if no such domain), by name."""
        conn = self._conn
        if domain is None:
            rows = conn.execute(self._ACCOUNT_SELECT + " ORDER BY a.name").fetchall()
        else:
            uid = self._domain_uid(conn, domain)
            rows = conn.execute(
                self._ACCOUNT_SELECT + " WHERE a.domain_uid = ? ORDER BY a.name", (uid,)
            ).fetchall()
        return [self._account(row) for row in rows]

    def set_password(self, name: str, password: str) -> None:
        try:
            check_password(password)
        except ValueError as e:
            raise Invalid(str(e)) from None
        if self.get_account(name) is None:
            raise NotFound(f"no account named {name!r}")
        password_hash = self._hash_password(password)
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE accounts SET password_hash = ?, updated = ? WHERE name = ?",
                (password_hash, self._clock(), name),
            )
            if cursor.rowcount != 1:
                raise NotFound(f"no account named {name!r}")

    def delete_account(self, name: str) -> None:
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM accounts WHERE name = ?", (name,))
            if cursor.rowcount != 1:
                raise NotFound(f"no account named {name!r}")

    # -- encoders ---------------------------------------------------------

    _ENCODER_SELECT = (
        "SELECT e.uid, e.encoder_id, e.name, d.name AS domain, e.secret_hash, e.created, "
        "e.updated FROM encoders e JOIN domains d ON e.domain_uid = d.uid"
    )

    @staticmethod
    def _encoder(row: sqlite3.Row) -> Encoder:
        return Encoder(**dict(row))

    def add_encoder(
        self, domain: str, encoder_id: str, name: str | None = None, secret: str | None = None
    ) -> tuple[Encoder, str]:
        """Register an encoder; return it and its secret (generated if not given).

        Only a hash of the secret is stored: the returned secret is the one
        chance to show it.
        """
        validate_encoder_id(encoder_id)
        display_name = encoder_id if name is None else validate_name("encoder name", name)
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
        )
        with self._write() as conn:
            domain_uid = self._domain_uid(conn, domain)
            if conn.execute(
                "SELECT 1 FROM encoders WHERE encoder_id = ?", (encoder_id,)
            ).fetchone():
                raise AlreadyExists(f"encoder {encoder_id!r} exists already")
            conn.execute(
                "INSERT INTO encoders (uid, encoder_id, name, domain_uid, secret_hash, created, "
                "updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    encoder.uid,
                    encoder.encoder_id,
                    encoder.name,
                    domain_uid,
                    encoder.secret_hash,
                    encoder.created,
                    encoder.updated,
                ),
            )
        return encoder, secret

    def get_encoder(self, encoder_id: str) -> Encoder | None:
        row = self._conn.execute(
            self._ENCODER_SELECT + " WHERE e.encoder_id = ?", (encoder_id,)
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
            rows = conn.execute(self._ENCODER_SELECT + " ORDER BY e.encoder_id").fetchall()
        else:
            uid = self._domain_uid(conn, domain)
            rows = conn.execute(
                self._ENCODER_SELECT + " WHERE e.domain_uid = ? ORDER BY e.encoder_id", (uid,)
            ).fetchall()
        return [self._encoder(row) for row in rows]

    def delete_encoder(self, encoder_id: str) -> None:
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM encoders WHERE encoder_id = ?", (encoder_id,))
            if cursor.rowcount != 1:
                raise NotFound(f"no encoder with id {encoder_id!r}")

    # -- admin site: edits and the audit log --------------------------------

    def add_account_hashed(
        self, domain: str, name: str, password_hash: str, role: Role | str = "viewer"
    ) -> Account:
        """Like :meth:`add_account` with the password already hashed (in a thread)."""
        validate_name("account name", name)
        checked_role = validate_role(role)
        if not isinstance(password_hash, str) or not password_hash:
            raise Invalid("password hash must be non-empty text")
        now = self._clock()
        uid = _new_uid()
        with self._write() as conn:
            domain_uid = self._domain_uid(conn, domain)
            if conn.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"account {name!r} exists already")
            conn.execute(
                "INSERT INTO accounts (uid, name, domain_uid, password_hash, role, created, "
                "updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (uid, name, domain_uid, password_hash, checked_role, now, now),
            )
        return Account(uid=uid, name=name, domain=domain, role=checked_role,
                       password_hash=password_hash, created=now, updated=now)

    def set_password_hash(self, name: str, password_hash: str) -> None:
        """Like :meth:`set_password` with the password already hashed (in a thread)."""
        if not isinstance(password_hash, str) or not password_hash:
            raise Invalid("password hash must be non-empty text")
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE accounts SET password_hash = ?, updated = ? WHERE name = ?",
                (password_hash, self._clock(), name),
            )
            if cursor.rowcount != 1:
                raise NotFound(f"no account named {name!r}")

    def set_role(self, name: str, role: Role | str) -> Account:
        checked_role = validate_role(role)
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE accounts SET role = ?, updated = ? WHERE name = ?",
                (checked_role, self._clock(), name),
            )
            if cursor.rowcount != 1:
                raise NotFound(f"no account named {name!r}")
        account = self.get_account(name)
        assert account is not None
        return account

    def set_encoder_name(self, encoder_id: str, name: str) -> Encoder:
        validate_name("encoder name", name)
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE encoders SET name = ?, updated = ? WHERE encoder_id = ?",
                (name, self._clock(), encoder_id),
            )
            if cursor.rowcount != 1:
                raise NotFound(f"no encoder with id {encoder_id!r}")
        encoder = self.get_encoder(encoder_id)
        assert encoder is not None
        return encoder

    def set_encoder_secret(self, encoder_id: str, secret: str | None = None) -> str:
        """Replace an encoder's secret (generated if not given); return the new secret."""
        if secret is None:
            secret = generate_secret()
        else:
            validate_secret(secret)
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE encoders SET secret_hash = ?, updated = ? WHERE encoder_id = ?",
                (hash_secret(secret), self._clock(), encoder_id),
            )
            if cursor.rowcount != 1:
                raise NotFound(f"no encoder with id {encoder_id!r}")
        return secret

    def add_audit(
        self, actor: str, server_id: str, action: str, target: str, detail: str = ""
    ) -> AuditEntry:
        """Record a change in the audit log."""
        entry = AuditEntry(id=_new_uid(), at=self._clock(), actor=str(actor),
                           server_id=str(server_id), action=str(action), target=str(target),
                           detail=str(detail))
        with self._write() as conn:
            conn.execute(
                "INSERT INTO audit_log (id, at, actor, server_id, action, target, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (entry.id, entry.at, entry.actor, entry.server_id, entry.action, entry.target,
                 entry.detail),
            )
        return entry

    def list_audit(self, limit: int = 100) -> list[AuditEntry]:
        """The latest ``limit`` audit entries, newest first."""
        rows = self._conn.execute(
            "SELECT id, at, actor, server_id, action, target, detail FROM audit_log "
            "ORDER BY at DESC, rowid DESC LIMIT ?",
            (max(0, int(limit)),),
        ).fetchall()
        return [AuditEntry(**dict(row)) for row in rows]
