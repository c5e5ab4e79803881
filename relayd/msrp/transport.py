"""MSRP connections: bytes to parser events to relay decisions, bodies streamed through.

One ``MSRPConnection`` per TCP/TLS connection, inbound or outbound; the
shared ``MSRPRelay`` holds the relay core, the live connections and the
outbound pool.  Design points (RFC 4976 §6.4):

* SEND bodies are never assembled: each inbound chunk becomes a
  ``SendStream`` that writes frames to the next hop as data arrives.
* Only one frame can be open on a connection at a time.  Whoever needs the
  wire (another message, a response, a REPORT) cuts the open frame with a
  ``+`` end-line; the cut message continues later in a new frame with a new
  transaction id and a moved Byte-Range.  So a large transfer never holds
  up a small message (no head-of-line blocking), and chunks of different
  messages are never combined.
* A stream always holds back its latest piece of body, so every frame it
  cuts, and its final frame, carries at least one byte.
* Back-pressure: when more than ``send_queue_bytes`` wait towards a next
  hop, its streams keep the rest in their own backlog and every connection
  streaming into it is paused until the kernel wants more.  Frames of our own
  (responses, REPORTs, whole small requests) never wait in a backlog, so they
  queue behind at most ``send_queue_bytes`` unsent, ours and the kernel's
  together (TCP_NOTSENT_LOWAT wakes us at half of it); backlogs drain in turn,
  a slice each, so a small SEND to a slow reader overtakes a large one at a
  frame boundary.
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from cryptography import x509
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.bounded import remember
from relayd.config import MSRPConfig
from relayd.logs import logger
from relayd.msrp.message import (
    ByteRange,
    Headers,
    MSRPRequest,
    MSRPResponse,
    MSRPStatus,
    end_line,
    forwarded_lines,
    make_response,
    parse_report_mode,
    path_lines,
)
from relayd.msrp.parser import (
    BodyChunk,
    MessageEnd,
    MessageRejected,
    MessageStart,
    MSRPLimits,
    MSRPParseError,
    MSRPParser,
)
from relayd.msrp.relay import KNOWN_METHODS, RelayCore, Route, addressed_to_us, response_route
from relayd.msrp.uri import DEFAULT_PORT, MSRPURI, MSRPURIError, parse_path
from relayd.net.eager import (
    pause_until_writable,
    resume_if_writable,
    socket_transport,
    unsent_bytes,
    write_now,
)
from relayd.net.tls import (
    ServerIdentity,
    certificate_dns_names,
    certificate_ip_names,
    client_connection_creator,
    tls_failure,
)
from relayd.net.tls import certificate_matches as _certificate_matches
from relayd.tokens import new_transaction_id

_PATH_HEADERS = frozenset({"to-path", "from-path"})
#: Put by relayd on the AUTHs it forwards and on its answers to them: "this
#: relay takes chunks of any size" (it re-chunks them itself).  Other relays
#: may not: Kamailio drops the connection above about 10 KiB of body.
_CHUNK_LIMIT = "Relay-Chunk-Limit"
#: Said by each hop for itself: never forwarded.
_HOP_HEADERS = _PATH_HEADERS | {_CHUNK_LIMIT.lower()}
_RELAYD_PEERS_SIZE = 1024
_STREAM_SKIP = frozenset({"to-path", "from-path", "byte-range"})
_READ_BUFFER_BYTES = 262144
#: Linux's TCP_NOTSENT_LOWAT (the socket module has it from Python 3.12 on).
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_ROUTE_CACHE_SIZE = 32
#: Shared by every connection that nothing is streaming into (never added to).
_NO_STREAMS: set[SendStream] = set()
#: Likewise for connections without backlogged streams.
_NO_BACKLOGS: dict[MSRPConnection, list[SendStream]] = {}


class MSRPRelay:
    """State shared by every MSRP connection of one relay process."""

    log = logger()

    def __init__(
        self,
        reactor: Any,
        core: RelayCore,
        config: MSRPConfig,
        identity: ServerIdentity | None = None,
        trust_roots: list[Any] | None = None,
        resolver: Callable[[str, str], defer.Deferred[list[tuple[str, int]]]] | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.core = core
        self.config = config
        self.identity = identity
        self.trust_roots = trust_roots
        self.limits = MSRPLimits(
            max_line_bytes=config.max_line_bytes,
            max_header_count=config.max_header_count,
            max_header_bytes=config.max_header_bytes,
        )
        self.connections: OrderedDict[MSRPConnection, None] = OrderedDict()
        self._outbound: dict[tuple[str, str, int], MSRPConnection] = {}
        self._connecting: dict[tuple[str, str, int], list[defer.Deferred[MSRPConnection]]] = {}
        self._resolver = resolver or _srv_resolver
        #: Next hops (outbound keys) that said they are relayd (_CHUNK_LIMIT).
        self.relayd_peers: dict[tuple[str, str, int], None] = {}
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        #: While input is handled: the output held back until the end of that
        #: read, per connection (see MSRPConnection.dataReceived); else None.
        self.batch: dict[MSRPConnection, list[bytes]] | None = None
        self.batch_number = 0

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        interval = max(1.0, min(30.0, self.config.idle_timeout_seconds / 4))
        self._sweeper.start(interval, now=False)

    def stop(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
        for connection in list(self.connections):
            connection.close("relay shutting down")

    def sweep(self) -> None:
        """Close idle connections (§6.5) and forget expired sessions."""
        now = self.clock.seconds()
        limit = self.config.idle_timeout_seconds
        for connection in list(self.connections):
            if now - connection.last_activity >= limit:
                connection.close("idle")
            else:
                # Ordered by last use: the rest are younger.
                break
        self.core.sessions.sweep()

    def listener_factory(self, tls: bool) -> Factory:
        return _ListenerFactory(self, tls)

    # -- connection registry --------------------------------------------------

    def register(self, connection: MSRPConnection) -> None:
        self.connections[connection] = None
        limit = self.config.max_connections
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
        if key is not None and self._outbound.get(key) is connection:
            del self._outbound[key]
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
        if existing is not None and existing.connected:
            return defer.succeed(existing)
        if uri.scheme == "msrps":
            for connection in reversed(self.connections):
                if connection.connected and host in connection.peer_names:
                    return defer.succeed(connection)
        waiter: defer.Deferred[MSRPConnection] = defer.Deferred()
        waiting = self._connecting.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._connecting[key] = [waiter]
        defer.ensureDeferred(self._connect(key, uri, host))
        return waiter

    async def _connect(self, key: tuple[str, str, int], uri: MSRPURI, host: str) -> None:
        waiters = self._connecting[key]
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
            del self._connecting[key]
            for waiter in waiters:
                waiter.errback(Failure(e))
            return
        self._outbound[key] = connection
        del self._connecting[key]
        for waiter in waiters:
            waiter.callback(connection)

    async def _open(
        self, key: tuple[str, str, int], scheme: str, name: str, host: str, port: int
    ) -> MSRPConnection:
        endpoint: Any = HostnameEndpoint(
            self.reactor, host, port, timeout=self.config.connect_timeout_seconds
        )
        tls = scheme == "msrps"
        if tls:
            creator = client_connection_creator(name, self.identity, self.trust_roots)
            endpoint = wrapClientTLS(creator, endpoint)
        factory = _OutboundFactory(self, key, tls, name)
        protocol = await endpoint.connect(factory)
        assert isinstance(protocol, MSRPConnection)
        return protocol

    def peer_chunk_bytes(self, names: frozenset[str], port: int | None) -> int:
        """The longest SEND body towards this peer relay: listed, else the safe default.

        Other relays may refuse what relayd takes (Kamailio drops the
        connection above about 10 KiB); a relayd peer says what it is on
        forwarded AUTHs (_CHUNK_LIMIT) and then gets max_chunk_bytes.
        """
        config = self.config
        size = config.peer_chunk_bytes
        for host, listed_port, listed_size in config.peer_chunk_overrides:
            if host in names and listed_port in (None, port):
                size = listed_size
                if listed_port is not None:
                    break
        return min(size, config.max_chunk_bytes)

    # -- REPORTs -----------------------------------------------------------------

    def send_report(
        self,
        connection: MSRPConnection,
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


async def _srv_lookup(service: str, host: str) -> list[tuple[str, int]]:
    from twisted.names import client, dns

    try:
        answers, _, _ = await client.lookupService(f"{service}.{host}")
    except Exception:
        return []
    records = []
    for answer in answers:
        if answer.type == dns.SRV:
            payload = answer.payload
            records.append((payload.priority, -payload.weight, str(payload.target), payload.port))
    records.sort()
    return [(target, port) for _, _, target, port in records if target and target != "."]


def _srv_resolver(service: str, host: str) -> defer.Deferred[list[tuple[str, int]]]:
    return defer.ensureDeferred(_srv_lookup(service, host))


def _hop_failure(reason: Failure | None, connected: bool) -> tuple[int, str, str]:
    """The status a failed next hop is reported with (RFC 4975 §10), and its cause.

    * 403: TLS with it failed (its certificate refused, RFC 4976 §9.2): we
      do not forward to a hop we cannot authenticate.  MSRP has no 5xx for
      an unavailable hop; 403 is its "action not allowed".
    * 408: it never answered the connect (the code RFC 4975 §10 gives a
      downstream transaction that did not complete in time).
    * 481: it refused the connection or has no address (``connected``
      false), or the connection dropped: the session is gone that way.

    The cause (the error text) is for the log line; the sender gets the code
    and a short comment.
    """
    value = reason.value if reason is not None else None
    cause = reason.getErrorMessage() if reason is not None else "connection closed"
    tls = tls_failure(value)
    if tls is not None:
        return 403, "next hop failed TLS verification", f"TLS failed: {tls}"
    if isinstance(value, error.TimeoutError):
        return 408, "next hop did not answer", cause
    if connected:
        return 481, "next hop connection lost", cause
    return 481, "next hop unreachable", cause


class _ListenerFactory(Factory):
    noisy = False

    def __init__(self, relay: MSRPRelay, tls: bool) -> None:
        self.relay = relay
        self.tls = tls

    def buildProtocol(self, addr: Any) -> MSRPConnection:
        return MSRPConnection(self.relay, inbound=True, tls=self.tls)


class _OutboundFactory(Factory):
    noisy = False

    def __init__(self, relay: MSRPRelay, key: tuple[str, str, int], tls: bool, name: str) -> None:
        self.relay = relay
        self.key = key
        self.tls = tls
        self.name = name

    def buildProtocol(self, addr: Any) -> MSRPConnection:
        connection = MSRPConnection(self.relay, inbound=False, tls=self.tls)
        connection.outbound_key = self.key
        if self.key not in self.relay.relayd_peers:
            _, host, port = self.key
            connection.chunk_bytes = self.relay.peer_chunk_bytes(frozenset({host}), port or None)
        if self.tls:
            # Verified by service_identity during the handshake.
            connection.peer_names = frozenset({self.name})
        return connection


# -- transactions awaiting a response on a connection --------------------------------


class _FrameTransaction:
    __slots__ = ("deadline", "first_byte", "last_byte", "stream")

    def __init__(self, stream: SendStream, first_byte: int, last_byte: int) -> None:
        self.stream = stream
        self.first_byte = first_byte
        self.last_byte = last_byte
        self.deadline = 0.0

    def timeout(self) -> None:
        self.stream.timed_out(self)

    def response(self, response: MSRPResponse) -> bool:
        stream = self.stream
        # Usually the To-Path is our URI byte for byte as we wrote it: one
        # comparison; anything else is parsed and compared as URIs.
        block = response.headers.block
        if not (block is not None and block.startswith(stream.response_to)) and not (
            addressed_to_us(response, stream.relay.core.is_local)
        ):
            # §6.4.3: only a response coming back along our own path counts;
            # the timer still answers for this frame.
            stream.relay.log.debug(
                "Response {code} {tid} not addressed to this relay: dropped",
                code=response.code,
                tid=response.tid,
            )
            return False
        if response.code // 100 != 2:
            stream.fail(response.code, response.comment, self.first_byte, self.last_byte)
        return True

    def lost(self, code: int, comment: str, cause: str) -> None:
        self.stream.fail(code, comment, self.first_byte, self.last_byte, cause)


class _EndToEndTransaction:
    """A forwarded AUTH or other request whose response travels back (§6.4.3)."""

    __slots__ = ("deadline", "hop", "local_uri", "relay", "request", "source")

    def __init__(
        self, hop: MSRPConnection, source: MSRPConnection, request: MSRPRequest, local_uri: str
    ) -> None:
        self.relay = hop.relay
        self.hop = hop
        self.source = source
        self.request = request
        #: Our URI as the forwarded request's From-Path began with it.
        self.local_uri = local_uri
        self.deadline = 0.0

    def response(self, response: MSRPResponse) -> bool:
        rewritten = response_route(response, self.relay.core.is_local)
        if rewritten is not None:
            to_path, from_path = rewritten
        else:
            # §6.4.3 has the response come back along the request's path; some
            # relays (Kamailio's 401 to a forwarded AUTH) name only us. The
            # transaction id is ours, sent to this hop alone: the answer goes
            # back along the path the request came by, rather than a 408 later.
            self.hop.deviating_response(response)
            to_path = self.request.headers.get("From-Path") or ""
            from_path = f"{self.local_uri} {response.headers.get('From-Path') or ''}".rstrip()
        headers = Headers(
            [("To-Path", to_path), ("From-Path", from_path)]
            + [(k, v) for k, v in response.headers if k.lower() not in _HOP_HEADERS]
        )
        if self.request.method == "AUTH" and _CHUNK_LIMIT in response.headers:
            self.hop.takes_any_chunk()
        if not self.source.connected:
            return True  # §6.4.3: the connection is gone, drop quietly
        forwarded = MSRPResponse(self.request.tid, response.code, response.comment, headers)
        self.source.write_atomic(forwarded.to_bytes())
        if self.request.method == "AUTH":
            challenge = (response.headers.get("WWW-Authenticate") or "").lower()
            if (
                response.code == 401
                and "Authorization" in self.request.headers
                and "stale=true" not in challenge.replace(" ", "")
            ):
                self.source.auth_failed()
            elif response.code == 200:
                self.source.succeeded()
        return True

    def timeout(self) -> None:
        self._answer(408, "Request Timeout")

    def lost(self, code: int, comment: str, cause: str) -> None:
        self.relay.log.info(
            "{method} answered {code} {comment}: {cause}",
            method=self.request.method,
            code=code,
            comment=comment,
            cause=cause,
        )
        self._answer(code, comment)

    def _answer(self, code: int, comment: str) -> None:
        if self.source.connected:
            response = make_response(
                self.request, code, comment, to_path=self.request.headers.get("From-Path") or ""
            )
            self.source.write_atomic(response.to_bytes())


class _Plan:
    """A routing decision and the header bytes every request on those paths reuses.

    Cached per connection under the request's To-Path and From-Path, like the
    decision itself: the forwarded copy's new path lines and the hop-by-hop
    200's path lines (make_response's rule) are then built once per session.
    """

    __slots__ = (
        "expires_at",
        "forward_paths",
        "generation",
        "ok_paths",
        "report_to",
        "response_to",
        "route",
    )

    def __init__(self, route: Route, request: MSRPRequest, generation: int) -> None:
        self.route = route
        #: RelayCore.still_valid holds while no session left the table since
        #: (SessionTable.generation) and none of those relied on has expired.
        self.generation = generation
        self.expires_at = min([s.expires_at for s in route.relied_on], default=0.0)
        self.forward_paths = (
            f"To-Path: {route.to_path}\r\nFrom-Path: {route.from_path}\r\n".encode()
        )
        #: How the next hop's responses start: To-Path back to our URI (§6.4.3).
        self.response_to = f"To-Path: {route.from_path.split(' ', 1)[0]}\r\n".encode()
        #: Where failure REPORTs for a SEND go (§7.1.2): the whole From-Path.
        self.report_to = request.headers.get("From-Path") or ""
        previous = self.report_to.split(" ", 1)[0]
        addressed = (request.headers.get("To-Path") or "").split(" ", 1)[0]
        self.ok_paths = f"To-Path: {previous}\r\nFrom-Path: {addressed}\r\n".encode()


# -- message consumers: what happens to the body of the current inbound message ------


class _Discard:
    __slots__ = ()

    def data(self, chunk: bytes) -> None:
        pass

    def end(self, flag: bytes) -> None:
        pass

    def abort(self) -> None:
        pass


_DISCARD = _Discard()


class _LocalAuth:
    __slots__ = ("connection", "request")

    def __init__(self, connection: MSRPConnection, request: MSRPRequest) -> None:
        self.connection = connection
        self.request = request

    def data(self, chunk: bytes) -> None:
        pass

    def end(self, flag: bytes) -> None:
        connection = self.connection
        try:
            outcome = connection.relay.core.handle_auth(self.request, connection, connection)
        except MSRPStatus as status:
            connection.refuse(self.request, status)
            return
        response = outcome.response
        if _CHUNK_LIMIT in self.request.headers:
            # A relayd peer forwarded it: answer in kind.
            headers = Headers([*response.headers, (_CHUNK_LIMIT, "none")])
            response = MSRPResponse(response.tid, response.code, response.comment, headers)
        connection.write_atomic(response.to_bytes())
        if outcome.session is not None:
            connection.succeeded()
        elif outcome.failed:
            connection.auth_failed()

    def abort(self) -> None:
        pass


class _BufferedForward:
    """A request other than SEND: small, forwarded whole, never split (§6.4.2)."""

    __slots__ = ("body", "has_body", "oversized", "plan", "request", "route", "size", "source")

    def __init__(
        self, source: MSRPConnection, request: MSRPRequest, plan: _Plan, has_body: bool
    ) -> None:
        self.source = source
        self.request = request
        self.plan = plan
        self.route = plan.route
        self.has_body = has_body
        self.body: list[bytes] = []
        self.size = 0
        self.oversized = False

    def data(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.source.relay.config.max_request_body_bytes:
            self.oversized = True
            self.body = []
        elif not self.oversized:
            self.body.append(chunk)

    def end(self, flag: bytes) -> None:
        if self.oversized:
            self.source.refuse(self.request, MSRPStatus(413, "request body too large"))
            return
        tid = new_transaction_id()
        frame = self._frame(tid, flag)
        relay = self.source.relay
        target = self.route.connection
        if isinstance(target, MSRPConnection):
            self._send(target, tid, frame)
            return
        pending = relay.connection_for(self.route.next_uri)
        pending.addCallbacks(
            lambda connection: self._send(connection, tid, frame),
            lambda failure: self._unreachable(failure),
        )
        pending.addErrback(
            lambda f: relay.log.failure("forwarding {method}", f, method=self.request.method)
        )

    def _frame(self, tid: str, flag: bytes) -> bytes:
        """The request with its new paths: header bytes sliced when they allow it."""
        request = self.request
        body = b"".join(self.body) if self.has_body else None
        lines = forwarded_lines(request.headers, skip_byte_range=False)
        if lines is None or request.method == "AUTH":
            own = [(_CHUNK_LIMIT, "none")] if request.method == "AUTH" else []
            headers = Headers(
                [("To-Path", self.route.to_path), ("From-Path", self.route.from_path), *own]
                + [(k, v) for k, v in request.headers if k.lower() not in _HOP_HEADERS]
            )
            return MSRPRequest(tid, request.method, headers).to_bytes(body, flag)
        head = b"MSRP %s %s\r\n%s%s" % (
            tid.encode(),
            request.method.encode(),
            self.plan.forward_paths,
            lines[0],
        )
        if body is None:
            return head + end_line(tid, flag)
        return b"%s\r\n%s\r\n%s" % (head, body, end_line(tid, flag))

    def _send(self, target: MSRPConnection, tid: str, frame: bytes) -> None:
        if not target.connected:
            self._unreachable(None)
            return
        if self.request.method != "REPORT":
            target.add_transaction(
                tid, _EndToEndTransaction(target, self.source, self.request, self.route.local_uri)
            )
        target.write_atomic(frame)

    def _unreachable(self, failure: Failure | None) -> None:
        if self.request.method != "REPORT" and self.source.connected:
            code, comment, _ = _hop_failure(failure, connected=False)
            self.source.refuse(self.request, MSRPStatus(code, comment), count=False)

    def abort(self) -> None:
        pass


class SendStream:
    """One inbound SEND chunk on its way to the next hop, cut into frames as needed."""

    __slots__ = (
        "backlog",
        "backlog_at",
        "backlog_flag",
        "done",
        "ended",
        "error",
        "failed",
        "failure_report",
        "frame_bytes",
        "frame_first",
        "frame_tid",
        "has_body",
        "head_after",
        "head_before",
        "held",
        "message_id",
        "offset",
        "ok_paths",
        "original_range",
        "pending",
        "range_end",
        "relay",
        "report_from",
        "report_to",
        "request",
        "response_to",
        "source",
        "target",
        "total",
    )

    def __init__(
        self, source: MSRPConnection, request: MSRPRequest, plan: _Plan, has_body: bool
    ) -> None:
        route = plan.route
        headers = request.headers
        message_id = headers.get("Message-ID")
        if not message_id:
            raise MSRPStatus(400, "SEND without Message-ID")
        range_text = headers.get("Byte-Range")
        try:
            byte_range = ByteRange.parse(range_text) if range_text else ByteRange(1, None, None)
        except ValueError as e:
            raise MSRPStatus(400, str(e)) from None
        self.failure_report = parse_report_mode(headers.get("Failure-Report"), "yes")
        self.relay = source.relay
        self.source = source
        self.request = request
        self.message_id = message_id
        self.has_body = has_body
        self.offset = byte_range.start
        self.total = "*" if byte_range.total is None else str(byte_range.total)
        self.original_range = range_text or byte_range.format()
        self.range_end = byte_range.end
        self.report_to = plan.report_to
        self.report_from = route.local_uri
        self.ok_paths = plan.ok_paths
        self.response_to = plan.response_to
        # Content-Type must stay last before the body: without a Byte-Range
        # to replace, the new one goes first after the paths.
        lines = forwarded_lines(headers, skip_byte_range=True)
        if lines is None:
            lines = _stream_lines(headers)
        self.head_before = plan.forward_paths + lines[0]
        self.head_after = lines[1] + b"\r\n" if has_body else lines[1]
        self.held: bytes | None = None
        self.frame_tid: str | None = None
        self.frame_first = 0
        self.frame_bytes = 0
        self.failed = False
        #: Why the stream failed, while its chunk's transaction was unanswered.
        self.error: tuple[int, str] | None = None
        self.ended = False
        self.done = False
        self.target: MSRPConnection | None = None
        self.pending: list[tuple[bool, bytes]] | None = None
        #: Output the next hop had no room for yet (from backlog_at on), and
        #: the end-line flag that follows it once the chunk has ended.
        self.backlog: bytes | None = None
        self.backlog_at = 0
        self.backlog_flag: bytes | None = None
        target = route.connection
        if target is not None:
            if not isinstance(target, MSRPConnection) or not target.connected:
                raise MSRPStatus(481, "recipient is not connected")
            self._attach(target)
        else:
            self.pending = []
            source.pause_reading(self)
            deferred = self.relay.connection_for(route.next_uri)
            deferred.addCallbacks(self._connected, self._unreachable)
            deferred.addErrback(lambda f: self.relay.log.failure("attaching a stream", f))

    # -- consumer interface (inbound side) ----------------------------------------------

    def data(self, chunk: bytes) -> None:
        if self.failed:
            return
        if self.pending is not None:
            self.pending.append((False, chunk))
            return
        held = self.held
        self.held = chunk
        if held is not None:
            self._emit(held, None)

    def end(self, flag: bytes) -> None:
        source = self.source
        self.ended = True
        error = self.error
        if error is not None:
            # Failed before its end-line: the chunk's one response is that
            # failure, never a 200 after the REPORT (RFC 4975 §7.1.2).
            if self.failure_report != "no" and source.connected:
                response = make_response(self.request, error[0], error[1])
                source.write_atomic(response.to_bytes())
            return
        if self.failure_report == "yes" and source.connected:
            # Hop-by-hop success: we have the chunk (§6.4.1); make_response's paths.
            tid = self.request.tid.encode()
            source.write_atomic(b"MSRP %s 200 OK\r\n%s-------%s$\r\n" % (tid, self.ok_paths, tid))
        if self.failed:
            return
        if self.pending is not None:
            self.pending.append((True, flag))
            return
        self._finish(flag)

    def abort(self) -> None:
        """The sender went away mid-chunk: end what was started with '#'."""
        if self.failed or self.done:
            return
        if self.pending is not None:
            self.pending = None
            self.failed = True
            return
        if (
            self.held is not None
            or self.backlog is not None
            or (self.target is not None and self.target.frame_owner is self)
        ):
            self._finish(b"#")

    # -- outbound side -----------------------------------------------------------------

    def _attach(self, target: MSRPConnection) -> None:
        self.target = target
        if target.incoming is _NO_STREAMS:
            target.incoming = set()
        target.incoming.add(self)
        if target.congested:
            self.source.pause_reading(target)

    def _connected(self, target: MSRPConnection) -> None:
        pending = self.pending
        if pending is not None and not self.failed and not target.connected:
            self._unreachable(None)
            return
        self.pending = None
        self.source.resume_reading(self)
        if pending is None or self.failed:
            return
        self._attach(target)
        for is_end, value in pending:
            if is_end:
                self._finish(value)
            else:
                self.data(value)

    def _unreachable(self, failure: Failure | None) -> None:
        """Nothing went out: the REPORT covers the whole inbound chunk.

        That is its Byte-Range's end when the sender gave one, else the bytes
        received so far (all of them when the end-line is already here).
        """
        self.source.resume_reading(self)
        pending = self.pending or []
        self.pending = None
        last = self.range_end
        if last is None:
            last = self.offset + sum([len(v) for is_end, v in pending if not is_end]) - 1
        code, comment, cause = _hop_failure(failure, connected=False)
        self.fail(code, comment, self.offset, last, cause)

    def _finish(self, flag: bytes) -> None:
        data = self.held or b""
        self.held = None
        self._emit(data, flag)
        self.done = True
        target = self.target
        if target is not None and self.backlog is None:
            # All of it is out: the sender may go on. With a backlog it waits
            # until that drains (MSRPConnection._drain), or backlogs would
            # hold a fast sender's every chunk.
            target.incoming.discard(self)
            self.source.resume_reading(target)

    def _emit(self, data: bytes, final: bytes | None) -> None:
        """Write what the next hop has room for now; keep the rest in the backlog."""
        target = self.target
        assert target is not None
        if not target.connected:
            self.fail(481, "next hop connection lost", self.offset, self.offset + len(data) - 1)
            return
        backlog = self.backlog
        if backlog is None:
            # Behind an earlier chunk of the same sender: wait for it (order).
            room = 0 if self.source in target.waiting else target.room()
            if room > 0 and room >= len(data):
                self._write(data, final)
                return
            if room > 0:
                # The rest is at least one byte: the frame that carries the
                # end-line is never empty.
                self._write(data[:room], None)
                data = data[room:]
            self.backlog = data
            self.backlog_at = 0
            target.wait(self)
        else:
            self.backlog = backlog[self.backlog_at :] + data
            self.backlog_at = 0
        self.backlog_flag = final
        self.source.pause_reading(target)

    def send_backlog(self, room: int) -> bool:
        """Write up to ``room`` bytes of the backlog; True while some is left."""
        backlog = self.backlog
        assert backlog is not None
        at = self.backlog_at
        if len(backlog) - at > room:
            self.backlog_at = at + room
            self._write(backlog[at : at + room], None)
            return True
        final = self.backlog_flag
        self.backlog = None
        self.backlog_flag = None
        data = backlog[at:] if at else backlog
        if data or final is not None:
            self._write(data, final)
        return False

    def _write(self, data: bytes, final: bytes | None) -> None:
        """Frame ``data`` (and the end-line when ``final``) onto the wire now."""
        target = self.target
        assert target is not None
        max_chunk = target.chunk_bytes
        out: list[bytes] = []
        while True:
            if target.frame_owner is not self:
                target.take_wire(self)
                exact = final is not None and len(data) <= max_chunk
                out.append(self._head(len(data) if exact else None))
            room = max_chunk - self.frame_bytes
            if self.has_body and len(data) > room:
                out.append(data[:room])
                data = data[room:]
                self.frame_bytes += room
                self.offset += room
                out.append(self._close_frame(b"+"))
                continue
            if data:
                out.append(data)
                self.frame_bytes += len(data)
                self.offset += len(data)
            if final is not None:
                out.append(self._close_frame(final))
            break
        target.write_raw(b"".join(out))

    def _head(self, exact_length: int | None) -> bytes:
        tid = new_transaction_id()
        self.frame_tid = tid
        self.frame_first = self.offset
        self.frame_bytes = 0
        assert self.target is not None
        self.target.frame_owner = self
        if not self.has_body:
            byte_range = self.original_range
        elif exact_length is not None:
            byte_range = f"{self.offset}-{self.offset + exact_length - 1}/{self.total}"
        else:
            byte_range = f"{self.offset}-*/{self.total}"
        return b"MSRP %s SEND\r\n%sByte-Range: %s\r\n%s" % (
            tid.encode(),
            self.head_before,
            byte_range.encode(),
            self.head_after,
        )

    def _close_frame(self, flag: bytes) -> bytes:
        target = self.target
        tid = self.frame_tid
        assert target is not None and tid is not None
        target.frame_owner = None
        self.frame_tid = None
        if self.failure_report != "no":
            # With "partial" only errors come back: the entry is simply
            # forgotten at its deadline (timed_out sends nothing then).
            target.add_transaction(tid, _FrameTransaction(self, self.frame_first, self.offset - 1))
        tail = end_line(tid, flag)
        return b"\r\n" + tail if self.has_body else tail

    def unconfirmed(self) -> tuple[int, int]:
        """The bytes a lost next hop leaves unanswered: the open frame's and the backlog's."""
        first = self.frame_first if self.frame_tid is not None else self.offset
        unsent = len(self.backlog) - self.backlog_at if self.backlog is not None else 0
        return first, max(first, self.offset + unsent - 1)

    def cut(self) -> None:
        """Someone else needs the wire: end our open frame with '+'."""
        target = self.target
        assert target is not None
        target.write_raw(self._close_frame(b"+"))

    def timed_out(self, transaction: _FrameTransaction) -> None:
        if self.failure_report == "yes":
            self.fail(408, "Request Timeout", transaction.first_byte, transaction.last_byte)

    def fail(
        self, code: int, comment: str, first: int, last: int, cause: str | None = None
    ) -> None:
        """Report a failure once to the original sender and stop forwarding."""
        if self.failed:
            return
        self.failed = True
        if not self.ended:
            self.error = (code, comment)
        self.held = None
        self.backlog = None
        target = self.target
        if target is not None:
            target.incoming.discard(self)
            target.unwait(self)
            if target.frame_owner is self and target.connected:
                target.frame_owner = None
                assert self.frame_tid is not None
                tail = end_line(self.frame_tid, b"#")
                target.write_raw(b"\r\n" + tail if self.has_body else tail)
                self.frame_tid = None
            self.source.resume_reading(target)
        if self.failure_report in ("yes", "partial"):
            last_text = str(last) if last >= first else str(first)
            self.relay.send_report(
                self.source,
                self.report_to,
                self.report_from,
                self.message_id,
                f"{first}-{last_text}/{self.total}",
                code,
                comment,
                cause,
            )


def _stream_lines(headers: Headers) -> tuple[bytes, bytes]:
    """forwarded_lines(headers, True) built from the pairs, for any headers."""
    before: list[str] = []
    after: list[str] = []
    seen_range = False
    for name, value in headers:
        lname = name.lower()
        if lname == "byte-range":
            seen_range = True
        elif lname not in _STREAM_SKIP:
            (after if seen_range else before).append(f"{name}: {value}\r\n")
    if not seen_range:
        after, before = before, []
    return "".join(before).encode(), "".join(after).encode()


@implementer(IHandshakeListener, IPushProducer)
class MSRPConnection(Protocol):
    """One MSRP connection, inbound (listener) or outbound (next hop)."""

    log = logger()

    def __init__(self, relay: MSRPRelay, inbound: bool, tls: bool) -> None:
        self.relay = relay
        self.inbound = inbound
        self.is_tls = tls
        self.peer_names: frozenset[str] = frozenset()
        self.outbound_key: tuple[str, str, int] | None = None
        self.parser = MSRPParser(relay.limits)
        #: Longest SEND body per frame we write here: less towards other relays.
        self.chunk_bytes = relay.config.max_chunk_bytes
        self.consumer: Any = _DISCARD
        self.frame_owner: SendStream | None = None
        self.transactions: dict[str, _FrameTransaction | _EndToEndTransaction] = {}
        # Empty on an idle connection, so shared until first needed (memory).
        self.incoming: set[SendStream] = _NO_STREAMS
        #: Streams with a backlog towards this connection, by sender in turn
        #: order; each sender's in the order its chunks came.
        self.waiting: dict[MSRPConnection, list[SendStream]] = _NO_BACKLOGS
        self.congested = False
        #: The socket transport under any TLS layer (None for a test double).
        self._wire: Any = None
        self._pause_reasons: set[object] | None = None
        self._probation: IDelayedCall | None = None
        self._failures = 0
        self._auth_failures = 0
        self._succeeded = not inbound
        self._closing = False
        self._deviation_logged = False
        #: Bytes held for this connection in MSRPRelay.batch, and the unsent
        #: bytes measured during that batch (room()).
        self.batched = 0
        self._unsent = 0
        self._unsent_batch = -1
        self._draining = False
        self._drain_again = False
        self._peer_certificate: x509.Certificate | None = None
        self._plans: dict[bytes | tuple[str, str], _Plan] | None = None
        self._expiry: IDelayedCall | None = None
        self.last_activity = relay.clock.seconds()
        self.peer = "?"

    # -- Twisted callbacks ---------------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.peer = _describe(transport.getPeer())
        self._wire = _tune_socket(transport, self.relay.config.send_queue_bytes // 2)
        transport.registerProducer(self, True)
        self.relay.register(self)
        if self.inbound:
            self._probation = self.relay.clock.callLater(
                self.relay.config.probation_seconds, self._probation_over
            )

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport
        if not self.inbound:
            return
        certificate = transport.getPeerCertificate()
        if certificate is None:
            return
        if not isinstance(certificate, x509.Certificate):
            certificate = certificate.to_cryptography()  # Twisted's pyOpenSSL transports
        # Chained to ca_certificates by the TLS layer already (§6.1): a peer relay.
        self._peer_certificate = certificate
        names = [*certificate_dns_names(certificate), *certificate_ip_names(certificate)]
        self.peer_names = frozenset(name.lower() for name in names)
        if self.peer_names:
            self.chunk_bytes = self.relay.peer_chunk_bytes(self.peer_names, None)
        self.log.info(
            "Peer relay {names} connected from {peer}",
            names=sorted(self.peer_names),
            peer=self.peer,
        )
        if self.peer_names:
            # Authenticated by its certificate: probation is for unknown clients.
            self.succeeded()

    def dataReceived(self, data: bytes) -> None:
        """Handle one read; everything it makes us write goes out at its end.

        One read often holds several frames (a 200 and a REPORT, or several
        SENDs), so the frames each connection gets from it are joined into
        one write: one TLS record and one ``send`` instead of one per frame.
        """
        if self._closing:
            return
        relay = self.relay
        if relay.batch is not None:
            self._receive(data)
            return
        batch = relay.batch = {}
        relay.batch_number += 1
        try:
            self._receive(data)
        finally:
            relay.batch = None
            # Forwarded frames first: the next hop's work is what the
            # sender waits for; our own answers to this sender can follow.
            own = batch.pop(self, None)
            for connection, out in batch.items():
                connection._write_out(out)
            if own is not None:
                self._write_out(own, touch=False)  # _receive has just touched it

    def _receive(self, data: bytes) -> None:
        self.relay.touch(self)
        try:
            events = self.parser.feed(data)
        except MSRPParseError as e:
            self.log.warn(
                "Closing {peer}: unparseable input ({reason})", peer=self.peer, reason=e.reason
            )
            self.close(e.reason, abort=True)
            return
        try:
            for event in events:
                if isinstance(event, MessageStart):
                    message = event.message
                    if isinstance(message, MSRPRequest):
                        self._request(message, event.has_body)
                    else:
                        self._response(message)
                elif isinstance(event, MessageEnd):
                    consumer = self.consumer
                    self.consumer = _DISCARD
                    consumer.end(event.flag)
                elif isinstance(event, BodyChunk):
                    self.consumer.data(event.data)
                else:
                    self._rejected(event)
                if self._closing:
                    return
        except Exception:
            self.log.failure("Internal error handling input from {peer}", peer=self.peer)
            self.close("internal error", abort=True)

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.connected = False
        if not reason.check(error.ConnectionDone):
            self.log.info(
                "MSRP connection {peer} lost: {reason}",
                peer=self.peer,
                reason=reason.getErrorMessage(),
            )
        if self._probation is not None and self._probation.active():
            self._probation.cancel()
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        # Cached routes name other connections, and theirs name this one: two
        # clients that wrote to each other would otherwise keep each other (and
        # their TLS state) until a full garbage collection, which a busy relay
        # seldom runs.
        self._plans = None
        self.relay.unregister(self)
        consumer = self.consumer
        self.consumer = _DISCARD
        consumer.abort()
        transactions = list(self.transactions.values())
        self.transactions.clear()
        # What reaches the senders of what was on its way here: a TLS failure
        # is not a lost connection (RFC 4975 §10 codes, _hop_failure).
        code, comment, cause = _hop_failure(reason, connected=True)
        for transaction in transactions:
            transaction.lost(code, comment, cause)
        backlogged = [stream for queue in self.waiting.values() for stream in queue]
        self.waiting = _NO_BACKLOGS
        incoming, self.incoming = self.incoming, _NO_STREAMS
        for stream in [*incoming, *[s for s in backlogged if s not in incoming]]:
            first, last = stream.unconfirmed()
            stream.fail(code, comment, first, last, cause)

    # -- IPushProducer: our socket buffer filled up or drained ---------------------------

    def pauseProducing(self) -> None:
        self.congested = True
        for stream in list(self.incoming):
            stream.source.pause_reading(self)

    def resumeProducing(self) -> None:
        self.congested = False
        if self.waiting:
            self._drain()
            if self.congested or self.waiting:
                return
        for stream in list(self.incoming):
            stream.source.resume_reading(self)

    # -- how much stream data may go out now ------------------------------------------

    def room(self) -> int:
        """Bytes a stream may write now: ``send_queue_bytes`` less what is still unsent.

        Unsent bytes, ours and the kernel's, are what a frame of our own
        (a response, a REPORT, another sender's small SEND) queues behind.
        """
        if self.congested:
            return 0
        wire = self._wire
        if wire is None:
            return 1 << 62
        batch = self.relay.batch
        if batch is None:
            return self.relay.config.send_queue_bytes - unsent_bytes(wire)
        # Within one read nothing of ours reaches the socket: ask the kernel once.
        if self._unsent_batch != self.relay.batch_number:
            self._unsent_batch = self.relay.batch_number
            self._unsent = unsent_bytes(wire)
        return self.relay.config.send_queue_bytes - self._unsent - self.batched

    def wait(self, stream: SendStream) -> None:
        """``stream`` has a backlog: it gets its turn when the kernel wants more."""
        if self.waiting is _NO_BACKLOGS:
            self.waiting = {}
        queue = self.waiting.get(stream.source)
        if queue is None:
            self.waiting[stream.source] = [stream]
        else:
            queue.append(stream)
        if not self.congested:
            pause_until_writable(self._wire)

    def unwait(self, stream: SendStream) -> None:
        queue = self.waiting.get(stream.source)
        if queue is not None and stream in queue:
            queue.remove(stream)
            if not queue:
                del self.waiting[stream.source]

    def _drain(self) -> None:
        """Write out backlogs while the kernel takes them, one write per room's worth.

        Outside a read, the slices are batched like a read's output (many
        small chunks make one send); a write the kernel takes at once resumes
        us from _write_out, which here only asks for another round.
        """
        relay = self.relay
        if relay.batch is not None:
            self._fill()  # the read's end writes it
            return
        if self._draining:
            self._drain_again = True
            return
        self._draining = True
        try:
            again = True
            while again:
                self._drain_again = False
                batch = relay.batch = {}
                relay.batch_number += 1
                try:
                    self._fill()
                finally:
                    relay.batch = None
                    for connection, out in batch.items():
                        connection._write_out(out)
                again = self._drain_again
        finally:
            self._draining = False

    def _fill(self) -> None:
        """Give each sender's backlog a slice of the room in turn: none starves the others."""
        waiting = self.waiting
        while waiting and self.connected:
            room = self.room()
            if room <= 0:
                if not self.congested:
                    pause_until_writable(self._wire)
                return
            source = next(iter(waiting))
            queue = waiting.pop(source)
            stream = queue[0]
            if not stream.send_backlog(room):
                del queue[0]
                if stream.done:
                    self.incoming.discard(stream)
                    if not queue:
                        source.resume_reading(self)
            if queue:
                waiting[source] = queue

    def stopProducing(self) -> None:
        pass

    # -- Hop protocol for the relay core --------------------------------------------------

    def certificate_matches(self, host: str) -> bool:
        certificate = self._peer_certificate
        return certificate is not None and _certificate_matches(certificate, host)

    # -- requests and responses -------------------------------------------------------------

    def _request(self, request: MSRPRequest, has_body: bool) -> None:
        relay = self.relay
        method = request.method
        try:
            if method not in KNOWN_METHODS and relay.config.block_unknown_methods:
                raise MSRPStatus(501)
            if method == "AUTH" and _CHUNK_LIMIT in request.headers:
                self.takes_any_chunk()  # forwarded by a relayd peer
            if method == "AUTH" and relay.core.is_local_auth(request):
                self.consumer = _LocalAuth(self, request)
                return
            plan = self._plan(request)
            if method == "SEND":
                self.consumer = SendStream(self, request, plan, has_body)
            else:
                self.consumer = _BufferedForward(self, request, plan, has_body)
            self.succeeded()
        except MSRPStatus as status:
            self.consumer = _DISCARD
            self.refuse(request, status)

    def _plan(self, request: MSRPRequest) -> _Plan:
        """RelayCore.route, remembered per connection: a session's paths repeat."""
        headers = request.headers
        key: bytes | tuple[str, str] | None = path_lines(headers)
        if key is None:
            key = (headers.get("To-Path") or "", headers.get("From-Path") or "")
        cache = self._plans
        plan = cache.get(key) if cache is not None else None
        core = self.relay.core
        if plan is not None:
            sessions = core.sessions
            if plan.generation == sessions.generation:
                if self.relay.clock.seconds() < plan.expires_at:
                    return plan
            elif core.still_valid(plan.route):
                plan.generation = sessions.generation
                return plan
        plan = _Plan(core.route(request, self, self), request, core.sessions.generation)
        if cache is None:
            cache = self._plans = {}
        return remember(cache, _ROUTE_CACHE_SIZE, key, plan)

    def refuse(self, request: MSRPRequest, status: MSRPStatus, count: bool = True) -> None:
        """Answer a request with an error, as its method allows, and count the failure."""
        self.log.warn(
            "{method} from {peer} refused: {code} {comment}",
            method=request.method,
            peer=self.peer,
            code=status.code,
            comment=status.comment,
        )
        if status.close:
            # §6.2: not addressed to us: drop the connection, no answer.
            self.close(status.comment)
            return
        if request.method == "SEND":
            mode = (request.headers.get("Failure-Report") or "yes").strip().lower()
            if mode != "no":
                response = make_response(request, status.code, status.comment, status.headers)
                self.write_atomic(response.to_bytes())
        elif request.method != "REPORT":
            response = make_response(
                request,
                status.code,
                status.comment,
                status.headers,
                to_path=request.headers.get("From-Path") or "",
            )
            self.write_atomic(response.to_bytes())
        if count:
            self._failed()

    def _rejected(self, event: MessageRejected) -> None:
        self.consumer = _DISCARD
        self.log.warn(
            "Malformed message from {peer}: {reason}", peer=self.peer, reason=event.reason
        )
        if (
            event.method is not None
            and event.method != "REPORT"
            and event.to_path is not None
            and event.from_path is not None
            and _valid_path(event.to_path)
            and _valid_path(event.from_path)
        ):
            to_path = (
                event.from_path.split(" ", 1)[0] if event.method == "SEND" else event.from_path
            )
            headers = Headers([("To-Path", to_path), ("From-Path", event.to_path.split(" ", 1)[0])])
            self.write_atomic(MSRPResponse(event.tid, 400, event.reason, headers).to_bytes())
        if event.fatal:
            # The 400 is out; skipping an oversized head to its end-line
            # could mean reading without bound.
            self.log.warn("Closing {peer}: {reason}", peer=self.peer, reason=event.reason)
            self.close(event.reason)
            return
        self._failed()

    def _response(self, response: MSRPResponse) -> None:
        transaction = self.transactions.get(response.tid)
        if transaction is None:
            self.log.debug("Response {tid} matches no transaction: dropped", tid=response.tid)
            return
        if transaction.response(response):
            self.transactions.pop(response.tid, None)

    def takes_any_chunk(self) -> None:
        """The peer is relayd (_CHUNK_LIMIT): chunks go to it as long as we cut them."""
        self.chunk_bytes = self.relay.config.max_chunk_bytes
        key = self.outbound_key
        if key is not None:
            remember(self.relay.relayd_peers, _RELAYD_PEERS_SIZE, key, None)

    def deviating_response(self, response: MSRPResponse) -> None:
        """Log, once per connection, a next hop whose responses skip the path back."""
        if self._deviation_logged:
            return
        self._deviation_logged = True
        self.log.warn(
            "Next hop {peer} answered {code} with To-Path {to_path!r}, not the request's"
            " path back (RFC 4976 §6.4.3); routed back by transaction id",
            peer=self.peer,
            code=response.code,
            to_path=response.headers.get("To-Path") or "",
        )

    def add_transaction(
        self, tid: str, transaction: _FrameTransaction | _EndToEndTransaction
    ) -> None:
        """Await a response for ``tid``; one timer per connection covers them all.

        Every transaction here has the same timeout, so insertion order is
        deadline order and the oldest entry is always the next to expire.
        """
        clock = self.relay.clock
        timeout = self.relay.config.transaction_timeout_seconds
        transaction.deadline = clock.seconds() + timeout
        self.transactions[tid] = transaction
        if self._expiry is None:
            self._expiry = clock.callLater(timeout, self._expire_due)

    def _expire_due(self) -> None:
        self._expiry = None
        now = self.relay.clock.seconds()
        transactions = self.transactions
        while transactions:
            tid, transaction = next(iter(transactions.items()))
            if transaction.deadline > now:
                self._expiry = self.relay.clock.callLater(
                    transaction.deadline - now, self._expire_due
                )
                return
            del transactions[tid]
            transaction.timeout()

    # -- writing --------------------------------------------------------------------------

    def take_wire(self, stream: SendStream) -> None:
        owner = self.frame_owner
        if owner is not None and owner is not stream:
            owner.cut()

    def write_atomic(self, data: bytes) -> None:
        """Write a whole frame of our own, cutting any open stream frame first."""
        if self.frame_owner is not None:
            self.frame_owner.cut()
        self.write_raw(data)

    def write_raw(self, data: bytes) -> None:
        """Write now, or at the end of the read being handled (MSRPRelay.batch)."""
        batch = self.relay.batch
        if batch is None:
            write_now(self.transport, data)
            self.relay.touch(self)
            return
        self.batched += len(data)
        out = batch.get(self)
        if out is None:
            batch[self] = [data]
        else:
            out.append(data)

    def flush(self) -> None:
        """Write out now what the current read held back for this connection."""
        batch = self.relay.batch
        out = batch.pop(self, None) if batch is not None else None
        if out is not None:
            self._write_out(out)

    def _write_out(self, out: list[bytes], touch: bool = True) -> None:
        """Write what one read produced for this connection.

        Sending is use too (RFC 4976 §6.5): a connection that only receives
        forwarded data must be neither closed as idle nor evicted first.
        """
        self.batched = 0
        if not self.connected:
            return
        try:
            write_now(self.transport, out[0] if len(out) == 1 else b"".join(out))
        except Exception:
            self.log.failure("Internal error writing to {peer}", peer=self.peer)
            self.close("internal error", abort=True)
            return
        if touch:
            self.relay.touch(self)
        if self.waiting and self._wire is not None:
            # When the kernel took the read's output at once, the backlogs
            # need not wait for the next reactor turn.
            resume_if_writable(self._wire, self.relay.config.send_queue_bytes // 2)

    # -- flow control and accounting -------------------------------------------------------

    def pause_reading(self, reason: object) -> None:
        reasons = self._pause_reasons
        if reasons is None:
            reasons = self._pause_reasons = set()
        if not reasons and self.connected:
            transport: Any = self.transport
            transport.pauseProducing()
        reasons.add(reason)

    def resume_reading(self, reason: object) -> None:
        reasons = self._pause_reasons
        if reasons is None or reason not in reasons:
            return
        reasons.discard(reason)
        if not reasons and self.connected:
            transport: Any = self.transport
            transport.resumeProducing()

    def succeeded(self) -> None:
        self._succeeded = True
        if self._probation is not None:
            if self._probation.active():
                self._probation.cancel()
            self._probation = None

    def _failed(self) -> None:
        """Count a refused request; on probation, too many close the connection.

        Probation is for unauthenticated clients.  A peer relay proved who it
        is with its certificate and carries many users' requests, whose
        mistakes (a malformed Expires, an expired session) say nothing about
        the relay: nothing counts on its connection.
        """
        if self.peer_names:
            return
        self._failures += 1
        if not self._succeeded and self._failures >= self.relay.config.probation_max_failures:
            self.log.warn(
                "Closing {peer}: {count} failed requests on probation",
                peer=self.peer,
                count=self._failures,
            )
            self.close("too many failed requests")

    def auth_failed(self) -> None:
        """A failed AUTH from a directly connected client (§6.3); relays are never cut off.

        A peer relay forwards many users' AUTHs: their mistakes say nothing
        about the relay, so they count neither here nor toward probation.
        """
        if self.peer_names:
            return
        self._auth_failures += 1
        self._failed()
        if self._auth_failures >= self.relay.config.max_failed_auth:
            self.log.warn(
                "Closing {peer}: {count} failed AUTH attempts",
                peer=self.peer,
                count=self._auth_failures,
            )
            self.close("too many failed AUTH attempts")

    def _probation_over(self) -> None:
        self._probation = None
        if not self._succeeded:
            self.log.info("Closing {peer}: no successful request during probation", peer=self.peer)
            self.close("probation expired")

    def close(self, reason: str, abort: bool = False) -> None:
        if not self.connected or self._closing:
            return
        self._closing = True
        if abort:
            if self.relay.batch is not None:
                self.relay.batch.pop(self, None)
                self.batched = 0
        else:
            self.flush()
        transport: Any = self.transport
        # A registered producer would hold a TLS shutdown back forever.
        transport.unregisterProducer()
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()


def _valid_path(text: str) -> bool:
    """Only echo paths that parse: a 400 must never carry a malformed header."""
    try:
        parse_path(text)
    except MSRPURIError:
        return False
    return True


def _describe(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else str(address)


def _tune_socket(transport: Any, low_water: int) -> Any:
    """Tune the TCP connection under any TLS layers; return its socket transport.

    Nagle would hold small frames back ~40 ms behind an unacknowledged
    segment; and bigger reads (256 KiB instead of Twisted's 64 KiB) mean
    fewer passes through the parser for large chunks.  The read buffer is
    only a temporary while reading, so idle connections do not pay for it.
    TCP_NOTSENT_LOWAT makes the socket writable only once fewer than
    ``low_water`` bytes wait in the kernel (MSRPConnection.room counts them): an
    autotuned send buffer towards a slow reader would otherwise hold
    megabytes, seconds that a new message waits behind.
    """
    setter = getattr(transport, "setTcpNoDelay", None)  # TLS layers pass it down
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass
    wire: Any = socket_transport(transport)
    if wire is None:
        return None
    # On the socket transport itself: set on a TLS layer it would change nothing.
    wire.bufferSize = _READ_BUFFER_BYTES
    try:
        wire.getHandle().setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, low_water)
    except (AttributeError, OSError):  # not TCP, or a kernel without the option
        pass
    return wire
