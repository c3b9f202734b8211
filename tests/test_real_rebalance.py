"""Real processes: a returning server gets its share of encoders back, streams undisturbed.

Three ``twistd -n evserver`` servers on loopback over TLS balancing with a
3 s stability period (the product's default is 60 s), 12 encoders in one
child process and a ClusterViewer per server watching 3 of them (the
others are idle).  Placement spreads the encoders 4/4/4; the busiest
server is killed and its encoders fail over; it is restarted and, after
the stability period, receives its share back: every server within one of
its share, no watched (streaming) encoder moved, no viewer paused longer
than a second, and no move after balance was reached.

A unit test checks ``imbalance`` itself (no processes).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from evserver.tools.rebalance import RebalanceBench, imbalance
from tests.realproc import requires_evserver

STABILITY = 3.0


def test_imbalance_names_what_is_off() -> None:
    servers = ["s1", "s2", "s3"]
    assert imbalance({"a": "s1", "b": "s2", "c": "s3", "d": "s1"}, servers) == []
    assert imbalance({"a": "s1", "b": "s1", "c": "s1", "d": "s2"}, servers) == [
        "s1 hosts 3 (share 1.3)", "s3 hosts 0 (share 1.3)"]
    assert imbalance({"a": None, "b": "s4"}, servers) == [
        "1 encoder(s) not online", "1 on s4, not a live server"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RebalanceBench]:
    root = tmp_path_factory.mktemp("rebalance")
    with RebalanceBench(servers=3, encoders=12, watched=3, stability=STABILITY, tls=True,
                        root=root, bitrate_bps=100_000) as b:
        yield b
    for server in b.cluster.servers:
        assert "Traceback" not in server.log_text(), server.log_path


@pytest.mark.real
@requires_evserver
def test_placement_spreads_the_encoders(bench: RebalanceBench) -> None:
    bench.wait_balanced(bench.live_servers(), 20.0)
    counts = sorted(list(bench.hosts().values()).count(s) for s in bench.cluster.server_ids)
    assert counts == [4, 4, 4]


@pytest.mark.real
@requires_evserver
def test_a_returning_server_gets_its_share_without_disturbing_viewers(
        bench: RebalanceBench) -> None:
    trial = bench.trial()
    assert trial.failed_over == 4
    assert trial.balanced_s is not None, trial
    assert trial.balanced_s >= STABILITY, trial  # moves waited for the stability period
    assert sorted(trial.counts.values()) == [4, 4, 4], trial
    assert trial.streaming_moved == 0, trial
    assert trial.moves == 4, trial  # its share back, each moved once, nothing else
    assert trial.max_gap_s is not None and trial.max_gap_s < 1.0, trial
    assert trial.later_moves == 0, trial
