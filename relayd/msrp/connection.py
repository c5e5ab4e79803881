"""One MSRP connection: bytes to parser events to relay decisions, and flow control.

One ``MSRPConnection`` per TCP/TLS connection, inbound or outbound (RFC 4976
§6.4).  It parses what arrives, asks the relay core where each request may
go, and hands each body to a consumer of forwarding.py.  Its own frames
(responses, REPORTs, whole small requests) cut any open stream frame and
never wait in a backlog.

Back-pressure: when more than ``send_queue_bytes`` wait towards a next hop,
its streams keep the rest in their own backlog and every connection
streaming into it is paused until the kernel wants more.  Frames of our own
queue behind at most ``send_queue_bytes`` unsent, ours and the kernel's
together (TCP_NOTSENT_LOWAT wakes us at half of it); backlogs drain in turn,
a slice each, so a small SEND to a slow reader overtakes a large one at a
frame boundary.
"""

from __future__ import annotations

import socket
from typing import Any

from cryptography import x509
from twisted.internet import error
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.bounded import remember
from relayd.logs import logger
from relayd.msrp.forwarding import (
    DISCARD,
    NO_STREAMS,
    BufferedForward,
    LocalAuth,
    Plan,
    SendStream,
)
from relayd.msrp.link import Link, Relaying, Stream, Transaction, count_one
from relayd.msrp.message import (
    CHUNK_LIMIT,
    Headers,
    MSRPRequest,
    MSRPResponse,
    MSRPStatus,
    make_response,
    path_lines,
    report_status_code,
)
from relayd.msrp.parser import (
    BodyChunk,
    MessageEnd,
    MessageRejected,
    MessageStart,
    MSRPParseError,
    MSRPParser,
)
from relayd.msrp.relay import KNOWN_METHODS
from relayd.msrp.transactions import hop_failure
from relayd.msrp.uri import MSRPURIError, parse_path
from relayd.net.eager import (
    pause_until_writable,
    resume_if_writable,
    socket_transport,
    unsent_bytes,
    write_now,
)
from relayd.net.tls import certificate_dns_names, certificate_ip_names
from relayd.net.tls import certificate_matches as _certificate_matches

_RELAYD_PEERS_SIZE = 1024
_READ_BUFFER_BYTES = 262144
#: Linux's TCP_NOTSENT_LOWAT (the socket module has it from Python 3.12 on).
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_ROUTE_CACHE_SIZE = 32
#: What one write may add to the socket's queue beyond its plaintext: TLS record
#: headers, tags and padding, counted high (128 bytes a write and per 16 KiB record).
_RECORD_BYTES = 128
_RECORD_SHIFT = 7
#: Shared by every connection without backlogged streams (never added to).
_NO_BACKLOGS: dict[Link, list[Stream]] = {}


class ListenerFactory(Factory):
    noisy = False

    def __init__(self, relay: Relaying, tls: bool) -> None:
        self.relay = relay
        self.tls = tls

    def buildProtocol(self, addr: Any) -> MSRPConnection:
        return MSRPConnection(self.relay, inbound=True, tls=self.tls)


class OutboundFactory(Factory):
    noisy = False

    def __init__(self, relay: Relaying, key: tuple[str, str, int], tls: bool, name: str) -> None:
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


@implementer(IHandshakeListener, IPushProducer)
class MSRPConnection(Protocol):
    """One MSRP connection, inbound (listener) or outbound (next hop)."""

    log = logger()

    def __init__(self, relay: Relaying, inbound: bool, tls: bool) -> None:
        self.relay = relay
        self.inbound = inbound
        self.is_tls = tls
        self.peer_names: frozenset[str] = frozenset()
        self.outbound_key: tuple[str, str, int] | None = None
        self.parser = MSRPParser(relay.limits.parser)
        #: Longest SEND body per frame we write here: less towards other relays.
        self.chunk_bytes = relay.limits.max_chunk_bytes
        self.consumer: Any = DISCARD
        self.frame_owner: Stream | None = None
        self.transactions: dict[str, Transaction] = {}
        # Empty on an idle connection, so shared until first needed (memory).
        self.incoming: set[Stream] = NO_STREAMS
        #: Streams with a backlog towards this connection, by sender in turn
        #: order; each sender's in the order its chunks came.
        self.waiting: dict[Link, list[Stream]] = _NO_BACKLOGS
        self.congested = False
        #: The socket transport under any TLS layer (None for a test double).
        self._wire: Any = None
        #: Why reading from this connection is paused (pause_reading), if it is.
        self.pause_reasons: set[object] | None = None
        self._probation: IDelayedCall | None = None
        self._failures = 0
        self._auth_failures = 0
        self._succeeded = not inbound
        self._closing = False
        self._deviation_logged = False
        #: Bytes held for this connection in MSRPRelay.batch; at most how many
        #: bytes written are still unsent, ours and the kernel's (room()), and
        #: the batch in which the kernel was last asked.
        self.batched = 0
        self._unsent_bound = relay.limits.send_queue_bytes  # unknown: ask first
        self._unsent_batch = -1
        self._draining = False
        self._drain_again = False
        self._peer_certificate: x509.Certificate | None = None
        self._plans: dict[bytes | tuple[str, str], Plan] | None = None
        self._expiry: IDelayedCall | None = None
        self.last_activity = relay.clock.seconds()
        self.peer = "?"

    # -- Twisted callbacks ---------------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.peer = _describe(transport.getPeer())
        self._wire = _tune_socket(transport, self.relay.limits.send_queue_bytes // 2)
        transport.registerProducer(self, True)
        self.relay.register(self)
        if self.inbound:
            self._probation = self.relay.clock.callLater(
                self.relay.limits.probation_seconds, self._probation_over
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
        relay.counts.received_bytes += len(data)
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
                connection.write_out(out)
            if own is not None:
                self.write_out(own, touch=False)  # _receive has just touched it

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
                    self.consumer = DISCARD
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
        self.consumer = DISCARD
        consumer.abort()
        transactions = list(self.transactions.values())
        self.transactions.clear()
        # What reaches the senders of what was on its way here: a TLS failure
        # is not a lost connection (RFC 4975 §10 codes, hop_failure).
        code, comment, cause = hop_failure(reason, connected=True)
        for transaction in transactions:
            transaction.lost(code, comment, cause)
        backlogged = [stream for queue in self.waiting.values() for stream in queue]
        self.waiting = _NO_BACKLOGS
        incoming, self.incoming = self.incoming, NO_STREAMS
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

    def room(self, wanted: int) -> int:
        """Bytes a stream may write now: ``send_queue_bytes`` less what is still unsent.

        Unsent bytes, ours and the kernel's, are what a frame of our own
        (a response, a REPORT, another sender's small SEND) queues behind.
        Asking the kernel costs a system call, so it is asked only when the
        ``wanted`` bytes might not fit: the unsent bytes are at most what was
        unsent when last asked plus what was written since (``_unsent_bound``),
        and while that leaves room for them, the answer is that bound's room
        (at least ``wanted``, perhaps less than the exact room).  Otherwise the
        answer is exact.
        """
        if self.congested:
            return 0
        wire = self._wire
        if wire is None:
            return 1 << 62
        budget = self.relay.limits.send_queue_bytes
        room = budget - self._unsent_bound - self.batched
        if room - wanted >= budget >> 2:
            return room
        batch = self.relay.batch
        if batch is None or self._unsent_batch != self.relay.batch_number:
            # Within one read nothing of ours reaches the socket: ask the kernel once.
            self._unsent_bound = unsent_bytes(wire)
            if batch is not None:
                self._unsent_batch = self.relay.batch_number
        return budget - self._unsent_bound - self.batched

    def wait(self, stream: Stream) -> None:
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

    def unwait(self, stream: Stream) -> None:
        queue = self.waiting.get(stream.source)
        if queue is not None and stream in queue:
            queue.remove(stream)
            if not queue:
                del self.waiting[stream.source]

    def _drain(self) -> None:
        """Write out backlogs while the kernel takes them, one write per room's worth.

        Outside a read, the slices are batched like a read's output (many
        small chunks make one send); a write the kernel takes at once resumes
        us from write_out, which here only asks for another round.
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
                        connection.write_out(out)
                again = self._drain_again
        finally:
            self._draining = False

    def _fill(self) -> None:
        """Give each sender's backlog a slice of the room in turn: none starves the others."""
        waiting = self.waiting
        while waiting and self.connected:
            source = next(iter(waiting))
            queue = waiting[source]
            room = self.room(queue[0].backlog_bytes)
            if room <= 0:
                if not self.congested:
                    pause_until_writable(self._wire)
                return
            del waiting[source]
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
        counts = relay.counts
        label = method if method in KNOWN_METHODS else "other"
        requests = counts.requests
        try:
            requests[label] += 1
        except KeyError:
            requests[label] = 1
        if method == "REPORT":
            reports, status = counts.reports, report_status_code(request.headers)
            try:
                reports[status] += 1
            except KeyError:
                reports[status] = 1
        try:
            if method not in KNOWN_METHODS and relay.limits.block_unknown_methods:
                raise MSRPStatus(501)
            if method == "AUTH" and CHUNK_LIMIT in request.headers:
                self.takes_any_chunk()  # forwarded by a relayd peer
            if method == "AUTH" and relay.core.is_local_auth(request):
                self.consumer = LocalAuth(self, request)
                return
            plan = self._plan(request)
            if method == "SEND":
                self.consumer = SendStream(self, request, plan, has_body)
            else:
                self.consumer = BufferedForward(self, request, plan, has_body)
            if not self._succeeded or self._probation is not None:
                self.succeeded()
        except MSRPStatus as status:
            self.consumer = DISCARD
            count_one(counts.unrelayed, label)
            self.refuse(request, status)
        except Exception:
            count_one(counts.unrelayed, label)  # _receive logs it and closes the connection
            raise

    def _plan(self, request: MSRPRequest) -> Plan:
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
        route = core.route(request, self, self)
        target = route.connection
        plan = Plan(
            route,
            request,
            core.sessions.generation,
            target if isinstance(target, MSRPConnection) else None,
        )
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
        count_one(self.relay.counts.refusals, status.code)
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
        self.consumer = DISCARD
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
            count_one(self.relay.counts.refusals, 400)
        if event.fatal:
            # The 400 is out; skipping an oversized head to its end-line
            # could mean reading without bound.
            self.log.warn("Closing {peer}: {reason}", peer=self.peer, reason=event.reason)
            self.close(event.reason)
            return
        self._failed()

    def _response(self, response: MSRPResponse) -> None:
        responses, code = self.relay.counts.responses, response.code
        try:
            responses[code] += 1
        except KeyError:
            responses[code] = 1
        transaction = self.transactions.get(response.tid)
        if transaction is None:
            self.log.debug("Response {tid} matches no transaction: dropped", tid=response.tid)
            return
        if transaction.response(response):
            self.transactions.pop(response.tid, None)

    def takes_any_chunk(self) -> None:
        """The peer is relayd (CHUNK_LIMIT): chunks go to it as long as we cut them."""
        self.chunk_bytes = self.relay.limits.max_chunk_bytes
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

    def add_transaction(self, tid: str, transaction: Transaction) -> None:
        """Await a response for ``tid``; one timer per connection covers them all.

        Every transaction here has the same timeout, so insertion order is
        deadline order and the oldest entry is always the next to expire.
        """
        clock = self.relay.clock
        timeout = self.relay.limits.transaction_timeout_seconds
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

    def take_wire(self, stream: Stream) -> None:
        owner = self.frame_owner
        if owner is not None and owner is not stream:
            owner.cut()

    def write_atomic(self, data: bytes) -> None:
        """Write a whole frame of our own, cutting any open stream frame first."""
        owner = self.frame_owner
        if owner is not None:
            owner.cut()
        batch = self.relay.batch
        if batch is None:
            self.write_raw(data)
            return
        # write_raw's way during a read, inline: every response goes this way.
        self.batched += len(data)
        out = batch.get(self)
        if out is None:
            batch[self] = [data]
        else:
            out.append(data)

    def write_raw(self, data: bytes) -> None:
        """Write now, or at the end of the read being handled (MSRPRelay.batch)."""
        batch = self.relay.batch
        if batch is None:
            n = len(data)
            self._unsent_bound += n + (n >> _RECORD_SHIFT) + _RECORD_BYTES
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
            self.write_out(out)

    def write_out(self, out: list[bytes], touch: bool = True) -> None:
        """Write what one read produced for this connection.

        Sending is use too (RFC 4976 §6.5): a connection that only receives
        forwarded data must be neither closed as idle nor evicted first.
        """
        self.batched = 0
        if not self.connected:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        n = len(data)
        self._unsent_bound += n + (n >> _RECORD_SHIFT) + _RECORD_BYTES
        try:
            write_now(self.transport, data)
        except Exception:
            self.log.failure("Internal error writing to {peer}", peer=self.peer)
            self.close("internal error", abort=True)
            return
        if touch:
            self.relay.touch(self)
        wire = self._wire
        if self.waiting and wire is not None and wire.producerPaused:
            # When the kernel took the read's output at once, the backlogs
            # need not wait for the next reactor turn; the drain that starts
            # now (the next batch) sizes its slices by the same answer.
            relay = self.relay
            number = relay.batch_number
            self._unsent_bound = unsent = unsent_bytes(wire)
            self._unsent_batch = number + 1
            resume_if_writable(wire, relay.limits.send_queue_bytes // 2, unsent)
            if relay.batch_number == number and not self._drain_again:
                self._unsent_batch = -1  # no drain now: a later batch asks again

    # -- flow control and accounting -------------------------------------------------------

    def pause_reading(self, reason: object) -> None:
        reasons = self.pause_reasons
        if reasons is None:
            reasons = self.pause_reasons = set()
        if not reasons and self.connected:
            transport: Any = self.transport
            transport.pauseProducing()
        reasons.add(reason)

    def resume_reading(self, reason: object) -> None:
        reasons = self.pause_reasons
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
        if not self._succeeded and self._failures >= self.relay.limits.probation_max_failures:
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
        if self._auth_failures >= self.relay.limits.max_failed_auth:
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
