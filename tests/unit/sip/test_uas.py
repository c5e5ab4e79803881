"""UAS core dispatch (RFC 3261 §8.2, §11, §9.2) over a real TransactionLayer and a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relayd.consent.store import StoreUnavailable
from relayd.sip.message import Headers, SIPRequest, SIPResponse, SIPStatus, make_response
from relayd.sip.registrar import Registrar
from relayd.sip.transaction import ServerTransaction, TransactionLayer
from relayd.sip.uas import (
    Capabilities,
    LoopDetector,
    UASCore,
    check_max_forwards,
    transaction_pressure,
)
from relayd.sipuri import SIPURI

PEER = ("192.0.2.1", 5060)
CAPS = Capabilities(
    accept=("application/resource-lists+xml", "text/plain"),
    allow_events=("wait-permission",),
    supported=("100rel",),
)


class Stack:
    def __init__(self, uas: UASCore, max_server_transactions: int = 100) -> None:
        self.clock = Clock()
        self.sent: list[SIPResponse] = []
        self.uas = uas
        self.layer = TransactionLayer(
            self.clock, self.record, uas, max_server_transactions=max_server_transactions
        )
        uas.attach(self.layer)
        self._branch = 0

    def record(self, message: object, destination: object) -> None:
        assert isinstance(message, SIPResponse)
        self.sent.append(message)

    def send(
        self,
        method: str,
        *extra: tuple[str, str],
        branch: str | None = None,
        uri: str = "sip:relay@example.com",
    ) -> SIPResponse:
        self.deliver(method, *extra, branch=branch, uri=uri)
        return self.sent[-1]

    def deliver(
        self,
        method: str,
        *extra: tuple[str, str],
        branch: str | None = None,
        uri: str = "sip:relay@example.com",
    ) -> None:
        self._branch += 1
        headers = Headers(
            [
                ("Via", f"SIP/2.0/UDP 192.0.2.1:5060;branch={branch or f'z9hG4bK{self._branch}'}"),
                ("From", "<sip:alice@example.com>;tag=1"),
                ("To", "<sip:relay@example.com>"),
                ("Call-ID", "c1"),
                ("CSeq", f"{self._branch} {method}"),
                ("Max-Forwards", "70"),
                *extra,
            ]
        )
        self.layer.request_received(SIPRequest(method, SIPURI.parse(uri), headers), PEER, False)


def test_options_lists_capabilities() -> None:
    stack = Stack(UASCore(CAPS, registrar=Registrar("example.com", Clock(), None)))
    response = stack.send("OPTIONS")
    assert response.status == 200
    h = response.headers
    assert h.get_all("allow") == ["ACK", "CANCEL", "OPTIONS", "REGISTER"]
    assert h.get_all("accept") == ["application/resource-lists+xml", "text/plain"]
    assert h.get_all("allow-events") == ["wait-permission"]
    assert h.get_all("supported") == ["100rel"]
    assert h.get_all("accept-encoding") == ["identity"]  # §11.2 SHOULDs
    assert h.get_all("accept-language") == ["en"]


def test_allow_follows_plugged_handlers() -> None:
    uas = UASCore(CAPS)
    uas.set_handler("message", lambda txn, req: make_response(req, 202))
    assert uas.allow == "ACK, CANCEL, MESSAGE, OPTIONS"
    uas.set_handler("MESSAGE", None)
    assert uas.allow == "ACK, CANCEL, OPTIONS"
    uas.set_handler("INVITE", lambda txn, req: None)  # the proxy plugs INVITE in
    assert uas.allow == "ACK, CANCEL, INVITE, OPTIONS"
    with pytest.raises(ValueError):
        uas.set_handler("CANCEL", lambda txn, req: None)


def test_invite_is_405_with_allow_and_unknown_is_501() -> None:
    stack = Stack(UASCore(CAPS))
    invite = stack.send("INVITE")
    assert invite.status == 405 and invite.headers.get("allow") == "ACK"
    assert invite.headers.get_all("allow") == ["ACK", "CANCEL", "OPTIONS"]
    assert stack.send("FROBNICATE").status == 501


@pytest.mark.parametrize("method", ["MESSAGE", "CONSENT", "SUBSCRIBE", "REGISTER"])
def test_hook_method_without_handler_is_405(method: str) -> None:
    response = Stack(UASCore(CAPS)).send(method)
    assert response.status == 405 and "OPTIONS" in response.headers.get_all("allow")


def test_handlers_sync_deferred_and_coroutine() -> None:
    uas = UASCore(CAPS)
    later: Deferred[SIPResponse] = Deferred()
    seen: list[SIPRequest] = []

    def message(txn: ServerTransaction, request: SIPRequest) -> object:
        seen.append(request)
        return later

    async def consent(txn: ServerTransaction, request: SIPRequest) -> SIPResponse:
        return make_response(request, 202)

    def subscribe(txn: ServerTransaction, request: SIPRequest) -> object:
        raise SIPStatus(489, headers=[("Allow-Events", "wait-permission")])

    uas.set_handler("MESSAGE", message)
    uas.set_handler("CONSENT", consent)
    uas.set_handler("SUBSCRIBE", subscribe)
    stack = Stack(uas)
    stack.deliver("MESSAGE")
    assert stack.sent == [] and len(seen) == 1
    later.callback(make_response(seen[0], 200))
    assert stack.sent[-1].status == 200
    assert stack.send("CONSENT").status == 202
    bad_event = stack.send("SUBSCRIBE")
    assert bad_event.status == 489 and bad_event.headers.get("allow-events") == "wait-permission"


def test_failing_async_handler_answers_500_or_its_status() -> None:
    uas = UASCore(CAPS)

    async def broken(txn: ServerTransaction, request: SIPRequest) -> SIPResponse:
        raise RuntimeError("boom")

    async def refuses(txn: ServerTransaction, request: SIPRequest) -> SIPResponse:
        raise SIPStatus(470)

    async def no_store(txn: ServerTransaction, request: SIPRequest) -> SIPResponse:
        raise StoreUnavailable("connection lost")

    uas.set_handler("MESSAGE", broken)
    uas.set_handler("CONSENT", refuses)
    uas.set_handler("SUBSCRIBE", no_store)
    stack = Stack(uas)
    assert stack.send("MESSAGE").status == 500
    assert stack.send("CONSENT").status == 470
    unavailable = stack.send("SUBSCRIBE")
    assert unavailable.status == 503
    assert unavailable.headers.get("retry-after") == str(StoreUnavailable.retry_after)


def test_overload_hook_sheds_with_retry_after() -> None:
    busy = [True]
    stack = Stack(UASCore(CAPS, overloaded=lambda: busy[0], retry_after_seconds=7))
    response = stack.send("OPTIONS")
    assert response.status == 503 and response.headers.get("retry-after") == "7"
    busy[0] = False
    assert stack.send("OPTIONS").status == 200


def test_overload_spares_requests_of_a_dialog_routed_through_us() -> None:
    uas = UASCore(CAPS, overloaded=lambda: True)
    answered: list[str] = []

    def forward(txn: ServerTransaction, request: SIPRequest) -> SIPResponse:
        answered.append(request.method)
        return make_response(request, 200)

    uas.router = lambda request: forward if "ours" in (request.headers.get("route") or "") else None
    stack = Stack(uas)
    bye = stack.send("BYE", ("Route", "<sip:relay.example.com;lr;ours>"))
    assert bye.status == 200 and answered == ["BYE"]
    other = stack.send("BYE", ("Route", "<sip:elsewhere.example.com;lr>"))
    assert other.status == 503 and other.headers.get("retry-after") == "5"
    assert stack.send("INVITE").status == 503 and uas.shed == 2


def test_transaction_pressure_reads_the_layer() -> None:
    uas = UASCore(CAPS)
    uas.set_handler("MESSAGE", lambda txn, req: None)  # keeps transactions open
    stack = Stack(uas, max_server_transactions=10)
    uas.overloaded = transaction_pressure(stack.layer, 0.5)
    for _ in range(6):
        stack.deliver("MESSAGE")
    assert stack.send("OPTIONS").status == 503


def test_require_unknown_extension_is_420() -> None:
    stack = Stack(UASCore(CAPS))
    response = stack.send("OPTIONS", ("Require", "foo, 100rel"))
    assert response.status == 420 and response.headers.get_all("unsupported") == ["foo"]


def test_cancel_without_matching_invite_is_481() -> None:
    assert Stack(UASCore(CAPS)).send("CANCEL").status == 481


def test_cancel_matching_an_answered_invite_is_200_with_the_same_to_tag() -> None:
    stack = Stack(UASCore(CAPS))
    invite_final = stack.send("INVITE", branch="z9hG4bKinv")
    assert invite_final.status == 405 and invite_final.to_tag
    ok = stack.send("CANCEL", branch="z9hG4bKinv")
    assert ok.status == 200
    assert ok.to_tag == invite_final.to_tag  # §9.2


def test_cancel_of_a_pending_invite_gets_487_then_200_with_its_tag() -> None:
    uas = UASCore(CAPS)
    stack = Stack(uas)
    uas._table["INVITE"] = lambda txn, request: None  # an INVITE that stays pending
    stack.deliver("INVITE", branch="z9hG4bKpending")
    assert [r.status for r in stack.sent] == [100]
    ok = stack.send("CANCEL", branch="z9hG4bKpending")
    terminated = stack.sent[-2]
    assert (terminated.status, ok.status) == (487, 200)
    assert ok.to_tag == terminated.to_tag


def test_cancel_of_a_pending_invite_tells_its_tu_before_the_487() -> None:
    uas = UASCore(CAPS)
    stack = Stack(uas)
    seen: list[list[int]] = []
    pending: list[ServerTransaction] = []

    def handler(txn: ServerTransaction, request: SIPRequest) -> None:
        pending.append(txn)
        txn.on_cancel = lambda: seen.append([r.status for r in stack.sent])

    uas.set_handler("INVITE", handler)
    stack.deliver("INVITE", branch="z9hG4bKhooked")
    stack.send("CANCEL", branch="z9hG4bKhooked")
    assert seen == [[100]]  # §16.10: the branches are cancelled, then the 487 goes
    assert [r.status for r in stack.sent] == [100, 487, 200]
    assert pending[0].on_cancel is None  # released with the transaction's state


def test_cancel_of_a_pending_non_invite_is_200_and_changes_nothing() -> None:
    """§9.2: a CANCEL matching any server transaction gets 200; a non-INVITE goes on."""
    uas = UASCore(CAPS)
    pending: list[ServerTransaction] = []
    uas.set_handler("MESSAGE", lambda txn, request: pending.append(txn))
    stack = Stack(uas)
    stack.deliver("MESSAGE", branch="z9hG4bKmsg")
    assert stack.send("CANCEL", branch="z9hG4bKmsg").status == 200
    assert [r.status for r in stack.sent] == [200]  # no 487 for the MESSAGE
    [txn] = pending
    txn.respond(make_response(txn.request, 202))  # it is still answered normally
    assert stack.sent[-1].status == 202


def test_loop_detection_with_our_branch() -> None:
    own = {("relay.example.com", 5060)}
    detector = LoopDetector(lambda: own, key=b"k" * 32)
    stack = Stack(UASCore(CAPS, loop_detector=detector))
    probe = SIPRequest(
        "OPTIONS",
        SIPURI.parse("sip:relay@example.com"),
        Headers(
            [
                ("From", "<sip:alice@example.com>;tag=1"),
                ("To", "<sip:relay@example.com>"),
                ("Call-ID", "c1"),
                ("CSeq", "1 OPTIONS"),
            ]
        ),
    )
    branch = detector.branch(probe)
    assert branch.startswith("z9hG4bK-rl-")
    ours = ("Via", f"SIP/2.0/UDP relay.example.com:5060;branch={branch}")
    stack._branch = 0  # same CSeq number as the probe
    assert stack.send("OPTIONS", ours).status == 482
    # Spiral: another Request-URI (or CSeq) under our branch is not a loop.
    assert stack.send("OPTIONS", ours).status == 200


def test_a_screen_answers_statelessly_only_where_the_handler_would_be_reached() -> None:
    busy = [False]
    uas = UASCore(CAPS, overloaded=lambda: busy[0])
    handled: list[SIPRequest] = []

    def handler(txn: ServerTransaction, request: SIPRequest) -> SIPResponse:
        handled.append(request)
        return make_response(request, 200)

    uas.set_handler("MESSAGE", handler)
    uas.set_screen("MESSAGE", lambda request: make_response(request, 407))
    stack = Stack(uas)
    assert stack.send("MESSAGE").status == 407
    assert stack.layer.server_transaction_count == 0 and handled == []
    # What the stateful path answers before the handler keeps its answer.
    assert stack.send("MESSAGE", ("Require", "foo")).status == 420
    busy[0] = True
    assert stack.send("MESSAGE").status == 503
    busy[0] = False
    uas.set_screen("MESSAGE", lambda request: None)  # the screen passes: the handler answers
    assert stack.send("MESSAGE").status == 200 and len(handled) == 1
    uas.set_screen("MESSAGE", None)
    uas.set_handler("MESSAGE", None)
    uas.set_screen("MESSAGE", lambda request: make_response(request, 407))
    assert stack.send("MESSAGE").status == 405  # no handler: the screen is not asked


def test_request_uri_is_checked_after_the_method_and_before_require() -> None:
    """§8.2.1, then §8.2.2.1 (416 for the scheme, the composer's 404), then §8.2.2.3."""
    uas = UASCore(CAPS)
    stack = Stack(uas)
    assert stack.send("OPTIONS", uri="tel:+15551234").status == 416
    assert stack.send("INFO", uri="tel:+15551234").status == 405

    def not_ours(request: SIPRequest) -> None:
        if request.uri.host != "example.com":
            raise SIPStatus(404, "Not Served Here")

    uas.request_uri_check = not_ours
    uas.set_screen("OPTIONS", lambda request: make_response(request, 407))
    elsewhere = stack.send("OPTIONS", ("Require", "foo"), uri="sip:example.org")
    assert (elsewhere.status, elsewhere.reason) == (404, "Not Served Here")  # not the 407
    assert stack.send("OPTIONS", ("Require", "foo")).status == 420
    assert stack.send("OPTIONS").status == 407


def test_check_max_forwards() -> None:
    def req(value: str | None) -> SIPRequest:
        headers = Headers([("Max-Forwards", value)] if value is not None else [])
        return SIPRequest("MESSAGE", SIPURI.parse("sip:a@b"), headers)

    assert check_max_forwards(req("70")) == 69
    assert check_max_forwards(req(None)) == 70
    with pytest.raises(SIPStatus) as info:
        check_max_forwards(req("0"))
    assert info.value.status == 483


def test_a_burst_of_options_leaves_no_server_transaction() -> None:
    """Each OPTIONS of a UDP flood used to be kept for Timer J (64·T1): 32 s of the flood."""
    stack = Stack(UASCore(CAPS), max_server_transactions=100_000)
    for _ in range(5000):
        stack.deliver("OPTIONS")
    assert stack.layer.server_transaction_count == 0
    assert len(stack.sent) == 5000 and {r.status for r in stack.sent} == {200}
    # A retransmission gets the same answer, To tag included (§8.2.7).
    stack._branch = 0
    first = stack.send("OPTIONS", branch="z9hG4bKsame")
    stack._branch = 0  # the same CSeq too
    again = stack.send("OPTIONS", branch="z9hG4bKsame")
    assert first.to_tag and again.to_tag == first.to_tag


def test_shedding_keeps_server_transactions_at_what_they_were() -> None:
    """Under overload new requests get a 503 without a transaction: state stops growing."""
    busy = [False]
    uas = UASCore(CAPS, overloaded=lambda: busy[0], retry_after_seconds=3)
    uas.set_handler("MESSAGE", lambda txn, request: None)  # keeps transactions open
    stack = Stack(uas, max_server_transactions=100_000)
    for _ in range(10):
        stack.deliver("MESSAGE")
    busy[0] = True
    for method in ("MESSAGE", "SUBSCRIBE", "INVITE", "OPTIONS") * 1000:
        stack.deliver(method)
    assert stack.layer.server_transaction_count == 10
    assert {r.status for r in stack.sent} == {503}
    assert {r.headers.get("retry-after") for r in stack.sent} == {"3"}
    stack.clock.advance(64 * 0.5 + 5 + 1)  # the open ones reach their TU deadline
    assert stack.layer.server_transaction_count == 0
