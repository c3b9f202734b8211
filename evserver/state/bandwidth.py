"""Bandwidth between peers, measured with probes (sans-IO).

The article's prerequisites (R14) ask for links between the servers of at
least 10 Mbit/s, 50 Mbit/s recommended.  A :class:`BandwidthProber` measures
the link to each peer in one direction, from this server to the peer, as
``protocol-spec/peer.rst`` (Link measurements) says:

* a few seconds after a link comes up (so that the probe does not compete
  with the anti-entropy exchange that follows a handshake), and then every
  five minutes, it sends a *probe*: ``count`` ``BandwidthProbe`` frames of
  ``frame_bytes`` each, back to back (4 x 64 KiB by default: 256 KiB, the
  size the peer protocol aims at for a replication batch, so that a
  heartbeat waits at most as long behind a probe as behind a batch);
* the peer times the arrival of the frames with its own clock and, on the
  last one, answers ``BandwidthReport``: the bytes of the frames after the
  first, and the time from the arrival of the first frame to the arrival of
  the last;
* the figure reported is ``bytes * 8 / first_to_last_us`` Mbit/s.

Why the receiver's interval, and not the time from sending to the report
less the round trip (computed too, as ``sender_mbps``, a cross-check): the
receiver's interval starts once the first frame is in, so it leaves out the
connection's latency, TCP's slow start over the first frame, and whatever
waited in this server's own buffers before the probe; it uses one clock
only; and it needs no round-trip figure (itself measured by heartbeats that
may have queued behind the probe).  The sender's figure includes all of
those and so understates fast links, which would raise false warnings.  The
receiver's figure can only overstate a link when the receiver reads late
(the frames piled up in its socket buffer), which hides a warning rather than
raising a false one.

Either way a probe measures what TCP achieves for 256 KiB on the link at that
moment, which is a lower bound of the link's capacity: over a long round trip
a short transfer is limited by TCP's window more than by the link.

Of the two ends of a link, the server with the smaller id (compared as
UTF-8 bytes) probes ``first_delay`` after the link comes up and the other
``stagger`` later, and both every ``interval`` from then on, so that their
probes never cross: a side stops reading while its own write buffer is full
(``evserver.net.connection.WireConnection``), and two large writes crossing
on one connection can stall both sides until their buffers drain (for good,
where nothing but the buffers carries the bytes: an in-memory network).

At most one probe per peer is in flight; a probe whose report has not come
within ``timeout`` is abandoned.  As the receiver, the prober keeps state
for the current probe of each peer only (a probe id, counters, a time), so a
peer flooding probes cannot make it hold more; frames with a bad index or
count, out of order, or of another probe than the current one are ignored
and end the current probe.

Time comes from an injected ``IReactorTime``; frames to send go to the
``send(server_id, message)`` callback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from evserver.wire.peer import (
    MAX_PROBE_PADDING,
    PROBE_FRAME_OVERHEAD,
    BandwidthProbe,
    BandwidthReport,
    probe_frame_size,
    probe_frames,
)

#: The article's prerequisites for the links between servers, in Mbit/s.
MIN_MBPS = 10.0
RECOMMENDED_MBPS = 50.0

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


@attrs.frozen
class BandwidthSettings:
    #: Seconds from a link coming up to its first probe (the end with the smaller id).
    first_delay: float = 5.0
    #: How much later the end with the larger id probes, each time.
    stagger: float = 5.0
    #: Seconds from one probe to the next on the same link.
    interval: float = 300.0
    #: Frames in a probe (2 to 255: the first one only starts the clock).
    count: int = 4
    #: Length of each frame, length field and type included.
    frame_bytes: int = 64 * 1024
    #: Seconds after which a probe without a report is abandoned.
    timeout: float = 30.0
    min_mbps: float = MIN_MBPS
    recommended_mbps: float = RECOMMENDED_MBPS

    def __attrs_post_init__(self) -> None:
        if not 2 <= self.count <= 0xFF:
            raise ValueError("count must be 2..255")
        if not PROBE_FRAME_OVERHEAD <= self.frame_bytes <= PROBE_FRAME_OVERHEAD + MAX_PROBE_PADDING:
            raise ValueError(f"frame_bytes must be {PROBE_FRAME_OVERHEAD}.."
                             f"{PROBE_FRAME_OVERHEAD + MAX_PROBE_PADDING}")
        if self.first_delay < 0 or self.stagger < 0 or self.interval <= 0 or self.timeout <= 0:
            raise ValueError("delays must be positive")
        if self.stagger >= self.interval:
            raise ValueError("stagger must be shorter than interval")
        if self.timeout >= self.interval:
            raise ValueError("timeout must be shorter than interval")
        if not 0 < self.min_mbps <= self.recommended_mbps:
            raise ValueError("need 0 < min_mbps <= recommended_mbps")


@attrs.frozen
class Measurement:
    """The latest result of probing the link to one peer."""

    #: The receiver's figure, the one reported: ``bytes * 8 / first_to_last_us``.
    mbps: float
    #: The cross-check: the whole probe over (send to report - round trip);
    #: None without a round-trip figure or when the report came sooner than it.
    sender_mbps: float | None
    #: What the receiver counted: the bytes after the first frame, and how long
    #: (its clock) from the arrival of the first frame to that of the last.
    bytes: int
    first_to_last_us: int
    #: When the report arrived (the injected clock's seconds).
    at: float


def format_mbps(mbps: float) -> str:
    """12.345 -> '12.3' (as the admin pages show a figure)."""
    return f"{mbps:.1f}"


@attrs.define
class _Outgoing:
    probe_id: int
    sent_at: float
    total_bytes: int
    expected_bytes: int
    timeout: IDelayedCall


@attrs.define
class _Incoming:
    probe_id: int
    count: int
    next_index: int
    first_at: float
    bytes: int = 0


class BandwidthProber:
    """Probes the link to each linked peer and answers the peers' probes."""

    def __init__(self, clock: IReactorTime, send: Callable[[str, Any], None],
                 rtt_ms: Callable[[str], float | None] = lambda server_id: None,
                 settings: BandwidthSettings | None = None,
                 server_id: str | None = None) -> None:
        self.clock = clock
        #: This server's id: with the peer's, it decides which end probes first.
        self.server_id = server_id
        self.send = send
        self.rtt_ms = rtt_ms
        self.settings = settings or BandwidthSettings()
        #: The latest measurement of the link to each peer (kept when a link
        #: goes down: ``at`` says how old it is).
        self.results: dict[str, Measurement] = {}
        self._links: set[str] = set()
        self._next: dict[str, IDelayedCall] = {}
        self._out: dict[str, _Outgoing] = {}
        self._in: dict[str, _Incoming] = {}
        self._probe_id = 0

    # -- links ----------------------------------------------------------------

    def first_delay(self, server_id: str) -> float:
        """From the link to ``server_id`` coming up to its first probe."""
        s = self.settings
        later = self.server_id is not None and self.server_id.encode() > server_id.encode()
        return s.first_delay + (s.stagger if later else 0.0)

    def link_up(self, server_id: str) -> None:
        """A link to the peer is established: probe it ``first_delay(server_id)`` from now.

        A link that replaces another one starts afresh: a probe in flight on
        the old one, or arriving on it, is forgotten.
        """
        self._forget(server_id)
        self._links.add(server_id)
        self._next[server_id] = self.clock.callLater(
            self.first_delay(server_id), self._due, server_id)

    def link_down(self, server_id: str) -> None:
        self._forget(server_id)

    def stop(self) -> None:
        for server_id in list(self._links | set(self._in)):
            self._forget(server_id)

    def _forget(self, server_id: str) -> None:
        self._links.discard(server_id)
        call = self._next.pop(server_id, None)
        if call is not None and call.active():
            call.cancel()
        self._abandon(server_id)
        self._in.pop(server_id, None)

    def _abandon(self, server_id: str) -> None:
        out = self._out.pop(server_id, None)
        if out is not None and out.timeout.active():
            out.timeout.cancel()

    def linked(self) -> set[str]:
        return set(self._links)

    def in_flight(self, server_id: str) -> bool:
        return server_id in self._out

    def receiving(self) -> dict[str, int]:
        """The probe id this server is receiving from each peer (what it holds for them)."""
        return {sid: state.probe_id for sid, state in self._in.items()}

    # -- probing ----------------------------------------------------------------

    def _due(self, server_id: str) -> None:
        self._next.pop(server_id, None)
        if server_id not in self._links:
            return
        self._next[server_id] = self.clock.callLater(
            self.settings.interval, self._due, server_id)
        self.probe(server_id)

    def probe(self, server_id: str) -> bool:
        """Send a probe to a linked peer now; False if it is not linked or one is in flight."""
        if server_id not in self._links or server_id in self._out:
            return False
        s = self.settings
        self._probe_id = self._probe_id % _U32 + 1
        probe_id = self._probe_id
        self._out[server_id] = _Outgoing(
            probe_id, self.clock.seconds(), s.count * s.frame_bytes,
            (s.count - 1) * s.frame_bytes,
            self.clock.callLater(s.timeout, self._timed_out, server_id, probe_id))
        for frame in probe_frames(probe_id, s.count, s.frame_bytes):
            if self._out.get(server_id) is None:
                break  # the link went down while sending
            self.send(server_id, frame)
        return True

    def _timed_out(self, server_id: str, probe_id: int) -> None:
        out = self._out.get(server_id)
        if out is not None and out.probe_id == probe_id:
            del self._out[server_id]

    def on_report(self, server_id: str, msg: BandwidthReport) -> Measurement | None:
        """A peer's report on our probe; the new measurement, or None if it was ignored
        (not the probe in flight, or not the bytes sent: a confused or lying peer)."""
        out = self._out.get(server_id)
        if out is None or msg.probe_id != out.probe_id:
            return None
        self._abandon(server_id)
        if msg.bytes != out.expected_bytes:
            return None
        now = self.clock.seconds()
        us = max(msg.first_to_last_us, 1)  # all in one read: as fast as we can tell
        sender: float | None = None
        rtt = self.rtt_ms(server_id)
        if rtt is not None:
            transfer = (now - out.sent_at) - rtt / 1000
            if transfer > 0:
                sender = out.total_bytes * 8 / (transfer * 1_000_000)
        result = Measurement(msg.bytes * 8 / us, sender, msg.bytes, msg.first_to_last_us, now)
        self.results[server_id] = result
        return result

    # -- receiving ----------------------------------------------------------------

    def on_probe(self, server_id: str, msg: BandwidthProbe) -> BandwidthReport | None:
        """One frame of a peer's probe; on its last frame the report, also sent."""
        now = self.clock.seconds()
        current = self._in.get(server_id)
        if msg.count < 2 or msg.index >= msg.count:
            if current is not None and current.probe_id == msg.probe_id:
                del self._in[server_id]
            return None
        if msg.index == 0:
            self._in[server_id] = _Incoming(msg.probe_id, msg.count, 1, now)
            return None
        if current is None or current.probe_id != msg.probe_id:
            return None  # a probe whose first frame we did not see (or have given up)
        if msg.count != current.count or msg.index != current.next_index:
            del self._in[server_id]  # inconsistent: frames arrive in order on one link
            return None
        current.bytes += probe_frame_size(msg)
        current.next_index += 1
        if current.next_index < current.count:
            return None
        del self._in[server_id]
        us = min(max(round((now - current.first_at) * 1_000_000), 0), _U64)
        report = BandwidthReport(msg.probe_id, min(current.bytes, _U32), us)
        self.send(server_id, report)
        return report

    # -- the prerequisites ------------------------------------------------------------

    def warnings(self, server_id: str) -> list[str]:
        """The article's bandwidth prerequisite, checked against the latest measurement."""
        result = self.results.get(server_id)
        if result is None:
            return []
        s = self.settings
        shown = format_mbps(result.mbps)
        if result.mbps < s.min_mbps:
            return [f"link to {server_id} measured {shown} Mbit/s: "
                    f"below the {s.min_mbps:g} Mbit/s minimum"]
        if result.mbps < s.recommended_mbps:
            return [f"link to {server_id} measured {shown} Mbit/s: "
                    f"below the {s.recommended_mbps:g} Mbit/s recommended"]
        return []
