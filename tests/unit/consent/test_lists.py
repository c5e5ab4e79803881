"""URI-list parsing (RFC 4826 documents, RFC 5365 recipient lists) with the safe parser."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import reactor

from relayd.consent.documents import DocumentKey, DocumentRejected
from relayd.consent.lists import (
    ListDirectory,
    Unroutable,
    URIList,
    URIListError,
    added_members,
    build_list_report,
    build_uri_list,
    every_member,
    parse_list_report,
    parse_lists_document,
    parse_resource_lists,
)
from relayd.consent.sqlite import SQLitePermissionStore
from relayd.consent.store import MemoryPermissionStore, StoreChange
from relayd.consent.vocabulary import CONSENT_POLICY_NAMESPACE as CR
from relayd.consent.vocabulary import RESOURCE_LISTS_NAMESPACE as RL
from relayd.sipuri import SIPURI
from relayd.testing import fired


def test_lists_named_by_cr_uri_or_name_with_owner() -> None:
    body = (
        f'<resource-lists xmlns="{RL}" xmlns:cr="{CR}">'
        f'<list name="friends" cr:owner="sip:alice@example.test">'
        '<entry uri="sip:bob@Example.TEST;transport=tcp"/><list name="inner">'
        '<entry uri="sip:carol@example.test"/></list></list>'
        '<list name="x" cr:uri="sip:team@example.test"><entry uri="sip:bob@example.test"/></list>'
        "</resource-lists>"
    ).encode()
    document = parse_lists_document(body, "example.test")
    first, second = document.lists
    assert document.unroutable == ()
    assert first.uri == "sip:friends@example.test"
    assert first.owner == "sip:alice@example.test"
    assert first.members == ("sip:bob@Example.TEST;transport=tcp", "sip:carol@example.test")
    assert second.uri == "sip:team@example.test" and second.owner is None


def test_members_are_kept_as_written_and_compared_canonically() -> None:
    body = (
        f'<resource-lists xmlns="{RL}"><list name="far">'
        '<entry uri=" sip:bob@127.0.0.1:25180 "/><entry uri="SIP:bob@127.0.0.1:25180"/>'
        '<entry uri="sip:bob@127.0.0.1"/><entry uri="sips:dan@remote.example:5071"/>'
        "</list></resource-lists>"
    ).encode()
    (far,) = parse_lists_document(body, "127.0.0.1").lists
    # The port says where the member is reached; the second spelling is the same member.
    assert far.members == (
        "sip:bob@127.0.0.1:25180",
        "sip:bob@127.0.0.1",
        "sips:dan@remote.example:5071",
    )


@pytest.mark.parametrize(
    "body",
    [
        b'<!DOCTYPE x [<!ENTITY a "b">]><resource-lists xmlns="' + RL.encode() + b'"/>',
        b"<not-xml",
        b'<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"/>',
    ],
)
def test_hostile_or_wrong_documents_are_refused(body: bytes) -> None:
    with pytest.raises(URIListError):
        parse_lists_document(body, "example.test")


def test_what_cannot_be_routed_is_skipped_and_said_why() -> None:
    body = (
        f'<resource-lists xmlns="{RL}" xmlns:cr="{CR}">'
        '<list name="friends"><entry uri="mailto:bob@example.test"/>'
        '<entry uri="sip:carol@example.test"/><list><entry uri="tel:+1555"/>'
        '<entry uri="sip:example.test"/></list></list>'
        '<list><entry uri="sip:dave@example.test"/></list>'
        '<list name="a b"/><list name="x" cr:uri="http://example.test/x"/>'
        '<list name="team" cr:uri="sip:friends@example.test"/>'
        "</resource-lists>"
    ).encode()
    document = parse_lists_document(body, "example.test")
    [friends] = document.lists
    assert (friends.uri, friends.members) == (
        "sip:friends@example.test",
        ("sip:carol@example.test",),
    )
    assert friends.node == 'resource-lists/list[@name="friends"]'
    got = [(item.node, item.list_name, item.uri) for item in document.unroutable]
    assert got == [
        (
            'resource-lists/list[@name="friends"]/entry[@uri="mailto:bob@example.test"]',
            "friends",
            "mailto:bob@example.test",
        ),
        (
            'resource-lists/list[@name="friends"]/list[1]/entry[@uri="tel:+1555"]',
            "friends",
            "tel:+1555",
        ),
        (
            'resource-lists/list[@name="friends"]/list[1]/entry[@uri="sip:example.test"]',
            "friends",
            "sip:example.test",
        ),
        ("resource-lists/list[2]", "", None),
        ('resource-lists/list[@name="a b"]', "a b", None),
        ('resource-lists/list[@name="x"]', "x", None),
        ('resource-lists/list[@name="team"]', "team", None),
    ]
    reasons = [item.reason for item in document.unroutable]
    assert reasons[0] == "mailto: URIs are not relayed (only sip: and sips:)"
    assert reasons[1].startswith("tel: URIs are not relayed")
    assert "not a SIP user URI" in reasons[2]
    assert "without a name" in reasons[3]
    assert "cannot be the user part" in reasons[4]
    assert reasons[5].startswith("cr:uri 'http://example.test/x': http: URIs")
    assert (
        reasons[6]
        == 'sip:friends@example.test is already the URI of resource-lists/list[@name="friends"]'
    )


def test_list_report_round_trips_and_is_bounded() -> None:
    items = [Unroutable(f"resource-lists/list[{n}]", "no name", "") for n in range(1, 4)]
    items.append(
        Unroutable('resource-lists/list[@name="a"]/entry[@uri="tel:1"]', "tel", "a", "tel:1")
    )
    assert parse_list_report(build_list_report(items)) == (items, 0)
    assert parse_list_report(build_list_report(items, limit=2)) == (items[:2], 2)
    root = etree.fromstring(build_list_report(items))
    assert root.tag == "{urn:relayd:params:xml:ns:list-report}list-report"


def test_470_body_lists_every_uri() -> None:
    root = etree.fromstring(build_uri_list(["sip:a@x.test", "sip:b@x.test"]))
    assert [e.get("uri") for e in root.iter(f"{{{RL}}}entry")] == ["sip:a@x.test", "sip:b@x.test"]


def test_every_member_of_a_document_once_and_what_is_no_member() -> None:
    root = parse_resource_lists(
        f'<resource-lists xmlns="{RL}"><list><entry uri="sip:bob@x.test"/>'
        '<entry uri="mailto:eve@x.test"/></list><list><entry uri="sip:bob@X.TEST"/>'
        '<list><entry uri="sip:carol@x.test;transport=tcp"/></list></list>'
        "</resource-lists>".encode()
    )
    members, skipped = every_member(root)
    assert members == ["sip:bob@x.test", "sip:carol@x.test;transport=tcp"]
    assert [item.uri for item in skipped] == ["mailto:eve@x.test"]


LIST = "sip:friends@relay.test"


def test_directory_file_lists_win_and_store_lists_follow_changes() -> None:
    store = MemoryPermissionStore()
    directory = ListDirectory(
        store, "relay.test", ["127.0.0.1"], [URIList(LIST, ("sip:bob@x.test",))]
    )
    store.add_listener(directory.store_changed)
    doc = (
        b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        b'<list name="friends"><entry uri="sip:eve@x.test"/></list>'
        b'<list name="club"><entry uri="sip:carol@x.test"/></list></resource-lists>'
    )
    fired(store.put_document("resource-lists", "sip:alice@relay.test", "index", doc))
    found = directory.lookup(SIPURI.parse("sip:friends@127.0.0.1"))
    assert found is not None and found.members == ("sip:bob@x.test",)
    club = directory.lookup(SIPURI.parse("sip:club@relay.test"))
    assert club is not None and club.owner == "sip:alice@relay.test"
    fired(store.delete_document("resource-lists", "sip:alice@relay.test", "index"))
    assert directory.lookup(SIPURI.parse("sip:club@relay.test")) is None
    assert directory.lookup(SIPURI.parse("sip:friends@elsewhere.test")) is None


def test_a_uri_with_a_port_we_do_not_listen_on_is_not_ours() -> None:
    directory = ListDirectory(MemoryPermissionStore(), "relay.test", ["127.0.0.1"])
    directory.add_local_port(5060)
    assert directory.is_local(SIPURI.parse("sip:bob@127.0.0.1"))
    assert directory.is_local(SIPURI.parse("sip:bob@RELAY.test:5060"))
    assert not directory.is_local(SIPURI.parse("sip:bob@127.0.0.1:25180"))
    assert not directory.is_local(SIPURI.parse("sip:bob@elsewhere.test"))


def _lists(*names: str, uri: str | None = None) -> bytes:
    cr = ' xmlns:cr="urn:relayd:params:xml:ns:consent-policy"'
    lists = "".join(
        f'<list name="{name}"' + (f' cr:uri="{uri}"' if uri else "") + ">"
        '<entry uri="sip:carol@x.test"/></list>'
        for name in names
    )
    return (
        f'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists"{cr}>{lists}'
        "</resource-lists>"
    ).encode()


def _refusal(
    directory: ListDirectory, owner: str, name: str, body: bytes
) -> DocumentRejected | None:
    try:
        directory.check_document(DocumentKey("resource-lists", owner, name), body)
    except DocumentRejected as e:
        return e
    return None


def test_a_list_uri_belongs_to_the_document_that_took_it_first() -> None:
    store = MemoryPermissionStore()
    directory = ListDirectory(
        store,
        "relay.test",
        ["127.0.0.1"],
        [URIList("sip:staff@relay.test", ("sip:bob@x.test",))],
        is_account=lambda user: user == "bob",
    )
    store.add_listener(directory.store_changed)
    bob, alice = "sip:bob@relay.test", "sip:alice@relay.test"
    assert _refusal(directory, bob, "index", _lists("club")) is None
    fired(store.put_document("resource-lists", bob, "index", _lists("club")))
    # Bob may rewrite his own document; nobody else may name "club".
    assert _refusal(directory, bob, "index", _lists("club", "chess")) is None
    taken = _refusal(directory, alice, "index", _lists("club"))
    assert taken is not None and taken.fault == "uniqueness-failure"
    assert [e.alternatives for e in taken.taken] == [("club-2",)]
    assert _refusal(directory, bob, "other", _lists("club")) is not None
    # The lists file and accounts' addresses are taken too, by name or by cr:uri.
    assert _refusal(directory, alice, "index", _lists("staff")) is not None
    by_uri = _refusal(directory, alice, "index", _lists("x", uri="sip:bob@relay.test"))
    assert by_uri is not None and by_uri.taken[0].field.endswith("@cr:uri")
    # Once bob lets go of it, the name is free.
    fired(store.delete_document("resource-lists", bob, "index"))
    assert _refusal(directory, alice, "index", _lists("club")) is None


def test_lists_the_relay_cannot_route_are_stored_and_reported() -> None:
    store = MemoryPermissionStore()
    directory = ListDirectory(store, "relay.test", ["127.0.0.1"])
    store.add_listener(directory.store_changed)
    alice = "sip:alice@relay.test"
    body = _lists("ok", "sip:friends@relay.test", "a@b")[: -len("</resource-lists>")] + (
        b'<list cr:uri="sip:x@elsewhere.test"/><list name="mixed">'
        b'<entry uri="mailto:bob@x.test"/><entry uri="sip:bob@x.test"/></list></resource-lists>'
    )
    selector = DocumentKey("resource-lists", alice, "index")
    note = directory.check_document(selector, body)
    assert note is not None and note[1] == "application/vnd.relayd.list-report+xml"
    items, more = parse_list_report(note[0])
    assert more == 0
    assert [(item.node, item.uri) for item in items] == [
        ('resource-lists/list[@name="sip:friends@relay.test"]', None),
        ('resource-lists/list[@name="a@b"]', None),
        ("resource-lists/list[4]", None),
        ('resource-lists/list[@name="mixed"]/entry[@uri="mailto:bob@x.test"]', "mailto:bob@x.test"),
    ]
    assert items[2].reason == "sip:x@elsewhere.test is not in domain relay.test"
    # Stored, the routable lists work and the rest is skipped without a word.
    fired(store.put_document("resource-lists", alice, "index", body))
    ok = directory.lookup(SIPURI.parse("sip:ok@relay.test"))
    assert ok is not None and ok.members == ("sip:carol@x.test",)
    mixed = directory.lookup(SIPURI.parse("sip:mixed@relay.test"))
    assert mixed is not None and mixed.members == ("sip:bob@x.test",)
    assert directory.lookup(SIPURI.parse("sip:x@elsewhere.test")) is None
    # A document the relay routes whole gets no note.
    assert directory.check_document(selector, _lists("ok")) is None


def test_a_list_held_first_keeps_it_when_a_racing_document_lands() -> None:
    store = MemoryPermissionStore()
    directory = ListDirectory(store, "relay.test")
    store.add_listener(directory.store_changed)
    zed, alice = "sip:zed@relay.test", "sip:alice@relay.test"
    fired(store.put_document("resource-lists", zed, "index", _lists("club")))
    fired(store.put_document("resource-lists", alice, "index", _lists("club")))
    club = directory.lookup(SIPURI.parse("sip:club@relay.test"))
    assert club is not None and club.owner == zed


def test_the_lists_a_member_is_on_and_an_observer_of_list_changes() -> None:
    friends = URIList("sip:friends@relay.test", ("sip:bob@Relay.Test", "sip:carol@relay.test"))
    solo = URIList("sip:solo@relay.test", ("sip:carol@relay.test",))
    directory = ListDirectory(MemoryPermissionStore(), "relay.test", file_lists=[friends])
    changes: list[None] = []
    directory.add_observer(lambda: changes.append(None))
    assert directory.lists_with("sip:bob@relay.test") == ["sip:friends@relay.test"]
    directory.replace_file_lists([friends, solo])
    assert len(changes) == 1
    assert sorted(directory.lists_with("sip:carol@relay.test")) == [
        "sip:friends@relay.test",
        "sip:solo@relay.test",
    ]
    assert directory.lists_with("sip:zed@relay.test") == []


def test_added_members_are_those_a_list_did_not_have() -> None:
    """RFC 5360 §5.3: per list URI, the members a write adds; spellings of one member
    are one, a new list gains all, a removal or an unchanged list gains nothing."""
    old = [
        URIList("sip:team@relay.test", ("sip:bob@relay.test", "sip:carol@x.test")),
        URIList("sip:same@relay.test", ("sip:bob@relay.test",)),
        URIList("sip:gone@relay.test", ("sip:bob@relay.test",)),
    ]
    new = [
        URIList(
            "sip:team@Relay.Test",
            ("sip:bob@RELAY.test;transport=tcp", "sip:dave@x.test", "sip:dave@X.test"),
            owner="sip:alice@relay.test",
        ),
        URIList("sip:same@relay.test", ("sip:bob@relay.test",)),
        URIList("sip:fresh@relay.test", ("sip:erin@x.test", "sip:bob@relay.test")),
    ]
    assert added_members(old, new) == [
        URIList("sip:team@Relay.Test", ("sip:dave@x.test",), owner="sip:alice@relay.test"),
        URIList("sip:fresh@relay.test", ("sip:erin@x.test", "sip:bob@relay.test")),
    ]
    assert added_members(new, old) == [
        URIList("sip:team@relay.test", ("sip:carol@x.test",)),
        URIList("sip:gone@relay.test", ("sip:bob@relay.test",)),
    ]
    assert added_members(old, []) == []


def _team(*members: str) -> bytes:
    entries = "".join(f'<entry uri="{m}"/>' for m in members)
    return (
        f'<resource-lists xmlns="{RL}"><list name="team">{entries}</list></resource-lists>'.encode()
    )


def test_only_a_write_committed_here_announces_its_additions() -> None:
    """A change another node committed (``remote``) updates the index but announces
    nothing: that node asks. A list whose URI another document holds announces nothing."""
    store = MemoryPermissionStore()
    directory = ListDirectory(store, "relay.test", ["127.0.0.1"])
    heard: list[URIList] = []
    directory.add_addition_observer(heard.append)
    store.add_listener(directory.store_changed)
    alice, eve = "sip:alice@relay.test", "sip:eve@relay.test"
    fired(store.put_document("resource-lists", alice, "index", _team("sip:bob@x.test")))
    assert [(item.uri, item.owner, item.members) for item in heard] == [
        ("sip:team@relay.test", alice, ("sip:bob@x.test",))
    ]
    two = _team("sip:bob@x.test", "sip:carol@x.test")
    fired(store.put_document("resource-lists", alice, "index", two))
    assert [item.members for item in heard] == [("sip:bob@x.test",), ("sip:carol@x.test",)]
    # Another node wrote the document: the index follows, no announcement here.
    store.remove_listener(directory.store_changed)
    three = _team("sip:bob@x.test", "sip:dave@x.test")
    fired(store.put_document("resource-lists", alice, "index", three))
    directory.store_changed(
        StoreChange("document", "resource-lists", alice, "index", "e", remote=True)
    )
    team = directory.lookup(SIPURI.parse("sip:team@relay.test"))
    assert team is not None and team.members == ("sip:bob@x.test", "sip:dave@x.test")
    assert len(heard) == 2
    # A second document naming team (after a race) is not routed: nothing announced.
    fired(store.put_document("resource-lists", eve, "x", _team("sip:zed@x.test")))
    directory.store_changed(StoreChange("document", "resource-lists", eve, "x", "e"))
    assert len(heard) == 2


@pytest_twisted.ensureDeferred
async def test_a_list_written_here_is_indexed_before_the_write_is_answered(
    tmp_path: Path,
) -> None:
    """A member added and a MESSAGE sent at once must reach the member: the list index
    takes a document written by this process from the change itself, before the write's
    Deferred fires (a read of the SQLite store would come a moment later)."""
    store = SQLitePermissionStore(str(tmp_path / "store.sqlite"), reactor)
    try:
        directory = ListDirectory(store, "relay.test", ["127.0.0.1"])
        store.add_listener(directory.store_changed)
        alice = "sip:alice@relay.test"
        await store.put_document("resource-lists", alice, "index", _team("sip:bob@x.test"))
        team = directory.lookup(SIPURI.parse("sip:team@relay.test"))
        assert team is not None and team.members == ("sip:bob@x.test",)
    finally:
        await store.close()
