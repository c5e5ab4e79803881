"""Forking (RFC 3261 §16.6) and best-response selection (§16.7 step 6)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from relayd.sip.message import Headers, SIPRequest, SIPResponse, make_response
from relayd.sip.proxy import Branch, InviteContext, Proxy, select_best
from relayd.sip.resolve import SIPResolver, SRVRecord, Target
from relayd.sip.transaction import (
    ServerTransaction,
    TransactionLayer,
    TransportError,
    local_response,
)
from relayd.sip.uas import LoopDetector
from relayd.sipuri import SIPURI


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


# -- InviteContext: §16.7 for INVITE, CANCEL (§9.1, §16.10), Timer C (§16.8) -----------


class _Invites:
    """The INVITE client transactions an :class:`InviteContext` starts (and its CANCELs)."""

    def __init__(self) -> None:
        self.sent: list[tuple[SIPRequest, Deferred[SIPResponse], Callable[..., object]]] = []

    def __call__(
        self,
        request: SIPRequest,
        target: Target,
        on_provisional: Callable[[SIPResponse], object],
        on_2xx: Callable[[SIPResponse], object],
    ) -> Deferred[SIPResponse]:
        d: Deferred[SIPResponse] = Deferred()
        self.sent.append((request, d, on_provisional))
        return d

    def methods(self) -> list[str]:
        return [request.method for request, _, _ in self.sent]

    def provisional(self, index: int, status: int = 180) -> None:
        request, _, on_provisional = self.sent[index]
        on_provisional(make_response(request, status, to_tag=f"t{index}"))

    def final(self, index: int, status: int) -> None:
        request, d, _ = self.sent[index]
        d.callback(make_response(request, status, to_tag=f"t{index}"))


class _Caller:
    """The caller's INVITE server transaction, on a real transaction layer."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.out: list[SIPResponse] = []
        self.txns: list[ServerTransaction] = []
        layer = TransactionLayer(self.clock, self.send, self)
        headers = Headers(
            [
                ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-caller"),
                ("From", "<sip:alice@example.com>;tag=a"),
                ("To", "<sip:bob@example.com>"),
                ("Call-ID", "call-1"),
                ("CSeq", "1 INVITE"),
            ]
        )
        self.invite = SIPRequest("INVITE", SIPURI.parse("sip:bob@example.com"), headers)
        layer.request_received(self.invite, ("192.0.2.1", 5060), False)
        self.txn = self.txns[0]

    def request(self, txn: ServerTransaction, request: SIPRequest) -> None:
        self.txns.append(txn)

    def send(self, message: SIPRequest | SIPResponse, destination: object) -> None:
        assert isinstance(message, SIPResponse)
        self.out.append(message)

    def statuses(self) -> list[int]:
        return [r.status for r in self.out]


def _context(branches: int = 2) -> tuple[_Caller, _Invites, InviteContext]:
    caller = _Caller()
    invites = _Invites()

    def final(responses: list[SIPResponse]) -> SIPResponse:
        return make_response(caller.invite, select_best(responses)[0])

    context = InviteContext(invites, caller.clock, caller.txn, final)
    copies = []
    for index in range(branches):
        copy = caller.invite.headers.copy()
        copy.add_first("Via", f"SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK-b{index}")
        target = Target("UDP", f"192.0.2.{10 + index}", 5060)
        copies.append((SIPRequest("INVITE", caller.invite.uri, copy), target))
    context.start(copies)
    return caller, invites, context


def test_invite_context_relays_ringing_and_the_best_final_when_no_2xx() -> None:
    caller, invites, _ = _context()
    invites.provisional(0, 100)  # §16.7 step 5: a 100 is not passed on
    invites.provisional(0)
    invites.final(0, 486)
    assert caller.statuses() == [100, 180]
    invites.final(1, 404)
    assert caller.statuses() == [100, 180, 486]
    assert caller.out[1].vias[0].branch == "z9hG4bK-caller"  # our Via popped


def test_invite_context_2xx_goes_up_and_cancels_ringing_branches() -> None:
    caller, invites, _ = _context()
    invites.provisional(1)
    invites.final(0, 200)
    assert caller.statuses() == [100, 180, 200]
    assert invites.methods() == ["INVITE", "INVITE", "CANCEL"]
    cancel = invites.sent[2][0]
    assert cancel.via.branch == "z9hG4bK-b1"
    invites.final(1, 200)  # a 2xx racing the CANCEL still goes up (RFC 6026)
    assert caller.statuses() == [100, 180, 200, 200]


def test_invite_context_6xx_answers_at_once_and_cancels_the_rest() -> None:
    caller, invites, _ = _context()
    invites.provisional(1)
    invites.final(0, 603)
    assert caller.statuses() == [100, 180, 603]
    assert invites.methods()[-1] == "CANCEL"


def test_a_cancelled_branch_without_provisional_waits_for_one_then_is_cancelled() -> None:
    caller, invites, context = _context(1)
    context.cancel()
    assert invites.methods() == ["INVITE"]  # §9.1: no CANCEL before a provisional
    invites.provisional(0)
    assert invites.methods() == ["INVITE", "CANCEL"]
    assert caller.statuses() == [100]  # the 180 after the CANCEL is not relayed


def test_a_cancelled_branch_that_never_answers_is_abandoned() -> None:
    caller, invites, context = _context(1)
    invites.provisional(0)
    context.cancel()
    outcomes: list[object] = []
    invites.sent[0][1].addBoth(outcomes.append)
    caller.clock.advance(32)  # §9.1: 64·T1 after the CANCEL
    assert len(outcomes) == 1


def test_timer_c_cancels_a_branch_that_rings_too_long_and_restarts_on_ringing() -> None:
    caller, invites, _ = _context(1)
    invites.provisional(0)
    caller.clock.advance(100)
    invites.provisional(0, 183)  # restarts Timer C
    caller.clock.advance(100)
    assert invites.methods() == ["INVITE"]
    caller.clock.advance(86)
    assert invites.methods() == ["INVITE", "CANCEL"]
    invites.final(0, 487)
    assert caller.statuses()[-1] == 487
