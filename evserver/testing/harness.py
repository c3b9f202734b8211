"""A relay server and its clients on the in-memory network, for tests and the simulator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer

from evserver.net.client import Address, EncoderClient, TLSConfig, ViewerClient
from evserver.net.server import (
    Authenticator,
    EncoderControl,
    Relay,
    ServerFactory,
    ServerSettings,
    ViewerControl,
    relay_settings,
)
from evserver.state.relay import Limits, RelayCore
from evserver.store import Store
from evserver.testing.memnet import MemoryNetwork
from evserver.wire import messages as m

ENCODER_PORT, VIEWER_PORT, RELAY_PORT = 5510, 5520, 5530


def _in_line(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class MemoryServer:
    """One server on a MemoryNetwork host, sharing the network's clock."""

    def __init__(self, net: MemoryNetwork, host: str, store: Store, server_id: str = "s1",
                 settings: ServerSettings | None = None, limits: Limits | None = None,
                 servers: Callable[[], tuple[m.ServerInfo, ...]] | None = None) -> None:
        self.net = net
        self.host = host
        self.store = store
        self.settings = settings or ServerSettings()
        self._servers = servers
        self.core = RelayCore(net.clock, server_id, store, self.servers, limits)
        self.auth = Authenticator(store, defer_to_thread=_in_line)
        self.factories = {
            ENCODER_PORT: ServerFactory(EncoderControl, self.core, self.auth, self.settings,
                                        net.clock),
            VIEWER_PORT: ServerFactory(ViewerControl, self.core, self.auth, self.settings,
                                       net.clock),
            RELAY_PORT: ServerFactory(Relay, self.core, self.auth,
                                      relay_settings(self.settings), net.clock),
        }
        for port, factory in self.factories.items():
            net.listen(host, port, factory)

    @property
    def info(self) -> m.ServerInfo:
        return m.ServerInfo(self.core.server_id, self.host, ENCODER_PORT, VIEWER_PORT,
                            RELAY_PORT)

    def servers(self) -> tuple[m.ServerInfo, ...]:
        return self._servers() if self._servers is not None else (self.info,)

    def connector(self, source: str = "127.0.0.1") -> Callable[[Address], Any]:
        return lambda a: self.net.endpoint(a.host, a.port, source)

    def encoder(self, encoder_id: str, secret: str, source: Any, **kw: Any) -> EncoderClient:
        return EncoderClient(self.net.clock, [Address(self.host, ENCODER_PORT)], encoder_id,
                             secret, source, TLSConfig(enabled=False),
                             connector=self.connector(), **kw)

    def viewer(self, account: str, password: str, **kw: Any) -> ViewerClient:
        return ViewerClient(self.net.clock, [Address(self.host, VIEWER_PORT)], account,
                            password, TLSConfig(enabled=False), connector=self.connector(),
                            **kw)


def make_store(path: Path, domains: dict[str, dict[str, Any]],
               **store_options: Any) -> tuple[Store, dict[str, str]]:
    """A store with domains, accounts and encoders; returns it and the encoder secrets.

    ``domains`` maps a domain name to {"accounts": {name: password}, "encoders": [ids]};
    ``store_options`` go to ``Store`` (e.g. a cheap ``password_hasher`` for tests).
    """
    store = Store(path, **store_options)
    secrets: dict[str, str] = {}
    for domain, content in domains.items():
        store.add_domain(domain)
        for name, password in content.get("accounts", {}).items():
            store.add_account(domain, name, password)
        for encoder_id in content.get("encoders", ()):
            _, secret = store.add_encoder(domain, encoder_id, f"Camera {encoder_id}")
            secrets[encoder_id] = secret
    return store, secrets
