"""consent-pending-additions (RFC 5362): the list owner's view of its members' consent."""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from relayd.consent.lists import ListDirectory, URIList
from relayd.consent.permissions import PermissionCache
from relayd.consent.store import ConsentState, MemoryPermissionStore, StoreChange
from relayd.consent.vocabulary import PENDING_ADDITIONS_NAMESPACE, RESOURCE_LISTS_NAMESPACE
from relayd.sip.events import (
    PendingAdditionsPackage,
    SubscriptionManager,
    pending_additions_body,
)
from relayd.sip.message import Headers, SIPRequest, SIPResponse, make_response
from relayd.sipuri import SIPURI
from relayd.testing import consent_ruleset, fired, grant_document

LIST = "sip:friends@relay.test"
ALICE = "sip:alice@relay.test"
BOB, CAROL, DAVE, ERIN, FRANK = (
    f"sip:{name}@relay.test" for name in ("bob", "carol", "dave", "erin", "frank")
)


def states(body: bytes) -> dict[str | None, str | None]:
    """Member URI → RFC 5362 state, read the way a subscriber reads the document."""
    root = etree.fromstring(body)
    assert root.tag == f"{{{RESOURCE_LISTS_NAMESPACE}}}resource-lists"
    out = {}
    for entry in root.iterfind(
        f"{{{RESOURCE_LISTS_NAMESPACE}}}list/{{{RESOURCE_LISTS_NAMESPACE}}}entry"
    ):
        (state,) = entry.findall(f"{{{PENDING_ADDITIONS_NAMESPACE}}}consent-status")
        out[entry.get("uri")] = state.text
    return out


def test_the_body_is_a_resource_list_with_a_state_per_entry() -> None:
    body = pending_additions_body([(BOB, "granted"), (CAROL, "waiting")])
    assert body.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    assert states(body) == {BOB: "granted", CAROL: "waiting"}
    root = etree.fromstring(body)
    assert root.nsmap == {None: RESOURCE_LISTS_NAMESPACE, "cs": PENDING_ADDITIONS_NAMESPACE}
    assert PENDING_ADDITIONS_NAMESPACE == "urn:ietf:params:xml:ns:consent-status"
    assert states(pending_additions_body(())) == {}


def test_the_rfc_5362_example_reads_as_ours_does() -> None:
    """RFC 5362 §5.1.11's example, read by the same reader: the element is
    ``cs:consent-status`` inside each entry, next to RFC 4826's own children."""
    example = b"""<?xml version="1.0" encoding="UTF-8"?>
      <resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists"
       xmlns:cs="urn:ietf:params:xml:ns:consent-status">
       <list>
        <entry uri="sip:bill@example.com">
         <display-name>Bill Doe</display-name>
         <cs:consent-status>pending</cs:consent-status>
        </entry>
        <entry uri="sip:nancy@example.com">
         <display-name>Nancy Gross</display-name>
         <cs:consent-status>granted</cs:consent-status>
        </entry>
       </list>
      </resource-lists>"""
    assert states(example) == {
        "sip:bill@example.com": "pending",
        "sip:nancy@example.com": "granted",
    }
    ours = etree.fromstring(pending_additions_body([("sip:bill@example.com", "pending")]))
    (element,) = ours.iter(f"{{{PENDING_ADDITIONS_NAMESPACE}}}consent-status")
    parent = element.getparent()
    assert parent is not None and parent.tag == f"{{{RESOURCE_LISTS_NAMESPACE}}}entry"


class Recorder:
    def __init__(self) -> None:
        self.sent: list[SIPRequest] = []

    def __call__(self, request: SIPRequest, destination: object) -> Deferred[SIPResponse]:
        self.sent.append(request)
        return succeed(make_response(request, 200))


def subscribe(uri: str = LIST) -> SIPRequest:
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP a.test;branch=z9hG4bK1"),
            ("From", f"<{ALICE}>;tag=ft"),
            ("To", f"<{uri}>"),
            ("Call-ID", "call"),
            ("CSeq", "1 SUBSCRIBE"),
            ("Contact", "<sip:alice@192.0.2.1:5070>"),
            ("Event", "consent-pending-additions"),
            ("Expires", "600"),
        ]
    )
    return SIPRequest("SUBSCRIBE", SIPURI.parse(uri), headers)


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.store = MemoryPermissionStore()
        self.cache = PermissionCache(self.store, self.clock)
        members = (BOB, CAROL, DAVE, ERIN, FRANK)
        self.directory = ListDirectory(
            self.store, "relay.test", file_lists=[URIList(LIST, members, owner=ALICE)]
        )
        self.sender = Recorder()
        self.manager = SubscriptionManager(self.clock, self.sender, lambda: "sip:relay.test")
        self.manager.register(PendingAdditionsPackage(self.store, self.cache, self.directory))
        name, every = PendingAdditionsPackage.name, PendingAdditionsPackage.ANY
        self.store.add_listener(self.cache.store_changed)
        self.store.add_listener(self.directory.store_changed)
        self.directory.add_observer(lambda: self.manager.resource_changed(name, every))
        self.store.add_listener(self.consent_changed)
        self.cache.add_observer(self.permissions_changed)

    def permissions_changed(self, recipient_key: str) -> None:
        for list_uri in self.directory.lists_with(recipient_key):
            key = PendingAdditionsPackage.list_key(list_uri)
            self.manager.resource_changed(PendingAdditionsPackage.name, key)

    def consent_changed(self, change: StoreChange) -> None:
        if change.consent is not None:
            key = PendingAdditionsPackage.list_key(change.consent.list_uri)
            self.manager.resource_changed(PendingAdditionsPackage.name, key)

    def open(self, recipient: str, sender: str = ALICE, state: ConsentState | None = None) -> None:
        record = fired(
            self.store.open_consent(sender, LIST, recipient, ["MESSAGE"], "t" * 22, 0, 99)
        )
        if state is not None:
            fired(self.store.set_consent_state(record.id, state))

    def run(self, request: SIPRequest, who: str = ALICE) -> Any:
        return fired(self.manager.handle_subscribe(request, who, "src"))


@pytest.fixture
def world() -> World:
    return World()


def test_every_member_is_shown_in_the_state_the_store_gives(world: World) -> None:
    fired(world.store.put_document("consent-rules", BOB, "index", grant_document(ALICE, LIST)))
    world.open(CAROL)
    world.open(DAVE, state=ConsentState.DENIED)
    world.open(ERIN, state=ConsentState.EXPIRED)
    world.open(FRANK, sender="sip:mallory@relay.test")  # not the owner's request
    ok = world.run(subscribe())
    assert ok.status == 200
    world.clock.advance(0)
    (notify,) = world.sender.sent
    assert notify.headers.get("event") == "consent-pending-additions"
    assert notify.headers.get("content-type") == "application/resource-lists+xml"
    assert states(notify.body) == {
        BOB: "granted",
        CAROL: "waiting",
        DAVE: "denied",
        ERIN: "error",
        FRANK: "pending",
    }


def test_a_request_a_list_addition_opened_is_the_owners_too(world: World) -> None:
    """RFC 5362 for RFC 5360 §5.3: the whole-list request (its sender the list URI)
    shows as the owner's, and its grant (``cp:many``) as granted."""
    world.open(BOB, sender=LIST)
    world.open(CAROL, sender=LIST, state=ConsentState.DENIED)
    many = consent_ruleset(
        f'<rule id="all"><conditions><identity><many/></identity><cr:target uri="{LIST}"/>'
        "</conditions><actions><cr:trans-handling>grant</cr:trans-handling></actions></rule>"
    )
    fired(world.store.put_document("consent-rules", DAVE, "index", many))
    world.run(subscribe())
    world.clock.advance(0)
    assert states(world.sender.sent[-1].body) == {
        BOB: "waiting",
        CAROL: "denied",
        DAVE: "granted",
        ERIN: "pending",
        FRANK: "pending",
    }


def test_a_revoked_grant_shows_denied(world: World) -> None:
    world.open(BOB, state=ConsentState.GRANTED)
    world.run(subscribe())
    world.clock.advance(0)
    assert states(world.sender.sent[-1].body)[BOB] == "denied"


def test_only_the_list_owner_may_subscribe(world: World) -> None:
    refused = world.run(subscribe(), who=BOB)
    assert refused.value.status == 403
    unknown = world.run(subscribe("sip:nolist@relay.test"))
    assert unknown.value.status == 404
    assert world.manager.count == 0 and world.sender.sent == []


def test_a_change_of_a_member_notifies_and_an_unrelated_one_does_not(world: World) -> None:
    world.open(CAROL)
    world.run(subscribe())
    world.clock.advance(0)
    assert states(world.sender.sent[-1].body)[CAROL] == "waiting"
    fired(world.store.put_document("consent-rules", CAROL, "index", grant_document(ALICE, LIST)))
    assert len(world.sender.sent) == 2
    assert states(world.sender.sent[-1].body)[CAROL] == "granted"
    other = "sip:zed@relay.test"
    fired(world.store.put_document("consent-rules", other, "index", grant_document(ALICE, LIST)))
    world.open(DAVE, sender="sip:mallory@relay.test")
    assert len(world.sender.sent) == 2  # the owner's view did not change
    world.open(DAVE)
    assert len(world.sender.sent) == 3
    assert states(world.sender.sent[-1].body)[DAVE] == "waiting"


def test_expiry_ends_the_subscription(world: World) -> None:
    world.run(subscribe())
    world.clock.advance(600)
    last = world.sender.sent[-1]
    assert last.headers.get("subscription-state") == "terminated;reason=timeout"
    assert world.manager.count == 0


def test_a_member_added_to_an_owners_list_document_is_shown(world: World) -> None:
    def lists(*members: str) -> bytes:
        entries = "".join(f'<entry uri="{m}"/>' for m in members)
        return (
            f'<resource-lists xmlns="{RESOURCE_LISTS_NAMESPACE}">'
            f'<list name="team">{entries}</list></resource-lists>'
        ).encode()

    team = "sip:team@relay.test"
    fired(world.store.put_document("resource-lists", ALICE, "index", lists(BOB)))
    world.run(subscribe(team))
    world.clock.advance(0)
    assert states(world.sender.sent[-1].body) == {BOB: "pending"}
    fired(world.store.put_document("resource-lists", ALICE, "index", lists(BOB, CAROL)))
    assert states(world.sender.sent[-1].body) == {BOB: "pending", CAROL: "pending"}
    fired(world.store.delete_document("resource-lists", ALICE, "index"))
    last = world.sender.sent[-1]
    assert last.headers.get("subscription-state") == "terminated;reason=noresource"
    assert world.manager.count == 0


def test_a_list_that_changes_owner_ends_the_subscription(world: World) -> None:
    world.run(subscribe())
    world.clock.advance(0)
    members = (BOB, CAROL, DAVE, ERIN, FRANK)
    world.directory.replace_file_lists([URIList(LIST, members, owner=BOB)])
    last = world.sender.sent[-1]
    assert last.headers.get("subscription-state") == "terminated;reason=rejected"
    assert world.manager.count == 0
