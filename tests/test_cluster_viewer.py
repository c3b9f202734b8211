"""ClusterViewer on a simulated three-server cluster (in-memory network, task.Clock).

Every client gets a seeded random generator, so each run is the same run.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from evserver.media import SyntheticSource
from evserver.net.client import Address, ClientError, ClusterViewer, EncoderClient, TLSConfig
from evserver.testing.harness import VIEWER_PORT, MemoryServer, make_store
from evserver.testing.memnet import MemoryNetwork
from evserver.testing.simcluster import SimCluster
from evserver.wire import messages as m
from evserver.wire.framing import ErrorCode

DOMAINS = {"north": {"accounts": {"alice": "alice-pw"},
                     "encoders": [f"cam{i}" for i in range(4)]},
           "south": {"accounts": {"carol": "carol-pw"}, "encoders": ["cam9"]}}


@attrs.frozen
class Frame:
    at: float
    encoder_id: str
    server: str
    keyframe: bool
    timestamp_us: int


class World:
    """A SimCluster, its encoders, and one ClusterViewer that records what it receives."""

    def __init__(self, tmp_path: Path, seed: int = 1) -> None:
        self.store, self.secrets = make_store(tmp_path / "db.sqlite3", DOMAINS)
        self.sim = SimCluster(self.store)
        self.seed = seed
        self.frames: list[Frame] = []
        self.errors: list[tuple[str, ClientError]] = []
        #: Connection attempts of the viewer's sessions, by host.
        self.attempts: dict[str, int] = {}
        self.viewer: ClusterViewer | None = None

    @property
    def clock(self) -> Any:
        return self.sim.clock

    def rng(self) -> random.Random:
        self.seed += 1
        return random.Random(self.seed)

    def encoder(self, encoder_id: str, first: int) -> EncoderClient:
        enc = self.sim.encoder(encoder_id, self.secrets[encoder_id],
                               SyntheticSource(100_000, 25, keyframe_interval=25),
                               first=first, rng=self.rng())
        enc.start()
        return enc

    def counting_connector(self) -> Any:
        def connect(address: Address) -> Any:
            self.attempts[address.host] = self.attempts.get(address.host, 0) + 1
            return self.sim.net.endpoint(address.host, address.port, "127.0.0.1")
        return connect

    def start_viewer(self, home: int, account: str = "alice") -> ClusterViewer:
        servers = self.sim.addresses(VIEWER_PORT)
        servers = servers[home:] + servers[:home]
        viewer = ClusterViewer(self.clock, servers, account, f"{account}-pw",
                               TLSConfig(enabled=False), on_media=self._media,
                               on_watch_error=lambda e, err: self.errors.append((e, err)),
                               connector=self.counting_connector(), rng=self.rng())
        self.viewer = viewer
        viewer.start()
        self.sim.net.advance(0.3)
        assert viewer.home.server_id == f"s{home + 1}"
        return viewer

    def _media(self, encoder_id: str, media: m.Media) -> None:
        assert self.viewer is not None
        self.frames.append(Frame(self.clock.seconds(), encoder_id,
                                 self.viewer.placed[encoder_id], media.keyframe,
                                 media.timestamp_us))

    def advance(self, seconds: float) -> None:
        self.sim.net.advance(seconds)

    def last(self, encoder_id: str) -> Frame:
        return [f for f in self.frames if f.encoder_id == encoder_id][-1]

    def since(self, t: float, encoder_id: str) -> list[Frame]:
        return [f for f in self.frames if f.encoder_id == encoder_id and f.at > t]

    def live_sessions(self) -> dict[str, bool]:
        assert self.viewer is not None
        return {sid: s.up for sid, s in self.viewer.sessions.items()}

    def cut_bus(self, a: str, b: str) -> None:
        """Directory news no longer travels between servers ``a`` and ``b``."""
        deliver = self.sim._deliver

        def filtered(sender: MemoryServer, receiver: MemoryServer, location: Any) -> None:
            if {sender.core.server_id, receiver.core.server_id} != {a, b}:
                deliver(sender, receiver, location)

        self.sim._deliver = filtered  # type: ignore[method-assign]

    def count_dead(self, index: int, server_id: str) -> None:
        """Server ``index`` counts ``server_id`` dead: hears nothing from it, names it to
        no client (the clients reach both)."""
        server, sim = self.sim.servers[index], self.sim
        self.cut_bus(server.core.server_id, server_id)
        server._servers = lambda: tuple(
            i for i in sim.server_infos() if i.server_id != server_id)
        server.core.server_lost(server_id)
        server.core.push_server_list()

    def gaps(self, encoder_id: str, since: float) -> float:
        """The longest pause between frames of ``encoder_id`` after ``since``."""
        times = [since, *(f.at for f in self.since(since, encoder_id)), self.clock.seconds()]
        return max(b - a for a, b in itertools.pairwise(times))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    if w.viewer is not None:
        w.viewer.stop()
    w.store.close()


def watching(server: MemoryServer, encoder_id: str) -> int:
    """How many viewer sessions of ``server`` watch ``encoder_id``."""
    channel = server.core.channels.get(encoder_id)
    return len(channel.watchers) if channel is not None else 0


# --------------------------------------------------------------------------
# Placement and redirects


def test_watch_goes_to_the_hosting_server(world: World) -> None:
    world.encoder("cam0", first=0)
    viewer = world.start_viewer(home=1)
    viewer.watch("cam0")
    world.advance(1.0)
    assert viewer.placed == {"cam0": "s1"}
    assert set(viewer.sessions) == {"s1", "s2"} and viewer.sessions["s2"] is viewer.home
    frames = world.since(0, "cam0")
    assert len(frames) >= 20 and frames[0].keyframe
    assert {f.server for f in frames} == {"s1"} and viewer.frames_by_server == {
        "s1": len(frames)}
    # Placed from the listing: the home was never asked, nothing moved.
    assert "cam0" not in world.sim.servers[1].core.channels
    assert viewer.moves == 0


def test_redirect_to_a_server_the_home_did_not_name(world: World) -> None:
    world.encoder("cam0", first=0)
    viewer = world.start_viewer(home=1)
    # As if s1 had joined after the home's last ServerList: no address for it.
    del viewer.home.server_infos["s1"]
    viewer.watch("cam0")
    world.advance(1.0)
    # Asked at home (s2), redirected to s1 with its address, watched there.
    assert viewer.placed == {"cam0": "s1"}
    assert watching(world.sim.servers[0], "cam0") == 1
    assert watching(world.sim.servers[1], "cam0") == 0
    assert len(world.since(0, "cam0")) >= 20
    assert viewer.moves == 0  # following a redirect is not moving a watch


def test_redirect_from_a_stale_word(world: World) -> None:
    world.encoder("cam0", first=0)
    viewer = world.start_viewer(home=1)
    # The home's word is stale: it says s3, which knows better and redirects.
    viewer.infos["cam0"] = m.EncoderInfo("cam0", "Camera cam0", m.EncoderState.STREAMING, "s3")
    viewer.watch("cam0")
    world.advance(1.0)
    assert viewer.placed == {"cam0": "s1"}
    assert {f.server for f in world.frames} == {"s1"}
    # The session opened for s3 was closed once nothing was watched there.
    assert set(viewer.sessions) == {"s1", "s2"}
    assert not world.sim.servers[2].core.viewers


def test_standalone_server(tmp_path: Path) -> None:
    store, secrets = make_store(tmp_path / "db.sqlite3", DOMAINS)
    net = MemoryNetwork()
    server = MemoryServer(net, "127.0.0.1", store)
    frames: list[str] = []
    viewer = ClusterViewer(net.clock, [Address("127.0.0.1", VIEWER_PORT)], "alice",
                           "alice-pw", TLSConfig(enabled=False),
                           on_media=lambda e, f: frames.append(e),
                           connector=server.connector(), rng=random.Random(3))
    started: list[Any] = []
    viewer.start().addBoth(started.append)
    viewer.watch("cam1")  # before the login: placed once logged in
    net.advance(0.5)
    assert started == [viewer]
    enc = server.encoder("cam1", secrets["cam1"], SyntheticSource(10_000, 25, keyframe_interval=25),
                         rng=random.Random(4))
    enc.start()
    net.advance(1.0)
    assert len(frames) >= 20
    assert viewer.sessions == {"s1": viewer.home} and viewer.placed == {"cam1": "s1"}
    assert len(server.core.viewers) == 1
    viewer.stop()
    enc.stop()
    net.advance(0.1)
    assert not server.core.viewers
    store.close()


# --------------------------------------------------------------------------
# Failover


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_home_server_lost_rehomes_and_replaces(world: World, fault: str) -> None:
    encoders = [world.encoder(f"cam{i}", first=i) for i in range(3)]  # cam{i} on s{i+1}
    viewer = world.start_viewer(home=0)
    for i in range(3):
        viewer.watch(f"cam{i}")
    world.advance(2.0)
    assert viewer.placed == {"cam0": "s1", "cam1": "s2", "cam2": "s3"}
    t_fault = world.clock.seconds()
    (world.sim.kill if fault == "kill" else world.sim.freeze)(0)
    took = world.sim.net.run_until(lambda: bool(world.since(t_fault + 0.05, "cam0")), 10.0)
    assert took < 3.0
    # Long enough for the connections to the frozen s1 to time out (relays: 4.5 s).
    world.advance(3.0)
    # One failover each: what closes late towards s1 does not touch the new sessions.
    assert encoders[0].connects == 2 and viewer.home.connects == 2
    # The home moved to another server (chosen at random, so that a lost
    # server's clients spread); cam0 followed its encoder wherever it went.
    assert viewer.home.server_id in {"s2", "s3"} and viewer.home.up
    new_host = encoders[0].server_id
    assert new_host in {"s2", "s3"}
    assert viewer.placed == {"cam0": new_host, "cam1": "s2", "cam2": "s3"}
    assert viewer.moves == 1
    for i in range(3):
        assert world.clock.seconds() - world.last(f"cam{i}").at < 0.1
    # The frames in flight from s1, then the new host's, from a keyframe on (the
    # new host's session may tell of the move before the home is back).
    after = world.since(t_fault, "cam0")
    moved = next(i for i, f in enumerate(after) if f.server != "s1")
    assert after[moved].keyframe and {f.server for f in after[moved:]} == {new_host}
    # cam2 never stopped: its session to s3 had nothing to do with the home.
    cam2 = [f.at for f in world.frames if f.encoder_id == "cam2" and f.at > t_fault - 0.1]
    assert max(b - a for a, b in itertools.pairwise(cam2)) < 0.1
    assert set(world.live_sessions()) <= {"s2", "s3"}
    assert all(world.live_sessions().values())


def test_encoder_moves_and_the_watch_follows(world: World) -> None:
    enc = world.encoder("cam0", first=0)
    viewer = world.start_viewer(home=1)
    viewer.watch("cam0")
    world.advance(1.0)
    assert viewer.placed["cam0"] == "s1"
    # The encoder's connection breaks; it reconnects to the next server of its list.
    assert enc.control is not None
    enc.control.transport.abortConnection()  # type: ignore[union-attr]
    t_move = world.clock.seconds()
    world.advance(1.5)
    assert enc.server_id == "s2"
    assert viewer.placed["cam0"] == "s2" and viewer.moves == 1
    after = world.since(t_move, "cam0")
    assert after and after[0].keyframe and {f.server for f in after} == {"s2"}
    # Nothing is watched on s1 any more: its session is closed, s1 forgot the viewer.
    assert set(viewer.sessions) == {"s2"}
    assert not world.sim.servers[0].core.viewers
    assert "cam0" not in world.sim.servers[0].core.channels


def test_newer_registration_elsewhere_wins_and_the_watch_follows(world: World) -> None:
    old = world.encoder("cam0", first=0)
    viewer = world.start_viewer(home=1)
    viewer.watch("cam0")
    world.advance(1.0)
    new = world.encoder("cam0", first=2)  # the same id registers on s3
    world.advance(1.5)
    assert old.stopped and old.last_error is not None
    assert old.last_error.code is ErrorCode.SUPERSEDED
    assert new.server_id == "s3" and viewer.placed["cam0"] == "s3"
    assert world.clock.seconds() - world.last("cam0").at < 0.1
    assert world.last("cam0").server == "s3" and viewer.moves == 1
    assert "s1" not in viewer.sessions


def test_moves_while_the_watch_is_under_way(world: World) -> None:
    enc = world.encoder("cam0", first=0)
    viewer = world.start_viewer(home=1)
    world.advance(0.5)
    viewer.watch("cam0")  # the Watch to s1 is under way...
    assert viewer.placed["cam0"] == "s1"
    viewer._update(m.EncoderInfo("cam0", "Camera cam0", m.EncoderState.STREAMING, "s3"))
    assert viewer.placed["cam0"] == "s3"  # ...when word comes that it is on s3 (stale)
    world.advance(1.0)
    # s3 redirects back to s1; whatever answered first, it ends watched once, on s1.
    assert viewer.placed["cam0"] == "s1"
    assert watching(world.sim.servers[0], "cam0") == 1
    assert world.frames and {f.server for f in world.frames} == {"s1"}
    assert set(viewer.sessions) == {"s1", "s2"}
    enc.stop()


# --------------------------------------------------------------------------
# Servers that count each other dead while the viewer reaches both


def test_every_session_is_subscribed_to_the_updates(world: World) -> None:
    world.encoder("cam0", first=0)
    viewer = world.start_viewer(home=1)
    viewer.watch("cam0")
    world.advance(1.0)
    assert set(viewer.sessions) == {"s1", "s2"}
    for server in world.sim.servers[:2]:
        assert [v.subscribed for v in server.core.viewers] == [True]
    # After a reconnection too.
    session = viewer.sessions["s1"]
    assert session.control is not None
    session.control.transport.abortConnection()  # type: ignore[union-attr]
    world.advance(1.0)
    assert session.connects == 2 and session.up
    assert [v.subscribed for v in world.sim.servers[0].core.viewers] == [True]


def test_the_host_s_word_beats_the_home_that_counts_it_dead(world: World) -> None:
    """s2 and s3 count each other dead; the viewer, homed on s3, reaches both."""
    world.encoder("cam0", first=0)  # on s1, then on s2
    world.encoder("cam1", first=1)  # on s2
    viewer = world.start_viewer(home=2)
    viewer.watch("cam0")
    viewer.watch("cam1")
    world.advance(1.0)
    assert viewer.placed == {"cam0": "s1", "cam1": "s2"}
    s1, s2, s3 = world.sim.servers
    world.cut_bus("s2", "s3")
    s3.core.server_lost("s2")
    world.advance(0.5)
    # The home says cam1 is offline; s2, which hosts it, says it has it.
    assert s3.core.locations.where("cam1") is None
    assert viewer.infos["cam1"].server_id == "s2" and viewer.placed["cam1"] == "s2"
    # cam0 moves from s1 to s2: the home never hears of it.
    world.sim.net.kill_host(s1.host)
    t_move = world.clock.seconds()
    world.advance(2.0)
    assert "cam0" in s2.core.encoders and s3.core.locations.where("cam0") is None
    assert viewer.infos["cam0"].server_id == "s2" and viewer.placed["cam0"] == "s2"
    after = world.since(t_move, "cam0")
    assert after and after[0].keyframe and {f.server for f in after} == {"s2"}
    assert after[0].at - t_move < 1.5
    assert viewer.moves == 1
    # The home flaps: s2 alive again, dead again...  The watches stay where they are.
    t_flap = world.clock.seconds()
    for _ in range(3):
        s3.core.server_back("s2")
        world.advance(0.3)
        s3.core.server_lost("s2")
        world.advance(0.3)
    assert viewer.placed == {"cam0": "s2", "cam1": "s2"} and viewer.moves == 1
    assert viewer.infos["cam1"].server_id == "s2"
    assert world.gaps("cam0", t_flap) < 0.1 and world.gaps("cam1", t_flap) < 0.1


def test_a_server_s_word_that_it_lost_an_encoder_beats_a_stale_one(world: World) -> None:
    enc = world.encoder("cam0", first=0)
    viewer = world.start_viewer(home=1)
    viewer.watch("cam0")
    world.advance(1.0)
    enc.stop()
    world.advance(0.5)
    assert viewer.infos["cam0"].state == m.EncoderState.OFFLINE
    # Late news at home (an announcement relayed late) that cam0 is on s1:
    # s1, which the viewer hears itself, says it is not.
    viewer._update(m.EncoderInfo("cam0", "Camera cam0", m.EncoderState.STREAMING, "s1"))
    assert viewer.infos["cam0"].state == m.EncoderState.OFFLINE
    # Newer news of another server is taken.
    viewer._update(m.EncoderInfo("cam0", "Camera cam0", m.EncoderState.ONLINE, "s3"))
    assert viewer.infos["cam0"].server_id == "s3" and viewer.placed["cam0"] == "s3"


def test_the_servers_the_home_does_not_name_are_asked(world: World) -> None:
    """cam0 registers on s1, which the home (s2) counts dead; the viewer holds no
    session there, but knows s1's address: it asks s1 while cam0 is lost."""
    viewer = world.start_viewer(home=1)
    viewer.watch("cam0")
    world.advance(0.5)
    s1, s2, _ = world.sim.servers
    world.count_dead(1, "s1")
    world.advance(0.2)
    assert "s1" not in viewer.home.server_infos and viewer.placed == {"cam0": "s2"}
    t_start = world.clock.seconds()
    world.encoder("cam0", first=0)
    world.advance(1.0)
    assert "cam0" in s1.core.encoders and s2.core.locations.where("cam0") is None
    assert viewer.placed == {"cam0": "s1"}
    assert len(world.frames) >= 20 and world.frames[0].keyframe
    assert world.frames[0].at - t_start < 0.1
    assert {f.server for f in world.frames} == {"s1"}
    # Nothing is lost any more: no session is kept for asking.
    world.encoder("cam1", first=1)
    viewer.watch("cam1")
    world.advance(1.0)
    assert set(viewer.sessions) == {"s1", "s2"}
    viewer.unwatch("cam0")
    world.advance(0.5)
    assert set(viewer.sessions) == {"s2"}


def test_asking_a_dead_server_backs_off(world: World) -> None:
    viewer = world.start_viewer(home=1)
    viewer.watch("cam0")  # never online: lost all along
    world.advance(0.5)
    s1, s2, _ = world.sim.servers
    world.sim.kill(0)
    world.advance(2.0)
    s2.core.push_server_list()  # without s1
    world.advance(0.1)
    assert "s1" not in viewer.home.server_infos
    world.advance(1.0)
    first = world.attempts.get(s1.host, 0)
    assert first >= 1
    world.advance(60.0)
    # Asked again after 2, 4, 8, 16, 32 s: a few attempts each time, not more.
    later = world.attempts.get(s1.host, 0) - first
    assert 0 < later <= 5 * 3, later
    assert viewer.placed == {"cam0": "s2"} and viewer.sessions["s2"].up


def test_a_server_list_naming_the_host_moves_a_watch_made_at_home(world: World) -> None:
    """Told of an encoder on a server it has no address of, the viewer asks at home;
    when a ServerList gives the address, it watches the encoder there."""
    world.encoder("cam0", first=0)
    world.advance(0.5)
    world.sim.alive.discard("s1")  # the others do not name s1 any more
    viewer = world.start_viewer(home=1)
    assert "s1" not in viewer.home.server_infos
    viewer.watch("cam0")
    world.advance(1.0)
    assert viewer.infos["cam0"].server_id == "s1"
    # s2 knows where cam0 is, but cannot name s1: the watch waits at home.
    assert viewer.placed == {"cam0": "s2"} and not world.frames
    world.sim.alive.add("s1")
    world.sim.servers[1].core.push_server_list()
    world.advance(1.0)
    assert viewer.placed == {"cam0": "s1"}
    assert world.frames and {f.server for f in world.frames} == {"s1"}
    assert set(viewer.sessions) == {"s1", "s2"}


# --------------------------------------------------------------------------
# Unwatching, refusals, leaks


def test_unwatch(world: World) -> None:
    world.encoder("cam0", first=0)
    world.encoder("cam1", first=1)
    viewer = world.start_viewer(home=1)
    viewer.watch("cam0")
    viewer.watch("cam1")
    world.advance(1.0)
    assert set(viewer.sessions) == {"s1", "s2"}
    viewer.unwatch("cam0")
    world.advance(0.2)
    n = len(world.frames)
    world.advance(1.0)
    assert {f.encoder_id for f in world.frames[n:]} == {"cam1"}
    assert "cam0" not in viewer.wanted and "cam0" not in viewer.placed
    # Nothing left on s1: its session is closed, and the encoder is asked to stop.
    assert set(viewer.sessions) == {"s2"} and not world.sim.servers[0].core.viewers
    viewer.unwatch("cam0")  # twice: nothing happens
    viewer.unwatch("cam1")  # on the home's server: the home stays
    world.advance(0.5)
    assert viewer.sessions == {"s2": viewer.home} and watching(world.sim.servers[1], "cam1") == 0


def test_unwatch_before_the_answer(world: World) -> None:
    world.encoder("cam1", first=1)
    viewer = world.start_viewer(home=1)
    viewer.watch("cam1")
    viewer.unwatch("cam1")  # the Watch has not even left
    world.advance(1.0)
    assert world.frames == []
    assert watching(world.sim.servers[1], "cam1") == 0


def test_missing_or_foreign_encoder_is_an_error(world: World) -> None:
    world.encoder("cam0", first=0)
    world.encoder("cam9", first=2)  # hosted on s3, but of domain south
    viewer = world.start_viewer(home=1)
    for encoder_id in ("cam0", "cam9", "nope"):
        viewer.watch(encoder_id)
    world.advance(1.0)
    assert [(e, err.code) for e, err in world.errors] == [
        ("cam9", ErrorCode.NOT_FOUND), ("nope", ErrorCode.NOT_FOUND)]
    assert str(world.errors[0][1]) == "no encoder 'cam9'"
    assert list(viewer.wanted) == ["cam0"] and viewer.placed == {"cam0": "s1"}
    assert len(world.since(0, "cam0")) >= 20  # the others are unaffected
    assert "s3" not in viewer.sessions


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_no_session_leaks_to_a_dead_server(world: World, fault: str) -> None:
    cam0 = world.encoder("cam0", first=0)  # on s1, dies with it
    world.encoder("cam1", first=0)  # on s1, moves to s2
    world.encoder("cam2", first=2)  # on s3
    viewer = world.start_viewer(home=1)
    for i in range(3):
        viewer.watch(f"cam{i}")
    world.advance(1.0)
    assert set(viewer.sessions) == {"s1", "s2", "s3"}
    cam0.stop()
    (world.sim.kill if fault == "kill" else world.sim.freeze)(0)
    world.advance(2.0)
    assert viewer.placed["cam1"] == "s2"
    world.advance(4.0)
    # cam0 is offline: it waits for its encoder at home; nothing is kept for s1.
    assert viewer.placed == {"cam0": "s2", "cam1": "s2", "cam2": "s3"}
    assert world.live_sessions() == {"s2": True, "s3": True}
    tried = world.attempts.get("127.0.1.1", 0)
    world.advance(10.0)
    assert world.attempts.get("127.0.1.1", 0) == tried  # nobody knocks at s1 any more
    # cam0 comes back on s3: watched there.
    back = world.encoder("cam0", first=2)
    world.advance(1.0)
    assert back.server_id == "s3" and viewer.placed["cam0"] == "s3"
    assert world.last("cam0").server == "s3"
    assert world.clock.seconds() - world.last("cam0").at < 0.1


def test_stop_closes_every_session(world: World) -> None:
    world.encoder("cam0", first=0)
    world.encoder("cam2", first=2)
    viewer = world.start_viewer(home=1)
    viewer.watch("cam0")
    viewer.watch("cam2")
    world.advance(1.0)
    assert len(viewer.sessions) == 3
    viewer.stop()
    world.advance(0.5)
    assert all(not s.core.viewers for s in world.sim.servers)
    n = len(world.frames)
    world.advance(1.0)
    assert len(world.frames) == n


# --------------------------------------------------------------------------
# Determinism


def failover_run(tmp_path: Path) -> list[Frame]:
    tmp_path.mkdir()
    w = World(tmp_path)
    try:
        for i in range(3):
            w.encoder(f"cam{i}", first=i)
        viewer = w.start_viewer(home=0)
        for i in range(3):
            viewer.watch(f"cam{i}")
        w.advance(1.0)
        w.sim.kill(0)
        w.advance(3.0)
        viewer.stop()
        return w.frames
    finally:
        w.store.close()


def test_a_run_replays_exactly(tmp_path: Path) -> None:
    first = failover_run(tmp_path / "a")
    second = failover_run(tmp_path / "b")
    assert len(first) > 200
    assert first == second
