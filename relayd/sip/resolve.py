"""RFC 3263 next-hop resolution: a SIP URI → an ordered list of (transport, IP, port).

Implemented: §4.1 transport selection (``transport=`` parameter, ``sips`` → TLS, numeric
host or explicit port → UDP/TLS default), §4.2 (explicit port or numeric host → A/AAAA
only; otherwise SRV ``_sip._udp``/``_sip._tcp``/``_sips._tcp``, then A/AAAA on the default
port 5060/5061), RFC 2782 SRV ordering (:mod:`relayd.net.srv`, shared with MSRP), ``maddr``.
Not implemented: NAPTR (§4.1 step 1). Without NAPTR, §4.1 tells the client to try SRV for
every transport it supports, which is what :meth:`SIPResolver.resolve` does.

DNS sits behind the small :class:`IDNSResolver` protocol so tests pass a dictionary-backed
fake; :class:`TwistedNamesResolver` adapts ``twisted.names.client``.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from relayd.bounded import remember
from relayd.logs import logger
from relayd.net.srv import SRVRecord, lookup_srv, order_srv
from relayd.sipuri import SIPURI

__all__ = [
    "DEFAULT_PORTS",
    "IDNSResolver",
    "ResolveError",
    "SIPResolver",
    "SRVRecord",
    "Target",
    "TwistedNamesResolver",
    "is_numeric_host",
    "order_srv",
]

log = logger()

DEFAULT_PORTS = {"UDP": 5060, "TCP": 5060, "TLS": 5061}
"""RFC 3261 §19.1.2 default ports per transport."""

_SRV_PREFIX = {"UDP": "_sip._udp.", "TCP": "_sip._tcp.", "TLS": "_sips._tcp."}
_TRANSPORT_PARAM = {"udp": "UDP", "tcp": "TCP", "tls": "TLS"}
MAX_TARGETS = 16
"""Cap on returned targets: a hostile zone cannot make us try hundreds of hosts."""


class ResolveError(Exception):
    """No usable next hop: unsupported transport, or DNS returned nothing."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send a request: a transport, a numeric address and a port.

    ``server_name`` is the name a TLS peer certificate must match (the URI host, RFC 5922
    §4), ``None`` for plain transports.
    """

    transport: str
    host: str
    port: int
    server_name: str | None = None

    @property
    def reliable(self) -> bool:
        return self.transport != "UDP"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport.lower()}:{host}:{self.port}"


class IDNSResolver(Protocol):
    """The two DNS questions RFC 3263 needs. Failures are empty lists, not errors."""

    def lookup_srv(self, name: str) -> Deferred[list[SRVRecord]]: ...

    def lookup_addresses(self, name: str) -> Deferred[list[str]]:
        """A and AAAA records, IPv4 first, as numeric strings."""
        ...


def is_numeric_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class TwistedNamesResolver:
    """:class:`IDNSResolver` over ``twisted.names`` (the system resolver configuration)."""

    def __init__(self, resolver: Any = None) -> None:
        if resolver is None:
            from twisted.names import client

            resolver = client.getResolver()
        self._resolver = resolver

    def lookup_srv(self, name: str) -> Deferred[list[SRVRecord]]:
        return lookup_srv(name, self._resolver)

    def lookup_addresses(self, name: str) -> Deferred[list[str]]:
        from twisted.internet.defer import DeferredList
        from twisted.names import dns

        def collect(results: list[tuple[bool, Any]]) -> list[str]:
            out: list[str] = []
            for ok, value in results:
                if not ok:
                    continue
                for rr in value[0]:
                    if rr.type == dns.A:
                        out.append(rr.payload.dottedQuad())
                    elif rr.type == dns.AAAA:
                        out.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
            return out

        queries = [self._resolver.lookupAddress(name), self._resolver.lookupIPV6Address(name)]
        return DeferredList(queries, consumeErrors=True).addCallback(collect)


MAX_CACHED_URIS = 4096
"""Numeric URIs whose targets :meth:`SIPResolver.resolve_now` remembers."""


class SIPResolver:
    """Turns a SIP URI into targets to try in order (RFC 3263 §4.3 failover).

    ``transports`` lists what we can send on, in preference order; a URI that demands
    another one is a :class:`ResolveError`.
    """

    def __init__(
        self,
        dns: IDNSResolver | None = None,
        *,
        transports: Sequence[str] = ("UDP", "TCP", "TLS"),
        rng: random.Random | None = None,
    ) -> None:
        self._dns = dns
        self.transports = tuple(transports)
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        # Keyed by what resolution reads, not by SIPURI equality (§19.1.4 equality
        # ignores a transport parameter present on one side only).
        self._numeric: dict[tuple[object, ...], list[Target]] = {}

    @property
    def dns(self) -> IDNSResolver:
        if self._dns is None:
            self._dns = TwistedNamesResolver()
        return self._dns

    def _transport_for(self, uri: SIPURI, numeric_or_port: bool) -> str | None:
        """§4.1: the transport fixed by the URI, or None when SRV should choose."""
        secure = uri.scheme == "sips"
        param = uri.transport
        if param is not None:
            transport = _TRANSPORT_PARAM.get(param)
            if transport is None:
                raise ResolveError(f"unsupported transport={param}")
            if secure and transport != "TLS":
                transport = "TLS"  # sips over TCP is TLS (§26.2.2 transport=tcp)
            return transport
        if secure:
            return "TLS"
        return "UDP" if numeric_or_port else None

    def resolve_now(self, uri: SIPURI) -> list[Target] | None:
        """The targets of a URI that needs no DNS (a numeric host), else ``None``.

        Registered contacts are nearly always numeric and are resolved for every relayed
        request, so the answers are remembered.
        """
        key = (uri.scheme, uri.host, uri.port, uri.params)
        known = self._numeric.get(key)
        if known is not None:
            return list(known)
        host = uri.param("maddr") or uri.host
        if not host or not is_numeric_host(host):
            return None
        transport = self._transport_for(uri, True)
        assert transport is not None
        if transport not in self.transports:
            raise ResolveError(f"transport {transport} not available")
        name = uri.host if transport == "TLS" or uri.scheme == "sips" else None
        port = uri.port or DEFAULT_PORTS[transport]
        targets = [Target(transport, ipaddress.ip_address(host).compressed, port, name)]
        remember(self._numeric, MAX_CACHED_URIS, key, targets)
        return list(targets)

    async def resolve(self, uri: SIPURI) -> list[Target]:
        """Targets for ``uri`` (IPs only), most preferred first."""
        host = uri.param("maddr") or uri.host
        if not host:
            raise ResolveError(f"no host in {uri.aor}")
        known = self.resolve_now(uri)
        if known is not None:
            return known
        transport = self._transport_for(uri, uri.port is not None)
        if transport is not None and transport not in self.transports:
            raise ResolveError(f"transport {transport} not available")
        name = uri.host if transport == "TLS" or uri.scheme == "sips" else None
        if uri.port is not None:
            assert transport is not None
            return self._finish(await self._addresses(host, transport, uri.port, name), uri)
        # No port: SRV (§4.2), for the one transport the URI fixed, else for each we have.
        candidates = [transport] if transport else [t for t in self.transports if t != "TLS"]
        targets: list[Target] = []
        for each in candidates:
            for record in order_srv(await self.dns.lookup_srv(_SRV_PREFIX[each] + host), self._rng):
                targets += await self._addresses(record.target, each, record.port, name)
                if len(targets) >= MAX_TARGETS:
                    return self._finish(targets, uri)
        if not targets:
            # §4.2: no SRV records → A/AAAA of the host on the transport's default port.
            fallback = transport or self.transports[0]
            targets = await self._addresses(host, fallback, DEFAULT_PORTS[fallback], name)
        return self._finish(targets, uri)

    async def _addresses(
        self, host: str, transport: str, port: int, name: str | None
    ) -> list[Target]:
        if is_numeric_host(host):
            return [Target(transport, host, port, name)]
        return [Target(transport, ip, port, name) for ip in await self.dns.lookup_addresses(host)]

    def _finish(self, targets: list[Target], uri: SIPURI) -> list[Target]:
        seen: set[Target] = set()
        out: list[Target] = []
        for target in targets:
            if target not in seen:
                seen.add(target)
                out.append(target)
        if not out:
            raise ResolveError(f"no address for {uri.aor}")
        return out[:MAX_TARGETS]
