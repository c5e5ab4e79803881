"""SIP transports without sockets: fake UDP transport, StringTransport, MemoryReactorClock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure

from relayd.sip.message import Headers, SIPRequest, SIPResponse, Via, make_response
from relayd.sip.parser import parse_datagram
from relayd.sip.registrar import Registrar
from relayd.sip.resolve import Target
from relayd.sip.transaction import TransactionLayer, TransportError, new_branch
from relayd.sip.transport import (
    CONNECT_WAIT_SECONDS,
    SIPDatagramProtocol,
    SIPStreamProtocol,
    SIPTransportLayer,
    Source,
    apply_received,
    response_address,
)
from relayd.sip.uas import Capabilities, UASCore
from relayd.sipuri import SIPURI

UA = ("198.51.100.7", 34000)


class FakeUDPTransport:
    def __init__(self, host: str = "192.0.2.100", port: int = 5060) -> None:
        self.host = IPv4Address("UDP", host, port)
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.written.append((data, addr))

    def getHost(self) -> IPv4Address:
        return self.host


class Rig:
    """Transport layer + transaction layer + UAS answering OPTIONS, one UDP listener."""

    def __init__(self, **kwargs: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.layer = SIPTransportLayer(self.reactor, advertised_host="relay.example.com", **kwargs)
        self.uas = UASCore(Capabilities(supported=("path",)))
        self.transactions = TransactionLayer(self.reactor, self.layer.send, self.uas)
        self.layer.attach(self.transactions)
        self.uas.attach(self.transactions)
        self.udp = self.layer.datagram_protocol()
        self.udp_transport = FakeUDPTransport()
        self.udp.makeConnection(self.udp_transport)  # type: ignore[arg-type]

    def datagram(self, data: bytes, addr: tuple[str, int] = UA) -> list[SIPResponse]:
        before = len(self.udp_transport.written)
        self.udp.datagramReceived(data, addr)
        return [self.parse(d) for d, _ in self.udp_transport.written[before:]]

    @staticmethod
    def parse(data: bytes) -> SIPResponse:
        message = parse_datagram(data)
        assert isinstance(message, SIPResponse)
        return message

    def stream(self, transport_name: str = "TCP") -> tuple[SIPStreamProtocol, StringTransport]:
        protocol = self.layer.stream_factory(transport_name).buildProtocol(None)
        assert isinstance(protocol, SIPStreamProtocol)
        transport = StringTransport(peerAddress=IPv4Address("TCP", *UA))
        protocol.makeConnection(transport)
        return protocol, transport


def options(
    via: str = "SIP/2.0/UDP 198.51.100.7:5062;rport;branch=z9hG4bKo1", body: str = ""
) -> bytes:
    return (
        "OPTIONS sip:relay.example.com SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "From: <sip:alice@example.com>;tag=1\r\n"
        "To: <sip:relay.example.com>\r\n"
        "Call-ID: call-1\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


@pytest.fixture
def warnings() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def _via_request(via: str) -> SIPRequest:
    return SIPRequest("OPTIONS", SIPURI.parse("sip:r@example.com"), Headers([("Via", via)]))


# -- §18.2.1 / RFC 3581 -------------------------------------------------------------------


def test_received_added_only_when_sent_by_differs() -> None:
    same = _via_request("SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK1")
    apply_received(same, "198.51.100.7", 5060)
    assert same.via.received is None
    named = _via_request("SIP/2.0/UDP ua.example.com;branch=z9hG4bK1, SIP/2.0/UDP b;branch=x")
    apply_received(named, "198.51.100.7", 5060)
    assert named.via.received == "198.51.100.7"
    assert [v.host for v in named.vias] == ["ua.example.com", "b"]
    v6 = _via_request("SIP/2.0/UDP [2001:db8:0::1];branch=z9hG4bK1")
    apply_received(v6, "2001:db8::1", 5060)
    assert v6.via.received is None


def test_rport_is_filled_and_forces_received() -> None:
    request = _via_request("SIP/2.0/UDP 198.51.100.7:5062;rport;branch=z9hG4bK1")
    apply_received(request, "198.51.100.7", 34000)
    assert request.via.rport == 34000 and request.via.received == "198.51.100.7"


def test_response_address_rules() -> None:
    assert response_address(Via.parse("SIP/2.0/UDP h;received=192.0.2.9;rport=1234")) == (
        "192.0.2.9",
        1234,
    )
    assert response_address(Via.parse("SIP/2.0/UDP h:5070;received=192.0.2.9")) == (
        "192.0.2.9",
        5070,
    )
    assert response_address(Via.parse("SIP/2.0/UDP 192.0.2.8")) == ("192.0.2.8", 5060)
    assert response_address(Via.parse("SIP/2.0/UDP h:5070;maddr=239.0.0.1")) == ("239.0.0.1", 5070)


# -- UDP --------------------------------------------------------------------------------


def test_udp_response_goes_to_rport_address_from_same_socket() -> None:
    rig = Rig()
    [response] = rig.datagram(options())
    assert response.status == 200
    assert rig.udp_transport.written[0][1] == UA
    assert response.via.received == "198.51.100.7" and response.via.rport == 34000


def test_udp_response_without_rport_goes_to_sent_by_port() -> None:
    rig = Rig()
    rig.datagram(options("SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bKo2"))
    assert rig.udp_transport.written[0][1] == ("198.51.100.7", 5062)


def test_retransmission_resends_same_response() -> None:
    rig = Rig()
    first = rig.datagram(options())
    second = rig.datagram(options())
    # OPTIONS is answered statelessly, the same each time (§8.2.7).
    assert first == second and rig.transactions.server_transaction_count == 0


def test_a_flooding_source_is_read_only_up_to_its_budget() -> None:
    """1000 a second per source, per 100 ms window: the excess is dropped unparsed, and
    another source is answered all the same."""
    rig = Rig(max_datagrams_per_source=1000)
    flood = ("198.51.100.9", 40000)
    answered = [
        rig.datagram(options(f"SIP/2.0/UDP 198.51.100.9:40000;branch=z9hG4bKf{i}"), flood)
        for i in range(5000)
    ]
    assert sum(len(a) for a in answered) == 100
    [polite] = rig.datagram(options())
    assert polite.status == 200
    rig.reactor.advance(0.1)  # the next window
    assert rig.datagram(options("SIP/2.0/UDP 198.51.100.9:40000;branch=z9hG4bKn"), flood)


def test_dropped_datagrams_are_logged_once_a_second(warnings: list[LogEvent]) -> None:
    rig = Rig(max_datagrams_per_source=10)
    for _ in range(30):  # 3 s of a source sending twice its budget
        for _ in range(2):
            rig.datagram(b"\r\n\r\n")
        rig.reactor.advance(0.1)
    lines = [e for e in warnings if "SIP flood" in e.get("log_format", "")]
    assert len(lines) == 3  # at 0.1 s, then at most once a second
    rig.reactor.advance(1)
    rig.datagram(b"\r\n\r\n")  # the first datagram after the flood says the rest
    lines = [e for e in warnings if "SIP flood" in e.get("log_format", "")]
    assert len(lines) == 4 and sum(e["count"] for e in lines) == 30


def test_malformed_but_answerable_request_gets_400(warnings: list[LogEvent]) -> None:
    rig = Rig()
    data = options().replace(b"OPTIONS sip:relay.example.com", b"OPTIONS sip:[bad")
    [response] = rig.datagram(data)
    assert response.status == 400 and response.reason == "Bad Request-URI"
    assert rig.udp_transport.written[0][1] == UA  # rport honoured on the 400 too
    assert any("malformed" in str(e.get("log_format")) for e in warnings)


def test_unanswerable_garbage_is_dropped_with_warning(warnings: list[LogEvent]) -> None:
    rig = Rig()
    assert rig.datagram(b"\x00\xffnot sip at all\r\n\r\n") == []
    assert rig.datagram(b"\r\n\r\n") == []  # keep-alive: silently ignored
    events = [e for e in warnings if "malformed" in str(e.get("log_format"))]
    assert len(events) == 1 and str(events[0]["peer"]) == "udp:198.51.100.7:34000"


def test_nothing_escapes_datagram_received(warnings: list[LogEvent]) -> None:
    rig = Rig()

    class Exploding:
        def request_received(self, *args: object) -> None:
            raise RuntimeError("boom")

    rig.layer.transactions = Exploding()  # type: ignore[assignment]
    rig.udp.datagramReceived(options(), UA)
    rig.udp.datagramReceived(options(), None)
    assert sum(1 for e in warnings if "log_failure" in e) == 2


# -- streams ----------------------------------------------------------------------------


def test_stream_answers_on_same_connection_across_split_reads() -> None:
    rig = Rig()
    protocol, transport = rig.stream()
    data = options("SIP/2.0/TCP ua.example.com:5062;branch=z9hG4bKs1")
    protocol.dataReceived(data[:17])
    protocol.dataReceived(data[17:])
    response = rig.parse(transport.value())
    assert response.status == 200 and response.via.received == "198.51.100.7"


def test_stream_keepalive_gets_pong() -> None:
    rig = Rig()
    protocol, transport = rig.stream()
    protocol.dataReceived(b"\r\n\r\n")
    assert transport.value() == b"\r\n"


def test_stream_without_content_length_answers_400_and_closes() -> None:
    rig = Rig()
    protocol, transport = rig.stream()
    data = options("SIP/2.0/TCP 198.51.100.7;branch=z9hG4bKs2").replace(
        b"Content-Length: 0\r\n", b""
    )
    protocol.dataReceived(data)
    assert rig.parse(transport.value()).status == 400
    assert transport.disconnecting


def test_stream_response_after_close_reconnects_to_sent_by() -> None:
    rig = Rig()
    rig.uas.set_handler("MESSAGE", lambda txn, req: None)  # answer later
    protocol, _ = rig.stream()
    message = options("SIP/2.0/TCP ua.example.com:5099;branch=z9hG4bKs3")
    message = message.replace(b"OPTIONS sip", b"MESSAGE sip").replace(b"1 OPTIONS", b"1 MESSAGE")
    protocol.dataReceived(message)
    [txn] = rig.transactions._server.values()
    protocol.connectionLost()
    txn.respond(make_response(txn.request, 200))
    host, port = rig.reactor.tcpClients[0][:2]
    assert (host, port) == ("198.51.100.7", 5099)


def test_connection_limit_closes_the_connection_idle_the_longest() -> None:
    rig = Rig(max_connections=2)
    first, first_transport = rig.stream()
    rig.reactor.advance(1)
    _, second_transport = rig.stream()
    rig.reactor.advance(1)
    first.dataReceived(b"\r\n\r\n")  # the first is busy again: the second is idlest
    _, third_transport = rig.stream()
    assert second_transport.disconnected and not first_transport.disconnecting
    assert not third_transport.disconnecting and rig.layer.stream_count == 2


def test_connection_limit_spares_registration_flows() -> None:
    rig = registering_rig(max_connections=1)
    protocol, _ = rig.stream()
    protocol.dataReceived(register())
    assert rig.layer.stream_factory().buildProtocol(None) is None
    rig.reactor.advance(601)  # the registration has expired: the connection may go
    assert rig.layer.stream_factory().buildProtocol(None) is not None


def test_idle_connection_is_closed() -> None:
    rig = Rig(idle_timeout_seconds=30)
    protocol, transport = rig.stream()
    rig.reactor.advance(20)
    protocol.dataReceived(b"\r\n\r\n")
    rig.reactor.advance(20)
    assert not transport.disconnecting
    rig.reactor.advance(11)
    assert transport.disconnecting


def test_connection_without_a_request_closes_after_the_short_timeout() -> None:
    rig = Rig()  # the defaults: 60 s, 300 s once a request came
    _, silent = rig.stream()
    used, busy = rig.stream()
    used.dataReceived(options("SIP/2.0/TCP 198.51.100.7:5062;branch=z9hG4bKidle"))
    rig.reactor.advance(60)
    assert silent.disconnecting and not busy.disconnecting
    rig.reactor.advance(239)
    assert not busy.disconnecting
    rig.reactor.advance(1)
    assert busy.disconnecting


def test_connection_carrying_a_registration_stays_while_it_is_valid() -> None:
    rig = registering_rig()
    protocol, transport = rig.stream()
    protocol.dataReceived(register(expires=600))
    rig.reactor.advance(599)
    assert not transport.disconnecting  # idle for far longer than 300 s
    rig.reactor.advance(1)
    assert transport.disconnecting


# -- registration flows (RFC 5626 §5) ------------------------------------------------------

NAT_CONTACT = "sip:alice@10.0.0.5:5070;transport=tcp"


def registering_rig(**kwargs: Any) -> Rig:
    rig = Rig(**kwargs)
    rig.uas.registrar = Registrar("example.com", rig.reactor, None)
    rig.uas.set_handler("MESSAGE", None)  # rebuilds the method table with REGISTER
    rig.uas.registered = rig.layer.bind_flows
    return rig


def register(contact: str = NAT_CONTACT, expires: int = 600, cseq: int = 1) -> bytes:
    return (
        "REGISTER sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 10.0.0.5:5070;branch=z9hG4bKreg{cseq}\r\n"
        "From: <sip:alice@example.com>;tag=1\r\n"
        "To: <sip:alice@example.com>\r\n"
        "Call-ID: reg-1\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        f"Contact: <{contact}>\r\n"
        f"Expires: {expires}\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def test_a_contact_registered_over_a_connection_is_reached_over_it() -> None:
    rig = registering_rig()
    protocol, transport = rig.stream()
    protocol.dataReceived(register())
    assert rig.parse(transport.value()).status == 200
    transport.clear()
    target = rig.layer.flow_target(SIPURI.parse(NAT_CONTACT))
    assert target == Target("TCP", *UA)
    rig.layer.send(outbound("hi"), target)
    assert transport.value().startswith(b"MESSAGE sip:bob@192.0.2.50 SIP/2.0")
    assert rig.reactor.tcpClients == []  # no connect to the contact's address
    protocol.connectionLost()
    assert rig.layer.flow_target(SIPURI.parse(NAT_CONTACT)) is None


def test_a_flow_ends_with_its_registration() -> None:
    rig = registering_rig()
    protocol, _ = rig.stream()
    protocol.dataReceived(register(expires=600))
    rig.reactor.advance(300)
    protocol.dataReceived(register(expires=0, cseq=2))  # unregistered
    assert rig.layer.flow_target(SIPURI.parse(NAT_CONTACT)) is None
    protocol.dataReceived(register(expires=60, cseq=3))
    assert rig.layer.flow_target(SIPURI.parse(NAT_CONTACT)) is not None
    rig.reactor.advance(60)
    assert rig.layer.flow_target(SIPURI.parse(NAT_CONTACT)) is None
    protocol.dataReceived(register(expires=600, cseq=4))
    protocol.dataReceived(register(contact="*", expires=0, cseq=5).replace(b"<*>", b"*"))
    assert rig.layer.flow_target(SIPURI.parse(NAT_CONTACT)) is None
    assert protocol.flow_until() == 0.0


def test_udp_registrations_make_no_flow() -> None:
    rig = registering_rig()
    [ok] = rig.datagram(register().replace(b"SIP/2.0/TCP", b"SIP/2.0/UDP"))
    assert ok.status == 200
    assert rig.layer.flow_target(SIPURI.parse(NAT_CONTACT)) is None


# -- outbound ---------------------------------------------------------------------------


def outbound(body: str = "") -> SIPRequest:
    headers = Headers(
        [
            ("Via", f"SIP/2.0/UDP placeholder;branch={new_branch()}"),
            ("From", "<sip:relay@example.com>;tag=r"),
            ("To", "<sip:bob@example.com>"),
            ("Call-ID", "out-1"),
            ("CSeq", "1 MESSAGE"),
            ("Max-Forwards", "70"),
            ("Content-Type", "text/plain"),
        ]
    )
    return SIPRequest("MESSAGE", SIPURI.parse("sip:bob@192.0.2.50"), headers, body.encode())


def test_small_request_stays_on_udp_with_our_sent_by() -> None:
    rig = Rig()
    request = outbound("hi")
    target = rig.layer.prepare_request(request, Target("UDP", "192.0.2.50", 5060))
    assert target.transport == "UDP"
    assert request.via.format().startswith("SIP/2.0/UDP relay.example.com:5060;branch=z9hG4bK")
    assert request.via.rport_requested
    rig.layer.send(request, target)
    assert rig.udp_transport.written[-1][1] == ("192.0.2.50", 5060)


def test_large_request_switches_to_tcp_and_reuses_one_connection() -> None:
    rig = Rig()
    rig.layer.set_listen_port("TCP", 5070)
    request = outbound("x" * 1400)
    target = rig.layer.prepare_request(request, Target("UDP", "192.0.2.50", 5060))
    assert target == Target("TCP", "192.0.2.50", 5060)
    assert request.via.transport == "TCP" and request.via.port == 5070
    assert not request.via.rport_requested
    rig.layer.send(request, target)
    rig.layer.send(request, target)
    assert len(rig.reactor.tcpClients) == 1
    host, port, factory = rig.reactor.tcpClients[0][:3]
    assert (host, port) == ("192.0.2.50", 5060)
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.50", 5060))
    protocol.makeConnection(transport)
    assert transport.value().count(b"MESSAGE sip:bob@192.0.2.50 SIP/2.0") == 2
    rig.layer.send(request, target)  # reused, no new connect
    assert len(rig.reactor.tcpClients) == 1
    assert transport.value().count(b"MESSAGE sip:") == 3


def test_request_with_failed_connect_is_503() -> None:
    rig = Rig()
    request = outbound()
    results: list[SIPResponse] = []
    rig.layer.request(request, Target("TCP", "192.0.2.50", 5060)).addCallback(results.append)
    factory = rig.reactor.tcpClients[0][2]
    factory.clientConnectionFailed(cast(Any, None), Failure(ConnectionRefusedError()))
    assert [r.status for r in results] == [503]


def test_request_over_udp_completes_the_client_transaction() -> None:
    rig = Rig()
    request = outbound()
    results: list[SIPResponse] = []
    rig.layer.request(request, Target("UDP", "192.0.2.50", 5060)).addCallback(results.append)
    sent = parse_datagram(rig.udp_transport.written[-1][0])
    assert isinstance(sent, SIPRequest)
    reply = (
        "SIP/2.0 200 OK\r\n"
        f"Via: {sent.headers.get('via')}\r\n"
        "From: <sip:relay@example.com>;tag=r\r\nTo: <sip:bob@example.com>;tag=b\r\n"
        "Call-ID: out-1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    rig.udp.datagramReceived(reply, ("192.0.2.50", 5060))
    assert [r.status for r in results] == [200]


def test_tls_target_without_client_configuration_fails_cleanly() -> None:
    rig = Rig()
    results: list[SIPResponse] = []
    target = Target("TLS", "192.0.2.50", 5061, "bob.example.com")
    rig.layer.request(outbound(), target).addCallback(results.append)
    assert [r.status for r in results] == [503]


def test_sources_and_targets_print_for_logs() -> None:
    rig = Rig()
    protocol, _ = rig.stream("TLS")
    assert str(protocol.source) == "tls:198.51.100.7:34000"
    assert str(Target("UDP", "2001:db8::1", 5060)) == "udp:[2001:db8::1]:5060"
    assert isinstance(rig.udp, SIPDatagramProtocol)


# -- malformed requests: answered where possible ---------------------------------------

LOOPBACK_UA = ("127.0.0.1", 34001)


def test_malformed_request_400_repeats_its_to_tag() -> None:
    """§8.2.7: a stateless answer carries the same tag for every retransmission."""
    rig = Rig()
    data = options().replace(b"OPTIONS sip:relay.example.com", b"OPTIONS sip:[bad")
    [first] = rig.datagram(data, LOOPBACK_UA)
    [again] = rig.datagram(data, LOOPBACK_UA)
    assert first.status == again.status == 400
    assert first.to_tag is not None and first.to_tag == again.to_tag
    other = data.replace(b"Call-ID: call-1", b"Call-ID: call-2")
    [different] = rig.datagram(other, LOOPBACK_UA)
    assert different.to_tag != first.to_tag


def test_request_missing_to_gets_400_built_from_what_arrived() -> None:
    """RFC 4475 insuf: the 400 goes out even though it cannot carry a To."""
    rig = Rig()
    rig.udp.datagramReceived(
        options().replace(b"To: <sip:relay.example.com>\r\n", b""), LOOPBACK_UA
    )
    [(data, addr)] = rig.udp_transport.written
    assert addr == LOOPBACK_UA
    head = data.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"SIP/2.0 400 Missing To Header"
    assert b"Call-ID: call-1" in head and b"CSeq: 1 OPTIONS" in head
    assert not any(row.lower().startswith(b"to:") for row in head)


def test_wrong_version_gets_505() -> None:
    rig = Rig()
    [response] = rig.datagram(options().replace(b" SIP/2.0\r\n", b" SIP/7.0\r\n", 1), LOOPBACK_UA)
    assert response.status == 505


def test_repeated_from_gets_400_echoing_one_from() -> None:
    rig = Rig()
    data = options().replace(b"Call-ID:", b"From: <sip:mallory@example.com>;tag=2\r\nCall-ID:")
    [response] = rig.datagram(data, LOOPBACK_UA)
    assert (response.status, response.reason) == (400, "Repeated From Header")
    assert response.headers.get_raw("from") == ["<sip:alice@example.com>;tag=1"]


@pytest.mark.parametrize(
    ("edit", "status"),
    [
        ((b"Content-Length: 0", b"Content-Length: -1"), 400),
        ((b"Content-Length: 0", b"Content-Length: 99999999999999999999"), 413),
        ((b"Content-Length: 0", b"Content-Length: 0\r\nl: 3"), 400),
    ],
    ids=["negative", "too-large", "conflicting"],
)
def test_stream_content_length_errors_are_answered_before_closing(
    edit: tuple[bytes, bytes], status: int
) -> None:
    rig = Rig()
    protocol, transport = rig.stream()
    protocol.dataReceived(options("SIP/2.0/TCP 127.0.0.1:5062;branch=z9hG4bKcl").replace(*edit))
    assert rig.parse(transport.value()).status == status
    assert transport.disconnecting


def test_stream_limits_are_answered_before_closing() -> None:
    from relayd.sip.parser import SIPLimits

    rig = Rig(limits=SIPLimits(max_start_line_bytes=64, max_header_count=6))
    protocol, transport = rig.stream()
    data = options("SIP/2.0/TCP 127.0.0.1:5062;branch=z9hG4bKlim")
    protocol.dataReceived(data)
    response = rig.parse(transport.value())
    assert (response.status, response.reason) == (513, "Too Many Headers")
    assert transport.disconnecting
    protocol, transport = rig.stream()
    protocol.dataReceived(data.replace(b"sip:relay.example.com", b"sip:" + b"r" * 80 + b"@x"))
    assert rig.parse(transport.value()).status == 414
    assert transport.disconnecting


# -- outbound: §18.1.1 back to UDP, advertised host -------------------------------------


def test_size_forced_tcp_that_cannot_connect_retries_over_udp() -> None:
    rig = Rig()
    request = outbound("x" * 1400)
    results: list[SIPResponse] = []
    rig.layer.request(request, Target("UDP", "127.0.0.1", 5099)).addCallback(results.append)
    factory = rig.reactor.tcpClients[0][2]
    factory.clientConnectionFailed(cast(Any, None), Failure(ConnectionRefusedError()))
    data, addr = rig.udp_transport.written[-1]
    assert addr == ("127.0.0.1", 5099)
    sent = parse_datagram(data)
    assert isinstance(sent, SIPRequest) and len(sent.body) == 1400
    assert sent.via.transport == "UDP" and sent.via.rport_requested
    assert results == []  # a UDP client transaction now runs (Timer E retransmits)
    rig.reactor.advance(0.5)
    assert rig.udp_transport.written[-1][0] == data


def test_request_asked_over_tcp_that_cannot_connect_is_503_not_udp() -> None:
    rig = Rig()
    results: list[SIPResponse] = []
    rig.layer.request(outbound(), Target("TCP", "127.0.0.1", 5099)).addCallback(results.append)
    factory = rig.reactor.tcpClients[0][2]
    factory.clientConnectionFailed(cast(Any, None), Failure(ConnectionRefusedError()))
    assert [r.status for r in results] == [503]
    assert rig.udp_transport.written == []


def test_wildcard_listener_uses_the_advertised_host() -> None:
    rig = Rig()
    rig.udp_transport.host = IPv4Address("UDP", "0.0.0.0", 5060)  # noqa: S104 - in memory
    rig.udp._local = None
    rig.layer._sent_by.clear()
    assert rig.layer.sent_by("UDP") == ("relay.example.com", 5060)


def test_wildcard_listener_without_advertised_host_warns_once(
    warnings: list[LogEvent],
) -> None:
    reactor = MemoryReactorClock()
    layer = SIPTransportLayer(reactor)
    udp = layer.datagram_protocol()
    udp.makeConnection(FakeUDPTransport("0.0.0.0", 5070))  # type: ignore[arg-type]  # noqa: S104
    assert layer.sent_by("UDP") == ("127.0.0.1", 5070)
    assert layer.sent_by("TCP") == ("127.0.0.1", 5070)
    events = [e for e in warnings if "wildcard" in str(e.get("log_format"))]
    assert len(events) == 1


def test_a_request_to_a_peer_goes_back_to_where_it_sent_from() -> None:
    layer = SIPTransportLayer(MemoryReactorClock())
    assert layer.towards(Source("TCP", *UA)) == Target("TCP", *UA)
    target = Target("TLS", "192.0.2.9", 5061, "bob.example.com")
    assert layer.towards(target) is target
    with pytest.raises(TransportError, match="cannot send to"):
        layer.towards(UA)


def test_a_connect_that_never_completes_is_given_up_after_timer_b() -> None:
    rig = Rig()
    target = Target("TCP", "192.0.2.50", 5060)
    failures: list[Failure] = []
    rig.layer.connection(target).addErrback(failures.append)
    rig.layer.connection(target).addErrback(failures.append)  # waits for the same attempt
    assert len(rig.reactor.tcpClients) == 1
    rig.reactor.advance(CONNECT_WAIT_SECONDS - 1)
    assert failures == []
    rig.reactor.advance(1)
    assert len(failures) == 2
    # The next request tries afresh.
    rig.layer.connection(target).addErrback(failures.append)
    assert len(rig.reactor.tcpClients) == 2


def test_a_workers_requests_leave_from_its_own_socket_and_its_via_names_it() -> None:
    rig = Rig()  # the shared listener (5060)
    own = rig.layer.request_protocol()
    own_transport = FakeUDPTransport(port=40123)
    own.makeConnection(own_transport)  # type: ignore[arg-type]
    assert rig.layer.sent_by("UDP") == ("relay.example.com", 40123)
    results: list[SIPResponse] = []
    rig.layer.request(outbound(), Target("UDP", "192.0.2.50", 5060)).addCallback(results.append)
    assert rig.udp_transport.written == []
    sent = parse_datagram(own_transport.written[-1][0])
    assert isinstance(sent, SIPRequest)
    assert sent.via.port == 40123
    reply = (
        "SIP/2.0 200 OK\r\n"
        f"Via: {sent.headers.get('via')}\r\n"
        "From: <sip:relay@example.com>;tag=r\r\nTo: <sip:bob@example.com>;tag=b\r\n"
        "Call-ID: out-1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    own.datagramReceived(reply, ("192.0.2.50", 5060))
    assert [r.status for r in results] == [200]
    # A request that came in on the shared port is still answered from it.
    (answer,) = rig.datagram(options())
    assert answer.status == 200
    assert len(own_transport.written) == 1
