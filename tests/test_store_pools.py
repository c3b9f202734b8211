"""Server pools and capacity weights in the store: the API, replication, the upgrade to them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evserver.state.hlc import Stamp
from evserver.state.replica import Record, Update
from evserver.store import (
    DB_FILENAME,
    DOMAINS,
    MAX_POOL_SERVERS,
    MIGRATIONS,
    SCHEMA_VERSION,
    TABLES,
    AlreadyExists,
    BadUpdate,
    Domain,
    Encoder,
    Invalid,
    NotEmpty,
    NotFound,
    Pool,
    Store,
    StoreError,
    fingerprint,
    hash_secret,
    validate_pool_servers,
    validate_weight,
)
from tests import test_store_replication as replication
from tests.test_store_replication import T0_MS, Wall, exchange, open_store, record_of

S = ("srv-a", "srv-b", "srv-c")

#: Two stores (b's clock 5 s behind) and their clocks, as in the replication tests.
pair = replication.pair


@pytest.fixture
def store(pair: tuple[Store, Store, Wall, Wall]) -> Store:
    return pair[0]


def pool_view(s: Store) -> tuple[Any, ...]:
    return (s.list_pools(), s.server_weights(), s.encoder_pools(), s.list_domains(),
            s.list_encoders())


def field_of(e: StoreError) -> str | None:
    return e.field


# -- the local API --------------------------------------------------------------------


def test_pools_create_read_update_delete(store: Store) -> None:
    pool = store.create_pool("east", ["srv-b", "srv-a"], "the eastern site")
    assert pool == Pool("east", ("srv-b", "srv-a"), "the eastern site")  # order kept
    assert store.get_pool("east") == pool
    store.create_pool("west", ("srv-c",))
    assert [p.name for p in store.list_pools()] == ["east", "west"]
    assert store.get_pool("west") == Pool("west", ("srv-c",), "")
    assert store.update_pool("east", servers=["srv-c"]) == Pool("east", ("srv-c",),
                                                                "the eastern site")
    assert store.update_pool("east", description="") == Pool("east", ("srv-c",), "")
    assert store.update_pool("east") == Pool("east", ("srv-c",), "")  # nothing to change
    store.delete_pool("west")
    assert store.get_pool("west") is None and [p.name for p in store.list_pools()] == ["east"]
    with pytest.raises(NotFound, match="no pool named 'west'"):
        store.delete_pool("west")
    with pytest.raises(NotFound, match="no pool named 'west'"):
        store.update_pool("west", servers=["srv-a"])
    again = store.create_pool("west", ["srv-a"])  # a deleted name may be used again
    assert store.get_pool("west") == again


@pytest.mark.parametrize(("call", "error", "field", "message"), [
    (lambda s: s.create_pool("", ["srv-a"]), Invalid, "name", "pool name must be 1 to 64"),
    (lambda s: s.create_pool(" x", ["srv-a"]), Invalid, "name", "leading or trailing"),
    (lambda s: s.create_pool("x" * 65, ["srv-a"]), Invalid, "name", "1 to 64"),
    (lambda s: s.create_pool("p", []), Invalid, "servers", "1 to 64 servers, not 0"),
    (lambda s: s.create_pool("p", "srv-a"), Invalid, "servers", "must be a list"),
    (lambda s: s.create_pool("p", ["srv-a", "srv-a"]), Invalid, "servers", "listed twice"),
    (lambda s: s.create_pool("p", ["bad id"]), Invalid, "servers", "server id 'bad id'"),
    (lambda s: s.create_pool("p", [7]), Invalid, "servers", "server id 7"),
    (lambda s: s.create_pool("p", [f"s{i}" for i in range(MAX_POOL_SERVERS + 1)]), Invalid,
     "servers", "1 to 64 servers"),
    (lambda s: s.create_pool("p", ["srv-a"], "two\nlines"), Invalid, "description",
     "non-printable"),
    (lambda s: s.create_pool("p", ["srv-a"], "x" * 257), Invalid, "description", "at most 256"),
    (lambda s: s.create_pool("p", ["srv-a"], 5), Invalid, "description", "must be text"),
    (lambda s: s.create_pool("taken", ["srv-a"]), AlreadyExists, "name", "exists already"),
    (lambda s: s.update_pool("taken", servers=[]), Invalid, "servers", "not 0"),
    (lambda s: s.set_encoder_pool("cam", "nope"), NotFound, "pool", "no pool named 'nope'"),
    (lambda s: s.set_encoder_pool("cam", " nope"), Invalid, "pool", "pool name"),
    (lambda s: s.set_encoder_pool("cam", 3), Invalid, "pool", "pool name must be text"),
    (lambda s: s.set_domain_pool("d", "nope"), NotFound, "pool", "no pool named"),
    (lambda s: s.add_encoder("d", "cam-2", pool="nope"), NotFound, "pool", "no pool named"),
    (lambda s: s.add_domain("e", pool="nope"), NotFound, "pool", "no pool named"),
    (lambda s: s.set_server_weight("srv-a", 0), Invalid, "weight", "greater than 0"),
    (lambda s: s.set_server_weight("srv-a", -1.5), Invalid, "weight", "greater than 0"),
    (lambda s: s.set_server_weight("srv-a", 1000.5), Invalid, "weight", "at most 1000"),
    (lambda s: s.set_server_weight("srv-a", math.nan), Invalid, "weight", "nan"),
    (lambda s: s.set_server_weight("srv-a", math.inf), Invalid, "weight", "inf"),
    (lambda s: s.set_server_weight("srv-a", 10**400), Invalid, "weight", "at most"),
    (lambda s: s.set_server_weight("srv-a", True), Invalid, "weight", "True"),
    (lambda s: s.set_server_weight("srv-a", "2"), Invalid, "weight", "'2'"),
    (lambda s: s.set_server_weight("no/such", 2), Invalid, "server_id", "server id"),
    (lambda s: s.set_encoder_pool("nobody", None), NotFound, None, "no encoder with id"),
    (lambda s: s.set_domain_pool("nowhere", None), NotFound, None, "no domain named"),
])
def test_refusals_name_their_field_and_change_nothing(
    store: Store, call: Any, error: type[StoreError], field: str | None, message: str
) -> None:
    store.add_domain("d")
    store.add_encoder("d", "cam")
    store.create_pool("taken", ["srv-a"])
    before = (pool_view(store), store.digest())
    with pytest.raises(error, match=message) as info:
        call(store)
    assert field_of(info.value) == field
    assert (pool_view(store), store.digest()) == before


def test_assigning_pools_and_the_effective_servers(store: Store) -> None:
    store.create_pool("east", ["srv-a", "srv-b"])
    store.create_pool("west", ["srv-c"])
    store.add_domain("d1", pool="east")
    store.add_domain("d2")
    store.add_encoder("d1", "cam-1")
    store.add_encoder("d1", "cam-2", pool="west")
    store.add_encoder("d2", "cam-3")
    assert store.get_domain("d1").pool == "east"  # type: ignore[union-attr]
    assert store.get_encoder("cam-2").pool == "west"  # type: ignore[union-attr]
    assert store.encoder_pools() == {"cam-1": frozenset({"srv-a", "srv-b"}),
                                     "cam-2": frozenset({"srv-c"}),
                                     "cam-3": frozenset()}
    updated = store.set_encoder_pool("cam-3", "east")
    assert updated.pool == "east" and updated.updated >= updated.created
    assert store.set_domain_pool("d1", None).pool is None
    assert store.encoder_pools() == {"cam-1": frozenset(), "cam-2": frozenset({"srv-c"}),
                                     "cam-3": frozenset({"srv-a", "srv-b"})}
    assert store.set_encoder_pool("cam-2", None).pool is None
    store.set_domain_pool("d1", "west")
    assert store.encoder_pools()["cam-2"] == frozenset({"srv-c"})  # now through its domain
    store.update_pool("west", servers=["srv-b", "srv-c"])
    assert store.encoder_pools()["cam-1"] == frozenset({"srv-b", "srv-c"})
    assert store.pool_users("west") == ([], ["d1"])
    assert store.pool_users("east") == (["cam-3"], [])
    # A deleted encoder no longer counts.
    store.delete_encoder("cam-3")
    assert "cam-3" not in store.encoder_pools()
    assert store.pool_users("east") == ([], [])


def test_a_pool_in_use_cannot_be_deleted(store: Store) -> None:
    store.create_pool("p", ["srv-a"])
    store.add_domain("d", pool="p")
    for i in range(7):
        store.add_encoder("d", f"cam-{i}", pool="p")
    with pytest.raises(NotEmpty) as info:
        store.delete_pool("p")
    assert str(info.value) == (
        "pool 'p' is still assigned to encoder(s) 'cam-0', 'cam-1', 'cam-2', 'cam-3', "
        "'cam-4' and 2 more and domain(s) 'd': assign them another pool or none first")
    for i in range(7):
        store.set_encoder_pool(f"cam-{i}", None)
    with pytest.raises(NotEmpty, match=r"domain\(s\) 'd': assign"):
        store.delete_pool("p")
    store.set_domain_pool("d", None)
    store.delete_pool("p")
    assert store.list_pools() == []


def test_server_weights(store: Store) -> None:
    assert store.server_weights() == {}
    store.set_server_weight("srv-a", 2)
    store.set_server_weight("srv-b", 0.5)
    assert store.server_weights() == {"srv-a": 2.0, "srv-b": 0.5}
    assert all(type(w) is float for w in store.server_weights().values())
    store.set_server_weight("srv-a", 3.25)
    store.set_server_weight("srv-b", None)  # back to the default
    store.set_server_weight("srv-c", None)  # had none: nothing to do
    assert store.server_weights() == {"srv-a": 3.25}
    assert record_of(store, "server_weights", "srv-c") is None
    store.set_server_weight("srv-b", 1000)
    assert store.server_weights()["srv-b"] == 1000.0


def test_the_change_feed_of_pool_writes(store: Store) -> None:
    feed: list[Update] = []
    store.subscribe(feed.append)
    store.create_pool("p", ["srv-a", "srv-b"], "desc")
    store.update_pool("p", servers=["srv-c"])
    store.add_domain("d")
    store.add_encoder("d", "cam")
    store.set_encoder_pool("cam", "p")
    store.set_domain_pool("d", "p")
    store.set_server_weight("srv-a", 2.5)
    store.set_server_weight("srv-a", None)
    store.set_encoder_pool("cam", None)
    store.set_domain_pool("d", None)
    store.delete_pool("p")
    got = [(u.table, u.key, {k: v for k, (v, _) in u.fields.items()}, u.deleted is not None)
           for u in feed]
    assert [g for g in got if g[0] != "encoders" or g[2].get("pool") or "uid" not in g[2]] == [
        ("pools", "p", {"servers": ["srv-a", "srv-b"], "description": "desc"}, False),
        ("pools", "p", {"servers": ["srv-c"]}, False),
        ("domains", "d", {"uid": got[2][2]["uid"], "created": got[2][2]["created"],
                          "updated": got[2][2]["updated"], "pool": None}, False),
        ("encoders", "cam", {"pool": "p", "updated": got[4][2]["updated"]}, False),
        ("domains", "d", {"pool": "p", "updated": got[5][2]["updated"]}, False),
        ("server_weights", "srv-a", {"weight": 2.5}, False),
        ("server_weights", "srv-a", {}, True),
        ("encoders", "cam", {"pool": None, "updated": got[8][2]["updated"]}, False),
        ("domains", "d", {"pool": None, "updated": got[9][2]["updated"]}, False),
        ("pools", "p", {}, True),
    ]
    assert got[3][2]["pool"] is None  # the encoder's creation writes "no pool"
    for u in feed:  # JSON values, as peers need them
        json.dumps({k: v for k, (v, _) in u.fields.items()})


# -- replication ----------------------------------------------------------------------


def test_pools_and_weights_replicate(pair: tuple[Store, Store, Wall, Wall]) -> None:
    a, b, *_ = pair
    a.create_pool("p", ["srv-a", "srv-b"], "first")
    a.add_domain("d", pool="p")
    a.add_encoder("d", "cam")
    a.set_server_weight("srv-a", 4)
    assert exchange(a, b) == 4
    assert pool_view(a) == pool_view(b)
    assert b.encoder_pools() == {"cam": frozenset({"srv-a", "srv-b"})}
    assert b.server_weights() == {"srv-a": 4.0}
    assert a.digest() == b.digest() and exchange(a, b) == 0
    # Fingerprints are the replica module's, for the new tables too.
    for update in a.updates_for(a.digest().keys()):
        record = Record(dict(update.fields))
        if update.deleted is not None:
            record.deleted = update.deleted
        assert a.digest()[(update.table, update.key)] == record.fingerprint


def test_concurrent_edits_of_a_pool_merge_per_field(pair: tuple[Store, Store, Wall, Wall]
                                                    ) -> None:
    a, b, _wa, wb = pair
    a.create_pool("p", ["srv-a"], "old")
    exchange(a, b)
    a.update_pool("p", description="from a")
    b.update_pool("p", servers=["srv-b", "srv-c"])
    exchange(a, b)
    for s in (a, b):
        assert s.get_pool("p") == Pool("p", ("srv-b", "srv-c"), "from a")
    # The same field on both sides: the later write wins everywhere.
    a.update_pool("p", servers=["srv-a"])
    wb.ms += 60_000
    b.update_pool("p", servers=["srv-c"])
    exchange(a, b)
    assert a.get_pool("p") == b.get_pool("p") == Pool("p", ("srv-c",), "from a")
    assert a.digest() == b.digest()


def test_the_same_pool_created_on_both_sides_merges(pair: tuple[Store, Store, Wall, Wall]
                                                    ) -> None:
    a, b, _wa, wb = pair
    a.create_pool("p", ["srv-a"], "a's")
    wb.ms += 20_000
    b.create_pool("p", ["srv-b"], "b's")
    a.set_server_weight("srv-a", 2)
    b.set_server_weight("srv-a", 3)  # later
    exchange(a, b)
    assert a.list_pools() == b.list_pools() == [Pool("p", ("srv-b",), "b's")]
    assert a.server_weights() == b.server_weights() == {"srv-a": 3.0}


def test_pool_delete_wins_over_an_older_update_and_loses_to_a_newer_one(
    pair: tuple[Store, Store, Wall, Wall],
) -> None:
    a, b, wa, wb = pair
    a.create_pool("p", ["srv-a"], "d")
    a.create_pool("q", ["srv-a"], "d")
    exchange(a, b)
    # p: the update is older than the delete: the pool is gone.
    b.update_pool("p", servers=["srv-b"])
    wa.ms += 10_000
    a.delete_pool("p")
    # q: the update is newer than the delete: kept, but hidden (a lone field does not
    # bring back half a pool) until the pool is created again.
    a.delete_pool("q")
    wb.ms += 60_000
    b.update_pool("q", servers=["srv-c"])
    exchange(a, b)
    for s in (a, b):
        assert s.list_pools() == []
    kept = record_of(a, "pools", "q")
    assert kept is not None and kept.fields["servers"][0] == ["srv-c"]
    assert kept.deleted is not None and kept.fields["servers"][1] > kept.deleted
    assert a.digest() == b.digest()
    b.create_pool("q", ["srv-a", "srv-b"])
    exchange(a, b)
    assert a.get_pool("q") == b.get_pool("q") == Pool("q", ("srv-a", "srv-b"), "")


def test_weight_reset_and_set_concurrently(pair: tuple[Store, Store, Wall, Wall]) -> None:
    a, b, wa, wb = pair
    a.set_server_weight("srv-a", 2)
    a.set_server_weight("srv-b", 2)
    exchange(a, b)
    a.set_server_weight("srv-a", None)  # reset, older
    wb.ms += 60_000
    b.set_server_weight("srv-a", 5)  # newer than the reset: it holds
    b.set_server_weight("srv-b", 7)
    wa.ms += 120_000
    a.set_server_weight("srv-b", None)  # newer than b's set: back to the default
    exchange(a, b)
    assert a.server_weights() == b.server_weights() == {"srv-a": 5.0}
    tomb = record_of(a, "server_weights", "srv-b")
    assert tomb is not None and tomb.deleted is not None  # a tombstone, replicated
    assert a.digest() == b.digest()


def test_pool_deleted_on_one_side_while_assigned_on_the_other(
    pair: tuple[Store, Store, Wall, Wall],
) -> None:
    a, b, *_ = pair
    a.create_pool("p", ["srv-a"])
    a.create_pool("fallback", ["srv-c"])
    a.add_domain("d", pool="fallback")
    a.add_encoder("d", "cam")
    exchange(a, b)
    a.delete_pool("p")  # nothing uses it here
    b.set_encoder_pool("cam", "p")  # meanwhile, on the other side
    exchange(a, b)
    for s in (a, b):
        # The reference dangles: kept (and shown), but counts as no pool.
        assert s.get_encoder("cam").pool == "p"  # type: ignore[union-attr]
        assert s.get_pool("p") is None
        assert s.encoder_pools() == {"cam": frozenset({"srv-c"})}  # the domain's
        assert s.pool_users("p") == (["cam"], [])
    assert a.digest() == b.digest()
    # The name is free to use again, and the reference comes back to life.
    b.create_pool("p", ["srv-b"])
    exchange(a, b)
    assert a.encoder_pools() == b.encoder_pools() == {"cam": frozenset({"srv-b"})}
    with pytest.raises(NotEmpty):
        a.delete_pool("p")


def test_references_arriving_before_their_pool(pair: tuple[Store, Store, Wall, Wall]) -> None:
    a, b, *_ = pair
    feed: list[Update] = []
    a.subscribe(feed.append)
    a.create_pool("p", ["srv-a", "srv-b"])
    a.create_pool("q", ["srv-c"])
    a.add_domain("d", pool="q")
    a.add_encoder("d", "cam-1", pool="p")
    a.add_encoder("d", "cam-2")
    a.set_server_weight("srv-a", 3)
    # The last writes first, one at a time: every prefix is a consistent store.
    for update in reversed(feed):
        assert b.apply_updates([update]) == 1
        pools = {p.name: frozenset(p.servers) for p in b.list_pools()}
        domains = {d.name: d.pool for d in b.list_domains()}
        for encoder in b.list_encoders():
            want = pools.get(encoder.pool or "") or pools.get(domains.get(encoder.domain) or "")
            assert b.encoder_pools()[encoder.encoder_id] == (want or frozenset())
    assert pool_view(a) == pool_view(b)
    assert a.digest() == b.digest()


def test_a_domain_deleted_elsewhere_is_created_again_by_giving_it_a_pool(
    pair: tuple[Store, Store, Wall, Wall],
) -> None:
    a, b, wa, _wb = pair
    a.create_pool("p", ["srv-a"])
    a.add_domain("site", pool="p")
    exchange(a, b)
    wa.ms += 60_000
    a.delete_domain("site")  # the newest write of all (its pool goes with it)
    b.add_encoder("site", "cam")  # meanwhile, on the other side
    exchange(a, b)
    for s in (a, b):
        # Listed through its encoder, but deleted: its pool does not count.
        assert s.get_domain("site").pool is None  # type: ignore[union-attr]
        assert s.encoder_pools() == {"cam": frozenset()}
    domain = b.set_domain_pool("site", "p")
    assert domain.pool == "p"
    exchange(a, b)
    assert a.get_domain("site") == b.get_domain("site") == domain
    assert a.encoder_pools() == {"cam": frozenset({"srv-a"})}
    b.delete_encoder("cam")
    exchange(a, b)
    assert [d.name for d in a.list_domains()] == ["site"]  # live again, not a leftover


@pytest.mark.parametrize(("update", "message"), [
    (Update("pools", "p", {"servers": ("srv-a", Stamp(1, 0, "a"))}), "must be a list"),
    (Update("pools", "p", {"servers": ([], Stamp(1, 0, "a"))}), "not 0"),
    (Update("pools", "p", {"servers": (["a", "a"], Stamp(1, 0, "a"))}), "twice"),
    (Update("pools", "p", {"servers": (["a b"], Stamp(1, 0, "a"))}), "server id"),
    (Update("pools", "p", {"servers": ([None], Stamp(1, 0, "a"))}), "server id"),
    (Update("pools", "p", {"description": (None, Stamp(1, 0, "a"))}), "must be text"),
    (Update("pools", "p", {"description": ("a\x00", Stamp(1, 0, "a"))}), "non-printable"),
    (Update("pools", " p", {"description": ("", Stamp(1, 0, "a"))}), "bad key"),
    (Update("pools", "p", {"colour": ("red", Stamp(1, 0, "a"))}), "unknown field"),
    (Update("server_weights", "srv-a", {"weight": (0, Stamp(1, 0, "a"))}), "greater than 0"),
    (Update("server_weights", "srv-a", {"weight": (True, Stamp(1, 0, "a"))}), "weight"),
    (Update("server_weights", "srv-a", {"weight": (10**400, Stamp(1, 0, "a"))}), "weight"),
    (Update("server_weights", "srv-a", {"weight": (math.nan, Stamp(1, 0, "a"))}), "weight"),
    (Update("server_weights", "bad id", {"weight": (1, Stamp(1, 0, "a"))}), "bad key"),
    (Update("encoders", "cam", {"pool": (" p", Stamp(1, 0, "a"))}), "pool name"),
    (Update("encoders", "cam", {"pool": (7, Stamp(1, 0, "a"))}), "pool name"),
    (Update("domains", "d", {"pool": ("", Stamp(1, 0, "a"))}), "pool name"),
    (Update("domains", "d", {"created": (10**400, Stamp(1, 0, "a"))}), "finite number"),
])
def test_malformed_pool_updates_are_refused_whole(
    pair: tuple[Store, Store, Wall, Wall], update: Update, message: str
) -> None:
    a, b, *_ = pair
    a.create_pool("good", ["srv-a"])
    good = a.updates_for(a.digest())
    before = (b.digest(), b.hlc.last)
    with pytest.raises(BadUpdate, match=message):
        b.apply_updates([*good, update])
    assert (b.digest(), b.hlc.last) == before
    assert b.list_pools() == []


def test_a_tombstone_arriving_alone_makes_no_visible_record(
    pair: tuple[Store, Store, Wall, Wall],
) -> None:
    a, b, *_ = pair
    for table, key in (("pools", "p"), ("server_weights", "srv-a")):
        assert b.apply_updates([Update(table, key, {}, Stamp(T0_MS, 0, "a"))]) == 1
    assert b.list_pools() == [] and b.server_weights() == {}
    assert {k for k in b.digest()} == {("pools", "p"), ("server_weights", "srv-a")}
    exchange(a, b)
    assert a.digest() == b.digest()
    a.create_pool("p", ["srv-a"])  # later than the tombstone
    a.set_server_weight("srv-a", 2)
    exchange(a, b)
    assert b.list_pools() == [Pool("p", ("srv-a",), "")] and b.server_weights() == {"srv-a": 2}


# -- Hypothesis: arbitrary input is stored exactly or refused with its field ---------------

server_ids = st.one_of(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
                       st.sampled_from(list(S)), st.text(max_size=70), st.integers())


@settings(max_examples=200, deadline=None)
@given(servers=st.one_of(st.lists(server_ids, max_size=5), st.lists(st.sampled_from(S)),
                         st.text(max_size=5), st.none(), st.integers()),
       weight=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                        st.floats(0.001, 1000), st.booleans(), st.text(max_size=3)))
def test_pool_servers_and_weights_are_exact_or_refused(tmp_path_factory: Any, servers: Any,
                                                       weight: Any) -> None:
    path = tmp_path_factory.mktemp("h") / DB_FILENAME
    with open_store(path, "a", Wall()) as s:
        good_servers = (isinstance(servers, list) and 1 <= len(servers) <= MAX_POOL_SERVERS
                        and len(set(map(str, servers))) == len(servers)
                        and all(isinstance(x, str) and x and len(x) <= 64
                                and all(c.isascii() and (c.isalnum() or c in "._-") for c in x)
                                for x in servers))
        try:
            pool = s.create_pool("p", servers)
        except Invalid as e:
            assert not good_servers and e.field == "servers", servers
            assert s.list_pools() == []
            with pytest.raises(Invalid):
                validate_pool_servers(servers)
        else:
            assert good_servers, servers
            assert pool.servers == tuple(servers) and s.list_pools() == [pool]
        good_weight = (type(weight) in (int, float) and 0 < weight <= 1000)
        try:
            s.set_server_weight("srv-a", weight)
        except Invalid as e:
            assert not good_weight and e.field == "weight", weight
            assert s.server_weights() == {}
        else:
            assert good_weight, weight
            assert s.server_weights() == {"srv-a": validate_weight(weight)} == {
                "srv-a": float(weight)}


# -- upgrading a database of the previous schema (3) ----------------------------------------


V3_FIELDS = {"domains": ("uid", "created", "updated"),
             "encoders": ("uid", "name", "domain", "secret_hash", "created", "updated"),
             "settings": ("value",)}


def _stamped(table: str, fields: dict[str, str], deleted: str | None = None) -> dict[str, Any]:
    """The replication columns of a v3 row whose fields carry the given stamp texts
    (live: every field of the v3 table written after the tombstone)."""
    live = int(all(f in fields and fields[f] > (deleted or "") for f in V3_FIELDS[table]))
    return {"stamps": json.dumps(fields), "deleted": deleted, "live": live,
            "fp": fingerprint(fields, deleted) if fields or deleted else None}


def _text(ms: int, node: str = "old") -> str:
    return Stamp(ms, 0, node).encode()


ENCODER_FIELDS = ("uid", "name", "domain", "secret_hash", "created", "updated")
T1, T2, T3 = T0_MS - 50_000, T0_MS - 40_000, T0_MS - 30_000


def make_v3_database(path: Path) -> None:
    """A database as the previous release left it (schema 3, replicated), written by hand:
    live records, a tombstone, a record deleted and created again, a partial record (a
    lone field update that raced a delete), and a placeholder domain."""
    with Store(path, migrations=MIGRATIONS[:3]) as old:
        assert old.schema_version == 3 == SCHEMA_VERSION - 1
        conn = old._conn

        def insert(table: str, values: dict[str, Any]) -> None:
            conn.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES "
                         f"({', '.join('?' * len(values))})", list(values.values()))

        for name, uid, stamp in (("d1", "uid-d1", T1), ("d2", "uid-d2", T2)):
            insert("domains", {"uid": uid, "name": name, "created": 1.0, "updated": 2.0,
                               **_stamped("domains", {f: _text(stamp) for f in (
                                   "uid", "created", "updated")})})
        insert("domains", {"uid": "uid-d3", "name": "gone", "created": 1.0, "updated": 1.0,
                           **_stamped("domains", {f: _text(T1) for f in (
                               "uid", "created", "updated")}, _text(T2))})
        insert("domains", {"uid": DOMAINS.fields["uid"].placeholder("early"), "name": "early",
                           "created": 0, "updated": 0,
                           **_stamped("domains", {})})  # placeholder: its record has not arrived
        encoders = [
            ("cam-1", "d1", {f: _text(T1) for f in ENCODER_FIELDS}, None),
            # Re-created after a delete, then renamed.
            ("cam-2", "d2", {**{f: _text(T3) for f in ENCODER_FIELDS}, "name": _text(T3 + 5)},
             _text(T2)),
            ("cam-dead", "d1", {f: _text(T1) for f in ENCODER_FIELDS}, _text(T2)),
            ("cam-early", "early", {f: _text(T2, "other") for f in ENCODER_FIELDS}, None),
        ]
        for encoder_id, domain, stamps, deleted in encoders:
            insert("encoders", {"uid": f"uid-{encoder_id}", "encoder_id": encoder_id,
                                "name": encoder_id.upper(), "domain": domain,
                                "secret_hash": hash_secret(f"secret-of-{encoder_id}"),
                                "created": 3.0, "updated": 4.0,
                                **_stamped("encoders", stamps, deleted)})
        insert("encoders", {"uid": "placeholder", "encoder_id": "cam-partial", "name": "Lone",
                            "domain": None, "secret_hash": "", "created": 0, "updated": 0,
                            **_stamped("encoders", {"name": _text(T3)}, _text(T2))})
        insert("settings", {"key": "motd", "value": '"hello"',
                            **_stamped("settings", {"value": _text(T1)})})


def test_a_v3_database_upgrades_keeping_its_data_and_liveness(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    make_v3_database(path)
    wall = Wall(T0_MS + 1_000_000)
    with open_store(path, "srv-a", wall) as s:
        assert s.schema_version == SCHEMA_VERSION == 4
        assert s.list_domains() == [Domain("uid-d1", "d1", 1.0, 2.0),
                                    Domain("uid-d2", "d2", 1.0, 2.0),
                                    Domain(DOMAINS.fields["uid"].placeholder("early"), "early",
                                           0.0, 0.0)]
        assert [(e.encoder_id, e.name, e.domain, e.pool) for e in s.list_encoders()] == [
            ("cam-1", "CAM-1", "d1", None), ("cam-2", "CAM-2", "d2", None),
            ("cam-early", "CAM-EARLY", "early", None)]
        assert s.verify_encoder("cam-2", "secret-of-cam-2") == Encoder(
            "uid-cam-2", "cam-2", "CAM-2", "d2", hash_secret("secret-of-cam-2"), 3.0, 4.0)
        assert s.get_encoder("cam-dead") is None and s.get_encoder("cam-partial") is None
        assert s.get_domain("gone") is None
        assert s.get_setting("motd") == "hello"
        assert s.list_pools() == [] and s.server_weights() == {}
        assert s.encoder_pools() == {e: frozenset() for e in ("cam-1", "cam-2", "cam-early")}
        # The new field is stamped with the uid's stamp: records (dead ones too) are
        # complete as before, and nothing was stamped by this server's clock.
        records = {(u.table, u.key): u for u in s.updates_for(s.digest().keys())}
        assert set(records) == {("domains", "d1"), ("domains", "d2"), ("domains", "gone"),
                                ("encoders", "cam-1"), ("encoders", "cam-2"),
                                ("encoders", "cam-dead"), ("encoders", "cam-early"),
                                ("encoders", "cam-partial"), ("settings", "motd")}
        for (table, key), u in records.items():
            if table in ("domains", "encoders") and key != "cam-partial":
                assert set(u.fields) == set(TABLES[table].fields), key
                assert u.fields["pool"] == (None, u.fields["uid"][1]), key
            assert all(stamp.node != "srv_a" and stamp.node != "srv-a"
                       for _, stamp in u.fields.values())
        assert set(records[("encoders", "cam-partial")].fields) == {"name"}
        # The digest is what the replica module computes for those records.
        digest = s.digest()
        for record_key, u in records.items():
            record = Record(dict(u.fields))
            if u.deleted is not None:
                record.deleted = u.deleted
            assert digest[record_key] == record.fingerprint
        # The new features work on the upgraded data, and the old rules still hold.
        s.create_pool("p", ["srv-a"])
        s.set_encoder_pool("cam-1", "p")
        s.set_domain_pool("d2", "p")
        assert s.encoder_pools()["cam-2"] == frozenset({"srv-a"})
        with pytest.raises(NotEmpty):
            s.delete_domain("d1")
        final = (s.digest(), pool_view(s))
    with open_store(path, "srv-a", wall) as again:  # reopening changes nothing
        assert (again.digest(), pool_view(again)) == final


def test_replicas_upgraded_apart_agree_without_exchanging_anything(tmp_path: Path) -> None:
    make_v3_database(tmp_path / "a.sqlite3")
    make_v3_database(tmp_path / "b.sqlite3")
    with (open_store(tmp_path / "a.sqlite3", "srv-a", Wall(T0_MS + 10)) as a,
          open_store(tmp_path / "b.sqlite3", "srv-b", Wall(T0_MS + 99_999)) as b):
        assert a.digest() == b.digest()
        assert a.updates_for(b.digest()) == [] and exchange(a, b) == 0
        # A new server that never had schema 3 receives everything by anti-entropy.
        with open_store(tmp_path / "new.sqlite3", "srv-c", Wall(T0_MS)) as c:
            exchange(a, c)
            assert c.digest() == a.digest() and pool_view(c) == pool_view(a)
