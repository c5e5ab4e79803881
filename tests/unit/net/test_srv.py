"""relayd.net.srv: RFC 2782 order of SRV targets, looked up through twisted.names."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from twisted.internet import defer
from twisted.names import dns, error

from relayd.net.srv import SRVRecord, lookup_srv, order_srv, srv_targets


class FakeResolver:
    """A twisted.names IResolver answering lookupService from a table."""

    def __init__(self, records: dict[str, list[tuple[int, int, int, str | bytes]]]) -> None:
        self.records = records
        self.asked: list[str] = []

    def lookupService(self, name: str) -> defer.Deferred[Any]:
        self.asked.append(name)
        if name not in self.records:
            return defer.fail(error.DNSNameError(name))
        answers = [
            dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(p, w, port, target))
            for p, w, port, target in self.records[name]
        ]
        answers.append(dns.RRHeader(name, dns.A, payload=dns.Record_A("192.0.2.1")))
        return defer.succeed((answers, [], []))


def fired(d: defer.Deferred[Any]) -> Any:
    seen: list[Any] = []
    d.addBoth(seen.append)
    (value,) = seen
    return value


def test_lower_priority_always_comes_first() -> None:
    records = [SRVRecord(20, 100, 1, "b"), SRVRecord(10, 0, 2, "a"), SRVRecord(30, 5, 3, "c")]
    for seed in range(20):
        ordered = order_srv(records, random.Random(seed))
        assert [r.target for r in ordered] == ["a", "b", "c"]


def test_weights_share_the_first_place_in_proportion() -> None:
    records = [SRVRecord(10, 90, 1, "heavy"), SRVRecord(10, 10, 2, "light")]
    rng = random.Random(7)
    firsts = Counter(order_srv(records, rng)[0].target for _ in range(2000))
    assert 1650 < firsts["heavy"] < 1950
    assert firsts["light"] > 50


def test_equal_weights_are_not_ordered_by_name() -> None:
    records = [SRVRecord(10, 1, 1, "a"), SRVRecord(10, 1, 2, "b")]
    rng = random.Random(3)
    firsts = {order_srv(records, rng)[0].target for _ in range(100)}
    assert firsts == {"a", "b"}


def test_a_dot_target_means_no_service() -> None:
    assert order_srv([SRVRecord(0, 0, 0, ".")], random.Random(1)) == []


def test_lookup_keeps_only_srv_answers() -> None:
    resolver = FakeResolver({"_msrps._tcp.example.com": [(10, 5, 2856, "r1.example.com")]})
    records = fired(lookup_srv("_msrps._tcp.example.com", resolver))
    assert records == [SRVRecord(10, 5, 2856, "r1.example.com")]


def test_a_failed_lookup_is_no_records() -> None:
    assert fired(lookup_srv("_msrps._tcp.missing.example", FakeResolver({}))) == []


def test_a_resolver_that_raises_is_no_records() -> None:
    class Broken:
        def lookupService(self, name: str) -> defer.Deferred[Any]:
            raise OSError("no resolv.conf")

    assert fired(lookup_srv("_msrp._tcp.example.com", Broken())) == []


def test_targets_come_in_rfc_2782_order() -> None:
    resolver = FakeResolver(
        {
            "_msrps._tcp.example.com": [
                (20, 0, 2857, "backup.example.com"),
                (10, 0, 2856, "main.example.com"),
                (10, 0, 0, b"."),  # as decoded from the wire: "not available"
            ]
        }
    )
    targets = fired(srv_targets("_msrps._tcp.example.com", resolver, random.Random(0)))
    assert targets == [("main.example.com", 2856), ("backup.example.com", 2857)]
    assert resolver.asked == ["_msrps._tcp.example.com"]
