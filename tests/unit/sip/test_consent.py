"""Consent decisions: consent URIs, missing members, the 470, rate limits, expiry."""

from __future__ import annotations

from lxml import etree

from relayd.consent.store import MemoryPermissionStore
from relayd.sip.consent import ConsentURIs, ListDirectory, consent_needed
from relayd.sip.message import Headers, SIPRequest
from relayd.sip.uri import SIPURI, NameAddr
from relayd.sip.urilist import URIList, parse_list_report
from relayd.testing import fired
from relayd.xcap.errors import XCAPError
from relayd.xcap.selector import DocumentSelector

LIST = "sip:friends@relay.test"


def test_consent_uri_round_trip_and_forgery() -> None:
    uris = ConsentURIs("relay.test", key=b"k" * 32)
    uri = SIPURI.parse(uris.consent_uri(LIST, "sip:bob@x.test"))
    assert uris.parse_consent_user(uri.user) == (LIST, "sip:bob@x.test")
    assert uris.parse_consent_user((uri.user or "") + "x") is None
    assert ConsentURIs("relay.test").parse_consent_user(uri.user) is None
    assert ConsentURIs.wait_id("wp-abc") == "abc" and ConsentURIs.wait_id("x") is None


def test_470_names_consent_uris_in_body_and_header() -> None:
    uris = ConsentURIs("relay.test")
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP a.test;branch=z9hG4bK1"),
            ("From", "<sip:alice@x.test>;tag=1"),
            ("To", f"<{LIST}>"),
            ("Call-ID", "c"),
            ("CSeq", "1 MESSAGE"),
        ]
    )
    request = SIPRequest("MESSAGE", SIPURI.parse(LIST), headers)
    response = consent_needed(request, LIST, ["sip:bob@x.test"], uris)
    assert response.status == 470
    root = etree.fromstring(response.body)
    (entry,) = root.iter("{urn:ietf:params:xml:ns:resource-lists}entry")
    assert response.headers.get("permission-missing") == f"<{entry.get('uri')}>"
    user = SIPURI.parse(entry.get("uri") or "").user
    assert uris.parse_consent_user(user) == (LIST, "sip:bob@x.test")


def test_470_names_the_missing_members_only_when_asked() -> None:
    uris = ConsentURIs("relay.test")
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP a.test;branch=z9hG4bK1"),
            ("From", "<sip:alice@x.test>;tag=1"),
            ("To", f"<{LIST}>"),
            ("Call-ID", "c"),
            ("CSeq", "1 MESSAGE"),
        ]
    )
    request = SIPRequest("MESSAGE", SIPURI.parse(LIST), headers)
    members = ["sip:bob@x.test:5070", 'sip:o"d\\d,e@x.test']
    named = consent_needed(request, LIST, members, uris, name_members=True)
    rl = "{urn:ietf:params:xml:ns:resource-lists}"
    entries = list(etree.fromstring(named.body).iter(rl + "entry"))
    assert [e.findtext(rl + "display-name") for e in entries] == members
    (raw,) = named.headers.get_raw("permission-missing")
    # RFC 3261 §25.1 quoted-string: '"' and '\' go as quoted-pairs.
    first, second = (e.get("uri") for e in entries)
    assert raw == rf'"sip:bob@x.test:5070" <{first}>, "sip:o\"d\\d,e@x.test" <{second}>'
    values = named.headers.get_all("permission-missing")
    parsed = [NameAddr.parse(value) for value in values]
    assert [p.display_name for p in parsed] == members
    assert [p.uri.format() for p in parsed] == [e.get("uri") for e in entries]

    hidden = consent_needed(request, LIST, members, uris)
    assert b"display-name" not in hidden.body
    assert '"' not in (hidden.headers.get("permission-missing") or "")


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


def _refusal(directory: ListDirectory, owner: str, name: str, body: bytes) -> XCAPError | None:
    try:
        directory.check_document(DocumentSelector("resource-lists", owner, name), body)
    except XCAPError as e:
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
    assert taken is not None and (taken.status, taken.condition) == (409, "uniqueness-failure")
    assert [e.alt_values for e in taken.exists] == [("club-2",)]
    assert _refusal(directory, bob, "other", _lists("club")) is not None
    # The lists file and accounts' addresses are taken too, by name or by cr:uri.
    assert _refusal(directory, alice, "index", _lists("staff")) is not None
    by_uri = _refusal(directory, alice, "index", _lists("x", uri="sip:bob@relay.test"))
    assert by_uri is not None and by_uri.exists[0].field.endswith("@cr:uri")
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
    selector = DocumentSelector("resource-lists", alice, "index")
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
