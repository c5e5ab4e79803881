"""The web admin pages through treq.testing.StubTreq over a MemoryPermissionStore:
digest login, the XCAP ownership rule, CSRF, escaping, and writes through the XCAP
write path (validation, the document check, ETag conflicts, change notifications)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, cast

import lxml.html
import pytest
from lxml import etree
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from relayd.consent.answer import answer
from relayd.consent.documents import DocumentKey, DocumentRejected
from relayd.consent.edits import describe_lists, describe_rules
from relayd.consent.permissions import permission_document_name
from relayd.consent.store import ConsentState, MemoryPermissionStore, PendingConsent, StoreChange
from relayd.digest import DigestAuthenticator, answer_challenge, ha1
from relayd.testing import consent_rule, consent_ruleset
from relayd.tokens import redact
from relayd.web.admin import (
    CONFLICT_TEXT,
    CSRF_BUCKET_SECONDS,
    MAX_FIELD_CHARS,
    MAX_PENDING_SHOWN,
    AdminResource,
)
from relayd.xcap.auth import XCAPAuthorizer
from relayd.xcap.resource import DocumentNote, XCAPResource, XCAPSite

REALM = "example.test"
USERS = {"alice": "alice-pw", "bob": "bob-pw", "root": "root-pw"}
ALICE = "sip:alice@example.test"
BOB = "sip:bob@example.test"
LIST = "sip:friends@relay.example.test"


def _result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred did not fire"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def _xpath(node: Any, expression: str) -> list[Any]:
    return list(node.xpath(expression))


@dataclass
class Reply:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def form(self, form_id: str) -> dict[str, str]:
        """The hidden fields of the form with that id (csrf, user, etag)."""
        page: Any = lxml.html.fromstring(self.body)
        (form,) = _xpath(page, f'//form[@id="{form_id}"]')
        return {
            i.get("name"): i.get("value") or "" for i in _xpath(form, './/input[@type="hidden"]')
        }

    def revoke_form(self, rule_id: str) -> dict[str, str]:
        page: Any = lxml.html.fromstring(self.body)
        (form,) = _xpath(page, f'//form[@action="/admin/revoke"][.//input[@value="{rule_id}"]]')
        return {
            i.get("name"): i.get("value") or "" for i in _xpath(form, './/input[@type="hidden"]')
        }

    def rule_ids(self) -> list[str]:
        page: Any = lxml.html.fromstring(self.body)
        return [td.text_content() for td in _xpath(page, '//table[@id="rules"]/tbody/tr/td[1]')]


class Harness:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryPermissionStore()
        self.changes: list[StoreChange] = []
        self.store.add_listener(self.changes.append)
        digest = DigestAuthenticator(REALM, self._lookup, self.clock)
        self.authorizer = XCAPAuthorizer(digest, (REALM,), ("root",))
        self.xcap = XCAPResource(self.store, self.authorizer, self.clock, root="/xcap-root")
        self.admin = AdminResource(self.xcap, self.clock, domain="relay.example.test")
        site_root = Resource()
        site_root.putChild(b"admin", self.admin)
        self.treq: Any = StubTreq(site_root)

    @staticmethod
    def _lookup(user: str, realm: str) -> str | None:
        return ha1(user, realm, USERS[user]) if user in USERS and realm == REALM else None

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None, user: str | None = "alice"
    ) -> Reply:
        reply = self._once(method, path, form, {})
        if reply.code == 401 and user is not None:
            challenge = reply.header("WWW-Authenticate")
            assert challenge is not None
            answer = answer_challenge(
                challenge, username=user, password=USERS[user], method=method, uri=path
            )
            reply = self._once(method, path, form, {"Authorization": [answer.authorization]})
        return reply

    def _once(
        self, method: str, path: str, form: dict[str, str] | None, headers: dict[str, list[str]]
    ) -> Reply:
        response = _result(
            self.treq.request(
                method,
                "https://xcap.example.test" + path,
                data=form,
                headers=headers,
                allow_redirects=False,
            )
        )
        return Reply(response.code, response.headers, _result(self.treq.content(response)))

    def page(self, user: str = "alice", query: str = "") -> Reply:
        reply = self.request("GET", "/admin/" + query, user=user)
        assert reply.code == 200, reply.body
        return reply

    def post(self, action: str, form: dict[str, str], user: str = "alice") -> Reply:
        return self.request("POST", f"/admin/{action}", form, user=user)

    def put_rules(self, xui: str, body: bytes) -> str:
        write = _result(self.store.put_document("consent-rules", xui, "index", body))
        return str(write.etag)

    def stored(self, auid: str, xui: str = ALICE) -> etree._Element | None:
        document = _result(self.store.get_document(auid, xui, "index"))
        return None if document is None else etree.fromstring(document.body)

    def rule_ids(self, xui: str = ALICE) -> list[str]:
        root = self.stored("consent-rules", xui)
        return [] if root is None else [view.id for view in describe_rules(root)]


def web_etag(web: Harness) -> str:
    stored = _result(web.store.get_document("consent-rules", ALICE, "index"))
    return str(stored.etag)


@pytest.fixture
def web() -> Harness:
    return Harness()


def test_the_page_asks_for_digest_credentials(web: Harness) -> None:
    reply = web.request("GET", "/admin/", user=None)
    assert reply.code == 401
    challenge = reply.header("WWW-Authenticate") or ""
    assert challenge.startswith("Digest ") and f'realm="{REALM}"' in challenge
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(cast(ILogObserver, events.append))
    try:
        wrong = answer_challenge(
            challenge, username="alice", password="guess", method="GET", uri="/admin/"
        )
        headers = {"Authorization": [wrong.authorization]}
        assert web._once("GET", "/admin/", None, headers).code == 401
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, events.append))
    assert any("authentication failed" in formatEvent(event) for event in events)


def test_a_user_sees_their_own_documents_with_a_strict_policy(web: Harness) -> None:
    web.put_rules(ALICE, consent_ruleset(consent_rule("r1", BOB, LIST)))
    reply = web.page()
    assert "default-src 'none'" in (reply.header("Content-Security-Policy") or "")
    assert reply.header("X-Frame-Options") == "DENY"
    assert ALICE in reply.text
    assert reply.rule_ids() == ["r1"]


def test_grant_then_revoke_through_the_xcap_write_path(web: Harness) -> None:
    form = web.page().form("grant")
    reply = web.post("grant", {**form, "sender": "bob", "list": LIST, "methods": "message"})
    assert reply.code == 303
    (rule_id,) = web.rule_ids()
    (view,) = describe_rules(web.stored("consent-rules"))  # type: ignore[arg-type]
    assert (view.senders, view.lists, view.methods, view.action) == (
        (BOB,),
        (LIST,),
        ("MESSAGE",),
        "grant",
    )
    assert [(c.kind, c.auid, c.xui) for c in web.changes] == [("document", "consent-rules", ALICE)]

    page = web.request("GET", reply.header("Location") or "")
    assert page.rule_ids() == [rule_id]
    assert f"granted rule {rule_id}" in page.text

    reply = web.post("revoke", {**page.revoke_form(rule_id), "rule": rule_id})
    assert reply.code == 303
    assert web.rule_ids() == []
    assert len(web.changes) == 2


def test_a_form_without_its_csrf_token_changes_nothing(web: Harness) -> None:
    form = web.page().form("grant")
    for token in ("", "0" * 64, web.admin.csrf_token("bob")):
        reply = web.post("grant", {**form, "csrf": token, "sender": "bob", "list": LIST})
        assert reply.code == 403
        assert "form expired" in reply.text
    assert web.stored("consent-rules") is None and web.changes == []


def test_a_csrf_token_lasts_into_the_next_hour_only(web: Harness) -> None:
    form = web.page().form("grant")
    web.clock.advance(CSRF_BUCKET_SECONDS)
    assert web.post("grant", {**form, "sender": "bob", "list": LIST}).code == 303
    form = web.page().form("grant")
    web.clock.advance(2 * CSRF_BUCKET_SECONDS)
    assert web.post("grant", {**form, "sender": "carol", "list": LIST}).code == 403


def test_a_form_from_before_another_edit_is_a_conflict(web: Harness) -> None:
    web.put_rules(ALICE, consent_ruleset(consent_rule("r1", BOB, LIST)))
    form = web.page().form("grant")
    newer = consent_ruleset(consent_rule("r1", BOB, LIST), consent_rule("r2", "sip:c@x", LIST))
    web.put_rules(ALICE, newer)
    reply = web.post("grant", {**form, "sender": "dave", "list": LIST})
    assert reply.code == 409
    assert CONFLICT_TEXT in reply.text
    assert web.rule_ids() == ["r1", "r2"]
    assert reply.rule_ids() == ["r1", "r2"]  # the page shows the current document
    page: Any = lxml.html.fromstring(reply.body)
    typed = {i.get("name"): i.get("value") for i in _xpath(page, '//form[@id="grant"]//input')}
    assert (typed["sender"], typed["list"]) == ("dave", LIST)  # nothing typed is lost
    assert reply.form("grant")["etag"] == web_etag(web)  # and it can be sent again
    assert web.post("grant", {**reply.form("grant"), "sender": "dave", "list": LIST}).code == 303


def test_a_write_that_loses_the_race_after_reading_is_a_conflict(web: Harness) -> None:
    form = web.page().form("grant")
    real_put = web.store.put_document

    def racing_put(*args: Any, **kw: Any) -> Any:
        web.store.put_document = real_put  # type: ignore[method-assign]
        web.put_rules(ALICE, consent_ruleset(consent_rule("theirs", BOB, LIST)))
        return real_put(*args, **kw)

    web.store.put_document = racing_put  # type: ignore[method-assign]
    reply = web.post("grant", {**form, "sender": "dave", "list": LIST})
    assert reply.code == 409 and CONFLICT_TEXT in reply.text
    assert web.rule_ids() == ["theirs"]


def test_users_see_only_their_own_documents_admins_everyones(web: Harness) -> None:
    web.put_rules(BOB, consent_ruleset(consent_rule("bobs", ALICE, LIST)))
    reply = web.request("GET", f"/admin/?user={BOB}")
    assert reply.code == 403 and "bobs" not in reply.text
    form = web.page().form("grant")
    reply = web.post("grant", {**form, "user": BOB, "sender": "carol", "list": LIST})
    assert reply.code == 403
    assert web.rule_ids(BOB) == ["bobs"] and web.rule_ids(ALICE) == []

    page = web.page(user="root", query="?user=bob")
    assert page.rule_ids() == ["bobs"]
    reply = web.post("grant", {**page.form("grant"), "sender": "carol", "list": LIST}, user="root")
    assert reply.code == 303
    assert len(web.rule_ids(BOB)) == 2


def test_everything_shown_is_escaped_and_tokens_are_not(web: Harness) -> None:
    hostile = 'sip:<b>x</b>"@example.test'
    body = consent_ruleset(
        consent_rule("r1", hostile.replace("<", "&lt;").replace('"', "&quot;"), LIST)
    )
    web.put_rules(ALICE, body)
    token = secrets.token_urlsafe(24)
    _result(web.store.open_consent("sip:<i>s</i>@x", LIST, ALICE, ["MESSAGE"], token, 0, 2e9))
    reply = web.page()
    assert "<b>x</b>" not in reply.text and "<i>s</i>" not in reply.text
    assert "&lt;b&gt;x&lt;/b&gt;" in reply.text and "&lt;i&gt;s&lt;/i&gt;" in reply.text
    assert token not in reply.text
    reply = web.request("GET", "/admin/?notice=%3Cscript%3E")
    assert "<script>" not in reply.text and "&lt;script&gt;" in reply.text
    form = reply.form("grant")
    reply = web.post("grant", {**form, "sender": '"><script>', "list": "x", "etag": "old"})
    assert reply.code == 409 and "<script>" not in reply.text and "&lt;script&gt;" in reply.text


def _grant_by_link(web: Harness, sender: str = BOB) -> tuple[PendingConsent, str]:
    """``sender`` asked alice and she allowed it by her grant link: the rule is in the
    document at the request's Permission URI."""
    token = secrets.token_urlsafe(16)
    record = _result(web.store.open_consent(sender, LIST, ALICE, ["MESSAGE"], token, 0, 2e9))
    state = _result(ensureDeferred(answer(web.store, record, "grant", web.clock)))
    assert state is ConsentState.GRANTED
    return record, permission_document_name(token)


def _documents(reply: Reply) -> list[str]:
    page: Any = lxml.html.fromstring(reply.body)
    return [td.text_content() for td in _xpath(page, '//table[@id="rules"]//td[@class="document"]')]


def test_rules_of_every_document_are_shown_without_tokens(web: Harness) -> None:
    web.put_rules(ALICE, consent_ruleset(consent_rule("mine", "sip:carol@x.test", LIST)))
    record, name = _grant_by_link(web)
    reply = web.page()
    assert reply.rule_ids() == ["mine", "grant"]
    assert _documents(reply) == ["index", f"Permission URI {redact(record.permission_token)}"]
    assert record.permission_token not in reply.text and name not in reply.text
    forms = [reply.revoke_form(rule) for rule in ("mine", "grant")]
    assert forms[0]["etag"] == web_etag(web)
    stored = _result(web.store.get_document("consent-rules", ALICE, name))
    assert forms[1]["etag"] == stored.etag and forms[1]["document"].startswith("d-")


def test_revoking_a_link_grant_deletes_its_document_and_lets_nobody_through(
    web: Harness,
) -> None:
    web.put_rules(ALICE, consent_ruleset(consent_rule("mine", "sip:carol@x.test", LIST)))
    record, name = _grant_by_link(web)
    form = web.page().revoke_form("grant")
    before = len(web.changes)
    reply = web.post("revoke", {**form, "rule": "grant"})
    assert reply.code == 303, reply.text
    page = web.request("GET", reply.header("Location") or "")
    assert f"revoked rule grant of Permission URI {redact(record.permission_token)}" in page.text
    assert _result(web.store.get_document("consent-rules", ALICE, name)) is None
    assert [(c.kind, c.name, c.etag) for c in web.changes[before:]] == [("document", name, None)]
    # The grant stays on record; with its document gone nothing lets bob through,
    # which wait-permission reports as revoked.
    settled = _result(web.store.get_consent(record.id))
    assert settled.state is ConsentState.GRANTED
    assert web.rule_ids() == ["mine"] and web.page().rule_ids() == ["mine"]


def test_revoking_a_pending_requests_document_refuses_the_request(web: Harness) -> None:
    token = secrets.token_urlsafe(16)
    record = _result(web.store.open_consent(BOB, LIST, ALICE, ["MESSAGE"], token, 0, 2e9))
    name = permission_document_name(token)
    # A rule about someone else keeps the request open; revoking it withdraws the answer.
    body = consent_ruleset(consent_rule("other", BOB, LIST, "deny"))
    _result(web.store.put_document("consent-rules", ALICE, name, body))
    reply = web.post("revoke", {**web.page().revoke_form("other"), "rule": "other"})
    assert reply.code == 303, reply.text
    assert _result(web.store.get_document("consent-rules", ALICE, name)) is None
    assert _result(web.store.get_consent(record.id)).state is ConsentState.DENIED


def test_a_revoke_form_for_a_document_since_gone_or_changed_is_a_conflict(web: Harness) -> None:
    _, name = _grant_by_link(web)
    form = web.page().revoke_form("grant")
    stale = web.post("revoke", {**form, "etag": '"old"', "rule": "grant"})
    assert stale.code == 409 and CONFLICT_TEXT in stale.text
    forged = web.post("revoke", {**form, "document": "d-" + "0" * 32, "rule": "grant"})
    assert forged.code == 409 and CONFLICT_TEXT in forged.text
    assert web.post("revoke", {**form, "rule": "grant"}).code == 303
    again = web.post("revoke", {**form, "rule": "grant"})
    assert again.code == 409 and CONFLICT_TEXT in again.text
    assert _result(web.store.get_document("consent-rules", ALICE, name)) is None


def test_pending_consents_are_the_users_own_or_all_for_admins(web: Harness) -> None:
    _result(web.store.open_consent(BOB, LIST, ALICE, ["MESSAGE"], "t" * 22, 0, 2e9))
    _result(web.store.open_consent(ALICE, LIST, BOB, ["MESSAGE"], "u" * 22, 0, 2e9))

    def recipients(reply: Reply) -> list[str]:
        page: Any = lxml.html.fromstring(reply.body)
        return [td.text_content() for td in _xpath(page, '//table[@id="pending"]/tbody/tr/td[2]')]

    assert recipients(web.page()) == [ALICE]
    assert sorted(recipients(web.page(user="root"))) == [ALICE, BOB]


def test_the_pending_consents_shown_are_bounded(web: Harness) -> None:
    for n in range(MAX_PENDING_SHOWN + 3):
        _result(
            web.store.open_consent(f"sip:s{n}@x", LIST, ALICE, ["MESSAGE"], f"t{n:021}", 0, 2e9)
        )
    page: Any = lxml.html.fromstring(web.page().body)
    rows = _xpath(page, '//table[@id="pending"]/tbody/tr')
    assert len(rows) == MAX_PENDING_SHOWN + 1
    assert rows[-1].text_content() == "and 3 more"


def test_members_are_added_and_removed_through_the_document_check(web: Harness) -> None:
    checked: list[DocumentKey] = []

    def check(key: DocumentKey, body: bytes) -> DocumentNote | None:
        checked.append(key)
        if b"sip:blocked@" in body:
            raise DocumentRejected("constraint-failure", "sip:blocked is not allowed here")
        return None

    web.xcap.document_checks["resource-lists"] = check
    form = web.page().form("add-members")
    reply = web.post("add-members", {**form, "list": "friends", "members": "bob carol"})
    assert reply.code == 303
    root = web.stored("resource-lists")
    assert root is not None
    (friends,) = describe_lists(root)
    assert [uri for uri, _ in friends.members] == [BOB, "sip:carol@example.test"]
    assert len(checked) == 1

    page = web.page()
    reply = web.post(
        "add-members", {**page.form("add-members"), "list": "friends", "members": "blocked"}
    )
    assert reply.code == 409 and "sip:blocked is not allowed here" in reply.text

    reply = web.post(
        "add-members", {**page.form("add-members"), "list": "no such!", "members": "x"}
    )
    assert reply.code == 400 and "LIST is a list" in reply.text

    hidden = {k: v for k, v in page.form("add-members").items()}
    reply = web.post("remove-member", {**hidden, "list": "friends", "member": BOB})
    assert reply.code == 303
    (friends,) = describe_lists(web.stored("resource-lists"))  # type: ignore[arg-type]
    assert [uri for uri, _ in friends.members] == ["sip:carol@example.test"]

    reply = web.post("remove-list", {**web.page().form("add-members"), "list": "friends"})
    assert reply.code == 303
    assert describe_lists(web.stored("resource-lists")) == []  # type: ignore[arg-type]
    reply = web.post("remove-list", {**web.page().form("add-members"), "list": "friends"})
    assert reply.code == 400 and "no list named" in reply.text


def test_get_never_changes_anything(web: Harness) -> None:
    form = web.page().form("grant")
    query = "&".join(f"{k}={v}" for k, v in {**form, "sender": "bob", "list": LIST}.items())
    assert web.request("GET", "/admin/grant?" + query).code == 405
    assert web.stored("consent-rules") is None


def test_the_stylesheet_is_served_without_login(web: Harness) -> None:
    reply = web.request("GET", "/admin/admin.css", user=None)
    assert reply.code == 200 and reply.header("Content-Type") == "text/css; charset=utf-8"
    assert web.request("GET", "/admin", user=None).header("Location") == "/admin/"


def test_the_site_serves_admin_beside_the_xcap_root(web: Harness) -> None:
    site = XCAPSite(web.xcap, max_body_bytes=8192)
    site.mount("admin", web.admin)
    request: Any = DummyRequest([b"admin", b"grant"])
    assert site.getResourceFor(request) is web.admin
    assert (request.prepath, request.postpath) == ([b"admin"], [b"grant"])
    inside = [b"xcap-root", b"consent-rules", b"users", b"admin", b"index"]
    for postpath in (inside, [b"administrator"]):
        other: Any = DummyRequest(postpath)
        assert site.getResourceFor(other) is web.xcap
    clash = XCAPResource(web.store, web.authorizer, web.clock, root="/admin")
    with pytest.raises(ValueError, match="inside the XCAP root"):
        XCAPSite(clash, max_body_bytes=8192).mount("admin", web.admin)


def test_long_input_is_refused_or_shortened_not_an_error(web: Harness) -> None:
    reply = web.request("GET", "/admin/?user=" + "x" * (MAX_FIELD_CHARS + 1), user="root")
    assert reply.code == 400 and "longer than" in reply.text
    long_list = "sip:" + "l" * 1500 + "@relay.example.test"
    reply = web.post("grant", {**web.page().form("grant"), "sender": "bob", "list": long_list})
    assert reply.code == 303
    location = reply.header("Location") or ""
    assert len(location) < 1000
    assert "granted rule" in web.request("GET", location).text
