"""A cluster of relay servers in one process, on the in-memory network.

Until the peer protocol carries them, the servers' directory announcements
and the failure detector's verdicts travel over a simulated bus with a
configurable latency and detection delay; clients, connections and time are
real parts of the product (the client library, the protocols, the core) on
a ``task.Clock``.  The store is shared, as a perfectly replicated one would be.
"""

from __future__ import annotations

from typing import Any

from evserver.net.client import Address, ClusterViewer, EncoderClient, TLSConfig
from evserver.net.server import ServerSettings
from evserver.state.directory import Location
from evserver.store import Store
from evserver.testing.harness import ENCODER_PORT, VIEWER_PORT, MemoryServer
from evserver.testing.memnet import MemoryNetwork
from evserver.wire import messages as m

#: Client keepalive and server settings within the failover budget.
FAST = ServerSettings(keepalive_interval=0.5, keepalive_timeout=1.5)


class SimCluster:
    def __init__(self, store: Store, size: int = 3, bus_latency: float = 0.005,
                 detect_after: float = 1.5, settings: ServerSettings = FAST) -> None:
        self.net = MemoryNetwork()
        self.clock = self.net.clock
        self.store = store
        self.bus_latency = bus_latency
        self.detect_after = detect_after
        self.servers: list[MemoryServer] = []
        self.alive: set[str] = set()
        for i in range(1, size + 1):
            server = MemoryServer(self.net, f"127.0.1.{i}", store, f"s{i}", settings=settings,
                                  servers=self.server_infos)
            server.core.on_announce = self._bus(server)
            self.servers.append(server)
            self.alive.add(server.core.server_id)

    def server_infos(self) -> tuple[m.ServerInfo, ...]:
        return tuple(s.info for s in self.servers if s.core.server_id in self.alive)

    def _bus(self, sender: MemoryServer) -> Any:
        def announce(location: Location) -> None:
            for server in self.servers:
                if server is not sender and server.core.server_id in self.alive:
                    self.clock.callLater(self.bus_latency, self._deliver, sender, server,
                                         location)
        return announce

    def _deliver(self, sender: MemoryServer, receiver: MemoryServer, location: Location) -> None:
        if {sender.core.server_id, receiver.core.server_id} <= self.alive:
            receiver.core.remote_locations([location])

    def kill(self, index: int) -> None:
        """The server's process dies: connections reset; peers declare it dead later."""
        server = self.servers[index]
        sid = server.core.server_id
        self.alive.discard(sid)
        self.net.kill_host(server.host)
        self.clock.callLater(self.detect_after, self._declare_dead, sid)

    def freeze(self, index: int) -> None:
        """The server stops answering (SIGSTOP, a cut network): silence, no reset."""
        server = self.servers[index]
        sid = server.core.server_id
        self.alive.discard(sid)
        for other in ["127.0.0.1"] + [s.host for s in self.servers if s is not server]:
            self.net.cut(server.host, other)
        self.clock.callLater(self.detect_after, self._declare_dead, sid)

    def _declare_dead(self, sid: str) -> None:
        for server in self.servers:
            if server.core.server_id in self.alive:
                server.core.server_lost(sid)

    def addresses(self, port: int) -> list[Address]:
        return [Address(s.host, port) for s in self.servers]

    def encoder(self, encoder_id: str, secret: str, source: Any, first: int = 0,
                **kw: Any) -> EncoderClient:
        servers = self.addresses(ENCODER_PORT)
        servers = servers[first:] + servers[:first]
        return EncoderClient(self.clock, servers, encoder_id, secret, source,
                             TLSConfig(enabled=False), connector=self._connector(), **kw)

    def viewer(self, account: str, password: str, first: int = 0, **kw: Any) -> ClusterViewer:
        servers = self.addresses(VIEWER_PORT)
        servers = servers[first:] + servers[:first]
        return ClusterViewer(self.clock, servers, account, password, TLSConfig(enabled=False),
                             connector=self._connector(), **kw)

    def _connector(self) -> Any:
        return lambda a: self.net.endpoint(a.host, a.port, "127.0.0.1")
