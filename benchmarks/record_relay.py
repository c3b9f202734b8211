"""Run ``ev-bench relay`` and render its result as reStructuredText for BENCHMARKS.rst.

    python benchmarks/record_relay.py --out benchmarks/results/relay.json -- --repeat 3
    python benchmarks/record_relay.py --from-json benchmarks/results/relay.json

Arguments after ``--`` go to ``ev-bench relay`` (``--json`` is added).  The
JSON is saved (``--out``) and the RST fragment printed: the machine, the exact
command, and a table of the medians with the spread of the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROWS: list[tuple[str, str]] = [
    ("encoders", "encoders"),
    ("viewers", "viewers"),
    ("delivered_mbps", "delivered payload, Mbit/s"),
    ("expected_mbps", "offered x viewers, Mbit/s"),
    ("frames_per_s", "frames delivered per s"),
    ("delivery_ratio", "delivered / expected frames"),
    ("server_cpu_percent", "server CPU, % of one core"),
    ("server_cpu_user_percent", "... of which user, %"),
    ("server_cpu_system_percent", "... of which system (kernel), %"),
    ("server_cpu_s_per_gb", "server CPU s per delivered GB"),
    ("latency_p50_ms", "latency p50, ms"),
    ("latency_p99_ms", "latency p99, ms"),
    ("server_rss_start_kib", "server RSS at start, KiB"),
    ("server_rss_kib", "server RSS at the end, KiB"),
    ("server_rss_before_kib", "server RSS before, KiB"),
    ("server_rss_after_kib", "server RSS after, KiB"),
    ("rss_per_idle_encoder_kib", "RSS per idle encoder, KiB"),
    ("server_open_fds", "server open files"),
    ("loadgen_cpu_percent", "load generators' CPU, % of one core"),
    ("connect_s", "time to connect all clients, s"),
    ("reconnects", "client reconnections"),
]
SCENARIOS = ("fanout", "streams", "idle")


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 100:
            return f"{int(value):,}"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def cell(summary: dict[str, Any], key: str) -> str:
    """The median, and the range of the runs when there are several and they differ."""
    if key not in summary:
        return ""
    text = fmt(summary[key])
    runs = [r.get(key) for r in summary.get("runs", [])]
    values = [v for v in runs if isinstance(v, int | float) and math.isfinite(v)]
    if len(values) > 1 and fmt(min(values)) != fmt(max(values)):
        text += f" ({fmt(min(values))} .. {fmt(max(values))})"
    return text


def grid_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    double = line.replace("-", "=")

    def row(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    out = [line, row(header), double]
    for r in rows:
        out += [row(r), line]
    return "\n".join(out)


def render(result: dict[str, Any], command: str) -> str:
    params = result["params"]
    scenarios = [s for s in SCENARIOS if s in result]
    rows = []
    for key, label in ROWS:
        cells = [cell(result[s], key) for s in scenarios]
        if any(cells):
            rows.append([label, *[c or "-" for c in cells]])
    machine = (
        f"- machine: {params['nproc']} cores, {params['cpu_model']}, Linux "
        f"{params['kernel']}\n"
        f"- Python {params['python']}, Twisted {params['twisted']}, evserver "
        f"{params['evserver']}\n"
        f"- load average (1 min) {fmt(params.get('loadavg_before'))} before the run, "
        f"{fmt(params.get('loadavg_after'))} after\n"
        f"- {params['repeat']} run(s) per scenario, {params['duration']:g} s measured after "
        f"{params['warmup']:g} s warm-up; each encoder {params['bitrate'] / 1e6:g} Mbit/s, "
        f"{params['fps']:g} fps, keyframe every {params['keyframe_interval']} frames"
    )
    table = grid_table(["median (min .. max)", *scenarios], rows)
    return (f"Command::\n\n    {command}\n\n{machine}\n\nServer command line (ports "
            f"vary)::\n\n    {params['server_command']}\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="save the JSON result here")
    parser.add_argument("--from-json", type=Path, help="render a saved result, run nothing")
    parser.add_argument("bench_args", nargs="*", help="arguments for ev-bench relay")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
        print(render(data["result"], data["command"]))
        return 0
    bench = ["ev-bench", "relay", *args.bench_args, "--json"]
    proc = subprocess.run([sys.executable, "-m", "evserver.tools.bench", *bench[1:]],
                          stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        print(f"ev-bench failed with status {proc.returncode}", file=sys.stderr)
        return proc.returncode
    result = json.loads(proc.stdout)
    command = shlex.join(bench)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": command, "result": result}, indent=2) + "\n")
    print(render(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
