"""``ev-encoder``: one or many encoders in one process, streaming while they are watched.

Examples::

    ev-encoder --server 127.0.0.1 --ca DATA/tls/server.pem \\
        --id cam1 --secret SECRET --source testsrc --size 640x360
    ev-encoder --server 127.0.0.1:5510 --plain --secrets-file secrets.json \\
        --id-prefix cam --count 1000 --source synthetic --bitrate 500k --duration 60 --json

Each encoder is an :class:`evserver.net.client.EncoderClient`: it connects,
authenticates, keeps the connection alive, reconnects by itself (to the next
server of the list) and streams only while the server asks it to.  Many
encoders are started staggered (``--rate`` per second).  See
:mod:`evserver.tools.common` for the output and exit status conventions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

import attrs
from twisted.python.failure import Failure

from evserver.media import FileSource, MediaError, SyntheticSource, TestPatternSource
from evserver.net.client import Address, ClientError, EncoderClient, TLSConfig
from evserver.tools.common import (
    ENCODER_PORT,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    ArgumentParser,
    ToolError,
    ToolRun,
    add_common_options,
    add_server_option,
    add_tls_options,
    bitrate,
    describe_client_error,
    frame_size,
    join_option_values,
    natural_key,
    parse_servers,
    positive_float,
    positive_int,
    print_error,
    tls_config,
    tool_main,
)

PROG = "ev-encoder"
#: Errors printed one per line; beyond that only counted (a thousand encoders).
MAX_ERROR_LINES = 10

SourceFactory = Callable[[int], Any]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Run one or many evserver encoders that stream while they are watched.",
    )
    add_server_option(parser, ENCODER_PORT, "encoder control")
    who = parser.add_argument_group(
        "encoders", "either --id with --secret (or with --secrets-file), or --secrets-file "
                    "alone for every encoder of the file whose id starts with --id-prefix")
    who.add_argument("--id", action="append", dest="ids", metavar="ID",
                     help="an encoder id (repeatable with --secrets-file)")
    who.add_argument("--secret", help="the encoder's secret (one --id only)")
    who.add_argument("--secrets-file", metavar="FILE",
                     help='JSON object {"encoder id": "secret", ...}')
    who.add_argument("--id-prefix", default="", metavar="PREFIX",
                     help="with --secrets-file: use the encoders whose id starts with PREFIX")
    who.add_argument("--count", type=positive_int, metavar="N",
                     help="with --secrets-file: use the first N of them (natural order of ids)")
    who.add_argument("--rate", type=positive_float, default=200.0, metavar="PER_SECOND",
                     help="start at most this many encoders per second (default 200)")
    media = parser.add_argument_group("media")
    media.add_argument(
        "--source", default="synthetic", metavar="synthetic|testsrc|FILE",
        help="synthetic: opaque payload at --bitrate; testsrc: real H.264 of a test pattern "
             "(PyAV, libx264); FILE: a video file, looped (default synthetic)")
    media.add_argument("--bitrate", type=bitrate, default=1_000_000, metavar="BPS",
                       help="bits per second, e.g. 500k, 2M (default 1M)")
    media.add_argument("--fps", type=positive_float, default=25.0,
                       help="frames per second (default 25; a FILE keeps its own)")
    media.add_argument("--keyframe-interval", type=positive_int, default=50, metavar="FRAMES",
                       help="frames from one keyframe to the next (default 50)")
    media.add_argument("--size", type=frame_size, default=(640, 360), metavar="WxH",
                       help="testsrc picture size (default 640x360)")
    run = parser.add_argument_group("run")
    run.add_argument("--duration", type=positive_float, metavar="SECONDS",
                     help="stop after this many seconds (default: run until Ctrl-C)")
    run.add_argument("--json", action="store_true",
                     help="print one JSON object with per-encoder figures at the end")
    run.add_argument("--stats-interval", type=positive_float, metavar="SECONDS",
                     help="print a progress line every SECONDS")
    add_tls_options(parser)
    add_common_options(parser)
    return parser


def load_secrets(path: str) -> dict[str, str]:
    """Read a secrets file: a JSON object mapping encoder ids to secrets."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ToolError(f"cannot read the secrets file {path!r}: {e.strerror or e}",
                        EXIT_USAGE) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ToolError(f"the secrets file {path!r} is not valid JSON: {e}", EXIT_USAGE) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ToolError(f'the secrets file {path!r} must hold a JSON object '
                        '{"encoder id": "secret", ...}', EXIT_USAGE)
    return data


def select_encoders(parser: argparse.ArgumentParser,
                    args: argparse.Namespace) -> list[tuple[str, str]]:
    """(id, secret) of every encoder to run, from --id/--secret/--secrets-file/--count."""
    if args.secret is not None:
        if not args.ids or len(args.ids) != 1:
            parser.error("--secret goes with exactly one --id")
        if args.secrets_file or args.count or args.id_prefix:
            parser.error("--secret cannot be combined with --secrets-file, --count, --id-prefix")
        return [(args.ids[0], args.secret)]
    if args.secrets_file is None:
        parser.error("give --id ID --secret SECRET, or --secrets-file FILE")
    secrets = load_secrets(args.secrets_file)
    if args.ids:
        if args.count or args.id_prefix:
            parser.error("--id cannot be combined with --count or --id-prefix")
        missing = [i for i in args.ids if i not in secrets]
        if missing:
            parser.error(f"no secret for {', '.join(map(repr, missing))} in {args.secrets_file!r}")
        return [(i, secrets[i]) for i in dict.fromkeys(args.ids)]
    chosen = sorted((i for i in secrets if i.startswith(args.id_prefix)), key=natural_key)
    if args.count is not None:
        if len(chosen) < args.count:
            parser.error(f"{args.secrets_file!r} has {len(chosen)} encoder(s) whose id starts "
                         f"with {args.id_prefix!r}, not {args.count}")
        chosen = chosen[: args.count]
    if not chosen:
        parser.error(f"no encoder in {args.secrets_file!r} has an id starting with "
                     f"{args.id_prefix!r}")
    return [(i, secrets[i]) for i in chosen]


def source_factory(args: argparse.Namespace) -> SourceFactory:
    """A function making encoder ``i``'s media source from the media options."""
    kind = args.source
    if kind == "synthetic":
        return lambda i: SyntheticSource(args.bitrate, args.fps, args.keyframe_interval, seed=i)
    if kind == "testsrc":
        width, height = args.size
        return lambda i: TestPatternSource(width, height, args.fps, args.keyframe_interval,
                                           args.bitrate)
    return lambda i: FileSource(kind, keyframe_interval=args.keyframe_interval,
                                bitrate_bps=args.bitrate)


class _ToolEncoder(EncoderClient):
    """An EncoderClient that reports giving up (after it was online) to the tool."""

    on_gave_up: Callable[[ClientError], None] | None = None

    def on_final_error(self, error: ClientError) -> None:
        if self.on_gave_up is not None:
            self.on_gave_up(error)


@attrs.define
class EncoderEntry:
    encoder_id: str
    secret: str = attrs.field(repr=False)
    client: _ToolEncoder | None = None
    source: Any = None
    online: bool = False
    error: str | None = None

    def figures(self) -> dict[str, Any]:
        c = self.client
        return {
            "frames": c.frames_sent if c else 0,
            "bytes": c.bytes_sent if c else 0,
            "starts": c.starts if c else 0,
            "reconnects": max(0, c.connects - 1) if c else 0,
            "server": (c.server_id or None) if c else None,
            "error": self.error,
        }


class EncoderRun(ToolRun):
    """The encoders of one ``ev-encoder`` process, from start to the final report.

    ``client_kwargs`` go to every EncoderClient (tests pass an in-memory
    ``connector``).
    """

    prog = PROG

    def __init__(self, reactor: Any, servers: list[Address], tls: TLSConfig,
                 encoders: Sequence[tuple[str, str]], make_source: SourceFactory, *,
                 out: IO[str], err: IO[str], duration: float | None = None,
                 rate: float = 200.0, json_output: bool = False,
                 stats_interval: float | None = None,
                 client_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(reactor, out, err, duration)
        if not encoders:
            raise ValueError("no encoders to run")
        self.servers = servers
        self.tls = tls
        self.entries = [EncoderEntry(i, s) for i, s in encoders]
        self.make_source = make_source
        self.rate = rate
        self.json_output = json_output
        self.stats_interval = stats_interval
        self.client_kwargs = client_kwargs or {}
        self.resolved = 0  # encoders whose first connection succeeded or failed
        self.failed = 0
        self.errors_printed = 0
        self._pending: list[Any] = []
        self._stats_call: Any = None
        self._last_stats: tuple[float, int] | None = None

    # -- starting ------------------------------------------------------------

    def begin(self) -> None:
        for index, entry in enumerate(self.entries):
            delay = index / self.rate
            if delay == 0:
                self._start_one(entry, index)
            else:
                self._pending.append(self.reactor.callLater(delay, self._start_one, entry, index))
        if self.stats_interval is not None:
            self._stats_call = self.reactor.callLater(self.stats_interval, self._stats)

    def _start_one(self, entry: EncoderEntry, index: int) -> None:
        if self.ended_at is not None:
            return
        try:
            entry.source = self.make_source(index)
        except (MediaError, ValueError, OSError) as e:
            self._resolve_failed(entry, f"encoder {entry.encoder_id!r}: {e}")
            return
        client = _ToolEncoder(self.reactor, list(self.servers), entry.encoder_id, entry.secret,
                              entry.source, self.tls, **self.client_kwargs)
        client.on_gave_up = lambda error: self._gave_up(entry, error)
        entry.client = client
        client.start().addCallbacks(lambda _: self._online(entry), self._start_failed,
                                    errbackArgs=(entry,))

    def _online(self, entry: EncoderEntry) -> None:
        entry.online = True
        self.resolved += 1
        if self.resolved == len(self.entries) and self.ended_at is None:
            online = sum(e.online for e in self.entries)
            where = ", ".join(str(a) for a in self.servers)
            self.say(f"{online} of {len(self.entries)} encoder(s) connected to {where}")

    def _start_failed(self, failure: Failure, entry: EncoderEntry) -> None:
        error = failure.value
        if isinstance(error, ClientError):
            message = describe_client_error(error, f"encoder {entry.encoder_id!r}", self.tls)
        else:
            message = f"encoder {entry.encoder_id!r}: {failure.getErrorMessage()}"
        self._resolve_failed(entry, message)

    def _resolve_failed(self, entry: EncoderEntry, message: str) -> None:
        self.resolved += 1
        self._record_error(entry, message)

    def _gave_up(self, entry: EncoderEntry, error: ClientError) -> None:
        entry.online = False
        self._record_error(entry, describe_client_error(
            error, f"encoder {entry.encoder_id!r} stopped", self.tls))

    def _record_error(self, entry: EncoderEntry, message: str) -> None:
        if self.ended_at is not None:
            return
        entry.error = message
        self.failed += 1
        if self.errors_printed < MAX_ERROR_LINES:
            self.errors_printed += 1
            print_error(self.prog, message, self.err)
        if self.resolved == len(self.entries) and not any(e.online for e in self.entries):
            self.finish()  # nothing is left running

    def _stats(self) -> None:
        self._stats_call = None
        if self.ended_at is not None or self.stats_interval is None:
            return
        now = self.reactor.seconds()
        frames = sum(e.client.frames_sent for e in self.entries if e.client)
        sent = sum(e.client.bytes_sent for e in self.entries if e.client)
        start = self.started_at if self.started_at is not None else now
        last_time, last_bytes = self._last_stats or (start, 0)
        span = max(1e-9, now - last_time)
        mbps = (sent - last_bytes) * 8 / span / 1e6
        self._last_stats = (now, sent)
        online = sum(e.online for e in self.entries)
        streaming = sum(1 for e in self.entries if e.client and e.client.streaming)
        self.say(f"{self.elapsed:.1f} s: {online}/{len(self.entries)} online, {streaming} "
                 f"streaming, {frames} frames sent, {mbps:.2f} Mbit/s")
        self._stats_call = self.reactor.callLater(self.stats_interval, self._stats)

    # -- ending --------------------------------------------------------------

    def end(self, error: Failure | None) -> int:
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending.clear()
        if self._stats_call is not None and self._stats_call.active():
            self._stats_call.cancel()
        self._stats_call = None
        for entry in self.entries:
            if entry.client is not None:
                entry.client.stop()
            if entry.source is not None:
                entry.source.close()
        if error is not None:
            return EXIT_ERROR
        report = self.report()
        if self.json_output:
            self.out.write(json.dumps(report, sort_keys=True) + "\n")
            self.out.flush()
        elif any(e.client is not None and e.client.connects for e in self.entries):
            self.say(f"{report['encoders']} encoder(s), {report['failed']} failed: sent "
                     f"{report['frames']} frames, {report['bytes']} bytes in "
                     f"{report['duration_s']:.1f} s ({report['starts']} stream starts, "
                     f"{report['reconnects']} reconnects)")
        if self.failed > self.errors_printed:
            print_error(self.prog, f"{self.failed} encoder(s) failed "
                                   f"({self.failed - self.errors_printed} not shown)", self.err)
        return EXIT_ERROR if self.failed else EXIT_OK

    def report(self) -> dict[str, Any]:
        per = {e.encoder_id: e.figures() for e in self.entries}
        return {
            "encoders": len(self.entries),
            "online": sum(e.online for e in self.entries),
            "failed": self.failed,
            "frames": sum(p["frames"] for p in per.values()),
            "bytes": sum(p["bytes"] for p in per.values()),
            "starts": sum(p["starts"] for p in per.values()),
            "reconnects": sum(p["reconnects"] for p in per.values()),
            "duration_s": round(self.elapsed, 3),
            "per_encoder": per,
        }


def build_run(argv: Sequence[str] | None, reactor: Any, out: IO[str], err: IO[str],
              **client_kwargs: Any) -> tuple[EncoderRun, argparse.Namespace]:
    """Parse ``argv`` and make the run (raises SystemExit(2) on a bad command line)."""
    parser = build_parser()
    args = parser.parse_args(
        join_option_values(sys.argv[1:] if argv is None else argv, ("--secret",)))
    servers = parse_servers(parser, args.server, ENCODER_PORT)
    tls = tls_config(parser, args)
    try:
        encoders = select_encoders(parser, args)
    except ToolError as e:
        parser.error(str(e))
    factory = source_factory(args)
    first = factory(0)  # a bad file is reported before anything connects

    def make_source(index: int) -> Any:
        return first if index == 0 else factory(index)

    run = EncoderRun(reactor, servers, tls, encoders, make_source, out=out, err=err,
                     duration=args.duration, rate=args.rate, json_output=args.json,
                     stats_interval=args.stats_interval, client_kwargs=client_kwargs)
    return run, args


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ev-encoder`` command; returns the exit status."""
    return tool_main(PROG, build_run, argv, (MediaError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
