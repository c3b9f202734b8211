"""Every change the admin site makes: validated field by field, then audited.

The pages and the JSON API both call :class:`Changes`, so they accept and
refuse exactly the same input with the same messages.  Validation reuses the
store's own validators and error classes; a refusal names the field it is
about (``FieldError.field``) so a page can show it next to that field.  A
refused change leaves the store as it was; an accepted one writes one audit
row (who, what, when, on which server).  Passwords are hashed in a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred

from evserver.admin.auth import Session, SessionTable, fingerprint
from evserver.passwords import check_password, hash_password
from evserver.store import (
    Account,
    AlreadyExists,
    Domain,
    Encoder,
    Invalid,
    NotEmpty,
    NotFound,
    Store,
    StoreError,
    validate_encoder_id,
    validate_name,
    validate_role,
    validate_secret,
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
    status = next((s for cls, s in _STATUS.items() if isinstance(error, cls)), 400)
    return FieldError(field, str(error), status)


def check_field(field: str, check: Callable[[], Any]) -> Any:
    """``check()``'s result; its StoreError or ValueError becomes a FieldError on ``field``."""
    try:
        return check()
    except StoreError as e:
        raise from_store_error(e, field) from None
    except ValueError as e:  # check_password speaks ValueError
        raise FieldError(field, str(e)) from None


class Changes:
    """Validated, audited changes to domains, accounts and encoders."""

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

    def create_domain(self, actor: Session, name: object) -> Domain:
        checked = check_field("name", lambda: validate_name("domain name", name))
        try:
            domain = self.store.add_domain(checked)
        except StoreError as e:
            raise from_store_error(e, "name") from None
        self.audit(actor.account, "domain.create", checked)
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
        try:
            encoder, plain = self.store.add_encoder(domain, encoder_id, name, secret)
        except StoreError as e:
            raise from_store_error(e, "encoder_id") from None
        self.audit(actor.account, "encoder.create", encoder_id,
                   f"domain {domain!r}, name {encoder.name!r}")
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
