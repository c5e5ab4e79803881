"""The MSRP relay of one process: its connections, its outbound pool and its REPORTs.

``MSRPRelay`` holds what every ``connection.MSRPConnection`` shares: the
relay core, the live connections (idle close and the connection limit,
RFC 4976 §6.5), the outbound connections to next hops (§6.4.2) and the
failure REPORTs it sends (RFC 4975 §7.1.2).  The protocol itself is in
connection.py, what happens to bodies in forwarding.py.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall

from relayd.logs import logger
from relayd.msrp.connection import ListenerFactory, MSRPConnection, OutboundFactory
from relayd.msrp.link import Link, MSRPCounts, RelayLimits
from relayd.msrp.message import Headers, MSRPRequest
from relayd.msrp.relay import RelayCore
from relayd.msrp.uri import DEFAULT_PORT, MSRPURI
from relayd.net.pool import ConnectionPool
from relayd.net.srv import srv_targets
from relayd.net.tls import (
    ServerIdentity,
    client_connection_creator,
    sibling_connection_creator,
)
from relayd.tokens import new_transaction_id


class MSRPRelay:
    """State shared by every MSRP connection of one relay process."""

    log = logger()

    def __init__(
        self,
        reactor: Any,
        core: RelayCore,
        limits: RelayLimits,
        identity: ServerIdentity | None = None,
        trust_roots: list[Any] | None = None,
        resolver: Callable[[str, str], defer.Deferred[list[tuple[str, int]]]] | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.core = core
        self.limits = limits
        self.identity = identity
        self.trust_roots = trust_roots
        #: With [relay] workers: the relay's own host name.  A URI naming it on a port
        #: that is not ours is another worker's, reached over TLS trusting our own
        #: certificate (relayd.workers).
        self.sibling_host: str | None = None
        self.connections: OrderedDict[MSRPConnection, None] = OrderedDict()
        self.counts = MSRPCounts()
        #: Connections we opened to next hops, by (scheme, host, port or 0).
        self._outbound: ConnectionPool[tuple[str, str, int], MSRPConnection] = ConnectionPool(
            self.clock
        )
        self._resolver = resolver or _srv_resolver
        #: Next hops (outbound keys) that said they are relayd (message.CHUNK_LIMIT).
        self.relayd_peers: dict[tuple[str, str, int], None] = {}
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        #: While input is handled: the output held back until the end of that
        #: read, per connection (see MSRPConnection.dataReceived); else None.
        self.batch: dict[Link, list[bytes]] | None = None
        self.batch_number = 0

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        interval = max(1.0, min(30.0, self.limits.idle_timeout_seconds / 4))
        self._sweeper.start(interval, now=False)

    def stop(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
        for connection in list(self.connections):
            connection.close("relay shutting down")

    def sweep(self) -> None:
        """Close idle connections (§6.5) and forget expired sessions."""
        now = self.clock.seconds()
        limit = self.limits.idle_timeout_seconds
        for connection in list(self.connections):
            if now - connection.last_activity >= limit:
                connection.close("idle")
            else:
                # Ordered by last use: the rest are younger.
                break
        self.core.sessions.sweep()

    def listener_factory(self, tls: bool) -> Factory:
        return ListenerFactory(self, tls)

    # -- connection registry --------------------------------------------------

    def register(self, connection: MSRPConnection) -> None:
        self.connections[connection] = None
        limit = self.limits.max_connections
        while limit and len(self.connections) > limit:
            oldest = next(iter(self.connections))
            if oldest is connection:
                break
            self.log.warn(
                "Connection limit {limit} reached: closing {peer}", limit=limit, peer=oldest.peer
            )
            oldest.close("connection limit")
            self.connections.pop(oldest, None)

    def unregister(self, connection: MSRPConnection) -> None:
        self.connections.pop(connection, None)
        key = connection.outbound_key
        if key is not None:
            self._outbound.discard(key, connection)
        dropped = self.core.sessions.drop_connection(connection)
        if dropped:
            self.log.info(
                "{count} session(s) of {peer} invalidated", count=dropped, peer=connection.peer
            )

    def touch(self, connection: MSRPConnection) -> None:
        """Record use (a read or a write): idle close and LRU eviction go by it (§6.5)."""
        connection.last_activity = self.clock.seconds()
        try:
            self.connections.move_to_end(connection)
        except KeyError:  # not registered (yet, or any more)
            pass

    # -- outbound pool ----------------------------------------------------------

    def connection_for(self, uri: MSRPURI) -> defer.Deferred[MSRPConnection]:
        """An open connection to this next hop: reused when possible (§6.4.2)."""
        host = uri.host.strip("[]").lower()
        key = (uri.scheme, host, uri.port or 0)
        existing = self._outbound.get(key)
        if existing is not None:
            return defer.succeed(existing)
        if uri.scheme == "msrps":
            for connection in reversed(self.connections):
                if connection.connected and host in connection.peer_names:
                    return defer.succeed(connection)
        return self._outbound.acquire(key, lambda: self._connect(key, uri, host))

    async def _connect(self, key: tuple[str, str, int], uri: MSRPURI, host: str) -> MSRPConnection:
        try:
            if uri.port is not None:
                targets = [(host, uri.port)]
            else:
                # §8: SRV for the scheme when no port is given, then A/AAAA on 2855.
                service = "_msrps._tcp" if uri.scheme == "msrps" else "_msrp._tcp"
                targets = await self._resolver(service, host)
                targets.append((host, DEFAULT_PORT))
            connection: MSRPConnection | None = None
            failure: BaseException | None = None
            for target_host, port in targets:
                try:
                    connection = await self._open(key, uri.scheme, host, target_host, port)
                    break
                except Exception as e:
                    failure = e
            if connection is None:
                raise failure or error.ConnectError("no address")
        except Exception as e:
            self.log.warn(
                "Cannot connect to {host}: {reason}", host=host, reason=str(e) or type(e).__name__
            )
            raise
        return connection

    async def _open(
        self, key: tuple[str, str, int], scheme: str, name: str, host: str, port: int
    ) -> MSRPConnection:
        endpoint: Any = HostnameEndpoint(
            self.reactor, host, port, timeout=self.limits.connect_timeout_seconds
        )
        tls = scheme == "msrps"
        if tls:
            if name == self.sibling_host and self.identity is not None:
                creator = sibling_connection_creator(name, self.identity)
            else:
                creator = client_connection_creator(name, self.identity, self.trust_roots)
            endpoint = wrapClientTLS(creator, endpoint)
        factory = OutboundFactory(self, key, tls, name)
        protocol = await endpoint.connect(factory)
        assert isinstance(protocol, MSRPConnection)
        return protocol

    def peer_chunk_bytes(self, names: frozenset[str], port: int | None) -> int:
        """The longest SEND body towards this peer relay: listed, else the safe default.

        Other relays may refuse what relayd takes (Kamailio drops the
        connection above about 10 KiB); a relayd peer says what it is on
        forwarded AUTHs (message.CHUNK_LIMIT) and then gets max_chunk_bytes.
        """
        limits = self.limits
        if self.sibling_host is not None and self.sibling_host in names:
            return limits.max_chunk_bytes  # another worker of this relay
        size = limits.peer_chunk_bytes
        for host, listed_port, listed_size in limits.peer_chunk_overrides:
            if host in names and listed_port in (None, port):
                size = listed_size
                if listed_port is not None:
                    break
        return min(size, limits.max_chunk_bytes)

    # -- REPORTs -----------------------------------------------------------------

    def send_report(
        self,
        connection: Link,
        to_path: str,
        from_uri: str,
        message_id: str,
        byte_range: str,
        code: int,
        comment: str,
        cause: str | None = None,
    ) -> None:
        """A failure REPORT towards the original sender (RFC 4975 §7.1.2, RFC 4976 §6.4.1).

        ``cause`` says what happened in more words than the status (an
        OpenSSL reason, say): it goes to the log line, not to the sender.
        """
        if not connection.connected:
            self.log.info("REPORT {code} dropped: previous hop is gone", code=code)
            return
        headers = Headers(
            [
                ("To-Path", to_path),
                ("From-Path", from_uri),
                ("Message-ID", message_id),
                ("Byte-Range", byte_range),
                ("Status", f"000 {code} {comment}".rstrip()),
            ]
        )
        report = MSRPRequest(new_transaction_id(), "REPORT", headers)
        self.log.info(
            "REPORT {code} {comment} sent for message {message}: {cause}",
            code=code,
            comment=comment,
            message=message_id,
            cause=cause or comment,
        )
        connection.write_atomic(report.to_bytes())


def _srv_resolver(service: str, host: str) -> defer.Deferred[list[tuple[str, int]]]:
    """§8: the targets of ``service.host`` in RFC 2782 order (relayd.net.srv)."""
    return srv_targets(f"{service}.{host}")
