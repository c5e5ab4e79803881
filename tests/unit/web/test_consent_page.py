"""The HTTPS grant and deny links: a page that only a POST of its own form acts on."""

from __future__ import annotations

import re
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relayd.consent.answer import Action, answer_token, link_path
from relayd.consent.store import ConsentState, MemoryPermissionStore, PendingConsent
from relayd.consent.vocabulary import CONSENT_RULES_AUID, CONSENT_RULES_MIME_TYPE
from relayd.testing import fired
from relayd.web.consent_page import ConsentPage
from relayd.xcap.resource import XCAPResource, XCAPSite

ALICE, BOB = "sip:alice@relay.test", "sip:bob@relay.test"
LIST = "sip:<b>friends</b>@relay.test"
ORIGIN = "https://xcap.example.test"


class Pages:
    def __init__(self, secret: bytes | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1_000)
        self.store = MemoryPermissionStore()
        self.page = ConsentPage(self.store, self.clock, secret=secret)
        self.treq: Any = StubTreq(self.page)
        self.record: PendingConsent = fired(
            self.store.open_consent(ALICE, LIST, BOB, ["MESSAGE"], "t" * 22, 1_000.0, 2_000.0)
        )

    def request(self, method: str, path: str, **kw: Any) -> tuple[int, bytes, Any]:
        response = fired(self.treq.request(method, ORIGIN + path, **kw))
        body = fired(self.treq.content(response))
        return response.code, body, response.headers

    def state(self) -> ConsentState:
        record = fired(self.store.get_consent(self.record.id))
        return ConsentState(record.state)

    def documents(self) -> list[str]:
        names: list[str] = fired(self.store.list_documents(CONSENT_RULES_AUID, BOB))
        return names

    def form(self, action: str, link: Action = "grant") -> tuple[str, dict[str, str]]:
        path = link_path(self.record, link)
        code, body, _ = self.request("GET", path)
        assert code == 200
        fields = dict(re.findall(rb'name="(nonce|csrf)" value="([^"]+)"', body))
        return path, {k.decode(): v.decode() for k, v in fields.items()} | {"action": action}


def test_a_get_shows_sender_list_and_methods_and_changes_nothing() -> None:
    pages = Pages()
    code, body, headers = pages.request("GET", link_path(pages.record, "grant"))
    assert code == 200
    assert b"sip:alice@relay.test" in body and b"MESSAGE" in body
    assert b"&lt;b&gt;friends&lt;/b&gt;" in body and b"<b>friends" not in body
    assert b'value="grant" class="allow">Allow' in body
    assert b'value="deny" class="deny">Deny' in body
    assert b"<script" not in body
    assert headers.getRawHeaders("Cache-Control") == ["no-store"]
    assert headers.getRawHeaders("Referrer-Policy") == ["no-referrer"]
    assert pages.state() is ConsentState.PENDING and pages.documents() == []


def test_posting_the_form_grants_or_denies() -> None:
    pages = Pages()
    path, fields = pages.form("grant")
    code, body, _ = pages.request("POST", path, data=fields)
    assert code == 200 and b"allowed" in body
    assert pages.state() is ConsentState.GRANTED and len(pages.documents()) == 1
    assert pages.request("GET", link_path(pages.record, "grant"))[0] == 404
    path, fields = pages.form("deny", link="deny")  # the deny link revokes
    assert pages.request("POST", path, data=fields)[0] == 200
    assert (
        b"deny"
        in fired(pages.store.get_document(CONSENT_RULES_AUID, BOB, pages.documents()[0])).body
    )


def test_a_post_without_the_pages_csrf_field_changes_nothing() -> None:
    pages = Pages()
    path, fields = pages.form("grant")
    for forged in ({"action": "grant"}, fields | {"csrf": "0" * 64}, fields | {"nonce": "x"}):
        assert pages.request("POST", path, data=forged)[0] == 403
    assert pages.state() is ConsentState.PENDING and pages.documents() == []


def test_a_forged_or_lapsed_link_is_not_found() -> None:
    pages = Pages()
    token = answer_token(pages.record, "deny")
    assert pages.request("GET", f"/consent/grant/{token}")[0] == 404
    assert pages.request("GET", "/consent/grant/nonsense")[0] == 404
    pages.clock.advance(1_000)
    assert pages.request("GET", link_path(pages.record, "grant"))[0] == 404
    code, body, _ = pages.request("GET", link_path(pages.record, "deny"))
    assert code == 200 and b"Allow" not in body  # deny stays valid; grant has lapsed


def test_a_client_asking_for_the_auth_policy_document_acts_with_a_get() -> None:
    pages = Pages()
    accept = {"Accept": [CONSENT_RULES_MIME_TYPE]}
    path = link_path(pages.record, "grant")
    assert pages.request("HEAD", path, headers=accept)[0] == 200
    assert pages.state() is ConsentState.PENDING  # HEAD is safe whatever it accepts
    code, body, headers = pages.request(
        "GET",
        link_path(pages.record, "grant"),
        headers={"Accept": [CONSENT_RULES_MIME_TYPE]},
    )
    assert code == 200 and b"<cr:trans-handling>grant</cr:trans-handling>" in body
    assert headers.getRawHeaders("Content-Type") == [CONSENT_RULES_MIME_TYPE]
    assert pages.state() is ConsentState.GRANTED


def test_the_xcap_site_serves_the_pages_beside_its_root() -> None:
    pages = Pages()
    resource = XCAPResource(pages.store, None, pages.clock)  # type: ignore[arg-type]
    site = XCAPSite(resource, max_body_bytes=10_000, reactor=pages.clock)
    site.mount("consent", pages.page)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    path = link_path(pages.record, "grant").encode()
    protocol.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert b"sip:alice@relay.test" in transport.value()


@pytest.mark.parametrize(("theirs", "status"), [(b"k" * 32, 200), (b"x" * 32, 403)])
def test_a_form_served_by_one_process_is_taken_by_another_with_the_same_secret(
    theirs: bytes, status: int
) -> None:
    """Workers (and a restart between GET and POST) share the forms' key, drawn from
    the stored consent key; a page under another key refuses the form."""
    pages = Pages(secret=b"k" * 32)
    path, fields = pages.form("grant")
    other = ConsentPage(pages.store, pages.clock, secret=theirs)
    client: Any = StubTreq(other)
    response = fired(client.request("POST", ORIGIN + path, data=fields))
    assert response.code == status
    expected = ConsentState.GRANTED if status == 200 else ConsentState.PENDING
    assert pages.state() is expected


def test_a_whole_list_request_asks_for_every_sender_of_the_list() -> None:
    """RFC 5360 §5.3: a list addition's request (its sender the list) names no sender."""
    pages = Pages()
    team = "sip:team@relay.test"
    pages.record = fired(
        pages.store.open_consent(team, team, BOB, ["MESSAGE"], "w" * 22, 1_000.0, 2_000.0)
    )
    code, body, _ = pages.request("GET", link_path(pages.record, "grant"))
    assert code == 200 and b"Every sender of the list</span> asks" in body
    path, fields = pages.form("grant")
    code, body, _ = pages.request("POST", path, data=fields)
    assert code == 200 and b"You allowed every sender of the list to reach you" in body
    assert pages.state() is ConsentState.GRANTED
