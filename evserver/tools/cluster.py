"""``ev-cluster``: a local cluster of real ``twistd -n evserver`` processes on loopback.

Example::

    ev-cluster up --servers 3                 # TLS, free ports, a temporary data folder
    ev-cluster up --servers 4 --plain --base-port 7000 --data /tmp/evc --json

``up`` makes one data directory per server (``DIR/s1``, ``DIR/s2``...),
enables multi-site resilience on the first (``evserver-ctl msr enable``),
admits the others from it (``evserver-ctl msr provision --from DIR/s1
--peer HOST:PEERPORT``), provisions a demo domain, account and encoders
(:func:`provision_data`), starts every server, waits until each one's log
says that every other member is alive, prints each server's id and
addresses (``--json``: one JSON object), and stays up until Ctrl-C or
SIGTERM (or ``--duration``); then it stops every server.

:class:`LocalCluster` is the same machinery as a library, for the demo, the
failover benchmark and the real-process tests.  It is blocking code
(subprocesses, short polls), never for a reactor thread.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from evserver.store import Store, StoreError, generate_secret, validate_secret
from evserver.tools.common import (
    EXIT_ERROR,
    EXIT_OK,
    ArgumentParser,
    positive_float,
    positive_int,
    print_error,
)
from evserver.tools.procs import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    Ports,
    ProcessError,
    ServerProcess,
    child_env,
    start_all,
)

PROG = "ev-cluster"
HOST = "127.0.0.1"
DOMAIN = "demo"
ACCOUNT = "demo"
PASSWORD = "demo"
SECRETS_FILE = "secrets.json"
CA_BUNDLE = "ca-bundle.pem"
PORTS_FILE = "ports.json"
#: Seconds for a cluster to become whole (every member sees every other alive).
WHOLE_TIMEOUT = 30.0
MAX_SERVERS = 16
#: Ports of server ``i`` with ``--base-port P``: P + PORT_STRIDE * i + offset.
PORT_STRIDE = 10
PORT_OFFSETS = {"encoder": 0, "viewer": 1, "relay": 2, "admin": 3, "peer": 4}
POLL = 0.05
ALL_LISTENERS = ("encoder", "viewer", "relay", "admin", "peer")

_MEMBER_LINE = re.compile(r"\bmember (?P<sid>[A-Za-z0-9._-]+): (?P<old>\w+) -> (?P<new>\w+)")


class ClusterError(Exception):
    """The local cluster could not be set up, started or made whole."""


# --------------------------------------------------------------------------
# Shared data


def encoder_ids(count: int, prefix: str = "cam") -> list[str]:
    return [f"{prefix}{n}" for n in range(1, count + 1)]


def _load_secrets(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            return {str(k): str(v) for k, v in loaded.items()}
    return {}


def write_secrets(path: Path, secrets: Mapping[str, str]) -> None:
    """A secrets file as ``ev-encoder --secrets-file`` reads it (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(dict(secrets), f, indent=2)


def provision_data(data_dirs: Sequence[Path], encoders: Sequence[str], *,
                   domain: str = DOMAIN, account: str = ACCOUNT, password: str = PASSWORD,
                   secrets_path: Path | None = None,
                   names: Callable[[str], str] | None = None) -> dict[str, str]:
    """The cluster's shared data: a domain, an administrator account and encoders.

    Returns the encoders' secrets (kept in ``secrets_path`` when given, and
    reused from it on a later run over the same data directories).  The
    same records, with the same secrets, are written into EVERY data
    directory, because replication between servers is not there yet; once
    it is, writing them into ``data_dirs[0]`` only is enough and this is
    the one place to change.  Safe to run again: what is there is kept
    (an encoder whose secret is not known is registered again).
    """
    known = _load_secrets(secrets_path)
    secrets: dict[str, str] = {}
    for encoder_id in encoders:
        secret = known.get(encoder_id)
        try:
            secrets[encoder_id] = validate_secret(secret)
        except StoreError:
            secrets[encoder_id] = generate_secret()
    for data_dir in data_dirs:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with Store.in_data_dir(data_dir) as store:
            if store.get_domain(domain) is None:
                store.add_domain(domain)
            record = store.get_account(account)
            if record is None:
                # An administrator, so the same login opens the admin site.
                store.add_account(domain, account, password, role="admin")
            elif record.domain != domain:
                raise StoreError(f"account {account!r} exists in domain {record.domain!r}, "
                                 f"not {domain!r}: use another data directory")
            else:
                store.set_password(account, password)
                store.set_role(account, "admin")
            for encoder_id, secret in secrets.items():
                existing = store.get_encoder(encoder_id)
                if existing is not None and (existing.domain != domain or
                                             store.verify_encoder(encoder_id, secret) is None):
                    store.delete_encoder(encoder_id)
                    existing = None
                if existing is None:
                    name = names(encoder_id) if names is not None else encoder_id
                    store.add_encoder(domain, encoder_id, name, secret)
    if secrets_path is not None:
        write_secrets(secrets_path, secrets)
    return secrets


# --------------------------------------------------------------------------
# Membership as the servers log it


class LogWatcher:
    """Follows a server's log: the latest membership state it logged for each peer.

    The server logs ``member <id>: <old> -> <new>`` on every change; a new
    start of the process (``ServerProcess`` writes a ``--- name: argv``
    line) forgets what the previous run said.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.states: dict[str, str] = {}
        #: (monotonic time read, server id, new state), in order.
        self.changes: list[tuple[float, str, str]] = []

    def poll(self) -> dict[str, str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return self.states
        self.offset += len(chunk)
        data = self.partial + chunk
        *lines, self.partial = data.split(b"\n")
        now = time.monotonic()
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if line.startswith("--- "):
                self.states = {}
                continue
            match = _MEMBER_LINE.search(line)
            if match is not None:
                self.states[match["sid"]] = match["new"]
                self.changes.append((now, match["sid"], match["new"]))
        return self.states


def loopback_hosts(size: int) -> list[str]:
    """127.0.0.1, 127.0.0.2, ...: one loopback address per server.

    Each server's self-signed certificate then names its own address (its
    subject differs from the others'), so clients can trust every server
    with one bundle of their certificates: OpenSSL looks a trust anchor up
    by subject name, and of several self-signed certificates with one
    subject only the first would verify.
    """
    return [f"127.0.0.{i + 1}" for i in range(size)]


def _port_free(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As the server listens: a port in TIME_WAIT from an earlier run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def base_ports(base: int, index: int, host: str = HOST) -> Ports:
    """Server ``index``'s ports from ``--base-port``; ClusterError if one is taken."""
    first = base + PORT_STRIDE * index
    ports = {name: first + offset for name, offset in PORT_OFFSETS.items()}
    if max(ports.values()) > 65535:
        raise ClusterError(f"--base-port {base}: server {index + 1}'s ports go past 65535")
    taken = [p for p in ports.values() if not _port_free(p, host)]
    if taken:
        raise ClusterError(f"port(s) {', '.join(map(str, taken))} of server {index + 1} "
                           f"are in use (--base-port {base})")
    return Ports(**ports)


def _ctl(args: Sequence[str]) -> str:
    """Run ``evserver-ctl ARGS`` in this process; ClusterError with its message if it fails."""
    from evserver import ctl

    out, err = io.StringIO(), io.StringIO()
    status = ctl.main(list(args), stdout=out, stderr=err, stdin=io.StringIO())
    if status != 0:
        raise ClusterError(f"evserver-ctl {' '.join(args)}: {err.getvalue().strip()}")
    return out.getvalue()


class LocalCluster:
    """``size`` real servers on one machine, forming one cluster.

    ``root`` holds ``s1``, ``s2``... (one data directory each), the CA
    bundle and the secrets file.  ``hosts`` (default 127.0.0.1, 127.0.0.2...,
    see :func:`loopback_hosts`) and ``command_prefixes`` (``ip netns exec NS``) place servers in
    network namespaces; ``ports`` fixes each server's ports (default: free
    ones, or ``base_port``).  Nothing runs until :meth:`start`.
    """

    def __init__(self, size: int, root: Path, *, tls: bool = True,
                 base_port: int | None = None, hosts: Sequence[str] | None = None,
                 command_prefixes: Sequence[Sequence[str]] | None = None,
                 ports: Sequence[Ports] | None = None, extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None) -> None:
        if not 1 <= size <= MAX_SERVERS:
            raise ClusterError(f"a local cluster has 1 to {MAX_SERVERS} servers, not {size}")
        self.size = size
        self.root = Path(root).absolute()
        self.tls = tls
        self.hosts = list(hosts) if hosts is not None else loopback_hosts(size)
        prefixes = list(command_prefixes) if command_prefixes is not None else [()] * size
        if len(self.hosts) != size or len(prefixes) != size:
            raise ClusterError("hosts and command_prefixes need one entry per server")
        self.env = dict(env) if env is not None else child_env()
        self.servers: list[ServerProcess] = []
        if ports is None and base_port is None:
            ports = self.saved_ports(self.root, size)
        for i in range(size):
            if ports is not None:
                server_ports = ports[i]
            elif base_port is not None:
                server_ports = base_ports(base_port, i, self.hosts[i])
            else:
                server_ports = Ports.free(self.hosts[i])
            self.servers.append(ServerProcess(
                self.root / f"s{i + 1}", ports=server_ports, host=self.hosts[i], tls=tls,
                extra_args=extra_args, env=self.env, name=f"s{i + 1}",
                wait_for=ALL_LISTENERS, command_prefix=prefixes[i]))
        self.watchers = [LogWatcher(s.log_path) for s in self.servers]
        self._ids: list[str] = []
        self._formed = False

    # -- set-up ------------------------------------------------------------

    @staticmethod
    def saved_ports(root: Path, size: int) -> list[Ports] | None:
        """The ports a cluster under ``root`` used before (members know each other by
        them), if it had ``size`` servers."""
        try:
            saved = json.loads((Path(root) / PORTS_FILE).read_text(encoding="utf-8"))
            ports = [Ports(**entry) for entry in saved]
        except (OSError, ValueError, TypeError):
            return None
        return ports if len(ports) == size else None

    def _save_ports(self) -> None:
        path = self.root / PORTS_FILE
        tmp = path.with_name(f".{PORTS_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps([s.ports.as_dict() for s in self.servers], indent=1),
                       encoding="utf-8")
        tmp.replace(path)

    @property
    def data_dirs(self) -> list[Path]:
        return [s.data_dir for s in self.servers]

    @property
    def secrets_path(self) -> Path:
        return self.root / SECRETS_FILE

    def form(self) -> None:
        """Make the first server a cluster of one and admit the others from it.

        Data directories that already belong to a cluster are left as they are
        (a kept ``--data`` folder; its servers' ports are kept in ``ports.json``
        and used again unless other ports are given).
        """
        from evserver.cluster.ca import ClusterError as CaError
        from evserver.cluster.ca import load_identity

        self.root.mkdir(parents=True, exist_ok=True)
        first = self.servers[0]
        for server in self.servers:
            server.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            identities = [load_identity(s.data_dir) for s in self.servers]
        except CaError as e:
            raise ClusterError(str(e)) from None
        if identities[0] is None:
            _ctl(["--data", str(first.data_dir), "msr", "enable",
                  "--host", first.external_host, "--host", "localhost"])
        for server, identity in zip(self.servers[1:], identities[1:], strict=True):
            if identity is None:
                _ctl(["--data", str(server.data_dir), "msr", "provision",
                      "--from", str(first.data_dir),
                      "--peer", f"{first.external_host}:{first.ports.peer}",
                      "--host", server.external_host, "--host", "localhost"])
        self._save_ports()
        self._ids = [_read_server_id(s.data_dir) for s in self.servers]
        cluster_ids = {load_identity(s.data_dir).cluster_id  # type: ignore[union-attr]
                       for s in self.servers}
        if len(cluster_ids) != 1:
            raise ClusterError(f"the data directories under {self.root} belong to different "
                               f"clusters: use a new --data folder")
        self._formed = True

    def provision(self, encoders: Sequence[str], **kwargs: Any) -> dict[str, str]:
        """The demo domain, account and ``encoders`` (see :func:`provision_data`)."""
        return provision_data(self.data_dirs, encoders, secrets_path=self.secrets_path,
                              **kwargs)

    @property
    def server_ids(self) -> list[str]:
        if not self._ids:
            self._ids = [_read_server_id(s.data_dir) for s in self.servers]
        return self._ids

    @property
    def cluster_id(self) -> str:
        from evserver.cluster.ca import load_identity

        identity = load_identity(self.servers[0].data_dir)
        return identity.cluster_id if identity is not None else ""

    def index_of(self, server_id: str) -> int:
        return self.server_ids.index(server_id)

    # -- running -----------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start every server at once and wait until all listen (not yet whole)."""
        if not self._formed:
            self.form()
        for watcher in self.watchers:
            watcher.poll()
        start_all(self.servers, timeout)

    def member_states(self, index: int) -> dict[str, str]:
        """What server ``index`` last logged about each other member."""
        return dict(self.watchers[index].poll())

    def missing(self, among: Sequence[int] | None = None) -> list[str]:
        """Why the servers ``among`` (default: all) are not whole yet; [] when they are."""
        indexes = list(among) if among is not None else list(range(self.size))
        problems = []
        for i in indexes:
            server = self.servers[i]
            if not server.running:
                problems.append(f"{server.name} is not running (status {server.returncode})")
                continue
            states = self.member_states(i)
            for j in indexes:
                if j != i and states.get(self.server_ids[j]) != "alive":
                    problems.append(f"{server.name} sees {self.servers[j].name} as "
                                    f"{states.get(self.server_ids[j], 'unknown')}")
        return problems

    def wait_whole(self, timeout: float = WHOLE_TIMEOUT,
                   among: Sequence[int] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> float:
        """Wait until every server sees every other alive; return the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            problems = self.missing(among)
            if not problems:
                return time.monotonic() - start
            if should_stop is not None and should_stop():
                raise ClusterError("interrupted while waiting for the cluster")
            dead = [s for s in self.servers if s.process is not None and not s.running]
            if dead and any(self.servers.index(s) in (among or range(self.size)) for s in dead):
                s = dead[0]
                raise ClusterError(f"{s.name} exited with status {s.returncode}; log "
                                   f"{s.log_path}:\n{s.log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"the cluster is not whole after {timeout:.0f} s: "
                                   f"{'; '.join(problems)}")
            time.sleep(POLL)

    def wait_member_state(self, observer: int, target: int, states: Sequence[str],
                          timeout: float) -> float:
        """Wait until server ``observer`` logs server ``target`` in one of ``states``."""
        start = time.monotonic()
        sid = self.server_ids[target]
        while self.member_states(observer).get(sid) not in states:
            if time.monotonic() - start > timeout:
                raise ClusterError(
                    f"{self.servers[observer].name} still sees {self.servers[target].name} as "
                    f"{self.member_states(observer).get(sid)} after {timeout:.1f} s")
            time.sleep(POLL)
        return time.monotonic() - start

    def kill(self, index: int) -> None:
        self.servers[index].kill()

    def freeze(self, index: int) -> None:
        self.servers[index].freeze()

    def restart(self, index: int, timeout: float = START_TIMEOUT) -> None:
        """Stop server ``index`` (thawing it first) and start it again, same ports and data."""
        self.servers[index].restart(timeout)

    def stop(self) -> dict[str, int | None]:
        """Stop every server (SIGTERM, at once; SIGKILL what does not stop); their statuses."""
        for server in self.servers:
            with contextlib.suppress(OSError):
                server.signal(signal.SIGCONT)
                server.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        statuses: dict[str, int | None] = {}
        for server in self.servers:
            process = server.process
            if process is None:
                statuses[server.name] = None
                continue
            try:
                # Not server.stop(): a second SIGTERM makes twistd log a traceback.
                statuses[server.name] = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                statuses[server.name] = server.kill()
        return statuses

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- for clients -------------------------------------------------------

    def ca_bundle(self) -> Path | None:
        """Every server's certificate in one PEM file (what clients pass as ``--ca``)."""
        if not self.tls:
            return None
        path = self.root / CA_BUNDLE
        pem = b"".join(s.ca_path.read_bytes() for s in self.servers if s.ca_path.exists())
        tmp = path.with_name(f".{CA_BUNDLE}.{os.getpid()}")
        tmp.write_bytes(pem)
        tmp.replace(path)
        return path

    def client_tls_args(self) -> list[str]:
        bundle = self.ca_bundle()
        return ["--ca", str(bundle)] if bundle is not None else ["--plain"]

    def addresses(self, which: str, first: int = 0) -> list[str]:
        """Every server's ``which`` address, starting with server ``first``."""
        order = [(first + k) % self.size for k in range(self.size)]
        return [self.servers[i].address(which) for i in order]

    def describe(self) -> dict[str, Any]:
        """What runs where, as ``ev-cluster up --json`` prints it."""
        bundle = self.root / CA_BUNDLE
        return {
            "cluster_id": self.cluster_id,
            "tls": self.tls,
            "data": str(self.root),
            "ca": str(bundle) if self.tls else None,
            "servers": [{
                "name": s.name,
                "server_id": sid,
                "pid": s.pid,
                "data": str(s.data_dir),
                "log": str(s.log_path),
                "encoder": s.address("encoder"),
                "viewer": s.address("viewer"),
                "relay": s.address("relay"),
                "admin": f"https://{s.address('admin')}/",
                "peer": s.address("peer"),
            } for s, sid in zip(self.servers, self.server_ids, strict=True)],
        }


def _read_server_id(data_dir: Path) -> str:
    from evserver.config import load_or_create_server_id

    return load_or_create_server_id(data_dir)


# --------------------------------------------------------------------------
# ev-cluster up


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Run a local evserver cluster on loopback.")
    commands = parser.add_subparsers(dest="command", metavar="{up}")
    commands.required = True
    up = commands.add_parser(
        "up", help="start N servers as one cluster and keep them up until Ctrl-C",
        description="Start N twistd evserver processes on loopback as one cluster, print "
                    "their addresses, and stop them at Ctrl-C, SIGTERM or after --duration.")
    up.add_argument("--servers", type=positive_int, default=3, metavar="N",
                    help=f"how many servers (default 3, at most {MAX_SERVERS})")
    up.add_argument("--data", metavar="DIR",
                    help="folder for the servers' data directories, kept (default: a temporary "
                         "one, removed at the end)")
    up.add_argument("--plain", action="store_true",
                    help="plain TCP for clients instead of TLS (peers always use mutual TLS)")
    up.add_argument("--base-port", type=positive_int, metavar="P",
                    help=f"server i (from 0) listens on P+{PORT_STRIDE}*i+0..4 for encoder, "
                         "viewer, relay, admin and peer (default: free ports)")
    up.add_argument("--encoders", type=int, default=3, metavar="N",
                    help="demo encoders cam1..camN to register (default 3)")
    up.add_argument("--duration", type=positive_float, metavar="SECONDS",
                    help="stop after this many seconds (default: at Ctrl-C or SIGTERM)")
    up.add_argument("--json", action="store_true",
                    help="print the servers' table as one JSON object once the cluster is whole")
    up.add_argument("--timeout", type=positive_float, default=WHOLE_TIMEOUT, metavar="SECONDS",
                    help=f"give up if the cluster is not whole after this long "
                         f"(default {WHOLE_TIMEOUT:g})")
    return parser


def format_table(info: Mapping[str, Any]) -> list[str]:
    header = ("NAME", "SERVER ID", "PID", "ENCODER", "VIEWER", "RELAY", "ADMIN", "PEER")
    rows = [header] + [
        (s["name"], s["server_id"], str(s["pid"]), s["encoder"], s["viewer"], s["relay"],
         s["admin"], s["peer"]) for s in info["servers"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


class ClusterUp:
    """One ``ev-cluster up`` run; :meth:`run` returns the exit status."""

    def __init__(self, args: Any, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.stop_requested: str | None = None
        self.temporary = args.data is None
        self.root = Path(args.data if args.data else
                         tempfile.mkdtemp(prefix="ev-cluster-")).absolute()
        self.cluster: LocalCluster | None = None

    def say(self, text: str) -> None:
        self.err.write(f"{PROG}: {text}\n")
        self.err.flush()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = signal.Signals(signum).name

    def run(self) -> int:
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        except (ClusterError, ProcessError, StoreError, OSError) as e:
            lines = str(e).splitlines() or [type(e).__name__]
            print_error(PROG, lines[0], self.err)
            if len(lines) > 1:
                self.err.write("\n".join(lines[1:]) + "\n")
            return EXIT_ERROR
        finally:
            if self.cluster is not None:
                self.cluster.stop()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if self.temporary:
                shutil.rmtree(self.root, ignore_errors=True)

    def _run(self) -> int:
        a = self.args
        if a.servers > MAX_SERVERS:
            raise ClusterError(f"--servers: at most {MAX_SERVERS}")
        started = time.monotonic()
        self.cluster = cluster = LocalCluster(a.servers, self.root, tls=not a.plain,
                                              base_port=a.base_port)
        cluster.form()
        cluster.provision(encoder_ids(max(0, a.encoders)))
        cluster.start()
        if self.stop_requested:
            return EXIT_OK
        cluster.wait_whole(a.timeout, should_stop=lambda: self.stop_requested is not None)
        cluster.ca_bundle()
        info = cluster.describe()
        info["domain"] = DOMAIN
        info["account"] = ACCOUNT
        info["password"] = PASSWORD
        info["secrets"] = str(cluster.secrets_path)
        if a.json:
            self.out.write(json.dumps(info) + "\n")
            self.out.flush()
        else:
            self._print(info, time.monotonic() - started)
        deadline = None if a.duration is None else time.monotonic() + a.duration
        while self.stop_requested is None:
            if deadline is not None and time.monotonic() >= deadline:
                break
            for server in cluster.servers:
                if not server.running:
                    raise ClusterError(f"{server.name} exited unexpectedly with status "
                                       f"{server.returncode}; log {server.log_path}:\n"
                                       f"{server.log_tail()}")
            time.sleep(0.2)
        self.say(f"stopping ({self.stop_requested or 'duration reached'})")
        statuses = cluster.stop()
        bad = {name: code for name, code in statuses.items() if code not in (0, -15)}
        if bad:
            raise ClusterError(f"server(s) ended badly: {bad}")
        return EXIT_OK

    def _print(self, info: Mapping[str, Any], took: float) -> None:
        lines = [f"{len(info['servers'])} servers up as cluster {info['cluster_id']} "
                 f"({'TLS' if info['tls'] else 'plain TCP'}) in {took:.1f} s; data in "
                 f"{info['data']}" + (" (removed at the end)" if self.temporary else ""), ""]
        lines += format_table(info)
        lines += ["", f"domain {DOMAIN}: account {ACCOUNT}, password {PASSWORD} (an "
                      f"administrator); encoder secrets in {info['secrets']}"]
        tls = f"--ca {info['ca']}" if info["ca"] else "--plain"
        if info["ca"]:
            lines.append(f"clients trust every server with --ca {info['ca']}")
        viewers = " ".join(f"--server {s['viewer']}" for s in info["servers"])
        encoders = " ".join(f"--server {s['encoder']}" for s in info["servers"])
        lines += [
            "try:",
            f"  ev-encoder {encoders} {tls} --secrets-file {info['secrets']} "
            f"--id-prefix cam --source testsrc",
            f"  ev-viewer {viewers} {tls} --account {ACCOUNT} --password {PASSWORD} "
            f"--watch-all --duration 60 --stats-interval 5",
        ]
        lines += [f"each server's log: {info['servers'][0]['log']} and alike",
                  "Stop with Ctrl-C." if self.args.duration is None
                  else f"Stops after {self.args.duration:g} s."]
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return ClusterUp(args).run()


if __name__ == "__main__":
    sys.exit(main())
