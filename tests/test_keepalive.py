"""The keepalive and silence detector, on a task.Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from evserver.state.keepalive import Keepalive


def make(
    interval: float = 1.0, timeout: float = 3.0
) -> tuple[Clock, Keepalive, list[int], list[float]]:
    clock = Clock()
    pings: list[int] = []
    timeouts: list[float] = []
    ka = Keepalive(clock, interval, timeout, pings.append, lambda: timeouts.append(clock.seconds()))
    ka.start()
    return clock, ka, pings, timeouts


def test_pings_only_when_idle() -> None:
    clock, ka, pings, _ = make()
    for _ in range(5):
        ka.sent_flag = True
        ka.received_flag = True
        clock.advance(1.0)
    assert pings == []
    ka.received_flag = True
    clock.advance(1.0)
    assert pings == [1]
    ka.received_flag = True
    clock.advance(1.0)
    assert pings == [1, 2]


def test_silence_declared_within_timeout_plus_one_interval() -> None:
    clock, ka, _, timeouts = make()
    clock.advance(0.5)
    ka.received_flag = True  # last sign of life at t=0.5
    for _ in range(20):
        clock.advance(0.25)
    assert timeouts == [4.0]
    assert not ka.running
    assert clock.getDelayedCalls() == []


def test_traffic_keeps_it_alive_and_stop_cancels() -> None:
    clock, ka, _, timeouts = make(0.5, 1.5)
    for _ in range(40):
        ka.received_flag = True
        clock.advance(0.5)
    assert timeouts == []
    ka.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert timeouts == []


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Keepalive(Clock(), 0, 1, lambda n: None, lambda: None)
    with pytest.raises(ValueError):
        Keepalive(Clock(), 2, 1, lambda n: None, lambda: None)
