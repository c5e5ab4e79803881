"""Permission documents: Permission-URI names and scopes, and the permission cache."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from relayd.consent.documents import GLOBAL_XUI, DocumentKey
from relayd.consent.permissions import PermissionCache, permission_token
from relayd.consent.store import MemoryPermissionStore, StoreUnavailable
from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as CP
from relayd.consent.vocabulary import CONSENT_POLICY_NAMESPACE as CR
from relayd.testing import captured_log, fired

LIST = "sip:friends@relay.test"
ALICE = "sip:alice@example.test"


def grant(sender: str) -> bytes:
    return (
        f'<ruleset xmlns="{CP}" xmlns:cr="{CR}"><rule id="a"><conditions><identity>'
        f'<one id="{sender}"/></identity><cr:target uri="{LIST}"/></conditions><actions>'
        "<cr:trans-handling>grant</cr:trans-handling></actions></rule></ruleset>"
    ).encode()


def test_a_permission_document_is_named_by_its_token() -> None:
    token = "tok_en-123456789012"
    assert permission_token(DocumentKey("consent-rules", ALICE, f"p-{token}.xml")) == token
    assert permission_token(DocumentKey("resource-lists", ALICE, f"p-{token}.xml")) is None
    assert permission_token(DocumentKey("consent-rules", GLOBAL_XUI, f"p-{token}.xml")) is None
    assert permission_token(DocumentKey("consent-rules", ALICE, "p-short.xml")) is None


def test_missing_members_follow_store_changes_without_reloading() -> None:
    store = MemoryPermissionStore()
    cache = PermissionCache(store, Clock())
    store.add_listener(cache.store_changed)
    changed: list[str] = []
    cache.add_observer(changed.append)
    members = ["sip:bob@x.test", "sip:carol@x.test"]
    missing = fired(cache.missing("sip:alice@x.test", LIST, members, "MESSAGE"))
    assert missing == members
    fired(store.put_document("consent-rules", "sip:bob@x.test", "index", grant("sip:alice@x.test")))
    assert changed == ["sip:bob@x.test"]
    missing = fired(cache.missing("sip:alice@x.test", LIST, members, "MESSAGE"))
    assert missing == ["sip:carol@x.test"]
    assert fired(cache.missing("sip:mallory@x.test", LIST, members, "MESSAGE")) == members
    fired(store.delete_document("consent-rules", "sip:bob@x.test", "index"))
    assert fired(cache.missing("sip:alice@x.test", LIST, members, "MESSAGE")) == members


def test_a_plain_permission_reads_its_scope_from_the_permission_uri() -> None:
    """Seed §4, §8: the plain form names the sender only; the document's Permission URI
    gives recipient, list and methods, and a refresh that adds a method widens it."""
    store = MemoryPermissionStore()
    cache = PermissionCache(store, Clock())
    store.add_listener(cache.store_changed)
    bob, alice = "sip:bob@x.test:5070", "sip:alice@x.test"
    token = "t" * 22
    record = fired(store.open_consent(alice, LIST, bob, ["MESSAGE"], token, 0, 100))
    plain = (
        f'<ruleset xmlns="{CP}"><rule id="p"><conditions><identity><one id="{alice}"/>'
        "</identity></conditions></rule></ruleset>"
    ).encode()
    assert fired(cache.missing(alice, LIST, [bob], "MESSAGE")) == [bob]
    fired(store.put_document("consent-rules", bob, f"p-{token}.xml", plain))
    assert fired(cache.missing(alice, LIST, [bob], "MESSAGE")) == []
    assert fired(cache.missing(alice, "sip:other@relay.test", [bob], "MESSAGE")) == [bob]
    assert fired(cache.missing(alice, LIST, [bob], "INVITE")) == [bob]
    # The same document under a name no Permission URI was minted for grants nothing.
    fired(store.put_document("consent-rules", bob, "index", plain))
    fired(store.delete_document("consent-rules", bob, f"p-{token}.xml"))
    assert fired(cache.missing(alice, LIST, [bob], "MESSAGE")) == [bob]
    fired(store.put_document("consent-rules", bob, f"p-{token}.xml", plain))
    refreshed = fired(store.open_consent(alice, LIST, bob, ["INVITE"], "u" * 22, 1, 200))
    assert refreshed.id == record.id and set(refreshed.methods) == {"MESSAGE", "INVITE"}
    assert fired(cache.missing(alice, LIST, [bob], "INVITE")) == []


def test_a_member_spelled_with_another_case_finds_its_documents() -> None:
    store = MemoryPermissionStore()
    fired(store.put_document("consent-rules", "sip:bob@x.test", "index", grant("sip:alice@x.test")))
    cache = PermissionCache(store, Clock())
    store.add_listener(cache.store_changed)
    members = ["SIP:bob@X.Test"]
    assert fired(cache.missing("sip:alice@x.test", LIST, members, "MESSAGE")) == []


def test_a_lists_answer_is_remembered_until_a_validity_boundary_or_a_change() -> None:
    store = MemoryPermissionStore()
    clock = Clock()
    cache = PermissionCache(store, clock)
    store.add_listener(cache.store_changed)
    members = ["sip:bob@x.test", "sip:carol@x.test"]
    until_100s = grant("sip:alice@x.test").replace(
        b"</conditions>",
        b"<validity><from>1970-01-01T00:00:00Z</from>"
        b"<until>1970-01-01T00:01:40Z</until></validity></conditions>",
    )
    for member in members:
        fired(store.put_document("consent-rules", member, "index", until_100s))
    assert fired(cache.missing("sip:alice@x.test", LIST, members, "MESSAGE")) == []
    clock.advance(99.9)
    assert cache.missing_now("sip:alice@x.test", LIST, members, "MESSAGE") == []
    clock.advance(0.1)  # the grant's interval ends: the remembered answer must not outlive it
    assert cache.missing_now("sip:alice@x.test", LIST, members, "MESSAGE") == members
    fired(
        store.put_document("consent-rules", "sip:carol@x.test", "index", grant("sip:alice@x.test"))
    )
    assert cache.missing_now("sip:alice@x.test", LIST, members, "MESSAGE") == ["sip:bob@x.test"]


class _SlowReads(MemoryPermissionStore):
    """Document reads wait until released: a store update in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Deferred[Any], Deferred[Any]]] = []
        self.slow = False

    def get_document(self, auid: str, xui: str, name: str) -> Deferred[Any]:
        read = super().get_document(auid, xui, name)
        if not self.slow:
            return read
        later: Deferred[Any] = Deferred()
        self.held.append((read, later))
        return later

    def release(self) -> None:
        for read, later in self.held:
            read.addCallback(later.callback)
        self.held.clear()


def test_a_remembered_answer_is_not_given_while_a_change_is_being_read() -> None:
    store = _SlowReads()
    cache = PermissionCache(store, Clock())
    store.add_listener(cache.store_changed)
    members = ["sip:bob@x.test"]
    fired(store.put_document("consent-rules", "sip:bob@x.test", "index", grant("sip:alice@x.test")))
    assert fired(cache.missing("sip:alice@x.test", LIST, members, "MESSAGE")) == []
    assert cache.missing_now("sip:alice@x.test", LIST, members, "MESSAGE") == []  # remembered
    store.slow = True
    fired(store.delete_document("consent-rules", "sip:bob@x.test", "index"))
    assert store.held  # the cache is reading the changed document
    assert cache.missing_now("sip:alice@x.test", LIST, members, "MESSAGE") is None
    store.release()
    assert cache.missing_now("sip:alice@x.test", LIST, members, "MESSAGE") == members


def test_a_change_that_cannot_be_read_drops_the_cached_documents() -> None:
    """A revocation announced while the store is unreachable (a database restart) must
    not leave the grant cached: the recipient's documents are read afresh later."""
    store = MemoryPermissionStore()
    cache = PermissionCache(store, Clock())
    store.add_listener(cache.store_changed)
    members = ["sip:bob@x.test"]
    fired(store.put_document("consent-rules", "sip:bob@x.test", "index", grant("sip:alice@x.test")))
    assert fired(cache.missing("sip:alice@x.test", LIST, members, "MESSAGE")) == []
    reads = store.get_document
    store.get_document = lambda *key: fail(StoreUnavailable("down"))  # type: ignore[method-assign]
    with captured_log() as observer:
        fired(store.delete_document("consent-rules", "sip:bob@x.test", "index"))
    store.get_document = reads  # type: ignore[method-assign]
    assert [e["log_level"].name for e in observer] == ["warn"]
    assert fired(cache.missing("sip:alice@x.test", LIST, members, "MESSAGE")) == members
