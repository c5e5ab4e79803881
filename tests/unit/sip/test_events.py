"""The subscription manager (RFC 6665) with a Clock and a recording NOTIFY sender."""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

from relayd.consent.store import StoreUnavailable
from relayd.sip.events import Grant, SubscriptionLimits, SubscriptionManager
from relayd.sip.message import Headers, SIPRequest, SIPResponse, SIPStatus, make_response
from relayd.sipuri import SIPURI


class Package:
    name = "wait-permission"
    content_type = "text/plain"

    def __init__(self) -> None:
        self.gone: str | None = None
        self.value = "a"
        self.unavailable = False

    async def authorize(self, request: SIPRequest, subscriber: str) -> Grant:
        if subscriber != "sip:alice@x.test":
            raise SIPStatus(403)
        return Grant("r1", frozenset({"k"}))

    async def state(self, resource: str, version: int) -> tuple[bytes, str | None]:
        if self.unavailable:
            raise StoreUnavailable("connection refused")
        return f"{resource} {self.value} v{version}".encode(), self.gone


class Recorder:
    def __init__(self, status: int = 200) -> None:
        self.sent: list[SIPRequest] = []
        self.status = status

    def __call__(self, request: SIPRequest, destination: object) -> Deferred[SIPResponse]:
        self.sent.append(request)
        return succeed(make_response(request, self.status))


def subscribe(
    expires: int | None = 600,
    to_tag: str | None = None,
    cseq: int = 1,
    event: str = "wait-permission",
) -> SIPRequest:
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP a.test;branch=z9hG4bK1"),
            ("From", "<sip:alice@x.test>;tag=ft"),
            ("To", "<sip:wp-1@relay.test>" + (f";tag={to_tag}" if to_tag else "")),
            ("Call-ID", "call"),
            ("CSeq", f"{cseq} SUBSCRIBE"),
            ("Contact", "<sip:alice@192.0.2.1:5070>"),
            ("Event", event),
        ]
    )
    if expires is not None:
        headers.add("Expires", str(expires))
    return SIPRequest("SUBSCRIBE", SIPURI.parse("sip:wp-1@relay.test"), headers)


def run(manager: SubscriptionManager, request: SIPRequest, who: str = "sip:alice@x.test") -> Any:
    out: list[Any] = []
    ensureDeferred(manager.handle_subscribe(request, who, "src")).addBoth(out.append)
    return out[0]


@pytest.fixture
def setup() -> tuple[Clock, Recorder, SubscriptionManager, Package]:
    clock = Clock()
    sender = Recorder()
    manager = SubscriptionManager(
        clock,
        sender,
        lambda: "sip:relay.test:5060",
        SubscriptionLimits(min_expires_seconds=60, max_expires_seconds=3600),
    )
    package = Package()
    manager.register(package)
    return clock, sender, manager, package


def test_subscribe_notifies_now_on_change_and_on_expiry(setup: Any) -> None:
    clock, sender, manager, package = setup
    ok = run(manager, subscribe(expires=99999))
    assert ok.status == 200 and ok.headers.get("expires") == "3600" and ok.to_tag
    clock.advance(0)
    (first,) = sender.sent
    assert first.headers.get("subscription-state") == "active;expires=3600"
    assert first.headers.get("from") == f"<sip:wp-1@relay.test>;tag={ok.to_tag}"
    assert first.uri == SIPURI.parse("sip:alice@192.0.2.1:5070") and first.body == b"r1 a v1"
    package.value = "b"
    manager.resource_changed("wait-permission", "k")
    assert sender.sent[-1].body == b"r1 b v2" and sender.sent[-1].headers.get("cseq") == "2 NOTIFY"
    clock.advance(3600)
    assert sender.sent[-1].headers.get("subscription-state") == "terminated;reason=timeout"
    assert manager.count == 0


def test_errors_423_489_481_403(setup: Any) -> None:
    _, _, manager, _ = setup
    brief = run(manager, subscribe(expires=5))
    assert brief.value.status == 423 and ("Min-Expires", "60") in brief.value.headers
    assert run(manager, subscribe(event="presence")).value.status == 489
    assert run(manager, subscribe(to_tag="nope")).value.status == 481
    assert run(manager, subscribe(), who="sip:mallory@x.test").value.status == 403


def test_refresh_and_unsubscribe(setup: Any) -> None:
    clock, sender, manager, _ = setup
    ok = run(manager, subscribe())
    clock.advance(0)
    refreshed = run(manager, subscribe(expires=1200, to_tag=ok.to_tag, cseq=2))
    assert refreshed.status == 200 and refreshed.headers.get("expires") == "1200"
    assert run(manager, subscribe(to_tag=ok.to_tag, cseq=2)).value.status == 500
    run(manager, subscribe(expires=0, to_tag=ok.to_tag, cseq=3))
    clock.advance(0)
    assert sender.sent[-1].headers.get("subscription-state") == "terminated;reason=timeout"
    assert manager.count == 0


def test_481_to_notify_ends_subscription_and_gone_resource_terminates(setup: Any) -> None:
    clock, sender, manager, package = setup
    run(manager, subscribe())
    sender.status = 481
    clock.advance(0)
    assert manager.count == 0
    sender.status = 200
    run(manager, subscribe())
    package.gone = "noresource"
    clock.advance(0)
    assert sender.sent[-1].headers.get("subscription-state") == "terminated;reason=noresource"
    assert manager.count == 0


def test_unchanged_state_is_not_notified_again(setup: Any) -> None:
    clock, sender, manager, package = setup
    run(manager, subscribe())
    clock.advance(0)
    assert len(sender.sent) == 1
    # Two store events for one grant, or a change to another consent of the
    # same recipient: nothing changed for this subscriber, so no NOTIFY.
    manager.resource_changed("wait-permission", "k")
    manager.resource_changed("wait-permission", "k")
    assert len(sender.sent) == 1
    package.value = "granted"
    manager.resource_changed("wait-permission", "k")
    assert len(sender.sent) == 2 and sender.sent[-1].body == b"r1 granted v2"


def test_store_unavailable_keeps_the_subscription_and_notifies_once_it_answers(
    setup: Any,
) -> None:
    """A database restart is not the end of the resource (RFC 6665 §4.2.2): the
    subscriber keeps its subscription and hears the change once the store is back."""
    clock, sender, manager, package = setup
    run(manager, subscribe())
    clock.advance(0)
    assert len(sender.sent) == 1
    package.unavailable = True
    manager.resource_changed("wait-permission", "k")
    assert len(sender.sent) == 1 and manager.count == 1
    clock.advance(StoreUnavailable.retry_after - 1)
    assert len(sender.sent) == 1
    package.unavailable = False
    package.value = "granted"
    clock.advance(1)
    assert len(sender.sent) == 2 and sender.sent[-1].body == b"r1 granted v2"
    assert sender.sent[-1].headers.get("subscription-state", "").startswith("active")
    # One retry: nothing further is scheduled once it went out.
    clock.advance(StoreUnavailable.retry_after * 3)
    assert len(sender.sent) == 2


def test_a_change_while_a_retry_waits_notifies_at_once(setup: Any) -> None:
    clock, sender, manager, package = setup
    run(manager, subscribe())
    clock.advance(0)
    package.unavailable = True
    manager.resource_changed("wait-permission", "k")
    package.unavailable = False
    package.value = "granted"
    manager.resource_changed("wait-permission", "k")
    assert len(sender.sent) == 2
    clock.advance(StoreUnavailable.retry_after)
    assert len(sender.sent) == 2  # the retry was cancelled, not sent twice


def test_expiry_while_the_store_is_unavailable_still_terminates(setup: Any) -> None:
    clock, sender, manager, package = setup
    run(manager, subscribe(expires=60))
    clock.advance(0)
    package.unavailable = True
    clock.advance(60)
    assert sender.sent[-1].headers.get("subscription-state") == "terminated;reason=timeout"
    assert manager.count == 0
    clock.advance(StoreUnavailable.retry_after)
    assert not clock.getDelayedCalls()


def test_stop_abandons_notifies_in_flight(setup: Any) -> None:
    """A NOTIFY awaiting its answer at service stop is cancelled, which ends its client
    transaction: no retransmission once the listeners are closed, and nothing logged."""
    clock, _, manager, _ = setup
    pending: list[Deferred[SIPResponse]] = []
    cancelled: list[Deferred[SIPResponse]] = []

    def unanswered(request: SIPRequest, destination: object) -> Deferred[SIPResponse]:
        pending.append(Deferred(cancelled.append))
        return pending[-1]

    manager.send = unanswered
    run(manager, subscribe())
    clock.advance(0)
    assert len(pending) == 1 and not cancelled
    errors: list[LogEvent] = []
    observer = cast(ILogObserver, lambda e: errors.append(e) if e.get("log_failure") else None)
    globalLogPublisher.addObserver(observer)
    try:
        manager.stop()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert cancelled == pending and manager.count == 0
    assert errors == []


def test_stop_while_the_state_is_read_sends_nothing(setup: Any) -> None:
    clock, sender, manager, package = setup
    run(manager, subscribe())
    clock.advance(0)
    reads: list[Deferred[tuple[bytes, str | None]]] = []

    async def slow_state(resource: str, version: int) -> tuple[bytes, str | None]:
        if reads:  # only the first read is slow
            return f"changed v{version}".encode(), None
        reads.append(Deferred())
        return await reads[-1]

    package.state = slow_state
    manager.resource_changed("wait-permission", "k")
    (read,) = reads
    manager.stop()
    if not read.called:  # had stop() left the read running, the store answers now
        read.callback((b"changed", None))
    assert len(sender.sent) == 1
