"""Which server hosts which encoder, across the cluster (sans-IO).

The hosting server is the authority for its encoders: when one registers,
the server stamps the registration with an epoch (a hybrid-logical-clock
stamp, later than anything it has seen) and announces the location; when
the encoder leaves, the same server announces it offline.  Every server
merges the announcements it hears:

* an announcement that an encoder is online (or streaming) wins when its
  epoch is newer than the entry's: the newest registration is where the
  encoder is;
* an announcement that an encoder is offline applies only if it comes from
  the server the entry names, with a newer epoch: a server can take only
  its own registration back, never one made later elsewhere;
* when a server is declared dead, the entries naming it go offline at once.

Merging is idempotent and does not depend on the order of announcements
from different servers, so every server converges on the same view.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from evserver.state.hlc import Stamp
from evserver.wire.messages import EncoderState


@attrs.frozen
class Location:
    """One announcement: ``encoder_id`` is registered on ``server_id``.

    ``epoch`` is the stamp of the registration (fixed for its life); ``seq``
    counts the state changes announced within it.
    """

    encoder_id: str
    server_id: str
    epoch: Stamp
    seq: int
    state: int  # EncoderState: OFFLINE, ONLINE or STREAMING

    @property
    def online(self) -> bool:
        return self.state != EncoderState.OFFLINE

    @property
    def version(self) -> tuple[Stamp, int]:
        return (self.epoch, self.seq)


class Directory:
    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.entries: dict[str, Location] = {}

    def apply(self, location: Location) -> bool:
        """Merge one announcement; return whether the encoder's visible location changed."""
        current = self.entries.get(location.encoder_id)
        if current is None:
            self.entries[location.encoder_id] = location
            return location.online
        if location.version <= current.version:
            return False
        if not location.online and location.server_id != current.server_id:
            # A server can only take back its own registration.
            return False
        self.entries[location.encoder_id] = location
        return (location.server_id, location.state) != (current.server_id, current.state)

    def where(self, encoder_id: str) -> Location | None:
        """The encoder's location if it is online somewhere, else None."""
        entry = self.entries.get(encoder_id)
        return entry if entry is not None and entry.online else None

    def server_lost(self, server_id: str) -> list[Location]:
        """A server is dead: its encoders are offline.  Returns the entries changed."""
        changed = []
        for encoder_id, entry in list(self.entries.items()):
            if entry.server_id == server_id and entry.online:
                offline = attrs.evolve(entry, seq=entry.seq + 1, state=EncoderState.OFFLINE)
                self.entries[encoder_id] = offline
                changed.append(offline)
        return changed

    def hosted_by(self, server_id: str) -> list[Location]:
        return [e for e in self.entries.values() if e.server_id == server_id and e.online]

    def snapshot(self) -> list[Location]:
        """Every entry, for a peer that just connected."""
        return list(self.entries.values())

    def merge(self, locations: Iterable[Location]) -> list[Location]:
        """Apply many announcements; return the ones that changed something."""
        return [loc for loc in locations if self.apply(loc)]
