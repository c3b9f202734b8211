"""Join tokens: what ``evserver-ctl msr token`` prints and a new server presents.

A token is ``evs1.`` followed by unpadded base64url of compact JSON::

    {"c": cluster id, "a": ["host:port", ...], "f": CA fingerprint (sha256 hex),
     "t": token id, "s": secret, "e": expiry (Unix seconds)}

The minting member keeps only a :class:`TokenRecord` (the token id, a SHA-256
of the secret, the expiry and whether it was used); the caller stores it in
the replicated ``join_tokens`` table.  A token admits one server, once,
before it expires.  The secret carries 256 random bits, so a plain SHA-256
of it is as good as a slow password hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import uuid
from collections.abc import Iterable
from typing import Any

import attrs

from evserver.cluster.ca import ClusterError, ClusterIdentity, Now, unix_seconds
from evserver.config import validate_host

PREFIX = "evs1."
DEFAULT_LIFETIME = 24 * 3600
#: Longer text is refused before decoding (a real token is a few hundred bytes).
MAX_TOKEN_CHARS = 4096
MAX_ADDRESSES = 16
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_TOKEN_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{16,128}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_PORT = re.compile(r"[0-9]{1,5}")
_MAX_EXPIRES = 2**53  # exact in every JSON implementation
_FIELDS = {
    "c": "cluster id",
    "a": "addresses",
    "f": "CA fingerprint",
    "t": "token id",
    "s": "secret",
    "e": "expiry",
}


class TokenError(ClusterError):
    """A join token that is malformed, unknown, expired, used or wrong."""


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[ipv6]:port"`` as (host, port); TokenError if malformed."""
    if not isinstance(text, str):
        raise TokenError(f"address {text!r} is not text")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise TokenError(f"address {text!r} is not [IPv6]:port")
        try:
            if not isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
                raise ValueError
        except ValueError:
            raise TokenError(f"address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise TokenError(f"address {text!r} has no port (host:port)")
        if ":" in host:
            raise TokenError(f"address {text!r}: write an IPv6 address as [address]:port")
        try:
            validate_host(host)
        except ValueError as e:
            raise TokenError(f"address {text!r}: {e}") from None
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise TokenError(f"address {text!r}: port must be 1..65535")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """The ``host:port`` text of an address (IPv6 in brackets)."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _check_str(name: str, value: object, pattern: re.Pattern[str], form: str) -> None:
    if not isinstance(value, str):
        raise TokenError(f"the token's {name} must be text, not {type(value).__name__}")
    if not pattern.fullmatch(value):
        raise TokenError(f"the token's {name} is not {form}")


def _validate_cluster_id(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str):
        raise TokenError(f"the token's cluster id must be text, not {type(value).__name__}")
    try:
        ok = str(uuid.UUID(value)) == value
    except ValueError:
        ok = False
    if not ok:
        raise TokenError("the token's cluster id is not a lowercase UUID")


def _validate_addresses(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not value:
        raise TokenError("the token names no server address")
    if len(value) > MAX_ADDRESSES:
        raise TokenError(f"the token names more than {MAX_ADDRESSES} addresses")
    for address in value:
        parse_address(address)


def _to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _validate_fingerprint(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _check_str("CA fingerprint", value, _FINGERPRINT, "64 lowercase hex digits")


def _validate_token_id(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _check_str("token id", value, _TOKEN_ID, "8-64 characters of A-Z a-z 0-9 _ -")


def _validate_secret(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _check_str("secret", value, _SECRET, "16-128 characters of A-Z a-z 0-9 _ -")


def _validate_expires(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenError(f"the token's expiry must be an integer, not {type(value).__name__}")
    if not 0 <= value < _MAX_EXPIRES:
        raise TokenError("the token's expiry is out of range")


@attrs.frozen
class JoinToken:
    """A decoded join token; invalid field values raise TokenError on construction."""

    cluster_id: str = attrs.field(validator=_validate_cluster_id)
    #: The members to contact, as "host:port" (a tuple; a list is converted).
    addresses: tuple[str, ...] = attrs.field(
        converter=_to_tuple,
        validator=_validate_addresses,
    )
    ca_fingerprint: str = attrs.field(validator=_validate_fingerprint)
    token_id: str = attrs.field(validator=_validate_token_id)
    secret: str = attrs.field(validator=_validate_secret, repr=False)
    expires: int = attrs.field(validator=_validate_expires)

    def encode(self) -> str:
        """``evs1.`` + unpadded base64url of the compact JSON."""
        document = {
            "c": self.cluster_id,
            "a": list(self.addresses),
            "f": self.ca_fingerprint,
            "t": self.token_id,
            "s": self.secret,
            "e": self.expires,
        }
        data = json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        return PREFIX + base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        """The token in ``text`` (surrounding white space ignored); TokenError if malformed."""
        if not isinstance(text, str):
            raise TokenError(f"a join token is text, not {type(text).__name__}")
        text = text.strip()
        if len(text) > MAX_TOKEN_CHARS:
            raise TokenError(f"not a join token: longer than {MAX_TOKEN_CHARS} characters")
        if not text.startswith(PREFIX):
            if re.match(r"evs[0-9]+\.", text):
                version = text.split(".", 1)[0]
                raise TokenError(
                    f"unsupported join token version {version!r}: this server reads "
                    f"{PREFIX[:-1]!r} tokens"
                )
            raise TokenError(f"not a join token: it must start with {PREFIX!r}")
        body = text[len(PREFIX) :]
        if not _BASE64URL.fullmatch(body) or len(body) % 4 == 1:
            raise TokenError("not a join token: the text after 'evs1.' is not base64url")
        try:
            data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise TokenError("not a join token: the text after 'evs1.' is not base64url") from None
        try:
            document = json.loads(
                data.decode("utf-8"),
                object_pairs_hook=_no_duplicates,
                parse_constant=_no_constant,
            )
        except UnicodeDecodeError:
            raise TokenError("damaged join token: its content is not UTF-8") from None
        except TokenError:
            raise
        except (ValueError, RecursionError):  # JSONDecodeError, huge numbers, deep nesting
            raise TokenError("damaged join token: its content is not JSON") from None
        if not isinstance(document, dict):
            raise TokenError("damaged join token: its content is not a JSON object")
        missing = [f"{key!r} ({name})" for key, name in _FIELDS.items() if key not in document]
        if missing:
            raise TokenError(f"damaged join token: missing {', '.join(missing)}")
        unknown = sorted(set(document) - set(_FIELDS))
        if unknown:
            raise TokenError(f"damaged join token: unknown fields {', '.join(map(repr, unknown))}")
        addresses = document["a"]
        if not isinstance(addresses, list):
            raise TokenError("the token's addresses must be a list")
        return cls(
            cluster_id=document["c"],
            addresses=tuple(addresses),
            ca_fingerprint=document["f"],
            token_id=document["t"],
            secret=document["s"],
            expires=document["e"],
        )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise TokenError(f"damaged join token: field {key!r} appears twice")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise TokenError(f"damaged join token: {name} is not a valid value")


def hash_token_secret(secret: str) -> str:
    """What a TokenRecord keeps of a secret: SHA-256, lowercase hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@attrs.frozen
class TokenRecord:
    """What the minting member stores (replicated table ``join_tokens``)."""

    token_id: str
    secret_hash: str
    expires: int
    used: bool = False

    def mark_used(self) -> TokenRecord:
        """The record to store once the token has admitted a server."""
        return attrs.evolve(self, used=True)


def mint_token(
    identity: ClusterIdentity,
    addresses: Iterable[str],
    now: Now,
    lifetime: int = DEFAULT_LIFETIME,
) -> tuple[JoinToken, TokenRecord]:
    """A new single-use token for ``identity``'s cluster and the record to store.

    ``addresses`` ("host:port") are the peer addresses a new server may
    contact; ``lifetime`` is in seconds.  TokenError if either is invalid.
    """
    if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime <= 0:
        raise TokenError(f"token lifetime must be a positive number of seconds, not {lifetime!r}")
    token = JoinToken(
        cluster_id=identity.cluster_id,
        addresses=tuple(addresses),
        ca_fingerprint=identity.fingerprint(),
        token_id=secrets.token_hex(8),
        secret=secrets.token_urlsafe(32),
        expires=int(unix_seconds(now)) + lifetime,
    )
    record = TokenRecord(token.token_id, hash_token_secret(token.secret), token.expires)
    return token, record


def check_token(record: TokenRecord | None, token_id: str, secret: str, now: Now) -> None:
    """Raise TokenError unless ``secret`` redeems ``record`` for ``token_id`` at ``now``.

    ``record`` is what the store holds for ``token_id`` (None if nothing).
    The secret is checked first (in constant time), so only its holder
    learns whether a token expired or was used.  On success the caller
    stores ``record.mark_used()``.
    """
    if record is None or not isinstance(token_id, str) or record.token_id != token_id:
        raise TokenError("unknown token")
    given = hash_token_secret(secret) if isinstance(secret, str) else ""
    if not hmac.compare_digest(given.encode("ascii"), record.secret_hash.encode("ascii")):
        raise TokenError("wrong secret")
    if unix_seconds(now) >= record.expires:
        raise TokenError("token expired")
    if record.used:
        raise TokenError("token already used")
