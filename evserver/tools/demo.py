"""``make demo``: a server, three encoders streaming a test pattern, and a viewer, on loopback.

Run ``python -m evserver.tools.demo [--duration S] [--data DIR]``.  It

1. makes a data directory (a temporary one unless ``--data``) with the
   domain ``demo``, the account ``demo`` (password ``demo``) and encoders
   ``cam1``..``cam3``, through the Store API;
2. starts ``twistd -n evserver`` (TLS, loopback) as a subprocess;
3. starts one ``ev-encoder`` process running the encoders on ``--source
   testsrc`` and one ``ev-viewer`` watching all of them, decoding every
   frame and printing its progress every few seconds;
4. prints what runs where and how to watch a stream with ``ev-viewer``;
5. stops everything cleanly on Ctrl-C or SIGTERM, or after ``--duration``.

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

from evserver.store import Store, StoreError
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
    ServerProcess,
    child_env,
    spawn_tool,
    stop_process,
    venv_script,
)

PROG = "evserver-demo"
DOMAIN = "demo"
ACCOUNT = "demo"
PASSWORD = "demo"
SECRETS_FILE = "demo-secrets.json"
DEFAULT_PORTS = Ports(encoder=5510, viewer=5520, relay=5530, admin=9443)
#: Seconds the encoders may take to connect before the demo gives up.
CONNECT_TIMEOUT = 20.0
#: A bound for the viewer of an unbounded demo (the demo stops it long before).
FOREVER = 366 * 24 * 3600.0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Run an evserver on loopback with encoders streaming a test pattern and "
                    "a viewer watching them.",
    )
    parser.add_argument("--data", metavar="DIR",
                        help="data directory to use and keep (default: a temporary one, "
                             "removed at the end)")
    parser.add_argument("--duration", type=positive_float, metavar="SECONDS",
                        help="stop after this many seconds of viewing (default: at Ctrl-C)")
    parser.add_argument("--encoders", type=positive_int, default=3, metavar="N",
                        help="how many encoders (default 3)")
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


def provision(data_dir: Path, count: int) -> dict[str, str]:
    """Domain, account and encoders in the data directory's store; returns the secrets.

    Re-running on a kept data directory reuses what is there: the secrets
    are kept in ``DATA/demo-secrets.json`` (mode 0600) and an encoder whose
    secret is lost is registered again.
    """
    secrets_path = data_dir / SECRETS_FILE
    known: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(secrets_path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            known = {str(k): str(v) for k, v in loaded.items()}
    secrets: dict[str, str] = {}
    with Store.in_data_dir(data_dir) as store:
        if store.get_domain(DOMAIN) is None:
            store.add_domain(DOMAIN)
        account = store.get_account(ACCOUNT)
        if account is None:
            # An administrator too, so the same login opens the admin site.
            store.add_account(DOMAIN, ACCOUNT, PASSWORD, role="admin")
        elif account.domain != DOMAIN:
            raise StoreError(f"account {ACCOUNT!r} exists in domain {account.domain!r}, "
                             f"not {DOMAIN!r}: use another --data directory")
        else:
            store.set_password(ACCOUNT, PASSWORD)
            store.set_role(ACCOUNT, "admin")
        for n in range(1, count + 1):
            encoder_id = f"cam{n}"
            record = store.get_encoder(encoder_id)
            secret = known.get(encoder_id)
            if record is not None and (record.domain != DOMAIN or secret is None
                                       or store.verify_encoder(encoder_id, secret) is None):
                store.delete_encoder(encoder_id)
                record = None
            if record is None:
                _, secret = store.add_encoder(DOMAIN, encoder_id, f"Demo camera {n}")
            assert secret is not None
            secrets[encoder_id] = secret
    fd = os.open(secrets_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(secrets, f, indent=2)
    return secrets


def _free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def choose_ports() -> Ports:
    """The usual ports if they are all free, else any free ones."""
    if all(_free(p) for p in DEFAULT_PORTS.as_dict().values()):
        return DEFAULT_PORTS
    return Ports.free()


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
        self.data_dir = Path(args.data if args.data else
                             tempfile.mkdtemp(prefix="evserver-demo-")).absolute()
        self.server: ServerProcess | None = None
        self.encoder: subprocess.Popen[bytes] | None = None
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
        except (ProcessError, StoreError, OSError) as e:
            print_error(PROG, str(e).splitlines()[0], self.err)
            if self.server is not None and not isinstance(e, ProcessError):
                self.err.write(self.server.log_tail() + "\n")
            elif isinstance(e, ProcessError):
                self.err.write("\n".join(str(e).splitlines()[1:]) + "\n")
            return EXIT_ERROR
        finally:
            self.shutdown()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.temporary:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def _run(self) -> int:
        args = self.args
        self.data_dir.mkdir(parents=True, exist_ok=True)
        secrets = provision(self.data_dir, args.encoders)
        self.server = ServerProcess(self.data_dir, ports=choose_ports(), tls=not args.plain,
                                    env=self.env, name="evserver")
        self.server.start()
        if self.stop_requested:
            return EXIT_OK
        server = self.server
        width, height = args.size
        self.encoder = spawn_tool("encoder", [
            "--server", server.address("encoder"), *server.tls_args(),
            "--secrets-file", str(self.data_dir / SECRETS_FILE), "--id-prefix", "cam",
            "--count", str(len(secrets)), "--source", "testsrc", "--size", f"{width}x{height}",
            "--fps", str(args.fps), "--bitrate", str(args.bitrate),
        ], env=self.env)
        encoder_lines = _Lines("encoder", self.encoder, self.out)
        self.readers.append(encoder_lines)
        if not self._wait_for(encoder_lines, "encoder(s) connected", CONNECT_TIMEOUT):
            return EXIT_OK if self.stop_requested else EXIT_ERROR
        viewer_duration = FOREVER if args.duration is None else args.duration + 60
        self.viewer = spawn_tool("viewer", [
            "--server", server.address("viewer"), *server.tls_args(),
            "--account", ACCOUNT, "--password", PASSWORD, "--watch-all", "--decode",
            "--duration", str(viewer_duration), "--stats-interval", str(args.stats_interval),
            "--json",
        ], env=self.env)
        viewer_lines = _Lines("viewer", self.viewer, self.out)
        self.readers.append(viewer_lines)
        self._banner(sorted(secrets))
        deadline = None if args.duration is None else time.monotonic() + args.duration
        failure = self._supervise(deadline)
        if failure is not None:
            print_error(PROG, failure, self.err)
            return EXIT_ERROR
        self.say(f"{PROG}: stopping ({self.stop_requested or 'duration reached'})")
        return self._finish(viewer_lines, sorted(secrets))

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
                assert self.server is not None
                if not self.server.running:
                    return (f"the server exited unexpectedly with status "
                            f"{self.server.returncode}; its log:\n{self.server.log_tail()}")
            return None
        finally:
            selector.close()

    def _finish(self, viewer_lines: _Lines, encoder_ids: list[str]) -> int:
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
        for encoder_id in encoder_ids:
            p = per.get(encoder_id, {})
            self.say(f"{PROG}:   {encoder_id}: {p.get('frames', 0)} frames, "
                     f"{p.get('decoded_frames', 0)} decoded, {p.get('gaps', 0)} gaps")
        silent = [e for e in encoder_ids if not per.get(e, {}).get("decoded_frames")]
        if silent:
            print_error(PROG, f"no decoded video from {', '.join(silent)}", self.err)
            return EXIT_ERROR
        if report["decode_errors"]:
            print_error(PROG, f"{report['decode_errors']} decode errors", self.err)
            return EXIT_ERROR
        return EXIT_OK

    def _banner(self, encoder_ids: list[str]) -> None:
        assert self.server is not None and self.viewer is not None and self.encoder is not None
        s = self.server
        a = self.args
        tls = " ".join(shlex.quote(x) for x in s.tls_args())
        viewer = tool_name("ev-viewer", "viewer")
        login = f"--server {s.address('viewer')} {tls} --account {ACCOUNT} --password {PASSWORD}"
        kept = ("removed at the end; use --data DIR to keep one" if self.temporary
                else "kept")
        width, height = a.size
        lines = [
            "",
            "evserver demo is running:",
            f"  data directory   {self.data_dir} ({kept})",
            f"  server           twistd -n evserver, pid {s.pid}, "
            f"{'plain TCP' if not s.tls else 'TLS'}; log {s.log_path}",
            f"    encoder control {s.address('encoder')}, viewer control "
            f"{s.address('viewer')}, video relay {s.address('relay')}, admin "
            f"{s.address('admin')}",
        ]
        if s.tls:
            lines.append(f"    certificate     {s.ca_path}")
        lines += [
            f"  domain           {DOMAIN}: account {ACCOUNT}, password {PASSWORD} "
            f"(an administrator)",
            f"  admin site       https://{s.address('admin')}/ (log in as {ACCOUNT}; the "
            f"certificate is the server's own, self-signed)",
            f"  encoders         {', '.join(encoder_ids)} in one ev-encoder (pid "
            f"{self.encoder.pid}): test pattern {width}x{height}, {a.fps:g} fps, "
            f"{a.bitrate / 1e6:g} Mbit/s, streaming while watched; secrets in "
            f"{self.data_dir / SECRETS_FILE}",
            f"  viewer           ev-viewer (pid {self.viewer.pid}) watching all of them, "
            f"decoding every frame",
            "",
            "Watch yourself, from another terminal:",
            f"  {viewer} {login} --list",
            f"  {viewer} {login} --watch {encoder_ids[0]} --out {encoder_ids[0]}.h264 "
            f"--decode --duration 10",
            f"  then play {encoder_ids[0]}.h264 with any player of raw H.264 "
            "(ffplay, mpv, vlc).",
            "",
            "Stop with Ctrl-C." if a.duration is None else f"Stops after {a.duration:g} s.",
            "",
        ]
        for line in lines:
            self.say(line)

    def shutdown(self) -> None:
        """Stop the viewer, the encoders, then the server; SIGKILL what does not stop."""
        for process in (self.viewer, self.encoder):
            if process is not None:
                stop_process(process)
        for reader in self.readers:
            reader.drain(0.5)
            if reader.process.stdout is not None:
                reader.process.stdout.close()
        if self.server is not None:
            self.server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return Demo(args).run()


if __name__ == "__main__":
    sys.exit(main())
