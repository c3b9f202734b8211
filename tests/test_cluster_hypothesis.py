"""The real cluster in the simulator: faults, failover budget, convergence, leaks.

Every server runs the real ``ClusterService`` (mutual TLS peer links,
membership with indirect probes, directory, replication) on the in-memory
network (``evserver.testing.realsim``).  Plain scenarios first, then a
Hypothesis state machine that crashes, freezes, partitions, heals, restarts
and adds servers, writes records anywhere and stops encoders, and checks
after every step that the cluster is back within the failover budget.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from evserver.state.membership import MembershipSettings, PeerState
from evserver.testing.harness import ENCODER_PORT, VIEWER_PORT
from evserver.testing.realsim import CLIENT_HOST, T0, RealCluster, SimServer

#: Video back at every viewer within this much simulated time of a fault.
BUDGET = 3.0
#: How long a step lets the cluster settle after a fault (budget + margin).
SETTLE = 3.5
#: Coming back from a total outage (no server the clients can use) is bounded
#: by the clients' back-off, not by the failover budget: each client retries
#: every server in turn, up to ``retry_max`` (2 s) x 1.5 of jitter apart.
RECOVERY = 10.0
#: Known bugs, reported with their fixes.  While one is True the state
#: machine excuses exactly the states it produces (see the ``_excuse`` calls
#: and the Hypothesis statistics); set it to False once it is fixed.
#:
#: 1. When a second server fails before the cluster has declared a frozen
#:    one dead (two faults within ~1.5 s), a client of the second may pick
#:    the frozen one, still named alive, and waits there for the preamble
#:    (``PREAMBLE_DEADLINE``, 5 s): beyond the budget (``_FROZEN_WAIT``).  The
#:    excuse also covers ``_STALE_RELAY_KILLS_SESSION``, which follows only
#:    such a wait.
KNOWN_FROZEN_RETRY = True
#: 2. A restarted server cannot retract its previous incarnation's
#:    registrations: an encoder that went away with it stays "online" on it
#:    in its peers' directories (see ``_ZOMBIE_AFTER_RESTART``).
KNOWN_ZOMBIE_LOCATIONS = True
#: 3. Directory news travels only over the direct link between two servers:
#:    a viewer whose home is not linked to the encoder's server (a cut link,
#:    peers that declared each other dead while the clients reach both) is
#:    never told where the encoder is (``_DIRECT_LINK_ONLY``).
KNOWN_DIRECT_LINK_ONLY = True
#: 4. An EncoderUpdate naming a server that just came back reaches a viewer
#:    before the ServerList with its address: the viewer keeps the encoder
#:    watched at home, where it is not (see ``_UPDATE_BEFORE_LIST``).
KNOWN_UPDATE_BEFORE_LIST = True
#: 5. A client forgets a server that joined after it started if that server
#:    was down when the last ServerList came (see ``_FORGOTTEN_SERVER``).
KNOWN_FORGOTTEN_SERVERS = True
#: 6. A client that picks a server behind a cut link waits its whole
#:    connection timeout (2 s) before trying another, on top of the 1.5 s it
#:    took to notice the loss: beyond the budget (``_SLOW_CONNECT``).
KNOWN_SLOW_CONNECT = True

#: How long servers may take to link again after a heal: a 2 s connection
#: timeout plus the membership's 2 s (+10 %) back-off, and a margin.
RELINK = 5.0


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[RealCluster]:
    cluster = RealCluster(tmp_path, 3)
    cluster.start()
    cluster.start_clients()
    cluster.advance(2.0)
    yield cluster
    cluster.close()


def _busiest(sim: RealCluster) -> str:
    counts = {sid: 0 for sid in sim.servers}
    for hosts in sim.hosting().values():
        for sid in hosts:
            counts[sid] += 1
    return max(counts, key=lambda sid: (counts[sid], sid))


def _failover(sim: RealCluster, fault: Any, victim: str) -> float:
    """Apply ``fault``; return the longest time until an affected viewer got a frame."""
    affected = [e for e, hosts in sim.hosting().items() if hosts == [victim]]
    assert affected, f"{victim} hosts no encoder"
    t_fault = sim.now()
    fault(victim)
    sim.advance(SETTLE)
    waits = [sim.frames.first_after(v, e, t_fault)
             for v in range(len(sim.viewers)) for e in affected]
    assert None not in waits, waits
    assert all(r.seconds is not None and r.seconds <= BUDGET for r in sim.resumes(t_fault)), (
        sim.resumes(t_fault))
    return max(w for w in waits if w is not None)


def _check_hosted_once(sim: RealCluster) -> None:
    hosting = sim.hosting()
    for e in sim.running_encoders():
        assert len(hosting[e]) == 1, hosting


def _healed(sim: RealCluster) -> bool:
    return sim.meshed() and sim.converged() and sim.lost_writes() == []


def _finish(sim: RealCluster) -> None:
    """Buildbot's check: after an orderly stop, no timer is left behind."""
    assert sim.leaked_timers() == []
    assert sim.shutdown() == []


def test_the_cluster_forms_over_mutual_tls_and_streams(sim: RealCluster) -> None:
    assert sim.meshed() and sim.converged()
    assert not sim.directory_errors()
    _check_hosted_once(sim)
    # Every viewer receives every encoder, from the hosting server only.
    assert all(r.seconds == 0.0 for r in sim.resumes(sim.now() - 1.0))
    if sim.replicating:
        # Provisioned on s1 only: the others got the data by replication.
        for s in sim.servers.values():
            assert s.store.get_account("alice") is not None
    _finish(sim)


@pytest.mark.parametrize("fault", ["crash", "freeze"])
def test_the_busiest_server_fails_and_video_resumes_within_budget(sim: RealCluster,
                                                                  fault: str) -> None:
    victim = _busiest(sim)
    took = _failover(sim, getattr(sim, fault), victim)
    assert took < BUDGET, took
    _check_hosted_once(sim)
    assert victim not in {h for hosts in sim.hosting().values() for h in hosts}
    assert not sim.directory_errors()
    # Back: nothing is hosted twice, the directory agrees, the mesh is whole.
    (sim.thaw if fault == "freeze" else sim.restart)(victim)
    t_back = sim.now()
    sim.advance(SETTLE)
    _check_hosted_once(sim)
    assert not sim.directory_errors()
    assert sim.meshed()
    assert all(r.seconds == 0.0 for r in sim.resumes(t_back)), sim.resumes(t_back)
    _finish(sim)


def test_a_restarted_server_rejoins_with_a_higher_incarnation(sim: RealCluster) -> None:
    old = sim.servers["s2"].cluster.incarnation
    sim.crash("s2")
    sim.advance(SETTLE)
    assert sim.servers["s1"].cluster.membership.state("s2") is PeerState.DEAD
    new = sim.restart("s2")
    sim.advance(1.0)
    assert new.cluster.incarnation > old
    assert sim.meshed()
    assert sim.servers["s1"].cluster.members["s2"].incarnation == new.cluster.incarnation
    _finish(sim)


def test_one_bad_link_evicts_nobody_and_moves_nothing(sim: RealCluster) -> None:
    before = sim.hosting()
    t_cut = sim.now()
    sim.cut("s1", "s2")
    sim.advance(10.0)
    assert [e for e in sim.trace if e[1] == "member" and e[5] == "dead"] == []
    assert sim.hosting() == before
    assert all(r.seconds == 0.0 for r in sim.resumes(t_cut)), sim.resumes(t_cut)
    sim.heal()
    sim.advance(1.0)
    assert sim.meshed()
    _finish(sim)


def test_partition_clients_resume_on_the_majority_side_and_heal_converges(
        sim: RealCluster) -> None:
    minority = "s1"
    affected = [e for e, hosts in sim.hosting().items() if hosts == [minority]]
    assert affected
    t_cut = sim.now()
    sim.partition([minority], ["s2", "s3", CLIENT_HOST])
    # Both sides keep taking writes.
    sim.write("s1", "setting", "motd", "written on the minority")
    sim.write("s2", "setting", "motd", "written on the majority")
    sim.write("s1", "encoder-name", "cam1", "renamed on the minority")
    sim.write("s3", "setting", "retention", 30)
    sim.advance(SETTLE)
    waits = [sim.frames.first_after(v, e, t_cut)
             for v in range(len(sim.viewers)) for e in affected]
    assert None not in waits and max(w for w in waits if w is not None) < BUDGET, waits
    hosting = sim.hosting()
    for e in affected:
        assert len(hosting[e]) == 1 and hosting[e][0] != minority, hosting
    majority = [sim.servers["s2"], sim.servers["s3"]]
    assert not sim.directory_errors(majority)

    t_heal = sim.now()
    sim.heal()
    took = sim.run_until(lambda: sim.meshed() and sim.converged()
                         and not sim.directory_errors(), 5.0)
    _check_hosted_once(sim)
    assert sim.lost_writes() == []
    assert all(r.seconds == 0.0 for r in sim.resumes(t_heal)), sim.resumes(t_heal)
    assert took < 3.0, took
    _finish(sim)


def test_a_server_joins_with_a_token_and_receives_the_replica(sim: RealCluster) -> None:
    sim.write("s3", "setting", "before-join", 1)
    sim.advance(0.5)
    new = sim.add_server("s2")
    sim.run_until(lambda: sim.meshed() and sim.converged(), 5.0)
    assert len(sim.servers) == 4
    assert new.store.get_encoder("cam0") is not None
    assert sim.lost_writes() == []
    # Every member lists it, and the clients were told.
    for s in sim.servers.values():
        if s is not new:
            assert new.server_id in s.cluster.members
    assert any(info.server_id == new.server_id
               for info in sim.viewers[0].home.server_infos.values())
    _finish(sim)


def test_concurrent_writes_in_one_millisecond_on_both_sides_converge(tmp_path: Path) -> None:
    """Each server stamps with its own id: equal times still order the writes."""
    sim = RealCluster(tmp_path, 2, encoders=1)
    try:
        sim.start()
        sim.advance(1.0)  # a millisecond no clock has stamped yet
        sim.cut("s1", "s2")
        sim.write("s1", "setting", "motd", "from s1")
        sim.write("s2", "setting", "motd", "from s2")
        sim.advance(1.0)
        sim.heal()
        sim.advance(5.0)
        values = {s.server_id: s.store.get_setting("motd") for s in sim.servers.values()}
        assert sim.converged()
        assert len(set(values.values())) == 1, values
    finally:
        sim.close()



def test_clients_find_servers_that_came_back_after_their_last_server_died(
        sim: RealCluster) -> None:
    sim.crash("s1")
    sim.crash("s2")
    sim.advance(SETTLE)
    assert all(hosts == ["s3"] for hosts in sim.hosting().values())
    # s1 and s2 come back at the moment s3 dies: s3 never tells anyone.
    sim.restart("s1")
    sim.restart("s2")
    sim.crash("s3")
    t_fault = sim.now()
    sim.advance(10.0)
    _check_hosted_once(sim)
    assert all(r.seconds is not None and r.seconds <= BUDGET
               for r in sim.resumes(t_fault)), sim.resumes(t_fault)


def test_after_a_crash_a_freeze_of_the_next_server_is_within_budget(sim: RealCluster) -> None:
    sim.crash("s1")
    sim.advance(SETTLE)
    victim = _busiest(sim)
    t_fault = sim.now()
    sim.freeze(victim)
    sim.advance(SETTLE)
    _check_hosted_once(sim)
    assert all(r.seconds is not None and r.seconds <= BUDGET
               for r in sim.resumes(t_fault)), sim.resumes(t_fault)



_FROZEN_WAIT = (
    "a client whose server crashes while another is frozen but not yet declared dead may "
    "pick the frozen one (the cluster still names it) and waits PREAMBLE_DEADLINE (5 s) "
    "for its preamble before trying a live server; a deadline of ~1 s, or a second "
    "attempt to another server started when the first is silent for 0.5 s, fixes it")


@pytest.mark.xfail(strict=True, reason=_FROZEN_WAIT)
def test_a_crash_just_after_a_freeze_is_within_budget(sim: RealCluster) -> None:
    sim.freeze("s1")
    sim.advance(0.3)
    t_fault = sim.now()
    sim.crash(_busiest(sim) if _busiest(sim) != "s1" else "s2")
    sim.advance(SETTLE + 0.5)
    _check_hosted_once(sim)
    assert all(r.seconds is not None and r.seconds <= BUDGET
               for r in sim.resumes(t_fault)), sim.resumes(t_fault)


def test_after_a_freeze_a_crash_of_the_next_server_is_within_budget(sim: RealCluster) -> None:
    sim.freeze("s1")
    sim.advance(SETTLE)
    victim = _busiest(sim)
    t_fault = sim.now()
    sim.crash(victim)
    sim.advance(SETTLE)
    _check_hosted_once(sim)
    assert all(r.seconds is not None and r.seconds <= BUDGET
               for r in sim.resumes(t_fault)), sim.resumes(t_fault)


_STALE_RELAY_KILLS_SESSION = (
    "_ReconnectingClient keeps the old session's ticket until the new session logs in: "
    "the relay connection of the session lost to a frozen server closes only when that "
    "server is thawed, and if the client has meanwhile reconnected to the same server, "
    "disconnected() takes that relay for the current one (same ticket) and closes the new "
    "control connection; clearing self.ticket in _lost() fixes it")


@pytest.mark.xfail(strict=True, reason=_STALE_RELAY_KILLS_SESSION)
def test_clients_waiting_on_the_last_frozen_server_resume_when_it_is_thawed(
        sim: RealCluster) -> None:
    sim.crash("s1")
    sim.advance(SETTLE)
    sim.freeze("s2")
    sim.crash("s3")
    sim.advance(SETTLE)
    t_thaw = sim.now()
    sim.thaw("s2")
    sim.advance(SETTLE)
    _check_hosted_once(sim)
    assert all(r.seconds is not None and r.seconds <= BUDGET
               for r in sim.resumes(t_thaw)), sim.resumes(t_thaw)


_UPDATE_BEFORE_LIST = (
    "when a server comes back alive, ClusterService.member_state_changed calls "
    "core.server_back (EncoderUpdates naming it) before _push_server_list (its address): "
    "a ClusterViewer told that an encoder is on a server it has no address of falls back "
    "to its home, finds the encoder already watched there and stops; the ServerList that "
    "follows does not place it again, so the viewer watches an empty channel for ever")


@pytest.mark.xfail(strict=True, reason=_UPDATE_BEFORE_LIST)
def test_a_viewer_follows_an_encoder_to_a_server_its_home_had_declared_dead(
        sim: RealCluster) -> None:
    elsewhere = "10.0.9.2"  # a viewer on another client host than the encoders
    viewer = sim.add_viewer(first=0, host=elsewhere)
    index = len(sim.viewers) - 1
    sim.advance(0.5)
    viewer.watch("cam1")
    sim.advance(1.0)
    assert sim.hosting()["cam1"] == ["s2"] and viewer.placed["cam1"] == "s2"
    # s2 is cut off from the other servers and from this viewer, not from
    # its encoders: s1 and s3 declare it dead, the viewer watches at home.
    sim.net.cut(elsewhere, sim.servers["s2"].host)
    sim.cut("s1", "s2")
    sim.cut("s3", "s2")
    sim.advance(6.0)
    assert viewer.placed["cam1"] == "s1"
    t_heal = sim.now()
    sim.heal()
    sim.advance(SETTLE)
    assert sim.hosting()["cam1"] == ["s2"]
    took = sim.frames.resume(index, "cam1", t_heal, sim.now())
    assert took is not None and took <= BUDGET, (took, viewer.placed, viewer.infos["cam1"])


def test_an_encoder_that_left_during_a_partition_is_offline_everywhere_after_the_heal(
        sim: RealCluster) -> None:
    assert sim.hosting()["cam0"] == ["s1"]
    sim.partition(["s2"], ["s1", "s3", CLIENT_HOST])
    sim.advance(SETTLE)
    sim.encoders["cam0"].stop()
    sim.advance(1.0)
    sim.heal()
    sim.run_until(sim.relinked, RELINK)
    sim.advance(1.0)
    assert sim.hosting()["cam0"] == []
    assert sim.directory_errors() == []


_ZOMBIE_AFTER_RESTART = (
    "a restarted server starts with an empty directory, so on link-up it cannot retract "
    "the registrations of its previous incarnation: an encoder that was on it and went "
    "away with it stays 'online' there in its peers' directories once server_back() makes "
    "the entries count again; a peer seen with a higher incarnation should have every "
    "entry naming it with an older epoch marked offline")


@pytest.mark.xfail(strict=True, reason=_ZOMBIE_AFTER_RESTART)
def test_an_encoder_that_left_with_its_crashed_server_is_offline_after_the_restart(
        sim: RealCluster) -> None:
    assert sim.hosting()["cam0"] == ["s1"]
    sim.encoders["cam0"].stop()  # stopped with the crash: it registers nowhere else
    sim.crash("s1")
    sim.advance(SETTLE)
    sim.restart("s1")
    sim.advance(SETTLE)
    assert sim.hosting()["cam0"] == []
    assert sim.directory_errors() == []


_DIRECT_LINK_ONLY = (
    "directory news travels only over the direct link between two servers: with the "
    "s2-s3 link cut and s1 (their only probe helper) dead, s2 and s3 declare each other "
    "dead while the clients reach both, and a viewer homed on one never learns that an "
    "encoder moved to the other; relaying Directory frames to peers, or a ClusterViewer "
    "that takes updates from every session it holds, would fix it")


@pytest.mark.xfail(strict=True, reason=_DIRECT_LINK_ONLY)
def test_viewers_find_encoders_on_a_server_their_home_cannot_reach(sim: RealCluster) -> None:
    sim.cut("s2", "s3")
    sim.advance(SETTLE)
    t_fault = sim.now()
    sim.crash("s1")
    sim.advance(SETTLE)
    _check_hosted_once(sim)
    assert all(r.seconds is not None and r.seconds <= BUDGET
               for r in sim.resumes(t_fault)), sim.resumes(t_fault)


_FORGOTTEN_SERVER = (
    "a client keeps the addresses it was configured with and those of the last "
    "ServerList, nothing else: a server that joined after the client started and was down "
    "when the last list was sent is forgotten, so if it is the only one back after the "
    "others die the client never tries it; keep every address ever named")


@pytest.mark.xfail(strict=True, reason=_FORGOTTEN_SERVER)
def test_clients_find_a_server_that_joined_after_they_started(sim: RealCluster) -> None:
    sim.add_server("s1")
    sim.advance(SETTLE)
    sim.crash("s4")
    sim.advance(SETTLE)
    for sid in ("s1", "s2", "s3"):
        sim.crash(sid)
    sim.advance(SETTLE)
    sim.restart("s4")
    sim.advance(RECOVERY)
    _check_hosted_once(sim)


_SLOW_CONNECT = (
    "a client that loses its server (noticed by keepalive after up to 2 s) and then "
    "picks one behind a cut link waits its whole connection timeout (2 s) before trying "
    "another: video is back ~4 s after the fault; a connection timeout of ~0.5 s (RTTs "
    "are at most 100 ms, R14) or a second attempt started after 0.5 s keeps it within 3 s")


@pytest.mark.xfail(strict=True, reason=_SLOW_CONNECT)
def test_failover_past_a_server_the_clients_cannot_reach_is_within_budget(
        sim: RealCluster) -> None:
    # s1 and s2 cannot talk, s3 is cut off from everyone; then s1 too.  s1
    # last named only itself to its clients, which must land on s2 even if
    # they try s3 first.
    sim.cut("s1", "s2")
    sim.partition(["s3"], ["s1", "s2", CLIENT_HOST])
    sim.advance(SETTLE)
    t_fault = sim.now()
    sim.partition(["s1"], ["s2", "s3", CLIENT_HOST])
    sim.advance(SETTLE)
    _check_hosted_once(sim)
    assert all(r.seconds is not None and r.seconds <= BUDGET
               for r in sim.resumes(t_fault)), sim.resumes(t_fault)


_SLOW_RELINK = (
    "R2 (replicas converge within 1 s of a heal) fails after a partition longer than a "
    "few seconds: a dead peer is retried every 2 s (+-10 %) with a 2 s connection "
    "timeout, so the link (and with it anti-entropy) can come back ~3 s after the heal; "
    "reconnect_max=0.5 s and a 0.5 s peer connection timeout bring it under 1 s")


@pytest.mark.parametrize("reconnect_max, connect_timeout", [
    pytest.param(2.0, 2.0, marks=pytest.mark.xfail(strict=True, reason=_SLOW_RELINK)),
    (0.5, 0.5)])
def test_replicas_converge_within_a_second_of_a_heal(tmp_path: Path, reconnect_max: float,
                                                     connect_timeout: float) -> None:
    worst = 0.0
    for seed in range(4):
        sim = RealCluster(tmp_path / str(seed), 3, encoders=1, seed=seed,
                          membership=MembershipSettings(reconnect_max=reconnect_max),
                          peer_connect_timeout=connect_timeout)
        try:
            sim.start()
            sim.partition(["s1"], ["s2", "s3", CLIENT_HOST])
            sim.write("s1", "setting", "motd", f"minority {seed}")
            sim.write("s3", "setting", "retention", seed)
            sim.advance(20.0 + 0.37 * seed)
            sim.heal()
            worst = max(worst, sim.run_until(partial(_healed, sim), 10.0))
        finally:
            sim.close()
    assert worst <= 1.0, worst


# -- the state machine ------------------------------------------------------------------


class ClusterMachine(RuleBasedStateMachine):
    """Faults in any order; after each, the cluster must be back within the budget."""

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory(prefix="evs-sim-")
        self.sim: RealCluster = None  # type: ignore[assignment]
        self.t_event = 0.0
        self.budget = BUDGET
        self.writes = 0

    @initialize()
    def boot(self) -> None:
        self.sim = RealCluster(Path(self._tmp.name), 3, encoders=4)
        self.sim.start()
        self.sim.start_clients()
        self.sim.advance(2.0)
        self.t_event = self.sim.now() - 1.0

    # -- helpers --------------------------------------------------------------------

    def _pick(self, i: int, state: str | None = None) -> SimServer | None:
        servers = [s for s in self.sim.servers.values() if state is None or s.state == state]
        return servers[i % len(servers)] if servers else None

    def _event(self) -> None:
        self.t_event = self.sim.now()
        self.budget = BUDGET if self._serving() else RECOVERY

    def _settle(self) -> None:
        self.sim.advance(SETTLE if self.budget == BUDGET else RECOVERY + 0.5)

    # -- faults ---------------------------------------------------------------------

    @rule(i=st.integers(0, 3))
    def crash(self, i: int) -> None:
        s = self._pick(i, "up")
        if s is not None:
            self._event()
            self.sim.crash(s.server_id)
            self._settle()

    @rule(i=st.integers(0, 3))
    def freeze(self, i: int) -> None:
        s = self._pick(i, "up")
        if s is not None:
            self._event()
            self.sim.freeze(s.server_id)
            self._settle()

    @rule(i=st.integers(0, 3))
    def thaw(self, i: int) -> None:
        s = self._pick(i, "frozen")
        if s is not None:
            self._event()
            self.sim.thaw(s.server_id)
            self._settle()

    @rule(i=st.integers(0, 3))
    def restart(self, i: int) -> None:
        s = self._pick(i, "crashed")
        if s is not None:
            self._event()
            self.sim.restart(s.server_id)
            self._settle()

    @rule(i=st.integers(0, 3))
    def isolate(self, i: int) -> None:
        """Partition one server from the others and from the clients."""
        s = self._pick(i)
        assert s is not None
        self._event()
        others = [o.server_id for o in self.sim.servers.values() if o is not s]
        self.sim.partition([s.server_id], [*others, CLIENT_HOST])
        self._settle()

    @rule(i=st.integers(0, 3), j=st.integers(1, 3))
    def bad_link(self, i: int, j: int) -> None:
        """Cut the link between two servers only."""
        ids = list(self.sim.servers)
        a, b = ids[i % len(ids)], ids[(i + j) % len(ids)]
        if a != b:
            self._event()
            self.sim.cut(a, b)
            self._settle()

    @rule(i=st.integers(0, 3), j=st.integers(1, 3), gap=st.sampled_from([0.0, 0.3, 1.0]))
    def freeze_then_crash(self, i: int, j: int, gap: float) -> None:
        """Two faults close together: a server freezes, another crashes ``gap`` s later."""
        up = [s.server_id for s in self.sim.servers.values() if s.state == "up"]
        if len(up) < 2:
            return
        frozen, crashed = up[i % len(up)], up[(i + j) % len(up)]
        if frozen == crashed:
            return
        self.sim.freeze(frozen)
        self.sim.advance(gap)
        self._event()
        self.sim.crash(crashed)
        self._settle()

    @rule()
    def heal(self) -> None:
        self._event()
        self.sim.heal()
        self._settle()
        self.sim.run_until(self.sim.relinked, RELINK)

    @rule()
    def heal_everything(self) -> None:
        """Thaw, restart, heal: then every replica converges and no write is lost."""
        self._event()
        self.sim.heal_all()
        self.sim.run_until(lambda: self.sim.meshed() and self.sim.converged(), 5.0)
        self._settle()
        assert self.sim.converged()
        assert self.sim.lost_writes() == []

    @precondition(lambda self: len(self.sim.servers) < 4)
    @rule(i=st.integers(0, 3))
    def add_server(self, i: int) -> None:
        s = self._pick(i, "up")
        if s is not None and self.sim.net.reachable(CLIENT_HOST, s.host):
            self._event()
            self.sim.add_server(s.server_id)
            self._settle()

    # -- traffic ----------------------------------------------------------------------

    @rule(i=st.integers(0, 3), setting=st.booleans(), key=st.integers(0, 2))
    def write(self, i: int, setting: bool, key: int) -> None:
        s = self._pick(i, "up")
        if s is None:
            return
        self.writes += 1
        if setting:
            self.sim.write(s.server_id, "setting", f"k{key}", self.writes)
        else:
            self.sim.write(s.server_id, "encoder-name", f"cam{key}", f"name {self.writes}")
        self._event()
        self.sim.advance(0.2)

    @precondition(lambda self: len(self.sim.running_encoders()) > 2)
    @rule(i=st.integers(0, 3))
    def stop_encoder(self, i: int) -> None:
        running = self.sim.running_encoders()
        self._event()
        self.sim.encoders[running[i % len(running)]].stop()
        self._settle()

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0]))
    def wait(self, dt: float) -> None:
        self._event()
        self.sim.advance(dt)

    # -- invariants ---------------------------------------------------------------------

    def _serving(self) -> list[SimServer]:
        """Live servers the clients can reach."""
        return [s for s in self.sim.live_servers() if self.sim.client_reachable(s)]

    def _excuse(self, known: bool, what: str) -> bool:
        if known:
            event(f"excused (known bug): {what}")
        return known

    def _forgotten(self, client: Any, port: int) -> bool:
        """Known bug 5: the client's list names no server it could use now."""
        usable = {(s.host, port) for s in self._serving()}
        return not usable & {(a.host, a.port) for a in client.servers}

    def _stuck_on_frozen(self, client: Any) -> bool:
        """Known bug 1: the client waited for a frozen server to answer since the event."""
        return self.sim.waited_on_frozen(client, self.t_event)

    @invariant()
    def every_live_encoder_is_hosted_exactly_once(self) -> None:
        if self.sim is None:
            return
        hosting = self.sim.hosting()
        running = set(self.sim.running_encoders())
        for e, hosts in hosting.items():
            if e not in running:
                assert hosts == [], (e, hosts)
            elif len(hosts) > 1 or not self._serving():
                assert len(hosts) <= 1, (e, hosts)
            elif not hosts and not self._excuse(
                    KNOWN_FROZEN_RETRY and self._stuck_on_frozen(self.sim.encoders[e]),
                    "an encoder waited for the preamble of a frozen server") and (
                    not self._excuse(KNOWN_FORGOTTEN_SERVERS and self._forgotten(
                        self.sim.encoders[e], ENCODER_PORT),
                        "an encoder forgot every server it could use")) and (
                    not self._excuse(KNOWN_SLOW_CONNECT and self.sim.tried_unreachable(
                        self.sim.encoders[e], self.t_event),
                        "an encoder waited for a connection across a cut link")):
                raise AssertionError(f"{e} is hosted nowhere; "
                                     f"its list: {self.sim.encoders[e].servers}")

    def _zombie(self, s: SimServer, encoder_id: str) -> bool:
        """Known bug 2: ``s`` holds a registration of an earlier incarnation of its host."""
        where = s.core.locations.where(encoder_id)
        host = self.sim.servers.get(where.server_id) if where is not None else None
        return (where is not None and host is not None
                and where.epoch.wall_ms < host.booted_at * 1000)

    @invariant()
    def directories_agree_where_clients_are(self) -> None:
        if self.sim is None:
            return
        serving = self._serving()
        # Servers the clients reach and that reach each other over peer links.
        linked = [s for s in serving
                  if all(self.sim.net.reachable(s.host, o.host) for o in serving)]
        hosting = self.sim.hosting()
        for s in linked:
            for e in self.sim.encoder_ids:
                where = s.core.locations.where(e)
                said = where.server_id if where is not None else None
                if said in hosting[e] or (said is None and not hosting[e]):
                    continue
                if not self._excuse(KNOWN_ZOMBIE_LOCATIONS and self._zombie(s, e),
                                    "a registration of an earlier incarnation of its server"):
                    raise AssertionError(f"{s.server_id} says {e} is on {said}; "
                                         f"it is on {hosting[e]}")

    def _unlinked(self, viewer: Any, encoder_id: str) -> bool:
        """Known gap 3: the viewer's home cannot hear the encoder's server directly."""
        hosts = self.sim.hosting().get(encoder_id, [])
        home = self.sim.servers.get(viewer.home.server_id)
        if len(hosts) != 1 or home is None or not home.live:
            return False
        host = self.sim.servers[hosts[0]]
        if host is home:
            return False
        view = home.cluster.membership.view().get(host.server_id)
        return (not self.sim.net.reachable(home.host, host.host) or view is None
                or view.state not in (PeerState.ALIVE, PeerState.SUSPECT))

    def _misplaced(self, viewer: Any, encoder_id: str) -> bool:
        """Known bug 4: the home names a known server, the watch stayed elsewhere."""
        info = viewer.infos.get(encoder_id)
        return (info is not None and bool(info.server_id)
                and viewer.placed.get(encoder_id) not in (None, info.server_id)
                and info.server_id in viewer.home.server_infos)

    @invariant()
    def viewers_resume_within_budget(self) -> None:
        if self.sim is None or not self._serving():
            return
        hosting = self.sim.hosting()
        for r in self.sim.resumes(self.t_event):
            if r.seconds is not None and r.seconds <= self.budget:
                continue
            viewer = self.sim.viewers[r.viewer]
            if not hosting[r.encoder_id]:
                continue  # judged by every_live_encoder_is_hosted_exactly_once
            if self._excuse(KNOWN_FROZEN_RETRY and self._stuck_on_frozen(viewer),
                            "a viewer waited for the preamble of a frozen server"):
                continue
            if self._excuse(KNOWN_FORGOTTEN_SERVERS and self._forgotten(viewer.home,
                                                                         VIEWER_PORT),
                            "a viewer forgot every server it could use"):
                continue
            if self._excuse(KNOWN_SLOW_CONNECT and self.sim.tried_unreachable(viewer,
                                                                              self.t_event),
                            "a viewer waited for a connection across a cut link"):
                continue
            if self._excuse(KNOWN_DIRECT_LINK_ONLY and self._unlinked(viewer, r.encoder_id),
                            "the viewer's home is not linked to the encoder's server"):
                continue
            if self._excuse(KNOWN_UPDATE_BEFORE_LIST and self._misplaced(viewer, r.encoder_id),
                            "a viewer watches an encoder where its home says it is not"):
                continue
            raise AssertionError(f"viewer {r.viewer} ({viewer.home.server_id}) and "
                                 f"{r.encoder_id} ({hosting[r.encoder_id]}): {r.seconds} s "
                                 f"after an event {self.sim.now() - self.t_event:.2f} s ago")

    @invariant()
    def no_timer_of_a_closed_connection(self) -> None:
        if self.sim is None:
            return
        assert self.sim.leaked_timers() == []

    def teardown(self) -> None:
        """Heal everything: nothing written is lost; then an orderly stop leaves no timer.

        Skipped when a step already failed (Hypothesis calls this in a
        ``finally``): its error is the one to report.
        """
        try:
            if self.sim is not None and sys.exc_info()[0] is None:
                self.sim.heal_all()
                self.sim.run_until(lambda: self.sim.meshed() and self.sim.converged(), 5.0)
                assert self.sim.lost_writes() == []
                assert self.sim.shutdown() == []
        finally:
            if self.sim is not None:
                self.sim.close()
            self._tmp.cleanup()


TestClusterMachine = ClusterMachine.TestCase
TestClusterMachine.settings = settings(
    max_examples=20, stateful_step_count=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_trace_starts_with_the_mesh(sim: RealCluster) -> None:
    first = [e for e in sim.trace if e[1] == "member"][:6]
    assert {(e[2], e[3]) for e in first} == {(a, b) for a in sim.servers for b in sim.servers
                                            if a != b}
    assert all(e[0] == 0.0 and e[5] == "alive" for e in first)
    assert T0 > 0
    _finish(sim)
