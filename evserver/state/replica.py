"""Replicated records: last-writer-wins per field, tombstones, anti-entropy (sans-IO).

Every shared table (domains, accounts, encoders, pools, ...) is a set of
records keyed by a stable id.  Each field of a record carries the stamp of
the write that set it; a delete is a tombstone stamp.  Merging is a
join: per field the larger stamp wins, and a record is live when some field
was written after its tombstone.  So merges commute, are idempotent and
associative: replicas that have seen the same updates, in any order and any
number of times, are identical, and a write made on either side of a
partition survives the heal.

This module holds records in memory; the store persists them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

from evserver.state.hlc import ZERO, HybridClock, Stamp


@attrs.frozen
class Update:
    """What one write changed: some fields of one record, or its deletion."""

    table: str
    key: str
    fields: Mapping[str, tuple[Any, Stamp]] = attrs.field(factory=dict)
    deleted: Stamp | None = None

    @property
    def stamp(self) -> Stamp:
        stamps = [s for _, s in self.fields.values()]
        if self.deleted is not None:
            stamps.append(self.deleted)
        return max(stamps, default=ZERO)


@attrs.define
class Record:
    fields: dict[str, tuple[Any, Stamp]] = attrs.field(factory=dict)
    deleted: Stamp = ZERO

    @property
    def live(self) -> bool:
        return any(stamp > self.deleted for _, stamp in self.fields.values())

    @property
    def fingerprint(self) -> bytes:
        """A digest of every field's stamp and the tombstone: what anti-entropy compares.

        Two replicas of a record hold the same state exactly when their
        fingerprints match (the stamp of a write determines its value).  The
        newest stamp alone would not do: concurrent writes of different
        fields leave each side with a field the other lacks.
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(self.deleted.encode().encode())
        for name in sorted(self.fields):
            h.update(b"\0" + name.encode() + b"\0" + self.fields[name][1].encode().encode())
        return h.digest()

    def values(self) -> dict[str, Any]:
        """The live field values (fields written before the tombstone are gone)."""
        return {name: value for name, (value, stamp) in self.fields.items()
                if stamp > self.deleted}


class Replica:
    """One server's copy of every replicated table."""

    def __init__(self, clock: HybridClock) -> None:
        self.clock = clock
        self.tables: dict[str, dict[str, Record]] = {}

    # -- local writes ----------------------------------------------------

    def write(self, table: str, key: str, values: Mapping[str, Any]) -> Update:
        """Set fields of a record (creating it); returns the update to send to peers."""
        if not values:
            raise ValueError("nothing to write")
        stamp = self.clock.now()
        update = Update(table, key, {name: (value, stamp) for name, value in values.items()})
        self.apply(update)
        return update

    def delete(self, table: str, key: str) -> Update:
        update = Update(table, key, {}, self.clock.now())
        self.apply(update)
        return update

    # -- merging ---------------------------------------------------------

    def apply(self, update: Update) -> bool:
        """Merge an update (local or remote); return whether anything changed."""
        if update.stamp > self.clock.last:
            self.clock.observe(update.stamp)
        record = self.tables.setdefault(update.table, {}).setdefault(update.key, Record())
        changed = False
        if update.deleted is not None and update.deleted > record.deleted:
            record.deleted = update.deleted
            changed = True
        for name, (value, stamp) in update.fields.items():
            current = record.fields.get(name)
            if current is None or stamp > current[1]:
                record.fields[name] = (value, stamp)
                changed = True
        return changed

    # -- reading ---------------------------------------------------------

    def get(self, table: str, key: str) -> dict[str, Any] | None:
        record = self.tables.get(table, {}).get(key)
        if record is None or not record.live:
            return None
        return record.values()

    def items(self, table: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, record in sorted(self.tables.get(table, {}).items()):
            if record.live:
                yield key, record.values()

    # -- anti-entropy ----------------------------------------------------

    def digest(self) -> dict[tuple[str, str], bytes]:
        """The fingerprint of every record, tombstones included."""
        return {(table, key): record.fingerprint
                for table, records in self.tables.items()
                for key, record in records.items()}

    def updates_missing_from(self, digest: Mapping[tuple[str, str], bytes]) -> list[Update]:
        """The full state of every record that the holder of ``digest`` lacks or holds otherwise.

        Both sides send the records whose fingerprints differ; since a merge
        is a join, each side then holds the union.  Sending whole records is
        simple and safe: applying what one already has changes nothing.
        """
        out = []
        for table, records in self.tables.items():
            for key, record in records.items():
                theirs = digest.get((table, key))
                if theirs != record.fingerprint:
                    out.append(Update(table, key, dict(record.fields),
                                      record.deleted if record.deleted != ZERO else None))
        return out

    def merge_all(self, updates: Iterable[Update]) -> int:
        return sum(1 for u in updates if self.apply(u))
