"""``twistd evserver``: command-line options and the service maker.

The twistd plugin (``twisted/plugins/evserver_plugin.py``) names this module
lazily; twistd calls :class:`Options` to parse ``twistd evserver ...`` and
then :func:`makeService`.

Every bad option is refused while parsing, before anything starts: under
twistd as one line ``evserver: error: ...`` on stderr and exit status 2;
called directly, as :class:`twisted.python.usage.UsageError`.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from twisted.application.service import IService
from twisted.python import usage

from evserver import startup
from evserver.config import (
    DEFAULT_DATA_DIR,
    ServerConfig,
    default_of,
    listen_address,
    load_or_create_server_id,
    validate_host,
)

# option name -> (ServerConfig field, description)
_ENDPOINTS = {
    "encoder-port": ("encoder_endpoint", "encoder control connections"),
    "viewer-port": ("viewer_endpoint", "viewer control connections"),
    "relay-port": ("relay_endpoint", "video relay connections"),
    "admin-port": ("admin_endpoint", "the admin web site"),
    "peer-port": ("peer_endpoint", "the cluster's server-to-server connections"),
}
_EXTERNAL_PORTS = {
    "external-encoder-port": ("external_encoder_port", "encoder-port"),
    "external-viewer-port": ("external_viewer_port", "viewer-port"),
    "external-relay-port": ("external_relay_port", "relay-port"),
    "external-admin-port": ("external_admin_port", "admin-port"),
    "external-peer-port": ("external_peer_port", "peer-port"),
}
# option name -> (ServerConfig field, type, unit, zero allowed)
_NUMBERS: dict[str, tuple[str, type, str, bool]] = {
    "keepalive-interval": ("keepalive_interval", float, "seconds", False),
    "keepalive-timeout": ("keepalive_timeout", float, "seconds", False),
    "max-control-frame": ("max_control_frame", int, "bytes", False),
    "max-media-frame": ("max_media_frame", int, "bytes", False),
    "viewer-queue-bytes": ("viewer_queue_bytes", int, "bytes", False),
    "stall-timeout": ("stall_timeout", float, "seconds", False),
    "gop-cache-bytes": ("gop_cache_bytes", int, "bytes", False),
    "stop-linger": ("stop_linger", float, "seconds", True),
    "balance-stability": ("balance_stability", float, "seconds", True),
    "balance-in-flight": ("balance_in_flight", int, "moves", True),
}
_NUMBER_HELP = {
    "keepalive-interval": "Seconds between keepalives on idle control connections.",
    "keepalive-timeout": "Seconds of silence after which a peer is taken for dead.",
    "max-control-frame": "Largest control frame accepted, in bytes.",
    "max-media-frame": "Largest media frame accepted, in bytes.",
    "viewer-queue-bytes": "Bytes queued for a slow viewer before frames are dropped.",
    "stall-timeout": "Seconds a viewer may leave its video unread before it is disconnected.",
    "gop-cache-bytes": "Bytes of the latest group of pictures kept per stream.",
    "stop-linger": "Seconds an encoder keeps streaming after its last viewer leaves.",
    "balance-stability": "Seconds of stable cluster membership before idle encoders are "
                         "moved to even out the load.",
    "balance-in-flight": "Encoder moves under way at once when balancing (0: never move).",
}

ENDPOINT_EXAMPLES = "e.g. tcp:5510 or tcp:port=5510:interface=127.0.0.1"


def _is_tls_endpoint(description: str) -> bool:
    kind = description.split(":", 1)[0].strip().lower()
    return kind in {"ssl", "tls", "txtls"}


class Options(usage.Options):
    """Options of ``twistd evserver``."""

    synopsis = "[options]"
    longdesc = (
        "Run an evserver video relay server.  Listening endpoints are Twisted "
        "server endpoint strings naming plain transports (tcp:PORT, "
        "tcp:port=PORT:interface=ADDR, unix:PATH); evserver adds TLS itself "
        "unless --plain is given.  The certificate is made in DATA/tls on first "
        "start."
    )

    optFlags: ClassVar[list[list[str | None]]] = [
        ["plain", None, "Plain TCP without TLS (benchmarks and tests only)."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        [
            "data",
            None,
            DEFAULT_DATA_DIR,
            "Data directory (created if missing): database, TLS files, server id.",
        ],
        *(
            [option, None, default_of(field), f"Endpoint (Twisted server string) for {what}."]
            for option, (field, what) in _ENDPOINTS.items()
        ),
        [
            "external-host",
            None,
            default_of("external_host"),
            "Host name or IP address that clients and peers are told to connect to.",
        ],
        *(
            [
                option,
                None,
                None,
                f"Port advertised for --{listen} when NAT remaps it (default: its port).",
            ]
            for option, (_field, listen) in _EXTERNAL_PORTS.items()
        ),
        *(
            [option, None, str(default_of(field)), _NUMBER_HELP[option]]
            for option, (field, _type, _unit, _zero) in _NUMBERS.items()
        ),
        ["join", None, None,
         "Join a cluster at first start through this member's peer address (HOST:PORT; "
         "default: the address in the token)."],
        ["join-token", None, None,
         "The join token (from 'evserver-ctl msr token' on a member)."],
        ["max-servers", None, str(default_of("max_servers")),
         "The most servers this cluster admits (when this server admits new ones)."],
    ]

    server_config: ServerConfig

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            # Under twistd: one clear line and status 2, instead of twistd's
            # full usage text (and, before Twisted 26.x, status 0).
            startup.usage_error_exit(f"{e} (see: twistd evserver --help)")

    def parseArgs(self, *args: str) -> None:
        if args:
            raise usage.UsageError(f"unexpected argument(s): {' '.join(args)}")

    def postOptions(self) -> None:
        values: dict[str, Any] = {"tls": not self["plain"]}

        addresses: dict[tuple[int, str], str] = {}
        for option, (field, _what) in _ENDPOINTS.items():
            description = self[option]
            if _is_tls_endpoint(description):
                raise usage.UsageError(
                    f"--{option} {description!r}: give a plain transport endpoint "
                    f"({ENDPOINT_EXAMPLES}); evserver adds TLS itself"
                )
            try:
                address = listen_address(description)
            except ValueError as e:
                raise usage.UsageError(
                    f"--{option} {description!r} is not a valid Twisted server endpoint "
                    f"({e}); {ENDPOINT_EXAMPLES}"
                ) from None
            if address is not None and address[0] != 0:
                if address in addresses:
                    raise usage.UsageError(
                        f"--{option} and --{addresses[address]} both listen on port {address[0]}"
                    )
                addresses[address] = option
            values[field] = description

        try:
            values["external_host"] = validate_host(self["external-host"])
        except ValueError as e:
            raise usage.UsageError(f"--external-host: {e}") from None

        for option, (field, listen) in _EXTERNAL_PORTS.items():
            raw = self[option]
            if raw is None:
                if listen_address(self[listen]) is None:
                    raise usage.UsageError(
                        f"--{listen} {self[listen]!r} has no TCP port: give --{option}"
                    )
                continue
            values[field] = _parse_port(option, raw)

        for option, (field, kind, unit, zero_ok) in _NUMBERS.items():
            values[field] = _parse_number(option, self[option], kind, unit, zero_ok)
        if values["keepalive_timeout"] <= values["keepalive_interval"]:
            raise usage.UsageError(
                f"--keepalive-timeout ({values['keepalive_timeout']}) must be longer than "
                f"--keepalive-interval ({values['keepalive_interval']})"
            )

        if self["join"] is not None and self["join-token"] is None:
            raise usage.UsageError("--join needs --join-token (from 'evserver-ctl msr token')")
        if self["join-token"] is not None:
            from evserver.cluster.tokens import JoinToken, TokenError, parse_address

            try:
                JoinToken.decode(self["join-token"])
                if self["join"] is not None:
                    parse_address(self["join"])
            except TokenError as e:
                raise usage.UsageError(f"--join/--join-token: {e}") from None
            values["join_address"] = self["join"]
            values["join_token"] = self["join-token"]
        values["max_servers"] = _parse_number("max-servers", self["max-servers"], int,
                                              "servers", False)

        data_dir = prepare_data_dir(self["data"])
        try:
            server_id = load_or_create_server_id(data_dir)
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"data directory {str(data_dir)!r}: {e}") from None

        try:
            self.server_config = ServerConfig(data_dir=data_dir, server_id=server_id, **values)
        except (ValueError, TypeError) as e:  # pragma: no cover - checked above
            raise usage.UsageError(str(e)) from None


def _parse_port(option: str, raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise usage.UsageError(f"--{option} must be a port number 1..65535, not {raw!r}")
    return port


def _parse_number(option: str, raw: str, kind: type, unit: str, zero_ok: bool) -> Any:
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or not (value >= 0 if zero_ok else value > 0):
        what = f"whole number of {unit}" if kind is int else f"number of {unit}"
        bound = "zero or a positive" if zero_ok else "a positive"
        raise usage.UsageError(f"--{option} must be {bound} {what}, not {raw!r}")
    return value


def prepare_data_dir(raw: str) -> Path:
    """Make the data directory (mode 0700) if missing and check it is writable.

    Returns its absolute path (twistd may change directory later).  Raises
    UsageError with the reason if it cannot be made or written.
    """
    if not raw:
        raise usage.UsageError("--data must not be empty")
    path = Path(raw).expanduser().absolute()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise usage.UsageError(
            f"data directory {str(path)!r} exists and is not a directory"
        ) from None
    except OSError as e:
        raise usage.UsageError(
            f"cannot create data directory {str(path)!r}: {e.strerror or e}"
        ) from None
    if not path.is_dir():
        raise usage.UsageError(f"data directory {str(path)!r} exists and is not a directory")
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise usage.UsageError(
            f"data directory {str(path)!r} is not writable: {e.strerror or e}"
        ) from None
    return path


def config_from_options(options: Options) -> ServerConfig:
    """The ServerConfig that ``options`` (already parsed) describe."""
    return options.server_config


def makeService(options: Options) -> IService:
    """Build the whole server for ``twistd evserver``."""
    from twisted.internet import reactor

    from evserver.service import build_service

    raise_file_limit()
    service: IService = build_service(config_from_options(options), reactor)
    return service


def raise_file_limit(wanted: int = 65536) -> int:
    """Raise the soft limit of open files towards the hard one; return the new soft limit.

    Every encoder takes two connections; the usual soft limit of 1024 would
    stop a server at about 500 encoders.
    """
    import resource

    from twisted.logger import Logger

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < 4096:
        Logger().warn("open file limit is {soft}: at most about {n} encoders",
                      soft=soft, n=soft // 2)
    return soft


__all__ = ["Options", "config_from_options", "makeService", "prepare_data_dir"]
