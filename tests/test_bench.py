"""Tests for ``ev-bench``: its arithmetic and parsing in memory, and one real short run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from evserver.net.client import Address, TLSConfig
from evserver.tools import bench
from evserver.wire import messages as m

REPO = Path(__file__).resolve().parent.parent


# -- /proc parsing -------------------------------------------------------------


def test_proc_stat_cpu_survives_odd_command_names():
    # Field 2 may hold spaces and parentheses; utime=250 and stime=50 ticks.
    fields = ["S", "1", "2", "3", "0", "-1", "4194304", "10", "0", "0", "0", "250", "50"]
    text = "1234 (we ird) (name) " + " ".join(fields) + " 0 0 20 0 1 0 99 0 0"
    assert bench.parse_proc_stat_cpu(text, 100) == pytest.approx(3.0)
    assert bench.parse_proc_stat_times(text, 100) == pytest.approx((2.5, 0.5))


def test_proc_stat_cpu_of_this_process_grows():
    before = bench.proc_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    # /proc counts in clock ticks (usually 10 ms): allow for rounding.
    assert bench.proc_cpu_seconds(os.getpid()) - before == pytest.approx(0.3, abs=0.05)


def test_proc_status_fields():
    text = "Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n"
    assert bench.parse_proc_status_kib(text, "VmRSS") == 1024
    assert bench.parse_proc_status_kib(text, "VmHWM") == 2048
    with pytest.raises(ValueError):
        bench.parse_proc_status_kib(text, "VmSwap")
    assert bench.proc_status_kib(os.getpid()) > 0


# -- figures -------------------------------------------------------------------


def test_percentile_interpolates():
    assert bench.percentile([], 50) != bench.percentile([], 50)  # NaN
    assert bench.percentile([5.0], 99) == 5.0
    assert bench.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert bench.percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert bench.percentile([3, 1, 2], 0) == 1
    assert bench.percentile([3, 1, 2], 100) == 3


def test_summarize_takes_medians_and_keeps_runs():
    runs = [
        {"viewers": 5, "delivered_mbps": 10.0, "latency_p99_ms": math.nan, "role": "a"},
        {"viewers": 5, "delivered_mbps": 30.0, "latency_p99_ms": 4.0, "role": "b"},
        {"viewers": 5, "delivered_mbps": 20.0, "latency_p99_ms": 8.0, "role": "c"},
    ]
    s = bench.summarize(runs)
    assert s["viewers"] == 5 and isinstance(s["viewers"], int)
    assert s["delivered_mbps"] == 20.0
    assert s["latency_p99_ms"] == 6.0  # median of the finite values
    assert s["role"] == "a"
    assert s["runs"] == runs


def test_json_safe_replaces_nan_and_infinity():
    value = {"a": math.nan, "b": [1.5, math.inf], "c": {"d": -math.inf, "e": "x"}}
    assert bench.json_safe(value) == {"a": None, "b": [1.5, None], "c": {"d": None, "e": "x"}}
    json.dumps(bench.json_safe(value), allow_nan=False)


def _stats(frames, payload, elapsed, latencies_us, per_client):
    return {"role": "viewers", "frames": frames, "bytes": payload, "elapsed_s": elapsed,
            "keyframes": 1, "latencies_us": latencies_us, "per_client_frames": per_client,
            "reconnects": 0}


def test_delivery_figures_add_generators_up():
    stats = [
        _stats(100, 1_000_000, 2.0, [1000, 3000], [50, 50]),
        _stats(50, 500_000, 1.0, [2000], [50]),
    ]
    f = bench.delivery_figures(stats, cpu_seconds=0.3, offered_fps=150.0)
    assert f["frames"] == 150
    assert f["frames_per_s"] == pytest.approx(100.0)  # 50/s + 50/s
    assert f["delivered_mbps"] == pytest.approx(8.0)  # 4 + 4 Mbit/s
    assert f["delivery_ratio"] == pytest.approx(100 / 150, abs=1e-3)
    assert f["latency_p50_ms"] == pytest.approx(2.0)
    assert f["latency_max_ms"] == pytest.approx(3.0)
    assert f["latency_samples"] == 3
    assert f["server_cpu_s_per_gb"] == pytest.approx(0.3 / 0.0015, rel=1e-3)
    assert (f["viewer_frames_min"], f["viewer_frames_max"]) == (50, 50)


def test_format_table_has_a_column_per_scenario():
    result = {
        "fanout": {"encoders": 1, "viewers": 50, "delivered_mbps": 99.5,
                   "latency_p99_ms": math.nan},
        "idle": {"encoders": 1000, "rss_per_idle_encoder_kib": 7.25},
        "params": {"repeat": 3, "duration": 10.0, "warmup": 2.0, "bitrate": 2_000_000,
                   "fps": 25.0, "keyframe_interval": 50, "nproc": 2, "cpu_model": "X",
                   "python": "3.11", "twisted": "26"},
    }
    table = bench.format_table(result)
    header = [line for line in table.splitlines() if "fanout" in line and "idle" in line]
    assert header, table
    assert "99.5" in table and "7.25" in table and "1,000" in table
    assert "streams" not in table


def test_parser_refuses_bad_numbers():
    parser = bench.build_parser()
    args = parser.parse_args(["relay"])
    assert (args.duration, args.viewers, args.streams, args.idle) == (10.0, 50, 50, 1000)
    for bad in (["relay", "--duration", "0"], ["relay", "--viewers", "-1"],
                ["relay", "--scenario", "nope"], ["relay", "--warmup", "nan"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


# -- the load generator's viewer, without a network ------------------------------


def _media_body(capture_us: int, keyframe: bool, payload: bytes) -> bytes:
    frame = m.encode(m.Media(7, 255, m.FLAG_KEYFRAME if keyframe else 0, 0, capture_us,
                             payload))
    return frame[5:]  # the body: what the connection hands to media()


def _viewer(counters: bench._Counters, every: int) -> bench.CountingViewer:
    return bench.CountingViewer(Clock(), [Address("127.0.0.1", 1)], "a", "p",
                                TLSConfig(enabled=False), counters=counters,
                                sample_every=every)


def test_counting_viewer_counts_payload_and_samples_latency():
    counters = bench._Counters()
    viewer = _viewer(counters, every=2)
    capture = time.time_ns() // 1000 - 5000  # sent 5 ms ago
    for i in range(5):
        viewer.media(None, _media_body(capture, i == 0, b"x" * (100 + i)))
    assert counters.frames == 5 and viewer.window_frames == 5
    assert counters.bytes == sum(100 + i for i in range(5))
    assert counters.keyframes == 1
    assert len(counters.latencies_us) == 2  # frames 2 and 4
    assert all(5000 <= lat < 5_000_000 for lat in counters.latencies_us)


def test_load_generator_window_statistics():
    events: list[dict] = []
    spec = {"role": "viewers", "watch": [["e"], ["e"]], "sample_every": 1, "batch": 10,
            "lifetime_s": 10}
    gen = bench.LoadGenerator(Clock(), spec, events.append)
    gen.clients = [_viewer(gen.counters, 1), _viewer(gen.counters, 1)]
    gen.clients[0].media(None, _media_body(0, True, b"before the window"))
    gen.command("start")
    assert events[-1] == {"event": "started"}
    body = _media_body(time.time_ns() // 1000, False, b"y" * 1000)
    for _ in range(3):
        gen.clients[0].media(None, body)
    gen.clients[1].media(None, body)
    gen.command("stop")
    stats = events[-1]
    assert stats["event"] == "stats" and stats["role"] == "viewers"
    assert (stats["frames"], stats["bytes"], stats["keyframes"]) == (4, 4000, 0)
    assert stats["per_client_frames"] == [3, 1]
    assert len(stats["latencies_us"]) == 4
    assert stats["elapsed_s"] >= 0


# -- a real run ------------------------------------------------------------------


def _ev_bench() -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    script = Path(sys.executable).parent / "ev-bench"
    if script.exists():
        return [str(script)], env
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", "evserver.tools.bench"], env


@pytest.mark.real
@pytest.mark.slow
def test_ev_bench_relay_short_run(tmp_path):
    command, env = _ev_bench()
    args = ["relay", "--duration", "2", "--viewers", "5", "--streams", "5", "--idle", "50",
            "--json"]
    started = time.monotonic()
    proc = subprocess.run([*command, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < 60
    result = json.loads(proc.stdout)
    assert set(result) == {"fanout", "streams", "idle", "params"}

    for name, encoders in (("fanout", 1), ("streams", 5)):
        s = result[name]
        assert s["encoders"] == encoders and s["viewers"] == 5
        assert s["frames"] > 0 and s["frames_per_s"] > 0 and s["delivered_mbps"] > 0
        # 5 viewers of 2 Mbit/s streams: about 10 Mbit/s and 125 frames/s.
        assert 0.5 < s["delivery_ratio"] < 1.5, s
        assert 5 < s["delivered_mbps"] < 15, s
        assert s["viewer_frames_min"] > 0
        assert s["latency_samples"] > 0
        p50, p99 = s["latency_p50_ms"], s["latency_p99_ms"]
        assert p50 is not None and p99 is not None
        assert 0 < p50 <= p99 < 5000
        assert s["server_cpu_s_per_gb"] is not None and 0 <= s["server_cpu_s_per_gb"] < 1e4
        assert s["server_rss_kib"] > 10_000
        assert s["server_cpu_percent"] == pytest.approx(
            s["server_cpu_user_percent"] + s["server_cpu_system_percent"], abs=0.01)
        assert s["reconnects"] == 0
        assert len(s["runs"]) == 1

    idle = result["idle"]
    assert idle["encoders"] == 50 and idle["connections"] == 100
    assert idle["server_rss_after_kib"] > 10_000
    assert idle["rss_per_idle_encoder_kib"] is not None
    assert -64 < idle["rss_per_idle_encoder_kib"] < 1024
    # Every idle encoder holds its control and relay connection.
    assert idle["server_open_fds"] >= idle["server_open_fds_before"] + 100

    params = result["params"]
    assert params["duration"] == 2 and params["repeat"] == 1
    assert params["nproc"] >= 1 and params["python"] and params["twisted"]
    assert "--plain" in params["server_command"]
