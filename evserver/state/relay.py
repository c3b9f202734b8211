"""The relay server's state: encoder and viewer sessions, channels, tickets.

Sans-IO: the Twisted protocols (``evserver.net``) authenticate a client and
then call into ``RelayCore``; the core talks back only through the small link
interfaces below and an injected clock.  One ``Channel`` exists per encoder
that is online or watched; it keeps its stream id and its viewers across a
reconnection of the encoder, so viewers on this server resume by themselves.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from evserver.state.directory import Directory, Location
from evserver.state.fanout import IMediaSink, Stream, ViewerFeed
from evserver.state.hlc import HybridClock, Stamp
from evserver.wire import messages as m
from evserver.wire.framing import ErrorCode

log = Logger()

MAX_WATCHES = 64


class ILink(Protocol):
    """What the core needs of a client's control connection."""

    def send(self, msg: Any) -> None: ...

    def close_with_error(self, code: ErrorCode, message: str) -> None: ...

    def close(self) -> None: ...


class IRegistry(Protocol):
    """The registered encoders (the store)."""

    def list_encoders(self, domain: str | None = None) -> Iterable[Any]: ...

    def get_encoder(self, encoder_id: str) -> Any: ...


@attrs.frozen
class Limits:
    viewer_queue_bytes: int = 8 * 1024 * 1024
    stall_timeout: float = 20.0
    gop_cache_bytes: int = 16 * 1024 * 1024
    stop_linger: float = 5.0
    keyframe_request_interval: float = 1.0
    max_watches: int = MAX_WATCHES


class Redirected(Exception):
    """The encoder is hosted by another server: the client must go there."""

    def __init__(self, encoder_id: str, server: m.ServerInfo) -> None:
        super().__init__(f"{encoder_id!r} is hosted by {server.server_id}")
        self.encoder_id = encoder_id
        self.server = server


class Refused(Exception):
    """A request refused without closing the connection."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Channel:
    """One encoder's stream on this server: its session (if online) and its viewers."""

    def __init__(self, core: RelayCore, encoder_id: str, domain: str, stream_id: int) -> None:
        self.core = core
        self.encoder_id = encoder_id
        self.domain = domain
        self.stream_id = stream_id
        self.session: EncoderSession | None = None
        self.watchers: set[ViewerSession] = set()
        self.stream = Stream(
            stream_id,
            core.clock,
            core.limits.gop_cache_bytes,
            core.limits.keyframe_request_interval,
            on_keyframe_needed=self._keyframe_needed,
            on_viewers_changed=self._viewers_changed,
        )
        self._stop_call: IDelayedCall | None = None

    # Called by the fan-out.
    def _keyframe_needed(self) -> None:
        if self.session is not None and self.session.started:
            self.session.link.send(m.KeyframeRequest())

    def _viewers_changed(self, count: int) -> None:
        if count > 0:
            self._cancel_stop()
            if self.session is not None and not self.session.started:
                self.session.start()
        elif self.session is not None and self.session.started and self._stop_call is None:
            self._stop_call = self.core.clock.callLater(self.core.limits.stop_linger, self._stop)

    def _cancel_stop(self) -> None:
        if self._stop_call is not None:
            if self._stop_call.active():
                self._stop_call.cancel()
            self._stop_call = None

    def _stop(self) -> None:
        self._stop_call = None
        if self.session is not None and self.stream.viewer_count == 0:
            self.session.stop()

    def attach_session(self, session: EncoderSession) -> None:
        self.session = session
        self.stream.reset()
        if self.stream.viewer_count > 0:
            session.start()

    def detach_session(self, session: EncoderSession) -> None:
        if self.session is session:
            self.session = None
            self._cancel_stop()
            self.stream.reset()
            self.core._maybe_drop_channel(self)

    @property
    def state(self) -> int:
        if self.session is None:
            return m.EncoderState.OFFLINE
        return m.EncoderState.STREAMING if self.session.streaming else m.EncoderState.ONLINE

    def close(self) -> None:
        self._cancel_stop()
        self.stream.close()


class EncoderSession:
    """An authenticated encoder control connection."""

    def __init__(self, core: RelayCore, encoder_id: str, name: str, domain: str,
                 link: ILink, ticket: bytes) -> None:
        self.core = core
        self.encoder_id = encoder_id
        self.name = name
        self.domain = domain
        self.link = link
        self.ticket = ticket
        self.started = False
        self.streaming = False
        self.closed = False
        self.channel: Channel | None = None
        self.relay: Any = None  # the I/O object of the relay connection, if any
        #: The registration's stamp and its count of announced state changes.
        self.epoch: Stamp = core.hlc.now()
        self.seq = 0
        self.frames_in = 0
        self.bytes_in = 0

    def start(self) -> None:
        if not self.started and not self.closed:
            self.started = True
            self.link.send(m.StartStream())

    def stop(self) -> None:
        if self.started and not self.closed:
            self.started = False
            self.link.send(m.StopStream())
            if self.channel is not None:
                self.channel.stream.reset()
            if self.streaming:
                self.streaming = False
                self.core._encoder_changed(self)

    def media(self, keyframe: bool, frame: bytes) -> None:
        """A media frame arrived on the relay connection, already encoded for viewers."""
        self.frames_in += 1
        self.bytes_in += len(frame)
        if not self.started:
            return  # Not asked for (or already stopped): nobody wants it.
        if not self.streaming:
            self.streaming = True
            self.core._encoder_changed(self)
        assert self.channel is not None
        self.channel.stream.publish(keyframe, frame)

    @property
    def stream_id(self) -> int:
        assert self.channel is not None
        return self.channel.stream_id


class ViewerSession:
    """An authenticated viewer control connection."""

    def __init__(self, core: RelayCore, account: str, domain: str, link: ILink,
                 ticket: bytes) -> None:
        self.core = core
        self.account = account
        self.domain = domain
        self.link = link
        self.ticket = ticket
        self.subscribed = False
        self.closed = False
        self.watching: dict[int, Channel] = {}  # stream_id -> channel
        self.feed: ViewerFeed | None = None
        self.relay: Any = None

    def list_encoders(self, request_id: int) -> m.EncoderList:
        self.subscribed = True
        return m.EncoderList(request_id, self.core.encoder_infos(self.domain))

    def watch(self, request_id: int, encoder_id: str) -> m.WatchOk:
        if any(c.encoder_id == encoder_id for c in self.watching.values()):
            raise Refused(ErrorCode.DUPLICATE, f"already watching {encoder_id!r}")
        if len(self.watching) >= self.core.limits.max_watches:
            raise Refused(
                ErrorCode.LIMIT_EXCEEDED,
                f"at most {self.core.limits.max_watches} streams per connection",
            )
        channel = self.core._channel_for(encoder_id, self.domain)
        elsewhere = self.core.hosted_elsewhere(encoder_id)
        if elsewhere is not None:
            self.core._maybe_drop_channel(channel)
            raise Redirected(encoder_id, elsewhere)
        self.watching[channel.stream_id] = channel
        channel.watchers.add(self)
        if self.feed is not None:
            channel.stream.add_viewer(self.feed)
        return m.WatchOk(request_id, encoder_id, channel.stream_id)

    def unwatch(self, request_id: int, stream_id: int) -> m.UnwatchOk:
        channel = self.watching.pop(stream_id, None)
        if channel is None:
            raise Refused(ErrorCode.NOT_FOUND, f"not watching stream {stream_id}")
        self._detach(channel)
        return m.UnwatchOk(request_id, stream_id)

    def _detach(self, channel: Channel) -> None:
        channel.watchers.discard(self)
        if self.feed is not None:
            channel.stream.remove_viewer(self.feed)
        self.core._maybe_drop_channel(channel)

    def attach_relay(self, relay: Any, sink: IMediaSink) -> ViewerFeed:
        """A relay connection presented this session's ticket; it replaces any earlier one."""
        self.detach_relay()
        self.relay = relay
        limits = self.core.limits
        self.feed = ViewerFeed(sink, self.core.clock, limits.viewer_queue_bytes,
                               limits.stall_timeout)
        for channel in self.watching.values():
            channel.stream.add_viewer(self.feed)
        return self.feed

    def detach_relay(self, relay: Any = None) -> None:
        if self.feed is None or (relay is not None and relay is not self.relay):
            return
        feed, self.feed, self.relay = self.feed, None, None
        for channel in self.watching.values():
            channel.stream.remove_viewer(feed)
        feed.close()
        self.core._bytes_out_done += feed.bytes_written


class RelayCore:
    """Everything one server knows about its clients and streams."""

    def __init__(
        self,
        clock: IReactorTime,
        server_id: str,
        registry: IRegistry,
        servers: Callable[[], tuple[m.ServerInfo, ...]],
        limits: Limits | None = None,
        hlc: HybridClock | None = None,
    ) -> None:
        self.clock = clock
        #: When this server process started (its clock): every registration it
        #: stamps is later, which is what its cluster incarnation says.
        self.started_at = clock.seconds()
        self.server_id = server_id
        self.registry = registry
        self.servers = servers
        self.limits = limits or Limits()
        self.hlc = hlc or HybridClock(server_id.replace(".", "_"),
                                      lambda: int(clock.seconds() * 1000))
        #: Where every encoder of the cluster is (this server's own included).
        self.locations = Directory(server_id)
        #: Called with each Location this server announces (the cluster sends it on).
        self.on_announce: Callable[[Location], None] | None = None
        #: Set by the cluster: (encoder_id, domain) -> the server that should host
        #: an encoder that authenticated here, or None to keep it (see balancing).
        self.placement: Callable[[str, str], m.ServerInfo | None] | None = None
        #: Bytes written to viewer feeds that have ended (see ``bytes_out``).
        self._bytes_out_done = 0
        self.encoders: dict[str, EncoderSession] = {}
        self.viewers: set[ViewerSession] = set()
        self.channels: dict[str, Channel] = {}
        self._tickets: dict[bytes, EncoderSession | ViewerSession] = {}
        self._next_stream_id = 1

    # -- tickets ---------------------------------------------------------

    def _new_ticket(self) -> bytes:
        return secrets.token_bytes(32)

    def redeem(self, ticket: bytes) -> EncoderSession | ViewerSession | None:
        return self._tickets.get(ticket)

    # -- channels --------------------------------------------------------

    def _channel_for(self, encoder_id: str, domain: str) -> Channel:
        channel = self.channels.get(encoder_id)
        if channel is not None:
            if channel.domain != domain:
                raise Refused(ErrorCode.NOT_FOUND, f"no encoder {encoder_id!r}")
            return channel
        record = self.registry.get_encoder(encoder_id)
        if record is None or record.domain != domain:
            # Another domain's encoder is reported exactly like a missing one.
            raise Refused(ErrorCode.NOT_FOUND, f"no encoder {encoder_id!r}")
        return self._new_channel(encoder_id, domain)

    def _new_channel(self, encoder_id: str, domain: str) -> Channel:
        stream_id = self._next_stream_id
        self._next_stream_id = (stream_id % 0xFFFFFFFF) + 1
        channel = Channel(self, encoder_id, domain, stream_id)
        self.channels[encoder_id] = channel
        return channel

    def _maybe_drop_channel(self, channel: Channel) -> None:
        if channel.session is None and not channel.watchers:
            if self.channels.get(channel.encoder_id) is channel:
                del self.channels[channel.encoder_id]
            channel.close()

    # -- encoders --------------------------------------------------------

    def encoder_connected(self, encoder_id: str, name: str, domain: str,
                          link: ILink) -> EncoderSession:
        """An encoder authenticated; a newer registration supersedes an older one."""
        old = self.encoders.get(encoder_id)
        if old is not None:
            log.info("encoder {encoder_id} registered again; dropping the older session",
                     encoder_id=encoder_id)
            old.link.close_with_error(ErrorCode.SUPERSEDED,
                                      "this encoder connected again elsewhere")
            if old.relay is not None:
                old.relay.close_with_error(ErrorCode.SUPERSEDED,
                                           "this encoder connected again elsewhere")
            self.encoder_disconnected(old)
        ticket = self._new_ticket()
        session = EncoderSession(self, encoder_id, name, domain, link, ticket)
        self._tickets[ticket] = session
        self.encoders[encoder_id] = session
        channel = self.channels.get(encoder_id)
        if channel is None or channel.domain != domain:
            if channel is not None:  # the encoder moved to another domain
                self._evict_channel(channel)
            channel = self._new_channel(encoder_id, domain)
        session.channel = channel
        channel.attach_session(session)
        self._encoder_changed(session)
        return session

    def _evict_channel(self, channel: Channel) -> None:
        for viewer in list(channel.watchers):
            viewer.watching.pop(channel.stream_id, None)
            viewer._detach(channel)
        self._maybe_drop_channel(channel)

    def encoder_disconnected(self, session: EncoderSession, announce: bool = True) -> None:
        if session.closed:
            return
        if announce:
            self._announce(session, m.EncoderState.OFFLINE)
        session.closed = True
        session.started = session.streaming = False
        self._tickets.pop(session.ticket, None)
        if self.encoders.get(session.encoder_id) is session:
            del self.encoders[session.encoder_id]
        if session.channel is not None:
            session.channel.detach_session(session)
            if announce:
                self._notify(session.domain, self._info(session.encoder_id, session.name,
                                                        m.EncoderState.OFFLINE))

    def _encoder_changed(self, session: EncoderSession) -> None:
        state = m.EncoderState.STREAMING if session.streaming else m.EncoderState.ONLINE
        self._announce(session, state)
        self._notify(session.domain, self._info(session.encoder_id, session.name, state))

    def _info(self, encoder_id: str, name: str, state: int) -> m.EncoderInfo:
        return m.EncoderInfo(encoder_id, name, state,
                             self.server_id if state != m.EncoderState.OFFLINE else "")

    def _notify(self, domain: str, info: m.EncoderInfo) -> None:
        update = m.EncoderUpdate(info)
        for viewer in self.viewers:
            if viewer.subscribed and viewer.domain == domain:
                viewer.link.send(update)

    def encoder_infos(self, domain: str) -> tuple[m.EncoderInfo, ...]:
        infos = []
        for record in self.registry.list_encoders(domain):
            session = self.encoders.get(record.encoder_id)
            if session is not None and session.domain == domain:
                state = (m.EncoderState.STREAMING if session.streaming
                         else m.EncoderState.ONLINE)
                infos.append(self._info(record.encoder_id, record.name, state))
                continue
            where = self.locations.where(record.encoder_id)
            if where is not None and where.server_id != self.server_id:
                infos.append(m.EncoderInfo(record.encoder_id, record.name, where.state,
                                           where.server_id))
            else:
                infos.append(self._info(record.encoder_id, record.name,
                                        m.EncoderState.OFFLINE))
        return tuple(infos)

    # -- the cluster's directory -----------------------------------------

    def _announce(self, session: EncoderSession, state: int) -> None:
        location = Location(session.encoder_id, self.server_id, session.epoch, session.seq,
                            state)
        session.seq += 1
        self.locations.apply(location)
        if self.on_announce is not None:
            self.on_announce(location)

    def hosted_elsewhere(self, encoder_id: str) -> m.ServerInfo | None:
        """The server hosting ``encoder_id`` if it is another live one, else None."""
        if encoder_id in self.encoders:
            return None
        where = self.locations.where(encoder_id)
        if where is None or where.server_id == self.server_id:
            return None
        return next((s for s in self.servers() if s.server_id == where.server_id), None)

    def remote_locations(self, locations: Iterable[Location]) -> list[Location]:
        """Announcements from other servers: merge, drop stale sessions, tell viewers.

        Returns the announcements that were news here (newer than the entry
        held), as received: the cluster forwards them to its other peers.
        Announcements of this server's own registrations are ignored: it is
        their authority (they can only be echoes of an earlier run).
        """
        news = []
        for location in locations:
            self.hlc.observe(location.epoch)
            if location.server_id == self.server_id:
                continue
            merged = self.locations.merge_one(location)
            if not merged.stored:
                continue
            news.append(location)
            local = self.encoders.get(location.encoder_id)
            if (local is not None and location.online
                    and not self.locations.stale(location)
                    and location.version > (local.epoch, local.seq)):
                log.info("encoder {encoder_id} registered on {server}; dropping the stale "
                         "session here", encoder_id=location.encoder_id,
                         server=location.server_id)
                local.link.close_with_error(ErrorCode.SUPERSEDED,
                                            "this encoder connected again elsewhere")
                if local.relay is not None:
                    local.relay.close_with_error(ErrorCode.SUPERSEDED,
                                                 "this encoder connected again elsewhere")
                self.encoder_disconnected(local, announce=False)
            if merged.changed:
                self._notify_seen(location.encoder_id)
        return news

    def _notify_seen(self, encoder_id: str) -> None:
        """Tell the viewers what the directory shows of ``encoder_id`` now."""
        where = self.locations.where(encoder_id)
        if where is None:
            entry = self.locations.entries[encoder_id]
            where = attrs.evolve(entry, state=m.EncoderState.OFFLINE)
        self._notify_remote(where)

    def server_restarted(self, server_id: str, boot_ms: int) -> None:
        """``server_id`` runs an incarnation started at ``boot_ms``: its earlier
        registrations went away with the earlier run (offline; viewers told)."""
        for location in self.locations.server_restarted(server_id, boot_ms):
            self._notify_remote(location)

    def server_lost(self, server_id: str) -> None:
        """A peer was declared dead: its encoders are offline until they come back."""
        for location in self.locations.server_lost(server_id):
            self._notify_remote(location)

    def push_server_list(self) -> None:
        """Membership changed: tell every client the servers it may use."""
        msg = m.ServerList(self.servers())
        for session in self.encoders.values():
            session.link.send(msg)
        for viewer in self.viewers:
            viewer.link.send(msg)

    def server_back(self, server_id: str) -> None:
        """A peer declared dead is alive again."""
        for location in self.locations.server_back(server_id):
            self._notify_remote(location)

    def reannounce(self) -> list[Location]:
        """Every local registration again (for a peer that just (re)connected)."""
        out = []
        for session in self.encoders.values():
            state = (m.EncoderState.STREAMING if session.streaming
                     else m.EncoderState.ONLINE)
            location = Location(session.encoder_id, self.server_id, session.epoch,
                                session.seq, state)
            session.seq += 1
            self.locations.apply(location)
            out.append(location)
        return out

    def _notify_remote(self, location: Location) -> None:
        record = self.registry.get_encoder(location.encoder_id)
        if record is None:
            return
        server = location.server_id if location.online else ""
        self._notify(record.domain, m.EncoderInfo(location.encoder_id, record.name,
                                                  location.state, server))

    # -- viewers ---------------------------------------------------------

    def viewer_connected(self, account: str, domain: str, link: ILink) -> ViewerSession:
        ticket = self._new_ticket()
        session = ViewerSession(self, account, domain, link, ticket)
        self._tickets[ticket] = session
        self.viewers.add(session)
        return session

    def viewer_disconnected(self, session: ViewerSession) -> None:
        if session.closed:
            return
        session.closed = True
        self._tickets.pop(session.ticket, None)
        self.viewers.discard(session)
        session.detach_relay()
        for channel in list(session.watching.values()):
            session._detach(channel)
        session.watching.clear()

    # -- whole server ----------------------------------------------------

    def shutdown(self) -> None:
        """Tell every client that the server is going away."""
        for viewer in list(self.viewers):
            viewer.link.close_with_error(ErrorCode.SHUTTING_DOWN, "server shutting down")
            self.viewer_disconnected(viewer)
        for encoder in list(self.encoders.values()):
            encoder.link.close_with_error(ErrorCode.SHUTTING_DOWN, "server shutting down")
            self.encoder_disconnected(encoder)

    def redirect_encoder(self, session: EncoderSession, server: m.ServerInfo,
                         reason: int) -> None:
        """Send an encoder to another server (a balancer's move); its session ends here."""
        if session.closed:
            return
        session.link.send(m.EncoderRedirect(server, reason))
        session.link.close()

    def bytes_out(self) -> int:
        """Video bytes written to viewers since the start (a monotonic counter)."""
        return self._bytes_out_done + sum(v.feed.bytes_written for v in self.viewers
                                          if v.feed is not None)

    def stats(self) -> dict[str, int]:
        return {
            "encoders": len(self.encoders),
            "streaming": sum(1 for e in self.encoders.values() if e.streaming),
            "viewers": len(self.viewers),
            "channels": len(self.channels),
        }
