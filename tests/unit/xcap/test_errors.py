"""relayd.xcap.errors: the RFC 4825 §11 body."""

from __future__ import annotations

import pytest
from lxml import etree

from relayd.consent.documents import DocumentRejected, Taken
from relayd.xcap.errors import XCAP_ERROR_NAMESPACE, Exists, XCAPError, rejected

NS = f"{{{XCAP_ERROR_NAMESPACE}}}"


def test_condition_body_with_phrase() -> None:
    root = etree.fromstring(XCAPError(409, "not-well-formed", "bad <tag>").to_xml())
    assert root.tag == NS + "xcap-error"
    assert [child.tag for child in root] == [NS + "not-well-formed"]
    assert root[0].get("phrase") == "bad <tag>"


def test_no_parent_names_ancestor() -> None:
    error = XCAPError(409, "no-parent", ancestor="http://x/xcap-root/a/users/u/d/~~/r")
    root = etree.fromstring(error.to_xml())
    assert root[0][0].tag == NS + "ancestor"
    assert root[0][0].text == "http://x/xcap-root/a/users/u/d/~~/r"


def test_uniqueness_failure_lists_exists_and_alternatives() -> None:
    error = XCAPError(
        409, "uniqueness-failure", exists=[Exists("ruleset/rule/@id", ("a-2", "a-3"))]
    )
    exists = etree.fromstring(error.to_xml())[0][0]
    assert exists.tag == NS + "exists"
    assert exists.get("field") == "ruleset/rule/@id"
    assert [alt.text for alt in exists] == ["a-2", "a-3"]
    nested = XCAPError(409, "uniqueness-failure", exists=[Exists('list[@name="a b"]/@name')])
    field = etree.fromstring(nested.to_xml())[0][0].get("field")
    assert field == "list%5B@name=%22a%20b%22%5D/@name"


def test_unknown_condition_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown"):
        XCAPError(409, "made-up")


def test_error_without_condition_has_no_body() -> None:
    error = XCAPError(404, None, "nothing here")
    assert not error.has_body
    assert str(error) == "404 nothing here"
    with pytest.raises(ValueError, match="condition"):
        error.to_xml()


def test_a_document_consent_rejects_is_answered_as_its_409() -> None:
    taken = [Taken("resource-lists/list/@name", ("friends-2",))]
    error = rejected(DocumentRejected("uniqueness-failure", "list URI already in use", taken))
    assert (error.status, error.condition, error.detail) == (
        409,
        "uniqueness-failure",
        "list URI already in use",
    )
    assert error.exists == (Exists("resource-lists/list/@name", ("friends-2",)),)
    scope = rejected(DocumentRejected("constraint-failure", "not for this list"))
    assert (scope.status, scope.condition, scope.exists) == (409, "constraint-failure", ())
