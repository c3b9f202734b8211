"""The failover benchmark: how long until video is back after a server dies.

Run ``python -m evserver.tools.failover --trials 5 --json`` (``ev-bench
failover``).  It starts a real local cluster (:class:`LocalCluster`, plain
TCP unless ``--tls``), one child process running every encoder (encoder
``i`` tries the servers starting with server ``i mod N``, so they spread
evenly) and one child process running the viewers (``ClusterViewer``,
``--viewers-per-server`` homed on each server, each watching every encoder).
Then, per trial and per fault:

1. wait until the cluster is whole and every viewer receives every encoder;
2. pick the server hosting the most encoders and SIGKILL it (``kill``) or
   SIGSTOP it (``stop``, a silent death), noting the instant ``T``;
3. the viewer child reports, for every (viewer, encoder) pair, when the
   first frame captured after ``T`` arrived (the encoders stamp each frame
   with its capture time); the trial's figure is the longest of these
   delays over the pairs whose encoder the faulted server hosted (the
   other pairs are reported too, as ``others_max_s``);
4. bring the server back (a stopped one is thawed first) and wait until
   the cluster is whole again.

The result per fault is ``{"p50_s", "p99_s", "max_s", "trials", ...}``
(nearest-rank percentiles over the trials); ``--json`` prints
``{"kill": {...}, "stop": {...}}``.  Every wait is bounded; every process
is stopped at the end, also on errors.

The children are entry points of this module too (``_encoders`` and
``_viewers``); they print one JSON object per line (see
:class:`EncoderChild` and :class:`ViewerChild`) and end when their
standard input closes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from evserver.tools.cluster import ClusterError, LocalCluster, encoder_ids
from evserver.tools.common import (
    EXIT_ERROR,
    EXIT_OK,
    ArgumentParser,
    bitrate,
    positive_float,
    positive_int,
    print_error,
)
from evserver.tools.procs import ProcessError, spawn_tool, stop_process

PROG = "ev-bench failover"
FAULTS = ("kill", "stop")
#: A pair is "live" if it received a frame this recently.
LIVE_WINDOW = 1.0
#: Seconds the whole set-up (cluster, clients, first video) may take.
SETUP_TIMEOUT = 60.0
#: Seconds a trial may take from the fault to video back at every viewer.
TRIAL_TIMEOUT = 20.0
#: Seconds for the cluster and the clients to be whole again after a trial.
RECOVER_TIMEOUT = 45.0
#: A thawed server is left running this long before it is restarted.
THAW_TIME = 1.0
STATUS_INTERVAL = 0.25
ENCODER_PREFIX = "enc"


# --------------------------------------------------------------------------
# Child processes (they run a reactor)


class _Emitter:
    """Writes one JSON object per line to the child's standard output."""

    def __init__(self) -> None:
        self.transport: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        line = (json.dumps(event, sort_keys=True) + "\n").encode()
        if self.transport is not None:
            self.transport.write(line)
        else:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _rotated(servers: Sequence[Any], first: int) -> list[Any]:
    k = first % len(servers)
    return list(servers[k:]) + list(servers[:k])


class EncoderChild:
    """Many encoders in one process, encoder ``i`` trying server ``i mod N`` first.

    Events: ``{"event": "session", "id", "server", "t"}`` on every
    (re)connection, ``{"event": "status", "online", "streaming", "hosts"}``
    every STATUS_INTERVAL, ``{"event": "error", "id", "error"}`` when an
    encoder gives up.
    """

    def __init__(self, reactor: Any, servers: list[Any], tls: Any,
                 encoders: Sequence[tuple[str, str]], emit: Callable[[dict[str, Any]], None],
                 fps: float = 25.0, bitrate_bps: int = 200_000, keyframe_interval: int = 25,
                 rate: float = 100.0) -> None:
        from evserver.media import SyntheticSource
        from evserver.net.client import EncoderClient

        self.reactor = reactor
        self.emit = emit
        self.rate = rate
        self.clients: list[Any] = []
        for i, (encoder_id, secret) in enumerate(encoders):
            source = SyntheticSource(bitrate_bps, fps, keyframe_interval, seed=i)
            client = EncoderClient(reactor, _rotated(servers, i), encoder_id, secret, source,
                                   tls)
            client.on_session = self._session_callback(client)
            client.on_final_error = self._error_callback(client)  # type: ignore[assignment]
            self.clients.append(client)
        self._calls: list[Any] = []

    def _session_callback(self, client: Any) -> Callable[[], None]:
        def session() -> None:
            self.emit({"event": "session", "id": client.encoder_id, "server": client.server_id,
                       "t": time.time()})
        return session

    def _error_callback(self, client: Any) -> Callable[[Any], None]:
        def error(e: Any) -> None:
            self.emit({"event": "error", "id": client.encoder_id, "error": str(e)})
        return error

    def start(self) -> None:
        for i, client in enumerate(self.clients):
            self._calls.append(self.reactor.callLater(i / self.rate, self._start_one, client))
        self._calls.append(self.reactor.callLater(STATUS_INTERVAL, self._status))

    def _start_one(self, client: Any) -> None:
        client.start().addErrback(
            lambda f: self.emit({"event": "error", "id": client.encoder_id,
                                 "error": f.getErrorMessage()}))

    def _status(self) -> None:
        hosts = {c.encoder_id: (c.server_id if c.relay is not None else None)
                 for c in self.clients}
        self.emit({"event": "status", "t": time.time(),
                   "online": sum(1 for h in hosts.values() if h),
                   "streaming": sum(1 for c in self.clients if c.streaming),
                   "hosts": hosts})
        self._calls.append(self.reactor.callLater(STATUS_INTERVAL, self._status))

    def stop(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        for client in self.clients:
            client.stop()


@attrs.define
class _Mark:
    mark_id: int
    t: float
    pending: set[tuple[int, str]]
    delays: dict[tuple[int, str], float] = attrs.Factory(dict)


class ViewerChild:
    """Several ClusterViewers in one process, each watching every encoder.

    Viewer ``v`` is homed on server ``v mod N``.  Commands (JSON lines on
    standard input): ``{"cmd": "mark", "id": K, "t": T}`` starts timing a
    fault at wall-clock ``T``; once every pair received a frame captured
    at or after ``T`` the child prints ``{"event": "resumed", "id": K,
    "t": T, "complete": true, "delays": {"v0/enc1": seconds, ...},
    "missing": []}``; ``{"cmd": "report", "id": K}`` prints it as it is
    (``complete`` false, ``missing`` listing the pairs without video).
    ``{"event": "status", "pairs", "live", "stale", "hosts", "homes", "moves",
    "reconnects"}`` comes every STATUS_INTERVAL (``reconnects``: logins
    after the first, over every session of every viewer).
    """

    RECENT = 64

    def __init__(self, reactor: Any, servers: list[Any], tls: Any, account: str,
                 password: str, encoders: Sequence[str], viewers: int,
                 emit: Callable[[dict[str, Any]], None],
                 wallclock: Callable[[], float] = time.time) -> None:
        from evserver.net.client import ClusterViewer

        self.reactor = reactor
        self.emit = emit
        self.wallclock = wallclock
        self.encoders = list(encoders)
        self.viewers = [
            ClusterViewer(reactor, _rotated(servers, v), account, password, tls,
                          on_media=self._media_callback(v))
            for v in range(viewers)]
        self.pairs = [(v, e) for v in range(viewers) for e in self.encoders]
        self.recent: dict[tuple[int, str], collections.deque[tuple[int, float]]] = {
            pair: collections.deque(maxlen=self.RECENT) for pair in self.pairs}
        self.last: dict[tuple[int, str], float] = {}
        self.frames = 0
        self.marks: dict[int, _Mark] = {}
        #: Since when the longest pause per pair is tracked (``gaps-start``), and those pauses.
        self.gaps_since: float | None = None
        self.gaps: dict[tuple[int, str], float] = {}
        self._status_call: Any = None

    def start(self) -> None:
        for v, viewer in enumerate(self.viewers):
            viewer.start().addErrback(self._login_failed, v)
            for encoder_id in self.encoders:
                viewer.watch(encoder_id)
        self._status_call = self.reactor.callLater(STATUS_INTERVAL, self._status)

    def _login_failed(self, failure: Any, v: int) -> None:
        self.emit({"event": "error", "viewer": v, "error": failure.getErrorMessage()})

    def stop(self) -> None:
        if self._status_call is not None and self._status_call.active():
            self._status_call.cancel()
        for viewer in self.viewers:
            viewer.stop()

    def _media_callback(self, v: int) -> Callable[[str, Any], None]:
        def media(encoder_id: str, frame: Any) -> None:
            self._media(v, encoder_id, frame.capture_time_us)
        return media

    def _media(self, v: int, encoder_id: str, capture_us: int) -> None:
        pair = (v, encoder_id)
        recent = self.recent.get(pair)
        if recent is None:
            return
        now = self.wallclock()
        self.frames += 1
        if self.gaps_since is not None:
            pause = now - max(self.last.get(pair, self.gaps_since), self.gaps_since)
            if pause > self.gaps.get(pair, 0.0):
                self.gaps[pair] = pause
        self.last[pair] = now
        recent.append((capture_us, now))
        for mark in list(self.marks.values()):
            if pair in mark.pending and capture_us >= mark.t * 1e6:
                mark.delays[pair] = now - mark.t
                mark.pending.discard(pair)
                if not mark.pending:
                    self._report(mark.mark_id)

    def command(self, cmd: dict[str, Any]) -> None:
        kind = cmd.get("cmd")
        if kind == "mark":
            mark = _Mark(int(cmd["id"]), float(cmd["t"]), set(self.pairs))
            self.marks[mark.mark_id] = mark
            for pair in self.pairs:  # frames that arrived before the command did
                for capture_us, received in self.recent[pair]:
                    if capture_us >= mark.t * 1e6:
                        mark.delays[pair] = received - mark.t
                        mark.pending.discard(pair)
                        break
            if not mark.pending:
                self._report(mark.mark_id)
        elif kind == "report":
            self._report(int(cmd["id"]))
        elif kind == "gaps-start":
            self.gaps_since, self.gaps = self.wallclock(), {}
        elif kind == "gaps":
            self._report_gaps(int(cmd["id"]))

    def _report_gaps(self, report_id: int) -> None:
        """The longest pause of each pair since ``gaps-start`` (ongoing pauses included)."""
        now = self.wallclock()
        since = self.gaps_since if self.gaps_since is not None else now
        pauses = {pair: max(self.gaps.get(pair, 0.0),
                            now - max(self.last.get(pair, since), since))
                  for pair in self.pairs}
        worst = max(pauses, key=lambda pair: pauses[pair], default=None)
        self.emit({"event": "gaps", "id": report_id, "since": since, "t": now,
                   "max_gap_s": pauses[worst] if worst is not None else 0.0,
                   "worst": f"v{worst[0]}/{worst[1]}" if worst is not None else None})

    def _report(self, mark_id: int) -> None:
        mark = self.marks.pop(mark_id, None)
        if mark is None:
            return
        self.emit({"event": "resumed", "id": mark.mark_id, "t": mark.t,
                   "complete": not mark.pending,
                   "delays": {f"v{v}/{e}": d for (v, e), d in sorted(mark.delays.items())},
                   "missing": sorted(f"v{v}/{e}" for v, e in mark.pending)})

    def _status(self) -> None:
        now = self.wallclock()
        stale = [f"v{v}/{e}" for v, e in self.pairs if now - self.last.get((v, e), 0) > LIVE_WINDOW]
        first = self.viewers[0] if self.viewers else None
        self.emit({
            "event": "status", "t": now, "pairs": len(self.pairs),
            "live": len(self.pairs) - len(stale), "stale": stale[:8], "frames": self.frames,
            "hosts": {e: (first.infos[e].server_id if first is not None and e in first.infos
                          else None) for e in self.encoders},
            "homes": [v.home.server_id for v in self.viewers],
            "moves": sum(v.moves for v in self.viewers),
            "reconnects": sum(max(0, s.connects - 1) for v in self.viewers
                              for s in {id(x): x for x in (v.home, *v.sessions.values())}
                              .values()),
        })
        self._status_call = self.reactor.callLater(STATUS_INTERVAL, self._status)


def _child_main(kind: str, argv: Sequence[str]) -> int:
    """Entry point of a child: ``_encoders`` or ``_viewers`` with its options."""
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    from evserver.net.client import Address, TLSConfig

    parser = argparse.ArgumentParser(prog=f"{PROG} {kind}")
    parser.add_argument("--server", action="append", required=True)
    parser.add_argument("--ca")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--secrets-file")
    parser.add_argument("--encoders", required=True, help="comma-separated encoder ids")
    parser.add_argument("--viewers", type=int, default=1)
    parser.add_argument("--account", default="demo")
    parser.add_argument("--password", default="demo")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--bitrate", type=int, default=200_000)
    parser.add_argument("--verbose", action="store_true",
                        help="log the clients' events to standard error")
    args = parser.parse_args(argv)
    if args.verbose:
        from evserver.tools.common import start_logging

        start_logging(True)
    servers = [Address.parse(s, 0) for s in args.server]
    tls = TLSConfig(enabled=False) if args.plain else TLSConfig(enabled=True, ca=args.ca)
    ids = [e for e in args.encoders.split(",") if e]
    emit = _Emitter()
    worker: EncoderChild | ViewerChild
    if kind == "_encoders":
        with open(args.secrets_file, encoding="utf-8") as f:
            secrets = json.load(f)
        worker = EncoderChild(reactor, servers, tls, [(e, secrets[e]) for e in ids], emit,
                              fps=args.fps, bitrate_bps=args.bitrate)
    else:
        worker = ViewerChild(reactor, servers, tls, args.account, args.password, ids,
                             args.viewers, emit)

    class Commands(LineReceiver):
        delimiter = b"\n"

        def connectionMade(self) -> None:
            emit.transport = self.transport
            worker.start()

        def lineReceived(self, line: bytes) -> None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                cmd = json.loads(line)
                if isinstance(worker, ViewerChild) and isinstance(cmd, dict):
                    worker.command(cmd)

        def connectionLost(self, reason: Any = None) -> None:
            worker.stop()
            if reactor.running:
                reactor.callLater(0.05, reactor.stop)

    stdio.StandardIO(Commands())
    reactor.run()
    return 0


# --------------------------------------------------------------------------
# The parent: a child's events


class Child:
    """A child process whose standard output is read by a thread, event by event."""

    def __init__(self, name: str, process: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.process = process
        self.cond = threading.Condition()
        self.status: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            with self.cond:
                if event.get("event") == "status":
                    self.status = event
                else:
                    self.events.append(event)
                    if event.get("event") == "error":
                        self.errors.append(event)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(cmd) + "\n").encode())
        self.process.stdin.flush()

    def wait_for(self, predicate: Callable[[Child], Any], timeout: float) -> Any:
        """Wait until ``predicate(self)`` is true (returned); None after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate(self)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    return predicate(self) or None
                self.cond.wait(min(left, 0.25))

    def event(self, kind: str, **match: Any) -> dict[str, Any] | None:
        for event in reversed(self.events):
            if event.get("event") == kind and all(event.get(k) == v for k, v in match.items()):
                return event
        return None

    def close(self) -> int:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            status = self.process.wait(5)
        except subprocess.TimeoutExpired:
            status = stop_process(self.process)
        self._thread.join(2)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return status


# --------------------------------------------------------------------------
# The benchmark


class BenchError(Exception):
    """The benchmark could not run (set-up failed, the cluster did not recover)."""


@attrs.define
class Trial:
    fault: str
    target: str
    encoders_moved: int
    resume_s: float | None  # None: some affected pair never resumed within the timeout
    others_max_s: float | None
    missing: list[str]

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(trials: Sequence[Trial], timeout: float = TRIAL_TIMEOUT) -> dict[str, Any]:
    """``{"p50_s", "p99_s", "max_s", "trials", ...}`` of one fault's trials.

    A trial where some pair never resumed counts as ``timeout`` seconds and
    is counted in ``timeouts``.
    """
    values = [t.resume_s if t.resume_s is not None else timeout for t in trials]
    if not values:
        return {"p50_s": None, "p99_s": None, "max_s": None, "trials": 0, "timeouts": 0,
                "samples_s": []}
    return {
        "p50_s": round(percentile(values, 50), 3),
        "p99_s": round(percentile(values, 99), 3),
        "max_s": round(max(values), 3),
        "trials": len(values),
        "timeouts": sum(1 for t in trials if t.resume_s is None),
        "samples_s": [round(v, 3) for v in values],
        "encoders_moved": [t.encoders_moved for t in trials],
        "others_max_s": [None if t.others_max_s is None else round(t.others_max_s, 3)
                         for t in trials],
    }


class FailoverBench:
    """A local cluster with encoders and viewers, and faults injected into it.

    ``cluster`` may be given (not started yet; its size, root and TLS then
    apply), e.g. with servers in network namespaces; ``client_prefix`` runs
    the client processes through a command (``ip netns exec NS``).  With
    ``ev_encoder`` the encoders run as one ``ev-encoder`` process per server
    (its share, ``--server`` listing every server from its own) instead of
    one child process.
    """

    def __init__(self, *, servers: int = 3, encoders: int = 30, viewers_per_server: int = 1,
                 tls: bool = False, fps: float = 25.0, bitrate_bps: int = 200_000,
                 root: Path | None = None, trial_timeout: float = TRIAL_TIMEOUT,
                 log: Callable[[str], None] | None = None, cluster: LocalCluster | None = None,
                 ev_encoder: bool = False, client_prefix: Sequence[str] = (),
                 verbose: bool = False, watched: int | None = None) -> None:
        if cluster is not None:
            servers, root, tls = cluster.size, cluster.root, cluster.tls
        if servers < 2:
            raise BenchError("a failover needs at least 2 servers")
        self.size = servers
        self.encoder_count = encoders
        self.viewer_count = viewers_per_server * servers
        self.tls = tls
        self.fps = fps
        self.bitrate_bps = bitrate_bps
        self.temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="ev-failover-")) if root is None else root
        self.trial_timeout = trial_timeout
        self.log = log or (lambda text: None)
        self.cluster = cluster if cluster is not None else LocalCluster(servers, self.root,
                                                                        tls=tls)
        self.ev_encoder = ev_encoder
        self.client_prefix = list(client_prefix)
        #: The clients log their events into ROOT/<child>.log.
        self.verbose = verbose
        self.encoder_ids = encoder_ids(encoders, ENCODER_PREFIX)
        #: The encoders the viewers watch (all by default; the others stay idle).
        self.watched_ids = self.encoder_ids[:watched] if watched is not None else \
            list(self.encoder_ids)
        self.encoders: Child | None = None
        self.encoder_tools: list[subprocess.Popen[bytes]] = []
        self.viewers: Child | None = None
        self._marks = 0

    # -- set-up and tear-down --------------------------------------------

    def start(self) -> None:
        c = self.cluster
        c.form()
        c.provision(self.encoder_ids)
        c.start()
        c.wait_whole()
        tls = c.client_tls_args()
        ids = ",".join(self.encoder_ids)
        watched = ",".join(self.watched_ids)
        viewer_args = [arg for k in range(self.size)
                       for arg in ("--server", c.servers[k].address("viewer"))]
        if self.ev_encoder:
            for k in range(self.size):
                self.encoder_tools.append(self._spawn_encoder_tool(k, tls))
        else:
            encoder_args = [arg for k in range(self.size)
                            for arg in ("--server", c.servers[k].address("encoder"))]
            self.encoders = self._spawn("encoders", [
                "_encoders", *encoder_args, *tls, "--secrets-file", str(c.secrets_path),
                "--encoders", ids, "--fps", str(self.fps), "--bitrate", str(self.bitrate_bps)])
        self.viewers = self._spawn("viewers", [
            "_viewers", *viewer_args, *tls, "--encoders", watched,
            "--viewers", str(self.viewer_count)])
        self.wait_steady(SETUP_TIMEOUT)

    def _spawn(self, name: str, args: list[str]) -> Child:
        if self.verbose:
            args = [*args, "--verbose"]
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            process = spawn_tool("failover", args, stdout=subprocess.PIPE, stderr=log,
                                 stdin=subprocess.PIPE, command_prefix=self.client_prefix)
        finally:
            log.close()
        return Child(name, process)

    def _spawn_encoder_tool(self, k: int, tls: list[str]) -> subprocess.Popen[bytes]:
        c = self.cluster
        mine = self.encoder_ids[k::self.size]
        log = open(self.root / f"ev-encoder-{k + 1}.log", "ab")  # noqa: SIM115
        try:
            return spawn_tool("encoder", [
                *(a for address in c.addresses("encoder", k) for a in ("--server", address)),
                *tls, "--secrets-file", str(c.secrets_path),
                *(a for e in mine for a in ("--id", e)), "--source", "synthetic",
                "--fps", str(self.fps), "--bitrate", str(self.bitrate_bps), "--json",
            ], stdout=log, stderr=log, command_prefix=self.client_prefix)
        finally:
            log.close()

    def close(self) -> None:
        """Stop the clients and every server (thawing a frozen one); remove a temporary root."""
        for child in (self.viewers, self.encoders):
            if child is not None:
                with contextlib.suppress(Exception):
                    child.close()
        for process in self.encoder_tools:
            with contextlib.suppress(Exception):
                stop_process(process)
        self.cluster.stop()
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FailoverBench:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- waiting ---------------------------------------------------------

    def _check_children(self) -> None:
        for child in (self.encoders, self.viewers):
            if child is not None and child.process.poll() is not None:
                raise BenchError(f"the {child.name} child exited with status "
                                 f"{child.process.returncode}; see {self.root}/{child.name}.log")
        for k, process in enumerate(self.encoder_tools):
            if process.poll() is not None:
                raise BenchError(f"ev-encoder {k + 1} exited with status {process.returncode}; "
                                 f"see {self.root}/ev-encoder-{k + 1}.log")

    def steady_problems(self) -> list[str]:
        """Why the clients are not all streaming yet; [] when they are."""
        assert self.viewers is not None
        problems = []
        if self.encoders is not None:
            enc = self.encoders.status
            if enc is None or enc["online"] < self.encoder_count:
                problems.append(f"encoders online: {enc['online'] if enc else 0}/"
                                f"{self.encoder_count}")
        view = self.viewers.status
        if view is None or view["live"] < view["pairs"]:
            problems.append(f"viewer/encoder pairs receiving: "
                            f"{view['live'] if view else 0}/{view['pairs'] if view else '?'}"
                            + (f" (e.g. {', '.join(view['stale'][:3])})" if view else ""))
        elif not all(view["hosts"].values()):
            problems.append("the viewers do not know where every encoder is yet")
        return problems

    def wait_steady(self, timeout: float) -> None:
        """Wait until every encoder is online and every pair receives video."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_children()
            problems = self.steady_problems()
            if not problems:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"not steady after {timeout:.0f} s: {'; '.join(problems)}")
            time.sleep(0.1)

    def hosts(self) -> dict[str, str | None]:
        """Which server hosts each encoder (the encoders' word, else the viewers')."""
        source = self.encoders if self.encoders is not None else self.viewers
        assert source is not None and source.status is not None
        return dict(source.status["hosts"])

    # -- one trial -------------------------------------------------------

    def trial(self, fault: str, target: int | None = None, recover: bool = True,
              inject: Callable[[int], None] | None = None) -> Trial:
        """One fault on the busiest server (or server ``target``), timed.

        With ``recover`` the server is back and the cluster whole before this
        returns; else the caller calls :meth:`recover` (or :meth:`close`).
        ``inject(index)`` replaces the signal (e.g. cutting a network link).
        """
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, not {fault!r}")
        assert self.viewers is not None
        self.wait_steady(RECOVER_TIMEOUT)
        hosts = self.hosts()
        if target is None:
            counts = collections.Counter(h for h in hosts.values() if h)
            target_id = counts.most_common(1)[0][0]
        else:
            target_id = self.cluster.server_ids[target]
        affected = {e for e, h in hosts.items() if h == target_id}
        moved = len(affected)
        index = self.cluster.index_of(target_id)
        server = self.cluster.servers[index]
        self._marks += 1
        mark_id = self._marks
        t = time.time()
        if inject is not None:
            inject(index)
        elif fault == "kill":
            server.signal(signal.SIGKILL)
        else:
            server.signal(signal.SIGSTOP)
        self.viewers.send({"cmd": "mark", "id": mark_id, "t": t})
        report = self.viewers.wait_for(lambda c: c.event("resumed", id=mark_id),
                                       self.trial_timeout)
        if report is None:
            self.viewers.send({"cmd": "report", "id": mark_id})
            report = self.viewers.wait_for(lambda c: c.event("resumed", id=mark_id), 5.0)
        if report is None:
            raise BenchError("the viewer child does not report")
        affected_delays = [d for pair, d in report["delays"].items()
                           if pair.split("/", 1)[1] in affected]
        other_delays = [d for pair, d in report["delays"].items()
                        if pair.split("/", 1)[1] not in affected]
        missing = list(report["missing"])
        if any(p.split("/", 1)[1] in affected for p in missing):
            resume: float | None = None
        else:
            resume = max(affected_delays, default=0.0)
        result = Trial(fault, server.name, moved, resume,
                       max(other_delays) if other_delays else None, missing)
        self.log(f"{fault} {server.name} (hosting {moved} encoders): video back at every "
                 f"viewer in " + (f"{resume:.3f} s" if resume is not None else
                                  f"NOT within {self.trial_timeout:g} s ({len(missing)} pairs "
                                  f"missing, e.g. {missing[:3]})"))
        if recover:
            self.recover(index, fault)
        return result

    def recover(self, index: int, fault: str) -> None:
        """Bring server ``index`` back (thawed first if stopped) and wait until all is whole."""
        server = self.cluster.servers[index]
        if fault == "stop":
            server.thaw()
            time.sleep(THAW_TIME)
        self.cluster.restart(index)
        self.cluster.wait_whole(RECOVER_TIMEOUT)
        self.wait_steady(RECOVER_TIMEOUT)

    def run(self, trials: int, faults: Sequence[str] = FAULTS) -> dict[str, dict[str, Any]]:
        results: dict[str, list[Trial]] = {fault: [] for fault in faults}
        for n in range(trials):
            for fault in faults:
                self.log(f"trial {n + 1}/{trials}:")
                results[fault].append(self.trial(fault))
        return {fault: summarize(ts, self.trial_timeout) for fault, ts in results.items()}


def run_failovers(trials: int, faults: Sequence[str] = FAULTS, **kwargs: Any
                  ) -> dict[str, dict[str, Any]]:
    """Every fault of ``faults`` ``trials`` times on one cluster: ``{fault: summary}``."""
    with FailoverBench(**kwargs) as bench:
        return bench.run(trials, faults)


def run_failover(trials: int, fault: str, servers: int = 3, encoders: int = 30,
                 viewers_per_server: int = 1, **kwargs: Any) -> dict[str, Any]:
    """``trials`` trials of one fault ("kill" or "stop"): ``{"p50_s", "p99_s", "max_s",
    "trials", ...}``.  Other keyword arguments go to :class:`FailoverBench`."""
    return run_failovers(trials, (fault,), servers=servers, encoders=encoders,
                         viewers_per_server=viewers_per_server, **kwargs)[fault]


# --------------------------------------------------------------------------
# Command line


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Measure failover on a real local cluster: SIGKILL (kill) or SIGSTOP "
                    "(stop) the busiest server and time until every viewer receives video "
                    "from every encoder again.")
    parser.add_argument("--trials", type=positive_int, default=5, help="trials per fault")
    parser.add_argument("--fault", action="append", choices=FAULTS,
                        help="kill and/or stop (repeatable; default both)")
    parser.add_argument("--servers", type=positive_int, default=3)
    parser.add_argument("--encoders", type=positive_int, default=30)
    parser.add_argument("--viewers-per-server", type=positive_int, default=1)
    parser.add_argument("--fps", type=positive_float, default=25.0)
    parser.add_argument("--bitrate", type=bitrate, default=200_000, metavar="BPS",
                        help="per encoder (default 200k)")
    parser.add_argument("--tls", action="store_true", help="TLS for clients (default plain TCP)")
    parser.add_argument("--trial-timeout", type=positive_float, default=TRIAL_TIMEOUT,
                        metavar="SECONDS")
    parser.add_argument("--data", metavar="DIR", help="keep the cluster's files here")
    parser.add_argument("--verbose", action="store_true",
                        help="with --data: the clients log their events into DIR/*.log")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def guarded_run(prog: str, data: str | None,
                run: Callable[[Path | None, Callable[[str], None]], dict[str, Any]],
                err: IO[str]) -> dict[str, Any] | None:
    """Run a benchmark for a command line: ``run(root, log)`` with ``--data``'s folder
    (made if needed) and progress lines on ``err``; SIGTERM stops it like Ctrl-C.
    Returns its result, or None after printing why it failed."""
    def log(text: str) -> None:
        err.write(f"{prog}: {text}\n")
        err.flush()

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        root = Path(data).absolute() if data else None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        return run(root, log)
    except (BenchError, ClusterError, ProcessError, OSError) as e:
        lines = str(e).splitlines() or [type(e).__name__]
        print_error(prog, lines[0], err)
        if len(lines) > 1:
            err.write("\n".join(lines[1:]) + "\n")
        return None
    except KeyboardInterrupt:
        print_error(prog, "interrupted", err)
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None, out: IO[str] = sys.stdout,
         err: IO[str] = sys.stderr) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_encoders", "_viewers"):
        return _child_main(argv[0], argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    faults = tuple(dict.fromkeys(args.fault or FAULTS))

    def run(root: Path | None, log: Callable[[str], None]) -> dict[str, Any]:
        return run_failovers(args.trials, faults, servers=args.servers,
                             encoders=args.encoders,
                             viewers_per_server=args.viewers_per_server, tls=args.tls,
                             fps=args.fps, bitrate_bps=args.bitrate, root=root,
                             trial_timeout=args.trial_timeout, log=log,
                             verbose=args.verbose)

    result = guarded_run(PROG, args.data, run, err)
    if result is None:
        return EXIT_ERROR
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        for fault, r in result.items():
            out.write(f"{fault}: p50 {r['p50_s']} s, p99 {r['p99_s']} s, max {r['max_s']} s "
                      f"over {r['trials']} trials ({r['timeouts']} timed out); samples "
                      f"{r['samples_s']}\n")
    out.flush()
    bad = any(r["timeouts"] for r in result.values())
    return EXIT_ERROR if bad else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
