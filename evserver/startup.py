"""Report fatal startup errors in one line and exit non-zero, also under twistd.

twistd ignores why its reactor stopped: whatever a service does, ``twistd -n``
exits with status 0 once the reactor returns.  :func:`fatal_startup_error`
therefore

1. writes ``evserver: error: <message>`` as one line to the process's real
   standard error (``sys.__stderr__``: twistd redirects ``sys.stderr`` into
   its log) and logs it too (for a daemon, whose stderr goes nowhere);
2. stops the reactor, or, if it is not running yet (a listener failing in
   ``privilegedStartService``), stops it as soon as it starts, so services
   are stopped cleanly and twistd removes its pid file;
3. registers an :mod:`atexit` handler that, once the interpreter is exiting
   after all of that, flushes the standard streams and stdlib logging and
   ends the process with status 1 (``os._exit``; nothing else can change
   the status at that point).

Only the first error is reported: the others are consequences.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

import attrs
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

PREFIX = "evserver: error: "
STARTUP_FAILURE_STATUS = 1
USAGE_ERROR_STATUS = 2

log = Logger()


def one_line(message: str) -> str:
    """``message`` with every run of line breaks and tabs made one space."""
    return " ".join(str(message).split())


def _real_stderr() -> TextIO:
    return sys.__stderr__ if sys.__stderr__ is not None else sys.stderr


def exit_at_interpreter_exit(status: int) -> None:
    """Make the process exit with ``status`` once the interpreter shuts down."""

    def _exit() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        logging.shutdown()
        os._exit(status)

    atexit.register(_exit)


@attrs.define
class FatalErrorReporter:
    """Does what :func:`fatal_startup_error` does, with its effects injectable for tests."""

    reactor: Any = None  # default: the global reactor, imported when needed
    stream: TextIO | None = None  # default: the real stderr
    exit_hook: Callable[[int], None] = exit_at_interpreter_exit
    status: int = STARTUP_FAILURE_STATUS
    reported: str | None = None

    def __call__(self, message: str) -> None:
        if self.reported is not None:
            log.error("further startup error: {message}", message=one_line(message))
            return
        line = one_line(message)
        self.reported = line
        stream = self.stream if self.stream is not None else _real_stderr()
        stream.write(PREFIX + line + "\n")
        stream.flush()
        log.error("fatal startup error: {message}", message=line)
        self.exit_hook(self.status)
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        if reactor.running:
            _stop_quietly(reactor)  # it may be shutting down already
        else:
            reactor.callWhenRunning(_stop_quietly, reactor)


def _stop_quietly(reactor: Any) -> None:
    with contextlib.suppress(ReactorNotRunning):
        reactor.stop()


_reporter = FatalErrorReporter()


def fatal_startup_error(message: str) -> None:
    """Print ``evserver: error: <message>`` and make the process exit with status 1.

    Call it when the server cannot start (a port is taken, the data
    directory is unusable...).  It returns at once; the reactor stops, the
    services stop, and the process then exits non-zero.
    """
    _reporter(message)


def usage_error_exit(message: str, stream: TextIO | None = None) -> NoReturn:
    """Print ``evserver: error: <message>`` and raise SystemExit(2) (bad options)."""
    out = stream if stream is not None else sys.stderr
    out.write(PREFIX + one_line(message) + "\n")
    out.flush()
    raise SystemExit(USAGE_ERROR_STATUS)
