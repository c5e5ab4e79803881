"""Pending consents: the per-sender rate, refreshes and expiry on a task.Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from relayd.consent.ledger import ConsentLedger, ConsentLimits, RateExceeded
from relayd.consent.store import ConsentState, MemoryPermissionStore, StoreChange
from relayd.testing import fired

LIST = "sip:friends@relay.test"


def test_ledger_refreshes_rate_limits_and_expires() -> None:
    clock = Clock()
    store = MemoryPermissionStore()
    ledger = ConsentLedger(
        store, clock, ConsentLimits(consent_requests_per_hour=2, pending_consent_seconds=30)
    )
    first = fired(ledger.open("sip:alice@x.test", LIST, "sip:bob@x.test", ["MESSAGE"]))
    clock.advance(5)
    again = fired(ledger.open("sip:alice@x.test", LIST, "sip:bob@x.test", ["MESSAGE"]))
    assert again.id == first.id and again.expires == 35
    failure = fired(ledger.open("sip:alice@x.test", LIST, "sip:bob@x.test", ["MESSAGE"]))
    assert isinstance(failure.value, RateExceeded) and failure.value.retry_after == 3595
    clock.advance(29)
    assert fired(store.get_consent(first.id)).state is ConsentState.PENDING
    clock.advance(1)
    assert fired(store.get_consent(first.id)).state is ConsentState.EXPIRED


class _CountingStore(MemoryPermissionStore):
    """Counts full listings: the expiry timer must re-arm without one."""

    listings = 0

    def list_consents(self, *args: Any, **kwargs: Any) -> Any:
        self.listings += 1
        return super().list_consents(*args, **kwargs)


def test_ledger_expires_each_record_at_its_time_without_listing_them() -> None:
    clock = Clock()
    store = _CountingStore()
    # Pending from before a restart: start() arms the timer from the store.
    alice = "sip:alice@x.test"
    restored = fired(
        store.open_consent(alice, LIST, "sip:carol@x.test", ["MESSAGE"], "t0", 0.0, 20.0)
    )
    ledger = ConsentLedger(store, clock, ConsentLimits(pending_consent_seconds=30))
    fired(ledger.start())
    first = fired(ledger.open(alice, LIST, "sip:bob@x.test", ["MESSAGE"]))
    clock.advance(10)
    second = fired(ledger.open(alice, LIST, "sip:dave@x.test", ["MESSAGE"]))

    def states() -> list[ConsentState]:
        return [fired(store.get_consent(r.id)).state for r in (restored, first, second)]

    pending, expired = ConsentState.PENDING, ConsentState.EXPIRED
    clock.advance(9.5)
    assert states() == [pending, pending, pending]
    clock.advance(0.5)
    assert states() == [expired, pending, pending]
    clock.advance(10)
    assert states() == [expired, expired, pending]
    clock.advance(10)
    assert states() == [expired, expired, expired]
    assert fired(store.next_consent_expiry()) is None
    assert store.listings == 0


def test_a_consent_opened_at_another_node_expires_here_on_time() -> None:
    """Should the node that opened it be gone, its expiry still happens."""
    clock = Clock()
    store = MemoryPermissionStore()
    ledger = ConsentLedger(store, clock, ConsentLimits(pending_consent_seconds=30))
    record = fired(
        store.open_consent("sip:a@x.test", LIST, "sip:b@x.test", ["MESSAGE"], "t", 0, 20)
    )
    # What the other node's change looks like here (relayd.consent.pgchanges).
    store._listeners.emit([StoreChange("consent", consent=record, remote=True)])
    clock.advance(20)
    assert fired(store.get_consent(record.id)).state is ConsentState.EXPIRED
    ledger.stop()


def test_a_recipients_triggers_have_their_own_hourly_rate() -> None:
    """RFC 5360 §5.11: each trigger makes the relay send consent requests, so triggers
    are rate-limited like the requests; a recipient's count is not a sender's."""
    clock = Clock()
    store = MemoryPermissionStore()
    ledger = ConsentLedger(store, clock, ConsentLimits(consent_requests_per_hour=2))
    fired(ledger.open("sip:bob@x.test", LIST, "sip:carol@x.test", ["MESSAGE"]))
    fired(ledger.open("sip:bob@x.test", LIST, "sip:dave@x.test", ["MESSAGE"]))
    assert fired(ledger.count_trigger("sip:bob@x.test")) is None
    clock.advance(10)
    assert fired(ledger.count_trigger("sip:bob@X.TEST;transport=tcp")) is None
    failure = fired(ledger.count_trigger("sip:bob@x.test"))
    assert isinstance(failure.value, RateExceeded) and failure.value.retry_after == 3590
    assert fired(ledger.count_trigger("sip:carol@x.test")) is None


def test_a_request_counts_against_whom_it_is_counted_as() -> None:
    """A list addition's request (sender: the list) spends its owner's hourly rate."""
    clock = Clock()
    store = MemoryPermissionStore()
    ledger = ConsentLedger(store, clock, ConsentLimits(consent_requests_per_hour=1))
    alice = "sip:alice@x.test"
    record = fired(ledger.open(LIST, LIST, "sip:bob@x.test", ["MESSAGE"], counted_as=alice))
    assert record.sender == LIST
    failure = fired(ledger.open(alice, LIST, "sip:carol@x.test", ["MESSAGE"]))
    assert isinstance(failure.value, RateExceeded)
    assert fired(ledger.open(LIST, LIST, "sip:carol@x.test", ["MESSAGE"])).sender == LIST
