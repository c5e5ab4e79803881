"""RFC 3261 §17 transactions driven by a fake clock; no sockets."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from relayd.sip.message import (
    Headers,
    SIPRequest,
    SIPResponse,
    SIPStatus,
    make_response,
)
from relayd.sip.transaction import (
    LocalResponse,
    ServerTransaction,
    SIPTimers,
    TransactionLayer,
    TransactionState,
    TransportError,
    cancel_for,
    new_branch,
)
from relayd.sipuri import SIPURI

PEER = ("192.0.2.1", 5060)


class RecordingSend:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, SIPRequest | SIPResponse, object]] = []
        self.fail = False

    def __call__(self, message: SIPRequest | SIPResponse, destination: object) -> None:
        if self.fail:
            raise OSError("network unreachable")
        self.sent.append((self.clock.seconds(), message, destination))

    def times(self) -> list[float]:
        return [t for t, _, _ in self.sent]

    def statuses(self) -> list[int]:
        return [m.status for _, m, _ in self.sent if isinstance(m, SIPResponse)]


class RecordingTU:
    """Answers with ``answer(request)`` if given, otherwise keeps the transaction."""

    def __init__(self, answer: Callable[[SIPRequest], SIPResponse] | None = None) -> None:
        self.answer = answer
        self.calls: list[tuple[ServerTransaction, SIPRequest]] = []
        self.raise_: Exception | None = None

    def request(self, txn: ServerTransaction, request: SIPRequest) -> None:
        self.calls.append((txn, request))
        if self.raise_ is not None:
            raise self.raise_
        if self.answer is not None:
            txn.respond(self.answer(request))


def _request(
    method: str = "MESSAGE",
    branch: str = "z9hG4bKabc",
    sent_by: str = "192.0.2.1:5060",
    cseq_method: str | None = None,
) -> SIPRequest:
    headers = Headers(
        [
            ("Via", f"SIP/2.0/UDP {sent_by};branch={branch}"),
            ("From", "<sip:alice@example.com>;tag=a1"),
            ("To", "<sip:bob@example.com>"),
            ("Call-ID", "call-1"),
            ("CSeq", f"1 {cseq_method or method}"),
            ("Max-Forwards", "70"),
        ]
    )
    return SIPRequest(method, SIPURI.parse("sip:bob@example.com"), headers)


def _layer(
    tu: RecordingTU | None = None, max_server_transactions: int = 1000
) -> tuple[Clock, RecordingSend, RecordingTU, TransactionLayer]:
    clock = Clock()
    send = RecordingSend(clock)
    tu = tu or RecordingTU(lambda r: make_response(r, 200))
    layer = TransactionLayer(clock, send, tu, max_server_transactions=max_server_transactions)
    return clock, send, tu, layer


def _state(txn: ServerTransaction) -> TransactionState:
    return txn.state


def _advance(clock: Clock, until: float, step: float = 0.25) -> None:
    while clock.seconds() < until:
        clock.advance(step)


# ------------------------------------------------------------------ non-INVITE client


def test_client_timer_e_schedule_and_timer_f_408() -> None:
    clock, send, _, layer = _layer()
    results: list[SIPResponse] = []
    layer.client_request(_request(branch=new_branch()), PEER, reliable=False).addCallback(
        results.append
    )
    _advance(clock, 40)
    # Sent at 0, then E fires after 0.5, 1, 2, 4, 4, 4... (doubling up to T2), until F at 32.
    assert send.times() == [0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert all(m is send.sent[0][1] for _, m, _ in send.sent)
    assert all(dest == PEER for _, _, dest in send.sent)
    assert len(results) == 1
    assert results[0].status == 408
    assert layer.client_transaction_count == 0


def test_client_timer_f_fires_at_exactly_64_t1() -> None:
    clock, _, _, layer = _layer()
    results: list[SIPResponse] = []
    layer.client_request(_request(branch=new_branch()), PEER, reliable=False).addCallback(
        results.append
    )
    clock.advance(31.99)
    assert results == []
    clock.advance(0.01)
    assert [r.status for r in results] == [408]


def test_client_proceeding_retransmits_every_t2() -> None:
    clock, send, _, layer = _layer()
    request = _request(branch=new_branch())
    provisional: list[int] = []
    layer.client_request(
        request, PEER, False, on_provisional=lambda r: provisional.append(r.status)
    )
    clock.advance(0.5)  # first retransmission; next E interval is 1 s
    layer.response_received(make_response(request, 100), PEER)
    assert provisional == [100]
    _advance(clock, 10)
    # Proceeding: the pending E (due at 1.5) fires, then every T2.
    assert send.times() == [0, 0.5, 1.5, 5.5, 9.5]


def test_client_final_response_fires_once_and_timer_k_absorbs() -> None:
    clock, send, _, layer = _layer()
    request = _request(branch=new_branch())
    results: list[SIPResponse] = []
    layer.client_request(request, PEER, False).addCallback(results.append)
    clock.advance(0.5)
    ok = make_response(request, 200)
    layer.response_received(ok, PEER)
    layer.response_received(make_response(request, 200), PEER)  # retransmission: absorbed
    assert results == [ok]
    assert layer.client_transaction_count == 1  # Completed, Timer K running
    clock.advance(4.99)
    assert layer.client_transaction_count == 1
    clock.advance(0.01)
    assert layer.client_transaction_count == 0
    _advance(clock, 40)
    assert send.times() == [0, 0.5]  # no retransmission after the final response
    assert results == [ok]  # no 408 either


def test_client_releases_the_request_once_completed() -> None:
    """Timer K only absorbs responses: the request (one per fork branch) is let go."""
    clock, _, _, layer = _layer()
    request = _request(branch=new_branch())
    layer.client_request(request, PEER, False)
    (txn,) = layer._client.values()
    assert txn.request is request
    layer.response_received(make_response(request, 200), PEER)
    assert layer.client_transaction_count == 1
    with pytest.raises(RuntimeError):
        txn.request  # noqa: B018
    clock.advance(5)
    assert layer.client_transaction_count == 0


def test_client_reliable_no_retransmission_and_k_is_zero() -> None:
    clock, send, _, layer = _layer()
    request = _request(branch=new_branch())
    results: list[SIPResponse] = []
    layer.client_request(request, PEER, reliable=True).addCallback(results.append)
    _advance(clock, 10)
    assert send.times() == [0]
    layer.response_received(make_response(request, 470), PEER)
    assert [r.status for r in results] == [470]
    assert layer.client_transaction_count == 0


def test_client_reliable_timer_f_still_applies() -> None:
    clock, _, _, layer = _layer()
    results: list[SIPResponse] = []
    layer.client_request(_request(branch=new_branch()), PEER, True).addCallback(results.append)
    clock.advance(32)
    assert [r.status for r in results] == [408]


def test_client_response_matching_needs_branch_and_cseq_method() -> None:
    _clock, _, _, layer = _layer()
    request = _request(branch="z9hG4bKmine")
    results: list[SIPResponse] = []
    layer.client_request(request, PEER, True).addCallback(results.append)
    layer.response_received(make_response(_request(branch="z9hG4bKother"), 200), PEER)
    wrong_method = make_response(request, 200)
    wrong_method.headers.set("CSeq", "1 OPTIONS")
    layer.response_received(wrong_method, PEER)
    broken = make_response(request, 200)
    broken.headers.remove("Via")
    layer.response_received(broken, PEER)
    assert results == []
    layer.response_received(make_response(request, 202), PEER)
    assert [r.status for r in results] == [202]


def test_client_cancelling_the_deferred_abandons_the_transaction() -> None:
    clock, send, _, layer = _layer()
    d = layer.client_request(_request(branch=new_branch()), PEER, False)
    failures: list[object] = []

    def on_error(failure: Failure) -> None:
        failures.append(failure.type)

    d.addErrback(on_error)
    d.cancel()
    assert failures == [CancelledError]
    assert layer.client_transaction_count == 0
    _advance(clock, 40)
    assert send.times() == [0]


def test_client_transport_error_is_503() -> None:
    _, send, _, layer = _layer()
    send.fail = True
    results: list[SIPResponse] = []
    layer.client_request(_request(branch=new_branch()), PEER, True).addCallback(results.append)
    assert [r.status for r in results] == [503]
    assert layer.client_transaction_count == 0


def test_client_request_validation() -> None:
    _, _, _, layer = _layer()
    with pytest.raises(ValueError, match="branch"):
        layer.client_request(_request(branch="old-style"), PEER, True)
    with pytest.raises(ValueError, match="ACK"):
        layer.client_request(_request("ACK", branch=new_branch()), PEER, True)
    request = _request(branch="z9hG4bKdup")
    layer.client_request(request, PEER, True)
    with pytest.raises(ValueError, match="in use"):
        layer.client_request(request, PEER, True)


def test_custom_timers() -> None:
    clock = Clock()
    send = RecordingSend(clock)
    timers = SIPTimers(t1_seconds=0.125, t2_seconds=0.5)
    layer = TransactionLayer(clock, send, RecordingTU(), timers)
    results: list[SIPResponse] = []
    layer.client_request(_request(branch=new_branch()), PEER, False).addCallback(results.append)
    _advance(clock, 7.875, step=0.125)
    assert send.times()[:5] == [0, 0.125, 0.375, 0.875, 1.375]
    assert results == []
    clock.advance(0.125)
    assert [r.status for r in results] == [408]  # 64 * T1 = 8 s


def test_new_branch_is_unique_and_has_magic_cookie() -> None:
    branches = {new_branch() for _ in range(100)}
    assert len(branches) == 100
    assert all(b.startswith("z9hG4bK") and len(b) > 20 for b in branches)


# ------------------------------------------------------------------ non-INVITE server


def test_server_absorbs_retransmissions_and_resends_final_until_timer_j() -> None:
    clock, send, tu, layer = _layer()
    layer.request_received(_request(), PEER, reliable=False)
    assert len(tu.calls) == 1
    final = send.sent[0][1]
    clock.advance(1)
    layer.request_received(_request(), PEER, reliable=False)
    assert len(tu.calls) == 1
    assert [m for _, m, _ in send.sent] == [final, final]  # the very same response again
    txn = tu.calls[0][0]
    assert txn.state is TransactionState.COMPLETED
    clock.advance(30.99)  # Timer J = 64*T1 from the final response at t=0
    assert layer.server_transaction_count == 1
    clock.advance(0.01)
    assert layer.server_transaction_count == 0
    assert _state(txn) is TransactionState.TERMINATED
    layer.request_received(_request(), PEER, reliable=False)
    assert len(tu.calls) == 2  # a new transaction once J has fired


def test_screened_requests_are_answered_without_a_transaction() -> None:
    clock, send, tu, layer = _layer()
    screened: list[SIPRequest] = []

    def screen(request: SIPRequest) -> SIPResponse | None:
        screened.append(request)
        return make_response(request, 407) if request.method == "MESSAGE" else None

    layer.screen = screen
    layer.request_received(_request(), PEER, reliable=False)
    layer.request_received(_request(), PEER, reliable=False)  # a retransmission: again
    assert send.statuses() == [407, 407]
    assert [d for _, _, d in send.sent] == [PEER, PEER]
    assert tu.calls == [] and layer.server_transaction_count == 0
    layer.request_received(_request("OPTIONS"), PEER, reliable=False)
    assert len(tu.calls) == 1 and layer.server_transaction_count == 1  # not screened
    assert [r.method for r in screened] == ["MESSAGE", "MESSAGE", "OPTIONS"]
    layer.request_received(_request("OPTIONS"), PEER, reliable=False)
    assert len(screened) == 3  # a retransmission of a stateful request meets its transaction
    clock.advance(32)


def test_server_reliable_timer_j_is_zero() -> None:
    _, _, tu, layer = _layer()
    layer.request_received(_request(), PEER, reliable=True)
    assert layer.server_transaction_count == 0
    assert tu.calls[0][0].state is TransactionState.TERMINATED


def test_server_trying_absorbs_then_proceeding_resends_provisional() -> None:
    _clock, send, tu, layer = _layer(RecordingTU())
    layer.request_received(_request(), PEER, False)
    layer.request_received(_request(), PEER, False)
    assert send.sent == []  # Trying: retransmission absorbed, nothing to resend
    txn, request = tu.calls[0]
    trying = make_response(request, 100)
    txn.respond(trying)
    layer.request_received(_request(), PEER, False)
    assert [m for _, m, _ in send.sent] == [trying, trying]
    final = make_response(request, 202)
    txn.respond(final)
    txn.respond(make_response(request, 500))  # after the final: dropped
    assert [m for _, m, _ in send.sent] == [trying, trying, final]
    assert len(tu.calls) == 1
    with pytest.raises(RuntimeError):
        _ = txn.request  # released once Completed


def test_server_tu_deadline_frees_unanswered_transactions() -> None:
    """64·T1 + T4: past the TU's own client transactions' Timer F (§16.8 408)."""
    clock, _, _, layer = _layer(RecordingTU())
    layer.request_received(_request(), PEER, False)
    clock.advance(36.9)
    assert layer.server_transaction_count == 1
    clock.advance(0.1)
    assert layer.server_transaction_count == 0


@pytest.mark.parametrize(
    "other",
    [
        _request(branch="z9hG4bKdifferent"),
        _request(sent_by="192.0.2.99:5060"),
        _request("CANCEL"),
    ],
    ids=["branch", "sent-by", "method"],
)
def test_server_matching_distinguishes(other: SIPRequest) -> None:
    _, _, _, layer = _layer(RecordingTU())
    layer.request_received(_request(), PEER, False)
    layer.request_received(other, PEER, False)
    assert layer.server_transaction_count == 2  # a new transaction, no retransmission


def test_server_matching_sent_by_host_case_insensitive() -> None:
    _, _, tu, layer = _layer()
    layer.request_received(_request(sent_by="Host.Example"), PEER, False)
    layer.request_received(_request(sent_by="host.example"), PEER, False)
    assert len(tu.calls) == 1


def test_server_rfc2543_fallback_matches_retransmissions() -> None:
    _, send, tu, layer = _layer()
    layer.request_received(_request(branch="1"), PEER, False)
    layer.request_received(_request(branch="1"), PEER, False)
    assert len(tu.calls) == 1
    assert send.statuses() == [200, 200]


def test_server_tu_sip_status_and_crash() -> None:
    tu = RecordingTU()
    _, send, _, layer = _layer(tu)
    tu.raise_ = SIPStatus(489, headers=[("Allow-Events", "wait-permission")])
    layer.request_received(_request(branch="z9hG4bK1"), PEER, True)
    tu.raise_ = RuntimeError("boom")
    layer.request_received(_request(branch="z9hG4bK2"), PEER, True)
    assert send.statuses() == [489, 500]
    resp = send.sent[0][1]
    assert isinstance(resp, SIPResponse)
    assert resp.reason == "Bad Event"
    assert resp.headers.get("allow-events") == "wait-permission"


def test_server_overload_answers_503_statelessly() -> None:
    _, send, tu, layer = _layer(RecordingTU(), max_server_transactions=1)
    layer.request_received(_request(branch="z9hG4bK1"), PEER, False)
    layer.request_received(_request(branch="z9hG4bK2"), PEER, False)
    assert len(tu.calls) == 1
    assert send.statuses() == [503]
    resp = send.sent[0][1]
    assert isinstance(resp, SIPResponse)
    assert resp.headers.get("retry-after") == "5"
    # §8.2.7: a retransmission of the refused request gets the same To tag.
    layer.request_received(_request(branch="z9hG4bK2"), PEER, False)
    again = send.sent[-1][1]
    assert isinstance(again, SIPResponse) and again.status == 503
    assert again.to_tag == resp.to_tag is not None
    assert layer.shed == 2  # counted for the metrics listener


def test_server_drops_request_without_via() -> None:
    _, send, tu, layer = _layer()
    request = _request()
    request.headers.remove("via")
    layer.request_received(request, PEER, False)
    assert tu.calls == []
    assert send.sent == []


# ------------------------------------------------------------------ INVITE server


def _reject_invites() -> RecordingTU:
    return RecordingTU(lambda r: make_response(r, 405, headers=[("Allow", "MESSAGE")]))


def _ack(branch: str = "z9hG4bKabc") -> SIPRequest:
    ack = _request("ACK", branch=branch)
    ack.headers.set("To", "<sip:bob@example.com>;tag=t")
    return ack


def test_invite_405_timer_g_retransmits_until_timer_h() -> None:
    clock, send, tu, layer = _layer(_reject_invites())
    layer.request_received(_request("INVITE"), PEER, reliable=False)
    _advance(clock, 40)
    # G: T1 doubling up to T2: 0.5, 1, 2, 4, 4, ... ; H = 64*T1 ends it at 32 s.
    assert send.times() == [0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert set(send.statuses()) == {405}
    assert layer.server_transaction_count == 0
    assert tu.calls[0][0].state is TransactionState.TERMINATED


def test_invite_retransmission_resends_final() -> None:
    clock, send, tu, layer = _layer(_reject_invites())
    layer.request_received(_request("INVITE"), PEER, False)
    clock.advance(0.2)
    layer.request_received(_request("INVITE"), PEER, False)
    assert send.times() == [0, 0.2]
    assert len(tu.calls) == 1


def test_invite_ack_confirms_and_timer_i_absorbs() -> None:
    clock, send, tu, layer = _layer(_reject_invites())
    layer.request_received(_request("INVITE"), PEER, False)
    clock.advance(0.5)  # one G retransmission
    layer.request_received(_ack(), PEER, False)
    txn = tu.calls[0][0]
    assert txn.state is TransactionState.CONFIRMED
    layer.request_received(_ack(), PEER, False)  # absorbed
    layer.request_received(_request("INVITE"), PEER, False)  # Confirmed: absorbed too
    clock.advance(4.99)
    assert layer.server_transaction_count == 1
    clock.advance(0.01)  # Timer I = T4
    assert layer.server_transaction_count == 0
    assert send.times() == [0, 0.5]
    assert [r.method for _, r in tu.calls] == ["INVITE"]


def test_invite_reliable_no_g_and_ack_terminates() -> None:
    clock, send, _, layer = _layer(_reject_invites())
    layer.request_received(_request("INVITE"), PEER, True)
    clock.advance(10)
    assert send.times() == [0]
    layer.request_received(_ack(), PEER, True)
    assert layer.server_transaction_count == 0


def test_invite_gets_100_trying_when_tu_does_not_answer_at_once() -> None:
    _clock, send, tu, layer = _layer(RecordingTU())
    layer.request_received(_request("INVITE"), PEER, False)
    assert send.statuses() == [100]
    trying = send.sent[0][1]
    assert isinstance(trying, SIPResponse)
    assert trying.to_tag is None
    layer.request_received(_request("INVITE"), PEER, False)
    assert send.statuses() == [100, 100]
    txn, request = tu.calls[0]
    txn.respond(make_response(request, 501))
    assert send.statuses() == [100, 100, 501]


def test_invite_2xx_accepted_absorbs_retransmissions_until_timer_l() -> None:
    clock, send, tu, layer = _layer(RecordingTU())
    layer.request_received(_request("INVITE"), PEER, False)
    txn, request = tu.calls[0]
    ok = make_response(request, 200, to_tag="callee")
    txn.respond(ok)
    assert txn.state is TransactionState.ACCEPTED  # RFC 6026 §7.1, not Terminated
    layer.request_received(_request("INVITE"), PEER, False)  # absorbed: no new request
    assert len(tu.calls) == 1
    other = make_response(request, 200, to_tag="fork-2")
    txn.respond(other)  # a 2xx from the TU still goes out
    txn.respond(make_response(request, 486))  # nothing else does
    assert send.statuses() == [100, 200, 200]
    clock.advance(4)
    assert send.statuses() == [100, 200, 200]  # no Timer G for a 2xx
    clock.advance(28)  # Timer L = 64·T1
    assert layer.server_transaction_count == 0


def test_ack_for_2xx_goes_to_the_ack_hook() -> None:
    _, _, tu, layer = _layer(RecordingTU())
    acks: list[SIPRequest] = []
    layer.ack = lambda request, source: acks.append(request)
    layer.request_received(_request("INVITE"), PEER, False)
    txn, request = tu.calls[0]
    txn.respond(make_response(request, 200, to_tag="t"))
    layer.request_received(_ack("z9hG4bKnew"), PEER, False)  # its own branch (§17.1.1.1)
    layer.request_received(_ack(), PEER, False)  # matches the Accepted one: up too
    assert [a.via.branch for a in acks] == ["z9hG4bKnew", "z9hG4bKabc"]


def test_invite_tu_deadline_follows_timer_c() -> None:
    clock, _, _, layer = _layer(RecordingTU())
    layer.request_received(_request("INVITE"), PEER, False)
    clock.advance(64 * 0.5 + 5 + 1)  # a MESSAGE's deadline has passed: still ringing
    assert layer.server_transaction_count == 1
    clock.advance(185 + 5)
    assert layer.server_transaction_count == 0


def test_invite_tu_deadline_restarts_with_each_provisional() -> None:
    clock, send, tu, layer = _layer(RecordingTU())
    layer.request_received(_request("INVITE"), PEER, False)
    txn, request = tu.calls[0]
    clock.advance(150)
    txn.respond(make_response(request, 180, to_tag="t"))  # still ringing
    clock.advance(150)
    assert layer.server_transaction_count == 1
    txn.respond(make_response(request, 487, to_tag="t"))
    assert send.statuses() == [100, 180, 487]


def test_unmatched_ack_is_dropped() -> None:
    _, send, tu, layer = _layer()
    layer.request_received(_ack("z9hG4bKnone"), PEER, False)
    assert tu.calls == []
    assert send.sent == []


def test_find_cancelled_invite_transaction() -> None:
    _, _, _, layer = _layer(RecordingTU())
    layer.request_received(_request("INVITE"), PEER, False)
    cancel = _request("CANCEL")
    txn = layer.find_cancelled(cancel)
    assert txn is not None
    assert txn.is_invite
    assert layer.find_cancelled(_request("CANCEL", branch="z9hG4bKzzz")) is None


def test_stop_ends_every_transaction_and_timer() -> None:
    clock, send, _tu, layer = _layer(RecordingTU())
    layer.request_received(_request(branch="z9hG4bK-server"), PEER, reliable=False)
    layer.client_request(_request(branch="z9hG4bK-stop-1"), PEER, reliable=False)
    layer.client_request(_request(branch="z9hG4bK-stop-2"), PEER, reliable=True)
    assert layer.client_transaction_count == 2 and layer.server_transaction_count == 1
    assert clock.getDelayedCalls()
    layer.stop()
    assert layer.client_transaction_count == 0
    assert layer.server_transaction_count == 0
    assert not clock.getDelayedCalls()
    before = len(send.sent)
    clock.advance(64)
    assert len(send.sent) == before  # no retransmission after stop


def test_transport_error_ends_the_client_transaction_with_503() -> None:
    clock = Clock()

    def refuse(message: SIPRequest | SIPResponse, destination: object) -> None:
        raise TransportError("no UDP listener to send from")

    layer = TransactionLayer(clock, refuse, RecordingTU())
    results: list[SIPResponse] = []
    d = layer.client_request(_request(branch="z9hG4bK-refused"), PEER, reliable=False)
    d.addCallback(results.append)
    assert [r.status for r in results] == [503]
    assert isinstance(results[0], LocalResponse)
    assert layer.client_transaction_count == 0


# ------------------------------------------------------------- §8.2.2.2 merged requests

LOOP = "127.0.0.1:5060"


def test_merged_request_is_482_in_its_own_transaction() -> None:
    _, send, tu, layer = _layer(RecordingTU())
    layer.request_received(_request(sent_by=LOOP, branch="z9hG4bK-path-1"), PEER, False)
    merged = _request(branch="z9hG4bK-path-2", sent_by="127.0.0.7:5060")
    layer.request_received(merged, PEER, False)
    assert len(tu.calls) == 1  # the TU never sees the second copy
    assert send.statuses() == [482]
    layer.request_received(merged, PEER, False)  # its retransmission: the same 482
    assert send.statuses() == [482, 482]
    assert send.sent[0][1] is send.sent[1][1]


def test_merge_check_ignores_other_cseqs_to_tags_and_spirals() -> None:
    _, send, tu, layer = _layer(RecordingTU())
    layer.request_received(_request(sent_by=LOOP, branch="z9hG4bK-a"), PEER, False)
    next_one = _request(sent_by=LOOP, branch="z9hG4bK-b")
    next_one.headers.set("CSeq", "2 MESSAGE")
    in_dialog = _request(sent_by=LOOP, branch="z9hG4bK-c")
    in_dialog.headers.set("To", "<sip:bob@example.com>;tag=b1")
    # Sent on by us and back (a spiral): the first one's Via is below ours.
    spiral = _request(sent_by=LOOP, branch="z9hG4bK-d")
    spiral.headers.add("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-a")
    for request in (next_one, in_dialog, spiral):
        layer.request_received(request, PEER, False)
    assert len(tu.calls) == 4 and send.statuses() == []


def test_merge_index_forgets_terminated_transactions() -> None:
    clock, send, _, layer = _layer()
    layer.request_received(_request(sent_by=LOOP, branch="z9hG4bK-a"), PEER, False)
    assert len(layer._merging) == 1
    clock.advance(32)  # Timer J
    assert layer.server_transaction_count == 0 and layer._merging == {}
    layer.request_received(_request(sent_by=LOOP, branch="z9hG4bK-b"), PEER, False)
    assert send.statuses() == [200, 200]


# ----------------------------------------------------------------- §9.2 CANCEL lookup


def test_cancel_finds_a_transaction_of_any_method() -> None:
    _, _, _, layer = _layer(RecordingTU())
    layer.request_received(_request("MESSAGE", sent_by=LOOP), PEER, False)
    cancel = _request("CANCEL", sent_by=LOOP)
    assert layer.find_cancelled(cancel) is None  # INVITE only unless told
    found = layer.find_cancelled(cancel, ["CANCEL", "MESSAGE"])
    assert found is not None and found.request.method == "MESSAGE"
    assert (
        layer.find_cancelled(_request("CANCEL", sent_by=LOOP, branch="z9hG4bKzzz"), ["MESSAGE"])
        is None
    )


def test_cancel_finds_an_rfc_2543_transaction() -> None:
    _, _, _, layer = _layer(RecordingTU())
    layer.request_received(_request("MESSAGE", sent_by=LOOP, branch="old-style-1"), PEER, False)
    found = layer.find_cancelled(
        _request("CANCEL", sent_by=LOOP, branch="old-style-1"), ["MESSAGE"]
    )
    assert found is not None
    assert (
        layer.find_cancelled(_request("CANCEL", sent_by=LOOP, branch="old-style-2"), ["MESSAGE"])
        is None
    )


# ------------------------------------------------- responses made up by the transaction


def test_timeout_without_any_response_is_a_local_408() -> None:
    clock, _, _, layer = _layer()
    results: list[SIPResponse] = []
    layer.client_request(_request(branch=new_branch()), PEER, reliable=True).addCallback(
        results.append
    )
    clock.advance(32)
    assert [r.status for r in results] == [408]
    assert isinstance(results[0], LocalResponse)


def test_timeout_after_a_provisional_is_a_plain_408() -> None:
    clock, _, _, layer = _layer()
    request = _request(branch=new_branch())
    results: list[SIPResponse] = []
    layer.client_request(request, PEER, reliable=True).addCallback(results.append)
    layer.response_received(make_response(request, 100), PEER)
    clock.advance(32)
    assert [r.status for r in results] == [408]
    assert not isinstance(results[0], LocalResponse)  # the peer is there: no failover


# ------------------------------------------------------------------ INVITE client


def _invite(branch: str = "z9hG4bK-inv-1") -> SIPRequest:
    invite = _request("INVITE", branch=branch)
    invite.headers.add("Route", "<sip:next.example.com;lr>")
    return invite


def _answer(request: SIPRequest, status: int, tag: str = "callee") -> SIPResponse:
    return make_response(request, status, to_tag=tag)


def test_invite_client_timer_a_doubles_without_cap_until_timer_b() -> None:
    clock, send, _, layer = _layer()
    results: list[SIPResponse] = []
    layer.client_request(_invite(), PEER, reliable=False).addCallback(results.append)
    _advance(clock, 40)
    # A: 0.5, 1, 2, 4, 8, 16 (no T2 cap, unlike E); B = 64·T1 ends it at 32 s.
    assert send.times() == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert [r.status for r in results] == [408]
    assert isinstance(results[0], LocalResponse)
    assert layer.client_transaction_count == 0


def test_invite_client_provisional_stops_a_and_b() -> None:
    clock, send, _, layer = _layer()
    invite = _invite()
    ringing: list[int] = []
    results: list[SIPResponse] = []
    d = layer.client_request(invite, PEER, False, on_provisional=lambda r: ringing.append(r.status))
    d.addCallback(results.append)
    layer.response_received(_answer(invite, 180), PEER)
    _advance(clock, 120)  # Proceeding: no retransmission, no Timer B (Timer C is the TU's)
    assert send.times() == [0]
    assert ringing == [180] and results == []
    assert layer.client_transaction_count == 1


def test_invite_client_acks_non_2xx_hop_by_hop_until_timer_d() -> None:
    clock, send, _, layer = _layer()
    invite = _invite()
    results: list[SIPResponse] = []
    layer.client_request(invite, PEER, False).addCallback(results.append)
    busy = _answer(invite, 486)
    layer.response_received(busy, PEER)
    assert [r.status for r in results] == [486]
    ack = send.sent[-1][1]
    assert isinstance(ack, SIPRequest) and ack.method == "ACK"
    assert ack.uri == invite.uri
    assert ack.via.branch == invite.via.branch  # §17.1.1.3: same transaction
    assert ack.headers.get("cseq") == "1 ACK"
    assert ack.to_tag == "callee"
    assert ack.headers.get_all("route") == ["<sip:next.example.com;lr>"]
    layer.response_received(busy, PEER)  # retransmitted final: ACK again, no new result
    assert [m.method for _, m, _ in send.sent if isinstance(m, SIPRequest)] == [
        "INVITE",
        "ACK",
        "ACK",
    ]
    assert len(results) == 1
    clock.advance(31.9)
    assert layer.client_transaction_count == 1
    clock.advance(0.2)  # Timer D: 32 s over UDP
    assert layer.client_transaction_count == 0


def test_invite_client_reliable_non_2xx_terminates_after_ack() -> None:
    _, send, _, layer = _layer()
    invite = _invite()
    layer.client_request(invite, PEER, True)
    layer.response_received(_answer(invite, 603), PEER)
    assert [m.method for _, m, _ in send.sent if isinstance(m, SIPRequest)] == ["INVITE", "ACK"]
    assert layer.client_transaction_count == 0


def test_invite_client_2xx_accepted_passes_later_2xx_until_timer_m() -> None:
    clock, send, _, layer = _layer()
    invite = _invite()
    results: list[SIPResponse] = []
    later: list[str | None] = []
    d = layer.client_request(invite, PEER, False, on_2xx=lambda r: later.append(r.to_tag))
    d.addCallback(results.append)
    layer.response_received(_answer(invite, 200, "one"), PEER)
    layer.response_received(_answer(invite, 200, "one"), PEER)  # retransmitted
    layer.response_received(_answer(invite, 200, "two"), PEER)  # another fork
    layer.response_received(_answer(invite, 486, "three"), PEER)  # absorbed
    assert [r.to_tag for r in results] == ["one"]
    assert later == ["one", "two"]
    # No ACK for a 2xx here: it is end to end (§13.2.2.4), and nothing retransmits.
    clock.advance(10)
    assert [m.method for _, m, _ in send.sent if isinstance(m, SIPRequest)] == ["INVITE"]
    clock.advance(22)  # Timer M = 64·T1
    assert layer.client_transaction_count == 0


def test_invite_client_transport_failure_is_503() -> None:
    _, send, _, layer = _layer()
    send.fail = True
    results: list[SIPResponse] = []
    layer.client_request(_invite(), PEER, False).addCallback(results.append)
    assert [r.status for r in results] == [503]
    assert layer.client_transaction_count == 0


def test_cancel_for_matches_the_invite_hop() -> None:
    invite = _invite()
    cancel = cancel_for(invite)
    assert cancel.method == "CANCEL"
    assert cancel.uri == invite.uri
    assert cancel.via.branch == invite.via.branch
    assert cancel.headers.get("cseq") == "1 CANCEL"
    assert cancel.to_tag is None
    assert cancel.headers.get_all("route") == invite.headers.get_all("route")
