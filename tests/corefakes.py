"""Stand-ins for what ``RelayCore`` needs around it: the registry and a client link.

Shared by the state-level tests of the directory and the cluster service.
"""

from __future__ import annotations

from typing import Any

import attrs

from evserver.wire import messages as m
from evserver.wire.framing import ErrorCode


@attrs.frozen
class Record:
    encoder_id: str
    name: str
    domain: str = "north"


class Registry:
    """The store's encoder records, for encoders named ``ids`` (domain "north")."""

    def __init__(self, *ids: str) -> None:
        self.records = {e: Record(e, f"Camera {e}") for e in ids}

    def list_encoders(self, domain: str | None = None) -> list[Record]:
        return [r for r in self.records.values() if domain in (None, r.domain)]

    def get_encoder(self, encoder_id: str) -> Record | None:
        return self.records.get(encoder_id)


class Link:
    """A client's control connection: what was sent to it, and how it was closed."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.closed: list[tuple[ErrorCode, str]] = []

    def send(self, msg: Any) -> None:
        self.sent.append(msg)

    def close_with_error(self, code: ErrorCode, message: str) -> None:
        self.closed.append((code, message))

    def updates(self) -> list[tuple[str, int, str]]:
        """(encoder_id, state, server_id) of every EncoderUpdate sent."""
        return [(u.encoder.encoder_id, u.encoder.state, u.encoder.server_id)
                for u in self.sent if isinstance(u, m.EncoderUpdate)]
