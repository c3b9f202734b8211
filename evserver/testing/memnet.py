"""An in-memory network for tests and the simulator.

Connections between protocols are moved by ``MemoryNetwork.flush`` under
the test's control, on a ``task.Clock``: no sockets, no real time.  Unlike
``twisted.test.iosim`` it models what the relay depends on: a write buffer
that pauses a streaming producer past a high-water mark and resumes it when
drained, readers that stop reading, aborts that drop buffered data, hosts
that die, and links that are cut.

For the cluster simulator it also models (all opt-in, so the older tests
keep their exact behaviour):

* ``freeze_host``: a stopped process (SIGSTOP).  Nothing is delivered to or
  from it; a connection attempt to it succeeds at the TCP level (the kernel
  accepts) but its application accepts only when it is thawed; a close by
  the other side reaches it only when it is thawed.
* ``crash_host``: a killed process.  Its kernel resets its connections (the
  other ends hear it at once, unless the link is cut) and its own protocols
  are told nothing: a dead process runs no code.
* ``tcp_faults=True``: TCP's behaviour across a cut link.  A connection
  closed by one end while the link is cut stays open at the other end (an
  "orphan"), which learns of it only when the link heals (a reset) or when
  it closes the connection itself.  A connection attempt across a cut gets
  no answer, not even a refusal; its SYN is sent again 1, 3, 7, ... s after
  the first (Linux's initial retransmission timeout doubling), so it
  succeeds if the link heals before the attempt's timeout.  Without it the
  other end of a close is told at once whatever the link, and an attempt
  across a cut fails at its timeout.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
_serial = itertools.count(1)


@implementer(ITCPTransport, IConsumer, IPushProducer)
class MemoryTransport:
    """One end of an in-memory connection."""

    def __init__(self, net: MemoryNetwork, protocol: Any, host: IPv4Address,
                 peer: IPv4Address) -> None:
        self.net = net
        self.protocol = protocol
        self.host = host
        self.peer_address = peer
        self.other: MemoryTransport | None = None
        self.outbuf: list[bytes] = []
        self.outbytes = 0
        self.producer: Any = None
        self.streaming = False
        self.producer_paused = False
        self.reading = True  # pauseProducing() on the transport stops delivery to us
        self.reader_stalled = False  # a test's "this side never reads"
        self.disconnecting = False
        self.disconnected = False
        self.aborted = False
        #: The other end closed while this end could not hear it (half-open).
        self.orphaned = False
        self.serial = next(_serial)
        self.bytes_written = 0

    def __repr__(self) -> str:
        return f"<MemoryTransport #{self.serial} {self.host.host}:{self.host.port}>"

    # ITransport
    def write(self, data: bytes) -> None:
        if self.disconnecting or self.disconnected:
            return
        if not isinstance(data, bytes):
            raise TypeError("write() takes bytes")
        if not data:
            return
        self.outbuf.append(data)
        self.outbytes += len(data)
        self.bytes_written += len(data)
        if (self.producer is not None and self.streaming and not self.producer_paused
                and self.outbytes > HIGH_WATER):
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True
        self.outbuf.clear()
        self.outbytes = 0

    def getPeer(self) -> IPv4Address:
        return self.peer_address

    def getHost(self) -> IPv4Address:
        return self.host

    # ITCPTransport odds and ends
    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    # IConsumer
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.streaming = streaming
        self.producer_paused = False

    def unregisterProducer(self) -> None:
        self.producer = None

    # IPushProducer (of incoming data)
    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def stopProducing(self) -> None:
        self.loseConnection()

    # Moving bytes
    def _drained(self) -> None:
        if (self.producer is not None and self.streaming and self.producer_paused
                and self.outbytes <= LOW_WATER):
            self.producer_paused = False
            self.producer.resumeProducing()


class MemoryNetwork:
    """Listeners keyed by (host, port), connections moved by ``flush``."""

    def __init__(self, clock: Clock | None = None, chunk: int = 64 * 1024,
                 tcp_faults: bool = False) -> None:
        self.clock = clock or Clock()
        self.chunk = chunk
        self.tcp_faults = tcp_faults
        self.listeners: dict[tuple[str, int], Factory] = {}
        self.connections: list[tuple[MemoryTransport, MemoryTransport]] = []
        self.down_hosts: set[str] = set()
        self.cut_links: set[frozenset[str]] = set()
        self.frozen_hosts: set[str] = set()
        #: Ends whose peer closed while they could not hear it (see ``tcp_faults``).
        self.orphans: list[MemoryTransport] = []
        #: Connections to a frozen host, accepted by its kernel, not yet by it.
        self._held_accepts: list[tuple[IProtocolFactory, MemoryTransport, MemoryTransport]] = []
        self._client_ports = itertools.count(40000)

    # -- topology --------------------------------------------------------

    def listen(self, host: str, port: int, factory: Factory) -> None:
        self.listeners[(host, port)] = factory

    def unlisten(self, host: str, port: int) -> None:
        self.listeners.pop((host, port), None)

    def endpoint(self, host: str, port: int, source: str = "127.0.0.1",
                 timeout: float = 2.0) -> MemoryEndpoint:
        return MemoryEndpoint(self, source, host, port, timeout)

    def reachable(self, a: str, b: str) -> bool:
        return (a not in self.down_hosts and b not in self.down_hosts
                and a not in self.frozen_hosts and b not in self.frozen_hosts
                and frozenset((a, b)) not in self.cut_links)

    def _hears(self, t: MemoryTransport) -> bool:
        """Whether the end ``t`` would hear a reset from the other end now."""
        here = t.host.host
        return (here not in self.down_hosts and here not in self.frozen_hosts
                and frozenset((here, t.peer_address.host)) not in self.cut_links)

    def kill_host(self, host: str) -> None:
        """The host's process died: its listeners vanish, its connections reset."""
        self.down_hosts.add(host)
        for key in [k for k in self.listeners if k[0] == host]:
            del self.listeners[key]
        for a, b in list(self.connections):
            if host in (a.host.host, b.host.host):
                self._reset(a, b)

    def revive_host(self, host: str) -> None:
        self.down_hosts.discard(host)

    def crash_host(self, host: str) -> None:
        """The host's process was killed: like ``kill_host``, but its own protocols
        are told nothing (it runs no code any more), the other ends hear the
        kernel's reset at once unless the link is cut, and a frozen process
        can be crashed too."""
        self.frozen_hosts.discard(host)
        self.down_hosts.add(host)
        for key in [k for k in self.listeners if k[0] == host]:
            del self.listeners[key]
        self._held_accepts = [h for h in self._held_accepts if h[1].host.host != host]
        self.orphans = [t for t in self.orphans if t.host.host != host]
        for a, b in list(self.connections):
            if host in (a.host.host, b.host.host):
                for t in (a, b):
                    t.outbuf.clear()
                    t.outbytes = 0
                    if t.host.host == host:
                        t.disconnected = t.disconnecting = True  # silently
                self._close(a, b, error.ConnectionLost("connection reset"))

    def freeze_host(self, host: str) -> None:
        """The host's process stops (SIGSTOP): no traffic in or out, no accepts."""
        self.frozen_hosts.add(host)

    def thaw_host(self, host: str) -> None:
        """The host's process continues: it accepts what its kernel queued meanwhile;
        the resets and data held for it are delivered by the next ``pump``."""
        self.frozen_hosts.discard(host)
        held, self._held_accepts = self._held_accepts, []
        for factory, st, ct in held:
            if st.host.host != host:
                self._held_accepts.append((factory, st, ct))
            elif not st.disconnected:
                self._accept(factory, st, ct)

    def cut(self, a: str, b: str) -> None:
        """Silently drop traffic between two hosts (no reset: only keepalives notice)."""
        self.cut_links.add(frozenset((a, b)))

    def heal(self, a: str, b: str) -> None:
        self.cut_links.discard(frozenset((a, b)))

    # -- connecting ------------------------------------------------------

    def _connect(self, source: str, host: str, port: int, client_factory: IProtocolFactory,
                 timeout: float) -> Deferred[Any]:
        if self.tcp_faults and frozenset((source, host)) in self.cut_links:
            d: Deferred[Any] = Deferred()
            self._resend_syn(d, self.clock.seconds(), 1.0, source, host, port, client_factory,
                             timeout)
            return d
        factory = self.listeners.get((host, port))
        if factory is None or host in self.down_hosts or source in self.down_hosts:
            return defer.fail(error.ConnectionRefusedError(f"{host}:{port}"))
        if host in self.frozen_hosts and source not in self.frozen_hosts and (
                frozenset((source, host)) not in self.cut_links):
            return self._connect_to_frozen(factory, source, host, port, client_factory)
        if not self.reachable(source, host):
            d = Deferred()
            self.clock.callLater(timeout, d.errback,
                                 Failure(error.TimeoutError(f"{host}:{port}")))
            return d
        client_addr = IPv4Address("TCP", source, next(self._client_ports))
        server_addr = IPv4Address("TCP", host, port)
        server_proto = factory.buildProtocol(client_addr)
        client_proto = client_factory.buildProtocol(server_addr)
        if server_proto is None or client_proto is None:
            return defer.fail(error.ConnectionRefusedError("factory refused"))
        st = MemoryTransport(self, server_proto, server_addr, client_addr)
        ct = MemoryTransport(self, client_proto, client_addr, server_addr)
        st.other, ct.other = ct, st
        self.connections.append((ct, st))
        server_proto.makeConnection(st)
        client_proto.makeConnection(ct)
        return defer.succeed(client_proto)

    def _resend_syn(self, d: Deferred[Any], start: float, rto: float, source: str, host: str,
                    port: int, client_factory: IProtocolFactory, timeout: float) -> None:
        """An attempt across a cut link: try again after ``rto``, until ``timeout``."""
        elapsed = self.clock.seconds() - start
        if elapsed > 0 and frozenset((source, host)) not in self.cut_links:
            self._connect(source, host, port, client_factory,
                          max(timeout - elapsed, 0.0)).chainDeferred(d)
            return
        if elapsed + rto >= timeout:
            self.clock.callLater(max(timeout - elapsed, 0.0), d.errback,
                                 Failure(error.TimeoutError(f"{host}:{port}")))
        else:
            self.clock.callLater(rto, self._resend_syn, d, start, 2 * rto, source, host, port,
                                 client_factory, timeout)

    def _connect_to_frozen(self, factory: IProtocolFactory, source: str, host: str, port: int,
                           client_factory: IProtocolFactory) -> Deferred[Any]:
        """The kernel of a frozen host completes the handshake; the process accepts later."""
        client_addr = IPv4Address("TCP", source, next(self._client_ports))
        server_addr = IPv4Address("TCP", host, port)
        client_proto = client_factory.buildProtocol(server_addr)
        if client_proto is None:
            return defer.fail(error.ConnectionRefusedError("factory refused"))
        st = MemoryTransport(self, None, server_addr, client_addr)
        ct = MemoryTransport(self, client_proto, client_addr, server_addr)
        st.other, ct.other = ct, st
        self.connections.append((ct, st))
        self._held_accepts.append((factory, st, ct))
        client_proto.makeConnection(ct)
        return defer.succeed(client_proto)

    def _accept(self, factory: IProtocolFactory, st: MemoryTransport,
                ct: MemoryTransport) -> None:
        server_proto = factory.buildProtocol(ct.host)
        if server_proto is None:
            st.disconnected = st.disconnecting = True
            self._close(ct, st, error.ConnectionLost("connection reset"))
            return
        st.protocol = server_proto
        server_proto.makeConnection(st)

    # -- moving ----------------------------------------------------------

    def _deliver(self, src: MemoryTransport, dst: MemoryTransport) -> bool:
        if not src.outbuf or not dst.reading or dst.reader_stalled or dst.disconnected:
            return False
        if not self.reachable(src.host.host, dst.host.host):
            return False
        data = b"".join(src.outbuf)
        piece, rest = data[: self.chunk], data[self.chunk:]
        src.outbuf = [rest] if rest else []
        src.outbytes = len(rest)
        src._drained()
        dst.protocol.dataReceived(piece)
        return True

    def _reset(self, a: MemoryTransport, b: MemoryTransport) -> None:
        for t in (a, b):
            t.outbuf.clear()
            t.outbytes = 0
        self._close(a, b, error.ConnectionLost("connection reset"))

    def _close(self, a: MemoryTransport, b: MemoryTransport, reason: Exception) -> None:
        if (a, b) in self.connections:
            self.connections.remove((a, b))
        for t in (a, b):
            if t.disconnected or t.orphaned:
                continue
            if t.protocol is None:  # a frozen host's kernel accepted it; the process never will
                t.disconnected = t.disconnecting = True
                continue
            if t.host.host in self.frozen_hosts or (self.tcp_faults and not self._hears(t)):
                t.orphaned = True
                self.orphans.append(t)
                continue
            t.disconnected = True
            t.disconnecting = True
            t.protocol.connectionLost(Failure(reason))

    def _settle_orphans(self) -> bool:
        """Tell orphans that can hear again (a reset) or that closed themselves."""
        moved = False
        for t in list(self.orphans):
            if t.disconnecting:
                reason: Exception = (error.ConnectionLost("aborted") if t.aborted
                                     else error.ConnectionDone("closed"))
            elif self._hears(t):
                reason = error.ConnectionLost("connection reset")
            else:
                continue
            self.orphans.remove(t)
            t.outbuf.clear()
            t.outbytes = 0
            t.disconnected = t.disconnecting = True
            t.protocol.connectionLost(Failure(reason))
            moved = True
        return moved

    def pump(self) -> bool:
        """Move one chunk each way on every connection; close finished ones."""
        moved = False
        for a, b in list(self.connections):
            moved |= self._deliver(a, b)
            moved |= self._deliver(b, a)
            for t in (a, b):
                if t.disconnecting and (t.aborted or not t.outbuf):
                    reason = (error.ConnectionLost("aborted") if t.aborted
                              else error.ConnectionDone("closed"))
                    self._close(a, b, reason)
                    moved = True
                    break
        if self.orphans:
            moved |= self._settle_orphans()
        return moved

    def flush(self, limit: int = 100_000) -> None:
        """Pump until nothing moves (and zero-delay calls have run)."""
        for _ in range(limit):
            self.clock.advance(0)
            if not self.pump():
                return
        raise RuntimeError("the network did not settle")

    def advance(self, seconds: float, step: float = 0.01) -> None:
        """Let ``seconds`` of simulated time pass, flushing between steps."""
        self.flush()
        remaining = seconds
        while remaining > 1e-12:
            dt = min(step, remaining)
            self.clock.advance(dt)
            remaining -= dt
            self.flush()

    def run_until(self, predicate: Callable[[], bool], timeout: float,
                  step: float = 0.01) -> float:
        """Advance until ``predicate()`` holds; return the simulated time it took."""
        start = self.clock.seconds()
        self.flush()
        while not predicate():
            if self.clock.seconds() - start > timeout:
                raise TimeoutError(f"condition not met within {timeout} s of simulated time")
            self.clock.advance(step)
            self.flush()
        return self.clock.seconds() - start


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    def __init__(self, net: MemoryNetwork, source: str, host: str, port: int,
                 timeout: float) -> None:
        self.net = net
        self.source = source
        self.host = host
        self.port = port
        self.timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        return self.net._connect(self.source, self.host, self.port, protocolFactory,
                                 self.timeout)
