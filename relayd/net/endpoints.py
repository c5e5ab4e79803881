"""Listener strings: Twisted's ``tcp:`` and ``ssl:`` syntax, plus ``udp:`` for SIP.

We parse the strings ourselves (same grammar as Twisted's, backslash escapes
included) because ``ssl:`` listeners need our own TLS context (optional
client certificates for peer relays, TLS 1.2 minimum, idle buffer release),
and Twisted's ``serverFromString`` cannot give them one: its ``ssl:`` parser
builds its own context from key files, and a parser plugin cannot replace a
built-in prefix.  Twisted's tokenizer is private (``endpoints._parse``) and it
has no ``udp:`` server endpoint at all.  Parsing once, at configuration load,
also lets a bad string stop start-up with a message naming the key.
tests/unit/net/test_endpoints.py checks that ``tcp:`` strings bind where
Twisted's own parser would bind them.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import UDPServer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IProtocolFactory,
    IReactorTCP,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from relayd.net.reuseport import SharedTCPServerEndpoint, SharedUDPServer
from relayd.net.tls import (
    ListenerTLS,
    ServerIdentity,
    TLSMaterial,
    TrustRoots,
    load_identity,
    server_context_factory,
    with_extra_chain,
)
from relayd.net.tlsio import StdlibTLSServerFactory

_KNOWN_OPTIONS: dict[str, frozenset[str]] = {
    "tcp": frozenset({"port", "interface", "backlog", "reuseport"}),
    "ssl": frozenset(
        {
            "port",
            "interface",
            "backlog",
            "reuseport",
            "privateKey",
            "certKey",
            "extraCertChain",
            "sslmethod",
        }
    ),
    "udp": frozenset({"port", "interface", "reuseport"}),
}

_REFUSED_OPTIONS = {
    "sslmethod": "relayd sets the TLS versions itself (TLS 1.2 or later), remove it",
}
"""Twisted's options that we parse but refuse: accepting and ignoring them would mislead."""

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class EndpointSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class EndpointSpec:
    kind: str
    port: int
    interface: str
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""

    @property
    def reuse_port(self) -> bool:
        """``reuseport=yes``: several processes bind this address (SO_REUSEPORT) and the
        kernel spreads connections and datagrams among them ([relay] workers)."""
        return self.options.get("reuseport") == "yes"


def _split(description: str) -> list[str]:
    """Split on unescaped colons; a backslash escapes the next character."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise EndpointSyntaxError(f"{description!r}: trailing backslash")
            current.append(escaped)
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _raw_parts(description: str) -> list[str]:
    """Split on unescaped colons, keeping the escapes (for rewriting a string)."""
    parts: list[str] = []
    start = 0
    index = 0
    while index < len(description):
        if description[index] == "\\":
            index += 2
            continue
        if description[index] == ":":
            parts.append(description[start:index])
            start = index + 1
        index += 1
    parts.append(description[start:])
    return parts


def with_port(description: str, port: int) -> str:
    """The same listener string on another port (each worker's own MSRP port)."""
    parts = _raw_parts(description.strip())
    for index, part in enumerate(parts[1:], 1):
        if part.startswith("port="):
            parts[index] = f"port={port}"
            break
        if "=" not in part:
            parts[index] = str(port)
            break
    else:
        raise EndpointSyntaxError(f"{description!r}: no port")
    return ":".join(parts)


def with_option(description: str, key: str, value: str) -> str:
    """The same listener string with ``key=value`` set (replacing any given)."""
    parts = [part for part in _raw_parts(description.strip()) if not part.startswith(f"{key}=")]
    return ":".join([*parts, f"{key}={value}"])


def parse_endpoint(description: str) -> EndpointSpec:
    """Parse ``kind:PORT[:key=value…]`` (or ``kind:port=PORT:…``)."""
    text = description.strip()
    parts = _split(text)
    kind = parts[0].lower()
    if kind not in _KNOWN_OPTIONS or len(parts) < 2:
        raise EndpointSyntaxError(
            f"{description!r}: expected tcp:PORT, ssl:PORT or udp:PORT with options"
        )
    options: dict[str, str] = {}
    positional: list[str] = []
    for part in parts[1:]:
        if "=" in part:
            key, _, value = part.partition("=")
            if key not in _KNOWN_OPTIONS[kind]:
                raise EndpointSyntaxError(f"{description!r}: unknown option {key!r} for {kind}:")
            if key in options:
                raise EndpointSyntaxError(f"{description!r}: option {key!r} given twice")
            if key in _REFUSED_OPTIONS:
                raise EndpointSyntaxError(
                    f"{description!r}: option {key!r} is not supported: {_REFUSED_OPTIONS[key]}"
                )
            options[key] = value
        else:
            positional.append(part)
    if positional:
        if len(positional) > 1 or "port" in options:
            raise EndpointSyntaxError(f"{description!r}: unexpected {positional[-1]!r}")
        options["port"] = positional[0]
    port_text = options.pop("port", "")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise EndpointSyntaxError(f"{description!r}: port must be a number from 0 to 65535")
    backlog = options.get("backlog")
    if backlog is not None and not (backlog.isascii() and backlog.isdigit()):
        raise EndpointSyntaxError(f"{description!r}: backlog must be a number")
    reuse = options.get("reuseport")
    if reuse is not None and reuse not in ("yes", "no"):
        raise EndpointSyntaxError(f"{description!r}: reuseport must be yes or no")
    interface = options.pop("interface", "")
    if interface and not is_interface(interface):
        raise EndpointSyntaxError(
            f"{description!r}: interface must be an IP address or localhost, got {interface!r}"
        )
    return EndpointSpec(kind, int(port_text), interface, options, text)


def is_interface(text: str) -> bool:
    """An address a listener can bind without a DNS look-up.

    A host name here would be resolved only at bind time, after the listeners
    before it were already bound, so a typo such as ``0.0.0.0x`` (a valid host
    name) would stop start-up half-way.  ``localhost`` always names the
    loopback interface (RFC 6761 §6.3); every other interface is an IP literal.
    """
    if text.lower() in ("localhost", "localhost."):
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_host(text: str) -> bool:
    """An IP literal or a syntactically valid host name (RFC 1123 §2.1).

    Listener interfaces are checked with it so that a typo such as ``999.1.1.1``
    stops the configuration from loading instead of failing at bind time.  A
    name whose last label is all digits is refused: it is a mistyped address,
    never a name (RFC 3696 §2).
    """
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return True
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    return (
        0 < len(name) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def stream_server_endpoint(
    reactor: IReactorTCP,
    spec: EndpointSpec,
    tls_context: Callable[[EndpointSpec], ListenerTLS] | None = None,
) -> IStreamServerEndpoint:
    """A Twisted server endpoint for a ``tcp:`` or ``ssl:`` spec."""
    backlog = int(spec.options.get("backlog", "50"))
    tcp: IStreamServerEndpoint
    if spec.reuse_port:
        tcp = SharedTCPServerEndpoint(reactor, spec.port, backlog, spec.interface)
    else:
        tcp = TCP4ServerEndpoint(reactor, spec.port, backlog, spec.interface)
    if spec.kind == "tcp":
        return tcp
    if spec.kind == "ssl":
        if tls_context is None:
            raise ValueError("an ssl: listener needs a TLS context")
        return TLSServerEndpoint(tcp, tls_context(spec))
    raise ValueError(f"{spec.kind}: is not a stream listener")


def datagram_server(
    reactor: Any, spec: EndpointSpec, protocol: DatagramProtocol, max_packet_bytes: int
) -> UDPServer | SharedUDPServer:
    """Twisted's ``UDPServer`` for a ``udp:PORT[:interface=ADDR]`` spec: Twisted has
    no datagram endpoints, so no ``udp:`` string of its own.  Once bound,
    ``protocol.transport`` is the port."""
    if spec.kind != "udp":
        raise ValueError(f"{spec.kind}: is not a UDP listener")
    if spec.reuse_port:
        return SharedUDPServer(reactor, spec.port, protocol, spec.interface, max_packet_bytes)
    return UDPServer(
        spec.port,
        protocol,
        interface=spec.interface,
        maxPacketSize=max_packet_bytes,
        reactor=reactor,
    )


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """TLS over a TCP endpoint, writing through on every write.

    With an ``ssl.SSLContext`` the standard library's TLS is used (less memory
    per idle connection, see relayd.net.tlsio); with a pyOpenSSL context factory,
    Twisted's plain TLSMemoryBIOProtocol, without the small-write aggregator
    that would add a ``callLater(0)`` and two copies per write: our protocols
    already write one whole frame per call.
    """

    def __init__(self, tcp: IStreamServerEndpoint, tls: ListenerTLS) -> None:
        self._tcp = tcp
        self._tls = tls

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        factory: Any
        tls = self._tls
        if isinstance(tls.current, ssl.SSLContext):
            factory = StdlibTLSServerFactory(lambda: tls.current, protocolFactory)
        else:
            factory = TLSMemoryBIOFactory(_CurrentContext(tls), False, protocolFactory)
            factory.protocol = TLSMemoryBIOProtocol
        return self._tcp.listen(factory)


@implementer(IOpenSSLContextFactory)
class _CurrentContext:
    """The pyOpenSSL context a listener's keys are now loaded in: Twisted's
    TLSMemoryBIOFactory asks for one per connection it accepts."""

    def __init__(self, tls: ListenerTLS) -> None:
        self._tls = tls

    def getContext(self) -> Any:
        return self._tls.current.getContext()


def listener_identity(relay_identity: ServerIdentity, spec: EndpointSpec) -> ServerIdentity:
    """``certKey``/``privateKey`` replace the relay's keys; ``extraCertChain`` is served
    after the chain (intermediates kept in a file of their own)."""
    identity = relay_identity
    if "certKey" in spec.options or "privateKey" in spec.options:
        identity = load_identity(
            spec.options.get("certKey") or spec.options["privateKey"],
            spec.options.get("privateKey") or spec.options["certKey"],
        )
    extra = spec.options.get("extraCertChain")
    if extra:
        identity = with_extra_chain(identity, extra)
    return identity


def listener_tls(material: TLSMaterial) -> Callable[[EndpointSpec], ListenerTLS]:
    """The pyOpenSSL TLS of ``ssl:`` listeners: each one's own keys if it names them,
    else the ``[tls]`` ones; TLS 1.2 at least, no client certificate asked.  Both are
    read again on reload."""

    def tls(spec: EndpointSpec) -> ListenerTLS:
        def build(identity: ServerIdentity, _: TrustRoots) -> IOpenSSLContextFactory:
            return server_context_factory(listener_identity(identity, spec), None)

        return material.listener(build)

    return tls
