"""The store as a replica: stamps, tombstones, change feed, merging, anti-entropy, upgrade."""

from __future__ import annotations

import functools
import json
import random
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from evserver import passwords
from evserver.state.hlc import HybridClock, Stamp
from evserver.state.replica import Record, Replica, Update
from evserver.store import (
    DB_FILENAME,
    MIGRATIONS,
    REPLICATED_SCHEMA_VERSION,
    SCHEMA_VERSION,
    TABLES,
    Account,
    AlreadyExists,
    BadUpdate,
    Domain,
    Encoder,
    NotEmpty,
    NotFound,
    Pool,
    Store,
    StoreError,
    hash_secret,
)

fast_hash = functools.partial(passwords.hash_password, n=2, r=1, p=1)
T0_MS = 1_700_000_000_000


class Wall:
    """A settable wall clock in milliseconds (the HLC's and, in seconds, the store's)."""

    def __init__(self, ms: int = T0_MS) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms

    def seconds(self) -> float:
        return self.ms / 1000


def open_store(path: Path, node: str, wall: Wall, **options: Any) -> Store:
    return Store(path, clock=wall.seconds, hlc=HybridClock(node, wall),
                 password_hasher=fast_hash, **options)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Store, Store, Wall, Wall]]:
    wa, wb = Wall(T0_MS), Wall(T0_MS - 5_000)  # b's clock 5 s behind
    a = open_store(tmp_path / "a.sqlite3", "a", wa)
    b = open_store(tmp_path / "b.sqlite3", "b", wb)
    yield a, b, wa, wb
    a.close()
    b.close()


def exchange(x: Store, y: Store) -> int:
    """Full anti-entropy both ways; the number of records that changed."""
    to_y = x.updates_for(y.digest())
    to_x = y.updates_for(x.digest())
    return y.apply_updates(to_y) + x.apply_updates(to_x)


def view(s: Store) -> tuple[Any, ...]:
    return (
        s.list_domains(),
        s.list_accounts(),
        s.list_encoders(),
        s.list_settings(),
        s.list_join_tokens(),
        sorted(e.id for e in s.list_audit(10_000)),
        s.list_pools(),
        s.server_weights(),
        s.encoder_pools(),
    )


def record_of(s: Store, table: str, key: str) -> Update | None:
    found = s.updates_for([(table, key)])
    return found[0] if found else None


# -- local writes: stamps, tombstones, the change feed ----------------------------


def test_every_write_stamps_what_it_changes_and_is_published(
    pair: tuple[Store, Store, Wall, Wall],
) -> None:
    a, _, wall, _ = pair
    feed: list[Update] = []
    unsubscribe = a.subscribe(feed.append)
    domain = a.add_domain("d")
    wall.ms += 10
    account = a.add_account("d", "alice", "pw", "admin")
    a.set_password("alice", "new")
    a.set_role("alice", "viewer")
    _, secret = a.add_encoder("d", "cam", "Front")
    a.set_encoder_name("cam", "Back")
    a.set_encoder_secret("cam", "s" * 20)
    a.delete_encoder("cam")
    a.set_setting("cluster.max_servers", 4)
    a.add_join_token("tok-0001", "ab" * 32, 1234)
    a.mark_join_token_used("tok-0001")
    entry = a.add_audit("alice", "srv", "x.y", "t", "detail")
    assert [(u.table, u.key, sorted(u.fields), u.deleted is not None) for u in feed] == [
        ("domains", "d", ["created", "pool", "uid", "updated"], False),
        ("accounts", "alice",
         ["created", "domain", "password_hash", "role", "uid", "updated"], False),
        ("accounts", "alice", ["password_hash", "updated"], False),
        ("accounts", "alice", ["role", "updated"], False),
        ("encoders", "cam",
         ["created", "domain", "name", "pool", "secret_hash", "uid", "updated"], False),
        ("encoders", "cam", ["name", "updated"], False),
        ("encoders", "cam", ["secret_hash", "updated"], False),
        ("encoders", "cam", [], True),
        ("settings", "cluster.max_servers", ["value"], False),
        ("join_tokens", "tok-0001", ["expires", "secret_hash", "used"], False),
        ("join_tokens", "tok-0001", ["used"], False),
        ("audit_log", entry.id, ["action", "actor", "at", "detail", "server_id", "target"],
         False),
    ]
    # One stamp per call, strictly increasing, from this store's clock.
    stamps = [u.stamp for u in feed]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert all(s.node == "a" for s in stamps)
    for u in feed:
        assert {s for _, s in u.fields.values()} <= {u.stamp}
    # Values are what a peer needs, as JSON.
    assert feed[0].fields["uid"][0] == domain.uid
    assert feed[1].fields["password_hash"][0] == account.password_hash
    assert feed[1].fields["domain"][0] == "d"
    assert feed[4].fields["secret_hash"][0] == hash_secret(secret)
    assert feed[8].fields["value"][0] == 4
    assert feed[10].fields["used"][0] is True
    for u in feed:
        json.dumps({name: value for name, (value, _) in u.fields.items()})
    # Refused writes publish nothing; unsubscribed callbacks hear nothing.
    n = len(feed)
    with pytest.raises(AlreadyExists):
        a.add_domain("d")
    with pytest.raises(NotEmpty):
        a.delete_domain("d")
    assert len(feed) == n
    unsubscribe()
    a.add_domain("e")
    assert len(feed) == n


def test_a_failing_subscriber_fails_neither_the_write_nor_others(
    pair: tuple[Store, Store, Wall, Wall],
) -> None:
    a, *_ = pair
    heard: list[Update] = []

    def broken(update: Update) -> None:
        raise RuntimeError("boom")

    a.subscribe(broken)
    a.subscribe(heard.append)
    a.add_domain("d")
    assert a.get_domain("d") is not None
    assert [u.key for u in heard] == ["d"]


def test_deletes_are_tombstones_and_re_creation_revives(
    pair: tuple[Store, Store, Wall, Wall],
) -> None:
    a, *_ = pair
    a.add_domain("d")
    first = a.add_account("d", "alice", "pw")
    a.delete_account("alice")
    assert a.get_account("alice") is None and a.list_accounts() == []
    tomb = record_of(a, "accounts", "alice")
    assert tomb is not None and tomb.deleted is not None  # the row stays, as a tombstone
    with pytest.raises(NotFound):
        a.delete_account("alice")
    with pytest.raises(NotFound):
        a.set_password("alice", "x")
    again = a.add_account("d", "alice", "other", "admin")
    assert again.uid != first.uid and again.role == "admin"
    revived = record_of(a, "accounts", "alice")
    assert revived is not None and revived.deleted == tomb.deleted
    assert all(stamp > tomb.deleted for _, stamp in revived.fields.values())
    assert a.get_account("alice") == again
    # The same for domains and encoders.
    a.delete_account("alice")
    a.delete_domain("d")
    assert a.list_domains() == [] and a.get_domain("d") is None
    with pytest.raises(NotFound):
        a.add_encoder("d", "cam")
    a.add_domain("d")
    _encoder, secret = a.add_encoder("d", "cam")
    a.delete_encoder("cam")
    assert a.verify_encoder("cam", secret) is None
    encoder2, secret2 = a.add_encoder("d", "cam")
    assert a.verify_encoder("cam", secret2) == encoder2
    assert a.verify_encoder("cam", secret) is None


def test_settings_and_join_tokens(pair: tuple[Store, Store, Wall, Wall]) -> None:
    a, b, *_ = pair
    a.set_setting("cluster.max_servers", 4)
    a.set_setting("nested", {"a": [1, 2.5, None, "x"]})
    assert a.get_setting("cluster.max_servers") == 4
    assert a.get_setting("missing", "dflt") == "dflt"
    with pytest.raises(StoreError, match="setting key"):
        a.set_setting("bad key", 1)
    with pytest.raises(StoreError, match="JSON"):
        a.set_setting("k", float("nan"))
    token = a.add_join_token("tok-0001", "ab" * 32, 99)
    assert not token.used and "ab" * 32 not in repr(token)
    with pytest.raises(AlreadyExists):
        a.add_join_token("tok-0001", "cd" * 32, 99)
    with pytest.raises(StoreError, match="token id"):
        a.add_join_token("short", "ab" * 32, 99)
    exchange(a, b)
    assert b.list_settings() == {"cluster.max_servers": 4, "nested": {"a": [1, 2.5, None, "x"]}}
    assert b.mark_join_token_used("tok-0001").used
    exchange(a, b)
    assert a.get_join_token("tok-0001") == b.get_join_token("tok-0001")
    assert a.get_join_token("tok-0001").used  # type: ignore[union-attr]
    a.delete_setting("nested")
    b.delete_join_token("tok-0001")
    exchange(a, b)
    assert view(a) == view(b)
    assert a.list_join_tokens() == [] and a.list_settings() == {"cluster.max_servers": 4}


def test_local_writes_win_after_a_restart_with_the_clock_gone_back(tmp_path: Path) -> None:
    wall = Wall(T0_MS + 60_000)
    path = tmp_path / DB_FILENAME
    with open_store(path, "a", wall) as s:
        s.add_domain("d")
        s.add_account("d", "alice", "pw", "admin")
        before = record_of(s, "accounts", "alice")
    wall.ms -= 60_000  # the machine's clock was wrong and got fixed
    with open_store(path, "a", wall) as s:
        assert s.hlc.last > before.stamp  # type: ignore[union-attr]
        s.set_role("alice", "viewer")
        account = s.get_account("alice")
        assert account is not None and account.role == "viewer"


def test_local_write_wins_over_a_record_written_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    ahead, behind = Wall(T0_MS + 10_000), Wall(T0_MS)
    server = open_store(path, "a", behind)
    server.add_domain("d")
    server.add_account("d", "alice", "pw")
    with open_store(path, "a", ahead) as ctl:  # e.g. evserver-ctl, its clock ahead
        ctl.set_role("alice", "admin")
    server.set_role("alice", "viewer")  # the server's clock has not seen ctl's stamp
    account = server.get_account("alice")
    assert account is not None and account.role == "viewer"
    server.close()


# -- merging --------------------------------------------------------------------------


def test_the_same_names_created_on_both_sides_merge(pair: tuple[Store, Store, Wall, Wall]) -> None:
    a, b, _wa, wb = pair
    a.add_domain("d")
    b.add_domain("d")
    a.add_account("d", "alice", "from-a", "admin")
    wb.ms += 20_000  # b's write is the later one
    b.add_account("d", "alice", "from-b", "viewer")
    a.add_encoder("d", "cam", "A's camera")
    exchange(a, b)
    assert view(a) == view(b)
    assert [d.name for d in a.list_domains()] == ["d"]
    alice = a.get_account("alice")
    assert alice is not None and alice.role == "viewer"
    assert passwords.verify_password(alice.password_hash, "from-b")
    assert [e.name for e in b.list_encoders()] == ["A's camera"]
    assert exchange(a, b) == 0  # nothing left to send


def test_concurrent_edits_of_different_fields_both_survive(
    pair: tuple[Store, Store, Wall, Wall],
) -> None:
    a, b, *_ = pair
    a.add_domain("d")
    _, secret = a.add_encoder("d", "cam", "Old name")
    exchange(a, b)
    a.set_encoder_name("cam", "New name")
    new_secret = b.set_encoder_secret("cam")
    exchange(a, b)
    for s in (a, b):
        encoder = s.verify_encoder("cam", new_secret)
        assert encoder is not None and encoder.name == "New name"
        assert s.verify_encoder("cam", secret) is None
    assert a.digest() == b.digest()


def test_delete_wins_over_a_concurrent_field_update_until_re_created(
    pair: tuple[Store, Store, Wall, Wall],
) -> None:
    a, b, _wa, wb = pair
    a.add_domain("d")
    a.add_account("d", "alice", "pw")
    exchange(a, b)
    a.delete_account("alice")
    wb.ms += 60_000  # b's role change is later than a's delete
    b.set_role("alice", "admin")
    exchange(a, b)
    for s in (a, b):
        assert s.get_account("alice") is None  # no half account comes back
    kept = record_of(a, "accounts", "alice")
    assert kept is not None and kept.fields["role"][0] == "admin"  # but nothing is lost
    assert kept.fields["role"][1] > kept.deleted  # type: ignore[operator]
    b.add_account("d", "alice", "again")
    exchange(a, b)
    assert a.get_account("alice") == b.get_account("alice") is not None


def test_domain_deleted_on_one_side_while_used_on_the_other(
    pair: tuple[Store, Store, Wall, Wall],
) -> None:
    a, b, wa, _wb = pair
    a.add_domain("site")
    exchange(a, b)
    wa.ms += 60_000  # the delete is the newest write of all
    a.delete_domain("site")
    _, secret = b.add_encoder("site", "cam-9")
    exchange(a, b)
    for s in (a, b):
        # The encoder keeps working, and its domain is listed with it.
        assert s.verify_encoder("cam-9", secret) is not None
        assert [d.name for d in s.list_domains()] == ["site"]
        assert [e.encoder_id for e in s.list_encoders("site")] == ["cam-9"]
        with pytest.raises(AlreadyExists):
            s.add_domain("site")
        with pytest.raises(NotEmpty):
            s.delete_domain("site")
    assert view(a) == view(b)
    a.delete_encoder("cam-9")
    exchange(a, b)
    assert a.list_domains() == b.list_domains() == []  # its own tombstone holds again
    b.add_domain("site")
    exchange(a, b)
    assert [d.name for d in a.list_domains()] == ["site"]


def test_records_arriving_before_their_domain(pair: tuple[Store, Store, Wall, Wall]) -> None:
    a, b, *_ = pair
    feed: list[Update] = []
    a.subscribe(feed.append)
    a.add_domain("d")
    _, secret = a.add_encoder("d", "cam")
    a.add_account("d", "alice", "pw")
    a.set_password("alice", "pw2")
    # The last writes first, one at a time: every prefix is a consistent store.
    for update in reversed(feed):
        assert b.apply_updates([update]) == 1
        members: list[Account | Encoder] = [*b.list_accounts(), *b.list_encoders()]
        assert all(x.domain in {d.name for d in b.list_domains()} for x in members)
    assert view(a) == view(b)
    assert a.digest() == b.digest()
    assert b.verify_encoder("cam", secret) is not None


def test_placeholder_domain_is_no_record(pair: tuple[Store, Store, Wall, Wall]) -> None:
    a, b, *_ = pair
    a.add_domain("d")
    a.add_account("d", "alice", "pw")
    account_only = [u for u in a.updates_for(a.digest().keys()) if u.table == "accounts"]
    b.apply_updates(account_only)
    assert ("domains", "d") not in b.digest()
    # Visible through its account, as a placeholder until its record arrives.
    assert [d.name for d in b.list_domains()] == ["d"]
    b.delete_account("alice")
    assert b.list_domains() == [] and b.get_domain("d") is None
    with pytest.raises(NotFound):
        b.add_account("d", "bob", "pw")
    exchange(a, b)
    assert view(a) == view(b)
    assert [d.name for d in b.list_domains()] == ["d"] and b.list_accounts() == []


def test_merges_are_idempotent_and_report_changes(pair: tuple[Store, Store, Wall, Wall]) -> None:
    a, b, *_ = pair
    merged: list[Update] = []
    local: list[Update] = []
    b.subscribe(merged.append, remote=True)
    b.subscribe(local.append)
    a.add_domain("d")
    a.add_account("d", "alice", "pw")
    updates = a.updates_for(a.digest().keys())
    assert b.apply_updates(updates) == 2
    assert b.apply_updates(updates) == 0
    assert b.apply_updates(list(reversed(updates)) * 2) == 0
    assert local == []  # merges are not local writes: not pushed back to peers
    assert sorted((u.table, u.key) for u in merged) == [("accounts", "alice"), ("domains", "d")]
    a.set_role("alice", "admin")
    b.apply_updates(a.updates_for(b.digest()))
    assert [(u.key, sorted(u.fields)) for u in merged[2:]] == [("alice", ["role", "updated"])]


def test_remote_stamps_are_observed(pair: tuple[Store, Store, Wall, Wall]) -> None:
    a, b, wa, _wb = pair
    wa.ms += 3_600_000  # a is an hour ahead
    a.add_domain("d")
    exchange(a, b)
    assert b.hlc.last > a.hlc.last and b.hlc.last.wall_ms >= wa.ms
    assert b.hlc.max_skew_seen_ms >= 3_600_000
    b.delete_domain("d")  # stamped after a's creation although b's clock is behind
    exchange(a, b)
    assert a.list_domains() == b.list_domains() == []


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (Update("nope", "k", {"x": (1, Stamp(1, 0, "a"))}), "unknown table"),
        (Update("domains", "d", {"colour": ("red", Stamp(1, 0, "a"))}), "unknown field"),
        (Update("domains", "d", {"created": (1.0, Stamp(1, 70_000, "a"))}), "bad stamp"),
        (Update("domains", "d", {"created": (1.0, Stamp(-1, 0, "a"))}), "bad stamp"),
        (Update("domains", "d", {"created": (1.0, Stamp(1, 0, ""))}), "bad stamp"),
        (Update("domains", "d", {"created": (1.0, Stamp(10**13, 0, "a"))}), "bad stamp"),
        (Update("domains", "d", {"created": (1.0, Stamp(1.5, 0, "a"))}), "bad stamp"),  # type: ignore[arg-type]
        (Update("domains", "d", {"created": (1.0, "0000000000001.00000.a")}), "bad stamp"),  # type: ignore[dict-item]
        (Update("domains", "d", {}, "0000000000001.00000.a"), "bad stamp"),  # type: ignore[arg-type]
        (Update("domains", "d", {"created": ("yesterday", Stamp(1, 0, "a"))}), "finite number"),
        (Update("domains", "d", {"created": (float("inf"), Stamp(1, 0, "a"))}), "finite number"),
        (Update("domains", "d", {"created": (1.0,)}), r"\(value, stamp\)"),  # type: ignore[dict-item]
        (Update("domains", "", {"created": (1.0, Stamp(1, 0, "a"))}), "bad key"),
        (Update("domains", 7, {"created": (1.0, Stamp(1, 0, "a"))}), "bad key"),  # type: ignore[arg-type]
        (Update("accounts", "x", {"role": ("root", Stamp(1, 0, "a"))}), "role"),
        (Update("accounts", "x", {"domain": (" d", Stamp(1, 0, "a"))}), "domain name"),
        (Update("accounts", "x", {"password_hash": ("", Stamp(1, 0, "a"))}), "1 to"),
        (Update("encoders", "bad id", {"name": ("n", Stamp(1, 0, "a"))}), "encoder id"),
        (Update("audit_log", "i", {"detail": ("\ud800", Stamp(1, 0, "a"))}), "surrogate"),
        (Update("settings", "k", {"value": ({1, 2}, Stamp(1, 0, "a"))}), "JSON"),
        (Update("join_tokens", "tok-0001", {"used": (1, Stamp(1, 0, "a"))}), "true or false"),
        (Update("join_tokens", "tok-0001", {"expires": (-1, Stamp(1, 0, "a"))}), "integer"),
        ("not an update", "not an Update"),
    ],
)
def test_malformed_updates_are_refused_whole(
    pair: tuple[Store, Store, Wall, Wall], update: Any, message: str
) -> None:
    a, b, *_ = pair
    a.add_domain("good")
    good = a.updates_for(a.digest())
    before = (b.digest(), b.hlc.last)
    with pytest.raises(BadUpdate, match=message):
        b.apply_updates([*good, update])
    assert (b.digest(), b.hlc.last) == before  # nothing of the batch was written
    assert b.list_domains() == []


def test_fingerprints_are_the_replica_module_s(pair: tuple[Store, Store, Wall, Wall]) -> None:
    a, *_ = pair
    a.add_domain("d")
    a.add_account("d", "alice", "pw")
    a.set_role("alice", "admin")
    a.add_encoder("d", "cam")
    a.delete_encoder("cam")
    digest = a.digest()
    assert set(digest) == {("domains", "d"), ("accounts", "alice"), ("encoders", "cam")}
    for update in a.updates_for(digest.keys()):
        record = Record(dict(update.fields))
        if update.deleted is not None:
            record.deleted = update.deleted
        assert digest[(update.table, update.key)] == record.fingerprint


def test_updates_for_keys_and_digests(pair: tuple[Store, Store, Wall, Wall]) -> None:
    a, b, *_ = pair
    a.add_domain("d")
    a.add_account("d", "alice", "pw")
    exchange(a, b)
    assert a.updates_for(b.digest()) == []
    a.set_role("alice", "admin")
    assert [u.key for u in a.updates_for(b.digest())] == ["alice"]
    assert [(u.table, u.key) for u in a.updates_for(
        [("accounts", "alice"), ("accounts", "nobody"), ("pools", "x")]
    )] == [("accounts", "alice")]
    with pytest.raises(StoreError):
        a.updates_for([("accounts",)])  # type: ignore[list-item]


# -- upgrading a standalone database ----------------------------------------------------


def make_old_database(path: Path) -> dict[str, Any]:
    """A database as the previous release wrote it (schema 2), with some rows."""
    with Store(path, migrations=MIGRATIONS[:2]) as old:
        assert old.schema_version == 2 == REPLICATED_SCHEMA_VERSION - 1
        conn = old._conn
        rows: dict[str, Any] = {
            "domains": [("uid-d1", "d1", 10.0, 11.0), ("uid-d2", "d2", 12.0, 12.0)],
            "accounts": [
                ("uid-a1", "alice", "uid-d1", fast_hash("pw-a"), "admin", 13.0, 14.0),
                ("uid-a2", "bob", "uid-d2", fast_hash("pw-b"), "viewer", 15.0, 15.0),
            ],
            "encoders": [("uid-e1", "cam-1", "Front door", "uid-d1",
                          hash_secret("secret-of-cam-one"), 16.0, 17.0)],
            "audit_log": [("audit-1", 18.0, "alice", "srv", "domain.create", "d1", "")],
        }
        for table, values in rows.items():
            marks = ", ".join("?" * len(values[0]))
            conn.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
    return rows


def test_a_standalone_database_upgrades_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    make_old_database(path)
    wall = Wall()
    with open_store(path, "srv-a", wall) as s:
        assert s.schema_version == SCHEMA_VERSION
        assert s.list_domains() == [Domain("uid-d1", "d1", 10.0, 11.0),
                                    Domain("uid-d2", "d2", 12.0, 12.0)]
        alice, bob = s.list_accounts()
        assert (alice.uid, alice.name, alice.domain, alice.role) == (
            "uid-a1", "alice", "d1", "admin")
        assert (bob.domain, bob.role, bob.created, bob.updated) == ("d2", "viewer", 15.0, 15.0)
        assert passwords.verify_password(alice.password_hash, "pw-a")
        assert s.verify_encoder("cam-1", "secret-of-cam-one") == Encoder(
            "uid-e1", "cam-1", "Front door", "d1", hash_secret("secret-of-cam-one"), 16.0, 17.0)
        assert [e.id for e in s.list_audit()] == ["audit-1"]
        # Every row is a record stamped, every field, with one stamp of this clock.
        digest = s.digest()
        assert len(digest) == 6
        records = s.updates_for(digest.keys())
        stamps = {stamp for u in records for _, stamp in u.fields.values()}
        assert stamps == {Stamp(wall.ms, 0, "srv-a")}
        assert all(u.deleted is None for u in records)
        assert {(u.table, len(u.fields)) for u in records} == {
            (t, len(TABLES[t].fields)) for t in ("domains", "accounts", "encoders", "audit_log")}
        # Later writes are stamped after the migration, and the old rules still hold.
        s.set_role("bob", "admin")
        with pytest.raises(NotEmpty):
            s.delete_domain("d1")
        with pytest.raises(sqlite3.IntegrityError):
            s._conn.execute("DELETE FROM domains")
        # A new, empty server receives all of it by anti-entropy.
        with open_store(tmp_path / "new.sqlite3", "srv-b", Wall(T0_MS + 1)) as fresh:
            exchange(s, fresh)
            assert view(fresh) == view(s)
            assert fresh.digest() == s.digest()
        final = (s.digest(), view(s))
    wall.ms += 1000
    with open_store(path, "srv-a", wall) as again:  # reopening stamps nothing again
        assert (again.digest(), view(again)) == final


# -- random interleavings on partitioned replicas ------------------------------------------

DOMAIN_NAMES = st.sampled_from(["d1", "d2"])
ACCOUNT_NAMES = st.sampled_from(["u1", "u2"])
ENCODER_IDS = st.sampled_from(["e1", "e2", "e3"])
OPS = [
    "add_domain", "delete_domain", "delete_domain", "add_account", "add_account",
    "delete_account", "set_password", "set_role", "add_encoder", "add_encoder",
    "delete_encoder", "set_encoder_name", "set_encoder_secret", "set_setting", "push", "sync",
    "create_pool", "update_pool", "delete_pool", "delete_pool", "set_encoder_pool",
    "set_encoder_pool", "set_domain_pool", "set_weight",
]
#: Pool changes racing each other and the deletion of what they refer to.
POOL_OPS = ["create_pool", "update_pool", "delete_pool", "delete_pool", "set_encoder_pool",
            "set_encoder_pool", "set_domain_pool", "set_weight", "add_encoder",
            "delete_encoder", "add_domain", "delete_domain", "push", "sync"]


def operations_from(ops: list[str]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(
        st.integers(0, 2),  # which store
        st.sampled_from(ops),
        DOMAIN_NAMES,
        ACCOUNT_NAMES,
        ENCODER_IDS,
        st.integers(-400, 400),  # that store's wall clock moves (also backwards)
        st.integers(0, 2),  # partner for push / sync
        st.booleans(),
    )


operation = operations_from(OPS)


def seed(s: Store) -> None:
    """A shared history before the partition: both domains, some accounts and encoders."""
    for domain in ("d1", "d2"):
        s.add_domain(domain)
    s.add_account("d1", "u1", "pw")
    s.create_pool("p1", ["s0", "s1"])
    s.create_pool("p2", ["s2"])  # unused: deleting it on one side races assigning it
    s.add_encoder("d1", "e1", pool="p1")
    s.add_encoder("d2", "e2")


def run(s: Store, op: str, domain: str, account: str, encoder: str, flag: bool, n: int) -> None:
    """One local write (refusals are fine: each store checks against what it sees)."""
    try:
        if op == "add_domain":
            s.add_domain(domain)
        elif op == "delete_domain":
            s.delete_domain(domain)
        elif op == "add_account":
            s.add_account(domain, account, f"pw{n}", "admin" if flag else "viewer")
        elif op == "delete_account":
            s.delete_account(account)
        elif op == "set_password":
            s.set_password(account, f"pw{n}")
        elif op == "set_role":
            s.set_role(account, "admin" if flag else "viewer")
        elif op == "add_encoder":
            s.add_encoder(domain, encoder, f"name {n}")
        elif op == "delete_encoder":
            s.delete_encoder(encoder)
        elif op == "set_encoder_name":
            s.set_encoder_name(encoder, f"renamed {n}")
        elif op == "set_encoder_secret":
            s.set_encoder_secret(encoder)
        elif op == "set_setting":
            s.set_setting("k", {"n": n, "flag": flag})
        elif op == "create_pool":
            s.create_pool("p1" if flag else "p2", [f"s{n % 3}"], f"made {n}")
        elif op == "update_pool":
            s.update_pool("p1" if flag else "p2", servers=[f"s{n % 3}", f"s{(n + 1) % 3}"])
        elif op == "delete_pool":
            s.delete_pool("p1" if flag else "p2")
        elif op == "set_encoder_pool":
            s.set_encoder_pool(encoder, None if n % 3 == 0 else "p1" if flag else "p2")
        elif op == "set_domain_pool":
            s.set_domain_pool(domain, None if n % 3 == 0 else "p1" if flag else "p2")
        elif op == "set_weight":
            s.set_server_weight(f"s{n % 3}", None if n % 4 == 0 else 0.5 + n % 5)
    except (AlreadyExists, NotFound, NotEmpty):
        pass


def expected_view(log: list[Update]) -> tuple[Any, ...]:
    """What the stores must list, from the replica module's merge and the visibility rules:
    domains, accounts, encoders, pools, server weights and each encoder's pool servers."""
    model = Replica(HybridClock("model", lambda: 0))
    model.merge_all(log)

    def complete(table: str) -> dict[str, dict[str, Any]]:
        out = {}
        for key, record in model.tables.get(table, {}).items():
            if all(f in record.fields and record.fields[f][1] > record.deleted
                   for f in TABLES[table].fields):
                out[key] = {f: value for f, (value, _) in record.fields.items()}
        return out

    accounts = complete("accounts")
    encoders = complete("encoders")
    domains = complete("domains")
    pools = complete("pools")
    used = {v["domain"] for v in [*accounts.values(), *encoders.values()]}
    live_domains = set(domains)
    for name in used - set(domains):
        fields = model.tables["domains"][name].fields
        # Listed through its accounts or encoders, not live: no pool of its own.
        domains[name] = {f: value for f, (value, _) in fields.items()} | {"pool": None}

    def servers(pool: str | None) -> frozenset[str] | None:
        return frozenset(pools[pool]["servers"]) if pool in pools else None

    effective = {}
    for k, v in encoders.items():
        inherited = domains[v["domain"]]["pool"] if v["domain"] in live_domains else None
        effective[k] = servers(v["pool"]) or servers(inherited) or frozenset()
    return (
        [Domain(v["uid"], k, v["created"], v["updated"], v["pool"])
         for k, v in sorted(domains.items())],
        [Account(v["uid"], k, v["domain"], v["role"], v["password_hash"], v["created"],
                 v["updated"]) for k, v in sorted(accounts.items())],
        [Encoder(v["uid"], k, v["name"], v["domain"], v["secret_hash"], v["created"],
                 v["updated"], v["pool"]) for k, v in sorted(encoders.items())],
        [Pool(k, tuple(v["servers"]), v["description"]) for k, v in sorted(pools.items())],
        {k: v["weight"] for k, v in sorted(complete("server_weights").items())},
        effective,
    )


@settings(max_examples=60, deadline=None)
@given(
    n_stores=st.sampled_from([2, 3]),
    seeding=st.sampled_from(["one side", "every side", "none"]),
    operations=st.lists(operation, min_size=25, max_size=60),
    rnd=st.randoms(use_true_random=False),
)
def test_partitioned_replicas_converge_and_lose_nothing(
    n_stores: int, seeding: str, operations: list[tuple[Any, ...]], rnd: random.Random
) -> None:
    check_partitioned_replicas(n_stores, seeding, operations, rnd)


@settings(max_examples=30, deadline=None)
@given(
    n_stores=st.sampled_from([2, 3]),
    seeding=st.sampled_from(["one side", "every side"]),
    operations=st.lists(operations_from(POOL_OPS), min_size=10, max_size=25),
    rnd=st.randoms(use_true_random=False),
)
def test_partitioned_pool_changes_converge(
    n_stores: int, seeding: str, operations: list[tuple[Any, ...]], rnd: random.Random
) -> None:
    check_partitioned_replicas(n_stores, seeding, operations, rnd)


def check_partitioned_replicas(
    n_stores: int, seeding: str, operations: list[tuple[Any, ...]], rnd: random.Random
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        walls = [Wall(T0_MS + 7_000 * i) for i in range(n_stores)]  # skewed clocks
        stores = [open_store(Path(tmp) / f"s{i}.sqlite3", f"n{i}", walls[i])
                  for i in range(n_stores)]
        log: list[Update] = []
        sent = [0] * n_stores  # how much of each store's feed was pushed
        feeds: list[list[Update]] = [[] for _ in stores]
        for i, s in enumerate(stores):
            s.subscribe(feeds[i].append)
            s.subscribe(log.append)
        try:
            if seeding == "one side":
                seed(stores[0])
                for other in stores[1:]:
                    exchange(stores[0], other)
            elif seeding == "every side":  # the same names created apart, merged at the heal
                for i, s in enumerate(stores):
                    walls[i].ms += 13
                    seed(s)
            for n, (who, op, domain, account, encoder, jitter, partner, flag) in enumerate(
                operations
            ):
                who, partner = who % n_stores, partner % n_stores
                walls[who].ms += jitter
                s = stores[who]
                if op == "push" and partner != who:
                    # The change feed reaching one peer; the others are cut off.
                    stores[partner].apply_updates(feeds[who][sent[who]:])
                    sent[who] = len(feeds[who])
                elif op == "sync" and partner != who:
                    stores[partner].apply_updates(s.updates_for(stores[partner].digest()))
                else:
                    run(s, op, domain, account, encoder, flag, n)
            # Heal: full anti-entropy between every pair.
            for i in range(n_stores):
                for j in range(i + 1, n_stores):
                    exchange(stores[i], stores[j])
            for i in range(n_stores):
                for j in range(i + 1, n_stores):
                    assert exchange(stores[i], stores[j]) == 0
            digests = [s.digest() for s in stores]
            views = [view(s) for s in stores]
            assert all(d == digests[0] for d in digests)
            assert all(v == views[0] for v in views)
            # The lists are what the replica semantics say they are.
            assert (*views[0][:3], *views[0][6:]) == expected_view(log)
            pool_names = {pool.name for pool in views[0][6]}
            if any(x.pool and x.pool not in pool_names for x in [*views[0][0], *views[0][2]]):
                event("a pool reference dangles")
            listed = {d.name for d in views[0][0]}
            assert all(x.domain in listed for x in [*views[0][1], *views[0][2]])
            # Nothing lost: every field holds its newest write; every newest tombstone is kept.
            newest: dict[tuple[str, str, str], tuple[Stamp, Any]] = {}
            tombs: dict[tuple[str, str], Stamp] = {}
            for u in log:
                for name, (value, stamp) in u.fields.items():
                    k = (u.table, u.key, name)
                    if k not in newest or stamp > newest[k][0]:
                        newest[k] = (stamp, value)
                if u.deleted is not None:
                    tombs[(u.table, u.key)] = max(u.deleted, tombs.get((u.table, u.key), u.deleted))
            held = {(u.table, u.key): u for u in stores[-1].updates_for(digests[0].keys())}
            for (table, key, name), (stamp, value) in newest.items():
                assert held[(table, key)].fields[name] == (value, stamp)
            for record_key, stamp in tombs.items():
                assert held[record_key].deleted == stamp
            # The same writes applied to a new replica in another order, twice, give the same.
            replay = log * 2
            rnd.shuffle(replay)
            with open_store(Path(tmp) / "replay.sqlite3", "r", Wall(0)) as other:
                for start in range(0, len(replay), 7):
                    other.apply_updates(replay[start:start + 7])
                assert other.digest() == digests[0]
                assert view(other) == views[0]
        finally:
            for s in stores:
                s.close()


# -- scale ----------------------------------------------------------------------------------


def _encoder_updates(s: Store, count: int) -> list[Update]:
    """``count`` encoder creations as ``s`` would stamp them (faster than add_encoder each)."""
    out = []
    for i in range(count):
        stamp = s.hlc.now()
        fields = {"uid": f"uid-{i}", "name": f"Camera {i}", "domain": "d",
                  "secret_hash": hash_secret(f"secret-number-{i:08d}"),
                  "created": 1.0 * i, "updated": 1.0 * i, "pool": None}
        out.append(Update("encoders", f"cam-{i:05d}", {k: (v, stamp) for k, v in fields.items()}))
    return out


def test_ten_thousand_encoders(pair: tuple[Store, Store, Wall, Wall],
                               capsys: pytest.CaptureFixture[str]) -> None:
    a, b, *_ = pair
    a.add_domain("d")
    a.apply_updates(_encoder_updates(a, 10_000))
    assert len(a.list_encoders()) == 10_000
    timings = {}

    started = time.perf_counter()
    digest_b = b.digest()
    to_b = a.updates_for(digest_b)
    timings["first: digest + updates_for (10,001 records)"] = time.perf_counter() - started
    started = time.perf_counter()
    assert b.apply_updates(to_b) == 10_001
    timings["first: apply_updates (10,001 records)"] = time.perf_counter() - started
    assert a.digest() == b.digest()

    # In sync but for a few records changed on each side: the usual meeting of two peers.
    for i in range(0, 10_000, 1000):
        a.set_encoder_name(f"cam-{i:05d}", "renamed on a")
        b.delete_encoder(f"cam-{i + 1:05d}")
    started = time.perf_counter()
    to_b = a.updates_for(b.digest())
    to_a = b.updates_for(a.digest())
    timings["in sync: digests + updates_for both ways"] = time.perf_counter() - started
    started = time.perf_counter()
    changed = b.apply_updates(to_b) + a.apply_updates(to_a)
    timings["in sync: apply both ways"] = time.perf_counter() - started
    assert (len(to_b), len(to_a), changed) == (20, 20, 20)
    assert a.digest() == b.digest()
    assert a.list_encoders() == b.list_encoders()
    assert len(a.list_encoders()) == 9_990
    with capsys.disabled():
        print()
        for what, seconds in timings.items():
            print(f"    {what}: {seconds * 1000:.0f} ms")
    # The usual exchange is well under a second even on a busy two-core machine; the
    # first full copy is bounded loosely (timings are reported above).
    assert timings["in sync: digests + updates_for both ways"] < 0.5
    assert sum(t for what, t in timings.items() if what.startswith("first")) < 5.0
