"""MSRPConnection and MSRPRelay on StringTransports and a MemoryReactorClock.

Every connection is a real ``MSRPConnection`` of one real ``MSRPRelay`` (built
by hand the way ``relayd.service.build_service`` wires it); clients are played
by writing bytes into ``dataReceived`` and reading what the relay wrote back
with ``MSRPParser``.  No sockets, no reactor: time moves with ``advance``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
from cryptography import x509
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.exceptions import DNSMismatch
from service_identity.hazmat import DNS_ID
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from relayd.config import MSRPConfig, load_config
from relayd.digest import Challenge, DigestAuthenticator, answer_challenge, ha1, parse_challenge
from relayd.msrp.message import MSRPRequest, MSRPResponse
from relayd.msrp.parser import BodyChunk, MessageEnd, MessageStart, MSRPParser
from relayd.msrp.relay import AuthPolicy, RelayCore
from relayd.msrp.transport import MSRPConnection, MSRPRelay
from relayd.msrp.uri import MSRPURI
from relayd.testing import captured_log, make_pki

HOST = "relay.example.com"
REALM = "relay.example.com"
RELAY_URI = "msrps://relay.example.com:2855;tcp"
PASSWORDS = {name: f"{name}-secret" for name in ("alice", "bob", "carol", "dave", "peer")}


# -- doubles -----------------------------------------------------------------------------


class FakeTransport(StringTransport):
    """A StringTransport that behaves like a real TCP/TLS transport where it matters.

    * ``unregisterProducer`` without a producer is a no-op, as in Twisted's
      ``FileDescriptor`` and ``TLSMemoryBIOProtocol``;
    * ``loseConnection``/``abortConnection`` deliver ``connectionLost`` on the
      next reactor turn (``clock.advance(0)``), never re-entrantly;
    * ``setTcpNoDelay`` is recorded.
    """

    def __init__(self, clock: MemoryReactorClock, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer, lenient=True)
        self.clock = clock
        self.protocol: MSRPConnection | None = None
        self.no_delay = False
        self.lost = False
        self.peer_certificate: x509.Certificate | None = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getPeerCertificate(self) -> x509.Certificate | None:
        return self.peer_certificate

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None

    def loseConnection(self) -> None:
        first = not self.disconnecting
        super().loseConnection()
        if first:
            self.clock.callLater(0, self.connection_lost)

    def connection_lost(self) -> None:
        """The connection is gone (closed by us or by the peer)."""
        if self.lost or self.protocol is None:
            return
        self.lost = True
        self.connected = False
        reason = ConnectionAborted() if self.disconnected else ConnectionDone()
        self.protocol.connectionLost(Failure(reason))


class PeerRelayConnection(MSRPConnection):
    """An inbound connection from a peer relay whose certificate names ``peer.example.net``."""

    def certificate_matches(self, host: str) -> bool:
        return host == "peer.example.net"


class Frame(NamedTuple):
    message: MSRPRequest | MSRPResponse
    body: bytes
    flag: bytes


def parse_frames(data: bytes, complete: bool = True) -> list[Frame]:
    """Every whole message in ``data``; the relay must never write anything malformed.

    ``complete`` also asserts that ``data`` does not end inside a message.
    """
    parser = MSRPParser()
    frames: list[Frame] = []
    current: MSRPRequest | MSRPResponse | None = None
    body: list[bytes] = []
    for event in parser.feed(data):
        if isinstance(event, MessageStart):
            current, body = event.message, []
        elif isinstance(event, BodyChunk):
            body.append(event.data)
        elif isinstance(event, MessageEnd):
            assert current is not None
            frames.append(Frame(current, b"".join(body), event.flag))
            current = None
        else:
            raise AssertionError(f"relay wrote a malformed message: {event!r}")
    if complete:
        assert not parser.in_message, f"relay output ends inside a message: {data[-200:]!r}"
    return frames


def as_request(frame: Frame) -> MSRPRequest:
    assert isinstance(frame.message, MSRPRequest), frame
    return frame.message


def as_response(frame: Frame) -> MSRPResponse:
    assert isinstance(frame.message, MSRPResponse), frame
    return frame.message


def header(frame: Frame, name: str) -> str | None:
    return frame.message.headers.get(name)


# -- the relay and its clients -----------------------------------------------------------


@dataclass
class Client:
    name: str
    connection: MSRPConnection
    transport: FakeTransport
    uri: str
    use_path: str = ""

    def feed(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.connection.dataReceived(piece)

    def take(self) -> list[Frame]:
        """Parse and clear everything the relay wrote to this client."""
        data = self.transport.value()
        self.transport.clear()
        return parse_frames(data)

    def clear(self) -> None:
        self.transport.clear()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def hang_up(self) -> None:
        self.transport.connection_lost()


_tids = (f"tx{n:06d}" for n in itertools.count())


def next_tid() -> str:
    return next(_tids)


class Harness:
    """One relay for relay.example.com:2855 (TLS), wired as build_service does."""

    def __init__(self, overrides: Mapping[tuple[str, str], str] | None = None) -> None:
        self.clock = MemoryReactorClock()
        self.config: MSRPConfig = load_config(None, overrides).msrp
        self.digest = DigestAuthenticator(REALM, self._lookup, self.clock)
        policy = AuthPolicy(
            realm=REALM,
            expires_seconds=self.config.session_expires_seconds,
            expires_min_seconds=self.config.session_expires_min_seconds,
            expires_max_seconds=self.config.session_expires_max_seconds,
        )
        self.core = RelayCore(self.clock, HOST, policy, self.digest)
        self.core.add_local_address(2855, tls=True)
        self.relay = MSRPRelay(self.clock, self.core, self.config)
        self._ports = itertools.count(40000)

    @staticmethod
    def _lookup(user: str, realm: str) -> str | None:
        password = PASSWORDS.get(user)
        return None if password is None else ha1(user, realm, password)

    def connect(
        self,
        name: str,
        connection_class: type[MSRPConnection] = MSRPConnection,
        tls: bool = True,
    ) -> Client:
        connection = connection_class(self.relay, inbound=True, tls=tls)
        transport = FakeTransport(self.clock, IPv4Address("TCP", "192.0.2.10", next(self._ports)))
        transport.protocol = connection
        connection.makeConnection(transport)
        uri = f"msrps://{name}.example.com:7000/{name}s1;tcp"
        return Client(name, connection, transport, uri)

    def client(self, name: str) -> Client:
        client = self.connect(name)
        authenticate(client)
        return client


def auth_bytes(
    client: Client, tid: str, authorization: str | None = None, expires: str | None = None
) -> bytes:
    lines = [f"MSRP {tid} AUTH", f"To-Path: {RELAY_URI}", f"From-Path: {client.uri}"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    if expires is not None:
        lines.append(f"Expires: {expires}")
    return ("\r\n".join(lines) + f"\r\n-------{tid}$\r\n").encode()


def challenge(client: Client) -> str:
    """Send an AUTH without credentials; return the nonce of the 401."""
    client.feed(auth_bytes(client, next_tid()))
    (frame,) = client.take()
    assert as_response(frame).code == 401
    value = header(frame, "WWW-Authenticate")
    assert value is not None
    return parse_challenge(value)["nonce"]


def credentials(user: str, password: str, nonce: str, nc: int = 1) -> str:
    answer = answer_challenge(
        Challenge(REALM, nonce),
        username=user,
        password=password,
        method="AUTH",
        uri=RELAY_URI,
        cnonce="0a4f113b",
        nc=nc,
    )
    return answer.authorization


def authenticate(client: Client, user: str | None = None) -> None:
    """The two-step AUTH of RFC 4976 §6.3; sets ``client.use_path``."""
    user = user or client.name
    nonce = challenge(client)
    tid = next_tid()
    client.feed(auth_bytes(client, tid, credentials(user, PASSWORDS[user], nonce)))
    (frame,) = client.take()
    response = as_response(frame)
    assert (response.tid, response.code) == (tid, 200), response
    use_path = header(frame, "Use-Path")
    assert use_path is not None
    client.use_path = use_path


def send_head(
    tid: str,
    to_path: str,
    from_path: str,
    *,
    total: int | None = None,
    byte_range: str | None = None,
    message_id: str = "msg-1",
    failure_report: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
    content_type: str = "text/plain",
) -> bytes:
    if byte_range is None:
        byte_range = f"1-{total}/{total}" if total is not None else "1-*/*"
    lines = [
        f"MSRP {tid} SEND",
        f"To-Path: {to_path}",
        f"From-Path: {from_path}",
        f"Message-ID: {message_id}",
    ]
    if failure_report is not None:
        lines.append(f"Failure-Report: {failure_report}")
    lines.append(f"Byte-Range: {byte_range}")
    lines.extend(f"{name}: {value}" for name, value in extra)
    lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def body_end(tid: str, flag: bytes = b"$") -> bytes:
    return b"\r\n-------" + tid.encode() + flag + b"\r\n"


def path_to(sender: Client, recipient: Client) -> str:
    return f"{sender.use_path} {recipient.use_path} {recipient.uri}"


def send_bytes(sender: Client, recipient: Client, tid: str, body: bytes, **kw: Any) -> bytes:
    head = send_head(tid, path_to(sender, recipient), sender.uri, total=len(body), **kw)
    return head + body + body_end(tid)


def response_bytes(tid: str, code: int, comment: str, to_path: str, from_path: str) -> bytes:
    return (
        f"MSRP {tid} {code} {comment}\r\nTo-Path: {to_path}\r\nFrom-Path: {from_path}\r\n"
        f"-------{tid}$\r\n"
    ).encode()


def answer(recipient: Client, frame: Frame, code: int = 200, comment: str = "OK") -> None:
    """The recipient's hop-by-hop response to a SEND frame the relay forwarded."""
    request = as_request(frame)
    from_path = header(frame, "From-Path") or ""
    recipient.feed(response_bytes(request.tid, code, comment, from_path.split()[0], recipient.uri))


# -- fixtures ------------------------------------------------------------------------------


@contextmanager
def logged_failures_forbidden() -> Iterator[EventLoggingObserver]:
    """Nothing may escape into log.failure: bad input is never an internal error."""
    with captured_log() as observer:
        yield observer
    failures = [event for event in observer if "log_failure" in event]
    assert not failures, failures


@pytest.fixture(autouse=True)
def no_logged_failures() -> Iterator[EventLoggingObserver]:
    with logged_failures_forbidden() as observer:
        yield observer


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- AUTH and connection set-up -------------------------------------------------------------


def test_connection_registers_producer_and_disables_nagle(h: Harness) -> None:
    a = h.connect("alice")
    assert a.transport.producer is a.connection
    assert a.transport.streaming is True
    assert a.transport.no_delay is True
    assert a.connection in h.relay.connections
    assert a.connection.peer == "192.0.2.10:40000"


def test_auth_returns_use_path_expires_and_authentication_info(h: Harness) -> None:
    a = h.connect("alice")
    nonce = challenge(a)
    a.feed(auth_bytes(a, "authtid1", credentials("alice", PASSWORDS["alice"], nonce)))
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("authtid1", 200)
    assert header(frame, "To-Path") == a.uri
    assert header(frame, "From-Path") == RELAY_URI
    use_path = header(frame, "Use-Path") or ""
    assert use_path.startswith("msrps://relay.example.com:2855/")
    assert use_path.endswith(";tcp")
    assert header(frame, "Expires") == str(h.config.session_expires_seconds)
    assert "rspauth=" in (header(frame, "Authentication-Info") or "")


# -- A -> B through one relay ---------------------------------------------------------------


def test_send_between_clients_is_rewritten_streamed_and_answered(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    body = bytes(range(256)) * 8
    head = send_head(
        "atid0001",
        path_to(a, b),
        a.uri,
        total=len(body),
        extra=(("Success-Report", "no"), ("X-Custom", "kept; as is")),
        content_type="application/octet-stream",
    )
    a.feed(head + body + body_end("atid0001"))

    (frame,) = b.take()
    forwarded = as_request(frame)
    assert forwarded.method == "SEND"
    assert forwarded.tid != "atid0001"
    assert list(forwarded.headers) == [
        ("To-Path", b.uri),
        ("From-Path", f"{b.use_path} {a.use_path} {a.uri}"),
        ("Message-ID", "msg-1"),
        ("Byte-Range", f"1-{len(body)}/{len(body)}"),
        ("Success-Report", "no"),
        ("X-Custom", "kept; as is"),
        ("Content-Type", "application/octet-stream"),
    ]
    assert frame.body == body
    assert frame.flag == b"$"

    (ok,) = a.take()
    response = as_response(ok)
    assert (response.tid, response.code, response.comment) == ("atid0001", 200, "OK")
    assert list(response.headers) == [("To-Path", a.uri), ("From-Path", a.use_path)]

    # B's own 200 is hop-by-hop: the relay absorbs it.
    answer(b, frame)
    assert a.transport.value() == b""
    assert b.transport.value() == b""
    assert not b.connection.transactions


def test_frames_caused_by_one_read_leave_in_one_write_per_connection(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    writes: dict[str, list[bytes]] = {"alice": [], "bob": []}
    order: list[str] = []
    for client in (a, b):
        original = client.transport.write

        def write(data: bytes, name: str = client.name, original: Any = original) -> None:
            writes[name].append(data)
            order.append(name)
            original(data)

        client.transport.write = write  # type: ignore[method-assign]
    a.feed(
        send_bytes(a, b, "batch001", b"one", message_id="m1")
        + send_bytes(a, b, "batch002", b"two", message_id="m2")
    )
    # The forwarded frames go out before the sender's own 200s.
    assert order == ["bob", "alice"]
    assert [frame.body for frame in parse_frames(writes["bob"][0])] == [b"one", b"two"]
    assert len(writes["alice"]) == 1
    oks = parse_frames(writes["alice"][0])
    assert [(as_response(f).tid, as_response(f).code) for f in oks] == [
        ("batch001", 200),
        ("batch002", 200),
    ]
    # Outside a read (here: a timer), frames are written at once.
    h.clock.advance(h.config.transaction_timeout_seconds + 1)
    assert [len(writes["alice"]), len(writes["bob"])] == [3, 1]
    reports = a.take()[2:]
    assert [(as_request(f).method, header(f, "Status")) for f in reports] == [
        ("REPORT", "000 408 Request Timeout"),
        ("REPORT", "000 408 Request Timeout"),
    ]


def test_output_held_for_a_read_is_written_before_a_close(h: Harness) -> None:
    a = h.connect("alice")
    # On probation, the third failed request closes the connection: the 400s
    # for all three, written during the same read, must still go out first.
    bad = b"".join(
        f"MSRP bad{n:05d} SEND\r\nTo-Path: {RELAY_URI}\r\nFrom-Path: {a.uri}\r\nX\r\n"
        f"-------bad{n:05d}$\r\n".encode()
        for n in range(h.config.probation_max_failures)
    )
    original = a.transport.write
    written_while_closing: list[bool] = []

    def write(data: bytes) -> None:
        written_while_closing.append(bool(a.transport.disconnecting))
        original(data)

    a.transport.write = write  # type: ignore[method-assign]
    a.feed(bad)
    assert a.closed
    assert written_while_closing == [False]
    assert [as_response(f).code for f in a.take()] == [400] * h.config.probation_max_failures


def test_send_without_byte_range_gets_one_after_the_paths(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    data = (
        f"MSRP nobr0001 SEND\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Message-ID: m-nobr\r\nContent-Type: text/plain\r\n\r\nhello\r\n-------nobr0001$\r\n"
    ).encode()
    a.feed(data)
    (frame,) = b.take()
    names = [name for name, _ in frame.message.headers]
    assert names == ["To-Path", "From-Path", "Byte-Range", "Message-ID", "Content-Type"]
    assert header(frame, "Byte-Range") == "1-5/*"
    assert frame.body == b"hello"


def test_send_without_body_is_forwarded_with_its_byte_range(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    data = (
        f"MSRP empty001 SEND\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Message-ID: m-empty\r\nByte-Range: 1-0/0\r\n-------empty001$\r\n"
    ).encode()
    a.feed(data)
    (frame,) = b.take()
    assert header(frame, "Byte-Range") == "1-0/0"
    assert frame.body == b""
    assert frame.flag == b"$"
    (ok,) = a.take()
    assert as_response(ok).code == 200


def test_send_with_continuation_flag_keeps_flag_and_offset(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    body = b"second part"
    head = send_head("cont0001", path_to(a, b), a.uri, byte_range="101-*/*")
    a.feed(head + body + body_end("cont0001", b"+"))
    (frame,) = b.take()
    assert header(frame, "Byte-Range") == f"101-{100 + len(body)}/*"
    assert frame.flag == b"+"
    assert frame.body == body


# -- Failure-Report ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["partial", "no"])
def test_no_success_response_unless_failure_report_yes(h: Harness, mode: str) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "frep0001", b"payload", failure_report=mode))
    (frame,) = b.take()
    assert header(frame, "Failure-Report") == mode
    assert a.transport.value() == b""


@pytest.mark.parametrize("mode", ["yes", "partial"])
def test_error_response_from_next_hop_becomes_report(h: Harness, mode: str) -> None:
    a, b = h.client("alice"), h.client("bob")
    body = b"x" * 300
    a.feed(send_bytes(a, b, "err00001", body, failure_report=mode, message_id="m-415"))
    a.clear()
    (frame,) = b.take()
    answer(b, frame, 415, "Unsupported Media Type")

    (report_frame,) = a.take()
    report = as_request(report_frame)
    assert report.method == "REPORT"
    assert report.tid != "err00001"
    assert header(report_frame, "To-Path") == a.uri
    assert header(report_frame, "From-Path") == a.use_path
    assert header(report_frame, "Message-ID") == "m-415"
    assert header(report_frame, "Byte-Range") == "1-300/300"
    assert header(report_frame, "Status") == "000 415 Unsupported Media Type"
    # A REPORT is never answered, so the relay waits for nothing.
    h.clock.advance(h.config.transaction_timeout_seconds)
    assert a.transport.value() == b""


def test_report_to_path_is_senders_whole_from_path(h: Harness) -> None:
    """A sender behind another relay: the REPORT retraces the whole From-Path."""
    a, b = h.client("alice"), h.client("bob")
    from_path = f"{a.uri} msrps://origin.example.org:9/o1;tcp"
    head = send_head("far00001", f"{a.use_path} {b.use_path} {b.uri}", from_path, total=3)
    a.feed(head + b"abc" + body_end("far00001"))
    (ok,) = a.take()
    assert header(ok, "To-Path") == a.uri  # a response goes one hop back only
    (frame,) = b.take()
    answer(b, frame, 403, "Forbidden")
    (report,) = a.take()
    assert header(report, "To-Path") == from_path
    assert header(report, "Status") == "000 403 Forbidden"


def test_failure_report_no_ignores_errors_and_timeouts(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "nofr0001", b"abc", failure_report="no"))
    (frame,) = b.take()
    answer(b, frame, 415, "Unsupported Media Type")
    h.clock.advance(h.config.transaction_timeout_seconds + 1)
    assert a.transport.value() == b""
    assert not b.connection.transactions


def test_bad_failure_report_value_is_400(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "badfr001", b"abc", failure_report="sometimes"))
    (frame,) = a.take()
    assert as_response(frame).code == 400
    assert header(frame, "To-Path") == a.uri
    assert b.transport.value() == b""


# -- transaction timer ------------------------------------------------------------------------


def test_no_response_from_next_hop_gives_408_report(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "tout0001", b"hello", message_id="m-408"))
    a.clear()
    b.take()
    h.clock.advance(h.config.transaction_timeout_seconds - 1)
    assert a.transport.value() == b""
    h.clock.advance(1)
    (report_frame,) = a.take()
    assert as_request(report_frame).method == "REPORT"
    assert header(report_frame, "Status") == "000 408 Request Timeout"
    assert header(report_frame, "Message-ID") == "m-408"
    assert header(report_frame, "Byte-Range") == "1-5/5"
    assert header(report_frame, "To-Path") == a.uri
    assert header(report_frame, "From-Path") == a.use_path


def test_response_before_timeout_cancels_the_timer(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "tout0002", b"hello"))
    a.clear()
    (frame,) = b.take()
    h.clock.advance(h.config.transaction_timeout_seconds - 1)
    answer(b, frame)
    h.clock.advance(h.config.transaction_timeout_seconds * 2)
    assert a.transport.value() == b""
    assert not b.connection.transactions


@pytest.mark.parametrize(
    "to_path",
    [
        "msrps://elsewhere.example.org:2855/x;tcp",
        "msrps://relay.example.com:2856/x;tcp",
        "not a uri",
    ],
)
def test_response_not_addressed_to_us_is_dropped(h: Harness, to_path: str) -> None:
    """§6.4.3: a matching transaction id is not enough; the To-Path must be ours."""
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "addr0001", b"hello", message_id="m-addr"))
    a.clear()
    (frame,) = b.take()
    tid = as_request(frame).tid
    b.feed(response_bytes(tid, 415, "Unsupported Media Type", to_path, b.uri))
    assert a.transport.value() == b""
    assert tid in b.connection.transactions
    # The next hop's real answer still settles the frame.
    answer(b, frame, 415, "Unsupported Media Type")
    (report,) = a.take()
    assert header(report, "Status") == "000 415 Unsupported Media Type"
    assert not b.connection.transactions


def test_response_to_our_uri_spelled_differently_is_accepted(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "addr0002", b"hello", message_id="m-case"))
    a.clear()
    (frame,) = b.take()
    ours = (header(frame, "From-Path") or "").split()[0]
    respelled = ours.replace("msrps://relay.example.com:", "MSRPS://Relay.Example.COM:")
    assert respelled != ours
    b.feed(response_bytes(as_request(frame).tid, 403, "Forbidden", respelled, b.uri))
    (report,) = a.take()
    assert header(report, "Status") == "000 403 Forbidden"
    assert not b.connection.transactions


def test_partial_failure_report_times_out_silently(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "tout0003", b"hello", failure_report="partial"))
    b.take()
    assert len(b.connection.transactions) == 1
    h.clock.advance(h.config.transaction_timeout_seconds)
    assert a.transport.value() == b""
    assert not b.connection.transactions


def test_next_hop_lost_gives_481_report(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "lost0001", b"hello", message_id="m-lost"))
    a.clear()
    b.hang_up()
    (report,) = a.take()
    assert header(report, "Status") == "000 481 next hop connection lost"
    assert header(report, "Byte-Range") == "1-5/5"


FAR_HOP = "msrps://far.example.net:9/x;tcp"


def hold_next_hop(h: Harness) -> list[defer.Deferred[MSRPConnection]]:
    """Next-hop connections stay pending until the test fires them."""
    waiting: list[defer.Deferred[MSRPConnection]] = []

    def connection_for(uri: MSRPURI) -> defer.Deferred[MSRPConnection]:
        waiting.append(defer.Deferred())
        return waiting[-1]

    h.relay.connection_for = connection_for  # type: ignore[method-assign]
    return waiting


def refuse_connection(waiting: list[defer.Deferred[MSRPConnection]]) -> None:
    (pending,) = waiting
    pending.errback(Failure(ConnectionRefusedError("far.example.net")))


def test_unreachable_next_hop_after_the_chunk_reports_all_of_it(h: Harness) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    tid = "unre0001"
    head = send_head(tid, f"{a.use_path} {FAR_HOP}", a.uri, total=13, message_id="m-unr")
    a.feed(head + b"anyone there?" + body_end(tid))
    # The whole chunk is here: answered at once (§6.4.1), before the connect fails.
    (ok,) = a.take()
    assert (as_response(ok).tid, as_response(ok).code) == (tid, 200)
    refuse_connection(waiting)
    (report,) = a.take()
    assert as_request(report).method == "REPORT"
    assert header(report, "Status") == "000 481 next hop unreachable"
    assert header(report, "Message-ID") == "m-unr"
    assert header(report, "Byte-Range") == "1-13/13"


def test_peer_answer_with_short_to_path_goes_back_to_the_sender(h: Harness) -> None:
    """Kamailio answers an AUTH forwarded to it with To-Path naming only us (§6.4.3)."""
    waiting = hold_next_hop(h)
    a = h.client("alice")
    peer = h.connect("far")
    auth = (
        f"MSRP fwda0001 AUTH\r\nTo-Path: {a.use_path} {FAR_HOP}\r\nFrom-Path: {a.uri}\r\n"
        "-------fwda0001$\r\n"
    ).encode()
    with captured_log() as observer:
        for number in (1, 2):
            a.feed(auth.replace(b"fwda0001", b"fwda000%d" % number))
            waiting[-1].callback(peer.connection)
            (forwarded,) = peer.take()
            ours = (header(forwarded, "From-Path") or "").split()[0]
            challenge = response_bytes(
                as_request(forwarded).tid, 401, "Unauthorized", ours, FAR_HOP
            )
            peer.feed(challenge)
            (frame,) = a.take()
            response = as_response(frame)
            assert (response.tid, response.code) == (f"fwda000{number}", 401)
            assert header(frame, "To-Path") == a.uri
            assert header(frame, "From-Path") == f"{ours} {FAR_HOP}"
            assert not peer.connection.transactions
    warnings = [e for e in observer if "not the request's path back" in e.get("log_format", "")]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    ("byte_range", "reported"),
    [("1-13/13", "1-13/13"), ("1-*/13", "1-5/13"), ("1-*/*", "1-5/*"), ("9-21/30", "9-21/30")],
)
def test_unreachable_next_hop_before_the_end_line_answers_the_chunk_with_481(
    h: Harness, byte_range: str, reported: str
) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    tid = "unre0002"
    a.feed(send_head(tid, f"{a.use_path} {FAR_HOP}", a.uri, byte_range=byte_range) + b"anyon")
    refuse_connection(waiting)
    (report,) = a.take()
    assert header(report, "Status") == "000 481 next hop unreachable"
    # The inbound chunk's range: its known end, else the bytes received.
    assert header(report, "Byte-Range") == reported
    a.feed(b"e there?" + body_end(tid))
    # One response for the chunk's transaction, and it is the failure.
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == (tid, 481)
    assert header(frame, "To-Path") == a.uri
    assert header(frame, "From-Path") == a.use_path
    h.clock.advance(h.config.transaction_timeout_seconds + 1)
    assert a.transport.value() == b""


@pytest.mark.parametrize(("mode", "answered"), [("partial", True), ("no", False)])
def test_failure_before_the_end_line_with_other_failure_report_modes(
    h: Harness, mode: str, answered: bool
) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    tid = "unre0003"
    path = f"{a.use_path} {FAR_HOP}"
    a.feed(send_head(tid, path, a.uri, total=13, failure_report=mode) + b"anyon")
    refuse_connection(waiting)
    a.feed(b"e there?" + body_end(tid))
    frames = a.take()
    if answered:
        # "partial": errors only, as a REPORT and as the transaction's response.
        report, frame = frames
        assert header(report, "Byte-Range") == "1-13/13"
        assert (as_response(frame).tid, as_response(frame).code) == (tid, 481)
    else:
        assert frames == []


# Each way a next hop can fail, as the sender's REPORT and the relay's log say it
# (RFC 4975 §10 codes; the cause in the log line only).
_UNTRUSTED = SSL.Error([("SSL routines", "", "certificate verify failed")])
_WRONG_NAME = VerificationError(errors=[DNSMismatch(DNS_ID("far.example.net"))])


def report_logged(events: EventLoggingObserver) -> str:
    (event,) = [e for e in events if e.get("log_format", "").startswith("REPORT ")]
    return str(event["log_format"].format(**event))


def _open_next_hop(h: Harness, waiting: list[defer.Deferred[MSRPConnection]]) -> Client:
    """The outbound TLS connection the relay asked for, handed to it (handshake pending)."""
    connection = MSRPConnection(h.relay, inbound=False, tls=True)
    transport = FakeTransport(h.clock, IPv4Address("TCP", "198.51.100.9", 9))
    transport.protocol = connection
    connection.makeConnection(transport)
    waiting.pop().callback(connection)
    return Client("far", connection, transport, FAR_HOP)


@pytest.mark.parametrize(
    ("reason", "opened", "status", "cause"),
    [
        # The connect fails...
        (ConnectionRefusedError("far"), False, "481 next hop unreachable", "refused"),
        (ConnectTimeoutError(), False, "408 next hop did not answer", "User timeout"),
        # ...or the connection opened, the SEND went out, and then it ends.
        (_UNTRUSTED, True, "403 next hop failed TLS verification", "certificate verify failed"),
        (_WRONG_NAME, True, "403 next hop failed TLS verification", "does not name the host"),
        (ConnectionLost(), True, "481 next hop connection lost", "Connection to the other side"),
    ],
)
def test_each_way_a_next_hop_fails_has_its_own_report(
    h: Harness, reason: Exception, opened: bool, status: str, cause: str
) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    tid = "fail0001"
    head = send_head(tid, f"{a.use_path} {FAR_HOP}", a.uri, total=5, message_id="m-f")
    a.feed(head + b"hello" + body_end(tid))
    a.take()
    with captured_log() as events:
        if opened:
            far = _open_next_hop(h, waiting)
            assert as_request(far.take()[0]).method == "SEND"
            far.connection.connectionLost(Failure(reason))
        else:
            waiting[0].errback(Failure(reason))
    (report,) = a.take()
    assert header(report, "Status") == f"000 {status}"
    assert header(report, "Byte-Range") == "1-5/5"
    logged = report_logged(events)
    assert logged.startswith(f"REPORT {status} sent for message m-f: ")
    assert cause in logged


def test_a_request_forwarded_whole_is_answered_403_when_tls_fails(h: Harness) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    a.feed(
        f"MSRP nick0009 NICKNAME\r\nTo-Path: {a.use_path} {FAR_HOP}\r\n"
        f"From-Path: {a.uri}\r\n-------nick0009$\r\n".encode()
    )
    far = _open_next_hop(h, waiting)
    far.take()
    far.connection.connectionLost(Failure(_UNTRUSTED))
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("nick0009", 403)
    assert response.comment == "next hop failed TLS verification"


def test_a_request_forwarded_whole_is_answered_408_when_the_connect_times_out(
    h: Harness,
) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    a.feed(
        f"MSRP nick0010 NICKNAME\r\nTo-Path: {a.use_path} {FAR_HOP}\r\n"
        f"From-Path: {a.uri}\r\n-------nick0010$\r\n".encode()
    )
    waiting[0].errback(Failure(ConnectTimeoutError()))
    (frame,) = a.take()
    assert (as_response(frame).tid, as_response(frame).code) == ("nick0010", 408)


# -- streaming, cutting and chunk size ---------------------------------------------------------


def test_body_streams_through_before_the_end_line(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    pieces = [bytes([ord("a") + i]) * 100 for i in range(5)]
    a.feed(send_head("strm0001", path_to(a, b), a.uri, byte_range="1-*/500"))
    forwarded = b""
    for index, piece in enumerate(pieces):
        a.feed(piece)
        forwarded += b.transport.value()
        b.clear()
        if index == 0:
            assert forwarded == b"", "the header block waits for the first byte to forward"
        else:
            # Everything but the latest piece is already on its way.
            assert forwarded.endswith(pieces[index - 1])
            assert b"".join(pieces[:index]) in forwarded
    assert b"-------" not in forwarded
    a.feed(body_end("strm0001"))
    (frame,) = parse_frames(forwarded + b.transport.value())
    assert frame.body == b"".join(pieces)
    assert header(frame, "Byte-Range") == "1-*/500"


def test_small_message_cuts_a_large_one_in_progress(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    big = [bytes([ord("A") + i]) * 1000 for i in range(6)]
    a.feed(send_head("big00001", path_to(a, b), a.uri, byte_range="1-6000/6000", message_id="big"))
    for piece in big[:3]:
        a.feed(piece)
    c.feed(send_bytes(c, b, "small001", b"hi bob", message_id="small"))
    for piece in big[3:]:
        a.feed(piece)
    a.feed(body_end("big00001"))

    frames = b.take()
    assert [header(f, "Message-ID") for f in frames] == ["big", "small", "big"]
    first, small, rest = frames
    assert first.flag == b"+"
    assert header(first, "Byte-Range") == "1-*/6000"
    assert small.body == b"hi bob"
    assert small.flag == b"$"
    assert header(small, "Byte-Range") == "1-6/6"
    assert header(small, "From-Path") == f"{b.use_path} {c.use_path} {c.uri}"
    assert rest.flag == b"$"
    assert header(rest, "Byte-Range") == f"{len(first.body) + 1}-*/6000"
    assert first.body + rest.body == b"".join(big)
    tids = {as_request(f).tid for f in frames}
    assert len(tids) == 3
    # Every frame a separate transaction: the message's sender gets one 200 per chunk.
    assert [as_response(f).code for f in a.take()] == [200]
    assert [as_response(f).code for f in c.take()] == [200]


def test_error_on_a_cut_frame_reports_that_frames_range(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    a.feed(send_head("big00002", path_to(a, b), a.uri, byte_range="1-*/*", message_id="big"))
    a.feed(b"1" * 100, b"2" * 100)
    c.feed(send_bytes(c, b, "small002", b"x"))
    first, _small = b.take()
    answer(b, first, 413, "Stop Sending Message")
    (report,) = a.take()
    assert header(report, "Byte-Range") == f"1-{len(first.body)}/*"
    assert header(report, "Status") == "000 413 Stop Sending Message"
    # The rest of the message is no longer forwarded.
    a.feed(b"3" * 100, body_end("big00002"))
    assert b.transport.value() == b""


def test_response_to_a_client_cuts_a_frame_streaming_towards_it(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    c.feed(send_head("tob00001", path_to(c, b), c.uri, byte_range="1-*/*", message_id="c"))
    c.feed(b"1" * 100, b"2" * 100)
    # B sends a message of its own: the relay's 200 to B must not land inside C's frame.
    b.feed(send_bytes(b, a, "froma001", b"hello alice"))
    c.feed(b"3" * 100, body_end("tob00001"))
    frames = b.take()
    assert [(type(f.message).__name__, f.flag) for f in frames] == [
        ("MSRPRequest", b"+"),
        ("MSRPResponse", b"$"),
        ("MSRPRequest", b"$"),
    ]
    assert as_response(frames[1]).tid == "froma001"
    assert frames[0].body + frames[2].body == b"1" * 100 + b"2" * 100 + b"3" * 100
    assert header(frames[2], "Byte-Range") == f"{len(frames[0].body) + 1}-*/*"
    (to_alice,) = a.take()
    assert to_alice.body == b"hello alice"


@pytest.mark.parametrize("split", [False, True])
def test_max_chunk_bytes_splits_large_bodies(split: bool) -> None:
    h = Harness({("msrp", "max_chunk_bytes"): "1024"})
    a, b = h.client("alice"), h.client("bob")
    body = bytes(i % 251 for i in range(5000))
    head = send_head("huge0001", path_to(a, b), a.uri, total=5000)
    if split:
        a.feed(head, *(body[i : i + 700] for i in range(0, 5000, 700)), body_end("huge0001"))
    else:
        a.feed(head + body + body_end("huge0001"))
    frames = b.take()
    assert all(len(f.body) <= 1024 for f in frames)
    assert b"".join(f.body for f in frames) == body
    assert [f.flag for f in frames] == [b"+"] * (len(frames) - 1) + [b"$"]
    offset = 1
    for frame in frames:
        start, _, rest = (header(frame, "Byte-Range") or "").partition("-")
        end, _, total = rest.partition("/")
        assert int(start) == offset
        assert total == "5000"
        assert end in ("*", str(offset + len(frame.body) - 1))
        offset += len(frame.body)
    assert offset == 5001
    assert len({as_request(f).tid for f in frames}) == len(frames)
    if not split:
        assert [len(f.body) for f in frames] == [1024, 1024, 1024, 1024, 904]
        assert header(frames[-1], "Byte-Range") == "4097-5000/5000"


def test_max_chunk_error_report_byte_range() -> None:
    h = Harness({("msrp", "max_chunk_bytes"): "1024"})
    a, b = h.client("alice"), h.client("bob")
    body = b"z" * 5000
    a.feed(send_bytes(a, b, "huge0002", body, message_id="m-huge"))
    a.clear()
    frames = b.take()
    answer(b, frames[0], 200)
    answer(b, frames[1], 413, "Stop Sending Message")
    (report,) = a.take()
    assert header(report, "Byte-Range") == "1025-2048/5000"
    assert header(report, "Message-ID") == "m-huge"
    for frame in frames[2:]:
        answer(b, frame, 500, "Later errors")
    assert a.transport.value() == b"", "a message is reported once"


def test_sender_gone_mid_chunk_ends_forwarded_frame_with_hash(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_head("gone0001", path_to(a, b), a.uri, byte_range="1-*/*"), b"a" * 50, b"b" * 50)
    a.hang_up()
    (frame,) = b.take()
    assert frame.flag == b"#"
    assert frame.body == b"a" * 50 + b"b" * 50


# -- back-pressure --------------------------------------------------------------------------------


class SlowWire:
    """The socket under a client's transport, for MSRPConnection.room: what the relay
    wrote stays unsent until the test lets the reader take it (``drain``)."""

    dataBuffer = b""
    offset = 0
    streamingProducer = True
    connected = True

    def __init__(self, client: Client) -> None:
        self.client = client
        self.taken = 0
        self.producer = client.connection
        self.producerPaused = False

    @property
    def _tempDataLen(self) -> int:
        return len(self.client.transport.value()) - self.taken

    def fileno(self) -> int:
        raise ValueError("no socket: no kernel queue")

    def startWriting(self) -> None:
        pass

    def drain(self) -> None:
        """The reader took everything: the transport resumes its producer (doWrite)."""
        self.taken = len(self.client.transport.value())
        if self.producerPaused:
            self.producerPaused = False
            self.producer.resumeProducing()


def test_small_send_overtakes_a_backlogged_transfer_at_a_frame_boundary() -> None:
    h = Harness({("msrp", "send_queue_bytes"): "4096"})
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    wire = b.connection._wire = SlowWire(b)
    big = bytes(range(256)) * 80
    a.feed(send_head("big00001", path_to(a, b), a.uri, total=len(big)) + big[:10000])
    a.feed(big[10000:] + body_end("big00001"))
    # Only send_queue_bytes went out; the rest waits in the stream, not on the wire.
    assert len(b.transport.value()) < 4096 + 400
    # The chunk has ended, but most of it waits in its stream: so does alice.
    assert a.transport.producerState == "paused"
    a.feed(send_bytes(a, b, "big00002", b"next message", message_id="next"))
    wire.drain()
    before = len(b.transport.value())
    c.feed(send_bytes(c, b, "small001", b"small message!!", message_id="small"))
    for _ in range(20):
        wire.drain()
    written = b.transport.value()
    assert written.index(b"small message!!") - before < 4096 + 1000
    frames = parse_frames(written)
    bodies: dict[str, bytes] = {}
    for frame in frames:
        message_id = header(frame, "Message-ID") or ""
        start = int((header(frame, "Byte-Range") or "").split("-")[0])
        assert start == len(bodies.get(message_id, b"")) + 1  # each sender's bytes in order
        bodies[message_id] = bodies.get(message_id, b"") + frame.body
    assert bodies == {"msg-1": big, "next": b"next message", "small": b"small message!!"}
    assert [f.flag for f in frames if header(f, "Message-ID") == "small"] == [b"$"]
    assert a.transport.producerState == "producing"


def test_congested_recipient_pauses_the_sender(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_head("bp000001", path_to(a, b), a.uri, byte_range="1-*/*"), b"x" * 100)
    assert a.transport.producerState == "producing"
    b.connection.pauseProducing()  # B's socket buffer is full
    assert a.transport.producerState == "paused"
    b.connection.resumeProducing()
    assert a.transport.producerState == "producing"


def test_stream_into_congested_recipient_starts_paused_and_ends_resumed(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    b.connection.pauseProducing()
    a.feed(send_head("bp000002", path_to(a, b), a.uri, byte_range="1-*/*"), b"x" * 10)
    c.feed(send_head("bp000003", path_to(c, b), c.uri, byte_range="1-*/*"), b"y" * 10)
    assert a.transport.producerState == "paused"
    assert c.transport.producerState == "paused"
    # A's message is complete, but waits for B in A's stream: A waits with it.
    a.feed(body_end("bp000002"))
    assert a.transport.producerState == "paused"
    assert c.transport.producerState == "paused"
    b.connection.resumeProducing()
    assert a.transport.producerState == "producing"
    assert c.transport.producerState == "producing"
    c.feed(body_end("bp000003"))
    assert [f.body for f in b.take()] == [b"x" * 10, b"y" * 10]


def test_recipient_lost_while_congested_resumes_sender(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_head("bp000004", path_to(a, b), a.uri, byte_range="1-*/*"), b"x" * 10)
    b.connection.pauseProducing()
    assert a.transport.producerState == "paused"
    b.hang_up()
    assert a.transport.producerState == "producing"


# -- probation and failure limits ------------------------------------------------------------------


def test_probation_closes_connection_without_success(h: Harness) -> None:
    a = h.connect("alice")
    h.clock.advance(h.config.probation_seconds - 1)
    assert not a.closed
    h.clock.advance(1)
    assert a.closed
    assert a.transport.value() == b""
    h.clock.advance(0)
    assert a.connection not in h.relay.connections


def test_challenge_alone_does_not_end_probation(h: Harness) -> None:
    a = h.connect("alice")
    challenge(a)
    h.clock.advance(h.config.probation_seconds)
    assert a.closed


def test_successful_auth_ends_probation(h: Harness) -> None:
    a = h.client("alice")
    h.clock.advance(h.config.probation_seconds * 3)
    assert not a.closed


def test_failed_requests_on_probation_close_early(h: Harness) -> None:
    a = h.connect("alice")
    bogus = "msrps://relay.example.com:2855/nosuchsession;tcp msrps://x.example.com:1/s;tcp"
    for count in range(1, h.config.probation_max_failures + 1):
        tid = f"fail{count:04d}"
        a.feed(send_head(tid, bogus, a.uri, total=1) + b"x" + body_end(tid))
        (frame,) = a.take()
        assert as_response(frame).code == 481
        assert a.closed == (count == h.config.probation_max_failures)


def test_failures_after_success_do_not_close(h: Harness) -> None:
    a = h.client("alice")
    bogus = "msrps://relay.example.com:2855/nosuchsession;tcp msrps://x.example.com:1/s;tcp"
    for count in range(h.config.probation_max_failures * 2):
        tid = f"fail{count:04d}"
        a.feed(send_head(tid, bogus, a.uri, total=1) + b"x" + body_end(tid))
    assert [as_response(f).code for f in a.take()] == [481] * 6
    assert not a.closed


def _wrong_password_auths(client: Client, count: int, nonce: str) -> None:
    for attempt in range(count):
        client.feed(
            auth_bytes(client, f"bad{attempt:05d}", credentials(client.name, "wrong", nonce))
        )


def test_failed_auth_limit_closes_client_connection() -> None:
    h = Harness({("msrp", "probation_max_failures"): "100"})
    a = h.connect("alice")
    nonce = challenge(a)
    limit = h.config.max_failed_auth
    for attempt in range(1, limit + 1):
        _wrong_password_auths(a, 1, nonce)
        (frame,) = a.take()
        assert as_response(frame).code == 401
        assert a.closed == (attempt == limit)


PEER_FROM_PATH = "msrps://peer.example.net:2855/p1;tcp msrps://alice.example.com:7000/a1;tcp"


def connect_peer(h: Harness) -> Client:
    """A peer relay forwarding its client's AUTH (From-Path: the peer, then the client)."""
    peer = h.connect("peer", PeerRelayConnection)
    peer.connection.peer_names = frozenset({"peer.example.net"})
    peer.uri = PEER_FROM_PATH
    return peer


def test_failed_auth_limit_never_closes_peer_relay() -> None:
    h = Harness({("msrp", "probation_max_failures"): "100"})
    peer = connect_peer(h)
    nonce = challenge(peer)
    for attempt in range(h.config.max_failed_auth * 3):
        peer.feed(auth_bytes(peer, f"pbad{attempt:04d}", credentials("alice", "wrong", nonce)))
    assert [as_response(f).code for f in peer.take()] == [401] * 9
    assert not peer.closed


def test_failed_auths_never_close_peer_relay_with_default_limits(h: Harness) -> None:
    peer = connect_peer(h)
    nonce = challenge(peer)
    for attempt in range(5):
        peer.feed(auth_bytes(peer, f"pbad{attempt:04d}", credentials("alice", "wrong", nonce)))
    assert not peer.closed


def test_peer_relay_auth_creates_relay_session(h: Harness) -> None:
    peer = connect_peer(h)
    nonce = challenge(peer)
    peer.feed(auth_bytes(peer, "pgood001", credentials("alice", PASSWORDS["alice"], nonce)))
    (frame,) = peer.take()
    assert as_response(frame).code == 200
    assert header(frame, "To-Path") == PEER_FROM_PATH
    assert not peer.closed


def test_pipelined_failed_auths_stop_at_the_limit() -> None:
    h = Harness({("msrp", "probation_max_failures"): "100"})
    a = h.connect("alice")
    nonce = challenge(a)
    data = b"".join(
        auth_bytes(a, f"pipe{n:04d}", credentials("alice", f"guess{n}", nonce)) for n in range(50)
    )
    a.feed(data)
    assert a.closed
    assert len(a.take()) == h.config.max_failed_auth


def test_expires_out_of_range_is_not_a_failed_auth(h: Harness) -> None:
    """A 423 comes with the right credentials: asking again is no attack."""
    a = h.connect("alice")
    nonce = challenge(a)
    attempts = max(h.config.max_failed_auth, h.config.probation_max_failures) + 2
    for nc in range(1, attempts + 1):
        tid = f"exp{nc:05d}"
        a.feed(auth_bytes(a, tid, credentials("alice", PASSWORDS["alice"], nonce, nc), "1"))
        (frame,) = a.take()
        assert (as_response(frame).tid, as_response(frame).code) == (tid, 423)
        assert header(frame, "Min-Expires") == str(h.config.session_expires_min_seconds)
    assert not a.closed
    a.feed(auth_bytes(a, "exp99999", credentials("alice", PASSWORDS["alice"], nonce, attempts + 1)))
    (frame,) = a.take()
    assert as_response(frame).code == 200


def test_refused_auths_never_close_a_peer_relay(h: Harness) -> None:
    """A user's malformed Expires is refused with 400; the relay carrying it stays."""
    peer = connect_peer(h)
    nonce = challenge(peer)
    attempts = max(h.config.max_failed_auth, h.config.probation_max_failures) * 2
    for nc in range(1, attempts + 1):
        credential = credentials("alice", PASSWORDS["alice"], nonce, nc)
        peer.feed(auth_bytes(peer, f"pexp{nc:04d}", credential, "soon"))
    assert [as_response(f).code for f in peer.take()] == [400] * attempts
    assert not peer.closed


def test_refused_requests_never_close_a_peer_relay(h: Harness) -> None:
    peer = connect_peer(h)
    bogus = "msrps://relay.example.com:2855/nosuchsession;tcp msrps://x.example.com:1/s;tcp"
    count = h.config.probation_max_failures * 2
    for n in range(count):
        tid = f"pgone{n:03d}"
        peer.feed(send_head(tid, bogus, PEER_FROM_PATH, total=1) + b"x" + body_end(tid))
    assert [as_response(f).code for f in peer.take()] == [481] * count
    assert not peer.closed


def test_refused_auths_still_count_on_a_client_on_probation(h: Harness) -> None:
    a = h.connect("alice")
    nonce = challenge(a)
    for nc in range(1, h.config.probation_max_failures + 1):
        credential = credentials("alice", PASSWORDS["alice"], nonce, nc)
        a.feed(auth_bytes(a, f"cexp{nc:04d}", credential, "soon"))
        assert a.closed == (nc == h.config.probation_max_failures)
    assert [as_response(f).code for f in a.take()] == [400] * h.config.probation_max_failures


def test_peer_relay_certificate_ends_probation(h: Harness, tmp_path: Any) -> None:
    cert_path, _ = make_pki(tmp_path).leaf("peer.example.net")
    with open(cert_path, "rb") as handle:
        certificate = x509.load_pem_x509_certificate(handle.read())
    peer = h.connect("peer")
    peer.transport.peer_certificate = certificate
    peer.connection.handshakeCompleted()
    assert "peer.example.net" in peer.connection.peer_names
    h.clock.advance(h.config.probation_seconds * 3)
    assert not peer.closed
    # A client without a certificate is still on probation.
    client = h.connect("alice")
    client.connection.handshakeCompleted()
    h.clock.advance(h.config.probation_seconds)
    assert client.closed


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ("", 8192),
        ("peer.example.net=65536", 65536),
        ("peer.example.net:2855=65536 other.example.net=32768", 8192),
        ("peer.example.net=4194304", 1048576),  # never above max_chunk_bytes
    ],
)
def test_chunk_limit_towards_a_peer_relay(tmp_path: Any, overrides: str, expected: int) -> None:
    """Kamailio drops the connection above ~10 KiB of body; relayd peers take anything."""
    h = Harness({("msrp", "peer_chunk_overrides"): overrides})
    cert_path, _ = make_pki(tmp_path).leaf("peer.example.net")
    with open(cert_path, "rb") as handle:
        certificate = x509.load_pem_x509_certificate(handle.read())
    peer = h.connect("peer")
    assert peer.connection.chunk_bytes == h.config.max_chunk_bytes  # a client, so far
    peer.transport.peer_certificate = certificate
    peer.connection.handshakeCompleted()
    assert peer.connection.chunk_bytes == expected
    # A relayd peer says so on the AUTHs it forwards, and is answered in kind.
    peer.feed(
        f"MSRP pauth001 AUTH\r\nTo-Path: {RELAY_URI}\r\n"
        "From-Path: msrps://peer.example.net:2855/p;tcp msrps://a.example.net:9/a;tcp\r\n"
        "Relay-Chunk-Limit: none\r\n-------pauth001$\r\n".encode()
    )
    (challenge,) = peer.take()
    assert as_response(challenge).code == 401
    assert header(challenge, "Relay-Chunk-Limit") == "none"
    assert peer.connection.chunk_bytes == h.config.max_chunk_bytes


def test_forwarded_auth_tells_the_next_hop_we_are_relayd(h: Harness) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    peer = h.connect("far")
    peer.connection.chunk_bytes = 8192
    a.feed(
        f"MSRP fwdc0001 AUTH\r\nTo-Path: {a.use_path} {FAR_HOP}\r\nFrom-Path: {a.uri}\r\n"
        "Relay-Chunk-Limit: none\r\n-------fwdc0001$\r\n".encode()
    )
    waiting[-1].callback(peer.connection)
    (forwarded,) = peer.take()
    assert forwarded.message.headers.to_bytes().count(b"Relay-Chunk-Limit: none\r\n") == 1
    ours = (header(forwarded, "From-Path") or "").split()[0]
    reply = response_bytes(
        as_request(forwarded).tid, 401, "Unauthorized", f"{ours} {a.uri}", FAR_HOP
    )
    peer.feed(reply.replace(b"\r\n---", b"\r\nRelay-Chunk-Limit: none\r\n---"))
    (answer,) = a.take()
    assert as_response(answer).code == 401
    assert header(answer, "Relay-Chunk-Limit") is None  # hop by hop: not for the client
    assert peer.connection.chunk_bytes == h.config.max_chunk_bytes


def test_send_towards_a_peer_relay_is_cut_at_its_chunk_limit(h: Harness) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    peer = h.connect("far")
    peer.connection.chunk_bytes = h.relay.peer_chunk_bytes(frozenset({"far.example.net"}), 9)
    data = bytes(range(256)) * 80
    tid = "peer0001"
    a.feed(send_head(tid, f"{a.use_path} {FAR_HOP}", a.uri, total=len(data)) + data[:5000])
    waiting[-1].callback(peer.connection)
    a.feed(data[5000:] + body_end(tid))
    frames = peer.take()
    assert [len(f.body) for f in frames] == [8192, 8192, 4096]
    assert [header(f, "Byte-Range") for f in frames] == [
        "1-*/20480",
        "8193-*/20480",
        "16385-20480/20480",
    ]
    assert b"".join(f.body for f in frames) == data


# -- not for us, malformed input ----------------------------------------------------------------


def test_send_not_addressed_to_us_closes_without_answer(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    tid = "foreign1"
    to_path = f"msrps://elsewhere.example.org:2855/x;tcp {b.uri}"
    a.feed(send_head(tid, to_path, a.uri, total=3) + b"abc" + body_end(tid))
    assert a.closed
    assert a.transport.value() == b""
    assert b.transport.value() == b""


def test_send_to_our_host_on_another_port_closes(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    to_path = f"{a.use_path.replace(':2855/', ':2856/')} {b.use_path} {b.uri}"
    a.feed(send_head("foreign2", to_path, a.uri, total=3) + b"abc" + body_end("foreign2"))
    assert a.closed
    assert a.transport.value() == b""


def test_auth_not_addressed_to_us_closes_without_answer(h: Harness) -> None:
    a = h.connect("alice")
    a.feed(
        b"MSRP foreign3 AUTH\r\nTo-Path: msrps://elsewhere.example.org;tcp\r\n"
        + f"From-Path: {a.uri}\r\n-------foreign3$\r\n".encode()
    )
    assert a.closed
    assert a.transport.value() == b""


def test_malformed_header_gets_400_and_connection_stays_usable(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    bad = (
        f"MSRP bad00001 SEND\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Message-ID: m1\r\nthis line has no colon\r\nContent-Type: text/plain\r\n\r\n"
        "body\r\n-------bad00001$\r\n"
    ).encode()
    a.feed(bad)
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("bad00001", 400)
    assert header(frame, "To-Path") == a.uri
    assert header(frame, "From-Path") == a.use_path
    assert b.transport.value() == b""
    assert not a.closed
    a.feed(send_bytes(a, b, "good0001", b"after the bad one"))
    (forwarded,) = b.take()
    assert forwarded.body == b"after the bad one"
    assert [as_response(f).code for f in a.take()] == [200]


@pytest.mark.parametrize("huge", ["X-Big: " + "v" * 70000, "X-H: v\r\n" * 5000])
def test_oversized_header_block_gets_400_then_close(h: Harness, huge: str) -> None:
    """Skipping it to an end-line that may never come would read without bound."""
    a, b = h.client("alice"), h.client("bob")
    a.feed(f"MSRP huge0001 SEND\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n".encode())
    for offset in range(0, len(huge), 16384):
        a.feed(huge[offset : offset + 16384].encode())
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("huge0001", 400)
    assert header(frame, "To-Path") == a.uri
    assert a.closed
    assert b.transport.value() == b""


def test_oversized_first_header_line_closes_without_answer(h: Harness) -> None:
    a = h.client("alice")
    a.feed(b"MSRP huge0002 SEND\r\nTo-Path: " + b"x" * 70000)
    assert a.take() == []
    assert a.closed


def test_malformed_message_with_lower_case_paths_gets_400(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP low00001 SEND\r\nto-path: {path_to(a, b)}\r\nfrom-path: {a.uri}\r\n"
        "Message-ID: m1\r\nno colon here\r\n\r\nbody\r\n-------low00001$\r\n".encode()
    )
    (frame,) = a.take()
    assert (as_response(frame).tid, as_response(frame).code) == ("low00001", 400)
    assert header(frame, "To-Path") == a.uri
    assert header(frame, "From-Path") == a.use_path
    assert b.transport.value() == b""


@pytest.mark.parametrize("method", ["SEND", "NICKNAME"])
def test_400_never_echoes_a_bare_line_feed(h: Harness, method: str) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP lf000001 {method}\r\nTo-Path: {path_to(a, b)}\r\n"
        f"From-Path: {a.uri}\nX-Injected: 1\r\nMessage-ID: m1\r\n"
        "Byte-Range: 1-1/1\r\nContent-Type: text/plain\r\n\r\nx\r\n-------lf000001$\r\n".encode()
    )
    written = a.transport.value()
    assert b"\nX-Injected" not in written
    parse_frames(written)


def test_missing_message_id_is_400(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP nomid001 SEND\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Byte-Range: 1-1/1\r\nContent-Type: text/plain\r\n\r\nx\r\n-------nomid001$\r\n".encode()
    )
    (frame,) = a.take()
    assert as_response(frame).code == 400
    assert b.transport.value() == b""


def test_bad_byte_range_is_400(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "badbr001", b"abc", byte_range="5-2/9"))
    (frame,) = a.take()
    assert as_response(frame).code == 400
    assert b.transport.value() == b""


@pytest.mark.parametrize(
    "garbage",
    [b"HELLO WORLD\r\n", b"MSRP x SEND\r\n", b"MSRP abcd send\r\n", b"\r\n" * 40],
)
def test_garbage_start_line_aborts_connection(h: Harness, garbage: bytes) -> None:
    a = h.client("alice")
    a.feed(garbage)
    assert a.transport.disconnected
    assert a.transport.value() == b""
    h.clock.advance(0)
    assert a.connection not in h.relay.connections


def test_closed_connections_sessions_are_invalidated(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    old_use_path = a.use_path
    a.hang_up()
    b.feed(send_bytes(b, a, "dead0001", b"anyone there?"))
    (frame,) = b.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("dead0001", 481)
    assert header(frame, "To-Path") == b.uri
    assert header(frame, "From-Path") == b.use_path
    # The same URI is no good from a new connection of the same user either.
    a2 = h.client("alice")
    a2.feed(
        send_head("dead0002", f"{old_use_path} {b.use_path} {b.uri}", a2.uri, total=1)
        + b"x"
        + body_end("dead0002")
    )
    assert as_response(a2.take()[0]).code == 481
    assert b.transport.value() == b""


def test_expired_sessions_are_refused(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    h.clock.advance(h.config.session_expires_seconds)
    a.feed(send_bytes(a, b, "expd0001", b"too late"))
    (frame,) = a.take()
    assert as_response(frame).code == 481
    assert b.transport.value() == b""


def test_a_remembered_route_ends_when_its_session_expires(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "live0001", b"in time"))
    (frame,) = b.take()
    answer(b, frame)
    assert [as_response(f).code for f in a.take()] == [200]
    # Nothing has left the session table: only the clock ends the route.
    h.clock.advance(h.config.session_expires_seconds)
    a.feed(send_bytes(a, b, "live0002", b"too late"))
    assert [as_response(f).code for f in a.take()] == [481]
    assert b.transport.value() == b""


def test_a_remembered_route_ends_when_its_target_session_goes(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    a.feed(send_bytes(a, b, "gone0001", b"first"))
    (frame,) = b.take()
    answer(b, frame)
    c.hang_up()  # another session leaves: the route is checked again, and holds
    a.feed(send_bytes(a, b, "gone0002", b"second"))
    (frame,) = b.take()
    assert frame.body == b"second"
    answer(b, frame)
    assert [as_response(f).code for f in a.take()] == [200, 200]
    b.hang_up()
    a.feed(send_bytes(a, b, "gone0003", b"third"))
    assert [as_response(f).code for f in a.take()] == [481]


def test_oversized_non_send_request_is_413() -> None:
    h = Harness({("msrp", "max_request_body_bytes"): "10"})
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP big00003 NICKNAME\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Content-Type: text/plain\r\n\r\n".encode(),
        b"x" * 11,
        b"\r\n-------big00003$\r\n",
    )
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("big00003", 413)
    assert header(frame, "To-Path") == a.uri
    assert b.transport.value() == b""


def test_sending_through_someone_elses_session_is_403(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    # C uses A's session as its first hop: only A may do that.
    c.feed(
        send_head("steal001", f"{a.use_path} {b.use_path} {b.uri}", c.uri, total=1)
        + b"x"
        + body_end("steal001")
    )
    (frame,) = c.take()
    assert as_response(frame).code == 403
    assert b.transport.value() == b""


@pytest.mark.parametrize(
    ("tls", "next_hop"),
    [
        # The audit's case: a made-up port on the owning relay's host, plain TCP.
        (True, "msrp://peer.example.net:25;tcp"),
        (True, "msrps://peer.example.net:25/p1;tcp"),
        # On the plain listener not even the owning relay itself is reachable.
        (False, "msrps://peer.example.net:2855/p1;tcp"),
        (False, "msrp://peer.example.net:25;tcp"),
    ],
)
def test_stranger_cannot_reach_beyond_a_relay_session(h: Harness, tls: bool, next_hop: str) -> None:
    owner = MSRPURI.parse("msrps://peer.example.net:2855/p1;tcp")
    session = h.core.sessions.create_for_relay(owner, "alice", 600)
    stranger = h.connect("stranger", tls=tls)
    to_path = f"{h.core.session_uri(session)} {next_hop}"
    stranger.feed(
        send_head("open0001", to_path, stranger.uri, total=3) + b"abc" + body_end("open0001")
    )
    stranger.feed(
        f"MSRP open0002 NICKNAME\r\nTo-Path: {to_path}\r\nFrom-Path: {stranger.uri}\r\n"
        "-------open0002$\r\n".encode()
    )
    codes = [(as_response(f).tid, as_response(f).code) for f in stranger.take()]
    assert codes == [("open0001", 403), ("open0002", 403)]
    # Refused before any next hop was looked for: nothing connects anywhere.
    assert h.clock.tcpClients == []
    assert h.clock.sslClients == []
    assert not h.relay._connecting
    assert not h.relay._outbound


# -- REPORT and other methods ---------------------------------------------------------------------


def test_report_to_unknown_session_is_not_answered(h: Harness) -> None:
    a = h.client("alice")
    bogus = "msrps://relay.example.com:2855/nosuchsession;tcp msrps://x.example.com:1/s;tcp"
    a.feed(
        f"MSRP rep00001 REPORT\r\nTo-Path: {bogus}\r\nFrom-Path: {a.uri}\r\n"
        "Message-ID: m1\r\nByte-Range: 1-1/1\r\nStatus: 000 200 OK\r\n-------rep00001$\r\n".encode()
    )
    assert a.transport.value() == b""
    assert not a.closed


def test_malformed_report_is_not_answered(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP rep00002 REPORT\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "no colon here\r\n-------rep00002$\r\n".encode()
    )
    assert a.transport.value() == b""
    assert b.transport.value() == b""


def test_report_is_forwarded_and_never_answered(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP rep00003 REPORT\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Message-ID: m1\r\nByte-Range: 1-5/5\r\nStatus: 000 200 OK\r\n-------rep00003$\r\n".encode()
    )
    (frame,) = b.take()
    report = as_request(frame)
    assert report.method == "REPORT"
    assert report.tid != "rep00003"
    assert header(frame, "To-Path") == b.uri
    assert header(frame, "From-Path") == f"{b.use_path} {a.use_path} {a.uri}"
    assert header(frame, "Status") == "000 200 OK"
    assert not b.connection.transactions
    h.clock.advance(h.config.transaction_timeout_seconds * 2)
    assert a.transport.value() == b""


def _forwarded_head(h: Harness, request: bytes) -> bytes:
    """What the relay writes to B for ``request`` from A, tid blanked, and A's answer codes."""
    a, b = h.client("alice"), h.client("bob")
    a.feed(request.replace(b"{PATH}", path_to(a, b).encode()).replace(b"{FROM}", a.uri.encode()))
    data: bytes = b.transport.value()
    (frame,) = parse_frames(data)
    tid = as_request(frame).tid.encode()
    return (
        data.replace(tid, b"TID")
        .replace(b.use_path.encode(), b"B")
        .replace(a.use_path.encode(), b"A")
    )


_CANONICAL_SEND = (
    b"MSRP fwd00001 SEND\r\nTo-Path: {PATH}\r\nFrom-Path: {FROM}\r\nMessage-ID: m1\r\n"
    b"Success-Report: yes\r\nByte-Range: 1-5/5\r\nX-Colon: a: b\r\nContent-Type: text/plain\r\n"
    b"\r\nhello\r\n-------fwd00001$\r\n"
)
_CANONICAL_REPORT = (
    b"MSRP fwd00002 REPORT\r\nTo-Path: {PATH}\r\nFrom-Path: {FROM}\r\nMessage-ID: m1\r\n"
    b"Byte-Range: 1-5/5\r\nStatus: 000 200 OK\r\n-------fwd00002$\r\n"
)


@pytest.mark.parametrize(
    ("canonical", "variant"),
    [
        (_CANONICAL_SEND, _CANONICAL_SEND.replace(b"Message-ID: m1", b"Message-ID:m1")),
        (
            _CANONICAL_SEND,
            _CANONICAL_SEND.replace(b"Success-Report: yes", b"Success-Report:\tyes "),
        ),
        (_CANONICAL_SEND, _CANONICAL_SEND.replace(b"To-Path: ", b"to-path:  ")),
        (_CANONICAL_REPORT, _CANONICAL_REPORT.replace(b"Status: 000", b"Status:  000")),
        (_CANONICAL_REPORT, _CANONICAL_REPORT.replace(b"From-Path: ", b"From-Path:")),
    ],
)
def test_forwarded_bytes_do_not_depend_on_how_the_headers_were_spaced(
    canonical: bytes, variant: bytes
) -> None:
    # The canonical request is forwarded from its own bytes, the variant from
    # parsed pairs: the relay must write the same frame either way.
    assert _forwarded_head(Harness(), canonical) == _forwarded_head(Harness(), variant)


def test_forwarded_send_keeps_header_order_around_the_new_byte_range(h: Harness) -> None:
    head = _forwarded_head(h, _CANONICAL_SEND)
    assert head == (
        b"MSRP TID SEND\r\nTo-Path: msrps://bob.example.com:7000/bobs1;tcp\r\n"
        b"From-Path: B A msrps://alice.example.com:7000/alices1;tcp\r\nMessage-ID: m1\r\n"
        b"Success-Report: yes\r\nByte-Range: 1-5/5\r\nX-Colon: a: b\r\n"
        b"Content-Type: text/plain\r\n\r\nhello\r\n-------TID$\r\n"
    )


def _nickname(sender: Client, recipient: Client, tid: str) -> bytes:
    return (
        f"MSRP {tid} NICKNAME\r\nTo-Path: {path_to(sender, recipient)}\r\n"
        f'From-Path: {sender.uri}\r\nUse-Nickname: "Al"\r\n-------{tid}$\r\n'
    ).encode()


def test_unknown_method_is_forwarded_and_response_routed_back(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(_nickname(a, b, "nick0001"))
    (frame,) = b.take()
    request = as_request(frame)
    assert request.method == "NICKNAME"
    assert request.tid != "nick0001"
    assert list(request.headers) == [
        ("To-Path", b.uri),
        ("From-Path", f"{b.use_path} {a.use_path} {a.uri}"),
        ("Use-Nickname", '"Al"'),
    ]
    assert a.transport.value() == b""
    # Non-SEND responses travel end to end, along the whole From-Path.
    b.feed(
        response_bytes(
            request.tid, 425, "Nickname usage failed", header(frame, "From-Path") or "", b.uri
        )
    )
    (back,) = a.take()
    response = as_response(back)
    assert (response.tid, response.code, response.comment) == (
        "nick0001",
        425,
        "Nickname usage failed",
    )
    h.clock.advance(h.config.transaction_timeout_seconds * 2)
    assert a.transport.value() == b""


def test_unknown_method_response_reaches_sender_with_its_own_uri(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(_nickname(a, b, "nick0002"))
    (frame,) = b.take()
    b.feed(
        response_bytes(as_request(frame).tid, 200, "OK", header(frame, "From-Path") or "", b.uri)
    )
    (back,) = a.take()
    assert header(back, "To-Path") == a.uri
    assert header(back, "From-Path") == f"{a.use_path} {b.use_path} {b.uri}"


def test_unknown_method_without_response_times_out_408(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(_nickname(a, b, "nick0003"))
    b.take()
    h.clock.advance(h.config.transaction_timeout_seconds)
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("nick0003", 408)
    assert header(frame, "To-Path") == a.uri


def test_blocked_unknown_method_is_501() -> None:
    h = Harness({("msrp", "block_unknown_methods"): "yes"})
    a, b = h.client("alice"), h.client("bob")
    a.feed(_nickname(a, b, "nick0004"))
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("nick0004", 501)
    assert header(frame, "To-Path") == a.uri
    assert b.transport.value() == b""


# -- idle sweep and connection limit -------------------------------------------------------------


def test_idle_connections_are_swept(h: Harness) -> None:
    h.relay.start()
    a, b = h.client("alice"), h.client("bob")
    h.clock.advance(h.config.idle_timeout_seconds / 2)
    b.feed(send_bytes(b, a, "keep0001", b"still here"))
    h.clock.advance(h.config.idle_timeout_seconds / 2 + 31)
    assert a.closed
    assert not b.closed
    h.clock.advance(h.config.idle_timeout_seconds)
    assert b.closed
    h.relay.stop()


def test_keepalive_on_one_connection_does_not_spare_idle_ones(h: Harness) -> None:
    h.relay.start()
    a = h.client("alice")
    b = h.client("bob")
    h.clock.advance(h.config.idle_timeout_seconds - 100)
    a.feed(b"\r\n")  # a keep-alive between messages
    h.clock.advance(131)
    assert not a.closed
    assert b.closed
    h.relay.stop()


def test_a_connection_that_only_receives_is_not_idle() -> None:
    # §6.5: forwarded data going out is use too, not only data coming in.
    h = Harness({("msrp", "idle_timeout_seconds"): "600"})
    h.relay.start()
    a, b = h.client("alice"), h.client("bob")
    h.clock.advance(400)
    b.feed(send_bytes(b, a, "only0001", b"for alice"))
    (frame,) = a.take()
    assert frame.body == b"for alice"
    assert a.connection.last_activity == 400
    h.clock.advance(400)  # alice has not sent anything for 800 s
    assert not a.closed
    h.clock.advance(600)
    assert a.closed and b.closed
    h.relay.stop()


def test_a_write_outside_any_read_is_use_too() -> None:
    # The 408 REPORT of a transaction timeout is written from a timer, not from a read.
    h = Harness({("msrp", "idle_timeout_seconds"): "600"})
    h.relay.start()
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "tout0001", b"never answered", failure_report="yes"))
    b.take()
    assert [as_response(f).code for f in a.take()] == [200]
    h.clock.advance(h.config.transaction_timeout_seconds)
    (report,) = a.take()
    assert as_request(report).method == "REPORT"
    assert a.connection.last_activity == h.config.transaction_timeout_seconds
    h.relay.stop()


def test_a_connection_that_only_receives_is_not_evicted_first() -> None:
    h = Harness({("msrp", "max_connections"): "2"})
    a = h.client("alice")
    b = h.client("bob")
    h.clock.advance(1)
    b.feed(send_bytes(b, a, "only0002", b"for alice"))  # alice only receives
    c = h.connect("carol")
    assert b.closed
    assert not a.closed
    assert not c.closed


def test_connection_limit_closes_least_recently_used() -> None:
    h = Harness({("msrp", "max_connections"): "2"})
    a = h.client("alice")
    b = h.client("bob")
    h.clock.advance(1)
    # A is used again, so B is now the least recently used.
    challenge(a)
    c = h.connect("carol")
    assert b.closed
    assert not a.closed
    assert not c.closed
    assert len(h.relay.connections) == 2


def test_relay_stop_closes_everything(h: Harness) -> None:
    h.relay.start()
    a, b = h.client("alice"), h.client("bob")
    h.relay.stop()
    assert a.closed and b.closed
    h.clock.advance(0)
    assert not h.relay.connections
    assert len(h.core.sessions) == 0


def test_nothing_is_answered_after_a_foreign_request_in_the_same_read(h: Harness) -> None:
    a = h.client("alice")
    foreign = "msrps://elsewhere.example.org:2855/x;tcp msrps://bob.example.com:7000/b;tcp"
    a.feed(
        send_head("foreign4", foreign, a.uri, total=3)
        + b"abc"
        + body_end("foreign4")
        + auth_bytes(a, "after001")
    )
    assert a.closed
    assert a.transport.value() == b""


# -- fuzzing ---------------------------------------------------------------------------------------


def assert_relay_still_works(h: Harness) -> None:
    """A well-formed A -> B SEND on fresh connections of the same relay goes through."""
    a, b = h.client("alice"), h.client("bob")
    body = b"still working\r\n-------not-an-end-line$\r\n"
    a.feed(send_bytes(a, b, "check001", body, message_id="m-check"))
    (frame,) = b.take()
    assert frame.body == body
    assert header(frame, "Message-ID") == "m-check"
    assert [as_response(f).code for f in a.take()] == [200]


def feed_in_reads(client: Client, data: bytes, read_size: int) -> None:
    for start in range(0, len(data), read_size):
        if client.transport.lost:
            break
        client.feed(data[start : start + read_size])


def settle(h: Harness, *clients: Client) -> None:
    """Deliver pending closes, end every connection, fire every timer."""
    h.clock.advance(0)
    for client in clients:
        client.hang_up()
    h.clock.advance(h.config.transaction_timeout_seconds + 1)


_FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_FUZZ
@given(st.binary(max_size=2000), st.integers(1, 64))
@example(b"MSRP abcd SEND\r\nTo-Path: msrps://relay.example.com:2855;tcp\r\n", 7)
@example(b"MSRP abcd 200 OK\r\nTo-Path: x\r\nFrom-Path: y\r\n-------abcd$\r\n", 3)
def test_fuzz_arbitrary_bytes_never_break_the_relay(data: bytes, read_size: int) -> None:
    with logged_failures_forbidden():
        h = Harness()
        x = h.client("dave")
        feed_in_reads(x, data, read_size)
        parse_frames(x.transport.value())
        settle(h, x)
        assert_relay_still_works(h)


def _mutate(base: bytes, operations: list[tuple[int, int, int]]) -> bytes:
    data = bytearray(base)
    for kind, position, value in operations:
        if not data:
            break
        at = position % len(data)
        if kind == 0:  # flip one byte
            data[at] ^= value or 1
        elif kind == 1:  # truncate
            del data[at:]
        elif kind == 2:  # duplicate the line containing ``at``
            start = data.rfind(b"\r\n", 0, at) + 2 if data.rfind(b"\r\n", 0, at) >= 0 else 0
            end = data.find(b"\r\n", at)
            if end >= 0:
                data[end + 2 : end + 2] = data[start : end + 2]
        elif kind == 3:  # delete a few bytes
            del data[at : at + value % 16 + 1]
        else:  # insert a byte that matters to MSRP framing
            data[at:at] = b"\r\n-: $+#%"[value % 10 : value % 10 + 1]
    return bytes(data)


_operations = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 10_000), st.integers(0, 255)), max_size=6
)


@_FUZZ
@given(
    operations=_operations,
    read_size=st.integers(1, 64),
    kind=st.sampled_from(["send", "send-partial", "nickname", "report", "auth"]),
    body=st.binary(max_size=300),
    then_valid=st.booleans(),
)
def test_fuzz_mutated_requests_never_break_the_relay(
    operations: list[tuple[int, int, int]],
    read_size: int,
    kind: str,
    body: bytes,
    then_valid: bool,
) -> None:
    with logged_failures_forbidden():
        h = Harness({("msrp", "max_chunk_bytes"): "1024"})
        x, b = h.client("dave"), h.client("bob")
        if kind.startswith("send"):
            mode = "partial" if kind == "send-partial" else None
            base = send_bytes(x, b, "fuzz0001", body, failure_report=mode)
        elif kind == "nickname":
            base = _nickname(x, b, "fuzz0001")
        elif kind == "report":
            base = (
                f"MSRP fuzz0001 REPORT\r\nTo-Path: {path_to(x, b)}\r\nFrom-Path: {x.uri}\r\n"
                "Message-ID: m1\r\nByte-Range: 1-5/5\r\nStatus: 000 200 OK\r\n"
                "-------fuzz0001$\r\n"
            ).encode()
        else:
            base = auth_bytes(x, "fuzz0001", credentials("dave", PASSWORDS["dave"], "bogus"))
        data = _mutate(base, operations)
        if then_valid:
            data += send_bytes(x, b, "fuzz0002", b"valid follow-up")
        feed_in_reads(x, data, read_size)
        # B answers whatever reached it, correctly or not.
        for frame in parse_frames(b.transport.value(), complete=False):
            if isinstance(frame.message, MSRPRequest) and frame.message.method == "SEND":
                answer(b, frame, 200)
        parse_frames(x.transport.value())
        settle(h, x)
        parse_frames(b.transport.value())
        settle(h, b)
        assert_relay_still_works(h)


@_FUZZ
@given(operations=_operations, read_size=st.integers(1, 64), code=st.integers(100, 999))
def test_fuzz_mutated_responses_never_break_the_relay(
    operations: list[tuple[int, int, int]], read_size: int, code: int
) -> None:
    with logged_failures_forbidden():
        h = Harness()
        a, y = h.client("alice"), h.client("dave")
        a.feed(send_bytes(a, y, "resp0001", b"hello"), _nickname(a, y, "resp0002"))
        a.clear()
        frames = y.take()
        responses = b""
        for frame in frames:
            request = as_request(frame)
            from_path = header(frame, "From-Path") or ""
            to_path = from_path if request.method != "SEND" else from_path.split()[0]
            responses += response_bytes(request.tid, code, "Whatever", to_path, y.uri)
        feed_in_reads(y, _mutate(responses, operations), read_size)
        parse_frames(a.transport.value())
        parse_frames(y.transport.value())
        settle(h, a, y)
        assert_relay_still_works(h)
