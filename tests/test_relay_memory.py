"""The whole standalone server with real clients on the in-memory network (no real time)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from twisted.python.failure import Failure

from evserver.media import SyntheticSource
from evserver.net.client import ClientError
from evserver.state.relay import Limits
from evserver.testing.harness import MemoryServer, make_store
from evserver.testing.memnet import MemoryNetwork
from evserver.wire import messages as m
from evserver.wire.framing import ErrorCode

DOMAINS = {
    "north": {"accounts": {"alice": "alice-pw", "bob": "bob-pw"}, "encoders": ["cam1", "cam2"]},
    "south": {"accounts": {"carol": "carol-pw"}, "encoders": ["cam9"]},
}


@pytest.fixture
def world(tmp_path: Path) -> Any:
    net = MemoryNetwork()
    store, secrets = make_store(tmp_path / "db.sqlite3", DOMAINS)
    server = MemoryServer(net, "127.0.0.1", store)
    yield net, server, secrets
    store.close()


def result(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def start_encoder(net: MemoryNetwork, server: MemoryServer, secrets: dict[str, str],
                  encoder_id: str = "cam1", fps: float = 25.0) -> Any:
    enc = server.encoder(encoder_id, secrets[encoder_id],
                         SyntheticSource(2_000_000, fps, keyframe_interval=25))
    d = enc.start()
    net.flush()
    result(d)
    return enc


def start_viewer(net: MemoryNetwork, server: MemoryServer, account: str = "alice",
                 password: str | None = None) -> tuple[Any, list[tuple[str, m.Media]]]:
    frames: list[tuple[str, m.Media]] = []
    viewer = server.viewer(account, password or f"{account}-pw",
                           on_media=lambda e, media: frames.append((e, media)))
    d = viewer.start()
    net.flush()
    result(d)
    return viewer, frames


def test_encoder_to_viewer(world: Any) -> None:
    net, server, secrets = world
    enc = start_encoder(net, server, secrets)
    viewer, frames = start_viewer(net, server)
    listed = viewer.list_encoders()
    net.flush()
    infos = {i.encoder_id: i for i in result(listed)}
    assert set(infos) == {"cam1", "cam2"}  # never cam9: another domain
    assert infos["cam1"].state == m.EncoderState.ONLINE
    assert infos["cam1"].server_id == "s1"
    assert infos["cam2"].state == m.EncoderState.OFFLINE
    assert not enc.streaming

    w = viewer.watch("cam1")
    net.advance(1.0)
    watched = result(w)
    assert enc.streaming and enc.starts == 1
    assert 20 <= len(frames) <= 27
    assert frames[0][1].keyframe
    assert all(e == "cam1" and f.stream_id == watched.stream_id for e, f in frames)
    assert server.core.encoders["cam1"].streaming


def test_updates_pushed_to_subscribed_viewers(world: Any) -> None:
    net, server, secrets = world
    updates: list[m.EncoderInfo] = []
    viewer, _ = start_viewer(net, server)
    viewer.on_update = updates.append
    result_list = viewer.list_encoders()
    net.flush()
    result(result_list)
    enc = start_encoder(net, server, secrets, "cam2")
    other = start_encoder(net, server, secrets, "cam9")  # another domain: not pushed
    assert [(u.encoder_id, u.state) for u in updates] == [("cam2", m.EncoderState.ONLINE)]
    viewer.watch("cam2")
    net.advance(0.5)
    assert updates[-1].state == m.EncoderState.STREAMING
    enc.stop()
    net.flush()
    assert (updates[-1].encoder_id, updates[-1].state) == ("cam2", m.EncoderState.OFFLINE)
    other.stop()


def test_wrong_secret_and_password_are_refused(world: Any) -> None:
    net, server, _secrets = world
    from evserver.media import SyntheticSource as S

    enc = server.encoder("cam1", "wrong", S(1000, 25, 25))
    d = enc.start()
    net.flush()
    with pytest.raises(ClientError) as info:
        result(d)
    assert info.value.code == ErrorCode.AUTH_FAILED
    enc2 = server.encoder("nosuch", "x", S(1000, 25, 25))
    d2 = enc2.start()
    net.flush()
    with pytest.raises(ClientError) as info2:
        result(d2)
    assert str(info2.value) == str(info.value)  # ids cannot be probed
    viewer = server.viewer("alice", "bad")
    d3 = viewer.start()
    net.flush()
    with pytest.raises(ClientError) as info3:
        result(d3)
    assert info3.value.code == ErrorCode.AUTH_FAILED
    assert server.core.stats() == {"encoders": 0, "streaming": 0, "viewers": 0, "channels": 0}


def test_other_domain_encoder_is_not_found(world: Any) -> None:
    net, server, secrets = world
    start_encoder(net, server, secrets, "cam9")
    viewer, frames = start_viewer(net, server)
    for encoder_id in ("cam9", "missing"):
        d = viewer.watch(encoder_id)
        net.advance(0.5)
        with pytest.raises(ClientError) as info:
            result(d)
        assert info.value.code == ErrorCode.NOT_FOUND
        assert str(info.value) == f"no encoder {encoder_id!r}"
    assert frames == []
    assert viewer.control is not None and viewer.control.connected  # refusal keeps it


def test_duplicate_watch_refused_and_unwatch_stops_encoder(world: Any) -> None:
    net, server, secrets = world
    enc = start_encoder(net, server, secrets)
    viewer, frames = start_viewer(net, server)
    result_w = viewer.watch("cam1")
    net.advance(0.2)
    watched = result(result_w)
    again = viewer._request(lambda rid: m.Watch(rid, "cam1"))
    net.flush()
    with pytest.raises(ClientError) as info:
        result(again)
    assert info.value.code == ErrorCode.DUPLICATE
    u = viewer.unwatch("cam1")
    net.flush()
    assert result(u).stream_id == watched.stream_id
    assert enc.streaming  # lingers
    net.advance(server.core.limits.stop_linger + 0.1)
    assert not enc.streaming
    n = len(frames)
    net.advance(1.0)
    assert len(frames) == n


def test_encoder_reconnect_resumes_viewer(world: Any) -> None:
    net, server, secrets = world
    enc = start_encoder(net, server, secrets)
    viewer, frames = start_viewer(net, server)
    viewer.watch("cam1")
    net.advance(0.5)
    before = len(frames)
    assert before > 5
    # The encoder's connection dies; it reconnects by itself.
    assert enc.control is not None
    enc.control.transport.abortConnection()
    net.flush()
    net.advance(1.0)
    assert enc.connects == 2 and enc.streaming
    after = frames[before:]
    assert len(after) > 10
    assert after[0][1].keyframe  # a viewer resumes at a keyframe


def test_newer_registration_supersedes(world: Any) -> None:
    net, server, secrets = world
    first = start_encoder(net, server, secrets)
    second = start_encoder(net, server, secrets)
    net.flush()
    net.advance(5.0)
    assert server.core.encoders["cam1"].link.transport.other.protocol is second.control
    assert first.last_error is not None and first.last_error.code == ErrorCode.SUPERSEDED
    assert first.stopped and first.control is None  # it does not fight back
    assert second.connects == 1 and second.control is not None


def test_slow_viewer_does_not_disturb_fast_viewer(tmp_path: Path) -> None:
    net = MemoryNetwork()
    store, secrets = make_store(tmp_path / "db.sqlite3", DOMAINS)
    limits = Limits(viewer_queue_bytes=96 * 1024)
    server = MemoryServer(net, "127.0.0.1", store, limits=limits)
    start_encoder(net, server, secrets, fps=50)
    fast, fast_frames = start_viewer(net, server, "alice")
    slow, slow_frames = start_viewer(net, server, "bob")
    fast.watch("cam1")
    slow.watch("cam1")
    net.advance(0.5)
    assert slow.relay is not None
    # Shorter than the keepalive timeout, so the client itself does not give up.
    slow.relay.transport.reader_stalled = True
    stalled_at = len(slow_frames)
    session = next(v for v in server.core.viewers if v.account == "bob")
    assert session.feed is not None
    peak = 0
    for _ in range(200):
        net.advance(0.01)
        peak = max(peak, session.feed.queued_bytes)
    assert len(slow_frames) == stalled_at
    assert peak <= limits.viewer_queue_bytes
    assert session.feed.queue_drops >= 1
    slow.relay.transport.reader_stalled = False
    net.advance(1.0)
    assert len(slow_frames) > stalled_at + 25, "the slow viewer resumes"
    # The fast viewer got every frame, in order, without a gap.
    ts = [f.timestamp_us for _, f in fast_frames]
    assert ts == sorted(ts)
    diffs = [b - a for a, b in itertools.pairwise(ts)]
    assert all(d == 20_000 for d in diffs), sorted(set(diffs))
    # The slow one never got a delta frame whose reference it missed.
    slow_ts = [f for _, f in slow_frames]
    for prev, cur in itertools.pairwise(slow_ts):
        if cur.timestamp_us - prev.timestamp_us > 20_000:
            assert cur.keyframe
    assert slow.connects == 1  # no reconnection was needed
    store.close()


def test_viewer_that_never_reads_is_dropped(world: Any) -> None:
    net, server, secrets = world
    start_encoder(net, server, secrets, fps=50)
    viewer, _ = start_viewer(net, server)
    viewer.watch("cam1")
    net.advance(0.5)
    assert viewer.relay is not None
    transport = viewer.relay.transport
    transport.reader_stalled = True
    session = next(iter(server.core.viewers))
    assert session.feed is not None
    net.advance(7.0, step=0.1)
    # The relay connection was dropped (the client stopped reading, so its
    # keepalive gave up on the server; the server's stall timeout is later);
    # nothing it queued for it is left.
    assert transport.disconnected
    assert session.closed or session.feed is None
