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
        #: Servers declared dead: their entries are hidden, not rewritten, so
        #: that their own announcements apply again when they come back.
        self.lost: set[str] = set()

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
        return (location.server_id, location.state) != (current.server_id, current.state) or (
            current.server_id in self.lost)

    def where(self, encoder_id: str) -> Location | None:
        """The encoder's location if it is online somewhere, else None."""
        entry = self.entries.get(encoder_id)
        if entry is None or not entry.online or entry.server_id in self.lost:
            return None
        return entry

    def server_lost(self, server_id: str) -> list[Location]:
        """A server is dead: its encoders are offline.  Returns them, as offline."""
        if server_id in self.lost or server_id == self.server_id:
            return []
        self.lost.add(server_id)
        return [attrs.evolve(entry, state=EncoderState.OFFLINE)
                for entry in self.entries.values()
                if entry.server_id == server_id and entry.online]

    def server_back(self, server_id: str) -> list[Location]:
        """A server declared dead is alive again: its entries count again."""
        if server_id not in self.lost:
            return []
        self.lost.discard(server_id)
        return [entry for entry in self.entries.values()
                if entry.server_id == server_id and entry.online]

    def hosted_by(self, server_id: str) -> list[Location]:
        if server_id in self.lost:
            return []
        return [e for e in self.entries.values() if e.server_id == server_id and e.online]

    def snapshot(self) -> list[Location]:
        """Every entry, for a peer that just connected."""
        return list(self.entries.values())

    def merge(self, locations: Iterable[Location]) -> list[Location]:
        """Apply many announcements; return the ones that changed something."""
        return [loc for loc in locations if self.apply(loc)]
