"""Link measurements and the admin pages' queries between peers (thin Twisted glue).

``PeerProbes(cluster)`` sits beside the ``ClusterService``, which owns the
peer connections, and handles the peer messages of ``protocol-spec/peer.rst``
sections "Link measurements" and "Connection lists":

* ``BandwidthProbe`` / ``BandwidthReport``: fed to a
  :class:`~evserver.state.bandwidth.BandwidthProber`, which probes each linked
  peer a few seconds after the link comes up and then every five minutes;
  :attr:`PeerProbes.bandwidth` holds the latest figure per peer and
  :meth:`PeerProbes.warnings` the prerequisites a link misses, for the admin
  site (``evserver/admin/msr.py``);
* ``ConnectionsRequest`` / ``Connections``: :meth:`PeerProbes.connections`
  asks a peer for the encoders and viewers connected to it (the admin page of
  another server), and a peer's request is answered from this server's relay
  core.

The cluster service calls :meth:`start` and :meth:`stop` with its own,
:meth:`link_up` / :meth:`link_down` when a peer's connection is established
or lost, and offers every frame of an established connection to
:meth:`frame` first.  What it needs of the cluster: ``reactor``,
``connections`` (server id -> connection with ``send``), ``core`` (the relay
core: ``encoders``, ``viewers``) and ``membership.view()`` (the round trip,
for the cross-check).  ``on_measured`` hears of each new bandwidth figure
(the service rewrites its status file).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from evserver.state.bandwidth import BandwidthProber, BandwidthSettings, Measurement, format_mbps
from evserver.wire import messages as m
from evserver.wire import peer as p
from evserver.wire.framing import ErrorCode
from evserver.wire.messages import EncoderState

log = Logger()

#: How long the admin pages wait for a peer's ``Connections``.
CONNECTIONS_TIMEOUT = 2.0
#: An answer this recent is given again instead of asking the peer again (the
#: admin pages refresh every 3 s, and several may be open).
CONNECTIONS_CACHE = 1.0
#: A peer asking more often than this is refused with ``RATE_LIMITED``: each
#: answer can be 256 KiB.
MIN_ANSWER_INTERVAL = 0.5
#: ``ConnectionsRequest`` ids come from the upper half of the u32 range, so
#: that a non-fatal ``Error`` about one is never taken for one about a
#: ``DigestRequest`` (whose ids the cluster service counts up from 1).
REQUEST_ID_BASE = 0x80000000


@attrs.frozen
class ConnectionsAnswer:
    """A peer's ``Connections``, and when it arrived (the reactor's seconds)."""

    server_id: str
    at: float
    encoders: tuple[p.ConnectedEncoder, ...]
    viewers: tuple[p.ConnectedViewer, ...]
    truncated: bool


@attrs.define
class _Pending:
    server_id: str
    timeout: IDelayedCall | None = None
    waiters: list[Deferred[ConnectionsAnswer | None]] = attrs.Factory(list)


def local_connections(core: Any, request_id: int) -> p.Connections:
    """The encoders and viewers connected to this server, as a ``Connections`` answer.

    The same rows as this server's own admin page (``ServerView``): encoders
    by id, viewers by account, domain and what they watch; bounded as
    ``pack_connections`` says.
    """
    encoders = []
    for session in sorted(core.encoders.values(), key=lambda s: s.encoder_id):
        channel = session.channel
        encoders.append(p.ConnectedEncoder(
            session.encoder_id, session.name, session.domain,
            EncoderState.STREAMING if session.streaming else EncoderState.ONLINE,
            len(channel.watchers) if channel is not None else 0,
            session.frames_in, session.bytes_in))
    viewers = []
    for viewer in core.viewers:
        feed = viewer.feed
        watching = sorted(ch.encoder_id for ch in viewer.watching.values())
        viewers.append(p.ConnectedViewer(
            viewer.account, viewer.domain,
            tuple(p.Watched(e) for e in watching[:p.MAX_WATCHED]),
            int(feed is not None),
            feed.queued_bytes if feed is not None else 0,
            feed.frames_written if feed is not None else 0,
            feed.bytes_written if feed is not None else 0,
            feed.frames_skipped if feed is not None else 0))
    viewers.sort(key=lambda v: (v.account, v.domain, [w.encoder_id for w in v.watching]))
    return p.pack_connections(request_id, encoders, viewers)


class PeerProbes:
    """Bandwidth probes and connection lists over the cluster's peer connections."""

    def __init__(self, cluster: Any, settings: BandwidthSettings | None = None,
                 connections_timeout: float = CONNECTIONS_TIMEOUT,
                 on_measured: Callable[[str], None] | None = None) -> None:
        self.cluster = cluster
        #: Called with the server id after each new bandwidth figure.
        self.on_measured = on_measured
        self.reactor = cluster.reactor
        self.connections_timeout = connections_timeout
        self.prober = BandwidthProber(self.reactor, self._send, self._rtt_ms, settings,
                                      cluster.server_id)
        self.running = False
        self._pending: dict[int, _Pending] = {}
        self._asking: dict[str, int] = {}  # server id -> its request in flight
        self._answers: dict[str, ConnectionsAnswer] = {}
        self._answered_at: dict[str, float] = {}
        self._next_request = REQUEST_ID_BASE

    # -- what the admin site reads -------------------------------------------------

    @property
    def bandwidth(self) -> dict[str, Measurement]:
        """The latest measurement of the link to each peer, by server id."""
        return self.prober.results

    def warnings(self, server_id: str) -> list[str]:
        """The bandwidth prerequisites the link to ``server_id`` misses (lower case, no stop)."""
        return self.prober.warnings(server_id)

    # -- lifecycle, from the cluster service -------------------------------------------

    def start(self) -> None:
        self.running = True
        for server_id in list(self.cluster.connections):
            if server_id not in self.prober.linked():
                self.prober.link_up(server_id)

    def stop(self) -> None:
        self.running = False
        self.prober.stop()
        for request_id in list(self._pending):
            self._finish(request_id, None)
        self._answers.clear()
        self._answered_at.clear()

    def link_up(self, server_id: str) -> None:
        """The connection to ``server_id`` is established (after ``connections`` holds it)."""
        if self.running:
            self.prober.link_up(server_id)

    def link_down(self, server_id: str) -> None:
        """The connection to ``server_id`` is gone: its probes and requests with it."""
        self.prober.link_down(server_id)
        request_id = self._asking.get(server_id)
        if request_id is not None:
            self._finish(request_id, None)
        self._answers.pop(server_id, None)
        self._answered_at.pop(server_id, None)

    # -- frames ----------------------------------------------------------------------

    def frame(self, server_id: str, conn: Any, msg: Any) -> bool:
        """Handle ``msg`` from ``server_id`` if it is ours; True if it was."""
        if isinstance(msg, p.BandwidthProbe):
            self.prober.on_probe(server_id, msg)
        elif isinstance(msg, p.BandwidthReport):
            result = self.prober.on_report(server_id, msg)
            if result is not None:
                log.info("link to {server_id}: {mbps} Mbit/s measured", server_id=server_id,
                         mbps=format_mbps(result.mbps))
                if self.on_measured is not None:
                    self.on_measured(server_id)
        elif isinstance(msg, p.ConnectionsRequest):
            self._answer(server_id, conn, msg)
        elif isinstance(msg, p.Connections):
            pending = self._pending.get(msg.request_id)
            if pending is not None and pending.server_id == server_id:
                self._finish(msg.request_id, ConnectionsAnswer(
                    server_id, self.reactor.seconds(), msg.encoders, msg.viewers,
                    bool(msg.truncated)))
            # else: late (after the timeout) or never asked: ignored
        elif isinstance(msg, m.Error) and not msg.fatal:
            pending = self._pending.get(msg.request_id)
            if pending is None or pending.server_id != server_id:
                return False
            log.info("{server_id} refused to list its connections: {message}",
                     server_id=server_id, message=msg.message)
            self._finish(msg.request_id, None)
        else:
            return False
        return True

    def _send(self, server_id: str, msg: Any) -> None:
        conn = self.cluster.connections.get(server_id)
        if conn is not None:
            conn.send(msg)

    def _rtt_ms(self, server_id: str) -> float | None:
        view = self.cluster.membership.view().get(server_id)
        return getattr(view, "rtt_ms", None) if view is not None else None

    # -- connection lists -------------------------------------------------------------

    def _answer(self, server_id: str, conn: Any, msg: p.ConnectionsRequest) -> None:
        now = self.reactor.seconds()
        last = self._answered_at.get(server_id)
        if last is not None and 0 <= now - last < MIN_ANSWER_INTERVAL:
            conn.send(m.Error(ErrorCode.RATE_LIMITED, msg.request_id, 0,
                              f"at most one connection list every {MIN_ANSWER_INTERVAL:g} s"))
            return
        self._answered_at[server_id] = now
        conn.send(local_connections(self.cluster.core, msg.request_id))

    def connections(self, server_id: str) -> Deferred[ConnectionsAnswer | None]:
        """Ask ``server_id`` for the encoders and viewers connected to it.

        Fires with its answer, or with None when it has no established link
        to this server, refuses, or does not answer within
        ``connections_timeout``.  Callers asking meanwhile share the request;
        an answer younger than ``CONNECTIONS_CACHE`` is given again.
        """
        now = self.reactor.seconds()
        cached = self._answers.get(server_id)
        if cached is not None and 0 <= now - cached.at < CONNECTIONS_CACHE:
            return succeed(cached)
        d: Deferred[ConnectionsAnswer | None] = Deferred()
        request_id = self._asking.get(server_id)
        if request_id is not None:
            self._pending[request_id].waiters.append(d)
            return d
        conn = self.cluster.connections.get(server_id)
        if conn is None or not self.running:
            return succeed(None)
        request_id = self._new_request_id()
        pending = _Pending(server_id, waiters=[d])
        self._pending[request_id] = pending
        self._asking[server_id] = request_id
        pending.timeout = self.reactor.callLater(
            self.connections_timeout, self._finish, request_id, None)
        conn.send(p.ConnectionsRequest(request_id))
        return d

    def _new_request_id(self) -> int:
        while True:
            request_id = self._next_request
            self._next_request = (request_id + 1 if request_id < 0xFFFFFFFF
                                  else REQUEST_ID_BASE)
            if request_id not in self._pending:
                return request_id

    def _finish(self, request_id: int, answer: ConnectionsAnswer | None) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        if self._asking.get(pending.server_id) == request_id:
            del self._asking[pending.server_id]
        if pending.timeout is not None and pending.timeout.active():
            pending.timeout.cancel()
        if answer is not None:
            self._answers[pending.server_id] = answer
        for d in pending.waiters:
            d.callback(answer)
