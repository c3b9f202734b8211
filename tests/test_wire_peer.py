"""The peer protocol's messages and helpers (evserver.wire.peer) against protocol-spec/peer.rst:
round trips, truncation, directions, hostile bodies, field kinds, the clock
measurement, value encoding, batching and chunking, and the peer vectors."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from evserver.config import SERVER_ID_PATTERN as CONFIG_SERVER_ID_PATTERN
from evserver.state.hlc import Stamp
from evserver.state.membership import PeerState
from evserver.state.replica import Record
from evserver.wire import messages as m
from evserver.wire import peer
from evserver.wire.framing import (
    ErrorCode,
    FrameDecoder,
    ProtocolName,
    ProtocolViolation,
    encode_frame,
)
from evserver.wire.messages import EncoderState

PEER = ProtocolName.PEER
CLIENT_PROTOCOLS = (ProtocolName.ENCODER, ProtocolName.VIEWER, ProtocolName.RELAY)
PEER_TYPES = sorted(m.allowed(PEER, True) | m.allowed(PEER, False))
#: The messages this module defines (Error, Ping and Pong are tested with the others).
PEER_CLASSES: list[type] = [m.MESSAGES[t] for t in PEER_TYPES if t >= 0x50]
NAMES = {cls.__name__: cls for cls in PEER_CLASSES}

SPEC = Path(__file__).resolve().parent.parent / "protocol-spec"
VECTORS: dict[str, Any] = json.loads((SPEC / "vectors.json").read_text("utf-8"))
PEER_VALID = [v for v in VECTORS["vectors"] if v["protocol"] == "peer"]

# --------------------------------------------------------------------------
# Strategies, built from the wire kinds of each class's fields

TEXT_CHARS = st.characters(codec="utf-8", min_codepoint=0x20, exclude_characters="\x7f")
SERVER_IDS = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True) | st.sampled_from(
    ["ev1", "ev2", "6f1c2a9e-5b7d-4e3a-9c8b-0d2f4a6e8b1c"]
)
STAMP_PARTS = st.tuples(st.integers(0, 10**13 - 1), st.integers(0, 0xFFFF), SERVER_IDS)
STAMPS = STAMP_PARTS.map(lambda p: f"{p[0]:013d}.{p[1]:05d}.{p[2]}")


def kind_strategy(kind: m.Kind) -> st.SearchStrategy[Any]:
    if isinstance(kind, m.ListOf):
        return st.lists(record_strategy(kind.record), max_size=min(3, kind.max_items)).map(tuple)
    if isinstance(kind, m.Embedded):
        return record_strategy(kind.record)
    if kind is peer.SERVER_ID:
        return SERVER_IDS
    if kind is peer.STAMP:
        return STAMPS
    if kind is peer.OPT_STAMP:
        return st.just("") | STAMPS
    if isinstance(kind, m.Checked):
        raise AssertionError(f"no strategy for {kind.name}")
    if isinstance(kind, m.Choice):
        return st.sampled_from(sorted(kind.values))
    if isinstance(kind, m.Fixed):
        return st.binary(min_size=kind.size, max_size=kind.size)
    if isinstance(kind, m._Str):
        return st.text(TEXT_CHARS, max_size=12)
    if isinstance(kind, m.Bytes16):
        return st.binary(max_size=min(40, kind.max_len))
    assert isinstance(kind, m._Int), kind
    return st.integers(min_value=0, max_value=kind.max)


def record_strategy(cls: type) -> st.SearchStrategy[Any]:
    return st.builds(cls, **{f.name: kind_strategy(f.metadata["wire"]) for f in attrs.fields(cls)})


ANY_PEER_MESSAGE = st.one_of([record_strategy(cls) for cls in PEER_CLASSES])


def split(frame: bytes) -> tuple[int, bytes]:
    (length,) = struct.unpack_from("!I", frame)
    assert length == len(frame) - 4
    return frame[4], frame[5:]


def roundtrip(msg: Any) -> Any:
    """Encode ``msg`` and decode the frame's body again."""
    return m.decode(*split(m.encode(msg)))


def per_class(
    classes: list[type], max_examples: int
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register one Hypothesis test per class, named ``test_<check>_<Class>``.

    ``@given`` under ``@pytest.mark.parametrize`` is wrapped twice by
    pytest-twisted and fails, so each class gets a test function of its own.
    """

    def register(check: Callable[[Any], None]) -> Callable[[Any], None]:
        for cls in classes:
            test = settings(max_examples=max_examples, deadline=None)(
                given(msg=record_strategy(cls))(_calling(check))
            )
            name = f"test_{check.__name__.lstrip('_')}_{cls.__name__}"
            test.__name__ = test.__qualname__ = name
            globals()[name] = test
        return check

    return register


def _calling(check: Callable[[Any], None]) -> Callable[[Any], None]:
    def test(msg: Any) -> None:
        check(msg)

    return test


# --------------------------------------------------------------------------
# Round trips, truncation, trailing bytes


@per_class(PEER_CLASSES, max_examples=50)
def _round_trip(msg: Any) -> None:
    frame = m.encode(msg)
    msg_type, body = split(frame)
    assert msg_type == type(msg).TYPE
    assert m.decode(msg_type, body) == msg
    places = [s for s in (True, False) if msg_type in m.allowed(PEER, s)]
    assert places
    for from_server in places:
        assert m.decode_for(PEER, from_server, msg_type, body) == msg
    for protocol in CLIENT_PROTOCOLS:
        for from_server in (True, False):
            with pytest.raises(ProtocolViolation) as info:
                m.decode_for(protocol, from_server, msg_type, body)
            assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    decoder = FrameDecoder(peer.FRAME_LIMIT, expect_preamble=False)
    assert list(decoder.feed(frame)) == [(msg_type, body)]


@per_class(PEER_CLASSES, max_examples=30)
def _every_truncation_is_malformed(msg: Any) -> None:
    msg_type, body = split(m.encode(msg))
    for cut in range(len(body)):
        with pytest.raises(m.Malformed) as info:
            m.decode(msg_type, body[:cut])
        assert info.value.code is ErrorCode.MALFORMED and info.value.fatal


@per_class(PEER_CLASSES, max_examples=20)
def _trailing_bytes_are_malformed(msg: Any) -> None:
    msg_type, body = split(m.encode(msg))
    for extra in (b"\x00", b"\xff" * 7):
        with pytest.raises(m.Malformed):
            m.decode(msg_type, body + extra)


# --------------------------------------------------------------------------
# Directions (peer.rst, Message types)

_COMMON = {"Error", "Ping", "Pong"}
_SYMMETRIC = {
    "Heartbeat", "HeartbeatAck", "ProbeRequest", "ProbeReply", "MemberList", "Leave",
    "BandwidthProbe", "BandwidthReport", "ConnectionsRequest", "Connections",
    "Updates", "DigestRequest", "Digest", "Directory", "MoveRequest", "MoveResult",
}
EXPECTED = {
    False: _COMMON | _SYMMETRIC | {"PeerHello", "JoinRequest"},  # from the dialler
    True: _COMMON | _SYMMETRIC | {"PeerWelcome", "JoinAccept"},  # from the accepting server
}


@pytest.mark.parametrize("from_server", [True, False])
def test_allowed_peer_types(from_server: bool) -> None:
    names = {m.MESSAGES[t].__name__ for t in m.allowed(PEER, from_server)}
    assert names == EXPECTED[from_server]


def test_type_numbers() -> None:
    numbers = {cls.__name__: cls.TYPE for cls in PEER_CLASSES}  # type: ignore[attr-defined]
    assert numbers == {
        "PeerHello": 0x50, "PeerWelcome": 0x51, "Heartbeat": 0x52, "HeartbeatAck": 0x53,
        "ProbeRequest": 0x54, "ProbeReply": 0x55, "MemberList": 0x56, "Leave": 0x57,
        "BandwidthProbe": 0x58, "BandwidthReport": 0x59, "ConnectionsRequest": 0x5A,
        "Connections": 0x5B, "Updates": 0x60, "DigestRequest": 0x61, "Digest": 0x62,
        "Directory": 0x68,
        "MoveRequest": 0x69, "MoveResult": 0x6A, "JoinRequest": 0x70, "JoinAccept": 0x71,
    }
    assert 0x7F not in m.MESSAGES  # reserved; framing.rst's "unknown-type" vector uses it


def test_client_messages_are_not_allowed_on_the_peer_protocol() -> None:
    for t in m.allowed(ProtocolName.VIEWER, False) | m.allowed(ProtocolName.ENCODER, True):
        if t in (0x01, 0x02, 0x03):
            continue
        assert t not in m.allowed(PEER, True) | m.allowed(PEER, False)
    with pytest.raises(ProtocolViolation) as info:
        m.decode_for(PEER, False, m.MEDIA, bytes(22))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def _address(i: int = 1) -> peer.ExternalAddress:
    return peer.ExternalAddress(f"ev{i}.example.net", 5510, 5520, 5530, 9443, f"10.0.0.{i}", 47100)


def _join_request() -> peer.JoinRequest:
    return peer.JoinRequest("t", "s", "ev3", b"csr", _address())


def _join_accept() -> peer.JoinAccept:
    return peer.JoinAccept("c", b"a", b"b", b"k", ())


@pytest.mark.parametrize(
    "msg,allowed_from_server",
    [
        (_join_request(), False),
        (_join_accept(), True),
        (peer.PeerHello("c", "ev2", 1, "x", _address(2)), False),
        (peer.PeerWelcome("c", "ev1", 1, "x", _address(1)), True),
    ],
    ids=["JoinRequest", "JoinAccept", "PeerHello", "PeerWelcome"],
)
def test_one_way_messages(msg: Any, allowed_from_server: bool) -> None:
    msg_type, body = split(m.encode(msg))
    assert m.decode_for(PEER, allowed_from_server, msg_type, body) == msg
    with pytest.raises(ProtocolViolation) as info:
        m.decode_for(PEER, not allowed_from_server, msg_type, body)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_registry_does_not_depend_on_import_order() -> None:
    script = (
        "import importlib, sys\n"
        "importlib.import_module(sys.argv[1])\n"
        "from evserver.wire import messages as m\n"
        "from evserver.wire.framing import ProtocolName\n"
        "print(sorted(m.MESSAGES), [sorted(m.allowed(p, s)) for p in ProtocolName "
        "for s in (True, False)])\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script, first], capture_output=True, text=True, check=True,
            cwd=root, env={"PYTHONPATH": root},
        ).stdout
        for first in ("evserver.wire.peer", "evserver.wire.messages", "evserver.wire.framing")
    }
    assert len(outputs) == 1
    assert str(sorted(m.MESSAGES)) in outputs.pop()


# --------------------------------------------------------------------------
# Hostile bodies


@settings(max_examples=400, deadline=None)
@given(
    msg_type=st.sampled_from(PEER_TYPES) | st.integers(0x50, 0x7F),
    body=st.binary(max_size=150),
    from_server=st.booleans(),
)
def test_random_bodies_raise_only_protocol_violations(
    msg_type: int, body: bytes, from_server: bool
) -> None:
    try:
        msg = m.decode_for(PEER, from_server, msg_type, body)
    except ProtocolViolation as e:
        assert e.code in (ErrorCode.MALFORMED, ErrorCode.UNEXPECTED_MESSAGE)
    else:
        assert m.encode(msg) == encode_frame(msg_type, body)


@settings(max_examples=400, deadline=None)
@given(
    msg=ANY_PEER_MESSAGE,
    edits=st.lists(
        st.tuples(
            st.sampled_from(["set", "insert", "delete"]), st.integers(0, 500), st.integers(0, 255)
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_valid_bodies_raise_only_malformed(
    msg: Any, edits: list[tuple[str, int, int]]
) -> None:
    msg_type, body = split(m.encode(msg))
    mutated = bytearray(body)
    for op, pos, value in edits:
        if op == "insert":
            mutated.insert(pos % (len(mutated) + 1), value)
        elif mutated:
            i = pos % len(mutated)
            if op == "set":
                mutated[i] = value
            else:
                del mutated[i]
    try:
        decoded = m.decode(msg_type, bytes(mutated))
    except m.Malformed:
        return
    assert m.encode(decoded) == encode_frame(msg_type, bytes(mutated))


# --------------------------------------------------------------------------
# Field kinds


def test_server_id_pattern_is_the_configurations() -> None:
    assert peer.SERVER_ID_PATTERN.pattern == CONFIG_SERVER_ID_PATTERN.pattern


@pytest.mark.parametrize(
    "text,ok",
    [
        ("ev1", True), ("a", True), ("x" * 64, True), ("ev1.example_net-2", True),
        ("6f1c2a9e-5b7d-4e3a-9c8b-0d2f4a6e8b1c", True),
        ("", False), ("x" * 65, False), ("ev 1", False), ("ev/1", False), ("évé", False),
        ("ev1\u200b", False),
    ],
)
def test_server_id_kind(text: str, ok: bool) -> None:
    assert peer.is_server_id(text) is ok
    msg = peer.Leave(text)
    if ok:
        assert roundtrip(msg) == msg
        return
    with pytest.raises(ValueError):
        m.encode(msg)
    raw = text.encode()
    with pytest.raises(m.Malformed):
        m.decode(peer.Leave.TYPE, struct.pack("!H", len(raw)) + raw)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "text,ok",
    [
        ("1700000000123.00002.ev2", True),
        ("0000000000000.00000.a", True),
        ("9999999999999.65535.ev1", True),
        ("1700000000000.65536.ev1", False),  # counter over 65535
        ("1.0.ev2", False),  # not canonical: would sort wrongly as text
        ("1700000000123.00002.", False),  # no node
        ("0000000000000.00000.", False),  # the zero stamp is never sent
        ("17000000001234.00002.ev2", False),
        ("1700000000123.0002.ev2", False),
        ("1700000000123.00002.ev 2", False),
        ("-700000000123.00002.ev2", False),
        ("", False),
    ],
)
def test_stamp_kind(text: str, ok: bool) -> None:
    assert peer.is_stamp(text) is ok
    with_field = peer.Updates((peer.RecordUpdate("t", "k", "", (peer.Field("f", b"1", text),)),))
    tombstone = peer.Updates((peer.RecordUpdate("t", "k", text, ()),))
    location = peer.Directory((peer.Location("cam", "ev1", text, 0, 1),))
    if ok:
        for msg in (with_field, tombstone, location):
            assert roundtrip(msg) == msg
        return
    for msg in (with_field, location):
        with pytest.raises(ValueError):
            m.encode(msg)
    # "" is "no tombstone"; any other non-stamp is refused there too.
    if text:
        with pytest.raises(ValueError):
            m.encode(tombstone)
    else:
        assert roundtrip(tombstone) == tombstone
    raw = text.encode()
    body = (
        struct.pack("!HH", 1, 3) + b"cam" + struct.pack("!H", 3) + b"ev1"
        + struct.pack("!H", len(raw)) + raw + struct.pack("!IB", 0, 1)
    )
    with pytest.raises(m.Malformed):
        m.decode(peer.Directory.TYPE, body)  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(a=STAMP_PARTS, b=STAMP_PARTS)
def test_canonical_stamps_order_as_text_as_hlc_stamps_do(
    a: tuple[int, int, str], b: tuple[int, int, str]
) -> None:
    """peer.rst: comparing canonical stamps as strings orders them as stamps."""
    sa, sb = Stamp(*a), Stamp(*b)
    ta, tb = sa.encode(), sb.encode()
    assert peer.is_stamp(ta) and peer.is_stamp(tb)
    assert Stamp.decode(ta) == sa
    if "." not in a[2] and "." not in b[2]:
        # The node is compared after the fixed-width parts.  (A node with a
        # "." is accepted on the wire, as the configuration allows it, but the
        # HLC refuses such node ids; see hlc.HybridClock.)
        assert (ta < tb) == (sa < sb)


def test_pem_limit() -> None:
    longest = attrs.evolve(_join_request(), csr_pem=b"x" * peer.MAX_PEM)
    assert roundtrip(longest) == longest
    with pytest.raises(ValueError):
        m.encode(attrs.evolve(_join_request(), csr_pem=b"x" * (peer.MAX_PEM + 1)))
    # Refused on the length even when every announced byte follows.
    head = m.encode(peer.JoinRequest("t", "s", "ev3", b"", _address()))[5:]
    prefix = head[: head.index(b"\x00\x00", 2 + 1 + 2 + 1 + 2 + 3)]
    body = prefix + struct.pack("!H", peer.MAX_PEM + 1) + b"x" * (peer.MAX_PEM + 1)
    with pytest.raises(m.Malformed) as info:
        m.decode(peer.JoinRequest.TYPE, body)  # type: ignore[attr-defined]
    assert "exceeds 16384" in info.value.message
    too_long = b"x" * (peer.MAX_PEM + 1)
    for accept in (
        attrs.evolve(_join_accept(), certificate_pem=too_long),
        attrs.evolve(_join_accept(), ca_certificate_pem=too_long),
        attrs.evolve(_join_accept(), ca_key_pem=too_long),
    ):
        with pytest.raises(ValueError):
            m.encode(accept)


def test_join_request_fits_the_handshake_limit() -> None:
    """peer.rst, Limits: a JoinRequest with the longest PEM is well under 64 KiB."""
    msg = peer.JoinRequest("t" * 64, "s" * 128, "x" * 64, b"x" * peer.MAX_PEM, _address())
    assert len(m.encode(msg)) - 4 < peer.HANDSHAKE_FRAME_LIMIT // 3


def test_fixed_bytes_kind() -> None:
    entry = peer.DigestEntry("t", "k", bytes(range(16)))
    msg = peer.Digest(1, 0, 1, (entry,))
    assert roundtrip(msg) == msg
    for wrong in (b"", bytes(15), bytes(17), "x" * 16):
        with pytest.raises(ValueError):
            m.encode(peer.Digest(1, 0, 1, (peer.DigestEntry("t", "k", wrong),)))  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [2, 3, 255])
def test_flags_are_zero_or_one(value: int) -> None:
    with pytest.raises(ValueError):
        m.encode(peer.ProbeReply("ev1", 1, value))
    with pytest.raises(m.Malformed) as info:
        body = m.encode(peer.ProbeReply("ev1", 1, 0))[5:-1] + bytes([value])
        m.decode(peer.ProbeReply.TYPE, body)  # type: ignore[attr-defined]
    assert "undefined value" in info.value.message


def test_member_states() -> None:
    assert [int(s) for s in peer.MemberState] == [0, 1, 2, 3, 4]
    for state in peer.MemberState:
        msg = peer.MemberList((peer.Member("ev1", state, 5, _address()),))
        decoded = roundtrip(msg)
        assert decoded == msg and peer.MemberState(decoded.members[0].state) is state
    with pytest.raises(ValueError):
        m.encode(peer.MemberList((peer.Member("ev1", 5, 5, _address()),)))


def test_list_limits() -> None:
    members = tuple(peer.Member(f"ev{i}", 0, i, _address(i)) for i in range(65))
    ok = peer.MemberList(members[:64])
    assert roundtrip(ok) == ok
    with pytest.raises(ValueError):
        m.encode(peer.MemberList(members))
    with pytest.raises(ValueError):
        m.encode(peer.JoinAccept("c", b"", b"", b"", members))
    body = struct.pack("!H", 65) + m.encode(ok)[7:] + m.encode(peer.MemberList(members[64:]))[7:]
    with pytest.raises(m.Malformed):
        m.decode(peer.MemberList.TYPE, body)  # type: ignore[attr-defined]
    fields = tuple(peer.Field(f"f{i}", b"1", "1700000000000.00000.ev1") for i in range(257))
    assert m.encode(peer.Updates((peer.RecordUpdate("t", "k", "", fields[:256]),)))
    with pytest.raises(ValueError):
        m.encode(peer.Updates((peer.RecordUpdate("t", "k", "", fields),)))


def test_member_states_are_the_membership_machines() -> None:
    assert {s.name.lower() for s in peer.MemberState} == {s.value for s in PeerState}


def test_location_states_are_the_encoder_states() -> None:
    values = {EncoderState.OFFLINE, EncoderState.ONLINE, EncoderState.STREAMING}
    assert peer.LOCATION_STATE.values == values
    for state in sorted(values):
        msg = peer.Directory((peer.Location("cam-1", "ev1", "1700000000000.00000.ev1", 7, state),))
        assert roundtrip(msg) == msg
    with pytest.raises(ValueError):
        m.encode(peer.Directory((peer.Location("cam-1", "ev1", "1700000000000.00000.ev1", 7, 3),)))


def test_error_codes_added_for_the_peer_protocol() -> None:
    assert {c.name: c.value for c in ErrorCode if c.value >= 21} == {
        "WRONG_CLUSTER": 21, "BAD_TOKEN": 22, "CLUSTER_FULL": 23, "REMOVED": 24,
        "SERVER_ID_IN_USE": 25,
    }


def test_server_info_is_the_client_facing_address() -> None:
    address = peer.ExternalAddress("203.0.113.7", 15510, 15520, 15530, 19443, "10.0.0.2", 47100)
    expected = m.ServerInfo("ev2", "203.0.113.7", 15510, 15520, 15530)
    assert peer.server_info("ev2", address) == expected


# --------------------------------------------------------------------------
# Clock offset and round trip (peer.rst, Round-trip time and clock offset)


def test_ntp_offset_rtt_example() -> None:
    # The vector heartbeat-ack: t0, t1, t2 from it, t3 = 40 ms after t2 on our clock.
    t0, t1, t2 = 1700000000250000, 1700000000301000, 1700000000301200
    t3 = t0 + 80_200
    offset, rtt = peer.ntp_offset_rtt(t0, t1, t2, t3)
    assert rtt == 80_000
    assert offset == ((t1 - t0) + (t2 - t3)) // 2 == 11_000


@settings(max_examples=300, deadline=None)
@given(
    t0=st.integers(0, 2**62),
    true_offset=st.integers(-10**9, 10**9),
    out=st.integers(0, 10**6),
    back=st.integers(0, 10**6),
    processing=st.integers(0, 10**5),
)
def test_ntp_offset_rtt_recovers_a_simulated_exchange(
    t0: int, true_offset: int, out: int, back: int, processing: int
) -> None:
    t1 = t0 + out + true_offset
    t2 = t1 + processing
    t3 = t2 - true_offset + back
    offset, rtt = peer.ntp_offset_rtt(t0, t1, t2, t3)
    assert rtt == out + back
    # Exact when the legs are equal, else off by at most half their difference.
    assert abs(offset - true_offset) <= math.ceil(abs(out - back) / 2)
    if out == back:
        assert offset == true_offset
    # The mirror image (the clock off the other way, the legs swapped) gives
    # the opposite offset exactly: rounding toward zero is symmetric.
    m1 = t0 + back - true_offset
    m2 = m1 + processing
    m3 = m2 + true_offset + out
    assert peer.ntp_offset_rtt(t0, m1, m2, m3) == (-offset, rtt)


@settings(max_examples=200, deadline=None)
@given(
    a=st.integers(-(10**12), 10**12),
    b=st.integers(-(10**12), 10**12),
    base=st.integers(10**15, 2 * 10**15),
)
def test_ntp_offset_is_rounded_toward_zero(a: int, b: int, base: int) -> None:
    # Choose t1 - t0 = a and t2 - t3 = b with t2 >= t1 and a non-negative RTT.
    t0, t1 = base, base + a
    t2 = t1 + 10
    t3 = t2 - b
    assume(t3 - t0 - (t2 - t1) >= 0)
    offset, _ = peer.ntp_offset_rtt(t0, t1, t2, t3)
    assert abs(offset) == abs(a + b) // 2
    assert offset == 0 or (offset > 0) == (a + b > 0)


def test_ntp_refuses_impossible_samples() -> None:
    with pytest.raises(ValueError, match="before"):
        peer.ntp_offset_rtt(0, 100, 99, 200)
    with pytest.raises(ValueError, match="negative round trip"):
        peer.ntp_offset_rtt(1000, 5000, 5600, 1500)  # t3 - t0 = 500 < t2 - t1 = 600
    assert peer.ntp_offset_rtt(1000, 5000, 5600, 1600) == (4000, 0)


# --------------------------------------------------------------------------
# Values (JSON)

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(value=JSON_VALUES)
def test_values_round_trip_canonically(value: Any) -> None:
    raw = peer.encode_value(value)
    assert peer.decode_value(raw) == value == json.loads(raw)
    assert peer.encode_value(peer.decode_value(raw)) == raw  # canonical: a fixed point
    if isinstance(value, dict):
        assert list(json.loads(raw)) == sorted(value)


def test_value_encoding_details() -> None:
    expected = '{"a":[true,null,"zoë"],"b":1}'.encode()
    assert peer.encode_value({"b": 1, "a": [True, None, "zoë"]}) == expected
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            peer.encode_value(bad)
    with pytest.raises(ValueError):
        peer.encode_value("x" * 0xFFFF)  # 65537 bytes with its quotes
    assert len(peer.encode_value("x" * 0xFFFD)) == 0xFFFF


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"\xff", b"NaN", b"Infinity", b"-Infinity", b"[1,]", b"'x'", b"1 2",
     b"[" * 100_000 + b"]" * 100_000, b"\"\xed\xa0\x80\""],
)
def test_invalid_values_are_malformed(raw: bytes) -> None:
    with pytest.raises(m.Malformed) as info:
        peer.decode_value(raw)
    assert info.value.code is ErrorCode.MALFORMED


# --------------------------------------------------------------------------
# Batching updates and chunking digests


def _size(msg: Any) -> int:
    return len(m.encode(msg))


FIELDS = st.builds(
    peer.Field,
    name=st.text(TEXT_CHARS, min_size=1, max_size=6),
    value=st.binary(max_size=300),
    stamp=STAMPS,
)
RECORDS = st.builds(
    peer.RecordUpdate,
    table=st.sampled_from(["accounts", "encoders", "domains"]),
    key=st.text(TEXT_CHARS, max_size=10),
    deleted_stamp=st.just("") | STAMPS,
    fields=st.lists(FIELDS, max_size=12).map(tuple),
)


def _merged(records: list[peer.RecordUpdate]) -> list[tuple[str, str, str, tuple[Any, ...]]]:
    """Each record's (table, key, tombstone) with all its fields in order, parts joined."""
    out: list[tuple[str, str, str, tuple[Any, ...]]] = []
    for r in records:
        if out and out[-1][:3] == (r.table, r.key, r.deleted_stamp):
            out[-1] = (*out[-1][:3], out[-1][3] + r.fields)
        else:
            out.append((r.table, r.key, r.deleted_stamp, r.fields))
    return out


@settings(max_examples=80, deadline=None)
@given(
    records=st.lists(RECORDS, max_size=20),
    max_bytes=st.sampled_from([64, 200, 1000, 4096, peer.BATCH_BYTES]),
)
def test_batch_updates(records: list[peer.RecordUpdate], max_bytes: int) -> None:
    batches = list(peer.batch_updates(records, max_bytes))
    parts = [r for b in batches for r in b.records]
    # Nothing lost, nothing reordered: the parts of a record follow each other.
    assert _merged(parts) == _merged(records)
    for b in batches:
        size = _size(b)
        assert size <= peer.FRAME_LIMIT + 4
        if size > max_bytes:
            # Only a lone part with a single field (or none) may exceed the target.
            assert len(b.records) == 1 and len(b.records[0].fields) <= 1
        assert all(len(r.fields) <= peer.MAX_FIELDS for r in b.records)
    if not records:
        assert batches == []
    # Each frame decodes to itself.
    for b in batches:
        assert roundtrip(b) == b


def test_batch_updates_splits_a_large_record_by_fields() -> None:
    stamp = "1700000000000.00000.ev1"
    tomb = "1600000000000.00000.ev2"
    fields = tuple(peer.Field(f"f{i:03d}", b"x" * 1000, stamp) for i in range(600))
    record = peer.RecordUpdate("settings", "big", tomb, fields)
    batches = list(peer.batch_updates([record], 64 * 1024))
    assert len(batches) > 1
    assert all(_size(b) <= 64 * 1024 for b in batches)
    parts = [r for b in batches for r in b.records]
    assert all(p.deleted_stamp == tomb and p.key == "big" for p in parts)
    assert tuple(f for p in parts for f in p.fields) == fields
    # More than 256 small fields: split by count.
    small = tuple(peer.Field(f"f{i:03d}", b"1", stamp) for i in range(600))
    parts = [r for b in peer.batch_updates([attrs.evolve(record, fields=small)]) for r in b.records]
    assert [len(p.fields) for p in parts] == [256, 256, 88]


def test_batch_updates_worst_case_field_fits_the_frame_limit() -> None:
    """A field with every part at its maximum still fits in one frame."""
    longest = "x" * 0xFFFF
    stamp = "1700000000000.00000." + "n" * 64
    field = peer.Field(longest, b"v" * 0xFFFF, stamp)
    record = peer.RecordUpdate(longest, longest, stamp, (field, field))
    batches = list(peer.batch_updates([record], 64))
    assert len(batches) == 2
    assert all(peer.BATCH_BYTES < _size(b) <= peer.FRAME_LIMIT + 4 for b in batches)


def test_batch_updates_refuses_silly_targets() -> None:
    for bad in (0, 63, peer.FRAME_LIMIT + 5):
        with pytest.raises(ValueError):
            list(peer.batch_updates([], bad))


ENTRIES = st.builds(
    peer.DigestEntry,
    table=st.sampled_from(["accounts", "encoders", "zoë"]),
    key=st.text(TEXT_CHARS, max_size=10),
    fingerprint=st.binary(min_size=16, max_size=16),
)


@settings(max_examples=150, deadline=None)
@given(
    entries=st.lists(ENTRIES, max_size=40, unique_by=lambda e: (e.table, e.key)),
    max_bytes=st.sampled_from([256, 300, 1000, peer.BATCH_BYTES]),
    request_id=st.integers(0, 2**32 - 1),
)
def test_chunk_digest(entries: list[peer.DigestEntry], max_bytes: int, request_id: int) -> None:
    chunks = peer.chunk_digest(request_id, entries, max_bytes)
    assert [c.chunk for c in chunks] == list(range(len(chunks)))
    assert [c.last for c in chunks] == [0] * (len(chunks) - 1) + [1]
    assert all(c.request_id == request_id for c in chunks)
    flat = [e for c in chunks for e in c.entries]
    # Strictly ascending by (table, key) as UTF-8 bytes, across chunks.
    keys = [(e.table.encode(), e.key.encode()) for e in flat]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert sorted(flat, key=lambda e: (e.table, e.key)) == flat
    assert set(flat) == set(entries)
    for c in chunks:
        assert _size(c) <= max_bytes
        assert roundtrip(c) == c
    if len(chunks) > 1:
        assert all(c.entries for c in chunks)


def test_chunk_digest_of_nothing_is_one_empty_last_chunk() -> None:
    assert peer.chunk_digest(9, []) == [peer.Digest(9, 0, 1, ())]


def test_chunk_digest_refuses_duplicates_and_oversize_entries() -> None:
    e = peer.DigestEntry("t", "k", bytes(16))
    with pytest.raises(ValueError, match="two digest entries"):
        peer.chunk_digest(1, [e, attrs.evolve(e, fingerprint=bytes(range(16)))])
    with pytest.raises(ValueError, match="does not fit"):
        peer.chunk_digest(1, [peer.DigestEntry("t", "k" * 300, bytes(16))], 256)


def test_ten_thousand_records_take_three_digest_chunks() -> None:
    """peer.rst, Limits: a digest of 10 000 records takes about three round trips."""
    entries = [peer.DigestEntry("accounts", f"account-{i:08d}-{'x' * 20}", bytes(16))
               for i in range(10_000)]
    chunks = peer.chunk_digest(1, entries)
    assert len(chunks) == 3


# --------------------------------------------------------------------------
# Fingerprints (peer.rst, Fingerprints) match the replica's


def _spec_fingerprint(deleted: str, fields: dict[str, str]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update((deleted or "0000000000000.00000.").encode())
    for name in sorted(fields, key=lambda n: n.encode()):
        h.update(b"\0" + name.encode() + b"\0" + fields[name].encode())
    return h.digest()


@settings(max_examples=100, deadline=None)
@given(
    deleted=st.none() | STAMP_PARTS,
    fields=st.dictionaries(st.text(TEXT_CHARS, min_size=1, max_size=6), STAMP_PARTS, max_size=5),
)
def test_spec_fingerprint_is_the_replicas(
    deleted: tuple[int, int, str] | None, fields: dict[str, tuple[int, int, str]]
) -> None:
    record = Record({name: (None, Stamp(*s)) for name, s in fields.items()})
    if deleted is not None:
        record.deleted = Stamp(*deleted)
    expected = _spec_fingerprint(
        "" if deleted is None else Stamp(*deleted).encode(),
        {name: Stamp(*s).encode() for name, s in fields.items()},
    )
    assert record.fingerprint == expected
    assert len(expected) == peer.FINGERPRINT_SIZE


# --------------------------------------------------------------------------
# Link measurements and connection lists (peer.rst)

NEW_TYPES = [peer.BandwidthProbe, peer.BandwidthReport, peer.ConnectionsRequest,
             peer.Connections]


def test_probe_frames_are_the_documented_size() -> None:
    frames = peer.probe_frames(9, 4, 64 * 1024)
    assert [(f.probe_id, f.index, f.count) for f in frames] == [(9, i, 4) for i in range(4)]
    for f in frames:
        raw = m.encode(f)
        assert len(raw) == 64 * 1024 == peer.probe_frame_size(f)
        assert roundtrip(f) == f
    assert sum(len(m.encode(f)) for f in frames) == peer.BATCH_BYTES  # as an Updates batch
    # The largest and the smallest frame; a probe of 2 to 255 frames.
    biggest = peer.probe_frames(1, 2, peer.PROBE_FRAME_OVERHEAD + 0xFFFF)[0]
    assert len(m.encode(biggest)) == peer.PROBE_FRAME_OVERHEAD + 0xFFFF
    assert len(m.encode(peer.probe_frames(1, 255, peer.PROBE_FRAME_OVERHEAD)[254])) == 13
    for count, size in ((1, 1000), (256, 1000), (4, 12), (4, peer.PROBE_FRAME_OVERHEAD + 0x10000)):
        with pytest.raises(ValueError):
            peer.probe_frames(1, count, size)


def test_a_probe_frame_fits_after_the_handshake_only() -> None:
    """A 64 KiB probe frame is over the handshake limit by nothing, and 1 MiB is far off."""
    frame = m.encode(peer.probe_frames(1, 4, 64 * 1024)[0])
    (length,) = struct.unpack_from("!I", frame)
    assert length < peer.HANDSHAKE_FRAME_LIMIT < peer.FRAME_LIMIT


def _encoder(i: int, name: str = "Front door") -> peer.ConnectedEncoder:
    return peer.ConnectedEncoder(f"cam-{i:05d}", name, "ops", EncoderState.STREAMING, 3, i, i * 7)


def _viewer(i: int, watching: int = 1) -> peer.ConnectedViewer:
    return peer.ConnectedViewer(f"viewer-{i:05d}", "ops",
                                tuple(peer.Watched(f"cam-{j:05d}") for j in range(watching)),
                                1, 0, i, i * 100, 0)


def test_pack_connections_keeps_everything_that_fits() -> None:
    encoders = [_encoder(i) for i in range(3)]
    viewers = [_viewer(i, 2) for i in range(2)]
    msg = peer.pack_connections(7, encoders, viewers)
    assert msg == peer.Connections(7, tuple(encoders), tuple(viewers), 0)
    assert roundtrip(msg) == msg
    assert peer.pack_connections(8, [], []) == peer.Connections(8, (), (), 0)


def test_pack_connections_caps_each_list_at_2000() -> None:
    msg = peer.pack_connections(1, (_encoder(i, "") for i in range(2500)),
                                (_viewer(i, 0) for i in range(10)))
    assert len(msg.encoders) == 2000 and msg.encoders[-1] == _encoder(1999, "")
    assert len(msg.viewers) == 10 and msg.truncated == 1
    assert _size(msg) <= peer.BATCH_BYTES
    assert roundtrip(msg) == msg


def test_pack_connections_worst_case_stays_within_the_frame_budget() -> None:
    """Names of 64 four-byte characters and viewers watching 64 encoders: 2 000 of each
    would be about 11 MiB; the answer is cut at 256 KiB, encoders to half of it."""
    long_name = "\U0001F600" * 64
    encoders = [peer.ConnectedEncoder(f"cam-{i:060d}", long_name, long_name, 1, 0, 0, 0)
                for i in range(2000)]
    viewers = [peer.ConnectedViewer(long_name + str(i), long_name,
                                    tuple(peer.Watched(f"cam-{j:060d}") for j in range(64)),
                                    0, 0, 0, 0, 0) for i in range(2000)]
    msg = peer.pack_connections(1, encoders, viewers)
    assert msg.truncated == 1
    raw = m.encode(msg)
    assert len(raw) <= peer.BATCH_BYTES
    assert 0 < len(msg.encoders) < 2000 and 0 < len(msg.viewers) < 2000
    encoder_bytes = sum(len(m.encode(peer.Connections(0, (e,), (), 0))) - 14
                        for e in msg.encoders)
    assert encoder_bytes <= (peer.BATCH_BYTES - 14) // 2
    assert msg.encoders == tuple(encoders[: len(msg.encoders)])  # a prefix, in order
    assert m.decode(*split(raw)) == msg
    # A much smaller budget, and a refusal of silly ones.
    small = peer.pack_connections(1, encoders, viewers, max_bytes=4096)
    assert len(m.encode(small)) <= 4096 and small.truncated == 1
    for bad in (255, peer.FRAME_LIMIT + 5):
        with pytest.raises(ValueError):
            peer.pack_connections(1, [], [], max_bytes=bad)
    with pytest.raises(ValueError):
        peer.pack_connections(1, [], [], max_entries=2001)


def test_pack_connections_skips_what_cannot_be_encoded() -> None:
    bad = peer.ConnectedEncoder("cam-1", "bell\x07", "ops", 1, 0, 0, 0)
    msg = peer.pack_connections(1, [bad, _encoder(2)], [])
    assert msg.encoders == (_encoder(2),) and msg.truncated == 1


@settings(max_examples=60, deadline=None)
@given(
    encoders=st.lists(record_strategy(peer.ConnectedEncoder), max_size=30),
    viewers=st.lists(record_strategy(peer.ConnectedViewer), max_size=30),
    max_bytes=st.sampled_from([256, 400, 1000, 4096]),
    max_entries=st.integers(0, 10),
)
def test_pack_connections_bounds(encoders: list[peer.ConnectedEncoder],
                                 viewers: list[peer.ConnectedViewer], max_bytes: int,
                                 max_entries: int) -> None:
    msg = peer.pack_connections(3, encoders, viewers, max_entries, max_bytes)
    assert _size(msg) <= max_bytes
    assert len(msg.encoders) <= max_entries and len(msg.viewers) <= max_entries
    assert msg.encoders == tuple(encoders[: len(msg.encoders)])
    assert msg.viewers == tuple(viewers[: len(msg.viewers)])
    complete = len(msg.encoders) == len(encoders) and len(msg.viewers) == len(viewers)
    assert msg.truncated == int(not complete)
    assert roundtrip(msg) == msg


def test_connected_encoder_states_and_the_watch_limit() -> None:
    assert peer.CONNECTED_STATE.values == {EncoderState.ONLINE, EncoderState.STREAMING}
    with pytest.raises(ValueError):
        m.encode(peer.Connections(1, (attrs.evolve(_encoder(1), state=0),), (), 0))
    with pytest.raises(ValueError):
        m.encode(peer.Connections(1, (), (_viewer(1, 65),), 0))
    ok = peer.Connections(1, (), (_viewer(1, 64),), 0)
    assert roundtrip(ok) == ok
    with pytest.raises(ValueError):
        m.encode(peer.Connections(1, (), (), 2))


@settings(max_examples=1000, deadline=None)
@given(cls=st.sampled_from(NEW_TYPES), body=st.binary(max_size=200), from_server=st.booleans())
def test_new_messages_refuse_random_bodies_cleanly(cls: type, body: bytes,
                                                   from_server: bool) -> None:
    """Arbitrary bytes as a body of each new type: a message that re-encodes to the
    same bytes, or MALFORMED; never another exception."""
    msg_type = cls.TYPE  # type: ignore[attr-defined]
    try:
        msg = m.decode_for(PEER, from_server, msg_type, body)
    except ProtocolViolation as e:
        assert e.code is ErrorCode.MALFORMED and e.fatal
    else:
        assert type(msg) is cls
        assert m.encode(msg) == encode_frame(msg_type, body)


@settings(max_examples=300, deadline=None)
@given(
    msg=st.one_of([record_strategy(cls) for cls in NEW_TYPES]),
    cut=st.integers(0, 10_000),
    junk=st.binary(min_size=1, max_size=8),
)
def test_new_messages_cut_or_padded_are_malformed(msg: Any, cut: int, junk: bytes) -> None:
    msg_type, body = split(m.encode(msg))
    with pytest.raises(m.Malformed):
        m.decode(msg_type, body[: cut % len(body)] if body else b"")
    with pytest.raises(m.Malformed):
        m.decode(msg_type, body + junk)


def test_connections_list_counts_over_the_limit_are_refused_on_the_count() -> None:
    body = struct.pack("!IH", 1, 2001)  # 2 001 encoders announced, none sent
    with pytest.raises(m.Malformed, match="exceeds 2000"):
        m.decode(peer.Connections.TYPE, body)  # type: ignore[attr-defined]
    body = struct.pack("!IHH", 1, 0, 2001)
    with pytest.raises(m.Malformed, match="exceeds 2000"):
        m.decode(peer.Connections.TYPE, body)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# The peer vectors (test_wire_vectors.py checks them against the documents)


def test_every_peer_message_has_a_vector() -> None:
    covered = {v["message"]["type"] for v in PEER_VALID}
    assert set(NAMES) | {"Preamble", "Error"} <= covered
    directions = {(v["message"]["type"], v["from_server"]) for v in PEER_VALID}
    assert ("Error", True) in directions and ("Error", False) in directions


def test_peer_vectors_cover_lists_of_zero_one_and_two() -> None:
    lengths: dict[str, set[int]] = {}
    for v in PEER_VALID:
        for key, value in v["message"].items():
            if isinstance(value, list) and key != "version":
                lengths.setdefault(key, set()).add(len(value))
    assert {0, 2} <= lengths["members"]
    assert {0, 2} <= lengths["records"]
    assert {0, 2} <= lengths["entries"]
    assert {0, 1, 2} <= lengths["locations"]


def test_peer_vectors_are_consistent() -> None:
    """Values are JSON, stamps are HLC stamps, digests are sorted, flags as documented."""
    for v in PEER_VALID:
        msg = v["message"]
        if msg["type"] == "Updates":
            for record in msg["records"]:
                for field in record["fields"]:
                    peer.decode_value(bytes.fromhex(field["value"]))
                    assert Stamp.decode(field["stamp"]).encode() == field["stamp"]
        if msg["type"] == "Digest":
            keys = [(e["table"].encode(), e["key"].encode()) for e in msg["entries"]]
            assert keys == sorted(keys)
        if msg["type"] == "Directory":
            for loc in msg["locations"]:
                assert Stamp.decode(loc["epoch"]).node == loc["server_id"]
                assert loc["state"] in (0, 1, 2)
        if msg["type"] == "Error":
            assert ErrorCode(msg["code"])


def test_invalid_peer_vectors_cover_the_required_cases() -> None:
    names = {v["name"]: v["error"] for v in VECTORS["invalid"]}
    required = {
        "peer-hello-from-server": "UNEXPECTED_MESSAGE",
        "join-accept-from-client": "UNEXPECTED_MESSAGE",
        "heartbeat-on-viewer-port": "UNEXPECTED_MESSAGE",
        "join-request-on-viewer-port": "UNEXPECTED_MESSAGE",
        "peer-on-encoder-port": "WRONG_PROTOCOL",
        "viewer-on-peer-port": "WRONG_PROTOCOL",
        "peer-handshake-over-limit": "FRAME_TOO_LARGE",
        "peer-over-limit": "FRAME_TOO_LARGE",
        "member-undefined-state": "MALFORMED",
        "bad-server-id": "MALFORMED",
        "bad-stamp": "MALFORMED",
        "stamp-counter-over": "MALFORMED",
        "truncated-fingerprint": "MALFORMED",
        "digest-last-undefined": "MALFORMED",
        "pem-over-limit": "MALFORMED",
        "connected-encoder-offline": "MALFORMED",
    }
    assert {k: names.get(k) for k in required} == required
    limits = {v["name"]: v["limit"] for v in VECTORS["invalid"]}
    assert limits["peer-handshake-over-limit"] == peer.HANDSHAKE_FRAME_LIMIT
    assert limits["peer-over-limit"] == peer.FRAME_LIMIT


def test_pem_over_limit_vector_is_refused_for_its_length() -> None:
    vector = next(v for v in VECTORS["invalid"] if v["name"] == "pem-over-limit")
    raw = bytes.fromhex(vector["hex"])
    with pytest.raises(m.Malformed) as info:
        m.decode_for(PEER, False, raw[4], raw[5:])
    assert "exceeds" in info.value.message
