"""Balancing in the cluster simulator: real ClusterService (and ClusterBalancing) over TLS.

The balancer's rules have their own model tests (tests/test_balance.py);
these check the wiring: placement on connect through ``EncoderRedirect``,
moves asked of the hosting server with ``MoveRequest``, the host's idle
check, pools and weights read from the replicated store, and the
stability period after a server returns — with real clients that follow
the redirects, and viewers whose video must not pause.
"""

from __future__ import annotations

import collections
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from evserver.state.balance import BalanceSettings, balanced
from evserver.testing.realsim import RealCluster

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
