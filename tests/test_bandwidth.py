"""Bandwidth probes between peers (evserver.state.bandwidth), on a task.Clock.

The prober's schedule (first probe a few seconds after the link comes up,
then every interval, never two in flight), the receiver's timing and its
bounded state under garbage, the figures against a simulated link of known
rate and latency, and the article's thresholds as warnings.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from evserver.state.bandwidth import (
    BandwidthProber,
    BandwidthSettings,
    Measurement,
    format_mbps,
)
from evserver.wire import messages as m
from evserver.wire import peer as p

FRAME = 64 * 1024


class Sent:
    """The ``send`` callback: what went to which peer, when."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.items: list[tuple[float, str, Any]] = []

    def __call__(self, server_id: str, msg: Any) -> None:
        self.items.append((self.clock.seconds(), server_id, msg))

    def of(self, cls: type, server_id: str | None = None) -> list[Any]:
        return [msg for _t, sid, msg in self.items
                if isinstance(msg, cls) and (server_id is None or sid == server_id)]


def make(settings: BandwidthSettings | None = None,
         rtt: float | None = None) -> tuple[Clock, Sent, BandwidthProber]:
    clock = Clock()
    clock.advance(1_700_000_000)
    sent = Sent(clock)
    prober = BandwidthProber(clock, sent, lambda sid: rtt, settings)
    return clock, sent, prober


def feed(prober: BandwidthProber, clock: Clock, server_id: str, frames: list[p.BandwidthProbe],
         gap: float) -> None:
    for i, frame in enumerate(frames):
        if i:
            clock.advance(gap)
        prober.on_probe(server_id, frame)


# -- the schedule ----------------------------------------------------------------------


def test_first_probe_a_few_seconds_after_the_link_then_every_interval() -> None:
    clock, sent, prober = make()
    prober.link_up("ev2")
    clock.advance(4.999)
    assert sent.items == []  # the anti-entropy exchange goes first
    clock.advance(0.001)
    frames = sent.of(p.BandwidthProbe, "ev2")
    assert [(f.index, f.count) for f in frames] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert len({f.probe_id for f in frames}) == 1
    assert all(len(m.encode(f)) == FRAME for f in frames)  # 256 KiB in all
    assert {t for t, _s, _m in sent.items} == {clock.seconds()}  # back to back
    assert prober.in_flight("ev2")
    first_id = frames[0].probe_id
    prober.on_report("ev2", p.BandwidthReport(first_id, 3 * FRAME, 20_000))
    assert not prober.in_flight("ev2")
    clock.advance(299.9)
    assert len(sent.of(p.BandwidthProbe)) == 4
    clock.advance(0.1)
    again = sent.of(p.BandwidthProbe)[4:]
    assert len(again) == 4 and again[0].probe_id != first_id


def test_never_two_probes_in_flight() -> None:
    clock, sent, prober = make(BandwidthSettings(first_delay=1, interval=10, timeout=9))
    prober.link_up("ev2")
    clock.advance(1)
    assert not prober.probe("ev2")  # asked for another at once: refused
    clock.advance(8.9)
    assert prober.in_flight("ev2") and len(sent.of(p.BandwidthProbe)) == 4
    clock.advance(0.1)  # no report within the timeout: given up
    assert not prober.in_flight("ev2")
    assert prober.probe("ev2")  # now one may go
    assert len(sent.of(p.BandwidthProbe)) == 8
    clock.advance(1)  # the interval's own probe finds this one in flight: skipped
    assert len(sent.of(p.BandwidthProbe)) == 8
    assert prober.results == {}


def test_each_peer_is_probed_on_its_own_and_link_down_stops_it() -> None:
    clock, sent, prober = make()
    prober.link_up("ev2")
    clock.advance(2)
    prober.link_up("ev3")
    clock.advance(3)
    assert len(sent.of(p.BandwidthProbe, "ev2")) == 4 and not sent.of(p.BandwidthProbe, "ev3")
    probe_id = sent.of(p.BandwidthProbe, "ev2")[0].probe_id
    prober.link_down("ev2")
    assert not prober.in_flight("ev2") and prober.linked() == {"ev3"}
    # A report arriving after the link went down is not a measurement.
    assert prober.on_report("ev2", p.BandwidthReport(probe_id, 3 * FRAME, 1000)) is None
    clock.advance(2)
    assert len(sent.of(p.BandwidthProbe, "ev3")) == 4
    clock.advance(1000)
    assert len(sent.of(p.BandwidthProbe, "ev2")) == 4  # never again while down
    prober.stop()
    assert clock.getDelayedCalls() == []
    assert prober.linked() == set()


def test_of_the_two_ends_of_a_link_the_smaller_id_probes_first() -> None:
    """Both ends probe; the larger id 5 s later each time, so that the probes never cross."""
    clock = Clock()
    sent = Sent(clock)
    middle = BandwidthProber(clock, sent, server_id="ev2")
    assert (middle.first_delay("ev1"), middle.first_delay("ev3")) == (10.0, 5.0)
    assert middle.first_delay("ev10") == 10.0  # "ev10" < "ev2" as bytes
    middle.link_up("ev1")
    middle.link_up("ev3")
    clock.advance(5)
    assert {sid for _t, sid, _m in sent.items} == {"ev3"}
    clock.advance(5)
    assert len(sent.of(p.BandwidthProbe, "ev1")) == 4
    clock.advance(295)
    assert [t for t, sid, _m in sent.items][-1] == 305.0  # ev3's next
    assert {sid for _t, sid, _m in sent.items[-4:]} == {"ev3"}
    clock.advance(5)
    assert [t for t, sid, _m in sent.items if sid == "ev1"][-1] == 310.0


def test_a_link_that_comes_up_again_starts_afresh() -> None:
    clock, sent, prober = make()
    prober.link_up("ev2")
    clock.advance(5)
    old = sent.of(p.BandwidthProbe)[0].probe_id
    prober.link_up("ev2")  # a new connection replaced the old one
    assert not prober.in_flight("ev2")
    assert prober.on_report("ev2", p.BandwidthReport(old, 3 * FRAME, 1000)) is None
    assert len(clock.getDelayedCalls()) == 1  # one schedule per peer, not two
    clock.advance(5)
    assert len(sent.of(p.BandwidthProbe)) == 8


def test_settings_are_checked() -> None:
    for bad in ({"count": 1}, {"count": 256}, {"frame_bytes": 12}, {"stagger": -1},
                {"stagger": 300},
                {"frame_bytes": p.PROBE_FRAME_OVERHEAD + 0x10000}, {"interval": 0},
                {"timeout": 300}, {"first_delay": -1}, {"min_mbps": 60}):
        with pytest.raises(ValueError):
            BandwidthSettings(**bad)


# -- the receiver ---------------------------------------------------------------------


def test_the_receiver_times_the_frames_after_the_first() -> None:
    clock, sent, prober = make()
    frames = p.probe_frames(41, 4, FRAME)
    clock.advance(0.5)  # the first frame's transfer: before its arrival, not counted
    prober.on_probe("ev2", frames[0])
    assert prober.receiving() == {"ev2": 41}
    for frame in frames[1:]:
        clock.advance(0.01)
        prober.on_probe("ev2", frame)
    assert sent.of(p.BandwidthReport, "ev2") == [p.BandwidthReport(41, 3 * FRAME, 30_000)]
    assert prober.receiving() == {}


def test_probes_with_few_or_odd_frames() -> None:
    clock, sent, prober = make()
    two = p.probe_frames(1, 2, p.PROBE_FRAME_OVERHEAD)  # empty padding
    feed(prober, clock, "ev2", two, 0.000_001)
    assert sent.of(p.BandwidthReport) == [p.BandwidthReport(1, 13, 1)]
    # All frames read at once (one read of the socket): an interval of 0.
    feed(prober, clock, "ev2", p.probe_frames(2, 3, 1000), 0)
    assert sent.of(p.BandwidthReport)[-1] == p.BandwidthReport(2, 2000, 0)


GARBAGE = st.lists(
    st.builds(
        p.BandwidthProbe,
        probe_id=st.integers(0, 3),
        index=st.integers(0, 6),
        count=st.integers(0, 6),
        padding=st.binary(max_size=3),
    ),
    max_size=40,
)


def expected_reports(frames: list[p.BandwidthProbe]) -> list[tuple[int, int]]:
    """A model of the receiver's rules: (probe_id, bytes) of each report."""
    current: tuple[int, int, int, int] | None = None  # id, count, next index, bytes
    out = []
    for f in frames:
        size = p.probe_frame_size(f)
        if f.count < 2 or f.index >= f.count:
            if current is not None and current[0] == f.probe_id:
                current = None
        elif f.index == 0:
            current = (f.probe_id, f.count, 1, 0)
        elif current is None or current[0] != f.probe_id:
            pass
        elif f.count != current[1] or f.index != current[2]:
            current = None
        else:
            current = (current[0], current[1], current[2] + 1, current[3] + size)
            if current[2] == current[1]:
                out.append((current[0], current[3]))
                current = None
    return out


@settings(max_examples=300, deadline=None)
@given(frames=GARBAGE, peers=st.lists(st.sampled_from(["ev2", "ev3"]), min_size=40,
                                      max_size=40))
def test_garbage_probes_hold_one_record_per_peer_and_report_only_whole_probes(
        frames: list[p.BandwidthProbe], peers: list[str]) -> None:
    clock, sent, prober = make()
    by_peer: dict[str, list[p.BandwidthProbe]] = {"ev2": [], "ev3": []}
    for frame, peer in zip(frames, peers, strict=False):
        clock.advance(0.001)
        prober.on_probe(peer, frame)
        by_peer[peer].append(frame)
        assert set(prober.receiving()) <= {"ev2", "ev3"}  # one probe per peer, at most
    for peer, got in by_peer.items():
        reports = sent.of(p.BandwidthReport, peer)
        assert [(r.probe_id, r.bytes) for r in reports] == expected_reports(got)
    assert clock.getDelayedCalls() == []  # receiving never arms a timer


def test_a_flood_of_new_probes_replaces_the_one_held() -> None:
    _clock, sent, prober = make()
    for probe_id in range(10_000):
        prober.on_probe("ev2", p.BandwidthProbe(probe_id, 0, 255, b""))
    assert prober.receiving() == {"ev2": 9999}
    # Frames of earlier probes are ignored; the current one ends when disturbed.
    prober.on_probe("ev2", p.BandwidthProbe(5, 1, 255, b""))
    assert prober.receiving() == {"ev2": 9999}
    prober.on_probe("ev2", p.BandwidthProbe(9999, 2, 255, b""))  # skipped index 1
    assert prober.receiving() == {} and sent.items == []


def test_bad_index_or_count_ends_the_probe_without_a_report() -> None:
    for bad in (p.BandwidthProbe(1, 4, 4, b""), p.BandwidthProbe(1, 0, 1, b""),
                p.BandwidthProbe(1, 1, 5, b"")):
        _clock, sent, prober = make()
        frames = p.probe_frames(1, 4, 100)
        prober.on_probe("ev2", frames[0])
        prober.on_probe("ev2", bad)
        for frame in frames[1:]:
            prober.on_probe("ev2", frame)
        assert sent.items == [] and prober.receiving() == {}, bad
    _clock, sent, prober = make()
    prober.link_up("ev2")
    prober.on_probe("ev2", p.BandwidthProbe(1, 0, 4, b""))
    prober.link_down("ev2")  # the link's state goes with it
    assert prober.receiving() == {}


# -- the figures ----------------------------------------------------------------------


def sent_probe(clock: Clock, sent: Sent, prober: BandwidthProber) -> int:
    prober.link_up("ev2")
    clock.advance(5)
    return int(sent.of(p.BandwidthProbe)[0].probe_id)


def test_the_figure_is_the_receivers_and_the_cross_check_the_senders() -> None:
    clock, sent, prober = make(rtt=40.0)
    probe_id = sent_probe(clock, sent, prober)
    clock.advance(0.250)
    result = prober.on_report("ev2", p.BandwidthReport(probe_id, 3 * FRAME, 52_429))
    assert result == prober.results["ev2"]
    assert result is not None and result.at == clock.seconds()
    assert result.mbps == pytest.approx(3 * FRAME * 8 / 52_429)  # 30.0
    assert format_mbps(result.mbps) == "30.0"
    # 256 KiB in 0.25 s less the 40 ms round trip.
    assert result.sender_mbps == pytest.approx(4 * FRAME * 8 / 0.210 / 1e6)
    assert (result.bytes, result.first_to_last_us) == (3 * FRAME, 52_429)


def test_no_cross_check_without_a_round_trip_or_with_a_report_sooner_than_it() -> None:
    clock, sent, prober = make(rtt=None)
    probe_id = sent_probe(clock, sent, prober)
    result = prober.on_report("ev2", p.BandwidthReport(probe_id, 3 * FRAME, 1000))
    assert result is not None and result.sender_mbps is None
    clock, sent, prober = make(rtt=500.0)
    probe_id = sent_probe(clock, sent, prober)
    clock.advance(0.1)
    result = prober.on_report("ev2", p.BandwidthReport(probe_id, 3 * FRAME, 1000))
    assert result is not None and result.sender_mbps is None


def test_reports_that_do_not_match_the_probe_are_ignored() -> None:
    clock, sent, prober = make()
    probe_id = sent_probe(clock, sent, prober)
    assert prober.on_report("ev2", p.BandwidthReport(probe_id + 1, 3 * FRAME, 10)) is None
    assert prober.on_report("ev3", p.BandwidthReport(probe_id, 3 * FRAME, 10)) is None
    assert prober.in_flight("ev2")
    # The right probe, the wrong byte count: a confused peer; that probe is over.
    assert prober.on_report("ev2", p.BandwidthReport(probe_id, 4 * FRAME, 10)) is None
    assert not prober.in_flight("ev2") and prober.results == {}
    # A report of an all-at-once arrival: as fast as can be told, not a division by 0.
    clock.advance(300)
    probe_id = sent.of(p.BandwidthProbe)[-1].probe_id
    result = prober.on_report("ev2", p.BandwidthReport(probe_id, 3 * FRAME, 0))
    assert result is not None and result.mbps == 3 * FRAME * 8


class SimulatedLink:
    """Two probers joined by a link of ``mbps`` each way and ``latency`` seconds one way:
    a frame takes its length over the rate to go out, behind what is already going."""

    def __init__(self, mbps: float, latency: float) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.mbps = mbps
        self.latency = latency
        self.busy_until = 0.0
        self.a = BandwidthProber(self.clock, self.from_a, lambda sid: 2000 * latency)
        self.b = BandwidthProber(self.clock, self.from_b)

    def from_a(self, server_id: str, msg: Any) -> None:
        now = self.clock.seconds()
        start = max(now, self.busy_until)
        self.busy_until = start + len(m.encode(msg)) * 8 / (self.mbps * 1e6)
        self.clock.callLater(self.busy_until + self.latency - now, self.b.on_probe, "a", msg)

    def from_b(self, server_id: str, msg: Any) -> None:
        self.clock.callLater(self.latency, self.a.on_report, "b", msg)

    def run(self, until: float) -> None:
        """Run every call due before ``until``, each at its own time exactly."""
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls()]
            if not due or min(due) > until:
                break
            self.clock.advance(max(min(due) - self.clock.seconds(), 0))


@settings(max_examples=60, deadline=None)
@given(mbps=st.floats(1, 2000), latency=st.floats(0.0001, 0.1))
def test_a_simulated_link_is_measured_at_its_rate(mbps: float, latency: float) -> None:
    link = SimulatedLink(mbps, latency)
    link.a.link_up("b")
    link.run(1100)
    result = link.a.results["b"]
    assert result.mbps == pytest.approx(mbps, rel=2e-3)  # microseconds, rounded
    assert result.sender_mbps == pytest.approx(mbps, rel=1e-2)


def test_the_cross_check_understates_a_link_with_queues_the_receiver_leaves_out() -> None:
    """Anything queued before the probe delays the sender's figure only."""
    link = SimulatedLink(100.0, 0.02)
    link.a.link_up("b")
    link.clock.advance(4.9)
    link.busy_until = link.clock.seconds() + 0.2  # the probe goes behind 1.25 MB
    link.run(1100)
    result = link.a.results["b"]
    assert result.mbps == pytest.approx(100.0, rel=2e-3)
    assert result.sender_mbps is not None and result.sender_mbps < 70


# -- the article's prerequisites -------------------------------------------------------


@pytest.mark.parametrize("mbps,expected", [
    (9.94, ["link to ev2 measured 9.9 Mbit/s: below the 10 Mbit/s minimum"]),
    (0.04, ["link to ev2 measured 0.0 Mbit/s: below the 10 Mbit/s minimum"]),
    (10.0, ["link to ev2 measured 10.0 Mbit/s: below the 50 Mbit/s recommended"]),
    (49.9, ["link to ev2 measured 49.9 Mbit/s: below the 50 Mbit/s recommended"]),
    (50.0, []),
    (940.0, []),
])
def test_warnings_follow_the_article(mbps: float, expected: list[str]) -> None:
    clock, _sent, prober = make()
    assert prober.warnings("ev2") == []  # not measured yet: nothing to say
    prober.results["ev2"] = Measurement(mbps, None, 3 * FRAME, 1, clock.seconds())
    assert prober.warnings("ev2") == expected
    assert prober.warnings("ev3") == []


def test_a_measured_slow_link_warns() -> None:
    clock, sent, prober = make()
    probe_id = sent_probe(clock, sent, prober)
    # 196 608 bytes in 0.2 s: 7.9 Mbit/s.
    prober.on_report("ev2", p.BandwidthReport(probe_id, 3 * FRAME, 200_000))
    assert prober.warnings("ev2") == [
        "link to ev2 measured 7.9 Mbit/s: below the 10 Mbit/s minimum"]
