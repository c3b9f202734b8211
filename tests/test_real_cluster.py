"""Real clusters: ``twistd -n evserver`` processes failing over with real clients.

* Three servers on loopback over TLS (module fixture): one ``ev-encoder``
  process per server (synthetic video, ``--server`` listing every server
  from its own) and one child process with a ClusterViewer homed on each
  server, each watching every encoder.  A SIGKILL and, separately, a
  SIGSTOP of the busiest server: every affected encoder's video is back at
  every viewer within 3 s (the failover budget), and the survivors declare
  the dead member.
* ``msr enable`` on a running standalone server with a connected encoder
  and viewer: both stay connected, the server becomes a cluster of one.
* Three servers in three network namespaces joined by veth links (root
  and iproute2 needed, else skipped): one cut link does not evict
  anybody; isolating a server is a silent death its peers and clients
  notice, video resumes within 3 s, and after the heal the cluster is whole
  again.

A few unit tests check the measuring helpers themselves (no processes).
Every other test is marked ``real``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from evserver.net.client import Address, TLSConfig
from evserver.tools.cluster import LocalCluster, LogWatcher
from evserver.tools.failover import (
    Child,
    FailoverBench,
    Trial,
    ViewerChild,
    percentile,
    summarize,
)
from evserver.tools.procs import Ports, ServerProcess, listening_ports
from tests.realproc import child_env, provision, requires_evserver, spawn_tool, stop_process

#: The failover budget of the design: fault to video at every viewer.
BUDGET_S = 3.0


def survivors(bench: FailoverBench, dead: int) -> list[int]:
    return [i for i in range(bench.size) if i != dead]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FailoverBench]:
    root = tmp_path_factory.mktemp("cluster")
    with FailoverBench(servers=3, encoders=6, viewers_per_server=1, tls=True, root=root,
                       bitrate_bps=100_000, ev_encoder=True) as b:
        yield b
    for server in b.cluster.servers:
        assert "Traceback" not in server.log_text(), server.log_path


@pytest.mark.real
@requires_evserver
def test_every_server_sees_the_others(bench: FailoverBench) -> None:
    assert bench.cluster.missing() == []
    status = bench.viewers.status if bench.viewers else None
    assert status is not None and status["live"] == status["pairs"] == 3 * 6
    # The encoders are spread: every server hosts some.
    assert set(bench.hosts().values()) == set(bench.cluster.server_ids)


@pytest.mark.real
@requires_evserver
def test_sigkill_video_resumes_within_budget(bench: FailoverBench) -> None:
    trial = bench.trial("kill", recover=False)
    dead = int(trial.target.removeprefix("s")) - 1
    try:
        assert trial.encoders_moved >= 2
        assert trial.missing == []
        assert trial.resume_s is not None and trial.resume_s < BUDGET_S, trial
        # The survivors declare it dead, in their logs and in what they tell clients.
        dead_id = bench.cluster.server_ids[dead]
        for i in survivors(bench, dead):
            bench.cluster.wait_member_state(i, dead, ("dead",), 3.0)
        # It stays a member: msr status still lists it.
        for i in survivors(bench, dead):
            status = ctl_json(bench.cluster.servers[i].data_dir, "msr", "status")
            assert status["enabled"] is True and dead_id in status["members"]
        # Its encoders are hosted by the survivors now.
        assert dead_id not in set(bench.hosts().values())
    finally:
        bench.recover(dead, "kill")
    assert bench.cluster.missing() == []


@pytest.mark.real
@requires_evserver
def test_sigstop_video_resumes_within_budget(bench: FailoverBench) -> None:
    trial = bench.trial("stop", recover=False)
    frozen = int(trial.target.removeprefix("s")) - 1
    try:
        assert trial.missing == []
        assert trial.resume_s is not None and trial.resume_s < BUDGET_S, trial
        for i in survivors(bench, frozen):
            bench.cluster.wait_member_state(i, frozen, ("dead",), 3.0)
    finally:
        bench.recover(frozen, "stop")  # SIGCONT, then restarted
    assert bench.cluster.missing() == []


def ctl_json(data_dir: Path, *args: str) -> dict:
    """``evserver-ctl --data DIR ARGS --json`` (the real command line) as JSON."""
    done = subprocess.run([sys.executable, "-m", "evserver.ctl", "--data", str(data_dir),
                           *args, "--json"], capture_output=True, text=True, timeout=30,
                          env=child_env(), stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --------------------------------------------------------------------------
# The measuring helpers (no processes)


def test_viewer_child_times_the_first_frame_captured_after_the_fault() -> None:
    events: list[dict] = []
    now = [100.0]
    child = ViewerChild(Clock(), [Address("127.0.0.1", 1)], TLSConfig(enabled=False), "a",
                        "pw", ["e1", "e2"], 2, events.append, wallclock=lambda: now[0])
    # Received after the fault but before the command came: remembered.
    now[0] = 100.03
    child._media(1, "e2", 100_020_000)
    child.command({"cmd": "mark", "id": 7, "t": 100.0})
    now[0] = 100.5
    child._media(0, "e1", 99_990_000)  # captured before the fault: not video "again"
    child._media(0, "e2", 100_400_000)
    now[0] = 101.25
    child._media(0, "e1", 101_200_000)
    assert events == []
    child.command({"cmd": "report", "id": 7})
    [report] = events
    assert report["complete"] is False and report["missing"] == ["v1/e1"]
    assert report["delays"] == pytest.approx({"v0/e1": 1.25, "v0/e2": 0.5, "v1/e2": 0.03})
    # A mark every pair answers is reported by itself, once.
    child.command({"cmd": "mark", "id": 8, "t": 101.0})
    assert len(events) == 1
    now[0] = 101.5
    for v, e in ((0, "e2"), (1, "e1"), (1, "e2")):
        child._media(v, e, 101_400_000)
    assert events[-1]["id"] == 8 and events[-1]["complete"] is True
    assert events[-1]["delays"] == pytest.approx(
        {"v0/e1": 0.25, "v0/e2": 0.5, "v1/e1": 0.5, "v1/e2": 0.5})
    child._media(0, "e1", 101_450_000)
    assert len(events) == 2


def test_summary_uses_nearest_rank_and_counts_timeouts() -> None:
    trials = [Trial("kill", "s1", 10, value, 0.01, []) for value in (0.3, 0.1, 0.2, None)]
    summary = summarize(trials, timeout=20.0)
    assert (summary["p50_s"], summary["p99_s"], summary["max_s"]) == (0.2, 20.0, 20.0)
    assert summary["trials"] == 4 and summary["timeouts"] == 1
    assert percentile([5.0], 99) == 5.0
    assert percentile([float(v) for v in range(1, 101)], 99) == 99.0


def test_log_watcher_follows_membership_and_forgets_a_previous_run(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("--- s1: twistd ...\n"
                   "2026-01-01T00:00:00+0000 [evserver.cluster.service#info] member a-1: "
                   "connecting -> alive\n"
                   "2026-01-01T00:00:01+0000 [evserver.cluster.service#info] member b.2: "
                   "alive -> dead\npartial line member c: connecting ")
    watcher = LogWatcher(log)
    assert watcher.poll() == {"a-1": "alive", "b.2": "dead"}
    with log.open("a") as f:
        f.write("-> alive\n--- s1: started again\n")
    assert watcher.poll() == {}
    assert [(sid, state) for _, sid, state in watcher.changes] == [
        ("a-1", "alive"), ("b.2", "dead"), ("c", "alive")]


# --------------------------------------------------------------------------
# Multi-site resilience enabled in place


@pytest.mark.real
@requires_evserver
def test_msr_enable_in_place_keeps_encoder_and_viewer(tmp_path: Path) -> None:
    data = tmp_path / "standalone"
    secrets = provision(data, {"north": {"accounts": {"alice": "alice-pw"},
                                         "encoders": ["cam1"]}})
    server = ServerProcess(data, ports=Ports.free())  # TLS, standalone
    server.start()
    encoder = viewer = None
    try:
        ca = str(server.ca_path)
        encoder = spawn_tool("encoder", [
            "--server", server.address("encoder"), "--ca", ca, "--id", "cam1",
            f"--secret={secrets['cam1']}", "--source", "synthetic", "--bitrate", "100k",
            "--duration", "60", "--json"], stderr=subprocess.PIPE)
        viewer = Child("viewer", spawn_tool("failover", [
            "_viewers", "--server", server.address("viewer"), "--ca", ca, "--encoders", "cam1",
            "--viewers", "1", "--account", "alice", "--password", "alice-pw"],
            stdin=subprocess.PIPE, stderr=subprocess.DEVNULL))
        assert viewer.wait_for(lambda c: c.status and c.status["live"] == 1, 20.0), \
            viewer.status
        assert listening_ports(server.pid) is not None
        assert server.ports.peer not in listening_ports(server.pid)  # standalone

        enabled = ctl(data, "msr", "enable")
        assert "multi-site resilience enabled" in enabled
        # The running server notices within a couple of seconds, listens for
        # peers, and keeps its clients; video never stops.
        deadline = time.monotonic() + 5.0
        watched_until = None
        while watched_until is None or time.monotonic() < watched_until:
            status = viewer.status
            assert status is not None and status["live"] == 1, status
            assert status["reconnects"] == 0, status
            if watched_until is None and server.ports.peer in (listening_ports(server.pid)
                                                               or set()):
                watched_until = time.monotonic() + 1.5
            assert time.monotonic() < deadline + 1.5, server.log_tail()
            time.sleep(0.1)
        assert "multi-site resilience: member" in server.log_text()
        status = ctl_json(data, "msr", "status")
        assert status["enabled"] is True and status["members"] == []
        assert status["server_id"] == (data / "server-id").read_text().strip()
        assert encoder.poll() is None and server.running
    finally:
        if viewer is not None:
            viewer.close()
        if encoder is not None:
            stop_process(encoder)
        server.stop()
    out, err = encoder.communicate()
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["reconnects"] == 0 and report["failed"] == 0, err
    assert report["per_encoder"]["cam1"]["frames"] > 50
    assert "Traceback" not in server.log_text()


def ctl(data_dir: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "evserver.ctl", "--data", str(data_dir),
                           *args], capture_output=True, text=True, timeout=30,
                          env=child_env(), stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


# --------------------------------------------------------------------------
# A partition between network namespaces


class Namespaces:
    """Three network namespaces a, b, c, each with one address, joined pairwise by veth links.

    Server ``x`` lives at 10.77.0.N in namespace ``<prefix>x``; each pair
    of namespaces has its own link, so one link can be cut alone.
    """

    NAMES = ("a", "b", "c")

    def __init__(self) -> None:
        self.prefix = f"evt{os.getpid() % 100000}"
        self.created: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def address(self, name: str) -> str:
        return f"10.77.0.{self.NAMES.index(name) + 1}"

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name)]

    @staticmethod
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    def create(self) -> None:
        for name in self.NAMES:
            self.ip("netns", "add", self.ns(name))
            self.created.append(self.ns(name))
            self.ip("-n", self.ns(name), "link", "set", "lo", "up")
            self.ip("-n", self.ns(name), "addr", "add", f"{self.address(name)}/32", "dev", "lo")
        for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
            self.ip("link", "add", self.link(x, y), "type", "veth", "peer", "name",
                    self.link(y, x))
            for here, there in ((x, y), (y, x)):
                self.ip("link", "set", self.link(here, there), "netns", self.ns(here))
                self.ip("-n", self.ns(here), "link", "set", self.link(here, there), "up")
                self.ip("-n", self.ns(here), "route", "add", f"{self.address(there)}/32", "dev",
                        self.link(here, there), "src", self.address(here))

    def link(self, here: str, there: str) -> str:
        return f"{self.prefix}{here}{there}"

    def cut(self, x: str, y: str) -> None:
        self.ip("-n", self.ns(x), "link", "set", self.link(x, y), "down")

    def heal(self, x: str, y: str) -> None:
        for here, there in ((x, y), (y, x)):
            self.ip("-n", self.ns(here), "link", "set", self.link(here, there), "up")
            with contextlib.suppress(subprocess.CalledProcessError):  # gone with the link
                self.ip("-n", self.ns(here), "route", "replace", f"{self.address(there)}/32",
                        "dev", self.link(here, there), "src", self.address(here))

    def delete(self) -> None:
        for ns in self.created:
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                self.ip("netns", "delete", ns)
        self.created.clear()


def namespaces_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "network namespaces: no 'ip' command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces: not root (ip netns add needs CAP_SYS_ADMIN)"
    probe = f"evtprobe{os.getpid() % 100000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          timeout=10, check=False)
    if done.returncode != 0:
        return f"network namespaces: 'ip netns add' fails here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=10,
                   check=False)
    return None


def dead_verdicts(cluster: LocalCluster, since: float) -> list[str]:
    """Every "X declared Y dead" logged since the monotonic time ``since``."""
    out = []
    for i, watcher in enumerate(cluster.watchers):
        watcher.poll()
        names = dict(zip(cluster.server_ids, (s.name for s in cluster.servers), strict=True))
        out += [f"{cluster.servers[i].name} -> {names.get(sid, sid)} {state}"
                for when, sid, state in watcher.changes if when >= since and state == "dead"]
    return out


@pytest.mark.real
@requires_evserver
def test_partition_between_network_namespaces(tmp_path: Path) -> None:
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    net = Namespaces()
    try:
        net.create()
    except subprocess.CalledProcessError as e:
        net.delete()
        pytest.skip(f"network namespaces: cannot set up veth links: "
                    f"{e.stderr.decode(errors='replace').strip()}")
    # Each server alone in its namespace: the same ports everywhere.
    ports = Ports(encoder=5510, viewer=5520, relay=5530, admin=9443, peer=47100)
    cluster = LocalCluster(3, tmp_path / "cluster", tls=True,
                           hosts=[net.address(n) for n in net.NAMES],
                           command_prefixes=[net.exec_prefix(n) for n in net.NAMES],
                           ports=[ports] * 3)
    # The clients live in namespace c: they reach a and b over the c-a and c-b links.
    bench = FailoverBench(cluster=cluster, encoders=6, bitrate_bps=100_000,
                          client_prefix=net.exec_prefix("c"))
    try:
        bench.start()
        assert set(bench.hosts().values()) == set(cluster.server_ids)

        # One bad link (a-b) does not evict anybody: a and b still hear of
        # each other through c (indirect probes), and video keeps flowing.
        cut_at = time.monotonic()
        net.cut("a", "b")
        time.sleep(4.0)
        assert dead_verdicts(cluster, cut_at) == []
        bench.wait_steady(1.0)

        # Cutting a-c too isolates a: a silent death for b, c and the clients.
        trial = bench.trial("stop", target=0, recover=False,
                            inject=lambda index: net.cut("a", "c"))
        assert trial.missing == []
        assert trial.resume_s is not None and trial.resume_s < BUDGET_S, trial
        for observer, target in ((1, 0), (2, 0), (0, 1), (0, 2)):
            cluster.wait_member_state(observer, target, ("dead",), 3.0)
        assert all(s.running for s in cluster.servers)  # nobody crashed

        # Heal: the cluster is whole again and every viewer receives every encoder.
        net.heal("a", "b")
        net.heal("a", "c")
        cluster.wait_whole(15.0)
        bench.wait_steady(20.0)
    finally:
        bench.close()
        net.delete()
    for server in cluster.servers:
        assert "Traceback" not in server.log_text(), server.log_path
