"""The server's configuration: one frozen record, built by ``evserver.tap``.

Listening addresses are Twisted server endpoint strings (``tcp:5510``,
``tcp:port=5510:interface=127.0.0.1``, ``unix:/run/ev.sock``...).  They name
plain transports: evserver adds TLS itself unless ``tls`` is off.

The *external* host and ports are what clients and peers are told to connect
to; they differ from the listening ones behind NAT with port remapping.  Each
external port defaults to the port of its endpoint string.
"""

from __future__ import annotations

import ipaddress
import os
import re
import uuid
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor

DEFAULT_DATA_DIR = "evserver-data"
SERVER_ID_FILENAME = "server-id"
SERVER_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

MiB = 1024 * 1024


def listen_address(endpoint: str) -> tuple[int, str] | None:
    """``(port, interface)`` that a server endpoint string would listen on.

    None for endpoints without a TCP port (``unix:``, ``systemd:``...).
    Raises ValueError, with Twisted's reason, if the string does not parse.

    The string is parsed by Twisted itself (``serverFromString``) and the
    endpoint is "listened" on a :class:`MemoryReactor`, which records the
    port and interface without touching the network.
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ValueError("empty endpoint")
    reactor = MemoryReactor()
    try:
        ep = serverFromString(reactor, endpoint)
        failures: list[Any] = []
        ep.listen(Factory.forProtocol(Protocol)).addErrback(failures.append)
    except Exception as e:  # Twisted raises ValueError, TypeError, KeyError...
        reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise ValueError(reason) from None
    if failures:
        raise ValueError(failures[0].getErrorMessage())
    addresses = [(port, interface) for port, _f, _b, interface in reactor.tcpServers]
    addresses += [(port, interface) for port, _f, _c, _b, interface in reactor.sslServers]
    if not addresses:
        return None
    port, interface = addresses[0]
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range 0..65535")
    return int(port), str(interface)


def port_of(endpoint: str) -> int | None:
    """The TCP port a server endpoint string listens on (None if it has none).

    Raises ValueError if the string does not parse.
    """
    address = listen_address(endpoint)
    return None if address is None else address[0]


def _default_external_port(endpoint_field: str, endpoint: str) -> int:
    try:
        port = port_of(endpoint)
    except ValueError as e:
        raise ValueError(f"{endpoint_field} {endpoint!r} is not a server endpoint: {e}") from None
    if port is None:
        raise ValueError(
            f"{endpoint_field} {endpoint!r} has no TCP port: give its external port explicitly"
        )
    return port


def _external_port_default(endpoint_field: str) -> Any:
    return attrs.Factory(
        lambda self: _default_external_port(endpoint_field, getattr(self, endpoint_field)),
        takes_self=True,
    )


def validate_host(host: str) -> str:
    """Return ``host`` if it is an IP address or a DNS host name, else raise ValueError."""
    if not isinstance(host, str) or not host:
        raise ValueError("the external host must not be empty")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{host!r} is neither an IP address nor a valid host name")
    return host


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must not be negative, not {value!r}")


def _port_number(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be a port number 0..65535, not {value!r}")


def _endpoint(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        listen_address(value)
    except ValueError as e:
        raise ValueError(f"{attribute.name} {value!r} is not a server endpoint: {e}") from None


def _server_id(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not SERVER_ID_PATTERN.fullmatch(value):
        raise ValueError(f"server id {value!r} is invalid: use 1-64 of A-Z a-z 0-9 . _ -")


def _host(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    validate_host(value)


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Everything a server needs to start; validated on construction."""

    data_dir: Path = attrs.field(converter=Path)
    server_id: str = attrs.field(validator=_server_id)

    encoder_endpoint: str = attrs.field(default="tcp:5510", validator=_endpoint)
    viewer_endpoint: str = attrs.field(default="tcp:5520", validator=_endpoint)
    relay_endpoint: str = attrs.field(default="tcp:5530", validator=_endpoint)
    admin_endpoint: str = attrs.field(default="tcp:9443", validator=_endpoint)
    peer_endpoint: str = attrs.field(default="tcp:47100", validator=_endpoint)

    external_host: str = attrs.field(default="127.0.0.1", validator=_host)
    external_encoder_port: int = attrs.field(
        default=_external_port_default("encoder_endpoint"), validator=_port_number
    )
    external_viewer_port: int = attrs.field(
        default=_external_port_default("viewer_endpoint"), validator=_port_number
    )
    external_relay_port: int = attrs.field(
        default=_external_port_default("relay_endpoint"), validator=_port_number
    )
    external_admin_port: int = attrs.field(
        default=_external_port_default("admin_endpoint"), validator=_port_number
    )
    external_peer_port: int = attrs.field(
        default=_external_port_default("peer_endpoint"), validator=_port_number
    )

    tls: bool = True

    #: Join a cluster at start (a member's peer address and a token from it).
    join_address: str | None = None
    join_token: str | None = None
    #: The most servers a cluster may have (the article's limit is four).
    max_servers: int = attrs.field(default=4, validator=_positive)
    #: Balancing: seconds of stable membership before idle encoders are
    #: moved again, and how many moves may be under way at once (0: never
    #: move; placement on connect still spreads new encoders).
    balance_stability: float = attrs.field(default=60.0, validator=_not_negative)
    balance_in_flight: int = attrs.field(default=2, validator=_not_negative)

    # A client notices a silent server within the timeout (the failover
    # budget gives that 1.5 s).
    keepalive_interval: float = attrs.field(default=0.5, validator=_positive)
    keepalive_timeout: float = attrs.field(default=1.5, validator=_positive)
    max_control_frame: int = attrs.field(default=64 * 1024, validator=_positive)
    max_media_frame: int = attrs.field(default=4 * MiB, validator=_positive)
    viewer_queue_bytes: int = attrs.field(default=8 * MiB, validator=_positive)
    stall_timeout: float = attrs.field(default=20.0, validator=_positive)
    gop_cache_bytes: int = attrs.field(default=16 * MiB, validator=_positive)
    # Seconds to wait after the last viewer leaves before STOP_STREAM.
    stop_linger: float = attrs.field(default=5.0, validator=_not_negative)

    def __attrs_post_init__(self) -> None:
        if self.keepalive_timeout <= self.keepalive_interval:
            raise ValueError(
                f"keepalive_timeout ({self.keepalive_timeout}) must be longer than "
                f"keepalive_interval ({self.keepalive_interval})"
            )


def default_of(field_name: str) -> Any:
    """The default value of a ServerConfig field (for option help and parsing)."""
    default = getattr(attrs.fields(ServerConfig), field_name).default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        raise ValueError(f"{field_name} has a computed default")
    return default


def load_or_create_server_id(data_dir: str | os.PathLike[str]) -> str:
    """The server's id, from ``data_dir/server-id``; made (a random UUID) on first use.

    The file is created atomically, so concurrent first starts agree.
    Raises ValueError if the file exists but holds no valid id, and OSError
    if it cannot be read or written.
    """
    path = Path(data_dir) / SERVER_ID_FILENAME
    if not path.exists():
        tmp = path.with_name(f".{SERVER_ID_FILENAME}.{os.getpid()}.{uuid.uuid4().hex}")
        tmp.write_text(str(uuid.uuid4()) + "\n", encoding="ascii")
        try:
            os.link(tmp, path)  # atomic; fails if another process won the race
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not SERVER_ID_PATTERN.fullmatch(text):
        raise ValueError(f"{str(path)!r} does not hold a valid server id: {text[:80]!r}")
    return text
