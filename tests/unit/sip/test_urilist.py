"""RFC 5365 recipient lists in a MESSAGE body."""

from __future__ import annotations

import pytest

from relayd.consent.lists import URIListError
from relayd.consent.vocabulary import RESOURCE_LISTS_NAMESPACE as RL
from relayd.sip.urilist import TooManyEntries, parse_recipient_list


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
