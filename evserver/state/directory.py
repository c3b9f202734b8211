"""Which server hosts which encoder, across the cluster (sans-IO).

The hosting server is the authority for its encoders: when one registers,
the server stamps the registration with an epoch (a hybrid-logical-clock
stamp, later than anything it has seen) and announces the location; when
the encoder leaves, the same server announces it offline.  Every server
merges the announcements it hears:

* an announcement wins when it is newer than the entry, by (epoch, seq):
  the newest registration is where the encoder is, and its newest state is
  the encoder's.  That holds for offline announcements too: a server can
  take back its own registration, never one made later elsewhere (its
  offline announcement is older than that one), and the end of a later
  registration elsewhere ends an older one here as well, which it had
  superseded (a server that missed the later registration's online
  announcements, being frozen or cut off, would otherwise keep the encoder
  where it was before);
* when a server is declared dead, the entries naming it go offline at once;
* when a server is seen running an incarnation that started at a given
  time (a ``PeerHello`` or a ``MemberList`` with a higher incarnation), its
  registrations stamped before that time are over: they went away with the
  earlier run of the process, which cannot take them back itself.  They are
  kept as offline (with their version), and an announcement of such a
  registration that arrives later (forwarded by a server that had not heard
  of the restart) is merged as offline.

Merging is idempotent and does not depend on the order of announcements
from different servers, so every server converges on the same view.  That
is what lets servers forward the announcements they merge as news (see
:meth:`Directory.merge_one`): an announcement is news to a server at most
once, so forwarding ends, and a forwarded announcement is the hosting
server's own word, never newer than what it said.
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


@attrs.frozen
class Merged:
    """What merging one announcement did."""

    #: The announcement was newer than the entry and replaced it: news, which
    #: a server forwards to its other peers.
    stored: bool
    #: The encoder's visible location changed (viewers are told).
    changed: bool


class Directory:
    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.entries: dict[str, Location] = {}
        #: Servers declared dead: their entries are hidden, not rewritten, so
        #: that their own announcements apply again when they come back.
        self.lost: set[str] = set()
        #: server id -> when (wall ms) the latest incarnation known of it
        #: started: its registrations with older epochs are over.
        self.boots: dict[str, int] = {}

    def stale(self, location: Location) -> bool:
        """Whether ``location`` is a registration of an earlier run of its server."""
        return location.epoch.wall_ms < self.boots.get(location.server_id, 0)

    def merge_one(self, location: Location) -> Merged:
        """Merge one announcement (see the module docstring)."""
        if location.online and self.stale(location):
            location = attrs.evolve(location, state=EncoderState.OFFLINE)
        current = self.entries.get(location.encoder_id)
        if current is not None and location.version <= current.version:
            return Merged(False, False)
        self.entries[location.encoder_id] = location
        return Merged(True, self._seen(current) != self._seen(location))

    def apply(self, location: Location) -> bool:
        """Merge one announcement; return whether the encoder's visible location changed."""
        return self.merge_one(location).changed

    def _seen(self, entry: Location | None) -> tuple[str, int] | None:
        """What an entry shows: its server and state, or None (offline, unknown, lost)."""
        if entry is None or not entry.online or entry.server_id in self.lost:
            return None
        return (entry.server_id, entry.state)

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

    def server_restarted(self, server_id: str, boot_ms: int) -> list[Location]:
        """``server_id`` runs an incarnation started at ``boot_ms`` (wall milliseconds).

        Its registrations stamped earlier went away with its earlier run:
        they are offline from now on.  Returns those that were visible, as
        offline.  Idempotent; an older boot than one already known does nothing.
        """
        if server_id == self.server_id or boot_ms <= self.boots.get(server_id, 0):
            return []
        self.boots[server_id] = boot_ms
        out = []
        for encoder_id, entry in self.entries.items():
            if entry.server_id == server_id and entry.online and self.stale(entry):
                ended = attrs.evolve(entry, state=EncoderState.OFFLINE)
                self.entries[encoder_id] = ended
                if server_id not in self.lost:
                    out.append(ended)
        return out

    def hosted_by(self, server_id: str) -> list[Location]:
        if server_id in self.lost:
            return []
        return [e for e in self.entries.values() if e.server_id == server_id and e.online]

    def snapshot(self, exclude_server: str | None = None) -> list[Location]:
        """Every entry (but those naming ``exclude_server``), for a peer that just connected.

        A server is the authority for its own registrations: it is not sent
        back what others hold of them.
        """
        return [e for e in self.entries.values() if e.server_id != exclude_server]

    def merge(self, locations: Iterable[Location]) -> list[Location]:
        """Apply many announcements; return the ones that changed something."""
        return [loc for loc in locations if self.apply(loc)]
