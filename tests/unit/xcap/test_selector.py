"""XCAP URIs, node selectors and tree operations (RFC 4825 §§6, 8)."""

from __future__ import annotations

import pytest
from lxml import etree

from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as CP
from relayd.consent.vocabulary import RESOURCE_LISTS_NAMESPACE as RL
from relayd.xcap.errors import XCAPError
from relayd.xcap.selector import (
    AttributeTest,
    NodeSelector,
    Step,
    delete_attribute,
    delete_element,
    parse_namespace_bindings,
    parse_node_selector,
    parse_xcap_uri,
    put_attribute,
    put_element,
    render_namespace_bindings,
    select,
    select_attribute,
    select_element,
    select_namespaces,
)
from relayd.xcap.xml import parse_document, parse_fragment, serialize_element

ROOT = "/xcap-root"

LISTS = b"""<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists"
    xmlns:x="urn:example:x">
  <list name="friends">
    <entry uri="sip:bob@example.test"/>
    <entry uri="sip:carol@example.test" x:tag="c"/>
    <!-- a comment is not an element -->
    <entry uri="sip:dave@example.test"/>
  </list>
  <list name="family"/>
</resource-lists>"""


def sel(text: str, namespaces: dict[str, str] | None = None) -> NodeSelector:
    return parse_node_selector(text, namespaces or {}, RL)


def doc() -> etree._Element:
    return parse_document(LISTS)


def status(exc: pytest.ExceptionInfo[XCAPError]) -> tuple[int, str | None]:
    return exc.value.status, exc.value.condition


# -- URI parsing ---------------------------------------------------------------------


def test_parse_user_document_uri() -> None:
    uri = parse_xcap_uri(f"{ROOT}/consent-rules/users/sip:carol@example.test/p-abc.xml", root=ROOT)
    assert uri.document.auid == "consent-rules"
    assert uri.document.xui == "sip:carol@example.test"
    assert uri.document.document == "p-abc.xml"
    assert uri.node is None
    # Scheme and host are case-insensitive (RFC 3261 §19.1.4), the user part is not.
    shouting = parse_xcap_uri(f"{ROOT}/consent-rules/users/SIP:Carol@EXAMPLE.test/d", root=ROOT)
    assert shouting.document.xui == "sip:Carol@example.test"


def test_parse_global_uri_and_nested_document_path() -> None:
    uri = parse_xcap_uri(f"{ROOT}/xcap-caps/global/index", root=ROOT + "/")
    assert uri.document.is_global and uri.document.document == "index"
    uri = parse_xcap_uri(f"{ROOT}/resource-lists/users/u/dir/sub/doc", root=ROOT)
    assert uri.document.document == "dir/sub/doc"


def test_percent_decoding_per_segment() -> None:
    uri = parse_xcap_uri(f"{ROOT}/resource-lists/users/sip:a%2Fb%40x/d%20oc", root=ROOT)
    assert uri.document.xui == "sip:a/b@x"
    assert uri.document.document == "d oc"


def test_spec_example_rule_selector() -> None:
    path = (
        f"{ROOT}/consent-rules/users/sip:carol@example.test/p-Qm9v.xml"
        "/~~/ruleset/rule%5B@id=%22alice-friends%22%5D"
    )
    uri = parse_xcap_uri(path, root=ROOT)
    assert uri.node is not None
    assert uri.node.steps == (
        Step(f"{{{CP}}}ruleset"),
        Step(f"{{{CP}}}rule", None, AttributeTest("id", "alice-friends")),
    )


def test_selector_with_slash_inside_quoted_value() -> None:
    path = f'{ROOT}/resource-lists/users/u/index/~~/resource-lists/list/entry[@uri="a/b"]/@uri'
    uri = parse_xcap_uri(path, root=ROOT)
    assert uri.node is not None
    assert uri.node.steps[-1].attribute == AttributeTest("uri", "a/b")
    assert uri.node.attribute == "uri"


def test_query_namespace_bindings() -> None:
    uri = parse_xcap_uri(
        f"{ROOT}/resource-lists/users/u/index/~~/resource-lists/list/entry/@x:tag",
        "xmlns(x=urn:example:x)xmlns(y=urn:y)",
        root=ROOT,
    )
    assert uri.namespaces == {"x": "urn:example:x", "y": "urn:y"}
    assert uri.node is not None and uri.node.attribute == "{urn:example:x}tag"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("xmlns(a=urn:a)", {"a": "urn:a"}),
        ("xmlns(a=urn:a)%20xmlns(b=urn:b)", {"a": "urn:a", "b": "urn:b"}),
        ("xmlns(a=urn:x^(1^))", {"a": "urn:x(1)"}),
        ("xmlns%28a=urn%3Aa%29", {"a": "urn:a"}),
    ],
)
def test_parse_namespace_bindings(query: str, expected: dict[str, str]) -> None:
    assert parse_namespace_bindings(query) == expected


@pytest.mark.parametrize("query", ["foo", "xmlns(a)", "xmlns(a=urn:a", "xmlns(1=urn:a)"])
def test_bad_namespace_bindings_are_400(query: str) -> None:
    with pytest.raises(XCAPError) as info:
        parse_namespace_bindings(query)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "path",
    [
        "/elsewhere/consent-rules/users/u/doc",
        f"{ROOT}/pres-rules/users/u/doc",
        f"{ROOT}/consent-rules/users/u",
        f"{ROOT}/consent-rules/people/u/doc",
        f"{ROOT}/consent-rules/users/u/../doc",
        f"{ROOT}/consent-rules/users//doc",
    ],
)
def test_bad_document_selectors_are_404(path: str) -> None:
    with pytest.raises(XCAPError) as info:
        parse_xcap_uri(path, root=ROOT)
    assert info.value.status == 404


@pytest.mark.parametrize(
    "selector",
    [
        "",
        "a//b",
        "a[-1]",
        "a[@b=c]",
        "a[@b='c'][1]",
        "p:a",
        "@attr",
        "a/namespace::*/b",
        'a[@b="x<y"]',
        "a/text()",
        'a[@b="unterminated]',
    ],
)
def test_bad_node_selectors_are_400(selector: str) -> None:
    with pytest.raises(XCAPError) as info:
        sel(selector)
    assert info.value.status == 400


def test_node_selector_grammar() -> None:
    parsed = sel("resource-lists/*[2]/x:e[3][@x:a='v&amp;&#65;']/namespace::*", {"x": "urn:x"})
    assert parsed.steps[1] == Step(None, 2)
    assert parsed.steps[2] == Step("{urn:x}e", 3, AttributeTest("{urn:x}a", "v&A"))
    assert parsed.namespace_selector
    assert parsed.element_selector.steps == parsed.steps
    assert parsed.element_selector.text == "resource-lists/*[2]/x:e[3][@x:a='v&amp;&#65;']"


# -- selection -----------------------------------------------------------------------


def test_select_by_attribute_and_position() -> None:
    root = doc()
    carol = select_element(root, sel('resource-lists/list[@name="friends"]/entry[2]'))
    assert carol.get("uri") == "sip:carol@example.test"
    # The comment between entries is not counted.
    dave = select_element(root, sel("resource-lists/list[1]/entry[3]"))
    assert dave.get("uri") == "sip:dave@example.test"
    assert select(root, sel("resource-lists/*[2]/@name")) == "family"
    assert select(root, sel("resource-lists/list/entry[2]/@x:tag", {"x": "urn:example:x"})) == "c"


def test_position_applies_before_attribute_test() -> None:
    root = doc()
    path = 'resource-lists/list[1]/entry[2][@uri="sip:carol@example.test"]'
    assert select_element(root, sel(path)).get("uri") == "sip:carol@example.test"
    with pytest.raises(XCAPError):
        select_element(root, sel('resource-lists/list[1]/entry[1][@uri="sip:carol@example.test"]'))


@pytest.mark.parametrize(
    "selector",
    [
        "resource-lists/list/entry",  # several
        "resource-lists/list[3]",  # none
        "other-root",
        "resource-lists[2]",
        "resource-lists/list[2]/@missing",
    ],
)
def test_select_none_or_many_is_404(selector: str) -> None:
    with pytest.raises(XCAPError) as info:
        select(doc(), sel(selector))
    assert status(info) == (404, None)


def test_unprefixed_names_use_default_namespace_not_null_namespace() -> None:
    root = parse_document(b"<resource-lists/>")  # no namespace at all
    with pytest.raises(XCAPError):
        select_element(root, sel("resource-lists"))


def test_namespace_selector_reports_in_scope_bindings() -> None:
    root = doc()
    selector = sel("resource-lists/list[1]/namespace::*")
    assert select_namespaces(root, selector) == {None: RL, "x": "urn:example:x"}
    rendered = etree.fromstring(render_namespace_bindings(select_element(root, selector)))
    assert rendered.tag == f"{{{RL}}}list"
    assert len(rendered) == 0 and not rendered.attrib
    assert rendered.nsmap == {None: RL, "x": "urn:example:x"}


# -- element PUT ---------------------------------------------------------------------


def fragment(text: str) -> etree._Element:
    return parse_fragment(text.encode(), namespaces={None: RL})


def test_put_replaces_existing_element_and_get_returns_it() -> None:
    root = doc()
    selector = sel('resource-lists/list[1]/entry[@uri="sip:bob@example.test"]')
    body = '<entry uri="sip:bob@example.test"><display-name>Bob</display-name></entry>'
    result = put_element(root, selector, fragment(body))
    assert not result.created
    got = select_element(result.root, selector)
    assert got.find(f"{{{RL}}}display-name") is not None
    assert serialize_element(got) == body.encode()
    assert len(select_element(root, sel("resource-lists/list[1]"))) == 4  # 3 entries + comment


def test_put_inserts_after_last_same_name_sibling() -> None:
    root = doc()
    selector = sel('resource-lists/list[1]/entry[@uri="sip:eve@example.test"]')
    result = put_element(root, selector, fragment('<entry uri="sip:eve@example.test"/>'))
    assert result.created
    friends = select_element(root, sel("resource-lists/list[1]"))
    uris = [e.get("uri") for e in friends if isinstance(e.tag, str)]
    assert uris[-1] == "sip:eve@example.test"
    assert select_element(root, selector).get("uri") == "sip:eve@example.test"


def test_put_inserts_into_empty_parent() -> None:
    root = doc()
    selector = sel('resource-lists/list[@name="family"]/entry[@uri="sip:mum@x"]')
    assert put_element(root, selector, fragment('<entry uri="sip:mum@x"/>')).created
    assert select_attribute(root, sel("resource-lists/list[2]/entry/@uri")) == "sip:mum@x"


def test_positional_insert_becomes_nth() -> None:
    root = doc()
    selector = sel('resource-lists/list[1]/entry[1][@uri="sip:first@x"]')
    assert put_element(root, selector, fragment('<entry uri="sip:first@x"/>')).created
    entries = select_element(root, sel("resource-lists/list[1]")).findall(f"{{{RL}}}entry")
    assert [e.get("uri") for e in entries][:2] == ["sip:first@x", "sip:bob@example.test"]


def test_positional_insert_at_end_plus_one() -> None:
    root = doc()
    selector = sel("resource-lists/list[1]/entry[4]")
    assert put_element(root, selector, fragment('<entry uri="sip:fourth@x"/>')).created
    assert select_attribute(root, sel("resource-lists/list[1]/entry[4]/@uri")) == "sip:fourth@x"


@pytest.mark.parametrize(
    "selector",
    ["resource-lists/list[1]/entry[0]", "resource-lists/*[0]", "resource-lists[0]"],
)
def test_position_zero_selects_nothing_and_cannot_be_written(selector: str) -> None:
    # RFC 4825 §6.3: position = 1*DIGIT, so [0] is valid and, as in XPath, empty.
    root = doc()
    before = etree.tostring(root)
    parsed = sel(selector)
    assert parsed.steps[-1].position == 0
    for read in (select_element, delete_element):
        with pytest.raises(XCAPError) as info:
            read(root, parsed)
        assert status(info) == (404, None)
    with pytest.raises(XCAPError) as info:
        put_element(root, parsed, fragment('<entry uri="sip:zero@x"/>'))
    assert status(info) == (409, "cannot-insert")
    with pytest.raises(XCAPError) as info:
        put_attribute(root, sel(selector + "/@uri"), "sip:zero@x")
    assert status(info) == (409, "cannot-insert")
    assert etree.tostring(root) == before


def test_positional_insert_past_the_end_is_cannot_insert() -> None:
    root = doc()
    before = etree.tostring(root)
    with pytest.raises(XCAPError) as info:
        put_element(root, sel("resource-lists/list[1]/entry[6]"), fragment('<entry uri="x"/>'))
    assert status(info) == (409, "cannot-insert")
    assert etree.tostring(root) == before


def test_put_that_would_not_be_selected_is_cannot_insert() -> None:
    root = doc()
    before = etree.tostring(root)
    selector = sel('resource-lists/list[1]/entry[@uri="sip:bob@example.test"]')
    with pytest.raises(XCAPError) as info:
        put_element(root, selector, fragment('<entry uri="sip:other@example.test"/>'))
    assert status(info) == (409, "cannot-insert")
    assert etree.tostring(root) == before
    with pytest.raises(XCAPError) as info:
        put_element(root, sel('resource-lists/list[1]/entry[@uri="new"]'), fragment("<list/>"))
    assert status(info) == (409, "cannot-insert")
    assert etree.tostring(root) == before


def test_put_without_parent_is_no_parent_with_ancestor() -> None:
    root = doc()
    selector = sel('resource-lists/list[@name="nope"]/entry[@uri="x"]')
    with pytest.raises(XCAPError) as info:
        put_element(root, selector, fragment('<entry uri="x"/>'))
    assert status(info) == (409, "no-parent")
    assert info.value.ancestor == "resource-lists"
    assert b"<ancestor>resource-lists</ancestor>" in info.value.to_xml()


def test_put_second_root_is_cannot_insert() -> None:
    with pytest.raises(XCAPError) as info:
        put_element(doc(), sel("other"), fragment("<other/>"))
    assert status(info) == (409, "cannot-insert")


def test_put_replacing_root_returns_new_root() -> None:
    root = doc()
    result = put_element(root, sel("resource-lists"), fragment("<resource-lists/>"))
    assert not result.created
    assert result.root is not root and len(result.root) == 0


def test_put_wildcard_step_takes_any_name() -> None:
    root = doc()
    selector = sel('resource-lists/list[2]/*[@uri="sip:x@y"]')
    assert put_element(root, selector, fragment('<entry-ref uri="sip:x@y" ref="r"/>')).created
    assert select_element(root, selector).tag == f"{{{RL}}}entry-ref"


def test_put_attribute_or_namespace_selector_rejected() -> None:
    with pytest.raises(XCAPError) as info:
        put_element(doc(), sel("resource-lists/namespace::*"), fragment("<a/>"))
    assert info.value.status == 405
    with pytest.raises(XCAPError) as info:
        put_element(doc(), sel("resource-lists/@a"), fragment("<a/>"))
    assert info.value.condition == "cannot-insert"


def test_put_when_selector_matches_several_is_404() -> None:
    with pytest.raises(XCAPError) as info:
        put_element(doc(), sel("resource-lists/list[1]/entry"), fragment('<entry uri="x"/>'))
    assert info.value.status == 404


# -- element DELETE ------------------------------------------------------------------


def test_delete_by_attribute() -> None:
    root = doc()
    selector = sel('resource-lists/list[1]/entry[@uri="sip:carol@example.test"]')
    delete_element(root, selector)
    with pytest.raises(XCAPError):
        select_element(root, selector)
    assert len(select_element(root, sel("resource-lists/list[1]")).findall(f"{{{RL}}}entry")) == 2


def test_positional_delete_with_following_sibling_is_cannot_delete() -> None:
    root = doc()
    before = etree.tostring(root)
    with pytest.raises(XCAPError) as info:
        delete_element(root, sel("resource-lists/list[1]/entry[1]"))
    assert status(info) == (409, "cannot-delete")
    assert etree.tostring(root) == before


def test_positional_delete_of_last_is_fine() -> None:
    root = doc()
    delete_element(root, sel("resource-lists/list[1]/entry[3]"))
    with pytest.raises(XCAPError):
        select_element(root, sel("resource-lists/list[1]/entry[3]"))


def test_delete_root_or_missing() -> None:
    with pytest.raises(XCAPError) as info:
        delete_element(doc(), sel("resource-lists"))
    assert status(info) == (409, "cannot-delete")
    with pytest.raises(XCAPError) as info:
        delete_element(doc(), sel("resource-lists/list[9]"))
    assert status(info) == (404, None)


# -- attributes ----------------------------------------------------------------------


def test_put_attribute_create_and_replace() -> None:
    root = doc()
    selector = sel("resource-lists/list[2]/@name")
    assert put_attribute(root, selector, "kin") is False
    assert select_attribute(root, selector) == "kin"
    new = sel("resource-lists/list[2]/@x:new", {"x": "urn:example:x"})
    assert put_attribute(root, new, "1") is True
    assert select_attribute(root, new) == "1"


def test_put_attribute_that_breaks_its_own_selector_is_cannot_insert() -> None:
    root = doc()
    selector = sel('resource-lists/list[@name="family"]/@name')
    with pytest.raises(XCAPError) as info:
        put_attribute(root, selector, "other")
    assert status(info) == (409, "cannot-insert")
    assert select_attribute(root, selector) == "family"


def test_put_attribute_without_element_is_no_parent() -> None:
    with pytest.raises(XCAPError) as info:
        put_attribute(doc(), sel("resource-lists/list[5]/@name"), "x")
    assert status(info) == (409, "no-parent")
    assert info.value.ancestor == "resource-lists"


def test_delete_attribute() -> None:
    root = doc()
    selector = sel("resource-lists/list[2]/@name")
    delete_attribute(root, selector)
    with pytest.raises(XCAPError) as info:
        select_attribute(root, selector)
    assert info.value.status == 404
    with pytest.raises(XCAPError) as info:
        delete_attribute(root, selector)
    assert info.value.status == 404


def test_get_after_put_returns_exactly_the_element_written() -> None:
    root = doc()
    body = b'<entry uri="sip:eve@x"/>'  # in the document's context (RFC 4825 §8.2.3)
    selector = sel('resource-lists/list[1]/entry[@uri="sip:eve@x"]')
    result = put_element(root, selector, parse_fragment(body, namespaces={None: RL}))
    assert serialize_element(select_element(result.root, selector)) == body
