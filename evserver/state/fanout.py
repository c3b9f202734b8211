"""Per-frame, per-viewer video fan-out (sans-IO).

One :class:`Stream` per live encoder stream, one :class:`ViewerFeed` per viewer
relay connection.  A feed may watch many streams and a stream may feed many
viewers.  Frames arrive already encoded as the complete downlink wire bytes;
the same ``bytes`` object is handed to every viewer's sink (encode once,
write N times).  The fan-out only looks at ``keyframe`` and ``len(data)``.

Backpressure: the I/O layer forwards its transport's producer calls to
:meth:`ViewerFeed.pause` / :meth:`ViewerFeed.resume`.  While paused, frames
are queued up to ``max_queue_bytes``; when the next frame would not fit, the
whole queue is dropped and the affected streams skip to their next keyframe
for that viewer (an overflowing keyframe that fits on its own is kept and
starts the new queue, so its stream loses nothing more).  A viewer paused for
longer than ``stall_timeout`` without a break is reported through
:meth:`IMediaSink.stalled`, at most once per feed.  Leaving a stream purges
that stream's queued frames; other streams' frames stay queued.

Bounds (tested):

- ``ViewerFeed.queued_bytes <= max_queue_bytes`` at all times (a frame is
  only queued if it fits; a single frame larger than the limit is never
  queued).  Frames written while not paused and with an empty queue are
  handed to the sink directly, whatever their size.
- ``Stream.cached_bytes <= gop_cache_bytes`` at all times.
- Per-frame work in :meth:`Stream.publish` is O(viewers of that stream):
  one dict lookup and either one sink write or one deque append per viewer.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from zope.interface import Interface

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["IMediaSink", "Stream", "ViewerFeed"]


class IMediaSink(Interface):
    """Where a viewer's frames go: the viewer's relay transport."""

    def write(data: bytes) -> None:
        """Write one complete downlink frame to the viewer."""

    def stalled() -> None:
        """The viewer stayed paused longer than the stall timeout (called once)."""


_QueueEntry = tuple["Stream", bool, bytes]


class ViewerFeed:
    """One viewer relay connection: delivery, queueing and keyframe skipping.

    Statistics (plain attributes, read freely): ``frames_written``,
    ``bytes_written``, ``frames_skipped`` (frames never delivered: skipped
    while waiting for a keyframe, discarded with the queue, or refused because
    they alone overflow the queue), ``queue_drops`` (times a non-empty queue
    was discarded) and the ``queued_bytes`` property.
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_closed",
        "_max_queue_bytes",
        "_paused",
        "_queue",
        "_queued_bytes",
        "_sink",
        "_stall_call",
        "_stall_reported",
        "_stall_timeout",
        "_streams",
        "bytes_written",
        "frames_skipped",
        "frames_written",
        "queue_drops",
    )

    def __init__(
        self,
        sink: IMediaSink,
        clock: IReactorTime,
        max_queue_bytes: int,
        stall_timeout: float,
    ) -> None:
        if max_queue_bytes < 0:
            raise ValueError("max_queue_bytes must be >= 0")
        if stall_timeout < 0:
            raise ValueError("stall_timeout must be >= 0")
        self._sink = sink
        self._clock = clock
        self._max_queue_bytes = max_queue_bytes
        self._stall_timeout = stall_timeout
        # attached stream -> True while this viewer waits for its next keyframe
        self._streams: dict[Stream, bool] = {}
        self._queue: deque[_QueueEntry] = deque()
        self._queued_bytes = 0
        self._paused = False
        self._closed = False
        self._stall_call: IDelayedCall | None = None
        self._stall_reported = False
        self.frames_written = 0
        self.bytes_written = 0
        self.frames_skipped = 0
        self.queue_drops = 0

    # -- read-only state ---------------------------------------------------

    @property
    def queued_bytes(self) -> int:
        """Bytes currently held in the queue (always <= max_queue_bytes)."""
        return self._queued_bytes

    @property
    def queued_frames(self) -> int:
        """Frames currently held in the queue."""
        return len(self._queue)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stream_count(self) -> int:
        """Number of streams this feed is attached to."""
        return len(self._streams)

    def is_waiting_for_keyframe(self, stream: Stream) -> bool:
        """True if ``stream`` is attached and its next delivery must be a keyframe."""
        return self._streams.get(stream, False)

    # -- producer side (forwarded by the I/O layer) --------------------------

    def pause(self) -> None:
        """The viewer's transport buffer is full: queue from now on."""
        if self._closed or self._paused:
            return
        self._paused = True
        if not self._stall_reported and self._stall_call is None:
            self._stall_call = self._clock.callLater(self._stall_timeout, self._stall_expired)

    def resume(self) -> None:
        """The transport drained: flush the queue in order until paused again."""
        if self._closed or not self._paused:
            return
        self._paused = False
        self._cancel_stall_timer()
        queue = self._queue
        sink = self._sink
        # sink.write may call pause() or close() re-entrantly; both stop the loop.
        while queue and not self._paused:
            _stream, _keyframe, data = queue.popleft()
            size = len(data)
            self._queued_bytes -= size
            self.frames_written += 1
            self.bytes_written += size
            sink.write(data)

    def close(self) -> None:
        """Detach from every stream, cancel timers, drop the queue (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._cancel_stall_timer()
        self._queue.clear()
        self._queued_bytes = 0
        for stream in list(self._streams):
            stream.remove_viewer(self)

    # -- called by Stream ----------------------------------------------------

    def _offer(self, stream: Stream, keyframe: bool, data: bytes) -> None:
        """Deliver, queue or skip one frame of ``stream`` (the hot path)."""
        waiting = self._streams.get(stream)
        if waiting is None:  # not attached (or closed)
            return
        if waiting:
            if not keyframe:
                self.frames_skipped += 1
                return
            self._streams[stream] = False
        if self._paused or self._queue:
            self._enqueue(stream, keyframe, data)
            return
        self.frames_written += 1
        self.bytes_written += len(data)
        self._sink.write(data)

    def _enqueue(self, stream: Stream, keyframe: bool, data: bytes) -> None:
        size = len(data)
        if self._queued_bytes + size > self._max_queue_bytes:
            queue = self._queue
            if queue:
                streams = self._streams
                for queued_stream, _k, _d in queue:
                    if queued_stream in streams:
                        streams[queued_stream] = True
                self.frames_skipped += len(queue)
                self.queue_drops += 1
                queue.clear()
                self._queued_bytes = 0
            if not keyframe or size > self._max_queue_bytes:
                # The incoming frame is lost too: its stream resumes at a keyframe.
                self._streams[stream] = True
                self.frames_skipped += 1
                return
            # An incoming keyframe that fits on its own starts the queue afresh.
            self._streams[stream] = False
        self._queue.append((stream, keyframe, data))
        self._queued_bytes += size

    def _attach(self, stream: Stream) -> None:
        self._streams[stream] = True

    def _detach(self, stream: Stream) -> None:
        """Forget ``stream`` and purge its queued frames (O(queue), not per frame)."""
        if self._streams.pop(stream, None) is None:
            return
        queue = self._queue
        if any(entry[0] is stream for entry in queue):
            kept = [entry for entry in queue if entry[0] is not stream]
            # Mutate in place: resume() may be iterating this very deque.
            queue.clear()
            queue.extend(kept)
            self._queued_bytes = sum(len(entry[2]) for entry in kept)

    def _wait_for_keyframe(self, stream: Stream) -> None:
        if stream in self._streams:
            self._streams[stream] = True

    # -- internals -----------------------------------------------------------

    def _stall_expired(self) -> None:
        self._stall_call = None
        if self._paused and not self._closed and not self._stall_reported:
            self._stall_reported = True
            self._sink.stalled()

    def _cancel_stall_timer(self) -> None:
        call = self._stall_call
        if call is not None:
            self._stall_call = None
            if call.active():
                call.cancel()


class Stream:
    """One live encoder stream: GOP cache, viewer set and keyframe requests."""

    __slots__ = (
        "__weakref__",
        "_clock",
        "_closed",
        "_feeds",
        "_gop",
        "_gop_bytes",
        "_gop_cache_bytes",
        "_keyframe_request_interval",
        "_last_keyframe_request",
        "_on_keyframe_needed",
        "_on_viewers_changed",
        "_snapshot",
        "frames_published",
        "stream_id",
    )

    def __init__(
        self,
        stream_id: int,
        clock: IReactorTime,
        gop_cache_bytes: int,
        keyframe_request_interval: float = 1.0,
        *,
        on_keyframe_needed: Callable[[], None],
        on_viewers_changed: Callable[[int], None],
    ) -> None:
        if gop_cache_bytes < 0:
            raise ValueError("gop_cache_bytes must be >= 0")
        if keyframe_request_interval < 0:
            raise ValueError("keyframe_request_interval must be >= 0")
        self.stream_id = stream_id
        self._clock = clock
        self._gop_cache_bytes = gop_cache_bytes
        self._keyframe_request_interval = keyframe_request_interval
        self._on_keyframe_needed = on_keyframe_needed
        self._on_viewers_changed = on_viewers_changed
        # dict for O(1) membership with join order; the tuple is what publish()
        # iterates, rebuilt only when viewers join or leave, so that re-entrant
        # joins/leaves during a publish are safe.
        self._feeds: dict[ViewerFeed, None] = {}
        self._snapshot: tuple[ViewerFeed, ...] = ()
        # Current group of pictures: _gop[0] is a keyframe, or the list is empty.
        self._gop: list[bytes] = []
        self._gop_bytes = 0
        self._last_keyframe_request: float | None = None
        self._closed = False
        self.frames_published = 0

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} viewers={len(self._feeds)}>"

    # -- read-only state ---------------------------------------------------

    @property
    def viewer_count(self) -> int:
        return len(self._feeds)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def cached_bytes(self) -> int:
        """Bytes in the GOP cache (always <= gop_cache_bytes)."""
        return self._gop_bytes

    @property
    def cached_frames(self) -> int:
        """Frames in the GOP cache; 0 means no cached keyframe."""
        return len(self._gop)

    def has_viewer(self, feed: ViewerFeed) -> bool:
        return feed in self._feeds

    # -- encoder side --------------------------------------------------------

    def publish(self, keyframe: bool, data: bytes) -> None:
        """One encoded frame from the encoder: cache it, offer it to every viewer."""
        if self._closed:
            return
        self.frames_published += 1
        size = len(data)
        gop = self._gop
        if keyframe:
            gop.clear()
            if size <= self._gop_cache_bytes:
                gop.append(data)
                self._gop_bytes = size
            else:
                self._gop_bytes = 0
        elif gop:
            if self._gop_bytes + size <= self._gop_cache_bytes:
                gop.append(data)
                self._gop_bytes += size
            else:
                # Over the limit: stop caching until the next keyframe.
                gop.clear()
                self._gop_bytes = 0
        for feed in self._snapshot:
            feed._offer(self, keyframe, data)

    def reset(self) -> None:
        """The stream restarted (e.g. STOP/START): every viewer waits for a keyframe."""
        if self._closed:
            return
        self._gop.clear()
        self._gop_bytes = 0
        for feed in self._snapshot:
            feed._wait_for_keyframe(self)
        if self._feeds:
            self._request_keyframe()

    def close(self) -> None:
        """The encoder is gone: detach every viewer, clear the cache (idempotent).

        Calls neither callback: there is no encoder left to ask.  The feeds
        carry on with their other streams.
        """
        if self._closed:
            return
        self._closed = True
        self._gop.clear()
        self._gop_bytes = 0
        feeds = self._snapshot
        self._feeds.clear()
        self._snapshot = ()
        for feed in feeds:
            feed._detach(self)

    # -- viewer side ---------------------------------------------------------

    def add_viewer(self, feed: ViewerFeed) -> None:
        """Attach ``feed``; it gets the cached GOP at once, else waits for a keyframe.

        Also asks the encoder for a keyframe, at most once per
        ``keyframe_request_interval``.  Adding an attached feed does nothing.
        """
        if self._closed:
            raise RuntimeError(f"stream {self.stream_id} is closed")
        if feed.closed:
            raise RuntimeError("viewer feed is closed")
        if feed in self._feeds:
            return
        self._feeds[feed] = None
        self._snapshot = tuple(self._feeds)
        feed._attach(self)
        # Copy: a re-entrant publish from a sink write must not disturb the loop.
        first = True
        for data in tuple(self._gop):
            feed._offer(self, first, data)
            first = False
        self._request_keyframe()
        self._on_viewers_changed(len(self._feeds))

    def remove_viewer(self, feed: ViewerFeed) -> None:
        """Detach ``feed`` and purge its queued frames of this stream (idempotent)."""
        if feed not in self._feeds:
            return
        del self._feeds[feed]
        self._snapshot = tuple(self._feeds)
        feed._detach(self)
        self._on_viewers_changed(len(self._feeds))

    # -- internals -----------------------------------------------------------

    def _request_keyframe(self) -> None:
        now = self._clock.seconds()
        last = self._last_keyframe_request
        if last is None or now - last >= self._keyframe_request_interval:
            self._last_keyframe_request = now
            self._on_keyframe_needed()
