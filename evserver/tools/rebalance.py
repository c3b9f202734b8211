"""The rebalance benchmark: how long a returning server waits for its share of encoders.

Run ``python -m evserver.tools.rebalance --trials 3 --json`` (``ev-bench
rebalance``).  It starts a real local cluster (:class:`LocalCluster`, plain
TCP unless ``--tls``) whose servers balance with ``--balance-stability``
seconds of stability, one child process running every encoder and one
running the viewers, which watch only the first ``--watched`` encoders (the
others stay idle, so that the balancer may move them).  Then, per trial:

1. wait until every encoder is online, every watched pair receives video,
   and the cluster is balanced (every server within one encoder of its
   share);
2. SIGKILL the server hosting the most encoders and wait until its encoders
   are online elsewhere and the viewers receive every watched encoder;
3. restart it, noting the instant ``T``; the viewers track the longest pause
   of every watched pair from then on;
4. wait until the cluster is balanced again: ``balanced_s`` is the time
   from ``T``, ``after_stability_s`` that minus the stability period (the
   figure the issue asks for: the time the moves themselves took, plus the
   restart), ``moves`` the encoders whose server changed, ``streaming_moved``
   those of them the viewers watch (must be 0), ``max_gap_s`` the longest
   pause any viewer saw (video is never interrupted by a rebalance);
5. watch the hosts for a few more seconds: ``later_moves`` counts moves
   after balance was reached (must be 0: no oscillation).

``--json`` prints ``{"rebalance": {"p50_s", "p99_s", "max_s", "trials",
"moves", "samples", ...}}`` where the percentiles are over
``after_stability_s``.  Every wait is bounded; every process is stopped at
the end, also on errors.
"""

from __future__ import annotations

import collections
import json
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from evserver.tools.cluster import LocalCluster
from evserver.tools.common import (
    EXIT_ERROR,
    EXIT_OK,
    ArgumentParser,
    positive_float,
    positive_int,
)
from evserver.tools.failover import (
    RECOVER_TIMEOUT,
    BenchError,
    FailoverBench,
    guarded_run,
    percentile,
)

PROG = "ev-bench rebalance"
#: Seconds, beyond the stability period, that the moves may take.
MOVES_TIMEOUT = 60.0
#: Seconds the hosts are watched after balance for moves that should not come.
SETTLED_WATCH = 4.0


def imbalance(hosts: Mapping[str, str | None], servers: Sequence[str]) -> list[str]:
    """Why the encoders are not spread evenly over ``servers`` (equal weights); [] if they are.

    Balanced means every server hosts floor(N/S) or ceil(N/S) of the N online
    encoders, and no encoder is offline or on another server.
    """
    counts = collections.Counter(h for h in hosts.values())
    problems = [f"{n} encoder(s) not online" for n in [counts.pop(None, 0)] if n]
    strays = {h: n for h, n in counts.items() if h not in servers}
    problems += [f"{n} on {h}, not a live server" for h, n in sorted(strays.items())]
    total = sum(counts[s] for s in servers)
    low, high = total // len(servers), -(-total // len(servers))
    problems += [f"{s} hosts {counts[s]} (share {total / len(servers):.1f})"
                 for s in servers if not low <= counts[s] <= high]
    return problems


@attrs.frozen
class RebalanceTrial:
    server: str
    failed_over: int  # encoders the killed server hosted
    balanced_s: float | None  # restart -> balanced (None: not within the timeout)
    after_stability_s: float | None
    moves: int
    streaming_moved: int
    max_gap_s: float | None
    worst_pair: str | None  # the viewer/encoder pair of the longest pause
    later_moves: int
    counts: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


class RebalanceBench(FailoverBench):
    """A FailoverBench whose servers balance, with most encoders idle."""

    def __init__(self, *, servers: int = 3, encoders: int = 30, watched: int | None = None,
                 stability: float = 5.0, in_flight: int = 2, tls: bool = False,
                 root: Path | None = None, log: Callable[[str], None] | None = None,
                 **kwargs: Any) -> None:
        import tempfile

        self.stability = stability
        temporary = root is None
        root = Path(tempfile.mkdtemp(prefix="ev-rebalance-")) if root is None else root
        cluster = LocalCluster(servers, root, tls=tls, extra_args=[
            "--balance-stability", str(stability), "--balance-in-flight", str(in_flight)])
        super().__init__(cluster=cluster, encoders=encoders,
                         watched=max(1, encoders // 5) if watched is None else watched,
                         log=log, **kwargs)
        self.temporary = temporary

    def live_servers(self, dead: str | None = None) -> list[str]:
        return [s for s in self.cluster.server_ids if s != dead]

    def wait_balanced(self, servers: Sequence[str], timeout: float) -> float:
        """Wait until the encoders are spread evenly over ``servers``; return when (wall clock)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_children()
            problems = imbalance(self.hosts(), servers)
            if not problems:
                return time.time()
            if time.monotonic() > deadline:
                raise BenchError(f"not balanced after {timeout:.0f} s: {'; '.join(problems)}")
            time.sleep(0.1)

    def _gaps(self) -> dict[str, Any]:
        assert self.viewers is not None
        self._marks += 1
        report_id = self._marks
        self.viewers.send({"cmd": "gaps", "id": report_id})
        report = self.viewers.wait_for(lambda c: c.event("gaps", id=report_id), 5.0)
        if report is None:
            raise BenchError("the viewer child does not report its pauses")
        return dict(report)

    def trial(self) -> RebalanceTrial:  # type: ignore[override]
        assert self.viewers is not None
        self.wait_steady(RECOVER_TIMEOUT)
        self.wait_balanced(self.live_servers(), self.stability + MOVES_TIMEOUT)
        before = self.hosts()
        target_id = collections.Counter(h for h in before.values() if h).most_common(1)[0][0]
        index = self.cluster.index_of(target_id)
        failed_over = sum(1 for h in before.values() if h == target_id)
        self.cluster.servers[index].signal(signal.SIGKILL)
        survivors = self.live_servers(target_id)
        deadline = time.monotonic() + RECOVER_TIMEOUT
        while imbalance(self.hosts(), survivors) and any(
                h is None or h == target_id for h in self.hosts().values()):
            if time.monotonic() > deadline:
                raise BenchError(f"the encoders of {target_id} did not fail over")
            self._check_children()
            time.sleep(0.1)
        self.wait_steady(RECOVER_TIMEOUT)
        after_failover = self.hosts()
        self.viewers.send({"cmd": "gaps-start"})
        t_restart = time.time()
        self.cluster.restart(index)
        self.cluster.wait_whole(RECOVER_TIMEOUT)
        try:
            t_balanced: float | None = self.wait_balanced(self.live_servers(),
                                                           self.stability + MOVES_TIMEOUT)
        except BenchError as e:
            self.log(str(e))
            t_balanced = None
        balanced = self.hosts()
        time.sleep(SETTLED_WATCH)
        settled = self.hosts()
        gaps = self._gaps()
        moved = [e for e, h in balanced.items() if h != after_failover.get(e)]
        watched = set(self.watched_ids)
        result = RebalanceTrial(
            server=target_id, failed_over=failed_over,
            balanced_s=None if t_balanced is None else round(t_balanced - t_restart, 3),
            after_stability_s=(None if t_balanced is None
                               else round(t_balanced - t_restart - self.stability, 3)),
            moves=len(moved), streaming_moved=sum(1 for e in moved if e in watched),
            max_gap_s=round(gaps["max_gap_s"], 3), worst_pair=gaps.get("worst"),
            later_moves=sum(1 for e, h in settled.items() if h != balanced.get(e)),
            counts=dict(collections.Counter(h for h in settled.values() if h)))
        self.log(f"restart of {target_id}: balanced after {result.balanced_s} s "
                 f"({result.after_stability_s} s beyond the {self.stability:g} s stability), "
                 f"{result.moves} moves ({result.streaming_moved} streaming), longest pause "
                 f"at a viewer {result.max_gap_s} s, {result.later_moves} later moves")
        return result

    def run(self, trials: int) -> dict[str, Any]:  # type: ignore[override]
        results = []
        for n in range(trials):
            self.log(f"trial {n + 1}/{trials}:")
            results.append(self.trial())
        return {"rebalance": summarize(results, self.stability)}


def summarize(trials: Sequence[RebalanceTrial], stability: float) -> dict[str, Any]:
    done = [t.after_stability_s for t in trials if t.after_stability_s is not None]
    return {
        "p50_s": percentile(done, 50) if done else None,
        "p99_s": percentile(done, 99) if done else None,
        "max_s": max(done) if done else None,
        "trials": len(trials),
        "timeouts": sum(1 for t in trials if t.after_stability_s is None),
        "stability_s": stability,
        "moves": [t.moves for t in trials],
        "streaming_moved": sum(t.streaming_moved for t in trials),
        "max_gap_s": max((t.max_gap_s for t in trials if t.max_gap_s is not None),
                         default=None),
        "later_moves": sum(t.later_moves for t in trials),
        "samples": [t.as_dict() for t in trials],
    }


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Measure rebalancing on a real local cluster: SIGKILL the busiest server, "
                    "restart it, and time until it has its share of the (idle) encoders back.")
    parser.add_argument("--trials", type=positive_int, default=3)
    parser.add_argument("--servers", type=positive_int, default=3)
    parser.add_argument("--encoders", type=positive_int, default=30)
    parser.add_argument("--watched", type=positive_int, default=None,
                        help="encoders the viewers watch (default a fifth); they must never "
                             "move")
    parser.add_argument("--viewers-per-server", type=positive_int, default=1)
    parser.add_argument("--stability", type=positive_float, default=5.0, metavar="SECONDS",
                        help="the servers' --balance-stability (default 5; the product's "
                             "default is 60)")
    parser.add_argument("--in-flight", type=positive_int, default=2,
                        help="the servers' --balance-in-flight (default 2)")
    parser.add_argument("--tls", action="store_true", help="TLS for clients (default plain TCP)")
    parser.add_argument("--data", metavar="DIR", help="keep the cluster's files here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Sequence[str] | None = None, out: IO[str] = sys.stdout,
         err: IO[str] = sys.stderr) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2

    def run(root: Path | None, log: Callable[[str], None]) -> dict[str, Any]:
        with RebalanceBench(servers=args.servers, encoders=args.encoders, watched=args.watched,
                            viewers_per_server=args.viewers_per_server,
                            stability=args.stability, in_flight=args.in_flight, tls=args.tls,
                            root=root, log=log) as bench:
            return bench.run(args.trials)

    result = guarded_run(PROG, args.data, run, err)
    if result is None:
        return EXIT_ERROR
    r = result["rebalance"]
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        out.write(f"rebalance: p50 {r['p50_s']} s, p99 {r['p99_s']} s, max {r['max_s']} s "
                  f"after the {r['stability_s']:g} s stability period, over {r['trials']} "
                  f"trials ({r['timeouts']} timed out); moves {r['moves']}, streaming "
                  f"encoders moved {r['streaming_moved']}, longest pause at a viewer "
                  f"{r['max_gap_s']} s, later moves {r['later_moves']}\n")
    out.flush()
    bad = r["timeouts"] or r["streaming_moved"] or r["later_moves"]
    return EXIT_ERROR if bad else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
