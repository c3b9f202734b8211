"""Peer connections (server to server): the handshake, then frames to the cluster service.

A member connects to another member with mutual TLS under the cluster
authority and sends ``PeerHello``; the other answers ``PeerWelcome``.  Both
check the cluster id and that the id claimed is the one in the certificate.
After that every frame goes to the ``ClusterService``.  A joiner (no client
certificate yet) may only send ``JoinRequest``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from evserver.net.connection import WireConnection
from evserver.wire import messages as m
from evserver.wire import peer as p
from evserver.wire.framing import ErrorCode, ProtocolName, ProtocolViolation

log = Logger()

HANDSHAKE_TIMEOUT = 5.0
#: Bytes a peer connection may queue while the peer does not read (see
#: ``PeerConnection.write_paused``): a few full anti-entropy rounds.
MAX_BACKLOG = 32 * 1024 * 1024


class PeerConnection(WireConnection):
    """One TLS connection between two members (or a joiner and a member)."""

    protocol_name = ProtocolName.PEER

    def __init__(self, cluster: Any, is_server: bool, expected_id: str | None = None) -> None:
        super().__init__(cluster.clock, p.HANDSHAKE_FRAME_LIMIT)
        self.cluster = cluster
        self.is_server = is_server
        self.expected_id = expected_id
        self.peer_id: str | None = None
        self.peer_hello: Any = None
        self.established = False
        self._handshake_call: IDelayedCall | None = None
        #: Bytes sent since the transport's write buffer filled up (None: not full).
        self.backlog: int | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._handshake_call = self.clock.callLater(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        if not self.is_server:
            self.send(self.cluster.hello(p.PeerHello))

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()

    # Write backpressure.  A client connection stops reading while its
    # answers are not read (WireConnection); two members must not: both may
    # send large batches at once (anti-entropy after a heal, in both
    # directions), and if each stopped reading until the other read, neither
    # buffer would ever drain and heartbeats would stop both ways.  A member
    # keeps reading and counts what it queues meanwhile; a peer that lets
    # MAX_BACKLOG pile up is disconnected (membership reconnects it).
    def write_paused(self) -> None:
        if self.backlog is None:
            self.backlog = 0

    def write_resumed(self) -> None:
        self.backlog = None

    def send(self, msg: Any) -> None:
        if self.backlog is None or not self.connected or self.failed:
            super().send(msg)
            return
        frame = m.encode(msg)
        self.backlog += len(frame)
        if self.backlog > MAX_BACKLOG:
            log.warn("peer {peer} does not read: {n} bytes queued; disconnecting",
                     peer=self.peer_id or self.expected_id, n=self.backlog)
            self.backlog = None
            self.failed = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.write_frame(frame)

    def _handshake_timeout(self) -> None:
        self._handshake_call = None
        if not self.established:
            self.fail(ErrorCode.KEEPALIVE_TIMEOUT, "no peer handshake within the time allowed")

    def _certified_id(self) -> str | None:
        from evserver.cluster.ca import ClusterError, peer_server_id

        try:
            return peer_server_id(self.transport)
        except ClusterError:
            return None

    def message_received(self, msg: Any) -> None:
        if self.established:
            self.cluster.peer_frame(self, msg)
            return
        if isinstance(msg, p.JoinRequest) and self.is_server:
            self.cluster.join_request(self, msg)
            return
        expected = p.PeerWelcome if not self.is_server else p.PeerHello
        if not isinstance(msg, expected):
            raise ProtocolViolation(ErrorCode.UNEXPECTED_MESSAGE,
                                    f"expected {expected.__name__}, not {type(msg).__name__}")
        if msg.cluster_id != self.cluster.cluster_id:
            self.fail(ErrorCode.WRONG_CLUSTER,
                      f"this server belongs to cluster {self.cluster.cluster_id}, "
                      f"not {msg.cluster_id}")
            return
        certified = self._certified_id()
        if certified != msg.server_id or (self.expected_id and msg.server_id != self.expected_id):
            self.fail(ErrorCode.AUTH_FAILED,
                      f"the peer claims to be {msg.server_id!r} but its certificate "
                      f"names {certified!r}")
            return
        self.peer_id = msg.server_id
        self.peer_hello = msg
        if self.is_server:
            self.send(self.cluster.hello(p.PeerWelcome))
        self._established()

    def _established(self) -> None:
        self.established = True
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        self.decoder.max_frame = p.FRAME_LIMIT
        if not self.cluster.peer_connected(self):
            self.close()

    def dataReceived(self, data: bytes) -> None:
        if self.established and self.peer_id is not None:
            self.cluster.membership.on_frame(self.peer_id)
        super().dataReceived(data)

    def connection_closed(self, reason: Failure) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        if not self.established:
            from evserver.cluster.ca import describe_tls_failure

            peer = self.transport.getPeer() if self.transport is not None else None
            log.info("peer connection {direction} {peer} failed: {why}",
                     direction="from" if self.is_server else "to",
                     peer=getattr(peer, "host", peer),
                     why=describe_tls_failure(reason))
        self.cluster.peer_disconnected(self, reason)


class PeerServerFactory(Factory):
    noisy = False

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def buildProtocol(self, addr: Any) -> PeerConnection:
        return PeerConnection(self.cluster, is_server=True)


class PeerClientFactory(Factory):
    noisy = False

    def __init__(self, cluster: Any, expected_id: str) -> None:
        self.cluster = cluster
        self.expected_id = expected_id

    def buildProtocol(self, addr: Any) -> PeerConnection:
        return PeerConnection(self.cluster, is_server=False, expected_id=self.expected_id)
