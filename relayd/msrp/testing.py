"""An in-process MSRP relay on StringTransports and a MemoryReactorClock, for tests.

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

from cryptography import x509
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionRefusedError,
)
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from relayd.config import MSRPConfig, load_config
from relayd.digest import Challenge, DigestAuthenticator, answer_challenge, ha1, parse_challenge
from relayd.msrp.connection import MSRPConnection
from relayd.msrp.message import MSRPRequest, MSRPResponse
from relayd.msrp.parser import BodyChunk, MessageEnd, MessageStart, MSRPParser
from relayd.msrp.relay import AuthPolicy, RelayCore
from relayd.msrp.service import relay_limits
from relayd.msrp.transport import MSRPRelay
from relayd.msrp.uri import MSRPURI
from relayd.testing import captured_log

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
        self.relay = MSRPRelay(self.clock, self.core, relay_limits(self.config))
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


@contextmanager
def logged_failures_forbidden() -> Iterator[EventLoggingObserver]:
    """Nothing may escape into log.failure: bad input is never an internal error."""
    with captured_log() as observer:
        yield observer
    failures = [event for event in observer if "log_failure" in event]
    assert not failures, failures


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


def nickname(sender: Client, recipient: Client, tid: str) -> bytes:
    return (
        f"MSRP {tid} NICKNAME\r\nTo-Path: {path_to(sender, recipient)}\r\n"
        f'From-Path: {sender.uri}\r\nUse-Nickname: "Al"\r\n-------{tid}$\r\n'
    ).encode()
