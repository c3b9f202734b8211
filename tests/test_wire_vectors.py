"""The wire layer against the normative vectors of ``protocol-spec/``.

``protocol-spec/vectors.json`` holds the vectors; the ``.rst`` documents show
the same hex in ``Vector`` blocks and describe each message in a table.  These
tests decode every vector to its message and re-encode it byte for byte, check
that every invalid vector is refused with its error code, and check that the
documents cannot drift from the vectors, the message classes and the codes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
import pytest

from evserver.wire import messages as m
from evserver.wire import peer
from evserver.wire.framing import (
    PREAMBLE_SIZE,
    VERSION,
    ErrorCode,
    FrameDecoder,
    Preamble,
    ProtocolName,
    ProtocolViolation,
    check_peer_preamble,
    decode_preamble,
    encode_preamble,
)

SPEC = Path(__file__).resolve().parent.parent / "protocol-spec"
VECTORS: dict[str, Any] = json.loads((SPEC / "vectors.json").read_text("utf-8"))
VALID: list[dict[str, Any]] = VECTORS["vectors"]
INVALID: list[dict[str, Any]] = VECTORS["invalid"]
RST_FILES = sorted(SPEC.glob("*.rst"))

CONTROL_LIMIT = 64 * 1024
MEDIA_LIMIT = 4 * 1024 * 1024

MESSAGE_CLASSES: dict[str, type] = {cls.__name__: cls for cls in m.MESSAGES.values()}
MESSAGE_CLASSES["Media"] = m.Media


# --------------------------------------------------------------------------
# JSON <-> message objects


def _value_from_json(kind: m.Kind, value: Any) -> Any:
    if isinstance(kind, m.ListOf):
        return tuple(_record_from_json(kind.record, item) for item in value)
    if isinstance(kind, m.Embedded):
        return _record_from_json(kind.record, value)
    if isinstance(kind, m.Bytes16 | m.Fixed) and not isinstance(kind, m._Str):
        return bytes.fromhex(value)
    return value


def _record_from_json(cls: type, data: dict[str, Any]) -> Any:
    names = [f.name for f in attrs.fields(cls)]
    assert sorted(k for k in data if k != "type") == sorted(names), cls.__name__
    return cls(*[_value_from_json(f.metadata["wire"], data[f.name]) for f in attrs.fields(cls)])


def message_from_json(data: dict[str, Any]) -> Any:
    cls = MESSAGE_CLASSES[data["type"]]
    if cls is m.Media:
        fields = {k: v for k, v in data.items() if k != "type"}
        fields["payload"] = bytes.fromhex(fields["payload"])
        return m.Media(**fields)
    return _record_from_json(cls, data)


def frame_limit(protocol: str) -> int:
    return {"relay": MEDIA_LIMIT, "peer": peer.FRAME_LIMIT}.get(protocol, CONTROL_LIMIT)


def _ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


# --------------------------------------------------------------------------
# The vector file itself


def test_vector_names_are_unique() -> None:
    names = _ids(VALID) + _ids(INVALID)
    assert len(names) == len(set(names))


def test_every_message_type_has_a_vector() -> None:
    covered = {v["message"]["type"] for v in VALID}
    assert set(MESSAGE_CLASSES) | {"Preamble"} == covered


def test_every_protocol_has_a_preamble_vector() -> None:
    preambles = {v["protocol"] for v in VALID if v["message"]["type"] == "Preamble"}
    assert preambles == {p.value.decode() for p in ProtocolName}


def test_vectors_cover_lists_of_zero_one_and_two() -> None:
    lengths: dict[str, set[int]] = {}
    for v in VALID:
        for key, value in v["message"].items():
            if isinstance(value, list) and key != "version":
                lengths.setdefault(key, set()).add(len(value))
    assert {0, 1, 2} <= lengths["servers"]
    assert {0, 1, 2} <= lengths["encoders"]


def test_vectors_cover_non_ascii_strings_and_both_error_kinds() -> None:
    text = json.dumps([v["message"] for v in VALID], ensure_ascii=False)
    assert any(ord(c) > 0x7F for c in text)
    assert any(ord(c) > 0xFFFF or 0x3000 <= ord(c) <= 0x9FFF for c in text)  # 3-byte UTF-8
    fatal = {v["message"]["fatal"] for v in VALID if v["message"]["type"] == "Error"}
    assert fatal == {0, 1}


def test_invalid_vectors_cover_the_required_cases() -> None:
    by_error: dict[str, set[str]] = {}
    for v in INVALID:
        by_error.setdefault(v["error"], set()).add(v["name"])
    required = {
        "BAD_PREAMBLE": {"bad-magic"},
        "WRONG_PROTOCOL": {"unknown-protocol-name", "wrong-protocol"},
        "VERSION_TOO_OLD": {"version-too-old"},
        "FRAME_TOO_LARGE": {"control-over-limit", "media-over-limit"},
        "MALFORMED": {
            "length-zero",
            "truncated-str",
            "trailing-byte",
            "bad-utf8",
            "control-char",
            "unknown-type",
            "unknown-media-flag",
        },
        "UNEXPECTED_MESSAGE": {"wrong-direction"},
    }
    for code, names in required.items():
        assert names <= by_error.get(code, set()), code


# --------------------------------------------------------------------------
# Valid vectors: decode, compare, re-encode


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_valid_vector(vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["hex"])
    protocol = ProtocolName(vector["protocol"].encode("ascii"))
    expected = vector["message"]
    if expected["type"] == "Preamble":
        version = tuple(expected["version"])
        assert len(raw) == PREAMBLE_SIZE
        preamble = decode_preamble(raw)
        assert preamble == Preamble(ProtocolName(expected["protocol"].encode()), version)
        assert encode_preamble(preamble.name, preamble.version) == raw
        assert version == VERSION
        check_peer_preamble(preamble, protocol)
        # Through the incremental decoder too, as a connection sees it.
        assert list(FrameDecoder(CONTROL_LIMIT).feed(raw)) == [preamble]
        return

    decoder = FrameDecoder(frame_limit(vector["protocol"]), expect_preamble=False)
    frames = list(decoder.feed(raw))
    assert len(frames) == 1 and decoder.buffered == 0
    item = frames[0]
    assert isinstance(item, tuple)
    msg_type, body = item
    msg = m.decode_for(protocol, vector["from_server"], msg_type, body)
    assert msg == message_from_json(expected)
    assert type(msg).__name__ == expected["type"]
    assert m.encode(msg) == raw
    assert m.encode(message_from_json(expected)) == raw


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_valid_vector_is_refused_on_other_protocols_and_directions(
    vector: dict[str, Any],
) -> None:
    """A vector is accepted exactly where the message-type table allows it."""
    if vector["message"]["type"] == "Preamble":
        return
    raw = bytes.fromhex(vector["hex"])
    msg_type, body = raw[4], raw[5:]
    for protocol in ProtocolName:
        for from_server in (True, False):
            if msg_type in m.allowed(protocol, from_server):
                assert m.decode_for(protocol, from_server, msg_type, body) is not None
            else:
                with pytest.raises(ProtocolViolation) as info:
                    m.decode_for(protocol, from_server, msg_type, body)
                assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


# --------------------------------------------------------------------------
# Invalid vectors: refused with the documented code


@pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))
def test_invalid_vector(vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["hex"])
    protocol = ProtocolName(vector["protocol"].encode("ascii"))
    expected = ErrorCode[vector["error"]]
    decoder = FrameDecoder(vector["limit"], expect_preamble=vector["preamble"])
    with pytest.raises(ProtocolViolation) as info:
        for item in decoder.feed(raw):
            if isinstance(item, Preamble):
                check_peer_preamble(item, protocol)
            else:
                msg_type, body = item
                m.decode_for(protocol, vector["from_server"], msg_type, body)
    assert info.value.code is expected, info.value
    assert info.value.fatal
    if expected is ErrorCode.FRAME_TOO_LARGE:
        # Refused on the length alone: nothing beyond what arrived is kept.
        assert decoder.buffered <= len(raw) <= 5


@pytest.mark.parametrize(
    "vector", [v for v in INVALID if v["preamble"]], ids=_ids([v for v in INVALID if v["preamble"]])
)
def test_invalid_preamble_fed_byte_by_byte(vector: dict[str, Any]) -> None:
    """A bad magic is refused on its first wrong byte, the rest on the 16th."""
    raw = bytes.fromhex(vector["hex"])
    protocol = ProtocolName(vector["protocol"].encode("ascii"))
    decoder = FrameDecoder(vector["limit"])
    first_bad = next((i for i in range(4) if raw[i] != b"EVSP"[i]), None)
    for i in range(len(raw)):
        try:
            for item in decoder.feed(raw[i : i + 1]):
                assert isinstance(item, Preamble)
                check_peer_preamble(item, protocol)
        except ProtocolViolation as e:
            assert e.code is ErrorCode[vector["error"]]
            assert i == (first_bad if first_bad is not None else PREAMBLE_SIZE - 1)
            return
    pytest.fail("not refused")


def test_wrong_protocol_and_version_messages_name_both_sides() -> None:
    by_name = {v["name"]: bytes.fromhex(v["hex"]) for v in INVALID}
    with pytest.raises(ProtocolViolation) as info:
        check_peer_preamble(decode_preamble(by_name["wrong-protocol"]), ProtocolName.ENCODER)
    assert "encoder" in info.value.message and "viewer" in info.value.message
    with pytest.raises(ProtocolViolation) as info:
        check_peer_preamble(decode_preamble(by_name["version-too-old"]), ProtocolName.ENCODER)
    assert "0.9" in info.value.message and "1.0" in info.value.message
    with pytest.raises(ProtocolViolation) as info:
        check_peer_preamble(decode_preamble(by_name["version-newer-major"]), ProtocolName.VIEWER)
    assert "2.0" in info.value.message and "1.0" in info.value.message


# --------------------------------------------------------------------------
# The documents against the vectors and the code

_VECTOR_INTRO = re.compile(
    r"^(?P<intro>Invalid vector|Vector) ``(?P<name>[a-z0-9-]+)``"
    r"(?:, refused with ``(?P<error>[A-Z_]+)``)?::$"
)


def _literal_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line number, introducing line, text with comments removed) of each literal block."""
    lines = path.read_text("utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not line.endswith("::") or line.lstrip().startswith(".."):
            continue  # not a literal block, or a directive
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        content = []
        while j < len(lines) and (not lines[j].strip() or lines[j].startswith("    ")):
            content.append(lines[j].split("#", 1)[0])
            j += 1
        blocks.append((i + 1, line, "\n".join(content)))
    return blocks


def _rst_vectors() -> list[tuple[str, str, str | None, str, bool]]:
    """(file, name, error, hex, invalid) for every Vector block of the documents.

    A literal block of hex that is not introduced as a vector is an error: all
    hex in the documents must be tested.
    """
    found = []
    for path in RST_FILES:
        for lineno, intro, content in _literal_blocks(path):
            where = f"{path.name}:{lineno}"
            digits = "".join(content.split())
            match = _VECTOR_INTRO.match(intro)
            if match is None:
                assert "vector ``" not in intro.lower(), f"{where}: malformed {intro!r}"
                assert not re.fullmatch(r"[0-9a-fA-F]+", digits), f"{where}: untested hex"
                continue
            assert re.fullmatch(r"(?:[0-9a-f]{2})+", digits), f"{where}: not hex"
            invalid = match["intro"] == "Invalid vector"
            found.append((path.name, match["name"], match["error"], digits, invalid))
    return found


def test_every_hex_block_in_the_documents_is_a_tested_vector() -> None:
    valid = {v["name"]: v for v in VALID}
    invalid = {v["name"]: v for v in INVALID}
    seen: set[str] = set()
    blocks = _rst_vectors()
    assert blocks, "no Vector blocks found"
    for filename, name, error, digits, is_invalid in blocks:
        where = f"{filename}: vector {name}"
        assert name not in seen, f"{where} shown twice"
        seen.add(name)
        vector = (invalid if is_invalid else valid).get(name)
        assert vector is not None, f"{where} is not in vectors.json"
        assert digits == vector["hex"], f"{where} differs from vectors.json"
        if is_invalid:
            assert error == vector["error"], where
    # ... and every vector is shown in the documents.
    assert seen == set(valid) | set(invalid)


def _section(text: str, title: str) -> str:
    """The text of the section titled ``title`` up to the next title of any level."""
    lines = text.splitlines()
    for i, line in enumerate(lines[:-1]):
        under = lines[i + 1]
        if line == title and under and set(under) <= set("=-~^") and len(under) >= len(title):
            body = []
            for j in range(i + 2, len(lines) - 1):
                nxt = lines[j + 1]
                if (
                    lines[j]
                    and nxt
                    and set(nxt) <= set("=-~^")
                    and len(nxt) >= len(lines[j])
                    and not set(lines[j]) <= set("= ")
                ):
                    break
                body.append(lines[j])
            return "\n".join(body)
    raise AssertionError(f"no section titled {title!r}")


def _first_simple_table(section: str) -> list[list[str]]:
    """Rows (cells stripped) of the first simple table in ``section``; continuation rows merged."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"=+( +=+)+", line))
    border = lines[start]
    spans = [(mo.start(), mo.end()) for mo in re.finditer(r"=+", border)]

    def cells(line: str) -> list[str]:
        out = []
        for k, (a, _b) in enumerate(spans):
            end = spans[k + 1][0] if k + 1 < len(spans) else None
            out.append(line[a:end].strip())
        return out

    rows: list[list[str]] = []
    borders = 0
    for line in lines[start:]:
        if line == border or re.fullmatch(r"=+( +=+)+", line):
            borders += 1
            if borders == 3:
                break
            continue
        if not line.strip():
            continue
        row = cells(line)
        if row[0]:
            rows.append(row)
        else:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], row, strict=True)]
    return rows


def _kind_name(kind: m.Kind) -> str:
    if isinstance(kind, m.ListOf):
        return f"list of {kind.record.__name__}"
    if isinstance(kind, m.Embedded):
        return kind.record.__name__
    return kind.name


def _records_of(cls: type) -> list[type]:
    """The record classes that ``cls``'s fields embed or list, recursively."""
    out: list[type] = []
    for f in attrs.fields(cls):
        kind = f.metadata["wire"]
        if isinstance(kind, m.ListOf | m.Embedded):
            out += [kind.record, *_records_of(kind.record)]
    return out


def _documented_classes() -> list[tuple[str, type]]:
    out: list[tuple[str, type]] = [
        (f"{cls.__name__} (0x{t:02x})", cls) for t, cls in sorted(m.MESSAGES.items())
    ]
    out.append((f"Media (0x{m.MEDIA:02x})", m.Media))
    records = dict.fromkeys(r for cls in m.MESSAGES.values() for r in _records_of(cls))
    assert {m.ServerInfo, m.EncoderInfo} <= set(records)
    out += [(f"{r.__name__} (record)", r) for r in records]
    return out


@pytest.mark.parametrize(
    "title,cls", _documented_classes(), ids=[t for t, _ in _documented_classes()]
)
def test_message_table_matches_the_code(title: str, cls: type) -> None:
    """Each message's table lists its fields in order with their kinds."""
    text = "\n".join(p.read_text("utf-8") for p in RST_FILES)
    section = _section(text, title)
    if cls is m.Media:
        expected = [
            ("stream_id", "u32"),
            ("codec", "u8"),
            ("flags", "u8"),
            ("timestamp_us", "u64"),
            ("capture_time_us", "u64"),
            ("payload", "rest"),
        ]
    else:
        expected = [(f.name, _kind_name(f.metadata["wire"])) for f in attrs.fields(cls)]
    if not expected:
        assert "This message has no fields: its body is empty." in " ".join(section.split())
        return
    rows = _first_simple_table(section)
    assert rows[0][:3] == ["offset", "field", "type"]
    assert [(r[1], r[2]) for r in rows[1:]] == expected


def test_message_type_table_matches_the_code() -> None:
    """framing.rst's table for the client protocols and peer.rst's for the peer protocol."""
    documented: dict[int, set[tuple[ProtocolName, bool]]] = {}
    clients = (ProtocolName.ENCODER, ProtocolName.VIEWER, ProtocolName.RELAY)
    for document in ("framing.rst", "peer.rst"):
        rows = _first_simple_table(_section((SPEC / document).read_text("utf-8"), "Message types"))
        assert rows[0] == ["type", "name", "protocols", "direction", "defined in"]
        for type_hex, name, protocols, direction, defined_in in rows[1:]:
            msg_type = int(type_hex, 16)
            assert msg_type == MESSAGE_CLASSES[name].TYPE  # type: ignore[attr-defined]
            assert (SPEC / defined_in).exists()
            assert f"{name} (0x{msg_type:02x})" in (SPEC / defined_in).read_text("utf-8")
            protos = (
                set(clients)
                if protocols == "all"
                else {ProtocolName(p.strip().encode()) for p in protocols.split(",")}
            )
            directions = {
                "both": {True, False}, "client → server": {False}, "server → client": {True}
            }[direction]
            documented.setdefault(msg_type, set()).update(
                (p, s) for p in protos for s in directions
            )
    assert set(documented) == set(m.MESSAGES) | {m.MEDIA}
    for protocol in ProtocolName:
        for from_server in (True, False):
            expected = {t for t, where in documented.items() if (protocol, from_server) in where}
            assert m.allowed(protocol, from_server) == expected, (protocol, from_server)


def test_error_code_table_matches_the_code() -> None:
    """errors.rst's codes and those peer.rst adds, each defined once."""
    rows = []
    for document in ("errors.rst", "peer.rst"):
        table = _first_simple_table(_section((SPEC / document).read_text("utf-8"), "Error codes"))
        assert table[0][:3] == ["code", "name", "kind"]
        rows += table[1:]
    assert len(rows) == len(ErrorCode)
    assert {(int(r[0]), r[1]) for r in rows} == {(c.value, c.name) for c in ErrorCode}
    kinds = {r[1]: r[2] for r in rows}
    assert set(kinds.values()) <= {"violation", "refusal", "either"}
    for refusal in ("NOT_FOUND", "DUPLICATE", "LIMIT_EXCEEDED"):
        assert kinds[refusal] == "refusal"


def test_port_table() -> None:
    rows = _first_simple_table(
        _section((SPEC / "README.rst").read_text("utf-8"), "Ports and protocols")
    )
    ports = {r[1].strip("`"): int(r[2]) for r in rows[1:]}
    assert ports == {"encoder": 5510, "viewer": 5520, "relay": 5530, "peer": 47100}
    assert {p.value.decode() for p in ProtocolName} == set(ports)
