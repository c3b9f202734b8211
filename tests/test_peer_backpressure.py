"""Two members sending large batches to each other at once must not stall their link.

A client connection stops reading while its answers are not read; a peer
connection must not: when both members write more than their transports
buffer (anti-entropy in both directions after a heal), each would wait for
the other to read, heartbeats would stop both ways, and the members would
declare each other suspect, then dead, over and over.  The simulator's
memory transports model the write buffers (``evserver/testing/memnet.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evserver.net import peer as peer_net
from evserver.state.membership import PeerState
from evserver.testing.realsim import RealCluster

BIG = "x" * 60_000  # one replicated field: a batch of a few is over the 64 KiB buffer


def test_large_batches_both_ways_do_not_stall_the_link(tmp_path: Path) -> None:
    sim = RealCluster(tmp_path, 2, encoders=1)
    try:
        sim.start()
        sim.advance(2.0)
        trace_before = len(sim.trace)
        # Both write a few large records in the same instant: their Updates
        # cross on the link, each larger than the transport's buffer.
        for sid in ("s1", "s2"):
            for i in range(4):
                sim.servers[sid].store.set_setting(f"{sid}-big-{i}", BIG + str(i))
        sim.advance(3.0)
        states = [t for t in sim.trace[trace_before:] if t[1] == "member"]
        assert not [t for t in states if t[-1] in (str(PeerState.SUSPECT),
                                                   str(PeerState.DEAD))], states
        assert sim.converged()
        for sid in ("s1", "s2"):
            settings = sim.servers[sid].store.list_settings()
            assert all(f"{other}-big-{i}" in settings for other in ("s1", "s2")
                       for i in range(4))
    finally:
        sim.close()


def test_a_peer_that_never_reads_is_disconnected_at_the_backlog_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sim = RealCluster(tmp_path, 2, encoders=1)
    try:
        sim.start()
        sim.advance(1.0)
        conn = sim.servers["s1"].cluster.connections["s2"]
        monkeypatch.setattr(peer_net, "MAX_BACKLOG", 256 * 1024)
        sim.freeze("s2")  # stops reading; s1's buffer fills up
        for i in range(12):
            sim.servers["s1"].store.set_setting(f"big-{i}", BIG + str(i))
        sim.advance(0.5)
        assert conn.backlog is None and not conn.connected
        # (Back to the shipped limit before the link comes back: anti-entropy
        # then sends more than the test's small limit.)
        monkeypatch.setattr(peer_net, "MAX_BACKLOG", 32 * 1024 * 1024)
        sim.thaw("s2")
        sim.advance(3.0)
        assert sim.converged()
    finally:
        sim.close()
