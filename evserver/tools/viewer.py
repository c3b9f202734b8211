"""``ev-viewer``: log in, list encoders, watch one or many, measure and check what arrives.

Examples::

    ev-viewer --server 127.0.0.1 --ca DATA/tls/server.pem --account demo --password demo --list
    ev-viewer --ca DATA/tls/server.pem --account demo --password-file pw.txt \\
        --watch cam1 --out cam1.h264 --decode --frames 250 --duration 30 --json
    ev-viewer --insecure --account demo --password demo --watch-all --duration 60 \\
        --stats-interval 5

Every run that watches is bounded by ``--frames`` (frames received, all
encoders together) and/or ``--duration``.  At the end ``--json`` prints one
object: frames, bytes, keyframes, gaps, latency p50/p99, decoded frames and
decode errors, the servers the video came from (``servers_used``), how many
times an encoder's video moved to another server (``moves``) and how many
times the home session logged in again (``reconnects``), with a per-encoder
breakdown (``servers``: where its frames came from, in order).

The viewer follows the cluster (``ClusterViewer``): it logs in to the first
reachable ``--server`` (then to any server of the cluster's list), watches
each encoder on the server hosting it, follows redirects, and moves a watch
when its encoder moves (a failover): video resumes without any action.

* A *gap* is a jump of a stream's ``timestamp_us`` by more than 1.5 times
  the median frame interval of that stream (or backwards), or a stream whose
  first frame is not a keyframe.  A failover pause is a jump, hence a gap;
  the frames after it are counted and decoded as usual (after a change of
  server, decoding starts again at a keyframe, as the new server sends one).
* *Latency* is the receipt time (``time.time()``) minus the frame's
  ``capture_time_us`` as stamped by the encoder: meaningful when both run on
  one machine or on synchronised clocks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from typing import IO, Any

import attrs
from twisted.python.failure import Failure

from evserver.media import AnnexBWriter, Codec, H264Checker, MediaError, Sample
from evserver.net.client import Address, ClientError, ClusterViewer, TLSConfig
from evserver.tools.common import (
    EXIT_ERROR,
    EXIT_INCOMPLETE,
    EXIT_OK,
    VIEWER_PORT,
    ArgumentParser,
    ToolError,
    ToolRun,
    add_common_options,
    add_server_option,
    add_tls_options,
    describe_client_error,
    join_option_values,
    natural_key,
    parse_servers,
    positive_float,
    positive_int,
    print_error,
    read_secret_file,
    tls_config,
    tool_main,
)
from evserver.wire import messages as m

PROG = "ev-viewer"
#: ``--list`` without ``--duration`` gives up after this long.
LIST_TIMEOUT = 30.0
GAP_FACTOR = 1.5
STATE_NAMES = {m.EncoderState.OFFLINE: "offline", m.EncoderState.ONLINE: "online",
               m.EncoderState.STREAMING: "streaming"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Watch evserver encoders: list them, receive, measure, decode and save "
                    "their video.",
    )
    add_server_option(parser, VIEWER_PORT, "viewer control")
    login = parser.add_argument_group("login")
    login.add_argument("--account", required=True, help="the account to log in with")
    secret = login.add_mutually_exclusive_group(required=True)
    secret.add_argument("--password", help="the account's password")
    secret.add_argument("--password-file", metavar="FILE",
                        help="read the password from the first line of FILE")
    what = parser.add_argument_group("what to do (one of)")
    action = what.add_mutually_exclusive_group(required=True)
    action.add_argument("--watch", action="append", metavar="ID",
                        help="watch this encoder (repeatable)")
    action.add_argument("--watch-all", action="store_true",
                        help="watch every online encoder of the account's domain, and those "
                             "that come online later")
    action.add_argument("--list", action="store_true",
                        help="print the domain's encoders (a table, or JSON with --json) "
                             "and exit")
    out = parser.add_argument_group("checking and saving")
    out.add_argument("--out", metavar="FILE.h264",
                     help="write the first watched encoder's H.264 as an Annex-B file, "
                          "starting at a keyframe")
    out.add_argument("--decode", action="store_true",
                     help="decode every H.264 frame (PyAV) and count decode errors")
    bound = parser.add_argument_group("bounds (at least one when watching)")
    bound.add_argument("--frames", type=positive_int, metavar="N",
                       help="stop once N frames have arrived (all encoders together); "
                            "exit status 3 if --duration runs out first")
    bound.add_argument("--duration", type=positive_float, metavar="SECONDS",
                       help="stop after this many seconds")
    report = parser.add_argument_group("reporting")
    report.add_argument("--json", action="store_true",
                        help="print one JSON object with the figures at the end")
    report.add_argument("--stats-interval", type=positive_float, metavar="SECONDS",
                        help="print per-encoder progress every SECONDS (standard error)")
    add_tls_options(parser)
    add_common_options(parser)
    return parser


# --------------------------------------------------------------------------
# Figures


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None if there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[rank - 1])


def count_gaps(timestamps: Sequence[int], first_is_keyframe: bool) -> int:
    """Gaps in one stream: jumps over GAP_FACTOR x the median interval, or backwards."""
    gaps = 0 if first_is_keyframe or not timestamps else 1
    deltas = [b - a for a, b in itertools.pairwise(timestamps)]
    positive = [d for d in deltas if d > 0]
    if not positive:
        return gaps + sum(1 for d in deltas if d <= 0)
    limit = GAP_FACTOR * statistics.median(positive)
    return gaps + sum(1 for d in deltas if d <= 0 or d > limit)


@attrs.define
class StreamStats:
    """What arrived from one encoder."""

    encoder_id: str
    frames: int = 0
    bytes: int = 0
    keyframes: int = 0
    first_keyframe: bool | None = None
    timestamps: array[int] = attrs.field(factory=lambda: array("q"))
    latencies_ms: array[float] = attrs.field(factory=lambda: array("d"))
    checker: H264Checker | None = None
    waiting_for_keyframe: bool = True
    undecodable: int = 0
    skipped_before_keyframe: int = 0
    #: The servers the frames came from, in order (a server again after a move back).
    servers: list[str] = attrs.field(factory=list)
    #: (time, frames, bytes) at the last progress line; None before the first.
    last_report: tuple[float, int, int] | None = None

    def add(self, media: m.Media, received_us: int, decode: bool, server: str = "") -> None:
        if self.frames == 0:
            self.first_keyframe = media.keyframe
        if server and (not self.servers or self.servers[-1] != server):
            if self.servers:
                # Resumed on another server: its stream starts at a keyframe.
                self.waiting_for_keyframe = True
            self.servers.append(server)
        self.frames += 1
        self.bytes += len(media.payload)
        self.keyframes += media.keyframe
        self.timestamps.append(media.timestamp_us)
        self.latencies_ms.append((received_us - media.capture_time_us) / 1000.0)
        if not decode:
            return
        if media.codec != Codec.H264:
            self.undecodable += 1
            return
        if self.waiting_for_keyframe:
            if not media.keyframe:
                self.skipped_before_keyframe += 1
                return
            self.waiting_for_keyframe = False
        if self.checker is None:
            self.checker = H264Checker()
        self.checker.feed(media.payload)

    def finish_decoding(self) -> None:
        if self.checker is not None:
            self.checker.flush()

    def figures(self, decode: bool) -> dict[str, Any]:
        latencies = sorted(self.latencies_ms)
        p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
        figures: dict[str, Any] = {
            "frames": self.frames,
            "bytes": self.bytes,
            "keyframes": self.keyframes,
            "gaps": count_gaps(self.timestamps, bool(self.first_keyframe)),
            "latency_p50_ms": None if p50 is None else round(p50, 3),
            "latency_p99_ms": None if p99 is None else round(p99, 3),
            "decoded_frames": None,
            "decode_errors": None,
            "servers": list(self.servers),
        }
        if decode:
            checker = self.checker
            figures["decoded_frames"] = checker.frames_decoded if checker else 0
            figures["decode_errors"] = checker.decode_errors if checker else 0
            figures["undecodable_frames"] = self.undecodable
            figures["skipped_before_keyframe"] = self.skipped_before_keyframe
            if checker is not None and checker.width is not None:
                figures["size"] = f"{checker.width}x{checker.height}"
        return figures


# --------------------------------------------------------------------------
# The run


class ViewerRun(ToolRun):
    """One ``ev-viewer`` run: log in, then list or watch until a bound is reached.

    ``client_kwargs`` go to the ClusterViewer's sessions (tests pass an
    in-memory ``connector``); ``wallclock`` gives the receipt time for latencies.
    """

    prog = PROG

    def __init__(self, reactor: Any, servers: list[Address], tls: TLSConfig, account: str,
                 password: str, *, out: IO[str], err: IO[str],
                 watch: Sequence[str] = (), watch_all: bool = False, list_only: bool = False,
                 out_path: str | None = None, decode: bool = False,
                 frames: int | None = None, duration: float | None = None,
                 json_output: bool = False, stats_interval: float | None = None,
                 wallclock: Callable[[], float] = time.time,
                 client_kwargs: dict[str, Any] | None = None) -> None:
        if list_only and duration is None:
            duration = LIST_TIMEOUT
        super().__init__(reactor, out, err, duration)
        if not list_only and frames is None and duration is None:
            raise ValueError("a watching run needs frames or duration")
        self.servers = servers
        self.tls = tls
        self.account = account
        self.password = password
        self.watch_ids = list(dict.fromkeys(watch))
        self.watch_all = watch_all
        self.list_only = list_only
        self.out_path = out_path
        self.decode = decode
        self.frames_target = frames
        self.json_output = json_output
        self.stats_interval = stats_interval
        self.wallclock = wallclock
        self.client_kwargs = client_kwargs or {}
        self.client: ClusterViewer | None = None
        self.streams: dict[str, StreamStats] = {}
        self.total_frames = 0
        self.writer: AnnexBWriter | None = None
        self.out_encoder: str | None = self.watch_ids[0] if self.watch_ids else None
        self.logged_in = False
        self.listed = False
        self._stats_call: Any = None
        self._waiting_said = False

    # -- starting ------------------------------------------------------------

    def begin(self) -> None:
        if self.out_path is not None:
            try:
                self.writer = AnnexBWriter(self.out_path, skip_until_keyframe=True)
            except OSError as e:
                raise ToolError(f"cannot write {self.out_path!r}: {e.strerror or e}") from None
        client = ClusterViewer(self.reactor, list(self.servers), self.account, self.password,
                               self.tls, on_media=self._media, on_update=self._update,
                               on_list=self._listed, on_watch_error=self._watch_refused,
                               on_final_error=self._lost_for_good, **self.client_kwargs)
        self.client = client
        client.start().addCallbacks(self._logged_in, self._login_failed)
        if self.stats_interval is not None and not self.list_only:
            self._stats_call = self.reactor.callLater(self.stats_interval, self._stats)

    def _login_failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, ClientError):
            who = f"login as {self.account!r}" if error.code is not None else ""
            failure = Failure(ToolError(describe_client_error(error, who, self.tls)))
        self.fail(failure)

    def _lost_for_good(self, error: ClientError) -> None:
        self.fail(Failure(ToolError(describe_client_error(error, "connection given up", self.tls))))

    def _logged_in(self, client: ClusterViewer) -> None:
        self.logged_in = True
        if self.ended_at is not None or self.list_only:
            return  # --list: the listing after the login is printed (_listed)
        for encoder_id in self.watch_ids:
            client.watch(encoder_id)

    def _listed(self, encoders: tuple[m.EncoderInfo, ...]) -> None:
        """The home's listing, after each of its logins (the first, and after a failover)."""
        if self.ended_at is not None:
            return
        if self.list_only:
            self._print_list(encoders)
        elif self.watch_all:
            self._watch_listed(encoders)

    def _watch_listed(self, encoders: tuple[m.EncoderInfo, ...]) -> None:
        online = [e for e in encoders if e.state != m.EncoderState.OFFLINE]
        for info in sorted(online, key=lambda e: natural_key(e.encoder_id)):
            self._watch_new(info.encoder_id)
        if not online and not self._waiting_said:
            self._waiting_said = True
            self.say(f"no encoder of domain {self._domain()!r} is online yet; waiting")

    def _domain(self) -> str:
        return self.client.domain if self.client is not None else ""

    def _update(self, info: m.EncoderInfo) -> None:
        if self.watch_all and info.state != m.EncoderState.OFFLINE:
            self._watch_new(info.encoder_id)

    def _watch_new(self, encoder_id: str) -> None:
        client = self.client
        if client is None or self.ended_at is not None or encoder_id in client.wanted:
            return
        if self.out_encoder is None:
            self.out_encoder = encoder_id
        client.watch(encoder_id)

    def _watch_refused(self, encoder_id: str, error: ClientError) -> None:
        """A watch refused for good (another domain's or a missing encoder, a limit)."""
        message = describe_client_error(error, f"cannot watch {encoder_id!r}", self.tls)
        self.fail(Failure(ToolError(message)))

    # -- receiving -----------------------------------------------------------

    def _media(self, encoder_id: str, media: m.Media) -> None:
        if self.ended_at is not None:
            return
        stream = self.streams.get(encoder_id)
        if stream is None:
            stream = self.streams[encoder_id] = StreamStats(encoder_id)
        server = self.client.placed.get(encoder_id, "") if self.client is not None else ""
        stream.add(media, int(self.wallclock() * 1e6), self.decode, server)
        if self.writer is not None and encoder_id == self.out_encoder:
            codec = Codec.H264 if media.codec == Codec.H264 else Codec.OPAQUE
            self.writer.write(Sample(media.timestamp_us, media.keyframe, codec, media.payload))
        self.total_frames += 1
        if self.frames_target is not None and self.total_frames >= self.frames_target:
            self.finish()

    def _stats(self) -> None:
        self._stats_call = None
        if self.ended_at is not None or self.stats_interval is None:
            return
        now = self.reactor.seconds()
        parts = []
        for encoder_id in sorted(self.streams):
            s = self.streams[encoder_id]
            start = self.started_at if self.started_at is not None else now
            t0, f0, b0 = s.last_report or (start, 0, 0)
            span = max(1e-9, now - t0)
            fps = (s.frames - f0) / span
            mbps = (s.bytes - b0) * 8 / span / 1e6
            s.last_report = (now, s.frames, s.bytes)
            errors = ""
            if self.decode:
                errors = f", {s.checker.decode_errors if s.checker else 0} decode errors"
            parts.append(f"{encoder_id} {s.frames} frames ({fps:.1f} fps, {mbps:.2f} Mbit/s"
                         f"{errors})")
        watching = len(self.client.wanted) if self.client is not None else 0
        summary = "; ".join(parts) if parts else "no frames yet"
        self.say(f"{self.elapsed:.1f} s: watching {watching}: {summary}")
        self._stats_call = self.reactor.callLater(self.stats_interval, self._stats)

    # -- ending --------------------------------------------------------------

    def _print_list(self, encoders: tuple[m.EncoderInfo, ...]) -> None:
        if self.listed:
            return
        rows = sorted(encoders, key=lambda e: natural_key(e.encoder_id))
        if self.json_output:
            listing = [{"id": e.encoder_id, "name": e.name,
                        "state": STATE_NAMES.get(e.state, str(e.state)),
                        "server": e.server_id or None} for e in rows]
            self.out.write(json.dumps({"domain": self._domain(), "encoders": listing}) + "\n")
        else:
            table = [("ID", "NAME", "STATE", "SERVER")] + [
                (e.encoder_id, e.name, STATE_NAMES.get(e.state, str(e.state)),
                 e.server_id or "-") for e in rows]
            widths = [max(len(r[i]) for r in table) for i in range(3)]
            for row in table:
                self.out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                               + "  " + row[3] + "\n")
            if not rows:
                self.out.write(f"(no encoders in domain {self._domain()!r})\n")
        self.out.flush()
        self.listed = True
        self.finish()

    def end(self, error: Failure | None) -> int:
        if self._stats_call is not None and self._stats_call.active():
            self._stats_call.cancel()
        self._stats_call = None
        if self.client is not None:
            self.client.stop()
        if self.writer is not None:
            self.writer.close()
        for stream in self.streams.values():
            stream.finish_decoding()
        if error is not None:
            return EXIT_ERROR
        if self.list_only:
            return EXIT_OK if self.listed else self._timed_out_listing()
        report = self.report()
        if self.json_output:
            self.out.write(json.dumps(report, sort_keys=True) + "\n")
        else:
            self._print_summary(report)
        self.out.flush()
        if not self.logged_in:
            print_error(self.prog, f"not logged in within {self.elapsed:.1f} s", self.err)
            return EXIT_ERROR
        if self.writer is not None and self.writer.skipped_opaque and \
                not self.writer.samples_written:
            self.say(f"warning: {self.out_encoder!r} sent no H.264 (a synthetic source?): "
                     f"nothing was written to {self.writer.path}")
        if self.frames_target is not None and self.total_frames < self.frames_target:
            when = "in the" if self.interrupted else "within"
            why = " before the run was interrupted" if self.interrupted else ""
            print_error(self.prog, f"only {self.total_frames} of {self.frames_target} frames "
                                   f"arrived {when} {self.elapsed:.1f} s{why}", self.err)
            return EXIT_INCOMPLETE
        return EXIT_OK

    def _timed_out_listing(self) -> int:
        print_error(self.prog, f"no answer from the server within {self.elapsed:.1f} s",
                    self.err)
        return EXIT_ERROR

    def report(self) -> dict[str, Any]:
        per = {e: s.figures(self.decode) for e, s in sorted(self.streams.items())}
        latencies = sorted(v for s in self.streams.values() for v in s.latencies_ms)
        p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
        client = self.client
        report: dict[str, Any] = {
            "frames": self.total_frames,
            "bytes": sum(s.bytes for s in self.streams.values()),
            "keyframes": sum(s.keyframes for s in self.streams.values()),
            "gaps": sum(p["gaps"] for p in per.values()),
            "latency_p50_ms": None if p50 is None else round(p50, 3),
            "latency_p99_ms": None if p99 is None else round(p99, 3),
            "decoded_frames": None,
            "decode_errors": None,
            "duration_s": round(self.elapsed, 3),
            "frames_target": self.frames_target,
            "completed": self.frames_target is None or self.total_frames >= self.frames_target,
            "interrupted": self.interrupted,
            "reconnects": max(0, client.home.connects - 1) if client is not None else 0,
            "servers_used": sorted((s for s, n in client.frames_by_server.items() if n),
                                   key=natural_key) if client is not None else [],
            "moves": client.moves if client is not None else 0,
            "encoders": per,
        }
        if self.decode:
            report["decoded_frames"] = sum(p["decoded_frames"] for p in per.values())
            report["decode_errors"] = sum(p["decode_errors"] for p in per.values())
        if self.writer is not None:
            report["out"] = {"path": self.writer.path, "encoder": self.out_encoder,
                             "frames": self.writer.samples_written,
                             "bytes": self.writer.bytes_written}
        return report

    def _print_summary(self, report: dict[str, Any]) -> None:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} ms"

        lines = [f"{report['frames']} frames, {report['bytes']} bytes, {report['keyframes']} "
                 f"keyframes, {report['gaps']} gaps in {report['duration_s']:.1f} s; latency "
                 f"p50 {ms(report['latency_p50_ms'])}, p99 {ms(report['latency_p99_ms'])}"]
        if self.decode:
            lines.append(f"decoded {report['decoded_frames']} frames, "
                         f"{report['decode_errors']} decode errors")
        for encoder_id, p in report["encoders"].items():
            lines.append(f"  {encoder_id}: {p['frames']} frames, {p['keyframes']} keyframes, "
                         f"{p['gaps']} gaps, p50 {ms(p['latency_p50_ms'])}")
        if report["servers_used"]:
            lines.append(f"video from {', '.join(report['servers_used'])}; "
                         f"{report['moves']} move(s) to another server")
        if "out" in report:
            lines.append(f"wrote {report['out']['frames']} frames of "
                         f"{report['out']['encoder']} to {report['out']['path']}")
        for line in lines:
            self.out.write(line + "\n")


def build_run(argv: Sequence[str] | None, reactor: Any, out: IO[str], err: IO[str],
              wallclock: Callable[[], float] = time.time,
              **client_kwargs: Any) -> tuple[ViewerRun, argparse.Namespace]:
    """Parse ``argv`` and make the run (raises SystemExit(2) on a bad command line)."""
    parser = build_parser()
    args = parser.parse_args(
        join_option_values(sys.argv[1:] if argv is None else argv, ("--password",)))
    servers = parse_servers(parser, args.server, VIEWER_PORT)
    tls = tls_config(parser, args)
    if args.list and (args.out or args.decode or args.frames or args.stats_interval):
        parser.error("--list cannot be combined with --out, --decode, --frames, "
                     "--stats-interval")
    if not args.list and args.frames is None and args.duration is None:
        parser.error("give --frames N and/or --duration SECONDS: every run is bounded")
    password = args.password
    if args.password_file is not None:
        try:
            password = read_secret_file(args.password_file, "password")
        except ToolError as e:
            parser.error(str(e))
    run = ViewerRun(reactor, servers, tls, args.account, password, out=out, err=err,
                    watch=args.watch or (), watch_all=args.watch_all, list_only=args.list,
                    out_path=args.out, decode=args.decode, frames=args.frames,
                    duration=args.duration, json_output=args.json,
                    stats_interval=args.stats_interval, wallclock=wallclock,
                    client_kwargs=client_kwargs)
    return run, args


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ev-viewer`` command; returns the exit status."""
    return tool_main(PROG, build_run, argv, (MediaError,))


if __name__ == "__main__":
    sys.exit(main())
