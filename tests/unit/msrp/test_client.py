"""relayd.msrp.client: where a client connects for a relay URI (RFC 4976 §8)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer

from relayd.msrp.client import relay_addresses
from relayd.msrp.uri import MSRPURI


class FakeLookup:
    """SRV answers from a table, already in RFC 2782 order; records what was asked."""

    def __init__(self, table: dict[str, list[tuple[str, int]]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def __call__(self, name: str) -> defer.Deferred[list[tuple[str, int]]]:
        self.asked.append(name)
        return defer.succeed(list(self.table.get(name, [])))


def addresses(uri: str, lookup: FakeLookup) -> Any:
    seen: list[Any] = []
    defer.ensureDeferred(relay_addresses(MSRPURI.parse(uri), lookup)).addBoth(seen.append)
    (value,) = seen
    return value


POOL = {
    "_msrps._tcp.pool.example.com": [("a.example.com", 2855), ("b.example.com", 2856)],
    "_msrp._tcp.pool.example.com": [("c.example.com", 2857)],
}


def test_a_domain_without_port_is_looked_up_as_srv() -> None:
    lookup = FakeLookup(POOL)
    assert addresses("msrps://pool.example.com;tcp", lookup) == [
        ("a.example.com", 2855),
        ("b.example.com", 2856),
    ]
    assert addresses("msrp://pool.example.com;tcp", lookup) == [("c.example.com", 2857)]
    assert lookup.asked == ["_msrps._tcp.pool.example.com", "_msrp._tcp.pool.example.com"]


def test_without_srv_records_the_host_itself_on_the_default_port() -> None:
    lookup = FakeLookup({})
    assert addresses("msrps://relay.example.com;tcp", lookup) == [("relay.example.com", 2855)]
    assert lookup.asked == ["_msrps._tcp.relay.example.com"]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("msrps://pool.example.com:4000;tcp", ("pool.example.com", 4000)),
        ("msrps://127.0.0.2;tcp", ("127.0.0.2", 2855)),
        ("msrps://[::1];tcp", ("::1", 2855)),
        ("msrps://localhost;tcp", ("localhost", 2855)),
    ],
)
def test_a_port_an_address_or_localhost_is_never_looked_up(
    uri: str, expected: tuple[str, int]
) -> None:
    lookup = FakeLookup(POOL)
    assert addresses(uri, lookup) == [expected]
    assert lookup.asked == []
