"""An MSRP endpoint (RFC 4975) that uses relays (RFC 4976 §5): relayctl, tests, benchmarks.

It authenticates with digest AUTH (checking ``rspauth``), sends messages in
chunks with a window of outstanding SENDs, receives SENDs into a sink while
answering hop by hop, and sends success REPORTs when asked to.  Bodies are
streamed both ways, so a file of any size costs a bounded amount of memory.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.digest import DigestError, answer_challenge, is_stale, parse_auth_info
from relayd.msrp.message import STATUS_COMMENTS, ByteRange, Headers, MSRPRequest, MSRPResponse
from relayd.msrp.parser import (
    BodyChunk,
    MessageEnd,
    MessageRejected,
    MessageStart,
    MSRPParseError,
    MSRPParser,
)
from relayd.msrp.uri import MSRPURI
from relayd.net.srv import srv_targets
from relayd.tokens import new_transaction_id


class MSRPClientError(Exception):
    """A failure the user should read: one line, no traceback.

    ``code`` and ``comment`` carry the MSRP status when the failure was one.
    """

    def __init__(
        self,
        message: str,
        code: int | None = None,
        comment: str = "",
        reason: Failure | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.comment = comment
        #: Why the connection closed, when that is the failure (a TLS error...).
        self.reason = reason


@dataclass(frozen=True)
class AuthResult:
    use_path: tuple[str, ...]
    expires_seconds: int
    #: The relay proved it knows the password (rspauth, RFC 2617 §3.2.3); False
    #: when its 200 had no Authentication-Info, which RFC 2617 makes optional.
    relay_proved: bool = True


@dataclass
class SendResult:
    message_id: str
    bytes_sent: int
    reports: list[MSRPRequest] = field(default_factory=list)


class MessageSink(Protocol):
    """Receives one SEND chunk at a time; a message may arrive in several."""

    def chunk_started(self, request: MSRPRequest, byte_range: ByteRange) -> None: ...

    def chunk_data(self, data: bytes) -> None: ...

    def chunk_ended(self, flag: bytes) -> None: ...


def new_local_uri(secure: bool = True) -> str:
    """A URI for a client that accepts no connections: it only names the endpoint."""
    scheme = "msrps" if secure else "msrp"
    return f"{scheme}://{secrets.token_hex(6)}.invalid:2855/{secrets.token_urlsafe(12)};tcp"


@implementer(IHandshakeListener)
class MSRPClientProtocol(TwistedProtocol):
    def __init__(
        self,
        local_uri: str,
        sink_for: Callable[[MSRPRequest], MessageSink | None] | None = None,
        on_report: Callable[[MSRPRequest], None] | None = None,
    ) -> None:
        self.local_uri = local_uri
        self.sink_for = sink_for
        self.on_report = on_report
        self.parser = MSRPParser()
        self.pending: dict[str, defer.Deferred[MSRPResponse]] = {}
        self.connected_deferred: defer.Deferred[MSRPClientProtocol] = defer.Deferred()
        self.handshake: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._sink: MessageSink | None = None
        self._incoming: MSRPRequest | None = None
        self._incoming_bytes = 0
        self._incoming_range: ByteRange | None = None
        self._received: dict[str, int] = {}
        self._reports: dict[str, list[MSRPRequest]] = {}
        self._report_waiters: dict[str, defer.Deferred[MSRPRequest]] = {}
        self.last_auth_info: dict[str, str] = {}
        #: Answer incoming SENDs with this status instead of 200 (tests, diagnostics).
        self.refuse_with: int | None = None

    # -- Twisted --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        inner = transport
        while inner is not None:
            setter = getattr(inner, "setTcpNoDelay", None)
            if setter is not None:
                setter(True)
                break
            inner = getattr(inner, "transport", None)
        self.connected_deferred.callback(self)

    def handshakeCompleted(self) -> None:
        if not self.handshake.called:
            self.handshake.callback(None)

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        detail = reason.getErrorMessage() if not reason.check(error.ConnectionDone) else ""
        text = "connection to the relay was lost" + (f" ({detail})" if detail else "")
        if not self.handshake.called:
            self.handshake.errback(Failure(MSRPClientError(text, reason=reason)))
            self.handshake.addErrback(lambda _: None)
        pending = list(self.pending.values())
        self.pending.clear()
        for waiter in pending:
            waiter.errback(Failure(MSRPClientError(text, reason=reason)))
        for report_waiter in list(self._report_waiters.values()):
            report_waiter.errback(Failure(MSRPClientError(text, reason=reason)))
        self._report_waiters.clear()
        if not self.lost.called:
            self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.parser.feed(data)
        except MSRPParseError as e:
            transport: Any = self.transport
            transport.abortConnection()
            self._fail_all(MSRPClientError(f"relay sent unparseable data: {e.reason}"))
            return
        for event in events:
            if isinstance(event, BodyChunk):
                self._incoming_bytes += len(event.data)
                if self._sink is not None:
                    self._sink.chunk_data(event.data)
            elif isinstance(event, MessageStart):
                message = event.message
                if isinstance(message, MSRPResponse):
                    waiter = self.pending.pop(message.tid, None)
                    if waiter is not None:
                        waiter.callback(message)
                else:
                    self._request_started(message)
            elif isinstance(event, MessageEnd):
                self._request_ended(event.flag)
            elif isinstance(event, MessageRejected):
                self._incoming = None
                self._sink = None

    def _fail_all(self, exc: Exception) -> None:
        pending = list(self.pending.values())
        self.pending.clear()
        for waiter in pending:
            waiter.errback(Failure(exc))

    # -- incoming requests ------------------------------------------------------------------

    def _request_started(self, request: MSRPRequest) -> None:
        self._incoming = request
        self._incoming_bytes = 0
        self._sink = None
        if request.method == "SEND":
            text = request.headers.get("Byte-Range")
            try:
                byte_range = ByteRange.parse(text) if text else ByteRange(1, None, None)
            except ValueError:
                byte_range = ByteRange(1, None, None)
            self._incoming_range = byte_range
            if self.sink_for is not None:
                self._sink = self.sink_for(request)
                if self._sink is not None:
                    self._sink.chunk_started(request, byte_range)

    def _request_ended(self, flag: bytes) -> None:
        request = self._incoming
        self._incoming = None
        if request is None:
            return
        if request.method == "REPORT":
            self._report(request)
            return
        if request.method != "SEND":
            self._respond(request, 501)
            return
        if self._sink is not None:
            self._sink.chunk_ended(flag)
            self._sink = None
        mode = (request.headers.get("Failure-Report") or "yes").lower()
        if self.refuse_with is not None:
            if mode != "no":
                self._respond(request, self.refuse_with)
            return
        if mode == "yes":
            self._respond(request, 200)
        message_id = request.headers.get("Message-ID") or ""
        received = self._received.get(message_id, 0) + self._incoming_bytes
        self._received[message_id] = received
        byte_range = self._incoming_range
        if (
            flag == b"$"
            and byte_range is not None
            and (request.headers.get("Success-Report") or "no").lower() == "yes"
        ):
            total = byte_range.total if byte_range.total is not None else received
            self._received.pop(message_id, None)
            self.send_report(request, 200, "OK", f"1-{total}/{total}")
        elif flag in (b"$", b"#"):
            self._received.pop(message_id, None)

    def _respond(self, request: MSRPRequest, code: int) -> None:
        from_path = request.headers.get("From-Path") or ""
        to_path = request.headers.get("To-Path") or ""
        comment = STATUS_COMMENTS.get(code, "")
        headers = Headers(
            [("To-Path", from_path.split(" ", 1)[0]), ("From-Path", to_path.split(" ")[-1])]
        )
        self._write(MSRPResponse(request.tid, code, comment, headers).to_bytes())

    def send_report(self, request: MSRPRequest, code: int, comment: str, byte_range: str) -> None:
        """A success REPORT back along the From-Path (RFC 4975 §7.1.2)."""
        headers = Headers(
            [
                ("To-Path", request.headers.get("From-Path") or ""),
                ("From-Path", self.local_uri),
                ("Message-ID", request.headers.get("Message-ID") or ""),
                ("Byte-Range", byte_range),
                ("Status", f"000 {code} {comment}"),
            ]
        )
        self._write(MSRPRequest(new_transaction_id(), "REPORT", headers).to_bytes())

    def _report(self, request: MSRPRequest) -> None:
        message_id = request.headers.get("Message-ID") or ""
        self._reports.setdefault(message_id, []).append(request)
        waiter = self._report_waiters.pop(message_id, None)
        if waiter is not None:
            waiter.callback(request)
        if self.on_report is not None:
            self.on_report(request)

    def wait_report(self, message_id: str) -> defer.Deferred[MSRPRequest]:
        """The next REPORT for this message (or one already received)."""
        reports = self._reports.get(message_id)
        if reports:
            return defer.succeed(reports.pop(0))
        waiter: defer.Deferred[MSRPRequest] = defer.Deferred()
        self._report_waiters[message_id] = waiter
        return waiter

    # -- outgoing requests --------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(data)

    def request(
        self,
        method: str,
        to_path: str,
        headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
        body: bytes | None = None,
        flag: bytes = b"$",
        tid: str | None = None,
        expect_response: bool = True,
    ) -> defer.Deferred[MSRPResponse]:
        tid = tid or new_transaction_id()
        message = MSRPRequest(
            tid, method, Headers([("To-Path", to_path), ("From-Path", self.local_uri), *headers])
        )
        waiter: defer.Deferred[MSRPResponse] = defer.Deferred()
        if expect_response:
            self.pending[tid] = waiter
        self._write(message.to_bytes(body, flag))
        return waiter

    async def auth(
        self,
        relay_path: list[str],
        username: str,
        password: str,
        expires_seconds: int | None = None,
    ) -> AuthResult:
        """AUTH with the last relay of ``relay_path`` (through the ones before it, §5.1)."""
        to_path = " ".join(relay_path)
        target = relay_path[-1]
        extra: list[tuple[str, str]] = []
        if expires_seconds is not None:
            extra.append(("Expires", str(expires_seconds)))
        response = await self.request("AUTH", to_path, extra)
        if response.code != 401:
            raise MSRPClientError(
                f"AUTH without credentials answered {response.code} {response.comment}"
            )
        for _attempt in range(2):
            try:
                answer = answer_challenge(
                    response.headers.get("WWW-Authenticate") or "",
                    username=username,
                    password=password,
                    method="AUTH",
                    uri=target,
                )
            except DigestError as e:
                raise MSRPClientError(f"relay sent a bad challenge: {e.reason}") from None
            response = await self.request(
                "AUTH", to_path, [*extra, ("Authorization", answer.authorization)]
            )
            if response.code == 200:
                # Authentication-Info is optional (RFC 2617 §3.2.3): without it
                # the relay proved nothing, which the caller may tell its user;
                # with it, rspauth must be right.
                header = response.headers.get("Authentication-Info")
                try:
                    info = parse_auth_info(header) if header is not None else {}
                except DigestError as e:
                    raise MSRPClientError(
                        f"relay sent a bad Authentication-Info: {e.reason}"
                    ) from None
                if header is not None and info.get("rspauth") != answer.rspauth:
                    raise MSRPClientError(
                        "relay's rspauth does not match: it did not prove it knows the password"
                    )
                self.last_auth_info = info
                use_path = tuple((response.headers.get("Use-Path") or "").split())
                if not use_path:
                    raise MSRPClientError("AUTH succeeded but the relay sent no Use-Path")
                for uri in use_path:
                    MSRPURI.parse(uri)
                expires = int(response.headers.get("Expires") or "0")
                return AuthResult(use_path, expires, relay_proved=header is not None)
            if response.code == 401 and is_stale(response.headers.get("WWW-Authenticate")):
                continue
            break
        detail = response.headers.get("Min-Expires") or response.headers.get("Max-Expires")
        suffix = f" ({detail})" if detail else ""
        raise MSRPClientError(
            f"AUTH refused: {response.code} {response.comment}{suffix}",
            response.code,
            response.comment,
        )

    async def send_message(
        self,
        to_path: str,
        source: BinaryIO | bytes,
        total_bytes: int,
        chunk_bytes: int = 65536,
        window: int = 8,
        content_type: str = "application/octet-stream",
        success_report: bool = False,
        failure_report: str = "yes",
        message_id: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> SendResult:
        """Send one message in chunks of ``chunk_bytes``, with up to ``window`` in flight."""
        message_id = message_id or secrets.token_hex(8)
        result = SendResult(message_id, 0)
        in_flight: list[defer.Deferred[MSRPResponse]] = []
        position = 0
        for chunk in _chunks(source, total_bytes, chunk_bytes):
            last = position + len(chunk) >= total_bytes
            headers = [
                ("Message-ID", message_id),
                ("Byte-Range", f"{position + 1}-{position + len(chunk)}/{total_bytes}"),
                ("Success-Report", "yes" if success_report and last else "no"),
                ("Failure-Report", failure_report),
                ("Content-Type", content_type),
            ]
            waiter = self.request(
                "SEND",
                to_path,
                headers,
                chunk,
                b"$" if last else b"+",
                expect_response=failure_report == "yes",
            )
            position += len(chunk)
            result.bytes_sent = position
            if failure_report == "yes":
                in_flight.append(waiter)
                if len(in_flight) >= window:
                    await self._settle(in_flight.pop(0))
            if progress is not None:
                progress(position)
        for waiter in in_flight:
            await self._settle(waiter)
        return result

    @staticmethod
    async def _settle(waiter: defer.Deferred[MSRPResponse]) -> None:
        response = await waiter
        if response.code != 200:
            raise MSRPClientError(
                f"relay refused a chunk: {response.code} {response.comment}",
                response.code,
                response.comment,
            )


def _chunks(source: BinaryIO | bytes, total: int, size: int) -> Iterator[bytes]:
    if total == 0:
        yield b""
        return
    if isinstance(source, bytes):
        view = memoryview(source)
        for start in range(0, total, size):
            yield bytes(view[start : start + size])
        return
    remaining = total
    while remaining > 0:
        chunk = source.read(min(size, remaining))
        if not chunk:
            raise MSRPClientError("file ended early")
        remaining -= len(chunk)
        yield chunk


class _ClientFactory(Factory):
    def __init__(self, make: Callable[[], MSRPClientProtocol]) -> None:
        self.make = make

    def buildProtocol(self, addr: Any) -> MSRPClientProtocol:
        return self.make()


Lookup = Callable[[str], "defer.Deferred[list[tuple[str, int]]]"]
"""SRV name to (host, port) in RFC 2782 order (:func:`relayd.net.srv.srv_targets`)."""


async def relay_addresses(uri: MSRPURI, lookup: Lookup) -> list[tuple[str, int]]:
    """Where to connect for the relay ``uri`` names, in the order to try (RFC 4976 §8).

    A URI with a port, or whose host is an IP address, names one address.  Otherwise
    the host may be a pool of relays: the SRV records of ``_msrps._tcp.<host>`` (or
    ``_msrp._tcp``) list its nodes, ordered by priority and weight (RFC 2782), which
    spreads clients over them; without any, the host itself on port 2855.  ``localhost``
    is never a pool and is never looked up.
    """
    host = uri.host.strip("[]")
    if uri.port is not None or host.lower() == "localhost" or _is_ip_literal(host):
        return [(host, uri.effective_port)]
    service = "_msrps._tcp" if uri.scheme == "msrps" else "_msrp._tcp"
    found = await lookup(f"{service}.{host}")
    return list(found) or [(host, uri.effective_port)]


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def connect(
    reactor: Any,
    relay_uri: str,
    trust_pem: bytes | None = None,
    local_uri: str | None = None,
    sink_for: Callable[[MSRPRequest], MessageSink | None] | None = None,
    timeout_seconds: float = 10,
    resolver: Any = None,
) -> MSRPClientProtocol:
    """Open a connection to the relay named by ``relay_uri`` (TLS for msrps).

    A URI without a port is resolved by :func:`relay_addresses` (``resolver`` is a
    ``twisted.names`` IResolver, the system's by default); each address is tried in
    turn until one accepts.  TLS verifies the URI's host whichever node answered: a
    pool's nodes carry its name in their certificates.  ``timeout_seconds`` bounds
    each TCP connect and then, again, the TLS handshake: a peer that accepts but never
    speaks TLS must not hang us.
    """
    uri = MSRPURI.parse(relay_uri)
    host = uri.host.strip("[]")
    trust = None
    if uri.scheme == "msrps" and trust_pem is not None:
        trust = trustRootFromCertificates([Certificate.loadPEM(trust_pem)])
    local = local_uri or new_local_uri(uri.scheme == "msrps")

    def make() -> MSRPClientProtocol:
        return MSRPClientProtocol(local, sink_for=sink_for)

    addresses = await relay_addresses(uri, lambda name: srv_targets(name, resolver))
    failures: list[str] = []
    for address, port in addresses:
        endpoint: Any = HostnameEndpoint(reactor, address, port, timeout=timeout_seconds)
        if uri.scheme == "msrps":
            endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=trust), endpoint)
        try:
            protocol = await endpoint.connect(_ClientFactory(make))
        except Exception as e:
            failures.append(f"{address}:{port}: {e}" if len(addresses) > 1 else str(e))
            continue
        assert isinstance(protocol, MSRPClientProtocol)
        if uri.scheme == "msrps":
            # Certificate problems show up here, not at the first request.
            try:
                await protocol.handshake.addTimeout(timeout_seconds, reactor)
            except defer.TimeoutError:
                transport: Any = protocol.transport
                transport.abortConnection()
                failures.append(
                    f"TLS handshake with {address}:{port} timed out after {timeout_seconds:g} s"
                )
                continue
            except MSRPClientError as e:
                raise MSRPClientError(
                    f"TLS with {relay_uri} failed: {e}", reason=e.reason
                ) from None
        return protocol
    if len(failures) == 1 and failures[0].startswith("TLS handshake"):
        raise MSRPClientError(failures[0])
    raise MSRPClientError(f"cannot connect to {relay_uri}: {'; '.join(failures)}")
