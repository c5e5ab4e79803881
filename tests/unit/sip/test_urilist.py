"""URI-list parsing (RFC 4826 documents, RFC 5365 recipient lists) with the safe parser."""

from __future__ import annotations

import pytest
from lxml import etree

from relayd.sip.urilist import (
    TooManyEntries,
    URIListError,
    build_uri_list,
    parse_lists_document,
    parse_recipient_list,
)

RL = "urn:ietf:params:xml:ns:resource-lists"
CR = "urn:relayd:params:xml:ns:consent-policy"


def test_lists_named_by_cr_uri_or_name_with_owner() -> None:
    body = (
        f'<resource-lists xmlns="{RL}" xmlns:cr="{CR}">'
        f'<list name="friends" cr:owner="sip:alice@example.test">'
        '<entry uri="sip:bob@Example.TEST;transport=tcp"/><list name="inner">'
        '<entry uri="sip:carol@example.test"/></list></list>'
        '<list name="x" cr:uri="sip:team@example.test"><entry uri="sip:bob@example.test"/></list>'
        "</resource-lists>"
    ).encode()
    first, second = parse_lists_document(body, "example.test")
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
    (far,) = parse_lists_document(body, "127.0.0.1")
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
        b'<resource-lists xmlns="' + RL.encode() + b'"><list name="a"><entry uri="tel:1"/></list>'
        b"</resource-lists>",
    ],
)
def test_hostile_or_wrong_documents_are_refused(body: bytes) -> None:
    with pytest.raises(URIListError):
        parse_lists_document(body, "example.test")


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
