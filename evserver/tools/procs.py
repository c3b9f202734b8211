"""Real ``twistd -n evserver`` processes on loopback, for the demo and the real-process tests.

:class:`ServerProcess` starts a server on free loopback ports with its own
data directory, waits until it listens, and stops it (SIGTERM), kills it
(SIGKILL), freezes (SIGSTOP) and thaws (SIGCONT) it.  It can be started
again on the same ports and data directory, as a server that comes back.
Everything the process prints (twistd's log included, ``--logfile=-``) goes
to one log file.

This is blocking code (``subprocess``, short polls): it is for test fixtures
and the demo's supervisor, never for the reactor thread of a server.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import attrs

import evserver

#: Seconds a start may take: interpreter start, imports, key generation.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
_LISTEN_STATE = "0A"


class ProcessError(Exception):
    """A process did not start, or did not stop, as it should have."""


@attrs.frozen
class Ports:
    """The TCP ports of one server (all on the same host)."""

    encoder: int
    viewer: int
    relay: int
    admin: int
    peer: int = 47100

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> Ports:
        return cls(*free_ports(5, host))

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def package_root() -> Path:
    """The directory holding the ``evserver`` package this process runs."""
    return Path(evserver.__file__).resolve().parent.parent


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with PYTHONPATH leading to the same evserver.

    Child processes (twistd, the tools) then run the very code this process
    imported, whether it is a checkout or an installed copy.
    """
    env = dict(os.environ)
    paths = [str(package_root())]
    paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != paths[0]]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def venv_script(name: str) -> Path:
    """A console script of the running interpreter's environment (``twistd``, ...)."""
    return Path(sys.executable).parent / name


def tool_command(module: str, *args: str) -> list[str]:
    """The command line running ``python -m evserver.tools.<module> ARGS`` with this Python."""
    return [sys.executable, "-m", f"evserver.tools.{module}", *args]


def _die_with_parent() -> None:
    """In the child (Linux): receive SIGTERM when the parent dies, so no server is orphaned."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def listening_ports(pid: int) -> set[int] | None:
    """TCP ports in LISTEN state in ``pid``'s network namespace (None if /proc is unusable)."""
    found: set[int] = set()
    seen = False
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}", encoding="ascii") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        seen = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == _LISTEN_STATE:
                found.add(int(fields[1].rsplit(":", 1)[1], 16))
    return found if seen else None


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class ServerProcess:
    """One ``twistd -n evserver`` process on ``host`` (default loopback).

    ``ports`` default to free ones (chosen again if the start fails because
    one was taken meanwhile).  ``extra_args`` are appended to the evserver
    options (cluster options, limits...).  ``twistd`` defaults to the one
    beside ``sys.executable``; ``env`` to :func:`child_env`.
    ``wait_for`` names the listeners that must be up before :meth:`start`
    returns (default: encoder, viewer and relay).  ``command_prefix`` runs
    twistd through another command (``ip netns exec NS`` for a server in a
    network namespace); it must exec twistd in the same process.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, ports: Ports | None = None,
                 host: str = "127.0.0.1", external_host: str | None = None,
                 tls: bool = True, extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, twistd: str | os.PathLike[str] | None = None,
                 log_path: str | os.PathLike[str] | None = None,
                 wait_for: Iterable[str] = ("encoder", "viewer", "relay"),
                 name: str = "evserver", command_prefix: Sequence[str] = ()) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self.external_host = external_host or host
        self.tls = tls
        self.extra_args = list(extra_args)
        self.env = dict(env) if env is not None else child_env()
        self.twistd = Path(twistd) if twistd is not None else venv_script("twistd")
        self.log_path = (Path(log_path) if log_path is not None
                         else self.data_dir / "server.log").absolute()
        self.wait_for = tuple(wait_for)
        self.name = name
        self.command_prefix = list(command_prefix)
        self._fixed_ports = ports is not None
        self.ports = ports or Ports.free(host)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- addresses ---------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        """The server's self-signed certificate, what clients pass as ``--ca``."""
        return self.data_dir / "tls" / "server.pem"

    def address(self, which: str) -> str:
        """``HOST:PORT`` of a listener: "encoder", "viewer", "relay" or "admin"."""
        return f"{self.host}:{getattr(self.ports, which)}"

    def tls_args(self) -> list[str]:
        """The TLS options a tool needs to talk to this server."""
        return ["--ca", str(self.ca_path)] if self.tls else ["--plain"]

    def argv(self) -> list[str]:
        endpoint = f"interface={self.host}" if ":" not in self.host else (
            "interface=" + self.host.replace(":", "\\:"))
        args = [*self.command_prefix, str(self.twistd), "-n", "--pidfile=", "--logfile=-",
                "evserver", "--data", str(self.data_dir), "--external-host", self.external_host]
        for which, port in self.ports.as_dict().items():
            args += [f"--{which}-port", f"tcp:{port}:{endpoint}"]
        if not self.tls:
            args.append("--plain")
        return args + self.extra_args

    # -- state -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        """Start the server and wait until it listens; ProcessError if it does not."""
        if self.running:
            raise ProcessError(f"{self.name} is running already (pid {self.pid})")
        attempts = 1 if self._fixed_ports else 3
        for attempt in range(attempts):
            self._spawn()
            try:
                self._wait_listening(timeout)
                return self
            except ProcessError:
                taken = "cannot listen" in self.log_tail(5).lower()
                if attempt + 1 < attempts and taken and not self.running:
                    self.ports = Ports.free(self.host)
                    continue
                self.kill()
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        if not self.twistd.exists():
            raise ProcessError(f"no twistd at {self.twistd}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {self.name}: {' '.join(self.argv())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.data_dir, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.starts += 1

    def _wait_listening(self, timeout: float) -> None:
        wanted = {getattr(self.ports, which) for which in self.wait_for}
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while True:
            code = self.process.poll()
            if code is not None:
                raise ProcessError(f"{self.name} exited with status {code} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            listening = listening_ports(self.process.pid)
            if listening is None:  # no /proc: try connecting
                if all(_accepts(self.host, port) for port in wanted):
                    return
            elif wanted <= listening:
                return
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name} does not listen on {sorted(wanted)} after "
                                   f"{timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL)

    def spawn(self) -> None:
        """Start the process without waiting; :meth:`wait_listening` waits for it."""
        if self.running:
            raise ProcessError(f"{self.name} is running already (pid {self.pid})")
        self._spawn()

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until a spawned server listens; kill it and raise ProcessError if it does not."""
        try:
            self._wait_listening(timeout)
        except ProcessError:
            self.kill()
            raise

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait (a frozen server is thawed first); SIGKILL after ``timeout``."""
        if self.process is None:
            return None
        if self.running:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def kill(self) -> int | None:
        """SIGKILL: the server dies at once, as in a crash."""
        if self.process is None:
            return None
        if self.running:
            self.process.kill()
        return self.process.wait()

    def freeze(self) -> None:
        """SIGSTOP: the server stops answering but keeps its connections (a silent death)."""
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: a frozen server carries on."""
        self.signal(signal.SIGCONT)

    def restart(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        """Stop (if running) and start again on the same ports and data directory."""
        self.stop()
        self._fixed_ports = True
        return self.start(timeout)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else f"exited {self.returncode}"
        return f"<ServerProcess {self.name} {self.host} {self.ports} {state}>"


def start_all(servers: Sequence[ServerProcess], timeout: float = START_TIMEOUT) -> None:
    """Start several servers at once (on their given ports) and wait until all listen.

    If one does not come up, every one of them is killed and ProcessError raised.
    """
    try:
        for server in servers:
            server.spawn()
        for server in servers:
            server.wait_listening(timeout)
    except BaseException:
        for server in servers:
            server.kill()
        raise


def stop_process(process: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT,
                 signum: int = signal.SIGTERM) -> int:
    """Send ``signum`` (default SIGTERM), wait up to ``timeout``, then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def spawn_tool(module: str, args: Sequence[str], *, env: Mapping[str, str] | None = None,
               stdout: IO[Any] | int | None = subprocess.PIPE,
               stderr: IO[Any] | int | None = subprocess.STDOUT,
               cwd: str | os.PathLike[str] | None = None,
               stdin: IO[Any] | int | None = subprocess.DEVNULL,
               command_prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Start ``python -m evserver.tools.<module> ARGS`` in its own session.

    ``command_prefix`` runs it through another command that execs it in the
    same process (``ip netns exec NS``).
    """
    return subprocess.Popen(
        [*command_prefix, *tool_command(module, *args)], stdin=stdin, stdout=stdout,
        stderr=stderr,
        env=dict(env) if env is not None else child_env(), cwd=cwd, start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
