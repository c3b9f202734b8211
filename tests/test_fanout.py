"""Tests for evserver.state.fanout: GOP cache, keyframe skipping, backpressure."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from evserver.state.fanout import IMediaSink, Stream, ViewerFeed
from tests.budget import examples

# -- helpers -------------------------------------------------------------------


def frame(stream_id: int, seq: int, keyframe: bool, size: int = 32) -> bytes:
    """A recognisable frame: ``"<stream>:<seq>:<K|P>|"`` padded to ``size`` bytes."""
    head = b"%d:%d:%s|" % (stream_id, seq, b"K" if keyframe else b"P")
    return head + b"x" * max(0, size - len(head))


def parse(data: bytes) -> tuple[int, int, bool]:
    stream_id, seq, kind = data.split(b"|", 1)[0].split(b":")
    return int(stream_id), int(seq), kind == b"K"


@implementer(IMediaSink)
class RecordingSink:
    """Records every write (the very objects) and stalled() calls."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.stalled_calls = 0
        self.on_write: Callable[[bytes], None] | None = None
        self.on_stalled: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        if self.on_write is not None:
            self.on_write(data)

    def stalled(self) -> None:
        self.stalled_calls += 1
        if self.on_stalled is not None:
            self.on_stalled()

    def seqs(self) -> list[tuple[int, int, bool]]:
        return [parse(d) for d in self.writes]


@attrs.define
class Callbacks:
    keyframe_requests: list[float] = attrs.field(factory=list)
    viewer_counts: list[int] = attrs.field(factory=list)


def make_stream(
    clock: Clock,
    stream_id: int = 1,
    gop_cache_bytes: int = 10_000,
    interval: float = 1.0,
) -> tuple[Stream, Callbacks]:
    cb = Callbacks()
    stream = Stream(
        stream_id,
        clock,
        gop_cache_bytes,
        interval,
        on_keyframe_needed=lambda: cb.keyframe_requests.append(clock.seconds()),
        on_viewers_changed=cb.viewer_counts.append,
    )
    return stream, cb


def make_feed(
    clock: Clock, max_queue_bytes: int = 1000, stall_timeout: float = 5.0
) -> tuple[ViewerFeed, RecordingSink]:
    sink = RecordingSink()
    return ViewerFeed(sink, clock, max_queue_bytes, stall_timeout), sink


class Publisher:
    """Publishes numbered frames on one stream and remembers them."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.frames: list[bytes] = []

    def __call__(self, keyframe: bool, size: int = 32) -> bytes:
        data = frame(self.stream.stream_id, len(self.frames), keyframe, size)
        self.frames.append(data)
        self.stream.publish(keyframe, data)
        return data


# -- basic delivery --------------------------------------------------------------


def test_sink_provides_interface() -> None:
    assert verifyObject(IMediaSink, RecordingSink())


def test_new_viewer_gets_cached_gop_at_once() -> None:
    clock = Clock()
    stream, cb = make_stream(clock)
    pub = Publisher(stream)
    pub(False)  # before any keyframe: not cacheable
    k, p1, p2 = pub(True), pub(False), pub(False)
    feed, sink = make_feed(clock)
    stream.add_viewer(feed)
    assert sink.writes == [k, p1, p2]
    assert all(a is b for a, b in zip(sink.writes, [k, p1, p2], strict=True))
    p3 = pub(False)
    assert sink.writes[-1] is p3
    assert cb.keyframe_requests == [0.0]
    assert cb.viewer_counts == [1]
    assert feed.frames_written == 4
    assert feed.bytes_written == 4 * 32


def test_same_object_written_to_every_viewer() -> None:
    clock = Clock()
    stream, _ = make_stream(clock)
    pairs = [make_feed(clock) for _ in range(5)]
    for feed, _sink in pairs:
        stream.add_viewer(feed)
    data = frame(1, 0, True)
    stream.publish(True, data)
    for _feed, sink in pairs:
        assert len(sink.writes) == 1
        assert sink.writes[0] is data


def test_viewer_without_cache_waits_for_keyframe_and_requests_one() -> None:
    clock = Clock()
    stream, cb = make_stream(clock)
    pub = Publisher(stream)
    pub(False)
    feed, sink = make_feed(clock)
    stream.add_viewer(feed)
    assert sink.writes == []
    assert cb.keyframe_requests == [0.0]
    assert feed.is_waiting_for_keyframe(stream)
    pub(False)
    assert sink.writes == []
    assert feed.frames_skipped == 1
    k = pub(True)
    p = pub(False)
    assert sink.writes == [k, p]
    assert not feed.is_waiting_for_keyframe(stream)


def test_keyframe_requests_are_rate_limited() -> None:
    clock = Clock()
    stream, cb = make_stream(clock, interval=1.0)
    for _ in range(3):
        stream.add_viewer(make_feed(clock)[0])
    assert cb.keyframe_requests == [0.0]
    clock.advance(0.5)
    stream.add_viewer(make_feed(clock)[0])
    stream.reset()
    assert cb.keyframe_requests == [0.0]
    clock.advance(0.5)
    stream.add_viewer(make_feed(clock)[0])
    assert cb.keyframe_requests == [0.0, 1.0]
    clock.advance(1.0)
    stream.reset()
    assert cb.keyframe_requests == [0.0, 1.0, 2.0]
    assert cb.viewer_counts == [1, 2, 3, 4, 5]


def test_keyframe_requested_on_join_even_with_cache_but_rate_limited() -> None:
    clock = Clock()
    stream, cb = make_stream(clock)
    Publisher(stream)(True)
    stream.add_viewer(make_feed(clock)[0])
    stream.add_viewer(make_feed(clock)[0])
    assert cb.keyframe_requests == [0.0]


def test_reset_makes_viewers_wait_and_clears_cache() -> None:
    clock = Clock()
    stream, cb = make_stream(clock)
    pub = Publisher(stream)
    feed, sink = make_feed(clock)
    stream.add_viewer(feed)
    k0 = pub(True)
    pub_p = pub(False)
    assert stream.cached_frames == 2
    clock.advance(2)
    stream.reset()
    assert stream.cached_frames == 0 and stream.cached_bytes == 0
    assert cb.keyframe_requests == [0.0, 2.0]
    pub(False)
    assert sink.writes == [k0, pub_p]
    k1 = pub(True)
    assert sink.writes == [k0, pub_p, k1]


def test_reset_without_viewers_requests_nothing() -> None:
    clock = Clock()
    stream, cb = make_stream(clock)
    stream.reset()
    assert cb.keyframe_requests == []


# -- GOP cache -------------------------------------------------------------------


def test_gop_cache_cleared_when_over_byte_limit() -> None:
    clock = Clock()
    stream, _ = make_stream(clock, gop_cache_bytes=100)
    pub = Publisher(stream)
    pub(True, 40)
    pub(False, 40)
    assert (stream.cached_frames, stream.cached_bytes) == (2, 80)
    pub(False, 40)  # 120 > 100: cache dropped
    assert (stream.cached_frames, stream.cached_bytes) == (0, 0)
    pub(False, 10)  # caching resumes only at a keyframe
    assert stream.cached_frames == 0
    feed, sink = make_feed(clock)
    stream.add_viewer(feed)
    assert sink.writes == []
    k = pub(True, 50)
    p = pub(False, 50)  # exactly at the limit: kept
    assert (stream.cached_frames, stream.cached_bytes) == (2, 100)
    assert sink.writes == [k, p]
    late, late_sink = make_feed(clock)
    stream.add_viewer(late)
    assert late_sink.writes == [k, p]


def test_keyframe_larger_than_cache_is_not_cached() -> None:
    clock = Clock()
    stream, _ = make_stream(clock, gop_cache_bytes=100)
    pub = Publisher(stream)
    pub(True, 101)
    pub(False, 10)
    assert (stream.cached_frames, stream.cached_bytes) == (0, 0)
    feed, sink = make_feed(clock)
    stream.add_viewer(feed)
    assert sink.writes == []


def test_new_keyframe_replaces_cache() -> None:
    clock = Clock()
    stream, _ = make_stream(clock)
    pub = Publisher(stream)
    pub(True)
    pub(False)
    k = pub(True)
    feed, sink = make_feed(clock)
    stream.add_viewer(feed)
    assert sink.writes == [k]


# -- backpressure --------------------------------------------------------------


def test_paused_viewer_queues_then_flushes_in_order() -> None:
    clock = Clock()
    stream, _ = make_stream(clock)
    pub = Publisher(stream)
    feed, sink = make_feed(clock, max_queue_bytes=1000)
    stream.add_viewer(feed)
    k = pub(True)
    feed.pause()
    queued = [pub(False) for _ in range(3)]
    assert sink.writes == [k]
    assert feed.queued_bytes == 96 and feed.queued_frames == 3
    feed.resume()
    assert sink.writes == [k, *queued]
    assert feed.queued_bytes == 0
    assert feed.frames_written == 4


def test_queue_overflow_drops_and_skips_to_next_keyframe() -> None:
    clock = Clock()
    stream, _ = make_stream(clock)
    pub = Publisher(stream)
    feed, sink = make_feed(clock, max_queue_bytes=100)
    stream.add_viewer(feed)
    pub(True, 40)
    feed.pause()
    pub(False, 40)
    pub(False, 40)
    assert feed.queued_bytes == 80
    pub(False, 40)  # would be 120: queue dropped, incoming skipped too
    assert feed.queued_bytes == 0
    assert feed.queue_drops == 1
    assert feed.frames_skipped == 3
    assert feed.is_waiting_for_keyframe(stream)
    pub(False, 10)
    assert feed.frames_skipped == 4 and feed.queued_bytes == 0
    k = pub(True, 40)
    p = pub(False, 40)
    feed.resume()
    assert [parse(d) for d in sink.writes] == [(1, 0, True), (1, 5, True), (1, 6, False)]
    assert sink.writes[1:] == [k, p]


def test_keyframe_that_overflows_starts_a_fresh_queue() -> None:
    clock = Clock()
    stream, _ = make_stream(clock)
    pub = Publisher(stream)
    feed, sink = make_feed(clock, max_queue_bytes=100)
    stream.add_viewer(feed)
    feed.pause()
    pub(True, 60)
    k = pub(True, 60)  # 120 > 100: old queue dropped, this keyframe kept
    assert feed.queue_drops == 1 and feed.frames_skipped == 1
    assert feed.queued_bytes == 60
    assert not feed.is_waiting_for_keyframe(stream)
    p = pub(False, 40)
    feed.resume()
    assert sink.writes == [k, p]


def test_frame_larger_than_queue_limit() -> None:
    clock = Clock()
    stream, _ = make_stream(clock)
    pub = Publisher(stream)
    feed, sink = make_feed(clock, max_queue_bytes=100)
    stream.add_viewer(feed)
    big = pub(True, 500)  # not paused, queue empty: written directly
    assert sink.writes == [big]
    feed.pause()
    pub(True, 500)  # paused: can never fit, skipped, no queue drop
    assert feed.queued_bytes == 0 and feed.queue_drops == 0
    assert feed.frames_skipped == 1
    assert feed.is_waiting_for_keyframe(stream)
    feed.resume()
    assert sink.writes == [big]


def test_overflow_marks_every_stream_in_queue_waiting() -> None:
    clock = Clock()
    a, _ = make_stream(clock, stream_id=1)
    b, _ = make_stream(clock, stream_id=2)
    c, _ = make_stream(clock, stream_id=3)
    pa, pb, pc = Publisher(a), Publisher(b), Publisher(c)
    feed, sink = make_feed(clock, max_queue_bytes=100)
    for s in (a, b, c):
        s.add_viewer(feed)
    pa(True, 10)
    pb(True, 10)
    pc(True, 10)
    feed.pause()
    pa(False, 40)
    pb(False, 40)
    pb(False, 40)  # overflow: a and b lose their queued frames
    assert [feed.is_waiting_for_keyframe(s) for s in (a, b, c)] == [True, True, False]
    pc_p = pc(False, 10)  # c never had queued frames: keeps flowing
    pa(False, 10)
    pb(False, 10)
    feed.resume()
    assert sink.writes[-1] is pc_p
    assert feed.frames_skipped == 5


def test_resume_stops_when_sink_pauses_again() -> None:
    clock = Clock()
    stream, _ = make_stream(clock)
    pub = Publisher(stream)
    feed, sink = make_feed(clock)
    stream.add_viewer(feed)
    pub(True)
    feed.pause()
    queued = [pub(False) for _ in range(4)]

    def pause_after_two(_data: bytes) -> None:
        if len(sink.writes) == 3:
            feed.pause()

    sink.on_write = pause_after_two
    feed.resume()
    assert sink.writes[1:] == queued[:2]
    assert feed.paused and feed.queued_frames == 2
    late = pub(False)  # queued behind the others, never overtakes them
    sink.on_write = None
    feed.resume()
    assert sink.writes[1:] == [*queued, late]


def test_slow_viewer_does_not_affect_fast_viewer() -> None:
    clock = Clock()
    stream, _ = make_stream(clock)
    pub = Publisher(stream)
    fast, fast_sink = make_feed(clock, max_queue_bytes=50)
    slow, slow_sink = make_feed(clock, max_queue_bytes=50)
    stream.add_viewer(slow)
    stream.add_viewer(fast)
    slow.pause()
    sent = [pub(i % 5 == 0, 20) for i in range(20)]
    assert fast_sink.writes == sent
    assert slow_sink.writes == []
    assert slow.queued_bytes <= 50


# -- stall timer -----------------------------------------------------------------


def test_stall_timer_fires_once_while_paused() -> None:
    clock = Clock()
    feed, sink = make_feed(clock, stall_timeout=5.0)
    feed.pause()
    clock.advance(4.5)
    feed.resume()
    clock.advance(10)
    assert sink.stalled_calls == 0
    feed.pause()
    feed.pause()  # does not restart the timer
    clock.advance(4.5)
    feed.pause()
    assert sink.stalled_calls == 0
    clock.advance(0.5)
    assert sink.stalled_calls == 1
    clock.advance(100)
    feed.resume()
    feed.pause()
    clock.advance(100)
    assert sink.stalled_calls == 1
    assert clock.getDelayedCalls() == []


def test_stall_timer_restarts_on_each_pause() -> None:
    clock = Clock()
    feed, sink = make_feed(clock, stall_timeout=5.0)
    feed.pause()
    clock.advance(4.5)
    feed.resume()
    feed.pause()
    clock.advance(4.5)  # paused 4.5 s this time, 9 s in all
    assert sink.stalled_calls == 0
    clock.advance(0.5)
    assert sink.stalled_calls == 1


def test_stall_leads_to_close() -> None:
    clock = Clock()
    stream, cb = make_stream(clock)
    feed, sink = make_feed(clock, stall_timeout=2.0)
    sink.on_stalled = feed.close
    stream.add_viewer(feed)
    feed.pause()
    clock.advance(2)
    assert sink.stalled_calls == 1
    assert feed.closed and stream.viewer_count == 0
    assert cb.viewer_counts == [1, 0]


def test_close_cancels_stall_timer() -> None:
    clock = Clock()
    feed, sink = make_feed(clock)
    feed.pause()
    feed.close()
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert sink.stalled_calls == 0


# -- detach / close --------------------------------------------------------------


def test_remove_viewer_is_idempotent_and_purges_only_that_stream() -> None:
    clock = Clock()
    a, cb_a = make_stream(clock, stream_id=1)
    b, _ = make_stream(clock, stream_id=2)
    pa, pb = Publisher(a), Publisher(b)
    feed, sink = make_feed(clock)
    other, other_sink = make_feed(clock)
    a.add_viewer(feed)
    b.add_viewer(feed)
    a.add_viewer(other)
    a.add_viewer(feed)  # already attached: no-op
    assert cb_a.viewer_counts == [1, 2]
    feed.pause()
    pa(True)
    kb = pb(True)
    pa(False)
    pb_p = pb(False)
    a.remove_viewer(feed)
    a.remove_viewer(feed)
    assert cb_a.viewer_counts == [1, 2, 1]
    assert feed.queued_frames == 2 and feed.queued_bytes == 64
    feed.resume()
    assert sink.writes == [kb, pb_p]
    assert len(other_sink.writes) == 2
    pa(False)
    assert len(sink.writes) == 2 and len(other_sink.writes) == 3


def test_feed_close_is_idempotent_and_detaches_everywhere() -> None:
    clock = Clock()
    a, cb_a = make_stream(clock, stream_id=1)
    b, cb_b = make_stream(clock, stream_id=2)
    feed, sink = make_feed(clock)
    other, other_sink = make_feed(clock)
    for s in (a, b):
        s.add_viewer(feed)
        s.add_viewer(other)
    feed.pause()
    a.publish(True, frame(1, 0, True))
    feed.close()
    feed.close()
    assert feed.closed and feed.stream_count == 0 and feed.queued_bytes == 0
    assert (a.viewer_count, b.viewer_count) == (1, 1)
    assert cb_a.viewer_counts[-1] == 1 and cb_b.viewer_counts[-1] == 1
    feed.resume()
    b.publish(True, frame(2, 0, True))
    assert sink.writes == []
    assert len(other_sink.writes) == 2
    with pytest.raises(RuntimeError):
        a.add_viewer(feed)


def test_stream_close_detaches_feeds_which_keep_other_streams() -> None:
    clock = Clock()
    a, cb_a = make_stream(clock, stream_id=1)
    b, _ = make_stream(clock, stream_id=2)
    pa, pb = Publisher(a), Publisher(b)
    feed, sink = make_feed(clock)
    a.add_viewer(feed)
    b.add_viewer(feed)
    pa(True)
    feed.pause()
    pa(False)
    kb = pb(True)
    a.close()
    a.close()
    assert a.closed and a.viewer_count == 0 and a.cached_frames == 0
    assert cb_a.viewer_counts == [1]  # close calls no callback
    assert feed.stream_count == 1 and feed.queued_frames == 1
    pa(True)  # publishing on a closed stream does nothing
    feed.resume()
    assert sink.writes == [pa.frames[0], kb]
    with pytest.raises(RuntimeError):
        a.add_viewer(feed)
    a.remove_viewer(feed)  # harmless


def test_viewer_closed_during_publish_does_not_disturb_others() -> None:
    clock = Clock()
    stream, _ = make_stream(clock)
    pairs = [make_feed(clock) for _ in range(3)]
    for feed, _sink in pairs:
        stream.add_viewer(feed)
    first, first_sink = pairs[0]
    second, second_sink = pairs[1]

    def close_self_and_second(_data: bytes) -> None:
        first.close()
        second.close()

    first_sink.on_write = close_self_and_second
    data = frame(1, 0, True)
    stream.publish(True, data)
    assert first_sink.writes == [data]
    assert second_sink.writes == []
    assert pairs[2][1].writes == [data]
    assert stream.viewer_count == 1


def test_publish_during_flush_queues_behind_older_frames() -> None:
    clock = Clock()
    stream, _ = make_stream(clock)
    pub = Publisher(stream)
    feed, sink = make_feed(clock)
    stream.add_viewer(feed)
    pub(True)
    feed.pause()
    queued = [pub(False) for _ in range(3)]
    extra: list[bytes] = []

    def publish_once(_data: bytes) -> None:
        if not extra:
            extra.append(pub(False))  # e.g. a frame arriving from a nested callback

    sink.on_write = publish_once
    feed.resume()
    assert sink.writes[1:] == [*queued, *extra]


def test_detached_objects_are_not_kept_alive() -> None:
    """Removed viewers and closed streams hold no references to each other."""
    clock = Clock()
    stream, _ = make_stream(clock)
    other, _ = make_stream(clock, stream_id=2)
    feeds = [make_feed(clock)[0] for _ in range(3)]
    for feed in feeds:
        stream.add_viewer(feed)
        other.add_viewer(feed)
    refs = [weakref.ref(feed) for feed in feeds]
    stream.remove_viewer(feeds[0])
    other.remove_viewer(feeds[0])
    feeds[1].close()
    other.close()
    stream.remove_viewer(feeds[2])
    del feeds, feed
    stream.publish(True, frame(1, 0, True))
    assert [ref() for ref in refs] == [None, None, None]
    stream_ref = weakref.ref(other)
    del other
    assert stream_ref() is None


def test_invalid_arguments() -> None:
    clock = Clock()
    with pytest.raises(ValueError):
        ViewerFeed(RecordingSink(), clock, -1, 1.0)
    with pytest.raises(ValueError):
        ViewerFeed(RecordingSink(), clock, 1, -1.0)
    with pytest.raises(ValueError):
        make_stream(clock, gop_cache_bytes=-1)
    with pytest.raises(ValueError):
        make_stream(clock, interval=-1)


# -- property tests --------------------------------------------------------------

publish_op = st.tuples(st.just("publish"), st.booleans(), st.integers(16, 80))
slow_op = st.sampled_from([("pause", False, 0), ("resume", False, 0)])


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(st.one_of(publish_op, slow_op), max_size=60),
    slow_count=st.integers(1, 3),
    join_at=st.integers(0, 20),
)
def test_slow_viewers_never_change_what_a_fast_viewer_gets(
    ops: list[tuple[str, bool, int]], slow_count: int, join_at: int
) -> None:
    def run(with_slow: bool) -> list[bytes]:
        clock = Clock()
        stream, _ = make_stream(clock, gop_cache_bytes=200)
        fast, fast_sink = make_feed(clock, max_queue_bytes=100)
        slows = [make_feed(clock, max_queue_bytes=100)[0] for _ in range(slow_count)]
        if with_slow:
            for slow in slows:
                stream.add_viewer(slow)
        for i, (kind, key, size) in enumerate(ops):
            if i == join_at:
                stream.add_viewer(fast)
            if kind == "publish":
                stream.publish(key, frame(1, i, key, size))
            elif with_slow:
                for slow in slows:
                    slow.pause() if kind == "pause" else slow.resume()
        return fast_sink.writes

    assert run(True) == run(False)


queue_op = st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 2), st.booleans(), st.integers(10, 70)),
    st.tuples(st.just("pause"), st.just(0), st.just(False), st.just(0)),
    # resume; the sink fills up again after ``n`` writes (0: never)
    st.tuples(st.just("resume"), st.integers(0, 4), st.just(False), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(queue_op, min_size=10, max_size=100), max_queue=st.integers(40, 200))
def test_slow_viewer_queue_bounded_and_resumes_at_keyframes(
    ops: list[tuple[str, int, bool, int]], max_queue: int
) -> None:
    """One viewer on three streams under arbitrary backpressure.

    Checks after every step: ``queued_bytes <= max_queue_bytes``; nothing is
    written while paused; every offered frame is exactly one of written,
    skipped or queued; per stream, deliveries are an in-order subsequence of
    what was published, starting at a keyframe, and resume at a keyframe after
    any gap.  At the end, once drained, the viewer gets every new frame.
    """
    clock = Clock()
    streams = [make_stream(clock, stream_id=i)[0] for i in range(3)]
    feed, sink = make_feed(clock, max_queue_bytes=max_queue)
    for stream in streams:
        stream.add_viewer(feed)
    budget = [0]
    offered = 0
    published: list[tuple[int, bool]] = []  # global seq -> (stream, keyframe)
    last: dict[int, int] = {}  # stream -> last delivered seq

    def on_write(data: bytes) -> None:
        assert not feed.paused, "wrote while paused"
        s, seq, key = parse(data)
        assert published[seq] == (s, key)
        if s in last:
            prev = last[s]
            assert seq > prev
            gap = any(published[x][0] == s for x in range(prev + 1, seq))
            assert key or not gap, "resumed after a skip without a keyframe"
        else:
            assert key, "first delivery must be a keyframe"
        last[s] = seq
        if budget[0]:
            budget[0] -= 1
            if budget[0] == 0:
                feed.pause()

    sink.on_write = on_write
    for kind, n, key, size in ops:
        if kind == "publish":
            data = frame(n, len(published), key, size)
            published.append((n, key))
            offered += 1
            streams[n].publish(key, data)
        elif kind == "pause":
            feed.pause()
        else:
            budget[0] = n
            feed.resume()
        assert feed.queued_bytes <= max_queue
        assert feed.frames_written + feed.frames_skipped + feed.queued_frames == offered
        if not feed.paused:
            assert feed.queued_frames == 0

    budget[0] = 0
    feed.resume()
    assert feed.queued_frames == 0 and feed.queued_bytes == 0
    for i, stream in enumerate(streams):
        tail = []
        for key in (True, False):
            tail.append(frame(i, len(published), key, 40))
            published.append((i, key))
            stream.publish(key, tail[-1])
        assert sink.writes[-2:] == tail


# -- stateful model test ---------------------------------------------------------

N_STREAMS = 2
N_FEEDS = 3
MAX_QUEUE = 200
GOP_BYTES = 250
STALL = 5.0
KF_INTERVAL = 1.0


@attrs.define
class Segment:
    """What one feed got from one stream since it (last) joined it."""

    delivered: list[int] = attrs.field(factory=list)
    clean: bool = True  # feed never paused since the join
    expected: list[int] = attrs.field(factory=list)  # only meaningful if clean
    waiting: bool = True


@attrs.define
class FeedModel:
    feed: ViewerFeed
    sink: RecordingSink
    paused: bool = False
    paused_since: float = 0.0
    closed: bool = False
    budget: int | None = None  # writes left before the sink pauses itself
    writes: int = 0
    written_bytes: int = 0


@attrs.define
class StreamModel:
    stream: Stream
    gop: list[int] = attrs.field(factory=list)
    gop_bytes: int = 0
    last_request: float | None = None
    requests: int = 0
    viewers: int = 0
    reported_count: int = 0


class FanoutMachine(RuleBasedStateMachine):
    """Random publish/pause/resume/join/leave/reset/close sequences vs. a model.

    Queue bound checked: ``queued_bytes <= max_queue_bytes`` (exact, no slack).
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.next_seq = 0  # global so seqs never repeat, even across stream objects
        self.frames: dict[int, tuple[int, bool, bytes]] = {}  # seq -> (slot, key, data)
        self.reset_marks: list[list[int]] = [[] for _ in range(N_STREAMS)]
        self.streams = [self._new_stream(i) for i in range(N_STREAMS)]
        self.feeds = [self._new_feed(i) for i in range(N_FEEDS)]
        self.segments: dict[tuple[int, int], Segment] = {}

    # -- construction ----

    def _new_stream(self, slot: int) -> StreamModel:
        model: StreamModel
        stream = Stream(
            slot,
            self.clock,
            GOP_BYTES,
            KF_INTERVAL,
            on_keyframe_needed=lambda: self._keyframe_needed(model),
            on_viewers_changed=lambda n: setattr(model, "reported_count", n),
        )
        model = StreamModel(stream)
        return model

    def _new_feed(self, slot: int) -> FeedModel:
        sink = RecordingSink()
        feed = ViewerFeed(sink, self.clock, MAX_QUEUE, STALL)
        model = FeedModel(feed, sink)
        sink.on_write = partial(self._written, slot, model)
        sink.on_stalled = partial(self._stalled, model)
        return model

    # -- callbacks from the code under test ----

    def _keyframe_needed(self, model: StreamModel) -> None:
        now = self.clock.seconds()
        assert model.last_request is None or now - model.last_request >= KF_INTERVAL
        model.last_request = now
        model.requests += 1

    def _stalled(self, fm: FeedModel) -> None:
        assert fm.paused and not fm.closed
        assert self.clock.seconds() - fm.paused_since >= STALL
        assert fm.sink.stalled_calls == 1

    def _written(self, f: int, fm: FeedModel, data: bytes) -> None:
        assert not fm.paused, "wrote to a paused viewer"
        assert not fm.closed
        _, seq, key = parse(data)
        s, key_published, published = self.frames[seq]
        assert data is published and key == key_published
        seg = self.segments[(f, s)]  # only attached streams deliver
        if seg.delivered:
            prev = seg.delivered[-1]
            assert seq > prev, "out of order or duplicate"
            reset_between = any(prev < m <= seq for m in self.reset_marks[s])
            if reset_between or not self._consecutive(s, prev, seq):
                assert key, "resumed after a skip without a keyframe"
        else:
            assert key, "first frame of a join must be a keyframe"
        seg.delivered.append(seq)
        fm.writes += 1
        fm.written_bytes += len(data)
        if fm.budget is not None:
            fm.budget -= 1
            if fm.budget == 0:
                fm.budget = None
                self._pause(f)  # the transport's buffer just filled up

    def _consecutive(self, s: int, prev: int, seq: int) -> bool:
        """True if no frame of stream slot ``s`` was published between prev and seq."""
        return not any(self.frames[x][0] == s for x in range(prev + 1, seq))

    # -- model updates ----

    def _pause(self, f: int) -> None:
        fm = self.feeds[f]
        if not fm.paused:
            fm.paused = True
            fm.paused_since = self.clock.seconds()
        for (ff, _s), seg in self.segments.items():
            if ff == f:
                seg.clean = False
        fm.feed.pause()

    # -- rules ----

    @rule(
        s=st.integers(0, N_STREAMS - 1),
        key=st.booleans(),
        size=st.one_of(st.integers(16, 60), st.just(MAX_QUEUE + 1), st.just(GOP_BYTES + 1)),
    )
    def publish(self, s: int, key: bool, size: int) -> None:
        sm = self.streams[s]
        seq = self.next_seq
        data = frame(s, seq, key, size)
        size = len(data)
        self.next_seq += 1
        self.frames[seq] = (s, key, data)
        # model the GOP cache
        if key:
            sm.gop, sm.gop_bytes = ([seq], size) if size <= GOP_BYTES else ([], 0)
        elif sm.gop:
            if sm.gop_bytes + size <= GOP_BYTES:
                sm.gop.append(seq)
                sm.gop_bytes += size
            else:
                sm.gop, sm.gop_bytes = [], 0
        for (_f, ss), seg in self.segments.items():
            if ss == s and seg.clean and (key or not seg.waiting):
                seg.expected.append(seq)
                seg.waiting = False
        sm.stream.publish(key, data)

    @initialize(
        attach=st.lists(st.booleans(), min_size=N_FEEDS * N_STREAMS, max_size=N_FEEDS * N_STREAMS)
    )
    def attach_some(self, attach: list[bool]) -> None:
        for i, yes in enumerate(attach):
            if yes:
                self.add_viewer(i // N_STREAMS, i % N_STREAMS)

    @rule(
        s=st.integers(0, N_STREAMS - 1),
        frames=st.lists(st.tuples(st.booleans(), st.integers(16, 60)), min_size=2, max_size=8),
    )
    def publish_burst(self, s: int, frames: list[tuple[bool, int]]) -> None:
        for key, size in frames:
            self.publish(s, key, size)

    @rule(f=st.integers(0, N_FEEDS - 1))
    def pause(self, f: int) -> None:
        self._pause(f)

    @rule(f=st.integers(0, N_FEEDS - 1), budget=st.none() | st.integers(1, 3))
    def resume(self, f: int, budget: int | None) -> None:
        """Transport drained; with a budget it fills up again after that many writes."""
        fm = self.feeds[f]
        fm.paused = False
        fm.budget = budget
        fm.feed.resume()

    @rule(f=st.integers(0, N_FEEDS - 1), n=st.integers(1, 3))
    def sink_fills_after(self, f: int, n: int) -> None:
        self.feeds[f].budget = n

    @rule(f=st.integers(0, N_FEEDS - 1), s=st.integers(0, N_STREAMS - 1))
    def add_viewer(self, f: int, s: int) -> None:
        fm, sm = self.feeds[f], self.streams[s]
        if (f, s) in self.segments:
            before = (sm.requests, sm.reported_count, len(fm.sink.writes))
            sm.stream.add_viewer(fm.feed)
            assert (sm.requests, sm.reported_count, len(fm.sink.writes)) == before
            return
        seg = Segment(clean=not fm.paused)
        if sm.gop:
            seg.expected = list(sm.gop)
            seg.waiting = False
        self.segments[(f, s)] = seg
        sm.viewers += 1
        now = self.clock.seconds()
        should_request = sm.last_request is None or now - sm.last_request >= KF_INTERVAL
        requests = sm.requests
        sm.stream.add_viewer(fm.feed)
        assert sm.requests == requests + should_request
        assert sm.reported_count == sm.viewers == sm.stream.viewer_count
        if sm.gop and not fm.paused:
            assert seg.delivered[: len(sm.gop)] == sm.gop  # cached GOP at once

    @rule(f=st.integers(0, N_FEEDS - 1), s=st.integers(0, N_STREAMS - 1))
    def remove_viewer(self, f: int, s: int) -> None:
        fm, sm = self.feeds[f], self.streams[s]
        if self.segments.pop((f, s), None) is not None:
            sm.viewers -= 1
            sm.stream.remove_viewer(fm.feed)
            assert sm.reported_count == sm.viewers
        else:
            reported = sm.reported_count
            sm.stream.remove_viewer(fm.feed)
            assert sm.reported_count == reported

    @rule(s=st.integers(0, N_STREAMS - 1))
    def reset(self, s: int) -> None:
        sm = self.streams[s]
        self.reset_marks[s].append(self.next_seq)
        sm.gop, sm.gop_bytes = [], 0
        for (_f, ss), seg in self.segments.items():
            if ss == s:
                seg.waiting = True
        requests = sm.requests
        now = self.clock.seconds()
        should_request = sm.viewers > 0 and (
            sm.last_request is None or now - sm.last_request >= KF_INTERVAL
        )
        sm.stream.reset()
        assert sm.requests == requests + should_request

    @rule(s=st.integers(0, N_STREAMS - 1), rejoin=st.booleans())
    def close_stream(self, s: int, rejoin: bool) -> None:
        """The encoder goes away and comes back as a new Stream object.

        With ``rejoin`` its viewers subscribe again to the new stream.
        """
        sm = self.streams[s]
        watchers = [k[0] for k in self.segments if k[1] == s]
        for f in watchers:
            del self.segments[(f, s)]
        reported = sm.reported_count
        sm.stream.close()
        sm.stream.close()
        assert sm.stream.closed and sm.stream.viewer_count == 0
        assert sm.stream.cached_frames == 0
        assert sm.reported_count == reported  # close calls no callback
        sm.stream.publish(True, frame(s, 10**6, True))  # ignored: would fail _written
        sm.stream.reset()
        for fm in self.feeds:
            assert not sm.stream.has_viewer(fm.feed)
            with pytest.raises(RuntimeError):
                sm.stream.add_viewer(fm.feed)
        self.streams[s] = self._new_stream(s)
        if rejoin:
            for f in watchers:
                self.add_viewer(f, s)

    @rule(
        f=st.integers(0, N_FEEDS - 1),
        subscribe=st.lists(st.integers(0, N_STREAMS - 1), max_size=N_STREAMS),
    )
    def close_feed(self, f: int, subscribe: list[int]) -> None:
        """The viewer connection goes away; a new one takes its slot and subscribes."""
        fm = self.feeds[f]
        fm.closed = True
        for key in [k for k in self.segments if k[0] == f]:
            del self.segments[key]
            self.streams[key[1]].viewers -= 1
        fm.feed.close()
        fm.feed.close()
        fm.feed.pause()
        fm.feed.resume()
        assert fm.feed.stream_count == 0 and fm.feed.queued_bytes == 0
        for sm in self.streams:
            assert not sm.stream.has_viewer(fm.feed)
            assert sm.stream.viewer_count == sm.viewers == sm.reported_count
            with pytest.raises(RuntimeError):
                sm.stream.add_viewer(fm.feed)
        self.feeds[f] = self._new_feed(f)
        for s in subscribe:
            self.add_viewer(f, s)

    @rule(half_seconds=st.integers(0, 12))
    def advance(self, half_seconds: int) -> None:
        self.clock.advance(half_seconds * 0.5)  # exact in binary floating point

    # -- invariants ----

    @invariant()
    def queues_bounded(self) -> None:
        for fm in self.feeds:
            assert 0 <= fm.feed.queued_bytes <= MAX_QUEUE
            assert fm.feed.paused == fm.paused
            if not fm.paused:
                assert fm.feed.queued_frames == 0

    @invariant()
    def caches_match_model(self) -> None:
        for sm in self.streams:
            assert sm.stream.cached_bytes == sm.gop_bytes <= GOP_BYTES
            assert sm.stream.cached_frames == len(sm.gop)
            assert sm.stream.viewer_count == sm.viewers

    @invariant()
    def unpaused_viewers_get_exactly_the_stream(self) -> None:
        for seg in self.segments.values():
            if seg.clean:
                assert seg.delivered == seg.expected

    @invariant()
    def stats_match(self) -> None:
        for fm in self.feeds:
            assert fm.feed.frames_written == fm.writes == len(fm.sink.writes)
            assert fm.feed.bytes_written == fm.written_bytes

    @invariant()
    def stall_reported_when_due(self) -> None:
        now = self.clock.seconds()
        for fm in self.feeds:
            assert fm.sink.stalled_calls <= 1
            if fm.paused and now - fm.paused_since >= STALL:
                assert fm.sink.stalled_calls == 1


TestFanoutMachine = FanoutMachine.TestCase
TestFanoutMachine.settings = settings(max_examples=examples(150), stateful_step_count=60,
                                      deadline=None)
