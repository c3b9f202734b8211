"""Password hashing with scrypt (standard library only).

Stored format, self-describing so parameters can be raised later without
invalidating existing hashes::

    scrypt$n=16384,r=8,p=1$<salt, urlsafe base64>$<key, urlsafe base64>

``verify_password`` costs tens of milliseconds of CPU on purpose: call it in a
thread (``deferToThread``) from the reactor.  Both functions are pure: no I/O,
no shared state.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

SCHEME = "scrypt"
DEFAULT_N = 2**14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
MAX_PASSWORD_CHARS = 1024

# Bounds accepted when verifying, so a corrupt or hostile stored hash cannot
# make verification take unbounded memory or time.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # scrypt needs about 128 * r * n bytes; allow that plus slack.
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length
    )


def check_password(password: str) -> None:
    """Raise ValueError unless ``password`` is acceptable to store."""
    if not isinstance(password, str):
        raise ValueError("password must be text")
    if not password:
        raise ValueError("password must not be empty")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"password is longer than {MAX_PASSWORD_CHARS} characters")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("password is not valid Unicode text") from None


def hash_password(
    password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """Hash ``password`` with a fresh random salt; raise ValueError if unacceptable."""
    check_password(password)
    if n < 2 or n & (n - 1) or n > _MAX_N or not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
        raise ValueError("scrypt parameters out of range")
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password, salt, n, r, p, KEY_BYTES)
    return f"{SCHEME}$n={n},r={r},p={p}${_b64(salt)}${_b64(key)}"


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        return None
    try:
        params = dict(item.split("=", 1) for item in parts[1].split(","))
        if set(params) != {"n", "r", "p"}:
            return None
        n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
        salt, key = _unb64(parts[2]), _unb64(parts[3])
    except (ValueError, binascii.Error):
        return None
    if n < 2 or n & (n - 1) or n > _MAX_N or not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
        return None
    if not salt or not 16 <= len(key) <= 64:
        return None
    return n, r, p, salt, key


def verify_password(stored: str, password: str) -> bool:
    """True if ``password`` matches ``stored``; False for a wrong or malformed one.

    The comparison is constant-time.  A malformed ``stored`` value never
    matches (it is not an error: the caller answers "wrong password").
    """
    parsed = _parse(stored) if isinstance(stored, str) else None
    if parsed is None or not isinstance(password, str):
        return False
    n, r, p, salt, key = parsed
    try:
        candidate = _scrypt(password, salt, n, r, p, len(key))
    except (UnicodeEncodeError, ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, key)
