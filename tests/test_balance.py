"""The load balancer (``evserver.state.balance``): placement, plans, the decider.

Unit tests of each function, Hypothesis properties of ``plan`` and
``balanced``, and a Hypothesis state machine that runs a whole cluster of
balancers on a ``task.Clock``: arrivals, departures, streams, server failures
and returns, pools, moves that take time and may be refused by their host.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock

from evserver.state.balance import (
    Balancer,
    BalanceSettings,
    EncoderPlace,
    Move,
    balanced,
    choose_server,
    decider,
    eligible,
    executable,
    plan,
)
from tests.budget import examples

ROOT = Path(__file__).resolve().parent.parent


def place(encoder_id: str, server_id: str, streaming: bool = False,
          pool: Iterable[str] = (), pool_name: str = "") -> EncoderPlace:
    return EncoderPlace(encoder_id, server_id, streaming, frozenset(pool), pool_name)


def counts_of(weights: Mapping[str, float], places: Iterable[EncoderPlace]) -> dict[str, int]:
    counts = dict.fromkeys(weights, 0)
    for p in places:
        if p.server_id in counts:
            counts[p.server_id] += 1
    return counts


def apply(places: list[EncoderPlace], moves: Iterable[Move]) -> list[EncoderPlace]:
    where = {m.encoder_id: m for m in moves}
    out = []
    for p in places:
        m = where.get(p.encoder_id)
        if m is not None:
            assert m.source == p.server_id
            p = attrs.evolve(p, server_id=m.target)
        out.append(p)
    return out


def potential(weights: Mapping[str, float], places: Iterable[EncoderPlace]) -> Fraction:
    """Rosenthal's potential: every allowed greedy move lowers it."""
    counts = counts_of(weights, places)
    return sum((Fraction(c * (c + 1), 2) / Fraction(weights[s]) for s, c in counts.items()),
               Fraction(0))


def settle_fully(weights: Mapping[str, float], places: list[EncoderPlace],
                 limit: int = 3) -> tuple[list[EncoderPlace], int]:
    """Apply plan() until it has nothing to do; return the result and the moves made."""
    made = 0
    for _ in range(10_000):
        moves = plan(weights, places, limit)
        if not moves:
            return places, made
        places = apply(places, moves)
        made += len(moves)
    raise AssertionError("plan() never stopped")


# -- eligible ------------------------------------------------------------------


def test_eligible_is_the_live_part_of_the_pool() -> None:
    assert eligible(frozenset({"s1", "s2"}), ["s1", "s3"]) == {"s1"}
    assert eligible(frozenset({"s1", "s2"}), {"s1", "s2", "s3"}) == {"s1", "s2"}


def test_eligible_without_pool_is_every_live_server() -> None:
    assert eligible(frozenset(), ["s1", "s2"]) == {"s1", "s2"}


def test_eligible_falls_back_to_every_live_server_when_the_pool_is_down() -> None:
    assert eligible(frozenset({"s1"}), ["s2", "s3"]) == {"s2", "s3"}
    assert eligible(frozenset({"s1"}), []) == frozenset()


@given(pool=st.frozensets(st.sampled_from("abcdef")), alive=st.sets(st.sampled_from("abcdef")))
def test_eligible_property(pool: frozenset[str], alive: set[str]) -> None:
    result = eligible(pool, alive)
    assert result <= alive
    if pool & alive:
        assert result == pool & alive
    else:
        assert result == alive


# -- choose_server ----------------------------------------------------------------


def test_choose_server_takes_the_lightest() -> None:
    weights = {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    assert choose_server("e", frozenset(), weights, {"s1": 3, "s2": 1, "s3": 2}) == "s2"
    # Missing counts are zero; servers not in weights (dead) are never chosen.
    assert choose_server("e", frozenset(), weights, {"s1": 3, "s2": 1, "s9": 0}) == "s3"


def test_choose_server_weight_two_takes_twice_as_many() -> None:
    weights = {"a": 1.0, "b": 2.0}
    counts: Counter[str] = Counter()
    for i in range(300):
        counts[choose_server(f"enc{i}", frozenset(), weights, counts)] += 1
        if (i + 1) % 3 == 0:
            assert counts["b"] == 2 * counts["a"], (i, counts)
    assert counts == {"a": 100, "b": 200}


def test_choose_server_fractional_weights() -> None:
    weights = {"a": 0.5, "b": 1.5, "c": 1.0}
    counts: Counter[str] = Counter()
    for i in range(600):
        counts[choose_server(f"enc{i}", frozenset(), weights, counts)] += 1
    assert counts == {"a": 100, "b": 300, "c": 200}


def test_choose_server_ties_spread_simultaneous_arrivals() -> None:
    # 300 encoders arrive at once, each placed against the same (empty) counts,
    # as on different servers at the same moment: they spread out.
    weights = {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    chosen = Counter(choose_server(f"cam-{i}", frozenset(), weights, {}) for i in range(300))
    assert set(chosen) == set(weights)
    assert all(60 <= n <= 140 for n in chosen.values()), chosen
    # Among tied servers only: a lighter one always wins.
    lighter = Counter(choose_server(f"cam-{i}", frozenset(), weights, {"s1": 1})
                      for i in range(300))
    assert set(lighter) == {"s2", "s3"}


def test_choose_server_tie_break_ignores_argument_order() -> None:
    a = {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    b = dict(reversed(list(a.items())))
    for i in range(50):
        assert (choose_server(f"e{i}", frozenset(), a, {})
                == choose_server(f"e{i}", frozenset(), b, {}))


def test_choose_server_is_deterministic_across_processes() -> None:
    script = (
        "import json\n"
        "from evserver.state.balance import choose_server\n"
        "w = {'s1': 1.0, 's2': 1.0, 's3': 1.0, 's4': 1.0}\n"
        "print(json.dumps([choose_server(f'enc-{i}', frozenset(), w, {}) for i in range(64)]))\n"
    )
    here = [choose_server(f"enc-{i}", frozenset(), {"s1": 1.0, "s2": 1.0, "s3": 1.0, "s4": 1.0},
                          {}) for i in range(64)]
    assert len(set(here)) == 4
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == str(here).replace("'", '"')


def test_choose_server_honours_the_pool_and_falls_back() -> None:
    weights = {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    north = frozenset({"s1", "s2"})
    assert choose_server("e", north, weights, {"s1": 9, "s2": 8, "s3": 0}) == "s2"
    # The whole pool is down: any live server, the lightest.
    assert choose_server("e", frozenset({"s9"}), weights, {"s1": 2, "s2": 1, "s3": 3}) == "s2"


def test_choose_server_rejects_bad_weights_and_no_servers() -> None:
    with pytest.raises(ValueError):
        choose_server("e", frozenset(), {"s1": 0.0}, {})
    with pytest.raises(ValueError):
        choose_server("e", frozenset(), {"s1": float("nan")}, {})
    with pytest.raises(ValueError):
        choose_server("e", frozenset(), {}, {})


@given(
    weights=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]),
                            st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]), min_size=1),
    counts=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 20)),
    pool=st.frozensets(st.sampled_from(["a", "b", "c", "d", "x"])),
    encoder_id=st.text(max_size=8),
)
def test_choose_server_minimises_the_load_after_arrival(
        weights: dict[str, float], counts: dict[str, int], pool: frozenset[str],
        encoder_id: str) -> None:
    chosen = choose_server(encoder_id, pool, weights, counts)
    allowed = eligible(pool, weights)
    assert chosen in allowed

    def load(s: str) -> Fraction:
        return Fraction(counts.get(s, 0) + 1) / Fraction(weights[s])

    assert all(load(chosen) <= load(s) for s in allowed)


# -- plan ------------------------------------------------------------------------


def test_plan_moves_from_the_heaviest_to_the_lightest() -> None:
    weights = {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    places = [place(f"e{i}", "s1") for i in range(7)] + [place(f"f{i}", "s2") for i in range(3)]
    moves = plan(weights, places, limit=1)
    assert len(moves) == 1
    assert (moves[0].source, moves[0].target) == ("s1", "s3")
    assert moves[0].reason == "s1 has 7 (share 3.3), s3 has 0 (share 3.3)"
    final, made = settle_fully(weights, places)
    assert sorted(counts_of(weights, final).values()) == [3, 3, 4]
    assert made == 3  # the fewest moves: 7,3,0 -> 4,3,3


def test_plan_respects_the_limit_and_applies_each_move() -> None:
    weights = {"s1": 1.0, "s2": 1.0}
    places = [place(f"e{i}", "s1") for i in range(10)]
    moves = plan(weights, places, limit=3)
    assert len(moves) == 3
    assert len({m.encoder_id for m in moves}) == 3
    assert plan(weights, places, limit=0) == []
    everything = plan(weights, places, limit=100)
    assert len(everything) == 5  # 10,0 -> 5,5 and no further
    assert counts_of(weights, apply(places, everything)) == {"s1": 5, "s2": 5}


def test_plan_never_moves_a_streaming_encoder_but_counts_it() -> None:
    weights = {"s1": 1.0, "s2": 1.0}
    streaming = [place(f"e{i}", "s1", streaming=True) for i in range(6)]
    assert plan(weights, streaming, limit=10) == []
    assert balanced(weights, streaming) == []
    # One idle encoder beside five streaming ones: it moves, the others stay.
    mixed = [place(f"e{i}", "s1", streaming=True) for i in range(5)] + [place("idle", "s1")]
    assert [(m.encoder_id, m.target) for m in plan(weights, mixed, limit=10)] == [("idle", "s2")]


def test_plan_never_moves_a_frozen_encoder() -> None:
    weights = {"s1": 1.0, "s2": 1.0}
    places = [place("e1", "s1"), place("e2", "s1"), place("e3", "s1")]
    assert plan(weights, places, limit=5, frozen={"e1", "e2", "e3"}) == []
    moves = plan(weights, places, limit=5, frozen={"e1", "e3"})
    assert [m.encoder_id for m in moves] == ["e2"]


def test_plan_leaves_encoders_of_dead_servers_to_failover() -> None:
    weights = {"s1": 1.0, "s2": 1.0}
    places = [place(f"e{i}", "s9") for i in range(5)] + [place("x", "s1")]
    assert plan(weights, places, limit=5) == []
    assert balanced(weights, places) == []


def test_plan_weight_two_takes_twice_as_many() -> None:
    weights = {"s1": 1.0, "s2": 2.0}
    places = [place(f"e{i}", "s1") for i in range(9)]
    final, _ = settle_fully(weights, places)
    assert counts_of(weights, final) == {"s1": 3, "s2": 6}
    places = [place(f"e{i}", "s2") for i in range(9)]
    final, _ = settle_fully(weights, places)
    assert counts_of(weights, final) == {"s1": 3, "s2": 6}


def test_plan_returns_encoders_into_their_pool() -> None:
    weights = {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    north = {"s1", "s2"}
    places = [place("e1", "s3", pool=north, pool_name="north"),
              place("e2", "s1", pool=north, pool_name="north"),
              place("e3", "s3", pool={"s1"})]
    moves = plan(weights, places, limit=10)
    assert Move("e1", "s3", "s2", "back into pool 'north'") in moves
    assert Move("e3", "s3", "s1", "back into pool {s1}") in moves
    final = apply(places, moves)
    assert balanced(weights, final) == []
    # A streaming encoder outside its pool stays where it is.
    assert plan(weights, [place("e1", "s3", streaming=True, pool=north)], limit=10) == []


def test_pool_fallback_while_down_and_return_when_back() -> None:
    north = frozenset({"s1"})
    everyone = {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    without_s1 = {"s2": 1.0, "s3": 1.0}
    # s1 is down: pooled encoders arrive on s2 and s3 and stay there.
    places: list[EncoderPlace] = []
    for i in range(6):
        target = choose_server(f"e{i}", north, without_s1, counts_of(without_s1, places))
        places.append(place(f"e{i}", target, pool=north, pool_name="north"))
    assert counts_of(without_s1, places) == {"s2": 3, "s3": 3}
    assert plan(without_s1, places, limit=10) == []
    assert balanced(without_s1, places) == []
    # s1 is back: they go home, although that overloads it.
    assert len(balanced(everyone, places)) == 6
    moves = plan(everyone, places, limit=10)
    assert {(m.encoder_id, m.target, m.reason) for m in moves} == {
        (f"e{i}", "s1", "back into pool 'north'") for i in range(6)}
    final = apply(places, moves)
    assert counts_of(everyone, final) == {"s1": 6, "s2": 0, "s3": 0}
    assert balanced(everyone, final) == []


def test_pools_bound_the_greedy_moves() -> None:
    weights = {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    # Everyone on s1 is pooled to {s1, s2}: s3 stays empty.
    places = [place(f"e{i}", "s1", pool={"s1", "s2"}) for i in range(6)]
    final, _ = settle_fully(weights, places)
    assert counts_of(weights, final) == {"s1": 3, "s2": 3, "s3": 0}
    # Unpooled encoders fill s3 instead of the pooled ones.
    places = final + [place(f"u{i}", "s2") for i in range(3)]
    final, _ = settle_fully(weights, places)
    assert counts_of(weights, final) == {"s1": 3, "s2": 3, "s3": 3}
    assert all(p.server_id in {"s1", "s2"} for p in final if p.encoder_id.startswith("e"))


def test_plan_is_deterministic_whatever_the_input_order() -> None:
    weights = {"s1": 1.0, "s2": 2.0, "s3": 1.0}
    places = [place(f"e{i}", "s1", streaming=i % 4 == 0, pool={"s2"} if i % 5 == 0 else ())
              for i in range(20)]
    expected = plan(weights, places, limit=4)
    rng = random.Random(7)
    for _ in range(20):
        shuffled = places[:]
        rng.shuffle(shuffled)
        assert plan(dict(reversed(list(weights.items()))), shuffled, limit=4) == expected


def test_plan_rejects_duplicates() -> None:
    with pytest.raises(ValueError):
        plan({"s1": 1.0}, [place("e", "s1"), place("e", "s1")], limit=1)


def test_balanced_lists_the_violations() -> None:
    weights = {"s1": 1.0, "s2": 1.0}
    assert balanced(weights, []) == []
    # 2 on s1, 1 on s2: 2 > 1 + 1 does not hold.
    assert balanced(weights, [place("a", "s1"), place("b", "s1"), place("c", "s2")]) == []
    assert balanced(weights, [place(c, "s1") for c in "abc"]) == [
        "s1 has 3 (weight 1), s2 has 0 (weight 1): 3 idle encoder(s) of s1 may move to s2"]
    assert balanced(weights, [place("a", "s2", pool={"s1"}, pool_name="n")]) == [
        "a on s2 is outside its pool 'n'"]


# -- properties of plan and balanced -------------------------------------------------

SERVERS = ["a", "b", "c", "d", "e"]
View = tuple[dict[str, float], list[EncoderPlace]]


@st.composite
def views(draw: st.DrawFn) -> tuple[dict[str, float], list[EncoderPlace]]:
    alive = draw(st.lists(st.sampled_from(SERVERS), min_size=1, max_size=5, unique=True))
    weights = {s: draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0])) for s in alive}
    hosts = st.sampled_from([*alive, "dead"]) if draw(st.booleans()) else st.sampled_from(alive)
    n = draw(st.integers(0, 30))
    places = [
        EncoderPlace(
            f"e{i}", draw(hosts), draw(st.booleans()),
            draw(st.frozensets(st.sampled_from([*SERVERS, "x"]), max_size=3))
            if draw(st.integers(0, 2)) == 0 else frozenset(),
        )
        for i in range(n)
    ]
    return weights, places


@given(view=views(), limit=st.integers(0, 6), data=st.data())
def test_plan_properties(view: View, limit: int, data: st.DataObject) -> None:
    weights, places = view
    frozen = data.draw(st.sets(st.sampled_from([p.encoder_id for p in places]))
                       if places else st.just(set()))
    moves = plan(weights, places, limit, frozen)
    by_id = {p.encoder_id: p for p in places}
    assert len(moves) <= limit
    assert len({m.encoder_id for m in moves}) == len(moves)
    for m in moves:
        p = by_id[m.encoder_id]
        assert not p.streaming and m.encoder_id not in frozen
        assert m.source == p.server_id and m.source in weights
        assert m.target != m.source
        assert m.target in eligible(p.pool, weights)
    # Deterministic, whatever the order of the input.
    shuffled = data.draw(st.permutations(places))
    assert plan(dict(reversed(list(weights.items()))), shuffled, limit, frozen) == moves
    # Greedy moves lower the potential, one after the other.
    current = places
    for m in moves:
        after = apply(current, [m])
        if not m.reason.startswith("back into"):
            assert potential(weights, after) < potential(weights, current)
        current = after


@given(view=views())
def test_plan_has_nothing_to_do_exactly_when_balanced(view: View) -> None:
    weights, places = view
    assert (plan(weights, places, limit=1) == []) == (balanced(weights, places) == [])


@given(view=views(), limit=st.integers(1, 4))
def test_repeated_plans_reach_balance(view: View, limit: int) -> None:
    weights, places = view
    final, made = settle_fully(weights, places, limit)
    assert balanced(weights, final) == []
    idle_outside = sum(1 for p in places if not p.streaming and p.server_id in weights
                       and p.server_id not in eligible(p.pool, weights))
    assert made >= idle_outside


# -- decider and executable -----------------------------------------------------------


def test_decider_is_the_smallest_live_server() -> None:
    assert decider({"s3", "s1", "s2"}) == "s1"
    assert decider({"s2": 1.0, "s10": 2.0}) == "s10"  # ids compare as strings
    with pytest.raises(ValueError):
        decider([])


def test_executable_only_if_still_here_and_idle() -> None:
    m = Move("e", "s1", "s2", "r")
    assert executable(m, hosted_here=True, streaming_now=False)
    assert not executable(m, hosted_here=True, streaming_now=True)
    assert not executable(m, hosted_here=False, streaming_now=False)


# -- Balancer ---------------------------------------------------------------------------

FAST = BalanceSettings(stability=5.0, max_in_flight=2, move_timeout=10.0, interval=1.0)
W3 = {"s1": 1.0, "s2": 1.0, "s3": 1.0}


def crowded(n: int = 8, host: str = "s1") -> list[EncoderPlace]:
    return [place(f"e{i}", host) for i in range(n)]


def stable_balancer(server_id: str = "s1") -> tuple[Clock, Balancer]:
    clock = Clock()
    b = Balancer(clock, server_id, FAST)
    clock.advance(FAST.stability)
    return clock, b


def test_balancer_waits_for_stability_from_start_and_after_changes() -> None:
    clock = Clock()
    b = Balancer(clock, "s1", FAST)
    assert b.stable_in() == 5.0
    clock.advance(4.5)
    assert b.stable_in() == 0.5
    assert b.tick(W3, crowded()) == []
    clock.advance(0.5)
    assert b.stable_in() == 0.0
    assert len(b.tick(W3, crowded())) == 2
    b.membership_changed()
    assert b.stable_in() == 5.0
    clock.advance(4.9)
    assert b.tick(W3, crowded()) == []
    clock.advance(0.1)
    assert b.tick(W3, crowded()) == []  # both slots still taken
    assert len(b.in_flight()) == 2


def test_only_the_decider_moves() -> None:
    clock = Clock()
    balancers = {s: Balancer(clock, s, FAST) for s in W3}
    clock.advance(6)
    results = {s: b.tick(W3, crowded(host="s2")) for s, b in balancers.items()}
    assert results["s2"] == results["s3"] == []
    assert len(results["s1"]) == 2
    # s1 gone: s2 decides, once stable.
    del balancers["s1"]
    for b in balancers.values():
        b.membership_changed()
    w = {"s2": 1.0, "s3": 1.0}
    assert all(b.tick(w, crowded(host="s2")) == [] for b in balancers.values())
    clock.advance(5)
    assert balancers["s3"].tick(w, crowded(host="s2")) == []
    assert len(balancers["s2"].tick(w, crowded(host="s2"))) == 2


def test_balancer_limits_moves_in_flight_and_counts_them_as_made() -> None:
    clock, b = stable_balancer()
    view = crowded(6)
    first = b.tick({"s1": 1.0, "s2": 1.0}, view)
    assert [m.target for m in first] == ["s2", "s2"]
    assert set(b.in_flight()) == {m.encoder_id for m in first}
    assert b.tick({"s1": 1.0, "s2": 1.0}, view) == []  # no slot free
    view = apply(view, first[:1])  # one arrives
    clock.advance(1)
    third = b.tick({"s1": 1.0, "s2": 1.0}, view)
    assert b.settled == [(first[0], "done")]
    # 6,0 with one done and one in flight (counted as made): 4,2 -> one more.
    assert len(third) == 1
    assert third[0].encoder_id not in {m.encoder_id for m in first}
    assert len(b.in_flight()) == 2


def test_in_flight_moves_settle_against_the_view() -> None:
    clock, b = stable_balancer()
    w = {"s1": 1.0, "s2": 1.0, "s3": 1.0, "s4": 1.0}
    view = crowded(6)
    m1, m2 = b.tick(w, view)
    third = min(set(w) - {m1.source, m1.target})
    # m1's encoder shows up on a third server: abandoned, and the slot is free.
    view = [attrs.evolve(p, server_id=third) if p.encoder_id == m1.encoder_id else p
            for p in view]
    clock.advance(1)
    (m3,) = b.tick(w, view)
    assert b.settled == [(m1, f"abandoned: {m1.encoder_id} is on {third}")]
    assert set(b.in_flight()) == {m2.encoder_id, m3.encoder_id}
    # m2's encoder vanishes from the view (in transit, or gone): the slot stays
    # taken until the move times out.
    view = [p for p in view if p.encoder_id != m2.encoder_id]
    clock.advance(1)
    assert b.tick(w, view) == []
    assert b.settled == []
    assert set(b.in_flight()) == {m2.encoder_id, m3.encoder_id}
    clock.advance(FAST.move_timeout - 2)
    b.tick(w, view)
    assert b.settled == [(m2, f"abandoned: not seen on {m2.target} after 10 s")]
    clock.advance(1)
    b.tick(w, view)
    assert b.settled == [(m3, f"abandoned: not seen on {m3.target} after 10 s")]


def test_a_streaming_encoder_keeps_its_slot_until_the_host_answers() -> None:
    clock, b = stable_balancer()
    w = {"s1": 1.0, "s2": 1.0}
    view = crowded(6)
    m1, m2 = b.tick(w, view)
    view = [attrs.evolve(p, streaming=True) if p.encoder_id == m1.encoder_id else p
            for p in view]
    clock.advance(1)
    assert b.tick(w, view) == []
    assert len(b.in_flight()) == 2
    b.abandon(m1.encoder_id, "started streaming", Move("x", "y", "z", "older move"))
    assert len(b.in_flight()) == 2  # an answer about another move is ignored
    b.abandon(m1.encoder_id, "started streaming", m1)
    b.abandon("unknown", "whatever")
    assert set(b.in_flight()) == {m2.encoder_id}
    clock.advance(1)
    (m3,) = b.tick(w, view)
    assert m3.encoder_id not in {m1.encoder_id, m2.encoder_id}


def test_no_encoder_moves_twice_within_a_rebalance() -> None:
    clock, b = stable_balancer()
    w = {"s1": 1.0, "s2": 1.0}
    view = [place("e1", "s1"), place("e2", "s1"), place("e3", "s1", streaming=True)]
    (m,) = b.tick(w, view)
    assert m.encoder_id == "e2" or m.encoder_id == "e1"
    moved = m.encoder_id
    other = "e1" if moved == "e2" else "e2"
    view = apply(view, [m])
    # The other idle encoder starts streaming, and three streaming ones arrive
    # on s2 (4 against 2): only the encoder just moved could go back, and it
    # is frozen.
    view = [attrs.evolve(p, streaming=True) if p.encoder_id == other else p for p in view]
    view += [place(f"x{i}", "s2", streaming=True) for i in range(3)]
    assert balanced(w, view) != []
    clock.advance(1)
    assert b.tick(w, view) == []  # settles m, finds nothing: the rebalance ends
    assert b.settled == [(m, "done")]
    assert not b.rebalancing and b.rebalances == 1
    clock.advance(1)
    assert b.tick(w, view) == []  # moved 2 s ago: cooling down
    clock.advance(b.settings.move_cooldown - 2)
    (back,) = b.tick(w, view)  # a new rebalance may move it again
    assert (back.encoder_id, back.target) == (moved, "s1")
    assert b.rebalances == 2


def test_an_encoder_moved_waits_the_cooldown_before_it_moves_again() -> None:
    """A pool edited over and over: the encoder follows at most every move_cooldown s."""
    clock, b = stable_balancer()
    w = {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    e = place("e1", "s1", pool={"s2"}, pool_name="p")
    (m,) = b.tick(w, [e])
    assert (m.encoder_id, m.target) == ("e1", "s2")
    started = clock.seconds()
    e = attrs.evolve(e, server_id="s2", pool=frozenset({"s3"}))  # moved; the pool changed
    times = []
    while clock.seconds() - started < 20:
        clock.advance(0.5)
        for move in b.tick(w, [e]):
            times.append(clock.seconds() - started)
            e = attrs.evolve(e, server_id=move.target,
                             pool=frozenset({"s1"} if move.target == "s3" else {"s3"}))
    assert times == [5.0, 10.0, 15.0, 20.0]


def test_a_rebalance_lasts_while_moves_are_in_flight() -> None:
    clock, b = stable_balancer()
    w = {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    view = crowded(7)  # 7,0,0 -> 3,2,2: four moves, two at a time
    first = b.tick(w, view)
    assert len(first) == 2 and b.rebalancing
    clock.advance(1)
    view = apply(view, first)
    second = b.tick(w, view)
    assert len(second) == 2
    assert not {m.encoder_id for m in first} & {m.encoder_id for m in second}
    assert b.rebalances == 1
    view = apply(view, second)
    clock.advance(1)
    assert b.tick(w, view) == []
    assert balanced(w, view) == [] and not b.rebalancing


def test_membership_change_ends_the_rebalance() -> None:
    _, b = stable_balancer()
    w = {"s1": 1.0, "s2": 1.0}
    assert len(b.tick(w, crowded(6))) == 2
    assert b.rebalancing
    b.membership_changed()
    assert not b.rebalancing
    assert len(b.in_flight()) == 2  # still settled against the view


def test_balancer_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        Balancer(Clock(), "s1", BalanceSettings(max_in_flight=0))
    with pytest.raises(ValueError):
        Balancer(Clock(), "s1", BalanceSettings(interval=0))
    with pytest.raises(ValueError):
        Balancer(Clock(), "s1", BalanceSettings(move_cooldown=-1))


# -- the cluster simulator ---------------------------------------------------------------

#: The simulated cluster's settings; each run draws its tick interval from
#: ``INTERVALS`` (shorter than a move: the decider sees moves under way).
SIM = BalanceSettings(stability=5.0, max_in_flight=2, move_timeout=10.0, interval=1.0)
INTERVALS = [0.2, 0.5, 1.0]
SERVER_IDS = ["s1", "s2", "s3", "s4", "s5", "s6"]
POOL_NAMES = ["north", "south"]
DOMAINS = ["d1", "d2"]
MAX_ENCODERS = 16
#: A move takes this long from the decision to the encoder's arrival.
MOVE_TIME = (0.05, 1.0)


@attrs.define
class SimEncoder:
    domain: str
    host: str | None  # None: redirected, not yet arrived
    streaming: bool = False
    pool: str | None = None


@attrs.define
class SimMove:
    move: Move
    balancer: Balancer
    redirected: bool = False


class ClusterModel(RuleBasedStateMachine):
    """Every server runs a Balancer on one clock over the shared view."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.rng = random.Random(0)
        self.settings = SIM
        self.weights: dict[str, float] = {}
        self.alive: set[str] = set()
        self.balancers: dict[str, Balancer] = {}
        self.loops: dict[str, IDelayedCall] = {}
        self.encoders: dict[str, SimEncoder] = {}
        self.pools: dict[str, frozenset[str]] = {}
        self.domain_pools: dict[str, str | None] = dict.fromkeys(DOMAINS)
        self.pending: dict[str, SimMove] = {}
        self.next_id = 0
        #: Bumped on every change of the view; ``deciders``: who started moves at each.
        self.version = 0
        self._view: tuple[int, list[EncoderPlace]] | None = None
        self.deciders: dict[int, set[str]] = {}
        #: Per server: encoders moved in its current rebalance (observed from outside).
        self.rebalance_moved: dict[str, set[str]] = {}
        self.moves_started = 0

    # -- the world -------------------------------------------------------------

    def alive_weights(self) -> dict[str, float]:
        return {s: self.weights[s] for s in sorted(self.alive)}

    def pool_of(self, enc: SimEncoder) -> tuple[frozenset[str], str]:
        name = enc.pool if enc.pool in self.pools else self.domain_pools[enc.domain]
        if name is not None and name in self.pools:
            return self.pools[name], name
        return frozenset(), ""

    def view(self) -> list[EncoderPlace]:
        if self._view is not None and self._view[0] == self.version:
            return self._view[1]
        out = []
        for eid, enc in self.encoders.items():
            if enc.host is not None:
                pool, name = self.pool_of(enc)
                out.append(EncoderPlace(eid, enc.host, enc.streaming, pool, name))
        self._view = (self.version, out)
        return out

    def counts(self) -> dict[str, int]:
        return counts_of(self.alive_weights(), self.view())

    def place(self, eid: str) -> str:
        pool, _ = self.pool_of(self.encoders[eid])
        return choose_server(eid, pool, self.alive_weights(), self.counts())

    def changed(self) -> None:
        self.version += 1

    def advance(self, seconds: float) -> None:
        """Advance the clock, running each call at its own time."""
        end = self.clock.seconds() + seconds
        while due := [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]:
            self.clock.rightNow = max(self.clock.rightNow, min(due))
            self.clock.advance(0)
        self.clock.rightNow = end
        self.clock.advance(0)

    def start_server(self, sid: str) -> None:
        self.alive.add(sid)
        self.balancers[sid] = Balancer(self.clock, sid, self.settings)
        self.rebalance_moved[sid] = set()
        first = self.rng.uniform(0, self.settings.interval)
        self.loops[sid] = self.clock.callLater(first, self.tick, sid)

    def membership_changed(self, changed: str) -> None:
        for sid, b in self.balancers.items():
            if sid != changed:
                b.membership_changed()
            self.rebalance_moved[sid].clear()
        self.changed()

    # -- each server's tick and the moves ------------------------------------------

    def tick(self, sid: str) -> None:
        b = self.balancers[sid]
        alive = self.alive_weights()
        view = self.view()
        moves = b.tick(alive, view)
        assert len(b.in_flight()) <= self.settings.max_in_flight
        if moves:
            # Never two servers deciding at once over the same view.
            assert sid == decider(alive)
            deciding = self.deciders.setdefault(self.version, set())
            deciding.add(sid)
            assert deciding == {sid}, deciding
            assert b.stable_in() == 0
            by_id = {p.encoder_id: p for p in view}
            for m in moves:
                p = by_id[m.encoder_id]
                assert p.server_id == m.source and not p.streaming
                assert m.target in alive and m.target != m.source
                assert m.target in eligible(p.pool, alive)
                assert m.encoder_id not in self.pending
                assert m.encoder_id not in self.rebalance_moved[sid], "moved twice in a rebalance"
                self.rebalance_moved[sid].add(m.encoder_id)
                sm = self.pending[m.encoder_id] = SimMove(m, b)
                assert len(self.pending) <= self.settings.max_in_flight
                took = self.rng.uniform(*MOVE_TIME)
                self.clock.callLater(took * self.rng.uniform(0.05, 0.95), self.redirect, sm)
                self.clock.callLater(took, self.arrive, sm)
                self.moves_started += 1
        elif not b.in_flight():
            self.rebalance_moved[sid].clear()  # the rebalance is over
        self.loops[sid] = self.clock.callLater(self.settings.interval, self.tick, sid)

    def redirect(self, sm: SimMove) -> None:
        """The host's last check, at the moment it would redirect the encoder."""
        move = sm.move
        if move.source not in self.alive:
            del self.pending[move.encoder_id]  # died with its host; failover re-placed it
            return
        enc = self.encoders.get(move.encoder_id)
        hosted_here = enc is not None and enc.host == move.source
        if not executable(move, hosted_here, enc is not None and enc.streaming):
            del self.pending[move.encoder_id]
            event("sim: host refused a move")
            if self.balancers.get(sm.balancer.server_id) is sm.balancer:
                sm.balancer.abandon(move.encoder_id, "refused by the host", move)
            return
        # No streaming encoder is ever moved.
        assert enc is not None and enc.host == move.source and not enc.streaming
        enc.host = None
        sm.redirected = True
        self.changed()

    def arrive(self, sm: SimMove) -> None:
        if not sm.redirected:
            return
        eid = sm.move.encoder_id
        del self.pending[eid]
        enc = self.encoders.get(eid)
        if enc is None:
            return  # it went away on the way
        if sm.move.target in self.alive:
            enc.host = sm.move.target
        else:
            enc.host = self.place(eid)
            event("sim: target died during a move")
        self.changed()

    # -- rules -------------------------------------------------------------------

    @initialize(
        n=st.integers(2, 6),
        down=st.integers(0, 5),
        weights=st.lists(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0]), min_size=6, max_size=6),
        rng=st.randoms(use_true_random=False),
        initial=st.integers(3, 14),
        interval=st.sampled_from(INTERVALS),
    )
    def setup(self, n: int, down: int, weights: list[float], rng: random.Random,
              initial: int, interval: float) -> None:
        """n servers, of which ``down`` (but not all) have not started yet."""
        self.rng = rng
        self.settings = attrs.evolve(SIM, interval=interval)
        self.clock.advance(1_000_000)
        for k, (sid, w) in enumerate(zip(SERVER_IDS[:n], weights, strict=False)):
            self.weights[sid] = w
            if k >= min(down, n - 1):
                self.start_server(sid)
        for _ in range(initial):
            self.add_encoder(domain=0, pool=None)

    @precondition(lambda self: len(self.encoders) < MAX_ENCODERS)
    @rule(domain=st.integers(0, 1), pool=st.none() | st.sampled_from(POOL_NAMES))
    def add_encoder(self, domain: int, pool: str | None) -> None:
        eid = f"e{self.next_id}"
        self.next_id += 1
        self.encoders[eid] = SimEncoder(DOMAINS[domain], None, pool=pool)
        self.encoders[eid].host = self.place(eid)
        self.changed()

    @precondition(lambda self: len(self.encoders) < MAX_ENCODERS)
    @rule(n=st.integers(2, 6), domain=st.integers(0, 1),
          pool=st.none() | st.sampled_from(POOL_NAMES))
    def simultaneous_arrivals(self, n: int, domain: int, pool: str | None) -> None:
        """Encoders arrive at once on different servers: each placed against the same counts."""
        counts = self.counts()
        for _ in range(min(n, MAX_ENCODERS - len(self.encoders))):
            eid = f"e{self.next_id}"
            self.next_id += 1
            enc = self.encoders[eid] = SimEncoder(DOMAINS[domain], None, pool=pool)
            enc.host = choose_server(eid, self.pool_of(enc)[0], self.alive_weights(), counts)
        self.changed()

    def pick(self, ids: list[str], i: int) -> str:
        return sorted(ids)[i % len(ids)]

    @precondition(lambda self: self.encoders)
    @rule(i=st.integers(0, 100))
    def remove_encoder(self, i: int) -> None:
        del self.encoders[self.pick(list(self.encoders), i)]
        self.changed()

    def idle_hosted(self) -> list[str]:
        return [e for e, enc in self.encoders.items() if enc.host and not enc.streaming]

    @precondition(lambda self: self.idle_hosted())
    @rule(i=st.integers(0, 100))
    def start_stream(self, i: int) -> None:
        self.encoders[self.pick(self.idle_hosted(), i)].streaming = True
        self.changed()

    def being_moved(self) -> list[str]:
        return [e for e, sm in self.pending.items() if not sm.redirected
                and e in self.encoders and self.encoders[e].host is not None]

    @rule(i=st.integers(0, 100), stop_after=st.none() | st.sampled_from([0.0, 0.05, 0.3]))
    def stream_starts_during_a_move(self, i: int, stop_after: float | None) -> None:
        """A viewer asks for an encoder the decider has just chosen to move.

        With ``stop_after``, the stream stops again that much later: the host
        may then find it idle again when it checks.
        """
        self.until_a_move_starts()
        if not (moving := self.being_moved()):
            return
        enc = self.encoders[self.pick(moving, i)]
        enc.streaming = True
        self.changed()
        if stop_after is not None:
            self.advance(stop_after)
            if enc.streaming:
                enc.streaming = False
                self.changed()

    def streaming(self) -> list[str]:
        return [e for e, enc in self.encoders.items() if enc.streaming]

    @precondition(lambda self: self.streaming())
    @rule(i=st.integers(0, 100))
    def stop_stream(self, i: int) -> None:
        self.encoders[self.pick(self.streaming(), i)].streaming = False
        self.changed()

    @precondition(lambda self: len(self.alive) >= 2)
    @rule(i=st.integers(0, 100))
    def fail_server(self, i: int) -> None:
        sid = self.pick(list(self.alive), i)
        self.alive.discard(sid)
        self.loops.pop(sid).cancel()
        del self.balancers[sid], self.rebalance_moved[sid]
        self.membership_changed(sid)
        # Its encoders reconnect elsewhere at once, placed by choose_server.
        for eid in sorted(self.encoders):
            if self.encoders[eid].host == sid:
                self.encoders[eid].host = self.place(eid)

    @precondition(lambda self: set(self.weights) - self.alive)
    @rule(i=st.integers(0, 100))
    def return_server(self, i: int) -> None:
        sid = self.pick(list(set(self.weights) - self.alive), i)
        self.start_server(sid)  # a fresh process: its balancer starts unstable
        self.membership_changed(sid)

    @rule(name=st.sampled_from(POOL_NAMES), members=st.integers(1, 63))
    def set_pool(self, name: str, members: int) -> None:
        servers = sorted(self.weights)
        self.pools[name] = frozenset(s for k, s in enumerate(servers) if members >> k & 1) or (
            frozenset(servers[:1]))
        self.changed()

    @rule(name=st.sampled_from(POOL_NAMES))
    def drop_pool(self, name: str) -> None:
        self.pools.pop(name, None)
        self.changed()

    @precondition(lambda self: self.encoders)
    @rule(i=st.integers(0, 100), pool=st.none() | st.sampled_from(POOL_NAMES))
    def assign_encoder_pool(self, i: int, pool: str | None) -> None:
        self.encoders[self.pick(list(self.encoders), i)].pool = pool
        self.changed()

    @rule(domain=st.sampled_from(DOMAINS), pool=st.none() | st.sampled_from(POOL_NAMES))
    def assign_domain_pool(self, domain: str, pool: str | None) -> None:
        self.domain_pools[domain] = pool
        self.changed()

    @rule(seconds=st.sampled_from([0.05, 0.2, 0.5, 1.0, 2.5, 6.0]))
    def time_passes(self, seconds: float) -> None:
        self.advance(seconds)

    @rule()
    def until_a_move_starts(self) -> None:
        """Time passes until the decider starts a move (within a few seconds)."""
        end = self.clock.seconds() + self.settings.stability + 2 * self.settings.interval
        while not any(not sm.redirected for sm in self.pending.values()):
            if self.clock.seconds() >= end or (
                    not self.pending and balanced(self.alive_weights(), self.view()) == []):
                break  # no move is coming
            self.advance(0.05)

    @rule()
    def quiet(self) -> None:
        """Nothing happens for a while: the cluster ends balanced, and stays still."""
        start = self.clock.seconds()
        # Up to two moves per round; a round lasts a move and a tick or two.
        per_round = MOVE_TIME[1] + 2 * self.settings.interval
        enough = (self.settings.stability + self.settings.move_timeout
                  + 2 * per_round * (len(self.encoders) + 2))
        while self.clock.seconds() - start < enough:
            self.advance(self.settings.interval)
            if (not self.pending and all(b.stable_in() == 0 for b in self.balancers.values())
                    and balanced(self.alive_weights(), self.view()) == []):
                break
        took = self.clock.seconds() - start
        event(f"quiet: balanced within {5 * (int(took) // 5)}-{5 * (int(took) // 5) + 5} s")
        assert not self.pending
        assert balanced(self.alive_weights(), self.view()) == [], (took, self.describe())
        before = self.moves_started
        self.advance(2 * self.settings.stability + self.settings.move_timeout)
        assert self.moves_started == before, "moves in a quiet, balanced cluster"
        assert balanced(self.alive_weights(), self.view()) == []

    def teardown(self) -> None:
        moves = self.moves_started
        event(f"moves per run: {'0' if not moves else '1-5' if moves <= 5 else '6+'}")

    def describe(self) -> str:
        counts = self.counts()
        return f"weights={self.alive_weights()} counts={counts} pools={self.pools} " + str(
            [(p.encoder_id, p.server_id, p.streaming, sorted(p.pool)) for p in self.view()])

    # -- invariants --------------------------------------------------------------

    @invariant()
    def hosted_on_live_servers(self) -> None:
        for eid, enc in self.encoders.items():
            if enc.host is None:
                assert eid in self.pending and self.pending[eid].redirected
            else:
                assert enc.host in self.alive

    @invariant()
    def moves_under_way_within_the_limit(self) -> None:
        assert len(self.pending) <= self.settings.max_in_flight
        for b in self.balancers.values():
            assert len(b.in_flight()) <= self.settings.max_in_flight


ClusterModel.TestCase.settings = settings(
    max_examples=examples(200), stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestClusterBalancing = ClusterModel.TestCase
