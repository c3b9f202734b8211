"""The admin site's pages, built with twisted.web.template (escaped by construction).

Every function here returns a tag tree; nothing builds HTML from strings.
Live parts carry ``data-live-*`` attributes that ``static/live.js`` uses to
refresh them from the JSON API every few seconds:

* ``data-live-src="/api/..."`` on a container names the API document;
* ``data-live-key="load.viewers"`` on an element: its text is that value;
* a ``<table data-live-list="encoders">``: its rows are rebuilt from that
  list, one cell per ``<th data-key=...>`` (``data-format`` and
  ``data-link`` as in :class:`Column`);
* ``<ul data-live-items="warnings">``: its items are that list of strings;
* ``data-live-format`` beside ``data-live-key``: the value is shown as a
  table cell of that format would show it (a state badge, "12.5 ms"...).

Keys may be dotted paths (``load.viewers``), in live keys and table columns.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.web.template import Tag, tags

from evserver.admin.auth import CSRF_FIELD
from evserver.admin.status import ServerView, human_bytes
from evserver.admin.web import segment
from evserver.store import (
    DEFAULT_WEIGHT,
    MAX_WEIGHT,
    ROLES,
    Account,
    AuditEntry,
    Domain,
    Encoder,
    Pool,
)

NAV = (
    ("home", "/", "Home"),
    ("server", None, "This server"),  # /servers/<this server's id>
    ("msr", "/msr", "Multi-site resilience"),
    ("domains", "/domains", "Domains"),
    ("accounts", "/accounts", "Accounts"),
    ("encoders", "/encoders", "Encoders"),
    ("pools", "/pools", "Pools"),
    ("audit", "/audit", "Audit log"),
    ("settings", "/settings", "Settings"),
)


@attrs.frozen
class Chrome:
    """What every page's header and footer show."""

    server_id: str
    external_host: str
    version: str
    account: str | None = None
    csrf: str | None = None
    flashes: Sequence[str] = ()


@attrs.frozen
class Column:
    """A column of a live table: JSON key, heading, format and optional link.

    ``fmt``: None (text), "bytes", "list" (comma separated), "state" (a badge),
    "yesno", "ms" (milliseconds), "mbps" (Mbit/s), "url" (an https link,
    showing host:port) or
    "action" (when the value is true, the ``<template id=...>`` named by
    ``template``, its ``{key}`` placeholders filled from the row).
    ``link``: a path with ``{key}`` placeholders, each filled with that row
    value quoted as one path segment.
    """

    key: str
    label: str
    fmt: str | None = None
    link: str | None = None
    numeric: bool = False
    template: str | None = None
    #: For "action": what the cell says when the value is false.
    otherwise: str | None = None


def server_path(server_id: str) -> str:
    return "/servers/" + segment(server_id)


def timestamp(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- page frame --------------------------------------------------------------


def layout(chrome: Chrome, title: str, active: str | None, *content: Any,
           live_src: str | None = None, wide: bool = False) -> Tag:
    nav_items = []
    for key, href, label in NAV:
        path = server_path(chrome.server_id) if href is None else href
        link = tags.a(label, href=path)
        if key == active:
            link(**{"aria-current": "page", "class": "active"})
        nav_items.append(tags.li(link))
    header_children: list[Any] = [
        tags.div(
            tags.a("evserver", href="/", class_="brand"),
            tags.span(
                "server ", tags.code(chrome.server_id), " · ", chrome.external_host,
                class_="server-name",
            ),
            class_="title",
        )
    ]
    if chrome.account is not None:
        header_children.append(tags.nav(tags.ul(*nav_items), **{"aria-label": "Main"}))
        header_children.append(
            tags.form(
                tags.span(chrome.account, class_="who"),
                csrf_input(chrome),
                tags.button("Log out", type="submit", class_="link"),
                method="post", action="/logout", class_="logout",
            )
        )
    flashes = [tags.p(text, class_="flash", role="status") for text in chrome.flashes]
    footer: list[Any] = [f"evserver {chrome.version} · server {chrome.server_id}"]
    if chrome.account is not None:  # the article's link, at the foot of every page
        footer[:0] = [tags.a("All server settings", href="/settings"), " · "]
    main = Tag("main")(tags.h1(title), *flashes, *content, id="main")  # not in tags
    if live_src is not None:
        main(**{"data-live-src": live_src})
    footer_tag = tags.footer(*footer)
    if wide:
        main(class_="wide")
        footer_tag(class_="wide")
    return tags.html(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(f"{title} · evserver {chrome.server_id}"),
            tags.link(rel="stylesheet", href="/static/style.css"),
            tags.script(src="/static/live.js", defer="defer"),
        ),
        tags.body(
            tags.header(*header_children, class_="top"),
            main,
            footer_tag,
        ),
        lang="en",
    )


def csrf_input(chrome: Chrome) -> Tag:
    return tags.input(type="hidden", name=CSRF_FIELD, value=chrome.csrf or "")


def error_for(errors: dict[str | None, str], name: str | None) -> list[Tag]:
    message = errors.get(name)
    if message is None:
        return []
    return [tags.p(message, class_="error", id=f"{name or 'form'}-error", role="alert")]


def text_field(label: str, name: str, value: str = "", errors: dict[str | None, str] | None = None,
               *, kind: str = "text", hint: str | None = None, required: bool = True,
               autocomplete: str | None = None) -> Tag:
    errors = errors or {}
    attributes: dict[str, Any] = {"type": kind, "name": name, "id": f"f-{name}"}
    if kind != "password":
        attributes["value"] = value
    if required:
        attributes["required"] = "required"
    if autocomplete:
        attributes["autocomplete"] = autocomplete
    if name in errors:
        attributes["aria-invalid"] = "true"
        attributes["aria-describedby"] = f"{name}-error"
    parts: list[Any] = [tags.label(label, **{"for": f"f-{name}"}), tags.input(**attributes)]
    if hint:
        parts.append(tags.small(hint, class_="hint"))
    parts.extend(error_for(errors, name))
    return tags.div(*parts, class_="field" + (" invalid" if name in errors else ""))


def select_field(label: str, name: str, options: Sequence[tuple[str, str]], selected: str = "",
                 errors: dict[str | None, str] | None = None) -> Tag:
    errors = errors or {}
    opts = []
    for value, text in options:
        opt = tags.option(text, value=value)
        if value == selected:
            opt(selected="selected")
        opts.append(opt)
    attributes: dict[str, Any] = {"name": name, "id": f"f-{name}"}
    if name in errors:
        attributes["aria-invalid"] = "true"
        attributes["aria-describedby"] = f"{name}-error"
    return tags.div(
        tags.label(label, **{"for": f"f-{name}"}),
        tags.select(*opts, **attributes),
        *error_for(errors, name),
        class_="field" + (" invalid" if name in errors else ""),
    )


def post_form(chrome: Chrome, action: str, *fields: Any, button: str,
              danger: bool = False, confirm: str | None = None,
              errors: dict[str | None, str] | None = None, inline: bool = False) -> Tag:
    button_tag = tags.button(button, type="submit", class_="danger" if danger else "primary")
    form = tags.form(
        csrf_input(chrome), *error_for(errors or {}, None), *fields,
        tags.div(button_tag, class_="actions"),
        method="post", action=action, class_="inline" if inline else "stacked",
    )
    if confirm:
        form(**{"data-confirm": confirm})
    return form


def state_badge(state: str) -> Tag:
    return tags.span(state, class_=f"badge state-{state}")


def lookup(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, following dots (``load.viewers``); None when absent."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def format_cell(value: Any, fmt: str | None) -> Any:
    if fmt == "ms":
        return "—" if value is None else f"{float(value):.1f} ms"
    if fmt == "mbps":
        return "—" if value is None else f"{float(value):.1f} Mbit/s"
    if fmt == "url":
        if isinstance(value, str) and value.startswith("https://"):
            return tags.a(value[len("https://"):].rstrip("/"), href=value)
        return "—"
    if fmt == "bytes":
        return "—" if value is None else human_bytes(int(value))
    if fmt == "list":
        return ", ".join(str(v) for v in value) if value else "—"
    if fmt == "state":
        return state_badge(str(value))
    if fmt == "yesno":
        return "yes" if value else "no"
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:g}"  # as live.js shows a number: 1, 2.5
    return str(value)


def live_table(list_key: str, columns: Sequence[Column], rows: Sequence[dict[str, Any]],
               empty: str, caption: str | None = None,
               actions: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
               table_class: str | None = None) -> Tag:
    """A table whose rows live.js rebuilds; ``actions`` render the "action" columns'
    cells here (by template id), as live.js does from the templates."""
    head = []
    for col in columns:
        th = tags.th(col.label, scope="col", **{"data-key": col.key})
        if col.fmt:
            th(**{"data-format": col.fmt})
        if col.link:
            th(**{"data-link": col.link})
        if col.template:
            th(**{"data-template": col.template})
        if col.otherwise:
            th(**{"data-otherwise": col.otherwise})
        if col.numeric:
            th(class_="num")
        head.append(th)
    body = []
    for row in rows:
        cells = []
        for col in columns:
            if col.fmt == "action":
                assert actions is not None and col.template is not None
                content = (actions[col.template](row) if lookup(row, col.key)
                           else tags.span(col.otherwise or "", class_="hint"))
            else:
                content = format_cell(lookup(row, col.key), col.fmt)
            if col.link:
                href = col.link
                for key, value in row.items():
                    href = href.replace("{" + key + "}", segment(str(value)))
                content = tags.a(content, href=href)
            cells.append(tags.td(content, class_="num") if col.numeric else tags.td(content))
        body.append(tags.tr(*cells))
    table = tags.table(
        *([tags.caption(caption)] if caption else []),
        tags.thead(tags.tr(*head)),
        tags.tbody(*body),
        **{"data-live-list": list_key, "data-empty": empty},
    )
    if table_class:
        table(class_=table_class)
    return tags.div(
        table,
        tags.p(empty, class_="empty", hidden="hidden") if rows else tags.p(empty, class_="empty"),
        class_="table-wrap",
    )


def static_table(headings: Sequence[str], rows: Sequence[Sequence[Any]], empty: str,
                 numeric: Sequence[int] = ()) -> Tag:
    if not rows:
        return tags.p(empty, class_="empty")
    return tags.div(
        tags.table(
            tags.thead(tags.tr(*[
                tags.th(h, scope="col", class_="num") if i in numeric else tags.th(h, scope="col")
                for i, h in enumerate(headings)
            ])),
            tags.tbody(*[
                tags.tr(*[
                    tags.td(c, class_="num") if i in numeric else tags.td(c)
                    for i, c in enumerate(row)
                ])
                for row in rows
            ]),
        ),
        class_="table-wrap",
    )


def definition_list(items: Sequence[tuple[str, Any]]) -> Tag:
    parts: list[Tag] = []
    for term, value in items:
        parts.append(tags.dt(term))
        parts.append(tags.dd(value))
    return tags.dl(*parts, class_="facts")


def live(key: str, value: Any, fmt: str | None = None) -> Tag:
    if fmt is None:
        return tags.span("—" if value is None else str(value), **{"data-live-key": key})
    return tags.span(format_cell(value, fmt), **{"data-live-key": key, "data-live-format": fmt})


# -- login -------------------------------------------------------------------


def login_page(chrome: Chrome, token: str, *, name: str = "", error: str | None = None,
               notice: str | None = None, bootstrap: str | None = None,
               next_path: str = "/") -> Tag:
    parts: list[Any] = []
    intro: list[Any] = []
    if notice:
        parts.append(tags.p(notice, class_="flash", role="status"))
    if bootstrap:
        intro.append(tags.div(
            tags.p(tags.strong("No administrator account exists yet.")),
            tags.p("Create the first one on this server's machine, with the server's "
                   "data directory, for example:"),
            tags.pre(bootstrap),
            tags.p("Then log in here with that name and password."),
            class_="notice",
        ))
    if error:
        parts.append(tags.p(error, class_="error", role="alert", id="form-error"))
    parts.append(tags.form(
        tags.input(type="hidden", name=CSRF_FIELD, value=token),
        tags.input(type="hidden", name="next", value=next_path),
        text_field("Account name", "name", name, autocomplete="username"),
        text_field("Password", "password", kind="password", autocomplete="current-password"),
        tags.div(tags.button("Log in", type="submit", class_="primary"), class_="actions"),
        method="post", action="/login", class_="stacked login",
    ))
    return layout(chrome, "Log in", None, *intro, tags.div(*parts, class_="login-box"))


# -- homepage ----------------------------------------------------------------


def warnings_list(warnings: Sequence[str], key: str = "warnings") -> Tag:
    ul = tags.ul(*[tags.li(w) for w in warnings], class_="warnings",
                 **{"data-live-items": key})
    if not warnings:
        ul(hidden="hidden")
    return ul


def load_facts(view: ServerView) -> Tag:
    load = view.load()
    return definition_list([
        ("Encoders online", live("load.encoders_online", load["encoders_online"])),
        ("Encoders streaming", live("load.encoders_streaming", load["encoders_streaming"])),
        ("Viewers", live("load.viewers", load["viewers"])),
        ("Active streams", live("load.channels", load["channels"])),
    ])


def home_page(chrome: Chrome, view: ServerView) -> Tag:
    server = view.server()
    ports = [
        (p["carries"], tags.code(p["endpoint"]), str(p["external_port"]),
         "TLS" if p["tls"] else "plain TCP")
        for p in server["ports"]
    ]
    return layout(
        chrome, "Server home", "home",
        warnings_list(server["warnings"]),
        tags.div(
            tags.section(
                tags.h2("This server"),
                definition_list([
                    ("Server id", tags.code(server["server_id"])),
                    ("Version", server["version"]),
                    ("Uptime", live("uptime_text", server["uptime_text"])),
                    ("External address", server["external_host"]),
                    ("Admin site", tags.a(server["admin_url"], href=server["admin_url"])),
                    ("Multi-site resilience", tags.a(cluster_text(server["cluster"]),
                                                     href="/msr")),
                    ("Registered encoders", live("encoders_registered",
                                                 server["encoders_registered"])),
                ]),
                class_="card",
            ),
            tags.section(
                tags.h2("Load"),
                load_facts(view),
                tags.p(tags.a("Connected encoders and viewers",
                              href=server_path(view.server_id)), class_="more"),
                class_="card",
            ),
            class_="cards",
        ),
        tags.section(
            tags.h2("Ports"),
            static_table(("Carries", "Listening endpoint", "External port", "Security"),
                         ports, "No ports.", numeric=(2,)),
        ),
        live_src="/api/server",
    )


def cluster_text(cluster: dict[str, Any]) -> str:
    if not cluster["enabled"]:
        return "not enabled (standalone server)"
    n = cluster["servers"]
    return f"enabled: a cluster of {n} server{'s' if n != 1 else ''}"


# -- all server settings -------------------------------------------------------


def settings_page(chrome: Chrome, view: ServerView, msr: dict[str, Any]) -> Tag:
    rows = [(s.description, tags.code(s.name), s.text) for s in view.settings()]
    cert = view.certificate()
    if cert is None:
        cert_part: Any = tags.p("No TLS certificate file was found in the data directory.",
                                class_="empty")
    else:
        cert_part = definition_list([
            ("File", tags.code(cert.path)),
            ("Names", ", ".join(cert.names) or "—"),
            ("Valid", f"{cert.not_before:%Y-%m-%d} to {cert.not_after:%Y-%m-%d}"),
            ("SHA-256 fingerprint", tags.code(cert.sha256, class_="fingerprint")),
            ("Issuer", "self-signed" if cert.self_signed else "a certificate authority"),
        ])
    return layout(
        chrome, "All server settings", "settings",
        tags.nav(tags.ul(
            tags.li(tags.a("Server configuration", href="#configuration")),
            tags.li(tags.a("TLS certificate", href="#certificate")),
            tags.li(tags.a("Multi-site resilience", href="#multi-site")),
        ), class_="toc", **{"aria-label": "Sections"}),
        tags.section(
            tags.h2("Server configuration", id="configuration"),
            tags.p("Set when the server starts (twistd evserver options); shown read-only.",
                   class_="hint"),
            static_table(("Setting", "Name", "Value"), rows, "No settings."),
        ),
        tags.section(
            tags.h2("TLS certificate", id="certificate"),
            cert_part,
            tags.p("To change it, replace server.pem and server.key (each atomically, the key "
                   "first): new connections to this site use the new certificate within a "
                   "few seconds, without a restart.", class_="hint"),
        ),
        tags.section(
            tags.h2("Multi-site resilience", id="multi-site"),
            tags.p(
                "This server is standalone: multi-site resilience is not enabled."
                if not msr["enabled"] else
                f"Enabled: cluster {msr['cluster_id'] or '(starting)'}, "
                f"{cluster_text(msr)[len('enabled: '):]}."
            ),
            tags.p(tags.a("Multi-site resilience", href="/msr", class_="button-link"),
                   " ", tags.span("the servers of the cluster, join tokens"
                                  if msr["enabled"] else
                                  "enable it, and see what the servers need", class_="hint")),
        ),
    )


# -- this server: connected encoders and viewers ---------------------------------

CONNECTED_ENCODER_COLUMNS = (
    Column("encoder_id", "Encoder id", link="/encoders/{encoder_id}"),
    Column("name", "Name"),
    Column("domain", "Domain"),
    Column("state", "State", fmt="state"),
    Column("viewers", "Viewers", numeric=True),
    Column("frames_in", "Frames in", numeric=True),
    Column("bytes_in", "Bytes in", fmt="bytes", numeric=True),
)

VIEWER_COLUMNS = (
    Column("account", "Account", link="/accounts/{account}"),
    Column("domain", "Domain"),
    Column("watching", "Watching", fmt="list"),
    Column("queued_bytes", "Queued", fmt="bytes", numeric=True),
    Column("frames_out", "Frames out", numeric=True),
    Column("frames_skipped", "Skipped", numeric=True),
)


def server_page(chrome: Chrome, view: ServerView, weight: float = DEFAULT_WEIGHT,
                errors: dict[str | None, str] | None = None, value: str | None = None) -> Tag:
    return layout(
        chrome, f"This server: {view.server_id}", "server",
        tags.div(
            tags.section(load_facts(view), class_="card", **{"data-live-src": "/api/server"}),
            weight_card(chrome, view.server_id, weight, errors, value),
            class_="cards",
        ),
        tags.section(
            tags.h2("Connected encoders"),
            live_table("encoders", CONNECTED_ENCODER_COLUMNS, view.connected_encoders(),
                       "No encoder is connected to this server."),
            **{"data-live-src": "/api/encoders?connected=1"},
        ),
        tags.section(
            tags.h2("Connected viewers"),
            live_table("viewers", VIEWER_COLUMNS, view.viewers(),
                       "No viewer is connected to this server."),
            **{"data-live-src": "/api/viewers"},
        ),
    )


# -- domains -------------------------------------------------------------------


def pool_link(pool: str | None, pools: Sequence[Pool]) -> Any:
    """A pool reference: a link to the pool, "—" for none, or the name of a pool that is
    gone (deleted on another server while assigned here: it counts as none)."""
    if pool is None:
        return "—"
    if any(p.name == pool for p in pools):
        return tags.a(pool, href="/pools/" + segment(pool))
    return tags.span(pool, " (no such pool: counts as none)", class_="hint")


def pool_options(pools: Sequence[Pool], current: str | None) -> list[tuple[str, str]]:
    options = [("", "— none —")] + [(p.name, f"{p.name} ({', '.join(p.servers)})")
                                    for p in pools]
    if current is not None and all(p.name != current for p in pools):
        options.append((current, f"{current} (no such pool)"))
    return options


def pool_card(chrome: Chrome, action: str, hint: str, pools: Sequence[Pool],
              current: str | None, errors: dict[str | None, str]) -> Tag:
    """The card that gives a domain or an encoder a pool (or none)."""
    return tags.section(
        tags.h2("Pool"),
        tags.p(hint, class_="hint"),
        post_form(chrome, action,
                  select_field("Pool", "pool", pool_options(pools, current), current or "",
                               errors),
                  button="Set pool", errors=errors),
        class_="card form-card",
    )


def domains_page(chrome: Chrome, domains: Sequence[Domain], accounts: Sequence[Account],
                 encoders: Sequence[Encoder], *, name: str = "",
                 errors: dict[str | None, str] | None = None,
                 pools: Sequence[Pool] = ()) -> Tag:
    account_counts = Counter(a.domain for a in accounts)
    encoder_counts = Counter(e.domain for e in encoders)
    rows = [
        (tags.a(d.name, href="/domains/" + segment(d.name)), str(account_counts[d.name]),
         str(encoder_counts[d.name]), pool_link(d.pool, pools), timestamp(d.created))
        for d in domains
    ]
    return layout(
        chrome, "Domains", "domains",
        static_table(("Domain", "Accounts", "Encoders", "Pool", "Created"), rows,
                     "No domains yet.", numeric=(1, 2)),
        tags.section(
            tags.h2("New domain"),
            post_form(chrome, "/domains",
                      text_field("Name", "name", name, errors,
                                 hint="1 to 64 printable characters"),
                      button="Create domain", errors=errors),
            class_="card form-card",
        ),
    )


def domain_page(chrome: Chrome, domain: Domain, accounts: Sequence[Account],
                encoders: Sequence[Encoder], errors: dict[str | None, str] | None = None,
                *, pools: Sequence[Pool] = (), failed: str | None = None) -> Tag:
    errors = errors or {}
    base = "/domains/" + segment(domain.name)

    def errs(which: str) -> dict[str | None, str]:
        return errors if failed == which else {}

    account_rows = [(tags.a(a.name, href="/accounts/" + segment(a.name)), a.role)
                    for a in accounts]
    encoder_rows = [(tags.a(e.encoder_id, href="/encoders/" + segment(e.encoder_id)), e.name,
                     pool_link(e.pool, pools)) for e in encoders]
    return layout(
        chrome, f"Domain {domain.name}", "domains",
        definition_list([("Name", domain.name), ("Pool", pool_link(domain.pool, pools)),
                         ("Created", timestamp(domain.created))]),
        tags.section(tags.h2("Accounts"),
                     static_table(("Account", "Role"), account_rows, "No accounts.")),
        tags.section(tags.h2("Encoders"),
                     static_table(("Encoder id", "Name", "Own pool"), encoder_rows,
                                  "No encoders.")),
        tags.div(
            pool_card(chrome, base + "/pool",
                      "The servers this domain's encoders prefer, unless an encoder has a "
                      "pool of its own.", pools, domain.pool, errs("pool")),
            tags.section(
                tags.h2("Delete"),
                tags.p("Only an empty domain (no accounts, no encoders) can be deleted.",
                       class_="hint"),
                post_form(chrome, base + "/delete",
                          button="Delete domain", danger=True, errors=errs("delete"),
                          confirm=f"Delete domain {domain.name}?"),
                class_="card danger-zone",
            ),
            class_="cards",
        ),
    )


# -- accounts ------------------------------------------------------------------

ROLE_OPTIONS = [(r, r) for r in ROLES]


def domain_options(domains: Sequence[Domain]) -> list[tuple[str, str]]:
    return [("", "— choose —")] + [(d.name, d.name) for d in domains]


def accounts_page(chrome: Chrome, accounts: Sequence[Account], domains: Sequence[Domain], *,
                  form: dict[str, str] | None = None,
                  errors: dict[str | None, str] | None = None) -> Tag:
    form = form or {}
    rows = [
        (tags.a(a.name, href="/accounts/" + segment(a.name)), a.domain, a.role,
         timestamp(a.created))
        for a in accounts
    ]
    return layout(
        chrome, "Accounts", "accounts",
        static_table(("Account", "Domain", "Role", "Created"), rows, "No accounts yet."),
        tags.section(
            tags.h2("New account"),
            post_form(
                chrome, "/accounts",
                text_field("Name", "name", form.get("name", ""), errors,
                           hint="1 to 64 printable characters", autocomplete="off"),
                select_field("Domain", "domain", domain_options(domains),
                             form.get("domain", ""), errors),
                text_field("Password", "password", errors=errors, kind="password",
                           autocomplete="new-password"),
                select_field("Role", "role", ROLE_OPTIONS, form.get("role", "viewer"), errors),
                button="Create account", errors=errors,
            ),
            class_="card form-card",
        ),
    )


def account_page(chrome: Chrome, account: Account,
                 errors: dict[str | None, str] | None = None, failed: str | None = None) -> Tag:
    errors = errors or {}
    base = "/accounts/" + segment(account.name)

    def errs(which: str) -> dict[str | None, str]:
        return errors if failed == which else {}

    return layout(
        chrome, f"Account {account.name}", "accounts",
        definition_list([
            ("Name", account.name),
            ("Domain", tags.a(account.domain, href="/domains/" + segment(account.domain))),
            ("Role", account.role),
            ("Created", timestamp(account.created)),
            ("Changed", timestamp(account.updated)),
        ]),
        tags.div(
            tags.section(
                tags.h2("Password"),
                post_form(chrome, base + "/password",
                          text_field("New password", "password", errors=errs("password"),
                                     kind="password", autocomplete="new-password"),
                          button="Set password", errors=errs("password")),
                class_="card form-card",
            ),
            tags.section(
                tags.h2("Role"),
                post_form(chrome, base + "/role",
                          select_field("Role", "role", ROLE_OPTIONS, account.role,
                                       errs("role")),
                          button="Change role", errors=errs("role")),
                class_="card form-card",
            ),
            tags.section(
                tags.h2("Delete"),
                post_form(chrome, base + "/delete", button="Delete account", danger=True,
                          errors=errs("delete"), confirm=f"Delete account {account.name}?"),
                class_="card form-card danger-zone",
            ),
            class_="cards",
        ),
    )


# -- encoders ------------------------------------------------------------------

ENCODER_COLUMNS = (
    Column("encoder_id", "Encoder id", link="/encoders/{encoder_id}"),
    Column("name", "Name"),
    Column("domain", "Domain"),
    Column("pool", "Own pool"),
    Column("state", "State", fmt="state"),
    Column("server_id", "Server"),
    Column("viewers", "Viewers", numeric=True),
)

ENCODER_STATE_COLUMNS = (
    *ENCODER_COLUMNS[4:],
    Column("frames_in", "Frames in", numeric=True),
    Column("bytes_in", "Bytes in", fmt="bytes", numeric=True),
)


def encoders_page(chrome: Chrome, rows: Sequence[dict[str, Any]], domains: Sequence[Domain], *,
                  form: dict[str, str] | None = None,
                  errors: dict[str | None, str] | None = None) -> Tag:
    form = form or {}
    return layout(
        chrome, "Encoders", "encoders",
        tags.section(
            live_table("encoders", ENCODER_COLUMNS, rows, "No encoders yet."),
            **{"data-live-src": "/api/encoders"},
        ),
        tags.section(
            tags.h2("New encoder"),
            post_form(
                chrome, "/encoders",
                text_field("Encoder id", "encoder_id", form.get("encoder_id", ""), errors,
                           hint="1 to 64 of A-Z a-z 0-9 . _ - (the encoder logs in with it)",
                           autocomplete="off"),
                text_field("Name", "name", form.get("name", ""), errors, required=False,
                           hint="shown to viewers; the id if left empty"),
                select_field("Domain", "domain", domain_options(domains),
                             form.get("domain", ""), errors),
                button="Create encoder", errors=errors,
            ),
            tags.p("A secret is generated for the encoder and shown once.", class_="hint"),
            class_="card form-card",
        ),
    )


def secret_box(view: ServerView, encoder: Encoder, secret: str) -> Tag:
    c = view.config
    return tags.div(
        tags.p(tags.strong("Copy the secret now: it is shown only this once."),
               " Only a hash of it is kept."),
        definition_list([
            ("Encoder id", tags.code(encoder.encoder_id)),
            ("Secret", tags.code(secret, class_="secret", id="secret")),
            ("Server", tags.code(f"{c.external_host}:{c.external_encoder_port}")),
        ]),
        tags.p("For example: ",
               tags.code(f"ev-encoder --server {c.external_host}:{c.external_encoder_port} "
                         f"--id {encoder.encoder_id} --secret {secret}")),
        class_="notice secret-box",
    )


def encoder_created_page(chrome: Chrome, view: ServerView, encoder: Encoder, secret: str) -> Tag:
    return layout(
        chrome, f"Encoder {encoder.encoder_id} created", "encoders",
        secret_box(view, encoder, secret),
        tags.p(tags.a("Back to encoders", href="/encoders"), " · ",
               tags.a("This encoder", href="/encoders/" + segment(encoder.encoder_id))),
    )


def encoder_page(chrome: Chrome, view: ServerView, encoder: Encoder, row: dict[str, Any], *,
                 errors: dict[str | None, str] | None = None, failed: str | None = None,
                 name: str | None = None, new_secret: str | None = None,
                 pools: Sequence[Pool] = ()) -> Tag:
    errors = errors or {}
    base = "/encoders/" + segment(encoder.encoder_id)

    def errs(which: str) -> dict[str | None, str]:
        return errors if failed == which else {}

    state_row = tags.div(
        live_table("encoder", ENCODER_STATE_COLUMNS, [row], "Not registered."),
        **{"data-live-src": "/api/encoders/" + segment(encoder.encoder_id)},
    )
    return layout(
        chrome, f"Encoder {encoder.encoder_id}", "encoders",
        *([secret_box(view, encoder, new_secret)] if new_secret else []),
        definition_list([
            ("Encoder id", tags.code(encoder.encoder_id)),
            ("Name", encoder.name),
            ("Domain", tags.a(encoder.domain, href="/domains/" + segment(encoder.domain))),
            ("Own pool", pool_link(encoder.pool, pools)),
            ("Created", timestamp(encoder.created)),
            ("Changed", timestamp(encoder.updated)),
        ]),
        tags.section(tags.h2("Live state"), state_row),
        tags.div(
            tags.section(
                tags.h2("Name"),
                post_form(chrome, base + "/name",
                          text_field("Name", "name", encoder.name if name is None else name,
                                     errs("name")),
                          button="Rename", errors=errs("name")),
                class_="card form-card",
            ),
            pool_card(chrome, base + "/pool",
                      "The servers this encoder prefers. With none of its own it follows "
                      "its domain's pool, if that has one.", pools, encoder.pool, errs("pool")),
            tags.section(
                tags.h2("Secret"),
                tags.p("A new secret replaces the old one: the encoder must then be "
                       "configured with it.", class_="hint"),
                post_form(chrome, base + "/secret", button="Generate a new secret",
                          errors=errs("secret"),
                          confirm=f"Replace the secret of {encoder.encoder_id}?"),
                class_="card form-card",
            ),
            tags.section(
                tags.h2("Delete"),
                tags.p("A connected encoder stays connected until it disconnects; it "
                       "cannot log in again.", class_="hint"),
                post_form(chrome, base + "/delete", button="Delete encoder", danger=True,
                          errors=errs("delete"), confirm=f"Delete encoder {encoder.encoder_id}?"),
                class_="card form-card danger-zone",
            ),
            class_="cards",
        ),
    )


# -- server pools ------------------------------------------------------------------

POOLS_INTRO = ("A pool names the servers that its encoders prefer: an encoder with a pool "
               "(its own, or else its domain's) is placed on one of the pool's servers "
               "instead of wherever balancing would put it, and on any server while all of "
               "them are down. A pool and its assignments are the same on every server of "
               "the cluster.")


def servers_hint(known: Sequence[str]) -> str:
    return ("Server ids, separated by commas, in order of preference. This cluster's "
            f"servers: {', '.join(known)}.")


def pools_page(chrome: Chrome, pools: Sequence[Pool],
               users: dict[str, tuple[list[str], list[str]]], known: Sequence[str], *,
               form: dict[str, str] | None = None,
               errors: dict[str | None, str] | None = None) -> Tag:
    form = form or {}
    rows = [
        (tags.a(p.name, href="/pools/" + segment(p.name)), ", ".join(p.servers),
         str(len(users[p.name][0])), str(len(users[p.name][1])), p.description or "—")
        for p in pools
    ]
    return layout(
        chrome, "Server pools", "pools",
        tags.p(POOLS_INTRO, class_="hint"),
        static_table(("Pool", "Servers", "Encoders", "Domains", "Description"), rows,
                     "No pools yet.", numeric=(2, 3)),
        tags.section(
            tags.h2("New pool"),
            post_form(
                chrome, "/pools",
                text_field("Name", "name", form.get("name", ""), errors,
                           hint="1 to 64 printable characters", autocomplete="off"),
                text_field("Servers", "servers", form.get("servers", ""), errors,
                           hint=servers_hint(known), autocomplete="off"),
                text_field("Description", "description", form.get("description", ""), errors,
                           required=False),
                button="Create pool", errors=errors,
            ),
            class_="card form-card",
        ),
    )


def pool_page(chrome: Chrome, pool: Pool, encoders: Sequence[str], domains: Sequence[str],
              known: Sequence[str], *, form: dict[str, str] | None = None,
              errors: dict[str | None, str] | None = None, failed: str | None = None) -> Tag:
    errors = errors or {}
    form = form or {}
    base = "/pools/" + segment(pool.name)

    def errs(which: str) -> dict[str | None, str]:
        return errors if failed == which else {}

    servers = []
    for server_id in pool.servers:
        if server_id in known:
            servers.append(tags.li(tags.a(server_id, href=server_path(server_id))))
        else:
            servers.append(tags.li(tags.code(server_id),
                                   tags.span(" (not a server of this cluster)", class_="hint")))
    encoder_rows = [(tags.a(e, href="/encoders/" + segment(e)),) for e in encoders]
    domain_rows = [(tags.a(d, href="/domains/" + segment(d)),) for d in domains]
    return layout(
        chrome, f"Pool {pool.name}", "pools",
        tags.p(tags.a("All pools", href="/pools"), class_="more back"),
        definition_list([
            ("Name", pool.name),
            ("Servers", tags.ul(*servers, class_="plain")),
            ("Description", pool.description or "—"),
        ]),
        tags.div(
            tags.section(tags.h2("Encoders with this pool"),
                         static_table(("Encoder id",), encoder_rows, "None.")),
            tags.section(tags.h2("Domains with this pool"),
                         static_table(("Domain",), domain_rows, "None.")),
            class_="cards",
        ),
        tags.div(
            tags.section(
                tags.h2("Change"),
                post_form(
                    chrome, base,
                    text_field("Servers", "servers",
                               form.get("servers", ", ".join(pool.servers)), errs("edit"),
                               hint=servers_hint(known), autocomplete="off"),
                    text_field("Description", "description",
                               form.get("description", pool.description), errs("edit"),
                               required=False),
                    button="Save", errors=errs("edit"),
                ),
                class_="card form-card",
            ),
            tags.section(
                tags.h2("Delete"),
                tags.p("Only a pool that no encoder or domain uses can be deleted.",
                       class_="hint"),
                post_form(chrome, base + "/delete", button="Delete pool", danger=True,
                          errors=errs("delete"), confirm=f"Delete pool {pool.name}?"),
                class_="card form-card danger-zone",
            ),
            class_="cards",
        ),
    )


def weight_card(chrome: Chrome, server_id: str, weight: float,
                errors: dict[str | None, str] | None = None, value: str | None = None) -> Tag:
    """The form that sets a server's capacity weight (on its server page)."""
    return tags.section(
        tags.h2("Capacity weight"),
        tags.p(f"How much load balancing gives this server relative to the others: "
               f"{DEFAULT_WEIGHT:g} unless set; 2 takes about twice the encoders of a server "
               f"weighing 1. The same on every server of the cluster.", class_="hint"),
        post_form(chrome, server_path(server_id) + "/weight",
                  text_field("Weight", "weight", f"{weight:g}" if value is None else value,
                             errors, required=False, autocomplete="off",
                             hint=f"over 0, up to {MAX_WEIGHT:g}; empty for the default"),
                  button="Set weight", errors=errors),
        class_="card form-card",
    )


# -- audit log -------------------------------------------------------------------


def audit_page(chrome: Chrome, entries: Sequence[AuditEntry], limit: int) -> Tag:
    rows = [
        (tags.span(timestamp(e.at), class_="nowrap"), e.actor,
         tags.code(e.server_id, class_="nowrap"), e.action, e.target, e.detail or "—")
        for e in entries
    ]
    return layout(
        chrome, "Audit log", "audit",
        tags.p(f"The latest {limit} changes, newest first.", class_="hint"),
        static_table(("When", "Who", "Server", "Action", "Target", "Detail"), rows,
                     "Nothing has been changed yet."),
    )


# -- multi-site resilience ---------------------------------------------------------

MSR_SERVER_COLUMNS = (
    Column("server_id", "Server", link="/servers/{server_id}"),
    Column("state", "State", fmt="state"),
    Column("address", "External address"),
    Column("load.encoders", "Encoders", numeric=True),
    Column("load.streaming", "Streaming", numeric=True),
    Column("load.viewers", "Viewers", numeric=True),
    Column("rtt_ms", "RTT", fmt="ms", numeric=True),
    Column("offset_ms", "Clock offset", fmt="ms", numeric=True),
    Column("bandwidth.mbps", "Bandwidth", fmt="mbps", numeric=True),
    Column("admin_url", "Admin site", fmt="url"),
    Column("weight", "Weight", numeric=True),
    Column("removable", "", fmt="action", template="remove-server", otherwise="this server"),
)

HOSTED_ENCODER_COLUMNS = (
    Column("encoder_id", "Encoder id", link="/encoders/{encoder_id}"),
    Column("name", "Name"),
    Column("domain", "Domain"),
    Column("state", "State", fmt="state"),
)


def remove_server_form(chrome: Chrome, action: str, server_id: str) -> Tag:
    return post_form(chrome, action, button="Remove", danger=True, inline=True,
                     confirm=f"Remove server {server_id} from the cluster? It can come "
                             "back only with a new join token and a fresh data directory.")


def prerequisites_card(prerequisites: Sequence[str]) -> Tag:
    return tags.section(
        tags.h2("What the servers need"),
        tags.ul(*[tags.li(text) for text in prerequisites], class_="plain"),
        tags.p("Each server measures the round trip, the clock offset and the bandwidth "
               "to every other one and warns here when a link misses these.", class_="hint"),
        class_="card",
    )


def msr_page(chrome: Chrome, status: dict[str, Any], rows: Sequence[dict[str, Any]],
             warnings: Sequence[str], prerequisites: Sequence[str],
             error: str | None = None) -> Tag:
    title = "Multi-site resilience"
    if not status["enabled"]:
        return layout(
            chrome, title, "msr",
            tags.div(
                tags.section(
                    tags.h2("This server is standalone"),
                    tags.p("Multi-site resilience makes several servers work as one cluster: "
                           "encoders and viewers connect to any of them, accounts and settings "
                           "are the same on all, and when a server fails its encoders and "
                           "viewers move to the others by themselves."),
                    tags.p("Enabling it turns this server into a cluster of one, in place: "
                           "its domains, accounts and encoders are kept and its encoders and "
                           "viewers stay connected.  Further servers then join with a join "
                           "token created on this page."),
                    post_form(chrome, "/msr/enable", button="Enable multi-site resilience",
                              confirm="Enable multi-site resilience on this server?",
                              errors={None: error} if error else None),
                    class_="card",
                ),
                prerequisites_card(prerequisites),
                class_="cards",
            ),
        )
    if not status["running"]:
        message = (status["error"] if status["error"] else
                   "Multi-site resilience is enabled: the cluster service starts within a "
                   "few seconds.")
        return layout(
            chrome, title, "msr",
            tags.p(message, class_="error" if status["error"] else "notice", role="status"),
            tags.p(tags.a("Reload", href="/msr")),
        )
    actions = {"remove-server": lambda row: remove_server_form(
        chrome, "/msr/servers/" + segment(row["server_id"]) + "/remove", row["server_id"])}
    return layout(
        chrome, title, "msr",
        *([tags.p(error, class_="error", role="alert")] if error else []),
        tags.div(
            tags.section(
                tags.h2("This cluster"),
                definition_list([
                    ("Cluster id", tags.code(status["cluster_id"])),
                    ("This server", tags.code(chrome.server_id)),
                    ("Servers", live("cluster.servers", status["servers"])),
                    ("At most", f"{status['max_servers']} servers"),
                    ("Peer address", tags.code(status["peer_address"])),
                    ("Authority fingerprint",
                     tags.code(status["ca_fingerprint"], class_="fingerprint")),
                ]),
                class_="card",
            ),
            tags.section(
                tags.h2("Add a server"),
                tags.p("Create a join token here, then start the new server with it. A "
                       "token admits one server, once, within a day."),
                post_form(chrome, "/msr/tokens", button="Create join token"),
                class_="card",
            ),
            class_="cards",
        ),
        tags.section(
            tags.h2("Servers"),
            warnings_list(warnings),
            live_table("servers", MSR_SERVER_COLUMNS, rows, "No servers.", actions=actions,
                       table_class="servers"),
            Tag("template")(remove_server_form(chrome, "/msr/servers/{server_id}/remove",
                                               "{server_id}"),
                            id="remove-server"),
            tags.p("Click a server to see the encoders and viewers connected to it. If "
                   "this server fails, log in to another one through its admin site link.",
                   class_="hint"),
        ),
        prerequisites_card(prerequisites),
        live_src="/api/servers",
        wide=True,
    )


def token_page(chrome: Chrome, token: str, token_id: str, expires: str, command: str) -> Tag:
    return layout(
        chrome, "Join token created", "msr",
        tags.div(
            tags.p(tags.strong("Copy the token now: it is shown only this once."),
                   " It admits one new server, once, until ", expires, "."),
            definition_list([
                ("Token", tags.code(token, class_="secret token", id="join-token")),
                ("Token id", tags.code(token_id)),
            ]),
            tags.p("Start the new server with:"),
            tags.pre(tags.code(command, id="join-command")),
            tags.p("adding its usual options (--data, --external-host with the address the "
                   "other servers and the clients reach it by, the ports). It receives its "
                   "certificate and a full copy of the accounts, domains and encoders, and "
                   "appears among the servers within seconds.", class_="hint"),
            class_="notice secret-box",
        ),
        tags.p(tags.a("Back to multi-site resilience", href="/msr")),
    )


def remote_server_page(chrome: Chrome, row: dict[str, Any], connections: dict[str, Any],
                       errors: dict[str | None, str] | None = None,
                       value: str | None = None) -> Tag:
    """Another server of the cluster: ``connections`` as ``MultiSite.server_connections``
    gives them (what it reported, or the directory's encoders)."""
    sid = row["server_id"]
    admin = row["admin_url"]
    own_page = admin + "servers/" + segment(sid) if admin else None
    own_link = (tags.a(f"{sid}'s own admin site", href=own_page, id="own-admin-page")
                if own_page else None)
    encoders = connections["encoders"]
    report = connections["report"]
    viewers: list[Any]
    if report is None:  # the cluster cannot ask its peers: the directory only
        encoders_hint = tags.p("From the cluster's directory: where each encoder is "
                               "registered now.", class_="hint")
        viewers = [
            tags.p("Each server knows its own viewers only: see them on ", own_link, ".")
            if own_link is not None else
            tags.p("Each server knows its own viewers only, and this server does not know "
                   "the address of its admin site.", class_="empty")]
    else:
        encoders_hint = tags.p(report["text"], class_="hint report",
                               **{"data-live-key": "report.text"})
        viewers = [live_table("viewers", VIEWER_COLUMNS, connections["viewers"] or [],
                              f"No viewer is connected to {sid}, or it did not answer.")]
        viewers.append(
            tags.p("More on ", own_link, ".", class_="more") if own_link is not None else
            tags.p("This server does not know the address of its admin site.", class_="hint"))
    return layout(
        chrome, f"Server {sid}", "msr",
        tags.p(tags.a("All servers of the cluster", href="/msr"), class_="more back"),
        warnings_list(row["warnings"], "server.warnings"),
        tags.div(
            tags.section(
                tags.h2("State"),
                definition_list([
                    ("State", live("server.state", row["state"], "state")),
                    ("External address", row["address"]),
                    ("Peer address", tags.code(row["peer_address"])),
                    ("Admin site", format_cell(admin, "url")),
                    ("Round trip", live("server.rtt_ms", row["rtt_ms"], "ms")),
                    ("Clock offset", live("server.offset_ms", row["offset_ms"], "ms")),
                    ("Bandwidth", live("server.bandwidth.mbps",
                                       lookup(row, "bandwidth.mbps"), "mbps")),
                ]),
                class_="card",
            ),
            tags.section(
                tags.h2("Load"),
                definition_list([
                    ("Encoders online", live("server.load.encoders",
                                             lookup(row, "load.encoders"))),
                    ("Encoders streaming", live("server.load.streaming",
                                                lookup(row, "load.streaming"))),
                    ("Viewers", live("server.load.viewers", lookup(row, "load.viewers"))),
                ]),
                tags.p("As it reported in its latest heartbeat.", class_="hint"),
                class_="card",
            ),
            weight_card(chrome, sid, row["weight"], errors, value),
            class_="cards",
        ),
        tags.section(
            tags.h2("Connected encoders"),
            encoders_hint,
            live_table("encoders", CONNECTED_ENCODER_COLUMNS if report is not None
                       else HOSTED_ENCODER_COLUMNS, encoders,
                       f"No encoder is connected to {sid}."),
        ),
        tags.section(tags.h2("Connected viewers"), *viewers),
        live_src="/api/servers/" + segment(sid),
    )


# -- errors ----------------------------------------------------------------------


def error_page(chrome: Chrome, title: str, message: str) -> Tag:
    return layout(chrome, title, None, tags.p(message, class_="error"),
                  tags.p(tags.a("Back to the server home", href="/")))
