"""Real clusters at the size limit: eight ``twistd -n evserver`` processes, and a full cluster.

* Eight servers on loopback (plain TCP, to spare the CPU) started with
  ``--max-servers 8``: multi-site resilience enabled on the first, the others
  admitted from it; every server sees the seven others alive; one encoder
  hosted per server and one ClusterViewer (a child process) watching all
  eight.  A SIGKILL of one server: its encoder's video is back at the viewer
  within the failover budget (3 s).  A ninth server, with a valid token, is
  refused with CLUSTER_FULL and says so.
* The default limit (4): a fifth server is refused with a clear message.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from evserver.cluster.ca import load_identity
from evserver.tools.cluster import LocalCluster
from evserver.tools.failover import FailoverBench
from tests.realproc import Ports, ServerProcess, child_env, requires_evserver

pytestmark = [pytest.mark.real, pytest.mark.slow, requires_evserver]

#: The failover budget of the design: fault to video at every viewer.
BUDGET_S = 3.0
#: How long eight servers may take to see each other alive.
WHOLE_S = 60.0


class TimedCluster(LocalCluster):
    """``LocalCluster`` that allows ``WHOLE_S`` to become whole and records how long it took."""

    whole_s: float | None = None

    def wait_whole(self, timeout: float = WHOLE_S, among: Sequence[int] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> float:
        took = super().wait_whole(timeout, among, should_stop)
        if self.whole_s is None:
            self.whole_s = took
        return took


def ctl(data_dir: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "evserver.ctl", "--data", str(data_dir),
                           *args], capture_output=True, text=True, timeout=30,
                          env=child_env(), stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def refused_joiner(cluster: LocalCluster, data_dir: Path, *extra: str) -> str:
    """Start a new server with a fresh token from the cluster's first server; it must
    exit non-zero.  Returns its log."""
    token = ctl(cluster.servers[0].data_dir, "msr", "token").strip()
    assert token.startswith("evs1.")
    joiner = ServerProcess(data_dir, ports=Ports.free(), tls=False,
                           extra_args=("--join-token", token, *extra))
    joiner._spawn()
    assert joiner.process is not None
    try:
        code = joiner.process.wait(30)
    except subprocess.TimeoutExpired:
        joiner.kill()
        raise AssertionError(f"the joiner was not refused:\n{joiner.log_tail()}") from None
    assert code != 0
    assert load_identity(data_dir) is None  # no certificate was issued to it
    status = json.loads(ctl(cluster.servers[0].data_dir, "msr", "status", "--json"))
    assert len(status["members"]) == cluster.size - 1, status  # nor was it added
    return joiner.log_text()


def test_eight_servers_failover_and_a_ninth_is_refused(tmp_path: Path) -> None:
    started = time.monotonic()
    cluster = TimedCluster(8, tmp_path / "cluster", tls=False,
                           extra_args=("--max-servers", "8"))
    bench = FailoverBench(cluster=cluster, encoders=8, fps=10.0, bitrate_bps=50_000)
    bench.viewer_count = 1  # one ClusterViewer (homed on the first server) watching all 8
    try:
        bench.start()  # form, provision, start, wait whole, then the clients, steady
        assert cluster.whole_s is not None and cluster.whole_s < WHOLE_S
        for i in range(8):
            others = set(cluster.server_ids) - {cluster.server_ids[i]}
            states = cluster.member_states(i)
            assert {sid for sid, state in states.items() if state == "alive"} >= others, states
        # Every server hosts one encoder; the viewer receives all eight.
        hosts = bench.hosts()
        assert Counter(hosts.values()) == Counter(set(cluster.server_ids)), hosts
        status = bench.viewers.status if bench.viewers is not None else None
        assert status is not None and status["live"] == status["pairs"] == 8, status

        # SIGKILL a server the viewer is not homed on: its encoder's video resumes.
        target = 7
        trial = bench.trial("kill", target=target, recover=False)
        assert trial.encoders_moved == 1
        assert trial.missing == []
        assert trial.resume_s is not None and trial.resume_s < BUDGET_S, trial
        cluster.wait_member_state(0, target, ("dead",), BUDGET_S)

        # The dead server is still a member: with it, the cluster is full.
        log = refused_joiner(cluster, tmp_path / "s9", "--max-servers", "8")
        assert "cannot join the cluster" in log and "maximum of 8 servers" in log, log
        for i in range(7):
            assert cluster.servers[i].running
    finally:
        bench.close()
    for i, server in enumerate(cluster.servers):
        assert "Traceback" not in server.log_text(), (i, server.log_path)
    assert time.monotonic() - started < 120


def test_default_limit_refuses_a_fifth_server(tmp_path: Path) -> None:
    cluster = LocalCluster(4, tmp_path / "cluster", tls=False)
    try:
        cluster.form()
        cluster.start()
        cluster.wait_whole(30.0)
        log = refused_joiner(cluster, tmp_path / "s5")
        assert "cannot join the cluster" in log and "maximum of 4 servers" in log, log
        assert cluster.missing() == []  # nobody was disturbed
    finally:
        cluster.stop()
    for server in cluster.servers:
        assert "Traceback" not in server.log_text(), server.log_path
