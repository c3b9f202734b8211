"""A keepalive and silence detector for one connection, driven by a clock.

Every frame received counts as a sign of life and every frame sent as
traffic; neither touches a timer (the per-frame cost is one attribute
assignment).  A single periodic tick sends a Ping when nothing was sent during
the last interval and declares the peer dead when nothing was received for
the timeout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Keepalive:
    __slots__ = (
        "_call",
        "_clock",
        "_limit",
        "_nonce",
        "_on_timeout",
        "_send_ping",
        "_silent_ticks",
        "interval",
        "received_flag",
        "sent_flag",
        "timeout",
    )

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        send_ping: Callable[[int], None],
        on_timeout: Callable[[], None],
    ) -> None:
        if interval <= 0 or timeout < interval:
            raise ValueError("need 0 < interval <= timeout")
        self._clock = clock
        self.interval = interval
        self.timeout = timeout
        self._send_ping = send_ping
        self._on_timeout = on_timeout
        #: Set by the connection on every frame received / sent.
        self.received_flag = False
        self.sent_flag = False
        self._silent_ticks = 0
        self._limit = math.ceil(timeout / interval - 1e-9)
        self._call: IDelayedCall | None = None
        self._nonce = 0

    @property
    def running(self) -> bool:
        return self._call is not None

    def start(self) -> None:
        if self._call is None:
            self._silent_ticks = 0
            self._call = self._clock.callLater(self.interval, self._tick)

    def stop(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _tick(self) -> None:
        self._call = None
        if self.received_flag:
            self.received_flag = False
            self._silent_ticks = 0
        else:
            self._silent_ticks += 1
            if self._silent_ticks >= self._limit:
                self._on_timeout()
                return
        if not self.sent_flag:
            self._nonce += 1
            self._send_ping(self._nonce)
        self.sent_flag = False
        self._call = self._clock.callLater(self.interval, self._tick)
