"""One behavioural suite, the store contract, for every IPermissionStore backend:
memory, SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ParamSpec, cast

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relayd.consent.postgres import PostgresPermissionStore
from relayd.consent.sqlite import SQLitePermissionStore
from relayd.consent.store import (
    ConsentState,
    IPermissionStore,
    MemoryPermissionStore,
    PendingConsent,
    PreconditionFailed,
    StoreChange,
    StoredBinding,
    StoredDocument,
)

_P = ParamSpec("_P")


def async_test(
    function: Callable[_P, Coroutine[Any, Any, None]],
) -> Callable[_P, Deferred[None]]:
    """pytest_twisted.ensureDeferred with a type mypy can see (pytest_twisted is untyped)."""
    return cast(Callable[_P, Deferred[None]], pytest_twisted.ensureDeferred(function))


AUID = "consent-rules"
XUI = "sip:carol@example.test"
DOC = b'<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"/>'


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IPermissionStore]:
    durable: IPermissionStore
    if request.param == "memory":
        yield MemoryPermissionStore()
        return
    if request.param == "sqlite":
        durable = SQLitePermissionStore(str(tmp_path / "store.sqlite"), reactor)
    else:
        durable = PostgresPermissionStore(request.getfixturevalue("postgres_dsn"), reactor)
    yield durable
    pytest_twisted.blockon(durable.close())


def test_implementations_provide_interface(store: IPermissionStore) -> None:
    assert verifyObject(IPermissionStore, store)


@async_test
async def test_put_then_get_document(store: IPermissionStore) -> None:
    assert await store.get_document(AUID, XUI, "index") is None
    write = await store.put_document(AUID, XUI, "index", DOC)
    assert write.created
    assert write.etag.startswith('"') and write.etag.endswith('"')
    assert await store.get_document(AUID, XUI, "index") == (DOC, write.etag)


@async_test
async def test_replace_changes_etag(store: IPermissionStore) -> None:
    first = await store.put_document(AUID, XUI, "index", DOC)
    second = await store.put_document(AUID, XUI, "index", DOC + b" ")
    assert not second.created
    assert second.etag != first.etag
    assert await store.get_document(AUID, XUI, "index") == (DOC + b" ", second.etag)


@async_test
async def test_documents_are_keyed_by_auid_xui_and_name(store: IPermissionStore) -> None:
    await store.put_document(AUID, XUI, "b", DOC)
    await store.put_document(AUID, XUI, "a", DOC)
    await store.put_document(AUID, "sip:other@example.test", "c", DOC)
    await store.put_document("resource-lists", XUI, "d", DOC)
    assert await store.list_documents(AUID, XUI) == ["a", "b"]
    assert await store.list_documents("resource-lists", XUI) == ["d"]
    assert await store.get_document("resource-lists", XUI, "a") is None


@async_test
async def test_if_match_mismatch_fails_and_writes_nothing(store: IPermissionStore) -> None:
    write = await store.put_document(AUID, XUI, "index", DOC)
    with pytest.raises(PreconditionFailed) as info:
        await store.put_document(AUID, XUI, "index", b"<other/>", if_match='"stale"')
    assert info.value.current_etag == write.etag
    assert await store.get_document(AUID, XUI, "index") == (DOC, write.etag)


@async_test
async def test_if_match_current_etag_succeeds(store: IPermissionStore) -> None:
    write = await store.put_document(AUID, XUI, "index", DOC)
    again = await store.put_document(AUID, XUI, "index", DOC, if_match=write.etag)
    listed = await store.put_document(AUID, XUI, "index", DOC, if_match=['"x"', again.etag])
    assert listed.etag != again.etag


@async_test
async def test_if_match_star_requires_existing(store: IPermissionStore) -> None:
    with pytest.raises(PreconditionFailed):
        await store.put_document(AUID, XUI, "index", DOC, if_match="*")
    await store.put_document(AUID, XUI, "index", DOC)
    await store.put_document(AUID, XUI, "index", DOC, if_match="*")


@async_test
async def test_if_none_match_star_creates_only(store: IPermissionStore) -> None:
    write = await store.put_document(AUID, XUI, "index", DOC, if_none_match="*")
    assert write.created
    with pytest.raises(PreconditionFailed):
        await store.put_document(AUID, XUI, "index", DOC, if_none_match="*")
    with pytest.raises(PreconditionFailed):
        await store.put_document(AUID, XUI, "index", DOC, if_none_match=write.etag)
    await store.put_document(AUID, XUI, "index", DOC, if_none_match='"other"')


@async_test
async def test_concurrent_conflicting_writes_exactly_one_wins(store: IPermissionStore) -> None:
    base = await store.put_document(AUID, XUI, "index", DOC)
    attempts = [
        store.put_document(AUID, XUI, "index", b"<v%d/>" % i, if_match=base.etag) for i in range(5)
    ]
    results: list[tuple[bool, Any]] = await defer.DeferredList(attempts, consumeErrors=True)
    winners = [value for ok, value in results if ok]
    losers: list[Failure] = [value for ok, value in results if not ok]
    assert len(winners) == 1
    assert len(losers) == 4
    assert all(failure.check(PreconditionFailed) for failure in losers)
    stored = await store.get_document(AUID, XUI, "index")
    assert stored is not None and stored.etag == winners[0].etag


@async_test
async def test_concurrent_creates_exactly_one_wins(store: IPermissionStore) -> None:
    attempts = [
        store.put_document(AUID, XUI, "new", b"<v%d/>" % i, if_none_match="*") for i in range(3)
    ]
    results = await defer.DeferredList(attempts, consumeErrors=True)
    assert sum(ok for ok, _ in results) == 1


@async_test
async def test_delete_document(store: IPermissionStore) -> None:
    assert not await store.delete_document(AUID, XUI, "index")
    write = await store.put_document(AUID, XUI, "index", DOC)
    with pytest.raises(PreconditionFailed):
        await store.delete_document(AUID, XUI, "index", if_match='"stale"')
    assert await store.delete_document(AUID, XUI, "index", if_match=write.etag)
    assert await store.get_document(AUID, XUI, "index") is None
    with pytest.raises(PreconditionFailed):
        await store.delete_document(AUID, XUI, "index", if_match="*")


@async_test
async def test_document_changes_announced_after_commit(store: IPermissionStore) -> None:
    seen: list[tuple[StoreChange, Deferred[StoredDocument | None]]] = []

    def listener(change: StoreChange) -> None:
        # The listener can already read the committed state.
        seen.append((change, store.get_document(AUID, XUI, "index")))

    store.add_listener(listener)
    write = await store.put_document(AUID, XUI, "index", DOC)
    await store.delete_document(AUID, XUI, "index")
    with pytest.raises(PreconditionFailed):
        await store.put_document(AUID, XUI, "index", DOC, if_match="*")
    changes = [change for change, _ in seen]
    assert changes == [
        StoreChange("document", AUID, XUI, "index", write.etag, body=DOC),
        StoreChange("document", AUID, XUI, "index", None),
    ]
    first_read = await seen[0][1]
    assert first_read == (DOC, write.etag)
    store.remove_listener(listener)
    await store.put_document(AUID, XUI, "index", DOC)
    assert len(seen) == 2


@async_test
async def test_failing_listener_does_not_break_write(store: IPermissionStore) -> None:
    calls: list[StoreChange] = []

    def broken(change: StoreChange) -> None:
        raise RuntimeError("listener bug")

    store.add_listener(broken)
    store.add_listener(calls.append)
    await store.put_document(AUID, XUI, "index", DOC)
    assert len(calls) == 1


@async_test
async def test_listeners_run_on_reactor_thread(store: IPermissionStore) -> None:
    threads: list[threading.Thread] = []
    store.add_listener(lambda change: threads.append(threading.current_thread()))
    await store.put_document(AUID, XUI, "index", DOC)
    assert threads == [threading.main_thread()]


async def _open(
    store: IPermissionStore,
    sender: str = "sip:alice@example.test",
    *,
    methods: Sequence[str] = ("MESSAGE",),
    permission_token: str | None = None,
    created: float = 100.0,
    expires: float = 200.0,
) -> PendingConsent:
    token = permission_token if permission_token is not None else "tok-" + sender
    return await store.open_consent(
        sender, "sip:friends@relay.example.test", XUI, methods, token, created, expires
    )


@async_test
async def test_open_consent_creates_pending_record(store: IPermissionStore) -> None:
    record = await _open(store)
    assert record.state is ConsentState.PENDING
    assert record.methods == ("MESSAGE",)
    assert len(record.id) >= 20
    assert await store.get_consent(record.id) == record
    assert await store.find_consent_by_token("tok-sip:alice@example.test") == record
    assert await store.find_open_consent(record.sender, record.list_uri, XUI) == record
    assert await store.get_consent("nope") is None
    assert await store.find_consent_by_token("nope") is None


@async_test
async def test_repeat_consent_refreshes_open_record(store: IPermissionStore) -> None:
    first = await _open(store)
    again = await _open(
        store, methods=["MESSAGE", "INVITE"], permission_token="other", created=150.0, expires=400.0
    )
    assert again.id == first.id
    assert again.permission_token == first.permission_token
    assert again.created == first.created
    assert again.expires == 400.0
    assert again.methods == ("MESSAGE", "INVITE")
    assert await store.list_consents() == [again]


@async_test
async def test_new_record_after_previous_was_decided(store: IPermissionStore) -> None:
    first = await _open(store)
    granted = await store.set_consent_state(first.id, ConsentState.GRANTED)
    assert granted is not None and granted.state is ConsentState.GRANTED
    second = await _open(store, permission_token="tok-2", created=300.0)
    assert second.id != first.id
    assert [r.state for r in await store.list_consents(recipient=XUI)] == [
        ConsentState.GRANTED,
        ConsentState.PENDING,
    ]
    with pytest.raises(ValueError, match="pending"):
        await store.set_consent_state(first.id, ConsentState.PENDING)


@async_test
async def test_list_consents_filters(store: IPermissionStore) -> None:
    alice = await _open(store, "sip:alice@example.test", created=1.0)
    bob = await _open(store, "sip:bob@example.test", created=2.0)
    await store.set_consent_state(bob.id, ConsentState.DENIED)
    assert [r.id for r in await store.list_consents()] == [alice.id, bob.id]
    assert [r.id for r in await store.list_consents(sender=bob.sender)] == [bob.id]
    assert [r.id for r in await store.list_consents(state=ConsentState.PENDING)] == [alice.id]
    assert await store.list_consents(list_uri="sip:other@relay") == []
    assert await store.set_consent_state("missing", ConsentState.GRANTED) is None


@async_test
async def test_expire_consents(store: IPermissionStore) -> None:
    early = await _open(store, "sip:a@x", expires=50.0)
    late = await _open(store, "sip:b@x", expires=500.0)
    expired = await store.expire_consents(100.0)
    assert [(r.id, r.state) for r in expired] == [(early.id, ConsentState.EXPIRED)]
    stored = await store.get_consent(early.id)
    assert stored is not None and stored.state is ConsentState.EXPIRED
    assert await store.expire_consents(100.0) == []
    assert (await store.get_consent(late.id)) == late


@async_test
async def test_next_consent_expiry_is_the_earliest_pending(store: IPermissionStore) -> None:
    assert await store.next_consent_expiry() is None
    late = await _open(store, "sip:b@x", expires=500.0)
    early = await _open(store, "sip:a@x", expires=50.0)
    assert await store.next_consent_expiry() == 50.0
    await store.set_consent_state(early.id, ConsentState.GRANTED)
    assert await store.next_consent_expiry() == 500.0
    await store.expire_consents(1000.0)
    assert await store.next_consent_expiry() is None
    stored = await store.get_consent(late.id)
    assert stored is not None and stored.state is ConsentState.EXPIRED


@async_test
async def test_delete_consent_and_consent_events(store: IPermissionStore) -> None:
    seen: list[StoreChange] = []
    store.add_listener(seen.append)
    record = await _open(store)
    await store.set_consent_state(record.id, ConsentState.GRANTED)
    assert await store.delete_consent(record.id)
    assert not await store.delete_consent(record.id)
    assert [change.kind for change in seen] == ["consent"] * 3
    assert [c.consent.state for c in seen if c.consent] == [
        ConsentState.PENDING,
        ConsentState.GRANTED,
        ConsentState.GRANTED,
    ]


# -- SQLite only --------------------------------------------------------------------


BOB = "sip:bob@example.test"


def _binding(uri: str, expires: float, cseq: int = 1, aor: str = BOB) -> StoredBinding:
    return StoredBinding(aor, uri, f"<{uri}>", expires, "call-1", cseq, 0.5)


@async_test
async def test_bindings_are_keyed_by_aor_and_contact(store: IPermissionStore) -> None:
    one, two = _binding("sip:bob@192.0.2.1", 300.0), _binding("sip:bob@192.0.2.2", 400.0)
    await store.save_bindings(BOB, [one, two], [])
    await store.save_bindings("sip:carol@example.test", [_binding("sip:c@h", 300.0)], [])
    refreshed = _binding("sip:bob@192.0.2.1", 900.0, cseq=2)
    await store.save_bindings(BOB, [refreshed], ["sip:bob@192.0.2.2"])
    assert await store.list_bindings(100.0, 10) == [
        refreshed,
        StoredBinding("sip:carol@example.test", "sip:c@h", "<sip:c@h>", 300.0, "call-1", 1, 0.5),
    ]
    assert await store.list_bindings(100.0, 1) == [refreshed]


@async_test
async def test_a_binding_keeps_where_it_was_registered_from(store: IPermissionStore) -> None:
    binding = StoredBinding(BOB, "sip:bob@10.0.0.5", "<sip:bob@10.0.0.5>", 300.0, "c", 1)
    sourced = replace(binding, source="UDP 192.0.2.7 40000")
    await store.save_bindings(BOB, [sourced], [])
    assert await store.list_bindings(0.0, 10) == [sourced]


@async_test
async def test_expired_bindings_are_never_listed(store: IPermissionStore) -> None:
    await store.save_bindings(BOB, [_binding("sip:a@h", 300.0), _binding("sip:b@h", 600.0)], [])
    assert [b.uri for b in await store.list_bindings(300.0, 10)] == ["sip:b@h"]
    assert await store.expire_bindings(300.0) == 1
    assert await store.expire_bindings(300.0) == 0
    assert [b.uri for b in await store.list_bindings(0.0, 10)] == ["sip:b@h"]
    assert await store.list_bindings(600.0, 10) == []


@async_test
async def test_saved_bindings_are_announced(store: IPermissionStore) -> None:
    """What another node's registrar applies to reach a UA registered here."""
    seen: list[StoreChange] = []
    store.add_listener(seen.append)
    one = _binding("sip:bob@192.0.2.1", 300.0)
    await store.save_bindings(BOB, [one], ["sip:bob@192.0.2.9"])
    assert seen == [
        StoreChange("binding", aor=BOB, bindings=(one,), removed=("sip:bob@192.0.2.9",))
    ]


@async_test
async def test_requests_are_counted_in_a_sliding_window(store: IPermissionStore) -> None:
    assert await store.count_request("a", 0.0, 2, 10.0) is None
    assert await store.count_request("a", 1.0, 2, 10.0) is None
    assert await store.count_request("a", 2.0, 2, 10.0) == pytest.approx(8.0)
    assert await store.count_request("b", 2.0, 2, 10.0) is None
    assert await store.count_request("a", 9.5, 2, 10.0) == pytest.approx(1.0)  # at least 1
    assert await store.count_request("a", 10.5, 2, 10.0) is None  # the one at 0 has left
    assert await store.count_request("a", 10.6, 2, 10.0) == 1.0  # 0.4 s, at least 1
    assert await store.count_request("a", 11.5, 2, 10.0) is None
