"""Join tokens: encoding, every kind of damaged text, minting and redeeming."""

from __future__ import annotations

import base64
import hashlib
import json
import string
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from evserver.cluster import ca, tokens
from evserver.cluster.ca import ClusterError, ClusterIdentity
from evserver.cluster.tokens import JoinToken, TokenError, TokenRecord

NOW = 1_700_000_000
URLSAFE = string.ascii_letters + string.digits + "-_"


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> ClusterIdentity:
    return ca.create_cluster(tmp_path_factory.mktemp("data"), "srv-1", ["192.0.2.1"], NOW)


def example_token(**changes: Any) -> JoinToken:
    fields: dict[str, Any] = {
        "cluster_id": "0b5b5e4e-6f53-4c36-9a57-6d1f2c0a9e11",
        "addresses": ("192.0.2.1:47100", "peer.example:47100", "[2001:db8::1]:47101"),
        "ca_fingerprint": "ab" * 32,
        "token_id": "0123456789abcdef",
        "secret": "s" * 43,
        "expires": NOW + 86400,
    }
    fields.update(changes)
    return JoinToken(**fields)


def encode_document(document: object) -> str:
    raw = json.dumps(document).encode()
    return "evs1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def example_document(**changes: Any) -> dict[str, Any]:
    document = json.loads(base64.urlsafe_b64decode(example_token().encode()[5:] + "==").decode())
    document.update(changes)
    return document


# -- strategies ----------------------------------------------------------------------------

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostnames = (
    st.lists(labels, min_size=1, max_size=4)
    .map(".".join)
    .filter(
        lambda h: not h.replace(".", "").isdigit()  # all-digit names look like bad IPv4
    )
)
ports = st.integers(1, 65535)
addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), ports).map(lambda hp: f"{hp[0]}:{hp[1]}"),
    st.tuples(st.ip_addresses(v=6).map(str), ports).map(lambda hp: f"[{hp[0]}]:{hp[1]}"),
    st.tuples(hostnames, ports).map(lambda hp: f"{hp[0]}:{hp[1]}"),
)
valid_tokens = st.builds(
    JoinToken,
    cluster_id=st.uuids().map(str),
    addresses=st.lists(addresses, min_size=1, max_size=tokens.MAX_ADDRESSES).map(tuple),
    ca_fingerprint=st.binary(min_size=32, max_size=32).map(bytes.hex),
    token_id=st.text(URLSAFE, min_size=8, max_size=64),
    secret=st.text(URLSAFE, min_size=16, max_size=128),
    expires=st.integers(0, 2**53 - 1),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=12,
)
field_values = st.one_of(
    json_values,
    st.uuids().map(str),
    st.lists(addresses | st.text(max_size=12), max_size=3),
    st.text(URLSAFE + "=.:", max_size=70),
    st.integers(-(2**60), 2**60),
)
token_like_documents = st.dictionaries(
    st.sampled_from(["c", "a", "f", "t", "s", "e", "x"]), field_values
)


_ATTRIBUTES = {
    "c": "cluster_id",
    "a": "addresses",
    "f": "ca_fingerprint",
    "t": "token_id",
    "s": "secret",
    "e": "expires",
}


def decode_or_token_error(text: str) -> JoinToken | None:
    """Decode; TokenError is fine, any other exception fails the test."""
    try:
        return JoinToken.decode(text)
    except TokenError as e:
        assert str(e)
        return None


# -- encoding ------------------------------------------------------------------------------


@given(valid_tokens)
def test_round_trip(token: JoinToken) -> None:
    text = token.encode()
    assert text.startswith("evs1.")
    assert set(text[5:]) <= set(URLSAFE)  # unpadded base64url
    assert JoinToken.decode(text) == token
    assert JoinToken.decode(f"  {text}\n") == token  # as pasted from a terminal


def test_encoding_is_the_documented_json() -> None:
    token = example_token()
    raw = base64.urlsafe_b64decode(token.encode()[5:] + "==")
    assert json.loads(raw) == {
        "c": token.cluster_id,
        "a": list(token.addresses),
        "f": token.ca_fingerprint,
        "t": token.token_id,
        "s": token.secret,
        "e": token.expires,
    }
    assert b" " not in raw
    assert JoinToken.decode(encode_document(json.loads(raw))) == token  # key order is free


def test_addresses_may_be_given_as_a_list() -> None:
    assert example_token(addresses=["a.example:1"]).addresses == ("a.example:1",)


def test_the_secret_stays_out_of_repr() -> None:
    assert "s" * 43 not in repr(example_token())


@given(st.text())
def test_random_text_is_a_token_error(text: str) -> None:
    decode_or_token_error(text)


@given(st.text(URLSAFE + "=+/ ", max_size=200))
def test_random_base64_after_the_prefix_is_a_token_error(body: str) -> None:
    decode_or_token_error("evs1." + body)


@given(st.binary(max_size=300))
def test_random_bytes_after_the_prefix_are_a_token_error(data: bytes) -> None:
    decode_or_token_error("evs1." + base64.urlsafe_b64encode(data).rstrip(b"=").decode())


@given(json_values)
def test_random_json_is_a_token_error(document: object) -> None:
    decode_or_token_error(encode_document(document))


@given(token_like_documents)
def test_random_token_like_json_is_a_token_error(document: dict[str, Any]) -> None:
    assume(set(document) != set("cafste"))  # a complete one might be valid: covered below
    assert decode_or_token_error(encode_document(document)) is None


@given(st.sampled_from(list("cafste")), field_values)
def test_any_value_in_any_field_is_a_token_or_a_token_error(key: str, value: object) -> None:
    token = decode_or_token_error(encode_document(example_document(**{key: value})))
    if token is not None:
        assert getattr(token, _ATTRIBUTES[key]) == (tuple(value) if key == "a" else value)
        assert JoinToken.decode(token.encode()) == token


@given(st.data())
def test_damaged_tokens_are_token_errors(data: st.DataObject) -> None:
    text = example_token().encode()
    index = data.draw(st.integers(0, len(text) - 1))
    replacement = data.draw(st.text(max_size=3))
    damaged = text[:index] + replacement + text[index + 1 :]
    token = decode_or_token_error(damaged)
    if token is not None:  # the format has no checksum: damage may leave a valid token
        assert JoinToken.decode(token.encode()) == token


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must start with 'evs1.'"),
        ("hello", "must start with 'evs1.'"),
        ("EVS1.abcd", "must start with 'evs1.'"),
        ("evs2.abcd", "unsupported join token version 'evs2'"),
        ("evs1.ab$d", "not base64url"),
        ("evs1.ab+/", "not base64url"),
        ("evs1.abcd=", "not base64url"),
        ("evs1.abcde", "not base64url"),  # 5 characters: never a whole byte
        ("evs1." + "A" * 5000, "longer than 4096"),
        ("evs1." + base64.urlsafe_b64encode(b"\xff\xfe").decode().rstrip("="), "not UTF-8"),
        ("evs1." + base64.urlsafe_b64encode(b"{nope").decode().rstrip("="), "not JSON"),
        ("evs1.", "not JSON"),
        (encode_document([1, 2]), "not a JSON object"),
        (encode_document("text"), "not a JSON object"),
        (
            "evs1." + base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("="),
            "not JSON",
        ),
    ],
)
def test_malformed_text(text: str, message: str) -> None:
    with pytest.raises(TokenError, match=message):
        JoinToken.decode(text)


def _without(key: str) -> dict[str, Any]:
    document = example_document()
    del document[key]
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (_without("c"), r"missing 'c' \(cluster id\)"),
        (_without("s"), r"missing 's' \(secret\)"),
        ({}, "missing 'c' .*'a' .*'f' .*'t' .*'s' .*'e'"),
        (example_document(x=1), "unknown fields 'x'"),
        (example_document(c=5), "cluster id must be text, not int"),
        (example_document(c="not-a-uuid"), "cluster id is not a lowercase UUID"),
        (example_document(c="0B5B5E4E-6F53-4C36-9A57-6D1F2C0A9E11"), "lowercase UUID"),
        (example_document(a="1.2.3.4:5"), "addresses must be a list"),
        (example_document(a=[]), "names no server address"),
        (example_document(a=["x:1"] * 17), "more than 16 addresses"),
        (example_document(a=[7]), "is not text"),
        (example_document(a=["host"]), "has no port"),
        (example_document(a=["host:0"]), "port must be 1..65535"),
        (example_document(a=["host:65536"]), "port must be 1..65535"),
        (example_document(a=["host:+80"]), "port must be 1..65535"),
        (example_document(a=["bad_host!:80"]), "neither an IP address nor a valid host name"),
        (example_document(a=["::1:80"]), r"write an IPv6 address as \[address\]:port"),
        (example_document(a=["[::1]80"]), r"is not \[IPv6\]:port"),
        (example_document(a=["[1.2.3.4]:80"]), "is not an IPv6 address"),
        (example_document(f="AB" * 32), "fingerprint is not 64 lowercase hex digits"),
        (example_document(f="ab" * 31), "fingerprint is not 64 lowercase hex digits"),
        (example_document(f=None), "fingerprint must be text, not NoneType"),
        (example_document(t="short"), "token id is not 8-64 characters"),
        (example_document(t=["x"]), "token id must be text, not list"),
        (example_document(s="has space in it!!!"), "secret is not 16-128 characters"),
        (example_document(s=1234), "secret must be text, not int"),
        (example_document(e=1.5), "expiry must be an integer, not float"),
        (example_document(e=True), "expiry must be an integer, not bool"),
        (example_document(e="1700000000"), "expiry must be an integer, not str"),
        (example_document(e=-1), "expiry is out of range"),
        (example_document(e=2**53), "expiry is out of range"),
    ],
)
def test_malformed_fields(document: dict[str, Any], message: str) -> None:
    with pytest.raises(TokenError, match=message):
        JoinToken.decode(encode_document(document))


def test_duplicate_fields_and_constants_are_refused() -> None:
    text = encode_document(example_document())
    raw = base64.urlsafe_b64decode(text[5:] + "==").decode()
    twice = raw[:-1] + ',"e":1}'
    with pytest.raises(TokenError, match="field 'e' appears twice"):
        JoinToken.decode("evs1." + base64.urlsafe_b64encode(twice.encode()).decode().rstrip("="))
    nan = raw.replace(f'"e": {NOW + 86400}', '"e": NaN')
    assert nan != raw
    with pytest.raises(TokenError, match="NaN is not a valid value"):
        JoinToken.decode("evs1." + base64.urlsafe_b64encode(nan.encode()).decode().rstrip("="))


def test_a_token_error_is_a_cluster_error() -> None:
    with pytest.raises(ClusterError):
        JoinToken.decode("nope")


def test_decode_refuses_non_text() -> None:
    with pytest.raises(TokenError, match="is text, not bytes"):
        JoinToken.decode(b"evs1.abcd")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:47100", ("127.0.0.1", 47100)),
        ("peer.example:1", ("peer.example", 1)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_parse_and_format_address(text: str, expected: tuple[str, int]) -> None:
    assert tokens.parse_address(text) == expected
    assert tokens.format_address(*expected) == text


# -- minting and redeeming -----------------------------------------------------------------


def test_mint_token(identity: ClusterIdentity) -> None:
    token, record = tokens.mint_token(identity, ["192.0.2.1:47100"], NOW + 0.9)
    assert token.cluster_id == identity.cluster_id
    assert token.addresses == ("192.0.2.1:47100",)
    assert token.ca_fingerprint == identity.fingerprint()
    assert token.expires == NOW + 86400
    assert record == TokenRecord(
        token_id=token.token_id,
        secret_hash=hashlib.sha256(token.secret.encode()).hexdigest(),
        expires=token.expires,
        used=False,
    )
    assert token.secret not in repr(record)
    assert JoinToken.decode(token.encode()) == token
    tokens.check_token(record, token.token_id, token.secret, NOW + 10)


def test_minted_tokens_are_unique(identity: ClusterIdentity) -> None:
    minted = [tokens.mint_token(identity, ["h.example:1"], NOW)[0] for _ in range(20)]
    assert len({t.token_id for t in minted}) == 20
    assert len({t.secret for t in minted}) == 20
    assert all(len(t.secret) >= 43 for t in minted)  # 32 random bytes


def test_mint_token_with_a_clock_and_lifetime(identity: ClusterIdentity) -> None:
    token, record = tokens.mint_token(identity, ["h.example:1"], lambda: NOW, lifetime=60)
    assert token.expires == record.expires == NOW + 60


@pytest.mark.parametrize(
    ("addresses", "lifetime", "message"),
    [
        ([], 60, "names no server address"),
        (["nope"], 60, "has no port"),
        (["h.example:1"], 0, "lifetime must be a positive"),
        (["h.example:1"], -5, "lifetime must be a positive"),
        (["h.example:1"], 1.5, "lifetime must be a positive"),
    ],
)
def test_mint_token_refuses_bad_arguments(
    identity: ClusterIdentity, addresses: list[str], lifetime: Any, message: str
) -> None:
    with pytest.raises(TokenError, match=message):
        tokens.mint_token(identity, addresses, NOW, lifetime=lifetime)


@pytest.fixture
def minted(identity: ClusterIdentity) -> tuple[JoinToken, TokenRecord]:
    return tokens.mint_token(identity, ["192.0.2.1:47100"], NOW, lifetime=3600)


def test_check_token_accepts_the_right_secret_once(
    minted: tuple[JoinToken, TokenRecord],
) -> None:
    token, record = minted
    tokens.check_token(record, token.token_id, token.secret, NOW)
    tokens.check_token(record, token.token_id, token.secret, NOW + 3599)
    used = record.mark_used()
    assert used == attrs.evolve(record, used=True)
    with pytest.raises(TokenError, match=r"^token already used$"):
        tokens.check_token(used, token.token_id, token.secret, NOW)


def test_check_token_unknown(minted: tuple[JoinToken, TokenRecord]) -> None:
    token, record = minted
    with pytest.raises(TokenError, match=r"^unknown token$"):
        tokens.check_token(None, token.token_id, token.secret, NOW)
    with pytest.raises(TokenError, match=r"^unknown token$"):
        tokens.check_token(record, "someothertoken", token.secret, NOW)


def test_check_token_expired(minted: tuple[JoinToken, TokenRecord]) -> None:
    token, record = minted
    for now in (NOW + 3600, NOW + 10**6, lambda: NOW + 3600.5):
        with pytest.raises(TokenError, match=r"^token expired$"):
            tokens.check_token(record, token.token_id, token.secret, now)


def test_check_token_wrong_secret_says_nothing_else(
    minted: tuple[JoinToken, TokenRecord],
) -> None:
    token, record = minted
    for secret in ("x" * 43, token.secret[:-1], token.secret + "x", "", "\udc80"):
        for candidate, now in ((record, NOW), (record.mark_used(), NOW + 10**6)):
            with pytest.raises(TokenError, match=r"^wrong secret$"):
                tokens.check_token(candidate, token.token_id, secret, now)


def test_check_token_compares_in_constant_time(
    minted: tuple[JoinToken, TokenRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    token, record = minted
    calls: list[tuple[bytes, bytes]] = []
    real = tokens.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", spy)
    tokens.check_token(record, token.token_id, token.secret, NOW)
    with pytest.raises(TokenError):
        tokens.check_token(record, token.token_id, "y" * 43, NOW)
    assert [b for _a, b in calls] == [record.secret_hash.encode()] * 2


def test_a_record_survives_a_trip_through_the_store_format(
    minted: tuple[JoinToken, TokenRecord], tmp_path: Path
) -> None:
    token, record = minted
    stored = json.loads(json.dumps(attrs.asdict(record)))
    tokens.check_token(TokenRecord(**stored), token.token_id, token.secret, NOW)
