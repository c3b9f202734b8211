"""The server as a Twisted service: store, core and one listener per protocol."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from evserver.admin import ReloadingTLSOptions, make_admin_site
from evserver.config import ServerConfig
from evserver.net.server import (
    Authenticator,
    EncoderControl,
    Relay,
    ServerFactory,
    ServerSettings,
    ViewerControl,
    relay_settings,
)
from evserver.startup import fatal_startup_error
from evserver.state.relay import Limits, RelayCore
from evserver.store import Store, server_clock
from evserver.tls import ensure_server_certificate, wrap_server_factory
from evserver.wire import messages as m

log = Logger()

#: How often a standalone server looks for a cluster identity (msr enable).
CLUSTER_CHECK_INTERVAL = 2.0


class ListenerService(Service):
    """Listens on one endpoint; a failure to listen is a fatal startup error."""

    def __init__(self, description: str, endpoint: str, factory: Any,
                 reactor: Any, on_error: Any = fatal_startup_error) -> None:
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.reactor = reactor
        self.on_error = on_error
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        ep = endpoints.serverFromString(self.reactor, self.endpoint)
        self._listening = ep.listen(self.factory)
        self._listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        log.info("{what} listening on {address}", what=self.description,
                 address=port.getHost())
        return port

    def _failed(self, failure: Failure) -> None:
        self.on_error(f"cannot listen for {self.description} on {self.endpoint!r}: "
                      f"{failure.getErrorMessage()}")

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._listening = None
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class RelayServerService(MultiService):
    """The standalone relay server: store, core, encoder/viewer/relay listeners."""

    def __init__(self, config: ServerConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        # One clock stamps the replicated records and the directory's epochs.
        self.hlc = server_clock(config.server_id, reactor.seconds)
        self.store = Store(config.data_dir / "evserver.sqlite3", hlc=self.hlc)
        self.settings = ServerSettings(
            max_control_frame=config.max_control_frame,
            max_media_frame=config.max_media_frame,
            keepalive_interval=config.keepalive_interval,
            keepalive_timeout=config.keepalive_timeout,
        )
        self.core = RelayCore(
            reactor,
            config.server_id,
            self.store,
            self.servers,
            Limits(
                viewer_queue_bytes=config.viewer_queue_bytes,
                stall_timeout=config.stall_timeout,
                gop_cache_bytes=config.gop_cache_bytes,
                stop_linger=config.stop_linger,
            ),
            hlc=self.hlc,
        )
        # Password checks (scrypt: ~0.1 s of CPU, 16 MiB each) get a pool of
        # their own, at most one thread per spare core, so a burst of logins
        # neither starves the reactor's pool nor grows memory per thread.
        self.auth_pool = ThreadPool(minthreads=0, maxthreads=max(1, (os.cpu_count() or 2) - 1),
                                    name="evserver-auth")
        self.auth = Authenticator(
            self.store,
            defer_to_thread=lambda f, *a: threads.deferToThreadPool(reactor, self.auth_pool,
                                                                    f, *a))
        self.started_at = reactor.seconds()
        # The certificate is made even with --plain: the admin site is HTTPS
        # only.  It is re-read, for every port, when its files change.
        cert, key = ensure_server_certificate(config.data_dir, _hostnames(config.external_host),
                                              unique=config.server_id)
        self.tls_options = ReloadingTLSOptions(cert, key, reactor)
        tls = self.tls_options if config.tls else None
        self.factories: dict[str, ServerFactory] = {}
        for name, cls, endpoint in (
            ("encoder control", EncoderControl, config.encoder_endpoint),
            ("viewer control", ViewerControl, config.viewer_endpoint),
            ("video relay", Relay, config.relay_endpoint),
        ):
            settings = relay_settings(self.settings) if cls is Relay else self.settings
            factory = ServerFactory(cls, self.core, self.auth, settings, reactor)
            self.factories[name] = factory
            served: Any = factory if tls is None else wrap_server_factory(factory, tls)
            ListenerService(name, endpoint, served, reactor).setServiceParent(self)
        self.admin_site = make_admin_site(self.store, self.core, config, reactor,
                                          self.started_at, service=self)
        ListenerService("admin web site", config.admin_endpoint,
                        wrap_server_factory(self.admin_site, self.tls_options),
                        reactor).setServiceParent(self)

        self.cluster: Any = None
        self._cluster_watch: LoopingCall | None = None

    def startService(self) -> None:
        self.auth_pool.start()
        super().startService()
        # Multi-site resilience starts when the cluster identity appears
        # (``evserver-ctl msr enable``, the admin site, or a join), without a
        # restart and without dropping a client.
        self._cluster_watch = LoopingCall(self.check_cluster)
        self._cluster_watch.clock = self.reactor
        if self.config.join_token and not (self.config.data_dir / "cluster").exists():
            self._join()
        else:
            self._cluster_watch.start(CLUSTER_CHECK_INTERVAL, now=True)

    def _join(self) -> None:
        from evserver.cluster.join import join

        c = self.config
        assert c.join_token is not None
        log.info("joining the cluster of the token given...")
        d = join(self.reactor, c.data_dir, c.server_id, c.join_token, self._peer_address(),
                 _hostnames(c.external_host), c.join_address)

        def joined(identity: Any) -> None:
            log.info("joined cluster {cluster_id}", cluster_id=identity.cluster_id)
            if self._cluster_watch is not None:
                self._cluster_watch.start(CLUSTER_CHECK_INTERVAL, now=True)

        def failed(failure: Any) -> None:
            fatal_startup_error(f"cannot join the cluster: {failure.getErrorMessage()}")

        d.addCallbacks(joined, failed)

    def _peer_address(self) -> Any:
        from evserver.wire import peer as p

        c = self.config
        return p.ExternalAddress(c.external_host, c.external_encoder_port,
                                 c.external_viewer_port, c.external_relay_port,
                                 c.external_admin_port, c.external_host, c.external_peer_port)

    def check_cluster(self) -> None:
        if self.cluster is not None:
            return
        from evserver.cluster.ca import ClusterError, load_identity

        try:
            identity = load_identity(self.config.data_dir, self.config.server_id)
        except ClusterError as e:
            log.error("multi-site resilience cannot start: {error}", error=str(e))
            return
        if identity is None:
            return
        self.start_cluster(identity)

    def start_cluster(self, identity: Any) -> None:
        from evserver.cluster.service import ClusterService
        from evserver.state.balance import BalanceSettings

        c = self.config
        self.cluster = ClusterService(identity, c.data_dir, self._peer_address(),
                                      c.peer_endpoint, self.core, self.store, self.reactor,
                                      max_servers=c.max_servers,
                                      balance=BalanceSettings(
                                          stability=c.balance_stability,
                                          max_in_flight=c.balance_in_flight))
        self.cluster.setServiceParent(self)
        log.info("multi-site resilience: member {server_id} of cluster {cluster_id}",
                 server_id=identity.server_id, cluster_id=identity.cluster_id)

    def servers(self) -> tuple[m.ServerInfo, ...]:
        c = self.config
        return (m.ServerInfo(c.server_id, c.external_host, c.external_encoder_port,
                             c.external_viewer_port, c.external_relay_port),)

    def stopService(self) -> Deferred[None] | None:
        if self.auth_pool.started:
            self.auth_pool.stop()
        if self._cluster_watch is not None and self._cluster_watch.running:
            self._cluster_watch.stop()
        self.core.shutdown()
        d = super().stopService()
        self.store.close()
        return d


def _hostnames(external_host: str) -> list[str]:
    names = [external_host]
    for extra in ("localhost", "127.0.0.1"):
        if extra not in names:
            names.append(extra)
    return names


def build_service(config: ServerConfig, reactor: Any) -> MultiService:
    """The whole server for ``twistd evserver``."""
    return RelayServerService(config, reactor)
