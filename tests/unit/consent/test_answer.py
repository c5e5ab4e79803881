"""Grant and deny links: tokens, and answering as a PUT at the Permission URI would."""

from __future__ import annotations

from dataclasses import replace

from lxml import etree
from twisted.internet.task import Clock

from relayd.consent.additions import LIST_METHODS, is_whole_list, whole_list_sender
from relayd.consent.answer import answer, answer_document, answer_token, find_answer, link_acts
from relayd.consent.documents import parse_document
from relayd.consent.permissions import PermissionCache, consent_scope
from relayd.consent.policy import check_scope
from relayd.consent.store import ConsentState, MemoryPermissionStore, PendingConsent
from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as CP
from relayd.consent.vocabulary import CONSENT_RULES_AUID
from relayd.testing import fired
from relayd.xcap.usages import USAGES

ALICE, BOB, LIST = "sip:alice@relay.test", "sip:bob@relay.test", "sip:friends@relay.test"


def opened(store: MemoryPermissionStore, expires: float = 100.0) -> PendingConsent:
    record: PendingConsent = fired(
        store.open_consent(ALICE, LIST, BOB, ["MESSAGE"], "p" * 22, 0.0, expires)
    )
    return record


def test_a_link_acts_only_for_its_action_and_record() -> None:
    store = MemoryPermissionStore()
    record = opened(store)
    grant, deny = answer_token(record, "grant"), answer_token(record, "deny")
    assert grant != deny and record.permission_token not in grant + deny
    assert link_acts(record, grant, "grant", 1.0)
    assert not link_acts(record, grant, "deny", 1.0)
    assert not link_acts(record, deny, "grant", 1.0)
    other = replace(record, permission_token="q" * 22)
    assert not link_acts(other, grant, "grant", 1.0)
    assert fired(find_answer(store, grant, "grant", 1.0)) == record
    forged = grant[:-1] + ("B" if grant.endswith("A") else "A")
    assert fired(find_answer(store, forged, "grant", 1.0)) is None
    assert fired(find_answer(store, "nonsense", "grant", 1.0)) is None


def test_a_grant_link_lapses_with_the_request_but_a_deny_link_stays() -> None:
    store = MemoryPermissionStore()
    record = opened(store, expires=10.0)
    assert not link_acts(record, answer_token(record, "grant"), "grant", 10.0)
    assert link_acts(record, answer_token(record, "deny"), "deny", 10_000.0)
    granted = replace(record, state=ConsentState.GRANTED)
    assert not link_acts(granted, answer_token(record, "grant"), "grant", 1.0)
    assert link_acts(granted, answer_token(record, "deny"), "deny", 1.0)


def test_the_answer_document_is_one_an_xcap_put_at_the_permission_uri_would_store() -> None:
    record = opened(MemoryPermissionStore())
    root = parse_document(answer_document(record, "grant"))
    USAGES[CONSENT_RULES_AUID].validate(root)
    check_scope(root, consent_scope(record))


def test_granting_then_denying_lets_the_sender_through_then_revokes() -> None:
    store, clock = MemoryPermissionStore(), Clock()
    cache = PermissionCache(store, clock)
    store.add_listener(cache.store_changed)
    record = opened(store)
    assert not fired(cache.permitted(ALICE, LIST, BOB, "MESSAGE"))
    assert fired(answer(store, record, "grant", clock)) is ConsentState.GRANTED
    assert fired(store.get_consent(record.id)).state is ConsentState.GRANTED
    assert fired(cache.permitted(ALICE, LIST, BOB, "MESSAGE"))
    granted = fired(store.get_consent(record.id))
    assert fired(answer(store, granted, "deny", clock)) is None  # revoked by the document
    assert not fired(cache.permitted(ALICE, LIST, BOB, "MESSAGE"))


def test_denying_a_pending_request_marks_it_denied() -> None:
    store, clock = MemoryPermissionStore(), Clock()
    record = opened(store)
    assert fired(answer(store, record, "deny", clock)) is ConsentState.DENIED
    assert fired(store.get_consent(record.id)).state is ConsentState.DENIED


def test_a_whole_list_grant_lets_every_sender_through_but_one_senders_grant_does_not() -> None:
    """RFC 5360 §5.3: the request a list addition opens names every sender
    (``cp:many``); its grant lets any sender through that list only, while a grant
    naming one sender does not cover the whole list."""
    store, clock = MemoryPermissionStore(), Clock()
    cache = PermissionCache(store, clock)
    store.add_listener(cache.store_changed)
    sender = whole_list_sender(LIST)
    whole: PendingConsent = fired(
        store.open_consent(sender, LIST, BOB, LIST_METHODS, "w" * 22, 0.0, 100.0)
    )
    assert is_whole_list(whole) and not is_whole_list(opened(store))
    root = parse_document(answer_document(whole, "grant"))
    USAGES[CONSENT_RULES_AUID].validate(root)
    check_scope(root, consent_scope(whole))
    identities = [[etree.QName(c).localname for c in e] for e in root.iter(f"{{{CP}}}identity")]
    assert identities == [["many"]]
    seed = fired(store.find_open_consent(ALICE, LIST, BOB))
    assert fired(answer(store, seed, "grant", clock)) is ConsentState.GRANTED
    assert not fired(cache.permitted(sender, LIST, BOB, "MESSAGE"))
    assert fired(answer(store, whole, "grant", clock)) is ConsentState.GRANTED
    assert fired(cache.permitted(sender, LIST, BOB, "MESSAGE"))
    for someone in (ALICE, "sip:carol@elsewhere.test"):
        assert fired(cache.permitted(someone, LIST, BOB, "MESSAGE"))
        assert fired(cache.permitted(someone, LIST, BOB, "INVITE"))
    other_list = "sip:other@relay.test"
    assert not fired(cache.permitted("sip:carol@elsewhere.test", other_list, BOB, "MESSAGE"))
