"""The admin web site: ``make_admin_site(store, core, config, clock, started_at, service=...)``.

One resource answers every path (a small route table), so the rules that
matter are applied in one place, before any handler runs:

* every page and every ``/api/`` call needs a live admin session, except the
  login page, ``POST /login``, ``POST /api/login`` and ``/static/``; without
  one, pages redirect to ``/login`` and the API answers 401;
* every POST, PATCH and DELETE needs the session's CSRF token: the form field
  ``csrf`` for pages, the ``X-CSRF-Token`` header for the API (whose bodies
  must also be ``application/json``); the login form uses a double-submit
  cookie instead, since it has no session yet;
* a session whose account was deleted, lost its admin role or had its
  password changed ends at its next request;
* every response carries the security headers of :mod:`evserver.admin.web`.

The site speaks plain HTTP to its transport: the server serves it over TLS
(see ``evserver.admin.tlsreload.ReloadingTLSOptions``), which is why the
cookies are ``Secure`` and why nothing here looks at the scheme.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import quote

import attrs
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from evserver import __version__
from evserver.admin import pages
from evserver.admin.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    LoginLimiter,
    Session,
    SessionTable,
    fingerprint,
    new_token,
    tokens_equal,
)
from evserver.admin.changes import Changes, FieldError, parse_servers, parse_weight
from evserver.admin.msr import (
    PREREQUISITES,
    ClusterHost,
    MsrError,
    MultiSite,
    join_command,
    utc_text,
)
from evserver.admin.status import ServerView
from evserver.admin.web import (
    SECURITY_HEADERS,
    AdminRequest,
    Cookie,
    Response,
    html,
    json_error,
    plain,
    redirect,
    safe_next,
    segment,
)
from evserver.config import ServerConfig
from evserver.passwords import hash_password, verify_password
from evserver.state.relay import RelayCore
from evserver.store import Store

log = Logger()

MAX_FIELD_CHARS = 4096
AUDIT_PAGE_LIMIT = 200
STATIC_FILES = {
    "style.css": b"text/css; charset=utf-8",
    "live.js": b"text/javascript; charset=utf-8",
}


_TOKEN_RE = re.compile(rb"[A-Za-z0-9_-]{43}")


class BadRequest(Exception):
    """Input that cannot even be read (bad encoding, not JSON, too large...)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@attrs.define
class Call:
    """One request as the handlers see it."""

    request: Any
    args: list[str]
    session: Session | None = None
    is_api: bool = False

    @property
    def client(self) -> str:
        address = self.request.getClientAddress()
        host = getattr(address, "host", None)
        return str(host) if host is not None else str(address)

    def query(self, name: str) -> str | None:
        values = self.request.args.get(name.encode("ascii"))
        if not values:
            return None
        try:
            return str(values[0].decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest(f"query parameter {name!r} is not UTF-8") from None

    def form(self) -> dict[str, str]:
        """The first value of each form field, as text."""
        out: dict[str, str] = {}
        for raw_key, values in (self.request.args or {}).items():
            try:
                key = raw_key.decode("utf-8")
                value = values[0].decode("utf-8") if values else ""
            except UnicodeDecodeError:
                raise BadRequest("the form is not valid UTF-8") from None
            if len(value) > MAX_FIELD_CHARS:
                raise BadRequest(f"field {key!r} is too long")
            out.setdefault(key, value)
        return out

    def json(self) -> dict[str, Any]:
        import json

        content_type = (self.request.getHeader(b"content-type") or b"").split(b";")[0]
        if content_type.strip().lower() != b"application/json":
            raise BadRequest("send the body as application/json", 415)
        self.request.content.seek(0)
        body = self.request.content.read()
        try:
            data = json.loads(body.decode("utf-8")) if body.strip() else {}
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data


Handler = Callable[[Call], "Response | Deferred[Response]"]


@attrs.frozen
class Route:
    method: bytes
    pattern: tuple[str, ...]  # "*" matches any one segment
    handler: Handler
    public: bool = False  # answers without a session
    csrf: bool = True  # for unsafe methods: needs the session's CSRF token


def _match(pattern: tuple[str, ...], segments: list[str]) -> list[str] | None:
    if len(pattern) != len(segments):
        return None
    captured = []
    for want, got in zip(pattern, segments, strict=True):
        if want == "*":
            captured.append(got)
        elif want != got:
            return None
    return captured


class AdminSite:
    """Everything the admin site knows; ``resource`` is its root resource."""

    def __init__(
        self,
        store: Store,
        core: RelayCore,
        config: ServerConfig,
        clock: IReactorTime,
        started_at: float,
        *,
        defer_to_thread: Callable[..., Deferred[Any]] = threads.deferToThread,
        password_hasher: Callable[[str], str] = hash_password,
        sessions: SessionTable | None = None,
        limiter: LoginLimiter | None = None,
        service: ClusterHost | None = None,
    ) -> None:
        self.store = store
        self.core = core
        self.config = config
        self.clock = clock
        self.view = ServerView(store, core, config, clock.seconds, started_at)
        #: The cluster, through the running server (``service.cluster``).
        self.msr = MultiSite(self.view, service, clock.seconds)
        self.view.cluster_summary = self.cluster_summary
        self.sessions = sessions or SessionTable(clock)
        self.limiter = limiter or LoginLimiter(clock)
        self.changes = Changes(store, config.server_id, self.sessions,
                               password_hasher, defer_to_thread)
        self._defer_to_thread = defer_to_thread
        self._password_hasher = password_hasher
        self._dummy_hash: str | None = None
        self.routes = self._routes()
        self.resource = AdminResource(self)

    # -- plumbing ----------------------------------------------------------

    def _routes(self) -> list[Route]:
        from evserver.admin.api import api_routes

        get, post = b"GET", b"POST"
        return [
            Route(get, ("static", "*"), self.static, public=True),
            Route(get, ("favicon.ico",), self.no_icon, public=True),
            Route(get, ("login",), self.login_form, public=True),
            Route(post, ("login",), self.login, public=True, csrf=False),
            Route(post, ("logout",), self.logout),
            Route(get, (), self.home),
            Route(get, ("settings",), self.settings),
            Route(get, ("servers", "*"), self.server),
            Route(post, ("servers", "*", "weight"), self.set_weight),
            Route(get, ("msr",), self.msr_page),
            Route(post, ("msr", "enable"), self.msr_enable),
            Route(post, ("msr", "tokens"), self.msr_token),
            Route(post, ("msr", "servers", "*", "remove"), self.msr_remove),
            Route(get, ("domains",), self.domains),
            Route(post, ("domains",), self.create_domain),
            Route(get, ("domains", "*"), self.domain),
            Route(post, ("domains", "*", "pool"), self.set_domain_pool),
            Route(post, ("domains", "*", "delete"), self.delete_domain),
            Route(get, ("accounts",), self.accounts),
            Route(post, ("accounts",), self.create_account),
            Route(get, ("accounts", "*"), self.account),
            Route(post, ("accounts", "*", "password"), self.set_password),
            Route(post, ("accounts", "*", "role"), self.set_role),
            Route(post, ("accounts", "*", "delete"), self.delete_account),
            Route(get, ("encoders",), self.encoders),
            Route(post, ("encoders",), self.create_encoder),
            Route(get, ("encoders", "*"), self.encoder),
            Route(post, ("encoders", "*", "name"), self.rename_encoder),
            Route(post, ("encoders", "*", "secret"), self.new_secret),
            Route(post, ("encoders", "*", "pool"), self.set_encoder_pool),
            Route(post, ("encoders", "*", "delete"), self.delete_encoder),
            Route(get, ("pools",), self.pools),
            Route(post, ("pools",), self.create_pool),
            Route(get, ("pools", "*"), self.pool),
            Route(post, ("pools", "*"), self.update_pool),
            Route(post, ("pools", "*", "delete"), self.delete_pool),
            Route(get, ("audit",), self.audit),
            *api_routes(self),
        ]

    def chrome(self, session: Session | None, flashes: bool = True) -> pages.Chrome:
        return pages.Chrome(
            server_id=self.config.server_id,
            external_host=self.config.external_host,
            version=__version__,
            account=session.account if session else None,
            csrf=session.csrf_token if session else None,
            flashes=tuple(session.pop_flashes()) if session and flashes else (),
        )

    def current_session(self, request: Any) -> Session | None:
        raw = request.getCookie(SESSION_COOKIE.encode("ascii"))
        session = self.sessions.lookup(raw.decode("ascii", "replace") if raw else None)
        if session is None:
            return None
        account = self.store.get_account(session.account)
        if (
            account is None
            or account.role != "admin"
            or fingerprint(account.password_hash) != session.password_fingerprint
        ):
            self.sessions.end(session.id)
            return None
        return session

    def csrf_ok(self, call: Call) -> bool:
        assert call.session is not None
        if call.is_api:
            sent = call.request.getHeader(CSRF_HEADER.encode("ascii"))
            token = sent.decode("ascii", "replace") if sent else None
        else:
            token = call.form().get(CSRF_FIELD)
        return tokens_equal(token, call.session.csrf_token)

    def error(self, call: Call, status: int, title: str, message: str) -> Response:
        if call.is_api:
            return json_error(status, message)
        return html(pages.error_page(self.chrome(call.session), title, message), status)

    def not_found(self, call: Call) -> Response:
        return self.error(call, 404, "Not found", "There is no such page.")

    def dispatch(self, request: Any) -> Response | Deferred[Response]:
        try:
            segments = [s.decode("utf-8") for s in request.postpath]
        except UnicodeDecodeError:
            return plain(400, "The path is not UTF-8.")
        if segments and segments[-1] == "" and len(segments) > 1:
            segments = segments[:-1]
        if segments == [""]:
            segments = []
        is_api = bool(segments) and segments[0] == "api"
        method = request.method
        if method == b"HEAD":
            method = b"GET"
        candidates = [(r, a) for r in self.routes
                      if (a := _match(r.pattern, segments)) is not None]
        call = Call(request, [], None, is_api)
        if getattr(request, "too_large", False):
            return self.error(call, 413, "Too large", "The request body is too large.")
        chosen = next(((r, a) for r, a in candidates if r.method == method), None)
        if not chosen or not chosen[0].public:
            call.session = self.current_session(request)
            if call.session is None:
                if is_api:
                    return json_error(401, "login required: POST /api/login first")
                if method == b"GET":
                    here = "/" + "/".join(segment(s) for s in segments)
                    return redirect("/login" + ("" if here == "/" else "?next=" + quote(here)))
                return redirect("/login")
        if chosen is None:
            if candidates:
                allowed = sorted({r.method.decode() for r, _ in candidates})
                response = self.error(call, 405, "Method not allowed",
                                      f"Use {', '.join(allowed)} here.")
                response.headers[b"allow"] = ", ".join(allowed).encode("ascii")
                return response
            return self.not_found(call)
        route, call.args = chosen
        try:
            if method != b"GET" and route.csrf and not self.csrf_ok(call):
                return self.error(call, 403, "Form expired",
                                  "Missing or wrong CSRF token: reload the page and try again."
                                  if not is_api else
                                  f"missing or wrong CSRF token: send the {CSRF_HEADER} "
                                  "header with the token from GET /api/session")
            result = route.handler(call)
        except BadRequest as e:
            return self.error(call, e.status, "Bad request", e.message)
        if isinstance(result, Deferred):
            result.addErrback(self._deferred_error, call)
        return result

    def _deferred_error(self, failure: Failure, call: Call) -> Response:
        if failure.check(BadRequest):
            e = failure.value
            return self.error(call, e.status, "Bad request", e.message)  # type: ignore[union-attr]
        return failure  # type: ignore[return-value]

    # -- static ------------------------------------------------------------

    @functools.cache  # noqa: B019 - a handful of files, for the site's lifetime
    def _static_bytes(self, name: str) -> bytes:
        return resources.files("evserver.admin").joinpath("static", name).read_bytes()

    def static(self, call: Call) -> Response:
        name = call.args[0]
        if name not in STATIC_FILES:
            return plain(404, "No such file.")
        response = Response(200, self._static_bytes(name), STATIC_FILES[name])
        response.headers[b"cache-control"] = b"no-cache"
        return response

    def no_icon(self, call: Call) -> Response:
        return plain(404, "No icon.")

    # -- login and logout ----------------------------------------------------

    def bootstrap_hint(self) -> str | None:
        if any(a.role == "admin" for a in self.store.list_accounts()):
            return None
        data = str(self.config.data_dir)
        return (f"evserver-ctl --data {data} domain add DOMAIN\n"
                f"evserver-ctl --data {data} account add --admin --domain DOMAIN NAME")

    def _login_page(self, call: Call, status: int = 200, *, name: str = "",
                    error: str | None = None, notice: str | None = None,
                    next_path: str = "/", headers: dict[bytes, bytes] | None = None,
                    ) -> Response:
        # Reuse the browser's login token if it has one, so that two login
        # tabs (or a favicon fetch redirected here) do not undo each other.
        raw = call.request.getCookie(LOGIN_COOKIE.encode("ascii"))
        token = raw.decode("ascii") if raw and _TOKEN_RE.fullmatch(raw) else new_token()
        page = pages.login_page(self.chrome(None), token, name=name, error=error,
                                notice=notice, bootstrap=self.bootstrap_hint(),
                                next_path=next_path)
        response = html(page, status)
        response.cookies.append(Cookie(LOGIN_COOKIE, token))
        response.headers.update(headers or {})
        return response

    def login_form(self, call: Call) -> Response:
        if self.current_session(call.request) is not None:
            return redirect(safe_next(call.query("next")))
        notice = "You are logged out." if call.query("bye") is not None else None
        return self._login_page(call, notice=notice, next_path=safe_next(call.query("next")))

    def _password_matches(self, name: str, password: str) -> Deferred[Any]:
        """Fires with the account if the password is right (admin or not), else None."""
        account = self.store.get_account(name)
        if account is None:
            # As much work as for a real account: the time taken does not
            # tell which names exist.
            if self._dummy_hash is None:
                self._dummy_hash = self._password_hasher("evserver-timing-equaliser")
            d = self._defer_to_thread(verify_password, self._dummy_hash, password)
            d.addCallback(lambda _: None)
            return d
        d = self._defer_to_thread(verify_password, account.password_hash, password)
        d.addCallback(lambda ok: account if ok else None)
        return d

    @defer.inlineCallbacks
    def authenticate(self, call: Call, name: object, password: object) -> Any:
        """(session, None) on success, else (None, (status, message, retry_after))."""
        if not isinstance(name, str) or not isinstance(password, str) or not name:
            return None, (400, "Give an account name and a password.", 0)
        if len(name) > 256 or len(password) > MAX_FIELD_CHARS:
            return None, (400, "The name or the password is too long.", 0)
        client = call.client
        refusal = self.limiter.check(client, name)
        if refusal is not None:
            return None, (429, refusal.message, refusal.retry_after)
        account = yield self._password_matches(name, password)
        if account is None or account.role != "admin":
            self.limiter.failed(client, name)
            if account is None:
                return None, (401, "Wrong account name or password.", 0)
            return None, (403, f"Account {name!r} is not an administrator.", 0)
        session = self.sessions.create(account.name, account.password_hash, client)
        self.changes.audit(account.name, "login", account.name, f"from {client}")
        return session, None

    @defer.inlineCallbacks
    def login(self, call: Call) -> Any:
        form = call.form()
        next_path = safe_next(form.get("next"))
        cookie = call.request.getCookie(LOGIN_COOKIE.encode("ascii"))
        if not tokens_equal(form.get(CSRF_FIELD), cookie.decode("ascii", "replace")
                            if cookie else None):
            return self._login_page(
                call, 403, name=form.get("name", ""), next_path=next_path,
                error="The login form expired or did not come from this site: "
                      "please try again.")
        session, refused = yield self.authenticate(call, form.get("name"), form.get("password"))
        if refused is not None:
            status, message, retry = refused
            headers = {b"retry-after": str(retry).encode()} if retry else None
            return self._login_page(call, status, name=form.get("name", "")[:256],
                                    error=message, next_path=next_path, headers=headers)
        response = redirect(next_path)
        response.cookies.append(Cookie(SESSION_COOKIE, session.id))
        response.cookies.append(Cookie(LOGIN_COOKIE, "", max_age=0))
        return response

    def end_session(self, session: Session) -> list[Cookie]:
        self.sessions.end(session.id)
        self.changes.audit(session.account, "logout", session.account)
        return [Cookie(SESSION_COOKIE, "", max_age=0)]

    def logout(self, call: Call) -> Response:
        assert call.session is not None
        response = redirect("/login?bye=1")
        response.cookies.extend(self.end_session(call.session))
        return response

    # -- pages ---------------------------------------------------------------

    def home(self, call: Call) -> Response:
        return html(pages.home_page(self.chrome(call.session), self.view))

    def settings(self, call: Call) -> Response:
        return html(pages.settings_page(self.chrome(call.session), self.view,
                                        self.msr.status()))

    def _server_page(self, call: Call, server_id: str, status: int = 200,
                     errors: dict[str | None, str] | None = None,
                     value: str | None = None) -> Response | Deferred[Response]:
        if server_id == self.config.server_id:
            return html(pages.server_page(self.chrome(call.session), self.view,
                                          self.msr.weight(server_id), errors, value), status)
        row = self.msr.server(server_id)
        if row is None:
            return self.error(call, 404, "Unknown server",
                              f"This server is {self.config.server_id!r}; its cluster has "
                              f"no server {server_id!r}.")

        def render(connections: dict[str, Any]) -> Response:
            return html(pages.remote_server_page(self.chrome(call.session), row, connections,
                                                 errors, value), status)

        # Another server is asked over the peer link (up to 2 s).
        connections = self.msr.server_connections(server_id)
        if isinstance(connections, Deferred):
            return connections.addCallback(render)
        return render(connections)

    def server(self, call: Call) -> Response | Deferred[Response]:
        return self._server_page(call, call.args[0])

    def known_servers(self) -> list[str]:
        """The servers of the cluster (this one first); standalone: this one."""
        return [row["server_id"] for row in self.msr.servers()]

    def set_server_weight(self, session: Session, server_id: str, weight: object) -> float:
        """Set a server's capacity weight (audited); MsrError 404 if no such server."""
        if self.msr.server(server_id) is None:
            raise MsrError(f"there is no server {server_id!r} in this cluster", 404)
        return self.changes.set_server_weight(session, server_id, weight)

    def set_weight(self, call: Call) -> Response | Deferred[Response]:
        assert call.session is not None
        server_id = call.args[0]
        text = call.form().get("weight", "")
        try:
            weight = self.set_server_weight(call.session, server_id, parse_weight(text))
        except MsrError as e:
            return self.error(call, e.status, "Unknown server", e.message)
        except FieldError as e:
            return self._server_page(call, server_id, e.status, e.fields, text)
        return self._flash(call, f"Server {server_id!r} now weighs {weight:g}.",
                           pages.server_path(server_id))

    # multi-site resilience

    def cluster_summary(self) -> dict[str, Any]:
        status = self.msr.status()
        return {"enabled": status["enabled"], "servers": status["servers"],
                "cluster_id": status["cluster_id"]}

    def _msr_page(self, call: Call, status: int = 200, error: str | None = None) -> Response:
        rows = self.msr.servers()
        return html(pages.msr_page(self.chrome(call.session), self.msr.status(), rows,
                                   self.msr.warnings(rows), PREREQUISITES, error), status)

    def msr_page(self, call: Call) -> Response:
        return self._msr_page(call)

    def enable_msr(self, session: Session) -> str:
        """Enable multi-site resilience (audited); returns the new cluster's id."""
        identity = self.msr.enable()
        self.changes.audit(session.account, "msr.enable", identity.cluster_id,
                           "this server is now a cluster of one")
        return str(identity.cluster_id)

    def create_join_token(self, session: Session, lifetime: int | None = None) -> Any:
        """A new join token (audited by its id, never its secret)."""
        token = (self.msr.mint_token() if lifetime is None
                 else self.msr.mint_token(lifetime))
        self.changes.audit(session.account, "msr.token", token.token_id,
                           f"admits one server via {token.addresses[0]} until "
                           f"{utc_text(token.expires)}")
        return token

    def remove_server(self, session: Session, server_id: str) -> None:
        row = self.msr.server(server_id)
        self.msr.remove(server_id)
        self.changes.audit(session.account, "msr.remove", server_id,
                           f"was {row['state'] if row else 'unknown'}")

    def msr_enable(self, call: Call) -> Response:
        assert call.session is not None
        try:
            cluster_id = self.enable_msr(call.session)
        except MsrError as e:
            return self._msr_page(call, e.status, e.message)
        return self._flash(call, f"Multi-site resilience is enabled: this server is now "
                                 f"cluster {cluster_id}, a cluster of one. Its encoders and "
                                 f"viewers stayed connected.", "/msr")

    def msr_token(self, call: Call) -> Response:
        assert call.session is not None
        try:
            token = self.create_join_token(call.session)
        except MsrError as e:
            return self._msr_page(call, e.status, e.message)
        text = token.encode()
        return html(pages.token_page(self.chrome(call.session), text, token.token_id,
                                     utc_text(token.expires), join_command(text)))

    def msr_remove(self, call: Call) -> Response:
        assert call.session is not None
        server_id = call.args[0]
        try:
            self.remove_server(call.session, server_id)
        except MsrError as e:
            if e.status == 404:
                return self.error(call, 404, "Unknown server", e.message)
            return self._msr_page(call, e.status, e.message)
        return self._flash(call, f"Server {server_id!r} was removed from the cluster.", "/msr")

    def audit(self, call: Call) -> Response:
        entries = self.store.list_audit(AUDIT_PAGE_LIMIT)
        return html(pages.audit_page(self.chrome(call.session), entries, AUDIT_PAGE_LIMIT))

    def _flash(self, call: Call, message: str, to: str) -> Response:
        assert call.session is not None
        call.session.flashes.append(message)
        return redirect(to)

    # domains

    def _domains_page(self, call: Call, status: int = 200, name: str = "",
                      errors: dict[str | None, str] | None = None) -> Response:
        return html(pages.domains_page(
            self.chrome(call.session), self.store.list_domains(), self.store.list_accounts(),
            self.store.list_encoders(), name=name, errors=errors,
            pools=self.store.list_pools()), status)

    def domains(self, call: Call) -> Response:
        return self._domains_page(call)

    def create_domain(self, call: Call) -> Response:
        assert call.session is not None
        name = call.form().get("name", "")
        try:
            domain = self.changes.create_domain(call.session, name)
        except FieldError as e:
            return self._domains_page(call, e.status, name, e.fields)
        return self._flash(call, f"Domain {domain.name!r} created.", "/domains")

    def _domain_page(self, call: Call, name: str, status: int = 200,
                     errors: dict[str | None, str] | None = None,
                     failed: str | None = None) -> Response:
        domain = self.store.get_domain(name)
        if domain is None:
            return self.error(call, 404, "Unknown domain", f"There is no domain {name!r}.")
        return html(pages.domain_page(
            self.chrome(call.session), domain, self.store.list_accounts(name),
            self.store.list_encoders(name), errors, pools=self.store.list_pools(),
            failed=failed), status)

    def domain(self, call: Call) -> Response:
        return self._domain_page(call, call.args[0])

    def delete_domain(self, call: Call) -> Response:
        assert call.session is not None
        name = call.args[0]
        try:
            self.changes.delete_domain(call.session, name)
        except FieldError as e:
            if e.status == 404:
                return self.error(call, 404, "Unknown domain", e.message)
            return self._domain_page(call, name, e.status, {None: e.message}, "delete")
        return self._flash(call, f"Domain {name!r} deleted.", "/domains")

    def set_domain_pool(self, call: Call) -> Response:
        assert call.session is not None
        name = call.args[0]
        try:
            domain = self.changes.set_domain_pool(call.session, name,
                                                  call.form().get("pool", ""))
        except FieldError as e:
            if e.status == 404:
                return self.error(call, 404, "Unknown domain", e.message)
            return self._domain_page(call, name, e.status, dict(e.fields), "pool")
        return self._flash(call, f"Domain {name!r} has no pool now." if domain.pool is None
                           else f"Domain {name!r} now uses pool {domain.pool!r}.",
                           "/domains/" + segment(name))

    # pools

    def _pools_page(self, call: Call, status: int = 200, form: dict[str, str] | None = None,
                    errors: dict[str | None, str] | None = None) -> Response:
        pools = self.store.list_pools()
        users = {p.name: self.store.pool_users(p.name) for p in pools}
        return html(pages.pools_page(self.chrome(call.session), pools, users,
                                     self.known_servers(), form=form, errors=errors), status)

    def pools(self, call: Call) -> Response:
        return self._pools_page(call)

    def create_pool(self, call: Call) -> Response:
        assert call.session is not None
        form = call.form()
        try:
            pool = self.changes.create_pool(
                call.session, form.get("name", ""), parse_servers(form.get("servers", "")),
                form.get("description", ""), self.known_servers())
        except FieldError as e:
            return self._pools_page(call, e.status, form, e.fields)
        return self._flash(call, f"Pool {pool.name!r} created.", "/pools/" + segment(pool.name))

    def _pool_page(self, call: Call, name: str, status: int = 200,
                   form: dict[str, str] | None = None,
                   errors: dict[str | None, str] | None = None,
                   failed: str | None = None) -> Response:
        pool = self.store.get_pool(name)
        if pool is None:
            return self.error(call, 404, "Unknown pool", f"There is no pool {name!r}.")
        encoders, domains = self.store.pool_users(name)
        return html(pages.pool_page(self.chrome(call.session), pool, encoders, domains,
                                    self.known_servers(), form=form, errors=errors,
                                    failed=failed), status)

    def pool(self, call: Call) -> Response:
        return self._pool_page(call, call.args[0])

    def _pool_refused(self, call: Call, e: FieldError, failed: str,
                      form: dict[str, str] | None = None) -> Response:
        if e.status == 404:
            return self.error(call, 404, "Unknown pool", e.message)
        return self._pool_page(call, call.args[0], e.status, form, dict(e.fields), failed)

    def update_pool(self, call: Call) -> Response:
        assert call.session is not None
        name = call.args[0]
        form = call.form()
        try:
            servers = form.get("servers")
            self.changes.update_pool(call.session, name,
                                     None if servers is None else parse_servers(servers),
                                     form.get("description"), self.known_servers())
        except FieldError as e:
            return self._pool_refused(call, e, "edit", form)
        return self._flash(call, f"Pool {name!r} saved.", "/pools/" + segment(name))

    def delete_pool(self, call: Call) -> Response:
        assert call.session is not None
        name = call.args[0]
        try:
            self.changes.delete_pool(call.session, name)
        except FieldError as e:
            e.fields = {None: e.message}
            return self._pool_refused(call, e, "delete")
        return self._flash(call, f"Pool {name!r} deleted.", "/pools")

    # accounts

    def _accounts_page(self, call: Call, status: int = 200, form: dict[str, str] | None = None,
                       errors: dict[str | None, str] | None = None) -> Response:
        return html(pages.accounts_page(
            self.chrome(call.session), self.store.list_accounts(), self.store.list_domains(),
            form=form, errors=errors), status)

    def accounts(self, call: Call) -> Response:
        return self._accounts_page(call)

    @defer.inlineCallbacks
    def create_account(self, call: Call) -> Any:
        assert call.session is not None
        form = call.form()
        try:
            account = yield self.changes.create_account(
                call.session, form.get("name", ""), form.get("domain", ""),
                form.get("password", ""), form.get("role", "viewer"))
        except FieldError as e:
            return self._accounts_page(call, e.status, form, e.fields)
        return self._flash(call, f"Account {account.name!r} created.", "/accounts")

    def _account_page(self, call: Call, name: str, status: int = 200,
                      errors: dict[str | None, str] | None = None,
                      failed: str | None = None) -> Response:
        account = self.store.get_account(name)
        if account is None:
            return self.error(call, 404, "Unknown account", f"There is no account {name!r}.")
        return html(pages.account_page(self.chrome(call.session), account, errors, failed),
                    status)

    def account(self, call: Call) -> Response:
        return self._account_page(call, call.args[0])

    def _account_refused(self, call: Call, e: FieldError, failed: str) -> Response:
        if e.status == 404:
            return self.error(call, 404, "Unknown account", e.message)
        fields = dict(e.fields)
        if failed == "delete":
            fields = {None: e.message}
        return self._account_page(call, call.args[0], e.status, fields, failed)

    @defer.inlineCallbacks
    def set_password(self, call: Call) -> Any:
        assert call.session is not None
        name = call.args[0]
        try:
            yield self.changes.set_password(call.session, name, call.form().get("password", ""))
        except FieldError as e:
            return self._account_refused(call, e, "password")
        return self._flash(call, f"Password of {name!r} changed.", "/accounts/" + segment(name))

    def set_role(self, call: Call) -> Response:
        assert call.session is not None
        name = call.args[0]
        try:
            account = self.changes.set_role(call.session, name, call.form().get("role", ""))
        except FieldError as e:
            return self._account_refused(call, e, "role")
        return self._flash(call, f"{name!r} is now {account.role}.",
                           "/accounts/" + segment(name))

    def delete_account(self, call: Call) -> Response:
        assert call.session is not None
        name = call.args[0]
        try:
            self.changes.delete_account(call.session, name)
        except FieldError as e:
            return self._account_refused(call, e, "delete")
        return self._flash(call, f"Account {name!r} deleted.", "/accounts")

    # encoders

    def _encoders_page(self, call: Call, status: int = 200, form: dict[str, str] | None = None,
                       errors: dict[str | None, str] | None = None) -> Response:
        return html(pages.encoders_page(
            self.chrome(call.session), self.view.encoders(), self.store.list_domains(),
            form=form, errors=errors), status)

    def encoders(self, call: Call) -> Response:
        return self._encoders_page(call)

    def create_encoder(self, call: Call) -> Response:
        assert call.session is not None
        form = call.form()
        name = form.get("name", "")
        try:
            encoder, secret = self.changes.create_encoder(
                call.session, form.get("encoder_id", ""), form.get("domain", ""),
                name if name != "" else None)
        except FieldError as e:
            return self._encoders_page(call, e.status, form, e.fields)
        return html(pages.encoder_created_page(self.chrome(call.session), self.view,
                                               encoder, secret))

    def encoder_row(self, encoder_id: str) -> dict[str, Any] | None:
        return next((r for r in self.view.encoders() if r["encoder_id"] == encoder_id), None)

    def _encoder_page(self, call: Call, encoder_id: str, status: int = 200,
                      errors: dict[str | None, str] | None = None, failed: str | None = None,
                      name: str | None = None, new_secret: str | None = None) -> Response:
        encoder = self.store.get_encoder(encoder_id)
        row = self.encoder_row(encoder_id)
        if encoder is None or row is None:
            return self.error(call, 404, "Unknown encoder",
                              f"There is no encoder {encoder_id!r}.")
        return html(pages.encoder_page(self.chrome(call.session), self.view, encoder, row,
                                       errors=errors, failed=failed, name=name,
                                       new_secret=new_secret, pools=self.store.list_pools()),
                    status)

    def encoder(self, call: Call) -> Response:
        return self._encoder_page(call, call.args[0])

    def _encoder_refused(self, call: Call, e: FieldError, failed: str,
                         name: str | None = None) -> Response:
        if e.status == 404:
            return self.error(call, 404, "Unknown encoder", e.message)
        return self._encoder_page(call, call.args[0], e.status, dict(e.fields), failed, name)

    def rename_encoder(self, call: Call) -> Response:
        assert call.session is not None
        encoder_id = call.args[0]
        name = call.form().get("name", "")
        try:
            self.changes.rename_encoder(call.session, encoder_id, name)
        except FieldError as e:
            return self._encoder_refused(call, e, "name", name)
        return self._flash(call, f"Encoder {encoder_id!r} renamed.",
                           "/encoders/" + segment(encoder_id))

    def set_encoder_pool(self, call: Call) -> Response:
        assert call.session is not None
        encoder_id = call.args[0]
        try:
            encoder = self.changes.set_encoder_pool(call.session, encoder_id,
                                                    call.form().get("pool", ""))
        except FieldError as e:
            return self._encoder_refused(call, e, "pool")
        return self._flash(call, f"Encoder {encoder_id!r} has no pool of its own now."
                           if encoder.pool is None else
                           f"Encoder {encoder_id!r} now uses pool {encoder.pool!r}.",
                           "/encoders/" + segment(encoder_id))

    def new_secret(self, call: Call) -> Response:
        assert call.session is not None
        encoder_id = call.args[0]
        try:
            secret = self.changes.new_encoder_secret(call.session, encoder_id)
        except FieldError as e:
            return self._encoder_refused(call, e, "secret")
        return self._encoder_page(call, encoder_id, new_secret=secret)

    def delete_encoder(self, call: Call) -> Response:
        assert call.session is not None
        encoder_id = call.args[0]
        try:
            self.changes.delete_encoder(call.session, encoder_id)
        except FieldError as e:
            if e.status != 404:
                e.fields = {None: e.message}
            return self._encoder_refused(call, e, "delete")
        return self._flash(call, f"Encoder {encoder_id!r} deleted.", "/encoders")


class AdminResource(Resource):
    """The root resource: every request goes through :meth:`AdminSite.dispatch`."""

    isLeaf = True

    def __init__(self, site: AdminSite) -> None:
        super().__init__()
        self.site = site

    def render(self, request: Any) -> int:
        finished: list[Any] = []
        request.notifyFinish().addBoth(finished.append)
        try:
            result = self.site.dispatch(request)
        except Exception:
            log.failure("admin site error on {path}", path=request.path)
            result = plain(500, "Internal error: see the server log.")
        d: Deferred[Any] = defer.maybeDeferred(lambda: result)
        d.addErrback(self._internal_error, request)
        d.addCallback(self._write, request, finished)
        return NOT_DONE_YET

    @staticmethod
    def _internal_error(failure: Failure, request: Any) -> Response:
        log.failure("admin site error on {path}", failure, path=request.path)
        return plain(500, "Internal error: see the server log.")

    @staticmethod
    def _write(response: Response, request: Any, finished: list[Any]) -> None:
        if finished:
            return  # the client went away while we were busy
        request.setResponseCode(response.status)
        for key, value in SECURITY_HEADERS.items():
            request.setHeader(key, value)
        request.setHeader(b"content-type", response.content_type)
        for key, value in response.headers.items():
            request.setHeader(key, value)
        for cookie in response.cookies:
            request.addCookie(
                cookie.name, cookie.value, path="/", secure=True, httpOnly=True,
                sameSite="strict",
                max_age=None if cookie.max_age is None else str(cookie.max_age),
                expires="Thu, 01 Jan 1970 00:00:00 GMT" if cookie.max_age == 0 else None,
            )
        request.setHeader(b"content-length", str(len(response.body)).encode("ascii"))
        request.write(response.body)
        request.finish()


class AdminHTTPSite(Site):
    """twisted.web's Site, without access-log lines for the pages' live polling."""

    requestFactory = AdminRequest
    displayTracebacks = False

    def __init__(self, admin: AdminSite) -> None:
        # The injected clock also drives HTTP timeouts and log time stamps.
        super().__init__(admin.resource, reactor=admin.clock)
        self.admin = admin

    def log(self, request: Any) -> None:
        if (request.method == b"GET" and request.code == 200
                and request.uri.startswith(b"/api/")):
            return
        super().log(request)


def make_admin_site(
    store: Store,
    core: RelayCore,
    config: ServerConfig,
    clock: IReactorTime,
    started_at: float,
    **options: Any,
) -> Site:
    """The admin web site of this server, to be served over TLS on ``config.admin_endpoint``.

    ``options`` are :class:`AdminSite`'s keyword arguments: ``service``, the
    running server (its ``cluster`` attribute and ``check_cluster()``; without
    it the site sees no cluster and enabling waits for the server's own
    check), and for tests ``defer_to_thread``, ``password_hasher``,
    ``sessions``, ``limiter``.  The ``AdminSite`` is reachable as ``site.admin``.
    """
    return AdminHTTPSite(AdminSite(store, core, config, clock, started_at, **options))
