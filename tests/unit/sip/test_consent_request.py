"""The MESSAGE that asks a recipient (RFC 5360 §5.3), and the SIP grant and deny URIs (§5.6)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from lxml import etree

from relayd.consent.answer import Action, answer_token
from relayd.consent.store import PendingConsent
from relayd.consent.vocabulary import (
    COMMON_POLICY_NAMESPACE,
    CONSENT_FORMAT_NAMESPACE,
    CONSENT_RULES_MIME_TYPE,
)
from relayd.sip.consent_request import (
    answer_uri,
    parse_answer_user,
    request_body,
    request_note,
    takes_plain_text,
)

RECORD = PendingConsent(
    "abcdefghijklmnopqrstuv",
    "sip:alice@relay.test",
    'sip:a&"b@relay.test',
    "sip:bob@relay.test",
    ("MESSAGE",),
    "p" * 22,
    0.0,
    60.0,
)
LINKS: dict[Action, tuple[str, str]] = {
    "grant": ("sip:grant-g@relay.test", "https://relay.test/consent/grant/g"),
    "deny": ("sip:deny-d@relay.test", "https://relay.test/consent/deny/d"),
}


def test_grant_and_deny_uris_name_their_action_and_token() -> None:
    token = answer_token(RECORD, "deny")
    uri = answer_uri("relay.test", "deny", token)
    assert uri == f"sip:deny-{token}@relay.test"
    assert parse_answer_user(uri[4:].split("@")[0]) == ("deny", token)
    assert parse_answer_user("grant-nonsense") is None
    assert parse_answer_user("bob") is None and parse_answer_user(None) is None


def test_the_body_is_a_note_then_the_rfc_5361_document() -> None:
    content_type, body = request_body([(RECORD, LINKS)])
    boundary = content_type.split('boundary="')[1].rstrip('"').encode()
    assert content_type.startswith("multipart/alternative;")
    parts = body.split(b"--" + boundary)
    assert parts[0] == b"" and parts[-1] == b"--\r\n" and len(parts) == 4
    note, document = (p.strip(b"\r\n").split(b"\r\n\r\n", 1) for p in parts[1:3])
    assert note[0] == b"Content-Type: text/plain; charset=utf-8"
    for text in ("sip:alice@relay.test", 'sip:a&"b@relay.test', "MESSAGE", *LINKS["grant"]):
        assert text in note[1].decode()
    assert document[0] == f"Content-Type: {CONSENT_RULES_MIME_TYPE}".encode()
    root = etree.fromstring(document[1])
    handling = [
        (e.text, e.get("perm-uri"))
        for e in root.iter(f"{{{CONSENT_FORMAT_NAMESPACE}}}trans-handling")
    ]
    assert handling == [("grant", u) for u in LINKS["grant"]] + [("deny", u) for u in LINKS["deny"]]
    (target,) = root.iter(f"{{{CONSENT_FORMAT_NAMESPACE}}}target")
    assert target[0].get("id") == 'sip:a&"b@relay.test'


def test_without_https_links_only_the_sip_uris_are_offered() -> None:
    links: dict[Action, tuple[str, str]] = {a: (u[0], "") for a, u in LINKS.items()}
    _, body = request_body([(RECORD, links)])
    assert b'perm-uri=""' not in body and b"https" not in body
    assert body.count(b"perm-uri=") == 2 and b"sip:grant-g@relay.test" in body


def test_the_request_document_uses_rfc_5361_names_exactly() -> None:
    """RFC 5361 §4 (example) and §5 (schema): ``cp:ruleset/cp:rule`` with the
    conditions ``cp:identity``, ``recipient`` and ``target`` (``cp:one id``), and
    ``trans-handling`` actions valued ``grant``/``deny`` whose ``perm-uri`` is required;
    each rule offers at least one URI to grant and one to deny (§3.2)."""
    cp, cr = "urn:ietf:params:xml:ns:common-policy", "urn:ietf:params:xml:ns:consent-rules"
    _, body = request_body([(RECORD, LINKS)])
    start = body.index(b"<?xml")
    root = etree.fromstring(body[start : body.index(b"\r\n--", start)])
    assert root.tag == f"{{{cp}}}ruleset"
    (rule,) = root
    assert rule.tag == f"{{{cp}}}rule" and rule.get("id")
    conditions, actions = rule
    assert [c.tag for c in conditions] == [
        f"{{{cp}}}identity",
        f"{{{cr}}}recipient",
        f"{{{cr}}}target",
    ]
    assert [[(one.tag, one.get("id")) for one in c] for c in conditions] == [
        [(f"{{{cp}}}one", RECORD.sender)],
        [(f"{{{cp}}}one", RECORD.recipient)],
        [(f"{{{cp}}}one", RECORD.list_uri)],
    ]
    assert actions.tag == f"{{{cp}}}actions"
    assert {e.tag for e in actions} == {f"{{{cr}}}trans-handling"}
    assert {e.text for e in actions} == {"grant", "deny"}
    assert all(e.get("perm-uri") for e in actions)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (["text/plain"], True),
        (["application/sdp, TEXT/PLAIN;charset=utf-8"], True),
        (["text/*"], True),
        (["*/*;q=0.1"], True),
        (["text/plain;q=0"], False),
        (["text/plain;q=zero"], False),
        (["text/html", "application/im-iscomposing+xml"], False),
        ([], False),
    ],
)
def test_a_415_admits_plain_text_by_its_accept_ranges(accept: list[str], expected: bool) -> None:
    assert takes_plain_text(accept) is expected


def test_one_message_can_ask_about_several_requests() -> None:
    """What a Trigger-Consent sends again: one document, one rule per request (each
    with its own grant and deny URIs), one paragraph of the note per request."""
    other = PendingConsent(
        "bcdefghijklmnopqrstuvw",
        "sip:carol@relay.test",
        RECORD.list_uri,
        RECORD.recipient,
        ("INVITE",),
        "q" * 22,
        0.0,
        60.0,
    )
    other_links: dict[Action, tuple[str, str]] = {
        "grant": ("sip:grant-h@relay.test", ""),
        "deny": ("sip:deny-e@relay.test", ""),
    }
    content_type, body = request_body([(RECORD, LINKS), (other, other_links)])
    assert content_type.startswith("multipart/alternative;")
    start = body.index(b"<?xml")
    root = etree.fromstring(body[start : body.index(b"\r\n--", start)])
    cp, cr = "{urn:ietf:params:xml:ns:common-policy}", f"{{{CONSENT_FORMAT_NAMESPACE}}}"
    rules = root.findall(f"{cp}rule")
    assert [rule.get("id") for rule in rules] == ["consent-1", "consent-2"]
    assert [
        [(e.text, e.get("perm-uri")) for e in rule.iter(f"{cr}trans-handling")] for rule in rules
    ] == [
        [("grant", u) for u in LINKS["grant"]] + [("deny", u) for u in LINKS["deny"]],
        [("grant", "sip:grant-h@relay.test"), ("deny", "sip:deny-e@relay.test")],
    ]
    note = body[: body.index(b"<?xml")].decode()
    assert "sip:alice@relay.test asks" in note and "sip:carol@relay.test asks" in note
    assert "sip:deny-e@relay.test" in note


def test_a_list_additions_request_says_the_member_was_added_for_every_sender() -> None:
    """RFC 5360 §5.3's example: the list asks (``cp:many``), the note names the list."""
    whole = replace(RECORD, sender="sip:team@relay.test", list_uri="sip:team@relay.test")
    note = request_note([(whole, LINKS)])
    assert note.startswith("You were added to the list sip:team@relay.test:")
    root = etree.fromstring(
        request_body([(whole, LINKS)])[1].split(b"\r\n\r\n")[-1].split(b"\r\n--")[0]
    )
    (identity,) = root.iter(f"{{{COMMON_POLICY_NAMESPACE}}}identity")
    assert [etree.QName(child).localname for child in identity] == ["many"]
