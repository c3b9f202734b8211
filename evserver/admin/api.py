"""The JSON API under ``/api/`` (documented in ``docs/admin-api.yaml``).

It does what the pages do, through the same :class:`~evserver.admin.changes.Changes`,
so it validates the same way: a refusal is ``{"error": message, "field": name}``
with status 400 (invalid), 404 (no such record), 409 (exists already, not
empty, last administrator) or 415 (body not JSON).  Authentication: POST
``/api/login``, then send the session cookie and, on every POST, PATCH and
DELETE, the ``X-CSRF-Token`` header (the token comes with the login answer and
from GET ``/api/session``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from evserver.admin.auth import SESSION_COOKIE
from evserver.admin.changes import FieldError, check_field
from evserver.admin.msr import MsrError, check_lifetime, join_command
from evserver.admin.web import Cookie, Response, json_error, json_response
from evserver.passwords import check_password
from evserver.store import Account, AuditEntry, Domain, Pool

if TYPE_CHECKING:
    from evserver.admin.site import AdminSite, Call, Route

MAX_AUDIT_LIMIT = 1000


def domain_json(domain: Domain, accounts: int, encoders: int) -> dict[str, Any]:
    return {"name": domain.name, "created": domain.created, "updated": domain.updated,
            "accounts": accounts, "encoders": encoders, "pool": domain.pool}


def pool_json(pool: Pool, encoders: list[str], domains: list[str]) -> dict[str, Any]:
    return {"name": pool.name, "servers": list(pool.servers), "description": pool.description,
            "encoders": encoders, "domains": domains}


def account_json(account: Account) -> dict[str, Any]:
    return {"name": account.name, "domain": account.domain, "role": account.role,
            "created": account.created, "updated": account.updated}


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {"id": entry.id, "at": entry.at, "actor": entry.actor,
            "server_id": entry.server_id, "action": entry.action, "target": entry.target,
            "detail": entry.detail}


def refused(e: FieldError) -> Response:
    return json_error(e.status, e.message, e.field, e.fields)


def api_routes(site: AdminSite) -> list[Route]:
    from evserver.admin.site import Route

    api = Api(site)
    get, post, put, patch, delete = b"GET", b"POST", b"PUT", b"PATCH", b"DELETE"
    return [
        Route(post, ("api", "login"), api.login, public=True, csrf=False),
        Route(get, ("api", "session"), api.session),
        Route(post, ("api", "logout"), api.logout),
        Route(get, ("api", "server"), api.server),
        Route(get, ("api", "servers"), api.servers),
        Route(get, ("api", "servers", "*"), api.cluster_server),
        Route(patch, ("api", "servers", "*"), api.update_server),
        Route(delete, ("api", "servers", "*"), api.remove_server),
        Route(get, ("api", "msr"), api.msr),
        Route(post, ("api", "msr", "enable"), api.msr_enable),
        Route(post, ("api", "msr", "tokens"), api.msr_token),
        Route(get, ("api", "encoders"), api.encoders),
        Route(post, ("api", "encoders"), api.create_encoder),
        Route(get, ("api", "encoders", "*"), api.encoder),
        Route(patch, ("api", "encoders", "*"), api.update_encoder),
        Route(delete, ("api", "encoders", "*"), api.delete_encoder),
        Route(post, ("api", "encoders", "*", "secret"), api.new_secret),
        Route(get, ("api", "viewers"), api.viewers),
        Route(get, ("api", "domains"), api.domains),
        Route(post, ("api", "domains"), api.create_domain),
        Route(get, ("api", "domains", "*"), api.domain),
        Route(patch, ("api", "domains", "*"), api.update_domain),
        Route(delete, ("api", "domains", "*"), api.delete_domain),
        Route(get, ("api", "pools"), api.pools),
        Route(post, ("api", "pools"), api.create_pool),
        Route(get, ("api", "pools", "*"), api.pool),
        Route(put, ("api", "pools", "*"), api.update_pool),
        Route(post, ("api", "pools", "*"), api.update_pool),
        Route(delete, ("api", "pools", "*"), api.delete_pool),
        Route(get, ("api", "accounts"), api.accounts),
        Route(post, ("api", "accounts"), api.create_account),
        Route(get, ("api", "accounts", "*"), api.account),
        Route(patch, ("api", "accounts", "*"), api.update_account),
        Route(delete, ("api", "accounts", "*"), api.delete_account),
        Route(get, ("api", "audit"), api.audit),
    ]


def _check_fields(data: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(data) - allowed, key=str)
    if unknown:
        raise FieldError(str(unknown[0]), f"unknown field {unknown[0]!r}; allowed: "
                                          f"{', '.join(sorted(allowed))}")
    for name in sorted(required):
        if name not in data:
            raise FieldError(name, f"{name} is required")


def _optional_json(call: Call) -> dict[str, Any]:
    """The JSON body, or {} when there is no body at all."""
    call.request.content.seek(0)
    if not call.request.content.read(1):
        return {}
    return call.json()


class Api:
    """The API's handlers; each takes a Call and answers a Response (or a Deferred of one)."""

    def __init__(self, site: AdminSite) -> None:
        self.site = site
        self.store = site.store
        self.view = site.view
        self.changes = site.changes

    # -- session -------------------------------------------------------------

    @defer.inlineCallbacks
    def login(self, call: Call) -> Any:
        data = call.json()
        try:
            _check_fields(data, {"name", "password"}, {"name", "password"})
        except FieldError as e:
            return refused(e)
        session, failure = yield self.site.authenticate(call, data["name"], data["password"])
        if failure is not None:
            status, message, retry = failure
            if not retry:
                return json_error(status, message)
            response = json_response({"error": message, "retry_after": retry}, status)
            response.headers[b"retry-after"] = str(retry).encode("ascii")
            return response
        response = json_response({"account": session.account,
                                  "csrf_token": session.csrf_token})
        response.cookies.append(Cookie(SESSION_COOKIE, session.id))
        return response

    def session(self, call: Call) -> Response:
        assert call.session is not None
        s = call.session
        return json_response({
            "account": s.account,
            "csrf_token": s.csrf_token,
            "server_id": self.site.config.server_id,
            "idle_timeout": self.site.sessions.idle_timeout,
        })

    def logout(self, call: Call) -> Response:
        assert call.session is not None
        response = json_response({"logged_out": True})
        response.cookies.extend(self.site.end_session(call.session))
        return response

    # -- this server ---------------------------------------------------------

    def server(self, call: Call) -> Response:
        return json_response(self.view.server())

    # -- the cluster ---------------------------------------------------------

    def servers(self, call: Call) -> Response:
        rows = self.site.msr.servers()
        return json_response({"servers": rows, "cluster": self.site.msr.status(),
                              "warnings": self.site.msr.warnings(rows)})

    def cluster_server(self, call: Call) -> Response | Deferred[Response]:
        """One server, and the encoders and viewers connected to it (another server is
        asked over the peer link: up to 2 s)."""
        server_id = call.args[0]
        row = self.site.msr.server(server_id)
        if row is None:
            return json_error(404, f"no server {server_id!r} in this cluster")

        def answer(connections: dict[str, Any]) -> Response:
            return json_response({"server": row, **connections})

        connections = self.site.msr.server_connections(server_id)
        if isinstance(connections, Deferred):
            return connections.addCallback(answer)
        return answer(connections)

    def update_server(self, call: Call) -> Response:
        """Set a server's capacity weight: ``{"weight": number}``, null for the default."""
        assert call.session is not None
        data = call.json()
        try:
            _check_fields(data, {"weight"}, {"weight"})
            self.site.set_server_weight(call.session, call.args[0], data["weight"])
        except FieldError as e:
            return refused(e)
        except MsrError as e:
            return json_error(e.status, e.message)
        row = self.site.msr.server(call.args[0])
        return json_response({"server": row})

    def remove_server(self, call: Call) -> Response:
        assert call.session is not None
        try:
            self.site.remove_server(call.session, call.args[0])
        except MsrError as e:
            return json_error(e.status, e.message)
        return json_response({"deleted": call.args[0]})

    def msr(self, call: Call) -> Response:
        return json_response({"cluster": self.site.msr.status()})

    def msr_enable(self, call: Call) -> Response:
        assert call.session is not None
        try:
            _check_fields(_optional_json(call), set(), set())
            self.site.enable_msr(call.session)
        except FieldError as e:
            return refused(e)
        except MsrError as e:
            return json_error(e.status, e.message)
        return json_response({"cluster": self.site.msr.status(),
                              "servers": self.site.msr.servers()})

    def msr_token(self, call: Call) -> Response:
        assert call.session is not None
        data = _optional_json(call)
        try:
            _check_fields(data, {"lifetime"}, set())
            lifetime = None
            if "lifetime" in data:
                lifetime = check_field("lifetime", lambda: check_lifetime(data["lifetime"]))
            token = self.site.create_join_token(call.session, lifetime)
        except FieldError as e:
            return refused(e)
        except MsrError as e:
            return json_error(e.status, e.message)
        text = token.encode()
        return json_response({"token": text, "token_id": token.token_id,
                              "expires": token.expires, "command": join_command(text)}, 201)

    def viewers(self, call: Call) -> Response:
        return json_response({"viewers": self.view.viewers()})

    # -- encoders ------------------------------------------------------------

    def encoders(self, call: Call) -> Response:
        connected = call.query("connected")
        rows = self.view.encoders()
        if connected not in (None, "", "0"):
            rows = [r for r in rows if r["server_id"] == self.site.config.server_id]
        return json_response({"encoders": rows})

    def _encoder(self, encoder_id: str) -> Response:
        row = self.site.encoder_row(encoder_id)
        if row is None:
            return json_error(404, f"no encoder with id {encoder_id!r}")
        return json_response({"encoder": row})

    def encoder(self, call: Call) -> Response:
        return self._encoder(call.args[0])

    def create_encoder(self, call: Call) -> Response:
        assert call.session is not None
        data = call.json()
        try:
            _check_fields(data, {"encoder_id", "domain", "name", "secret", "pool"},
                          {"encoder_id", "domain"})
            encoder, secret = self.changes.create_encoder(
                call.session, data["encoder_id"], data["domain"], data.get("name"),
                data.get("secret"), data.get("pool"))
        except FieldError as e:
            return refused(e)
        row = self.site.encoder_row(encoder.encoder_id)
        return json_response({"encoder": row, "secret": secret}, 201)

    def update_encoder(self, call: Call) -> Response:
        """Rename an encoder, set its own pool (null: none), or both."""
        assert call.session is not None
        data = call.json()
        encoder_id = call.args[0]
        try:
            _check_fields(data, {"name", "pool"}, set())
            if not data:
                raise FieldError(None, "give a new name, a pool (null for none) or both")
            if self.store.get_encoder(encoder_id) is None:
                raise FieldError(None, f"no encoder with id {encoder_id!r}", 404)
            if "pool" in data:  # check it before changing anything
                self.changes.pool_ref("pool", data["pool"])
            if "name" in data:
                self.changes.rename_encoder(call.session, encoder_id, data["name"])
            if "pool" in data:
                self.changes.set_encoder_pool(call.session, encoder_id, data["pool"])
        except FieldError as e:
            return refused(e)
        return self._encoder(encoder_id)

    def new_secret(self, call: Call) -> Response:
        assert call.session is not None
        try:
            secret = self.changes.new_encoder_secret(call.session, call.args[0])
        except FieldError as e:
            return refused(e)
        return json_response({"encoder_id": call.args[0], "secret": secret})

    def delete_encoder(self, call: Call) -> Response:
        assert call.session is not None
        try:
            self.changes.delete_encoder(call.session, call.args[0])
        except FieldError as e:
            return refused(e)
        return json_response({"deleted": call.args[0]})

    # -- domains -------------------------------------------------------------

    def _domain_rows(self) -> list[dict[str, Any]]:
        accounts: dict[str, int] = {}
        encoders: dict[str, int] = {}
        for a in self.store.list_accounts():
            accounts[a.domain] = accounts.get(a.domain, 0) + 1
        for e in self.store.list_encoders():
            encoders[e.domain] = encoders.get(e.domain, 0) + 1
        return [domain_json(d, accounts.get(d.name, 0), encoders.get(d.name, 0))
                for d in self.store.list_domains()]

    def domains(self, call: Call) -> Response:
        return json_response({"domains": self._domain_rows()})

    def _domain(self, name: str, status: int = 200) -> Response:
        row = next((d for d in self._domain_rows() if d["name"] == name), None)
        if row is None:
            return json_error(404, f"no domain named {name!r}")
        return json_response({"domain": row}, status)

    def domain(self, call: Call) -> Response:
        return self._domain(call.args[0])

    def create_domain(self, call: Call) -> Response:
        assert call.session is not None
        data = call.json()
        try:
            _check_fields(data, {"name", "pool"}, {"name"})
            domain = self.changes.create_domain(call.session, data["name"], data.get("pool"))
        except FieldError as e:
            return refused(e)
        return self._domain(domain.name, 201)

    def update_domain(self, call: Call) -> Response:
        """Set a domain's pool: ``{"pool": name}``, null for none."""
        assert call.session is not None
        data = call.json()
        try:
            _check_fields(data, {"pool"}, {"pool"})
            domain = self.changes.set_domain_pool(call.session, call.args[0], data["pool"])
        except FieldError as e:
            return refused(e)
        return self._domain(domain.name)

    def delete_domain(self, call: Call) -> Response:
        assert call.session is not None
        try:
            self.changes.delete_domain(call.session, call.args[0])
        except FieldError as e:
            return refused(e)
        return json_response({"deleted": call.args[0]})

    # -- pools ---------------------------------------------------------------

    def _pool(self, name: str, status: int = 200) -> Response:
        pool = self.store.get_pool(name)
        if pool is None:
            return json_error(404, f"no pool named {name!r}")
        return json_response({"pool": pool_json(pool, *self.store.pool_users(name))}, status)

    def pools(self, call: Call) -> Response:
        return json_response({"pools": [pool_json(p, *self.store.pool_users(p.name))
                                        for p in self.store.list_pools()]})

    def pool(self, call: Call) -> Response:
        return self._pool(call.args[0])

    def create_pool(self, call: Call) -> Response:
        assert call.session is not None
        data = call.json()
        try:
            _check_fields(data, {"name", "servers", "description"}, {"name", "servers"})
            pool = self.changes.create_pool(call.session, data["name"], data["servers"],
                                            data.get("description", ""),
                                            self.site.known_servers())
        except FieldError as e:
            return refused(e)
        return self._pool(pool.name, 201)

    def update_pool(self, call: Call) -> Response:
        """Change a pool's servers, description or both (PUT or POST)."""
        assert call.session is not None
        data = call.json()
        try:
            _check_fields(data, {"servers", "description"}, set())
            if not data:
                raise FieldError(None, "give the pool's servers, its description or both")
            for key in sorted(data):
                if data[key] is None:
                    raise FieldError(key, f"{key} must not be null")
            self.changes.update_pool(call.session, call.args[0], data.get("servers"),
                                     data.get("description"), self.site.known_servers())
        except FieldError as e:
            return refused(e)
        return self._pool(call.args[0])

    def delete_pool(self, call: Call) -> Response:
        assert call.session is not None
        try:
            self.changes.delete_pool(call.session, call.args[0])
        except FieldError as e:
            return refused(e)
        return json_response({"deleted": call.args[0]})

    # -- accounts ------------------------------------------------------------

    def accounts(self, call: Call) -> Response:
        return json_response({"accounts": [account_json(a) for a in self.store.list_accounts()]})

    def account(self, call: Call) -> Response:
        account = self.store.get_account(call.args[0])
        if account is None:
            return json_error(404, f"no account named {call.args[0]!r}")
        return json_response({"account": account_json(account)})

    @defer.inlineCallbacks
    def create_account(self, call: Call) -> Any:
        assert call.session is not None
        data = call.json()
        try:
            _check_fields(data, {"name", "domain", "password", "role"},
                          {"name", "domain", "password"})
            account = yield self.changes.create_account(
                call.session, data["name"], data["domain"], data["password"],
                data.get("role", "viewer"))
        except FieldError as e:
            return refused(e)
        return json_response({"account": account_json(account)}, 201)

    @defer.inlineCallbacks
    def update_account(self, call: Call) -> Any:
        assert call.session is not None
        name = call.args[0]
        data = call.json()
        try:
            _check_fields(data, {"password", "role"}, set())
            if not data:
                raise FieldError(None, "give a new password, a new role or both")
            if self.store.get_account(name) is None:
                raise FieldError(None, f"no account named {name!r}", 404)
            if "password" in data:  # check it before changing anything
                check_field("password", lambda: check_password(data["password"]))
            if "role" in data:
                self.changes.set_role(call.session, name, data["role"])
            if "password" in data:
                yield self.changes.set_password(call.session, name, data["password"])
        except FieldError as e:
            return refused(e)
        account = self.store.get_account(name)
        assert account is not None
        return json_response({"account": account_json(account)})

    def delete_account(self, call: Call) -> Response:
        assert call.session is not None
        try:
            self.changes.delete_account(call.session, call.args[0])
        except FieldError as e:
            return refused(e)
        return json_response({"deleted": call.args[0]})

    # -- audit ---------------------------------------------------------------

    def audit(self, call: Call) -> Response:
        raw = call.query("limit")
        try:
            limit = 100 if raw is None else int(raw)
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_AUDIT_LIMIT:
            return json_error(400, f"limit must be a whole number 1..{MAX_AUDIT_LIMIT}",
                              "limit")
        return json_response({"entries": [audit_json(e)
                                          for e in self.store.list_audit(limit)]})
