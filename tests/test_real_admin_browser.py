"""A real browser (Debian's chromium, driven by Playwright) against real servers' admin sites.

Every server is ``twistd -n evserver`` on loopback ports, over TLS with its
self-signed certificate; real ``ev-encoder`` and ``ev-viewer`` processes
connect to them.

* One standalone server: log in, all server settings, domains, accounts,
  encoders, this server's connected encoders and viewers, the audit log.
* Multi-site resilience, on a cluster made in the browser: log in on server
  1, enable multi-site resilience on it, create join tokens and start
  servers 2 and 3 with them (``--join-token`` copied from the page), see
  three servers alive, open server 2 and see the encoder connected to it,
  create an account on server 2 and find it on server 3, kill server 3 and
  see it marked down within seconds, remove it.

Screenshots of the main pages go to ``test-output/screenshots/``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from evserver.store import Store
from tests.realproc import REPO, ServerProcess, evserver_unavailable, spawn_tool, stop_process

pytestmark = [pytest.mark.browser, pytest.mark.real, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = REPO / "test-output" / "screenshots"
ADMIN = ("root", "admin password 1")
TIMEOUT_MS = 20_000
ADMIN_LISTENERS = ("encoder", "viewer", "relay", "admin")
#: From a server's death to "down" on another server's page: the failure
#: detector's 1.5 s at most, plus the page's 3 s refresh, plus slack.
DOWN_WITHIN_S = 6.5


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:  # a missing test dependency is an error, not a skip
        raise AssertionError("the playwright package is missing: install the test extras") from e
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def new_page(browser: Any, dialogs: list[str] | None = None) -> tuple[Any, Any]:
    """A fresh browser context (its own cookies) and a page in it.

    Confirmation dialogs are accepted (and their messages added to ``dialogs``).
    """
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280,
                                                                       "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()

    def accept(dialog: Any) -> None:
        if dialogs is not None:
            dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    return context, page


def start_server(tmp_path: Path, with_admin: bool = True) -> ServerProcess:
    reason = evserver_unavailable()
    if reason is not None:
        pytest.skip(reason)
    data = tmp_path / "data"
    data.mkdir()
    if with_admin:
        with Store.in_data_dir(data) as store:
            store.add_domain("ops")
            store.add_account("ops", ADMIN[0], ADMIN[1], "admin")
    return ServerProcess(data, wait_for=ADMIN_LISTENERS).start()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = start_server(tmp_path)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server on its first start: no account at all."""
    process = start_server(tmp_path, with_admin=False)
    try:
        yield process
    finally:
        process.stop()


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def log_in(page: Any, base: str) -> None:
    page.goto(base + "/")
    assert page.url.startswith(base + "/login")
    page.fill("#f-name", ADMIN[0])
    page.fill("#f-password", ADMIN[1])
    page.click("button:has-text('Log in')")
    page.wait_for_url(base + "/")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def wait_js(page: Any, expression: str, timeout: float = TIMEOUT_MS / 1000) -> None:
    """Wait until ``expression`` is true in the page.

    Not ``page.wait_for_function``: its polling evaluates strings inside the
    page, which the site's Content-Security-Policy (no 'unsafe-eval') forbids.
    """
    wait_until(lambda: bool(page.evaluate(expression)), timeout, expression)


def test_admin_flow_in_a_real_browser(browser: Any, server: ServerProcess,
                                      tmp_path: Path) -> None:
    base = f"https://127.0.0.1:{server.ports.admin}"
    context, page = new_page(browser)
    script_errors: list[str] = []  # uncaught exceptions in live.js
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    processes = []
    try:
        # Nothing without a login.
        page.goto(base + "/")
        assert page.url == base + "/login"
        shot(page, "01-login")

        page.fill("#f-name", ADMIN[0])
        page.fill("#f-password", "wrong password")
        page.click("button:has-text('Log in')")
        assert "Wrong account name or password." in page.inner_text("main")

        page.fill("#f-name", ADMIN[0])
        page.fill("#f-password", ADMIN[1])
        page.click("button:has-text('Log in')")
        page.wait_for_url(base + "/")
        cookie = next(c for c in context.cookies() if c["name"] == "__Host-evadmin")
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.inner_text("h1") == "Server home"
        server_id = (server.data_dir / "server-id").read_text().strip()
        assert server_id in page.inner_text("header")
        shot(page, "02-home")

        # All server settings, from the link at the foot of the homepage.
        page.click("footer >> text=All server settings")
        page.wait_for_url(base + "/settings")
        multi_site = page.inner_text("#multi-site + p")
        assert "This server is standalone: multi-site resilience is not enabled." in multi_site
        assert "SHA-256 fingerprint" in page.inner_text("main")
        shot(page, "03-settings")

        # A domain, an account, an encoder.
        page.click("nav >> text=Domains")
        page.fill("#f-name", "west")
        page.click("button:has-text('Create domain')")
        assert "Domain 'west' created." in page.inner_text(".flash")
        page.fill("#f-name", "west")
        page.click("button:has-text('Create domain')")
        assert "exists already" in page.inner_text("#name-error")
        shot(page, "04-domains")

        page.click("nav >> text=Accounts")
        page.fill("#f-name", "alice ")
        page.fill("#f-password", "alice password")
        page.click("button:has-text('Create account')")
        assert "leading or trailing spaces" in page.inner_text("#name-error")
        assert "choose a domain" in page.inner_text("#domain-error")
        assert page.input_value("#f-name") == "alice "
        shot(page, "05-account-errors")
        page.fill("#f-name", "alice")
        page.select_option("#f-domain", "west")
        page.fill("#f-password", "alice password")
        page.click("button:has-text('Create account')")
        assert "Account 'alice' created." in page.inner_text(".flash")
        shot(page, "05-accounts-created")

        page.click("nav >> text=Encoders")
        page.fill("#f-encoder_id", "cam-1")
        page.fill("#f-name", "Front door")
        page.select_option("#f-domain", "west")
        page.click("button:has-text('Create encoder')")
        secret = page.inner_text("#secret").strip()
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret)
        shot(page, "06-encoder-created")

        # This server's page, open while the encoder and a viewer connect:
        # the live tables fill in without a reload.
        page.click("nav >> text=This server")
        page.wait_for_url(base + f"/servers/{server_id}")
        assert "No encoder is connected to this server." in page.inner_text("main")
        log = tmp_path / "tools.log"
        with open(log, "ab") as out:
            processes.append(spawn_tool("encoder", [
                "--server", server.address("encoder"), "--ca", str(server.ca_path),
                "--id", "cam-1", "--secret", secret, "--source", "synthetic",
                "--bitrate", "200k", "--duration", "60"], stdout=out))
            processes.append(spawn_tool("viewer", [
                "--server", server.address("viewer"), "--ca", str(server.ca_path),
                "--account", "alice", "--password", "alice password", "--watch", "cam-1",
                "--duration", "60"], stdout=out))
        encoders = 'table[data-live-list="encoders"]'
        page.wait_for_selector(f"{encoders} a:has-text('cam-1')")
        page.wait_for_selector(f"{encoders} .badge.state-streaming")
        page.wait_for_selector('table[data-live-list="viewers"] a:has-text("alice")')
        row = page.inner_text(f"{encoders} tbody tr")
        assert "Front door" in row and "west" in row
        wait_js(page, "Number(document.querySelector('[data-live-key=\"load.viewers\"]')"
                      ".textContent) >= 1")
        shot(page, "07-this-server")

        page.click("nav >> text=Encoders")
        page.click("text=cam-1")
        assert secret not in page.content()
        shot(page, "08-encoder")

        page.click("nav >> text=Audit log")
        audit = page.inner_text("main")
        for action in ("login", "domain.create", "account.create", "encoder.create"):
            assert action in audit
        shot(page, "09-audit")

        # Log out: back to the login page, and nothing answers any more.
        page.click("button:has-text('Log out')")
        page.wait_for_url(base + "/login?bye=1")
        assert "You are logged out." in page.inner_text("main")
        page.goto(base + "/encoders")
        assert page.url.startswith(base + "/login")
        api = page.request.get(base + "/api/server")
        assert api.status == 401
        assert not script_errors, script_errors
    except Exception:
        shot(page, "failure")
        print(server.log_tail(60))
        raise
    finally:
        for process in processes:
            stop_process(process)
        context.close()


def test_first_start_explains_how_to_make_the_first_admin(browser: Any,
                                                          fresh_server: ServerProcess) -> None:
    context, page = new_page(browser)
    try:
        page.goto(f"https://127.0.0.1:{fresh_server.ports.admin}/settings")
        assert "/login" in page.url
        notice = page.inner_text(".notice")
        assert "No administrator account exists yet." in notice
        assert f"evserver-ctl --data {fresh_server.data_dir} account add --admin" in notice
        shot(page, "00-first-start-login")
    finally:
        context.close()


# -- multi-site resilience: a cluster made in the browser --------------------------------

SERVERS_TABLE = 'table[data-live-list="servers"]'
JS_ROWS = "document.querySelectorAll('table[data-live-list=\"servers\"] tbody tr')"
JS_THREE_ALIVE = ("document.querySelectorAll('table[data-live-list=\"servers\"] "
                  ".badge.state-alive').length === 3")


@attrs.define
class Cluster:
    """Three servers made into a cluster by the first test; the others use it."""

    tmp: Path
    servers: list[ServerProcess]
    secrets: dict[str, str]
    #: A browser context logged in on server 1, and its page.
    context: Any
    page: Any
    tools: list[subprocess.Popen[bytes]] = attrs.Factory(list)
    contexts: list[Any] = attrs.Factory(list)
    script_errors: list[str] = attrs.Factory(list)
    #: The confirmations the page asked for (and were accepted).
    dialogs: list[str] = attrs.Factory(list)
    formed: bool = False

    def base(self, i: int) -> str:
        return f"https://127.0.0.1:{self.servers[i].ports.admin}"

    def server_id(self, i: int) -> str:
        return (self.servers[i].data_dir / "server-id").read_text().strip()

    def encoder(self, i: int, encoder_id: str) -> None:
        server = self.servers[i]
        with open(self.tmp / "tools.log", "ab") as out:
            self.tools.append(spawn_tool("encoder", [
                "--server", server.address("encoder"), "--ca", str(server.ca_path),
                "--id", encoder_id, "--secret", self.secrets[encoder_id],
                "--source", "synthetic", "--bitrate", "100k", "--duration", "600"],
                stdout=out))

    def logs(self) -> str:
        return "\n".join(f"--- server {i + 1} ({s.data_dir}):\n{s.log_tail(40)}"
                         for i, s in enumerate(self.servers))

    def require_formed(self) -> None:
        if not self.formed:
            pytest.skip("the cluster was not formed: see the failure of "
                        "test_enable_multi_site_resilience_and_join_two_servers")


@pytest.fixture(scope="module")
def cluster(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = evserver_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("msr")
    data = tmp / "s1"
    data.mkdir()
    with Store.in_data_dir(data) as store:
        store.add_domain("ops")
        store.add_account("ops", ADMIN[0], ADMIN[1], "admin")
        secrets = {encoder_id: store.add_encoder("ops", encoder_id, name)[1]
                   for encoder_id, name in (("cam-1", "Gate"), ("cam-2", "Quay"))}
    s1 = ServerProcess(data, wait_for=ADMIN_LISTENERS, name="server 1").start()
    dialogs: list[str] = []
    context, page = new_page(browser, dialogs)
    made = Cluster(tmp, [s1], secrets, context, page, dialogs=dialogs)
    page.on("pageerror", lambda error: made.script_errors.append(str(error)))
    try:
        yield made
    finally:
        for tool in made.tools:
            stop_process(tool)
        for c in [context, *made.contexts]:
            c.close()
        for server in made.servers:
            server.stop()


def create_token(page: Any, base: str) -> str:
    page.goto(base + "/msr")
    page.click("button:has-text('Create join token')")
    page.wait_for_selector("#join-token")
    token = page.inner_text("#join-token").strip()
    assert token.startswith("evs1.")
    assert page.inner_text("#join-command").strip() == f"twistd -n evserver --join-token {token}"
    return token


def row_of(page: Any, server_id: str) -> str:
    return str(page.inner_text(f"{SERVERS_TABLE} tbody tr:has(a:text-is('{server_id}'))"))


def test_enable_multi_site_resilience_and_join_two_servers(cluster: Cluster) -> None:
    page = cluster.page
    base = cluster.base(0)
    s1_id = cluster.server_id(0)
    try:
        log_in(page, base)
        # The article's way in: All server settings, then Multi-site resilience.
        page.click("footer >> text=All server settings")
        page.wait_for_url(base + "/settings")
        page.click("#multi-site ~ p a.button-link")
        page.wait_for_url(base + "/msr")
        assert "This server is standalone" in page.inner_text("main")
        shot(page, "10-msr-standalone")

        # An encoder is connected while multi-site resilience is enabled: it stays.
        cluster.encoder(0, "cam-1")
        wait_until(lambda: [e["encoder_id"] for e in page.request.get(
            base + "/api/encoders?connected=1").json()["encoders"]] == ["cam-1"], 20,
            "cam-1 on server 1")
        log_before = cluster.servers[0].log_text()
        page.click("button:has-text('Enable multi-site resilience')")
        page.wait_for_url(base + "/msr")
        assert cluster.dialogs == ["Enable multi-site resilience on this server?"]
        assert "Multi-site resilience is enabled" in page.inner_text(".flash")
        assert "Create join token" in page.inner_text("main")
        assert page.locator(f"{SERVERS_TABLE} tbody tr").count() == 1
        row = row_of(page, s1_id)
        assert "this server" in row and "alive" in row
        # The live refresh keeps showing the encoder connected here.
        wait_js(page, f"{JS_ROWS}[0].children[3].textContent === '1'")
        assert cluster.tools[0].poll() is None
        since = cluster.servers[0].log_text()[len(log_before):]
        assert "multi-site resilience: member" in since
        assert "cam-1" not in since  # no disconnection, no new registration
        shot(page, "11-msr-cluster-of-one")

        # Two more servers, each started with a join token copied from the page.
        for i in (1, 2):
            token = create_token(page, base)
            if i == 1:
                shot(page, "12-join-token")
            server = ServerProcess(cluster.tmp / f"s{i + 1}", wait_for=ADMIN_LISTENERS,
                                   name=f"server {i + 1}", extra_args=("--join-token", token))
            cluster.servers.append(server)
            server.start()
        page.goto(base + "/msr")
        wait_js(page, JS_THREE_ALIVE, 30)
        ids = [cluster.server_id(i) for i in range(3)]
        rows = page.locator(f"{SERVERS_TABLE} tbody tr")
        assert rows.count() == 3
        assert ids[0] in rows.nth(0).inner_text()  # this server first
        for i in (1, 2):
            row = row_of(page, ids[i])
            assert "alive" in row and "Remove" in row and "this server" not in row
            link = page.locator(f"{SERVERS_TABLE} a[href='{cluster.base(i)}/']")
            assert link.count() == 1
        # The round trip is measured on every link.
        wait_js(page, f"Array.from({JS_ROWS}).slice(1)"
                      ".every(tr => / ms$/.test(tr.children[6].textContent))")
        shot(page, "13-msr-three-servers")

        # Open server 2: the encoder connected to it is listed there.
        cluster.encoder(1, "cam-2")
        page.click(f"{SERVERS_TABLE} a:text-is('{ids[1]}')")
        page.wait_for_url(f"{base}/servers/{ids[1]}")
        page.wait_for_selector("table[data-live-list='encoders'] a:has-text('cam-2')",
                               timeout=30_000)
        assert "Quay" in page.inner_text("table[data-live-list='encoders']")
        assert "cam-1" not in page.inner_text("table[data-live-list='encoders']")
        own = page.get_attribute("#own-admin-page", "href")
        assert own == f"{cluster.base(1)}/servers/{ids[1]}"
        wait_js(page, "document.querySelector('[data-live-key=\"server.load.encoders\"]')"
                      ".textContent === '1'")
        shot(page, "14-server-2")
        assert not cluster.script_errors, cluster.script_errors
        cluster.formed = True
    except Exception:
        shot(page, "failure-msr")
        print(cluster.logs())
        raise


def test_an_account_made_on_server_2_appears_on_server_3(browser: Any,
                                                         cluster: Cluster) -> None:
    cluster.require_formed()
    if not hasattr(Store, "subscribe"):
        pytest.skip("replication is not in evserver/store.py yet (Store.subscribe is "
                    "missing): an account made on server 2 cannot reach server 3")
    page = cluster.page
    ids = [cluster.server_id(i) for i in range(3)]
    # From server 1's page, one click to server 2's own admin site.
    page.goto(cluster.base(0) + "/msr")
    admin2 = page.get_attribute(f"{SERVERS_TABLE} tr:has(a:text-is('{ids[1]}')) "
                                "a[href^='https://']", "href")
    assert admin2 == cluster.base(1) + "/"
    context2, page2 = new_page(browser)
    context3, page3 = new_page(browser)
    cluster.contexts += [context2, context3]
    try:
        log_in(page2, cluster.base(1))  # the account came from server 1 by replication
        page2.click("nav >> text=Accounts")
        page2.fill("#f-name", "bob")
        page2.select_option("#f-domain", "ops")
        page2.fill("#f-password", "bob password")
        page2.click("button:has-text('Create account')")
        assert "Account 'bob' created." in page2.inner_text(".flash")
        assert ids[1] in page2.inner_text("header")

        log_in(page3, cluster.base(2))
        assert ids[2] in page3.inner_text("header")

        def bob_listed() -> bool:
            page3.goto(cluster.base(2) + "/accounts")
            return "bob" in page3.inner_text("table")

        wait_until(bob_listed, 10, "account bob on server 3")
        shot(page3, "15-account-from-server-2-on-server-3")
        page3.click("nav >> text=Audit log")
        audit = page3.inner_text("main")
        assert "account.create" in audit and ids[1] in audit  # made on server 2
    except Exception:
        shot(page2, "failure-server-2")
        shot(page3, "failure-server-3")
        print(cluster.logs())
        raise


def test_a_killed_server_is_marked_down_within_seconds(cluster: Cluster) -> None:
    cluster.require_formed()
    page = cluster.page
    base = cluster.base(0)
    ids = [cluster.server_id(i) for i in range(3)]
    try:
        page.goto(base + "/msr")
        wait_js(page, JS_THREE_ALIVE, 30)
        started = time.monotonic()
        cluster.servers[2].kill()
        page.wait_for_selector(
            f"{SERVERS_TABLE} tr:has(a:text-is('{ids[2]}')) .badge.state-down",
            timeout=DOWN_WITHIN_S * 1000)
        took = time.monotonic() - started
        assert took < DOWN_WITHIN_S, took
        assert "\u2014" in row_of(page, ids[2])  # no load, no RTT: the link is gone
        warnings = page.inner_text("ul.warnings")
        assert f"{ids[2]}: Not reachable from this server" in warnings
        for alive in ids[:2]:
            assert "alive" in row_of(page, alive)
        shot(page, "16-server-3-down")

        # Server 2's admin site still answers: the administrator is one click away.
        answer = page.request.get(cluster.base(1) + "/login")
        assert answer.status == 200 and "Log in" in answer.text()

        # Remove the dead server (its row was rebuilt by the live refresh, the
        # button's form from the page's template): it leaves the table.
        page.click(f"{SERVERS_TABLE} tr:has(a:text-is('{ids[2]}')) button:has-text('Remove')")
        page.wait_for_url(base + "/msr")
        assert cluster.dialogs[-1].startswith(f"Remove server {ids[2]} from the cluster?")
        assert f"Server '{ids[2]}' was removed from the cluster." in page.inner_text(".flash")
        assert page.locator(f"{SERVERS_TABLE} tbody tr").count() == 2
        page.click("nav >> text=Audit log")
        assert "msr.remove" in page.inner_text("main")
        page.goto(base + "/msr")
        shot(page, "17-server-3-removed")
        assert not cluster.script_errors, cluster.script_errors
    except Exception:
        shot(page, "failure-down")
        print(cluster.logs())
        raise
