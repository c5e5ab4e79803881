"""The OMA xcap-directory document: generated from the store, read back by clients."""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree
from twisted.internet.defer import Deferred, ensureDeferred

from relayd.consent.store import MemoryPermissionStore
from relayd.xcap.directory import (
    DirectoryEntry,
    DirectoryError,
    directory_document,
    directory_etag,
    entry_uri,
    parse_directory,
    read_directory,
)

ROOT = "/xcap-root"
ALICE = "sip:alice@example.test"
NS = "{urn:oma:xml:xdm:xcap-directory}"
RULES = b'<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"/>'


def _result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred did not fire"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_entry_uri_is_the_documents_path_below_the_root() -> None:
    assert entry_uri("/xcap-root/", "consent-rules", ALICE, "index") == (
        "/xcap-root/consent-rules/users/sip:alice@example.test/index"
    )
    # A "/" in an XUI or a name stays inside its segment.
    assert entry_uri("", "a", "sip:a/b@x", "n m") == "/a/users/sip:a%2Fb@x/n%20m"


def test_document_has_one_folder_per_auid_sorted_with_its_entries() -> None:
    body = directory_document(
        {
            "resource-lists": [],
            "consent-rules": [DirectoryEntry("/r/a", '"e1"', 12), DirectoryEntry("/r/b", '"e2"')],
        }
    )
    root = etree.fromstring(body)
    assert root.tag == NS + "xcap-directory"
    assert [f.get("auid") for f in root] == ["consent-rules", "resource-lists"]
    entries = [dict(e.attrib) for e in root[0]]
    assert entries == [
        {"uri": "/r/a", "etag": '"e1"', "size": "12"},
        {"uri": "/r/b", "etag": '"e2"'},
    ]
    assert len(root[1]) == 0


def test_read_directory_reflects_the_store_and_its_etag_follows_the_content() -> None:
    store = MemoryPermissionStore()
    _result(store.put_document("consent-rules", ALICE, "p-x.xml", RULES))
    _result(store.put_document("consent-rules", ALICE, "index", RULES))
    _result(store.put_document("consent-rules", "sip:bob@example.test", "index", RULES))
    stored = _result(
        ensureDeferred(read_directory(store, ROOT, ALICE, ["consent-rules", "resource-lists"]))
    )
    listed = parse_directory(stored.body)
    index = _result(store.get_document("consent-rules", ALICE, "index"))
    assert [e.uri for e in listed["consent-rules"]] == [
        f"{ROOT}/consent-rules/users/{ALICE}/index",
        f"{ROOT}/consent-rules/users/{ALICE}/p-x.xml",
    ]
    assert listed["consent-rules"][0] == DirectoryEntry(
        f"{ROOT}/consent-rules/users/{ALICE}/index", index.etag, len(RULES)
    )
    assert listed["resource-lists"] == []
    assert stored.etag == directory_etag(stored.body)
    _result(store.put_document("consent-rules", ALICE, "index", RULES))
    again = _result(ensureDeferred(read_directory(store, ROOT, ALICE, ["consent-rules"])))
    assert again.etag != stored.etag


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<xcap-directory/>", "expected an xcap-directory"),
        (b"<x", "unreadable"),
        (b'<!DOCTYPE a [<!ENTITY x "y">]><a/>', "unreadable"),
    ],
)
def test_parse_refuses_what_is_not_a_directory(body: bytes, reason: str) -> None:
    with pytest.raises(DirectoryError, match=reason):
        parse_directory(body)


def test_parse_skips_entries_without_a_uri_and_odd_sizes() -> None:
    body = (
        b'<xcap-directory xmlns="urn:oma:xml:xdm:xcap-directory">'
        b'<folder auid="consent-rules"><entry etag="x"/>'
        b'<entry uri="/r/i" etag="y" size="-3"/></folder></xcap-directory>'
    )
    assert parse_directory(body) == {"consent-rules": [DirectoryEntry("/r/i", "y", None)]}
