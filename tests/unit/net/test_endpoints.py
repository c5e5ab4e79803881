"""Tests for relayd.net.endpoints: listener string parsing and server endpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from relayd.net.endpoints import (
    EndpointSpec,
    EndpointSyntaxError,
    TLSServerEndpoint,
    datagram_server,
    is_host,
    listener_tls,
    parse_endpoint,
    stream_server_endpoint,
    with_option,
    with_port,
)
from relayd.net.reuseport import SharedTCPServerEndpoint, SharedUDPServer
from relayd.net.tls import ListenerTLS, TLSMaterial, certificate_dns_names, load_identity
from relayd.testing import make_pki


def test_tcp_positional_port() -> None:
    spec = parse_endpoint("tcp:2855")
    assert spec == EndpointSpec("tcp", 2855, "", {}, "tcp:2855")


def test_tcp_with_interface_and_backlog() -> None:
    spec = parse_endpoint("tcp:2856:interface=127.0.0.1:backlog=10")
    assert spec.kind == "tcp"
    assert spec.port == 2856
    assert spec.interface == "127.0.0.1"
    assert spec.options == {"backlog": "10"}


def test_port_keyword_form() -> None:
    spec = parse_endpoint("tcp:interface=127.0.0.1:port=2855")
    assert (spec.kind, spec.port, spec.interface) == ("tcp", 2855, "127.0.0.1")
    assert spec.options == {}


def test_port_zero_is_allowed() -> None:
    assert parse_endpoint("tcp:0:interface=127.0.0.1").port == 0


def test_kind_is_case_insensitive_and_text_is_kept() -> None:
    spec = parse_endpoint("  TCP:80  ")
    assert spec.kind == "tcp"
    assert spec.text == "TCP:80"


def test_ssl_keeps_tls_options() -> None:
    spec = parse_endpoint(
        "ssl:2855:privateKey=/etc/k.pem:certKey=/etc/c.pem:extraCertChain=/etc/chain.pem"
    )
    assert spec.kind == "ssl"
    assert spec.port == 2855
    assert spec.options == {
        "privateKey": "/etc/k.pem",
        "certKey": "/etc/c.pem",
        "extraCertChain": "/etc/chain.pem",
    }


def test_udp_parses() -> None:
    spec = parse_endpoint("udp:5060:interface=127.0.0.1")
    assert (spec.kind, spec.port, spec.interface) == ("udp", 5060, "127.0.0.1")


def test_escaped_colons_give_an_ipv6_interface() -> None:
    spec = parse_endpoint(r"tcp:2855:interface=\:\:1")
    assert spec.interface == "::1"
    assert spec.port == 2855


def test_escaped_colons_in_a_file_name() -> None:
    spec = parse_endpoint(r"ssl:2855:privateKey=C\:/keys/k.pem")
    assert spec.options["privateKey"] == "C:/keys/k.pem"


def test_backslash_escapes_a_backslash() -> None:
    spec = parse_endpoint(r"ssl:2855:privateKey=a\\b")
    assert spec.options["privateKey"] == "a\\b"


def test_trailing_backslash_is_an_error() -> None:
    with pytest.raises(EndpointSyntaxError, match="trailing backslash"):
        parse_endpoint("tcp:2855\\")


def test_unescaped_ipv6_interface_is_an_error() -> None:
    with pytest.raises(EndpointSyntaxError):
        parse_endpoint("tcp:2855:interface=::1")


@pytest.mark.parametrize("text", ["", "tcp", "http:80", "unix:/tmp/sock", "2855"])
def test_unknown_kind_or_missing_port(text: str) -> None:
    with pytest.raises(EndpointSyntaxError, match="expected tcp:PORT, ssl:PORT or udp:PORT"):
        parse_endpoint(text)


@pytest.mark.parametrize(
    ("text", "option"),
    [
        ("tcp:2855:privateKey=k.pem", "privateKey"),
        ("udp:5060:backlog=5", "backlog"),
        ("ssl:2855:colour=blue", "colour"),
        ("tcp:2855:Interface=127.0.0.1", "Interface"),
    ],
)
def test_unknown_options(text: str, option: str) -> None:
    with pytest.raises(EndpointSyntaxError, match=f"unknown option '{option}'"):
        parse_endpoint(text)


@pytest.mark.parametrize(
    "text",
    ["tcp:", "tcp:port=", "tcp:http", "tcp:-1", "tcp:65536", "tcp:99999999", "tcp: 80", "tcp:8.5"],
)
def test_bad_ports(text: str) -> None:
    with pytest.raises(EndpointSyntaxError, match="port must be a number from 0 to 65535"):
        parse_endpoint(text)


def test_highest_port() -> None:
    assert parse_endpoint("tcp:65535").port == 65535


@pytest.mark.parametrize(
    "text", ["tcp:\u00b2", "tcp:\u0663", "tcp:2855:backlog=\u00b2", "tcp:2855:backlog=\u0663"]
)
def test_non_ascii_digits_are_syntax_errors(text: str) -> None:
    # str.isdigit() alone accepts these; int() then fails or reads a non-ASCII number.
    with pytest.raises(EndpointSyntaxError):
        parse_endpoint(text)


def test_bad_backlog() -> None:
    with pytest.raises(EndpointSyntaxError, match="backlog must be a number"):
        parse_endpoint("tcp:2855:backlog=lots")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tcp:2855:interface=a:interface=b", "option 'interface' given twice"),
        ("tcp:port=1:port=2", "option 'port' given twice"),
        ("tcp:2855:port=2856", "unexpected '2855'"),
        ("tcp:port=2856:2855", "unexpected '2855'"),
        ("tcp:2855:2856", "unexpected '2856'"),
    ],
)
def test_duplicate_options(text: str, message: str) -> None:
    with pytest.raises(EndpointSyntaxError, match=message):
        parse_endpoint(text)


@pytest.mark.parametrize(
    "interface",
    [
        "999.1.1.1",
        "1.2.3",
        "0.0.0.0x",
        "bad host!",
        "a..b",
        "-relay.example",
        "relay_1",
        ".",
        "relay.example.com",
    ],
)
def test_interface_that_is_not_an_address_is_refused(interface: str) -> None:
    with pytest.raises(EndpointSyntaxError, match="interface must be an IP address or localhost"):
        parse_endpoint(f"tcp:2855:interface={interface}")


@pytest.mark.parametrize(
    "interface",
    [
        "127.0.0.1",
        "0.0.0.0",  # noqa: S104 - parsed, never bound
        r"\:\:1",
        r"fe80\:\:1%lo",
        "localhost",
    ],
)
def test_interface_addresses_and_localhost_are_accepted(interface: str) -> None:
    assert parse_endpoint(f"udp:5060:interface={interface}").interface == interface.replace(
        "\\", ""
    )


def test_is_host_bounds_label_and_name_lengths() -> None:
    assert is_host("a" * 63 + ".example")
    assert not is_host("a" * 64 + ".example")
    assert not is_host(".".join(["abcdefg"] * 32))  # 255 characters
    assert not is_host("")


def test_sslmethod_is_refused_not_ignored() -> None:
    with pytest.raises(EndpointSyntaxError, match="'sslmethod' is not supported: relayd sets"):
        parse_endpoint("ssl:2855:sslmethod=TLSv1_METHOD")


def test_error_message_quotes_the_description() -> None:
    with pytest.raises(EndpointSyntaxError) as info:
        parse_endpoint("tcp:2855:colour=blue")
    assert "'tcp:2855:colour=blue'" in str(info.value)


def test_syntax_error_is_a_value_error() -> None:
    assert issubclass(EndpointSyntaxError, ValueError)


@implementer(IOpenSSLContextFactory)
class _ContextFactory:
    def __init__(self) -> None:
        self.specs: list[EndpointSpec] = []

    def __call__(self, spec: EndpointSpec) -> ListenerTLS:
        self.specs.append(spec)
        return ListenerTLS(lambda *_: self, cast(IOpenSSLContextFactory, self))

    def getContext(self) -> SSL.Context:
        return SSL.Context(SSL.TLS_METHOD)


def _factory() -> Factory:
    return Factory.forProtocol(Protocol)


def test_tcp_server_endpoint_listens_where_asked() -> None:
    reactor = MemoryReactor()
    endpoint = stream_server_endpoint(reactor, parse_endpoint("tcp:2856:interface=127.0.0.1"))
    assert isinstance(endpoint, TCP4ServerEndpoint)
    factory = _factory()
    endpoint.listen(factory)
    assert len(reactor.tcpServers) == 1
    port, used_factory, backlog, interface = reactor.tcpServers[0]
    assert (port, backlog, interface) == (2856, 50, "127.0.0.1")
    assert used_factory is factory


def test_tcp_server_endpoint_ipv6_interface_and_backlog() -> None:
    reactor = MemoryReactor()
    endpoint = stream_server_endpoint(reactor, parse_endpoint(r"tcp:0:interface=\:\:1:backlog=7"))
    endpoint.listen(_factory())
    port, _, backlog, interface = reactor.tcpServers[0]
    assert (port, backlog, interface) == (0, 7, "::1")


@pytest.mark.parametrize(
    "text",
    [
        "tcp:2855",
        "tcp:2855:interface=127.0.0.1",
        r"tcp:0:interface=\:\:1:backlog=7",
        "tcp:port=2856:backlog=3:interface=localhost",
        "tcp:interface=127.0.0.1:port=2857",
    ],
)
def test_tcp_strings_bind_where_twisteds_own_parser_binds_them(text: str) -> None:
    ours, twisteds = MemoryReactor(), MemoryReactor()
    stream_server_endpoint(ours, parse_endpoint(text)).listen(_factory())
    serverFromString(twisteds, text).listen(_factory())
    port, _, backlog, interface = ours.tcpServers[0]
    expected_port, _, expected_backlog, expected_interface = twisteds.tcpServers[0]
    assert (port, backlog, interface) == (expected_port, expected_backlog, expected_interface)


def test_ssl_server_endpoint_uses_the_given_context() -> None:
    reactor = MemoryReactor()
    contexts = _ContextFactory()
    spec = parse_endpoint("ssl:2855:interface=127.0.0.1:privateKey=k.pem")
    endpoint = stream_server_endpoint(reactor, spec, contexts)
    assert isinstance(endpoint, TLSServerEndpoint)
    assert contexts.specs == [spec]
    factory = _factory()
    endpoint.listen(factory)
    # TLS is layered over a TCP listener, with the unbuffered TLS protocol.
    assert reactor.sslServers == []
    port, tls_factory, backlog, interface = reactor.tcpServers[0]
    assert (port, backlog, interface) == (2855, 50, "127.0.0.1")
    assert isinstance(tls_factory, TLSMemoryBIOFactory)
    assert tls_factory.wrappedFactory is factory
    assert tls_factory.protocol is TLSMemoryBIOProtocol


def test_ssl_server_endpoint_needs_a_context() -> None:
    with pytest.raises(ValueError, match="needs a TLS context"):
        stream_server_endpoint(MemoryReactor(), parse_endpoint("ssl:2855"))


def test_udp_is_not_a_stream_listener() -> None:
    with pytest.raises(ValueError, match="not a stream listener"):
        stream_server_endpoint(MemoryReactor(), parse_endpoint("udp:5060"))


def test_ssl_listener_with_stdlib_context_uses_the_stdlib_tls_wrapper() -> None:
    import ssl

    from relayd.net.tlsio import StdlibTLSServerFactory

    reactor = MemoryReactor()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    spec = parse_endpoint("ssl:2855:interface=127.0.0.1")
    endpoint = stream_server_endpoint(reactor, spec, lambda _: ListenerTLS(lambda *_: 0, context))
    factory = _factory()
    endpoint.listen(factory)
    _, tls_factory, _, _ = reactor.tcpServers[0]
    assert isinstance(tls_factory, StdlibTLSServerFactory)
    assert tls_factory.context_of() is context
    assert tls_factory.wrappedFactory is factory


def test_ssl_listener_without_keys_serves_the_relay_identity_over_tls12(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    relay_identity = load_identity(*pki.leaf("relay.example.com"))
    own_identity = load_identity(*pki.leaf("own.example.com"))
    tls = listener_tls(TLSMaterial(relay_identity, None))
    without_keys = tls(parse_endpoint("ssl:2855")).current.getContext()
    options = without_keys.set_options(0)
    assert options & SSL.OP_NO_TLSv1_1 and not options & SSL.OP_NO_TLSv1_2
    own = parse_endpoint(
        f"ssl:2855:certKey={own_identity.certificate_path}"
        f":privateKey={own_identity.private_key_path}"
    )
    served = {
        "without keys": _served_names(without_keys),
        "with its own": _served_names(tls(own).current.getContext()),
    }
    assert served == {"without keys": ["relay.example.com"], "with its own": ["own.example.com"]}


def _served_names(context: SSL.Context) -> list[str]:
    connection = SSL.Connection(context, None)
    certificate = connection.get_certificate()
    assert certificate is not None
    return certificate_dns_names(certificate)


def test_datagram_server_listens_with_interface() -> None:
    calls: list[tuple[Any, ...]] = []

    class Reactor:
        def listenUDP(self, *args: Any, **kwargs: Any) -> object:
            calls.append((args, kwargs))
            return object()

    protocol = DatagramProtocol()
    service = datagram_server(
        Reactor(), parse_endpoint("udp:5070:interface=127.0.0.1"), protocol, 65535
    )
    service.startService()
    assert calls == [((5070, protocol), {"interface": "127.0.0.1", "maxPacketSize": 65535})]
    with pytest.raises(ValueError):
        datagram_server(Reactor(), parse_endpoint("tcp:5070"), protocol, 65535)


def test_reloaded_keys_reach_new_connections_of_a_listening_endpoint(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    material = TLSMaterial(load_identity(*pki.leaf("old.example.com")), None)
    reactor = MemoryReactor()
    spec = parse_endpoint("ssl:2855")
    stream_server_endpoint(reactor, spec, listener_tls(material)).listen(_factory())
    _, tls_factory, _, _ = reactor.tcpServers[0]

    def accept() -> SSL.Context:
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        protocol = cast(TLSMemoryBIOProtocol, tls_factory.buildProtocol(address))
        protocol.makeConnection(StringTransport())
        return cast(SSL.Context, protocol.getHandle().get_context())

    established = accept()
    material.stage(load_identity(*pki.leaf("new.example.com")), None)()
    assert _served_names(established) == ["old.example.com"]
    assert _served_names(accept()) == ["new.example.com"]


def test_with_port_keeps_escapes_and_options() -> None:
    assert with_port("ssl:2855:interface=\\:\\:1:backlog=5", 2856) == (
        "ssl:2856:interface=\\:\\:1:backlog=5"
    )
    assert with_port("tcp:interface=127.0.0.1:port=80", 81) == "tcp:interface=127.0.0.1:port=81"
    assert parse_endpoint(with_port("ssl:2855:interface=\\:\\:1", 1)).interface == "::1"


def test_with_option_replaces_a_given_value() -> None:
    assert with_option("udp:5060:reuseport=no", "reuseport", "yes") == "udp:5060:reuseport=yes"


def test_reuseport_option() -> None:
    assert parse_endpoint("udp:5060:reuseport=yes").reuse_port
    assert not parse_endpoint("tcp:5060:reuseport=no").reuse_port
    assert not parse_endpoint("tcp:5060").reuse_port
    with pytest.raises(EndpointSyntaxError, match="reuseport must be yes or no"):
        parse_endpoint("tcp:5060:reuseport=1")


def test_reuseport_listeners_share_a_port() -> None:
    from twisted.internet import reactor

    spec = parse_endpoint("tcp:0:interface=127.0.0.1:reuseport=yes")
    first = stream_server_endpoint(cast(Any, reactor), spec)
    assert isinstance(first, SharedTCPServerEndpoint)
    ports: list[Any] = []
    first.listen(Factory.forProtocol(Protocol)).addCallback(ports.append)
    port = ports[0].getHost().port
    shared = parse_endpoint(f"tcp:{port}:interface=127.0.0.1:reuseport=yes")
    stream_server_endpoint(cast(Any, reactor), shared).listen(
        Factory.forProtocol(Protocol)
    ).addCallback(ports.append)
    plain = parse_endpoint(f"tcp:{port}:interface=127.0.0.1")
    refused: list[Any] = []
    stream_server_endpoint(cast(Any, reactor), plain).listen(
        Factory.forProtocol(Protocol)
    ).addErrback(refused.append)
    try:
        assert len(ports) == 2 and ports[1].getHost().port == port
        assert len(refused) == 1
    finally:
        for listening in ports:
            listening.stopListening()


def test_reuseport_datagram_servers_share_a_port() -> None:
    from twisted.internet import reactor

    spec = parse_endpoint("udp:0:interface=127.0.0.1:reuseport=yes")
    first_protocol, second_protocol = DatagramProtocol(), DatagramProtocol()
    first = datagram_server(reactor, spec, first_protocol, 65536)
    assert isinstance(first, SharedUDPServer)
    first.privilegedStartService()
    try:
        port = cast(Any, first_protocol.transport).getHost().port
        shared = parse_endpoint(f"udp:{port}:interface=127.0.0.1:reuseport=yes")
        second = datagram_server(reactor, shared, second_protocol, 65536)
        second.startService()
        assert cast(Any, second_protocol.transport).getHost().port == port
        second.stopService()
    finally:
        first.stopService()
