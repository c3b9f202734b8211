"""``make demo``: a three-server cluster, encoders streaming a test pattern, and a viewer.

Run ``python -m evserver.tools.demo [--duration S] [--data DIR]``.  It

1. makes a data folder (a temporary one unless ``--data``) with one data
   directory per server, turns them into one cluster (``evserver-ctl msr
   enable`` on the first, ``msr provision`` of the others, see
   :mod:`evserver.tools.cluster`) and provisions the domain ``demo``, the
   account ``demo`` (password ``demo``, an administrator) and the encoders
   ``cam1``..``camN``;
2. starts three ``twistd -n evserver`` (TLS, on 127.0.0.1, 127.0.0.2 and
   127.0.0.3, each on the usual ports 5510/5520/5530/9443/47100 when they
   are free) and waits until each sees the others alive;
3. starts one ``ev-encoder`` process per server running that server's share
   of the encoders (``--source testsrc``), each with ``--server`` listing
   every server starting with its own, so the encoders are spread over the
   cluster and move to another server if theirs goes away;
4. starts one ``ev-viewer`` given every server, watching every encoder on
   the server that hosts it (it follows the encoders across servers),
   decoding every frame and printing its progress every few seconds;
5. prints what runs where, and stops everything cleanly on Ctrl-C or
   SIGTERM, or after ``--duration``.

The exit status is 0 if the viewer received and decoded frames from every
encoder without a decode error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from evserver.store import StoreError
from evserver.tools.cluster import (
    ACCOUNT,
    DOMAIN,
    PASSWORD,
    ClusterError,
    LocalCluster,
    encoder_ids,
    loopback_hosts,
)
from evserver.tools.common import (
    EXIT_ERROR,
    EXIT_OK,
    ArgumentParser,
    bitrate,
    frame_size,
    positive_float,
    positive_int,
    print_error,
)
from evserver.tools.procs import (
    Ports,
    ProcessError,
    child_env,
    spawn_tool,
    stop_process,
    venv_script,
)

PROG = "evserver-demo"
SERVERS = 3
#: Every server's ports, each server on its own loopback address.
DEFAULT_PORTS = Ports(encoder=5510, viewer=5520, relay=5530, admin=9443, peer=47100)
#: Seconds the encoders may take to connect before the demo gives up.
CONNECT_TIMEOUT = 20.0
#: A bound for the viewer of an unbounded demo (the demo stops it long before).
FOREVER = 366 * 24 * 3600.0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Run a three-server evserver cluster on loopback with encoders streaming "
                    "a test pattern and a viewer watching them.",
    )
    parser.add_argument("--data", metavar="DIR",
                        help="folder for the servers' data directories, kept (default: a "
                             "temporary one, removed at the end)")
    parser.add_argument("--duration", type=positive_float, metavar="SECONDS",
                        help="stop after this many seconds of viewing (default: at Ctrl-C)")
    parser.add_argument("--encoders", type=positive_int, default=3, metavar="N",
                        help="how many encoders, spread over the servers (default 3)")
    parser.add_argument("--size", type=frame_size, default=(640, 360), metavar="WxH",
                        help="test pattern size (default 640x360)")
    parser.add_argument("--fps", type=positive_float, default=25.0)
    parser.add_argument("--bitrate", type=bitrate, default=1_000_000, metavar="BPS",
                        help="per encoder (default 1M)")
    parser.add_argument("--stats-interval", type=positive_float, default=5.0,
                        metavar="SECONDS", help="viewer progress every SECONDS (default 5)")
    parser.add_argument("--plain", action="store_true", help="plain TCP instead of TLS")
    return parser


# --------------------------------------------------------------------------
# Set-up


def _free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        # As the server listens: a port in TIME_WAIT from an earlier run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def choose_ports(hosts: Sequence[str]) -> list[Ports]:
    """The usual ports for every server (each on its own address) if they are free, else
    free ones."""
    if all(_free(p, host) for host in hosts for p in DEFAULT_PORTS.as_dict().values()):
        return [DEFAULT_PORTS] * len(hosts)
    return [Ports.free(host) for host in hosts]


def share(encoders: Sequence[str], servers: int, index: int) -> list[str]:
    """The encoders that server ``index`` hosts first: every ``servers``-th one."""
    return list(encoders[index::servers])


def tool_name(name: str, module: str) -> str:
    """How a user runs a tool: the console script beside this Python, or ``python -m``."""
    script = venv_script(name)
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m evserver.tools.{module}"


# --------------------------------------------------------------------------
# Child output


class _Lines:
    """Reads a child's output pipe without blocking and prints it line by line, prefixed."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], out: IO[str]) -> None:
        self.name = name
        self.process = process
        self.out = out
        self.buffer = b""
        self.lines: list[str] = []
        self.open = True
        assert process.stdout is not None
        self.fd = process.stdout.fileno()
        os.set_blocking(self.fd, False)

    def read(self) -> None:
        while self.open:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.open = False
                if self.buffer:
                    self._line(self.buffer)
                    self.buffer = b""
                return
            self.buffer += chunk
            *complete, self.buffer = self.buffer.split(b"\n")
            for raw in complete:
                self._line(raw)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.lines.append(line)
        if line.startswith("{"):
            return  # the final JSON report: summarised by the demo
        self.out.write(f"[{self.name}] {line}\n")
        self.out.flush()

    def drain(self, timeout: float = 2.0) -> None:
        """Read what is left once the process has exited."""
        deadline = time.monotonic() + timeout
        while self.open and time.monotonic() < deadline:
            self.read()
            if self.open:
                time.sleep(0.02)

    def json_report(self) -> dict[str, Any] | None:
        for line in reversed(self.lines):
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    report = json.loads(line)
                    if isinstance(report, dict):
                        return report
        return None


# --------------------------------------------------------------------------
# The demo


class Demo:
    """One demo run; :meth:`run` returns the exit status."""

    def __init__(self, args: argparse.Namespace, out: IO[str] = sys.stdout,
                 err: IO[str] = sys.stderr) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.stop_requested: str | None = None
        self.temporary = args.data is None
        self.root = Path(args.data if args.data else
                         tempfile.mkdtemp(prefix="evserver-demo-")).absolute()
        self.cluster: LocalCluster | None = None
        self.encoders: list[subprocess.Popen[bytes]] = []
        self.viewer: subprocess.Popen[bytes] | None = None
        self.readers: list[_Lines] = []
        self.env = child_env()

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = signal.Signals(signum).name

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        except (ClusterError, ProcessError, StoreError, OSError) as e:
            lines = str(e).splitlines() or [type(e).__name__]
            print_error(PROG, lines[0], self.err)
            if len(lines) > 1:
                self.err.write("\n".join(lines[1:]) + "\n")
            return EXIT_ERROR
        finally:
            self.shutdown()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.temporary:
                shutil.rmtree(self.root, ignore_errors=True)

    def _run(self) -> int:
        args = self.args
        self.root.mkdir(parents=True, exist_ok=True)
        hosts = loopback_hosts(SERVERS)
        ports = LocalCluster.saved_ports(self.root, SERVERS) or choose_ports(hosts)
        cluster = self.cluster = LocalCluster(SERVERS, self.root, tls=not args.plain,
                                              hosts=hosts, ports=ports, env=self.env)
        cluster.form()
        ids = encoder_ids(args.encoders)
        cluster.provision(ids, names=lambda e: f"Demo camera {e.removeprefix('cam')}")
        cluster.start()
        if self.stop_requested:
            return EXIT_OK
        cluster.wait_whole(should_stop=lambda: self.stop_requested is not None)
        tls = cluster.client_tls_args()
        width, height = args.size
        for index in range(SERVERS):
            mine = share(ids, SERVERS, index)
            if not mine:
                continue
            servers = [a for address in cluster.addresses("encoder", index)
                       for a in ("--server", address)]
            process = spawn_tool("encoder", [
                *servers, *tls, "--secrets-file", str(cluster.secrets_path),
                *(a for e in mine for a in ("--id", e)), "--source", "testsrc",
                "--size", f"{width}x{height}", "--fps", str(args.fps),
                "--bitrate", str(args.bitrate),
            ], env=self.env)
            self.encoders.append(process)
            self.readers.append(_Lines(f"encoder{index + 1}", process, self.out))
        for lines in list(self.readers):
            if not self._wait_for(lines, "encoder(s) connected", CONNECT_TIMEOUT):
                return EXIT_OK if self.stop_requested else EXIT_ERROR
        viewer_duration = FOREVER if args.duration is None else args.duration + 60
        self.viewer = spawn_tool("viewer", [
            *(a for address in cluster.addresses("viewer") for a in ("--server", address)),
            *tls, "--account", ACCOUNT, "--password", PASSWORD, "--watch-all", "--decode",
            "--duration", str(viewer_duration), "--stats-interval", str(args.stats_interval),
            "--json",
        ], env=self.env)
        viewer_lines = _Lines("viewer", self.viewer, self.out)
        self.readers.append(viewer_lines)
        self._banner(ids)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        failure = self._supervise(deadline)
        if failure is not None:
            print_error(PROG, failure, self.err)
            return EXIT_ERROR
        self.say(f"{PROG}: stopping ({self.stop_requested or 'duration reached'})")
        return self._finish(viewer_lines, ids)

    def _wait_for(self, lines: _Lines, marker: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.stop_requested:
            lines.read()
            if any(marker in line for line in lines.lines):
                return True
            if lines.process.poll() is not None:
                lines.drain()
                print_error(PROG, f"the {lines.name} exited with status "
                                  f"{lines.process.returncode}", self.err)
                return False
            if time.monotonic() > deadline:
                print_error(PROG, f"the {lines.name} did not get ready in {timeout:.0f} s",
                            self.err)
                return False
            time.sleep(0.05)
        return False

    def _supervise(self, deadline: float | None) -> str | None:
        """Forward output until the deadline or a signal; a message if something died."""
        selector = selectors.DefaultSelector()
        gone: set[str] = set()
        for reader in self.readers:
            selector.register(reader.fd, selectors.EVENT_READ, reader)
        try:
            while not self.stop_requested:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                for key, _ in selector.select(timeout=0.2):
                    key.data.read()
                    if not key.data.open:
                        selector.unregister(key.fd)
                for reader in self.readers:
                    if reader.process.poll() is not None:
                        reader.drain()
                        return (f"the {reader.name} exited unexpectedly with status "
                                f"{reader.process.returncode}")
                assert self.cluster is not None
                for server in self.cluster.servers:
                    if not server.running and server.name not in gone:
                        gone.add(server.name)
                        self.say(f"{PROG}: server {server.name} exited with status "
                                 f"{server.returncode}; the others carry on")
                if len(gone) == len(self.cluster.servers):
                    return "every server has exited"
            return None
        finally:
            selector.close()

    def _finish(self, viewer_lines: _Lines, ids: list[str]) -> int:
        assert self.viewer is not None
        status = stop_process(self.viewer)
        viewer_lines.drain()
        report = viewer_lines.json_report()
        if status != 0 or report is None:
            print_error(PROG, f"the viewer ended with status {status} and no report", self.err)
            return EXIT_ERROR
        per = report.get("encoders", {})
        self.say(f"{PROG}: the viewer received {report['frames']} frames "
                 f"({report['bytes']} bytes) in {report['duration_s']:.1f} s, decoded "
                 f"{report['decoded_frames']} with {report['decode_errors']} decode errors; "
                 f"latency p50 {report['latency_p50_ms']} ms, p99 {report['latency_p99_ms']} ms")
        used = report.get("servers_used")
        if used is not None:
            names = self._server_names()
            self.say(f"{PROG}:   video came from {len(used)} server(s): "
                     f"{', '.join(sorted(names.get(s, s) for s in used))}")
        for encoder_id in ids:
            p = per.get(encoder_id, {})
            self.say(f"{PROG}:   {encoder_id}: {p.get('frames', 0)} frames, "
                     f"{p.get('decoded_frames', 0)} decoded, {p.get('gaps', 0)} gaps")
        silent = [e for e in ids if not per.get(e, {}).get("decoded_frames")]
        if silent:
            print_error(PROG, f"no decoded video from {', '.join(silent)}", self.err)
            return EXIT_ERROR
        if report["decode_errors"]:
            print_error(PROG, f"{report['decode_errors']} decode errors", self.err)
            return EXIT_ERROR
        return EXIT_OK

    def _server_names(self) -> dict[str, str]:
        assert self.cluster is not None
        return {sid: s.name for sid, s in zip(self.cluster.server_ids, self.cluster.servers,
                                             strict=True)}

    def _banner(self, ids: list[str]) -> None:
        assert self.cluster is not None and self.viewer is not None
        c = self.cluster
        a = self.args
        tls = " ".join(shlex.quote(x) for x in c.client_tls_args())
        viewer = tool_name("ev-viewer", "viewer")
        servers = " ".join(f"--server {address}" for address in c.addresses("viewer"))
        login = f"{servers} {tls} --account {ACCOUNT} --password {PASSWORD}"
        kept = ("removed at the end; use --data DIR to keep one" if self.temporary
                else "kept")
        width, height = a.size
        lines = [
            "",
            f"evserver demo is running: a cluster of {SERVERS} servers "
            f"({'plain TCP' if not c.tls else 'TLS'} for clients, mutual TLS between servers)",
            f"  data folder      {self.root} ({kept})",
        ]
        for index, (server, sid) in enumerate(zip(c.servers, c.server_ids, strict=True)):
            mine = share(ids, SERVERS, index)
            lines += [
                f"  server {server.name}        id {sid}, twistd pid {server.pid}, log "
                f"{server.log_path}",
                f"    encoder control {server.address('encoder')}, viewer control "
                f"{server.address('viewer')}, video relay {server.address('relay')}, peer "
                f"{server.address('peer')}",
                f"    admin site      https://{server.address('admin')}/",
                f"    encoders        {', '.join(mine) if mine else '(none)'}"
                + (f" in ev-encoder pid {self.encoders[index].pid}" if mine else ""),
            ]
        if c.tls:
            lines.append(f"  certificates     {c.root / 'ca-bundle.pem'} (every server's own, "
                         f"self-signed)")
        lines += [
            f"  domain           {DOMAIN}: account {ACCOUNT}, password {PASSWORD} "
            f"(an administrator: the same login opens every admin site)",
            f"  encoders         test pattern {width}x{height}, {a.fps:g} fps, "
            f"{a.bitrate / 1e6:g} Mbit/s, streaming while watched; secrets in "
            f"{c.secrets_path}",
            f"  viewer           ev-viewer (pid {self.viewer.pid}) given every server, "
            f"watching all encoders where they are hosted, decoding every frame",
            "",
            "Watch yourself, from another terminal:",
            f"  {viewer} {login} --list",
            f"  {viewer} {login} --watch {ids[0]} --out {ids[0]}.h264 --decode --duration 10",
            f"  then play {ids[0]}.h264 with any player of raw H.264 (ffplay, mpv, vlc).",
            f"Try a failover: kill -9 {c.servers[0].pid} (server s1): its encoders move to "
            f"another server and the viewer resumes by itself.",
            "",
            "Stop with Ctrl-C." if a.duration is None else f"Stops after {a.duration:g} s.",
            "",
        ]
        for line in lines:
            self.say(line)

    def shutdown(self) -> None:
        """Stop the viewer, the encoders, then the servers; SIGKILL what does not stop."""
        for process in (self.viewer, *self.encoders):
            if process is not None:
                stop_process(process)
        for reader in self.readers:
            reader.drain(0.5)
            if reader.process.stdout is not None:
                reader.process.stdout.close()
        if self.cluster is not None:
            self.cluster.stop()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return Demo(args).run()


if __name__ == "__main__":
    sys.exit(main())
