"""SIP transports (RFC 3261 §18): UDP datagrams, TCP/TLS streams, and response routing.

Bytes come in through :class:`SIPDatagramProtocol` (one per UDP listener) or
:class:`SIPStreamProtocol` (one per TCP/TLS connection), are parsed, get the §18.2.1 /
RFC 3581 ``received``/``rport`` treatment and go to the
:class:`~relayd.sip.transaction.TransactionLayer`. Going out, :meth:`SIPTransportLayer.send`
is the transaction layer's ``send``: responses follow §18.2.2 (stream: the connection the
request came on; UDP: ``received``/``rport``), requests go to a resolved
:class:`~relayd.sip.resolve.Target`, over TCP instead of UDP when larger than the MTU
budget (§18.1.1), on a reused connection keyed by ``(transport, host, port)``.

Nothing raises out of ``datagramReceived``/``dataReceived``: each message is handled inside
its own failure boundary, and malformed input is answered ``400`` when the parser could
still build a response (``SIPParseError.partial``), otherwise dropped with a ``warn``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import DatagramProtocol, Protocol, ServerFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.logs import logger
from relayd.net.pool import ConnectionPool
from relayd.sip.message import (
    KNOWN_METHODS,
    SIPHeaderError,
    SIPRequest,
    SIPResponse,
    Via,
    make_response,
    remember_via,
    split_header_values,
    stateless_tag,
)
from relayd.sip.parser import (
    DEFAULT_LIMITS,
    KeepAlivePing,
    SIPLimits,
    SIPParseError,
    StreamFramer,
    is_keepalive,
    parse_datagram,
)
from relayd.sip.resolve import DEFAULT_PORTS, Target
from relayd.sip.transaction import TransactionLayer, TransportError, local_response
from relayd.sipuri import SIPURI, NameAddr, SIPURIError

__all__ = [
    "UDP_MAX_DATAGRAM_BYTES",
    "UDP_MAX_REQUEST_BYTES",
    "SIPDatagramProtocol",
    "SIPStreamFactory",
    "SIPStreamProtocol",
    "SIPTransportLayer",
    "Source",
    "TransportError",
    "apply_received",
    "response_address",
]

UDP_MAX_REQUEST_BYTES = 1300
"""§18.1.1: larger requests go over TCP when the path MTU is unknown."""

UDP_MAX_DATAGRAM_BYTES = 65535

SOURCE_WINDOW_SECONDS = 0.1
"""The per-source datagram budget is counted over windows this long: a flood's share is
read in bursts short enough that the socket buffer does not fill meanwhile."""

MAX_TRACKED_SOURCES = 100_000
"""Sources counted per window (memory bound); further sources go uncounted."""

ConnectionKey = tuple[str, str, int]
"""``(transport, host, port)``: how stream connections are found for reuse."""


@dataclass(frozen=True, slots=True, eq=False)
class Source:
    """Where a message came from; the transaction layer hands it back as the response
    destination. UDP sources name the listener that received, so the answer leaves from
    the same socket (NATs and RFC 3581 depend on it); stream sources name the connection."""

    transport: str
    host: str
    port: int
    listener: SIPDatagramProtocol | None = None
    connection: SIPStreamProtocol | None = None
    reply_to: tuple[str, int] | None = None
    """UDP: the §18.2.2 response address, worked out once from the request's Via."""

    @property
    def reliable(self) -> bool:
        return self.transport != "UDP"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport.lower()}:{host}:{self.port}"


def _same_host(via_host: str, address: str) -> bool:
    if via_host == address:
        return True
    try:
        return ipaddress.ip_address(via_host) == ipaddress.ip_address(address)
    except ValueError:
        return False  # sent-by is a name: §18.2.1 always adds received then


def apply_received(request: SIPRequest, host: str, port: int) -> Via:
    """§18.2.1 + RFC 3581 §4 on the top Via, in place: ``received`` when sent-by is not
    the source address, ``rport`` (and then ``received`` unconditionally) when asked for.
    Returns the resulting top Via."""
    via = request.via
    rport_wanted = via.rport_requested and via.rport is None
    if not rport_wanted and _same_host(via.host, host):
        return via
    via = via.with_param("received", host)
    if rport_wanted:
        via = via.with_param("rport", str(port))
    text = via.format()
    remember_via(text, via)  # read again at once (transaction key, response address)
    _replace_top_via(request, text)
    return via


def _replace_top_via(message: SIPRequest | SIPResponse, via: Via | str) -> None:
    text = via if isinstance(via, str) else via.format()
    rows = message.headers._fields["via"]
    top = rows[0]
    if "," not in top:
        rows[0] = text
        return
    values = split_header_values(top)
    values[0] = text
    rows[0] = ", ".join(values)


def response_address(via: Via) -> tuple[str, int]:
    """§18.2.2 for unreliable transports (RFC 3581 §4 for rport); ``maddr`` first."""
    default = DEFAULT_PORTS.get(via.transport, 5060)
    maddr = via.param("maddr")
    if maddr:
        return maddr, via.port or default
    rport = via.rport
    received = via.received
    if rport is not None:
        return received or via.host, rport
    if received:
        return received, via.port or default
    return via.host, via.port or default


class SIPDatagramProtocol(DatagramProtocol):
    """One UDP listener. Parses each datagram and feeds the transport layer."""

    log = logger()

    def __init__(self, layer: SIPTransportLayer) -> None:
        self.layer = layer
        self._local: tuple[str, int] | None = None

    def startProtocol(self) -> None:
        # The default socket buffer (~208 KiB) overflows under the 200s coming back
        # from a fan-out; the kernel caps the request at net.core.rmem_max.
        transport: Any = self.transport
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if handle is not None:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    handle.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER_BYTES)
                except OSError:
                    pass
        self.layer._udp_started(self)

    def is_v6(self) -> bool:
        """Does this listener send over IPv6?"""
        return ":" in self.local_host_port()[0]

    def stopProtocol(self) -> None:
        self._local = None
        self.layer._udp_stopped(self)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            if not self.layer._admit(addr):
                return
            host, port = addr[0], addr[1]
            if is_keepalive(datagram):
                return
            source = Source("UDP", host, port, listener=self)
            try:
                message = parse_datagram(datagram, self.layer.limits)
            except SIPParseError as e:
                self.layer._malformed(e, source)
                return
            self.layer._dispatch(message, source)
        except Exception:
            self.log.failure("unhandled error on datagram from {peer}", peer=addr)

    def write_to(self, data: bytes, host: str, port: int) -> None:
        if self.transport is None:
            raise TransportError("UDP listener is not running")
        self.transport.write(data, (host, port))

    def local_host_port(self) -> tuple[str, int]:
        """The bound address; fixed while listening, so asked of the socket once."""
        local = self._local
        if local is None:
            address: Any = self.transport.getHost()  # type: ignore[union-attr]
            local = self._local = (address.host, address.port)
        return local


@implementer(IHandshakeListener)
class SIPStreamProtocol(Protocol):
    """One TCP or TLS connection, inbound or outbound (§18.3 framing by Content-Length).

    A framing error answers 400 when possible and closes: the next message boundary is
    unknown. An idle connection closes (no bytes either way for ``idle_timeout_seconds``,
    or ``request_idle_timeout_seconds`` once a request went over it either way; a TLS
    connect that never starts its handshake is idle from the start), unless it carries
    the flow of a registration that has not expired (RFC 5626 §5: the registrar reaches
    the UA over that flow, and the UA keeps it up). ``secured`` (outbound TLS) fires once
    the handshake completes and fails if the connection ends first: the connection is
    only used from then on, so a peer whose certificate fails the check answers a 503
    at once instead of a timeout.
    """

    log = logger()

    def __init__(self, layer: SIPTransportLayer, transport_name: str) -> None:
        self.layer = layer
        self.transport_name = transport_name
        self.framer = StreamFramer(layer.limits)
        self.source: Source | None = None
        self.key: ConnectionKey | None = None
        self.connected = False
        self.carried_request = False
        self.flow_expiry: dict[SIPURI, float] = {}
        """Contacts registered over this connection, and until when (RFC 5626 flows)."""
        self._last_activity = 0.0
        self._idle_call: IDelayedCall | None = None
        self.secured: Deferred[SIPStreamProtocol] | None = None

    def handshakeCompleted(self) -> None:
        secured, self.secured = self.secured, None
        if secured is not None:
            secured.callback(self)

    def connectionMade(self) -> None:
        peer: Any = self.transport.getPeer()  # type: ignore[union-attr]
        self.connected = True
        self.source = Source(self.transport_name, peer.host, peer.port, connection=self)
        self.key = (self.transport_name, peer.host, peer.port)
        self.layer._stream_opened(self)
        self._touch()
        self._arm_idle(self.layer.idle_timeout_seconds)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.connected = False
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        secured, self.secured = self.secured, None
        if secured is not None:
            secured.errback(TransportError(f"TLS handshake failed: {reason.getErrorMessage()}"))
        self.layer._stream_closed(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            self._touch()
            source = self.source
            assert source is not None
            for event in self.framer.feed(data):
                try:
                    if isinstance(event, KeepAlivePing):
                        self.transport.write(b"\r\n")  # type: ignore[union-attr]
                    elif isinstance(event, SIPParseError):
                        self.layer._malformed(event, source)
                        if event.framing_lost:
                            self.transport.loseConnection()  # type: ignore[union-attr]
                    else:
                        if isinstance(event, SIPRequest):
                            self.carried_request = True
                        self.layer._dispatch(event, source)
                except Exception:
                    self.log.failure("unhandled error on message from {peer}", peer=source)
        except Exception:
            self.log.failure("unhandled error on stream from {peer}", peer=self.source)
            self.transport.abortConnection()  # type: ignore[union-attr]

    def write_message(self, data: bytes) -> None:
        self._touch()
        self.transport.write(data)  # type: ignore[union-attr]

    def _touch(self) -> None:
        self._last_activity = self.layer._touched(self)

    def _arm_idle(self, seconds: float) -> None:
        if seconds > 0:
            self._idle_call = self.layer.clock.callLater(seconds, self._idle_check)

    def flow_until(self) -> float:
        """When the last registration over this connection expires (0: none)."""
        return max(self.flow_expiry.values(), default=0.0)

    def _idle_check(self) -> None:
        """One timer per connection, re-armed for the remaining time, instead of a
        reset on every message (cheaper at high message rates)."""
        self._idle_call = None
        if not self.connected:
            return
        layer = self.layer
        timeout = (
            layer.request_idle_timeout_seconds
            if self.carried_request
            else layer.idle_timeout_seconds
        )
        now = layer.clock.seconds()
        remaining = max(self._last_activity + timeout, self.flow_until()) - now
        if remaining <= 0:
            self.log.info("closing idle connection to {peer}", peer=self.source)
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self._arm_idle(remaining)


class SIPStreamFactory(ServerFactory):
    """Server factory for ``tcp:``/``ssl:`` listeners. At ``max_connections`` the
    connection idle the longest closes to make room (none that carries a live
    registration flow); when every one does, the new connection is refused."""

    def __init__(self, layer: SIPTransportLayer, transport_name: str = "TCP") -> None:
        self.layer = layer
        self.transport_name = transport_name

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        layer = self.layer
        if layer.stream_count >= layer.max_connections and not layer._close_idlest():
            layer.log.warn("refusing SIP connection from {peer}: at limit", peer=addr)
            return None
        return SIPStreamProtocol(layer, self.transport_name)


EndpointFactory = Callable[[Target], IStreamClientEndpoint]


class SIPTransportLayer:
    """Owns listeners and connections; bridges them to one :class:`TransactionLayer`,
    and sends the consent relay's requests
    (:class:`~relayd.sip.sending.IRequestSender`).

    ``advertised_host`` is what goes in our Via sent-by (and should be reachable by
    peers); without it the bound address of the listener is used. ``tls_creator`` builds
    the client TLS options for a server name (``relayd.net.tls.client_connection_creator``);
    without it TLS targets fail. ``endpoint_factory`` replaces the whole outbound connect
    (tests use it with a MemoryReactor or iosim).
    """

    log = logger()

    def __init__(
        self,
        reactor: Any,
        *,
        limits: SIPLimits = DEFAULT_LIMITS,
        advertised_host: str | None = None,
        udp_max_request_bytes: int = UDP_MAX_REQUEST_BYTES,
        idle_timeout_seconds: float = 60.0,
        request_idle_timeout_seconds: float = 300.0,
        max_connections: int = 10_000,
        max_pending_per_connection: int = 1_000,
        max_datagrams_per_source: int = 1_000,
        tls_creator: Callable[[str], IOpenSSLClientConnectionCreator] | None = None,
        endpoint_factory: EndpointFactory | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.limits = limits
        self.advertised_host = advertised_host
        self.udp_max_request_bytes = udp_max_request_bytes
        self.idle_timeout_seconds = idle_timeout_seconds
        self.request_idle_timeout_seconds = request_idle_timeout_seconds
        self.max_connections = max_connections
        self.max_pending_per_connection = max_pending_per_connection
        self.max_datagrams_per_source = max_datagrams_per_source
        self._window_counts: dict[Any, int] = {}
        self._window_end = 0.0
        self._window_dropped = 0
        self._next_drop_log = 0.0
        self._tls_creator = tls_creator
        self._endpoint_factory = endpoint_factory or self._default_endpoint
        self.transactions: TransactionLayer | None = None
        self._udp: list[SIPDatagramProtocol] = []
        #: With [relay] workers: this worker's own UDP socket, which the relay's requests
        #: leave from and our Via (and Contact) name, so that their responses and the
        #: dialog's requests come back to this worker, not to whichever worker the kernel
        #: picks on the shared port (relayd.workers).
        self._request_udp: SIPDatagramProtocol | None = None
        # One connection per (transport, host, port), each connect attempted once
        # (relayd.net.pool, shared with MSRP); the attempt's waiters give up after
        # Timer B (64*T1, RFC 3261 §17.1.1.2), which also bounds a TLS handshake.
        self._pool: ConnectionPool[ConnectionKey, SIPStreamProtocol] = ConnectionPool(
            reactor, wait_seconds=CONNECT_WAIT_SECONDS
        )
        # Every open connection, the one idle the longest first (closed first at the cap).
        self._by_activity: OrderedDict[SIPStreamProtocol, None] = OrderedDict()
        self._flows: dict[SIPURI, SIPStreamProtocol] = {}
        self._pending: dict[ConnectionKey, list[bytes]] = {}
        self._listen_ports: dict[str, int] = {}
        self._sent_by: dict[str, tuple[str, int]] = {}
        self._prepared: tuple[SIPRequest, bytes] | None = None
        self._warned_wildcard = False
        # What passed through, by method or status (read by relayd.web.metrics);
        # retransmissions included: each is a message on the wire.
        # Plain dicts: a Counter's item access costs twice a dict's.
        self.requests_received: dict[str, int] = {}
        self.responses_received: dict[int, int] = {}
        self.requests_sent: dict[str, int] = {}
        self.responses_sent: dict[int, int] = {}

    def attach(self, transactions: TransactionLayer) -> None:
        """Connect the transaction layer (built with ``send=self.send``)."""
        self.transactions = transactions

    # -- factories for the daemon -------------------------------------------------------

    def datagram_protocol(self) -> SIPDatagramProtocol:
        return SIPDatagramProtocol(self)

    def request_protocol(self) -> SIPDatagramProtocol:
        """A UDP listener of this process alone, that our own requests leave from (and
        our UDP Via names): see ``_request_udp``."""
        protocol = SIPDatagramProtocol(self)
        self._request_udp = protocol
        return protocol

    def stream_factory(self, transport_name: str = "TCP") -> SIPStreamFactory:
        return SIPStreamFactory(self, transport_name)

    def set_listen_port(self, transport_name: str, port: int) -> None:
        """Record a stream listener's bound port for Via sent-by (UDP records its own)."""
        self._listen_ports[transport_name] = port
        self._sent_by.clear()

    @property
    def stream_count(self) -> int:
        """Open connections, less those closing to make room."""
        return len(self._by_activity)

    def sent_by(self, transport_name: str) -> tuple[str, int]:
        """Our Via sent-by for a transport (§18.1.1: where we listen for it)."""
        known = self._sent_by.get(transport_name)
        if known is not None:
            return known
        port = self._listen_ports.get(transport_name)
        host = self.advertised_host
        if (port is None or host is None) and self._udp and self._udp[0].transport is not None:
            udp_host, udp_port = self._udp[0].local_host_port()
            host = host or udp_host
            port = port or udp_port
        if host is None or host in ("0.0.0.0", "::", ""):  # noqa: S104 - a comparison
            if host and not self._warned_wildcard:
                self._warned_wildcard = True
                self.log.warn(
                    "SIP listens on the wildcard {host} and no advertised host is set:"
                    " our Via says 127.0.0.1, which peers cannot answer to; set [relay]"
                    " hostname",
                    host=host,
                )
            host = "127.0.0.1"
        result = (host, port or DEFAULT_PORTS.get(transport_name, 5060))
        if self._udp:  # stable until a listener comes or goes
            self._sent_by[transport_name] = result
        return result

    def own_sent_by(self) -> set[tuple[str, int | None]]:
        """Every sent-by we stamp, lower-cased as :attr:`Via.sent_by` (loop detection)."""
        return {
            (host.lower(), port) for host, port in (self.sent_by(t) for t in ("UDP", "TCP", "TLS"))
        }

    # -- inbound ------------------------------------------------------------------------

    def _udp_started(self, protocol: SIPDatagramProtocol) -> None:
        self._udp.append(protocol)
        self._sent_by.clear()
        host, port = protocol.local_host_port()
        if protocol is self._request_udp:
            self._listen_ports["UDP"] = port
            self.log.info(
                "SIP requests of this worker leave from udp:{host}:{port}", host=host, port=port
            )
            return
        self._listen_ports.setdefault("UDP", port)
        self.log.info("SIP listening on udp:{host}:{port}", host=host, port=port)

    def _udp_stopped(self, protocol: SIPDatagramProtocol) -> None:
        if protocol in self._udp:
            self._udp.remove(protocol)
        self._sent_by.clear()

    def _stream_opened(self, protocol: SIPStreamProtocol) -> None:
        assert protocol.key is not None
        self._by_activity[protocol] = None
        # The newest connection to an address wins (RFC 5923 style reuse of inbound ones).
        self._pool.put(protocol.key, protocol)

    def _touched(self, protocol: SIPStreamProtocol) -> float:
        """Traffic on ``protocol``: it becomes the last to close at the cap; the time."""
        if protocol in self._by_activity:
            self._by_activity.move_to_end(protocol)
        return self.clock.seconds()

    def _close_idlest(self) -> bool:
        """Close the connection idle the longest that carries no live registration flow
        (RFC 5626 §5: the flow is how the UA is reached); whether one was found."""
        now = self.clock.seconds()
        for protocol in self._by_activity:
            if protocol.flow_until() <= now:
                del self._by_activity[protocol]
                self.log.info("closing idle connection to {peer}: at limit", peer=protocol.source)
                if protocol.transport is not None:
                    protocol.transport.abortConnection()  # type: ignore[attr-defined]
                return True
        return False

    def _stream_closed(self, protocol: SIPStreamProtocol) -> None:
        self._by_activity.pop(protocol, None)
        for uri in protocol.flow_expiry:
            if self._flows.get(uri) is protocol:
                del self._flows[uri]
        key = protocol.key
        registered = key is not None and self._pool.discard(key, protocol)
        if self.transactions is None:
            return

        def used(destination: object) -> bool:
            if isinstance(destination, Source):
                return destination.connection is protocol
            # Requests to a Target went over the connection registered for its key.
            return (
                registered
                and isinstance(destination, Target)
                and (destination.transport, destination.host, destination.port) == key
            )

        self.transactions.connection_lost(used)

    def _admit(self, addr: Any) -> bool:
        """Whether to read a datagram from ``addr``: at most ``max_datagrams_per_source``
        a second from each source address and port, counted over windows of
        :data:`SOURCE_WINDOW_SECONDS`. Parsing and answering a flood costs far more than
        this dictionary look-up; dropping the excess unread keeps the socket buffer
        drained, so every other source is still read (and answered, if only 503) within
        a window, and no state grows for the flood. A 503's Retry-After only holds back
        senders that honour it; this holds back the ones that do not."""
        limit = self.max_datagrams_per_source
        if not limit:
            return True
        counts = self._window_counts
        now = self.clock.seconds()
        if now >= self._window_end:
            if self._window_dropped and now >= self._next_drop_log:  # a line a second
                self.log.warn(
                    "SIP flood: dropped {count} datagrams from sources over {limit} a second",
                    count=self._window_dropped,
                    limit=limit,
                )
                self._window_dropped = 0
                self._next_drop_log = now + 1.0
            counts.clear()
            self._window_end = now + SOURCE_WINDOW_SECONDS
        count = counts.get(addr, 0)
        if count >= limit * SOURCE_WINDOW_SECONDS:
            self._window_dropped += 1
            return False
        if count or len(counts) < MAX_TRACKED_SOURCES:
            counts[addr] = count + 1
        return True

    def _dispatch(self, message: SIPRequest | SIPResponse, source: Source) -> None:
        transactions = self.transactions
        if transactions is None:
            self.log.warn("no transaction layer; dropping message from {peer}", peer=source)
            return
        if isinstance(message, SIPRequest):
            method = message.method if message.method in KNOWN_METHODS else "other"
            requests = self.requests_received
            requests[method] = requests.get(method, 0) + 1
            via = apply_received(message, source.host, source.port)
            if not source.reliable:
                # Saves re-parsing the Via of every response (they copy the request's).
                source = Source(
                    "UDP",
                    source.host,
                    source.port,
                    listener=source.listener,
                    reply_to=response_address(via),
                )
            transactions.request_received(message, source, source.reliable)
        else:
            responses, status = self.responses_received, message.status
            responses[status] = responses.get(status, 0) + 1
            transactions.response_received(message, source)

    def _malformed(self, error: SIPParseError, source: Source) -> None:
        """400 (or the parser's status) for an answerable request, else drop with a warn."""
        partial = error.partial
        self.log.warn(
            "malformed SIP message from {peer}: {reason}", peer=source, reason=error.reason
        )
        if partial is None or partial.method == "ACK":
            return
        try:
            apply_received(partial, source.host, source.port)
            # Stateless (no transaction for a request we could not read): the tag must
            # come out the same for each retransmission (§8.2.7).
            response = make_response(
                partial, error.status, error.reason, to_tag=stateless_tag(partial)
            )
            self.send(response, source)
        except Exception:
            self.log.failure("cannot answer malformed request from {peer}", peer=source)

    # -- registration flows (RFC 5626 §5) ----------------------------------------------

    def bind_flows(self, request: SIPRequest, response: SIPResponse, source: object) -> None:
        """A REGISTER was answered: the contacts it bound over a TCP/TLS connection are
        reached over that connection while it is open and the binding lives (RFC 5626
        §5.3, without its instance-id and reg-id: a UA behind a NAT can be reached no
        other way). The expiry of each is the one the 200 lists for it (§10.3 step 8)."""
        connection = source.connection if isinstance(source, Source) else None
        if connection is None or not 200 <= response.status < 300:
            return
        granted: dict[SIPURI, float] = {}
        for row in response.headers.get_all("contact"):
            try:
                contact = NameAddr.parse(row)
                granted[contact.uri] = float(contact.param("expires") or 0)
            except (SIPURIError, ValueError):
                continue
        rows = request.headers.get_all("contact")
        if rows == ["*"]:  # §10.2.2: every binding removed, this connection's too
            contacts = list(connection.flow_expiry)
        else:
            contacts = []
            for row in rows:
                try:
                    contacts.append(NameAddr.parse(row).uri)
                except SIPURIError:
                    continue
        now = self.clock.seconds()
        for uri in contacts:
            expires = granted.get(uri, 0.0)
            if expires > 0:
                self._flows[uri] = connection
                connection.flow_expiry[uri] = now + expires
            else:
                connection.flow_expiry.pop(uri, None)
                if self._flows.get(uri) is connection:
                    del self._flows[uri]

    def flow_target(self, contact: SIPURI) -> Target | None:
        """Where to send to a registered ``contact``: the connection it was registered
        over while that is open and the registration lives, else ``None`` (then its
        URI, as RFC 3263 resolves it)."""
        connection = self._flows.get(contact)
        if connection is None or not connection.connected or connection.key is None:
            return None
        if connection.flow_expiry.get(contact, 0.0) <= self.clock.seconds():
            return None
        transport_name, host, port = connection.key
        self._pool.put(connection.key, connection)  # the flow is the way to that address
        return Target(transport_name, host, port)

    # -- outbound -----------------------------------------------------------------------

    def send(self, message: SIPRequest | SIPResponse, destination: object) -> None:
        """The transaction layer's ``send``; raises :class:`TransportError` on failure."""
        if isinstance(message, SIPResponse):
            sent, status = self.responses_sent, message.status
            sent[status] = sent.get(status, 0) + 1
            self._send_response(message, destination)
            return
        requests, method = self.requests_sent, message.method
        requests[method] = requests.get(method, 0) + 1
        if isinstance(destination, Target):  # every client transaction: spare the call
            self._send_request(message, destination)
        else:
            self._send_request(message, self.towards(destination))

    def towards(self, source: object) -> Target:
        """Where a request goes to the peer a message came from (a :class:`Source`):
        back along its flow, to its transport, address and port; a :class:`Target` is
        already that. In-dialog requests of the consent relay (a NOTIFY) go this way."""
        if isinstance(source, Target):
            return source
        if isinstance(source, Source):
            return Target(source.transport, source.host, source.port)
        raise TransportError(f"cannot send to {source!r}")

    def _send_response(self, response: SIPResponse, destination: object) -> None:
        data = response.to_bytes()
        if isinstance(destination, Target):
            self._send_to_target(data, destination)
            return
        if not isinstance(destination, Source):
            raise TransportError(f"cannot answer to {destination!r}")
        reply_to = destination.reply_to
        if reply_to is not None and destination.listener is not None:
            destination.listener.write_to(data, reply_to[0], reply_to[1])
            return
        try:
            via = response.via
        except SIPHeaderError as e:
            raise TransportError("response without usable Via") from e
        if destination.reliable:
            connection = destination.connection
            if connection is not None and connection.connected:
                connection.write_message(data)
                return
            # §18.2.2: connection gone: open one to received (or sent-by), sent-by port.
            host = via.received or via.host
            port = via.port or DEFAULT_PORTS.get(destination.transport, 5060)
            server_name = via.host if destination.transport == "TLS" else None
            self._send_stream(Target(destination.transport, host, port, server_name), data)
            return
        host, port = response_address(via)
        listener = destination.listener or self._udp_listener(host)
        listener.write_to(data, host, port)

    def prepare_request(self, request: SIPRequest, target: Target) -> Target:
        """Stamp our top Via (transport, sent-by, ``rport`` on UDP) and apply the §18.1.1
        size rule; returns the target actually used (UDP may become TCP)."""
        self._stamp_via(request, target.transport)
        if target.transport == "UDP":
            data = request.to_bytes()
            if len(data) > self.udp_max_request_bytes:
                target = Target("TCP", target.host, target.port, target.server_name)
                self._stamp_via(request, "TCP")
            else:
                # Sent right after this by the client transaction: serialise once.
                self._prepared = (request, data)
        return target

    def _stamp_via(self, request: SIPRequest, transport_name: str) -> None:
        via = request.via
        host, port = self.sent_by(transport_name)
        params = via.params
        if transport_name == "UDP" and not any(name == "rport" for name, _ in params):
            params = (*params, ("rport", None))
        elif transport_name != "UDP":
            params = tuple(p for p in params if p[0] != "rport")
        stamped = Via(transport_name, host, port, params)
        text = stamped.format()
        remember_via(text, stamped)
        _replace_top_via(request, text)

    def request(
        self,
        request: SIPRequest,
        target: Target,
        on_provisional: Callable[[SIPResponse], object] | None = None,
        on_2xx: Callable[[SIPResponse], object] | None = None,
    ) -> Deferred[SIPResponse]:
        """Send ``request`` in a client transaction (the relay's entry point).

        The request's top Via must carry a fresh branch (``new_branch()``). A failed
        connect answers a synthesized 503 at once (§8.1.3.1) rather than a 408 later,
        unless TCP was only chosen for the request's size: then it goes over UDP after
        all, as §18.1.1 asks (no transaction had started, so the branch stays).
        """
        transactions = self.transactions
        if transactions is None:
            raise TransportError("no transaction layer attached")
        asked = target
        target = self.prepare_request(request, target)
        if not target.reliable:
            return transactions.client_request(request, target, False, on_provisional, on_2xx)

        async def run() -> SIPResponse:
            try:
                await self.connection(target)
            except Exception as e:
                self.log.warn(
                    "cannot connect to {peer} for {method}: {reason}",
                    peer=str(target),
                    method=request.method,
                    reason=str(e),
                )
                if asked.reliable:
                    return local_response(request, 503)
                self._stamp_via(request, "UDP")
                return await transactions.client_request(
                    request, asked, False, on_provisional, on_2xx
                )
            return await transactions.client_request(request, target, True, on_provisional, on_2xx)

        return ensureDeferred(run())

    def forward(self, request: SIPRequest, target: Target) -> None:
        """Send ``request`` outside any transaction (an ACK for a 2xx, §16.11)."""
        self._send_request(request, self.prepare_request(request, target))

    def _send_request(self, request: SIPRequest, target: Target) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] is request:
            self._send_to_target(prepared[1], target)
            return
        if request.headers.get("via") is not None and request.via.transport != target.transport:
            target = self.prepare_request(request, target)
            self._prepared = None
        self._send_to_target(request.to_bytes(), target)

    def _send_to_target(self, data: bytes, target: Target) -> None:
        if target.transport == "UDP":
            self._udp_listener(target.host).write_to(data, target.host, target.port)
        else:
            self._send_stream(target, data)

    def _udp_listener(self, host: str) -> SIPDatagramProtocol:
        want_v6 = ":" in host
        own = self._request_udp
        if own is not None and own.transport is not None and own.is_v6() == want_v6:
            return own
        for protocol in self._udp:
            if protocol.transport is not None and (":" in protocol.local_host_port()[0]) == want_v6:
                return protocol
        if self._udp:
            return self._udp[0]
        raise TransportError("no UDP listener to send from")

    def _send_stream(self, target: Target, data: bytes) -> None:
        key = (target.transport, target.host, target.port)
        connection = self._pool.get(key)
        if connection is not None:
            connection.write_message(data)
            return
        pending = self._pending.get(key)
        if pending is not None:
            if len(pending) >= self.max_pending_per_connection:
                raise TransportError(f"too many messages waiting for {target}")
            pending.append(data)
            return
        self._pending[key] = [data]
        # A failure is logged by _open, with the messages it dropped.
        self.connection(target).addErrback(lambda _: None)

    def connection(self, target: Target) -> Deferred[SIPStreamProtocol]:
        """An open connection to ``target``: reused when one exists, else connected (one
        connect attempt at a time per key; queued messages are flushed on success)."""
        key = (target.transport, target.host, target.port)
        return self._pool.acquire(key, lambda: self._open(target, key))

    async def _open(self, target: Target, key: ConnectionKey) -> SIPStreamProtocol:
        self._pending.setdefault(key, [])
        try:
            endpoint = self._endpoint_factory(target)
            protocol = SIPStreamProtocol(self, target.transport)
            protocol.carried_request = True  # opened to send requests
            secured: Deferred[SIPStreamProtocol] | None = None
            if target.transport == "TLS":
                # Nothing is sent until the peer's certificate passed (handshakeCompleted).
                secured = protocol.secured = Deferred()
            await connectProtocol(endpoint, protocol)
            if secured is not None:
                await secured
        except Exception as e:  # CancelledError too (the pool's wait bound)
            dropped = len(self._pending.pop(key, []))
            self.log.warn(
                "connect to {peer} failed ({reason}); {count} messages dropped",
                peer=str(target),
                reason=Failure(e).getErrorMessage(),
                count=dropped,
            )
            raise TransportError(f"connect to {target} failed") from None
        # Known under the key we dialled too (the peer address is the same unless a
        # proxy/NAT sits in between).
        protocol.key = key
        for data in self._pending.pop(key, []):
            protocol.write_message(data)
        return protocol

    def _default_endpoint(self, target: Target) -> IStreamClientEndpoint:
        tcp: IStreamClientEndpoint
        if ":" in target.host:
            tcp = TCP6ClientEndpoint(self.reactor, target.host, target.port, timeout=10)
        else:
            tcp = TCP4ClientEndpoint(self.reactor, target.host, target.port, timeout=10)
        if target.transport != "TLS":
            return tcp
        if self._tls_creator is None:
            raise TransportError("no TLS client configuration")
        return wrapClientTLS(self._tls_creator(target.server_name or target.host), tcp)

    def close_connections(self) -> None:
        """Drop every stream connection (service shutdown)."""
        for connection in list(self._by_activity):
            if connection.transport is not None:
                connection.transport.loseConnection()


CONNECT_WAIT_SECONDS = 32.0
"""How long requests wait for a connection (and its TLS handshake): Timer B, 64·T1."""

UDP_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
