"""Every change the admin site makes: validated field by field, then audited.

The pages and the JSON API both call :class:`Changes`, so they accept and
refuse exactly the same input with the same messages.  Validation reuses the
store's own validators and error classes; a refusal names the field it is
about (``FieldError.field``) so a page can show it next to that field.  A
refused change leaves the store as it was; an accepted one writes one audit
row (who, what, when, on which server).  Passwords are hashed in a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, TypeVar

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred

from evserver.admin.auth import Session, SessionTable, fingerprint
from evserver.passwords import check_password, hash_password
from evserver.store import (
    DEFAULT_WEIGHT,
    Account,
    AlreadyExists,
    Domain,
    Encoder,
    Invalid,
    NotEmpty,
    NotFound,
    Pool,
    Store,
    StoreError,
    validate_description,
    validate_encoder_id,
    validate_name,
    validate_pool_name,
    validate_pool_servers,
    validate_role,
    validate_secret,
    validate_weight,
)

_STATUS = {Invalid: 400, AlreadyExists: 409, NotEmpty: 409, NotFound: 404}


class FieldError(Exception):
    """A refused change: an HTTP status, the field at fault (or None) and a message."""

    def __init__(self, field: str | None, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status
        #: Every field refused at once (a form shows each next to its field).
        self.fields: dict[str | None, str] = {field: message}

    @classmethod
    def combine(cls, errors: list[FieldError]) -> FieldError:
        first = errors[0]
        for e in errors[1:]:
            first.fields.setdefault(e.field, e.message)
        return first


def from_store_error(error: StoreError, field: str | None) -> FieldError:
    """The store's refusal on the field it names itself, else on ``field``."""
    status = next((s for cls, s in _STATUS.items() if isinstance(error, cls)), 400)
    return FieldError(error.field or field, str(error), status)


#: A record that can be given a pool: an encoder or a domain.
_R = TypeVar("_R", Encoder, Domain)


def check_field(field: str, check: Callable[[], Any]) -> Any:
    """``check()``'s result; its StoreError or ValueError becomes a FieldError on ``field``."""
    try:
        return check()
    except StoreError as e:
        raise from_store_error(e, field) from None
    except ValueError as e:  # check_password speaks ValueError
        raise FieldError(field, str(e)) from None


def parse_weight(text: str) -> float | None:
    """A weight typed into a form: empty for the default (None), else a number (FieldError)."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise FieldError("weight", f"weight must be a number, not {text!r}") from None
    return check_field("weight", lambda: validate_weight(value))


def parse_servers(text: str) -> list[str]:
    """Server ids typed into a form: comma (or space) separated; empty items are ignored."""
    return [part for part in text.replace(",", " ").split() if part]


def _ref(pool: str | None) -> str:
    return "none" if pool is None else repr(pool)


class Changes:
    """Validated, audited changes to domains, accounts, encoders, pools and server weights."""

    def __init__(
        self,
        store: Store,
        server_id: str,
        sessions: SessionTable,
        password_hasher: Callable[[str], str] = hash_password,
        defer_to_thread: Callable[..., Deferred[Any]] = threads.deferToThread,
    ) -> None:
        self.store = store
        self.server_id = server_id
        self.sessions = sessions
        self._hash = password_hasher
        self._defer_to_thread = defer_to_thread

    # -- helpers -----------------------------------------------------------

    def audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        self.store.add_audit(actor, self.server_id, action, target, detail)

    def _domain(self, field: str, name: object) -> str:
        if not isinstance(name, str) or not name:
            raise FieldError(field, "choose a domain")
        if self.store.get_domain(name) is None:
            raise FieldError(field, f"no domain named {name!r}")
        return name

    def _account(self, name: object) -> Account:
        account = self.store.get_account(name) if isinstance(name, str) else None
        if account is None:
            raise FieldError(None, f"no account named {name!r}", 404)
        return account

    def _encoder(self, encoder_id: object) -> Encoder:
        encoder = self.store.get_encoder(encoder_id) if isinstance(encoder_id, str) else None
        if encoder is None:
            raise FieldError(None, f"no encoder with id {encoder_id!r}", 404)
        return encoder

    def _admins(self) -> list[str]:
        return [a.name for a in self.store.list_accounts() if a.role == "admin"]

    def _hash_password(self, password: str) -> Deferred[str]:
        return self._defer_to_thread(self._hash, password)

    # -- domains -----------------------------------------------------------

    def create_domain(self, actor: Session, name: object, pool: object = None) -> Domain:
        errors: list[FieldError] = []
        for check in (
            lambda: check_field("name", lambda: validate_name("domain name", name)),
            lambda: self.pool_ref("pool", pool),
        ):
            try:
                check()
            except FieldError as e:
                errors.append(e)
        if errors:
            raise FieldError.combine(errors)
        assert isinstance(name, str)
        checked, checked_pool = name, self.pool_ref("pool", pool)
        try:
            domain = self.store.add_domain(checked, checked_pool)
        except StoreError as e:
            raise from_store_error(e, "name") from None
        self.audit(actor.account, "domain.create", checked,
                   "" if checked_pool is None else f"pool {checked_pool!r}")
        return domain

    def delete_domain(self, actor: Session, name: object) -> None:
        if not isinstance(name, str) or self.store.get_domain(name) is None:
            raise FieldError(None, f"no domain named {name!r}", 404)
        try:
            self.store.delete_domain(name)
        except StoreError as e:
            raise from_store_error(e, None) from None
        self.audit(actor.account, "domain.delete", name)

    # -- accounts ----------------------------------------------------------

    @defer.inlineCallbacks
    def create_account(
        self, actor: Session, name: object, domain: object, password: object, role: object
    ) -> Any:
        """Create an account; fires with it, or fails with FieldError."""
        errors: list[FieldError] = []
        for check in (
            lambda: check_field("name", lambda: validate_name("account name", name)),
            lambda: self._domain("domain", domain),
            lambda: check_field("password", lambda: check_password(password)),  # type: ignore[arg-type]
            lambda: check_field("role", lambda: validate_role(role)),
        ):
            try:
                check()
            except FieldError as e:
                errors.append(e)
        if errors:
            raise FieldError.combine(errors)
        assert isinstance(name, str) and isinstance(domain, str) and isinstance(password, str)
        checked_role = validate_role(role)
        if self.store.get_account(name) is not None:
            raise FieldError("name", f"account {name!r} exists already", 409)
        password_hash = yield self._hash_password(password)
        try:
            account = self.store.add_account_hashed(domain, name, password_hash, checked_role)
        except StoreError as e:
            raise from_store_error(e, "name") from None
        self.audit(actor.account, "account.create", name,
                   f"domain {domain!r}, role {checked_role}")
        return account

    @defer.inlineCallbacks
    def set_password(self, actor: Session, name: object, password: object) -> Any:
        """Set an account's password; its other sessions end."""
        self._account(name)
        assert isinstance(name, str)
        check_field("password", lambda: check_password(password))  # type: ignore[arg-type]
        assert isinstance(password, str)
        password_hash = yield self._hash_password(password)
        try:
            self.store.set_password_hash(name, password_hash)
        except StoreError as e:
            raise from_store_error(e, None) from None
        self.sessions.end_account(name, keep=actor.id)
        if name == actor.account:
            actor.password_fingerprint = fingerprint(password_hash)
        self.audit(actor.account, "account.password", name)
        return None

    def set_role(self, actor: Session, name: object, role: object) -> Account:
        account = self._account(name)
        checked_role = check_field("role", lambda: validate_role(role))
        if checked_role == account.role:
            return account
        if account.name == actor.account:
            raise FieldError(
                "role", "you cannot change your own role: ask another administrator", 409
            )
        if account.role == "admin" and self._admins() == [account.name]:
            raise FieldError("role", f"{account.name!r} is the last administrator", 409)
        try:
            updated = self.store.set_role(account.name, checked_role)
        except StoreError as e:
            raise from_store_error(e, "role") from None
        if checked_role != "admin":
            self.sessions.end_account(account.name)
        self.audit(actor.account, "account.role", account.name,
                   f"{account.role} -> {checked_role}")
        return updated

    def delete_account(self, actor: Session, name: object) -> None:
        account = self._account(name)
        if account.name == actor.account:
            raise FieldError(None, "you cannot delete the account you are logged in with", 409)
        if account.role == "admin" and self._admins() == [account.name]:
            raise FieldError(None, f"{account.name!r} is the last administrator", 409)
        try:
            self.store.delete_account(account.name)
        except StoreError as e:
            raise from_store_error(e, None) from None
        self.sessions.end_account(account.name)
        self.audit(actor.account, "account.delete", account.name,
                   f"domain {account.domain!r}, role {account.role}")

    # -- encoders ----------------------------------------------------------

    def create_encoder(
        self,
        actor: Session,
        encoder_id: object,
        domain: object,
        name: object = None,
        secret: object = None,
        pool: object = None,
    ) -> tuple[Encoder, str]:
        """Register an encoder; returns it and its secret (to be shown once)."""
        errors: list[FieldError] = []
        for check in (
            lambda: check_field("encoder_id", lambda: validate_encoder_id(encoder_id)),
            lambda: self._domain("domain", domain),
            lambda: None if name is None else check_field(
                "name", lambda: validate_name("encoder name", name)),
            lambda: None if secret is None else check_field(
                "secret", lambda: validate_secret(secret)),
            lambda: self.pool_ref("pool", pool),
        ):
            try:
                check()
            except FieldError as e:
                errors.append(e)
        if errors:
            raise FieldError.combine(errors)
        assert isinstance(encoder_id, str) and isinstance(domain, str)
        assert name is None or isinstance(name, str)
        assert secret is None or isinstance(secret, str)
        if self.store.get_encoder(encoder_id) is not None:
            raise FieldError("encoder_id", f"encoder {encoder_id!r} exists already", 409)
        checked_pool = self.pool_ref("pool", pool)
        try:
            encoder, plain = self.store.add_encoder(domain, encoder_id, name, secret,
                                                    pool=checked_pool)
        except StoreError as e:
            raise from_store_error(e, "encoder_id") from None
        self.audit(actor.account, "encoder.create", encoder_id,
                   f"domain {domain!r}, name {encoder.name!r}"
                   + ("" if checked_pool is None else f", pool {checked_pool!r}"))
        return encoder, plain

    def rename_encoder(self, actor: Session, encoder_id: object, name: object) -> Encoder:
        encoder = self._encoder(encoder_id)
        checked = check_field("name", lambda: validate_name("encoder name", name))
        if checked == encoder.name:
            return encoder
        try:
            updated = self.store.set_encoder_name(encoder.encoder_id, checked)
        except StoreError as e:
            raise from_store_error(e, "name") from None
        self.audit(actor.account, "encoder.rename", encoder.encoder_id,
                   f"{encoder.name!r} -> {checked!r}")
        return updated

    def new_encoder_secret(self, actor: Session, encoder_id: object) -> str:
        """Give an encoder a new generated secret; the old one stops working."""
        encoder = self._encoder(encoder_id)
        try:
            secret = self.store.set_encoder_secret(encoder.encoder_id)
        except StoreError as e:
            raise from_store_error(e, None) from None
        self.audit(actor.account, "encoder.secret", encoder.encoder_id, "new secret generated")
        return secret

    def delete_encoder(self, actor: Session, encoder_id: object) -> None:
        encoder = self._encoder(encoder_id)
        try:
            self.store.delete_encoder(encoder.encoder_id)
        except StoreError as e:
            raise from_store_error(e, None) from None
        self.audit(actor.account, "encoder.delete", encoder.encoder_id,
                   f"domain {encoder.domain!r}, name {encoder.name!r}")

    # -- pools and server weights --------------------------------------------------

    def pool_ref(self, field: str, pool: object) -> str | None:
        """A pool chosen for an encoder or a domain: None or "" for none, else a pool's name."""
        if pool is None or pool == "":
            return None
        if not isinstance(pool, str):
            raise FieldError(field, "pool must be the name of a pool, or null for none, not "
                                    f"{type(pool).__name__}")
        if self.store.get_pool(pool) is None:
            raise FieldError(field, f"no pool named {pool!r}")
        return pool

    @staticmethod
    def _servers(servers: object, known: Collection[str] | None,
                 kept: Collection[str] = ()) -> tuple[str, ...]:
        """Valid server ids, each a server of the cluster (``known``) or one kept from before."""
        checked: tuple[str, ...] = check_field("servers", lambda: validate_pool_servers(servers))
        if known is not None:
            unknown = [s for s in checked if s not in known and s not in kept]
            if unknown:
                raise FieldError("servers", (
                    f"{', '.join(repr(s) for s in unknown)} "
                    f"{'is not a server' if len(unknown) == 1 else 'are not servers'} of this "
                    f"cluster (its servers: {', '.join(known)})"))
        return checked

    def _pool(self, name: object) -> Pool:
        pool = self.store.get_pool(name) if isinstance(name, str) else None
        if pool is None:
            raise FieldError(None, f"no pool named {name!r}", 404)
        return pool

    def create_pool(self, actor: Session, name: object, servers: object,
                    description: object = "", known: Collection[str] | None = None) -> Pool:
        """Create a pool; ``known``: the servers it may name (None: any valid id)."""
        errors: list[FieldError] = []
        for check in (
            lambda: check_field("name", lambda: validate_pool_name(name)),
            lambda: self._servers(servers, known),
            lambda: check_field("description", lambda: validate_description(description)),
        ):
            try:
                check()
            except FieldError as e:
                errors.append(e)
        if errors:
            raise FieldError.combine(errors)
        assert isinstance(name, str) and isinstance(description, str)
        if self.store.get_pool(name) is not None:
            raise FieldError("name", f"pool {name!r} exists already", 409)
        try:
            pool = self.store.create_pool(name, validate_pool_servers(servers), description)
        except StoreError as e:
            raise from_store_error(e, "name") from None
        self.audit(actor.account, "pool.create", pool.name,
                   f"servers {', '.join(pool.servers)}")
        return pool

    def update_pool(self, actor: Session, name: object, servers: object = None,
                    description: object = None,
                    known: Collection[str] | None = None) -> Pool:
        """Change a pool's servers and/or description (None: unchanged).  Servers it
        named already may stay although they left the cluster."""
        pool = self._pool(name)
        errors: list[FieldError] = []
        checked: tuple[str, ...] | None = None
        try:
            if servers is not None:
                checked = self._servers(servers, known, pool.servers)
        except FieldError as e:
            errors.append(e)
        try:
            if description is not None:
                check_field("description", lambda: validate_description(description))
        except FieldError as e:
            errors.append(e)
        if errors:
            raise FieldError.combine(errors)
        assert description is None or isinstance(description, str)
        details = []
        if checked is not None and checked != pool.servers:
            details.append(f"servers {', '.join(pool.servers)} -> {', '.join(checked)}")
        else:
            checked = None
        if description is not None and description != pool.description:
            details.append(f"description {pool.description!r} -> {description!r}")
        else:
            description = None
        if not details:
            return pool
        try:
            updated = self.store.update_pool(pool.name, servers=checked, description=description)
        except StoreError as e:
            raise from_store_error(e, None) from None
        self.audit(actor.account, "pool.update", pool.name, "; ".join(details))
        return updated

    def delete_pool(self, actor: Session, name: object) -> None:
        pool = self._pool(name)
        try:
            self.store.delete_pool(pool.name)
        except StoreError as e:
            raise from_store_error(e, None) from None
        self.audit(actor.account, "pool.delete", pool.name,
                   f"servers {', '.join(pool.servers)}")

    def set_encoder_pool(self, actor: Session, encoder_id: object, pool: object) -> Encoder:
        """Give an encoder its own pool, or none (None or "")."""
        encoder = self._encoder(encoder_id)
        return self._assign_pool(actor, "encoder", encoder.encoder_id, encoder, encoder.pool,
                                 pool, self.store.set_encoder_pool)

    def set_domain_pool(self, actor: Session, name: object, pool: object) -> Domain:
        """Give a domain a pool (for its encoders without one of their own), or none."""
        domain = self.store.get_domain(name) if isinstance(name, str) else None
        if domain is None:
            raise FieldError(None, f"no domain named {name!r}", 404)
        return self._assign_pool(actor, "domain", domain.name, domain, domain.pool, pool,
                                 self.store.set_domain_pool)

    def _assign_pool(self, actor: Session, kind: str, key: str, record: _R,
                     current: str | None, pool: object,
                     assign: Callable[[str, str | None], _R]) -> _R:
        """Give ``record`` (an encoder or a domain, ``key``) the pool ``pool`` through
        ``assign``, and audit it; unchanged (and not audited) when it has it already."""
        checked = self.pool_ref("pool", pool)
        if checked == current:
            return record
        try:
            updated = assign(key, checked)
        except StoreError as e:
            raise from_store_error(e, "pool") from None
        self.audit(actor.account, f"{kind}.pool", key, f"{_ref(current)} -> {_ref(checked)}")
        return updated

    def set_server_weight(self, actor: Session, server_id: str, weight: object) -> float:
        """Set a server's capacity weight (None: back to the default); returns the weight.

        The caller checks that the server is one of the cluster's.
        """
        checked = None if weight is None else check_field("weight",
                                                          lambda: validate_weight(weight))
        weights = self.store.server_weights()
        old = weights.get(server_id, DEFAULT_WEIGHT)
        new = DEFAULT_WEIGHT if checked is None else checked
        if new == old:  # (1 set explicitly or by default weighs the same)
            return new
        try:
            self.store.set_server_weight(server_id, checked)
        except StoreError as e:
            raise from_store_error(e, "weight") from None
        self.audit(actor.account, "server.weight", server_id,
                   f"{old:g} -> {new:g}" + (" (the default)" if checked is None else ""))
        return new
