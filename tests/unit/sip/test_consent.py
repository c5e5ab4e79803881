"""Consent decisions: consent URIs, missing members, the 470, rate limits, expiry."""

from __future__ import annotations

import pytest
from lxml import etree

from relayd.sip.consent import (
    ConsentURIs,
    TriggerConsentError,
    consent_needed,
    format_trigger_consent,
    parse_trigger_consent,
)
from relayd.sip.message import Headers, SIPRequest
from relayd.sipuri import SIPURI, NameAddr

LIST = "sip:friends@relay.test"


def _message_to_list() -> SIPRequest:
    """alice's MESSAGE to the list, the request a 470 answers."""
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP a.test;branch=z9hG4bK1"),
            ("From", "<sip:alice@x.test>;tag=1"),
            ("To", f"<{LIST}>"),
            ("Call-ID", "c"),
            ("CSeq", "1 MESSAGE"),
        ]
    )
    return SIPRequest("MESSAGE", SIPURI.parse(LIST), headers)


def test_consent_uri_round_trip_and_forgery() -> None:
    uris = ConsentURIs("relay.test", key=b"k" * 32)
    uri = SIPURI.parse(uris.consent_uri(LIST, "sip:bob@x.test"))
    assert uris.parse_consent_user(uri.user) == (LIST, "sip:bob@x.test")
    assert uris.parse_consent_user((uri.user or "") + "x") is None
    assert ConsentURIs("relay.test").parse_consent_user(uri.user) is None
    assert ConsentURIs.wait_id("wp-abc") == "abc" and ConsentURIs.wait_id("x") is None


def test_470_names_consent_uris_in_body_and_header() -> None:
    uris = ConsentURIs("relay.test")
    request = _message_to_list()
    response = consent_needed(request, LIST, ["sip:bob@x.test"], uris)
    assert response.status == 470
    root = etree.fromstring(response.body)
    (entry,) = root.iter("{urn:ietf:params:xml:ns:resource-lists}entry")
    assert response.headers.get("permission-missing") == f"<{entry.get('uri')}>"
    user = SIPURI.parse(entry.get("uri") or "").user
    assert uris.parse_consent_user(user) == (LIST, "sip:bob@x.test")


def test_470_names_the_missing_members_only_when_asked() -> None:
    uris = ConsentURIs("relay.test")
    request = _message_to_list()
    members = ["sip:bob@x.test:5070", 'sip:o"d\\d,e@x.test']
    named = consent_needed(request, LIST, members, uris, name_members=True)
    rl = "{urn:ietf:params:xml:ns:resource-lists}"
    entries = list(etree.fromstring(named.body).iter(rl + "entry"))
    assert [e.findtext(rl + "display-name") for e in entries] == members
    (raw,) = named.headers.get_raw("permission-missing")
    # RFC 3261 §25.1 quoted-string: '"' and '\' go as quoted-pairs.
    first, second = (e.get("uri") for e in entries)
    assert raw == rf'"sip:bob@x.test:5070" <{first}>, "sip:o\"d\\d,e@x.test" <{second}>'
    values = named.headers.get_all("permission-missing")
    parsed = [NameAddr.parse(value) for value in values]
    assert [p.display_name for p in parsed] == members
    assert [p.uri.format() for p in parsed] == [e.get("uri") for e in entries]

    hidden = consent_needed(request, LIST, members, uris)
    assert b"display-name" not in hidden.body
    assert '"' not in (hidden.headers.get("permission-missing") or "")


def test_trigger_consent_is_written_as_the_rfc_5360_abnf_says() -> None:
    """RFC 5360 §5.11.2: ``trigger-cons-spec = ( SIP-URI / SIPS-URI ) *( SEMI
    trigger-param )`` (a bare URI, no angle brackets) and ``target-uri = "target-uri"
    EQUAL LDQUOT *( qdtext / quoted-pair ) RDQUOT``, as in the RFC's example
    ``sip:123@relay.example.com;target-uri="sip:friends@relay.example.com"``."""
    value = format_trigger_consent("sip:123@relay.example.com", "sip:friends@relay.example.com")
    assert value == 'sip:123@relay.example.com;target-uri="sip:friends@relay.example.com"'
    parsed = parse_trigger_consent(value)
    assert parsed.uri.format() == "sip:123@relay.example.com"
    assert parsed.target_uri.format() == "sip:friends@relay.example.com"


def test_trigger_consent_target_uri_keeps_its_own_parameters() -> None:
    """Everything after the bare URI is a header parameter (RFC 3261 §20.10), and the
    target's own parameters stay inside the quotes."""
    value = format_trigger_consent("sips:t@relay.test", "sip:friends@relay.test;transport=tcp")
    parsed = parse_trigger_consent(value)
    assert parsed.uri.format() == "sips:t@relay.test" and parsed.uri.params == ()
    assert parsed.target_uri.param("transport") == "tcp"


def test_trigger_consent_in_angle_brackets_is_read_too() -> None:
    parsed = parse_trigger_consent(f'<sip:t@relay.test> ; target-uri="{LIST}"')
    assert (parsed.uri.user, parsed.target_uri.format()) == ("t", LIST)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("sip:t@relay.test", "Trigger-Consent Without target-uri"),
        ("sip:t@relay.test;target-uri", "Trigger-Consent Without target-uri"),
        (f"sip:t@relay.test;target-uri={LIST}", "Trigger-Consent target-uri Not Quoted"),
        ('sip:t@relay.test;target-uri="sip:friends@relay.test', "Bad Trigger-Consent"),
        (f'tel:+15551234;target-uri="{LIST}"', "Bad Trigger-Consent"),
        (f'"Bob" <sip:t@relay.test>;target-uri="{LIST}"', "Bad Trigger-Consent"),
        ('sip:t@relay.test;target-uri="https://relay.test/x"', "Bad Trigger-Consent target-uri"),
        ('sip:t@relay.test;target-uri="not a uri"', "Bad Trigger-Consent target-uri"),
        (
            f'sip:a@relay.test;target-uri="{LIST}", sip:b@relay.test;target-uri="{LIST}"',
            "One Trigger-Consent At A Time",
        ),
        ("", "Bad Trigger-Consent"),
    ],
)
def test_a_bad_trigger_consent_is_a_clear_error(value: str, reason: str) -> None:
    with pytest.raises(TriggerConsentError) as refused:
        parse_trigger_consent(value)
    assert str(refused.value) == reason
