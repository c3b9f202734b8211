"""evserver-ctl pool ... and server ...: server pools and capacity weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evserver.state.hlc import Stamp
from evserver.state.replica import Update
from evserver.store import Store
from tests.test_ctl import fails, ok, run


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


def own_id(data: Path) -> str:
    return (data / "server-id").read_text().strip()


def cluster_of_three(data: Path) -> str:
    """A data directory whose cluster has two other members (and a removed one)."""
    ok(data, "domain", "add", "d")
    (data / "cluster").mkdir()
    members = [
        {"server_id": "srv-b", "incarnation": 1, "address": {"host": "192.0.2.2"}},
        {"server_id": "srv-c", "incarnation": 1, "address": {"host": "192.0.2.3"}},
        {"server_id": "srv-gone", "removed": True},
    ]
    (data / "cluster" / "members.json").write_text(json.dumps(members))
    return own_id(data)


def test_pool_create_list_set_delete(data: Path) -> None:
    me = cluster_of_three(data)
    out = ok(data, "pool", "create", "east", "--servers", f"srv-c, {me}",
             "--description", "East <site>")
    assert out == f"pool 'east' created: srv-c, {me}\n"
    ok(data, "pool", "create", "west", "--servers", "srv-b")
    lines = ok(data, "pool", "list").splitlines()
    assert lines[0].split() == ["NAME", "SERVERS", "ENCODERS", "DOMAINS", "DESCRIPTION"]
    assert lines[1].split() == ["east", f"srv-c,{me}", "0", "0", "East", "<site>"]
    assert lines[2].split() == ["west", "srv-b", "0", "0"]
    assert ok(data, "pool", "set", "west", "--servers", "srv-b,srv-c") == (
        "pool 'west' changed: srv-b, srv-c\n")
    ok(data, "pool", "set", "east", "--description", "")
    records = json.loads(ok(data, "pool", "list", "--json"))
    assert records == [
        {"name": "east", "servers": ["srv-c", me], "description": "", "encoders": [],
         "domains": []},
        {"name": "west", "servers": ["srv-b", "srv-c"], "description": "", "encoders": [],
         "domains": []},
    ]
    assert ok(data, "pool", "delete", "west") == "pool 'west' deleted\n"
    fails(data, "pool", "delete", "west", match="no pool named 'west'")
    fails(data, "pool", "set", "west", "--servers", "srv-b", match="no pool named 'west'")
    with Store.in_data_dir(data) as store:
        assert [p.name for p in store.list_pools()] == ["east"]
        # The changes are replicated records, stamped by this server's clock.
        (record,) = store.updates_for([("pools", "east")])
        assert {stamp.node for _, stamp in record.fields.values()} == {me.replace(".", "_")}
        assert ("pools", "west") in store.digest()  # its tombstone


def test_pool_refusals(data: Path) -> None:
    me = cluster_of_three(data)
    ok(data, "pool", "create", "east", "--servers", me)
    fails(data, "pool", "create", "east", "--servers", me, match="pool 'east' exists already")
    fails(data, "pool", "create", "p", "--servers", "srv-x",
          match="'srv-x' is not a member of this server's cluster (known: " + me
          + ", srv-b, srv-c); see 'evserver-ctl server list', or give --force")
    fails(data, "pool", "create", "p", "--servers", "srv-gone,srv-x",
          match="'srv-gone', 'srv-x' are not members")
    fails(data, "pool", "create", "p", "--servers", "bad id", match="server id 'bad id'")
    fails(data, "pool", "create", "p", "--servers", "srv-b,srv-b", match="listed twice")
    fails(data, "pool", "create", "p", "--servers", "", match="give at least one server id")
    fails(data, "pool", "create", " p", "--servers", "srv-b", match="leading or trailing")
    fails(data, "pool", "create", "p", "--servers", "srv-b", "--description", "a\tb",
          match="non-printable")
    fails(data, "pool", "set", "east", match="nothing to change")
    fails(data, "pool", "set", "east", "--servers", "srv-x", match="not a member")
    assert run(data, "pool", "create", "p").status == 2  # --servers is required
    with Store.in_data_dir(data) as store:
        assert [p.name for p in store.list_pools()] == ["east"]
    # --force: a server this directory does not know (yet).
    ok(data, "pool", "create", "p", "--servers", "srv-x", "--force")
    ok(data, "pool", "set", "east", "--servers", "srv-x", "--force")


def test_pool_assign(data: Path) -> None:
    me = cluster_of_three(data)
    ok(data, "pool", "create", "east", "--servers", me)
    ok(data, "encoder", "add", "--domain", "d", "cam-1")
    assert ok(data, "pool", "assign", "--encoder", "cam-1", "east") == (
        "encoder 'cam-1' now uses pool 'east'\n")
    assert ok(data, "pool", "assign", "--domain", "d", "east") == (
        "domain 'd' now uses pool 'east'\n")
    lines = ok(data, "encoder", "list").splitlines()
    assert lines[1].split()[:4] == ["cam-1", "cam-1", "d", "east"]
    assert json.loads(ok(data, "encoder", "list", "--json"))[0]["pool"] == "east"
    assert ok(data, "domain", "list").splitlines()[1].split()[:4] == ["d", "0", "1", "east"]
    assert json.loads(ok(data, "domain", "list", "--json"))[0]["pool"] == "east"
    assert json.loads(ok(data, "pool", "list", "--json"))[0]["encoders"] == ["cam-1"]
    fails(data, "pool", "delete", "east",
          match="pool 'east' is still assigned to encoder(s) 'cam-1' and domain(s) 'd'")
    fails(data, "pool", "assign", "--encoder", "cam-1", "nope", match="no pool named 'nope'")
    fails(data, "pool", "assign", "--encoder", "cam-9", "east", match="no encoder with id")
    fails(data, "pool", "assign", "--domain", "x", "east", match="no domain named 'x'")
    fails(data, "pool", "assign", "--encoder", "cam-1", match="give either a POOL or --none")
    fails(data, "pool", "assign", "--encoder", "cam-1", "east", "--none",
          match="give either a POOL or --none")
    assert run(data, "pool", "assign", "east").status == 2  # --encoder or --domain
    assert run(data, "pool", "assign", "--encoder", "cam-1", "--domain", "d",
               "east").status == 2
    assert ok(data, "pool", "assign", "--encoder", "cam-1", "--none") == (
        "encoder 'cam-1' has no pool now\n")
    assert ok(data, "pool", "assign", "--domain", "d", "--none") == "domain 'd' has no pool now\n"
    with Store.in_data_dir(data) as store:
        assert store.encoder_pools() == {"cam-1": frozenset()}
    ok(data, "pool", "delete", "east")


def test_a_reference_to_a_pool_deleted_elsewhere_is_shown_as_such(data: Path) -> None:
    me = cluster_of_three(data)
    ok(data, "pool", "create", "east", "--servers", me)
    ok(data, "encoder", "add", "--domain", "d", "cam-1")
    ok(data, "pool", "assign", "--encoder", "cam-1", "east")
    with Store.in_data_dir(data) as store:  # a peer deleted the pool meanwhile
        store.apply_updates([Update("pools", "east", {}, Stamp(9_000_000_000_000, 0, "srv-b"))])
    assert "east (no such pool)" in ok(data, "encoder", "list")
    assert json.loads(ok(data, "encoder", "list", "--json"))[0]["pool"] == "east"


def test_server_weights_and_list(data: Path) -> None:
    me = cluster_of_three(data)
    (data / "cluster" / "status.json").write_text(json.dumps({
        "at": 1_700_000_000.0,
        "members": {"srv-b": {"state": "alive", "rtt_ms": 1.0, "offset_ms": 0.1},
                    "srv-c": {"state": "dead", "rtt_ms": None, "offset_ms": None}}}))
    assert ok(data, "server", "weight", "srv-b", "2.5") == "server 'srv-b' weighs 2.5\n"
    ok(data, "server", "weight", me, "0.5")
    ok(data, "pool", "create", "east", "--servers", "srv-b,srv-c")
    ok(data, "pool", "create", "b-only", "--servers", "srv-b")
    lines = ok(data, "server", "list").splitlines()
    none = ["-"] * 4  # no load.json yet: no load figures
    assert [line.split() for line in lines[:4]] == [
        ["SERVER", "STATE", "WEIGHT", "POOLS", "ENCODERS", "STREAMING", "VIEWERS", "MBIT/S"],
        [me, "this", "server", "0.5", "-", *none],
        ["srv-b", "alive", "2.5", "b-only,east", *none],
        ["srv-c", "dead", "1", "east", *none],
    ]
    assert lines[4] == ("(states as the running server saw them at "
                        "2023-11-14T22:13:20+00:00)")
    rows = json.loads(ok(data, "server", "list", "--json"))
    assert rows[1] == {"server_id": "srv-b", "this": False, "member": True, "state": "alive",
                       "weight": 2.5, "pools": ["b-only", "east"], "load": None}
    # The running server's load.json (ClusterBalancing.save_status) adds the load
    # and the balancer's state.
    (data / "cluster" / "load.json").write_text(json.dumps({
        "at": 1_700_000_001.0, "server_id": me, "decider": me, "stable_in_s": 12.5,
        "servers": {me: {"weight": 0.5, "hosted": 3, "encoders": 3, "streaming": 1,
                         "viewers": 4, "mbps_out": 2.25},
                    "srv-b": {"weight": 2.5, "hosted": 5, "encoders": 5, "streaming": 0,
                              "viewers": 0, "mbps_out": 0.0}},
        "in_flight": [{"encoder": "cam-9", "from": me, "to": "srv-b", "reason": "r"}],
        "decisions": [{"at": 1_700_000_000.5, "kind": "move", "encoder": "cam-9",
                       "from": me, "to": "srv-b", "reason": "srv-b is lighter"}]}))
    lines = ok(data, "server", "list").splitlines()
    assert lines[1].split()[-4:] == ["3", "1", "4", "2.2"]
    assert lines[2].split()[-4:] == ["5", "0", "0", "0.0"]
    assert lines[3].split()[-4:] == none
    assert lines[5] == (f"balancer: decider {me}, moves resume in 12.5 s, 1 in flight "
                        "(load as of 2023-11-14T22:13:21+00:00)")
    assert lines[6] == (f"  2023-11-14T22:13:20.500000+00:00 move cam-9 {me} -> srv-b: "
                        "srv-b is lighter")
    assert rows[0]["this"] and rows[0]["weight"] == 0.5
    # Back to the default; refusals change nothing.
    assert ok(data, "server", "weight", "srv-b", "default") == (
        "server 'srv-b' weighs 1 (the default)\n")
    for bad, message in (("0", "greater than 0"), ("-1", "greater than 0"),
                         ("1001", "at most 1000"), ("nan", "nan"), ("inf", "inf"),
                         ("two", "weight 'two' is not a number")):
        fails(data, "server", "weight", "srv-c", bad, match=message)
    fails(data, "server", "weight", "srv-x", "2", match="'srv-x' is not a member")
    fails(data, "server", "weight", "bad/id", "2", match="server id 'bad/id' is invalid")
    with Store.in_data_dir(data) as store:
        assert store.server_weights() == {me: 0.5}
    # A server that is no member but has a weight or a pool is listed as such.
    ok(data, "server", "weight", "srv-x", "3", "--force")
    rows = json.loads(ok(data, "server", "list", "--json"))
    assert [(r["server_id"], r["member"], r["state"]) for r in rows] == [
        (me, True, "this server"), ("srv-b", True, "alive"), ("srv-c", True, "dead"),
        ("srv-x", False, "not a member")]


def test_a_standalone_server_knows_only_itself(data: Path) -> None:
    ok(data, "domain", "list")
    me = own_id(data)
    assert [line.split() for line in ok(data, "server", "list").splitlines()] == [
        ["SERVER", "STATE", "WEIGHT", "POOLS", "ENCODERS", "STREAMING", "VIEWERS", "MBIT/S"],
        [me, "this", "server", "1", "-", "-", "-", "-", "-"]]
    ok(data, "pool", "create", "solo", "--servers", me)
    fails(data, "pool", "create", "other", "--servers", "srv-b", match=f"(known: {me})")


def test_msr_status_shows_each_links_bandwidth(data: Path) -> None:
    ok(data, "msr", "enable")
    warning = "link to srv-c measured 4.0 Mbit/s: below the 10 Mbit/s minimum"
    (data / "cluster" / "status.json").write_text(json.dumps({
        "at": 1_700_000_000.0,
        "members": {"srv-b": {"state": "alive", "rtt_ms": 1.0, "offset_ms": 0.1,
                              "mbps": 940.2, "bandwidth_warnings": []},
                    "srv-c": {"state": "alive", "rtt_ms": 80.0, "offset_ms": 0.1,
                              "mbps": 4.0, "bandwidth_warnings": [warning]}}}))
    status = json.loads(ok(data, "msr", "status", "--json"))
    assert status["member_mbps"] == {"srv-b": 940.2, "srv-c": 4.0}
    assert status["bandwidth_warnings"] == {"srv-c": [warning]}
    text = ok(data, "msr", "status")
    assert "member_mbps: {'srv-b': 940.2, 'srv-c': 4.0}" in text and warning in text
