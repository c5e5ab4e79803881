"""URI-list parsing (RFC 4826 documents, RFC 5365 recipient lists) with the safe parser."""

from __future__ import annotations

import pytest
from lxml import etree

from relayd.consent.vocabulary import CONSENT_POLICY_NAMESPACE as CR
from relayd.consent.vocabulary import RESOURCE_LISTS_NAMESPACE as RL
from relayd.sip.urilist import (
    TooManyEntries,
    Unroutable,
    URIListError,
    build_list_report,
    build_uri_list,
    parse_list_report,
    parse_lists_document,
    parse_recipient_list,
)


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


def _multipart(xml: bytes) -> bytes:
    return (
        b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\n"
        b"Content-Type: application/resource-lists+xml\r\n"
        b"Content-Disposition: recipient-list\r\n\r\n" + xml + b"\r\n--b--\r\n"
    )


def test_recipient_list_body_yields_recipients_and_payload() -> None:
    xml = (
        f'<resource-lists xmlns="{RL}"><list><entry uri="sip:a@x.test"/>'
        '<entry uri="sip:b@x.test"/><entry uri="sip:a@x.test"/></list></resource-lists>'
    ).encode()
    found = parse_recipient_list('multipart/mixed; boundary="b"', _multipart(xml), max_entries=5)
    assert found is not None
    assert found.recipients == ("sip:a@x.test", "sip:b@x.test")
    assert (found.content_type, found.body) == ("text/plain", b"hello")


def test_recipient_list_limits_and_absence() -> None:
    xml = (
        f'<resource-lists xmlns="{RL}"><list><entry uri="sip:a@x.test"/>'
        '<entry uri="sip:b@x.test"/></list></resource-lists>'
    ).encode()
    with pytest.raises(TooManyEntries):
        parse_recipient_list("multipart/mixed;boundary=b", _multipart(xml), max_entries=1)
    assert parse_recipient_list("text/plain", b"hi", max_entries=1) is None
    with pytest.raises(URIListError):
        parse_recipient_list("multipart/mixed;boundary=b", b"--b\r\nno end", max_entries=1)


def test_470_body_lists_every_uri() -> None:
    root = etree.fromstring(build_uri_list(["sip:a@x.test", "sip:b@x.test"]))
    assert [e.get("uri") for e in root.iter(f"{{{RL}}}entry")] == ["sip:a@x.test", "sip:b@x.test"]
