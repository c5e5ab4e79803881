"""The XCAP resource through treq.testing.StubTreq over a MemoryPermissionStore."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from hyperlink import EncodedURL
from lxml import etree
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.http_headers import Headers

from relayd.consent.documents import DocumentKey, DocumentRejected, Taken
from relayd.consent.permissions import permission_document_name
from relayd.consent.store import (
    ConsentState,
    DocumentWrite,
    ETagCondition,
    MemoryPermissionStore,
    PendingConsent,
    StoreChange,
    StoreUnavailable,
)
from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as CP
from relayd.consent.vocabulary import CONSENT_POLICY_NAMESPACE as CR
from relayd.consent.vocabulary import CONSENT_RULES_MIME_TYPE as AUTH_POLICY
from relayd.digest import DigestAuthenticator, answer_challenge, ha1, parse_challenge
from relayd.testing import consent_rule
from relayd.testing import consent_ruleset as ruleset
from relayd.xcap.auth import XCAPAuthorizer, permission_uri
from relayd.xcap.errors import XCAP_ERROR_NAMESPACE
from relayd.xcap.resource import (
    REFUSAL_LINGER_SECONDS,
    XCAPResource,
    XCAPSite,
    parse_entity_tags,
)
from relayd.xcap.usages import XCAP_ATTRIBUTE_MIME_TYPE as ATT
from relayd.xcap.usages import XCAP_ELEMENT_MIME_TYPE as EL
from relayd.xcap.usages import xcap_caps_document

REALM = "example.test"
USERS = {"alice": "alice-pw", "bob": "bob-pw", "root": "root-pw"}
ROOT = "/xcap-root"
ALICE = "sip:alice@example.test"
BOB = "sip:bob@example.test"
LIST = "sip:friends@relay.example.test"
MAX_BODY = 8192


def rule(rule_id: str, target: str = LIST, identity: str = BOB, handling: str = "grant") -> str:
    return consent_rule(rule_id, identity, target, handling)


def doc_path(xui: str = ALICE, name: str = "index", auid: str = "consent-rules") -> str:
    return f"{ROOT}/{auid}/users/{xui}/{name}"


def authorization(challenge: str, method: str, uri: str, user: str, password: str) -> str:
    """A Digest Authorization value answering ``challenge`` (RFC 2617 §3.2.2)."""
    return answer_challenge(
        challenge, username=user, password=password, method=method, uri=uri
    ).authorization


def wire_path(path: str) -> str:
    """The request-target treq will send for ``path`` (it percent-encodes ``[`` ``"``…).

    Digest's uri must be exactly that (RFC 2617 §3.2.2.5).
    """
    url = EncodedURL.from_text("https://h" + path).to_uri()
    return url.to_text()[len("https://h") :]


@dataclass
class Reply:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def etag(self) -> str | None:
        return self.header("ETag")

    def xcap_error(self) -> str:
        """The condition element's local name of an xcap-error body."""
        assert self.header("Content-Type") == "application/xcap-error+xml"
        root = etree.fromstring(self.body)
        assert root.tag == f"{{{XCAP_ERROR_NAMESPACE}}}xcap-error"
        return etree.QName(root[0]).localname


class Harness:
    def __init__(self, admins: tuple[str, ...] = ("root",)) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryPermissionStore()
        self.changes: list[StoreChange] = []
        self.store.add_listener(self.changes.append)
        digest = DigestAuthenticator(REALM, self._lookup, self.clock)
        self.authorizer = XCAPAuthorizer(digest, (REALM,), admins)
        self.resource = XCAPResource(
            self.store, self.authorizer, self.clock, root=ROOT, max_body_bytes=MAX_BODY
        )
        self.treq: Any = StubTreq(self.resource)

    @staticmethod
    def _lookup(user: str, realm: str) -> str | None:
        if user in USERS and realm == REALM:
            return ha1(user, realm, USERS[user])
        return None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        user: str | None = "alice",
    ) -> Reply:
        sent = dict(headers or {})
        path = wire_path(path)
        reply = self._once(method, path, body, sent)
        if reply.code == 401 and user is not None:
            challenge = reply.header("WWW-Authenticate")
            assert challenge is not None
            sent["Authorization"] = authorization(challenge, method, path, user, USERS[user])
            reply = self._once(method, path, body, sent)
        return reply

    def _once(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        url = "https://xcap.example.test" + path
        response = _result(
            self.treq.request(method, url, data=body, headers={k: [v] for k, v in headers.items()})
        )
        content = _result(self.treq.content(response))
        return Reply(response.code, response.headers, content)

    def put(self, path: str, body: bytes, content_type: str = AUTH_POLICY, **kw: Any) -> Reply:
        headers = {"Content-Type": content_type, **kw.pop("headers", {})}
        return self.request("PUT", path, body, headers, **kw)

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def delete(self, path: str, **kw: Any) -> Reply:
        return self.request("DELETE", path, **kw)

    def stored(self, xui: str = ALICE, name: str = "index") -> bytes | None:
        document = _result(self.store.get_document("consent-rules", xui, name))
        return document.body if document is not None else None

    def open_consent(self, state: ConsentState = ConsentState.PENDING) -> PendingConsent:
        token = secrets.token_urlsafe(16)
        consent: PendingConsent = _result(
            self.store.open_consent(BOB, LIST, ALICE, ["MESSAGE"], token, 0, 2_000_000_000)
        )
        if state is not ConsentState.PENDING:
            updated = _result(self.store.set_consent_state(consent.id, state))
            assert updated is not None
            consent = updated
        return consent


def _result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred did not fire"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


@pytest.fixture
def xcap() -> Harness:
    return Harness()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


# -- documents --------------------------------------------------------------------


def test_put_new_document_is_201_with_etag(xcap: Harness) -> None:
    reply = xcap.put(doc_path(), ruleset(rule("a")))
    assert reply.code == 201
    assert reply.etag is not None and reply.etag.startswith('"')
    assert xcap.stored() == ruleset(rule("a"))


def test_put_replacing_document_is_200_with_new_etag(xcap: Harness) -> None:
    first = xcap.put(doc_path(), ruleset(rule("a")))
    second = xcap.put(doc_path(), ruleset(rule("b")))
    assert second.code == 200
    assert second.etag != first.etag


def test_get_document_returns_body_type_and_etag(xcap: Harness) -> None:
    put = xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.get(doc_path())
    assert reply.code == 200
    assert reply.body == ruleset(rule("a"))
    assert reply.header("Content-Type") == AUTH_POLICY
    assert reply.etag == put.etag


def test_get_missing_document_is_404(xcap: Harness) -> None:
    assert xcap.get(doc_path()).code == 404


def test_unknown_auid_is_404(xcap: Harness) -> None:
    assert xcap.get(doc_path(auid="pres-rules")).code == 404


def test_outside_root_is_404(xcap: Harness) -> None:
    assert xcap.get("/elsewhere/consent-rules/users/x/index").code == 404


def test_delete_document_then_404(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    assert xcap.delete(doc_path()).code == 200
    assert xcap.get(doc_path()).code == 404
    assert xcap.delete(doc_path()).code == 404


def test_resource_lists_document(xcap: Harness) -> None:
    body = (
        b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        b'<list name="friends"><entry uri="sip:a@x"/></list></resource-lists>'
    )
    path = doc_path(auid="resource-lists")
    assert xcap.put(path, body, "application/resource-lists+xml").code == 201
    assert xcap.get(path + '/~~/resource-lists/list[@name="friends"]/entry/@uri').body == b"sip:a@x"


def test_wrong_document_content_type_is_415(xcap: Harness) -> None:
    reply = xcap.put(doc_path(), ruleset(rule("a")), "application/xml")
    assert reply.code == 415
    assert xcap.stored() is None


def test_content_type_parameters_are_ignored(xcap: Harness) -> None:
    reply = xcap.put(doc_path(), ruleset(rule("a")), AUTH_POLICY + "; charset=utf-8")
    assert reply.code == 201


def test_schema_violation_is_409(xcap: Harness) -> None:
    reply = xcap.put(doc_path(), f'<ruleset xmlns="{CP}"><bogus/></ruleset>'.encode())
    assert reply.code == 409
    assert reply.xcap_error() == "schema-validation-error"
    assert xcap.stored() is None


def test_duplicate_rule_id_is_uniqueness_failure(xcap: Harness) -> None:
    reply = xcap.put(doc_path(), ruleset(rule("a"), rule("a")))
    assert reply.code == 409
    assert reply.xcap_error() == "uniqueness-failure"


@pytest.mark.parametrize(
    ("body", "condition"),
    [
        (b"<ruleset", "not-well-formed"),
        (b'<ruleset xmlns="' + CP.encode() + b'">\xff\xfe</ruleset>', "not-utf-8"),
        (
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
            b'<ruleset xmlns="' + CP.encode() + b'">&b;</ruleset>',
            "not-well-formed",
        ),
        (
            b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b'<ruleset xmlns="' + CP.encode() + b'">&x;</ruleset>',
            "not-well-formed",
        ),
    ],
    ids=["truncated", "invalid-utf8", "billion-laughs", "external-entity"],
)
def test_hostile_document_is_409_and_nothing_stored(
    xcap: Harness, body: bytes, condition: str
) -> None:
    reply = xcap.put(doc_path(), body)
    assert reply.code == 409
    assert reply.xcap_error() == condition
    assert xcap.stored() is None
    assert xcap.changes == []


def test_body_over_limit_is_413(xcap: Harness) -> None:
    body = ruleset(*(rule(f"r{i}") for i in range(200)))
    assert len(body) > MAX_BODY
    reply = xcap.put(doc_path(), body)
    assert reply.code == 413
    assert xcap.stored() is None


def test_unsupported_method_is_405_with_allow(xcap: Harness) -> None:
    reply = xcap.request("POST", doc_path(), b"x")
    assert reply.code == 405
    assert reply.header("Allow") == "GET, HEAD, PUT, DELETE"


def test_head_is_get_without_body(xcap: Harness) -> None:
    put = xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.request("HEAD", doc_path())
    assert reply.code == 200
    assert reply.body == b""
    assert reply.etag == put.etag


# -- xcap-caps --------------------------------------------------------------------


def test_xcap_caps_get(xcap: Harness) -> None:
    reply = xcap.get(f"{ROOT}/xcap-caps/global/index")
    assert reply.code == 200
    assert reply.body == xcap_caps_document()
    assert reply.header("Content-Type") == "application/xcap-caps+xml"
    assert reply.etag is not None
    assert xcap.get(f"{ROOT}/xcap-caps/global/index").etag == reply.etag


def test_xcap_caps_node_selector(xcap: Harness) -> None:
    reply = xcap.get(f"{ROOT}/xcap-caps/global/index/~~/xcap-caps/auids/auid[1]")
    assert reply.code == 200
    assert b">consent-rules<" in reply.body


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_xcap_caps_is_read_only(xcap: Harness, method: str) -> None:
    reply = xcap.request(method, f"{ROOT}/xcap-caps/global/index", b"<x/>", user="root")
    assert reply.code == 405
    assert reply.header("Allow") == "GET, HEAD"


def test_xcap_caps_other_document_is_404(xcap: Harness) -> None:
    assert xcap.get(f"{ROOT}/xcap-caps/global/other").code == 404


# -- xcap-directory ---------------------------------------------------------------

DIRECTORY = "org.openmobilealliance.xcap-directory"
DIR_NS = "{urn:oma:xml:xdm:xcap-directory}"


def directory_path(xui: str = ALICE) -> str:
    return f"{ROOT}/{DIRECTORY}/users/{xui}/directory.xml"


def folders(reply: Reply) -> dict[str, list[tuple[str, str]]]:
    assert reply.code == 200, reply
    root = etree.fromstring(reply.body)
    assert root.tag == DIR_NS + "xcap-directory"
    return {
        folder.get("auid", ""): [(e.get("uri", ""), e.get("etag", "")) for e in folder]
        for folder in root
    }


def test_directory_lists_every_document_of_the_user_with_its_etag(xcap: Harness) -> None:
    consent = xcap.open_consent()
    name = permission_document_name(consent.permission_token)
    index = xcap.put(doc_path(), ruleset(rule("a")))
    granted = xcap.put(doc_path(name=name), ruleset(rule("bob")), user=None)
    lists = xcap.put(
        doc_path(auid="resource-lists"),
        b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists"/>',
        "application/resource-lists+xml",
    )
    xcap.put(doc_path(BOB), ruleset(rule("b")), user="bob")  # someone else's
    reply = xcap.get(directory_path())
    assert reply.header("Content-Type") == "application/vnd.oma.xcap-directory+xml"
    assert folders(reply) == {
        "consent-rules": [(doc_path(), index.etag), (doc_path(name=name), granted.etag)],
        "resource-lists": [(doc_path(auid="resource-lists"), lists.etag)],
    }
    sizes = [e.get("size") for e in etree.fromstring(reply.body).iter(DIR_NS + "entry")]
    assert sizes[0] == str(len(ruleset(rule("a"))))


def test_directory_of_a_user_without_documents_has_empty_folders(xcap: Harness) -> None:
    assert folders(xcap.get(directory_path())) == {"consent-rules": [], "resource-lists": []}


def test_directory_etag_changes_with_any_document(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    first = xcap.get(directory_path())
    assert xcap.get(directory_path(), headers={"If-None-Match": first.etag}).code == 304
    xcap.put(doc_path(), ruleset(rule("b")))
    second = xcap.get(directory_path(), headers={"If-None-Match": first.etag})
    assert second.code == 200 and second.etag != first.etag
    xcap.delete(doc_path())
    assert folders(xcap.get(directory_path()))["consent-rules"] == []


def test_directory_node_selector_picks_one_folder(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.get(directory_path() + '/~~/xcap-directory/folder[@auid="consent-rules"]')
    assert reply.code == 200 and reply.header("Content-Type") == EL
    folder = etree.fromstring(reply.body)
    assert [e.get("uri") for e in folder] == [doc_path()]


def test_directory_is_the_owners_and_the_admins_only(xcap: Harness) -> None:
    assert xcap.get(directory_path(BOB)).code == 403
    assert xcap.get(directory_path(BOB), user="root").code == 200
    assert xcap.get(directory_path("SIP:alice@EXAMPLE.TEST")).code == 200
    assert xcap.get(directory_path(), user=None).code == 401


def test_a_permission_uri_capability_never_lists(xcap: Harness) -> None:
    consent = xcap.open_consent()
    name = permission_document_name(consent.permission_token)
    assert xcap.put(doc_path(name=name), ruleset(rule("bob")), user=None).code == 201
    assert xcap.get(directory_path(), user=None).code == 401
    # Not even with the token in the directory's place.
    assert xcap.get(f"{ROOT}/{DIRECTORY}/users/{ALICE}/{name}", user=None).code == 401
    assert xcap.get(f"{ROOT}/{DIRECTORY}/users/{ALICE}/{name}").code == 404


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_directory_is_read_only(xcap: Harness, method: str) -> None:
    reply = xcap.request(method, directory_path(), b"<x/>", user="root")
    assert reply.code == 405 and reply.header("Allow") == "GET, HEAD"


def test_directory_exists_only_as_a_users_directory_xml(xcap: Harness) -> None:
    assert xcap.get(f"{ROOT}/{DIRECTORY}/users/{ALICE}/index").code == 404
    assert xcap.get(f"{ROOT}/{DIRECTORY}/global/directory.xml").code == 404


def test_xcap_caps_advertises_the_directory(xcap: Harness) -> None:
    body = xcap.get(f"{ROOT}/xcap-caps/global/index").body
    assert f">{DIRECTORY}<".encode() in body
    assert b">urn:oma:xml:xdm:xcap-directory<" in body


# -- conditional requests ---------------------------------------------------------


def test_if_none_match_star_creates_only(xcap: Harness) -> None:
    headers = {"If-None-Match": "*"}
    assert xcap.put(doc_path(), ruleset(rule("a")), headers=headers).code == 201
    reply = xcap.put(doc_path(), ruleset(rule("b")), headers=headers)
    assert reply.code == 412
    assert xcap.stored() == ruleset(rule("a"))


def test_if_match_current_etag_replaces(xcap: Harness) -> None:
    etag = xcap.put(doc_path(), ruleset(rule("a"))).etag
    assert etag is not None
    reply = xcap.put(doc_path(), ruleset(rule("b")), headers={"If-Match": etag})
    assert reply.code == 200


def test_if_match_stale_etag_is_412(xcap: Harness) -> None:
    etag = xcap.put(doc_path(), ruleset(rule("a"))).etag
    assert etag is not None
    xcap.put(doc_path(), ruleset(rule("b")))
    reply = xcap.put(doc_path(), ruleset(rule("c")), headers={"If-Match": etag})
    assert reply.code == 412
    assert xcap.stored() == ruleset(rule("b"))


def test_if_match_on_missing_document_is_412(xcap: Harness) -> None:
    reply = xcap.put(doc_path(), ruleset(rule("a")), headers={"If-Match": "*"})
    assert reply.code == 412


def test_if_match_weak_tag_never_matches(xcap: Harness) -> None:
    etag = xcap.put(doc_path(), ruleset(rule("a"))).etag
    reply = xcap.put(doc_path(), ruleset(rule("b")), headers={"If-Match": f"W/{etag}"})
    assert reply.code == 412


def test_get_if_none_match_current_is_304(xcap: Harness) -> None:
    etag = xcap.put(doc_path(), ruleset(rule("a"))).etag
    assert etag is not None
    reply = xcap.get(doc_path(), headers={"If-None-Match": f'"other", {etag}'})
    assert reply.code == 304
    assert reply.etag == etag
    assert reply.body == b""
    assert xcap.get(doc_path(), headers={"If-None-Match": '"other"'}).code == 200


def test_get_if_match_stale_is_412(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    assert xcap.get(doc_path(), headers={"If-Match": '"stale"'}).code == 412


def test_delete_with_stale_if_match_is_412(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    assert xcap.delete(doc_path(), headers={"If-Match": '"stale"'}).code == 412
    assert xcap.stored() is not None


def test_delete_of_nothing_is_404_whatever_the_preconditions(xcap: Harness) -> None:
    # RFC 9110 §13.2.1: preconditions only count where the answer would be 2xx/412.
    for tag in ("*", '"x"'):
        assert xcap.delete(doc_path(), headers={"If-Match": tag}).code == 404
    etag = xcap.put(doc_path(), ruleset(rule("a"))).etag
    missing = doc_path() + "/~~/ruleset/rule%5B9%5D"
    assert xcap.delete(missing, headers={"If-Match": '"x"'}).code == 404
    assert xcap.delete(missing + "/@id", headers={"If-Match": '"x"'}).code == 404
    assert xcap.get(doc_path()).etag == etag


def test_delete_with_if_none_match_current_is_412(xcap: Harness) -> None:
    etag = xcap.put(doc_path(), ruleset(rule("a"))).etag
    assert etag is not None
    assert xcap.delete(doc_path(), headers={"If-None-Match": etag}).code == 412
    assert xcap.delete(doc_path(), headers={"If-None-Match": '"x"'}).code == 200


def test_malformed_if_match_is_400(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    assert xcap.get(doc_path(), headers={"If-Match": "not-quoted"}).code == 400


def test_parse_entity_tags() -> None:
    assert parse_entity_tags("*", weak_ok=False) == {"*"}
    assert parse_entity_tags('"a", W/"b" ,"c"', weak_ok=False) == {'"a"', '"c"'}
    assert parse_entity_tags('"a", W/"b"', weak_ok=True) == {'"a"', '"b"'}


# -- elements, attributes, namespaces ---------------------------------------------


def test_element_put_then_get_returns_exactly_that_element(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    # Written in the document's context, where the default and cr: bindings are in
    # scope, and read back the same way: no ancestor's binding added (RFC 4825 §8.3).
    element = f'<rule id="b"><conditions><cr:target uri="{LIST}"/></conditions></rule>'.encode()
    path = doc_path() + "/~~/ruleset/rule%5B@id=%22b%22%5D"
    put = xcap.put(path, element, EL)
    assert put.code == 201
    reply = xcap.get(path)
    assert reply.code == 200
    assert reply.header("Content-Type") == EL
    assert reply.body == element
    assert reply.etag == put.etag
    assert xcap.get(doc_path()).etag == put.etag


def test_element_put_inherits_document_namespace(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    path = doc_path() + '/~~/ruleset/rule[@id="b"]'
    assert xcap.put(path, b'<rule id="b"/>', EL).code == 201
    assert xcap.get(path).body == b'<rule id="b"/>'
    document = xcap.stored()
    assert document is not None and b'<rule id="b"/>' in document


def test_element_replace_is_200(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    path = doc_path() + '/~~/ruleset/rule[@id="a"]'
    assert xcap.put(path, b'<rule id="a"/>', EL).code == 200
    assert xcap.get(doc_path() + "/~~/ruleset/rule[1]").body == b'<rule id="a"/>'


def test_element_put_positional(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    assert xcap.put(doc_path() + "/~~/ruleset/rule[2]", b'<rule id="z"/>', EL).code == 201
    assert xcap.get(doc_path() + "/~~/ruleset/rule[2]/@id").body == b"z"


def test_element_put_wrong_content_type_is_415(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.put(doc_path() + '/~~/ruleset/rule[@id="b"]', b'<rule id="b"/>', AUTH_POLICY)
    assert reply.code == 415


def test_element_put_without_parent_is_409_no_parent(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.put(
        doc_path() + '/~~/ruleset/rule[@id="x"]/conditions/identity', b"<identity/>", EL
    )
    assert reply.code == 409
    assert reply.xcap_error() == "no-parent"
    ancestor = etree.fromstring(reply.body).find(f".//{{{XCAP_ERROR_NAMESPACE}}}ancestor")
    assert ancestor is not None and ancestor.text == doc_path() + "/~~/ruleset"
    # A node selector in the body is percent-encoded, as in any URI (RFC 4825 §11.2).
    deeper = xcap.put(doc_path() + '/~~/ruleset/rule[@id="a"]/transformations/x', b"<x/>", EL)
    ancestor = etree.fromstring(deeper.body).find(f".//{{{XCAP_ERROR_NAMESPACE}}}ancestor")
    assert ancestor is not None
    assert ancestor.text == doc_path() + "/~~/ruleset/rule%5B@id=%22a%22%5D"


def test_element_put_into_missing_document_is_409_no_parent(xcap: Harness) -> None:
    reply = xcap.put(doc_path() + '/~~/ruleset/rule[@id="b"]', b'<rule id="b"/>', EL)
    assert reply.code == 409
    assert reply.xcap_error() == "no-parent"


def test_element_put_selector_mismatch_is_cannot_insert(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.put(doc_path() + '/~~/ruleset/rule[@id="b"]', b'<rule id="c"/>', EL)
    assert reply.code == 409
    assert reply.xcap_error() == "cannot-insert"
    assert xcap.stored() == ruleset(rule("a"))


def test_element_put_not_a_fragment_is_409(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.put(doc_path() + '/~~/ruleset/rule[@id="b"]', b"<rule/><rule/>", EL)
    assert reply.xcap_error() == "not-xml-frag"


def test_element_put_duplicate_id_is_uniqueness_failure(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.put(doc_path() + "/~~/ruleset/rule[2]", b'<rule id="a"/>', EL)
    assert reply.xcap_error() == "uniqueness-failure"


def test_element_put_growing_document_past_limit_is_409(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(*(rule(f"r{i}") for i in range(30))))
    big = f'<rule id="big"><conditions><cr:target uri="{LIST}{"x" * 4000}"/></conditions></rule>'
    reply = xcap.put(doc_path() + '/~~/ruleset/rule[@id="big"]', big.encode(), EL)
    assert reply.code == 409
    assert reply.xcap_error() == "constraint-failure"


def test_element_delete(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a"), rule("b")))
    path = doc_path() + '/~~/ruleset/rule[@id="a"]'
    reply = xcap.delete(path)
    assert reply.code == 200
    assert reply.etag == xcap.get(doc_path()).etag
    assert xcap.get(path).code == 404
    assert xcap.delete(path).code == 404


def test_element_delete_positional_is_cannot_delete(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a"), rule("b")))
    reply = xcap.delete(doc_path() + "/~~/ruleset/rule[1]")
    assert reply.code == 409
    assert reply.xcap_error() == "cannot-delete"


def test_element_get_missing_is_404(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    assert xcap.get(doc_path() + '/~~/ruleset/rule[@id="zz"]').code == 404


def test_bad_selector_is_400(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    assert xcap.get(doc_path() + "/~~/ruleset/rule[-1]").code == 400


@pytest.mark.parametrize("step", ["rule[0]", "*[0]", 'rule[0][@id="a"]'])
def test_position_zero_selects_nothing(xcap: Harness, step: str) -> None:
    # RFC 4825 §6.3 allows position 0; it selects nothing, so no write can succeed.
    xcap.put(doc_path(), ruleset(rule("a")))
    path = doc_path() + "/~~/ruleset/" + step
    assert xcap.get(path).code == 404
    assert xcap.delete(path).code == 404
    put = xcap.put(path, b'<rule id="a"/>', EL)
    assert (put.code, put.xcap_error()) == (409, "cannot-insert")
    assert xcap.stored() == ruleset(rule("a"))


def test_not_xml_frag_phrase_points_into_the_body(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    body = b'<rule id="b">\n  <conditions>\n</rule>'
    reply = xcap.put(doc_path() + '/~~/ruleset/rule[@id="b"]', body, EL)
    assert reply.xcap_error() == "not-xml-frag"
    phrase = etree.fromstring(reply.body)[0].get("phrase")
    assert phrase is not None and phrase.endswith("at line 3, column 8"), phrase


def test_attribute_get_put_delete(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    path = doc_path() + '/~~/ruleset/rule[@id="a"]/conditions/cr:target/@uri'
    query = f"?xmlns(cr={CR})"
    get = xcap.get(path + query)
    assert get.code == 200
    assert get.body == LIST.encode()
    assert get.header("Content-Type") == ATT
    put = xcap.put(path + query, b"sip:other@relay.example.test", ATT)
    assert put.code == 200
    assert xcap.get(path + query).body == b"sip:other@relay.example.test"
    assert put.etag == xcap.get(doc_path()).etag


def test_attribute_create_is_201_and_delete(xcap: Harness) -> None:
    xcap.put(
        doc_path(auid="resource-lists"),
        b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists"><list/></resource-lists>',
        "application/resource-lists+xml",
    )
    path = doc_path(auid="resource-lists") + "/~~/resource-lists/list/@name"
    assert xcap.put(path, b"friends", ATT).code == 201
    assert xcap.get(path).body == b"friends"
    assert xcap.delete(path).code == 200
    assert xcap.get(path).code == 404


def test_attribute_get_escapes_value(xcap: Harness) -> None:
    xcap.put(
        doc_path(auid="resource-lists"),
        b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        b'<list name="a&amp;&quot;b"/></resource-lists>',
        "application/resource-lists+xml",
    )
    reply = xcap.get(doc_path(auid="resource-lists") + "/~~/resource-lists/list/@name")
    assert reply.body == b"a&amp;&quot;b"


def test_attribute_put_wrong_type_is_415(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    assert xcap.put(doc_path() + "/~~/ruleset/rule/@id", b"b", EL).code == 415


def test_attribute_put_bad_value_is_409(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.put(doc_path() + "/~~/ruleset/rule/@id", b"a<b", ATT)
    assert reply.xcap_error() == "not-xml-att-value"


def test_namespace_bindings_get(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.get(doc_path() + "/~~/ruleset/rule/namespace::*")
    assert reply.code == 200
    assert reply.header("Content-Type") == "application/xcap-ns+xml"
    root = etree.fromstring(reply.body)
    assert root.nsmap == {None: CP, "cr": CR}


def test_namespace_bindings_are_read_only(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.put(doc_path() + "/~~/ruleset/namespace::*", b"x", "application/xcap-ns+xml")
    assert reply.code == 405
    assert reply.header("Allow") == "GET, HEAD"


def test_element_if_none_match_star_inserts_only(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    headers = {"If-None-Match": "*"}
    path_a = doc_path() + '/~~/ruleset/rule[@id="a"]'
    path_b = doc_path() + '/~~/ruleset/rule[@id="b"]'
    assert xcap.put(path_a, b'<rule id="a"/>', EL, headers=headers).code == 412
    assert xcap.put(path_b, b'<rule id="b"/>', EL, headers=headers).code == 201


def test_element_if_match_document_etag(xcap: Harness) -> None:
    etag = xcap.put(doc_path(), ruleset(rule("a"))).etag
    assert etag is not None
    path = doc_path() + '/~~/ruleset/rule[@id="b"]'
    assert xcap.put(path, b'<rule id="b"/>', EL, headers={"If-Match": etag}).code == 201
    stale = xcap.put(
        doc_path() + '/~~/ruleset/rule[@id="c"]', b'<rule id="c"/>', EL, headers={"If-Match": etag}
    )
    assert stale.code == 412


# -- the node-write race ----------------------------------------------------------


class RacingStore(MemoryPermissionStore):
    """Lets another writer in between the resource's read and its write, ``races`` times."""

    def __init__(self, races: int) -> None:
        super().__init__()
        self.races = races

    def put_document(
        self,
        auid: str,
        xui: str,
        name: str,
        body: bytes,
        if_match: ETagCondition = None,
        if_none_match: ETagCondition = None,
    ) -> Deferred[DocumentWrite]:
        if self.races and isinstance(if_match, str) and if_match != "*":
            self.races -= 1
            current = _result(self.get_document(auid, xui, name))
            super().put_document(auid, xui, name, current.body)
        return super().put_document(auid, xui, name, body, if_match, if_none_match)


def _racing_harness(races: int) -> Harness:
    harness = Harness()
    harness.store = RacingStore(races)
    harness.resource.store = harness.store
    return harness


def test_node_write_lost_race_without_precondition_is_retried() -> None:
    xcap = _racing_harness(races=1)
    xcap.put(doc_path(), ruleset(rule("a")))
    reply = xcap.put(doc_path() + '/~~/ruleset/rule[@id="b"]', b'<rule id="b"/>', EL)
    assert reply.code == 201
    assert xcap.get(doc_path() + '/~~/ruleset/rule[@id="b"]').code == 200


def test_node_write_lost_race_with_client_if_match_is_412() -> None:
    xcap = _racing_harness(races=0)
    etag = xcap.put(doc_path(), ruleset(rule("a"))).etag
    assert etag is not None
    xcap.store.races = 1  # type: ignore[attr-defined]
    reply = xcap.put(
        doc_path() + '/~~/ruleset/rule[@id="b"]', b'<rule id="b"/>', EL, headers={"If-Match": etag}
    )
    assert reply.code == 412
    assert xcap.get(doc_path() + '/~~/ruleset/rule[@id="b"]').code == 404


def test_node_write_losing_every_race_is_503() -> None:
    xcap = _racing_harness(races=0)
    xcap.put(doc_path(), ruleset(rule("a")))
    xcap.store.races = 10  # type: ignore[attr-defined]
    reply = xcap.put(doc_path() + '/~~/ruleset/rule[@id="b"]', b'<rule id="b"/>', EL)
    assert reply.code == 503
    assert reply.header("Retry-After") == "1"


# -- authorization ----------------------------------------------------------------


def test_no_credentials_is_401_with_digest_challenge(xcap: Harness) -> None:
    reply = xcap.get(doc_path(), user=None)
    assert reply.code == 401
    challenge = reply.header("WWW-Authenticate")
    assert challenge is not None and challenge.startswith("Digest ")
    assert parse_challenge(challenge)["realm"] == REALM


def test_wrong_password_is_401(xcap: Harness, logged: list[LogEvent]) -> None:
    challenge = xcap.get(doc_path(), user=None).header("WWW-Authenticate")
    assert challenge is not None
    header = authorization(challenge, "GET", doc_path(), "alice", "wrong")
    reply = xcap.get(doc_path(), headers={"Authorization": header}, user=None)
    assert reply.code == 401
    assert any("authentication failed" in str(e.get("log_format")) for e in logged)
    assert not any("wrong" in repr(e) for e in logged)


def test_digest_uri_must_match_request(xcap: Harness) -> None:
    challenge = xcap.get(doc_path(), user=None).header("WWW-Authenticate")
    assert challenge is not None
    header = authorization(challenge, "GET", doc_path(name="other"), "alice", USERS["alice"])
    assert xcap.get(doc_path(), headers={"Authorization": header}, user=None).code == 401


def test_other_users_tree_is_403(xcap: Harness) -> None:
    assert xcap.put(doc_path(BOB), ruleset(rule("a")), user="alice").code == 403
    assert xcap.get(doc_path(BOB), user="alice").code == 403


def test_owner_xui_forms(xcap: Harness) -> None:
    for xui in ("sips:alice@example.test", "sip:alice@EXAMPLE.test", "alice"):
        assert xcap.put(doc_path(xui), ruleset(rule("a")), user="alice").code == 201, xui
    assert xcap.put(doc_path("sip:alice@elsewhere.test"), ruleset(), user="alice").code == 403


def test_percent_encoded_xui(xcap: Harness) -> None:
    assert xcap.put(doc_path("sip%3Aalice%40example.test"), ruleset(rule("a"))).code == 201
    assert xcap.stored(ALICE) is not None


def test_admin_may_touch_every_tree(xcap: Harness) -> None:
    assert xcap.put(doc_path(BOB), ruleset(rule("a")), user="root").code == 201
    assert xcap.get(doc_path(BOB), user="root").code == 200
    assert xcap.delete(doc_path(BOB), user="root").code == 200


def test_global_tree_read_only_for_users(xcap: Harness) -> None:
    path = f"{ROOT}/resource-lists/global/index"
    body = b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists"/>'
    assert xcap.put(path, body, "application/resource-lists+xml", user="alice").code == 403
    assert xcap.put(path, body, "application/resource-lists+xml", user="root").code == 201
    assert xcap.get(path, user="alice").code == 200


def test_unauthenticated_write_leaves_nothing(xcap: Harness) -> None:
    assert xcap.put(doc_path(), ruleset(rule("a")), user=None).code == 401
    assert xcap.stored() is None


# -- Permission-URI capability ----------------------------------------------------


def test_permission_uri_round_trip() -> None:
    uri = permission_uri("https://relay.example:4443/xcap-root/", ALICE, "tok_en-123456789012")
    assert uri == (
        "https://relay.example:4443/xcap-root/consent-rules/users/"
        "sip:alice@example.test/p-tok_en-123456789012.xml"
    )
    shouting = permission_uri("https://r.test/x", "SIP:alice@Example.TEST", "tok_en-123456789012")
    assert "/users/sip:alice@example.test/" in shouting


def test_every_spelling_of_an_xui_names_one_document(xcap: Harness) -> None:
    consent = xcap.open_consent()
    name = permission_document_name(consent.permission_token)
    shouting = ALICE.replace("sip:", "SIP:").replace("example.test", "EXAMPLE.TEST")
    assert xcap.put(doc_path(xui=shouting, name=name), ruleset(rule("bob")), user=None).code == 201
    # The same document, whichever spelling is used; no second copy is made.
    assert xcap.get(doc_path(name=name), user=None).code == 200
    assert xcap.stored(name=name) is not None
    assert _result(xcap.store.list_documents("consent-rules", shouting)) == []
    assert xcap.delete(doc_path(name=name), user=None).code == 200
    assert xcap.get(doc_path(xui=shouting, name=name), user=None).code == 404
    # Its owner's own tree too.
    assert xcap.put(doc_path(xui=shouting), ruleset(rule("bob"))).code == 201
    assert xcap.stored() is not None


def test_capability_put_grants_consent_without_account(xcap: Harness) -> None:
    consent = xcap.open_consent()
    path = doc_path(name=permission_document_name(consent.permission_token))
    reply = xcap.put(path, ruleset(rule("bob")), user=None)
    assert reply.code == 201
    assert xcap.get(path, user=None).body == ruleset(rule("bob"))
    updated = _result(xcap.store.get_consent(consent.id))
    assert updated.state is ConsentState.GRANTED
    kinds = [change.kind for change in xcap.changes]
    assert kinds[-2:] == ["document", "consent"]


def test_capability_document_that_grants_nothing_keeps_consent_pending(xcap: Harness) -> None:
    consent = xcap.open_consent()
    path = doc_path(name=permission_document_name(consent.permission_token))
    assert xcap.put(path, ruleset(rule("x", identity="sip:carol@x.test")), user=None).code == 201
    assert _result(xcap.store.get_consent(consent.id)).state is ConsentState.PENDING


def test_capability_put_beyond_the_list_is_constraint_failure(xcap: Harness) -> None:
    consent = xcap.open_consent()
    path = doc_path(name=permission_document_name(consent.permission_token))
    reply = xcap.put(path, ruleset(rule("x", target="sip:other@relay.example.test")), user=None)
    assert reply.code == 409
    assert reply.xcap_error() == "constraint-failure"
    assert xcap.stored(name=permission_document_name(consent.permission_token)) is None


def test_capability_put_of_the_seeds_plain_form_grants_the_consent(xcap: Harness) -> None:
    """Seed §4, §8: the permission names the sender; the Permission URI already fixes
    recipient, list and methods."""
    consent = xcap.open_consent()
    path = doc_path(name=permission_document_name(consent.permission_token))
    plain = ruleset(
        f'<rule id="p"><conditions><identity><one id="{BOB}"/></identity>'
        "<validity><from>2000-01-01T00:00:00Z</from><until>2100-01-01T00:00:00Z</until>"
        "</validity></conditions></rule>"
    )
    assert xcap.put(path, plain, user=None).code == 201
    assert _result(xcap.store.get_consent(consent.id)).state is ConsentState.GRANTED


def test_capability_element_put_is_scope_checked(xcap: Harness) -> None:
    consent = xcap.open_consent()
    path = doc_path(name=permission_document_name(consent.permission_token))
    assert xcap.put(path, ruleset(rule("bob")), user=None).code == 201
    bad = rule("y", target="sip:other@relay.example.test").replace(
        "<rule", f'<rule xmlns:cr="{CR}"'
    )
    reply = xcap.put(path + '/~~/ruleset/rule[@id="y"]', bad.encode(), EL, user=None)
    assert reply.xcap_error() == "constraint-failure"


def test_capability_opens_only_its_document(xcap: Harness) -> None:
    consent = xcap.open_consent()
    name = permission_document_name(consent.permission_token)
    assert xcap.get(doc_path(name="index"), user=None).code == 401
    # The token in another user's tree is no capability.
    assert xcap.put(doc_path(BOB, name), ruleset(rule("bob")), user=None).code == 401


def test_unknown_token_needs_an_account(xcap: Harness) -> None:
    name = permission_document_name(secrets.token_urlsafe(16))
    assert xcap.put(doc_path(name=name), ruleset(rule("bob")), user=None).code == 401


def test_expired_consent_token_is_no_capability(xcap: Harness) -> None:
    consent = xcap.open_consent(ConsentState.EXPIRED)
    name = permission_document_name(consent.permission_token)
    assert xcap.put(doc_path(name=name), ruleset(rule("bob")), user=None).code == 401


def test_capability_deny_refuses_then_a_grant_still_counts(xcap: Harness) -> None:
    consent = xcap.open_consent()
    path = doc_path(name=permission_document_name(consent.permission_token))
    assert xcap.put(path, ruleset(rule("no", handling="deny")), user=None).code == 201
    assert _result(xcap.store.get_consent(consent.id)).state is ConsentState.DENIED
    assert [change.kind for change in xcap.changes][-2:] == ["document", "consent"]
    # The recipient changes their mind through the same URI.
    assert xcap.put(path, ruleset(rule("yes")), user=None).code == 200
    assert _result(xcap.store.get_consent(consent.id)).state is ConsentState.GRANTED


def test_capability_delete_before_a_grant_refuses(xcap: Harness) -> None:
    consent = xcap.open_consent()
    path = doc_path(name=permission_document_name(consent.permission_token))
    xcap.put(path, ruleset(rule("x", identity="sip:carol@x.test")), user=None)
    assert _result(xcap.store.get_consent(consent.id)).state is ConsentState.PENDING
    assert xcap.delete(path, user=None).code == 200
    assert _result(xcap.store.get_consent(consent.id)).state is ConsentState.DENIED


def test_capability_rule_delete_before_a_grant_refuses_only_on_deny(xcap: Harness) -> None:
    consent = xcap.open_consent()
    path = doc_path(name=permission_document_name(consent.permission_token))
    two = ruleset(rule("other", identity="sip:carol@x.test"), rule("no", handling="deny"))
    xcap.put(path, two, user=None)
    assert _result(xcap.store.get_consent(consent.id)).state is ConsentState.DENIED
    assert xcap.delete(path + '/~~/ruleset/rule[@id="no"]', user=None).code == 200
    # What is left says nothing about the sender: the refusal stands.
    assert _result(xcap.store.get_consent(consent.id)).state is ConsentState.DENIED


def test_capability_delete_after_grant_revokes(xcap: Harness) -> None:
    consent = xcap.open_consent()
    path = doc_path(name=permission_document_name(consent.permission_token))
    xcap.put(path, ruleset(rule("bob")), user=None)
    assert xcap.delete(path, user=None).code == 200
    assert xcap.get(path, user=None).code == 404
    # The record stays granted: the SIP side shows "revoked" from the missing document.
    assert _result(xcap.store.get_consent(consent.id)).state is ConsentState.GRANTED


def test_token_is_never_logged(xcap: Harness, logged: list[LogEvent]) -> None:
    consent = xcap.open_consent()
    path = doc_path(name=permission_document_name(consent.permission_token))
    xcap.put(path, ruleset(rule("bob")), user=None)
    xcap.put(path, b"<broken", user=None)
    xcap.get(path + "/~~/ruleset/rule[-1]", user=None)
    xcap.get(path + "/~~/ruleset/%ff", user=None)
    assert logged
    assert not any(consent.permission_token in repr(event) for event in logged)


def test_owner_put_to_permission_document_is_also_scope_checked(xcap: Harness) -> None:
    consent = xcap.open_consent(ConsentState.DENIED)
    path = doc_path(name=permission_document_name(consent.permission_token))
    reply = xcap.put(path, ruleset(rule("x", target="sip:other@relay.example.test")))
    assert reply.xcap_error() == "constraint-failure"


def test_an_applications_document_check_refuses_whole_and_node_writes(xcap: Harness) -> None:
    seen: list[tuple[str | None, bytes]] = []

    def no_rule_b(document: DocumentKey, body: bytes) -> None:
        seen.append((document.xui, body))
        if b'id="b"' in body:
            raise DocumentRejected("uniqueness-failure", "taken", [Taken("x", ("c",))])

    xcap.resource.document_checks["consent-rules"] = no_rule_b
    assert xcap.put(doc_path(), ruleset(rule("a"))).code == 201
    assert seen == [(ALICE, ruleset(rule("a")))]
    assert xcap.put(doc_path(), ruleset(rule("b"))).xcap_error() == "uniqueness-failure"
    node = xcap.put(doc_path() + '/~~/ruleset/rule[@id="b"]', b'<rule id="b"/>', EL)
    assert (node.code, node.xcap_error()) == (409, "uniqueness-failure")
    assert xcap.stored() == ruleset(rule("a"))


def test_a_document_checks_note_is_the_body_of_the_write_response(xcap: Harness) -> None:
    def note_on_b(document: DocumentKey, body: bytes) -> tuple[bytes, str] | None:
        return (b"<note/>", "application/x-note+xml") if b'id="b"' in body else None

    xcap.resource.document_checks["consent-rules"] = note_on_b
    plain = xcap.put(doc_path(), ruleset(rule("a")))
    assert (plain.code, plain.body, plain.header("Content-Type")) == (201, b"", None)
    node = xcap.put(doc_path() + '/~~/ruleset/rule[@id="b"]', b'<rule id="b"/>', EL)
    assert (node.code, node.body, node.header("Content-Type")) == (
        201,
        b"<note/>",
        "application/x-note+xml",
    )
    assert node.etag == xcap.get(doc_path()).etag
    whole = xcap.put(doc_path(), ruleset(rule("a"), rule("b")))
    assert (whole.code, whole.body) == (200, b"<note/>")


# -- events and failures ----------------------------------------------------------


def test_every_committed_change_emits_one_event(xcap: Harness) -> None:
    xcap.put(doc_path(), ruleset(rule("a")))
    xcap.put(doc_path() + '/~~/ruleset/rule[@id="b"]', b'<rule id="b"/>', EL)
    xcap.delete(doc_path())
    assert [(c.kind, c.name, c.etag is None) for c in xcap.changes] == [
        ("document", "index", False),
        ("document", "index", False),
        ("document", "index", True),
    ]


def test_rejected_writes_emit_nothing(xcap: Harness) -> None:
    xcap.put(doc_path(), b"<broken")
    xcap.put(doc_path(BOB), ruleset())
    xcap.put(doc_path(), ruleset(), "text/plain")
    assert xcap.changes == []


def test_store_failure_is_500_and_logged(xcap: Harness, logged: list[LogEvent]) -> None:
    def broken(*args: Any, **kwargs: Any) -> Deferred[Any]:
        raise RuntimeError("disk on fire")

    xcap.store.get_document = broken  # type: ignore[method-assign]
    reply = xcap.get(doc_path())
    assert reply.code == 500
    assert any(event.get("log_failure") is not None for event in logged)


def test_store_unavailable_is_503_with_retry_after(xcap: Harness) -> None:
    """A node cut off from its database says when to try again (RFC 9110 §15.6.4)."""

    def cut_off(*args: Any, **kwargs: Any) -> Deferred[Any]:
        return fail(StoreUnavailable("connection lost"))

    xcap.store.get_document = cut_off  # type: ignore[method-assign]
    reply = xcap.get(doc_path())
    assert reply.code == 503
    assert reply.header("Retry-After") == str(StoreUnavailable.retry_after)


# -- the Site: bounded bodies, heads, waits and connections --------------------------

HEAD_LIMIT = 2048
HEAD_TIMEOUT = 5


@dataclass
class Connection:
    protocol: Any
    transport: StringTransport

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def received(self) -> bytes:
        value: bytes = self.transport.value()
        return value


def _site(xcap: Harness, **limits: Any) -> XCAPSite:
    limits = {
        "max_header_bytes": HEAD_LIMIT,
        "header_timeout_seconds": HEAD_TIMEOUT,
        "reactor": xcap.clock,
        **limits,
    }
    return XCAPSite(xcap.resource, max_body_bytes=MAX_BODY, **limits)


def _connect(site: XCAPSite, port: int = 40000) -> Connection:
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return Connection(protocol, transport)


def _site_exchange(xcap: Harness, raw: bytes) -> StringTransport:
    connection = _connect(_site(xcap))
    connection.send(raw)
    return connection.transport


def _capability_path(xcap: Harness) -> bytes:
    """A document the request may write without an account (the body limit comes after
    authorization)."""
    consent = xcap.open_consent()
    return doc_path(name=permission_document_name(consent.permission_token)).encode()


def _refused(transport: StringTransport, status: int) -> bool:
    return transport.value().startswith(b"HTTP/1.1 %d " % status) and transport.disconnecting


def test_site_answers_413_before_the_body_for_a_declared_oversized_body(xcap: Harness) -> None:
    transport = _site_exchange(
        xcap,
        b"PUT " + _capability_path(xcap) + b" HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/auth-policy+xml\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1),
    )
    assert _refused(transport, 413)
    assert b"Connection: close\r\n" in transport.value()
    assert [change.kind for change in xcap.changes] == ["consent"]


def test_site_answers_413_for_an_absurd_content_length_without_reading_on(
    xcap: Harness,
) -> None:
    transport = _site_exchange(
        xcap,
        b"PUT " + doc_path().encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Expect: 100-continue\r\nContent-Length: 999999999999\r\n\r\nxxxx",
    )
    assert _refused(transport, 413)
    assert b"100 Continue" not in transport.value()


def test_site_answers_413_for_oversized_chunked_body(xcap: Harness) -> None:
    chunk = b"x" * 4096
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
    transport = _site_exchange(
        xcap,
        b"PUT " + _capability_path(xcap) + b" HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/auth-policy+xml\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunks,
    )
    assert _refused(transport, 413)
    assert transport.value().count(b"HTTP/1.1") == 1  # the resource never answered
    assert [change.kind for change in xcap.changes] == ["consent"]


def test_site_answers_431_for_a_long_header_line(xcap: Harness) -> None:
    transport = _site_exchange(
        xcap, b"GET " + doc_path().encode() + b" HTTP/1.1\r\nX-Big: " + b"a" * HEAD_LIMIT
    )
    assert _refused(transport, 431)


def test_site_answers_431_for_a_header_block_of_many_short_lines(xcap: Harness) -> None:
    lines = b"".join(b"X-H%d: v\r\n" % index for index in range(HEAD_LIMIT // 5))
    transport = _site_exchange(xcap, b"GET " + doc_path().encode() + b" HTTP/1.1\r\n" + lines)
    assert _refused(transport, 431)


def test_site_answers_414_for_a_long_request_line(xcap: Harness) -> None:
    transport = _site_exchange(xcap, b"GET /" + b"a" * HEAD_LIMIT + b" HTTP/1.1\r\n")
    assert _refused(transport, 414)


def test_refused_connection_is_aborted_after_the_linger(xcap: Harness) -> None:
    connection = _connect(_site(xcap))
    connection.send(b"GET /" + b"a" * HEAD_LIMIT)
    assert _refused(connection.transport, 414)
    connection.send(b"more bytes are dropped")
    assert connection.received.count(b"HTTP/1.1") == 1
    assert not connection.transport.disconnected
    xcap.clock.advance(REFUSAL_LINGER_SECONDS)
    assert connection.transport.disconnected


def test_trickled_head_is_cut_off_with_408(xcap: Harness) -> None:
    connection = _connect(_site(xcap))
    connection.send(b"GET " + doc_path().encode() + b" HTTP/1.1\r\n")
    for index in range(HEAD_TIMEOUT - 1):
        xcap.clock.advance(1)
        connection.send(b"X-Slow-%d: v\r\n" % index)  # each byte resets the idle timeout
    assert connection.received == b""
    xcap.clock.advance(1)
    assert _refused(connection.transport, 408)


def test_silent_connection_is_closed_without_an_answer(xcap: Harness) -> None:
    connection = _connect(_site(xcap))
    xcap.clock.advance(HEAD_TIMEOUT)
    assert connection.transport.disconnecting
    assert connection.received == b""


def test_head_timeout_restarts_after_each_response_and_spares_the_body(xcap: Harness) -> None:
    connection = _connect(_site(xcap))
    path = _capability_path(xcap)
    connection.send(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.received.startswith(b"HTTP/1.1 404 ")
    connection.transport.clear()
    xcap.clock.advance(HEAD_TIMEOUT - 1)
    body = ruleset(rule("bob"))
    connection.send(
        b"PUT " + path + b" HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/auth-policy+xml\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    xcap.clock.advance(HEAD_TIMEOUT)  # the head came in time; the body may take longer
    connection.send(body)
    assert connection.received.startswith(b"HTTP/1.1 201 ")
    assert not connection.transport.disconnecting
    xcap.clock.advance(HEAD_TIMEOUT)
    assert connection.transport.disconnecting


def test_connections_beyond_the_cap_are_aborted(xcap: Harness, logged: list[LogEvent]) -> None:
    site = _site(xcap, max_connections=2)
    first, second = _connect(site, 40001), _connect(site, 40002)
    third = _connect(site, 40003)
    assert third.transport.disconnected
    assert not first.transport.disconnecting and not second.transport.disconnecting
    assert _connect(site, 40004).transport.disconnected
    warnings = [e for e in logged if "refusing new ones" in (e.get("log_format") or "")]
    assert len(warnings) == 1  # once per spell, not per connection
    third.protocol.connectionLost(connectionDone)  # an aborted one frees no slot
    first.protocol.connectionLost(connectionDone)
    fourth = _connect(site, 40005)
    assert not fourth.transport.disconnecting
    assert site.connections == 2


def test_site_does_not_write_an_access_log(xcap: Harness, logged: list[LogEvent]) -> None:
    consent = xcap.open_consent()
    path = doc_path(name=permission_document_name(consent.permission_token))
    transport = _site_exchange(xcap, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 404 ")
    assert not any(consent.permission_token in repr(event) for event in logged)
