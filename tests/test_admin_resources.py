"""The admin site in process: sessions, CSRF, rate limiting, validation, escaping, audit.

Requests are raw HTTP bytes fed to the real ``Site`` (``make_admin_site``)
over a StringTransport, so every header, cookie and body is under the test's
control; password hashing and checking run synchronously (injected
``defer_to_thread``) with cheap scrypt parameters; time is a ``Clock``.

The running server is a :class:`FakeHost`: ``check_cluster()`` finds the
identity that enabling wrote to the data directory (really written, by
``evserver.cluster.provision.enable``) and makes a :class:`FakeCluster` of it,
whose members, states, measurements and loads each test sets.
"""

from __future__ import annotations

import json
import re
import time
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim

from evserver import __version__, tls
from evserver.admin import ReloadingTLSOptions, make_admin_site
from evserver.admin.auth import LOGIN_COOKIE, SESSION_COOKIE
from evserver.admin.msr import connected_encoder_json, connected_viewer_json
from evserver.admin.site import AdminSite
from evserver.admin.web import MAX_BODY_BYTES
from evserver.cluster.ca import ClusterIdentity, create_cluster, load_identity
from evserver.cluster.join import load_tokens
from evserver.cluster.probes import PeerProbes, local_connections
from evserver.cluster.service import ClusterService, MemberRecord
from evserver.cluster.tokens import JoinToken, check_token
from evserver.config import ServerConfig
from evserver.passwords import hash_password
from evserver.state.bandwidth import Measurement
from evserver.state.directory import Location
from evserver.state.hlc import Stamp
from evserver.state.membership import PeerState, PeerView
from evserver.state.relay import Limits, RelayCore
from evserver.state.replica import Update
from evserver.store import Store
from evserver.wire import messages as wire_messages
from evserver.wire import peer as p
from evserver.wire.framing import ProtocolName
from evserver.wire.messages import EncoderState

T0 = 1_700_000_000.0
ADMIN_PASSWORD = "correct horse battery"


def fast_hash(password: str) -> str:
    return hash_password(password, n=16, r=1, p=1)


def sync_thread(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args, **kwargs)


# -- a raw HTTP client -----------------------------------------------------------


@attrs.define
class Reply:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        assert (self.header("content-type") or "").startswith("application/json"), self
        return json.loads(self.body)

    @property
    def location(self) -> str | None:
        return self.header("location")


def parse_response(raw: bytes) -> Reply:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if "chunked" in headers.get("transfer-encoding", []):
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
    else:
        length = int(headers.get("content-length", ["0"])[0])
        body = rest[:length]
    return Reply(status, headers, body)


class Client:
    """A cookie-keeping HTTP/1.1 client talking to a Site through a StringTransport."""

    def __init__(self, site: Any, address: str = "192.0.2.10") -> None:
        self.site = site
        self.address = address
        self.cookies: dict[str, str] = {}
        self.csrf: str | None = None

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None, cookies: bool = True,
                meanwhile: Any = None) -> Reply:
        """``meanwhile()``, if given, runs after the request is sent and before the
        response is read (a page waiting for a peer's answer: advance the clock)."""
        peer = IPv4Address("TCP", self.address, 50000)
        protocol = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer,
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 9443))
        protocol.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1", "Host: admin.test:9443", "Connection: close"]
        all_headers = dict(headers or {})
        if cookies and self.cookies:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if body or method in ("POST", "PATCH", "DELETE", "PUT"):
            all_headers.setdefault("Content-Length", str(len(body)))
        lines += [f"{k}: {v}" for k, v in all_headers.items()]
        protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)
        if meanwhile is not None:
            meanwhile()
        reply = parse_response(transport.value())
        protocol.connectionLost(Failure(ConnectionError("done")))
        for cookie in reply.headers.get("set-cookie", []):
            name, _, rest = cookie.partition("=")
            value = rest.split(";")[0]
            if "max-age=0" in cookie.lower():
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return reply

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post_form(self, path: str, fields: dict[str, str] | None = None,
                  csrf: bool = True, **kw: Any) -> Reply:
        data = dict(fields or {})
        if csrf and self.csrf is not None:
            data.setdefault("csrf", self.csrf)
        body = urlencode(data).encode("ascii")
        return self.request("POST", path, body,
                            {"Content-Type": "application/x-www-form-urlencoded"}, **kw)

    def api(self, method: str, path: str, data: Any = None, csrf: bool = True,
            raw: bytes | None = None, content_type: str = "application/json",
            meanwhile: Any = None) -> Reply:
        headers = {}
        if csrf and self.csrf is not None:
            headers["X-CSRF-Token"] = self.csrf
        body = raw if raw is not None else (b"" if data is None else json.dumps(data).encode())
        if body or method != "GET":
            headers["Content-Type"] = content_type
        return self.request(method, path, body, headers, meanwhile=meanwhile)

    def login(self, name: str = "root", password: str = ADMIN_PASSWORD,
              next_path: str | None = None) -> Reply:
        page = self.get("/login" + (f"?next={quote(next_path)}" if next_path else ""))
        token = hidden(page.text, "csrf")
        fields = {"csrf": token, "name": name, "password": password}
        if next_path:
            fields["next"] = hidden(page.text, "next")
        reply = self.post_form("/login", fields, csrf=False)
        if reply.status == 303 and SESSION_COOKIE in self.cookies:
            self.csrf = self.api("GET", "/api/session").json()["csrf_token"]
        return reply


def hidden(html: str, name: str) -> str:
    match = re.search(rf'<input type="hidden" name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden {name} field in {html[:500]}"
    return unescape(match.group(1))


# -- fixtures ----------------------------------------------------------------------


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.closed: list[Any] = []

    def send(self, msg: Any) -> None:
        self.sent.append(msg)

    def close_with_error(self, code: Any, message: str) -> None:
        self.closed.append((code, message))


class FakeSink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def stalled(self) -> None:
        pass


@attrs.define
class FakeMembership:
    """The part of ``Membership`` the admin site reads."""

    views: dict[str, PeerView] = attrs.Factory(dict)
    warned: dict[str, list[str]] = attrs.Factory(dict)

    def view(self) -> dict[str, PeerView]:
        return dict(sorted(self.views.items()))

    def warnings(self, server_id: str) -> list[str]:
        return list(self.warned.get(server_id, []))

    def __contains__(self, server_id: object) -> bool:
        return server_id in self.views


class FakeCluster:
    """A ClusterService's attributes as the admin site reads them, with a real identity."""

    def __init__(self, identity: ClusterIdentity, config: ServerConfig) -> None:
        self.identity = identity
        self.cluster_id = identity.cluster_id
        self.server_id = identity.server_id
        self.data_dir = config.data_dir
        self.max_servers = config.max_servers
        self.address = p.ExternalAddress(
            config.external_host, config.external_encoder_port, config.external_viewer_port,
            config.external_relay_port, config.external_admin_port, config.external_host,
            config.external_peer_port)
        self.members: dict[str, MemberRecord] = {}
        self.connections: dict[str, object] = {}
        self.loads: dict[str, p.Load] = {}
        self.membership = FakeMembership()
        self.removed: list[str] = []

    def add(self, server_id: str, state: PeerState, host: str = "192.0.2.20",
            admin_port: int = 9443, rtt: float | None = None, offset: float | None = None,
            load: p.Load | None = None, warnings: tuple[str, ...] = ()) -> None:
        self.members[server_id] = MemberRecord(
            server_id, p.ExternalAddress(host, 5510, 5520, 5530, admin_port, host, 47100), 7)
        self.membership.views[server_id] = PeerView(state, 7, rtt, offset)
        self.membership.warned[server_id] = list(warnings)
        if state in (PeerState.ALIVE, PeerState.SUSPECT):
            self.connections[server_id] = object()
        if load is not None:
            self.loads[server_id] = load

    def remove_member(self, server_id: str, tell_peers: bool = True) -> bool:
        self.removed.append(server_id)
        del self.members[server_id]
        self.membership.views.pop(server_id, None)
        self.connections.pop(server_id, None)
        return True


class FakeHost:
    """The running server (RelayServerService) as the admin site uses it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.cluster: FakeCluster | None = None
        self.checks = 0

    def check_cluster(self) -> None:
        self.checks += 1
        if self.cluster is None:
            identity = load_identity(self.config.data_dir, self.config.server_id)
            if identity is not None:
                self.cluster = FakeCluster(identity, self.config)


@attrs.define
class World:
    clock: Clock
    store: Store
    core: RelayCore
    config: ServerConfig
    site: Any
    tmp: Path
    host: FakeHost

    @property
    def cluster(self) -> FakeCluster:
        assert self.host.cluster is not None, "multi-site resilience is not enabled"
        return self.host.cluster

    @property
    def admin(self) -> AdminSite:
        return self.site.admin  # type: ignore[no-any-return]

    def client(self, address: str = "192.0.2.10") -> Client:
        return Client(self.site, address)

    def logged_in(self, address: str = "192.0.2.10") -> Client:
        c = self.client(address)
        reply = c.login()
        assert reply.status == 303, reply
        return c

    def snapshot(self) -> tuple[Any, ...]:
        return (
            [(d.name, d.uid, d.pool) for d in self.store.list_domains()],
            [(a.name, a.domain, a.role, a.password_hash) for a in self.store.list_accounts()],
            [(e.encoder_id, e.name, e.domain, e.secret_hash, e.pool)
             for e in self.store.list_encoders()],
            [e.id for e in self.store.list_audit(1000)],
            self.store.list_pools(),
            self.store.server_weights(),
        )


def build_world(tmp: Path, **config: Any) -> World:
    clock = Clock()
    clock.advance(T0)
    store = Store(tmp / "evserver.sqlite3", clock=clock.seconds, password_hasher=fast_hash)
    core = RelayCore(clock, "srv-1", store, lambda: (), Limits())
    (tmp / "server-id").write_text("srv-1\n", encoding="ascii")
    cfg = ServerConfig(data_dir=tmp, server_id="srv-1", **config)
    host = FakeHost(cfg)
    site = make_admin_site(store, core, cfg, clock, T0 - 3725, service=host,
                           defer_to_thread=sync_thread, password_hasher=fast_hash)
    return World(clock, store, core, cfg, site, tmp, host)


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = build_world(tmp_path)
    w.store.add_domain("ops")
    w.store.add_account("ops", "root", ADMIN_PASSWORD, "admin")
    yield w
    w.store.close()


@pytest.fixture
def client(world: World) -> Client:
    return world.logged_in()


# -- every route needs a session and (to change anything) its CSRF token --------------

SAMPLES = {"servers": "srv-1", "domains": "ops", "accounts": "root", "encoders": "cam-1",
           "pools": "east"}


def route_paths(site: AdminSite, public: bool = False) -> list[tuple[str, str]]:
    out = []
    for route in site.routes:
        if route.public != public:
            continue
        parts, previous = [], ""
        for part in route.pattern:
            parts.append(SAMPLES.get(previous, "x") if part == "*" else part)
            previous = part
        out.append((route.method.decode(), "/" + "/".join(parts)))
    return out


def test_route_table_covers_the_pages_and_the_api(world: World) -> None:
    paths = route_paths(world.admin)
    assert len(paths) >= 40
    for expected in [("GET", "/"), ("GET", "/settings"), ("GET", "/servers/srv-1"),
                     ("GET", "/audit"), ("GET", "/api/servers"), ("POST", "/api/domains"),
                     ("DELETE", "/api/encoders/cam-1"), ("PATCH", "/api/accounts/root"),
                     ("GET", "/msr"), ("POST", "/msr/enable"), ("POST", "/msr/tokens"),
                     ("POST", "/msr/servers/srv-1/remove"), ("GET", "/api/servers/srv-1"),
                     ("DELETE", "/api/servers/srv-1"), ("GET", "/api/msr"),
                     ("POST", "/api/msr/enable"), ("POST", "/api/msr/tokens"),
                     ("GET", "/pools"), ("POST", "/pools"), ("GET", "/pools/east"),
                     ("POST", "/pools/east"), ("POST", "/pools/east/delete"),
                     ("POST", "/encoders/cam-1/pool"), ("POST", "/domains/ops/pool"),
                     ("POST", "/servers/srv-1/weight"), ("GET", "/api/pools"),
                     ("POST", "/api/pools"), ("GET", "/api/pools/east"),
                     ("PUT", "/api/pools/east"), ("POST", "/api/pools/east"),
                     ("DELETE", "/api/pools/east"), ("PATCH", "/api/domains/ops"),
                     ("PATCH", "/api/servers/srv-1")]:
        assert expected in paths
    assert sorted(route_paths(world.admin, public=True)) == [
        ("GET", "/favicon.ico"), ("GET", "/login"), ("GET", "/static/x"), ("POST", "/api/login"),
        ("POST", "/login")]


@pytest.mark.parametrize("cookie", [None, "forged-session-id", ""])
def test_every_page_and_api_call_refuses_without_a_session(world: World, cookie: str | None
                                                           ) -> None:
    c = world.client()
    if cookie is not None:
        c.cookies[SESSION_COOKIE] = cookie
    world.store.create_pool("east", ["srv-1"])
    world.store.add_encoder("ops", "cam-1")
    before = world.snapshot()
    for method, path in route_paths(world.admin):
        if path.startswith("/api/"):
            reply = c.api(method, path, {"name": "x"})
            assert reply.status == 401, (method, path)
            assert "login" in reply.json()["error"]
        else:
            reply = c.post_form(path, {"name": "x"}) if method == "POST" else c.get(path)
            assert reply.status == 303, (method, path)
            assert reply.location is not None and reply.location.startswith("/login")
            assert "<h1>" not in reply.text
    assert world.snapshot() == before


def test_unknown_paths_need_a_session_too(world: World) -> None:
    c = world.client()
    assert c.get("/no/such/page").status == 303
    assert c.api("GET", "/api/nothing").status == 401
    logged = world.logged_in()
    assert logged.get("/no/such/page").status == 404
    assert logged.api("GET", "/api/nothing").status == 404


def test_redirect_to_login_remembers_the_page(world: World) -> None:
    c = world.client()
    reply = c.get("/domains/ops")
    assert reply.location == "/login?next=/domains/ops"
    reply = c.login(next_path="/domains/ops")
    assert reply.status == 303 and reply.location == "/domains/ops"


@pytest.mark.parametrize("evil", ["//evil.example/", "https://evil.example/", "/\\evil",
                                  "javascript:alert(1)", "/ok\r\nSet-Cookie: x=1"])
def test_login_never_redirects_off_site(world: World, evil: str) -> None:
    c = world.client()
    page = c.get("/login")
    reply = c.post_form("/login", {"csrf": hidden(page.text, "csrf"), "name": "root",
                                   "password": ADMIN_PASSWORD, "next": evil}, csrf=False)
    assert reply.status == 303 and reply.location == "/"


#: Bodies that the routes would accept (with the token): {"name": "x"} for the others.
VALID_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/pools"): {"name": "x", "servers": ["srv-1"]},
    ("PUT", "/api/pools/east"): {"description": "changed"},
    ("POST", "/api/pools/east"): {"description": "changed"},
    ("PATCH", "/api/domains/ops"): {"pool": "west"},
    ("PATCH", "/api/encoders/cam-1"): {"pool": "west"},
    ("PATCH", "/api/servers/srv-1"): {"weight": 3},
}


@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_every_change_refuses_without_its_csrf_token(world: World, token: str | None) -> None:
    c = world.logged_in()
    world.store.add_encoder("ops", "cam-1")
    world.store.add_account("ops", "viewer1", "pw", "viewer")
    world.store.create_pool("east", ["srv-1"])
    world.store.create_pool("west", ["srv-1"])
    good = c.csrf
    before = world.snapshot()
    for method, path in route_paths(world.admin):
        if method == "GET":
            continue
        c.csrf = token
        if path.startswith("/api/"):
            body = VALID_BODIES.get((method, path), {"name": "x"})
            reply = c.api(method, path, body, csrf=token is not None)
            assert reply.status == 403, (method, path, reply)
            assert "CSRF" in reply.json()["error"]
        else:
            reply = c.post_form(path, {"name": "x", "password": "p", "role": "viewer",
                                       "pool": "west", "servers": "srv-1",
                                       "description": "changed", "weight": "3"},
                                csrf=token is not None)
            assert reply.status == 403, (method, path)
            assert "CSRF token" in reply.text
    assert world.snapshot() == before
    c.csrf = good
    assert c.get("/").status == 200  # the session itself is still good


def test_two_login_tabs_share_one_token(world: World) -> None:
    c = world.client()
    first = hidden(c.get("/login").text, "csrf")
    second = hidden(c.get("/login?next=/favicon.ico").text, "csrf")
    assert first == second
    reply = c.post_form("/login", {"csrf": first, "name": "root", "password": ADMIN_PASSWORD},
                        csrf=False)
    assert reply.status == 303
    assert hidden(world.client().get("/login").text, "csrf") != first


def test_login_form_needs_its_own_token(world: World) -> None:
    c = world.client()
    c.get("/login")
    reply = c.post_form("/login", {"name": "root", "password": ADMIN_PASSWORD}, csrf=False)
    assert reply.status == 403 and "expired" in reply.text
    reply = c.post_form("/login", {"csrf": "guess", "name": "root",
                                   "password": ADMIN_PASSWORD}, csrf=False)
    assert reply.status == 403
    assert SESSION_COOKIE not in c.cookies


# -- login, cookies, logout, expiry ---------------------------------------------------


def test_login_sets_a_strict_secure_session_cookie(world: World) -> None:
    c = world.client()
    page = c.get("/login")
    login_cookie = next(h for h in page.headers["set-cookie"] if h.startswith(LOGIN_COOKIE))
    assert "Secure" in login_cookie and "HttpOnly" in login_cookie
    reply = c.post_form("/login", {"csrf": hidden(page.text, "csrf"), "name": "root",
                                   "password": ADMIN_PASSWORD}, csrf=False)
    assert reply.status == 303 and reply.location == "/"
    cookie = next(h for h in reply.headers["set-cookie"] if h.startswith(SESSION_COOKIE + "="))
    attributes = [a.strip() for a in cookie.split(";")]
    assert {"Secure", "HttpOnly", "SameSite=strict", "Path=/"} <= set(attributes)
    assert not any(a.lower().startswith("domain") for a in attributes)
    session_id = attributes[0].split("=", 1)[1]
    assert len(session_id) == 43  # 32 random bytes, url-safe base64
    assert c.get("/").status == 200
    assert world.store.list_audit()[0].action == "login"


def test_session_ids_and_csrf_tokens_are_unique(world: World) -> None:
    clients = [world.logged_in() for _ in range(5)]
    ids = {c.cookies[SESSION_COOKIE] for c in clients}
    tokens = {c.csrf for c in clients}
    assert len(ids) == len(tokens) == 5


@pytest.mark.parametrize(("name", "password", "status", "message"), [
    ("root", "wrong", 401, "Wrong account name or password."),
    ("nobody", ADMIN_PASSWORD, 401, "Wrong account name or password."),
    ("", ADMIN_PASSWORD, 400, "Give an account name and a password."),
    ("viewer1", "viewer-pw", 403, "is not an administrator"),
])
def test_refused_logins(world: World, name: str, password: str, status: int,
                        message: str) -> None:
    world.store.add_account("ops", "viewer1", "viewer-pw", "viewer")
    c = world.client()
    reply = c.login(name, password)
    assert reply.status == status
    assert message in unescape(reply.text)
    assert SESSION_COOKIE not in c.cookies
    assert c.get("/").status == 303


def test_logout_ends_the_session(world: World) -> None:
    c = world.logged_in()
    stolen = c.cookies[SESSION_COOKIE]
    reply = c.post_form("/logout")
    assert reply.status == 303 and reply.location == "/login?bye=1"
    assert SESSION_COOKIE not in c.cookies
    assert "You are logged out." in c.get("/login?bye=1").text
    c.cookies[SESSION_COOKIE] = stolen
    assert c.get("/").status == 303
    assert [e.action for e in world.store.list_audit()][:2] == ["logout", "login"]


def test_api_login_session_and_logout(world: World) -> None:
    c = world.client()
    reply = c.api("POST", "/api/login", {"name": "root", "password": ADMIN_PASSWORD})
    assert reply.status == 200
    c.csrf = reply.json()["csrf_token"]
    session = c.api("GET", "/api/session").json()
    assert session["account"] == "root" and session["csrf_token"] == c.csrf
    assert c.api("POST", "/api/logout").status == 200
    assert c.api("GET", "/api/session").status == 401


def test_api_login_needs_json(world: World) -> None:
    c = world.client()
    reply = c.api("POST", "/api/login", raw=b"name=root&password=x",
                  content_type="application/x-www-form-urlencoded")
    assert reply.status == 415
    reply = c.api("POST", "/api/login", {"name": "root"})
    assert reply.status == 400 and reply.json()["field"] == "password"


def test_idle_sessions_expire(world: World) -> None:
    c = world.logged_in()
    idle = world.admin.sessions.idle_timeout
    world.clock.advance(idle - 1)
    assert c.get("/").status == 200  # activity restarts the idle timer
    world.clock.advance(idle - 1)
    assert c.get("/").status == 200
    world.clock.advance(idle + 1)
    assert c.get("/").status == 303
    assert c.api("GET", "/api/server").status == 401
    assert len(world.admin.sessions) == 0


def test_sessions_end_after_their_maximum_age_even_when_busy(world: World) -> None:
    c = world.logged_in()
    sessions = world.admin.sessions
    steps = int(sessions.max_age // (sessions.idle_timeout / 2)) + 1
    for _ in range(steps):
        world.clock.advance(sessions.idle_timeout / 2)
        c.get("/api/server")
    assert c.get("/").status == 303


def test_session_ends_when_its_account_changes_behind_its_back(world: World) -> None:
    world.store.add_account("ops", "second", "pw-second", "admin")
    c1 = world.logged_in()
    c2 = world.client("192.0.2.11")
    assert c2.login("second", "pw-second").status == 303
    world.store.set_password("root", "changed elsewhere")
    assert c1.get("/").status == 303
    world.store.set_role("second", "viewer")
    assert c2.get("/").status == 303


# -- rate limiting --------------------------------------------------------------------


def test_five_failures_per_minute_lock_out_the_address(world: World) -> None:
    c = world.client("198.51.100.7")
    for i in range(5):
        assert c.login(f"guess{i}", "nope").status == 401
    reply = c.login("root", ADMIN_PASSWORD)  # even the right password
    assert reply.status == 429
    assert "Too many failed logins from your address" in reply.text
    assert int(reply.header("retry-after") or 0) > 0
    assert SESSION_COOKIE not in c.cookies
    # Another address is not affected.
    assert world.client("198.51.100.8").login().status == 303
    world.clock.advance(60)
    assert c.login().status == 303


def test_five_failures_per_minute_lock_out_the_account_name(world: World) -> None:
    for i in range(5):
        assert world.client(f"203.0.113.{i}").login("root", "nope").status == 401
    reply = world.client("203.0.113.99").login("ROOT", ADMIN_PASSWORD)
    assert reply.status == 429 and "for this account name" in reply.text
    api = world.client("203.0.113.98").api(
        "POST", "/api/login", {"name": "root", "password": ADMIN_PASSWORD})
    assert api.status == 429 and api.json()["retry_after"] > 0
    world.clock.advance(61)
    assert world.client("203.0.113.99").login().status == 303


def test_limiter_memory_is_bounded(world: World) -> None:
    limiter = world.admin.limiter
    limiter.max_keys = 50
    for i in range(200):
        limiter.failed(f"10.0.{i // 256}.{i % 256}", f"name{i}")
    assert len(limiter._failures) <= 50


# -- pages ----------------------------------------------------------------------------


def test_homepage_shows_this_servers_state(world: World, client: Client) -> None:
    world.core.encoder_connected("cam-1", "Cam", "ops", FakeLink())
    page = client.get("/").text
    for text in ("srv-1", __version__, "1 h 2 min", "127.0.0.1", "tcp:5510", "tcp:9443",
                 'data-live-key="load.encoders_online">1<',
                 "The external address is 127.0.0.1"):
        assert text in page, text
    foot = page.split("<footer>")[1]
    assert '<a href="/settings">All server settings</a>' in foot


def test_homepage_warns_when_tls_is_off_and_no_admin_exists(tmp_path: Path) -> None:
    w = build_world(tmp_path, tls=False, external_host="relay.example.net")
    view = w.admin.view
    warnings = view.warnings()
    assert any("TLS is disabled" in x for x in warnings)
    assert any("No administrator account" in x for x in warnings)
    assert not any("external address" in x for x in warnings)


def test_login_page_explains_the_first_admin_account(tmp_path: Path) -> None:
    w = build_world(tmp_path)
    page = unescape(w.client().get("/login").text)
    assert "No administrator account exists yet." in page
    assert f"evserver-ctl --data {tmp_path} account add --admin --domain DOMAIN NAME" in page
    w.store.add_domain("ops")
    w.store.add_account("ops", "root", ADMIN_PASSWORD, "admin")
    assert "No administrator account" not in w.client().get("/login").text


def test_settings_page_lists_every_setting_and_says_standalone(world: World,
                                                               client: Client) -> None:
    page = client.get("/settings").text
    for field in attrs.fields(ServerConfig):
        assert f"<code>{field.name}</code>" in page
    section = page.split('id="multi-site"')[1]
    assert "This server is standalone: multi-site resilience is not enabled." in section
    assert '<a href="/msr" class="button-link">Multi-site resilience</a>' in section
    assert "<button" not in section


def test_settings_page_never_shows_the_join_token(tmp_path: Path) -> None:
    w = build_world(tmp_path, join_token="evs1.the-secret-part", join_address="192.0.2.1:47100")
    w.store.add_domain("ops")
    w.store.add_account("ops", "root", ADMIN_PASSWORD, "admin")
    page = w.logged_in().get("/settings").text
    assert "<code>join_token</code>" in page and "given (not shown)" in page
    assert "the-secret-part" not in page
    assert "Peer connections (multi-site resilience): listening endpoint" in page
    assert "192.0.2.1:47100" in page
    w.store.close()


def test_settings_page_shows_the_certificate(world: World, client: Client) -> None:
    _cert_path, _ = tls.ensure_server_certificate(world.tmp, ["localhost"])
    page = client.get("/settings").text
    assert "SHA-256 fingerprint" in page and "localhost" in page and "self-signed" in page


def connect_encoder_and_viewer(world: World) -> None:
    world.store.add_encoder("ops", "cam-1", "Front door")
    world.store.add_encoder("ops", "cam-2")
    session = world.core.encoder_connected("cam-1", "Front door", "ops", FakeLink())
    viewer = world.core.viewer_connected("alice", "ops", FakeLink())
    viewer.attach_relay(object(), FakeSink())
    viewer.watch(1, "cam-1")
    session.media(True, b"k" * 1000)
    session.media(False, b"d" * 500)


def test_this_server_page_lists_connected_encoders_and_viewers(world: World,
                                                               client: Client) -> None:
    connect_encoder_and_viewer(world)
    page = client.get("/servers/srv-1").text
    assert '<a href="/encoders/cam-1">cam-1</a>' in page
    assert "Front door" in page and "streaming" in page and "1.5 KiB" in page
    assert '<a href="/accounts/alice">alice</a>' in page
    assert "cam-2" not in page  # offline: not connected here
    assert client.get("/servers/other").status == 404


def test_api_reports_server_load_encoders_and_viewers(world: World, client: Client) -> None:
    connect_encoder_and_viewer(world)
    server = client.api("GET", "/api/server").json()
    assert server["server_id"] == "srv-1" and server["version"] == __version__
    assert server["load"] == {"encoders_online": 1, "encoders_streaming": 1, "viewers": 1,
                              "channels": 1}
    assert server["uptime"] == pytest.approx(3725)
    assert server["cluster"] == {"enabled": False, "servers": 1, "cluster_id": None}
    servers = client.api("GET", "/api/servers").json()["servers"]
    assert [(s["server_id"], s["state"], s["address"]) for s in servers] == [
        ("srv-1", "alive", "127.0.0.1")]
    encoders = {e["encoder_id"]: e for e in client.api("GET", "/api/encoders").json()["encoders"]}
    assert encoders["cam-1"]["state"] == "streaming"
    assert encoders["cam-1"]["frames_in"] == 2 and encoders["cam-1"]["bytes_in"] == 1500
    assert encoders["cam-1"]["server_id"] == "srv-1" and encoders["cam-1"]["viewers"] == 1
    assert encoders["cam-2"]["state"] == "offline" and encoders["cam-2"]["server_id"] is None
    connected = client.api("GET", "/api/encoders?connected=1").json()["encoders"]
    assert [e["encoder_id"] for e in connected] == ["cam-1"]
    viewers = client.api("GET", "/api/viewers").json()["viewers"]
    assert viewers[0]["account"] == "alice" and viewers[0]["watching"] == ["cam-1"]
    assert viewers[0]["frames_out"] >= 1
    assert client.api("GET", "/api/encoders/cam-1").json()["encoder"]["state"] == "streaming"
    assert client.api("GET", "/api/encoders/nope").status == 404


def test_pages_render_for_every_record(world: World, client: Client) -> None:
    world.store.add_encoder("ops", "cam-1", "Front door")
    for path in ("/", "/settings", "/servers/srv-1", "/msr", "/domains", "/domains/ops",
                 "/accounts", "/accounts/root", "/encoders", "/encoders/cam-1", "/audit"):
        reply = client.get(path)
        assert reply.status == 200, path
        assert reply.header("content-type") == "text/html; charset=utf-8"
        assert reply.text.startswith("<!DOCTYPE html>")
        assert "<h1>" in reply.text
    for path in ("/domains/none", "/accounts/none", "/encoders/none"):
        assert client.get(path).status == 404


def test_every_response_carries_the_security_headers(world: World, client: Client) -> None:
    for reply in (client.get("/"), client.api("GET", "/api/server"), world.client().get("/"),
                  world.client().get("/login")):
        csp = reply.header("content-security-policy") or ""
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert reply.header("x-content-type-options") == "nosniff"
        assert reply.header("cache-control") == "no-store"
        assert reply.header("strict-transport-security") is None


def test_static_files_need_no_login(world: World) -> None:
    c = world.client()
    css = c.get("/static/style.css")
    assert css.status == 200 and css.header("content-type", ) == "text/css; charset=utf-8"
    js = c.get("/static/live.js")
    assert js.status == 200 and b"/api/" not in js.body[:0] and b"innerHTML =" not in js.body
    assert c.get("/static/../site.py").status in (303, 404)
    assert c.get("/static/secret.txt").status == 404


def test_wrong_method_is_405(client: Client) -> None:
    reply = client.api("PUT", "/api/domains", {"name": "x"})
    assert reply.status == 405 and reply.header("allow") == "GET, POST"


def test_oversized_and_malformed_bodies(world: World, client: Client) -> None:
    before = world.snapshot()
    big = json.dumps({"name": "x" * (MAX_BODY_BYTES + 10)}).encode()
    assert client.api("POST", "/api/domains", raw=big).status == 413
    assert client.api("POST", "/api/domains", raw=b"{not json").status == 400
    assert client.api("POST", "/api/domains", raw=b"[1, 2]").status == 400
    assert client.api("POST", "/api/domains", raw=b"\xff\xfe").status == 400
    reply = client.api("POST", "/api/domains", {"name": "x", "colour": "red"})
    assert reply.status == 400 and reply.json()["field"] == "colour"
    reply = client.request("POST", "/domains", b"csrf=" + client.csrf.encode() + b"&name=%ff",
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 400
    assert world.snapshot() == before


# -- changes through the pages -------------------------------------------------------


def test_domain_create_and_delete_through_the_pages(world: World, client: Client) -> None:
    reply = client.post_form("/domains", {"name": "west"})
    assert reply.status == 303 and reply.location == "/domains"
    page = client.get("/domains").text
    assert "Domain &#x27;west&#x27; created." in page or "Domain 'west' created." in page
    assert world.store.get_domain("west") is not None
    reply = client.post_form("/domains", {"name": "west"})
    assert reply.status == 409
    assert 'id="name-error"' in reply.text and "exists already" in reply.text
    reply = client.post_form("/domains/ops/delete")
    assert reply.status == 409 and "delete them first" in reply.text
    reply = client.post_form("/domains/west/delete")
    assert reply.status == 303 and world.store.get_domain("west") is None


def test_form_errors_appear_next_to_their_fields_and_keep_the_input(world: World,
                                                                    client: Client) -> None:
    reply = client.post_form("/accounts", {"name": " bad name ", "domain": "nowhere",
                                           "password": "", "role": "boss"})
    assert reply.status == 400
    page = reply.text
    for field, message in (("name", "leading or trailing spaces"),
                           ("domain", "no domain named"),
                           ("password", "must not be empty"),
                           ("role", "is invalid")):
        block = page.split(f'id="f-{field}"')[1].split('class="field')[0]
        assert f'id="{field}-error"' in block, field
        assert message in unescape(block), field
    assert 'value=" bad name "' in page
    assert world.store.get_account(" bad name ") is None


def test_account_create_edit_delete_through_the_pages(world: World, client: Client) -> None:
    reply = client.post_form("/accounts", {"name": "alice", "domain": "ops",
                                           "password": "alice-pw", "role": "viewer"})
    assert reply.status == 303
    assert world.store.get_account("alice").role == "viewer"  # type: ignore[union-attr]
    assert client.post_form("/accounts/alice/role", {"role": "admin"}).status == 303
    alice = world.client("192.0.2.50")
    assert alice.login("alice", "alice-pw").status == 303
    assert client.post_form("/accounts/alice/password", {"password": "new-pw"}).status == 303
    assert alice.get("/").status == 303  # her session ended with the old password
    assert world.client().login("alice", "new-pw").status == 303
    reply = client.post_form("/accounts/alice/password", {"password": ""})
    assert reply.status == 400 and 'id="password-error"' in reply.text
    assert client.post_form("/accounts/alice/delete").status == 303
    assert world.store.get_account("alice") is None
    assert client.post_form("/accounts/alice/delete").status == 404


def test_an_admin_cannot_lock_themselves_out(world: World, client: Client) -> None:
    reply = client.post_form("/accounts/root/delete")
    assert reply.status == 409 and "logged in with" in reply.text
    reply = client.post_form("/accounts/root/role", {"role": "viewer"})
    assert reply.status == 409 and "your own role" in reply.text
    world.store.add_account("ops", "other", "pw", "viewer")
    world.store.set_role("other", "admin")
    assert client.post_form("/accounts/other/role", {"role": "viewer"}).status == 303
    assert world.store.get_account("root").role == "admin"  # type: ignore[union-attr]


def test_last_admin_cannot_be_deleted_or_demoted_by_the_api(world: World) -> None:
    world.store.add_account("ops", "second", "pw-second", "admin")
    c = world.client()
    assert c.login("second", "pw-second").status == 303
    assert c.api("DELETE", "/api/accounts/root").status == 200
    world.store.add_account("ops", "third", "pw-third", "admin")
    c3 = world.client("192.0.2.3")
    assert c3.login("third", "pw-third").status == 303
    assert c3.api("PATCH", "/api/accounts/second", {"role": "viewer"}).status == 200
    world.store.delete_account("third")  # now "second" is viewer, nobody else admin...
    world.store.set_role("second", "admin")
    c2 = world.client("192.0.2.2")
    assert c2.login("second", "pw-second").status == 303
    reply = c2.api("DELETE", "/api/accounts/second")
    assert reply.status == 409


def test_encoder_secret_is_shown_once(world: World, client: Client) -> None:
    reply = client.post_form("/encoders", {"encoder_id": "cam-9", "name": "", "domain": "ops"})
    assert reply.status == 200
    secret = re.search(r'<code class="secret" id="secret">([^<]+)</code>', reply.text)
    assert secret is not None
    assert world.store.verify_encoder("cam-9", unescape(secret.group(1))) is not None
    assert world.store.get_encoder("cam-9").name == "cam-9"  # type: ignore[union-attr]
    assert secret.group(1) not in client.get("/encoders/cam-9").text
    assert secret.group(1) not in client.get("/encoders").text
    reply = client.post_form("/encoders/cam-9/secret")
    fresh = re.search(r'<code class="secret" id="secret">([^<]+)</code>', reply.text)
    assert fresh is not None and fresh.group(1) != secret.group(1)
    assert world.store.verify_encoder("cam-9", unescape(secret.group(1))) is None
    assert world.store.verify_encoder("cam-9", unescape(fresh.group(1))) is not None


def test_encoder_rename_and_delete_through_the_pages(world: World, client: Client) -> None:
    world.store.add_encoder("ops", "cam-1")
    assert client.post_form("/encoders/cam-1/name", {"name": "Gate"}).status == 303
    assert world.store.get_encoder("cam-1").name == "Gate"  # type: ignore[union-attr]
    reply = client.post_form("/encoders/cam-1/name", {"name": "x" * 65})
    assert reply.status == 400 and 'id="name-error"' in reply.text
    assert 'value="' + "x" * 65 + '"' in reply.text
    assert client.post_form("/encoders/cam-1/delete").status == 303
    assert world.store.get_encoder("cam-1") is None


# -- escaping -------------------------------------------------------------------------

class Markup(HTMLParser):
    """What a browser would build: elements with attributes, and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, [(k, v or "") for k, v in attrs]))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    @classmethod
    def parse(cls, html: str) -> Markup:
        parser = cls()
        parser.feed(html)
        parser.close()
        return parser


OUR_TAGS = {"html", "head", "meta", "title", "link", "script", "body", "header", "div", "a",
            "span", "code", "nav", "ul", "li", "form", "input", "button", "main", "h1", "h2",
            "p", "section", "dl", "dt", "dd", "table", "thead", "tbody", "tr", "th", "td",
            "footer", "label", "select", "option", "small", "strong", "pre", "caption",
            "template"}


def assert_inert(html: str, payload: str, shown: bool = True) -> None:
    """``payload`` made no element and no attribute: it is only text or an attribute value."""
    markup = Markup.parse(html)
    for tag, attributes in markup.tags:
        assert tag in OUR_TAGS, tag
        for name, _value in attributes:
            assert not name.startswith("on"), (tag, name)
            assert name in {"charset", "name", "content", "rel", "href", "src", "defer",
                            "lang", "class", "id", "method", "action", "type", "value",
                            "aria-label", "aria-current", "scope", "data-key", "data-format",
                            "data-link", "data-live-src", "data-live-key", "data-live-list",
                            "data-live-items", "data-empty", "data-confirm", "hidden", "for",
                            "required", "autocomplete", "selected", "role", "aria-invalid",
                            "aria-describedby", "data-template", "data-otherwise",
                            "data-live-format"}, (tag, name)
        if tag == "script":
            assert attributes == [("src", "/static/live.js"), ("defer", "defer")]
    if shown:
        assert payload in "".join(markup.text) or any(
            payload in v for _t, a in markup.tags for _k, v in a)


NASTY = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "' onmouseover='alert(1)",
    "&amp; </textarea><b>",
]


@pytest.mark.parametrize("nasty", NASTY)
def test_every_output_is_escaped(world: World, client: Client, nasty: str) -> None:
    assert client.api("POST", "/api/domains", {"name": nasty}).status == 201
    assert client.api("POST", "/api/accounts", {"name": nasty, "domain": nasty,
                                                "password": "pw"}).status == 201
    assert client.api("POST", "/api/encoders", {"encoder_id": "cam-x", "domain": nasty,
                                                "name": nasty}).status == 201
    world.core.encoder_connected("cam-x", nasty, nasty, FakeLink())
    world.core.viewer_connected(nasty, nasty, FakeLink())
    pages = ["/", "/domains", "/domains/" + quote(nasty, safe=""), "/accounts",
             "/accounts/" + quote(nasty, safe=""), "/encoders", "/encoders/cam-x",
             "/servers/srv-1", "/audit"]
    for path in pages:
        reply = client.get(path)
        assert reply.status == 200, path
        assert_inert(reply.text, nasty, shown=path != "/")
    # A failed form echoes the input, escaped, in an attribute.
    reply = client.post_form("/domains", {"name": nasty})
    assert reply.status == 409
    assert_inert(reply.text, nasty)
    assert any(v == nasty for _t, attrs_ in Markup.parse(reply.text).tags for _k, v in attrs_)
    # JSON carries the raw text (JSON escaping, served as application/json).
    names = [d["name"] for d in client.api("GET", "/api/domains").json()["domains"]]
    assert nasty in names


def test_the_script_domain_is_escaped_in_html(world: World, client: Client) -> None:
    assert client.post_form("/domains", {"name": "<script>alert(1)</script>"}).status == 303
    page = client.get("/domains").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)</script>" not in page
    assert_inert(page, "<script>alert(1)</script>")


# -- audit log ----------------------------------------------------------------------


def test_every_change_writes_an_audit_row(world: World, client: Client) -> None:
    steps = [
        (lambda: client.post_form("/domains", {"name": "d1"}), "domain.create", "d1"),
        (lambda: client.api("POST", "/api/domains", {"name": "d2"}), "domain.create", "d2"),
        (lambda: client.post_form("/accounts", {"name": "a1", "domain": "d1",
                                                "password": "pw", "role": "viewer"}),
         "account.create", "a1"),
        (lambda: client.api("PATCH", "/api/accounts/a1", {"password": "pw2"}),
         "account.password", "a1"),
        (lambda: client.post_form("/accounts/a1/role", {"role": "admin"}), "account.role", "a1"),
        (lambda: client.post_form("/encoders", {"encoder_id": "e1", "domain": "d1"}),
         "encoder.create", "e1"),
        (lambda: client.api("PATCH", "/api/encoders/e1", {"name": "E one"}),
         "encoder.rename", "e1"),
        (lambda: client.api("POST", "/api/encoders/e1/secret"), "encoder.secret", "e1"),
        (lambda: client.api("DELETE", "/api/encoders/e1"), "encoder.delete", "e1"),
        (lambda: client.api("DELETE", "/api/accounts/a1"), "account.delete", "a1"),
        (lambda: client.post_form("/domains/d1/delete"), "domain.delete", "d1"),
        (lambda: client.api("DELETE", "/api/domains/d2"), "domain.delete", "d2"),
    ]
    for step, action, target in steps:
        world.clock.advance(1)
        before = len(world.store.list_audit(1000))
        reply = step()
        assert reply.status in (200, 201, 303), (action, reply)
        entries = world.store.list_audit(1000)
        assert len(entries) == before + 1, action
        newest = entries[0]
        assert (newest.actor, newest.server_id, newest.action, newest.target) == (
            "root", "srv-1", action, target)
        assert newest.at == world.clock.seconds()
        assert "pw" not in newest.detail
    # Refused changes write nothing.
    before = len(world.store.list_audit(1000))
    assert client.api("POST", "/api/domains", {"name": ""}).status == 400
    assert client.post_form("/domains/ops/delete").status == 409
    assert len(world.store.list_audit(1000)) == before
    page = client.get("/audit").text
    assert "encoder.secret" in page and "srv-1" in page
    api = client.api("GET", "/api/audit?limit=3").json()["entries"]
    assert [e["action"] for e in api] == ["domain.delete", "domain.delete", "account.delete"]
    assert client.api("GET", "/api/audit?limit=0").status == 400
    assert client.api("GET", "/api/audit?limit=abc").status == 400


# -- Hypothesis: every input either lands or is refused with a message ---------------------

json_values = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=60, max_size=70),
    st.sampled_from(["", " ", "ops", "root", "a b", " x", "x ", "\t", "é", "-", "..", "a/b"]),
    st.integers(), st.none(), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)


#: Mostly acceptable values, so that the accepted path is exercised as much as the refusals.
good_names = st.one_of(
    st.text(st.characters(categories=("L", "N", "S")), min_size=1, max_size=64),
    st.from_regex(r"[A-Za-z0-9<>&'\"][A-Za-z0-9 <>&'\"._-]{0,30}[A-Za-z0-9._-]", fullmatch=True),
)
good_passwords = st.text(min_size=1, max_size=40)


def _api_case(world: World, client: Client, path: str, body: dict[str, Any],
              key: str, listed: Any) -> None:
    before = world.snapshot()
    reply = client.api("POST", path, body)
    event(f"status {reply.status}")
    assert reply.status in (201, 400, 404, 409), (body, reply)
    data = reply.json()
    if reply.status == 201:
        assert listed(data) in [x[key] for x in client.api("GET", path).json()[path[5:]]]
    else:
        assert isinstance(data["error"], str) and data["error"], data
        assert world.snapshot() == before, body


HYPOTHESIS = settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYPOTHESIS
@given(name=st.one_of(good_names, json_values))
def test_api_domains_validate_every_name(world: World, client: Client, name: Any) -> None:
    _api_case(world, client, "/api/domains", {"name": name}, "name",
              lambda d: d["domain"]["name"])


@HYPOTHESIS
@given(name=st.one_of(good_names, good_names, json_values),
       domain=st.one_of(st.just("ops"), st.just("ops"), json_values),
       password=st.one_of(good_passwords, good_passwords, json_values),
       role=st.one_of(st.sampled_from(["viewer", "admin"]), json_values))
def test_api_accounts_validate_every_field(world: World, client: Client, name: Any,
                                           domain: Any, password: Any, role: Any) -> None:
    _api_case(world, client, "/api/accounts",
              {"name": name, "domain": domain, "password": password, "role": role}, "name",
              lambda d: d["account"]["name"])


@HYPOTHESIS
@given(encoder_id=st.one_of(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
                            st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
                            json_values),
       domain=st.one_of(st.just("ops"), st.just("ops"), json_values),
       name=st.one_of(st.none(), good_names, json_values),
       secret=st.one_of(st.none(), st.none(), st.from_regex(r"[!-~]{16,40}", fullmatch=True),
                        st.text(min_size=10, max_size=40), json_values))
def test_api_encoders_validate_every_field(world: World, client: Client, encoder_id: Any,
                                           domain: Any, name: Any, secret: Any) -> None:
    body = {"encoder_id": encoder_id, "domain": domain}
    if name is not None:
        body["name"] = name
    if secret is not None:
        body["secret"] = secret
    before = world.snapshot()
    reply = client.api("POST", "/api/encoders", body)
    event(f"status {reply.status}")
    assert reply.status in (201, 400, 409), (body, reply)
    data = reply.json()
    if reply.status == 201:
        listed = client.api("GET", "/api/encoders").json()["encoders"]
        assert data["encoder"]["encoder_id"] in [e["encoder_id"] for e in listed]
        assert world.store.verify_encoder(encoder_id, data["secret"]) is not None
        assert "secret" not in json.dumps(listed)
    else:
        assert data["error"]
        assert world.snapshot() == before


@HYPOTHESIS
@given(path_name=st.text(min_size=1, max_size=20), body=st.dictionaries(
    st.sampled_from(["name", "password", "role", "other"]), json_values, max_size=3))
def test_api_edits_and_deletes_never_fail_badly(world: World, client: Client, path_name: str,
                                                body: dict[str, Any]) -> None:
    world.store.add_encoder("ops", "cam-1") if world.store.get_encoder("cam-1") is None else None
    segment = quote(path_name, safe="")
    for method, path, data in (
        ("PATCH", f"/api/accounts/{segment}", body),
        ("PATCH", "/api/accounts/root", body),
        ("PATCH", f"/api/encoders/{segment}", body),
        ("PATCH", "/api/encoders/cam-1", body),
        ("DELETE", f"/api/domains/{segment}", None),
        ("DELETE", f"/api/encoders/{segment}x", None),
        ("DELETE", f"/api/accounts/{segment}x", None),
    ):
        reply = client.api(method, path, data)
        assert reply.status in (200, 400, 404, 409), (method, path, data, reply)
        if reply.status != 200:
            assert reply.json()["error"]
    assert client.get("/").status == 200  # the session survived whatever happened


# -- certificate reloading ------------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def served_certificate(creator: Any, ca: Path) -> bytes:
    """Handshake in memory with ``creator``; return the DER certificate the client saw."""
    clock = Clock()
    server_factory = tls.wrap_server_factory(Factory.forProtocol(Recorder), creator, clock)
    client_factory = tls.wrap_client_factory(
        Factory.forProtocol(Recorder), tls.client_tls_options("localhost", None, insecure=True),
        clock)
    _c, _s, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None), clock=clock)
    client_tls = pump.client
    client_tls.transport.write(b"x")
    pump.flush()
    cert = client_tls.getPeerCertificate()
    assert cert is not None
    from OpenSSL import crypto

    return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)


def der_of(pem_path: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(
        serialization.Encoding.DER)


def test_certificate_is_reloaded_without_a_restart(tmp_path: Path) -> None:
    cert, key = tls.ensure_server_certificate(tmp_path, ["localhost"])
    first = der_of(cert)
    clock = Clock()
    options = ReloadingTLSOptions(cert, key, clock, check_interval=2.0)
    assert served_certificate(options, cert) == first

    new_cert, new_key = tls.make_self_signed_certificate(["localhost", "admin.example"])
    key.write_bytes(new_key)
    cert.write_bytes(new_cert)
    assert served_certificate(options, cert) == first  # not looked at again yet
    clock.advance(2.0)
    assert served_certificate(options, cert) == der_of(cert) != first
    assert options.reloads == 1

    # A broken or mismatched replacement is refused; the last good one stays.
    good = der_of(cert)
    other_cert, _ = tls.make_self_signed_certificate(["elsewhere"])
    cert.write_bytes(other_cert)  # does not match the key
    clock.advance(2.0)
    assert served_certificate(options, cert) == good
    cert.write_bytes(b"garbage")
    clock.advance(2.0)
    assert served_certificate(options, cert) == good
    assert options.reloads == 1


def test_reloading_options_refuse_a_bad_pair_at_start(tmp_path: Path) -> None:
    cert, key = tls.ensure_server_certificate(tmp_path, ["localhost"])
    other_cert, _ = tls.make_self_signed_certificate(["x"])
    cert.write_bytes(other_cert)
    with pytest.raises(Exception, match=r"(?i)key|values mismatch|private"):
        ReloadingTLSOptions(cert, key, Clock())


# -- the OpenAPI document matches the API ----------------------------------------------

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "admin-api.yaml"


def test_openapi_document_lists_exactly_the_api_routes(world: World) -> None:
    import yaml  # a test dependency (PyYAML)
    doc = yaml.safe_load(API_DOC.read_text(encoding="utf-8"))
    assert doc["openapi"].startswith("3.")
    documented = {
        (method.upper(), tuple("*" if p.startswith("{") else p for p in path.strip("/").split("/")))
        for path, item in doc["paths"].items()
        for method in item if method != "parameters"
    }
    implemented = {(r.method.decode(), r.pattern) for r in world.admin.routes
                   if r.pattern[:1] == ("api",)}
    assert documented == implemented


def test_openapi_schemas_name_the_fields_the_api_sends(world: World, client: Client) -> None:
    import yaml  # a test dependency (PyYAML)
    schemas = yaml.safe_load(API_DOC.read_text(encoding="utf-8"))["components"]["schemas"]
    connect_encoder_and_viewer(world)
    client.api("POST", "/api/domains", {"name": "west"})

    def keys(name: str) -> set[str]:
        return set(schemas[name]["properties"])

    assert set(client.api("GET", "/api/server").json()) == keys("Server")
    assert set(client.api("GET", "/api/servers").json()["servers"][0]) == keys("ServerSummary")
    assert set(client.api("GET", "/api/encoders").json()["encoders"][0]) == keys("Encoder")
    assert set(client.api("GET", "/api/viewers").json()["viewers"][0]) == keys("Viewer")
    assert set(client.api("GET", "/api/domains").json()["domains"][0]) == keys("Domain")
    assert set(client.api("GET", "/api/accounts").json()["accounts"][0]) == keys("Account")
    assert set(client.api("GET", "/api/audit").json()["entries"][0]) == keys("AuditEntry")
    assert set(client.api("GET", "/api/server").json()["load"]) == keys("Load")


# -- multi-site resilience -------------------------------------------------------------


def audit_actions(world: World) -> list[tuple[str, str, str, str]]:
    return [(e.actor, e.server_id, e.action, e.target) for e in world.store.list_audit(1000)
            if e.action.startswith("msr.")]


def enabled_world(world: World, client: Client) -> FakeCluster:
    assert client.api("POST", "/api/msr/enable").status == 200
    return world.cluster


def test_a_standalone_server_offers_to_enable_multi_site_resilience(world: World,
                                                                      client: Client) -> None:
    page = client.get("/msr").text
    assert "This server is standalone" in page
    form = page.split('action="/msr/enable"')[1].split("</form>")[0]
    assert f'name="csrf" value="{client.csrf}"' in form
    assert "Enable multi-site resilience" in form
    assert "100 ms" in page and "without port forwarding" in page  # the prerequisites
    assert "Create join token" not in page
    assert client.api("GET", "/api/msr").json()["cluster"] == {
        "enabled": False, "running": False, "cluster_id": None, "ca_fingerprint": None,
        "servers": 1, "max_servers": 4, "peer_address": "127.0.0.1:47100", "error": None}
    servers = client.api("GET", "/api/servers").json()["servers"]
    assert [s["server_id"] for s in servers] == ["srv-1"]
    assert servers[0]["this"] and servers[0]["state"] == "alive"
    assert servers[0]["admin_url"] == "https://127.0.0.1:9443/"
    assert not servers[0]["removable"]
    # Nothing to remove, nothing to admit through while standalone.
    assert client.api("DELETE", "/api/servers/srv-2").status == 404
    reply = client.api("POST", "/api/msr/tokens")
    assert reply.status == 409 and "enable multi-site resilience first" in reply.json()["error"]
    assert client.post_form("/msr/tokens").status == 409
    assert world.host.checks == 0 and not (world.tmp / "cluster").exists()
    assert audit_actions(world) == []


def test_enabling_from_the_page_makes_a_cluster_of_one_in_place(world: World,
                                                                client: Client) -> None:
    connect_encoder_and_viewer(world)
    links = [s.link for s in world.core.encoders.values()] + [
        v.link for v in world.core.viewers]
    world.clock.advance(5)
    reply = client.post_form("/msr/enable")
    assert reply.status == 303 and reply.location == "/msr"
    assert world.host.checks == 1
    identity = load_identity(world.tmp, "srv-1")
    assert identity is not None and identity.ca_key is not None
    cluster = world.cluster
    assert cluster.cluster_id == identity.cluster_id
    # The clients were not touched: same sessions, nothing sent or closed.
    assert list(world.core.encoders) == ["cam-1"] and len(world.core.viewers) == 1
    assert all(link.closed == [] for link in links)
    page = client.get("/msr").text
    assert "is now cluster " + identity.cluster_id in page  # the flash, once
    assert identity.cluster_id in page and identity.fingerprint() in page
    assert "Create join token" in page and "Enable multi-site resilience" not in page
    rows = Markup.parse(page.split('data-live-list="servers"')[1].split("</table>")[0])
    assert "srv-1" in rows.text and "this server" in rows.text
    assert ("form", [("method", "post"), ("action", "/msr/servers/srv-1/remove"),
                     ("class", "inline")]) not in rows.tags
    assert audit_actions(world) == [("root", "srv-1", "msr.enable", identity.cluster_id)]
    entry = world.store.list_audit(1)[0]
    assert entry.at == world.clock.seconds()
    status = client.api("GET", "/api/msr").json()["cluster"]
    assert status["enabled"] and status["running"] and status["servers"] == 1
    assert status["cluster_id"] == identity.cluster_id
    assert status["ca_fingerprint"] == identity.fingerprint()
    assert client.api("GET", "/api/server").json()["cluster"] == {
        "enabled": True, "servers": 1, "cluster_id": identity.cluster_id}
    assert "enabled: a cluster of 1 server" in client.get("/").text
    assert "Enabled: cluster " + identity.cluster_id in client.get("/settings").text
    # Enabling twice is refused, by the page and by the API, and not audited.
    reply = client.post_form("/msr/enable")
    assert reply.status == 409 and "enabled already" in reply.text
    reply = client.api("POST", "/api/msr/enable")
    assert reply.status == 409 and "enabled already" in reply.json()["error"]
    assert len(audit_actions(world)) == 1


def test_enabling_through_the_api(world: World, client: Client) -> None:
    reply = client.api("POST", "/api/msr/enable", {"force": True})
    assert reply.status == 400 and reply.json()["field"] == "force"
    assert not (world.tmp / "cluster").exists()
    reply = client.api("POST", "/api/msr/enable", raw=b"")
    assert reply.status == 200
    data = reply.json()
    assert data["cluster"]["enabled"] and data["cluster"]["running"]
    assert [s["server_id"] for s in data["servers"]] == ["srv-1"]
    assert [a[2] for a in audit_actions(world)] == ["msr.enable"]


def test_a_broken_cluster_directory_is_reported_not_overwritten(world: World,
                                                                client: Client) -> None:
    (world.tmp / "cluster").mkdir()
    (world.tmp / "cluster" / "cluster-id").write_text("x\n")
    status = client.api("GET", "/api/msr").json()["cluster"]
    assert status["enabled"] and not status["running"]
    assert "incomplete" in status["error"]
    page = client.get("/msr").text
    assert "incomplete" in page and "Enable multi-site resilience" not in page
    reply = client.api("POST", "/api/msr/enable")
    assert reply.status == 409 and "already holds a cluster identity" in reply.json()["error"]
    assert audit_actions(world) == []
    assert [p.name for p in (world.tmp / "cluster").iterdir()] == ["cluster-id"]


def test_a_join_token_is_shown_once_with_the_command(world: World, client: Client) -> None:
    cluster = enabled_world(world, client)
    reply = client.post_form("/msr/tokens")
    assert reply.status == 200
    token_text = unescape(re.search(r'id="join-token">([^<]+)</code>', reply.text).group(1))
    command = unescape(re.search(r'id="join-command">([^<]+)</code>', reply.text).group(1))
    assert command == f"twistd -n evserver --join-token {token_text}"
    token = JoinToken.decode(token_text)
    assert token.cluster_id == cluster.cluster_id
    assert token.ca_fingerprint == cluster.identity.fingerprint()
    assert token.addresses == ("127.0.0.1:47100",)
    # The member keeps only a hash: the token admits one server, once.
    records = load_tokens(world.tmp)
    assert list(records) == [token.token_id]
    assert token.secret not in (world.tmp / "cluster" / "tokens.json").read_text()
    check_token(records[token.token_id], token.token_id, token.secret, lambda: token.expires - 1)
    assert token_text not in client.get("/msr").text
    assert audit_actions(world)[0] == ("root", "srv-1", "msr.token", token.token_id)
    detail = world.store.list_audit(1)[0].detail
    assert token.secret not in detail and "127.0.0.1:47100" in detail
    # The API: a lifetime may be given.
    data = client.api("POST", "/api/msr/tokens", {"lifetime": 3600}).json()
    api_token = JoinToken.decode(data["token"])
    assert data["token_id"] == api_token.token_id and data["expires"] == api_token.expires
    assert data["command"] == f"twistd -n evserver --join-token {data['token']}"
    assert 3500 < api_token.expires - time.time() <= 3600  # join tokens expire in real time
    assert sorted(load_tokens(world.tmp)) == sorted([token.token_id, api_token.token_id])


@HYPOTHESIS
@given(body=st.one_of(
    st.dictionaries(st.sampled_from(["lifetime", "other"]), json_values, max_size=2),
    st.fixed_dictionaries({"lifetime": st.integers(-10, 3 * 30 * 24 * 3600)})))
def test_api_join_token_lifetimes_are_validated(world: World, client: Client,
                                                body: dict[str, Any]) -> None:
    if world.host.cluster is None:
        enabled_world(world, client)
    before = len(load_tokens(world.tmp))
    reply = client.api("POST", "/api/msr/tokens", body)
    event(f"status {reply.status}")
    lifetime = body.get("lifetime")
    good = set(body) <= {"lifetime"} and ("lifetime" not in body or (
        type(lifetime) is int and 60 <= lifetime <= 30 * 24 * 3600))
    if good:
        assert reply.status == 201, (body, reply)
        assert len(load_tokens(world.tmp)) == before + 1
    else:
        assert reply.status == 400, (body, reply)
        assert reply.json()["field"] in ("lifetime", "other")
        assert len(load_tokens(world.tmp)) == before


def three_servers(world: World, client: Client) -> FakeCluster:
    cluster = enabled_world(world, client)
    cluster.add("srv-2", PeerState.ALIVE, "192.0.2.20", rtt=12.34, offset=-3.21,
                load=p.Load(4, 2, 9, 0))
    cluster.add("srv-3", PeerState.SUSPECT, "edge3.example", admin_port=9444, rtt=140.0,
                offset=620.0, load=p.Load(1, 0, 0, 0),
                warnings=("RTT 140 ms exceeds 100 ms", "clock offset 620 ms exceeds 500 ms"))
    cluster.add("srv-4", PeerState.DEAD, "2001:db8::4", rtt=2.0, offset=1.0,
                load=p.Load(5, 5, 5, 0))
    return cluster


def test_the_servers_of_the_cluster_with_state_load_and_warnings(world: World,
                                                                 client: Client) -> None:
    three_servers(world, client)
    world.core.encoder_connected("cam-9", "Nine", "ops", FakeLink())
    data = client.api("GET", "/api/servers").json()
    rows = {s["server_id"]: s for s in data["servers"]}
    assert list(rows) == ["srv-1", "srv-2", "srv-3", "srv-4"]  # this one first
    assert data["cluster"]["servers"] == 4
    assert rows["srv-1"]["load"] == {"encoders": 1, "streaming": 0, "viewers": 0}
    assert rows["srv-2"] == {
        "server_id": "srv-2", "this": False, "state": "alive", "address": "192.0.2.20",
        "peer_address": "192.0.2.20:47100", "admin_url": "https://192.0.2.20:9443/",
        "load": {"encoders": 4, "streaming": 2, "viewers": 9}, "rtt_ms": 12.3,
        "offset_ms": -3.2, "bandwidth": None, "connected": True, "warnings": [],
        "removable": True, "weight": 1.0}
    assert rows["srv-3"]["state"] == "suspect"
    assert rows["srv-3"]["admin_url"] == "https://edge3.example:9444/"
    assert rows["srv-3"]["warnings"] == ["RTT 140 ms exceeds 100 ms.",
                                         "Clock offset 620 ms exceeds 500 ms."]
    down = rows["srv-4"]
    assert down["state"] == "down" and not down["connected"]
    assert down["load"] is None and down["rtt_ms"] is None  # the link's figures are history
    assert down["admin_url"] == "https://[2001:db8::4]:9443/"
    assert down["peer_address"] == "[2001:db8::4]:47100"
    assert "Not reachable from this server" in down["warnings"][0]
    assert "[2001:db8::4]:47100" in down["warnings"][0]
    assert data["warnings"] == [
        "srv-3: RTT 140 ms exceeds 100 ms.", "srv-3: Clock offset 620 ms exceeds 500 ms.",
        "srv-4: " + down["warnings"][0]]
    # The page shows the same, with a link to each server's own admin site
    # and a Remove button (with a confirmation) for every other server; the
    # warnings above the table.
    page = client.get("/msr").text
    table = page.split('data-live-list="servers"')[1].split("</table>")[0]
    for sid in ("srv-1", "srv-2", "srv-3", "srv-4"):
        assert f'<a href="/servers/{sid}">{sid}</a>' in table
    for url, shown in (("https://192.0.2.20:9443/", "192.0.2.20:9443"),
                       ("https://edge3.example:9444/", "edge3.example:9444"),
                       ("https://[2001:db8::4]:9443/", "[2001:db8::4]:9443")):
        assert f'<a href="{url}">{shown}</a>' in table
    assert "12.3 ms" in table and "-3.2 ms" in table and "140.0 ms" in table
    assert 'badge state-down' in table and 'badge state-suspect' in table
    warnings = page.split('data-live-items="warnings"')[1].split("</ul>")[0]
    assert "srv-3: RTT 140 ms exceeds 100 ms." in warnings
    assert "srv-4: Not reachable from this server" in warnings
    forms = re.findall(r'<form method="post" action="([^"]+)" class="inline" '
                       r'data-confirm="([^"]+)">', table)
    assert [a for a, _ in forms] == [f"/msr/servers/{s}/remove" for s in ("srv-2", "srv-3",
                                                                           "srv-4")]
    assert all("Remove server" in c for _, c in forms)
    template = page.split('<template id="remove-server">')[1].split("</template>")[0]
    assert 'action="/msr/servers/{server_id}/remove"' in template
    assert f'value="{client.csrf}"' in template
    assert 'data-live-src="/api/servers"' in page


def test_clicking_another_server_shows_the_encoders_it_hosts(world: World,
                                                             client: Client) -> None:
    three_servers(world, client)
    connect_encoder_and_viewer(world)  # cam-1 here; cam-2 is registered, not connected
    world.store.add_encoder("ops", "cam-3", "Loading bay")
    epoch = Stamp(1, 0, "srv_2")
    world.core.remote_locations([
        Location("cam-2", "srv-2", epoch, 0, EncoderState.STREAMING),
        Location("cam-3", "srv-2", epoch, 0, EncoderState.ONLINE),
        Location("cam-gone", "srv-2", epoch, 0, EncoderState.ONLINE)])  # not in the store
    page = client.get("/servers/srv-2").text
    assert "<h1>Server srv-2</h1>" in page
    assert '<a href="/encoders/cam-2">cam-2</a>' in page
    assert "Loading bay" in page and "badge state-streaming" in page
    assert "cam-1" not in page.split("Connected encoders")[1]  # it is on this server
    assert ('href="https://192.0.2.20:9443/servers/srv-2" id="own-admin-page"') in page
    assert 'data-live-src="/api/servers/srv-2"' in page
    data = client.api("GET", "/api/servers/srv-2").json()
    assert data["server"]["state"] == "alive" and data["viewers"] is None
    unknown = {"viewers": None, "frames_in": None, "bytes_in": None}  # only srv-2 knows
    assert data["encoders"] == [
        {"encoder_id": "cam-2", "name": "cam-2", "domain": "ops", "state": "streaming",
         **unknown},
        {"encoder_id": "cam-3", "name": "Loading bay", "domain": "ops", "state": "online",
         **unknown},
        {"encoder_id": "cam-gone", "name": "cam-gone", "domain": None, "state": "online",
         **unknown}]
    assert data["report"] is None  # this cluster service cannot ask its peers
    here = client.api("GET", "/api/servers/srv-1").json()
    assert [e["encoder_id"] for e in here["encoders"]] == ["cam-1"]
    assert [v["account"] for v in here["viewers"]] == ["alice"]
    # The encoders list says where each encoder is; this server's page only its own.
    encoders = {e["encoder_id"]: e for e in client.api("GET", "/api/encoders").json()["encoders"]}
    assert (encoders["cam-2"]["server_id"], encoders["cam-2"]["state"]) == ("srv-2",
                                                                           "streaming")
    assert (encoders["cam-1"]["server_id"], encoders["cam-1"]["state"]) == ("srv-1",
                                                                           "streaming")
    connected = client.api("GET", "/api/encoders?connected=1").json()["encoders"]
    assert [e["encoder_id"] for e in connected] == ["cam-1"]
    assert "cam-2" not in client.get("/servers/srv-1").text
    # A dead server's encoders are offline everywhere at once.
    world.core.server_lost("srv-2")
    assert client.api("GET", "/api/servers/srv-2").json()["encoders"] == []
    encoders = {e["encoder_id"]: e for e in client.api("GET", "/api/encoders").json()["encoders"]}
    assert encoders["cam-2"]["state"] == "offline" and encoders["cam-2"]["server_id"] is None
    # Unknown servers.
    assert client.get("/servers/srv-9").status == 404
    assert client.api("GET", "/api/servers/srv-9").status == 404


def test_a_server_whose_admin_address_is_unknown_has_no_link(world: World,
                                                             client: Client) -> None:
    cluster = enabled_world(world, client)
    cluster.add("srv-5", PeerState.CONNECTING, "192.0.2.55", admin_port=0)
    row = client.api("GET", "/api/servers/srv-5").json()["server"]
    assert row["state"] == "connecting" and row["admin_url"] is None
    page = client.get("/servers/srv-5").text
    assert "own-admin-page" not in page and "does not know the address" in page


def test_removing_servers(world: World, client: Client) -> None:
    cluster = three_servers(world, client)
    reply = client.post_form("/msr/servers/srv-2/remove")
    assert reply.status == 303 and reply.location == "/msr"
    assert cluster.removed == ["srv-2"]
    assert "Server 'srv-2' was removed from the cluster." in unescape(client.get("/msr").text)
    assert client.api("DELETE", "/api/servers/srv-4").json() == {"deleted": "srv-4"}
    assert cluster.removed == ["srv-2", "srv-4"]
    assert audit_actions(world)[:2] == [("root", "srv-1", "msr.remove", "srv-4"),
                                        ("root", "srv-1", "msr.remove", "srv-2")]
    assert world.store.list_audit(1)[0].detail == "was down"
    # Not this server, not a server the cluster does not have.
    reply = client.api("DELETE", "/api/servers/srv-1")
    assert reply.status == 409 and "cannot remove itself" in reply.json()["error"]
    reply = client.post_form("/msr/servers/srv-1/remove")
    assert reply.status == 409 and "cannot remove itself" in reply.text
    assert client.api("DELETE", "/api/servers/srv-2").status == 404
    assert client.post_form("/msr/servers/srv-9/remove").status == 404
    assert cluster.removed == ["srv-2", "srv-4"]
    assert len(audit_actions(world)) == 3  # enable and the two removals
    assert [s["server_id"] for s in client.api("GET", "/api/servers").json()["servers"]] == [
        "srv-1", "srv-3"]


@pytest.mark.parametrize("nasty", NASTY)
def test_cluster_pages_escape_what_peers_advertise(world: World, client: Client,
                                                   nasty: str) -> None:
    cluster = enabled_world(world, client)
    cluster.add("srv-x", PeerState.ALIVE, nasty, warnings=(nasty,))
    world.store.add_encoder("ops", "cam-x", nasty)
    world.core.remote_locations([Location("cam-x", "srv-x", Stamp(1, 0, "x"), 0,
                                          EncoderState.ONLINE)])
    row = client.api("GET", "/api/servers/srv-x").json()["server"]
    assert row["address"] == nasty and row["admin_url"] is None  # not a host name
    for path in ("/msr", "/servers/srv-x"):
        reply = client.get(path)
        assert reply.status == 200
        assert_inert(reply.text, nasty)
    assert "own-admin-page" not in client.get("/servers/srv-x").text


def test_the_cluster_service_keeps_each_peers_reported_load(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(T0)
    identity = create_cluster(tmp_path, "srv-1", ["127.0.0.1"], T0)
    address = p.ExternalAddress("127.0.0.1", 5510, 5520, 5530, 9443, "127.0.0.1", 47100)
    core = RelayCore(clock, "srv-1", None, lambda: (), Limits())  # type: ignore[arg-type]
    service = ClusterService(identity, tmp_path, address, "tcp:0", core, None, clock)

    class Conn:
        peer_id = "srv-2"

        def __init__(self) -> None:
            self.sent: list[Any] = []

        def send(self, msg: Any) -> None:
            self.sent.append(msg)

    conn = Conn()
    assert service.loads == {}
    service.peer_frame(conn, p.Heartbeat(1, 1000, p.Load(3, 1, 7, 0)))  # type: ignore[arg-type]
    assert service.loads == {"srv-2": p.Load(3, 1, 7, 0)}
    assert isinstance(conn.sent[0], p.HeartbeatAck) and conn.sent[0].seq == 1
    service.peer_frame(conn, p.Heartbeat(2, 2000, p.Load(0, 0, 2, 0)))  # type: ignore[arg-type]
    assert service.loads == {"srv-2": p.Load(0, 0, 2, 0)}


def test_openapi_schemas_name_the_fields_the_cluster_api_sends(world: World,
                                                              client: Client) -> None:
    import yaml  # a test dependency (PyYAML)
    schemas = yaml.safe_load(API_DOC.read_text(encoding="utf-8"))["components"]["schemas"]

    def keys(name: str) -> set[str]:
        return set(schemas[name]["properties"])

    assert set(client.api("GET", "/api/msr").json()["cluster"]) == keys("ClusterStatus")
    three_servers(world, client)
    world.store.add_encoder("ops", "cam-2")
    world.core.remote_locations([Location("cam-2", "srv-2", Stamp(1, 0, "srv_2"), 0,
                                          EncoderState.ONLINE)])
    data = client.api("GET", "/api/servers").json()
    assert set(data) == {"servers", "cluster", "warnings"}
    assert set(data["cluster"]) == keys("ClusterStatus")
    for row in data["servers"]:
        assert set(row) == keys("ServerSummary"), row["server_id"]
        assert row["state"] in schemas["ServerSummary"]["properties"]["state"]["enum"]
        assert row["load"] is None or set(row["load"]) == keys("ServerLoad")
    one = client.api("GET", "/api/servers/srv-2").json()
    assert set(one) == {"server", "encoders", "viewers", "report"}
    assert set(one["encoders"][0]) == keys("HostedEncoder")
    token = client.api("POST", "/api/msr/tokens").json()
    assert set(token) == {"token", "token_id", "expires", "command"}
    assert set(client.api("GET", "/api/server").json()["cluster"]) == set(
        schemas["Server"]["properties"]["cluster"]["properties"])


# -- what other servers report over the peer link: bandwidth and connections -----------


class PeerConn:
    """A peer connection as PeerProbes uses it: each message is encoded, decoded as the
    peer protocol does and offered to the other side's frame() (at once, at ``mbps``, or
    never when ``cut``)."""

    def __init__(self, clock: Clock, me: str, is_server: bool) -> None:
        self.clock = clock
        self.me = me
        self.is_server = is_server
        self.to: PeerProbes | None = None
        self.back: PeerConn | None = None
        self.cut = False
        self.mbps: float | None = None
        self.busy_until = 0.0
        self.sent: list[Any] = []

    def send(self, msg: Any) -> None:
        raw = wire_messages.encode(msg)
        self.sent.append(msg)
        if self.cut:
            return
        decoded = wire_messages.decode_for(ProtocolName.PEER, self.is_server, raw[4], raw[5:])
        if self.mbps is None:
            self.deliver(decoded)
            return
        now = self.clock.seconds()
        self.busy_until = max(now, self.busy_until) + len(raw) * 8 / (self.mbps * 1e6)
        self.clock.callLater(self.busy_until - now, self.deliver, decoded)

    def deliver(self, msg: Any) -> None:
        assert self.to is not None
        assert self.to.frame(self.me, self.back, msg), msg


@attrs.define
class RemoteServer:
    """Another server of the cluster behind the peer link: its own relay core and probes."""

    server_id: str
    reactor: Clock
    core: RelayCore
    connections: dict[str, PeerConn]
    membership: FakeMembership
    probes: PeerProbes | None = None

    @property
    def link(self) -> PeerConn:
        """This server's connection to it."""
        back = self.connections["srv-1"].back
        assert back is not None
        return back


def linked_peer(world: World, cluster: FakeCluster, server_id: str) -> RemoteServer:
    """Give the fake cluster real PeerProbes (once) and link it to a new remote server."""
    if getattr(cluster, "probes", None) is None:
        cluster.reactor = world.clock  # type: ignore[attr-defined]
        cluster.core = world.core  # type: ignore[attr-defined]
        cluster.probes = PeerProbes(cluster)  # type: ignore[attr-defined]
        cluster.probes.start()  # type: ignore[attr-defined]
    cluster.add(server_id, PeerState.ALIVE, "192.0.2.20", rtt=12.0, offset=1.0)
    remote = RemoteServer(server_id, world.clock,
                          RelayCore(world.clock, server_id, None, lambda: (),  # type: ignore[arg-type]
                                    Limits()), {}, FakeMembership())
    remote.probes = PeerProbes(remote)
    remote.probes.start()
    ours, theirs = PeerConn(world.clock, "srv-1", False), PeerConn(world.clock, server_id, True)
    ours.to, ours.back = remote.probes, theirs
    theirs.to, theirs.back = cluster.probes, ours  # type: ignore[attr-defined]
    cluster.connections[server_id] = ours
    remote.connections["srv-1"] = theirs
    # As the cluster services do when the handshake is done.
    cluster.probes.link_up(server_id)  # type: ignore[attr-defined]
    remote.probes.link_up("srv-1")
    return remote


def fill_remote(remote: RemoteServer, name: str = "Front door", domain: str = "ops",
                account: str = "zoë", encoder_id: str = "cam-1") -> None:
    front = remote.core.encoder_connected(encoder_id, name, domain, FakeLink())
    remote.core.encoder_connected("cam-7", "Entrée nord", "ops", FakeLink())
    viewer = remote.core.viewer_connected(account, domain, FakeLink())
    viewer.attach_relay(object(), FakeSink())  # type: ignore[arg-type]
    viewer.watch(1, encoder_id)
    front.media(True, b"k" * 1000)
    front.media(False, b"d" * 500)
    remote.core.viewer_connected("bob", "west", FakeLink())


def test_another_servers_page_lists_the_encoders_and_viewers_it_reports(
        world: World, client: Client) -> None:
    cluster = enabled_world(world, client)
    remote = linked_peer(world, cluster, "srv-2")
    fill_remote(remote)
    # The directory would say otherwise: what srv-2 itself says wins.
    world.core.remote_locations([Location("cam-9", "srv-2", Stamp(1, 0, "srv_2"), 0,
                                          EncoderState.ONLINE)])
    data = client.api("GET", "/api/servers/srv-2").json()
    assert data["report"] == {
        "answered": True, "at": T0, "truncated": False,
        "text": "As reported by srv-2 at 22:13:20 UTC."}
    assert data["encoders"] == [
        {"encoder_id": "cam-1", "name": "Front door", "domain": "ops", "state": "streaming",
         "viewers": 1, "frames_in": 2, "bytes_in": 1500},
        {"encoder_id": "cam-7", "name": "Entrée nord", "domain": "ops", "state": "online",
         "viewers": 0, "frames_in": 0, "bytes_in": 0}]
    bob, zoe = data["viewers"]
    assert bob == {"account": "bob", "domain": "west", "watching": [],
                   "relay_connected": False, "queued_bytes": 0, "frames_out": 0,
                   "bytes_out": 0, "frames_skipped": 0}
    assert (zoe["account"], zoe["watching"], zoe["relay_connected"]) == ("zoë", ["cam-1"],
                                                                          True)
    link = remote.link
    assert [type(msg) for msg in link.sent] == [p.ConnectionsRequest]
    page = client.get("/servers/srv-2").text
    assert "As reported by srv-2 at 22:13:20 UTC." in page
    encoders = page.split("Connected encoders")[1].split("Connected viewers")[0]
    assert '<a href="/encoders/cam-1">cam-1</a>' in encoders and "cam-9" not in encoders
    assert "1.5 KiB" in encoders and "badge state-streaming" in encoders
    viewers = page.split("Connected viewers")[1]
    assert '<a href="/accounts/zo%C3%AB">zoë</a>' in viewers
    assert '<a href="/accounts/bob">bob</a>' in viewers
    # Its own admin site stays a click away.
    assert 'href="https://192.0.2.20:9443/servers/srv-2" id="own-admin-page"' in page
    assert 'data-live-key="report.text"' in page and 'data-live-list="viewers"' in page
    # The page's refreshes within a second reuse that answer; later ones ask again.
    client.api("GET", "/api/servers/srv-2")
    assert len(link.sent) == 1
    world.clock.advance(1)
    client.api("GET", "/api/servers/srv-2")
    assert len(link.sent) == 2


def test_a_remote_list_has_the_rows_of_that_servers_own_page(world: World,
                                                           client: Client) -> None:
    """What a server answers is what its own page shows (the columns both pages have)."""
    connect_encoder_and_viewer(world)
    world.core.viewer_connected("bob", "ops", FakeLink())
    answer = local_connections(world.core, 1)
    own = client.api("GET", "/api/servers/srv-1").json()
    assert [connected_encoder_json(e) for e in answer.encoders] == own["encoders"]
    assert [connected_viewer_json(v) for v in answer.viewers] == own["viewers"]


def test_a_server_that_does_not_answer_is_said_so_after_two_seconds(world: World,
                                                                   client: Client) -> None:
    cluster = enabled_world(world, client)
    remote = linked_peer(world, cluster, "srv-2")
    fill_remote(remote)
    remote.link.cut = True  # srv-2 hears nothing from here
    world.store.add_encoder("ops", "cam-3", "Loading bay")
    world.core.remote_locations([Location("cam-3", "srv-2", Stamp(1, 0, "srv_2"), 0,
                                          EncoderState.ONLINE)])
    reply = client.request("GET", "/servers/srv-2", meanwhile=lambda: world.clock.advance(2))
    assert reply.status == 200
    page = reply.text
    assert "srv-2 did not answer" in page
    assert '<a href="/encoders/cam-3">cam-3</a>' in page  # the directory's, instead
    assert 'id="own-admin-page"' in page
    data = client.api("GET", "/api/servers/srv-2",
                      meanwhile=lambda: world.clock.advance(2)).json()
    assert data["report"]["answered"] is False and data["report"]["at"] is None
    assert data["viewers"] is None
    assert [e["encoder_id"] for e in data["encoders"]] == ["cam-3"]
    assert data["encoders"][0]["frames_in"] is None
    # A server without a link answers nothing, at once.
    cluster.add("srv-4", PeerState.DEAD, "192.0.2.40")
    data = client.api("GET", "/api/servers/srv-4").json()
    assert data["report"]["answered"] is False


def test_the_page_waits_for_the_answer_and_writes_nothing_before(world: World,
                                                                 client: Client) -> None:
    cluster = enabled_world(world, client)
    remote = linked_peer(world, cluster, "srv-2")
    remote.link.cut = True
    seen: list[bytes] = []
    peer = IPv4Address("TCP", client.address, 50000)
    protocol = world.site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    protocol.dataReceived(f"GET /servers/srv-2 HTTP/1.1\r\nHost: admin.test\r\n"
                          f"Cookie: {cookie}\r\n\r\n".encode())
    world.clock.advance(1.75)
    seen.append(transport.value())
    world.clock.advance(0.25)
    assert seen == [b""]
    assert b"srv-2 did not answer" in transport.value()
    protocol.connectionLost(Failure(ConnectionError("done")))


@pytest.mark.parametrize("nasty", NASTY)
def test_what_another_server_reports_is_escaped(world: World, client: Client,
                                                nasty: str) -> None:
    cluster = enabled_world(world, client)
    remote = linked_peer(world, cluster, "srv-2")
    fill_remote(remote, name=nasty, domain=nasty, account=nasty, encoder_id=nasty)
    reply = client.get("/servers/srv-2")
    assert reply.status == 200
    assert_inert(reply.text, nasty)
    assert f'href="/encoders/{quote(nasty, safe="")}"' in reply.text
    data = client.api("GET", "/api/servers/srv-2").json()
    assert nasty in {e["name"] for e in data["encoders"]}
    assert nasty in {v["account"] for v in data["viewers"]}


def run_until_quiet(clock: Clock, until: float) -> None:
    """Run each delayed call at its own time (so frames are timed exactly), up to ``until``."""
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls()]
        if not due or min(due) > until:
            break
        clock.advance(max(min(due) - clock.seconds(), 0))


def test_bandwidth_is_measured_shown_and_warned_about(world: World, client: Client) -> None:
    cluster = enabled_world(world, client)
    slow = linked_peer(world, cluster, "srv-2")
    fair = linked_peer(world, cluster, "srv-3")
    fast = linked_peer(world, cluster, "srv-5")
    slow.link.mbps, fair.link.mbps, fast.link.mbps = 8.0, 30.0, 400.0
    for remote in (slow, fair, fast):
        assert remote.probes is not None
        remote.probes.stop()  # only this server probes here
    data = client.api("GET", "/api/servers").json()
    assert all(r["bandwidth"] is None for r in data["servers"])  # not measured yet
    assert cluster.probes.bandwidth == {}  # type: ignore[attr-defined]
    run_until_quiet(world.clock, T0 + 10)
    data = client.api("GET", "/api/servers").json()
    rows = {r["server_id"]: r for r in data["servers"]}
    assert rows["srv-1"]["bandwidth"] is None
    assert rows["srv-2"]["bandwidth"]["mbps"] == 8.0
    assert rows["srv-3"]["bandwidth"]["mbps"] == 30.0
    assert rows["srv-5"]["bandwidth"]["mbps"] == 400.0
    assert all(rows[sid]["bandwidth"]["measured_at"] > T0 + 5
               for sid in ("srv-2", "srv-3", "srv-5"))
    # The cross-check takes off the 12 ms round trip the fake membership claims, on a
    # link that has none: a little higher than the receiver's figure, and none at all
    # when the whole probe took less than that (400 Mbit/s: 5 ms).
    assert 8.0 < rows["srv-2"]["bandwidth"]["sender_mbps"] < 9.0
    assert rows["srv-5"]["bandwidth"]["sender_mbps"] is None
    assert data["warnings"] == [
        "srv-2: Link to srv-2 measured 8.0 Mbit/s: below the 10 Mbit/s minimum.",
        "srv-3: Link to srv-3 measured 30.0 Mbit/s: below the 50 Mbit/s recommended."]
    assert rows["srv-5"]["warnings"] == []
    page = client.get("/msr").text
    table = page.split('data-live-list="servers"')[1].split("</table>")[0]
    assert 'data-key="bandwidth.mbps" data-format="mbps"' in table
    assert "8.0 Mbit/s" in table and "30.0 Mbit/s" in table and "400.0 Mbit/s" in table
    warnings = page.split('data-live-items="warnings"')[1].split("</ul>")[0]
    assert "below the 10 Mbit/s minimum" in warnings
    assert "Each server measures the round trip, the clock offset and the bandwidth" in page
    remote_page = client.get(  # the request crosses the slow link too
        "/servers/srv-2",
        meanwhile=lambda: run_until_quiet(world.clock, world.clock.seconds() + 1)).text
    assert "8.0 Mbit/s" in remote_page and "As reported by srv-2" in remote_page
    # A link that is down shows no figure and no bandwidth warning.
    cluster.membership.views["srv-2"] = PeerView(PeerState.DEAD, 7, None, None)
    del cluster.connections["srv-2"]
    row = client.api("GET", "/api/servers/srv-2").json()["server"]
    assert row["bandwidth"] is None
    assert not any("Mbit/s" in w for w in row["warnings"])


def test_a_late_figure_of_a_server_is_its_latest_probe(world: World, client: Client) -> None:
    cluster = enabled_world(world, client)
    linked_peer(world, cluster, "srv-2")
    probes = cluster.probes  # type: ignore[attr-defined]
    probes.prober.results["srv-2"] = Measurement(61.25, None, 196608, 25679, T0)
    row = client.api("GET", "/api/servers/srv-2").json()["server"]
    assert row["bandwidth"] == {"mbps": 61.2, "sender_mbps": None, "measured_at": T0}
    assert row["warnings"] == []


def test_openapi_schemas_name_what_other_servers_report(world: World, client: Client) -> None:
    import yaml  # a test dependency (PyYAML)
    schemas = yaml.safe_load(API_DOC.read_text(encoding="utf-8"))["components"]["schemas"]

    def keys(name: str) -> set[str]:
        return set(schemas[name]["properties"])

    cluster = enabled_world(world, client)
    remote = linked_peer(world, cluster, "srv-2")
    fill_remote(remote)
    remote.link.mbps = 20.0
    assert remote.probes is not None
    remote.probes.stop()
    run_until_quiet(world.clock, T0 + 10)
    one = client.api("GET", "/api/servers/srv-2", meanwhile=lambda: run_until_quiet(
        world.clock, world.clock.seconds() + 1)).json()
    assert set(one) == {"server", "encoders", "viewers", "report"}
    assert set(one["server"]) == keys("ServerSummary")
    assert set(one["server"]["bandwidth"]) == keys("Bandwidth")
    assert set(one["report"]) == keys("ConnectionsReport")
    assert all(set(e) == keys("HostedEncoder") for e in one["encoders"])
    assert all(set(v) == keys("Viewer") for v in one["viewers"])



# -- server pools and capacity weights ------------------------------------------------


def pool_actions(world: World) -> list[tuple[str, str, str]]:
    return [(e.action, e.target, e.detail) for e in world.store.list_audit(1000)
            if e.action.startswith(("pool.", "server.")) or e.action.endswith(".pool")]


def test_the_csrf_test_bodies_are_accepted_with_the_token(world: World, client: Client) -> None:
    world.store.add_encoder("ops", "cam-1")
    world.store.create_pool("east", ["srv-1"])
    world.store.create_pool("west", ["srv-1"])
    for (method, path), body in VALID_BODIES.items():
        reply = client.api(method, path, body)
        assert reply.status in (200, 201), (method, path, reply)
    assert world.store.get_pool("x") is not None
    assert world.store.get_pool("east").description == "changed"  # type: ignore[union-attr]
    assert world.store.get_domain("ops").pool == "west"  # type: ignore[union-attr]
    assert world.store.get_encoder("cam-1").pool == "west"  # type: ignore[union-attr]
    assert world.store.server_weights() == {"srv-1": 3.0}


def test_pools_through_the_pages(world: World, client: Client) -> None:
    assert "No pools yet." in client.get("/pools").text
    # Refusals appear next to their fields and keep the input.
    reply = client.post_form("/pools", {"name": " east", "servers": "srv-1, srv-9",
                                        "description": "a\u0007b"})
    assert reply.status == 400
    for field, message in (("name", "leading or trailing spaces"),
                           ("servers", "'srv-9' is not a server of this cluster "
                                       "(its servers: srv-1)"),
                           ("description", "non-printable")):
        block = reply.text.split(f'id="f-{field}"')[1].split('class="field')[0]
        assert f'id="{field}-error"' in block and message in unescape(block), field
    assert 'value="srv-1, srv-9"' in reply.text
    reply = client.post_form("/pools", {"name": "east", "servers": "", "description": ""})
    assert reply.status == 400 and "1 to 64 servers, not 0" in reply.text
    assert world.store.list_pools() == []
    # Created, listed, shown.
    reply = client.post_form("/pools", {"name": "east", "servers": "srv-1,",
                                        "description": "East site"})
    assert reply.status == 303 and reply.location == "/pools/east"
    page = client.get("/pools/east").text
    assert "Pool 'east' created." in unescape(page)
    assert '<a href="/servers/srv-1">srv-1</a>' in page and "East site" in page
    assert client.post_form("/pools", {"name": "east", "servers": "srv-1"}).status == 409
    table = client.get("/pools").text.split("<table>")[1].split("</table>")[0]
    assert '<a href="/pools/east">east</a>' in table and "East site" in table
    # Changed.
    reply = client.post_form("/pools/east", {"servers": "srv-7", "description": "x"})
    assert reply.status == 400 and 'id="servers-error"' in reply.text
    assert 'value="srv-7"' in reply.text  # the input is kept
    reply = client.post_form("/pools/east", {"servers": "srv-1", "description": "New"})
    assert reply.status == 303
    assert world.store.get_pool("east").description == "New"  # type: ignore[union-attr]
    # In use: not deleted, said at the form; then deleted.
    world.store.add_encoder("ops", "cam-1", pool="east")
    reply = client.post_form("/pools/east/delete")
    assert reply.status == 409
    assert "still assigned to encoder(s) 'cam-1'" in unescape(reply.text)
    assert '<a href="/encoders/cam-1">cam-1</a>' in client.get("/pools/east").text
    world.store.set_encoder_pool("cam-1", None)
    assert client.post_form("/pools/east/delete").status == 303
    assert world.store.list_pools() == []
    assert client.get("/pools/east").status == 404
    assert client.post_form("/pools/east").status == 404
    assert client.post_form("/pools/east/delete").status == 404
    assert pool_actions(world) == [
        ("pool.delete", "east", "servers srv-1"),
        ("pool.update", "east", "description 'East site' -> 'New'"),
        ("pool.create", "east", "servers srv-1"),
    ]


def test_a_pool_may_keep_a_server_that_left_the_cluster(world: World, client: Client) -> None:
    world.store.create_pool("old", ["srv-1", "srv-gone"])
    page = client.get("/pools/old").text
    assert "srv-gone" in page and "not a server of this cluster" in page
    reply = client.post_form("/pools/old", {"servers": "srv-gone, srv-1", "description": ""})
    assert reply.status == 303
    assert world.store.get_pool("old").servers == ("srv-gone", "srv-1")  # type: ignore[union-attr]
    reply = client.api("PUT", "/api/pools/old", {"servers": ["srv-1", "srv-new"]})
    assert reply.status == 400 and reply.json()["field"] == "servers"


def test_the_pool_selectors_of_encoders_and_domains(world: World, client: Client) -> None:
    world.store.create_pool("east", ["srv-1"])
    world.store.create_pool("west", ["srv-2", "srv-1"])
    world.store.add_encoder("ops", "cam-1")
    page = client.get("/encoders/cam-1").text
    form = page.split('action="/encoders/cam-1/pool"')[1].split("</form>")[0]
    assert f'name="csrf" value="{client.csrf}"' in form
    assert '<option value="" selected="selected">— none —</option>' in form
    assert '<option value="west">west (srv-2, srv-1)</option>' in form
    assert client.post_form("/encoders/cam-1/pool", {"pool": "west"}).status == 303
    assert world.store.get_encoder("cam-1").pool == "west"  # type: ignore[union-attr]
    page = client.get("/encoders/cam-1").text
    assert "Encoder 'cam-1' now uses pool 'west'." in unescape(page)
    assert '<option value="west" selected="selected">' in page
    assert '<a href="/pools/west">west</a>' in page
    reply = client.post_form("/encoders/cam-1/pool", {"pool": "nope"})
    assert reply.status == 400
    block = reply.text.split('action="/encoders/cam-1/pool"')[1].split("</form>")[0]
    assert 'id="pool-error"' in block and "no pool named 'nope'" in unescape(block)
    assert client.post_form("/encoders/cam-9/pool", {"pool": "west"}).status == 404
    assert client.post_form("/encoders/cam-1/pool", {"pool": ""}).status == 303
    assert world.store.get_encoder("cam-1").pool is None  # type: ignore[union-attr]
    # Domains.
    page = client.get("/domains/ops").text
    assert 'action="/domains/ops/pool"' in page
    assert client.post_form("/domains/ops/pool", {"pool": "east"}).status == 303
    assert world.store.get_domain("ops").pool == "east"  # type: ignore[union-attr]
    assert world.store.encoder_pools() == {"cam-1": frozenset({"srv-1"})}
    reply = client.post_form("/domains/ops/pool", {"pool": "nope"})
    assert reply.status == 400 and 'id="pool-error"' in reply.text
    reply = client.post_form("/domains/ops/delete")  # its own error, at its own form
    block = reply.text.split('action="/domains/ops/delete"')[1].split("</form>")[0]
    assert reply.status == 409 and "delete them first" in block
    assert 'id="pool-error"' not in reply.text
    assert client.post_form("/domains/nowhere/pool", {"pool": "east"}).status == 404
    assert '<a href="/pools/east">east</a>' in client.get("/domains").text
    # Unchanged choices are not audited.
    assert client.post_form("/domains/ops/pool", {"pool": "east"}).status == 303
    assert pool_actions(world) == [("domain.pool", "ops", "none -> 'east'"),
                                   ("encoder.pool", "cam-1", "'west' -> none"),
                                   ("encoder.pool", "cam-1", "none -> 'west'")]


def test_a_pool_deleted_elsewhere_is_shown_as_no_pool(world: World, client: Client) -> None:
    world.store.create_pool("east", ["srv-1"])
    world.store.add_encoder("ops", "cam-1", pool="east")
    world.store.apply_updates([Update("pools", "east", {}, Stamp(9_000_000_000_000, 0, "x"))])
    page = client.get("/encoders/cam-1").text
    assert "east (no such pool: counts as none)" in unescape(page)
    assert '<option value="east" selected="selected">east (no such pool)</option>' in page
    row = client.api("GET", "/api/encoders/cam-1").json()["encoder"]
    assert row["pool"] == "east"
    assert client.post_form("/encoders/cam-1/pool", {"pool": ""}).status == 303


def test_server_weights_on_the_server_pages(world: World, client: Client) -> None:
    page = client.get("/servers/srv-1").text
    form = page.split('action="/servers/srv-1/weight"')[1].split("</form>")[0]
    assert 'name="weight" id="f-weight" value="1"' in form
    assert f'name="csrf" value="{client.csrf}"' in form
    reply = client.post_form("/servers/srv-1/weight", {"weight": "2.5"})
    assert reply.status == 303 and reply.location == "/servers/srv-1"
    assert world.store.server_weights() == {"srv-1": 2.5}
    assert 'value="2.5"' in client.get("/servers/srv-1").text
    for bad, message in (("0", "greater than 0"), ("abc", "must be a number"),
                         ("1e9", "at most 1000"), ("nan", "nan"), ("-1", "greater than 0")):
        reply = client.post_form("/servers/srv-1/weight", {"weight": bad})
        assert reply.status == 400, bad
        assert 'id="weight-error"' in reply.text and message in unescape(reply.text), bad
        assert f'value="{bad}"' in reply.text
    assert world.store.server_weights() == {"srv-1": 2.5}
    # Another server of the cluster, and one the cluster does not have.
    cluster = enabled_world(world, client)
    cluster.add("srv-2", PeerState.ALIVE, "192.0.2.20")
    assert client.post_form("/servers/srv-2/weight", {"weight": "4"}).status == 303
    page = client.get("/servers/srv-2").text
    assert 'action="/servers/srv-2/weight"' in page and 'value="4"' in page
    assert client.post_form("/servers/srv-9/weight", {"weight": "4"}).status == 404
    rows = {r["server_id"]: r for r in client.api("GET", "/api/servers").json()["servers"]}
    assert (rows["srv-1"]["weight"], rows["srv-2"]["weight"]) == (2.5, 4.0)
    table = client.get("/msr").text.split('data-live-list="servers"')[1].split("</table>")[0]
    assert 'data-key="weight"' in table
    assert '<td class="num">2.5</td>' in table and '<td class="num">4</td>' in table
    # Empty: back to the default.
    assert client.post_form("/servers/srv-1/weight", {"weight": ""}).status == 303
    assert world.store.server_weights() == {"srv-2": 4.0}
    assert pool_actions(world) == [("server.weight", "srv-1", "2.5 -> 1 (the default)"),
                                   ("server.weight", "srv-2", "1 -> 4"),
                                   ("server.weight", "srv-1", "1 -> 2.5")]


def test_pools_through_the_api(world: World, client: Client) -> None:
    reply = client.api("POST", "/api/pools", {"name": "east", "servers": ["srv-1"],
                                              "description": "East"})
    assert reply.status == 201
    assert reply.json() == {"pool": {"name": "east", "servers": ["srv-1"], "description": "East",
                                     "encoders": [], "domains": []}}
    reply = client.api("POST", "/api/pools", {"name": "east", "servers": ["srv-1"]})
    assert reply.status == 409 and reply.json()["field"] == "name"
    reply = client.api("POST", "/api/pools", {"name": "", "servers": "srv-1"})
    assert reply.status == 400
    assert set(reply.json()["fields"]) == {"name", "servers"}
    assert client.api("POST", "/api/pools", {"name": "x"}).json()["field"] == "servers"
    # Encoders and domains take a pool when created or changed.
    reply = client.api("POST", "/api/encoders", {"encoder_id": "cam-1", "domain": "ops",
                                                 "pool": "east"})
    assert reply.status == 201 and reply.json()["encoder"]["pool"] == "east"
    reply = client.api("POST", "/api/domains", {"name": "west", "pool": "nope"})
    assert reply.status == 400 and reply.json()["field"] == "pool"
    assert world.store.get_domain("west") is None
    reply = client.api("POST", "/api/domains", {"name": "west", "pool": "east"})
    assert reply.status == 201 and reply.json()["domain"]["pool"] == "east"
    assert client.api("GET", "/api/pools/east").json()["pool"]["encoders"] == ["cam-1"]
    assert client.api("GET", "/api/pools").json()["pools"][0]["domains"] == ["west"]
    reply = client.api("PATCH", "/api/encoders/cam-1", {"name": "Gate", "pool": None})
    assert reply.status == 200
    assert (reply.json()["encoder"]["name"], reply.json()["encoder"]["pool"]) == ("Gate", None)
    reply = client.api("PATCH", "/api/encoders/cam-1", {"name": "Other", "pool": "nope"})
    assert reply.status == 400 and reply.json()["field"] == "pool"
    assert world.store.get_encoder("cam-1").name == "Gate"  # type: ignore[union-attr]
    assert client.api("PATCH", "/api/encoders/cam-1", {}).status == 400
    assert client.api("PATCH", "/api/encoders/cam-9", {"pool": None}).status == 404
    reply = client.api("PATCH", "/api/domains/west", {"pool": None})
    assert reply.status == 200 and reply.json()["domain"]["pool"] is None
    assert client.api("PATCH", "/api/domains/nowhere", {"pool": None}).status == 404
    assert client.api("PATCH", "/api/domains/west", {}).json()["field"] == "pool"
    # Changes: PUT and POST alike; what is left out stays.
    reply = client.api("PUT", "/api/pools/east", {"servers": ["srv-1"], "description": ""})
    assert reply.status == 200 and reply.json()["pool"]["description"] == ""
    reply = client.api("POST", "/api/pools/east", {"description": "again"})
    assert reply.json()["pool"] == {"name": "east", "servers": ["srv-1"],
                                    "description": "again", "encoders": [], "domains": []}
    for body, field in (({}, None), ({"servers": None}, "servers"),
                        ({"description": None}, "description"), ({"colour": 1}, "colour"),
                        ({"servers": []}, "servers"), ({"description": 5}, "description")):
        reply = client.api("PUT", "/api/pools/east", body)
        assert reply.status == 400 and reply.json().get("field") == field, body
    assert client.api("PUT", "/api/pools/nope", {"description": "x"}).status == 404
    assert client.api("GET", "/api/pools/nope").status == 404
    # Deleting: refused while assigned (409), then done.
    client.api("PATCH", "/api/encoders/cam-1", {"pool": "east"})
    reply = client.api("DELETE", "/api/pools/east")
    assert reply.status == 409 and "still assigned to encoder(s) 'cam-1'" in reply.json()["error"]
    client.api("PATCH", "/api/encoders/cam-1", {"pool": None})
    assert client.api("DELETE", "/api/pools/east").json() == {"deleted": "east"}
    assert client.api("DELETE", "/api/pools/east").status == 404
    assert client.api("GET", "/api/pools").json() == {"pools": []}
    # Weights.
    reply = client.api("PATCH", "/api/servers/srv-1", {"weight": 3})
    assert reply.status == 200 and reply.json()["server"]["weight"] == 3.0
    assert client.api("PATCH", "/api/servers/srv-1", {"weight": 0}).json()["field"] == "weight"
    assert client.api("PATCH", "/api/servers/srv-1", {}).json()["field"] == "weight"
    assert client.api("PATCH", "/api/servers/srv-9", {"weight": 2}).status == 404
    assert client.api("PATCH", "/api/servers/srv-1", {"weight": None}).json()["server"][
        "weight"] == 1.0
    assert [a for a, _t, _d in pool_actions(world)] == [
        "server.weight", "server.weight", "pool.delete", "encoder.pool", "encoder.pool",
        "pool.update", "pool.update", "domain.pool", "encoder.pool", "pool.create"]
    created = [e for e in world.store.list_audit(1000) if e.action.endswith(".create")]
    assert [(e.action, e.target, e.detail) for e in created[:2]] == [
        ("domain.create", "west", "pool 'east'"),
        ("encoder.create", "cam-1", "domain 'ops', name 'cam-1', pool 'east'")]


@pytest.mark.parametrize("nasty", NASTY)
def test_pool_pages_escape_names_and_descriptions(world: World, client: Client,
                                                  nasty: str) -> None:
    assert client.api("POST", "/api/pools", {"name": nasty, "servers": ["srv-1"],
                                             "description": nasty}).status == 201
    assert client.api("POST", "/api/domains", {"name": nasty, "pool": nasty}).status == 201
    assert client.api("POST", "/api/encoders", {"encoder_id": "cam-x", "domain": nasty,
                                                "pool": nasty}).status == 201
    for path in ("/pools", "/pools/" + quote(nasty, safe=""), "/domains",
                 "/domains/" + quote(nasty, safe=""), "/encoders", "/encoders/cam-x",
                 "/audit"):
        reply = client.get(path)
        assert reply.status == 200, path
        assert_inert(reply.text, nasty)
    reply = client.post_form("/pools", {"name": nasty, "servers": "srv-1",
                                        "description": nasty})
    assert reply.status == 409
    assert_inert(reply.text, nasty)
    reply = client.post_form("/pools/" + quote(nasty, safe="") + "/delete")
    assert reply.status == 409
    assert_inert(reply.text, nasty)
    assert client.api("GET", "/api/pools").json()["pools"][0]["description"] == nasty


# -- Hypothesis: the pool API's every input lands exactly or is refused ---------------------

#: A field of an acceptable body replaced by an arbitrary value (or by a close miss), or
#: nothing replaced: so that about as many changes land as are refused.
corruptions = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["name", "servers", "description", "other"]), json_values),
    st.tuples(st.just("servers"), st.lists(st.sampled_from(
        ["srv-1", "srv-2", "srv-9", "srv-gone", "bad id"]), max_size=4)),
    st.tuples(st.just("description"), st.integers(250, 260).map(lambda n: "é" * n)),
)
#: The pool tests' settings: their bodies take a moment to generate on a busy machine.
POOL_HYPOTHESIS = settings(HYPOTHESIS, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
good_server_lists = st.lists(st.sampled_from(["srv-1", "srv-2", "srv-3"]), min_size=1,
                             max_size=3, unique=True)
good_descriptions = st.text(st.characters(categories=("L", "N", "P", "S", "Zs")), max_size=40)


def corrupted(body: dict[str, Any], corruption: tuple[str, Any] | None) -> dict[str, Any]:
    if corruption is None:
        return body
    field, value = corruption
    return {**body, field: value}


def cluster_servers(world: World) -> None:
    if world.host.cluster is None:
        world.host.check_cluster()  # no cluster identity: stays standalone
    if world.host.cluster is None:
        from evserver.cluster.provision import enable

        enable(world.tmp, ["127.0.0.1"], lambda: T0)
        world.host.check_cluster()
        assert world.host.cluster is not None
        world.host.cluster.add("srv-2", PeerState.ALIVE)
        world.host.cluster.add("srv-3", PeerState.DEAD)


def _good_servers(value: Any, known: set[str]) -> bool:
    return (isinstance(value, list) and 1 <= len(value) <= 64 and len(set(map(repr, value)))
            == len(value) and all(isinstance(v, str) and v in known for v in value))


def _good_description(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 256 and value.isprintable()


@POOL_HYPOTHESIS
@given(name=good_names, servers=good_server_lists,
       description=st.one_of(st.none(), good_descriptions), corruption=corruptions)
def test_api_pools_validate_every_field(world: World, client: Client, name: Any,
                                        servers: Any, description: Any,
                                        corruption: tuple[str, Any] | None) -> None:
    cluster_servers(world)
    body = {"name": name, "servers": servers}
    if description is not None:
        body["description"] = description
    body = corrupted(body, corruption)
    name, servers, description = body["name"], body["servers"], body.get("description")
    before = world.snapshot()
    existed = isinstance(name, str) and world.store.get_pool(name) is not None
    reply = client.api("POST", "/api/pools", body)
    event(f"status {reply.status}")
    good_name = isinstance(name, str) and 1 <= len(name) <= 64 and name.isprintable() and (
        name == name.strip())
    good = (good_name and _good_servers(servers, {"srv-1", "srv-2", "srv-3"})
            and (description is None or _good_description(description)))
    good = good and "other" not in body
    if good and not existed:
        assert reply.status == 201, (body, reply)
        pool = reply.json()["pool"]
        assert pool == {"name": name, "servers": servers, "description": description or "",
                        "encoders": [], "domains": []}
        assert world.store.get_pool(name) is not None
        assert world.store.list_audit(1)[0].action == "pool.create"
    else:
        assert reply.status == (409 if good else 400), (body, reply)
        data = reply.json()
        assert data["error"] and data["field"] in ("name", "servers", "description", "other")
        assert world.snapshot() == before, body


@POOL_HYPOTHESIS
@given(servers=st.one_of(st.none(), good_server_lists),
       description=st.one_of(st.none(), good_descriptions), corruption=corruptions,
       method=st.sampled_from(["PUT", "POST"]))
def test_api_pool_changes_land_exactly_or_not_at_all(
    world: World, client: Client, servers: Any, description: Any,
    corruption: tuple[str, Any] | None, method: str,
) -> None:
    body: dict[str, Any] = {}
    if servers is not None:
        body["servers"] = servers
    if description is not None:
        body["description"] = description
    body = corrupted(body, corruption)
    cluster_servers(world)
    if world.store.get_pool("p") is None:
        world.store.create_pool("p", ["srv-1", "srv-gone"], "start")
    pool = world.store.get_pool("p")
    assert pool is not None
    before = world.snapshot()
    reply = client.api(method, "/api/pools/p", body)
    event(f"status {reply.status}")
    good = (bool(body) and "other" not in body and "name" not in body
            and ("servers" not in body or _good_servers(
                body["servers"], {"srv-1", "srv-2", "srv-3", *pool.servers}))
            and ("description" not in body or _good_description(body["description"])))
    if good:
        assert reply.status == 200, (body, reply)
        after = world.store.get_pool("p")
        assert after is not None
        assert list(after.servers) == body.get("servers", list(pool.servers))
        assert after.description == body.get("description", pool.description)
        assert reply.json()["pool"]["servers"] == list(after.servers)
        changed = after != pool
        assert (world.snapshot() != before) == changed
    else:
        assert reply.status == 400, (body, reply)
        assert reply.json()["error"]
        assert world.snapshot() == before, body


@POOL_HYPOTHESIS
@given(pool=st.one_of(st.sampled_from(["east", "west", "nope", ""]), st.none(), json_values),
       weight=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                        st.floats(0.001, 1000), st.integers(1, 1000), json_values))
def test_api_pool_assignments_and_weights_are_validated(world: World, client: Client,
                                                        pool: Any, weight: Any) -> None:
    if world.store.get_pool("east") is None:
        world.store.create_pool("east", ["srv-1"])
        world.store.create_pool("west", ["srv-1"])
        world.store.add_encoder("ops", "cam-1")
    good_pool = pool is None or pool in ("east", "west", "")
    for path in ("/api/encoders/cam-1", "/api/domains/ops"):
        before = world.snapshot()
        reply = client.api("PATCH", path, {"pool": pool})
        event(f"pool status {reply.status}")
        if good_pool:
            assert reply.status == 200, (path, pool, reply)
            key = "encoder" if "encoders" in path else "domain"
            assert reply.json()[key]["pool"] == (pool or None)
        else:
            assert reply.status == 400 and reply.json()["field"] == "pool", (path, pool, reply)
            assert world.snapshot() == before
    before = world.snapshot()
    reply = client.api("PATCH", "/api/servers/srv-1", {"weight": weight})
    event(f"weight status {reply.status}")
    good_weight = weight is None or (type(weight) in (int, float) and 0 < weight <= 1000)
    if good_weight:
        assert reply.status == 200, (weight, reply)
        expected = 1.0 if weight is None else float(weight)
        assert reply.json()["server"]["weight"] == expected
        assert world.store.server_weights().get("srv-1", 1.0) == expected
    else:
        assert reply.status == 400 and reply.json()["field"] == "weight", (weight, reply)
        assert world.snapshot() == before


def test_openapi_schemas_name_the_fields_the_pool_api_sends(world: World,
                                                           client: Client) -> None:
    import yaml  # a test dependency (PyYAML)
    schemas = yaml.safe_load(API_DOC.read_text(encoding="utf-8"))["components"]["schemas"]
    client.api("POST", "/api/pools", {"name": "east", "servers": ["srv-1"]})
    client.api("POST", "/api/domains", {"name": "west", "pool": "east"})
    client.api("POST", "/api/encoders", {"encoder_id": "cam-1", "domain": "west"})
    assert set(client.api("GET", "/api/pools").json()["pools"][0]) == set(
        schemas["Pool"]["properties"])
    assert set(client.api("GET", "/api/pools/east").json()["pool"]) == set(
        schemas["Pool"]["properties"])
    domain = client.api("GET", "/api/domains/west").json()["domain"]
    assert set(domain) == set(schemas["Domain"]["properties"]) and domain["pool"] == "east"
    encoder = client.api("GET", "/api/encoders/cam-1").json()["encoder"]
    assert set(encoder) == set(schemas["Encoder"]["properties"]) and encoder["pool"] is None
    server = client.api("PATCH", "/api/servers/srv-1", {"weight": 2}).json()["server"]
    assert set(server) == set(schemas["ServerSummary"]["properties"])
