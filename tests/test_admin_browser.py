"""A real browser (Debian's chromium, driven by Playwright) against a real server's admin site.

The server is ``twistd -n evserver`` once ``evserver.service`` serves the
admin site; until then it is a stand-in process that builds the very same
service (``evserver.service.build_service``) and adds the admin listener
itself, exactly as the service will (see ``_INTERIM_SERVER``).  Either way it
listens on real loopback ports over TLS with the server's self-signed
certificate, a real ``ev-encoder`` connects to it and a real ``ev-viewer``
watches.

Screenshots of the main pages go to ``test-output/screenshots/``.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import evserver.service
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

#: Stands in for ``twistd`` until evserver.service serves the admin site: takes
#: twistd's command line, builds the server as the plugin does, and adds the
#: admin listener (HTTPS, certificate reloaded when its files change).
_INTERIM_SERVER = r'''
import sys
from twisted.internet import reactor
from twisted.python import log
from evserver.admin import ReloadingTLSOptions, make_admin_site
from evserver.service import ListenerService, _hostnames, build_service
from evserver.tap import Options
from evserver.tls import ensure_server_certificate, wrap_server_factory

log.startLogging(sys.stdout)
options = Options()
options.parseOptions(sys.argv[sys.argv.index("evserver") + 1:])
config = options.server_config
service = build_service(config, reactor)
cert, key = ensure_server_certificate(config.data_dir, _hostnames(config.external_host))
site = make_admin_site(service.store, service.core, config, reactor, reactor.seconds())
ListenerService("admin web site", config.admin_endpoint,
                wrap_server_factory(site, ReloadingTLSOptions(cert, key)),
                reactor).setServiceParent(service)
service.privilegedStartService()
service.startService()
reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
reactor.run()
'''


def admin_is_wired() -> bool:
    """Does ``twistd evserver`` serve the admin site itself?"""
    return "make_admin_site" in Path(evserver.service.__file__).read_text(encoding="utf-8")


@pytest.fixture
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
    twistd = None
    if not admin_is_wired():
        twistd = tmp_path / "interim-twistd"
        twistd.write_text(f"#!{sys.executable}\n{_INTERIM_SERVER}", encoding="utf-8")
        twistd.chmod(twistd.stat().st_mode | stat.S_IXUSR)
    process = ServerProcess(data, twistd=twistd,
                            wait_for=("encoder", "viewer", "relay", "admin"))
    return process.start()


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


def test_admin_flow_in_a_real_browser(browser: Any, server: ServerProcess,
                                      tmp_path: Path) -> None:
    base = f"https://127.0.0.1:{server.ports.admin}"
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280,
                                                                       "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
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
        assert "standalone" in multi_site and "not available in this version" in multi_site
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
        page.wait_for_function(
            "Number(document.querySelector('[data-live-key=\"load.viewers\"]').textContent) >= 1")
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
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280,
                                                                       "height": 800})
    page = context.new_page()
    try:
        page.goto(f"https://127.0.0.1:{fresh_server.ports.admin}/settings")
        assert "/login" in page.url
        notice = page.inner_text(".notice")
        assert "No administrator account exists yet." in notice
        assert f"evserver-ctl --data {fresh_server.data_dir} account add --admin" in notice
        shot(page, "00-first-start-login")
    finally:
        context.close()
