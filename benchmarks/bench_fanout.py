"""Micro-benchmark of the video fan-out: nanoseconds per frame per viewer.

Run from the repository root::

    python benchmarks/bench_fanout.py [--runs 5] [--viewers 1 10 100 1000]

Publishes a pre-built GOP pattern (one 20 KB keyframe, then 29 P-frames of
1.2 KB) on one :class:`~evserver.state.fanout.Stream` with N attached
:class:`~evserver.state.fanout.ViewerFeed` objects whose sinks do nothing, and
prints JSON: for each N the median (and min/max) over the runs of
``elapsed_ns / (frames * N)``.  About ``--offers`` frame deliveries are timed
per run, so every N takes similar time.  The garbage collector is off while
timing, as in :mod:`timeit`.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from twisted.internet.task import Clock
from zope.interface import implementer

try:
    from evserver.state.fanout import IMediaSink, Stream, ViewerFeed
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from evserver.state.fanout import IMediaSink, Stream, ViewerFeed

GOP_LENGTH = 30
KEYFRAME_BYTES = 20_000
PFRAME_BYTES = 1_200


@implementer(IMediaSink)
class NullSink:
    """Accepts and discards every frame."""

    def write(self, data: bytes) -> None:
        pass

    def stalled(self) -> None:
        pass


def _noop(*_args: object) -> None:
    pass


def make_frames(count: int) -> list[tuple[bool, bytes]]:
    key = b"K" * KEYFRAME_BYTES
    inter = b"P" * PFRAME_BYTES
    return [(i % GOP_LENGTH == 0, key if i % GOP_LENGTH == 0 else inter) for i in range(count)]


def run_once(viewers: int, frames: list[tuple[bool, bytes]]) -> float:
    """Time publishing ``frames`` to ``viewers`` feeds; return ns per frame per viewer."""
    clock = Clock()
    stream = Stream(
        1,
        clock,
        gop_cache_bytes=4 * 1024 * 1024,
        on_keyframe_needed=_noop,
        on_viewers_changed=_noop,
    )
    feeds = [ViewerFeed(NullSink(), clock, 4 * 1024 * 1024, 10.0) for _ in range(viewers)]
    for feed in feeds:
        stream.add_viewer(feed)
    publish = stream.publish
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for keyframe, data in frames:
            publish(keyframe, data)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    assert all(feed.frames_written == len(frames) for feed in feeds)
    return elapsed / (len(frames) * viewers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--viewers", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument(
        "--offers", type=int, default=500_000, help="frame deliveries timed per run"
    )
    args = parser.parse_args(argv)
    results = {}
    for viewers in args.viewers:
        count = max(GOP_LENGTH, args.offers // viewers)
        frames = make_frames(count)
        samples = [run_once(viewers, frames) for _ in range(args.runs)]
        results[str(viewers)] = {
            "median_ns_per_frame_per_viewer": round(statistics.median(samples), 1),
            "min": round(min(samples), 1),
            "max": round(max(samples), 1),
            "frames_per_run": count,
        }
    report = {
        "benchmark": "evserver.state.fanout Stream.publish, null sink, viewers unpaused",
        "runs": args.runs,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
