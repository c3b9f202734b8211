"""Tests for evserver.store and evserver.passwords."""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from evserver import passwords
from evserver.store import (
    DB_FILENAME,
    MIGRATIONS,
    SCHEMA_VERSION,
    AlreadyExists,
    Invalid,
    NotADatabase,
    NotEmpty,
    NotFound,
    SchemaTooNew,
    Store,
    StoreError,
    hash_secret,
)
from tests.budget import examples

# Cheap scrypt parameters so tests that add many accounts stay fast; the
# stored format records them, so verify_password works the same.
fast_hash = functools.partial(passwords.hash_password, n=2, r=1, p=1)


class Ticker:
    """A clock that advances one second per reading."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / DB_FILENAME, clock=Ticker(), password_hasher=fast_hash)
    yield s
    s.close()


# -- passwords ----------------------------------------------------------------


def test_password_hash_format_and_verification() -> None:
    stored = passwords.hash_password("correct horse")
    scheme, params, salt, key = stored.split("$")
    assert scheme == "scrypt"
    assert params == "n=16384,r=8,p=1"
    assert len(passwords._unb64(salt)) == 16
    assert len(passwords._unb64(key)) == 32
    assert passwords.verify_password(stored, "correct horse")
    assert not passwords.verify_password(stored, "correct horsf")
    assert not passwords.verify_password(stored, "")


def test_password_hashes_are_salted() -> None:
    assert fast_hash("same") != fast_hash("same")


def test_password_parameters_are_read_from_the_stored_string() -> None:
    stored = fast_hash("pw")
    assert stored.startswith("scrypt$n=2,r=1,p=1$")
    assert passwords.verify_password(stored, "pw")
    # Changing the recorded parameters changes the derived key.
    tampered = stored.replace("n=2,", "n=4,")
    assert not passwords.verify_password(tampered, "pw")


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "scrypt",
        "bcrypt$n=2,r=1,p=1$AAAA$AAAA",
        "scrypt$n=2,r=1$AAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=3,r=1,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=1048576000,r=8,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=2,r=1,p=1$!!!!$AAAA",
        "scrypt$n=2,r=1,p=1$$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=x,r=1,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_malformed_stored_hash_never_matches(stored: str) -> None:
    assert passwords.verify_password(stored, "anything") is False


@pytest.mark.parametrize("bad", ["", "x" * 1025, "\ud800"])
def test_unacceptable_passwords(bad: str) -> None:
    with pytest.raises(ValueError):
        passwords.hash_password(bad)


@given(st.text(min_size=1, max_size=40))
def test_password_round_trip(password: str) -> None:
    try:
        stored = fast_hash(password)
    except ValueError:
        # Only unencodable text (lone surrogates) is refused.
        with pytest.raises(UnicodeEncodeError):
            password.encode("utf-8")
        return
    assert passwords.verify_password(stored, password)
    assert not passwords.verify_password(stored, password + "x")


# -- opening and migrations ---------------------------------------------------


def test_new_database_is_private_wal_with_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_reopening_keeps_data_and_version(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    with Store(path, password_hasher=fast_hash) as s:
        s.add_domain("example")
        s.add_account("example", "alice", "pw")
        encoder, secret = s.add_encoder("example", "cam-1")
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION
        assert [d.name for d in s.list_domains()] == ["example"]
        account = s.get_account("alice")
        assert account is not None
        assert passwords.verify_password(account.password_hash, "pw")
        assert s.verify_encoder("cam-1", secret) == encoder


def test_in_data_dir(tmp_path: Path) -> None:
    with Store.in_data_dir(tmp_path) as s:
        assert s.path == tmp_path / "evserver.sqlite3"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    expected = rf"schema version {SCHEMA_VERSION + 1}, .* up to version {SCHEMA_VERSION}: upgrade"
    with pytest.raises(SchemaTooNew, match=expected):
        Store(path)


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    path.write_bytes(b"this is not sqlite, just some text that is long enough" * 100)
    with pytest.raises(NotADatabase, match="is not an evserver database"):
        Store(path)


def test_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open database"):
        Store(tmp_path / "missing" / DB_FILENAME)


def test_migrations_apply_in_order_and_only_once(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    first = [["CREATE TABLE t (x INTEGER)"]]
    with Store(path, migrations=first) as s:
        assert s.schema_version == 1
    second = [*first, ["INSERT INTO t VALUES (42)"]]
    with Store(path, migrations=second) as s:
        assert s.schema_version == 2
    with Store(path, migrations=second) as s:  # nothing to do the third time
        assert [tuple(row) for row in s._conn.execute("SELECT x FROM t")] == [(42,)]


def test_failed_migration_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    broken = [["CREATE TABLE t (x INTEGER)"], ["INSERT INTO t VALUES (1)", "NOT SQL AT ALL"]]
    with pytest.raises(StoreError, match="cannot upgrade database"):
        Store(path, migrations=broken)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
    conn.close()


def test_closed_store_refuses_use(store: Store) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.list_domains()


# -- domains, accounts, encoders ---------------------------------------------


def test_domains(store: Store) -> None:
    b = store.add_domain("beta")
    a = store.add_domain("alpha")
    assert [d.name for d in store.list_domains()] == ["alpha", "beta"]
    assert a.uid != b.uid and len(a.uid) == 36
    assert a.created == a.updated
    assert store.get_domain("alpha") == a
    assert store.get_domain("gamma") is None
    with pytest.raises(AlreadyExists, match="'alpha' exists already"):
        store.add_domain("alpha")
    store.delete_domain("alpha")
    assert [d.name for d in store.list_domains()] == ["beta"]
    with pytest.raises(NotFound, match="no domain named 'alpha'"):
        store.delete_domain("alpha")


def test_domain_with_records_cannot_be_deleted(store: Store) -> None:
    store.add_domain("d")
    store.add_account("d", "alice", "pw")
    store.add_encoder("d", "cam")
    with pytest.raises(NotEmpty, match=r"1 account.*1 encoder"):
        store.delete_domain("d")
    store.delete_account("alice")
    with pytest.raises(NotEmpty, match=r"0 account.*1 encoder"):
        store.delete_domain("d")
    store.delete_encoder("cam")
    store.delete_domain("d")
    assert store.list_domains() == []


def test_foreign_keys_are_enforced_below_the_api(store: Store) -> None:
    store.add_domain("d")
    store.add_account("d", "alice", "pw")
    with pytest.raises(sqlite3.IntegrityError):
        store._conn.execute("DELETE FROM domains")


def test_accounts(store: Store) -> None:
    store.add_domain("d1")
    store.add_domain("d2")
    alice = store.add_account("d1", "alice", "secret")
    root = store.add_account("d2", "root", "hunter2", role="admin")
    assert alice.role == "viewer" and root.role == "admin"
    assert alice.domain == "d1"
    assert store.get_account("alice") == alice
    assert store.get_account("nobody") is None
    assert [a.name for a in store.list_accounts()] == ["alice", "root"]
    assert store.list_accounts("d2") == [root]
    assert passwords.verify_password(alice.password_hash, "secret")
    assert "password_hash" not in repr(alice)
    with pytest.raises(AlreadyExists, match="account 'alice' exists already"):
        store.add_account("d2", "alice", "x")  # names are global
    with pytest.raises(NotFound, match="no domain named 'd3'"):
        store.add_account("d3", "carol", "x")
    with pytest.raises(NotFound):
        store.list_accounts("d3")
    with pytest.raises(Invalid, match="role 'root' is invalid"):
        store.add_account("d1", "carol", "x", role="root")
    with pytest.raises(Invalid, match="password must not be empty"):
        store.add_account("d1", "carol", "")
    assert store.get_account("carol") is None


def test_set_password_and_delete_account(store: Store) -> None:
    store.add_domain("d")
    before = store.add_account("d", "alice", "old")
    store.set_password("alice", "new")
    after = store.get_account("alice")
    assert after is not None
    assert after.updated > before.updated and after.created == before.created
    assert passwords.verify_password(after.password_hash, "new")
    assert not passwords.verify_password(after.password_hash, "old")
    with pytest.raises(NotFound):
        store.set_password("bob", "x")
    with pytest.raises(Invalid):
        store.set_password("alice", "")
    store.delete_account("alice")
    assert store.get_account("alice") is None
    with pytest.raises(NotFound, match="no account named 'alice'"):
        store.delete_account("alice")


def test_encoders(store: Store) -> None:
    store.add_domain("d")
    cam, secret = store.add_encoder("d", "cam-1", "Front door")
    assert cam.name == "Front door" and cam.domain == "d" and cam.encoder_id == "cam-1"
    assert len(secret) >= 43  # 32 random bytes, url-safe base64
    assert secret not in cam.secret_hash and cam.secret_hash == hash_secret(secret)
    assert "secret_hash" not in repr(cam)
    assert store.get_encoder("cam-1") == cam
    assert store.verify_encoder("cam-1", secret) == cam
    assert store.verify_encoder("cam-1", secret[:-1]) is None
    assert store.verify_encoder("cam-2", secret) is None
    assert store.verify_encoder("cam-1", "é" * 20) is None
    other, other_secret = store.add_encoder("d", "cam-2")
    assert other.name == "cam-2" and other_secret != secret
    given_secret = "s3cret-of-twenty-chars"
    _, returned = store.add_encoder("d", "cam-3", secret=given_secret)
    assert returned == given_secret
    assert store.verify_encoder("cam-3", given_secret) is not None
    assert [e.encoder_id for e in store.list_encoders()] == ["cam-1", "cam-2", "cam-3"]
    assert [e.encoder_id for e in store.list_encoders("d")] == ["cam-1", "cam-2", "cam-3"]
    with pytest.raises(AlreadyExists, match="encoder 'cam-1' exists already"):
        store.add_encoder("d", "cam-1")
    with pytest.raises(NotFound):
        store.add_encoder("nope", "cam-9")
    with pytest.raises(Invalid, match="encoder secret must be"):
        store.add_encoder("d", "cam-9", secret="short")
    with pytest.raises(Invalid, match="encoder secret must be"):
        store.add_encoder("d", "cam-9", secret="has a space in it somewhere")
    with pytest.raises(Invalid, match="encoder id 'cam 9' is invalid"):
        store.add_encoder("d", "cam 9")
    with pytest.raises(Invalid, match="encoder name"):
        store.add_encoder("d", "cam-9", name="tab\there")
    store.delete_encoder("cam-1")
    assert store.get_encoder("cam-1") is None
    assert store.verify_encoder("cam-1", secret) is None
    with pytest.raises(NotFound, match="no encoder with id 'cam-1'"):
        store.delete_encoder("cam-1")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "1 to 64 characters"),
        ("x" * 65, "1 to 64 characters"),
        ("a\nb", "non-printable"),
        ("a\x00b", "non-printable"),
        ("\u200bzero-width", "non-printable"),
        ("a\u2028b", "non-printable"),
        (" lead", "leading or trailing"),
        ("trail ", "leading or trailing"),
    ],
)
def test_invalid_names(store: Store, name: str, reason: str) -> None:
    with pytest.raises(Invalid, match=reason):
        store.add_domain(name)
    assert store.list_domains() == []


def test_valid_unusual_names(store: Store) -> None:
    for name in ["x", "x" * 64, "Ünïcødé ☃", "a b", "日本語", "with'quote\"s", "%_;--"]:
        store.add_domain(name)
    assert sorted(d.name for d in store.list_domains()) == sorted(
        ["x", "x" * 64, "Ünïcødé ☃", "a b", "日本語", "with'quote\"s", "%_;--"]
    )


@pytest.mark.parametrize("encoder_id", ["", "x" * 65, "a b", "a/b", "é", "a\n"])
def test_invalid_encoder_ids(store: Store, encoder_id: str) -> None:
    store.add_domain("d")
    with pytest.raises(Invalid):
        store.add_encoder("d", encoder_id)
    assert store.list_encoders() == []


# -- property tests -------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One store for a whole property test; each example leaves it empty again."""
    s = Store(tmp_path_factory.mktemp("shared") / DB_FILENAME, password_hasher=fast_hash)
    yield s
    s.close()


def _empty(s: Store) -> None:
    for encoder in s.list_encoders():
        s.delete_encoder(encoder.encoder_id)
    for account in s.list_accounts():
        s.delete_account(account.name)
    for domain in s.list_domains():
        s.delete_domain(domain.name)


@given(names=st.lists(st.text(max_size=70), max_size=6))
def test_arbitrary_names_are_stored_exactly_or_refused(shared: Store, names: list[str]) -> None:
    s = shared
    try:
        s.add_domain("home")
        domains, accounts, encoder_names = {"home"}, set(), []
        for name in names:
            for add, model in (
                (s.add_domain, domains),
                (lambda n: s.add_account("home", n, "pw"), accounts),
            ):
                try:
                    add(name)
                except Invalid:
                    continue
                except AlreadyExists:
                    assert name in model
                    continue
                model.add(name)
            try:
                encoder, _ = s.add_encoder("home", f"e{len(encoder_names)}", name)
            except Invalid:
                pass
            else:
                assert encoder.name == name
                encoder_names.append(name)
            # Listed back exactly; nothing refused was half written.
            assert {d.name for d in s.list_domains()} == domains
            assert {a.name for a in s.list_accounts()} == accounts
            assert [e.name for e in s.list_encoders()] == encoder_names
    finally:
        _empty(s)


@given(name=st.text(max_size=70))
def test_validity_is_exactly_the_documented_rule(shared: Store, name: str) -> None:
    expected_ok = 1 <= len(name) <= 64 and name.isprintable() and name == name.strip()
    try:
        domain = shared.add_domain(name)
    except Invalid:
        assert not expected_ok
        assert shared.list_domains() == []
    else:
        assert expected_ok
        assert shared.list_domains() == [domain]
        assert shared.get_domain(name) == domain
        shared.delete_domain(name)


@given(encoder_id=st.text(alphabet=st.characters(codec="ascii"), max_size=70))
def test_encoder_id_rule(shared: Store, encoder_id: str) -> None:
    expected_ok = re.fullmatch(r"[A-Za-z0-9._-]{1,64}", encoder_id) is not None
    shared.add_domain("d")
    try:
        encoder, secret = shared.add_encoder("d", encoder_id)
    except Invalid:
        assert not expected_ok
        assert shared.list_encoders() == []
    else:
        assert expected_ok
        assert shared.verify_encoder(encoder_id, secret) == encoder
    finally:
        _empty(shared)


NAMES = st.one_of(st.sampled_from(["a", "b", "c", "Zoë", "x y"]), st.text(max_size=8))


class StoreMachine(RuleBasedStateMachine):
    """Random sequences of operations agree with a plain dictionary model."""

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory()
        self.store = Store(Path(self._tmp.name) / DB_FILENAME, password_hasher=fast_hash)
        self.domains: set[str] = set()
        self.accounts: dict[str, str] = {}  # name -> domain
        self.encoders: dict[str, tuple[str, str]] = {}  # id -> (domain, secret)

    def teardown(self) -> None:
        self.store.close()
        self._tmp.cleanup()

    @rule(name=NAMES)
    def add_domain(self, name: str) -> None:
        try:
            self.store.add_domain(name)
        except Invalid:
            return
        except AlreadyExists:
            assert name in self.domains
            return
        assert name not in self.domains
        self.domains.add(name)

    @rule(name=NAMES)
    def delete_domain(self, name: str) -> None:
        try:
            self.store.delete_domain(name)
        except NotFound:
            assert name not in self.domains
            return
        except NotEmpty:
            assert name in set(self.accounts.values()) | {d for d, _ in self.encoders.values()}
            return
        self.domains.remove(name)

    @rule(domain=NAMES, name=NAMES, admin=st.booleans())
    def add_account(self, domain: str, name: str, admin: bool) -> None:
        try:
            self.store.add_account(domain, name, "pw-" + name, "admin" if admin else "viewer")
        except Invalid:
            return
        except NotFound:
            assert domain not in self.domains
            return
        except AlreadyExists:
            assert name in self.accounts
            return
        assert domain in self.domains and name not in self.accounts
        self.accounts[name] = domain

    @rule(name=NAMES)
    def delete_account(self, name: str) -> None:
        try:
            self.store.delete_account(name)
        except NotFound:
            assert name not in self.accounts
            return
        del self.accounts[name]

    @rule(domain=NAMES, encoder_id=st.sampled_from(["e1", "e2", "e3", "bad id"]))
    def add_encoder(self, domain: str, encoder_id: str) -> None:
        try:
            _, secret = self.store.add_encoder(domain, encoder_id)
        except Invalid:
            assert encoder_id == "bad id"
            return
        except NotFound:
            assert domain not in self.domains
            return
        except AlreadyExists:
            assert encoder_id in self.encoders
            return
        self.encoders[encoder_id] = (domain, secret)

    @rule(encoder_id=st.sampled_from(["e1", "e2", "e3"]))
    def delete_encoder(self, encoder_id: str) -> None:
        try:
            self.store.delete_encoder(encoder_id)
        except NotFound:
            assert encoder_id not in self.encoders
            return
        del self.encoders[encoder_id]

    @invariant()
    def agrees_with_model(self) -> None:
        store = self.store
        assert {d.name for d in store.list_domains()} == self.domains
        assert {a.name: a.domain for a in store.list_accounts()} == self.accounts
        assert {e.encoder_id: e.domain for e in store.list_encoders()} == {
            k: v[0] for k, v in self.encoders.items()
        }
        for encoder_id, (_domain, secret) in self.encoders.items():
            assert store.verify_encoder(encoder_id, secret) is not None


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=examples(30), stateful_step_count=25,
                                     deadline=None)
