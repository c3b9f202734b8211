"""The cluster's load balancer (sans-IO): where encoders go, and which idle ones move.

Requirements R7-R9 of the design: an arriving encoder goes to the lightest
server; idle encoders are moved to even out the load, a streaming one never;
after any membership change moves wait for a stability period; a server pool
(the encoder's, else its domain's) overrides balancing, and when the whole
pool is down any live server will do, until the pool comes back.

Pure functions
--------------

``eligible(pool, alive)``
    The servers an encoder may live on: ``pool & alive`` when that is not
    empty, else every live server (an empty pool means "no pool").

``choose_server(encoder_id, pool, weights, counts)``
    Placement of an arriving (or failed-over) encoder: the eligible server
    minimising ``(count + 1) / weight``; ties go to the highest rendezvous
    score ``sha256(encoder_id, server_id)``, so that encoders arriving at once
    on different servers spread out, identically in every process.  Stateless:
    never delayed by the stability period.

``plan(weights, encoders, limit, frozen=())``
    Up to ``limit`` moves, deterministic (the order of ``encoders`` does not
    matter).  Streaming encoders, encoders in ``frozen`` and encoders hosted on
    a server not in ``weights`` (dead: failover re-places them) never move.
    First, idle encoders hosted outside their eligible set go back to their
    lightest eligible server (``choose_server``).  Then greedy improvement:
    an idle encoder on ``a`` may go to an eligible ``b`` while
    ``count_a / w_a > (count_b + 1) / w_b``; of all such moves the one with the
    largest ``count_a / w_a - (count_b + 1) / w_b`` is taken, applied to the
    counts, and the search repeats.  Counts include streaming and pooled
    encoders.  Each encoder moves at most once per call.

    That difference is exactly the decrease of the potential
    ``sum(count * (count + 1) / (2 * w))`` (Rosenthal's potential of the
    load-balancing game), so every greedy move strictly lowers it: balancing
    terminates and cannot oscillate in a fixed view.  (``sum(count**2 / w)``
    ranks moves the same way when the weights are equal, but with unequal
    weights an allowed move can raise it, e.g. 1 -> 0 on weight 1 and
    98 -> 99 on weight 100.)  Loads are compared exactly, so ``plan`` and
    ``balanced`` agree on every tie.

``balanced(weights, encoders)``
    The violations, empty when balanced: one line per idle encoder outside its
    eligible set, and one line per pair of servers ``(a, b)`` for which some
    idle encoder on ``a`` with ``b`` eligible satisfies the move condition
    above.  ``balanced(...) == []`` exactly when ``plan(..., limit >= 1)``
    returns no move.

``decider(alive)``
    The smallest live server id: the one server that runs the rebalancing.

``executable(move, hosted_here, streaming_now)``
    The host's last check before it redirects the encoder.

The stateful part
-----------------

Every server runs a ``Balancer`` and calls ``tick(weights, encoders)`` every
``settings.interval`` seconds with its current view (``weights``: the live
servers and their capacity weights; ``encoders``: the encoders the directory
shows online, with their host).  ``tick`` returns the moves this server must
start now; that is nothing unless it is ``decider(weights)`` and the
stability period is over.  Every ``Balancer`` starts with a stability period
(a server that just started has just changed the membership);
``membership_changed()`` restarts it and ends the current rebalance.

A move is *in flight* (``in_flight()``) until its outcome is known:

* done: the encoder is seen on the target;
* abandoned: the encoder is seen on a third server, ``abandon()`` is
  called (the host refused it: see ``executable``), or ``move_timeout`` passed.

An encoder seen streaming, or missing from the view, does *not* free the
move's slot at once: the host may still execute it (the stream may stop
before its check; an encoder between source and target is offline in the
directory), and freeing the slot early would let more than
``max_in_flight`` moves be under way.  The service should therefore send the
host's refusal back to the decider's ``abandon()``; otherwise the slot is
freed by ``move_timeout``.  The outcomes found by each tick are in
``settled`` (``(move, "done")`` or ``(move, why)``) for the service to log.

In-flight moves count as already made when planning (their encoders are
frozen and projected onto their targets), and ``limit`` is
``max_in_flight - len(in_flight())``.

A *rebalance* is the run of decisions from the first move until ``plan``
(with the full ``max_in_flight`` limit) has nothing more to do and no move is
in flight; an encoder moved in a rebalance is frozen until it ends, so no
encoder moves twice within one.  A membership change, or the server ceasing
to be the decider, also ends it.  ``rebalances`` counts the rebalances begun.
Across rebalances, an encoder is not moved again within ``move_cooldown``
seconds of its last move: settings changed over and over (a pool edited
three times in a second) move it at most that often, and its session lasts
long enough between moves that the client never takes them for a redirect
loop (it does after 3 redirects within 10 s with no session of 1 s between).

Timing: the decider changes only with the membership, and every balancer then
waits the stability period, so as long as a move is executed or refused
within ``stability``, two deciders never have moves under way at once.

Beyond the agreed interface: ``EncoderPlace.pool_name`` (optional, for the
reasons), ``abandon(..., move=None)`` (ignore a late answer about an earlier
move), ``Balancer.settled``, ``Balancer.rebalancing``, ``Balancer.rebalances``
and ``DEFAULT_SETTINGS``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping
from fractions import Fraction
from itertools import pairwise

import attrs
from twisted.internet.interfaces import IReactorTime


@attrs.frozen
class BalanceSettings:
    #: Seconds after any membership change before moves resume.
    stability: float = 60.0
    #: Moves under way at once (cluster-wide, as the decider is one).
    max_in_flight: int = 2
    #: A move not seen completed by then is abandoned.
    move_timeout: float = 10.0
    #: How often the service calls ``Balancer.tick``.
    interval: float = 1.0
    #: Seconds after a move of an encoder before it may be moved again.
    move_cooldown: float = 5.0


DEFAULT_SETTINGS = BalanceSettings()


@attrs.frozen
class EncoderPlace:
    """One encoder as the decider's directory sees it."""

    encoder_id: str
    #: Current host.
    server_id: str
    #: Video flowing to at least one viewer: never moved.
    streaming: bool
    #: The servers of its pool (the encoder's pool, else its domain's); empty: none.
    pool: frozenset[str] = frozenset()
    #: The pool's name, for the reasons given with moves; optional.
    pool_name: str = ""


@attrs.frozen
class Move:
    encoder_id: str
    source: str
    target: str
    #: Human-readable, for the service's log.
    reason: str


# -- pure functions -----------------------------------------------------------


def _exact(weights: Mapping[str, float]) -> dict[str, int]:
    """The weights as integers in the same proportions (exact: floats are binary fractions)."""
    fractions: dict[str, Fraction] = {}
    for server, weight in weights.items():
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight of {server!r} must be finite and > 0, not {weight!r}")
        fractions[server] = Fraction(weight)
    scale = math.lcm(*(f.denominator for f in fractions.values()))
    return {server: int(f * scale) for server, f in fractions.items()}


def _heavier(count_a: int, weight_a: int, count_b: int, weight_b: int) -> bool:
    """``count_a / weight_a > (count_b + 1) / weight_b``: moving one from a to b helps."""
    return count_a * weight_b > (count_b + 1) * weight_a


def _score(encoder_id: str, server_id: str) -> int:
    """Rendezvous score of (encoder, server): the same in every process."""
    e, s = encoder_id.encode(), server_id.encode()
    digest = hashlib.sha256(len(e).to_bytes(4, "big") + e + s).digest()
    return int.from_bytes(digest[:8], "big")


def eligible(pool: frozenset[str], alive: Collection[str]) -> frozenset[str]:
    """``pool & alive`` if that is non-empty, else every live server."""
    if pool:
        inside = frozenset(s for s in alive if s in pool)
        if inside:
            return inside
    return frozenset(alive)


def _choose(encoder_id: str, pool: frozenset[str], weights: Mapping[str, int],
            counts: Mapping[str, int]) -> str:
    candidates = eligible(pool, weights)
    if not candidates:
        raise ValueError("no live server to choose from")
    return min(candidates, key=lambda s: (Fraction(counts.get(s, 0) + 1, weights[s]),
                                          -_score(encoder_id, s), s))


def choose_server(encoder_id: str, pool: frozenset[str], weights: Mapping[str, float],
                  counts: Mapping[str, int]) -> str:
    """Where an arriving encoder goes (see the module docstring).

    ``weights``: the live servers and their capacity weights (> 0);
    ``counts``: how many encoders each hosts (missing: 0).
    """
    return _choose(encoder_id, pool, _exact(weights), counts)


def _counts(weights: Mapping[str, int], places: list[EncoderPlace]) -> dict[str, int]:
    counts = dict.fromkeys(weights, 0)
    for place in places:
        if place.server_id in counts:
            counts[place.server_id] += 1
    return counts


def _sorted_places(encoders: Iterable[EncoderPlace]) -> list[EncoderPlace]:
    places = sorted(encoders, key=lambda e: e.encoder_id)
    for first, second in pairwise(places):
        if first.encoder_id == second.encoder_id:
            raise ValueError(f"encoder {first.encoder_id!r} appears twice")
    return places


def _pool_label(place: EncoderPlace, inside: frozenset[str]) -> str:
    if place.pool_name:
        return f"pool {place.pool_name!r}"
    return "pool {" + ", ".join(sorted(inside)) + "}"


def plan(weights: Mapping[str, float], encoders: Iterable[EncoderPlace], limit: int,
         frozen: Collection[str] = ()) -> list[Move]:
    """At most ``limit`` moves that even out the load (see the module docstring)."""
    exact = _exact(weights)
    places = _sorted_places(encoders)
    if limit <= 0 or not exact:
        return []
    counts = _counts(exact, places)
    total = sum(counts.values())
    total_weight = sum(exact.values())
    frozen_ids = set(frozen)
    moves: list[Move] = []

    def share(server: str) -> str:
        return f"{total * exact[server] / total_weight:.1f}"

    # Candidates, grouped by (host, eligible set): the gain of a move depends
    # only on its two servers.
    groups: dict[tuple[str, frozenset[str]], list[EncoderPlace]] = {}
    for place in places:
        if place.streaming or place.encoder_id in frozen_ids or place.server_id not in exact:
            continue
        inside = eligible(place.pool, exact)
        if place.server_id in inside:
            groups.setdefault((place.server_id, inside), []).append(place)
        elif len(moves) < limit:
            # Outside its eligible set: back to its lightest eligible server.
            target = _choose(place.encoder_id, place.pool, exact, counts)
            moves.append(Move(place.encoder_id, place.server_id, target,
                              f"back into {_pool_label(place, inside)}"))
            counts[place.server_id] -= 1
            counts[target] += 1

    order = sorted(groups, key=lambda key: (key[0], sorted(key[1])))
    while len(moves) < limit:
        best: tuple[Fraction, str, str] | None = None
        for host, inside in order:
            if not groups[(host, inside)]:
                continue
            for target in sorted(inside):
                if target == host or not _heavier(counts[host], exact[host],
                                                  counts[target], exact[target]):
                    continue
                gain = (Fraction(counts[host], exact[host])
                        - Fraction(counts[target] + 1, exact[target]))
                if best is None or gain > best[0]:
                    best = (gain, host, target)
        if best is None:
            break
        _, host, target = best
        keys = [key for key in order if key[0] == host and target in key[1] and groups[key]]
        key, place = max(((key, place) for key in keys for place in groups[key]),
                         key=lambda kp: (_score(kp[1].encoder_id, target), kp[1].encoder_id))
        groups[key].remove(place)
        moves.append(Move(place.encoder_id, host, target,
                          f"{host} has {counts[host]} (share {share(host)}), "
                          f"{target} has {counts[target]} (share {share(target)})"))
        counts[host] -= 1
        counts[target] += 1
    return moves


def balanced(weights: Mapping[str, float], encoders: Iterable[EncoderPlace]) -> list[str]:
    """The violations of the balancing criterion; empty when balanced."""
    exact = _exact(weights)
    places = _sorted_places(encoders)
    counts = _counts(exact, places)
    violations: list[str] = []
    movable: dict[tuple[str, str], int] = {}
    for place in places:
        if place.streaming or place.server_id not in exact:
            continue
        inside = eligible(place.pool, exact)
        if place.server_id not in inside:
            violations.append(f"{place.encoder_id} on {place.server_id} is outside its "
                              f"{_pool_label(place, inside)}")
            continue
        for target in inside:
            if target != place.server_id:
                pair = (place.server_id, target)
                movable[pair] = movable.get(pair, 0) + 1
    for (host, target), n in sorted(movable.items()):
        if _heavier(counts[host], exact[host], counts[target], exact[target]):
            violations.append(
                f"{host} has {counts[host]} (weight {weights[host]:g}), "
                f"{target} has {counts[target]} (weight {weights[target]:g}): "
                f"{n} idle encoder(s) of {host} may move to {target}")
    return violations


def decider(alive: Collection[str]) -> str:
    """The server that runs the rebalancing: the smallest live server id."""
    if not alive:
        raise ValueError("no live server")
    return min(alive)


def executable(move: Move, hosted_here: bool, streaming_now: bool) -> bool:
    """The host's last check before redirecting ``move.encoder_id``.

    The move is refused (report it with ``Balancer.abandon``) when the encoder
    started streaming meanwhile or is no longer hosted here.
    """
    return hosted_here and not streaming_now


# -- the decider's state --------------------------------------------------------


@attrs.define
class _Flight:
    move: Move
    started: float


class Balancer:
    """One server's balancer: ``tick`` it every ``settings.interval`` seconds."""

    def __init__(self, clock: IReactorTime, server_id: str,
                 settings: BalanceSettings = DEFAULT_SETTINGS) -> None:
        if settings.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if not (settings.stability >= 0 and settings.move_timeout > 0
                and settings.interval > 0 and settings.move_cooldown >= 0):
            raise ValueError("need stability >= 0, move_timeout > 0, interval > 0 "
                             "and move_cooldown >= 0")
        self._clock = clock
        self.server_id = server_id
        self.settings = settings
        self._stable_at = clock.seconds() + settings.stability
        self._flights: dict[str, _Flight] = {}
        #: Encoders moved in the current rebalance (frozen until it ends).
        self._moved: set[str] = set()
        #: encoder id -> when this balancer last started a move of it.
        self._last_move: dict[str, float] = {}
        self._rebalancing = False
        #: How many rebalances this balancer has begun.
        self.rebalances = 0
        #: The moves settled by the last ``tick``: ``(move, "done")`` or ``(move, why)``.
        self.settled: list[tuple[Move, str]] = []

    def membership_changed(self) -> None:
        """A server was lost, returned, joined or removed: wait for stability again."""
        self._stable_at = self._clock.seconds() + self.settings.stability
        self._end_rebalance()

    def stable_in(self) -> float:
        """Seconds until moves may resume (0 when stable)."""
        return max(0.0, self._stable_at - self._clock.seconds())

    @property
    def rebalancing(self) -> bool:
        """Whether a rebalance is under way (moves made and not yet finished)."""
        return self._rebalancing

    def in_flight(self) -> Mapping[str, Move]:
        """The moves started by this server whose outcome is not known yet."""
        return {encoder_id: flight.move for encoder_id, flight in self._flights.items()}

    def abandon(self, encoder_id: str, why: str, move: Move | None = None) -> None:
        """The host refused the move of ``encoder_id`` (e.g. it started streaming).

        With ``move``, only that move is abandoned (a late answer about an
        earlier move of the same encoder is ignored).  The encoder stays frozen
        until the rebalance ends.  ``why`` is for the caller's log only.
        """
        flight = self._flights.get(encoder_id)
        if flight is not None and (move is None or flight.move == move):
            del self._flights[encoder_id]

    def tick(self, weights: Mapping[str, float], encoders: Iterable[EncoderPlace]) -> list[Move]:
        """Settle the moves in flight against the view; return the moves to start now."""
        now = self._clock.seconds()
        places = list(encoders)
        self.settled = []
        self._settle({place.encoder_id: place for place in places}, now)
        if not weights or decider(weights) != self.server_id:
            self._end_rebalance()
            return []
        if now < self._stable_at:
            return []
        limit = self.settings.max_in_flight - len(self._flights)
        moves: list[Move] = []
        if limit > 0:
            projected = [
                attrs.evolve(place, server_id=flight.move.target)
                if (flight := self._flights.get(place.encoder_id)) is not None else place
                for place in places
            ]
            moves = plan(weights, projected, limit,
                         self._moved | self._flights.keys() | self._cooling(now))
        if not moves:
            if not self._flights:
                self._end_rebalance()
            return []
        if not self._rebalancing:
            self._rebalancing = True
            self.rebalances += 1
        for move in moves:
            self._flights[move.encoder_id] = _Flight(move, now)
            self._moved.add(move.encoder_id)
            self._last_move[move.encoder_id] = now
        return moves

    def _cooling(self, now: float) -> set[str]:
        """The encoders moved less than ``move_cooldown`` ago (the others are forgotten)."""
        cooldown = self.settings.move_cooldown
        for encoder_id, at in list(self._last_move.items()):
            if now - at >= cooldown:
                del self._last_move[encoder_id]
        return set(self._last_move)

    def _settle(self, view: Mapping[str, EncoderPlace], now: float) -> None:
        for encoder_id, flight in list(self._flights.items()):
            move = flight.move
            place = view.get(encoder_id)
            if place is not None and place.server_id == move.target:
                outcome = "done"
            elif place is not None and place.server_id != move.source:
                outcome = f"abandoned: {encoder_id} is on {place.server_id}"
            elif now - flight.started >= self.settings.move_timeout:
                outcome = f"abandoned: not seen on {move.target} after {now - flight.started:g} s"
            else:
                # On its source (the host answers, streaming or not) or offline
                # (in transit, or gone: the host answers, else the timeout).
                continue
            del self._flights[encoder_id]
            self.settled.append((move, outcome))

    def _end_rebalance(self) -> None:
        self._moved.clear()
        self._rebalancing = False
