"""Messages of the peer (server-to-server) protocol, without I/O.

The peer protocol (port 47100, protocol name ``peer``) joins the servers of a
cluster: the handshake (``PeerHello`` / ``PeerWelcome``), heartbeats with
clock measurements, indirect probes, membership, link measurements
(``BandwidthProbe`` / ``BandwidthReport``), the admin pages' connection lists
(``ConnectionsRequest`` / ``Connections``), replication (``Updates``,
anti-entropy digests), the encoder directory, and joining and leaving.  The
messages are declared with the codec of ``messages.py`` (which imports this
module, so they are always registered); ``protocol-spec/peer.rst`` is
normative.

Besides the messages, this module has the pure helpers the cluster code needs
around them: the NTP-style clock measurement (``ntp_offset_rtt``), the JSON
form of replicated values (``encode_value`` / ``decode_value``), and the
splitting of replication traffic into frames (``batch_updates``,
``chunk_digest``), the frames of a bandwidth probe (``probe_frames``) and the
bounded connection lists (``pack_connections``).
"""

from __future__ import annotations

import enum
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from evserver.wire.framing import ProtocolName
from evserver.wire.messages import (
    BYTES16,
    STR,
    U8,
    U16,
    U32,
    U64,
    Bytes16,
    Checked,
    Choice,
    Embedded,
    EncoderState,
    Fixed,
    ListOf,
    Malformed,
    ServerInfo,
    _encode_fields,
    message,
    wire,
)

PEER = (ProtocolName.PEER,)

#: Default port of the peer protocol.
DEFAULT_PORT = 47100
#: Frame limit (the length field) before the handshake completes, and for
#: everything a joiner sends: what an unauthenticated peer can make us hold.
HANDSHAKE_FRAME_LIMIT = 64 * 1024
#: Frame limit once ``PeerWelcome`` has been sent or received, and for the
#: ``JoinAccept`` a joiner receives.
FRAME_LIMIT = 1024 * 1024
#: What a sender SHOULD aim at for an ``Updates`` or ``Digest`` frame, so that
#: a heartbeat never waits long behind one (21 ms at 100 Mbit/s).
BATCH_BYTES = 256 * 1024
#: Longest certificate, CA certificate, CA key or CSR, in PEM.
MAX_PEM = 16 * 1024
#: Most members in a member list (as in a client's server list).
MAX_MEMBERS = 64
#: Most fields in one ``RecordUpdate``.
MAX_FIELDS = 256
#: Size of a record fingerprint (BLAKE2b-128, see evserver/state/replica.py).
FINGERPRINT_SIZE = 16

#: A server id, as evserver/config.py accepts it.
SERVER_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: A hybrid logical clock stamp in its canonical text form
#: (evserver/state/hlc.py: ``Stamp.encode``), whose string order is the stamp
#: order: 13 digits of wall milliseconds, 5 digits of counter, the node.
STAMP_PATTERN = re.compile(r"[0-9]{13}\.([0-9]{5})\.[A-Za-z0-9._-]{1,64}")
_COUNTER_MAX = 0xFFFF


def is_server_id(text: str) -> bool:
    return SERVER_ID_PATTERN.fullmatch(text) is not None


def is_stamp(text: str) -> bool:
    match = STAMP_PATTERN.fullmatch(text)
    return match is not None and int(match[1]) <= _COUNTER_MAX


SERVER_ID = Checked("server-id", is_server_id, "a server id")
STAMP = Checked("stamp", is_stamp, "a stamp")
OPT_STAMP = Checked("stamp or empty", lambda t: t == "" or is_stamp(t), "a stamp or empty")
FLAG = Choice(U8, (0, 1))
PEM = Bytes16(MAX_PEM)
FINGERPRINT = Fixed(FINGERPRINT_SIZE)


class MemberState(enum.IntEnum):
    """A member's state in a ``Member`` record (evserver/state/membership.py's PeerState)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3
    CONNECTING = 4


MEMBER_STATE = Choice(U8, MemberState)


# --------------------------------------------------------------------------
# Records


@attrs.frozen
class ExternalAddress:
    """Where a server is reached: by clients (``host``) and by other servers (``peer_host``)."""

    host: str = wire(STR)
    encoder_port: int = wire(U16)
    viewer_port: int = wire(U16)
    relay_port: int = wire(U16)
    admin_port: int = wire(U16)
    peer_host: str = wire(STR)
    peer_port: int = wire(U16)


@attrs.frozen
class Load:
    """What a server carries, for the balancer and the admin pages."""

    encoders: int = wire(U32)
    streaming: int = wire(U32)
    viewers: int = wire(U32)
    mbps_out_milli: int = wire(U32)


@attrs.frozen
class Member:
    server_id: str = wire(SERVER_ID)
    state: int = wire(MEMBER_STATE)
    incarnation: int = wire(U64)
    address: ExternalAddress = wire(Embedded(ExternalAddress))  # noqa: RUF009 (an attrs field)


@attrs.frozen
class Field:
    """One field of a replicated record: its JSON value and the stamp of the write."""

    name: str = wire(STR)
    value: bytes = wire(BYTES16)
    stamp: str = wire(STAMP)


@attrs.frozen
class RecordUpdate:
    """Some fields of one record, and/or its tombstone (``deleted_stamp``, "" for none)."""

    table: str = wire(STR)
    key: str = wire(STR)
    deleted_stamp: str = wire(OPT_STAMP)
    fields: tuple[Field, ...] = wire(ListOf(Field, MAX_FIELDS), converter=tuple)


@attrs.frozen
class DigestEntry:
    table: str = wire(STR)
    key: str = wire(STR)
    fingerprint: bytes = wire(FINGERPRINT)


#: A location's state: EncoderState's OFFLINE, ONLINE and STREAMING.
LOCATION_STATE = Choice(U8, (EncoderState.OFFLINE, EncoderState.ONLINE, EncoderState.STREAMING))


@attrs.frozen
class Location:
    """An encoder's registration on a server (evserver/state/directory.py's Location).

    ``epoch`` stamps the registration; ``seq`` counts the state changes
    announced within it, so (epoch, seq) orders the announcements.
    """

    encoder_id: str = wire(STR)
    server_id: str = wire(SERVER_ID)
    epoch: str = wire(STAMP)
    seq: int = wire(U32)
    state: int = wire(LOCATION_STATE)


# --------------------------------------------------------------------------
# Messages: handshake


@message(0x50, protocols=PEER, from_server=False)
@attrs.frozen
class PeerHello:
    """The dialling server's first frame on a mutual-TLS connection."""

    cluster_id: str = wire(STR)
    server_id: str = wire(SERVER_ID)
    incarnation: int = wire(U64)
    software: str = wire(STR)
    address: ExternalAddress = wire(Embedded(ExternalAddress))  # noqa: RUF009 (an attrs field)


@message(0x51, protocols=PEER, from_server=True)
@attrs.frozen
class PeerWelcome:
    """The accepting server's answer to ``PeerHello``: the same fields, its own."""

    cluster_id: str = wire(STR)
    server_id: str = wire(SERVER_ID)
    incarnation: int = wire(U64)
    software: str = wire(STR)
    address: ExternalAddress = wire(Embedded(ExternalAddress))  # noqa: RUF009 (an attrs field)


# Membership ---------------------------------------------------------------


@message(0x52, protocols=PEER, from_server=None)
@attrs.frozen
class Heartbeat:
    seq: int = wire(U32)
    sent_wall_us: int = wire(U64)
    load: Load = wire(Embedded(Load))  # noqa: RUF009 (an attrs field)


@message(0x53, protocols=PEER, from_server=None)
@attrs.frozen
class HeartbeatAck:
    seq: int = wire(U32)
    echo_sent_wall_us: int = wire(U64)
    received_wall_us: int = wire(U64)
    replied_wall_us: int = wire(U64)


@message(0x54, protocols=PEER, from_server=None)
@attrs.frozen
class ProbeRequest:
    target_server_id: str = wire(SERVER_ID)
    nonce: int = wire(U64)


@message(0x55, protocols=PEER, from_server=None)
@attrs.frozen
class ProbeReply:
    target_server_id: str = wire(SERVER_ID)
    nonce: int = wire(U64)
    alive: int = wire(FLAG)


@message(0x56, protocols=PEER, from_server=None)
@attrs.frozen
class MemberList:
    members: tuple[Member, ...] = wire(ListOf(Member, MAX_MEMBERS), converter=tuple)


@message(0x57, protocols=PEER, from_server=None)
@attrs.frozen
class Leave:
    server_id: str = wire(SERVER_ID)


# Link measurements --------------------------------------------------------

#: Bytes of a ``BandwidthProbe`` frame besides its padding: length, type,
#: probe_id, index, count and the padding's length.
PROBE_FRAME_OVERHEAD = 4 + 1 + 4 + 1 + 1 + 2
#: The longest padding (bytes16): a probe frame is at most 65 548 bytes.
MAX_PROBE_PADDING = 0xFFFF


@message(0x58, protocols=PEER, from_server=None)
@attrs.frozen
class BandwidthProbe:
    """One of ``count`` frames sent back to back to measure the link's bandwidth."""

    probe_id: int = wire(U32)
    index: int = wire(U8)
    count: int = wire(U8)
    padding: bytes = wire(BYTES16)


@message(0x59, protocols=PEER, from_server=None)
@attrs.frozen
class BandwidthReport:
    """The receiver's answer to a whole probe: the bytes after its first frame and how long
    they took to arrive (its own clock)."""

    probe_id: int = wire(U32)
    bytes: int = wire(U32)
    first_to_last_us: int = wire(U64)


# The admin pages' queries ---------------------------------------------------

#: Most entries of each list of a ``Connections`` answer.
MAX_CONNECTION_ENTRIES = 2000
#: Most encoders one viewer connection watches (evserver/state/relay.py's MAX_WATCHES).
MAX_WATCHED = 64
#: A connected encoder's state: EncoderState's ONLINE and STREAMING.
CONNECTED_STATE = Choice(U8, (EncoderState.ONLINE, EncoderState.STREAMING))


@attrs.frozen
class ConnectedEncoder:
    """An encoder session on the answering server, as its own admin page lists it."""

    encoder_id: str = wire(STR)
    name: str = wire(STR)
    domain: str = wire(STR)
    state: int = wire(CONNECTED_STATE)
    viewers: int = wire(U32)
    frames_in: int = wire(U64)
    bytes_in: int = wire(U64)


@attrs.frozen
class Watched:
    encoder_id: str = wire(STR)


@attrs.frozen
class ConnectedViewer:
    """A viewer session on the answering server, as its own admin page lists it."""

    account: str = wire(STR)
    domain: str = wire(STR)
    watching: tuple[Watched, ...] = wire(ListOf(Watched, MAX_WATCHED), converter=tuple)
    relay_connected: int = wire(FLAG)
    queued_bytes: int = wire(U64)
    frames_out: int = wire(U64)
    bytes_out: int = wire(U64)
    frames_skipped: int = wire(U64)


@message(0x5A, protocols=PEER, from_server=None)
@attrs.frozen
class ConnectionsRequest:
    """Asks the receiver for the encoders and viewers connected to it (for the admin pages)."""

    request_id: int = wire(U32)


@message(0x5B, protocols=PEER, from_server=None)
@attrs.frozen
class Connections:
    """The answer to ``ConnectionsRequest``; ``truncated`` = 1 when entries were left out."""

    request_id: int = wire(U32)
    encoders: tuple[ConnectedEncoder, ...] = wire(
        ListOf(ConnectedEncoder, MAX_CONNECTION_ENTRIES), converter=tuple)
    viewers: tuple[ConnectedViewer, ...] = wire(
        ListOf(ConnectedViewer, MAX_CONNECTION_ENTRIES), converter=tuple)
    truncated: int = wire(FLAG)


# Replication --------------------------------------------------------------


@message(0x60, protocols=PEER, from_server=None)
@attrs.frozen
class Updates:
    records: tuple[RecordUpdate, ...] = wire(ListOf(RecordUpdate), converter=tuple)


@message(0x61, protocols=PEER, from_server=None)
@attrs.frozen
class DigestRequest:
    request_id: int = wire(U32)
    chunk: int = wire(U32)


@message(0x62, protocols=PEER, from_server=None)
@attrs.frozen
class Digest:
    request_id: int = wire(U32)
    chunk: int = wire(U32)
    last: int = wire(FLAG)
    entries: tuple[DigestEntry, ...] = wire(ListOf(DigestEntry), converter=tuple)


# Directory ----------------------------------------------------------------


@message(0x68, protocols=PEER, from_server=None)
@attrs.frozen
class Directory:
    locations: tuple[Location, ...] = wire(ListOf(Location), converter=tuple)


# Balancing ----------------------------------------------------------------


class MoveOutcome(enum.IntEnum):
    """What the hosting server did with a ``MoveRequest``."""

    REDIRECTED = 1  # the encoder was sent to the target
    STREAMING = 2  # refused: the encoder streams (started meanwhile)
    NOT_HERE = 3  # refused: this server does not host the encoder (any more)
    UNKNOWN_TARGET = 4  # refused: the target is not a live member here


@message(0x69, protocols=PEER, from_server=None)
@attrs.frozen
class MoveRequest:
    """From the balancer's decider to the server hosting an idle encoder: move it."""

    move_id: int = wire(U32)
    encoder_id: str = wire(STR)
    target_server_id: str = wire(SERVER_ID)
    reason: str = wire(STR)


@message(0x6A, protocols=PEER, from_server=None)
@attrs.frozen
class MoveResult:
    """The hosting server's answer to a ``MoveRequest``."""

    move_id: int = wire(U32)
    encoder_id: str = wire(STR)
    outcome: int = wire(Choice(U8, MoveOutcome))


# Joining ------------------------------------------------------------------


@message(0x70, protocols=PEER, from_server=False)
@attrs.frozen
class JoinRequest:
    """The only frame of a joiner, on a connection without a client certificate."""

    token_id: str = wire(STR)
    secret: str = wire(STR)
    server_id: str = wire(SERVER_ID)
    csr_pem: bytes = wire(PEM)
    address: ExternalAddress = wire(Embedded(ExternalAddress))  # noqa: RUF009 (an attrs field)


@message(0x71, protocols=PEER, from_server=True)
@attrs.frozen
class JoinAccept:
    cluster_id: str = wire(STR)
    certificate_pem: bytes = wire(PEM)
    ca_certificate_pem: bytes = wire(PEM)
    ca_key_pem: bytes = wire(PEM)
    members: tuple[Member, ...] = wire(ListOf(Member, MAX_MEMBERS), converter=tuple)


# --------------------------------------------------------------------------
# Helpers


def ntp_offset_rtt(t0: int, t1: int, t2: int, t3: int) -> tuple[int, int]:
    """Clock offset and round-trip time, in microseconds, from one heartbeat exchange.

    ``t0``: our wall clock when the ``Heartbeat`` left (``echo_sent_wall_us``);
    ``t1``, ``t2``: the peer's wall clock when it arrived and when the
    ``HeartbeatAck`` left (``received_wall_us``, ``replied_wall_us``); ``t3``:
    our wall clock when the ack arrived.  ``offset`` is the peer's clock minus
    ours, ``((t1 - t0) + (t2 - t3)) / 2`` rounded toward zero; ``rtt`` is
    ``(t3 - t0) - (t2 - t1)``.  Raises ValueError for a sample that no pair of
    steady clocks can produce (the peer replied before it received, or a
    negative round trip: a clock was stepped), which must be discarded.
    """
    if t2 < t1:
        raise ValueError("the reply is stamped before the heartbeat arrived")
    rtt = (t3 - t0) - (t2 - t1)
    if rtt < 0:
        raise ValueError(f"negative round trip ({rtt} us): a clock was stepped")
    twice = (t1 - t0) + (t2 - t3)
    offset = twice // 2 if twice >= 0 else -(-twice // 2)
    return offset, rtt


def server_info(server_id: str, address: ExternalAddress) -> ServerInfo:
    """The ``ServerInfo`` that clients get for a member (its client-facing address)."""
    return ServerInfo(
        server_id, address.host, address.encoder_port, address.viewer_port, address.relay_port
    )


def encode_value(value: Any) -> bytes:
    """The canonical JSON form of a replicated field's value (``Field.value``).

    Compact, keys sorted, UTF-8; NaN and infinities are refused (ValueError),
    as is a value whose JSON exceeds 65535 bytes.
    """
    raw = json.dumps(
        value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError(f"a replicated value is limited to 65535 bytes of JSON, not {len(raw)}")
    return raw


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_value(raw: bytes) -> Any:
    """Parse a ``Field.value``; raise Malformed unless it is one JSON value in UTF-8."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Malformed("a field value is not a JSON value in UTF-8") from None


def _str_size(text: str) -> int:
    return 2 + len(text.encode("utf-8"))


def _field_size(f: Field) -> int:
    return _str_size(f.name) + 2 + len(f.value) + _str_size(f.stamp)


def _record_base_size(r: RecordUpdate) -> int:
    return _str_size(r.table) + _str_size(r.key) + _str_size(r.deleted_stamp) + 2


_UPDATES_OVERHEAD = 4 + 1 + 2  # length, type, record count


def _parts(record: RecordUpdate, room: int) -> Iterator[tuple[RecordUpdate, int]]:
    """``record`` as one or more RecordUpdates (with their sizes) of at most ``room`` bytes.

    The tombstone goes with every part (merging is idempotent); a part holds
    at least one field, so a single field larger than ``room`` has a part of
    its own.
    """
    base = _record_base_size(record)
    sizes = [_field_size(f) for f in record.fields]
    total = base + sum(sizes)
    if total <= room and len(record.fields) <= MAX_FIELDS:
        yield record, total
        return
    group: list[Field] = []
    size = base
    for f, fsize in zip(record.fields, sizes, strict=True):
        if group and (size + fsize > room or len(group) == MAX_FIELDS):
            yield attrs.evolve(record, fields=tuple(group)), size
            group, size = [], base
        group.append(f)
        size += fsize
    yield attrs.evolve(record, fields=tuple(group)), size


def batch_updates(
    records: Iterable[RecordUpdate], max_bytes: int = BATCH_BYTES
) -> Iterator[Updates]:
    """Pack record updates into ``Updates`` messages of at most ``max_bytes`` per frame.

    ``max_bytes`` counts the whole frame (length, type and body).  A record
    too large for one frame, or with more than MAX_FIELDS fields, is split
    by fields.  A frame exceeds ``max_bytes`` only when it holds a single
    field that does not fit alone; since every field kind is bounded, no
    frame ever exceeds FRAME_LIMIT.  Records keep their order.
    """
    if not 64 <= max_bytes <= FRAME_LIMIT + 4:
        raise ValueError(f"max_bytes must be 64..{FRAME_LIMIT + 4}")
    room = max_bytes - _UPDATES_OVERHEAD
    batch: list[RecordUpdate] = []
    size = _UPDATES_OVERHEAD
    for record in records:
        for part, part_size in _parts(record, room):
            if batch and (size + part_size > max_bytes or len(batch) == 0xFFFF):
                yield Updates(tuple(batch))
                batch, size = [], _UPDATES_OVERHEAD
            batch.append(part)
            size += part_size
    if batch:
        yield Updates(tuple(batch))


def probe_frames(probe_id: int, count: int, frame_bytes: int) -> list[BandwidthProbe]:
    """The ``count`` frames of one bandwidth probe, each ``frame_bytes`` long in all.

    Zero padding: neither TLS nor plain TCP compresses it.
    """
    if not 2 <= count <= 0xFF:
        raise ValueError("a probe has 2 to 255 frames")
    padding = frame_bytes - PROBE_FRAME_OVERHEAD
    if not 0 <= padding <= MAX_PROBE_PADDING:
        raise ValueError(f"a probe frame is {PROBE_FRAME_OVERHEAD} to "
                         f"{PROBE_FRAME_OVERHEAD + MAX_PROBE_PADDING} bytes long")
    zeros = bytes(padding)
    return [BandwidthProbe(probe_id, index, count, zeros) for index in range(count)]


def probe_frame_size(msg: BandwidthProbe) -> int:
    """The whole frame's length in bytes (what the receiver counts)."""
    return PROBE_FRAME_OVERHEAD + len(msg.padding)


_CONNECTIONS_OVERHEAD = 4 + 1 + 4 + 2 + 2 + 1  # length, type, request_id, counts, truncated


def _record_size(record: Any) -> int:
    out: list[bytes] = []
    _encode_fields(record, out)
    return sum(len(part) for part in out)


def pack_connections(
    request_id: int,
    encoders: Iterable[ConnectedEncoder],
    viewers: Iterable[ConnectedViewer],
    max_entries: int = MAX_CONNECTION_ENTRIES,
    max_bytes: int = BATCH_BYTES,
) -> Connections:
    """A ``Connections`` answer of at most ``max_bytes`` (the whole frame), in the given order.

    Each list keeps at most ``max_entries``, a prefix of what it is given;
    the encoders take at most half of the room and the viewers what is left.
    An entry that cannot be encoded is skipped.  ``truncated`` is 1 when any
    entry was left out.
    """
    if not 256 <= max_bytes <= FRAME_LIMIT + 4:
        raise ValueError(f"max_bytes must be 256..{FRAME_LIMIT + 4}")
    if not 0 <= max_entries <= MAX_CONNECTION_ENTRIES:
        raise ValueError(f"max_entries must be 0..{MAX_CONNECTION_ENTRIES}")
    room = max_bytes - _CONNECTIONS_OVERHEAD
    truncated = False

    def take(items: Iterable[Any], budget: int) -> tuple[list[Any], int]:
        nonlocal truncated
        kept: list[Any] = []
        used = 0
        for item in items:
            try:
                size = _record_size(item)
            except ValueError:  # a value that cannot be sent (a control character)
                truncated = True
                continue
            if len(kept) == max_entries or used + size > budget:
                truncated = True
                break
            kept.append(item)
            used += size
        return kept, used

    kept_encoders, used = take(encoders, room // 2)
    kept_viewers, _ = take(viewers, room - used)
    return Connections(request_id, tuple(kept_encoders), tuple(kept_viewers), int(truncated))


_DIGEST_OVERHEAD = 4 + 1 + 4 + 4 + 1 + 2  # length, type, request_id, chunk, last, count


def chunk_digest(
    request_id: int, entries: Iterable[DigestEntry], max_bytes: int = BATCH_BYTES
) -> list[Digest]:
    """Every chunk of a digest, in order: entries sorted by (table, key), ``last`` on the end.

    Each frame is at most ``max_bytes`` long (length, type and body); an
    empty digest is one empty chunk.  The responder keeps the list as its
    snapshot and answers ``DigestRequest(request_id, n)`` with item ``n``.
    """
    if not 256 <= max_bytes <= FRAME_LIMIT + 4:
        raise ValueError(f"max_bytes must be 256..{FRAME_LIMIT + 4}")
    ordered = sorted(entries, key=lambda e: (e.table, e.key))
    for before, after in itertools.pairwise(ordered):
        if (before.table, before.key) == (after.table, after.key):
            raise ValueError(f"two digest entries for {after.table!r}, {after.key!r}")
    groups: list[list[DigestEntry]] = [[]]
    size = _DIGEST_OVERHEAD
    for entry in ordered:
        esize = _str_size(entry.table) + _str_size(entry.key) + FINGERPRINT_SIZE
        if _DIGEST_OVERHEAD + esize > max_bytes:
            raise ValueError("a digest entry does not fit in max_bytes")
        if groups[-1] and (size + esize > max_bytes or len(groups[-1]) == 0xFFFF):
            groups.append([])
            size = _DIGEST_OVERHEAD
        groups[-1].append(entry)
        size += esize
    return [
        Digest(request_id, n, int(n == len(groups) - 1), tuple(group))
        for n, group in enumerate(groups)
    ]
