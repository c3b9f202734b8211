"""Admin sessions, CSRF tokens and login rate limiting (in memory, sans-IO).

Sessions live in this server's memory only: a restart logs everybody out,
and each server of a future cluster has its own.  A session id is 32 random
bytes (url-safe base64 in the cookie); each session carries its own CSRF
token.  Sessions expire after ``idle_timeout`` seconds without a request and
after ``max_age`` seconds in any case.  Time comes from an injected clock.

A session remembers a fingerprint of its account's password hash: when the
password changes (here or, later, on another server) or the account loses
its admin role or is deleted, :meth:`SessionTable.lookup`'s caller drops it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict, deque

import attrs
from twisted.internet.interfaces import IReactorTime

SESSION_COOKIE = "__Host-evadmin"
LOGIN_COOKIE = "__Host-evlogin"  # double-submit CSRF token of the login form
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"

DEFAULT_IDLE_TIMEOUT = 30 * 60.0
DEFAULT_MAX_AGE = 12 * 3600.0
DEFAULT_MAX_SESSIONS = 1000


def new_token() -> str:
    """32 random bytes, url-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def tokens_equal(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens; None or empty never matches."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def fingerprint(password_hash: str) -> str:
    """A short digest of a stored password hash (the hash itself stays in the store)."""
    return hashlib.sha256(password_hash.encode("utf-8")).hexdigest()[:32]


@attrs.define
class Session:
    id: str = attrs.field(repr=False)
    account: str
    csrf_token: str = attrs.field(repr=False)
    password_fingerprint: str = attrs.field(repr=False)
    client: str
    created: float
    last_seen: float
    #: One-shot messages shown on the next page ("Domain 'x' created.").
    flashes: list[str] = attrs.Factory(list)

    def pop_flashes(self) -> list[str]:
        flashes, self.flashes = self.flashes, []
        return flashes


class SessionTable:
    """The server-side session table, most recently used last."""

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_age: float = DEFAULT_MAX_AGE,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _expired(self, session: Session, now: float) -> bool:
        return (now - session.last_seen > self.idle_timeout
                or now - session.created > self.max_age)

    def prune(self) -> None:
        """Forget expired sessions."""
        now = self.clock.seconds()
        for sid in [sid for sid, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[sid]

    def create(self, account: str, password_hash: str, client: str) -> Session:
        """A new session; the least recently used goes if the table is full."""
        self.prune()
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        now = self.clock.seconds()
        session = Session(
            id=new_token(),
            account=account,
            csrf_token=new_token(),
            password_fingerprint=fingerprint(password_hash),
            client=client,
            created=now,
            last_seen=now,
        )
        self._sessions[session.id] = session
        return session

    def lookup(self, session_id: str | None) -> Session | None:
        """The live session with that id (its idle timer restarts), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock.seconds()
        if self._expired(session, now):
            del self._sessions[session_id]
            return None
        session.last_seen = now
        self._sessions.move_to_end(session_id)
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def end_account(self, account: str, keep: str | None = None) -> int:
        """End every session of ``account`` except ``keep``; return how many ended."""
        ids = [sid for sid, s in self._sessions.items() if s.account == account and sid != keep]
        for sid in ids:
            del self._sessions[sid]
        return len(ids)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())


@attrs.frozen
class Refusal:
    """Why a login attempt is refused before its password is even checked."""

    message: str
    retry_after: int  # whole seconds


class LoginLimiter:
    """At most ``max_failures`` failed logins per ``window`` seconds per address and per name.

    Memory is bounded: at most ``max_keys`` addresses and names are tracked
    (the oldest are forgotten first).
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_failures: int = 5,
        window: float = 60.0,
        max_keys: int = 10000,
    ) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and now - times[0] >= self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def check(self, address: str, name: str) -> Refusal | None:
        """A Refusal if this address or this account name is locked out now."""
        now = self.clock.seconds()
        for key, what in (
            (("address", address), "from your address"),
            (("name", name.casefold()), "for this account name"),
        ):
            times = self._recent(key, now)
            if times is not None and len(times) >= self.max_failures:
                retry = max(1, int(times[0] + self.window - now + 0.999))
                return Refusal(
                    f"Too many failed logins {what}: try again in {retry} seconds.", retry
                )
        return None

    def failed(self, address: str, name: str) -> None:
        now = self.clock.seconds()
        for key in (("address", address), ("name", name.casefold())):
            times = self._recent(key, now)
            if times is None:
                times = self._failures[key] = deque(maxlen=self.max_failures)
            times.append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)
