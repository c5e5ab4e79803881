"""Hostile and ordinary bodies through relayd.xcap.xml."""

from __future__ import annotations

import pytest
from lxml import etree

from relayd.consent.documents import make_parser
from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as CP
from relayd.xcap.errors import XCAPError
from relayd.xcap.xml import (
    parse_attribute_value,
    parse_document,
    parse_fragment,
    serialize_document,
    serialize_element,
)

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE ruleset [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"><rule id="a">&xxe;</rule></ruleset>"""


def _error(body: bytes, max_bytes: int = 1 << 20) -> XCAPError:
    with pytest.raises(XCAPError) as info:
        parse_document(body, max_bytes)
    return info.value


def test_parse_document_returns_root() -> None:
    root = parse_document(b'<ruleset xmlns="%s"><rule id="a"/></ruleset>' % CP.encode())
    assert root.tag == f"{{{CP}}}ruleset"
    assert root[0].get("id") == "a"


def test_dtd_body_answered_409_not_well_formed() -> None:
    error = _error(XXE)
    assert (error.status, error.condition) == (409, "not-well-formed")
    assert b"not-well-formed" in error.to_xml()


def test_oversized_body_answered_413_without_a_body() -> None:
    error = _error(b"<a>" + b"x" * 2000 + b"</a>", max_bytes=1000)
    assert error.status == 413
    assert error.condition is None
    assert not error.has_body


def test_non_utf8_answered_409_not_utf8() -> None:
    error = _error(b"<a>\xff\xfe</a>")
    assert (error.status, error.condition) == (409, "not-utf-8")


def test_fragment_uses_in_scope_namespaces() -> None:
    element = parse_fragment(b'<rule id="r"><x:y/></rule>', namespaces={None: CP, "x": "urn:x"})
    assert element.tag == f"{{{CP}}}rule"
    assert element[0].tag == "{urn:x}y"
    assert element.getparent() is None


def test_fragment_with_declaration_and_own_namespace() -> None:
    element = parse_fragment(b'<?xml version="1.0" encoding="UTF-8"?>\n<e xmlns="urn:e"/>')
    assert element.tag == "{urn:e}e"


@pytest.mark.parametrize("body", [b"<a/><b/>", b"text<a/>", b"", b"<a>", b"<a/>tail"])
def test_fragment_not_one_element_rejected(body: bytes) -> None:
    with pytest.raises(XCAPError) as info:
        parse_fragment(body)
    assert info.value.condition == "not-xml-frag"


@pytest.mark.parametrize(
    "body",
    [
        b"<a x=1/>",
        b'<?xml version="1.0" encoding="UTF-8"?><a><b></c></a>',
        b"\xef\xbb\xbf<a><b></c></a>",
        b"<a>\n  <b></c>\n</a>",
    ],
)
def test_fragment_error_positions_are_the_bodys_own(body: bytes) -> None:
    with pytest.raises(etree.XMLSyntaxError) as alone:
        etree.fromstring(body, make_parser())
    line, column = alone.value.position
    with pytest.raises(XCAPError) as info:
        parse_fragment(body, namespaces={None: CP, "cr": "urn:relayd:params:xml:ns:x"})
    assert info.value.condition == "not-xml-frag"
    assert str(info.value.detail).endswith(f" at line {line}, column {column}")


def test_unclosed_fragment_error_is_at_the_end_of_the_body() -> None:
    with pytest.raises(XCAPError) as info:
        parse_fragment(b'<rule id="a">\n  <x/>', namespaces={None: CP})
    detail = str(info.value.detail)
    assert detail.endswith(" at line 2, column 7")
    assert "relayd" not in detail


def test_fragment_with_doctype_rejected() -> None:
    with pytest.raises(XCAPError) as info:
        parse_fragment(b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>')
    assert info.value.condition == "not-xml-frag"


def test_fragment_size_limit() -> None:
    with pytest.raises(XCAPError) as info:
        parse_fragment(b"<a>" + b"x" * 100 + b"</a>", max_bytes=50)
    assert info.value.status == 413


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (b"sip:alice@example.test", "sip:alice@example.test"),
        (b"a &amp; b &#x41; &lt;", "a & b A <"),
        (b'say "hi"', 'say "hi"'),
    ],
)
def test_attribute_value_decoded(body: bytes, value: str) -> None:
    assert parse_attribute_value(body) == value


@pytest.mark.parametrize("body", [b"a<b", b"a & b", b"&undefined;", b"&#0;"])
def test_attribute_value_invalid(body: bytes) -> None:
    with pytest.raises(XCAPError) as info:
        parse_attribute_value(body)
    assert info.value.condition == "not-xml-att-value"


def test_attribute_value_not_utf8() -> None:
    with pytest.raises(XCAPError) as info:
        parse_attribute_value(b"\xff")
    assert info.value.condition == "not-utf-8"


def test_serialize_round_trip() -> None:
    root = parse_document(b'<a xmlns="urn:a"><b x="1"/>\n</a>')
    assert serialize_document(root).startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    # In its document's context: inherited bindings are not added (RFC 4825 §8.3),
    # its own are kept, unused ones dropped.
    assert serialize_element(root[0]) == b'<b x="1"/>'
    nested = parse_document(
        b'<a xmlns="urn:a" xmlns:p="urn:p"><b xmlns:q="urn:q" xmlns:u="urn:u" p:x="&gt;">'
        b'<q:c/></b><d xmlns="urn:d"/></a>'
    )
    assert serialize_element(nested[0]) == b'<b xmlns:q="urn:q" p:x="&gt;"><q:c/></b>'
    assert serialize_element(nested[1]) == b'<d xmlns="urn:d"/>'
