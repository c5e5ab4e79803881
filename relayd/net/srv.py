"""DNS SRV (RFC 2782): the look-up through ``twisted.names``, and the order to try targets in.

RFC 2782 orders targets by ascending priority and, inside one priority, by
weighted random picks: a running sum over the records (weight 0 first), the
first record whose sum reaches a random number from 0 to the total goes
next.  ``twisted.names.srvconnect.SRVConnector.pickServer`` does the same,
but only as a method of a reactor-bound connector (``connectTCP`` style,
no endpoints, no TLS) drawing from the global ``random``; here it is a
function over records with its random source given, so that the MSRP and
SIP next-hop look-ups (RFC 4976 §8, RFC 3263 §4.2) share it and tests
can fix it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

from relayd.logs import logger

log = logger()


@dataclass(frozen=True, slots=True)
class SRVRecord:
    priority: int
    weight: int
    port: int
    target: str


def order_srv(records: Iterable[SRVRecord], rng: random.Random) -> list[SRVRecord]:
    """RFC 2782 ordering: ascending priority; inside one priority, weighted random picks
    (weight-0 records keep a small chance, as the RFC's running-sum algorithm gives them).
    A ``.`` target means "service not available" and yields nothing."""
    usable = [r for r in records if r.target not in ("", ".")]
    by_priority: dict[int, list[SRVRecord]] = {}
    for record in usable:
        by_priority.setdefault(record.priority, []).append(record)
    ordered: list[SRVRecord] = []
    for priority in sorted(by_priority):
        group = sorted(by_priority[priority], key=lambda r: r.weight)  # zeros first
        while group:
            total = sum(r.weight for r in group)
            pick = rng.randint(0, total)
            running = 0
            for index, record in enumerate(group):
                running += record.weight
                if running >= pick:
                    ordered.append(group.pop(index))
                    break
    return ordered


def lookup_srv(name: str, resolver: Any = None) -> Deferred[list[SRVRecord]]:
    """The SRV records of ``name`` (a ``twisted.names`` IResolver; the system's by default).

    A failed look-up is no records, logged: the caller falls back to
    A/AAAA on the default port, as RFC 2782 and RFC 3263 §4.2 say.
    """
    from twisted.names import client, dns

    if resolver is None:
        resolver = client.getResolver()

    def found(result: tuple[list[Any], list[Any], list[Any]]) -> list[SRVRecord]:
        out = []
        for rr in result[0]:
            if rr.type == dns.SRV:
                p = rr.payload
                out.append(SRVRecord(p.priority, p.weight, p.port, p.target.name.decode()))
        return out

    def failed(failure: Any) -> list[SRVRecord]:
        log.debug(
            "DNS SRV lookup for {name} failed: {reason}",
            name=name,
            reason=failure.getErrorMessage(),
        )
        return []

    answers: Deferred[tuple[list[Any], list[Any], list[Any]]] = maybeDeferred(
        resolver.lookupService, name
    )
    return answers.addCallback(found).addErrback(failed)


def srv_targets(
    name: str, resolver: Any = None, rng: random.Random | None = None
) -> Deferred[list[tuple[str, int]]]:
    """(host, port) to try in turn for ``name``, in RFC 2782 order; empty when none."""
    chooser = rng or _RANDOM
    return lookup_srv(name, resolver).addCallback(
        lambda records: [(r.target, r.port) for r in order_srv(records, chooser)]
    )


_RANDOM = random.Random()  # noqa: S311 - load spreading, not security
