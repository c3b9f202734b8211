"""Hybrid logical clocks (Kulkarni et al.), for stamping replicated writes.

A stamp is (wall milliseconds, counter, node id).  Stamps from one clock
strictly increase; a clock that observes a remote stamp moves past it, so a
write made after seeing another write is stamped later even when the two
machines' clocks disagree.  The node id breaks ties, so any two stamps are
ordered the same way on every server: last-writer-wins needs nothing else.

Clock skew is measured and reported (``max_skew_seen_ms``), not relied on.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

_COUNTER_MAX = 0xFFFF


@attrs.frozen(order=True)
class Stamp:
    wall_ms: int
    counter: int
    node: str

    def encode(self) -> str:
        """A text form whose string order is the stamp order (for SQLite columns)."""
        return f"{self.wall_ms:013d}.{self.counter:05d}.{self.node}"

    @classmethod
    def decode(cls, text: str) -> Stamp:
        try:
            wall, counter, node = text.split(".", 2)
            stamp = cls(int(wall), int(counter), node)
        except ValueError:
            raise ValueError(f"not a stamp: {text!r}") from None
        if stamp.wall_ms < 0 or not 0 <= stamp.counter <= _COUNTER_MAX or not node:
            raise ValueError(f"not a stamp: {text!r}")
        return stamp


ZERO = Stamp(0, 0, "")


class HybridClock:
    """One server's hybrid logical clock; ``wall_ms`` is injected (tests drive it)."""

    def __init__(self, node: str, wall_ms: Callable[[], int]) -> None:
        if not node or "." in node:
            raise ValueError("node id must be non-empty and contain no '.'")
        self.node = node
        self._wall_ms = wall_ms
        self._last = ZERO
        #: The largest amount by which a remote stamp was ahead of our wall clock.
        self.max_skew_seen_ms = 0

    @property
    def last(self) -> Stamp:
        return self._last

    def now(self) -> Stamp:
        """A new stamp for a local event, later than every stamp seen so far."""
        pt = self._wall_ms()
        last = self._last
        if pt > last.wall_ms:
            stamp = Stamp(pt, 0, self.node)
        else:
            stamp = self._bump(last.wall_ms, last.counter)
        self._last = stamp
        return stamp

    def observe(self, remote: Stamp) -> Stamp:
        """Move past a stamp received from another server; return the new local stamp."""
        pt = self._wall_ms()
        self.max_skew_seen_ms = max(self.max_skew_seen_ms, remote.wall_ms - pt)
        last = self._last
        wall = max(pt, last.wall_ms, remote.wall_ms)
        if wall == last.wall_ms and wall == remote.wall_ms:
            stamp = self._bump(wall, max(last.counter, remote.counter))
        elif wall == last.wall_ms:
            stamp = self._bump(wall, last.counter)
        elif wall == remote.wall_ms:
            stamp = self._bump(wall, remote.counter)
        else:
            stamp = Stamp(wall, 0, self.node)
        self._last = stamp
        return stamp

    def _bump(self, wall: int, counter: int) -> Stamp:
        if counter >= _COUNTER_MAX:
            # 65,535 events in one millisecond: borrow the next millisecond.
            return Stamp(wall + 1, 0, self.node)
        return Stamp(wall, counter + 1, self.node)
