"""Balancing in the cluster simulator: real ClusterService (and ClusterBalancing) over TLS.

The balancer's rules have their own model tests (tests/test_balance.py);
these check the wiring: placement on connect through ``EncoderRedirect``,
moves asked of the hosting server with ``MoveRequest``, the host's idle
check, pools and weights read from the replicated store, and the
stability period after a server returns — with real clients that follow
the redirects, and viewers whose video must not pause.  Then a Hypothesis
state machine tells random stories (arrivals, departures, streams starting
and stopping, crashes, freezes, returns, new servers, pool and weight
changes) and after each quiet period checks the balance, the moves and the
video.
"""

from __future__ import annotations

import collections
import itertools
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from evserver.net.client import EncoderClient, Hop
from evserver.state.balance import BalanceSettings, balanced
from evserver.testing.realsim import DOMAIN, RealCluster
from tests.budget import examples

STABILITY = 5.0
BALANCE = BalanceSettings(stability=STABILITY, max_in_flight=2, move_timeout=10.0,
                          interval=0.5)


def make(tmp: Path, encoders: int = 6, size: int = 3) -> RealCluster:
    sim = RealCluster(tmp, size, encoders=encoders, seed=7, balance=BALANCE)
    sim.start()
    return sim


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="evs-balance-") as d:
        yield Path(d)


def counts(sim: RealCluster) -> dict[str, int]:
    c = collections.Counter(h[0] for h in sim.hosting().values() if h)
    return {s.server_id: c.get(s.server_id, 0) for s in sim.live_servers()}


def hosted_once(sim: RealCluster) -> bool:
    return all(len(h) == 1 for e, h in sim.hosting().items() if e in sim.running_encoders())


def test_encoders_that_all_connect_to_one_server_are_spread(tmp: Path) -> None:
    sim = make(tmp, encoders=6)
    for e in sim.encoder_ids:
        sim.add_encoder(e, first=0)
    sim.run_until(lambda: hosted_once(sim), 5.0)
    sim.advance(1.0)
    assert sorted(counts(sim).values()) == [2, 2, 2], sim.hosting()
    # One redirect at most per encoder, and the encoders said where they came from.
    assert all(enc.redirects <= 1 for enc in sim.encoders.values())
    assert sum(enc.redirects for enc in sim.encoders.values()) == 4


def test_a_returning_server_gets_its_share_after_the_stability_period(tmp: Path) -> None:
    sim = make(tmp, encoders=6)
    sim.start_clients(viewers=3, watch=False)
    sim.run_until(lambda: hosted_once(sim), 5.0)
    watched = ["cam0", "cam1"]
    viewers = sim.viewers
    for v in viewers:
        for e in watched:
            v.watch(e)
    sim.advance(2.0)
    before = {e: h[0] for e, h in sim.hosting().items()}
    victim = before["cam2"]
    sim.crash(victim)
    sim.advance(4.0)
    assert hosted_once(sim) and victim not in counts(sim)
    after_failover = {e: h[0] for e, h in sim.hosting().items()}
    t_restart = sim.now()
    sim.restart(victim)
    # Nothing moves during the stability period...
    sim.advance(STABILITY - 1.0)
    assert {e: h[0] for e, h in sim.hosting().items()} == after_failover
    # ... then the returning server gets its share, from the idle encoders only.
    took = sim.run_until(lambda: sorted(counts(sim).values()) == [2, 2, 2], 10.0)
    assert took is not None
    final = {e: h[0] for e, h in sim.hosting().items()}
    moved = [e for e in final if final[e] != after_failover[e]]
    assert len(moved) == 2 and not set(moved) & set(watched), (moved, final)
    # Watched video never paused beyond a frame interval or two.
    for index in range(len(viewers)):
        for e in watched:
            assert sim.frames.longest_gap(index, e, t_restart, sim.now()) < 0.5
    # And no more moves afterwards.
    sim.advance(10.0)
    assert {e: h[0] for e, h in sim.hosting().items()} == final


def test_a_pool_places_its_encoders_falls_back_and_returns(tmp: Path) -> None:
    sim = make(tmp, encoders=4)
    s1 = sim.servers["s1"]
    s1.store.create_pool("edge", ["s3"])
    s1.store.set_encoder_pool("cam0", "edge")
    sim.advance(1.0)  # replicated
    sim.add_encoder("cam0", first=0)
    sim.run_until(lambda: sim.hosting()["cam0"] == ["s3"], 3.0)
    assert sim.hosting()["cam0"] == ["s3"]
    assert sim.encoders["cam0"].redirects == 1
    sim.crash("s3")
    sim.advance(4.0)
    assert sim.hosting()["cam0"] in (["s1"], ["s2"])  # the pool is down: any server
    sim.restart("s3")
    took = sim.run_until(lambda: sim.hosting()["cam0"] == ["s3"], STABILITY + 5.0)
    assert took is not None and took >= STABILITY - 1.0, took


def test_weights_give_a_bigger_server_more_encoders(tmp: Path) -> None:
    sim = make(tmp, encoders=8)
    sim.servers["s2"].store.set_server_weight("s3", 2.0)
    sim.advance(1.0)
    for e in sim.encoder_ids:
        sim.add_encoder(e, first=0)
    sim.run_until(lambda: hosted_once(sim), 5.0)
    sim.advance(STABILITY + 5.0)
    assert counts(sim) == {"s1": 2, "s2": 2, "s3": 4}


def test_one_decider_and_a_streaming_encoder_is_never_moved(tmp: Path) -> None:
    sim = make(tmp, encoders=6)
    for e in sim.encoder_ids:
        sim.add_encoder(e, first=0)
    viewer = sim.add_viewer(first=1)
    sim.run_until(lambda: hosted_once(sim), 5.0)
    for e in sim.encoder_ids:
        viewer.watch(e)  # every encoder streams
    sim.advance(2.0)
    start = {e: h[0] for e, h in sim.hosting().items()}
    # Make the cluster unbalanced on paper: s3 gets weight 4.
    sim.servers["s1"].store.set_server_weight("s3", 4.0)
    sim.advance(STABILITY + 5.0)
    assert {e: h[0] for e, h in sim.hosting().items()} == start
    for s in sim.live_servers():
        b = s.cluster.balancing
        assert b.moves_started == 0
    # Only the smallest id decides: the others never start a move even when
    # the streams stop and the moves become possible.
    for e in sim.encoder_ids:
        viewer.unwatch(e)
    sim.advance(5.0 + STABILITY)  # stop_linger, then moves
    assert sim.servers["s2"].cluster.balancing.moves_started == 0
    assert sim.servers["s3"].cluster.balancing.moves_started == 0
    assert sim.servers["s1"].cluster.balancing.moves_started > 0
    s1 = sim.servers["s1"].cluster.balancing
    weights = s1.weights()
    assert balanced(weights, s1.encoders(weights)) == []


# -- the state machine ------------------------------------------------------------------
#
# The real servers (ClusterService, ClusterBalancing, the relay) and real
# clients on the memory network, under random arrivals, departures, streams,
# server failures and returns, pool and weight changes.  The test keeps its
# own book of what it asked for (who runs, who is watched, the pools, the
# weights) and judges the cluster against it with its own oracle, not the
# product's ``balanced``.

POOLS = ("east", "west")
ENCODERS = 8
#: A watch counts from this long after the viewer asked (the request's way to the host).
WATCH_GRACE = 0.2
#: Moves are redirects for these reasons.
MOVE_REASONS = ("balance", "pool")


class BalanceMachine(RuleBasedStateMachine):
    """After any story and a quiet stability period, the cluster is balanced."""

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory(prefix="evs-balance-sm-")
        self.sim: RealCluster = None  # type: ignore[assignment]
        #: encoder id -> when the viewer was asked to watch it.
        self.watched: dict[str, float] = {}
        #: encoder id -> when the viewer was asked to stop watching it.
        self.unwatched: dict[str, float] = {}
        self.pools: dict[str, frozenset[str]] = {}
        self.encoder_pool: dict[str, str | None] = {}
        self.domain_pool: str | None = None
        self.weights: dict[str, float] = {}
        #: Every encoder client ever started (an encoder that returns is a new one).
        self.clients: list[EncoderClient] = []
        #: How many hops of each client were judged already.
        self.judged: dict[int, int] = {}
        self.quiet_checks = 0

    @initialize()
    def boot(self) -> None:
        self.sim = RealCluster(Path(self._tmp.name), 3, encoders=ENCODERS, seed=11,
                               balance=BALANCE)
        self.sim.start()
        s1 = self.sim.servers["s1"].store
        for name, members in zip(POOLS, (["s1"], ["s2", "s3"]), strict=True):
            s1.create_pool(name, members)
            self.pools[name] = frozenset(members)
        self.viewer = self.sim.add_viewer(first=0)
        for i, e in enumerate(self.sim.encoder_ids[:6]):
            self._start(e, i)
        for e in self.sim.encoder_ids[:2]:
            self.watched[e] = self.sim.now()
            self.viewer.watch(e)
        self.sim.advance(1.0)

    # -- helpers --------------------------------------------------------------------

    def _start(self, encoder_id: str, first: int) -> None:
        self.clients.append(self.sim.add_encoder(encoder_id, first=first % len(self.sim.servers)))

    def _up(self) -> list[str]:
        return [sid for sid, s in self.sim.servers.items() if s.state == "up"]

    def _writer(self, i: int) -> Any:
        up = self._up()
        return self.sim.servers[up[i % len(up)]].store

    def _pool_of(self, encoder_id: str) -> frozenset[str]:
        name = self.encoder_pool.get(encoder_id) or self.domain_pool
        return self.pools.get(name, frozenset()) if name else frozenset()

    def _eligible(self, encoder_id: str, live: list[str]) -> list[str]:
        inside = [s for s in live if s in self._pool_of(encoder_id)]
        return inside or live

    def _streaming(self, encoder_id: str) -> bool:
        return encoder_id in self.watched

    def _knows_a_live_server(self, encoder_id: str) -> bool:
        hosts = {self.sim.servers[sid].host for sid in self._up()}
        return any(a.host in hosts for a in self.sim.encoders[encoder_id].servers)

    def _viewer_knows_a_live_server(self) -> bool:
        hosts = {self.sim.servers[sid].host for sid in self._up()}
        if any(a.host in hosts for a in self.viewer.home.servers):
            return True
        event("excused: a viewer that knows no live server")
        return False

    def _moves(self, since: float) -> list[tuple[str, Hop]]:
        return [(enc.encoder_id, hop) for enc in self.clients for hop in enc.history
                if hop.kind == "redirect" and hop.reason in MOVE_REASONS and hop.at >= since]

    def unbalanced(self) -> list[str]:
        """What is wrong with the placement now, judged from the test's own book."""
        live = self._up()
        hosting = self.sim.hosting()
        running = set(self.sim.running_encoders())
        out = []
        where: dict[str, str] = {}
        for e in running:
            hosts = hosting.get(e, [])
            if len(hosts) == 1:
                where[e] = hosts[0]
            elif not hosts and not self._knows_a_live_server(e):
                # Every server it was ever told of is down (the one that joined
                # meanwhile was never named to it): nobody can reach it.
                event("excused: an encoder that knows no live server")
            else:
                out.append(f"{e} is hosted on {hosts}")
        count = dict.fromkeys(live, 0)
        for host in where.values():
            count[host] += 1
        w = {s: self.weights.get(s, 1.0) for s in live}
        for e, a in sorted(where.items()):
            if self._streaming(e):
                continue
            allowed = self._eligible(e, live)
            if a not in allowed:
                out.append(f"idle {e} is on {a}, outside {allowed}")
                continue
            for b in allowed:
                if b != a and count[a] * w[b] > (count[b] + 1) * w[a]:
                    out.append(f"idle {e} could go from {a} ({count[a]}, weight {w[a]:g}) "
                               f"to {b} ({count[b]}, weight {w[b]:g})")
        return out

    # -- arrivals, departures, streams ----------------------------------------------------

    @rule(i=st.integers(0, ENCODERS - 1), first=st.integers(0, 3))
    def arrive(self, i: int, first: int) -> None:
        stopped = [e for e in self.sim.encoder_ids if e not in self.sim.running_encoders()]
        if stopped:
            self._start(stopped[i % len(stopped)], first)
            self.sim.advance(0.5)

    @precondition(lambda self: len(self.sim.running_encoders()) > 1)
    @rule(i=st.integers(0, ENCODERS - 1))
    def depart(self, i: int) -> None:
        running = self.sim.running_encoders()
        self.sim.encoders[running[i % len(running)]].stop()
        self.sim.advance(0.5)

    @rule(i=st.integers(0, ENCODERS - 1))
    def watch(self, i: int) -> None:
        e = self.sim.encoder_ids[i]
        if e not in self.watched:
            self.watched[e] = self.sim.now()
            self.viewer.watch(e)
            self.sim.advance(0.5)

    @rule(i=st.integers(0, ENCODERS - 1))
    def unwatch(self, i: int) -> None:
        e = self.sim.encoder_ids[i]
        if e in self.watched:
            del self.watched[e]
            self.unwatched[e] = self.sim.now()
            self.viewer.unwatch(e)
            self.sim.advance(0.5)

    # -- servers ------------------------------------------------------------------------

    @precondition(lambda self: len(self._up()) > 1)
    @rule(i=st.integers(0, 3))
    def crash(self, i: int) -> None:
        up = self._up()
        self.sim.crash(up[i % len(up)])
        self.sim.advance(0.5)

    @rule(i=st.integers(0, 3))
    def restart(self, i: int) -> None:
        down = [sid for sid, s in self.sim.servers.items() if s.state == "crashed"]
        if down:
            self.sim.restart(down[i % len(down)])
            self.sim.advance(0.5)

    @precondition(lambda self: len(self._up()) > 1)
    @rule(i=st.integers(0, 3))
    def freeze(self, i: int) -> None:
        up = self._up()
        self.sim.freeze(up[i % len(up)])
        self.sim.advance(0.5)

    @rule(i=st.integers(0, 3))
    def thaw(self, i: int) -> None:
        frozen = [sid for sid, s in self.sim.servers.items() if s.state == "frozen"]
        if frozen:
            self.sim.thaw(frozen[i % len(frozen)])
            self.sim.advance(0.5)

    @precondition(lambda self: len(self.sim.servers) < 4)
    @rule(i=st.integers(0, 3))
    def add_server(self, i: int) -> None:
        up = self._up()
        self.sim.add_server(up[i % len(up)])
        self.sim.advance(0.5)

    # -- shared settings ----------------------------------------------------------------

    @rule(name=st.sampled_from(POOLS), members=st.sets(st.sampled_from(["s1", "s2", "s3", "s4"]),
                                                       min_size=1, max_size=2),
          i=st.integers(0, 3))
    def change_pool(self, name: str, members: set[str], i: int) -> None:
        self._writer(i).update_pool(name, servers=sorted(members))
        self.pools[name] = frozenset(members)
        self.sim.advance(0.5)

    @rule(e=st.integers(0, ENCODERS - 1), pool=st.none() | st.sampled_from(POOLS),
          i=st.integers(0, 3))
    def assign_encoder(self, e: int, pool: str | None, i: int) -> None:
        encoder_id = self.sim.encoder_ids[e]
        self._writer(i).set_encoder_pool(encoder_id, pool)
        self.encoder_pool[encoder_id] = pool
        self.sim.advance(0.5)

    @rule(pool=st.none() | st.sampled_from(POOLS), i=st.integers(0, 3))
    def assign_domain(self, pool: str | None, i: int) -> None:
        self._writer(i).set_domain_pool(DOMAIN, pool)
        self.domain_pool = pool
        self.sim.advance(0.5)

    @rule(server=st.sampled_from(["s1", "s2", "s3", "s4"]), weight=st.sampled_from([1.0, 2.0, 3.0]),
          i=st.integers(0, 3))
    def weigh(self, server: str, weight: float, i: int) -> None:
        self._writer(i).set_server_weight(server, weight)
        self.weights[server] = weight
        self.sim.advance(0.5)

    @rule(dt=st.sampled_from([0.5, 2.0]))
    def wait(self, dt: float) -> None:
        self.sim.advance(dt)

    # -- the quiet period ---------------------------------------------------------------

    @rule()
    def quiet(self) -> None:
        """Nothing happens for the stability period and the moves' time: then balanced,
        each encoder moved once at most, and no more moves (no oscillation)."""
        self.quiet_checks += 1
        t0 = self.sim.now()
        limit = STABILITY + 2.0 + ENCODERS * (BALANCE.interval + 0.5)
        end = t0 + limit
        while self.unbalanced() and self.sim.now() < end:
            self.sim.advance(0.25)
        assert self.unbalanced() == [], (self.unbalanced(), self.sim.hosting(),
                                         self.describe())
        moves = self._moves(t0)
        moved = collections.Counter(e for e, _ in moves)
        assert all(n == 1 for n in moved.values()), moves
        event(f"moves in a quiet period: {min(sum(moved.values()), 4)}")
        # No oscillation: a further stability period changes nothing.
        before = self.sim.hosting()
        t1 = self.sim.now()
        self.sim.advance(STABILITY + 2.0)
        assert self._moves(t0) == moves, self._moves(t0)
        assert self.sim.hosting() == before
        # The video of every encoder watched all along never paused.
        for e, since in self.watched.items():
            if (e in self.sim.running_encoders() and since <= t0
                    and self._knows_a_live_server(e) and self._viewer_knows_a_live_server()):
                gap = self.sim.frames.longest_gap(0, e, t1, self.sim.now())
                assert gap < 0.5, (e, gap)

    def describe(self) -> str:
        return (f"up={self._up()} weights={self.weights} pools={dict(self.pools)} "
                f"encoder_pool={self.encoder_pool} domain_pool={self.domain_pool} "
                f"watched={sorted(self.watched)}")

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def no_streaming_encoder_is_moved(self) -> None:
        if self.sim is None:
            return
        for index, enc in enumerate(self.clients):
            hops = list(enc.history)
            for hop in hops[self.judged.get(index, 0):]:
                if hop.kind != "redirect" or hop.reason not in MOVE_REASONS:
                    continue
                since = self.watched.get(enc.encoder_id)
                assert since is None or hop.at < since + WATCH_GRACE, (
                    f"{enc.encoder_id}, watched since {since}, moved: {hop}")
            self.judged[index] = len(hops)

    @invariant()
    def one_placement_redirect_per_login(self) -> None:
        if self.sim is None:
            return
        for enc in self.clients:
            kinds = [hop.kind for hop in enc.history]
            assert "redirect-ignored" not in kinds, list(enc.history)
            hops = [h for h in enc.history if h.kind in ("redirect", "session")]
            for a, b in itertools.pairwise(hops):
                assert not (a.kind == b.kind == "redirect" and a.reason == b.reason
                            == "placement"), list(enc.history)

    def teardown(self) -> None:
        try:
            if self.sim is not None and sys.exc_info()[0] is None:
                self.quiet()
                assert self.sim.shutdown() == []
        finally:
            if self.sim is not None:
                self.sim.close()
            self._tmp.cleanup()


TestBalanceMachine = BalanceMachine.TestCase
TestBalanceMachine.settings = settings(
    max_examples=examples(30), stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
