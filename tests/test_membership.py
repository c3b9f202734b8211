"""Cluster membership and failure detection, on a task.Clock."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from random import Random
from typing import Any, cast

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.base import DelayedCall
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from evserver.state.membership import (
    IMembershipActions,
    Membership,
    MembershipSettings,
    PeerState,
)

ALIVE, SUSPECT, DEAD, CONNECTING, LEFT = (
    PeerState.ALIVE,
    PeerState.SUSPECT,
    PeerState.DEAD,
    PeerState.CONNECTING,
    PeerState.LEFT,
)
LINKED = {ALIVE, SUSPECT}
NO_JITTER = MembershipSettings(reconnect_jitter=0.0)


@implementer(IMembershipActions)
class Recorder:
    """Records every action with the clock time it was asked at."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.events: list[tuple[Any, ...]] = []
        self.membership: Membership | None = None

    def _add(self, *event: Any) -> None:
        self.events.append((self.clock.seconds(), *event))

    def connect(self, server_id: str) -> None:
        self._add("connect", server_id)

    def disconnect(self, server_id: str) -> None:
        self._add("disconnect", server_id)

    def send_heartbeat(self, server_id: str, seq: int, sent_wall_us: int) -> None:
        if self.membership is not None:
            assert self.membership.state(server_id) in LINKED
        self._add("heartbeat", server_id, seq, sent_wall_us)

    def send_probe_request(self, via_server_id: str, target_server_id: str, nonce: int) -> None:
        self._add("probe", via_server_id, target_server_id, nonce)

    def send_probe_reply(
        self, to_server_id: str, target_server_id: str, nonce: int, alive: bool
    ) -> None:
        self._add("reply", to_server_id, target_server_id, nonce, alive)

    def member_state_changed(
        self, server_id: str, old_state: PeerState, new_state: PeerState
    ) -> None:
        self._add("state", server_id, old_state, new_state)

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[1] == kind]

    def clear(self) -> None:
        self.events.clear()


def make(
    peers: Iterable[str] = ("b", "c", "d"),
    settings: MembershipSettings | None = None,
    seed: int = 1,
) -> tuple[Clock, Recorder, Membership]:
    clock = Clock()
    rec = Recorder(clock)
    m = Membership("a", rec, clock, settings=settings, rng=Random(seed))
    rec.membership = m
    for p in peers:
        m.add_member(p, 1)
    return clock, rec, m


def run(
    clock: Clock,
    seconds: float,
    each: Callable[[], None] = lambda: None,
    step: float = 1 / 64,
) -> None:
    """Advance in small steps (exact in binary), calling ``each`` before every step."""
    start = clock.seconds()
    end = start + seconds
    k = 0
    while clock.seconds() < end - 1e-9:
        each()
        k += 1
        clock.advance(min(start + k * step, end) - clock.seconds())


def talk(m: Membership, *peers: str) -> Callable[[], None]:
    def each() -> None:
        for p in peers:
            m.on_frame(p)

    return each


def changes(rec: Recorder, peer: str) -> list[tuple[float, PeerState, PeerState]]:
    return [(t, old, new) for t, _, p, old, new in rec.of("state") if p == peer]


# -- basics ----------------------------------------------------------------------------


def test_interface_and_settings() -> None:
    clock = Clock()
    verifyObject(IMembershipActions, Recorder(clock))
    s = MembershipSettings()
    assert (s.heartbeat_interval, s.suspect_after, s.probe_timeout) == (0.25, 0.75, 0.75)
    # A dead peer is dialled every 0.5 s at most: with the 0.5 s peer connection
    # timeout, a link is back within ~1 s of a heal (R2: converge within 1 s).
    assert (s.reconnect_initial, s.reconnect_max, s.reconnect_factor) == (0.25, 0.5, 2.0)
    for bad in (
        {"heartbeat_interval": 0},
        {"suspect_after": 0.2},
        {"probe_timeout": -1},
        {"reconnect_max": 0.1},
        {"reconnect_factor": 0.5},
        {"reconnect_jitter": 1.0},
        {"samples": 0},
    ):
        with pytest.raises(ValueError):
            MembershipSettings(**bad)
    m = Membership("a", Recorder(clock), clock)
    with pytest.raises(ValueError):
        m.add_member("a", 1)
    m.add_member("b", 1)
    with pytest.raises(ValueError):
        m.add_member("b", 2)


def test_new_member_connects_and_goes_alive_on_link() -> None:
    clock, rec, m = make(["b"])
    assert m.state("b") is CONNECTING
    assert rec.of("connect") == [(0.0, "connect", "b")]
    assert rec.of("state") == []  # add_member does not notify
    clock.advance(0.1)
    assert m.on_connection_made("b", 1)
    assert m.state("b") is ALIVE
    assert m.alive_members() == ["b"]
    assert changes(rec, "b") == [(0.1, CONNECTING, ALIVE)]
    assert m.view()["b"] == (ALIVE, 1, None, None)
    assert not m.on_connection_made("zz", 1)  # unknown server: refuse the link


def test_heartbeats_at_interval_on_open_links_only() -> None:
    clock, rec, m = make(["b", "c", "d"])
    m.on_connection_made("b", 1)
    m.on_connection_made("c", 1)
    m.on_connect_failed("d")  # d stays unlinked (connecting, then dead)
    run(clock, 2.0, talk(m, "b"))  # c silent: suspect at 0.75, dead at 1.5
    beats = rec.of("heartbeat")
    to_b = [(round(t, 6), seq) for t, _, p, seq, _ in beats if p == "b"]
    assert to_b == [(round(0.25 * i, 6), i + 1) for i in range(9)]
    to_c = [round(t, 6) for t, _, p, _, _ in beats if p == "c"]
    # Alive and suspect (the link is still open) until declared dead at 1.5.
    assert to_c == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    assert m.state("c") is DEAD
    assert not [e for e in beats if e[2] == "d"]
    # Wall clock in microseconds.
    assert beats[0][4] == 0 and [e for e in beats if e[2] == "b"][1][4] == 250_000


# -- failure detection -----------------------------------------------------------------


def test_silent_peer_suspect_then_dead_within_budget() -> None:
    clock, rec, m = make(["b", "c", "d"])
    for p in "bcd":
        m.on_connection_made(p, 1)
    run(clock, 0.3, talk(m, "b", "c", "d"))
    m.on_frame("b")  # b's last frame, at t = 0.3
    last = clock.seconds()
    rec.clear()
    run(clock, 3.0, talk(m, "c", "d"))
    (t_suspect, _, _), (t_dead, old, new) = changes(rec, "b")
    assert t_suspect == pytest.approx(last + 0.75)
    assert (old, new) == (SUSPECT, DEAD)
    assert t_dead == pytest.approx(last + 1.5)
    assert t_dead - last <= 1.6
    probes = rec.of("probe")
    # Every other alive member is asked once, with one nonce, at the suspect time.
    assert sorted(e[2] for e in probes) == ["c", "d"]
    assert {e[3] for e in probes} == {"b"}
    assert len({e[4] for e in probes}) == 1
    assert all(e[0] == pytest.approx(t_suspect) for e in probes)
    assert rec.of("disconnect") == [(t_dead, "disconnect", "b")]
    assert m.alive_members() == ["c", "d"]


def test_suspect_waits_full_probe_timeout_even_if_all_helpers_say_no() -> None:
    """A pause shorter than 1.5 s is survived even when the helpers lost it too."""
    clock, rec, m = make(["b", "c"])
    m.on_connection_made("b", 1)
    m.on_connection_made("c", 1)
    run(clock, 0.75, talk(m, "c"))
    assert m.state("b") is SUSPECT
    (_, _, via, target, nonce) = rec.of("probe")[0]
    m.on_probe_reply(via, target, nonce, False)
    assert m.state("b") is SUSPECT
    run(clock, 0.5, talk(m, "c"))
    m.on_frame("b")  # back after a 1.25 s pause
    assert m.state("b") is ALIVE
    run(clock, 2.0, talk(m, "b", "c"))
    assert [new for _, _, new in changes(rec, "b")] == [ALIVE, SUSPECT, ALIVE]


def test_no_other_alive_peer_dead_right_after_probe_timeout() -> None:
    clock, rec, m = make(["b", "c"])
    m.on_connection_made("b", 1)  # c never links
    run(clock, 3.0)
    assert [e for e in rec.of("probe") if e[3] == "b"] == []  # nobody alive to ask
    t_dead = [t for t, old, new in changes(rec, "b") if new is DEAD]
    assert t_dead == [pytest.approx(1.5)]


def test_one_bad_link_never_evicts() -> None:
    """We cannot hear b, c can: b goes suspect, comes back on c's answer, never dead."""
    clock, rec, m = make(["b", "c"])
    m.on_connection_made("b", 1)
    m.on_connection_made("c", 1)
    answered: set[int] = set()

    def each() -> None:
        m.on_frame("c")
        for t, _, via, target, nonce in rec.of("probe"):
            # c hears b: it answers "alive" 0.1 s after the request.
            if nonce not in answered and clock.seconds() >= t + 0.1:
                answered.add(nonce)
                m.on_probe_reply(via, target, nonce, True)

    run(clock, 10.0, each)
    states = [new for _, _, new in changes(rec, "b")]
    assert DEAD not in states
    assert states[:4] == [ALIVE, SUSPECT, ALIVE, SUSPECT]
    assert len(answered) >= 8
    # Each cycle: suspect 0.75 s after the last evidence, back 0.1 s later.
    t_suspect = [t for t, _, new in changes(rec, "b") if new is SUSPECT]
    gaps = [b - a for a, b in itertools.pairwise(t_suspect)]
    assert all(0.85 - 1 / 64 <= g <= 0.85 + 1 / 32 for g in gaps)


def test_probe_reply_checks() -> None:
    clock, rec, m = make(["b", "c", "d"])
    for p in "bcd":
        m.on_connection_made(p, 1)
    run(clock, 0.75, talk(m, "c", "d"))
    assert m.state("b") is SUSPECT
    nonce = rec.of("probe")[0][4]
    m.on_probe_reply("c", "b", nonce + 1, True)  # wrong nonce
    m.on_probe_reply("b", "b", nonce, True)  # not asked
    m.on_probe_reply("zz", "b", nonce, True)  # not a member
    m.on_probe_reply("c", "zz", nonce, True)  # unknown target
    assert m.state("b") is SUSPECT
    m.on_probe_reply("c", "b", nonce, False)
    m.on_probe_reply("c", "b", nonce, True)  # c already answered
    assert m.state("b") is SUSPECT
    m.on_probe_reply("d", "b", nonce, True)
    assert m.state("b") is ALIVE
    # last_seen moved to the answer: suspect again 0.75 s later.
    t0 = clock.seconds()
    run(clock, 1.0, talk(m, "c", "d"))
    t_suspect = [t for t, _, new in changes(rec, "b") if new is SUSPECT]
    assert t_suspect[-1] == pytest.approx(t0 + 0.75)


def test_probe_responder_needs_fresh_evidence() -> None:
    clock, rec, m = make(["b", "c", "d"])
    for p in "bcd":
        m.on_connection_made(p, 1)
    run(clock, 0.2, talk(m, "b", "c", "d"))
    m.on_frame("b")
    rec.clear()
    # b was heard just now, but the answer waits for a frame after the request.
    m.on_probe_request("c", "b", 7)
    m.on_probe_request("d", "b", 8)
    m.on_probe_request("d", "b", 9)  # replaces d's earlier request
    assert rec.of("reply") == []
    clock.advance(0.1)
    m.on_frame("b")
    assert sorted(e[2:] for e in rec.of("reply")) == [("c", "b", 7, True), ("d", "b", 9, True)]
    rec.clear()
    m.on_frame("b")
    assert rec.of("reply") == []  # answered once
    # Asked about b while it stays silent: "no" when b turns suspect here.
    m.on_probe_request("c", "b", 10)
    run(clock, 1.0, talk(m, "c", "d"))
    assert m.state("b") is SUSPECT
    (reply,) = rec.of("reply")
    assert reply[2:] == ("c", "b", 10, False)
    assert reply[0] == pytest.approx(0.3 + 0.75)
    rec.clear()
    # Not alive here: "no" at once.  About ourselves: "yes" at once.
    m.on_probe_request("c", "b", 11)
    m.on_probe_request("c", "zz", 12)
    m.on_probe_request("c", "a", 13)
    m.on_probe_request("zz", "c", 14)  # not a member: ignored
    m.on_probe_request("c", "c", 15)  # about itself: ignored
    assert [e[2:] for e in rec.of("reply")] == [
        ("c", "b", 11, False),
        ("c", "zz", 12, False),
        ("c", "a", 13, True),
    ]


def test_pending_probe_answered_no_when_target_removed_and_dropped_for_removed_requester() -> None:
    _, rec, m = make(["b", "c", "d"])
    for p in "bcd":
        m.on_connection_made(p, 1)
    m.on_probe_request("c", "b", 1)
    m.on_probe_request("d", "c", 2)
    m.remove_member("b")
    assert [e[2:] for e in rec.of("reply")] == [("c", "b", 1, False)]
    m.remove_member("d")
    m.on_frame("c")
    assert len(rec.of("reply")) == 1  # nothing sent to the removed requester


# -- connection resets -----------------------------------------------------------------


def test_reset_link_is_not_death_when_others_still_hear_it() -> None:
    clock, rec, m = make(["b", "c"], settings=NO_JITTER)
    m.on_connection_made("b", 1)
    m.on_connection_made("c", 1)
    run(clock, 0.5, talk(m, "b", "c"))
    rec.clear()
    m.on_connection_lost("b")
    assert m.state("b") is CONNECTING
    # Reconnect at once, and ask the others at once.
    assert [e[1:4] for e in rec.events[:2]] == [("connect", "b"), ("probe", "c", "b")]
    answered: set[int] = set()
    failed: list[str] = []

    def each() -> None:
        m.on_frame("c")
        for _, _, via, target, nonce in rec.of("probe"):
            if nonce not in answered:  # c hears b
                answered.add(nonce)
                m.on_probe_reply(via, target, nonce, True)
        for _, _, p in rec.of("connect")[len(failed) :]:
            failed.append(p)  # our own attempts to reach b fail
            m.on_connect_failed(p)

    run(clock, 10.0, each)
    assert [new for _, _, new in changes(rec, "b")] == [CONNECTING]
    assert len(answered) >= 10  # a round every ~0.75 s, each answered "alive"
    assert [round(e[0] - 0.5, 6) for e in rec.of("connect")][:5] == [0.0, 0.25, 0.75, 1.25, 1.75]
    assert m.on_connection_made("b", 1)
    assert m.state("b") is ALIVE


def test_reset_link_dead_after_silence_budget_without_helpers() -> None:
    """Two-server cluster: a reset link that does not come back is dead 1.5 s after the
    last frame; one that comes back in time is not."""
    clock, rec, m = make(["b"], settings=NO_JITTER)
    m.on_connection_made("b", 1)
    run(clock, 0.4, talk(m, "b"))
    m.on_frame("b")
    last = clock.seconds()
    clock.advance(0.1)
    m.on_connection_lost("b")
    assert rec.of("probe") == []
    m.on_connect_failed("b")
    run(clock, 2.0)
    t_dead = [t for t, _, new in changes(rec, "b") if new is DEAD]
    assert t_dead == [pytest.approx(last + 1.5, abs=1 / 64)]  # 1/64: the run() step

    clock, rec, m = make(["b"], settings=NO_JITTER)
    m.on_connection_made("b", 1)
    clock.advance(0.2)
    m.on_connection_lost("b")
    clock.advance(1.0)
    assert m.state("b") is CONNECTING
    assert m.on_connection_made("b", 1)
    run(clock, 3.0, talk(m, "b"))
    assert [new for _, _, new in changes(rec, "b")] == [ALIVE, CONNECTING, ALIVE]


def test_reset_everywhere_is_dead_at_once() -> None:
    """A crashed server resets every link: when every helper lost it too, dead now."""
    clock, rec, m = make(["b", "c", "d"])
    for p in "bcd":
        m.on_connection_made(p, 1)
    run(clock, 0.5, talk(m, "b", "c", "d"))
    t_reset = clock.seconds()
    m.on_connection_lost("b")
    probes = rec.of("probe")
    assert sorted(e[2] for e in probes) == ["c", "d"]
    clock.advance(0.01)
    m.on_probe_reply("c", "b", probes[0][4], False)
    assert m.state("b") is CONNECTING
    m.on_probe_reply("d", "b", probes[0][4], False)
    assert m.state("b") is DEAD
    assert changes(rec, "b")[-1][0] - t_reset == pytest.approx(0.01)


def test_reconnect_backoff_timings() -> None:
    clock, rec, m = make(["b"], settings=NO_JITTER)
    failed = [0]

    def fail_attempts() -> None:
        while len(rec.of("connect")) > failed[0]:
            failed[0] += 1
            m.on_connect_failed("b")

    run(clock, 12.0, fail_attempts)
    times = [e[0] for e in rec.of("connect")]
    # At once, then waits of 0.25, 0.5, 0.5, ...; going dead at 1.5 does not disturb it.
    assert times == [0.0, 0.25, *(0.75 + 0.5 * k for k in range(23))]
    assert times[-1] == 11.75
    assert [(t, new) for t, _, new in changes(rec, "b")] == [(1.5, DEAD)]
    (retry,) = clock.getDelayedCalls()
    assert retry.getTime() == 12.25
    # A link resets the back-off: after the next loss, at once, then 0.25 s, 0.5 s.
    m.on_connection_made("b", 1)
    assert not retry.active()
    rec.clear()
    failed[0] = 0
    m.on_connection_lost("b")
    run(clock, 0.8, fail_attempts)
    assert [e[0] - 12.0 for e in rec.of("connect")] == [0.0, 0.25, 0.75]


def test_reconnect_backoff_jitter() -> None:
    s = MembershipSettings()
    delays = [s.reconnect_delay(n, Random(3)) for n in (1, 2, 3, 4, 5, 9)]
    for d, base in zip(delays, [0.25, 0.5, 0.5, 0.5, 0.5, 0.5], strict=True):
        assert base * 0.9 <= d <= base * 1.1
    rng = Random(5)
    assert len({round(s.reconnect_delay(1, rng), 9) for _ in range(10)}) == 10
    assert NO_JITTER.reconnect_delay(1000, Random(1)) == 0.5
    # The doubling goes on up to a larger reconnect_max when one is set.
    slow = MembershipSettings(reconnect_jitter=0.0, reconnect_max=2.0)
    assert [slow.reconnect_delay(n, Random(1)) for n in (1, 2, 3, 4, 5)] == [
        0.25, 0.5, 1.0, 2.0, 2.0]
    # Through the machine, with the default settings.
    clock, rec, m = make(["b"], seed=11)
    waits = []
    for _ in range(6):
        m.on_connect_failed("b")
        calls = cast("list[DelayedCall]", clock.getDelayedCalls())
        (retry,) = [c for c in calls if "reconnect_due" in c.func.__name__]
        waits.append(retry.getTime() - clock.seconds())
        clock.advance(3.0)
    for w, base in zip(waits, [0.25, 0.5, 0.5, 0.5, 0.5, 0.5], strict=True):
        assert base * 0.9 <= w <= base * 1.1
    assert len({round(w, 9) for w in waits[1:]}) == 5  # jittered, not all 0.5
    assert len(rec.of("connect")) == 7


def test_dead_peer_retries_without_flapping_and_comes_back() -> None:
    clock, rec, m = make(["b"], settings=NO_JITTER)
    m.on_connection_made("b", 1)
    run(clock, 2.0)  # silent: dead at 1.5 (link closed)
    assert m.state("b") is DEAD
    assert rec.of("disconnect")
    # A late report about the link we closed is ignored.
    m.on_connection_lost("b")
    clock.advance(0.25)
    assert [e[0] for e in rec.of("connect")][-1] == pytest.approx(1.75)
    m.on_connect_failed("b")
    clock.advance(0.5)
    m.on_connect_failed("b")
    assert [new for _, _, new in changes(rec, "b")] == [ALIVE, SUSPECT, DEAD]
    m.on_frame("b")  # a stray frame does not revive it
    assert m.state("b") is DEAD
    m.on_connection_made("b", 1)
    assert m.state("b") is ALIVE


class RefusingRecorder(Recorder):
    """A connector whose attempts fail at once, inside ``connect`` (as a refused
    connection to a local address may)."""

    def connect(self, server_id: str) -> None:
        super().connect(server_id)
        assert self.membership is not None
        self.membership.on_connect_failed(server_id)


def test_an_attempt_that_fails_at_once_is_retried_even_the_first() -> None:
    """The first attempt, asked for while the member is being added, fails
    inside ``connect``: the machine must already be there to hear it."""
    clock = Clock()
    rec = RefusingRecorder(clock)
    m = Membership("a", rec, clock, settings=NO_JITTER, rng=Random(1))
    rec.membership = m
    m.add_member("b", 1)
    run(clock, 5.0)
    times = [e[0] for e in rec.of("connect")]
    assert len(times) >= 10 and times[0] == 0.0
    assert max(b - a for a, b in itertools.pairwise(times)) <= NO_JITTER.reconnect_max
    # And once the peer is back, the next attempt brings it alive.
    rec.__class__ = Recorder
    clock.advance(NO_JITTER.reconnect_max)
    m.on_connection_made("b", 1)
    assert m.state("b") is ALIVE


# -- restart, removal, stop -------------------------------------------------------


def test_restarted_peer_is_fresh() -> None:
    clock, rec, m = make(["b"])
    m.on_connection_made("b", 1)
    (_, _, _, seq, t0) = rec.of("heartbeat")[0]
    m.on_heartbeat_ack("b", seq, t0, t0 + 2000, t0 + 2000, t0 + 4000)
    assert m.view()["b"].rtt_ms == 4.0
    clock.advance(0.3)
    rec.clear()
    assert m.on_connection_made("b", 2)
    assert [(old, new) for _, old, new in changes(rec, "b")] == [(ALIVE, DEAD), (DEAD, ALIVE)]
    assert m.view()["b"] == (ALIVE, 2, None, None)
    assert rec.of("heartbeat")[0][3] == 1  # sequence restarts
    assert rec.of("disconnect") == []  # the new link stays
    assert not m.on_connection_made("b", 1)  # an older incarnation is refused
    # A member never heard before adopts the Hello's incarnation quietly.
    clock, rec, m = make(["b"])
    assert m.on_connection_made("b", 5)
    assert [(old, new) for _, old, new in changes(rec, "b")] == [(CONNECTING, ALIVE)]
    assert m.view()["b"].incarnation == 5


@pytest.mark.parametrize("state", [CONNECTING, ALIVE, SUSPECT, DEAD])
def test_remove_member_cancels_its_timers(state: PeerState) -> None:
    clock, rec, m = make(["b", "c"])
    m.on_connection_made("c", 1)
    if state is not CONNECTING:
        m.on_connection_made("b", 1)
    if state is SUSPECT:
        run(clock, 0.8, talk(m, "c"))
    elif state is DEAD:
        run(clock, 1.6, talk(m, "c"))
        m.on_connect_failed("b")
    assert m.state("b") is state
    rec.clear()
    m.remove_member("b")
    assert "b" not in m
    assert rec.of("disconnect") == [(clock.seconds(), "disconnect", "b")]
    assert changes(rec, "b") == [(clock.seconds(), state, LEFT)]
    m.remove_member("b")  # idempotent
    m.remove_member("c")
    assert clock.getDelayedCalls() == []
    # Late events about removed members are ignored.
    m.on_frame("b")
    m.on_connection_lost("b")
    m.on_connect_failed("b")
    m.on_heartbeat_ack("b", 1, 0, 0, 0, 0)
    assert clock.getDelayedCalls() == []
    assert m.view() == {}


def test_stop_cancels_everything_quietly() -> None:
    clock, rec, m = make(["b", "c", "d"])
    m.on_connection_made("b", 1)
    m.on_connection_made("c", 1)
    run(clock, 1.0, talk(m, "b"))
    rec.clear()
    m.stop()
    assert rec.of("state") == []
    assert sorted(e[2] for e in rec.of("disconnect")) == ["b", "c", "d"]
    assert clock.getDelayedCalls() == []
    assert m.members() == []


def test_reentrant_removal_from_the_dead_notification() -> None:
    """The cluster service may remove a member from inside member_state_changed."""
    clock = Clock()

    @implementer(IMembershipActions)
    class Remover(Recorder):
        def member_state_changed(
            self, server_id: str, old_state: PeerState, new_state: PeerState
        ) -> None:
            super().member_state_changed(server_id, old_state, new_state)
            if new_state is DEAD and self.membership is not None:
                self.membership.remove_member(server_id)

    rec = Remover(clock)
    m = Membership("a", rec, clock, rng=Random(1))
    rec.membership = m
    m.add_member("b", 1)
    m.on_connection_made("b", 1)
    run(clock, 2.0)
    assert [new for _, _, new in changes(rec, "b")] == [ALIVE, SUSPECT, DEAD, LEFT]
    assert clock.getDelayedCalls() == []


# -- RTT and clock offset ----------------------------------------------------------


def test_rtt_offset_median_and_warnings() -> None:
    clock, rec, m = make(["b"], settings=MembershipSettings(samples=15))
    m.on_connection_made("b", 1)
    assert m.warnings("b") == []

    def ack(rtt_ms: float, offset_ms: float, spike: bool = False) -> None:
        (_, _, _, seq, t0) = rec.of("heartbeat")[-1]
        one_way = int(rtt_ms * 500)
        t1 = t0 + one_way + int(offset_ms * 1000)
        t2 = t1 + 300  # the peer held it 0.3 ms: not part of the RTT
        t3 = t0 + 2 * one_way + 300
        m.on_heartbeat_ack("b", seq, t0, t1, t2, t3)
        clock.advance(0.25)
        m.on_frame("b")

    for _ in range(10):
        ack(20, -3)
    assert m.view()["b"][2:] == (20.0, -3.0)
    # Five spikes do not move a median of 15.
    for _ in range(5):
        ack(900, 5000)
    assert m.view()["b"][2:] == (20.0, -3.0)
    assert m.warnings("b") == []
    # Sustained: the window (last 15) fills with the new values.
    for _ in range(8):
        ack(140, 800)
    assert m.view()["b"][2:] == (140.0, 800.0)
    assert m.warnings("b") == ["RTT 140 ms exceeds 100 ms", "clock offset 800 ms exceeds 500 ms"]
    for _ in range(15):
        ack(40, -700)
    assert m.warnings("b") == ["clock offset -700 ms exceeds 500 ms"]


def test_bogus_acks_are_dropped() -> None:
    _, rec, m = make(["b"])
    m.on_connection_made("b", 1)
    (_, _, _, seq, t0) = rec.of("heartbeat")[0]
    m.on_heartbeat_ack("b", seq + 5, t0, t0, t0, t0 + 10)  # never sent
    m.on_heartbeat_ack("b", seq, t0 + 1, t0, t0, t0 + 10)  # wrong echo
    m.on_heartbeat_ack("b", seq, t0, t0 + 5, t0 + 1, t0 + 10)  # t2 < t1
    m.on_heartbeat_ack("b", seq, t0, t0 + 1, t0 + 100, t0 + 10)  # negative RTT
    m.on_heartbeat_ack("b", seq, t0, t0, t0, t0 - 1)  # t3 < t0
    assert m.view()["b"][2:] == (None, None)
    m.on_heartbeat_ack("b", seq, t0, t0 + 1000, t0 + 1000, t0 + 2000)
    m.on_heartbeat_ack("b", seq, t0, t0 + 1000, t0 + 1000, t0 + 2000)  # replayed
    assert list(m._peers["b"].core.rtt_ms) == [2.0]


# -- a small cluster of real Membership objects on one clock ----------------------------


class Net:
    """Memberships for several servers wired through an in-memory network.

    Every message takes ``latency`` seconds; ``cut`` holds directed pairs
    whose messages are lost (the link stays up); ``frozen`` servers neither
    send nor receive; ``killed`` servers have lost every link and refuse
    connections.  Both ends of a link ask for it; the first attempt wins.
    """

    def __init__(self, ids: list[str], latency: float = 1 / 128) -> None:
        self.clock = Clock()
        self.latency = latency
        self.skew_us = dict.fromkeys(ids, 0)
        self.incarnation = dict.fromkeys(ids, 1)
        self.cut: set[tuple[str, str]] = set()
        self.frozen: set[str] = set()
        self.killed: set[str] = set()
        self.links: set[frozenset[str]] = set()
        self.changes: list[tuple[float, str, str, PeerState, PeerState]] = []
        self.last_heard: dict[tuple[str, str], float] = {}
        self.nodes: dict[str, Membership] = {}
        for i, sid in enumerate(ids):
            self.nodes[sid] = Membership(
                sid,
                _NodeActions(self, sid),
                self.clock,
                rng=Random(i),
                wall_us=functools.partial(self.wall_us, sid),
            )
        for sid, node in self.nodes.items():
            for other in ids:
                if other != sid:
                    node.add_member(other, 1)

    def wall_us(self, sid: str) -> int:
        return int(self.clock.seconds() * 1e6) + self.skew_us[sid]

    def later(self, f: Callable[..., object], *args: object) -> None:
        self.clock.callLater(self.latency, f, *args)

    def can_talk(self, src: str, dst: str) -> bool:
        return (
            frozenset((src, dst)) in self.links
            and (src, dst) not in self.cut
            and not {src, dst} & (self.frozen | self.killed)
        )

    def connect(self, src: str, dst: str) -> None:
        pair = frozenset((src, dst))
        if pair in self.links or src in self.killed or src in self.frozen:
            return
        if dst in self.killed or dst in self.frozen:
            self.later(self.nodes[src].on_connect_failed, dst)
            return
        self.links.add(pair)

        def established() -> None:
            if pair in self.links:
                assert self.nodes[src].on_connection_made(dst, self.incarnation[dst])
                assert self.nodes[dst].on_connection_made(src, self.incarnation[src])

        self.later(established)

    def disconnect(self, src: str, dst: str) -> None:
        pair = frozenset((src, dst))
        if pair in self.links and src not in self.frozen | self.killed:
            self.links.discard(pair)
            if dst not in self.killed | self.frozen:
                self.later(self.nodes[dst].on_connection_lost, src)

    def send(self, src: str, dst: str, kind: str, *args: Any) -> None:
        if not self.can_talk(src, dst):
            return

        def deliver() -> None:
            if not self.can_talk(src, dst):
                return
            node = self.nodes[dst]
            self.last_heard[(dst, src)] = self.clock.seconds()
            node.on_frame(src)
            if kind == "heartbeat":
                seq, t0 = args
                t = self.wall_us(dst)
                self.send(dst, src, "ack", seq, t0, t, t)
            elif kind == "ack":
                seq, t0, t1, t2 = args
                t3 = self.wall_us(dst)
                node.on_heartbeat_ack(src, seq, t0, t1, t2, t3)
            elif kind == "probe":
                node.on_probe_request(src, *args)
            elif kind == "reply":
                node.on_probe_reply(src, *args)

        self.later(deliver)

    def kill(self, sid: str) -> None:
        self.killed.add(sid)
        for pair in [p for p in self.links if sid in p]:
            self.links.discard(pair)
            (other,) = pair - {sid}
            self.later(self.nodes[other].on_connection_lost, sid)

    def dead_times(self, observer: str, peer: str) -> list[float]:
        return [
            t for t, o, p, _, new in self.changes if o == observer and p == peer and new is DEAD
        ]


@implementer(IMembershipActions)
class _NodeActions:
    def __init__(self, net: Net, sid: str) -> None:
        self.net = net
        self.sid = sid

    def connect(self, server_id: str) -> None:
        self.net.connect(self.sid, server_id)

    def disconnect(self, server_id: str) -> None:
        self.net.disconnect(self.sid, server_id)

    def send_heartbeat(self, server_id: str, seq: int, sent_wall_us: int) -> None:
        self.net.send(self.sid, server_id, "heartbeat", seq, sent_wall_us)

    def send_probe_request(self, via_server_id: str, target_server_id: str, nonce: int) -> None:
        self.net.send(self.sid, via_server_id, "probe", target_server_id, nonce)

    def send_probe_reply(
        self, to_server_id: str, target_server_id: str, nonce: int, alive: bool
    ) -> None:
        self.net.send(self.sid, to_server_id, "reply", target_server_id, nonce, alive)

    def member_state_changed(
        self, server_id: str, old_state: PeerState, new_state: PeerState
    ) -> None:
        self.net.changes.append(
            (self.net.clock.seconds(), self.sid, server_id, old_state, new_state)
        )


def settle(net: Net, seconds: float) -> None:
    run(net.clock, seconds, step=1 / 128)


def test_cluster_forms_and_measures() -> None:
    net = Net(["a", "b", "c", "d"], latency=1 / 16)
    net.skew_us["b"] = 800_000
    settle(net, 3.0)
    for sid, node in net.nodes.items():
        assert node.alive_members() == sorted(set("abcd") - {sid})
    assert not [c for c in net.changes if c[4] is not ALIVE]
    view = net.nodes["a"].view()
    assert view["c"].rtt_ms == pytest.approx(125, abs=1)
    assert view["b"].offset_ms == pytest.approx(800, abs=1)
    assert net.nodes["b"].view()["a"].offset_ms == pytest.approx(-800, abs=1)
    assert net.nodes["a"].warnings("b") == [
        "RTT 125 ms exceeds 100 ms",
        "clock offset 800 ms exceeds 500 ms",
    ]
    assert net.nodes["a"].warnings("c") == ["RTT 125 ms exceeds 100 ms"]


@pytest.mark.parametrize("phase", [0.0, 0.03, 0.08, 0.13, 0.21])
def test_cluster_frozen_server_dead_everywhere_within_budget(phase: float) -> None:
    """SIGSTOP: no reset, only silence.  Each survivor declares it dead within
    1.5 s (+ latency) of the last frame it got, whatever the heartbeat phases."""
    net = Net(["a", "b", "c", "d"])
    settle(net, 2.0 + phase)
    net.frozen.add("b")
    settle(net, 3.0)
    for observer in "acd":
        last = net.last_heard[(observer, "b")]
        (t_dead,) = net.dead_times(observer, "b")
        assert t_dead - last <= 1.5 + 0.01
        for other in set("acd") - {observer}:
            assert net.dead_times(observer, other) == []


def test_cluster_one_bad_link_does_not_evict() -> None:
    net = Net(["a", "b", "c", "d"])
    settle(net, 2.0)
    net.cut |= {("a", "b"), ("b", "a")}
    settle(net, 15.0)
    assert not [c for c in net.changes if c[4] is DEAD]
    suspects = [c for c in net.changes if c[4] is SUSPECT]
    assert {(o, p) for _, o, p, _, _ in suspects} == {("a", "b"), ("b", "a")}
    net.cut.clear()
    settle(net, 2.0)
    for node in net.nodes.values():
        assert len(node.alive_members()) == 3


def test_cluster_killed_server_dead_at_once_then_restart() -> None:
    net = Net(["a", "b", "c"])
    settle(net, 2.0)
    t_kill = net.clock.seconds()
    net.kill("b")
    settle(net, 1.0)
    for observer in "ac":
        (t_dead,) = net.dead_times(observer, "b")
        # Reset seen after one latency, then one probe round trip.
        assert t_dead - t_kill <= 3 * net.latency + 0.01
        assert net.dead_times(observer, "a" if observer == "c" else "c") == []
    # b restarts with a new incarnation: a fresh member everywhere.
    net.nodes["b"].stop()
    net.killed.discard("b")
    net.incarnation["b"] = 2
    net.changes.clear()
    fresh = Membership("b", _NodeActions(net, "b"), net.clock, rng=Random(9))
    net.nodes["b"] = fresh
    for other in "ac":
        fresh.add_member(other, 1)
    settle(net, 1.0)
    for observer in "ac":
        assert net.nodes[observer].view()["b"].state is ALIVE
        assert net.nodes[observer].view()["b"].incarnation == 2
        assert [(o, n) for _, w, p, o, n in net.changes if w == observer and p == "b"] == [
            (DEAD, ALIVE)
        ]
    assert fresh.alive_members() == ["a", "c"]


# -- stateful: random frames, silences, resets and probe replies ---------------------------

PEERS = ("p1", "p2", "p3")
TICK = 1 / 16
BUDGET = 1.6


class MembershipModel(RuleBasedStateMachine):
    """One Membership ("s0") with three peers whose behaviour the rules change.

    A peer's mode: ``healthy`` (a frame to us every 0.25 s while linked; its
    connect attempts succeed), ``deaf`` (we do not hear it, the others do; our
    attempts fail) or ``silent`` (frozen for everyone).  The other peers act as
    probe helpers: a healthy one answers "alive" about a non-silent target
    0.125 s after the request and "not alive" about a silent one 0.1875 s after it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.rec = Recorder(self.clock)
        self.m = Membership("s0", self.rec, self.clock, rng=Random(0))
        self.rec.membership = self.m
        self.mode = dict.fromkeys(PEERS, "healthy")
        self.linked = dict.fromkeys(PEERS, False)
        self.incarnation = dict.fromkeys(PEERS, 1)
        self.phase = dict.fromkeys(PEERS, 0)
        self.ticks = 0
        self.queue: list[tuple[int, Callable[[], None]]] = []
        self.seen_events = 0
        self.evidence: dict[str, float] = dict.fromkeys(PEERS, 0.0)
        # Set while a peer is healthy and was alive here when it became so.
        self.healthy_since: dict[str, float | None] = dict.fromkeys(PEERS, None)
        self.expected_restart_dead: set[str] = set()
        self.requests: dict[tuple[str, str, int], float] = {}
        self.frames_from: dict[str, list[float]] = {p: [] for p in PEERS}
        self.sent_nonces: set[int] = set()
        for p in PEERS:
            self.m.add_member(p, 1)

    @initialize(phases=st.tuples(*[st.integers(0, 3)] * 3))
    def set_phases(self, phases: tuple[int, int, int]) -> None:
        self.phase = dict(zip(PEERS, phases, strict=True))

    # -- the simulated world ---------------------------------------------------

    def now(self) -> float:
        return self.clock.seconds()

    def at(self, delay: float, f: Callable[[], None]) -> None:
        self.queue.append((self.ticks + round(delay / TICK), f))

    def frame(self, p: str) -> None:
        self.evidence[p] = self.now()
        self.frames_from[p].append(self.now())
        self.m.on_frame(p)

    def react(self) -> None:
        """Handle the actions Membership asked for since the last look."""
        new = self.rec.events[self.seen_events :]
        self.seen_events = len(self.rec.events)
        for event in new:
            kind = event[1]
            if kind == "connect":
                self.on_connect(event[2])
            elif kind == "disconnect":
                self.linked[event[2]] = False
            elif kind == "probe":
                _, _, via, target, nonce = event
                self.sent_nonces.add(nonce)
                self.on_probe(via, target, nonce)
            elif kind == "state":
                _, _, p, _, newstate = event
                if newstate is DEAD:
                    if p in self.expected_restart_dead:
                        self.expected_restart_dead.discard(p)
                    else:
                        assert self.healthy_since[p] is None, (p, self.now())
                if newstate is not ALIVE:
                    self.healthy_since[p] = None

    def on_connect(self, p: str) -> None:
        if self.mode[p] == "healthy":

            def made() -> None:
                if self.mode[p] == "healthy" and not self.linked[p]:
                    self.linked[p] = True
                    self.evidence[p] = self.now()
                    assert self.m.on_connection_made(p, self.incarnation[p])
                    self.expected_restart_dead.discard(p)
                elif not self.linked[p]:
                    self.m.on_connect_failed(p)

            self.at(0.125, made)
        else:
            self.at(0.125, lambda: self.m.on_connect_failed(p))

    def on_probe(self, via: str, target: str, nonce: int) -> None:
        if self.mode[via] != "healthy":
            return  # its answer never reaches us
        alive = self.mode[target] != "silent"

        def answer() -> None:
            if self.mode[via] == "healthy" and self.linked[via]:
                self.frame(via)
                if alive and self.mode[target] != "silent":
                    self.evidence[target] = self.now()
                    self.m.on_probe_reply(via, target, nonce, True)
                elif not alive:
                    self.m.on_probe_reply(via, target, nonce, False)

        self.at(0.125 if alive else 0.1875, answer)

    def tick(self) -> None:
        self.react()
        due = [f for t, f in self.queue if t <= self.ticks]
        self.queue = [(t, f) for t, f in self.queue if t > self.ticks]
        for f in due:
            f()
            self.react()
        for p in PEERS:
            if (
                self.mode[p] == "healthy"
                and self.linked[p]
                and (self.ticks - self.phase[p]) % 4 == 0
            ):
                self.frame(p)
        self.react()
        self.ticks += 1
        self.clock.advance(TICK)
        self.react()
        for p in PEERS:
            if (
                self.healthy_since[p] is None
                and self.mode[p] == "healthy"
                and self.m.state(p) is ALIVE
            ):
                self.healthy_since[p] = self.now()

    # -- rules ----------------------------------------------------------------

    @rule(ticks=st.sampled_from([1, 2, 5, 10, 20, 40]))
    def advance(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()

    @rule(p=st.sampled_from(PEERS), mode=st.sampled_from(["healthy", "deaf", "silent"]))
    def set_mode(self, p: str, mode: str) -> None:
        if mode != self.mode[p]:
            self.healthy_since[p] = None
        self.mode[p] = mode

    @rule(p=st.sampled_from(PEERS))
    def reset(self, p: str) -> None:
        if self.linked[p]:
            self.linked[p] = False
            self.m.on_connection_lost(p)
            self.react()

    @rule(p=st.sampled_from(PEERS))
    def restart(self, p: str) -> None:
        """The peer restarts: link reset, a higher incarnation, healthy."""
        if self.linked[p]:
            self.linked[p] = False
            self.m.on_connection_lost(p)
        self.incarnation[p] += 1
        self.mode[p] = "healthy"
        self.healthy_since[p] = None
        self.expected_restart_dead.add(p)
        self.react()

    @rule(via=st.sampled_from(PEERS), about=st.sampled_from(("p1", "p2", "p3", "s0")))
    def probe_request(self, via: str, about: str) -> None:
        target = about
        nonce = len(self.requests) + 1
        self.requests[(via, target, nonce)] = self.now()
        self.m.on_probe_request(via, target, nonce)

    @rule(
        via=st.sampled_from(PEERS),
        about=st.sampled_from(PEERS),
        nonce=st.integers(0, 2**32 - 1),
        alive=st.booleans(),
    )
    def stray_reply(self, via: str, about: str, nonce: int, alive: bool) -> None:
        target = about
        if nonce in self.sent_nonces:
            return
        before = self.m.state(target)
        self.m.on_probe_reply(via, target, nonce, alive)
        assert self.m.state(target) is before

    # -- invariants -----------------------------------------------------------

    @invariant()
    def links_match(self) -> None:
        for p in PEERS:
            assert (self.m.state(p) in LINKED) == self.linked[p], (p, self.m.state(p))

    @invariant()
    def silent_to_all_is_dead(self) -> None:
        for p in PEERS:
            if self.mode[p] == "silent" and self.now() - self.evidence[p] >= BUDGET:
                assert self.m.state(p) is DEAD, (p, self.now(), self.evidence[p])

    @invariant()
    def healthy_linked_peer_is_alive(self) -> None:
        for p in PEERS:
            since = self.healthy_since[p]
            if since is not None and self.linked[p]:
                assert self.m.state(p) is ALIVE

    @invariant()
    def probe_answers_need_fresh_frames(self) -> None:
        for _, _, to, target, nonce, alive in self.rec.of("reply"):
            asked = self.requests[(to, target, nonce)]
            if alive and target != "s0":
                assert any(t >= asked for t in self.frames_from[target])

    def teardown(self) -> None:
        for p in PEERS:
            self.m.remove_member(p)
        assert self.clock.getDelayedCalls() == []
        self.clock.advance(100)
        assert self.m.view() == {}


def test_membership_stateful() -> None:
    from hypothesis import settings

    run_state_machine_as_test(MembershipModel, settings=settings(stateful_step_count=50))
