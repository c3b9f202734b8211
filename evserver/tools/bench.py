"""``ev-bench relay``: measure one real ``twistd evserver`` on loopback.

The server runs alone in its own process (``twistd -n evserver --plain``
with every port on 127.0.0.1, started by
:class:`evserver.tools.procs.ServerProcess`); load comes from separate
load-generator processes that run the package's own clients
(``EncoderClient`` with a ``SyntheticSource``, a ``ViewerClient`` that only
counts), so the figures read from ``/proc`` are the server's own.
Scenarios:

``fanout``
    one encoder to ``--viewers`` viewers;
``streams``
    ``--streams`` encoders, each to its own viewer;
``idle``
    ``--idle`` encoders connected (control and relay connection each), no
    viewers: the server's RSS before and after, and per idle encoder.

Each scenario starts a fresh server, connects its clients, waits
``--warmup`` seconds and then measures ``--duration`` seconds.  Everything is
bounded in time and every child process is stopped at the end, also on
errors or Ctrl-C.

The same module is the load generator: ``python -m evserver.tools.bench
_loadgen SPEC.json`` (internal; driven line by line over stdin/stdout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import select
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from evserver import __version__
from evserver.net.client import ViewerClient
from evserver.tools.procs import ProcessError, ServerProcess, child_env
from evserver.wire import messages as m

DEFAULT_DURATION = 10.0
DEFAULT_WARMUP = 2.0
DEFAULT_VIEWERS = 50
DEFAULT_STREAMS = 50
DEFAULT_IDLE = 1000
DEFAULT_BITRATE = 2_000_000
DEFAULT_FPS = 25.0
DEFAULT_KEYFRAME_INTERVAL = 50
DEFAULT_SAMPLE_EVERY = 5
SCENARIOS = ("fanout", "streams", "idle")

#: Bitrate of the sources of idle encoders: they never stream, so keep the
#: generator's memory small.
IDLE_BITRATE = 64_000
#: Clients started at once by a load generator (the server's listen backlog
#: is 50 by default; more at once would make the kernel drop SYNs).
CONNECT_BATCH = 50
#: Seconds allowed for the clients of a generator to connect.
CONNECT_TIMEOUT = 120.0
#: Seconds a child gets to stop after a polite request before it is killed.
STOP_GRACE = 5.0

ACCOUNT = "bench-viewer"
PASSWORD = "bench-password-not-secret"
DOMAIN = "bench"
HOST = "127.0.0.1"

# Offsets in a media frame's body: stream_id u32, codec u8, flags u8,
# timestamp_us u64, capture_time_us u64.
_FLAGS_AT = 5
_CAPTURE_AT = m.MEDIA_OVERHEAD - 8
_U64 = struct.Struct("!Q")


class BenchError(Exception):
    """The benchmark could not run (server did not start, clients refused...)."""


# --------------------------------------------------------------------------
# /proc


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def parse_proc_stat_times(text: str, ticks_per_second: int) -> tuple[float, float]:
    """(utime, stime) in seconds from the text of ``/proc/PID/stat``."""
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) / ticks_per_second, int(fields[12]) / ticks_per_second


def parse_proc_stat_cpu(text: str, ticks_per_second: int) -> float:
    """utime + stime, in seconds, from the text of ``/proc/PID/stat``."""
    return sum(parse_proc_stat_times(text, ticks_per_second))


def proc_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds (all threads) the process has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return parse_proc_stat_times(f.read(), _clock_ticks())


def proc_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process has used so far."""
    return sum(proc_cpu_times(pid))


def parse_proc_status_kib(text: str, field: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/PID/status``, in KiB."""
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {field} in /proc status")


def proc_status_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        return parse_proc_status_kib(f.read(), field)


def proc_open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_nofile_soft_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a running process (None if unlimited or unknown)."""
    try:
        with open(f"/proc/{pid}/limits", encoding="ascii") as f:
            for line in f:
                if line.startswith("Max open files"):
                    value = line[len("Max open files") :].split()[0]
                    return None if value == "unlimited" else int(value)
    except OSError:
        pass
    return None


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the new soft limit.

    Children (server and load generators) inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _loadavg() -> float | None:
    """The 1-minute load average: other work on the machine skews the figures."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    import twisted

    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii",
                                             errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "evserver": __version__,
    }


# --------------------------------------------------------------------------
# Figures


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of every numeric figure over ``runs``, plus the runs themselves."""
    summary: dict[str, Any] = {}
    for key in runs[0]:
        values = [run.get(key) for run in runs]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numbers) == len(values):
            finite = [float(v) for v in numbers if math.isfinite(v)]
            med = statistics.median(finite) if finite else math.nan
            summary[key] = _round(med) if any(isinstance(v, float) for v in numbers) else (
                int(med) if float(med).is_integer() else _round(med))
        else:
            summary[key] = values[0]
    summary["runs"] = runs
    return summary


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _round(value: float, digits: int = 3) -> float:
    if not math.isfinite(value):
        return value
    if value == 0:
        return 0.0
    # Three significant decimals for small figures, one for large ones.
    return round(value, digits if abs(value) < 100 else 1)


def delivery_figures(
    stats: list[dict[str, Any]], cpu_seconds: float, offered_fps: float
) -> dict[str, Any]:
    """Delivered rate, latency and CPU per GB from the viewers' window statistics."""
    frames = sum(s["frames"] for s in stats)
    payload = sum(s["bytes"] for s in stats)
    # Each generator measured its own window; add up their rates.
    fps = sum(s["frames"] / s["elapsed_s"] for s in stats if s["elapsed_s"] > 0)
    bps = sum(s["bytes"] * 8 / s["elapsed_s"] for s in stats if s["elapsed_s"] > 0)
    latencies = [us / 1000.0 for s in stats for us in s["latencies_us"]]
    per_viewer = [n for s in stats for n in s["per_client_frames"]]
    return {
        "delivered_mbps": _round(bps / 1e6),
        "frames_per_s": _round(fps),
        "expected_frames_per_s": _round(offered_fps),
        "delivery_ratio": _round(fps / offered_fps) if offered_fps else math.nan,
        "frames": frames,
        "payload_bytes": payload,
        "viewer_frames_min": min(per_viewer) if per_viewer else 0,
        "viewer_frames_max": max(per_viewer) if per_viewer else 0,
        "keyframes": sum(s["keyframes"] for s in stats),
        "latency_p50_ms": _round(percentile(latencies, 50)),
        "latency_p99_ms": _round(percentile(latencies, 99)),
        "latency_max_ms": _round(max(latencies)) if latencies else math.nan,
        "latency_samples": len(latencies),
        "server_cpu_s_per_gb": _round(cpu_seconds / (payload / 1e9)) if payload else math.nan,
        "reconnects": sum(s["reconnects"] for s in stats),
    }


# --------------------------------------------------------------------------
# Child processes (parent side)


def _killed_with_parent() -> None:
    """In the child (Linux): SIGKILL when the bench dies, so no generator is orphaned."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Child:
    """A load-generator process, driven by JSON lines on its stdin and stdout.

    Its stderr goes to ``log_path``.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._buf = bytearray()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops the children
                preexec_fn=_killed_with_parent,
            )
        except OSError as e:
            self._log.close()
            raise BenchError(f"cannot start {name} ({argv[0]}): {e}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command.encode("ascii") + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise BenchError(f"{self.name} is gone (status {self.proc.poll()})"
                             f"{self.log_tail()}") from None

    def read_event(self, expected: str, timeout: float) -> dict[str, Any]:
        """Read lines until an event named ``expected``; raise BenchError on errors."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "error":
                    raise BenchError(f"{self.name}: {event.get('message')}")
                if event.get("event") == expected:
                    return dict(event)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.name}: no {expected!r} within {timeout:.0f} s"
                                 f"{self.log_tail()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=STOP_GRACE)
                    raise BenchError(f"{self.name} exited with status {self.proc.returncode}"
                                     f" before {expected!r}{self.log_tail()}")
                self._buf += chunk

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            self._log.flush()
            text = self.log_path.read_text(errors="replace").strip().splitlines()
            if text:
                return f"\n--- last lines of {self.log_path}:\n" + "\n".join(text[-lines:])
        return ""

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Ask the generator to quit (it closes its clients); kill it after ``grace``."""
        try:
            if self.alive():
                assert self.proc.stdin is not None
                with contextlib.suppress(OSError):
                    self.proc.stdin.write(b"quit\n")
                    self.proc.stdin.flush()
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=grace)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            self._log.close()


def _server_pid(server: ServerProcess) -> int:
    pid = server.pid
    if pid is None or not server.running:
        raise BenchError(f"the server is not running (status {server.returncode})\n"
                         f"{server.log_tail()}")
    return pid


# --------------------------------------------------------------------------
# Fixture: the data directory


@attrs.frozen
class Fixture:
    data_dir: Path
    encoders: tuple[tuple[str, str], ...]  # (encoder id, secret)


def make_fixture(data_dir: Path, encoders: int) -> Fixture:
    """A data directory with one domain, one viewer account and ``encoders`` encoders."""
    from evserver.store import Store

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = []
    with Store.in_data_dir(data_dir) as store:
        store.add_domain(DOMAIN)
        store.add_account(DOMAIN, ACCOUNT, PASSWORD)
        for i in range(encoders):
            _, secret = store.add_encoder(DOMAIN, f"bench-{i:04d}", f"Bench camera {i}")
            made.append((f"bench-{i:04d}", secret))
    return Fixture(data_dir, tuple(made))


# --------------------------------------------------------------------------
# The benchmark (parent side)


@attrs.frozen
class Params:
    duration: float = DEFAULT_DURATION
    warmup: float = DEFAULT_WARMUP
    viewers: int = DEFAULT_VIEWERS
    streams: int = DEFAULT_STREAMS
    idle: int = DEFAULT_IDLE
    bitrate: int = DEFAULT_BITRATE
    fps: float = DEFAULT_FPS
    keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL
    sample_every: int = DEFAULT_SAMPLE_EVERY
    viewer_procs: int = 1
    repeat: int = 1
    scenarios: tuple[str, ...] = SCENARIOS


def _progress(message: str) -> None:
    print(f"ev-bench: {message}", file=sys.stderr, flush=True)


class Bench:
    """Runs the scenarios; owns the work directory and every child process."""

    def __init__(self, params: Params, work_dir: Path, twistd: str | None = None) -> None:
        self.params = params
        self.work_dir = work_dir
        self.twistd = twistd
        self.children: list[Child] = []
        self.servers: list[ServerProcess] = []
        needed = max(1 if "fanout" in params.scenarios else 0,
                     params.streams if "streams" in params.scenarios else 0,
                     params.idle if "idle" in params.scenarios else 0)
        self.fixture = make_fixture(work_dir / "data", needed)
        self._gen_count = 0
        self.server_command = ""

    # -- processes ---------------------------------------------------------

    def _start_server(self, label: str) -> ServerProcess:
        """A fresh ``twistd -n evserver --plain`` on free 127.0.0.1 ports."""
        server = ServerProcess(self.fixture.data_dir, host=HOST, tls=False, twistd=self.twistd,
                               log_path=self.work_dir / f"twistd-{label}.log",
                               name=f"server ({label})")
        self.servers.append(server)
        try:
            server.start()
        except ProcessError as e:
            raise BenchError(str(e)) from None
        if not self.server_command:
            self.server_command = shlex.join(server.argv())
        _progress(f"{label}: server pid {server.pid} listening on "
                  f"{HOST}:{server.ports.encoder}/{server.ports.viewer}/{server.ports.relay}")
        return server

    def _start_gen(self, label: str, spec: dict[str, Any]) -> Child:
        self._gen_count += 1
        spec_path = self.work_dir / f"gen-{self._gen_count}.json"
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, "-m", "evserver.tools.bench", "_loadgen", str(spec_path)]
        child = Child(label, argv, self.work_dir / f"gen-{self._gen_count}.log", child_env())
        self.children.append(child)
        return child

    def _spec(self, server: ServerProcess, role: str, lifetime: float,
              **extra: Any) -> dict[str, Any]:
        p = self.params
        return {
            "role": role,
            "host": HOST,
            "port": server.ports.encoder if role == "encoders" else server.ports.viewer,
            "bitrate": p.bitrate,
            "fps": p.fps,
            "keyframe_interval": p.keyframe_interval,
            "sample_every": p.sample_every,
            "account": ACCOUNT,
            "password": PASSWORD,
            "batch": CONNECT_BATCH,
            "lifetime_s": lifetime,
            **extra,
        }

    def stop_all(self) -> None:
        """Stop every load generator, then every server (idempotent)."""
        children, self.children = self.children, []
        for child in children:
            with contextlib.suppress(Exception):
                child.stop()
        servers, self.servers = self.servers, []
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()
                server.kill()

    def _lifetime(self, clients: int) -> float:
        """An upper bound on a generator's life, so it always stops by itself."""
        p = self.params
        return CONNECT_TIMEOUT + p.warmup + p.duration + 0.05 * clients + 60.0

    # -- measuring ---------------------------------------------------------

    def _window(self, server: ServerProcess, gens: list[Child],
                viewers: list[Child]) -> tuple[float, dict[str, Any], list[dict[str, Any]]]:
        """Measure ``duration`` seconds: server CPU, generators' CPU, viewers' statistics."""
        pid = _server_pid(server)
        gen_cpu0 = {g.pid: proc_cpu_seconds(g.pid) for g in gens}
        for g in gens:
            g.send("start")
        for g in gens:
            g.read_event("started", 30.0)
        user0, system0 = proc_cpu_times(pid)
        t0 = time.monotonic()
        time.sleep(self.params.duration)
        for g in gens:
            g.send("stop")
        user1, system1 = proc_cpu_times(pid)
        elapsed = time.monotonic() - t0
        gen_cpu1 = {g.pid: proc_cpu_seconds(g.pid) for g in gens}
        stats = {g.pid: g.read_event("stats", 60.0) for g in gens}
        user, system = user1 - user0, system1 - system0
        cpu = user + system
        figures = {
            "measured_s": _round(elapsed),
            "server_cpu_s": _round(cpu),
            "server_cpu_percent": _round(100.0 * cpu / elapsed),
            "server_cpu_user_percent": _round(100.0 * user / elapsed),
            "server_cpu_system_percent": _round(100.0 * system / elapsed),
            "server_rss_kib": proc_status_kib(pid, "VmRSS"),
            "server_rss_peak_kib": proc_status_kib(pid, "VmHWM"),
            "server_open_fds": proc_open_files(pid),
            "loadgen_cpu_percent": _round(
                100.0 * sum(gen_cpu1[g.pid] - gen_cpu0[g.pid] for g in gens) / elapsed),
        }
        for g in gens:
            if stats[g.pid]["role"] == "encoders":
                s = stats[g.pid]
                figures["offered_frames_per_s"] = _round(s["frames"] / s["elapsed_s"])
                figures["offered_mbps"] = _round(s["bytes"] * 8 / s["elapsed_s"] / 1e6)
        return cpu, figures, [stats[v.pid] for v in viewers]

    # -- scenarios ---------------------------------------------------------

    def run_delivery(self, scenario: str, run: int) -> dict[str, Any]:
        """fanout (one encoder, N viewers) or streams (N encoders, one viewer each)."""
        p = self.params
        label = f"{scenario}-{run}"
        if scenario == "fanout":
            encoders = self.fixture.encoders[:1]
            watch = [[encoders[0][0]] for _ in range(p.viewers)]
        else:
            encoders = self.fixture.encoders[: p.streams]
            watch = [[encoder_id] for encoder_id, _ in encoders]
        try:
            server = self._start_server(label)
            rss_start = proc_status_kib(_server_pid(server), "VmRSS")
            enc = self._start_gen(f"encoder generator ({label})", self._spec(
                server, "encoders", self._lifetime(len(encoders)),
                encoders=[list(e) for e in encoders]))
            ready = enc.read_event("ready", CONNECT_TIMEOUT)
            procs = max(1, min(p.viewer_procs, len(watch)))
            viewers = [
                self._start_gen(f"viewer generator {k + 1} ({label})", self._spec(
                    server, "viewers", self._lifetime(len(watch)), watch=watch[k::procs]))
                for k in range(procs)
            ]
            connect_s = ready["connect_s"]
            for v in viewers:
                connect_s = max(connect_s, v.read_event("ready", CONNECT_TIMEOUT)["connect_s"])
            _progress(f"{label}: {len(encoders)} encoder(s), {len(watch)} viewer(s) connected "
                      f"in {connect_s:.1f} s; warm-up {p.warmup:g} s, measuring "
                      f"{p.duration:g} s")
            time.sleep(p.warmup)
            cpu, figures, stats = self._window(server, [enc, *viewers], viewers)
        finally:
            self.stop_all()
        offered_fps = p.fps * len(watch)
        result: dict[str, Any] = {
            "encoders": len(encoders),
            "viewers": len(watch),
            "connect_s": _round(connect_s),
        }
        result.update(delivery_figures(stats, cpu, offered_fps))
        result.update(figures)
        result["server_rss_start_kib"] = rss_start
        result["expected_mbps"] = _round(p.bitrate * len(watch) / 1e6)
        _progress(f"{label}: {result['delivered_mbps']} Mbit/s, {result['frames_per_s']} "
                  f"frames/s, latency p50 {result['latency_p50_ms']} ms p99 "
                  f"{result['latency_p99_ms']} ms, server CPU {result['server_cpu_percent']} %")
        return result

    def run_idle(self, run: int) -> dict[str, Any]:
        p = self.params
        label = f"idle-{run}"
        encoders = self.fixture.encoders[: p.idle]
        try:
            server = self._start_server(label)
            time.sleep(0.5)
            pid = _server_pid(server)
            rss_before = proc_status_kib(pid, "VmRSS")
            fds_before = proc_open_files(pid)
            limit = proc_nofile_soft_limit(pid)
            if limit is not None and limit < fds_before + 2 * len(encoders) + 16:
                raise BenchError(
                    f"the server's open-file limit ({limit}) is too low for "
                    f"{len(encoders)} idle encoders (2 connections each); raise `ulimit -n`")
            enc = self._start_gen(f"encoder generator ({label})", self._spec(
                server, "encoders", self._lifetime(len(encoders)),
                encoders=[list(e) for e in encoders], bitrate=IDLE_BITRATE))
            ready = enc.read_event("ready", CONNECT_TIMEOUT)
            _progress(f"{label}: {len(encoders)} idle encoders connected in "
                      f"{ready['connect_s']:.1f} s; settling {p.warmup:g} s, measuring "
                      f"{p.duration:g} s")
            time.sleep(p.warmup)
            _cpu, figures, _stats = self._window(server, [enc], [])
        finally:
            self.stop_all()
        rss_after = figures["server_rss_kib"]
        result: dict[str, Any] = {
            "encoders": len(encoders),
            "connections": 2 * len(encoders),
            "connect_s": _round(ready["connect_s"]),
            "server_rss_before_kib": rss_before,
            "server_rss_after_kib": rss_after,
            "rss_per_idle_encoder_kib": _round((rss_after - rss_before) / len(encoders))
            if encoders else math.nan,
            "server_open_fds_before": fds_before,
            "reconnects": ready["reconnects"],
        }
        result.update(figures)
        for key in ("offered_frames_per_s", "offered_mbps"):
            result.pop(key, None)
        _progress(f"{label}: RSS {rss_before} -> {rss_after} KiB, "
                  f"{result['rss_per_idle_encoder_kib']} KiB per idle encoder, "
                  f"server CPU {result['server_cpu_percent']} %")
        return result

    def run(self) -> dict[str, Any]:
        p = self.params
        load_before = _loadavg()
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in p.scenarios}
        for k in range(1, p.repeat + 1):
            for scenario in p.scenarios:
                if scenario == "idle":
                    runs[scenario].append(self.run_idle(k))
                else:
                    runs[scenario].append(self.run_delivery(scenario, k))
        result: dict[str, Any] = {s: summarize(r) for s, r in runs.items()}
        result["params"] = {**attrs.asdict(p), "scenarios": list(p.scenarios),
                            "server_command": self.server_command,
                            "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                            "loadavg_before": load_before, "loadavg_after": _loadavg(),
                            **machine_info()}
        return result


# --------------------------------------------------------------------------
# Output


_ROWS: list[tuple[str, str, str]] = [
    # (key, label, unit)
    ("encoders", "encoders", ""),
    ("viewers", "viewers", ""),
    ("delivered_mbps", "delivered payload", "Mbit/s"),
    ("expected_mbps", "offered x viewers", "Mbit/s"),
    ("frames_per_s", "frames delivered", "1/s"),
    ("delivery_ratio", "delivered / expected frames", ""),
    ("server_cpu_percent", "server CPU", "% of a core"),
    ("server_cpu_user_percent", "  of which user", "%"),
    ("server_cpu_system_percent", "  of which system (kernel)", "%"),
    ("server_cpu_s_per_gb", "server CPU per delivered GB", "s"),
    ("latency_p50_ms", "latency p50", "ms"),
    ("latency_p99_ms", "latency p99", "ms"),
    ("server_rss_kib", "server RSS", "KiB"),
    ("server_rss_start_kib", "server RSS at start", "KiB"),
    ("server_rss_before_kib", "server RSS before", "KiB"),
    ("server_rss_after_kib", "server RSS after", "KiB"),
    ("rss_per_idle_encoder_kib", "RSS per idle encoder", "KiB"),
    ("server_open_fds", "server open files", ""),
    ("loadgen_cpu_percent", "load generators' CPU", "% of a core"),
    ("connect_s", "time to connect all clients", "s"),
    ("reconnects", "client reconnections", ""),
]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the medians, one column per scenario."""
    scenarios = [s for s in SCENARIOS if s in result]
    params = result.get("params", {})
    lines = [
        f"ev-bench relay: {params.get('repeat', 1)} run(s) per scenario, medians; "
        f"{params.get('duration', '?'):g} s measured after {params.get('warmup', '?'):g} s "
        f"warm-up; {params.get('bitrate', 0) / 1e6:g} Mbit/s at {params.get('fps', 0):g} fps, "
        f"keyframe every {params.get('keyframe_interval', '?')}",
        f"machine: {params.get('nproc')} x {params.get('cpu_model')}, Python "
        f"{params.get('python')}, Twisted {params.get('twisted')}; load average "
        f"{_fmt(params.get('loadavg_before'))} before, {_fmt(params.get('loadavg_after'))} after",
        "",
    ]
    width = max(len(f"{label} ({unit})" if unit else label) for _, label, unit in _ROWS)
    lines.append(" " * width + "".join(f"{s:>14}" for s in scenarios))
    for key, label, unit in _ROWS:
        if not any(key in result[s] for s in scenarios):
            continue
        name = f"{label} ({unit})" if unit else label
        cells = "".join(f"{_fmt(result[s].get(key)):>14}" for s in scenarios)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The load generator (child side)


@attrs.define
class _Counters:
    """What the clients of one generator received (viewers) or sent (encoders)."""

    frames: int = 0
    bytes: int = 0
    keyframes: int = 0
    latencies_us: list[int] = attrs.Factory(list)


class CountingViewer(ViewerClient):
    """A viewer that only counts: no decoding, no payload copy, latency every Nth frame."""

    def __init__(self, *args: Any, counters: _Counters, sample_every: int,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counters = counters
        self.sample_every = sample_every
        self.window_frames = 0
        self._countdown = sample_every

    def media(self, conn: Any, body: bytes) -> None:
        c = self.counters
        c.frames += 1
        c.bytes += len(body) - m.MEDIA_OVERHEAD
        self.window_frames += 1
        if body[_FLAGS_AT] & m.FLAG_KEYFRAME:
            c.keyframes += 1
        self._countdown -= 1
        if self._countdown <= 0:
            self._countdown = self.sample_every
            (capture_us,) = _U64.unpack_from(body, _CAPTURE_AT)
            c.latencies_us.append(time.time_ns() // 1000 - capture_us)


async def _awaitable(result: Any) -> Any:
    return await result


class LoadGenerator:
    """Encoders or viewers in one process, driven by commands on stdin.

    Commands (one per line): ``start`` resets the window counters and answers
    ``started``; ``stop`` answers ``stats`` for the window; ``quit`` (or the
    end of stdin, or ``lifetime_s``) stops every client and the process.
    Answers are JSON lines on stdout.
    """

    def __init__(self, reactor: Any, spec: dict[str, Any], emit: Callable[[dict[str, Any]], None],
                 ) -> None:
        self.reactor = reactor
        self.spec = spec
        self.emit = emit
        self.role = spec["role"]
        self.counters = _Counters()
        self.clients: list[Any] = []
        self.exit_status = 0
        self._window_start = 0.0
        self._sent_base = (0, 0)
        self._stopping = False

    def start(self) -> None:
        from twisted.internet import defer

        self.reactor.callLater(self.spec["lifetime_s"], self.quit, "lifetime over")
        d = defer.ensureDeferred(self._connect_all())
        d.addErrback(self._failed)

    async def _connect_all(self) -> None:

        from evserver.media import SyntheticSource
        from evserver.net.client import Address, EncoderClient, TLSConfig

        spec = self.spec
        address = [Address(spec["host"], spec["port"])]
        tls = TLSConfig(enabled=False)
        started = time.monotonic()
        if self.role == "encoders":
            for i, (encoder_id, secret) in enumerate(spec["encoders"]):
                source = SyntheticSource(spec["bitrate"], spec["fps"], spec["keyframe_interval"],
                                         seed=i)
                self.clients.append(EncoderClient(self.reactor, address, encoder_id, secret,
                                                  source, tls, connect_timeout=10.0))
        else:
            for _ in spec["watch"]:
                self.clients.append(CountingViewer(
                    self.reactor, address, spec["account"], spec["password"], tls,
                    counters=self.counters, sample_every=spec["sample_every"],
                    connect_timeout=10.0))
        # Log every client in first, then watch: the logins (scrypt on the
        # server) then do not compete with video already flowing.
        await self._in_batches(lambda c, i: c.start())
        if self.role == "viewers":
            await self._in_batches(self._watch_all)
        self.emit({"event": "ready", "clients": len(self.clients),
                   "connect_s": time.monotonic() - started, "reconnects": self._reconnects()})

    async def _in_batches(self, action: Callable[[Any, int], Any]) -> None:
        """Run ``action(client, index)`` for every client, ``batch`` clients at a time."""
        from twisted.internet import defer

        batch = self.spec["batch"]
        for first in range(0, len(self.clients), batch):
            ds = [defer.ensureDeferred(_awaitable(action(self.clients[i], i)))
                  for i in range(first, min(first + batch, len(self.clients)))]
            await defer.gatherResults(ds, consumeErrors=True)

    async def _watch_all(self, client: Any, index: int) -> None:
        for encoder_id in self.spec["watch"][index]:
            await client.watch(encoder_id)

    def _failed(self, failure: Any) -> None:
        from twisted.internet.defer import FirstError

        error = failure.value
        if isinstance(error, FirstError):
            error = error.subFailure.value
        self.emit({"event": "error", "message": f"{self.role}: {error}"})
        self.exit_status = 1
        self.quit("error")

    def _reconnects(self) -> int:
        return sum(max(0, c.connects - 1) for c in self.clients)

    def _sent(self) -> tuple[int, int]:
        return (sum(c.frames_sent for c in self.clients),
                sum(c.bytes_sent for c in self.clients))

    def command(self, line: str) -> None:
        if line == "start":
            self.counters = _Counters()
            for c in self.clients:
                if isinstance(c, CountingViewer):
                    c.counters = self.counters
                    c.window_frames = 0
            if self.role == "encoders":
                self._sent_base = self._sent()
            self._window_start = time.monotonic()
            self.emit({"event": "started"})
        elif line == "stop":
            elapsed = time.monotonic() - self._window_start
            c = self.counters
            stats: dict[str, Any] = {
                "event": "stats", "role": self.role, "elapsed_s": elapsed,
                "frames": c.frames, "bytes": c.bytes, "keyframes": c.keyframes,
                "latencies_us": c.latencies_us, "reconnects": self._reconnects(),
                "per_client_frames": [getattr(x, "window_frames", 0) for x in self.clients],
            }
            if self.role == "encoders":
                frames, sent = self._sent()
                stats["frames"] = frames - self._sent_base[0]
                stats["bytes"] = sent - self._sent_base[1]
            self.emit(stats)
        elif line == "quit":
            self.quit("asked to")

    def quit(self, why: str) -> None:
        if self._stopping:
            return
        self._stopping = True
        for client in self.clients:
            client.stop()
        # Let the closes reach the server, then stop.
        self.reactor.callLater(0.2, self.reactor.stop)


def run_loadgen(spec_path: Path) -> int:
    """Run a load generator (``ev-bench _loadgen SPEC.json``) until told to quit."""
    from twisted.internet import reactor, stdio
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from twisted.protocols.basic import LineOnlyReceiver

    spec = json.loads(spec_path.read_text())
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr),
                              [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )

    class Control(LineOnlyReceiver):
        delimiter = b"\n"

        def __init__(self) -> None:
            self.gen: LoadGenerator | None = None

        def lineReceived(self, line: bytes) -> None:
            assert self.gen is not None
            self.gen.command(line.decode("ascii", "replace").strip())

        def connectionLost(self, reason: Any = None) -> None:
            if self.gen is not None:
                self.gen.quit("stdin closed")

    control = Control()

    def emit(event: dict[str, Any]) -> None:
        control.transport.write(json.dumps(event).encode("ascii") + b"\n")  # type: ignore[union-attr]

    gen = LoadGenerator(reactor, spec, emit)
    control.gen = gen
    stdio.StandardIO(control)
    reactor.callWhenRunning(gen.start)
    reactor.run()
    return gen.exit_status


# --------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ev-bench", description="Benchmarks of a real evserver on loopback.")
    sub = parser.add_subparsers(dest="command", required=True)
    relay = sub.add_parser(
        "relay",
        help="relay throughput, latency, CPU and memory of one twistd evserver (plain TCP)",
        description=(
            "Start a real `twistd -n evserver --plain` on free 127.0.0.1 ports and load it "
            "from separate processes: fanout (1 encoder -> N viewers), streams (N encoders, "
            "one viewer each), idle (N idle encoders).  Server CPU and RSS come from /proc."),
    )
    sub.add_parser(
        "failover", add_help=False,
        help="time from a server's death (SIGKILL, SIGSTOP) to video at every viewer, on a "
             "real local cluster (ev-bench failover --help)")
    sub.add_parser(
        "rebalance", add_help=False,
        help="time from a lost server's return to a balanced cluster, and the moves, on a "
             "real local cluster (ev-bench rebalance --help)")
    relay.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    relay.add_argument("--duration", type=_positive_float, default=DEFAULT_DURATION,
                       help="seconds measured per run (default %(default)s)")
    relay.add_argument("--warmup", type=_non_negative_float, default=DEFAULT_WARMUP,
                       help="seconds between connecting and measuring (default %(default)s)")
    relay.add_argument("--viewers", type=_positive_int, default=DEFAULT_VIEWERS,
                       help="viewers of the one encoder in fanout (default %(default)s)")
    relay.add_argument("--streams", type=_positive_int, default=DEFAULT_STREAMS,
                       help="encoder/viewer pairs in streams (default %(default)s)")
    relay.add_argument("--idle", type=_positive_int, default=DEFAULT_IDLE,
                       help="idle encoders in idle (default %(default)s)")
    relay.add_argument("--bitrate", type=_positive_int, default=DEFAULT_BITRATE,
                       help="bits per second of each encoder (default %(default)s)")
    relay.add_argument("--fps", type=_positive_float, default=DEFAULT_FPS,
                       help="frames per second of each encoder (default %(default)s)")
    relay.add_argument("--keyframe-interval", type=_positive_int,
                       default=DEFAULT_KEYFRAME_INTERVAL,
                       help="frames from one keyframe to the next (default %(default)s)")
    relay.add_argument("--sample-every", type=_positive_int, default=DEFAULT_SAMPLE_EVERY,
                       help="each viewer records the latency of every Nth frame "
                            "(default %(default)s)")
    relay.add_argument("--viewer-procs", type=_positive_int, default=1,
                       help="viewer load-generator processes (default %(default)s)")
    relay.add_argument("--repeat", type=_positive_int, default=1,
                       help="runs per scenario; medians are reported (default %(default)s)")
    relay.add_argument("--json", action="store_true",
                       help="print one JSON object instead of a table")
    relay.add_argument("--keep", metavar="DIR", type=Path,
                       help="keep the data directory, logs and specs in DIR")
    relay.add_argument("--twistd", metavar="PATH",
                       help="the twistd executable (default: the one beside this Python)")
    return parser


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit, so that the cleanup runs."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_relay(args: argparse.Namespace) -> int:
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    params = Params(
        duration=args.duration, warmup=args.warmup, viewers=args.viewers,
        streams=args.streams, idle=args.idle, bitrate=args.bitrate, fps=args.fps,
        keyframe_interval=args.keyframe_interval, sample_every=args.sample_every,
        viewer_procs=args.viewer_procs, repeat=args.repeat, scenarios=scenarios,
    )
    if not Path("/proc/self/stat").exists():
        print("ev-bench: error: needs Linux /proc to measure the server", file=sys.stderr)
        return 1
    limit = raise_nofile_limit()
    needed = 2 * params.idle + 64 if "idle" in scenarios else 256
    if limit < needed:
        print(f"ev-bench: error: the open-file limit is {limit}, but {needed} are needed "
              f"(2 per idle encoder); raise the hard limit (ulimit -Hn)", file=sys.stderr)
        return 1
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="ev-bench-", dir=args.keep))
    else:
        work_dir = Path(tempfile.mkdtemp(prefix="ev-bench-"))
    bench: Bench | None = None
    try:
        with _terminate_as_exit():
            bench = Bench(params, work_dir, args.twistd)
            result = bench.run()
    except (BenchError, OSError) as e:
        print(f"ev-bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ev-bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if bench is not None:
            bench.stop_all()
        if args.keep is None:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            _progress(f"kept {work_dir}")
    if args.json:
        print(json.dumps(json_safe(result), indent=2, allow_nan=False))
    else:
        print(format_table(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ev-bench`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["failover"]:
        # The failover benchmark has its own options: ev-bench failover --help.
        from evserver.tools.failover import main as failover_main

        return failover_main(args_list[1:])
    if args_list[:1] == ["rebalance"]:
        # Its own options too: ev-bench rebalance --help.
        from evserver.tools.rebalance import main as rebalance_main

        return rebalance_main(args_list[1:])
    if args_list[:1] == ["_loadgen"]:
        if len(args_list) != 2:
            print("usage: ev-bench _loadgen SPEC.json (internal)", file=sys.stderr)
            return 2
        return run_loadgen(Path(args_list[1]))
    args = build_parser().parse_args(args_list)
    if args.command == "relay":
        return run_relay(args)
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
