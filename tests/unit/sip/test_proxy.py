"""Forking (RFC 3261 §16.6) and best-response selection (§16.7 step 6)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from relayd.sip.message import Headers, SIPRequest, SIPResponse, make_response
from relayd.sip.proxy import Branch, Proxy, select_best
from relayd.sip.resolve import SIPResolver, SRVRecord, Target
from relayd.sip.transaction import TransportError, local_response
from relayd.sip.uas import LoopDetector
from relayd.sip.uri import SIPURI


def _r(*codes: int) -> list[SIPResponse]:
    return [SIPResponse(code, str(code)) for code in codes]


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ((), 408),
        ((404, 200, 480), 200),
        ((486, 603, 200), 200),
        ((486, 603), 603),
        ((500, 404), 404),
        ((408, 480), 480),
        ((503,), 500),
        ((503, 408), 408),
        ((407, 404), 407),
    ],
)
def test_select_best(codes: tuple[int, ...], expected: int) -> None:
    assert select_best(_r(*codes))[0] == expected


# -- Proxy.fork: parallel branches, the first 2xx answers, every branch accounted for ----


class _DNS:
    """Resolves every name to 192.0.2.9, only when told to (``answer``)."""

    def __init__(self) -> None:
        self.pending: list[Deferred[list[str]]] = []

    def lookup_srv(self, name: str) -> Deferred[list[SRVRecord]]:
        return succeed([])

    def lookup_addresses(self, name: str) -> Deferred[list[str]]:
        d: Deferred[list[str]] = Deferred()
        self.pending.append(d)
        return d

    def answer(self) -> None:
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(["192.0.2.9"])


class _Sent:
    def __init__(self) -> None:
        self.requests: list[tuple[SIPRequest, Target, Deferred[SIPResponse]]] = []

    def __call__(self, request: SIPRequest, target: Target) -> Deferred[SIPResponse]:
        d: Deferred[SIPResponse] = Deferred()
        self.requests.append((request, target, d))
        return d

    def answer(self, index: int, status: int) -> None:
        request, _, d = self.requests[index]
        d.callback(make_response(request, status))


def _proxy(dns: _DNS | None = None) -> tuple[Proxy, _Sent]:
    sent = _Sent()
    proxy = Proxy(sent, SIPResolver(dns or _DNS()), None, lambda uri: False)
    return proxy, sent


def _original() -> SIPRequest:
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-original"),
            ("From", "<sip:alice@example.com>;tag=a"),
            ("To", "<sip:list@example.com>"),
            ("Call-ID", "fork-1"),
            ("CSeq", "1 MESSAGE"),
            ("Proxy-Authorization", 'Digest username="alice"'),
        ]
    )
    return SIPRequest("MESSAGE", SIPURI.parse("sip:list@example.com"), headers, b"hi")


def _build(proxy: Proxy) -> Callable[[Branch], SIPRequest]:
    original = _original()
    return lambda branch: proxy.forward_copy(original, branch.uri, 69)


MEMBERS = ["sip:a@192.0.2.1:5070", "sip:b@192.0.2.2", "sip:c@[2001:db8::3]:5080"]


def test_fork_sends_every_copy_at_once_and_answers_on_the_first_2xx() -> None:
    proxy, sent = _proxy()
    results: list[tuple[int, str, list[SIPResponse]]] = []
    proxy.fork(MEMBERS, _build(proxy)).addCallback(results.append)
    assert [str(target) for _, target, _ in sent.requests] == [
        str(Target("UDP", "192.0.2.1", 5070)),
        str(Target("UDP", "192.0.2.2", 5060)),
        str(Target("UDP", "2001:db8::3", 5080)),
    ]
    copy = sent.requests[0][0]
    assert copy.uri.format() == MEMBERS[0]
    assert copy.headers.get("proxy-authorization") is None
    assert copy.headers.get("max-forwards") == "69"
    assert len(copy.headers.get_all("via")) == 2
    sent.answer(0, 486)
    assert results == []
    sent.answer(1, 200)
    assert [(status, len(seen)) for status, _, seen in results] == [(200, 2)]
    sent.answer(2, 404)  # the last branch still completes, nothing fires twice
    assert len(results) == 1


def test_fork_without_2xx_picks_the_best_response_when_all_branches_end() -> None:
    proxy, sent = _proxy()
    results: list[tuple[int, str, list[SIPResponse]]] = []
    proxy.fork(MEMBERS, _build(proxy)).addCallback(results.append)
    for index, status in enumerate((503, 486, 404)):
        assert results == []
        sent.answer(index, status)
    ((status, _, seen),) = results
    assert status == select_best(seen)[0]
    assert sorted(r.status for r in seen) == [404, 486, 503]


def test_fork_counts_unusable_members_and_failed_builds() -> None:
    proxy, sent = _proxy()
    original = _original()

    def build(branch: Branch) -> SIPRequest:
        if branch.member == MEMBERS[1]:
            raise RuntimeError("cannot build")
        return proxy.forward_copy(original, branch.uri, 69)

    results: list[tuple[int, str, list[SIPResponse]]] = []
    proxy.fork([MEMBERS[0], MEMBERS[1], "not a uri"], build).addCallback(results.append)
    assert len(sent.requests) == 1
    sent.answer(0, 480)
    ((_, _, seen),) = results
    assert sorted(r.status for r in seen) == [404, 480, 500]


def test_fork_waits_for_dns_when_a_member_needs_it() -> None:
    dns = _DNS()
    proxy, sent = _proxy(dns)
    results: list[tuple[int, str, list[SIPResponse]]] = []
    proxy.fork([MEMBERS[0], "sip:d@example.net:5060"], _build(proxy)).addCallback(results.append)
    assert sent.requests == []  # nothing leaves before every member is located
    dns.answer()
    assert [str(t) for _, t, _ in sent.requests] == [
        str(Target("UDP", "192.0.2.1", 5070)),
        str(Target("UDP", "192.0.2.9", 5060)),
    ]
    sent.answer(1, 202)
    assert results[0][0] == 202


def test_a_send_that_fails_counts_as_503() -> None:
    sent_error = RuntimeError("no listener")

    def refuse(request: SIPRequest, target: Target) -> Deferred[SIPResponse]:
        raise sent_error

    proxy = Proxy(refuse, SIPResolver(_DNS()), None, lambda uri: False)
    results: list[tuple[int, str, list[SIPResponse]]] = []
    proxy.fork(MEMBERS[:1], _build(proxy)).addCallback(results.append)
    assert [r.status for r in results[0][2]] == [503]


# -- RFC 3263 §4.3: failover between the targets of one URI ----------------------------


class _SRVDNS:
    """``example.net`` has two SIP servers over UDP, on two loopback addresses."""

    def lookup_srv(self, name: str) -> Deferred[list[SRVRecord]]:
        if name != "_sip._udp.example.net":
            return succeed([])
        return succeed(
            [SRVRecord(10, 0, 5060, "a.example.net"), SRVRecord(20, 0, 5062, "b.example.net")]
        )

    def lookup_addresses(self, name: str) -> Deferred[list[str]]:
        return succeed({"a.example.net": ["127.0.0.2"], "b.example.net": ["127.0.0.3"]}[name])


def _failover_proxy(
    detector: LoopDetector | None = None,
) -> tuple[Proxy, _Sent, Clock, list[tuple[int, str, list[SIPResponse]]]]:
    sent = _Sent()
    clock = Clock()
    proxy = Proxy(sent, SIPResolver(_SRVDNS()), None, lambda uri: False, detector, clock=clock)
    results: list[tuple[int, str, list[SIPResponse]]] = []
    original = _original()
    proxy.fork(
        ["sip:d@example.net"], lambda branch: proxy.forward_copy(original, branch.uri, 69)
    ).addCallback(results.append)
    return proxy, sent, clock, results


def test_503_fails_over_to_the_next_target_as_a_new_transaction() -> None:
    detector = LoopDetector(lambda: set(), key=b"k" * 32)
    _, sent, _, results = _failover_proxy(detector)
    assert [str(t) for _, t, _ in sent.requests] == ["udp:127.0.0.2:5060"]
    sent.answer(0, 503)
    assert [str(t) for _, t, _ in sent.requests] == ["udp:127.0.0.2:5060", "udp:127.0.0.3:5062"]
    first, second = sent.requests[0][0], sent.requests[1][0]
    assert first.via.branch != second.via.branch
    # The loop-detection hash stays; only the random part is new (§16.6 step 8).
    assert (first.via.branch or "").split(".")[0] == (second.via.branch or "").split(".")[0]
    assert second.headers.get_all("via")[1:] == first.headers.get_all("via")[1:]
    assert (second.call_id, second.headers.get("cseq"), second.body) == (
        first.call_id,
        first.headers.get("cseq"),
        first.body,
    )
    sent.answer(1, 200)
    assert [status for status, _, _ in results] == [200]


def test_transport_failure_and_silence_fail_over_but_a_peers_408_does_not() -> None:
    _, sent, _, results = _failover_proxy()
    sent.requests[0][2].errback(TransportError("ICMP port unreachable"))
    assert len(sent.requests) == 2
    request, _, d = sent.requests[1]
    d.callback(make_response(request, 408))  # a downstream element's own answer
    assert len(sent.requests) == 2
    assert [status for status, _, _ in results] == [408]

    _, sent, _, results = _failover_proxy()
    request, _, d = sent.requests[0]
    d.callback(local_response(request, 408))  # Timer F with no response at all
    assert len(sent.requests) == 2


def test_failover_stops_when_the_branch_time_is_up() -> None:
    _, sent, clock, results = _failover_proxy()
    clock.advance(32)
    sent.answer(0, 503)  # too late for another target
    assert len(sent.requests) == 1
    assert [status for status, _, _ in results] == [500]  # a 503 is never passed on


def test_an_attempt_running_past_the_branch_time_is_abandoned() -> None:
    _, sent, clock, results = _failover_proxy()
    clock.advance(10)
    sent.answer(0, 503)
    second = sent.requests[1][2]
    clock.advance(21.9)
    assert results == []
    clock.advance(0.1)
    assert second.called  # cancelled: its client transaction is forgotten
    assert [status for status, _, _ in results] == [408]
