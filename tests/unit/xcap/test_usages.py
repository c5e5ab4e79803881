"""Application usages: schemas, uniqueness and constraints (RFC 4825 §5)."""

from __future__ import annotations

import pytest
from lxml import etree

from relayd.xcap.errors import XCAPError
from relayd.xcap.usages import (
    CONSENT_RULES,
    RESOURCE_LISTS,
    USAGES,
    XCAP_CAPS,
    default_namespace,
    get_usage,
    listed_auids,
    xcap_caps_document,
)
from relayd.xcap.xml import parse_document

CONSENT_DOC = b"""<?xml version="1.0" encoding="UTF-8"?>
<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"
         xmlns:cr="urn:relayd:params:xml:ns:consent-policy">
  <rule id="alice-friends">
    <conditions>
      <identity><one id="sip:alice@example.test"/></identity>
      <validity>
        <from>2026-11-24T00:00:00Z</from>
        <until>2027-11-24T00:00:00Z</until>
      </validity>
      <cr:target uri="sip:friends@relay.example.test"/>
      <cr:methods><cr:method>MESSAGE</cr:method></cr:methods>
    </conditions>
    <actions><cr:trans-handling>grant</cr:trans-handling></actions>
    <transformations/>
  </rule>
  <rule id="partner-domain">
    <conditions>
      <identity>
        <many domain="partner.test"><except id="sip:mallory@partner.test"/></many>
      </identity>
      <cr:target uri="sip:friends@relay.example.test"/>
    </conditions>
    <actions><cr:trans-handling>grant</cr:trans-handling></actions>
  </rule>
</ruleset>"""

LISTS_DOC = b"""<?xml version="1.0" encoding="UTF-8"?>
<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">
  <list name="friends">
    <display-name xml:lang="en">Friends</display-name>
    <entry uri="sip:bob@example.test"><display-name>Bob</display-name></entry>
    <entry uri="sip:carol@example.test"/>
    <entry-ref ref="resource-lists/users/sip:a@x/index/~~/resource-lists/list/entry"/>
    <external anchor="http://xcap.example.test/resource-lists/users/sip:a@x/index"/>
    <list name="inner"><entry uri="sip:bob@example.test"/></list>
  </list>
  <list name="family"/>
</resource-lists>"""


def _fails(usage_doc: bytes, condition: str) -> XCAPError:
    usage = CONSENT_RULES if b"ruleset" in usage_doc else RESOURCE_LISTS
    with pytest.raises(XCAPError) as info:
        usage.validate(parse_document(usage_doc))
    assert (info.value.status, info.value.condition) == (409, condition)
    return info.value


def _reference_fails(placeholder: bytes, attribute: bytes, node: str, reason: str) -> None:
    """The lists document with ``attribute`` in place of ``placeholder`` breaks RFC 4826
    §3.4.5 at ``node`` in the friends list, for ``reason``."""
    doc = LISTS_DOC.replace(placeholder, attribute)
    detail = _fails(doc, "constraint-failure").detail or ""
    assert f'resource-lists/list[@name="friends"]/{node}' in detail
    assert reason in detail


def test_registry_describes_the_usages() -> None:
    assert set(USAGES) == {
        "consent-rules",
        "resource-lists",
        "xcap-caps",
        "org.openmobilealliance.xcap-directory",
    }
    assert USAGES["org.openmobilealliance.xcap-directory"].read_only
    assert listed_auids() == ("consent-rules", "resource-lists")
    assert CONSENT_RULES.mime_type == "application/auth-policy+xml"
    assert RESOURCE_LISTS.mime_type == "application/resource-lists+xml"
    assert XCAP_CAPS.read_only and not CONSENT_RULES.read_only
    assert default_namespace("consent-rules") == "urn:ietf:params:xml:ns:common-policy"
    assert default_namespace("nope") is None


def test_unknown_auid_is_404() -> None:
    with pytest.raises(XCAPError) as info:
        get_usage("pres-rules")
    assert info.value.status == 404


def test_valid_consent_document_accepted() -> None:
    CONSENT_RULES.validate(parse_document(CONSENT_DOC))


def test_valid_resource_lists_accepted() -> None:
    RESOURCE_LISTS.validate(parse_document(LISTS_DOC))


def test_duplicate_rule_id_is_uniqueness_failure() -> None:
    doc = CONSENT_DOC.replace(b'id="partner-domain"', b'id="alice-friends"')
    error = _fails(doc, "uniqueness-failure")
    assert [e.field for e in error.exists] == ["ruleset/rule/@id"]
    assert error.exists[0].alt_values == ("alice-friends-2",)
    assert b"<alt-value>alice-friends-2</alt-value>" in error.to_xml()


def test_bad_extension_element_is_schema_error() -> None:
    doc = CONSENT_DOC.replace(b"<cr:trans-handling>grant", b"<cr:trans-handling>maybe", 1)
    _fails(doc, "schema-validation-error")


def test_methods_text_form_is_schema_error() -> None:
    doc = CONSENT_DOC.replace(
        b"<cr:methods><cr:method>MESSAGE</cr:method></cr:methods>", b"<cr:methods/>"
    )
    _fails(doc, "schema-validation-error")


def test_unknown_extension_namespace_allowed_by_lax_wildcard() -> None:
    doc = CONSENT_DOC.replace(
        b"<transformations/>", b'<transformations><x:y xmlns:x="urn:x"/></transformations>'
    )
    CONSENT_RULES.validate(parse_document(doc))


def test_bad_validity_date_is_schema_error() -> None:
    doc = CONSENT_DOC.replace(b"2026-11-24T00:00:00Z", b"next tuesday")
    _fails(doc, "schema-validation-error")


def test_wrong_root_is_schema_error() -> None:
    doc = b'<target xmlns="urn:relayd:params:xml:ns:consent-policy" uri="sip:x@y"/>'
    with pytest.raises(XCAPError) as info:
        CONSENT_RULES.validate(parse_document(doc))
    assert info.value.condition == "schema-validation-error"


def test_rule_without_id_is_schema_error() -> None:
    _fails(CONSENT_DOC.replace(b' id="partner-domain"', b""), "schema-validation-error")


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        (b'name="family"', b'name="friends"', "resource-lists/list/@name"),
        (
            b'<entry uri="sip:carol@example.test"/>',
            b'<entry uri="sip:bob@example.test"/>',
            'resource-lists/list[@name="friends"]/entry/@uri',
        ),
        (
            b'<list name="inner"><entry uri="sip:bob@example.test"/></list>',
            b'<list name="inner"><entry-ref ref="x"/><entry-ref ref="x"/></list>',
            'resource-lists/list[@name="friends"]/list[@name="inner"]/entry-ref/@ref',
        ),
    ],
)
def test_resource_list_uniqueness(old: bytes, new: bytes, field: str) -> None:
    assert old in LISTS_DOC
    error = _fails(LISTS_DOC.replace(old, new), "uniqueness-failure")
    assert [e.field for e in error.exists] == [field]
    # A name gets a free alternative; a URI with a suffix would be someone else's.
    assert bool(error.exists[0].alt_values) == field.endswith("@name")


def test_same_entry_in_different_lists_is_fine() -> None:
    # sip:bob is in "friends" and in the nested "inner" list: allowed.
    RESOURCE_LISTS.validate(parse_document(LISTS_DOC))


def test_entry_without_uri_is_schema_error() -> None:
    doc = LISTS_DOC.replace(b'<entry uri="sip:carol@example.test"/>', b"<entry/>")
    _fails(doc, "schema-validation-error")


RFC5361_DOC = b"""<cp:ruleset xmlns="urn:ietf:params:xml:ns:consent-rules"
    xmlns:cp="urn:ietf:params:xml:ns:common-policy">
  <cp:rule id="a">
    <cp:conditions>
      <cp:identity><cp:one id="sip:alice@example.test"/></cp:identity>
      <recipient><cp:one id="sip:bob@example.test"/></recipient>
      <target><cp:one id="sip:friends@relay.example.test"/></target>
    </cp:conditions>
    <cp:actions>
      <trans-handling perm-uri="sip:perm-1@relay.example.test">grant</trans-handling>
    </cp:actions>
  </cp:rule>
</cp:ruleset>"""


def test_rfc_5361_elements_are_validated() -> None:
    CONSENT_RULES.validate(parse_document(RFC5361_DOC))
    _fails(RFC5361_DOC.replace(b">grant<", b">granted<"), "schema-validation-error")
    _fails(
        RFC5361_DOC.replace(b'<cp:one id="sip:bob', b'<cp:none id="sip:bob'),
        "schema-validation-error",
    )


def test_xcap_caps_document() -> None:
    root = etree.fromstring(xcap_caps_document())
    ns = "{urn:ietf:params:xml:ns:xcap-caps}"
    assert root.tag == ns + "xcap-caps"
    assert [a.text for a in root.iter(ns + "auid")] == [
        "consent-rules",
        "org.openmobilealliance.xcap-directory",
        "resource-lists",
        "xcap-caps",
    ]
    namespaces = {n.text for n in root.iter(ns + "namespace")}
    assert "urn:relayd:params:xml:ns:consent-policy" in namespaces
    assert "urn:ietf:params:xml:ns:resource-lists" in namespaces


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'uri="sip:friends@relay.example.test"', b'uri="sip:friends@relay example.test"'),
        (b'id="sip:alice@example.test"', b'id="not a uri"'),
    ],
)
def test_consent_rule_uris_must_be_sip_uris(old: bytes, new: bytes) -> None:
    error = _fails(CONSENT_DOC.replace(old, new, 1), "constraint-failure")
    assert "is not a SIP URI" in (error.detail or "")


@pytest.mark.parametrize(
    "uri", [b"mailto:carol@example.test", b"http://example.test/carol", b"tel:+15551234"]
)
def test_list_entries_may_use_any_uri_scheme(uri: bytes) -> None:
    """RFC 4826 types entry/@uri as anyURI: what the relay routes is not the store's rule."""
    RESOURCE_LISTS.validate(
        parse_document(LISTS_DOC.replace(b'uri="sip:carol@example.test"', b'uri="' + uri + b'"'))
    )


def test_lists_need_no_name() -> None:
    RESOURCE_LISTS.validate(parse_document(LISTS_DOC.replace(b'<list name="family"/>', b"<list/>")))


ENTRY_REF = b'ref="resource-lists/users/sip:a@x/index/~~/resource-lists/list/entry"'
EXTERNAL = b'anchor="http://xcap.example.test/resource-lists/users/sip:a@x/index"'


@pytest.mark.parametrize(
    "ref",
    [
        b"resource-lists/users/sip:bill@example.com/index/~~/resource-lists/"
        b"list%5b@name=%22list1%22%5d/entry%5b@uri=%22sip:petri@example.com%22%5d",
        b"resource-lists/users/sip:a@x/../sip:b@x/index/~~/resource-lists/list/entry",
    ],
)
def test_entry_ref_relative_to_the_xcap_root_is_accepted(ref: bytes) -> None:
    RESOURCE_LISTS.validate(parse_document(LISTS_DOC.replace(ENTRY_REF, b'ref="' + ref + b'"')))


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        (b"http://xcap.example.test/resource-lists/users/sip:a@x/index", "absolute URI"),
        (b"sip:bob@example.test", "absolute URI"),
        (b"//evil.test/resource-lists/users/sip:a@x/index", "not start with /"),
        (b"/xcap-root/resource-lists/users/sip:a@x/index", "not start with /"),
        (b"../../etc/passwd", "below the XCAP root"),
        (b"resource-lists/../../outside", "below the XCAP root"),
        (b"resource-lists/users/sip:a@x/my index", "RFC 3986"),
    ],
)
def test_entry_ref_must_be_relative_below_the_root(ref: bytes, reason: str) -> None:
    _reference_fails(ENTRY_REF, b"ref='" + ref + b"'", "entry-ref/@ref", reason)


@pytest.mark.parametrize(
    "anchor",
    [
        b"https://xcap.example.test/resource-lists/users/sip:a@x/index",
        b"HTTP://xcap.example.test:8080/resource-lists/users/sip:a@x/index/~~/resource-lists/"
        b"list%5b@name=%22mkting%22%5d",
    ],
)
def test_external_absolute_http_uri_is_accepted(anchor: bytes) -> None:
    RESOURCE_LISTS.validate(
        parse_document(LISTS_DOC.replace(EXTERNAL, b'anchor="' + anchor + b'"'))
    )


@pytest.mark.parametrize(
    ("anchor", "reason"),
    [
        (b"resource-lists/users/sip:a@x/index", "absolute http: or https: URI"),
        (b"/resource-lists/users/sip:a@x/index", "absolute http: or https: URI"),
        (b"ftp://xcap.example.test/index", "absolute http: or https: URI"),
        (b"sip:friends@example.test", "absolute http: or https: URI"),
        (b"http:/resource-lists/users/sip:a@x/index", "absolute http: or https: URI"),
        (b"http:///resource-lists/users/sip:a@x/index", "must name a host"),
        (b"http://xcap.example.test/a b", "RFC 3986"),
    ],
)
def test_external_must_be_an_absolute_http_uri(anchor: bytes, reason: str) -> None:
    _reference_fails(EXTERNAL, b'anchor="' + anchor + b'"', "external/@anchor", reason)


def test_reference_constraints_apply_in_nested_lists() -> None:
    doc = LISTS_DOC.replace(
        b'<list name="inner">', b'<list name="inner"><external anchor="urn:x:y"/>'
    )
    error = _fails(doc, "constraint-failure")
    assert 'list[@name="friends"]/list[@name="inner"]/external/@anchor' in (error.detail or "")
