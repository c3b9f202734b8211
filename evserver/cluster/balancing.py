"""Load balancing inside a server: placement on connect, the decider's moves, their execution.

The rules live in ``evserver/state/balance.py`` (pure functions and the
``Balancer`` state machine); this module feeds them what the cluster knows
and carries out what they decide:

- *Placement*: ``place`` is called by the encoder control protocol when an
  encoder authenticates without ``placed_by``; it returns the server that
  should host it, or None to keep it here.  Counts come from the directory,
  plus the placements this server made in the last few seconds that have
  not reached the directory yet, so that a crowd of encoders arriving at
  once (a failover) is spread, not sent to the same lightest server.
- *Moves*: every ``interval`` every server ticks its ``Balancer``; only the
  decider (the smallest live server id) gets moves back.  A move of an
  encoder hosted here is executed at once; any other is sent as a
  ``MoveRequest`` to its host.
- *Execution*: the host checks that it still hosts the encoder and that the
  encoder is idle, then sends it an ``EncoderRedirect`` and closes the
  session; the answer goes back as ``MoveResult``.

"Live" servers for both are this one and the members whose state is ALIVE:
a suspect server is not given new encoders.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from evserver.cluster.ca import cluster_dir
from evserver.state.balance import (
    Balancer,
    BalanceSettings,
    EncoderPlace,
    Move,
    choose_server,
    decider,
    eligible,
    executable,
)
from evserver.state.membership import PeerState
from evserver.wire import messages as m
from evserver.wire import peer as p

log = Logger()

#: How long a placement made here counts towards its target's load (the
#: encoder's registration there normally reaches the directory within ms).
PLACEMENT_MEMORY = 3.0
#: How often the status file (``evserver-ctl server list``) is rewritten.
STATUS_INTERVAL = 2.0
#: After a move's encoder registered somewhere, decide again this soon.
SOON = 0.05
LOAD_FILE = "load.json"


class ClusterBalancing:
    """Placement and balancing for one server; owned by ``ClusterService``."""

    def __init__(self, cluster: Any, settings: BalanceSettings | None = None) -> None:
        self.cluster = cluster
        self.core = cluster.core
        self.store = cluster.store
        self.clock = cluster.reactor
        self.server_id: str = cluster.server_id
        self.settings = settings or BalanceSettings()
        self.balancer = Balancer(self.clock, self.server_id, self.settings)
        #: target server -> [(when, encoder_id)] placements not yet in the directory.
        self._placed: dict[str, list[tuple[float, str]]] = {}
        self._move_ids = itertools.count(1)
        #: move_id -> Move, for the moves this server asked another to execute.
        self._requested: dict[int, Move] = {}
        #: The latest decisions, newest last (for the status file and the admin site).
        self.decisions: list[dict[str, Any]] = []
        self.moves_started = 0
        self._loop: LoopingCall | None = None
        self._soon: IDelayedCall | None = None
        self._last_status = 0.0
        self._bytes_out = (self.clock.seconds(), self._bytes_sent())
        self.mbps_out = 0.0

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None

    def membership_changed(self) -> None:
        self.balancer.membership_changed()

    def directory_changed(self, encoder_ids: Iterable[str]) -> None:
        """Registrations changed: if one was a move under way, decide again at once.

        A move ends when its encoder registers on the target, within
        milliseconds; waiting for the next tick would leave the in-flight
        slot idle for up to ``interval``.
        """
        flying = self.balancer.in_flight()
        if not flying or self._soon is not None:
            return
        if any(e in flying for e in encoder_ids):
            self._soon = self.clock.callLater(SOON, self._tick_soon)

    def _tick_soon(self) -> None:
        self._soon = None
        self.tick()

    # -- what the cluster knows ------------------------------------------

    def weights(self) -> dict[str, float]:
        """The live servers (this one and ALIVE members) with their capacity weights."""
        view = self.cluster.membership.view()
        live = [self.server_id] + [sid for sid, v in view.items()
                                   if v.state == PeerState.ALIVE and sid in self.cluster.members]
        configured = self._configured_weights()
        return {sid: max(float(configured.get(sid, 1.0)), 1e-3) for sid in sorted(live)}

    def _configured_weights(self) -> Mapping[str, float]:
        try:
            return dict(self.store.server_weights())
        except Exception:  # the store is closing, or a read failed: equal weights
            log.failure("cannot read the server weights")
            return {}

    def _pools(self) -> Mapping[str, frozenset[str]]:
        try:
            return dict(self.store.encoder_pools())
        except Exception:
            log.failure("cannot read the encoder pools")
            return {}

    def _busy_here(self, encoder_id: str) -> bool:
        """Whether an encoder hosted here streams, is asked to, or has viewers (linger included)."""
        session = self.core.encoders.get(encoder_id)
        if session is None:
            return False
        channel = session.channel
        return bool(session.started or session.streaming or (
            channel is not None and channel.stream.viewer_count > 0))

    def encoders(self, weights: Mapping[str, float]) -> list[EncoderPlace]:
        """Every online encoder hosted by a live server, as the balancer sees it."""
        pools = self._pools()
        out = []
        for entry in self.core.locations.entries.values():
            if entry.server_id not in weights or self.core.locations.where(
                    entry.encoder_id) is None:
                continue
            streaming = entry.state == m.EncoderState.STREAMING
            if entry.server_id == self.server_id:
                if entry.encoder_id not in self.core.encoders:
                    continue  # the directory lags behind a session that just ended
                streaming = streaming or self._busy_here(entry.encoder_id)
            out.append(EncoderPlace(entry.encoder_id, entry.server_id, streaming,
                                    pools.get(entry.encoder_id, frozenset())))
        return out

    def counts(self, weights: Mapping[str, float], leave_out: str = "") -> dict[str, int]:
        counts = dict.fromkeys(weights, 0)
        seen: dict[str, set[str]] = {sid: set() for sid in weights}
        for entry in self.core.locations.entries.values():
            if entry.encoder_id == leave_out or entry.server_id not in counts:
                continue
            if self.core.locations.where(entry.encoder_id) is not None:
                counts[entry.server_id] += 1
                seen[entry.server_id].add(entry.encoder_id)
        now = self.clock.seconds()
        for target, recent in list(self._placed.items()):
            recent[:] = [(t, e) for t, e in recent if now - t < PLACEMENT_MEMORY]
            if not recent:
                del self._placed[target]
                continue
            if target in counts:
                counts[target] += sum(1 for _, e in recent
                                      if e != leave_out and e not in seen[target])
        return counts

    def _info(self, server_id: str) -> m.ServerInfo | None:
        record = self.cluster.members.get(server_id)
        if record is None:
            return None
        return p.server_info(server_id, record.address)

    # -- placement on connect --------------------------------------------

    def place(self, encoder_id: str, domain: str) -> m.ServerInfo | None:
        """Where an encoder that authenticated here should be hosted (None: here)."""
        weights = self.weights()
        if len(weights) < 2:
            return None
        pool = self._pools().get(encoder_id, frozenset())
        counts = self.counts(weights, leave_out=encoder_id)
        allowed = eligible(pool, weights)
        if self.server_id in allowed:
            mine = (counts[self.server_id] + 1) / weights[self.server_id]
            best = min((counts[s] + 1) / weights[s] for s in allowed)
            if mine <= best:
                return None
        target = choose_server(encoder_id, pool, weights, counts)
        if target == self.server_id:
            return None
        info = self._info(target)
        if info is None:
            return None
        self._placed.setdefault(target, []).append((self.clock.seconds(), encoder_id))
        why = (f"pool of {encoder_id} is {sorted(pool)}" if pool and self.server_id not in
               allowed else f"{target} is lighter ({counts[target]} hosted, weight "
               f"{weights[target]:g}; here {counts[self.server_id]}, weight "
               f"{weights[self.server_id]:g})")
        log.info("placement: {encoder_id} goes to {target}: {why}", encoder_id=encoder_id,
                 target=target, why=why)
        self._record("place", encoder_id, self.server_id, target, why)
        return info

    # -- the decider ------------------------------------------------------

    def tick(self) -> None:
        try:
            self._tick()
        except Exception:
            log.failure("balancer tick failed")

    def _tick(self) -> None:
        weights = self.weights()
        self._measure()
        moves = self.balancer.tick(weights, self.encoders(weights))
        for move in moves:
            self.moves_started += 1
            log.info("balancer: moving {e} from {a} to {b}: {reason}", e=move.encoder_id,
                     a=move.source, b=move.target, reason=move.reason)
            self._record("move", move.encoder_id, move.source, move.target, move.reason)
            if move.source == self.server_id:
                outcome = self.execute(move.encoder_id, move.target, move.reason)
                self._outcome(move, outcome)
                continue
            conn = self.cluster.connections.get(move.source)
            if conn is None:
                self.balancer.abandon(move.encoder_id, f"no link to {move.source}")
                continue
            move_id = next(self._move_ids) & 0xFFFFFFFF
            self._requested[move_id] = move
            conn.send(p.MoveRequest(move_id, move.encoder_id, move.target, move.reason[:200]))
        now = self.clock.seconds()
        if now - self._last_status >= STATUS_INTERVAL:
            self._last_status = now
            self.save_status(weights)

    def _outcome(self, move: Move, outcome: int) -> None:
        if outcome != p.MoveOutcome.REDIRECTED:
            why = p.MoveOutcome(outcome).name.lower().replace("_", " ")
            log.info("balancer: move of {e} to {b} refused by {a}: {why}", e=move.encoder_id,
                     a=move.source, b=move.target, why=why)
            self.balancer.abandon(move.encoder_id, why)

    def move_request(self, conn: Any, msg: p.MoveRequest) -> None:
        """A peer (the decider) asks this server to move an encoder it hosts."""
        outcome = self.execute(msg.encoder_id, msg.target_server_id, msg.reason)
        conn.send(p.MoveResult(msg.move_id, msg.encoder_id, outcome))

    def move_result(self, msg: p.MoveResult) -> None:
        move = self._requested.pop(msg.move_id, None)
        if move is not None and move.encoder_id == msg.encoder_id:
            self._outcome(move, msg.outcome)
        # Forget requests whose answers never came (their moves time out in the Balancer).
        if len(self._requested) > 64:
            for key in sorted(self._requested)[:-64]:
                del self._requested[key]

    def execute(self, encoder_id: str, target: str, reason: str) -> int:
        """Redirect an idle encoder hosted here to ``target``; the outcome for MoveResult."""
        session = self.core.encoders.get(encoder_id)
        if session is None:
            return p.MoveOutcome.NOT_HERE
        weights = self.weights()
        info = self._info(target)
        if target == self.server_id or target not in weights or info is None:
            return p.MoveOutcome.UNKNOWN_TARGET
        move = Move(encoder_id, self.server_id, target, reason)
        if not executable(move, hosted_here=True, streaming_now=self._busy_here(encoder_id)):
            return p.MoveOutcome.STREAMING
        pool = self._pools().get(encoder_id, frozenset())
        code = (m.RedirectReason.POOL if self.server_id not in eligible(pool, weights)
                else m.RedirectReason.BALANCE)
        log.info("moving {e} to {target} ({why}): {reason}", e=encoder_id, target=target,
                 why=m.REDIRECT_REASONS[code], reason=reason)
        self._placed.setdefault(target, []).append((self.clock.seconds(), encoder_id))
        self.core.redirect_encoder(session, info, code)
        return p.MoveOutcome.REDIRECTED

    # -- visibility --------------------------------------------------------

    def _bytes_sent(self) -> int:
        counter = getattr(self.core, "bytes_out", None)
        return int(counter()) if callable(counter) else 0

    def _measure(self) -> None:
        now, sent = self.clock.seconds(), self._bytes_sent()
        then, before = self._bytes_out
        if now - then >= 1.0:
            self.mbps_out = max(0, sent - before) * 8 / 1e6 / (now - then)
            self._bytes_out = (now, sent)

    def load(self) -> p.Load:
        stats = self.core.stats()
        return p.Load(stats["encoders"], stats["streaming"], stats["viewers"],
                      min(int(self.mbps_out * 1000), 0xFFFFFFFF))

    def _record(self, kind: str, encoder_id: str, source: str, target: str, why: str) -> None:
        self.decisions.append({"at": time.time(), "kind": kind, "encoder": encoder_id,
                               "from": source, "to": target, "reason": why})
        del self.decisions[:-50]

    def status(self, weights: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Loads, weights, the decider and the latest decisions (JSON-ready)."""
        weights = self.weights() if weights is None else weights
        loads = {self.server_id: self.load()}
        loads.update({sid: load for sid, load in self.cluster.loads.items() if sid in weights})
        counts = self.counts(weights)
        return {
            "at": time.time(),
            "server_id": self.server_id,
            "decider": decider(weights),
            "stable_in_s": round(self.balancer.stable_in(), 1),
            "settings": {"stability_s": self.settings.stability,
                         "max_in_flight": self.settings.max_in_flight},
            "servers": {sid: {"weight": weights[sid], "hosted": counts.get(sid, 0),
                              "encoders": loads[sid].encoders if sid in loads else None,
                              "streaming": loads[sid].streaming if sid in loads else None,
                              "viewers": loads[sid].viewers if sid in loads else None,
                              "mbps_out": (loads[sid].mbps_out_milli / 1000
                                           if sid in loads else None)}
                        for sid in weights},
            "in_flight": [{"encoder": mv.encoder_id, "from": mv.source, "to": mv.target,
                           "reason": mv.reason}
                          for mv in self.balancer.in_flight().values()],
            "decisions": self.decisions[-20:],
        }

    def save_status(self, weights: Mapping[str, float] | None = None) -> None:
        path = cluster_dir(self.cluster.data_dir) / LOAD_FILE
        tmp = path.with_name(f".{LOAD_FILE}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.status(weights), indent=1), encoding="utf-8")
            tmp.replace(path)
        except OSError as e:
            log.warn("cannot write {path}: {error}", path=str(path), error=str(e))
