"""Hostile and ordinary bodies through relayd.consent.documents' safe parsing."""

from __future__ import annotations

import pytest
from lxml import etree

from relayd.consent.documents import DocumentRejected, make_parser, parse_document
from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as CP

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<ruleset xmlns="urn:ietf:params:xml:ns:common-policy">&lol4;</ruleset>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE ruleset [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"><rule id="a">&xxe;</rule></ruleset>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE ruleset SYSTEM "http://127.0.0.1:1/evil.dtd">
<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"/>"""


def _fault(body: bytes, max_bytes: int = 1 << 20) -> str:
    with pytest.raises(DocumentRejected) as info:
        parse_document(body, max_bytes)
    return info.value.fault


def test_parse_document_returns_root() -> None:
    root = parse_document(b'<ruleset xmlns="%s"><rule id="a"/></ruleset>' % CP.encode())
    assert root.tag == f"{{{CP}}}ruleset"
    assert root[0].get("id") == "a"


@pytest.mark.parametrize("body", [BILLION_LAUGHS, XXE, EXTERNAL_DTD])
def test_dtd_bodies_rejected_not_well_formed(body: bytes) -> None:
    assert _fault(body) == "not-well-formed"


def test_entity_declaration_without_doctype_keyword_rejected() -> None:
    assert _fault(b'<ruleset xmlns="urn:x"><!ENTITY a "b"></ruleset>') == "not-well-formed"


def test_safe_parser_never_expands_entities_even_without_prescan() -> None:
    # Defence in depth: the parser alone must not substitute or fetch anything.
    root = etree.fromstring(XXE, make_parser())
    assert "root:" not in etree.tostring(root).decode()
    root = etree.fromstring(BILLION_LAUGHS, make_parser())
    assert len(etree.tostring(root)) < 1000


def test_oversized_body_rejected_before_parsing() -> None:
    body = b"<a>" + b"x" * 2000 + b"</a>"
    assert _fault(body, max_bytes=1000) == "too-large"


def test_body_at_limit_accepted() -> None:
    body = b"<a>" + b"x" * 10 + b"</a>"
    assert parse_document(body, max_bytes=len(body)).text == "x" * 10


@pytest.mark.parametrize(
    "body",
    [
        b"<a>\xff\xfe</a>",
        "<a>caf\u00e9</a>".encode("latin-1"),
        '<?xml version="1.0" encoding="UTF-16"?><a/>'.encode("utf-16"),
        b'<?xml version="1.0" encoding="ISO-8859-1"?><a>plain</a>',
    ],
)
def test_non_utf8_rejected(body: bytes) -> None:
    assert _fault(body) == "not-utf-8"


def test_utf8_declaration_and_bom_accepted() -> None:
    body = '\ufeff<?xml version="1.0" encoding="utf-8"?><a>caf\u00e9</a>'.encode()
    assert parse_document(body).text == "caf\u00e9"


@pytest.mark.parametrize("body", [b"<a>", b"<a></b>", b"", b"text", b"<a/><b/>"])
def test_malformed_rejected(body: bytes) -> None:
    assert _fault(body) == "not-well-formed"


def test_deeply_nested_document_rejected_by_libxml2_limits() -> None:
    depth = 100_000
    body = b"<a>" * depth + b"</a>" * depth
    assert _fault(body, max_bytes=len(body)) == "not-well-formed"
