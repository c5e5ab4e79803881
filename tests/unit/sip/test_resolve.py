"""RFC 3263 resolution against a dictionary-backed DNS; no network."""

from __future__ import annotations

import random

import pytest
from twisted.internet.defer import Deferred, succeed

from relayd.sip.resolve import (
    ResolveError,
    SIPResolver,
    SRVRecord,
    Target,
    TwistedNamesResolver,
    order_srv,
)
from relayd.sipuri import SIPURI


class FakeDNS:
    def __init__(
        self,
        srv: dict[str, list[SRVRecord]] | None = None,
        addresses: dict[str, list[str]] | None = None,
    ) -> None:
        self.srv = srv or {}
        self.addresses = addresses or {}
        self.queries: list[str] = []

    def lookup_srv(self, name: str) -> Deferred[list[SRVRecord]]:
        self.queries.append("SRV " + name)
        return succeed(list(self.srv.get(name, [])))

    def lookup_addresses(self, name: str) -> Deferred[list[str]]:
        self.queries.append("A " + name)
        return succeed(list(self.addresses.get(name, [])))


def resolve(dns: FakeDNS, uri: str, **kwargs: object) -> list[Target]:
    resolver = SIPResolver(dns, rng=random.Random(1), **kwargs)  # type: ignore[arg-type]
    d = Deferred.fromCoroutine(resolver.resolve(SIPURI.parse(uri)))
    results: list[object] = []
    d.addBoth(results.append)
    value = results[0]
    if isinstance(value, Exception):
        raise value
    if hasattr(value, "raiseException"):
        value.raiseException()
    assert isinstance(value, list)
    return value


def test_numeric_host_needs_no_dns() -> None:
    dns = FakeDNS()
    assert resolve(dns, "sip:bob@192.0.2.7") == [Target("UDP", "192.0.2.7", 5060)]
    assert resolve(dns, "sips:bob@192.0.2.7") == [Target("TLS", "192.0.2.7", 5061, "192.0.2.7")]
    assert resolve(dns, "sip:bob@[2001:db8::0001]:5070;transport=tcp") == [
        Target("TCP", "2001:db8::1", 5070)
    ]
    assert dns.queries == []


def test_explicit_port_uses_address_records_only() -> None:
    dns = FakeDNS(addresses={"example.com": ["192.0.2.1", "2001:db8::1"]})
    targets = resolve(dns, "sip:bob@example.com:5080")
    assert targets == [Target("UDP", "192.0.2.1", 5080), Target("UDP", "2001:db8::1", 5080)]
    assert dns.queries == ["A example.com"]


def test_srv_priority_order_and_transport_preference() -> None:
    dns = FakeDNS(
        srv={
            "_sip._udp.example.com": [
                SRVRecord(20, 0, 5062, "b.example.com"),
                SRVRecord(10, 0, 5061, "a.example.com"),
            ],
            "_sip._tcp.example.com": [SRVRecord(10, 0, 5060, "c.example.com")],
        },
        addresses={
            "a.example.com": ["192.0.2.1"],
            "b.example.com": ["192.0.2.2"],
            "c.example.com": ["192.0.2.3"],
        },
    )
    assert resolve(dns, "sip:bob@example.com") == [
        Target("UDP", "192.0.2.1", 5061),
        Target("UDP", "192.0.2.2", 5062),
        Target("TCP", "192.0.2.3", 5060),
    ]


def test_transport_param_limits_srv_query() -> None:
    dns = FakeDNS(
        srv={"_sip._tcp.example.com": [SRVRecord(1, 0, 5090, "c.example.com")]},
        addresses={"c.example.com": ["192.0.2.3"]},
    )
    assert resolve(dns, "sip:bob@example.com;transport=TCP") == [Target("TCP", "192.0.2.3", 5090)]
    assert dns.queries == ["SRV _sip._tcp.example.com", "A c.example.com"]


def test_sips_uses_sips_srv_and_keeps_domain_for_certificate_check() -> None:
    dns = FakeDNS(
        srv={"_sips._tcp.example.com": [SRVRecord(1, 0, 5061, "tls.example.net")]},
        addresses={"tls.example.net": ["192.0.2.9"]},
    )
    assert resolve(dns, "sips:bob@example.com") == [Target("TLS", "192.0.2.9", 5061, "example.com")]


def test_no_srv_falls_back_to_address_on_default_port() -> None:
    dns = FakeDNS(addresses={"example.com": ["192.0.2.5"]})
    assert resolve(dns, "sip:bob@example.com") == [Target("UDP", "192.0.2.5", 5060)]
    dns = FakeDNS(addresses={"example.com": ["192.0.2.5"]})
    assert resolve(dns, "sips:bob@example.com") == [Target("TLS", "192.0.2.5", 5061, "example.com")]


def test_maddr_overrides_host() -> None:
    assert resolve(FakeDNS(), "sip:bob@example.com;maddr=192.0.2.44") == [
        Target("UDP", "192.0.2.44", 5060)
    ]


def test_nothing_found_is_an_error() -> None:
    with pytest.raises(ResolveError):
        resolve(FakeDNS(), "sip:bob@nowhere.example")


def test_unsupported_transport_is_an_error() -> None:
    with pytest.raises(ResolveError):
        resolve(FakeDNS(), "sip:bob@192.0.2.1;transport=sctp")
    with pytest.raises(ResolveError):
        resolve(FakeDNS(), "sips:bob@192.0.2.1", transports=("UDP", "TCP"))


def test_order_srv_weights_and_dot_target() -> None:
    records = [SRVRecord(1, 0, 1, "zero"), SRVRecord(1, 100, 2, "heavy"), SRVRecord(0, 5, 3, ".")]
    firsts = [order_srv(records, random.Random(seed))[0].target for seed in range(200)]
    assert firsts.count("heavy") > 150
    assert all(len(order_srv(records, random.Random(s))) == 2 for s in range(10))


def test_twisted_names_adapter_reads_srv_and_addresses() -> None:
    from twisted.names import dns

    class Names:
        def lookupService(self, name: str) -> Deferred[object]:
            rr = dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(1, 2, 5060, "sip.example"))
            return succeed(([rr], [], []))

        def lookupAddress(self, name: str) -> Deferred[object]:
            return succeed(([dns.RRHeader(name, dns.A, payload=dns.Record_A("192.0.2.1"))], [], []))

        def lookupIPV6Address(self, name: str) -> Deferred[object]:
            from twisted.internet.defer import fail
            from twisted.names.error import DNSNameError

            return fail(DNSNameError())

    adapter = TwistedNamesResolver(Names())
    srv: list[object] = []
    adapter.lookup_srv("_sip._udp.example").addCallback(srv.append)
    assert srv == [[SRVRecord(1, 2, 5060, "sip.example")]]
    addresses: list[object] = []
    adapter.lookup_addresses("sip.example").addCallback(addresses.append)
    assert addresses == [["192.0.2.1"]]
