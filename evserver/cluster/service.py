"""The cluster inside a server: peer links, membership, directory and replication.

``ClusterService`` is the I/O layer of multi-site resilience.  It listens on
the peer port, keeps one mutual-TLS connection to every other member, and
feeds what arrives into the state machines: ``Membership`` (heartbeats,
failure detection, probes), the core's directory (where each encoder is),
and the store (replicated records).  What they decide comes back through
the ``IMembershipActions`` methods below and the core's and store's hooks.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evserver import __version__
from evserver.cluster.balancing import ClusterBalancing
from evserver.cluster.ca import (
    ClusterIdentity,
    cluster_dir,
    peer_client_tls_options,
    peer_server_tls_options,
)
from evserver.cluster.probes import PeerProbes
from evserver.net.peer import PeerClientFactory, PeerConnection, PeerServerFactory
from evserver.state.balance import BalanceSettings
from evserver.state.directory import Location
from evserver.state.hlc import Stamp
from evserver.state.membership import IMembershipActions, Membership, MembershipSettings, PeerState
from evserver.state.replica import Update
from evserver.tls import wrap_server_factory
from evserver.wire import messages as m
from evserver.wire import peer as p
from evserver.wire.framing import ErrorCode

log = Logger()

MEMBERS_FILE = "members.json"
SELF_FILE = "self.json"
STATUS_FILE = "status.json"
ANTI_ENTROPY_INTERVAL = 10.0
STORE_CHECK_INTERVAL = 0.5
DUPLICATE_CLOSE_DELAY = 1.0
#: How long a TCP connection to a peer may take (TLS and the handshake come
#: after).  Peers are at most 100 ms apart (a prerequisite, R14), so an
#: attempt with no answer after five round trips met a cut link or a dead
#: host: give up and dial again after the membership's back-off (at most
#: 0.5 s).  The two bound how late a link is back after a heal: an attempt
#: under way at the heal fails within 0.5 s, the next one 0.5 s (+10 %) later
#: succeeds, so replicas converge within 1 s of the heal (R2).  With 1 s
#: here it would be up to ~1.5 s.
PEER_CONNECT_TIMEOUT = 0.5


@attrs.define
class MemberRecord:
    server_id: str
    address: p.ExternalAddress
    incarnation: int = 0


def _address_to_json(a: p.ExternalAddress) -> dict[str, Any]:
    return attrs.asdict(a)


def _address_from_json(d: dict[str, Any]) -> p.ExternalAddress:
    return p.ExternalAddress(**d)


@implementer(IMembershipActions)
class ClusterService(Service):
    """One server's part of the cluster."""

    def __init__(self, identity: ClusterIdentity, data_dir: Path, address: p.ExternalAddress,
                 peer_endpoint: str, core: Any, store: Any, reactor: Any,
                 settings: MembershipSettings | None = None,
                 connector: Any = None, listen: Any = None, max_servers: int = 4,
                 balance: BalanceSettings | None = None) -> None:
        self.identity = identity
        self.max_servers = max_servers
        self.joiner: Any = None
        self.cluster_id = identity.cluster_id
        self.server_id = identity.server_id
        self.data_dir = data_dir
        self.address = address
        self.peer_endpoint = peer_endpoint
        self.core = core
        self.store = store
        self.clock = reactor
        self.reactor = reactor
        #: When this server process started (microseconds): a restarted server
        #: has a higher one, and every registration it stamps is later (its
        #: peers take those stamped earlier for its previous run's).
        self.incarnation = int(getattr(core, "started_at", reactor.seconds()) * 1_000_000)
        self.membership = Membership(self.server_id, self, reactor, settings)
        #: Placement of arriving encoders and the balancer's moves.
        self.balancing = ClusterBalancing(self, balance)
        self.members: dict[str, MemberRecord] = {}
        #: Servers removed from the cluster: refused until re-admitted with a token.
        self.removed: set[str] = set()
        self.connections: dict[str, PeerConnection] = {}
        #: The load each peer reported in its latest heartbeat (for the admin pages).
        self.loads: dict[str, p.Load] = {}
        #: Bandwidth measurements and other servers' connection lists.
        self.probes = PeerProbes(self, on_measured=lambda server_id: self._save_status())
        self._connecting: set[str] = set()
        self._digests: dict[str, dict[tuple[str, str], bytes]] = {}
        self._next_request = 1
        self._pushed_servers: tuple[m.ServerInfo, ...] = ()
        self._heartbeat_seq = 0
        self._port: IListeningPort | None = None
        self._anti_entropy: Any = None
        #: Tests inject in-memory endpoints: connector(record) -> IStreamClientEndpoint,
        #: listen(factory) -> Deferred[IListeningPort].
        self._connector = connector
        self._listen = listen

    # -- lifecycle -------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        from evserver.cluster.join import Admissions

        self.joiner = Admissions(self, self.max_servers)
        self._load_members()
        self._save_self()
        self.core.servers = self.servers
        self.core.on_announce = self._announce
        self.core.placement = self.balancing.place
        self.balancing.start()
        if hasattr(self.store, "subscribe"):
            self.store.subscribe(self._local_update)
        factory = PeerServerFactory(self)
        if self._listen is not None:
            d = self._listen(factory)
        else:
            served = wrap_server_factory(
                factory, peer_server_tls_options(self.identity, allow_joiners=True))
            d = endpoints.serverFromString(self.reactor, self.peer_endpoint).listen(served)
        d.addCallbacks(self._listening, self._listen_failed)
        for record in self.members.values():
            self.membership.add_member(record.server_id, record.incarnation)
            self._tell_directory_incarnation(record.server_id, record.incarnation)
        from twisted.internet.task import LoopingCall

        self._anti_entropy = LoopingCall(self._anti_entropy_round)
        self._anti_entropy.clock = self.reactor
        self._anti_entropy.start(ANTI_ENTROPY_INTERVAL, now=False)
        # Writes by another process (evserver-ctl) do not pass through our
        # change feed: notice them and compare digests with every peer.
        self._data_version = self._store_version()
        self._store_watch = LoopingCall(self._check_store)
        self._store_watch.clock = self.reactor
        self._store_watch.start(STORE_CHECK_INTERVAL, now=False)
        self.probes.start()

    def _store_version(self) -> int | None:
        version = getattr(self.store, "data_version", None)
        return version() if version is not None else None

    def _check_store(self) -> None:
        version = self._store_version()
        if version is not None and version != self._data_version:
            self._data_version = version
            self._anti_entropy_round()

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        log.info("cluster {cluster_id}: peer port listening on {address}",
                 cluster_id=self.cluster_id, address=port.getHost())

    def _listen_failed(self, failure: Failure) -> None:
        from evserver.startup import fatal_startup_error

        fatal_startup_error(f"cannot listen for peers on {self.peer_endpoint!r}: "
                            f"{failure.getErrorMessage()}")

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.balancing.stop()
        self.core.placement = None
        for loop in (self._anti_entropy, getattr(self, "_store_watch", None)):
            if loop is not None and loop.running:
                loop.stop()
        self.membership.stop()
        self.probes.stop()
        for conn in list(self.connections.values()):
            conn.close()
        if self._port is not None:
            port, self._port = self._port, None
            stopped: Deferred[None] | None = port.stopListening()
            return stopped
        return None

    # -- members ---------------------------------------------------------

    def _members_path(self) -> Path:
        return cluster_dir(self.data_dir) / MEMBERS_FILE

    def _load_members(self) -> None:
        try:
            data = json.loads(self._members_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = []
        for item in data:
            if item.get("removed"):
                self.removed.add(str(item.get("server_id")))
                continue
            if item.get("server_id") and item["server_id"] != self.server_id:
                self.members[item["server_id"]] = MemberRecord(
                    item["server_id"], _address_from_json(item["address"]),
                    int(item.get("incarnation", 0)))

    def _save_self(self) -> None:
        """This member's own address, for ``evserver-ctl msr token`` and status."""
        path = cluster_dir(self.data_dir) / SELF_FILE
        tmp = path.with_name(f".{SELF_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps({"server_id": self.server_id,
                                   "address": _address_to_json(self.address)}, indent=1),
                       encoding="utf-8")
        tmp.replace(path)

    def _save_members(self) -> None:
        path = self._members_path()
        tmp = path.with_name(f".{MEMBERS_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps([
            {"server_id": r.server_id, "address": _address_to_json(r.address),
             "incarnation": r.incarnation} for r in self.members.values()
        ] + [{"server_id": sid, "removed": True} for sid in sorted(self.removed)],
            indent=1), encoding="utf-8")
        tmp.replace(path)

    def add_member(self, server_id: str, address: p.ExternalAddress,
                   incarnation: int = 0) -> None:
        """A member we did not know (told by a peer, or a new joiner)."""
        if server_id == self.server_id or server_id in self.removed:
            return
        record = self.members.get(server_id)
        if record is None:
            self.members[server_id] = MemberRecord(server_id, address, incarnation)
            self._save_members()
            if server_id not in self.membership:
                self.membership.add_member(server_id, incarnation)
            self._tell_directory_incarnation(server_id, incarnation)
            self._push_server_list()
            self.balancing.membership_changed()
        elif record.address != address:
            record.address = address
            self._save_members()

    def incarnation_seen(self, server_id: str, incarnation: int) -> None:
        """A member runs ``incarnation`` (its PeerHello, or another's MemberList).

        A higher one than we knew means it restarted: the registrations of
        its earlier run are over (the directory marks them offline and tells
        the viewers), and the other peers are sent our member list so that
        they learn it too, also those that cannot reach it themselves.
        """
        record = self.members.get(server_id)
        if record is None or incarnation <= record.incarnation:
            return
        record.incarnation = incarnation
        self._save_members()
        self._tell_directory_incarnation(server_id, incarnation)
        members = self.member_list()
        for sid, conn in self.connections.items():
            if sid != server_id:
                conn.send(members)

    def _tell_directory_incarnation(self, server_id: str, incarnation: int) -> None:
        restarted = getattr(self.core, "server_restarted", None)
        if restarted is not None and incarnation > 0:
            restarted(server_id, _boot_ms(incarnation))

    def remove_member(self, server_id: str, tell_peers: bool = True) -> bool:
        """Remove a server from the cluster (it must be re-admitted with a token to return)."""
        if server_id not in self.members:
            return False
        del self.members[server_id]
        self.removed.add(server_id)
        self._save_members()
        if server_id in self.membership:
            self.membership.remove_member(server_id)
        conn = self.connections.pop(server_id, None)
        self.probes.link_down(server_id)
        if conn is not None:
            conn.fail(ErrorCode.REMOVED, "this server was removed from the cluster")
        self.core.server_lost(server_id)
        self.balancing.membership_changed()
        if tell_peers:
            for peer in self.connections.values():
                peer.send(p.Leave(server_id))
        self._push_server_list()
        log.info("server {server_id} removed from the cluster", server_id=server_id)
        return True

    def member_list(self) -> p.MemberList:
        states = self.membership.view()
        out = [p.Member(self.server_id, p.MemberState.ALIVE, self.incarnation, self.address)]
        for record in self.members.values():
            view = states.get(record.server_id)
            state = _wire_state(view.state if view is not None else PeerState.CONNECTING)
            out.append(p.Member(record.server_id, state, record.incarnation, record.address))
        return p.MemberList(tuple(out))

    def servers(self) -> tuple[m.ServerInfo, ...]:
        """What clients are told: this server and every member not known to be dead."""
        out = [p.server_info(self.server_id, self.address)]
        view = self.membership.view()
        for record in self.members.values():
            state = view.get(record.server_id)
            if state is not None and state.state in (PeerState.ALIVE, PeerState.SUSPECT):
                out.append(p.server_info(record.server_id, record.address))
        return tuple(out)

    def _push_server_list(self) -> None:
        """Tell the clients, when the list they should use has changed."""
        servers = self.servers()
        if servers == self._pushed_servers:
            return
        self._pushed_servers = servers
        push = getattr(self.core, "push_server_list", None)
        if push is not None:
            push()
        self._save_status()

    def _save_status(self) -> None:
        """Every member's state (and the latest RTT, clock offset and bandwidth
        measured to it), for ``evserver-ctl msr status``; rewritten when a
        member changes state and when a bandwidth measurement comes."""
        view = self.membership.view()
        bandwidth = self.probes.bandwidth
        status = {sid: {"state": getattr(v.state, "value", str(v.state)),
                        "rtt_ms": v.rtt_ms, "offset_ms": v.offset_ms,
                        "mbps": (round(bandwidth[sid].mbps, 1) if sid in bandwidth else None),
                        "bandwidth_warnings": self.probes.warnings(sid)}
                  for sid, v in view.items()}
        path = cluster_dir(self.data_dir) / STATUS_FILE
        tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"at": time.time(), "members": status}, indent=1),
                           encoding="utf-8")
            tmp.replace(path)
        except OSError as e:
            log.warn("cannot write {path}: {error}", path=str(path), error=str(e))

    def hello(self, cls: type) -> Any:
        return cls(self.cluster_id, self.server_id, self.incarnation, f"evserver/{__version__}",
                   self.address)

    # -- IMembershipActions ----------------------------------------------

    def connect(self, server_id: str) -> None:
        record = self.members.get(server_id)
        if record is None or server_id in self._connecting or server_id in self.connections:
            return
        self._connecting.add(server_id)
        if self._connector is not None:
            endpoint = self._connector(record)
        else:
            endpoint = endpoints.wrapClientTLS(
                peer_client_tls_options(self.identity, server_id),
                endpoints.HostnameEndpoint(self.reactor, record.address.peer_host,
                                           record.address.peer_port,
                                           timeout=PEER_CONNECT_TIMEOUT))
        d = endpoint.connect(PeerClientFactory(self, server_id))
        d.addErrback(self._connect_failed, server_id)

    def _connect_failed(self, failure: Failure, server_id: str) -> None:
        self._connecting.discard(server_id)
        if server_id in self.membership:
            self.membership.on_connect_failed(server_id)

    def disconnect(self, server_id: str) -> None:
        conn = self.connections.pop(server_id, None)
        self.probes.link_down(server_id)
        if conn is not None:
            conn.close()

    def send_heartbeat(self, server_id: str, seq: int, sent_wall_us: int) -> None:
        conn = self.connections.get(server_id)
        if conn is not None:
            conn.send(p.Heartbeat(seq & 0xFFFFFFFF, sent_wall_us, self.balancing.load()))

    def send_probe_request(self, via_server_id: str, target_server_id: str, nonce: int) -> None:
        conn = self.connections.get(via_server_id)
        if conn is not None:
            conn.send(p.ProbeRequest(target_server_id, nonce))

    def send_probe_reply(self, to_server_id: str, target_server_id: str, nonce: int,
                         alive: bool) -> None:
        conn = self.connections.get(to_server_id)
        if conn is not None:
            conn.send(p.ProbeReply(target_server_id, nonce, int(alive)))

    def member_state_changed(self, server_id: str, old_state: Any, new_state: Any) -> None:
        log.info("member {server_id}: {old} -> {new}", server_id=server_id,
                 old=getattr(old_state, "value", old_state),
                 new=getattr(new_state, "value", new_state))
        if new_state in (PeerState.DEAD, PeerState.ALIVE):
            self._save_status()
            self.balancing.membership_changed()
        # A client must never be told of an encoder on a server whose address
        # it has not been given: the server list grows before the updates that
        # name a server coming back, and shrinks after the updates that take
        # a lost server's encoders offline (they name no server).
        if new_state == PeerState.DEAD:
            self.core.server_lost(server_id)
            self._push_server_list()
        elif new_state == PeerState.ALIVE:
            self._push_server_list()
            self.core.server_back(server_id)

    # -- connections -----------------------------------------------------

    def peer_connected(self, conn: PeerConnection) -> bool:
        """The handshake is done; return False to refuse the connection."""
        sid = conn.peer_id
        assert sid is not None
        self._connecting.discard(sid)
        if sid in self.removed:
            conn.fail(ErrorCode.REMOVED, "this server was removed from the cluster")
            return False
        hello = conn.peer_hello
        existing = self.connections.get(sid)
        if existing is not None and existing is not conn and existing.connected:
            # Both sides connected at once: keep the link the smaller id opened.
            # The other side decides the same way; the link dropped is closed
            # a moment later, so that the peer, which may have counted on it,
            # has the kept one up before it sees this one go.
            opener_of_new = self.server_id if not conn.is_server else sid
            if opener_of_new != min(self.server_id, sid):
                self.reactor.callLater(DUPLICATE_CLOSE_DELAY, conn.close)
                return True
            self.reactor.callLater(DUPLICATE_CLOSE_DELAY, existing.close)
        if sid not in self.membership or self.members[sid].address != hello.address:
            self.add_member(sid, hello.address, hello.incarnation)
        # Before the membership reports it back alive: the registrations of an
        # earlier run of the peer are over, and must not count again.
        self.incarnation_seen(sid, hello.incarnation)
        if not self.membership.on_connection_made(sid, hello.incarnation):
            return False
        record = self.members[sid]
        record.incarnation = max(record.incarnation, hello.incarnation)
        self.connections[sid] = conn
        conn.send(self.member_list())
        # Every location we hold but the peer's own (it is their authority):
        # our registrations (announced again), our last word on encoders that
        # left us (a peer not linked when we announced them offline must hear
        # it), and what we learnt from others (the peer may not reach them).
        self.core.reannounce()
        held = [_to_wire(loc) for loc in self.core.locations.snapshot(exclude_server=sid)]
        for frame in directory_frames(held) or [p.Directory(())]:
            conn.send(frame)
        self._request_digest(sid)
        self.probes.link_up(sid)
        return True

    def peer_disconnected(self, conn: PeerConnection, reason: Failure) -> None:
        sid = conn.peer_id
        if sid is None:
            if conn.expected_id is not None:
                self._connect_failed(reason, conn.expected_id)
            return
        if self.connections.get(sid) is conn:
            del self.connections[sid]
            self._digests.pop(sid, None)
            self.membership.on_connection_lost(sid)
            self.probes.link_down(sid)

    def peer_frame(self, conn: PeerConnection, msg: Any) -> None:
        sid = conn.peer_id
        assert sid is not None
        if self.probes.frame(sid, conn, msg):
            return
        if isinstance(msg, p.Heartbeat):
            self.loads[sid] = msg.load
            now = _wall_us()
            conn.send(p.HeartbeatAck(msg.seq, msg.sent_wall_us, now, _wall_us()))
        elif isinstance(msg, p.HeartbeatAck):
            self.membership.on_heartbeat_ack(sid, msg.seq, msg.echo_sent_wall_us,
                                             msg.received_wall_us, msg.replied_wall_us,
                                             _wall_us())
        elif isinstance(msg, p.ProbeRequest):
            self.membership.on_probe_request(sid, msg.target_server_id, msg.nonce)
        elif isinstance(msg, p.ProbeReply):
            self.membership.on_probe_reply(sid, msg.target_server_id, msg.nonce,
                                           bool(msg.alive))
        elif isinstance(msg, p.MemberList):
            for member in msg.members:
                if member.server_id != self.server_id and member.state != p.MemberState.LEFT:
                    self.add_member(member.server_id, member.address, member.incarnation)
                    self.incarnation_seen(member.server_id, member.incarnation)
        elif isinstance(msg, p.Leave):
            if msg.server_id == self.server_id:
                log.warn("this server was removed from the cluster by {sid}", sid=sid)
            else:
                self.remove_member(msg.server_id, tell_peers=False)
        elif isinstance(msg, p.Directory):
            self._directory(sid, msg)
        elif isinstance(msg, p.MoveRequest):
            self.balancing.move_request(conn, msg)
        elif isinstance(msg, p.MoveResult):
            self.balancing.move_result(msg)
        elif isinstance(msg, p.Updates):
            self._apply_updates(msg)
        elif isinstance(msg, p.DigestRequest):
            self._answer_digest(conn, msg)
        elif isinstance(msg, p.Digest):
            self._digest_chunk(sid, conn, msg)
        elif isinstance(msg, m.Ping):
            conn.send(m.Pong(msg.nonce))
        elif isinstance(msg, m.Error):
            log.info("peer {sid} reported: {message}", sid=sid, message=msg.message)
            if msg.fatal:
                conn.close()

    # -- directory -------------------------------------------------------

    def _announce(self, location: Location) -> None:
        frame = p.Directory((_to_wire(location),))
        for conn in self.connections.values():
            conn.send(frame)
        self.balancing.directory_changed((location.encoder_id,))

    def _directory(self, sender: str, msg: p.Directory) -> None:
        """Merge a peer's Directory; forward what was news here to the other peers.

        Gossip, so that news reaches the servers the hosting one has no link
        to: an announcement is news to a server at most once (it must be
        newer than the entry held), so each server forwards it at most once
        and forwarding ends.  It is forwarded as received, never to the
        server it came from nor to the server it names (their authority).
        """
        news = self.core.remote_locations([_from_wire(loc) for loc in msg.locations])
        if not news:
            return
        self.balancing.directory_changed(loc.encoder_id for loc in news)
        for sid, conn in list(self.connections.items()):
            if sid == sender:
                continue
            relayed = [_to_wire(loc) for loc in news if loc.server_id != sid]
            for frame in directory_frames(relayed):
                conn.send(frame)

    # -- replication -----------------------------------------------------

    def _local_update(self, update: Update) -> None:
        records = [_record_to_wire(update)]
        for frame in p.batch_updates(records):
            for conn in self.connections.values():
                conn.send(frame)

    def _apply_updates(self, msg: p.Updates) -> None:
        if not hasattr(self.store, "apply_updates"):
            return
        from evserver.store import StoreError

        try:
            updates = [_record_from_wire(r) for r in msg.records]
            self.store.apply_updates(updates)
        except (StoreError, ValueError) as e:
            log.warn("refused a replication batch from a peer: {error}", error=str(e))

    def _request_digest(self, sid: str) -> None:
        if not hasattr(self.store, "digest"):
            return
        conn = self.connections.get(sid)
        if conn is None:
            return
        self._digests[sid] = {}
        request_id = self._next_request
        self._next_request += 1
        conn.send(p.DigestRequest(request_id, 0))

    def _answer_digest(self, conn: PeerConnection, msg: p.DigestRequest) -> None:
        if not hasattr(self.store, "digest"):
            return
        entries = [p.DigestEntry(table, key, fp)
                   for (table, key), fp in self.store.digest().items()]
        chunks = p.chunk_digest(msg.request_id, entries)
        # Small clusters: send every chunk at once, in order.
        for chunk in chunks[msg.chunk:]:
            conn.send(chunk)

    def _digest_chunk(self, sid: str, conn: PeerConnection, msg: p.Digest) -> None:
        theirs = self._digests.setdefault(sid, {})
        for entry in msg.entries:
            theirs[(entry.table, entry.key)] = entry.fingerprint
        if msg.last:
            updates = self.store.updates_for(theirs)
            self._digests.pop(sid, None)
            for frame in p.batch_updates([_record_to_wire(u) for u in updates]):
                conn.send(frame)

    def _anti_entropy_round(self) -> None:
        for sid in list(self.connections):
            self._request_digest(sid)

    # -- joining ---------------------------------------------------------

    def join_request(self, conn: PeerConnection, msg: p.JoinRequest) -> None:
        if self.joiner is None:
            conn.fail(ErrorCode.BAD_TOKEN, "this server does not admit new members")
            return
        self.joiner(conn, msg)


def _wall_us() -> int:
    return int(time.time() * 1_000_000)


def _boot_ms(incarnation: int) -> int:
    """When a server's run started (wall ms), from its incarnation (wall us).

    One millisecond earlier, for the rounding: a registration stamped in the
    millisecond the server started belongs to this run.
    """
    return incarnation // 1000 - 1


_DIRECTORY_OVERHEAD = 4 + 1 + 2  # length, type, location count


def _location_size(location: p.Location) -> int:
    return sum(2 + len(text.encode("utf-8"))
               for text in (location.encoder_id, location.server_id, location.epoch)) + 4 + 1


def directory_frames(locations: list[p.Location],
                     max_bytes: int = p.BATCH_BYTES) -> list[p.Directory]:
    """``locations`` as Directory messages of at most ``max_bytes`` per frame (none if empty).

    A location larger than ``max_bytes`` by itself (its strings are at most
    64 KiB each) has a frame of its own, still far within ``FRAME_LIMIT``.
    """
    frames: list[p.Directory] = []
    batch: list[p.Location] = []
    size = _DIRECTORY_OVERHEAD
    for location in locations:
        n = _location_size(location)
        if batch and (size + n > max_bytes or len(batch) == 0xFFFF):
            frames.append(p.Directory(tuple(batch)))
            batch, size = [], _DIRECTORY_OVERHEAD
        batch.append(location)
        size += n
    if batch:
        frames.append(p.Directory(tuple(batch)))
    return frames


def _wire_state(state: PeerState) -> int:
    return {
        PeerState.ALIVE: p.MemberState.ALIVE,
        PeerState.SUSPECT: p.MemberState.SUSPECT,
        PeerState.DEAD: p.MemberState.DEAD,
        PeerState.LEFT: p.MemberState.LEFT,
    }.get(state, p.MemberState.CONNECTING)


def _to_wire(location: Location) -> p.Location:
    return p.Location(location.encoder_id, location.server_id, location.epoch.encode(),
                      location.seq, location.state)


def _from_wire(location: p.Location) -> Location:
    return Location(location.encoder_id, location.server_id, Stamp.decode(location.epoch),
                    location.seq, location.state)


def _record_to_wire(update: Update) -> p.RecordUpdate:
    return p.RecordUpdate(
        update.table, update.key,
        update.deleted.encode() if update.deleted is not None else "",
        tuple(p.Field(name, p.encode_value(value), stamp.encode())
              for name, (value, stamp) in update.fields.items()),
    )


def _record_from_wire(record: p.RecordUpdate) -> Update:
    return Update(
        record.table, record.key,
        {f.name: (p.decode_value(f.value), Stamp.decode(f.stamp)) for f in record.fields},
        Stamp.decode(record.deleted_stamp) if record.deleted_stamp else None,
    )
