"""Hybrid logical clocks and last-writer-wins replicas: order, convergence, nothing lost."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evserver.state.hlc import HybridClock, Stamp
from evserver.state.replica import Replica


class Wall:
    def __init__(self, ms: int = 1_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_stamps_increase_even_when_the_wall_clock_goes_back() -> None:
    wall = Wall()
    clock = HybridClock("a", wall)
    seen = [clock.now()]
    for step in (5, 0, -100, 0, 3, -1):
        wall.ms += step
        seen.append(clock.now())
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_observe_moves_past_remote_and_measures_skew() -> None:
    wall = Wall(1000)
    clock = HybridClock("a", wall)
    remote = Stamp(5000, 7, "b")
    after = clock.observe(remote)
    assert after > remote
    assert clock.now() > after
    assert clock.max_skew_seen_ms == 4000


def test_counter_overflow_borrows_next_millisecond() -> None:
    clock = HybridClock("a", Wall(10))
    stamps = [clock.now() for _ in range(70_000)]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


@given(
    st.integers(0, 10**13 - 1),
    st.integers(0, 0xFFFF),
    st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True),
)
def test_stamp_text_round_trip_keeps_order(wall: int, counter: int, node: str) -> None:
    stamp = Stamp(wall, counter, node)
    assert Stamp.decode(stamp.encode()) == stamp
    other = Stamp(wall, min(counter + 1, 0xFFFF), node)
    assert (stamp.encode() < other.encode()) == (stamp < other)


@pytest.mark.parametrize("text", ["", "x", "1.2", "a.b.c", "-1.0.n", "1.70000.n", "1.0."])
def test_bad_stamp_text(text: str) -> None:
    with pytest.raises(ValueError):
        Stamp.decode(text)


ops = st.lists(
    st.tuples(
        st.integers(0, 2),  # which replica
        st.sampled_from(["write", "write", "delete", "sync"]),
        st.sampled_from(["k1", "k2", "k3"]),
        st.sampled_from(["name", "domain", "role"]),
        st.integers(0, 99),
        st.integers(-50, 50),  # wall clock jitter
        st.integers(0, 2),  # sync partner
    ),
    max_size=60,
)


def sync(a: Replica, b: Replica) -> None:
    to_b = a.updates_missing_from(b.digest())
    to_a = b.updates_missing_from(a.digest())
    b.merge_all(to_b)
    a.merge_all(to_a)


@given(ops, st.randoms(use_true_random=False))
def test_replicas_converge_and_keep_every_latest_write(
    operations: list[tuple[int, str, str, str, int, int, int]], rnd: random.Random
) -> None:
    walls = [Wall(10_000 + 1000 * i) for i in range(3)]  # skewed clocks
    replicas = [Replica(HybridClock(f"n{i}", walls[i])) for i in range(3)]
    log = []  # every update ever made, to replay in another order
    for who, op, key, field, value, jitter, partner in operations:
        walls[who].ms += jitter
        r = replicas[who]
        if op == "write":
            log.append(r.write("encoders", key, {field: value}))
        elif op == "delete":
            log.append(r.delete("encoders", key))
        elif partner != who:
            sync(r, replicas[partner])
    # Heal: full anti-entropy between every pair, twice round.
    for _ in range(2):
        for i in range(3):
            for j in range(3):
                if i != j:
                    sync(replicas[i], replicas[j])
    states = [r.digest() for r in replicas]
    assert states[0] == states[1] == states[2]
    views = [dict(r.items("encoders")) for r in replicas]
    assert views[0] == views[1] == views[2]
    # The same updates applied in any order, twice, give the same state.
    shuffled = Replica(HybridClock("x", Wall(0)))
    replay = log * 2
    rnd.shuffle(replay)
    shuffled.merge_all(replay)
    assert shuffled.digest() == states[0]
    # Nothing lost: each field holds the value of its newest write.
    newest: dict[tuple[str, str], tuple[Stamp, int]] = {}
    for u in log:
        for name, (value, stamp) in u.fields.items():
            if (u.key, name) not in newest or stamp > newest[(u.key, name)][0]:
                newest[(u.key, name)] = (stamp, value)
    for (key, name), (stamp, value) in newest.items():
        record = replicas[0].tables["encoders"][key]
        assert record.fields[name] == (value, stamp)


def test_write_after_delete_revives_only_newer_fields() -> None:
    wall = Wall()
    r = Replica(HybridClock("a", wall))
    r.write("accounts", "u1", {"name": "alice", "role": "admin"})
    r.delete("accounts", "u1")
    assert r.get("accounts", "u1") is None
    r.write("accounts", "u1", {"role": "viewer"})
    assert r.get("accounts", "u1") == {"role": "viewer"}


def test_concurrent_writes_of_different_fields_both_survive() -> None:
    a = Replica(HybridClock("a", Wall(1000)))
    b = Replica(HybridClock("b", Wall(5000)))
    a.write("encoders", "cam", {"name": "Gate"})
    b.write("encoders", "cam", {"domain": "north"})
    sync(a, b)
    assert a.get("encoders", "cam") == b.get("encoders", "cam") == {
        "name": "Gate", "domain": "north"}
