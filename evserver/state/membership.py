"""Cluster membership: a failure detector per peer, with indirect probes (sans-IO).

A :class:`Membership` holds one :class:`PeerMachine` (an Automat typed machine)
for every other member of the cluster.  It never touches a socket: the I/O
layer feeds it events (``on_connection_made``, ``on_frame``, ...) and carries
out what it asks through :class:`IMembershipActions`.  Time comes from an
injected ``IReactorTime``; jitter from an injected :class:`random.Random`.

States of a peer, as this server sees it (``alive`` and ``suspect`` have an
open link to the peer; ``connecting`` and ``dead`` are trying to get one)::

    state       event                               next        effect
    ----------  ----------------------------------  ----------  ---------------------
    connecting  link up (Hello read)                alive       heartbeats start
                0.75 s without evidence             connecting  probe round
                a helper says "alive"               connecting  evidence: clocks restart
                every helper asked says "not alive" dead
                1.5 s without evidence              dead
                attempt failed                      connecting  retry after back-off
    alive       0.75 s without a frame              suspect     probe round
                link lost                           connecting  connect now, probe round
    suspect     frame, link up, helper says "alive" alive
                link lost                           connecting  connect now, probe round
                0.75 s more without "alive"         dead        link closed
    dead        link up                             alive
                back-off over / attempt failed      dead        connect / retry later
    any         Hello with a higher incarnation     dead, alive counters reset
    any         remove_member                       left        link closed, timers gone

Timings (defaults of :class:`MembershipSettings`, from
``docs/cluster-design.rst``):

* a heartbeat every 0.25 s on every open link (``alive`` and ``suspect``: a
  suspect link is still open, and staying quiet on it would make the peer
  suspect us too);
* ``suspect`` exactly 0.75 s after the last frame (a per-peer deadline timer
  re-armed lazily: a frame only stores a timestamp, the timer checks it when
  it fires and re-arms for the new deadline);
* on turning suspect, every other *alive* member is asked to probe the peer;
  ``dead`` 0.75 s later unless one of them answers "alive" (so 1.5 s from
  the last frame; at the same moment when there is nobody to ask);
* a probe helper answers "alive" only on *fresh* evidence: the first frame it
  receives from the target after the request (as in SWIM, where the helper
  pings the target).  An answer from "frames seen within the last 0.75 s"
  would let a helper that heard a frozen peer a few milliseconds later than
  we did push the verdict back by another 0.75 s, beyond the 1.5 s budget.
  It answers "not alive" at once when the target is not alive in its own
  view, and later when the target leaves ``alive`` there.

Decisions:

* A reset link is not death: the peer may be alive and only the link broke.
  The peer goes to ``connecting``, a new connection is attempted at once, and
  every other alive member is asked at once whether it still hears the peer.
  If every one of them answers "not alive" (they lost it too: a crashed
  process resets all its links) the peer is ``dead`` straight away; if one
  answers "alive", the silence clock restarts from that answer; otherwise
  ``dead`` when nothing (no link, no "alive" answer) came within
  ``suspect_after + probe_timeout`` of the last evidence, with a second probe
  round after ``suspect_after``.  A silent peer whose link stays open is
  never declared dead before the full 1.5 s, even if every helper says "not
  alive": a 0.8 s pause (garbage collection, a busy disk) must not evict it.
* ``dead`` retries the connection itself, with the back-off (0.25 s doubling
  to 0.5 s, +-10 % jitter: a partition's heal must be noticed within about
  a second, for replicas to converge within 1 s of it), and goes straight
  to ``alive`` when a link comes up: it does not pass through
  ``connecting`` on every attempt, which would report dead -> connecting ->
  dead each time to the cluster service (and make it push server
  lists to every client each time).
* A positive probe answer counts as evidence: ``last_seen`` becomes the time
  of the answer.  A peer we cannot hear but others can therefore cycles
  alive -> suspect -> alive every ~0.75 s and is never declared dead.
* A higher incarnation in a Hello means the peer restarted: if this
  incarnation had been heard, the peer is first reported ``dead`` (its old
  sessions are gone), then ``alive`` with its counters and measurements
  reset.  A lower incarnation is refused.
* ``member_state_changed`` is not called by ``add_member`` (the caller
  knows); it is called for every transition after that, ``left`` included.

Contract with the I/O layer: at most one link per peer.
``on_connection_made(server_id, incarnation)`` when a link (either
direction) is authenticated and its Hello read; ``on_connection_lost`` when
that link is gone; ``on_connect_failed`` when an attempt asked for by
``connect`` failed.  ``connect`` is a request: a no-op while an attempt is
in flight or a link is up.  ``on_frame`` for every frame received from the
peer (heartbeats, acks, replication, anything).  The I/O layer acknowledges
heartbeats itself (echo ``seq`` and ``sent_wall_us``, add its receive and
send wall times) and reports acks through ``on_heartbeat_ack``.
"""

from __future__ import annotations

import enum
import statistics
from collections import deque
from random import Random
from typing import TYPE_CHECKING, NamedTuple, Protocol

import attrs
from automat import TypeMachine, TypeMachineBuilder
from zope.interface import Interface

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = [
    "IMembershipActions",
    "Membership",
    "MembershipSettings",
    "PeerMachine",
    "PeerState",
    "PeerView",
]

#: Tolerance when comparing clock readings against deadlines.
_EPSILON = 1e-9
#: Heartbeats remembered for matching acknowledgements.
_SENT_REMEMBERED = 32


class PeerState(enum.StrEnum):
    CONNECTING = "connecting"
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_LINKED = frozenset({PeerState.ALIVE, PeerState.SUSPECT})
_UNLINKED = frozenset({PeerState.CONNECTING, PeerState.DEAD})


class IMembershipActions(Interface):
    """What the membership asks of the I/O layer and the cluster service."""

    def connect(server_id: str) -> None:
        """Open a link to the peer (no-op while an attempt is in flight or a link is up)."""

    def disconnect(server_id: str) -> None:
        """Close the link to the peer, or abandon the attempt in flight."""

    def send_heartbeat(server_id: str, seq: int, sent_wall_us: int) -> None:
        """Send a Heartbeat on the peer's link."""

    def send_probe_request(via_server_id: str, target_server_id: str, nonce: int) -> None:
        """Ask ``via_server_id`` whether it still hears ``target_server_id``."""

    def send_probe_reply(to_server_id: str, target_server_id: str, nonce: int, alive: bool) -> None:
        """Answer a ProbeRequest received from ``to_server_id``."""

    def member_state_changed(server_id: str, old_state: PeerState, new_state: PeerState) -> None:
        """A peer changed state (the cluster service reacts: directory, server lists)."""


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


@attrs.frozen
class MembershipSettings:
    """Timings and thresholds of the failure detector (seconds unless named)."""

    heartbeat_interval: float = attrs.field(default=0.25, validator=_positive)
    suspect_after: float = attrs.field(default=0.75, validator=_positive)
    probe_timeout: float = attrs.field(default=0.75, validator=_positive)
    reconnect_initial: float = attrs.field(default=0.25, validator=_positive)
    #: A dead peer is dialled at least this often (before the jitter): with the
    #: peer connection timeout it bounds how late a link is back after a heal.
    reconnect_max: float = attrs.field(default=0.5, validator=_positive)
    reconnect_factor: float = 2.0
    #: Each back-off delay is multiplied by a uniform factor in [1 - j, 1 + j].
    reconnect_jitter: float = 0.1
    rtt_warn_ms: float = 100.0
    offset_warn_ms: float = 500.0
    #: Moving-median window for RTT and clock offset.
    samples: int = 15

    def __attrs_post_init__(self) -> None:
        if self.suspect_after <= self.heartbeat_interval:
            raise ValueError("suspect_after must exceed heartbeat_interval")
        if self.reconnect_max < self.reconnect_initial:
            raise ValueError("reconnect_max must be >= reconnect_initial")
        if self.reconnect_factor < 1:
            raise ValueError("reconnect_factor must be >= 1")
        if not 0 <= self.reconnect_jitter < 1:
            raise ValueError("reconnect_jitter must be in [0, 1)")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")

    def reconnect_delay(self, failures: int, rng: Random) -> float:
        """The wait before the next attempt after ``failures`` (>= 1) in a row."""
        exponent = min(max(failures, 1) - 1, 64)
        base = min(self.reconnect_initial * self.reconnect_factor**exponent, self.reconnect_max)
        return base * (1 + self.reconnect_jitter * (2 * rng.random() - 1))


class PeerView(NamedTuple):
    """One row of :meth:`Membership.view`."""

    state: PeerState
    incarnation: int
    rtt_ms: float | None
    offset_ms: float | None


# -- the per-peer machine ------------------------------------------------------


class _PeerInputs(Protocol):
    """Inputs of a :class:`PeerMachine` (see the module docstring)."""

    def connection_made(self) -> None:
        """An authenticated link to the peer is up."""

    def connection_lost(self) -> None:
        """The link is gone."""

    def connect_failed(self) -> None:
        """Our connection attempt failed."""

    def frame_received(self) -> None:
        """A frame came from the peer (``last_seen`` already updated)."""

    def silence_timeout(self) -> None:
        """Nothing heard for ``suspect_after``."""

    def probe_confirmed_alive(self) -> None:
        """A helper heard the peer after our probe request."""

    def probe_refuted(self) -> None:
        """Every helper asked in the current round answered 'not alive'."""

    def probe_timeout(self) -> None:
        """No evidence for ``suspect_after + probe_timeout``."""

    def reconnect_due(self) -> None:
        """The back-off wait is over."""

    def restarted(self) -> None:
        """The peer came back with a higher incarnation."""

    def left(self) -> None:
        """The peer was removed from the cluster."""


class _Host(Protocol):
    """What a peer machine needs from its :class:`Membership`."""

    def _probe_helpers(self, target: str) -> list[str]: ...

    def _next_nonce(self) -> int: ...

    def _state_changed(self, server_id: str, old: PeerState, new: PeerState) -> None: ...


@attrs.define(eq=False)
class _ProbeRound:
    nonce: int
    asked: frozenset[str]
    answers: dict[str, bool] = attrs.field(factory=dict)


@attrs.define(eq=False)
class _PeerCore:
    """Everything a peer machine knows; the timers are owned by states."""

    server_id: str
    incarnation: int
    clock: IReactorTime
    settings: MembershipSettings
    rng: Random
    actions: IMembershipActions
    host: _Host
    wall_us: Callable[[], int]
    state: PeerState = PeerState.CONNECTING
    #: Clock time of the last evidence of life (frame, link up, "alive" answer).
    last_seen: float = 0.0
    #: A frame or a link from this incarnation has been seen.
    heard: bool = False
    attempt_pending: bool = False
    failures: int = 0
    seq: int = 0
    sent: dict[int, int] = attrs.field(factory=dict)
    rtt_ms: deque[float] = attrs.field(factory=deque)
    offset_ms: deque[float] = attrs.field(factory=deque)
    # Owned by the linked states (alive, suspect):
    heartbeat_call: IDelayedCall | None = None
    # Owned by the unlinked states (connecting, dead):
    retry_call: IDelayedCall | None = None
    # Owned by alive and connecting:
    silence_call: IDelayedCall | None = None
    # Owned by suspect and connecting:
    deadline_call: IDelayedCall | None = None
    probe: _ProbeRound | None = None
    # Owned by alive: probe requests waiting for a fresh frame (requester -> nonce).
    pending: dict[str, int] = attrs.field(factory=dict)

    def reset_counters(self, incarnation: int) -> None:
        self.incarnation = incarnation
        self.heard = False
        self.failures = 0
        self.seq = 0
        self.sent.clear()
        self.rtt_ms.clear()
        self.offset_ms.clear()


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


# State entry and exit: every timer is created on entering the state (or
# super-state) that owns it and cancelled on leaving it.


def _heartbeat(inputs: _PeerInputs, core: _PeerCore) -> None:
    core.heartbeat_call = None
    core.seq += 1
    t0 = core.wall_us()
    core.sent[core.seq] = t0
    if len(core.sent) > _SENT_REMEMBERED:
        del core.sent[next(iter(core.sent))]
    core.actions.send_heartbeat(core.server_id, core.seq, t0)
    core.heartbeat_call = core.clock.callLater(
        core.settings.heartbeat_interval, _heartbeat, inputs, core
    )


def _arm_silence(inputs: _PeerInputs, core: _PeerCore) -> None:
    due = core.last_seen + core.settings.suspect_after
    core.silence_call = core.clock.callLater(
        max(0.0, due - core.clock.seconds()), _silence_check, inputs, core
    )


def _silence_check(inputs: _PeerInputs, core: _PeerCore) -> None:
    core.silence_call = None
    if core.clock.seconds() - core.last_seen >= core.settings.suspect_after - _EPSILON:
        inputs.silence_timeout()
    else:
        _arm_silence(inputs, core)


def _arm_deadline(inputs: _PeerInputs, core: _PeerCore) -> None:
    _cancel(core.deadline_call)
    s = core.settings
    due = core.last_seen + s.suspect_after + s.probe_timeout
    core.deadline_call = core.clock.callLater(
        max(0.0, due - core.clock.seconds()), _deadline, inputs
    )


def _deadline(inputs: _PeerInputs) -> None:
    inputs.probe_timeout()


def _schedule_retry(inputs: _PeerInputs, core: _PeerCore) -> None:
    _cancel(core.retry_call)
    delay = core.settings.reconnect_delay(core.failures, core.rng)
    core.retry_call = core.clock.callLater(delay, inputs.reconnect_due)


def _connect(core: _PeerCore) -> None:
    core.attempt_pending = True
    core.actions.connect(core.server_id)


def _start_probe_round(core: _PeerCore) -> None:
    """Ask every other alive member about this peer (replaces any earlier round)."""
    helpers = core.host._probe_helpers(core.server_id)
    if not helpers:
        core.probe = None
        return
    nonce = core.host._next_nonce()
    core.probe = _ProbeRound(nonce, frozenset(helpers))
    for helper in helpers:
        core.actions.send_probe_request(helper, core.server_id, nonce)


def _answer_pending(core: _PeerCore, alive: bool) -> None:
    pending, core.pending = core.pending, {}
    for requester, nonce in pending.items():
        core.actions.send_probe_reply(requester, core.server_id, nonce, alive)


def _exit(inputs: _PeerInputs, core: _PeerCore, old: PeerState, new: PeerState) -> None:
    if old is PeerState.ALIVE:
        _cancel(core.silence_call)
        core.silence_call = None
        _answer_pending(core, False)
    elif old is PeerState.SUSPECT:
        _cancel(core.deadline_call)
        core.deadline_call = None
        core.probe = None
    elif old is PeerState.CONNECTING:
        _cancel(core.silence_call)
        _cancel(core.deadline_call)
        core.silence_call = core.deadline_call = None
        core.probe = None
    if old in _LINKED and new not in _LINKED:
        _cancel(core.heartbeat_call)
        core.heartbeat_call = None
    if old in _UNLINKED and new not in _UNLINKED:
        _cancel(core.retry_call)
        core.retry_call = None
        core.attempt_pending = False


def _enter(inputs: _PeerInputs, core: _PeerCore, old: PeerState | None, new: PeerState) -> None:
    if new in _LINKED and old not in _LINKED:
        core.failures = 0
        _heartbeat(inputs, core)
    if new in _UNLINKED and old not in _UNLINKED and new is PeerState.DEAD:
        # Declared dead over an open link (or a restart): retry after a pause.
        core.failures = 1
        _schedule_retry(inputs, core)
    if new is PeerState.ALIVE:
        _arm_silence(inputs, core)
    elif new is PeerState.SUSPECT:
        _arm_deadline(inputs, core)
        _start_probe_round(core)
    elif new is PeerState.CONNECTING:
        _arm_silence(inputs, core)
        _arm_deadline(inputs, core)
        _connect(core)
        if old is not None:
            # The link broke: ask at once whether the others still hear the peer.
            _start_probe_round(core)


# Transition effects.


def _seen(core: _PeerCore) -> None:
    core.last_seen = core.clock.seconds()


def _link_up(core: _PeerCore) -> None:
    _seen(core)
    core.heard = True


def _attempt_failed(inputs: _PeerInputs, core: _PeerCore) -> None:
    if not core.attempt_pending:
        return  # a late report about a link we closed ourselves
    core.attempt_pending = False
    core.failures += 1
    _schedule_retry(inputs, core)


def _retry(inputs: _PeerInputs, core: _PeerCore) -> None:
    core.retry_call = None
    if not core.attempt_pending:
        _connect(core)


def _silence_while_connecting(inputs: _PeerInputs, core: _PeerCore) -> None:
    _start_probe_round(core)


def _confirmed_while_connecting(inputs: _PeerInputs, core: _PeerCore) -> None:
    _seen(core)
    core.probe = None
    _cancel(core.silence_call)
    _arm_silence(inputs, core)
    _arm_deadline(inputs, core)


def _fresh_frame(inputs: _PeerInputs, core: _PeerCore) -> None:
    if core.pending:
        _answer_pending(core, True)


def _disconnect(inputs: _PeerInputs, core: _PeerCore) -> None:
    core.actions.disconnect(core.server_id)


def _build_machine() -> TypeMachine[_PeerInputs, _PeerCore]:
    builder = TypeMachineBuilder(_PeerInputs, _PeerCore)
    # The first state declared is the initial one.
    states = {s: builder.state(s.value) for s in PeerState}
    In = _PeerInputs
    S = PeerState

    def go(
        old: PeerState,
        inp: Callable[[_PeerInputs], None],
        new: PeerState,
        before: Callable[[_PeerCore], None] | None = None,
        after: Callable[[_PeerInputs, _PeerCore], None] | None = None,
    ) -> None:
        def transition(inputs: _PeerInputs, core: _PeerCore) -> None:
            if before is not None:
                before(core)
            if new is not old:
                _exit(inputs, core, old, new)
                core.state = new
                _enter(inputs, core, old, new)
            if after is not None:
                after(inputs, core)
            if new is not old:
                core.host._state_changed(core.server_id, old, new)

        transition.__name__ = f"{old}_{inp.__name__}"
        states[old].upon(inp).to(states[new])(transition)

    def ignore(old: PeerState, *inps: Callable[[_PeerInputs], None]) -> None:
        for inp in inps:
            go(old, inp, old)

    go(S.CONNECTING, In.connection_made, S.ALIVE, before=_link_up)
    go(S.CONNECTING, In.connect_failed, S.CONNECTING, after=_attempt_failed)
    go(S.CONNECTING, In.silence_timeout, S.CONNECTING, after=_silence_while_connecting)
    go(S.CONNECTING, In.probe_confirmed_alive, S.CONNECTING, after=_confirmed_while_connecting)
    go(S.CONNECTING, In.probe_refuted, S.DEAD)
    go(S.CONNECTING, In.probe_timeout, S.DEAD)
    go(S.CONNECTING, In.reconnect_due, S.CONNECTING, after=_retry)
    go(S.CONNECTING, In.restarted, S.DEAD)
    go(S.CONNECTING, In.left, S.LEFT, after=_disconnect)
    ignore(S.CONNECTING, In.connection_lost, In.frame_received)

    go(S.ALIVE, In.connection_made, S.ALIVE, before=_link_up)
    go(S.ALIVE, In.connection_lost, S.CONNECTING)
    go(S.ALIVE, In.frame_received, S.ALIVE, after=_fresh_frame)
    go(S.ALIVE, In.silence_timeout, S.SUSPECT)
    go(S.ALIVE, In.restarted, S.DEAD)
    go(S.ALIVE, In.left, S.LEFT, after=_disconnect)
    ignore(
        S.ALIVE,
        In.connect_failed,
        In.probe_confirmed_alive,
        In.probe_refuted,
        In.probe_timeout,
        In.reconnect_due,
    )

    go(S.SUSPECT, In.connection_made, S.ALIVE, before=_link_up)
    go(S.SUSPECT, In.connection_lost, S.CONNECTING)
    go(S.SUSPECT, In.frame_received, S.ALIVE)
    go(S.SUSPECT, In.probe_confirmed_alive, S.ALIVE, before=_seen)
    go(S.SUSPECT, In.probe_timeout, S.DEAD, after=_disconnect)
    go(S.SUSPECT, In.restarted, S.DEAD)
    go(S.SUSPECT, In.left, S.LEFT, after=_disconnect)
    # A silent peer on an open link gets the full probe timeout, even when
    # every helper has already said "not alive".
    ignore(S.SUSPECT, In.connect_failed, In.silence_timeout, In.probe_refuted, In.reconnect_due)

    go(S.DEAD, In.connection_made, S.ALIVE, before=_link_up)
    go(S.DEAD, In.connect_failed, S.DEAD, after=_attempt_failed)
    go(S.DEAD, In.reconnect_due, S.DEAD, after=_retry)
    go(S.DEAD, In.left, S.LEFT, after=_disconnect)
    ignore(
        S.DEAD,
        In.connection_lost,
        In.frame_received,
        In.silence_timeout,
        In.probe_confirmed_alive,
        In.probe_refuted,
        In.probe_timeout,
        In.restarted,
    )

    ignore(
        S.LEFT,
        In.connection_made,
        In.connection_lost,
        In.connect_failed,
        In.frame_received,
        In.silence_timeout,
        In.probe_confirmed_alive,
        In.probe_refuted,
        In.probe_timeout,
        In.reconnect_due,
        In.restarted,
        In.left,
    )
    return builder.build()


class PeerMachine:
    """The failure detector for one other member; built by :class:`Membership`.

    The inputs are methods (``connection_made()``, ``frame_received()``, ...);
    the machine is in ``connecting`` and asks for a link when started.
    """

    __slots__ = ("_inputs", "core")

    def __init__(self, core: _PeerCore) -> None:
        self.core = core
        core.state = PeerState.CONNECTING
        core.last_seen = core.clock.seconds()
        self._inputs = _MACHINE(core)

    def start(self) -> None:
        """Enter ``connecting``: arm its timers and ask for a link.

        Separate from construction so that the owner can register the machine
        first: the link asked for may fail at once, and its report
        (``Membership.on_connect_failed``) must find the machine.
        """
        _enter(self._inputs, self.core, None, PeerState.CONNECTING)

    @property
    def state(self) -> PeerState:
        return self.core.state

    @property
    def server_id(self) -> str:
        return self.core.server_id

    def connection_made(self) -> None:
        self._inputs.connection_made()

    def connection_lost(self) -> None:
        self._inputs.connection_lost()

    def connect_failed(self) -> None:
        self._inputs.connect_failed()

    def frame_received(self) -> None:
        self._inputs.frame_received()

    def probe_confirmed_alive(self) -> None:
        self._inputs.probe_confirmed_alive()

    def probe_refuted(self) -> None:
        self._inputs.probe_refuted()

    def restarted(self) -> None:
        self._inputs.restarted()

    def left(self) -> None:
        self._inputs.left()


# -- the membership --------------------------------------------------------------


def _median(samples: deque[float]) -> float | None:
    return statistics.median(samples) if samples else None


class Membership:
    """This server's view of the other members of its cluster (sans-IO).

    ``server_id`` is this server; ``actions`` the I/O layer; ``clock`` drives
    every timer; ``rng`` gives the reconnect jitter and the first probe nonce;
    ``wall_us`` reads the wall clock (microseconds since the epoch) for
    heartbeats, by default from ``clock.seconds()``.
    """

    def __init__(
        self,
        server_id: str,
        actions: IMembershipActions,
        clock: IReactorTime,
        settings: MembershipSettings | None = None,
        rng: Random | None = None,
        wall_us: Callable[[], int] | None = None,
    ) -> None:
        self.server_id = server_id
        self.settings = settings if settings is not None else MembershipSettings()
        self._actions = actions
        self._clock = clock
        self._rng = rng if rng is not None else Random()
        self._wall_us = wall_us if wall_us is not None else self._default_wall_us
        self._peers: dict[str, PeerMachine] = {}
        self._nonce = self._rng.getrandbits(32)
        self._quiet = False

    def _default_wall_us(self) -> int:
        return int(self._clock.seconds() * 1_000_000)

    # -- members ---------------------------------------------------------------

    def add_member(self, server_id: str, incarnation: int) -> None:
        """Start watching another member (state ``connecting``; asks for a link)."""
        if server_id == self.server_id:
            raise ValueError("a server is not its own peer")
        if server_id in self._peers:
            raise ValueError(f"{server_id!r} is already a member")
        core = _PeerCore(
            server_id=server_id,
            incarnation=incarnation,
            clock=self._clock,
            settings=self.settings,
            rng=self._rng,
            actions=self._actions,
            host=self,
            wall_us=self._wall_us,
            rtt_ms=deque(maxlen=self.settings.samples),
            offset_ms=deque(maxlen=self.settings.samples),
        )
        peer = self._peers[server_id] = PeerMachine(core)
        peer.start()

    def remove_member(self, server_id: str) -> None:
        """The member left the cluster: ``left``, link closed, timers cancelled."""
        peer = self._peers.pop(server_id, None)
        if peer is None:
            return
        peer.left()
        for other in self._peers.values():
            other.core.pending.pop(server_id, None)

    def stop(self) -> None:
        """Shut down: every peer to ``left`` without notifying, every timer cancelled."""
        self._quiet = True
        try:
            for server_id in list(self._peers):
                self.remove_member(server_id)
        finally:
            self._quiet = False

    def __contains__(self, server_id: object) -> bool:
        return server_id in self._peers

    def members(self) -> list[str]:
        return sorted(self._peers)

    def state(self, server_id: str) -> PeerState:
        return self._peers[server_id].state

    def alive_members(self) -> list[str]:
        """Peers in state ``alive``, sorted."""
        return sorted(s for s, p in self._peers.items() if p.core.state is PeerState.ALIVE)

    def view(self) -> dict[str, PeerView]:
        return {
            s: PeerView(
                p.core.state,
                p.core.incarnation,
                _median(p.core.rtt_ms),
                _median(p.core.offset_ms),
            )
            for s, p in sorted(self._peers.items())
        }

    def warnings(self, server_id: str) -> list[str]:
        """Prerequisites the link to this peer misses (RTT, clock offset)."""
        core = self._peers[server_id].core
        s = self.settings
        found = []
        rtt = _median(core.rtt_ms)
        if rtt is not None and rtt > s.rtt_warn_ms:
            found.append(f"RTT {rtt:.0f} ms exceeds {s.rtt_warn_ms:.0f} ms")
        offset = _median(core.offset_ms)
        if offset is not None and abs(offset) > s.offset_warn_ms:
            found.append(f"clock offset {offset:.0f} ms exceeds {s.offset_warn_ms:.0f} ms")
        return found

    # -- events from the I/O layer ------------------------------------------------

    def on_connection_made(self, server_id: str, incarnation: int) -> bool:
        """A link to the peer is up and its Hello carried ``incarnation``.

        Returns False when the link must be refused: unknown server or an
        incarnation older than one already seen.
        """
        peer = self._peers.get(server_id)
        if peer is None or incarnation < peer.core.incarnation:
            return False
        if incarnation > peer.core.incarnation:
            if peer.core.heard:
                peer.restarted()
            peer.core.reset_counters(incarnation)
        peer.connection_made()
        return True

    def on_connection_lost(self, server_id: str) -> None:
        """The link reported by ``on_connection_made`` is gone."""
        peer = self._peers.get(server_id)
        if peer is not None:
            peer.connection_lost()

    def on_connect_failed(self, server_id: str) -> None:
        """A connection attempt asked for by ``connect`` failed."""
        peer = self._peers.get(server_id)
        if peer is not None:
            peer.connect_failed()

    def on_frame(self, server_id: str) -> None:
        """Any frame from the peer: O(1), no timer touched while it is alive."""
        peer = self._peers.get(server_id)
        if peer is None:
            return
        core = peer.core
        if core.state is PeerState.ALIVE:
            core.last_seen = self._clock.seconds()
            if core.pending:
                peer.frame_received()
        elif core.state is PeerState.SUSPECT:
            core.last_seen = self._clock.seconds()
            peer.frame_received()
        # Frames without a link (connecting, dead) are stale: ignored.

    def on_heartbeat_ack(
        self, server_id: str, seq: int, t0: int, t1: int, t2: int, t3: int
    ) -> None:
        """An ack of our heartbeat ``seq``: t0 sent, t1 received there, t2 sent
        back, t3 received here (wall clocks, microseconds).  Adds one RTT and one
        clock-offset sample (NTP formulas); acks that match no recent heartbeat
        or are inconsistent are dropped."""
        peer = self._peers.get(server_id)
        if peer is None:
            return
        core = peer.core
        rtt_us = (t3 - t0) - (t2 - t1)
        if core.sent.get(seq) != t0 or t2 < t1 or rtt_us < 0:
            return
        del core.sent[seq]
        core.rtt_ms.append(rtt_us / 1000)
        core.offset_ms.append(((t1 - t0) + (t2 - t3)) / 2000)

    def on_probe_request(self, from_id: str, target_id: str, nonce: int) -> None:
        """``from_id`` asks whether we hear ``target_id``.

        Answered "alive" on the first frame from the target after this request
        (at once if the target is this server); "not alive" at once if the
        target is not alive here, or when it stops being alive here.
        """
        if from_id not in self._peers or from_id == target_id:
            return
        if target_id == self.server_id:
            self._actions.send_probe_reply(from_id, target_id, nonce, True)
            return
        target = self._peers.get(target_id)
        if target is None or target.core.state is not PeerState.ALIVE:
            self._actions.send_probe_reply(from_id, target_id, nonce, False)
            return
        # One request per requester: a newer one replaces an older one.
        target.core.pending[from_id] = nonce

    def on_probe_reply(self, from_id: str, target_id: str, nonce: int, alive: bool) -> None:
        """``from_id`` answers our probe request about ``target_id``."""
        peer = self._peers.get(target_id)
        if peer is None:
            return
        round_ = peer.core.probe
        if round_ is None or round_.nonce != nonce or from_id not in round_.asked:
            return
        if from_id in round_.answers:
            return
        round_.answers[from_id] = alive
        if alive:
            peer.probe_confirmed_alive()
        elif len(round_.answers) == len(round_.asked) and not any(round_.answers.values()):
            peer.probe_refuted()

    # -- for the peer machines -------------------------------------------------------

    def _probe_helpers(self, target: str) -> list[str]:
        return sorted(
            s for s, p in self._peers.items() if s != target and p.core.state is PeerState.ALIVE
        )

    def _next_nonce(self) -> int:
        self._nonce = (self._nonce + 1) % (1 << 32)
        return self._nonce

    def _state_changed(self, server_id: str, old: PeerState, new: PeerState) -> None:
        if not self._quiet:
            self._actions.member_state_changed(server_id, old, new)


_MACHINE = _build_machine()
