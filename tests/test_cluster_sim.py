"""Failover and redirects in a simulated three-server cluster (no real time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from evserver.media import SyntheticSource
from evserver.testing.harness import make_store
from evserver.testing.simcluster import SimCluster
from evserver.wire import messages as m

DOMAINS = {"north": {"accounts": {"alice": "alice-pw"},
                     "encoders": [f"cam{i}" for i in range(6)]}}


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    store, secrets = make_store(tmp_path / "db.sqlite3", DOMAINS)
    yield SimCluster(store), secrets
    store.close()


def source() -> SyntheticSource:
    return SyntheticSource(1_000_000, 25, keyframe_interval=25)


def test_viewer_is_redirected_to_the_hosting_server(cluster: Any) -> None:
    sim, secrets = cluster
    enc = sim.encoder("cam0", secrets["cam0"], source(), first=0)
    enc.start()
    frames: list[tuple[str, m.Media]] = []
    viewer = sim.viewer("alice", "alice-pw", first=1,
                        on_media=lambda e, f: frames.append((e, f)))
    viewer.start()
    sim.net.advance(0.2)
    assert enc.server_id == "s1" and viewer.home.server_id == "s2"
    viewer.watch("cam0")
    sim.net.advance(1.0)
    assert viewer.placed["cam0"] == "s1"
    assert len(frames) >= 20 and frames[0][1].keyframe
    # The video came from s1 only: s2 relays nothing.
    assert sim.servers[1].core.channels == {}


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_failover_resumes_video_within_budget(cluster: Any, fault: str) -> None:
    sim, secrets = cluster
    encoders = []
    for i in range(6):
        enc = sim.encoder(f"cam{i}", secrets[f"cam{i}"], source(), first=i % 3)
        enc.start()
        encoders.append(enc)
    last_frame: dict[str, float] = {}
    viewers = []
    for home in range(3):
        v = sim.viewer("alice", "alice-pw", first=home,
                       on_media=lambda e, f: last_frame.__setitem__(e, sim.clock.seconds()))
        v.start()
        viewers.append(v)
    sim.net.advance(0.3)
    for v in viewers:
        for i in range(6):
            v.watch(f"cam{i}")
    sim.net.advance(2.0)
    affected = [e.encoder_id for e in encoders if e.server_id == "s1"]
    assert affected, "some encoders are hosted by s1"
    assert all(sim.clock.seconds() - t < 0.1 for t in last_frame.values())

    t_fault = sim.clock.seconds()
    (sim.kill if fault == "kill" else sim.freeze)(0)
    resumed: dict[str, float] = {}

    def all_resumed() -> bool:
        for e in affected:
            if last_frame[e] > t_fault + 0.05 and e not in resumed:
                resumed[e] = last_frame[e] - t_fault
        return len(resumed) == len(affected)

    took = sim.net.run_until(all_resumed, timeout=10.0)
    assert took < 3.0, (fault, resumed)
    for enc in encoders:
        assert enc.server_id != "s1"
    # Every live encoder is hosted by exactly one live server.
    hosted = [eid for s in sim.servers[1:] for eid in s.core.encoders]
    assert sorted(hosted) == sorted(f"cam{i}" for i in range(6))
