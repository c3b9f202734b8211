"""Preamble and frame decoding (evserver.wire.framing) against protocol-spec/framing.rst."""

from __future__ import annotations

import itertools
import json
import random
import struct
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evserver.wire import messages as m
from evserver.wire.framing import (
    FRAME_HEADER_SIZE,
    MAGIC,
    MIN_VERSION,
    PREAMBLE,
    PREAMBLE_SIZE,
    VERSION,
    ErrorCode,
    FrameDecoder,
    FrameTooLarge,
    Preamble,
    ProtocolName,
    ProtocolViolation,
    WireError,
    check_peer_preamble,
    decode_preamble,
    encode_frame,
    encode_preamble,
)

CONTROL_LIMIT = 64 * 1024
MEDIA_LIMIT = 4 * 1024 * 1024

_VECTORS = json.loads(
    (Path(__file__).resolve().parent.parent / "protocol-spec" / "vectors.json").read_text("utf-8")
)
#: Every valid frame of the spec, concatenated after a client preamble: a
#: realistic stream with frames of many sizes, from 5 bytes up.
FRAMES = [
    bytes.fromhex(v["hex"]) for v in _VECTORS["vectors"] if v["message"]["type"] != "Preamble"
] + [m.encode(m.Media(0, 1, 1, 0, 0, bytes(range(256)) * 40))]
PREAMBLE_BYTES = encode_preamble(ProtocolName.VIEWER)
STREAM = PREAMBLE_BYTES + b"".join(FRAMES)
EXPECTED: list[Preamble | tuple[int, bytes]] = [Preamble(ProtocolName.VIEWER, VERSION)] + [
    (f[4], f[5:]) for f in FRAMES
]


def feed_all(decoder: FrameDecoder, chunks: Iterable[bytes]) -> list[Preamble | tuple[int, bytes]]:
    out: list[Preamble | tuple[int, bytes]] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# --------------------------------------------------------------------------
# Whole streams, any chunking


def test_stream_in_one_chunk() -> None:
    decoder = FrameDecoder(CONTROL_LIMIT)
    assert feed_all(decoder, [STREAM]) == EXPECTED
    assert decoder.preamble == Preamble(ProtocolName.VIEWER, VERSION)
    assert decoder.buffered == 0


def test_stream_one_byte_at_a_time() -> None:
    decoder = FrameDecoder(CONTROL_LIMIT)
    items: list[Preamble | tuple[int, bytes]] = []
    ends = set()
    pos = 0
    for end in [PREAMBLE_SIZE, *(len(f) for f in FRAMES)]:
        pos += end
        ends.add(pos)
    for i in range(len(STREAM)):
        got = list(decoder.feed(STREAM[i : i + 1]))
        # An item comes out exactly when its last byte arrives, never earlier.
        assert bool(got) == (i + 1 in ends), i
        items.extend(got)
        assert decoder.buffered <= max(len(f) for f in FRAMES)
    assert items == EXPECTED
    assert decoder.buffered == 0


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
def test_stream_in_random_chunks(cuts: list[int]) -> None:
    decoder = FrameDecoder(CONTROL_LIMIT)
    assert feed_all(decoder, split_at(STREAM, cuts)) == EXPECTED
    assert decoder.buffered == 0


def test_seeded_random_chunks() -> None:
    """Many more splits than Hypothesis tries, still deterministic."""
    rng = random.Random(5510)
    for _ in range(200):
        cuts = [rng.randrange(len(STREAM) + 1) for _ in range(rng.randrange(1, 60))]
        assert feed_all(FrameDecoder(CONTROL_LIMIT), split_at(STREAM, cuts)) == EXPECTED


def test_partial_frame_stays_buffered_until_complete() -> None:
    decoder = FrameDecoder(CONTROL_LIMIT, expect_preamble=False)
    frame = m.encode(m.Login("zoë", "pw", "sw"))
    assert list(decoder.feed(frame[:-1])) == []
    assert decoder.buffered == len(frame) - 1
    assert list(decoder.feed(frame[-1:] + frame[:3])) == [(frame[4], frame[5:])]
    assert decoder.buffered == 3


def test_preamble_is_yielded_once_and_first() -> None:
    decoder = FrameDecoder(CONTROL_LIMIT)
    ping = m.encode(m.Ping(1))
    items = list(decoder.feed(PREAMBLE_BYTES + ping))
    assert items == [Preamble(ProtocolName.VIEWER, VERSION), (0x02, ping[5:])]
    assert list(decoder.feed(ping)) == [(0x02, ping[5:])]


def test_without_preamble_frames_start_at_once() -> None:
    decoder = FrameDecoder(CONTROL_LIMIT, expect_preamble=False)
    assert list(decoder.feed(m.encode(m.RelayOk()))) == [(0x31, b"")]
    assert decoder.preamble is None


def test_encode_frame_layout() -> None:
    assert encode_frame(0x22, b"\x00\x00\x00\x01") == bytes.fromhex("0000000522 00000001")
    assert encode_frame(0x13, b"") == bytes.fromhex("0000000113")
    assert FRAME_HEADER_SIZE == 5


# --------------------------------------------------------------------------
# Limits: refused on the length, before the body is buffered


def test_four_gigabyte_length_is_refused_on_its_four_bytes() -> None:
    decoder = FrameDecoder(CONTROL_LIMIT)
    assert list(decoder.feed(PREAMBLE_BYTES)) == [Preamble(ProtocolName.VIEWER, VERSION)]
    for byte in b"\xff\xff\xff":
        assert list(decoder.feed(bytes([byte]))) == []
    assert decoder.buffered == 3
    with pytest.raises(FrameTooLarge) as info:
        list(decoder.feed(b"\xff"))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert info.value.length == 0xFFFFFFFF and info.value.limit == CONTROL_LIMIT
    assert info.value.fatal
    assert decoder.buffered == 4  # the header only: no body was waited for


def test_over_limit_refused_even_when_the_body_follows_in_the_same_read() -> None:
    decoder = FrameDecoder(CONTROL_LIMIT, expect_preamble=False)
    frame = encode_frame(0x20, bytes(CONTROL_LIMIT))  # length = limit + 1
    with pytest.raises(FrameTooLarge):
        list(decoder.feed(frame[:4096]))
    assert decoder.buffered <= 4096


@pytest.mark.parametrize("limit", [1, 5, CONTROL_LIMIT, MEDIA_LIMIT])
def test_length_equal_to_the_limit_is_accepted_and_one_more_refused(limit: int) -> None:
    ok = encode_frame(0x40, bytes(limit - 1))
    decoder = FrameDecoder(limit, expect_preamble=False)
    assert list(decoder.feed(ok)) == [(0x40, bytes(limit - 1))]
    with pytest.raises(FrameTooLarge) as info:
        list(decoder.feed(struct.pack("!I", limit + 1)))
    assert info.value.length == limit + 1


def test_length_zero_is_malformed() -> None:
    decoder = FrameDecoder(CONTROL_LIMIT, expect_preamble=False)
    with pytest.raises(ProtocolViolation) as info:
        list(decoder.feed(bytes(4)))
    assert info.value.code is ErrorCode.MALFORMED


def test_raised_limit_applies_to_the_next_frame_of_the_same_read() -> None:
    """A relay connection: the media limit applies from the frame after the hello."""
    hello = m.encode(m.RelayHello(bytes(32)))
    media = m.encode(m.Media(0, 1, 1, 0, 0, bytes(200_000)))
    decoder = FrameDecoder(CONTROL_LIMIT)
    items = []
    for item in decoder.feed(encode_preamble(ProtocolName.RELAY) + hello + media):
        items.append(item)
        if item == (hello[4], hello[5:]):
            decoder.max_frame = MEDIA_LIMIT
    assert items[1:] == [(hello[4], hello[5:]), (media[4], media[5:])]

    # Without the raise, the same bytes are refused on the media frame's length.
    decoder = FrameDecoder(CONTROL_LIMIT)
    with pytest.raises(FrameTooLarge):
        list(decoder.feed(encode_preamble(ProtocolName.RELAY) + hello + media))


def test_lowered_limit_applies_to_the_next_frame() -> None:
    small = encode_frame(0x02, bytes(8))
    large = encode_frame(0x03, bytes(8) + bytes(100))
    decoder = FrameDecoder(1000, expect_preamble=False)
    frames = decoder.feed(small + large)
    assert next(frames) == (0x02, bytes(8))
    decoder.max_frame = 50
    with pytest.raises(FrameTooLarge) as info:
        next(frames)
    assert info.value.limit == 50 and info.value.length == 109


def test_lowered_limit_applies_to_a_partly_buffered_frame() -> None:
    frame = encode_frame(0x03, bytes(100))
    decoder = FrameDecoder(1000, expect_preamble=False)
    assert list(decoder.feed(frame[:50])) == []
    decoder.max_frame = 60
    with pytest.raises(FrameTooLarge):
        list(decoder.feed(frame[50:]))


# --------------------------------------------------------------------------
# Preambles


def test_preamble_layout() -> None:
    raw = encode_preamble(ProtocolName.ENCODER, (1, 2))
    assert raw == b"EVSP" + b"encoder\0" + b"\x00\x01\x00\x02"
    assert PREAMBLE_SIZE == 16 and MAGIC == b"EVSP"
    for name in ProtocolName:
        assert len(name.value) <= 8
        assert decode_preamble(encode_preamble(name)) == Preamble(name, VERSION)


@pytest.mark.parametrize("first", [b"G", b"\x16", b"\x00", b"E\x00", b"EVS\x00"])
def test_bad_magic_is_refused_on_the_first_wrong_byte(first: bytes) -> None:
    decoder = FrameDecoder(CONTROL_LIMIT)
    with pytest.raises(ProtocolViolation) as info:
        list(decoder.feed(first))
    assert info.value.code is ErrorCode.BAD_PREAMBLE


def test_magic_prefix_waits_for_more() -> None:
    decoder = FrameDecoder(CONTROL_LIMIT)
    for i in range(1, PREAMBLE_SIZE):
        assert list(decoder.feed(PREAMBLE_BYTES[i - 1 : i])) == []
        assert decoder.preamble is None
    assert list(decoder.feed(PREAMBLE_BYTES[-1:])) == [Preamble(ProtocolName.VIEWER, VERSION)]


def test_truncated_preamble() -> None:
    with pytest.raises(ProtocolViolation) as info:
        decode_preamble(PREAMBLE_BYTES[:15])
    assert info.value.code is ErrorCode.BAD_PREAMBLE


@pytest.mark.parametrize(
    "name", [b"camera", b"", b"ENCODER", b"encoder ", b"enc\0oder", b"view\xffer", b"relay\0\0x"]
)
def test_unknown_protocol_name(name: bytes) -> None:
    raw = PREAMBLE.pack(MAGIC, name, *VERSION)
    with pytest.raises(ProtocolViolation) as info:
        list(FrameDecoder(CONTROL_LIMIT).feed(raw))
    assert info.value.code is ErrorCode.WRONG_PROTOCOL


@pytest.mark.parametrize("port", list(ProtocolName))
@pytest.mark.parametrize("peer", list(ProtocolName))
def test_protocol_name_must_be_the_ports(port: ProtocolName, peer: ProtocolName) -> None:
    preamble = decode_preamble(encode_preamble(peer))
    if port is peer:
        check_peer_preamble(preamble, port)
        return
    with pytest.raises(ProtocolViolation) as info:
        check_peer_preamble(preamble, port)
    assert info.value.code is ErrorCode.WRONG_PROTOCOL
    assert port.value.decode() in info.value.message
    assert peer.value.decode() in info.value.message


@pytest.mark.parametrize(
    "version,code",
    [
        ((1, 0), None),
        ((1, 1), None),
        ((1, 0xFFFF), None),
        ((0, 0), ErrorCode.VERSION_TOO_OLD),
        ((0, 9), ErrorCode.VERSION_TOO_OLD),
        ((0, 0xFFFF), ErrorCode.VERSION_TOO_OLD),
        ((2, 0), ErrorCode.WRONG_PROTOCOL),
        ((0xFFFF, 0xFFFF), ErrorCode.WRONG_PROTOCOL),
    ],
)
def test_version_check(version: tuple[int, int], code: ErrorCode | None) -> None:
    assert VERSION == (1, 0) and MIN_VERSION == (1, 0)
    preamble = decode_preamble(encode_preamble(ProtocolName.RELAY, version))
    assert preamble.version == version
    if code is None:
        check_peer_preamble(preamble, ProtocolName.RELAY)
        return
    with pytest.raises(ProtocolViolation) as info:
        check_peer_preamble(preamble, ProtocolName.RELAY)
    assert info.value.code is code
    # Both versions are named, so the operator knows which side to upgrade.
    assert f"{version[0]}.{version[1]}" in info.value.message
    assert f"{VERSION[0]}.{VERSION[1]}" in info.value.message


def test_wire_error_is_fatal_and_names_its_code() -> None:
    err = ProtocolViolation(ErrorCode.MALFORMED, "truncated u32")
    assert isinstance(err, WireError) and err.fatal
    assert repr(err) == "ProtocolViolation(MALFORMED, 'truncated u32')"
    assert str(err) == "truncated u32"


# --------------------------------------------------------------------------
# Random input never raises anything but ProtocolViolation

_FRAME_TYPES = [*sorted(m.MESSAGES), m.MEDIA, 0x00, 0x7F, 0xFF]


@st.composite
def frame_soup(draw: st.DrawFn) -> bytes:
    """Valid frames, frames with plausible lengths and types but random bodies, and noise."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        choice = draw(st.integers(0, 2))
        if choice == 0:
            parts.append(draw(st.sampled_from(FRAMES)))
        elif choice == 1:
            body = draw(st.binary(max_size=64))
            msg_type = draw(st.sampled_from(_FRAME_TYPES))
            length = len(body) + 1 + draw(st.sampled_from([0, 0, 0, -1, 1, -2]))
            parts.append(struct.pack("!IB", max(length, 0), msg_type) + body)
        else:
            parts.append(draw(st.binary(max_size=32)))
    return b"".join(parts)


@settings(max_examples=300, deadline=None)
@given(
    protocol=st.sampled_from([ProtocolName.ENCODER, ProtocolName.VIEWER, ProtocolName.RELAY]),
    from_server=st.booleans(),
    limit=st.sampled_from([1, 16, 100, CONTROL_LIMIT]),
    data=st.one_of(st.binary(max_size=300), frame_soup()),
    cuts=st.lists(st.integers(0, 400), max_size=5),
)
def test_random_bytes_after_a_valid_preamble(
    protocol: ProtocolName, from_server: bool, limit: int, data: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder(limit)
    stream = encode_preamble(protocol) + data
    try:
        for chunk in split_at(stream, cuts):
            for item in decoder.feed(chunk):
                if isinstance(item, Preamble):
                    check_peer_preamble(item, protocol)
                    continue
                msg_type, body = item
                assert len(body) + 1 <= limit
                msg = m.decode_for(protocol, from_server, msg_type, body)
                # Whatever decodes re-encodes to the same bytes.
                assert m.encode(msg) == encode_frame(msg_type, body)
    except ProtocolViolation as e:
        assert e.fatal and isinstance(e.code, ErrorCode)
    else:
        # What is left is at most one incomplete frame within the limit.
        assert decoder.buffered <= 4 + limit - 1


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=40))
def test_random_preambles(data: bytes) -> None:
    decoder = FrameDecoder(CONTROL_LIMIT)
    try:
        for item in decoder.feed(data):
            if isinstance(item, Preamble):
                check_peer_preamble(item, ProtocolName.ENCODER)
    except ProtocolViolation as e:
        assert e.code in {
            ErrorCode.BAD_PREAMBLE,
            ErrorCode.WRONG_PROTOCOL,
            ErrorCode.VERSION_TOO_OLD,
            ErrorCode.MALFORMED,
            ErrorCode.FRAME_TOO_LARGE,
        }
