"""What the admin site shows about this server, as plain JSON-ready data.

Both the pages and the JSON API read the server through :class:`ServerView`,
so they always agree.  It reads the relay core's public attributes and the
store; it changes nothing.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from evserver import __version__
from evserver.admin.tlsreload import CertificateInfo, certificate_info
from evserver.config import ServerConfig
from evserver.state.relay import EncoderSession, RelayCore, ViewerSession
from evserver.store import Store
from evserver.tls import CERT_FILENAME, TLS_DIRNAME
from evserver.wire.messages import EncoderState

CERT_WARNING_DAYS = 30
ENCODER_STATES = {EncoderState.OFFLINE: "offline", EncoderState.ONLINE: "online",
                   EncoderState.STREAMING: "streaming"}

#: Plain words for each ServerConfig field; a field missing here is still
#: listed (under its own name), so new settings never go unseen.
SETTING_DESCRIPTIONS: dict[str, str] = {
    "data_dir": "Data directory (database, TLS files, server id)",
    "server_id": "Server id",
    "encoder_endpoint": "Encoder control: listening endpoint",
    "viewer_endpoint": "Viewer control: listening endpoint",
    "relay_endpoint": "Video relay: listening endpoint",
    "admin_endpoint": "Admin web site: listening endpoint",
    "peer_endpoint": "Peer connections (multi-site resilience): listening endpoint",
    "external_host": "External address given to encoders and viewers",
    "external_encoder_port": "Encoder control: external port",
    "external_viewer_port": "Viewer control: external port",
    "external_relay_port": "Video relay: external port",
    "external_admin_port": "Admin web site: external port",
    "external_peer_port": "Peer connections: external port",
    "tls": "TLS on the encoder, viewer and relay ports",
    "join_address": "Cluster member joined through at first start",
    "join_token": "Join token given at first start",
    "max_servers": "Most servers a cluster may have",
    "keepalive_interval": "Keepalive interval (seconds)",
    "keepalive_timeout": "Keepalive timeout (seconds)",
    "max_control_frame": "Largest control frame",
    "max_media_frame": "Largest media frame",
    "viewer_queue_bytes": "Queue per slow viewer before frames are dropped",
    "stall_timeout": "Seconds without media before a stream counts as stalled",
    "gop_cache_bytes": "Latest group of pictures kept per stream",
    "stop_linger": "Seconds a stream lingers after its last viewer leaves",
}


def human_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB'; exact for small numbers."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}".replace(".0 ", " ")
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """93784 -> '1 d 2 h 3 min'; under a minute: '42 s'."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes = s // 60
    parts = []
    if days:
        parts.append(f"{days} d")
    if hours or days:
        parts.append(f"{hours} h")
    parts.append(f"{minutes} min")
    return " ".join(parts)


#: Settings whose values are secrets: the pages say only whether they are set.
SECRET_SETTINGS = frozenset({"join_token"})


def _format_setting(name: str, value: Any) -> str:
    if value is None:
        return "—"
    if name in SECRET_SETTINGS:
        return "given (not shown)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int) and (name.endswith("_bytes") or name.endswith("_frame")):
        return f"{human_bytes(value)} ({value} bytes)"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return value


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (IPv6 addresses in brackets)."""
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]"
    except ValueError:
        pass
    return host


def _is_loopback(host: str) -> bool:
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen
class Setting:
    name: str
    description: str
    value: Any
    text: str


class ServerView:
    """Read-only views of this server for the admin site."""

    def __init__(
        self,
        store: Store,
        core: RelayCore,
        config: ServerConfig,
        seconds: Callable[[], float],
        started_at: float,
    ) -> None:
        self.store = store
        self.core = core
        self.config = config
        self.seconds = seconds
        self.started_at = started_at
        self._cert_cache: tuple[Any, CertificateInfo | None] | None = None
        #: ``{"enabled", "servers", "cluster_id"}`` for GET /api/server; the admin
        #: site replaces it with one that asks the cluster.
        self.cluster_summary: Callable[[], dict[str, Any]] = lambda: {
            "enabled": False, "servers": 1, "cluster_id": None}

    @property
    def server_id(self) -> str:
        return self.config.server_id

    @property
    def version(self) -> str:
        return __version__

    def uptime(self) -> float:
        return max(0.0, self.seconds() - self.started_at)

    @property
    def admin_url(self) -> str:
        c = self.config
        return f"https://{url_host(c.external_host)}:{c.external_admin_port}/"

    def ports(self) -> list[dict[str, Any]]:
        c = self.config
        return [
            {"name": "encoder", "carries": "encoder control", "endpoint": c.encoder_endpoint,
             "external_port": c.external_encoder_port, "tls": c.tls},
            {"name": "viewer", "carries": "viewer control", "endpoint": c.viewer_endpoint,
             "external_port": c.external_viewer_port, "tls": c.tls},
            {"name": "relay", "carries": "video relay", "endpoint": c.relay_endpoint,
             "external_port": c.external_relay_port, "tls": c.tls},
            {"name": "admin", "carries": "admin web site (HTTPS)",
             "endpoint": c.admin_endpoint, "external_port": c.external_admin_port,
             "tls": True},
            {"name": "peer", "carries": "peer connections (multi-site resilience)",
             "endpoint": c.peer_endpoint, "external_port": c.external_peer_port,
             "tls": True},
        ]

    def load(self) -> dict[str, int]:
        encoders = self.core.encoders.values()
        return {
            "encoders_online": len(self.core.encoders),
            "encoders_streaming": sum(1 for e in encoders if e.streaming),
            "viewers": len(self.core.viewers),
            "channels": len(self.core.channels),
        }

    def certificate(self) -> CertificateInfo | None:
        """The served certificate's details (None if TLS files are absent or unreadable)."""
        path = self.config.data_dir / TLS_DIRNAME / CERT_FILENAME
        try:
            st = path.stat()
            key: Any = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return None
        if self._cert_cache is None or self._cert_cache[0] != key:
            try:
                info: CertificateInfo | None = certificate_info(path)
            except (OSError, ValueError):
                info = None
            self._cert_cache = (key, info)
        return self._cert_cache[1]

    def warnings(self) -> list[str]:
        out = []
        if not any(a.role == "admin" for a in self.store.list_accounts()):
            out.append(
                "No administrator account exists: nobody can log in to this site. "
                "Create one with: evserver-ctl account add --admin"
            )
        if not self.config.tls:
            out.append(
                "TLS is disabled on the encoder, viewer and relay ports (--plain): "
                "credentials and video cross the network unencrypted."
            )
        if _is_loopback(self.config.external_host):
            out.append(
                f"The external address is {self.config.external_host}: encoders and viewers "
                "on other machines cannot reach this server (set --external-host)."
            )
        cert = self.certificate()
        if cert is not None:
            now = datetime.datetime.fromtimestamp(self.seconds(), datetime.UTC)
            left = cert.not_after - now
            if left.total_seconds() <= 0:
                out.append(f"The TLS certificate expired on {cert.not_after:%Y-%m-%d}.")
            elif left.days < CERT_WARNING_DAYS:
                out.append(
                    f"The TLS certificate expires on {cert.not_after:%Y-%m-%d} "
                    f"({left.days} days left)."
                )
        return out

    def server(self) -> dict[str, Any]:
        """GET /api/server."""
        c = self.config
        return {
            "server_id": c.server_id,
            "version": __version__,
            "started_at": self.started_at,
            "uptime": round(self.uptime(), 3),
            "uptime_text": human_duration(self.uptime()),
            "external_host": c.external_host,
            "admin_url": self.admin_url,
            "tls": c.tls,
            "ports": self.ports(),
            "load": self.load(),
            "encoders_registered": len(self.store.list_encoders()),
            "warnings": self.warnings(),
            "cluster": self.cluster_summary(),
        }

    @staticmethod
    def _session(session: EncoderSession) -> dict[str, Any]:
        channel = session.channel
        return {
            "state": "streaming" if session.streaming else "online",
            "frames_in": session.frames_in,
            "bytes_in": session.bytes_in,
            "viewers": len(channel.watchers) if channel is not None else 0,
        }

    def encoders(self) -> list[dict[str, Any]]:
        """Every registered encoder with its live state, plus connected unregistered ones.

        An encoder deleted from the store while connected stays connected
        until it disconnects; it is listed with ``registered: false``.  An
        encoder connected to another server of the cluster has that
        server's id and the state the cluster's directory gives (its
        counters are that server's to show).
        """
        out = []
        live = dict(self.core.encoders)
        for record in self.store.list_encoders():
            session = live.pop(record.encoder_id, None)
            row: dict[str, Any] = {
                "encoder_id": record.encoder_id,
                "name": record.name,
                "domain": record.domain,
                "pool": record.pool,
                "registered": True,
                "server_id": None,
                "state": "offline",
                "frames_in": 0,
                "bytes_in": 0,
                "viewers": 0,
            }
            if session is not None:
                row.update(self._session(session), server_id=self.server_id)
            else:
                where = self.core.locations.where(record.encoder_id)
                if where is not None and where.server_id != self.server_id:
                    row.update(server_id=where.server_id,
                               state=ENCODER_STATES.get(where.state, "online"))
            out.append(row)
        for encoder_id, session in sorted(live.items()):
            out.append({
                "encoder_id": encoder_id,
                "name": session.name,
                "domain": session.domain,
                "pool": None,
                "registered": False,
                "server_id": self.server_id,
                **self._session(session),
            })
        return out

    def connected_encoders(self) -> list[dict[str, Any]]:
        """The encoders connected to this server."""
        return [e for e in self.encoders() if e["server_id"] == self.server_id]

    @staticmethod
    def _viewer(session: ViewerSession) -> dict[str, Any]:
        feed = session.feed
        return {
            "account": session.account,
            "domain": session.domain,
            "watching": sorted(ch.encoder_id for ch in session.watching.values()),
            "relay_connected": feed is not None,
            "queued_bytes": feed.queued_bytes if feed is not None else 0,
            "frames_out": feed.frames_written if feed is not None else 0,
            "bytes_out": feed.bytes_written if feed is not None else 0,
            "frames_skipped": feed.frames_skipped if feed is not None else 0,
        }

    def viewers(self) -> list[dict[str, Any]]:
        """The viewers connected to this server, by account."""
        rows = [self._viewer(v) for v in self.core.viewers]
        rows.sort(key=lambda r: (r["account"], r["domain"], r["watching"]))
        return rows

    def settings(self) -> list[Setting]:
        """Every configured setting, in ServerConfig's order."""
        out = []
        for field in attrs.fields(ServerConfig):
            value = getattr(self.config, field.name)
            out.append(Setting(
                name=field.name,
                description=SETTING_DESCRIPTIONS.get(field.name, field.name),
                value=None if field.name in SECRET_SETTINGS else _jsonable(value),
                text=_format_setting(field.name, value),
            ))
        return out
