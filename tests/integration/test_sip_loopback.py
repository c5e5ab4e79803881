"""SIP over real UDP and TCP sockets on 127.0.0.1: registrar with digest, OPTIONS,
malformed input, retransmission absorption; plus a SIPp scenario when sipp is installed."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import DeferredQueue
from twisted.internet.protocol import DatagramProtocol, Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from relayd.digest import DigestAuthenticator, answer_challenge, ha1
from relayd.net.endpoints import datagram_server, parse_endpoint
from relayd.sip.auth import SIPAuthenticator
from relayd.sip.message import SIPResponse
from relayd.sip.parser import StreamFramer, parse_datagram
from relayd.sip.registrar import Registrar
from relayd.sip.resolve import Target
from relayd.sip.transaction import TransactionLayer, new_branch
from relayd.sip.transport import UDP_MAX_DATAGRAM_BYTES, SIPTransportLayer
from relayd.sip.uas import Capabilities, UASCore
from relayd.testing import uac_request

pytestmark = pytest.mark.integration

reactor: Any = _reactor

DOMAIN = "example.com"
REALM = "example.com"
PASSWORDS = {"alice": "wonderland", "bob": "builder"}
SIPP_SCENARIO = Path(__file__).parent / "sipp" / "register_options.xml"


@dataclass
class Server:
    layer: SIPTransportLayer
    registrar: Registrar
    udp_port: int
    tcp_port: int


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[Server]:
    def lookup(user: str, realm: str) -> str | None:
        password = PASSWORDS.get(user)
        return ha1(user, realm, password) if password and realm == REALM else None

    auth = SIPAuthenticator(DigestAuthenticator(REALM, lookup, reactor), DOMAIN)
    registrar = Registrar(DOMAIN, reactor, auth, local_hosts=frozenset({"127.0.0.1"}))
    layer = SIPTransportLayer(reactor, advertised_host="127.0.0.1")
    uas = UASCore(
        Capabilities(accept=("text/plain",), allow_events=("wait-permission",)),
        registrar=registrar,
    )
    transactions = TransactionLayer(reactor, layer.send, uas)
    layer.attach(transactions)
    uas.attach(transactions)
    datagrams = layer.datagram_protocol()
    udp = datagram_server(
        reactor, parse_endpoint("udp:0:interface=127.0.0.1"), datagrams, UDP_MAX_DATAGRAM_BYTES
    )
    udp.startService()
    udp_port: Any = datagrams.transport
    tcp = reactor.listenTCP(0, layer.stream_factory("TCP"), interface="127.0.0.1")
    layer.set_listen_port("TCP", tcp.getHost().port)
    yield Server(layer, registrar, udp_port.getHost().port, tcp.getHost().port)
    layer.close_connections()
    await udp.stopService()
    await tcp.stopListening()
    registrar.stop()
    # As the service stops it: every transaction and timer queue (Timer J/K) ends, so
    # the reactor is clean for the next module's checks.
    transactions.stop()
    await deferLater(reactor, 0.01, lambda: None)


class UDPClient(DatagramProtocol):
    def __init__(self) -> None:
        self.queue: DeferredQueue[SIPResponse] = DeferredQueue()
        self.raw: list[bytes] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.raw.append(datagram)
        message = parse_datagram(datagram)
        assert isinstance(message, SIPResponse)
        self.queue.put(message)


class TCPClient(Protocol):
    def __init__(self) -> None:
        self.framer = StreamFramer()
        self.queue: DeferredQueue[SIPResponse] = DeferredQueue()

    def dataReceived(self, data: bytes) -> None:
        for event in self.framer.feed(data):
            assert isinstance(event, SIPResponse)
            self.queue.put(event)


def register(
    transport: str,
    local_port: int,
    server_port: int,
    *,
    cseq: int,
    expires: int = 300,
    authorization: str | None = None,
    user: str = "alice",
    call_id: str = "reg-call-1",
) -> bytes:
    lines = [
        f"REGISTER sip:127.0.0.1:{server_port} SIP/2.0",
        f"Via: SIP/2.0/{transport} 127.0.0.1:{local_port};rport;branch={new_branch()}",
        f"From: <sip:{user}@{DOMAIN}>;tag=f{cseq}",
        f"To: <sip:{user}@{DOMAIN}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        f"Contact: <sip:{user}@127.0.0.1:{local_port};transport={transport.lower()}>",
        f"Expires: {expires}",
        "Max-Forwards: 70",
    ]
    if authorization:
        lines.append(f"Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


def answer(challenge: SIPResponse, server_port: int, user: str = "alice", nc: int = 1) -> str:
    value = challenge.headers.get("www-authenticate")
    assert value is not None
    return answer_challenge(
        value,
        method="REGISTER",
        uri=f"sip:127.0.0.1:{server_port}",
        username=user,
        password=PASSWORDS[user],
        nc=nc,
    ).authorization


async def next_response(queue: DeferredQueue[SIPResponse]) -> SIPResponse:
    response: SIPResponse = await queue.get().addTimeout(5, reactor)
    return response


@pytest_twisted.ensureDeferred
async def test_register_with_digest_over_udp(server: Server) -> None:
    client = UDPClient()
    port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        me = port.getHost().port
        dest = ("127.0.0.1", server.udp_port)
        port.write(register("UDP", me, server.udp_port, cseq=1), dest)
        challenge = await next_response(client.queue)
        assert challenge.status == 401
        assert challenge.via.rport == me and challenge.via.received == "127.0.0.1"
        auth = answer(challenge, server.udp_port)
        port.write(register("UDP", me, server.udp_port, cseq=2, authorization=auth), dest)
        ok = await next_response(client.queue)
        assert ok.status == 200
        assert ok.headers.get("contact") == f"<sip:alice@127.0.0.1:{me};transport=udp>;expires=300"
        assert server.registrar.is_online("sip:alice@example.com")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_register_with_digest_over_tcp(server: Server) -> None:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    client = TCPClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.tcp_port)
    await connectProtocol(endpoint, client)
    assert client.transport is not None
    try:
        me: int = client.transport.getHost().port  # type: ignore[attr-defined]
        client.transport.write(register("TCP", me, server.tcp_port, cseq=1, user="bob"))
        challenge = await next_response(client.queue)
        assert challenge.status == 401
        auth = answer(challenge, server.tcp_port, user="bob")
        client.transport.write(
            register("TCP", me, server.tcp_port, cseq=2, user="bob", authorization=auth)
        )
        ok = await next_response(client.queue)
        assert ok.status == 200
        assert server.registrar.is_online("sip:bob@example.com")
    finally:
        client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_options_over_udp(server: Server) -> None:
    client = UDPClient()
    port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        request = (
            f"OPTIONS sip:127.0.0.1:{server.udp_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port.getHost().port};branch={new_branch()}\r\n"
            "From: <sip:alice@example.com>;tag=o\r\nTo: <sip:127.0.0.1>\r\n"
            "Call-ID: opt-1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        port.write(request.encode(), ("127.0.0.1", server.udp_port))
        response = await next_response(client.queue)
        assert response.status == 200
        assert response.headers.get_all("allow") == ["ACK", "CANCEL", "OPTIONS", "REGISTER"]
        assert response.headers.get("accept") == "text/plain"
        assert response.headers.get("allow-events") == "wait-permission"
        assert response.headers.get("accept-encoding") == "identity"
        assert response.headers.get("accept-language") == "en"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_malformed_datagram_gets_400(server: Server) -> None:
    client = UDPClient()
    port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        me = port.getHost().port
        bad = register("UDP", me, server.udp_port, cseq=1).replace(
            b"CSeq: 1 REGISTER", b"CSeq: 1 INVITE"
        )
        port.write(bad, ("127.0.0.1", server.udp_port))
        response = await next_response(client.queue)
        assert response.status == 400 and response.reason == "CSeq Method Mismatch"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_retransmitted_register_is_absorbed(server: Server) -> None:
    client = UDPClient()
    port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        me = port.getHost().port
        dest = ("127.0.0.1", server.udp_port)
        port.write(register("UDP", me, server.udp_port, cseq=1, call_id="rtx"), dest)
        auth = answer(await next_response(client.queue), server.udp_port)
        final = register("UDP", me, server.udp_port, cseq=2, call_id="rtx", authorization=auth)
        port.write(final, dest)
        first = await next_response(client.queue)
        port.write(final, dest)  # same branch: a retransmission
        second = await next_response(client.queue)
        # Reprocessing would have failed the nonce-count check (a 401), so an identical
        # 200 proves the server transaction answered from its stored response.
        assert first.status == second.status == 200
        assert client.raw[-1] == client.raw[-2]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_register_then_unregister_with_expires_zero(server: Server) -> None:
    client = UDPClient()
    port = reactor.listenUDP(0, client, interface="127.0.0.1")
    events: list[tuple[str, bool]] = []
    server.registrar.add_listener(lambda aor, online: events.append((aor, online)))
    try:
        me = port.getHost().port
        dest = ("127.0.0.1", server.udp_port)
        port.write(register("UDP", me, server.udp_port, cseq=1, call_id="un"), dest)
        challenge = await next_response(client.queue)
        auth = answer(challenge, server.udp_port, nc=1)
        port.write(
            register("UDP", me, server.udp_port, cseq=2, call_id="un", authorization=auth), dest
        )
        assert (await next_response(client.queue)).status == 200
        auth = answer(challenge, server.udp_port, nc=2)
        port.write(
            register(
                "UDP", me, server.udp_port, cseq=3, call_id="un", expires=0, authorization=auth
            ),
            dest,
        )
        bye = await next_response(client.queue)
        assert bye.status == 200 and bye.headers.get("contact") is None
        assert not server.registrar.is_online("sip:alice@example.com")
        assert events == [("sip:alice@example.com", True), ("sip:alice@example.com", False)]
    finally:
        await port.stopListening()


def _free_port(transport: str) -> int:
    """A port free for SIPp's own socket of that transport (u1: UDP, t1: TCP)."""
    kind = socket.SOCK_DGRAM if transport == "u1" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.skipif(
    shutil.which("sipp") is None, reason="sipp not on PATH (apt install sip-tester)"
)
@pytest.mark.parametrize("transport", ["u1", "t1"])
@pytest_twisted.ensureDeferred
async def test_sipp_register_and_options(server: Server, transport: str, tmp_path: Path) -> None:
    server_port = server.udp_port if transport == "u1" else server.tcp_port
    command = [
        "sipp", f"127.0.0.1:{server_port}",
        "-sf", str(SIPP_SCENARIO),
        "-t", transport,
        "-i", "127.0.0.1",
        "-p", str(_free_port(transport)),
        "-s", "alice", "-au", "alice", "-ap", PASSWORDS["alice"],
        "-m", "1",
        "-timeout", "15s", "-timeout_error",
        "-nostdin",
        "-trace_err", "-error_file", str(tmp_path / "errors.log"),
    ]  # fmt: skip

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=30, check=False, cwd=tmp_path
        )

    result = await deferToThread(run)
    errors = (tmp_path / "errors.log").read_text() if (tmp_path / "errors.log").exists() else ""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + errors
    assert server.registrar.is_online("sip:alice@example.com")


# -- RFC 4475-style malformed requests: each answered, over UDP and TCP ------------------


class RawUDPClient(DatagramProtocol):
    """Keeps each datagram as bytes: some answers cannot carry a To, so no parser."""

    def __init__(self) -> None:
        self.queue: DeferredQueue[bytes] = DeferredQueue()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.queue.put(datagram)


class RawTCPClient(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed: DeferredQueue[None] = DeferredQueue()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.put(None)


def _options(transport: str, local_port: int, branch: str) -> bytes:
    return (
        "OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:{local_port};rport;branch={branch}\r\n"
        "From: <sip:alice@example.com>;tag=t1\r\n"
        "To: <sip:127.0.0.1>\r\n"
        "Call-ID: torture-1\r\n"
        "CSeq: 8 OPTIONS\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


TORTURE = [
    ("insuf", (b"To: <sip:127.0.0.1>\r\n", b""), b"400 Missing To Header"),
    ("no-call-id", (b"Call-ID: torture-1\r\n", b""), b"400 Missing Call-ID Header"),
    ("scalar02", (b"CSeq: 8 OPTIONS", b"CSeq: 36893488147419103232 OPTIONS"), b"400 Bad CSeq"),
    ("cseq-no-method", (b"CSeq: 8 OPTIONS", b"CSeq: 8"), b"400 Bad CSeq Header"),
    ("badvers", (b"127.0.0.1 SIP/2.0", b"127.0.0.1 SIP/7.0"), b"505 Version Not Supported"),
    ("multi01", (b"Call-ID:", b"To: <sip:other@127.0.0.1>\r\nCall-ID:"), b"400 Repeated To"),
    ("baddn", (b"From: <sip:", b"From: Bell, Alexander <sip:"), b"400 Bad From Header"),
    ("quotbal", (b"To: <sip:", b'To: "Mr. J. User <sip:'), b"400 Bad To Header"),
    ("escruri", (b"127.0.0.1 SIP/2.0", b"127.0.0.1?Route=%3Csip:x%3E SIP/2.0"), b"400 Headers"),
    ("ltgtruri", (b"sip:127.0.0.1 SIP", b"<sip:127.0.0.1> SIP"), b"400 Bad Request-URI"),
]


@pytest.mark.parametrize(
    ("edit", "status_line"), [t[1:] for t in TORTURE], ids=[t[0] for t in TORTURE]
)
@pytest_twisted.ensureDeferred
async def test_torture_request_is_answered_over_udp(
    server: Server, edit: tuple[bytes, bytes], status_line: bytes
) -> None:
    client = RawUDPClient()
    port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        data = _options("UDP", port.getHost().port, new_branch()).replace(*edit)
        for _ in range(2):  # and its retransmission
            port.write(data, ("127.0.0.1", server.udp_port))
        first = await client.queue.get().addTimeout(5, reactor)
        second = await client.queue.get().addTimeout(5, reactor)
        assert first.startswith(b"SIP/2.0 " + status_line), first
        assert first == second  # stateless, yet the same To tag each time (§8.2.7)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_huge_content_length_in_a_datagram_is_400(server: Server) -> None:
    client = RawUDPClient()
    port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        data = _options("UDP", port.getHost().port, new_branch()).replace(
            b"Content-Length: 0", b"Content-Length: 18446744073709551616"
        )
        port.write(data, ("127.0.0.1", server.udp_port))
        answer = await client.queue.get().addTimeout(5, reactor)
        assert answer.startswith(b"SIP/2.0 400 Content-Length Exceeds Body")
    finally:
        await port.stopListening()


async def _tcp_client(server: Server) -> RawTCPClient:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    client = RawTCPClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.tcp_port), client)
    return client


@pytest.mark.parametrize(
    ("edit", "status_line"),
    [
        ((b"Content-Length: 0", b"Content-Length: -3"), b"400 Bad Content-Length"),
        ((b"Content-Length: 0", b"Content-Length: 0\r\nl: 2"), b"400 Conflicting"),
        ((b"Content-Length: 0", b"Content-Length: 99999999999"), b"413 Body Too Large"),
        ((b"OPTIONS sip:127.0.0.1", b"OPTIONS sip:" + b"a" * 5000 + b"@x"), b"414 Start Line"),
        ((b"Max-Forwards: 70", b"X: y\r\n" * 130 + b"Max-Forwards: 70"), b"513 Too Many"),
    ],
    ids=["negative", "conflicting", "too-large", "414", "513"],
)
@pytest_twisted.ensureDeferred
async def test_tcp_framing_error_is_answered_then_closed(
    server: Server, edit: tuple[bytes, bytes], status_line: bytes
) -> None:
    client = await _tcp_client(server)
    assert client.transport is not None
    me: int = client.transport.getHost().port  # type: ignore[attr-defined]
    client.transport.write(_options("TCP", me, new_branch()).replace(*edit))
    await client.closed.get().addTimeout(5, reactor)
    assert client.received.startswith(b"SIP/2.0 " + status_line), client.received[:200]


@pytest_twisted.ensureDeferred
async def test_tcp_wrong_version_is_505_and_the_connection_stays(server: Server) -> None:
    client = await _tcp_client(server)
    assert client.transport is not None
    try:
        me: int = client.transport.getHost().port  # type: ignore[attr-defined]
        bad = _options("TCP", me, new_branch()).replace(b" SIP/2.0\r\n", b" SIP/7.0\r\n", 1)
        client.transport.write(bad + _options("TCP", me, new_branch()))
        framer = StreamFramer()
        events: list[Any] = []
        for _ in range(50):
            events = framer.feed(client.received)
            if len(events) == 2:
                break
            framer = StreamFramer()
            await deferLater(reactor, 0.05, lambda: None)
        assert [e.status for e in events] == [505, 200]
    finally:
        client.transport.loseConnection()


class _HangsUpOnRequest(Protocol):
    """A peer that reads one request and closes without answering."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            assert self.transport is not None
            self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_request_whose_connection_drops_gets_503_at_once(server: Server) -> None:
    """§18.4: the transport error reaches the client transaction (not Timer F's 408)."""
    factory = ServerFactory.forProtocol(_HangsUpOnRequest)
    peer = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        port = peer.getHost().port
        _, request = uac_request(
            "OPTIONS",
            f"sip:peer@127.0.0.1:{port};transport=tcp",
            via="SIP/2.0/TCP 127.0.0.1:5060",
            aor="sip:relay@127.0.0.1",
            from_tag="x",
            to=None,
            call_id="hangup@127.0.0.1",
            cseq=1,
            contact="<sip:relay@127.0.0.1>",
        )
        response = await server.layer.request(request, Target("TCP", "127.0.0.1", port))
        assert response.status == 503
        assert server.layer.transactions is not None
        assert server.layer.transactions.client_transaction_count == 0
    finally:
        await peer.stopListening()
