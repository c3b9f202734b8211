"""Multi-site resilience as the admin site shows and changes it.

:class:`MultiSite` reads the cluster service of the running server, which
appears at run time: ``host.cluster`` is None while the server is
standalone, and ``host.check_cluster()`` starts the service once
``DATA/cluster`` holds an identity (``host`` is the
:class:`~evserver.service.RelayServerService`, or a stand-in in tests).  Both
the pages and the JSON API go through it, so they agree; every change it
makes is audited by its caller.

The article's prerequisites are turned into warnings per server: a round
trip over 100 ms and a clock offset over the threshold (measured by the
membership), the bandwidth of the link under 10 Mbit/s, or under the 50
Mbit/s recommended (measured by the cluster's ``probes``,
:class:`~evserver.cluster.probes.PeerProbes`), and reachability (a member
this server has no link to).

Another server's page lists the encoders and viewers connected to it as that
server reports them when asked over the peer link (``probes.connections``);
when it does not answer, the encoders the cluster's directory says it hosts.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from evserver.admin.status import ENCODER_STATES, ServerView, url_host
from evserver.cluster.ca import ClusterError, ClusterIdentity, load_identity
from evserver.cluster.tokens import JoinToken, format_address
from evserver.config import validate_host
from evserver.store import DEFAULT_WEIGHT

#: Join tokens the admin site mints: a day, as ``evserver-ctl msr token``.
DEFAULT_TOKEN_LIFETIME = 24 * 3600
MIN_TOKEN_LIFETIME = 60
MAX_TOKEN_LIFETIME = 30 * 24 * 3600

#: PeerState values as the pages say them.
STATE_NAMES = {
    "connecting": "connecting",
    "alive": "alive",
    "suspect": "suspect",
    "dead": "down",
    "left": "left",
}
_LINKED = ("alive", "suspect")

#: The article's system requirements, shown next to the cluster.
PREREQUISITES = (
    "Every server's clock is accurate and synchronised (an NTP client on Linux).",
    "Every server reaches every other one directly, without port forwarding "
    "(the same network, or networks joined by a VPN).",
    "The peer port (47100 by default) and the admin port (9443) are open between the "
    "servers, and the encoder, viewer and relay ports to the clients.",
    "The round trip between any two servers is at most 100 ms.",
    "The links between servers carry at least 10 Mbit/s (50 Mbit/s recommended); the "
    "cluster's internet connection carries the video of every server.",
)


class ClusterHost(Protocol):
    """What the admin site needs of the running server."""

    cluster: Any

    def check_cluster(self) -> None:
        """Start the cluster service if DATA/cluster holds an identity."""


class MsrError(Exception):
    """A refused multi-site change: a message for a person and an HTTP status."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def cluster_hostnames(external_host: str) -> list[str]:
    """The names that go into this server's cluster certificate (as the server's TLS one)."""
    names = [external_host]
    for extra in ("localhost", "127.0.0.1"):
        if extra not in names:
            names.append(extra)
    return names


def admin_url(host: str, port: int) -> str | None:
    """``https://host:port/`` for a valid host and port, else None."""
    if not 0 < port <= 65535:
        return None
    try:
        validate_host(host)
    except ValueError:
        return None
    return f"https://{url_host(host)}:{port}/"


def join_command(token: str) -> str:
    """The command that starts a new server joining with ``token``."""
    return f"twistd -n evserver --join-token {token}"


def utc_text(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def clock_text(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%H:%M:%S UTC")


def bandwidth_json(measurement: Any) -> dict[str, Any]:
    """A link's latest bandwidth measurement (evserver.state.bandwidth.Measurement)."""
    sender = measurement.sender_mbps
    return {"mbps": round(measurement.mbps, 1),
            "sender_mbps": round(sender, 1) if sender is not None else None,
            "measured_at": measurement.at}


def connected_encoder_json(e: Any) -> dict[str, Any]:
    """An encoder another server reported (a ``ConnectedEncoder``), as this server's own rows."""
    return {"encoder_id": e.encoder_id, "name": e.name, "domain": e.domain,
            "state": ENCODER_STATES.get(e.state, "online"), "viewers": e.viewers,
            "frames_in": e.frames_in, "bytes_in": e.bytes_in}


def connected_viewer_json(v: Any) -> dict[str, Any]:
    """A viewer another server reported (a ``ConnectedViewer``), as this server's own rows."""
    return {"account": v.account, "domain": v.domain,
            "watching": [w.encoder_id for w in v.watching],
            "relay_connected": bool(v.relay_connected), "queued_bytes": v.queued_bytes,
            "frames_out": v.frames_out, "bytes_out": v.bytes_out,
            "frames_skipped": v.frames_skipped}


class MultiSite:
    """The cluster as the admin site sees it, and the changes it may make."""

    def __init__(self, view: ServerView, host: ClusterHost | None,
                 now: Callable[[], float]) -> None:
        self.view = view
        self.host = host
        self.now = now

    @property
    def cluster(self) -> Any | None:
        """The running cluster service, or None (standalone, or not started yet)."""
        return getattr(self.host, "cluster", None) if self.host is not None else None

    @property
    def probes(self) -> Any | None:
        """The cluster's link measurements and peer queries (PeerProbes), if it has them."""
        cluster = self.cluster
        return getattr(cluster, "probes", None) if cluster is not None else None

    @property
    def server_id(self) -> str:
        return self.view.server_id

    # -- reading ---------------------------------------------------------------

    def _identity_on_disk(self) -> tuple[ClusterIdentity | None, str | None]:
        try:
            return load_identity(self.view.config.data_dir, self.server_id), None
        except ClusterError as e:
            return None, str(e)

    def status(self) -> dict[str, Any]:
        """Whether multi-site resilience is enabled and running, and the cluster's identity."""
        c = self.view.config
        out: dict[str, Any] = {
            "enabled": False,
            "running": False,
            "cluster_id": None,
            "ca_fingerprint": None,
            "servers": 1,
            "max_servers": c.max_servers,
            "peer_address": format_address(c.external_host, c.external_peer_port),
            "error": None,
        }
        cluster = self.cluster
        if cluster is not None:
            out.update(enabled=True, running=True, cluster_id=cluster.cluster_id,
                       ca_fingerprint=cluster.identity.fingerprint(),
                       servers=1 + len(cluster.members),
                       max_servers=getattr(cluster, "max_servers", c.max_servers),
                       peer_address=format_address(cluster.address.peer_host,
                                                   cluster.address.peer_port))
            return out
        identity, error = self._identity_on_disk()
        if error is not None:
            out.update(enabled=True, error=error)
        elif identity is not None:
            out.update(enabled=True, cluster_id=identity.cluster_id,
                       ca_fingerprint=identity.fingerprint())
        return out

    def weight(self, server_id: str) -> float:
        """A server's capacity weight for the balancer (replicated; 1 unless set)."""
        return self.view.store.server_weights().get(server_id, DEFAULT_WEIGHT)

    def _this_row(self) -> dict[str, Any]:
        c = self.view.config
        stats = self.view.core.stats()
        return {
            "server_id": c.server_id,
            "this": True,
            "state": "alive",
            "address": c.external_host,
            "peer_address": format_address(c.external_host, c.external_peer_port),
            "admin_url": self.view.admin_url,
            "load": {"encoders": stats["encoders"], "streaming": stats["streaming"],
                     "viewers": stats["viewers"]},
            "rtt_ms": None,
            "offset_ms": None,
            "bandwidth": None,
            "connected": True,
            "warnings": [],
            "removable": False,
            "weight": self.weight(c.server_id),
        }

    def _peer_row(self, cluster: Any, record: Any, views: dict[str, Any]) -> dict[str, Any]:
        sid = record.server_id
        a = record.address
        view = views.get(sid)
        raw_state = getattr(view.state, "value", view.state) if view is not None else "connecting"
        state = STATE_NAMES.get(str(raw_state), str(raw_state))
        connected = sid in cluster.connections
        peer = format_address(a.peer_host, a.peer_port) if a.peer_port else a.peer_host
        warnings: list[str] = []
        if not connected:
            warnings.append(
                f"Not reachable from this server: no link to its peer address {peer}. "
                "Check that it runs and that the peer port is open between the servers "
                "(no port forwarding).")
        linked = state in _LINKED
        found = list(cluster.membership.warnings(sid)) if sid in cluster.membership else []
        probes = getattr(cluster, "probes", None)
        measured = None
        if probes is not None and linked:  # a link that is gone has no figure
            measured = probes.bandwidth.get(sid)
            found.extend(probes.warnings(sid))
        warnings.extend(w[:1].upper() + w[1:] + "." for w in found)
        load = getattr(cluster, "loads", {}).get(sid) if linked else None
        return {
            "server_id": sid,
            "this": False,
            "state": state,
            "address": a.host,
            "peer_address": peer,
            "admin_url": admin_url(a.host, a.admin_port),
            "load": None if load is None else {"encoders": load.encoders,
                                               "streaming": load.streaming,
                                               "viewers": load.viewers},
            # Measurements of a link that is gone are history: not shown.
            "rtt_ms": (round(view.rtt_ms, 1) if linked and view is not None
                       and view.rtt_ms is not None else None),
            "offset_ms": (round(view.offset_ms, 1) if linked and view is not None
                          and view.offset_ms is not None else None),
            "bandwidth": bandwidth_json(measured) if measured is not None else None,
            "connected": connected,
            "warnings": warnings,
            "removable": True,
            "weight": self.weight(sid),
        }

    def servers(self) -> list[dict[str, Any]]:
        """Every server of the cluster, this one first (standalone: this one only)."""
        rows = [self._this_row()]
        cluster = self.cluster
        if cluster is None:
            return rows
        views = cluster.membership.view()
        for sid in sorted(cluster.members):
            rows.append(self._peer_row(cluster, cluster.members[sid], views))
        return rows

    @staticmethod
    def warnings(rows: list[dict[str, Any]]) -> list[str]:
        """Every server's warnings, each prefixed with the server's id."""
        return [f"{r['server_id']}: {w}" for r in rows for w in r["warnings"]]

    def server(self, server_id: str) -> dict[str, Any] | None:
        """One server's row, or None if the cluster has no such server."""
        if server_id == self.server_id:
            return self._this_row()
        cluster = self.cluster
        if cluster is None or server_id not in cluster.members:
            return None
        return self._peer_row(cluster, cluster.members[server_id], cluster.membership.view())

    def hosted_encoders(self, server_id: str) -> list[dict[str, Any]]:
        """The encoders connected to a server: here, this server's own sessions;
        elsewhere, what the cluster's directory says that server hosts (whose
        counters only that server knows: None)."""
        if server_id == self.server_id:
            return [{"encoder_id": e["encoder_id"], "name": e["name"], "domain": e["domain"],
                     "state": e["state"], "viewers": e["viewers"], "frames_in": e["frames_in"],
                     "bytes_in": e["bytes_in"]} for e in self.view.connected_encoders()]
        out: list[dict[str, Any]] = []
        for location in self.view.core.locations.hosted_by(server_id):
            record = self.view.store.get_encoder(location.encoder_id)
            out.append({
                "encoder_id": location.encoder_id,
                "name": record.name if record is not None else location.encoder_id,
                "domain": record.domain if record is not None else None,
                "state": ENCODER_STATES.get(location.state, "online"),
                "viewers": None,
                "frames_in": None,
                "bytes_in": None,
            })
        out.sort(key=lambda e: e["encoder_id"])
        return out

    def server_connections(self, server_id: str
                           ) -> dict[str, Any] | Deferred[dict[str, Any]]:
        """``{"encoders", "viewers", "report"}`` of a server of the cluster.

        This server: its own sessions (``report`` None).  Another server:
        what it reports when asked over the peer link (a Deferred; ``report``
        says when, or that it did not answer, and then the encoders are the
        directory's and ``viewers`` is None).  A cluster service without
        probes cannot ask: the directory's encoders, ``report`` None.
        """
        if server_id == self.server_id:
            return {"encoders": self.hosted_encoders(server_id),
                    "viewers": self.view.viewers(), "report": None}
        probes = self.probes
        if probes is None:
            return {"encoders": self.hosted_encoders(server_id), "viewers": None,
                    "report": None}
        d: Deferred[dict[str, Any]] = probes.connections(server_id).addCallback(
            self._reported, server_id)
        return d

    def _reported(self, answer: Any, server_id: str) -> dict[str, Any]:
        if answer is None:
            return {
                "encoders": self.hosted_encoders(server_id),
                "viewers": None,
                "report": {
                    "answered": False, "at": None, "truncated": False,
                    "text": f"{server_id} did not answer: the encoders are those the "
                            "cluster's directory says it hosts; its viewers are listed on "
                            "its own admin site.",
                },
            }
        text = f"As reported by {server_id} at {clock_text(answer.at)}."
        if answer.truncated:
            text += " The lists are cut short: it has more than one answer holds."
        return {
            "encoders": [connected_encoder_json(e) for e in answer.encoders],
            "viewers": [connected_viewer_json(v) for v in answer.viewers],
            "report": {"answered": True, "at": answer.at, "truncated": answer.truncated,
                       "text": text},
        }

    # -- changing ----------------------------------------------------------------

    def enable(self) -> ClusterIdentity:
        """Make this standalone server a cluster of one, in place, and start the service."""
        from evserver.cluster.provision import enable

        if self.cluster is not None:
            raise MsrError("multi-site resilience is enabled already on this server")
        c = self.view.config
        try:
            identity = enable(c.data_dir, cluster_hostnames(c.external_host), self.now)
        except ClusterError as e:
            raise MsrError(str(e)) from None
        except (OSError, ValueError) as e:
            raise MsrError(f"cannot enable multi-site resilience: {e}", 500) from None
        if self.host is not None:
            self.host.check_cluster()
        return identity

    def mint_token(self, lifetime: int = DEFAULT_TOKEN_LIFETIME) -> JoinToken:
        """A single-use token admitting one new server through this member."""
        from evserver.cluster.join import mint

        cluster = self.cluster
        if cluster is None:
            raise MsrError("this server is not a running cluster member: enable multi-site "
                           "resilience first")
        identity = cluster.identity
        if identity.ca_key is None:
            raise MsrError("this member does not hold the cluster authority key: create "
                           "the token on another server of the cluster")
        peer = format_address(cluster.address.peer_host, cluster.address.peer_port)
        try:
            return mint(identity, cluster.data_dir, peer, lifetime)
        except (ClusterError, OSError) as e:
            raise MsrError(f"cannot create a join token: {e}", 500) from None

    def remove(self, server_id: str) -> None:
        """Remove another server from the cluster (it needs a new token to come back)."""
        cluster = self.cluster
        if server_id == self.server_id:
            raise MsrError("a server cannot remove itself: remove it from another server "
                           "of the cluster")
        if cluster is None or server_id not in cluster.members:
            raise MsrError(f"there is no server {server_id!r} in this cluster", 404)
        cluster.remove_member(server_id)


def check_lifetime(value: object) -> int:
    """A token lifetime in whole seconds, within bounds; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("lifetime must be a whole number of seconds")
    if not MIN_TOKEN_LIFETIME <= value <= MAX_TOKEN_LIFETIME:
        raise ValueError(f"lifetime must be {MIN_TOKEN_LIFETIME}..{MAX_TOKEN_LIFETIME} seconds")
    return value

