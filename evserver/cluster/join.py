"""Joining a cluster with a token: the member's side and the new server's side.

The member that minted the token (``evserver-ctl msr token``) keeps its
record in ``DATA/cluster/tokens.json``; the token names that member's peer
address and pins the cluster authority.  The new server, started with
``--join HOST:PORT --join-token TOKEN``, connects there over TLS without a
client certificate, sends ``JoinRequest`` (the token, its server id, a CSR
and its addresses) and receives ``JoinAccept`` (its certificate, the
authority, the member list); it installs them in ``DATA/cluster`` and its
cluster service starts as for any member.  Anti-entropy then gives it the
whole replica.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from evserver.cluster.ca import (
    ClusterError,
    ClusterIdentity,
    certificate_pem,
    cluster_dir,
    install_membership,
    load_certificate_pem,
    load_private_key_pem,
    make_csr,
    pinned_client_tls_options,
    private_key_pem,
    sign_csr,
)
from evserver.cluster.provision import MEMBERS_FILE
from evserver.cluster.tokens import (
    JoinToken,
    TokenError,
    TokenRecord,
    check_token,
    mint_token,
    parse_address,
)
from evserver.net.connection import WireConnection
from evserver.wire import messages as m
from evserver.wire import peer as p
from evserver.wire.framing import ErrorCode, ProtocolName, ProtocolViolation

log = Logger()

TOKENS_FILE = "tokens.json"
DEFAULT_MAX_SERVERS = 4


# -- the member's side --------------------------------------------------


def _tokens_path(data_dir: Path) -> Path:
    return cluster_dir(data_dir) / TOKENS_FILE


def load_tokens(data_dir: Path) -> dict[str, TokenRecord]:
    try:
        raw = json.loads(_tokens_path(data_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for item in raw if isinstance(raw, list) else []:
        try:
            record = TokenRecord(str(item["token_id"]), str(item["secret_hash"]),
                                 int(item["expires"]), bool(item.get("used", False)))
        except (KeyError, TypeError, ValueError):
            continue
        out[record.token_id] = record
    return out


def save_tokens(data_dir: Path, records: dict[str, TokenRecord]) -> None:
    path = _tokens_path(data_dir)
    tmp = path.with_name(f".{TOKENS_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump([attrs.asdict(r) for r in records.values()], f, indent=1)
    tmp.replace(path)


def mint(identity: ClusterIdentity, data_dir: Path, peer_address: str,
         lifetime: int) -> JoinToken:
    """A new token admitting one server through this member; its record is kept here."""
    token, record = mint_token(identity, [peer_address], time.time, lifetime)
    records = load_tokens(data_dir)
    now = time.time()
    records = {k: r for k, r in records.items() if r.expires > now and not r.used}
    records[record.token_id] = record
    save_tokens(data_dir, records)
    return token


class Admissions:
    """Answers JoinRequests on a member: checks the token, signs, sends JoinAccept."""

    def __init__(self, cluster: Any, max_servers: int = DEFAULT_MAX_SERVERS) -> None:
        self.cluster = cluster
        self.max_servers = max_servers

    def __call__(self, conn: Any, msg: p.JoinRequest) -> None:
        cluster = self.cluster
        data_dir = cluster.data_dir
        records = load_tokens(data_dir)
        try:
            check_token(records.get(msg.token_id), msg.token_id, msg.secret, time.time)
        except TokenError as e:
            log.info("join refused: {reason}", reason=str(e))
            conn.fail(ErrorCode.BAD_TOKEN, f"join refused: {e}")
            return
        if len(cluster.members) + 1 >= self.max_servers:
            conn.fail(ErrorCode.CLUSTER_FULL,
                      f"the cluster already has its maximum of {self.max_servers} servers")
            return
        if msg.server_id in cluster.removed:
            conn.fail(ErrorCode.REMOVED,
                      f"server {msg.server_id!r} was removed from this cluster; start it "
                      f"with a fresh data directory to join again")
            return
        if msg.server_id == cluster.server_id or msg.server_id in cluster.members:
            conn.fail(ErrorCode.SERVER_ID_IN_USE,
                      f"server id {msg.server_id!r} is already a member (a copied data "
                      f"directory?)")
            return
        try:
            csr = x509.load_pem_x509_csr(msg.csr_pem)
            hosts = sorted({msg.address.host, msg.address.peer_host})
            certificate = sign_csr(cluster.identity, csr, msg.server_id, hosts, time.time)
        except (ClusterError, ValueError) as e:
            conn.fail(ErrorCode.BAD_TOKEN, f"join refused: {e}")
            return
        records[msg.token_id] = records[msg.token_id].mark_used()
        save_tokens(data_dir, records)
        identity = cluster.identity
        conn.send(p.JoinAccept(
            cluster.cluster_id, certificate_pem(certificate), certificate_pem(identity.ca_cert),
            private_key_pem(identity.ca_key), cluster.member_list().members))
        log.info("server {server_id} joined the cluster through this member",
                 server_id=msg.server_id)
        cluster.add_member(msg.server_id, msg.address, 0)
        conn.close()


# -- the new server's side ----------------------------------------------


class JoinFailed(Exception):
    pass


class _JoinConnection(WireConnection):
    protocol_name = ProtocolName.PEER
    is_server = False

    def __init__(self, clock: Any, request: p.JoinRequest, done: Deferred[p.JoinAccept]) -> None:
        super().__init__(clock, p.FRAME_LIMIT)
        self.request = request
        self.done = done

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send(self.request)

    def message_received(self, msg: Any) -> None:
        if isinstance(msg, p.JoinAccept):
            if not self.done.called:
                self.done.callback(msg)
            self.close()
        elif isinstance(msg, m.Error):
            if not self.done.called:
                self.done.errback(JoinFailed(msg.message))
            self.close()
        else:
            raise ProtocolViolation(ErrorCode.UNEXPECTED_MESSAGE,
                                    f"{type(msg).__name__} is not expected while joining")

    def connection_closed(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.errback(JoinFailed(f"the member closed the connection: "
                                         f"{reason.getErrorMessage()}"))


class _Factory(Factory):
    noisy = False

    def __init__(self, build: Any) -> None:
        self.build = build

    def buildProtocol(self, addr: Any) -> WireConnection:
        connection: WireConnection = self.build()
        return connection


def join(reactor: Any, data_dir: Path, server_id: str, token_text: str,
         address: p.ExternalAddress, hostnames: Sequence[str],
         member: str | None = None) -> Deferred[ClusterIdentity]:
    """Join the cluster of ``token_text``; the Deferred fires with the installed identity."""
    token = JoinToken.decode(token_text)
    host, port = parse_address(member or token.addresses[0])
    key, csr = make_csr(server_id, list(hostnames))
    request = p.JoinRequest(token.token_id, token.secret, server_id,
                            csr.public_bytes(_pem()), address)
    done: Deferred[p.JoinAccept] = Deferred()
    endpoint = endpoints.wrapClientTLS(
        pinned_client_tls_options(token.ca_fingerprint),
        endpoints.HostnameEndpoint(reactor, host, port, timeout=5))
    def unreachable(failure: Failure) -> None:
        if not done.called:
            done.errback(JoinFailed(f"cannot reach {host}:{port}: {failure.getErrorMessage()}"))

    endpoint.connect(_Factory(lambda: _JoinConnection(reactor, request, done))).addErrback(
        unreachable)

    def accepted(accept: p.JoinAccept) -> ClusterIdentity:
        if accept.cluster_id != token.cluster_id:
            raise JoinFailed("the member answered for another cluster")
        identity = install_membership(
            data_dir, accept.cluster_id, load_certificate_pem(accept.ca_certificate_pem),
            load_private_key_pem(accept.ca_key_pem), key,
            load_certificate_pem(accept.certificate_pem))
        members = [
            {"server_id": mem.server_id, "incarnation": mem.incarnation,
             "address": attrs.asdict(mem.address)}
            for mem in accept.members if mem.server_id != server_id
        ]
        (cluster_dir(data_dir) / MEMBERS_FILE).write_text(json.dumps(members, indent=1),
                                                         encoding="utf-8")
        return identity

    done.addCallback(accepted)
    return done  # type: ignore[return-value]


def _pem() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM
