"""What the command-line tools share: options, error reporting, running the reactor.

A tool is a :class:`ToolRun`: ``start()`` returns a Deferred that fires with
the exit status once the run is over (its duration reached, its work done,
or a failure), and ``interrupt()`` ends it early (Ctrl-C, SIGTERM).
:func:`run_reactor` drives one on the global reactor; tests drive one on a
``Clock`` and the in-memory network, or on a running reactor with
:func:`drive`.

Conventions of every tool: human messages and errors go to standard error,
machine output (``--json``, ``--list``) to standard output; an error is one
line ``PROG: error: MESSAGE``.  Exit status: 0 success, 1 error (refused
credentials, unreachable server, unusable media), 2 bad command line, 3 the
run ended before its goal (``ev-viewer --frames`` not reached).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import traceback
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.python.failure import Failure

from evserver.config import validate_host
from evserver.net.client import Address, ClientError, TLSConfig
from evserver.wire.framing import ErrorCode

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3

ENCODER_PORT = 5510
VIEWER_PORT = 5520
#: How long an interrupted run may take to wind down before the reactor stops anyway.
INTERRUPT_GRACE = 5.0


class ToolError(Exception):
    """A failure the tool reports in one line (no traceback) with ``status``."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def natural_key(text: str) -> list[Any]:
    """Sort key putting ``cam2`` before ``cam10``."""
    return [(1, int(part), "") if part.isdigit() else (0, 0, part)
            for part in re.split(r"(\d+)", text)]


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (line breaks included) made one space."""
    return " ".join(str(text).split())


def error_line(prog: str, message: str) -> str:
    return f"{prog}: error: {one_line(message)}"


def print_error(prog: str, message: str, stream: IO[str] | None = None) -> None:
    out = stream if stream is not None else sys.stderr
    out.write(error_line(prog, message) + "\n")
    out.flush()


# --------------------------------------------------------------------------
# Command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        print_error(self.prog, f"{message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


def join_option_values(argv: Sequence[str], options: Sequence[str]) -> list[str]:
    """``--opt VALUE`` as ``--opt=VALUE`` for ``options``, so a VALUE may start with "-".

    Generated secrets and passwords can begin with a dash, which argparse
    would otherwise take for an option.
    """
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in options:
            value = next(args, None)
            out.append(arg if value is None else f"{arg}={value}")
        elif arg == "--":
            out.append(arg)
            out.extend(args)
        else:
            out.append(arg)
    return out


def add_server_option(parser: argparse.ArgumentParser, default_port: int, what: str) -> None:
    parser.add_argument(
        "--server", action="append", metavar="HOST[:PORT]", default=None,
        help=f"a server's {what} port (default port {default_port}); repeat for a "
             "cluster: the client tries them in turn (default 127.0.0.1)",
    )


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("transport security (default: TLS verified "
                                      "against the system's certificate authorities)")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--ca", metavar="FILE",
        help="trust only the certificates in this PEM file (for a standalone server: "
             "DATA/tls/server.pem)",
    )
    exclusive.add_argument(
        "--insecure", action="store_true",
        help="TLS without verifying the server (tests and benchmarks only)",
    )
    exclusive.add_argument(
        "--plain", action="store_true",
        help="plain TCP, for a server started with --plain",
    )


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log connection events to standard error")


def parse_servers(parser: argparse.ArgumentParser, values: Sequence[str] | None,
                  default_port: int) -> list[Address]:
    """The ``--server`` values as addresses; a bad one is a usage error."""
    addresses = []
    for text in values or ["127.0.0.1"]:
        try:
            address = Address.parse(text.strip(), default_port)
        except ValueError as e:
            parser.error(f"--server: {e}")
        if not address.host:
            parser.error(f"--server: bad address {text!r}: no host")
        try:
            validate_host(address.host)
        except ValueError as e:
            parser.error(f"--server: bad address {text!r}: {e}")
        if not 1 <= address.port <= 65535:
            parser.error(f"--server: bad address {text!r}: port must be 1..65535")
        addresses.append(address)
    return addresses


def tls_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TLSConfig:
    """The TLS options as a TLSConfig; an unreadable ``--ca`` file is a usage error."""
    if args.plain:
        return TLSConfig(enabled=False)
    if args.ca is not None:
        try:
            with open(args.ca, "rb") as f:
                head = f.read(65536)
        except OSError as e:
            parser.error(f"--ca: cannot read {args.ca!r}: {e.strerror or e}")
        if b"-----BEGIN CERTIFICATE-----" not in head:
            parser.error(f"--ca: {args.ca!r} holds no PEM certificate")
        return TLSConfig(enabled=True, ca=args.ca)
    return TLSConfig(enabled=True, insecure=bool(args.insecure))


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return value


_SUFFIXES = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def bitrate(text: str) -> int:
    """Bits per second: ``2000000``, ``2000k``, ``2M``, ``1.5M``."""
    raw = text.strip().lower().removesuffix("bps").removesuffix("bit/s")
    suffix = raw[-1:] if raw[-1:] in ("k", "m", "g") else ""
    try:
        value = float(raw[: len(raw) - len(suffix)]) * _SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a bitrate: {text!r} (e.g. 2M, 500k)") from None
    if not value >= 1 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"bitrate must be positive, not {text!r}")
    return round(value)


def frame_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT``, both even and at least 16."""
    width, sep, height = text.lower().partition("x")
    try:
        w, h = int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 640x360)") from None
    if not sep or w < 16 or h < 16 or w % 2 or h % 2 or w > 7680 or h > 4320:
        raise argparse.ArgumentTypeError(
            f"bad size {text!r}: width and height must be even, 16..7680 x 16..4320")
    return w, h


# --------------------------------------------------------------------------
# Errors


def describe_client_error(error: ClientError, who: str = "",
                          tls: TLSConfig | None = None) -> str:
    """A one-line, actionable description of a client failure (``tls``: to give hints)."""
    message = one_line(str(error))
    prefix = f"{who}: " if who else ""
    code = error.code
    if code is ErrorCode.AUTH_FAILED:
        return f"{prefix}refused by the server: {message} (AUTH_FAILED)"
    if code is not None:
        return f"{prefix}{message} ({code.name})"
    hint = ""
    lowered = message.lower()
    if "certificate verify failed" in lowered:
        hint = (" (the server's certificate is not trusted: pass --ca with its "
                "DATA/tls/server.pem, or --plain if it runs with --plain)")
    elif "wrong version number" in lowered or "packet length too long" in lowered:
        hint = " (TLS mismatch: does the server run with --plain?)"
    elif tls is not None and not tls.enabled and "closed" in lowered:
        hint = " (the server hung up at once: it probably expects TLS; leave out --plain)"
    if not message.startswith("cannot reach"):
        message = f"connection failed: {message}"
    return f"{prefix}{message}{hint}"


def report_failure(prog: str, failure: Failure, stream: IO[str]) -> int:
    """Print a failure as one error line (a traceback only for bugs); return the status."""
    error = failure.value
    if isinstance(error, ToolError):
        print_error(prog, str(error), stream)
        return error.status
    if isinstance(error, ClientError):
        print_error(prog, describe_client_error(error), stream)
        return EXIT_ERROR
    from evserver.media import MediaError

    if isinstance(error, MediaError | OSError):
        print_error(prog, str(error), stream)
        return EXIT_ERROR
    stream.write("".join(traceback.format_exception(error)))
    print_error(prog, f"internal error: {type(error).__name__}: {error}", stream)
    return EXIT_ERROR


# --------------------------------------------------------------------------
# Running


class ToolRun:
    """Base of a tool's run: a Deferred status, a bounded duration, interruption.

    Subclasses implement :meth:`begin` (start the work) and :meth:`end`
    (stop it and print results; return the status), and call
    :meth:`finish` when the run is over by itself.
    """

    prog = "ev-tool"

    def __init__(self, reactor: Any, out: IO[str], err: IO[str],
                 duration: float | None = None) -> None:
        self.reactor = reactor
        self.out = out
        self.err = err
        self.duration = duration
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.done: Deferred[int] = Deferred()
        self.interrupted = False
        self._duration_call: Any = None

    def start(self) -> Deferred[int]:
        self.started_at = self.reactor.seconds()
        if self.duration is not None:
            self._duration_call = self.reactor.callLater(self.duration, self._duration_over)
        try:
            self.begin()
        except Exception:
            self.fail(Failure())
        return self.done

    def interrupt(self) -> None:
        """End the run now (Ctrl-C, SIGTERM); ``done`` fires with the status."""
        self.interrupted = True
        self.finish()

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else self.reactor.seconds()
        return max(0.0, end - self.started_at)

    def _duration_over(self) -> None:
        self._duration_call = None
        self.finish()

    def _cancel_timer(self) -> None:
        if self._duration_call is not None and self._duration_call.active():
            self._duration_call.cancel()
        self._duration_call = None

    def finish(self, error: Failure | None = None) -> None:
        """End the run: stop the work, print results, fire ``done`` with the status."""
        if self.done.called or self.ended_at is not None:
            return
        self.ended_at = self.reactor.seconds()
        self._cancel_timer()
        try:
            status = self.end(error)
        except Exception:
            self.done.errback(Failure())
            return
        self.done.callback(status)

    def fail(self, failure: Failure) -> None:
        """End the run because of ``failure``: stop the work, then report it."""
        if self.done.called or self.ended_at is not None:
            return
        self.ended_at = self.reactor.seconds()
        self._cancel_timer()
        with contextlib.suppress(Exception):  # the original failure is the one to report
            self.end(failure)
        self.done.errback(failure)

    def say(self, message: str) -> None:
        """A human progress line on standard error."""
        self.err.write(f"{self.prog}: {message}\n")
        self.err.flush()

    def begin(self) -> None:
        raise NotImplementedError

    def end(self, error: Failure | None) -> int:
        raise NotImplementedError


def drive(run: ToolRun, stream: IO[str]) -> Deferred[int]:
    """Start ``run`` on its reactor; the Deferred fires with the exit status, errors printed."""
    d = defer.maybeDeferred(run.start)
    d.addErrback(lambda f: report_failure(run.prog, f, stream))
    return d


def start_logging(verbose: bool, stream: IO[str] | None = None) -> None:
    """Twisted log events to standard error: all with ``verbose``, else only critical ones."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    level = LogLevel.info if verbose else LogLevel.critical
    observer = FilteringLogObserver(
        textFileLogObserver(stream if stream is not None else sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=level)],
    )
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)


def run_reactor(run: ToolRun, reactor: Any = None, err: IO[str] | None = None) -> int:
    """Run the global reactor until ``run`` is over; return its exit status.

    SIGINT and SIGTERM stop the reactor; before it stops, the run is
    interrupted and given up to INTERRUPT_GRACE seconds to print its results.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    stream = err if err is not None else sys.stderr
    status: list[int] = []
    finished: Deferred[None] = Deferred()
    stopping = [False]

    def done(value: int) -> None:
        status.append(int(value))
        finished.callback(None)
        if not stopping[0]:
            stopping[0] = True
            with contextlib.suppress(ReactorNotRunning):
                reactor.stop()

    def go() -> None:
        drive(run, stream).addCallback(done)

    def before_shutdown() -> Deferred[None] | None:
        stopping[0] = True
        if finished.called:
            return None
        run.interrupt()
        if finished.called:
            return None
        waiting: Deferred[None] = Deferred()
        timer = reactor.callLater(INTERRUPT_GRACE, waiting.callback, None)

        def over(_: object) -> None:
            if timer.active():
                timer.cancel()
                waiting.callback(None)

        finished.addCallback(over)
        return waiting

    reactor.callWhenRunning(go)
    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
    reactor.run()
    if not status:
        print_error(run.prog, "interrupted before the run could report", stream)
        return EXIT_ERROR
    return status[0]


def read_secret_file(path: str, what: str) -> str:
    """The first line of a file holding a password or secret."""
    try:
        with open(path, encoding="utf-8") as f:
            value = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ToolError(f"cannot read the {what} file {path!r}: {e}", EXIT_USAGE) from None
    if not value:
        raise ToolError(f"the {what} file {path!r} is empty", EXIT_USAGE)
    return value


def tool_main(prog: str, build_run: Any, argv: Sequence[str] | None,
              errors: tuple[type[Exception], ...] = ()) -> int:
    """The body of a tool's ``main``: build its run from ``argv`` and drive the reactor.

    ``build_run(argv, reactor, out, err)`` returns ``(run, args)``; the
    exceptions in ``errors`` are reported in one line with exit status 1.
    """
    from twisted.internet import reactor

    try:
        run, args = build_run(argv, reactor, sys.stdout, sys.stderr)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except errors as e:
        print_error(prog, str(e))
        return EXIT_ERROR
    start_logging(args.verbose)
    return run_reactor(run, reactor)
