"""A whole cluster in one process: real servers, real cluster services, real clients.

Unlike ``simcluster`` (which fakes the cluster with a bus), every server here
is a ``MemoryServer`` (relay core, protocols, its own SQLite store) plus a
real ``ClusterService``: its peer links are mutual-TLS connections (OpenSSL
in memory, ``TLSMemoryBIOFactory``) over the in-memory network, its
membership runs the real failure detector with indirect probes, the
directory travels in peer frames, and the stores replicate through the peer
protocol (when ``Store`` has the replication API; otherwise every store is
provisioned alike).  Encoders and viewers are the client library's
``EncoderClient`` and ``ClusterViewer``.

Time is one ``task.Clock``; each server sees it through its own
:class:`HostClock`, which is what makes a server freezable.

Fault model
-----------

``crash(sid)``
    The process is killed (SIGKILL): its kernel resets its connections (the
    other ends hear it at once unless the link is cut), its listeners vanish,
    its timers never run again and its protocols are told nothing.  What it
    had committed to its store stays on disk.
``freeze(sid)`` / ``thaw(sid)``
    The process is stopped (SIGSTOP) and continued.  While frozen nothing is
    delivered to or from it, its timers do not run (they fire, overdue, when
    it is thawed), connection attempts to it complete at the TCP level but
    are accepted by the process only after the thaw, and closes by the other
    ends reach it only after the thaw.  Its connections are not reset: the
    others notice only through silence (keepalives, heartbeats).
``partition(*groups)`` / ``cut(a, b)`` / ``heal()``
    Links between hosts silently drop traffic (no reset) and deliver what
    was held when healed (TCP retransmits); a connection attempt across a
    cut gets no answer, its SYN is sent again after 1 s, and it fails at its
    timeout (2 s for clients, the cluster service's own for peers); a
    connection closed by one end across a cut stays open at the other
    (half-open) until the heal or until that end gives up by itself.
    Clients live on one host, ``CLIENT_HOST``, which a partition puts in one
    of the groups.  (``MemoryNetwork(tcp_faults=True)``.)
``restart(sid)``
    A crashed server starts again on the same data directory and store, with
    a fresh ``MemoryServer`` and ``ClusterService`` and a higher incarnation.
``add_server(via)``
    A new server joins with a join token minted by member ``via`` (the real
    ``Admissions`` on the member, the joiner's side of ``join`` over the
    memory network with the pinned TLS options) and receives the replica by
    anti-entropy.

The network has no latency: failover times measured here are those of the
timers (keepalives, failure detector, back-offs), not of the wire.

Everything that would make a run differ from the next is seeded: the
membership's back-off jitter, the clients' retry jitter, the incarnations;
time starts at ``T0``.  (Certificates and join tokens use the real time:
they only need to be valid.)
"""

from __future__ import annotations

import bisect
import json
import random
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, cast

import attrs
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import Clock, LoopingCall
from zope.interface import implementer

from evserver import passwords
from evserver.cluster import join as joining
from evserver.cluster import service as cluster_service
from evserver.cluster.ca import (
    ClusterIdentity,
    cluster_dir,
    create_cluster,
    install_membership,
    load_certificate_pem,
    load_private_key_pem,
    make_csr,
    peer_client_tls_options,
    peer_server_tls_options,
    pinned_client_tls_options,
    sign_csr,
)
from evserver.cluster.provision import MEMBERS_FILE, peer_address_entry
from evserver.cluster.service import ClusterService
from evserver.media import SyntheticSource
from evserver.net.client import (
    CONNECT_TIMEOUT,
    Address,
    ClusterViewer,
    EncoderClient,
    TLSConfig,
    _ReconnectingClient,
)
from evserver.net.connection import WireConnection
from evserver.net.server import ServerSettings
from evserver.state import membership as ms
from evserver.state.balance import BalanceSettings
from evserver.state.fanout import ViewerFeed
from evserver.state.hlc import Stamp
from evserver.state.keepalive import Keepalive
from evserver.state.membership import Membership, MembershipSettings, PeerState
from evserver.state.relay import Channel, Limits
from evserver.state.replica import Update
from evserver.store import Store, server_clock
from evserver.testing.harness import ENCODER_PORT, RELAY_PORT, VIEWER_PORT, MemoryServer
from evserver.testing.memnet import MemoryNetwork
from evserver.tls import wrap_client_factory, wrap_server_factory
from evserver.wire import peer as p

PEER_PORT = 47100
ADMIN_PORT = 9443
CLIENT_HOST = "10.0.9.1"
#: Simulated time starts at a realistic Unix time (stamps, wall clocks).
T0 = 1_700_000_000.0
#: Clients' and servers' keepalives as shipped (0.5 s / 1.5 s).
FAST = ServerSettings(keepalive_interval=0.5, keepalive_timeout=1.5)
ACCOUNT, PASSWORD, DOMAIN = "alice", "alice-pw", "north"
#: The clients' connection timeout (``_ReconnectingClient``'s default).
CLIENT_CONNECT_TIMEOUT = CONNECT_TIMEOUT
#: How a viewer's frames may pause before it counts as not receiving.
GAP = 0.35

fast_hash = partial(passwords.hash_password, n=2, r=1, p=1)


def external_address(host: str) -> p.ExternalAddress:
    """Where a simulated server is reached: the harness's ports on its host."""
    return p.ExternalAddress(host, ENCODER_PORT, VIEWER_PORT, RELAY_PORT, ADMIN_PORT, host,
                             PEER_PORT)


def replication_available() -> bool:
    """Whether ``Store`` has the replication API the cluster service drives."""
    return all(hasattr(Store, name) for name in ("subscribe", "apply_updates", "digest",
                                                  "updates_for"))


# -- one clock per host ---------------------------------------------------------


@implementer(IDelayedCall)
class HostCall:
    """A call scheduled by one host: held while the host is frozen, dropped if it died."""

    def __init__(self, host: HostClock, func: Callable[..., Any], args: tuple[Any, ...],
                 kw: dict[str, Any], when: float) -> None:
        self.host = host
        self.func = func
        self.args = args
        self.kw = kw
        self.time = when
        self.inner: IDelayedCall | None = None
        self.held = False
        self.cancelled = False
        self.called = False

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", repr(self.func))
        return f"<HostCall {self.host.name} {name} at {self.time - T0:.3f}>"

    def getTime(self) -> float:
        return self.time

    def active(self) -> bool:
        return not (self.cancelled or self.called)

    def cancel(self) -> None:
        if self.cancelled:
            raise error.AlreadyCancelled()
        if self.called:
            raise error.AlreadyCalled()
        self.cancelled = True
        self._unschedule()
        self.host._calls.pop(self, None)

    def reset(self, secondsFromNow: float) -> None:
        if not self.active():
            raise error.AlreadyCalled() if self.called else error.AlreadyCancelled()
        self._unschedule()
        self._schedule(self.host.seconds() + secondsFromNow)

    def delay(self, secondsLater: float) -> None:
        if not self.active():
            raise error.AlreadyCalled() if self.called else error.AlreadyCancelled()
        self._unschedule()
        self._schedule(self.time + secondsLater)

    def _schedule(self, when: float) -> None:
        self.time = when
        if not self.host.dead:
            self.inner = self.host.base.callLater(max(0.0, when - self.host.seconds()),
                                                  self._fire)

    def _unschedule(self) -> None:
        if self.held:
            self.held = False
            self.host._held.remove(self)
        elif self.inner is not None and self.inner.active():
            self.inner.cancel()
        self.inner = None

    def _fire(self) -> None:
        self.inner = None
        if self.host.dead or not self.active():
            return
        if self.host.frozen:
            self.held = True
            self.host._held.append(self)
            return
        self._run()

    def _run(self) -> None:
        self.called = True
        self.host._calls.pop(self, None)
        self.func(*self.args, **self.kw)


@implementer(IReactorTime)
class HostClock:
    """One host's view of the shared clock: it can be frozen, and it can die."""

    def __init__(self, base: Clock, name: str) -> None:
        self.base = base
        self.name = name
        self.frozen = False
        self.dead = False
        self._calls: dict[HostCall, None] = {}  # insertion-ordered
        self._held: list[HostCall] = []

    def seconds(self) -> float:
        return self.base.seconds()

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kw: Any) -> HostCall:
        call = HostCall(self, callable, args, kw, self.seconds() + delay)
        if not self.dead:
            self._calls[call] = None
            call._schedule(call.time)
        return call

    def getDelayedCalls(self) -> list[HostCall]:
        return [c for c in self._calls if c.active()]

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        """Run every call that fell due while frozen, oldest first."""
        self.frozen = False
        held = sorted(self._held, key=lambda c: c.time)
        self._held = []
        for call in held:
            call.held = False
        for call in held:
            if call.active() and not self.frozen and not self.dead:
                call._run()

    def kill(self) -> None:
        """The process died: nothing it scheduled ever runs."""
        self.dead = True
        for call in list(self._calls):
            if call.inner is not None and call.inner.active():
                call.inner.cancel()
            call.inner = None
        self._calls.clear()
        self._held.clear()


class _HostNet:
    """The memory network as one server process sees it: through its own clock."""

    def __init__(self, net: MemoryNetwork, clock: HostClock) -> None:
        self._net = net
        self.clock = clock

    def listen(self, host: str, port: int, factory: Any) -> None:
        self._net.listen(host, port, factory)

    def endpoint(self, host: str, port: int, source: str = "127.0.0.1",
                 timeout: float = 2.0) -> Any:
        return self._net.endpoint(host, port, source, timeout)


# -- peer links over the memory network, in TLS ---------------------------------


class _MemoryPort:
    """What ``ClusterService`` keeps of its listening peer port."""

    def __init__(self, net: MemoryNetwork, host: str, port: int) -> None:
        self.net = net
        self.host = host
        self.port = port

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, self.port)

    def stopListening(self) -> Deferred[None]:
        self.net.unlisten(self.host, self.port)
        return defer.succeed(None)

    def startListening(self) -> None:
        pass


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """``inner`` behind client TLS (what a cluster service dials members with)."""

    def __init__(self, inner: Any, creator: Any, clock: IReactorTime) -> None:
        self.inner = inner
        self.creator = creator
        self.clock = clock

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        return cast(Deferred[Any], self.inner.connect(
            wrap_client_factory(protocolFactory, self.creator, self.clock)))


class SimClusterService(ClusterService):
    """``ClusterService`` with its randomness seeded and its state changes recorded."""

    def __init__(self, *args: Any, rng: random.Random, incarnation: int,
                 trace: list[tuple[Any, ...]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.membership = Membership(self.server_id, self, self.reactor,
                                     self.membership.settings, rng=rng)
        self.incarnation = incarnation
        self.trace = trace

    def member_state_changed(self, server_id: str, old_state: Any, new_state: Any) -> None:
        self.trace.append((round(self.reactor.seconds() - T0, 6), "member", self.server_id,
                           server_id, str(old_state), str(new_state)))
        super().member_state_changed(server_id, old_state, new_state)


# -- servers ------------------------------------------------------------------------


@attrs.define(eq=False)
class SimServer:
    """One server process (and what survives it on disk)."""

    server_id: str
    host: str
    data_dir: Path
    identity: ClusterIdentity
    clock: HostClock
    store: Store
    server: MemoryServer
    cluster: SimClusterService
    state: str = "up"  # up, frozen, crashed
    incarnations: int = 1
    #: When this incarnation started.
    booted_at: float = 0.0

    @property
    def core(self) -> Any:
        return self.server.core

    @property
    def live(self) -> bool:
        return self.state == "up"


@attrs.define
class Resume:
    """How long a viewer went without an encoder's frames after an event."""

    viewer: int
    encoder_id: str
    seconds: float | None  # None: not receiving at all at the end


class FrameLog:
    """When each viewer received each encoder's frames."""

    def __init__(self) -> None:
        self.arrivals: dict[tuple[int, str], list[float]] = {}

    def record(self, viewer: int, encoder_id: str, now: float) -> None:
        self.arrivals.setdefault((viewer, encoder_id), []).append(now)

    def resume(self, viewer: int, encoder_id: str, since: float, now: float,
               gap: float = GAP) -> float | None:
        """Seconds from ``since`` to the start of the frames flowing at ``now``.

        0 if they never paused longer than ``gap``; None if they are not
        flowing at ``now`` (nothing within ``gap``).
        """
        frames = self.arrivals.get((viewer, encoder_id), [])
        prev = since
        resumed = since
        for t in _after(frames, since):
            if t - prev > gap:
                resumed = t
            prev = t
        if now - prev > gap:
            return None
        return resumed - since

    def longest_gap(self, viewer: int, encoder_id: str, since: float, now: float) -> float:
        """The longest time without a frame between ``since`` and ``now``."""
        frames = self.arrivals.get((viewer, encoder_id), [])
        prev, longest = since, 0.0
        for t in _after(frames, since):
            if t > now:
                break
            longest = max(longest, t - prev)
            prev = t
        return max(longest, now - prev)

    def first_after(self, viewer: int, encoder_id: str, since: float) -> float | None:
        """Seconds from ``since`` to the first frame after it (None: none yet)."""
        later = _after(self.arrivals.get((viewer, encoder_id), []), since)
        return later[0] - since if later else None


def _after(frames: list[float], since: float) -> list[float]:
    """The times in ``frames`` (ascending) later than ``since``."""
    return frames[bisect.bisect_right(frames, since):]


@attrs.frozen
class Written:
    """One replicated field as a write left it."""

    stamp: Stamp
    value: Any


class RealCluster:
    """N servers, their cluster services, and clients, on one memory network."""

    def __init__(self, root: Path, size: int = 3, *, encoders: int = 4, seed: int = 0,
                 settings: ServerSettings = FAST,
                 membership: MembershipSettings | None = None,
                 fps: float = 10.0, bitrate: int = 200_000,
                 max_servers: int = 4, replicate: bool | None = None,
                 peer_connect_timeout: float | None = None,
                 balance: BalanceSettings | None = None) -> None:
        self.root = root
        #: The servers' balancing (the product's defaults unless given).
        self.balance = balance
        self.net = MemoryNetwork(tcp_faults=True)
        self.clock = self.net.clock
        self.clock.advance(T0)
        self.seed = seed
        self.settings = settings
        self.membership_settings = membership or MembershipSettings()
        self.fps = fps
        self.bitrate = bitrate
        self.max_servers = max_servers
        #: As ``ClusterService``'s own connector, unless told otherwise.
        self.peer_connect_timeout = (peer_connect_timeout if peer_connect_timeout is not None
                                     else getattr(cluster_service, "PEER_CONNECT_TIMEOUT", 2.0))
        self.replicating = replication_available() if replicate is None else replicate
        self.encoder_ids = [f"cam{i}" for i in range(encoders)]
        self.secrets = {e: f"secret-of-{e}-0123456789abcdef" for e in self.encoder_ids}
        self.servers: dict[str, SimServer] = {}
        self.trace: list[tuple[Any, ...]] = []
        self.frames = FrameLog()
        self.encoders: dict[str, EncoderClient] = {}
        self.viewers: list[ClusterViewer] = []
        #: Every replicated field written through ``write``: newest by stamp.
        self.written: dict[tuple[str, str, str], Written] = {}
        self._rng = random.Random(seed)
        self._next_index = 1
        self._identity: ClusterIdentity | None = None
        for _ in range(size):
            self._provision_member()

    # -- building ---------------------------------------------------------------

    def _next_host(self) -> tuple[str, str]:
        i = self._next_index
        self._next_index += 1
        return f"s{i}", f"10.0.0.{i}"

    def _seed(self) -> int:
        return self._rng.getrandbits(32)

    def _provision_member(self) -> SimServer:
        """Make a server's cluster identity on disk (the first one founds the cluster)."""
        sid, host = self._next_host()
        data_dir = self.root / sid
        data_dir.mkdir(parents=True)
        if self._identity is None:
            identity = create_cluster(data_dir, sid, [host], time.time)
            self._identity = identity
            members: list[dict[str, object]] = []
        else:
            founder = self._identity
            key, csr = make_csr(sid, [host])
            cert = sign_csr(founder, csr, sid, [host], time.time)
            identity = install_membership(data_dir, founder.cluster_id, founder.ca_cert,
                                          founder.ca_key, key, cert)
            # Like ``provision_member``: only the founder's peer address; the
            # rest of the member list comes over the peer protocol.
            members = [peer_address_entry(founder.server_id, "10.0.0.1", PEER_PORT)]
        (cluster_dir(data_dir) / MEMBERS_FILE).write_text(json.dumps(members), encoding="utf-8")
        return self._boot(sid, host, data_dir, identity)

    def _boot(self, sid: str, host: str, data_dir: Path, identity: ClusterIdentity,
              incarnations: int = 1) -> SimServer:
        self.net.revive_host(host)
        clock = HostClock(self.clock, sid)
        # As ``evserver.service``: one clock, named by the server id, stamps
        # the replicated records and the directory's epochs.
        hlc = server_clock(sid, clock.seconds)
        store = Store(data_dir / "evserver.sqlite3", clock=clock.seconds, hlc=hlc,
                      password_hasher=fast_hash)
        store.subscribe(self._written)
        server = MemoryServer(cast(MemoryNetwork, _HostNet(self.net, clock)), host, store, sid,
                              settings=self.settings, limits=Limits())
        server.core.hlc = hlc
        def listen(factory: Any) -> Deferred[Any]:
            served = wrap_server_factory(
                factory, peer_server_tls_options(identity, allow_joiners=True), clock)
            self.net.listen(host, PEER_PORT, cast(Any, served))
            return defer.succeed(_MemoryPort(self.net, host, PEER_PORT))

        def connector(record: Any) -> TLSClientEndpoint:
            inner = self.net.endpoint(record.address.peer_host, record.address.peer_port,
                                      host, self.peer_connect_timeout)
            return TLSClientEndpoint(inner, peer_client_tls_options(identity, record.server_id),
                                clock)

        cluster = SimClusterService(
            identity, data_dir, external_address(host), f"tcp:{PEER_PORT}", server.core, store,
            clock,
            settings=self.membership_settings, connector=connector, listen=listen,
            max_servers=self.max_servers, balance=self.balance,
            rng=random.Random(self._seed()),
            incarnation=int(self.clock.seconds() * 1_000_000) + incarnations,
            trace=self.trace)
        sim = SimServer(sid, host, data_dir, identity, clock, store, server, cluster,
                        incarnations=incarnations, booted_at=self.clock.seconds())
        self.servers[sid] = sim
        cluster.startService()
        return sim

    def _written(self, update: Update) -> None:
        for name, (value, stamp) in update.fields.items():
            key = (update.table, update.key, name)
            old = self.written.get(key)
            if old is None or stamp > old.stamp:
                self.written[key] = Written(stamp, value)

    def start(self, settle: float = 10.0) -> float:
        """Provision the data, wait for the full mesh (and the replica); return the time taken."""
        first = next(iter(self.servers.values()))
        stores = [first.store] if self.replicating else [s.store for s in self.servers.values()]
        for store in stores:
            store.add_domain(DOMAIN)
            store.add_account(DOMAIN, ACCOUNT, PASSWORD)
            for e in self.encoder_ids:
                store.add_encoder(DOMAIN, e, f"Camera {e}", self.secrets[e])
        self.written.clear()  # provisioning is not a write under test
        return self.run_until(lambda: self.meshed() and self.converged(), settle)

    def start_clients(self, viewers: int | None = None, watch: bool = True) -> None:
        """An encoder per id (first server rotated) and a viewer homed on each server."""
        sids = list(self.servers)
        for i, e in enumerate(self.encoder_ids):
            self.add_encoder(e, first=i % len(sids))
        for i in range(len(sids) if viewers is None else viewers):
            viewer = self.add_viewer(first=i % len(sids))
            if watch:
                for e in self.encoder_ids:
                    viewer.watch(e)

    def _addresses(self, port: int, first: int) -> list[Address]:
        addresses = [Address(s.host, port) for s in self.servers.values()]
        return addresses[first:] + addresses[:first]

    def _connector(self, host: str = CLIENT_HOST) -> Callable[[Address], Any]:
        """Client endpoints from ``host``."""
        def connect(a: Address) -> Any:
            return self.net.endpoint(a.host, a.port, host, CLIENT_CONNECT_TIMEOUT)
        return connect

    def add_encoder(self, encoder_id: str, first: int = 0) -> EncoderClient:
        source = SyntheticSource(self.bitrate, self.fps, keyframe_interval=int(self.fps),
                                 seed=len(self.encoders))
        enc = EncoderClient(self.clock, self._addresses(ENCODER_PORT, first), encoder_id,
                            self.secrets[encoder_id], source, TLSConfig(enabled=False),
                            connector=self._connector(), rng=random.Random(self._seed()))
        self.encoders[encoder_id] = enc
        enc.start().addErrback(lambda f: None)
        return enc

    def add_viewer(self, first: int = 0, host: str = CLIENT_HOST) -> ClusterViewer:
        """A viewer homed first on the ``first``-th server, on client host ``host``."""
        index = len(self.viewers)
        viewer = ClusterViewer(
            self.clock, self._addresses(VIEWER_PORT, first), ACCOUNT, PASSWORD,
            TLSConfig(enabled=False),
            on_media=lambda e, f: self.frames.record(index, e, self.clock.seconds()),
            connector=self._connector(host), rng=random.Random(self._seed()))
        self.viewers.append(viewer)
        viewer.start().addErrback(lambda f: None)
        return viewer

    # -- time -------------------------------------------------------------------------

    def flush(self) -> None:
        self.net.flush()

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass, from one timer to the next."""
        end = self.clock.seconds() + seconds
        self.net.flush()
        while True:
            due = min((c.getTime() for c in self.clock.getDelayedCalls()), default=None)
            if due is None or due > end:
                if self.clock.seconds() < end:
                    self.clock.advance(end - self.clock.seconds())
                    self.net.flush()
                return
            self.clock.advance(max(0.0, due - self.clock.seconds()))
            self.net.flush()

    def run_until(self, predicate: Callable[[], bool], timeout: float,
                  step: float = 0.01) -> float:
        """Advance until ``predicate()`` holds; return the simulated time it took."""
        start = self.clock.seconds()
        self.net.flush()
        while not predicate():
            if self.clock.seconds() - start > timeout:
                raise TimeoutError(f"condition not met within {timeout} s of simulated time")
            self.advance(step)
        return self.clock.seconds() - start

    def now(self) -> float:
        return self.clock.seconds()

    # -- faults -------------------------------------------------------------------------

    def crash(self, sid: str) -> None:
        s = self.servers[sid]
        if s.state == "crashed":
            return
        self.trace.append((round(self.now() - T0, 6), "crash", sid))
        s.state = "crashed"
        s.clock.kill()
        self.net.crash_host(s.host)
        s.store.close()

    def freeze(self, sid: str) -> None:
        s = self.servers[sid]
        if s.state != "up":
            return
        self.trace.append((round(self.now() - T0, 6), "freeze", sid))
        s.state = "frozen"
        s.clock.freeze()
        self.net.freeze_host(s.host)

    def thaw(self, sid: str) -> None:
        s = self.servers[sid]
        if s.state != "frozen":
            return
        self.trace.append((round(self.now() - T0, 6), "thaw", sid))
        s.state = "up"
        self.net.thaw_host(s.host)
        s.clock.thaw()
        self.net.flush()

    def restart(self, sid: str) -> SimServer:
        s = self.servers[sid]
        if s.state != "crashed":
            raise ValueError(f"{sid} is {s.state}, not crashed")
        self.trace.append((round(self.now() - T0, 6), "restart", sid))
        return self._boot(sid, s.host, s.data_dir, s.identity, s.incarnations + 1)

    def cut(self, a: str, b: str) -> None:
        self.net.cut(self._host(a), self._host(b))

    def _host(self, name: str) -> str:
        return self.servers[name].host if name in self.servers else name

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between hosts (server ids or CLIENT_HOST) of different groups."""
        hosts = [{self._host(n) for n in g} for g in groups]
        self.trace.append((round(self.now() - T0, 6), "partition",
                           tuple(tuple(sorted(g)) for g in groups)))
        for i, a in enumerate(hosts):
            for b in hosts[i + 1:]:
                for x in a:
                    for y in b:
                        self.net.cut(x, y)

    def heal(self) -> None:
        self.trace.append((round(self.now() - T0, 6), "heal"))
        self.net.cut_links.clear()

    def heal_all(self) -> None:
        """Thaw the frozen, restart the crashed, heal every link."""
        for sid, s in list(self.servers.items()):
            if s.state == "frozen":
                self.thaw(sid)
            elif s.state == "crashed":
                self.restart(sid)
        self.heal()

    def add_server(self, via: str) -> SimServer:
        """A new server joins with a token minted by ``via``; returns it once started."""
        member = self.servers[via]
        sid, host = self._next_host()
        data_dir = self.root / sid
        data_dir.mkdir(parents=True)
        token = joining.mint(member.identity, member.data_dir, f"{member.host}:{PEER_PORT}",
                             3600)
        key, csr = make_csr(sid, [host])
        request = p.JoinRequest(token.token_id, token.secret, sid,
                                csr.public_bytes(Encoding.PEM), external_address(host))
        done: Deferred[p.JoinAccept] = Deferred()
        clock = HostClock(self.clock, sid + "-joining")
        factory = wrap_client_factory(
            joining._Factory(lambda: joining._JoinConnection(clock, request, done)),
            pinned_client_tls_options(token.ca_fingerprint), clock)

        def unreachable(failure: Any) -> None:
            if not done.called:
                done.errback(failure)

        self.net.endpoint(member.host, PEER_PORT, host, 2.0).connect(factory).addErrback(
            unreachable)
        accepted: list[p.JoinAccept] = []
        failed: list[Any] = []
        done.addCallbacks(accepted.append, failed.append)
        self.run_until(lambda: bool(accepted or failed), 5.0)
        if failed:
            failed[0].raiseException()
        accept = accepted[0]
        identity = install_membership(
            data_dir, accept.cluster_id, load_certificate_pem(accept.ca_certificate_pem),
            load_private_key_pem(accept.ca_key_pem), key,
            load_certificate_pem(accept.certificate_pem))
        members = [{"server_id": mem.server_id, "incarnation": mem.incarnation,
                    "address": attrs.asdict(mem.address)}
                   for mem in accept.members if mem.server_id != sid]
        (cluster_dir(data_dir) / MEMBERS_FILE).write_text(json.dumps(members), encoding="utf-8")
        self.trace.append((round(self.now() - T0, 6), "join", sid, via))
        return self._boot(sid, host, data_dir, identity)

    # -- writes -------------------------------------------------------------------------

    def write(self, sid: str, kind: str, key: str, value: Any) -> None:
        """A replicated write on server ``sid`` (a setting, or an encoder's name)."""
        s = self.servers[sid]
        if not s.live:
            raise ValueError(f"{sid} is {s.state}: it takes no writes")
        if kind == "setting":
            s.store.set_setting(key, value)
        elif kind == "encoder-name":
            s.store.set_encoder_name(key, str(value))
        else:
            raise ValueError(kind)

    # -- observations ------------------------------------------------------------------

    def live_servers(self) -> list[SimServer]:
        return [s for s in self.servers.values() if s.live]

    def meshed(self) -> bool:
        """Every live server sees every other live one alive."""
        live = self.live_servers()
        for s in live:
            view = s.cluster.membership.view()
            for other in live:
                if other is not s and (other.server_id not in view
                                       or view[other.server_id].state is not PeerState.ALIVE):
                    return False
        return True

    def relinked(self) -> bool:
        """Every two live servers the network lets through see each other alive."""
        live = self.live_servers()
        for s in live:
            view = s.cluster.membership.view()
            for other in live:
                if other is s or not self.net.reachable(s.host, other.host):
                    continue
                if (other.server_id not in view
                        or view[other.server_id].state is not PeerState.ALIVE):
                    return False
        return True

    def digests(self) -> dict[str, dict[tuple[str, str], bytes]]:
        return {s.server_id: s.store.digest() for s in self.live_servers()}

    def converged(self) -> bool:
        """Every live replica holds the same records (always true without replication)."""
        if not self.replicating:
            return True
        ds = list(self.digests().values())
        return all(d == ds[0] for d in ds[1:])

    def lost_writes(self) -> list[str]:
        """Fields whose newest write is missing from some live replica."""
        out = []
        for s in self.live_servers():
            keys = {(t, k) for (t, k, _) in self.written}
            records = {(u.table, u.key): u for u in s.store.updates_for(keys)}
            for (table, key, name), want in sorted(self.written.items()):
                got = records.get((table, key))
                field = got.fields.get(name) if got is not None else None
                if field is None or field[1] != want.stamp or field[0] != want.value:
                    out.append(f"{s.server_id}: {table}/{key}.{name} is "
                               f"{field!r}, not {want.value!r} @ {want.stamp.encode()}")
        return out

    def hosting(self) -> dict[str, list[str]]:
        """Encoder id -> the live servers holding a session for it."""
        out: dict[str, list[str]] = {e: [] for e in self.encoder_ids}
        for s in self.live_servers():
            for e in s.core.encoders:
                out.setdefault(e, []).append(s.server_id)
        return out

    def running_encoders(self) -> list[str]:
        return [e for e, enc in self.encoders.items() if not enc.stopped]

    def directory_errors(self, servers: Iterable[SimServer] | None = None) -> list[str]:
        """Where each live server's directory disagrees with where encoders are."""
        hosting = self.hosting()
        out = []
        for s in (self.live_servers() if servers is None else servers):
            for e in self.encoder_ids:
                where = s.core.locations.where(e)
                actual = hosting.get(e, [])
                said = where.server_id if where is not None else None
                if (said is None and actual) or (said is not None and said not in actual):
                    out.append(f"{s.server_id} says {e} is on {said}, it is on {actual}")
        return out

    def client_reachable(self, s: SimServer) -> bool:
        return s.live and self.net.reachable(CLIENT_HOST, s.host)

    def resumes(self, since: float) -> list[Resume]:
        """For every running viewer and encoder: how long its frames paused after ``since``."""
        now = self.now()
        out = []
        for v, viewer in enumerate(self.viewers):
            for e in sorted(viewer.wanted):
                if e in self.encoders and not self.encoders[e].stopped:
                    out.append(Resume(v, e, self.frames.resume(v, e, since, now)))
        return out

    def leaked_timers(self) -> list[str]:
        """Timers of live servers and of clients that belong to something closed."""
        out = []
        for s in self.live_servers():
            owned: set[Any] = set()
            for peer in s.cluster.membership._peers.values():
                core = peer.core
                owned.update((core.heartbeat_call, core.silence_call, core.deadline_call,
                              core.retry_call))
            for call in s.clock.getDelayedCalls():
                if call.func in _MEMBERSHIP_TIMERS or (
                        getattr(call.func, "__name__", "") == "reconnect_due"):
                    reason = "" if call in owned else "a membership timer no peer owns"
                else:
                    reason = _leak(call.func)
                if reason:
                    out.append(f"{s.server_id}: {call!r}: {reason}")
        for base_call in self.clock.getDelayedCalls():
            func = getattr(base_call, "func", None)
            if func is None or isinstance(getattr(func, "__self__", None), HostCall):
                continue
            reason = _leak(func)
            if reason:
                out.append(f"client: {base_call!r}: {reason}")
        return out

    def shutdown(self) -> list[str]:
        """Stop every client and live server in order; return the timers left (Buildbot)."""
        for enc in self.encoders.values():
            enc.stop()
        for viewer in self.viewers:
            viewer.stop()
        for s in self.servers.values():
            if s.state == "frozen":
                self.thaw(s.server_id)
        for s in self.servers.values():
            if s.state == "up":
                s.cluster.stopService()
                s.core.shutdown()
                for port in (ENCODER_PORT, VIEWER_PORT, RELAY_PORT):
                    self.net.unlisten(s.host, port)
        self.heal()
        self.advance(5.0)
        left = [repr(c) for c in self.clock.getDelayedCalls()]
        return left

    def close(self) -> None:
        for s in self.servers.values():
            s.store.close()  # idempotent


_MEMBERSHIP_TIMERS = (ms._heartbeat, ms._silence_check, ms._deadline)


def _leak(func: Any) -> str:
    """Why a pending call is a leak ("" if it is not, or if its owner is not known)."""
    obj = getattr(func, "__self__", None)
    if isinstance(obj, WireConnection) and not obj.connected and (
            getattr(func, "__name__", "") != "close"):  # a delayed close is a no-op then
        return "its connection is closed"
    if isinstance(obj, Keepalive):
        conn = getattr(obj._on_timeout, "__self__", None)
        if isinstance(conn, WireConnection) and (not conn.connected or conn.keepalive is not obj):
            return "the keepalive of a closed connection"
    if isinstance(obj, ViewerFeed) and obj.closed:
        return "the stall timer of a closed viewer feed"
    if isinstance(obj, Channel) and obj.core.channels.get(obj.encoder_id) is not obj:
        return "the timer of a dropped channel"
    if isinstance(obj, LoopingCall) and not obj.running:
        return "a stopped LoopingCall"
    if isinstance(obj, _ReconnectingClient | ClusterViewer) and obj.stopped:
        return "the timer of a stopped client"
    return ""
