"""Common Policy evaluation (RFC 4745 §10) with relayd's consent extension."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from lxml import etree
from twisted.internet.task import Clock

from relayd.xcap.policy import (
    Permissions,
    RequestContext,
    evaluate,
    is_permitted,
    normalize_identity,
    now_from_clock,
    rule_matches,
)
from relayd.xcap.xml import parse_document

LIST = "sip:friends@relay.example.test"
NOW = datetime(2027, 1, 1, tzinfo=UTC)
HEAD = (
    '<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"'
    ' xmlns:cr="urn:relayd:params:xml:ns:consent-policy"'
    ' xmlns:x="urn:example:other">'
)
GRANT = "<actions><cr:trans-handling>grant</cr:trans-handling></actions>"


def ruleset(*rules: str) -> etree._Element:
    return parse_document((HEAD + "".join(rules) + "</ruleset>").encode())


def rule(conditions: str | None, actions: str = GRANT, rule_id: str = "r") -> str:
    body = "" if conditions is None else f"<conditions>{conditions}</conditions>"
    return f'<rule id="{rule_id}">{body}{actions}</rule>'


def permitted(
    root: etree._Element,
    sender: str | None = "sip:alice@example.test",
    target: str | None = LIST,
    method: str | None = "MESSAGE",
    now: datetime = NOW,
) -> bool:
    return is_permitted(root, sender, target, method, now)


SPEC_EXAMPLE = ruleset(
    rule(
        '<identity><one id="sip:alice@example.test"/></identity>'
        "<validity><from>2026-11-24T00:00:00Z</from><until>2027-11-24T00:00:00Z</until>"
        f'</validity><cr:target uri="{LIST}"/>'
        "<cr:methods><cr:method>MESSAGE</cr:method></cr:methods>",
        rule_id="alice-friends",
    ),
    rule(
        '<identity><many domain="partner.test"><except id="sip:mallory@partner.test"/>'
        f'</many></identity><cr:target uri="{LIST}"/>'
        "<cr:methods><cr:method>MESSAGE</cr:method></cr:methods>",
        rule_id="partner-domain",
    ),
)


@pytest.mark.parametrize(
    ("sender", "target", "method", "now", "expected"),
    [
        ("sip:alice@example.test", LIST, "MESSAGE", NOW, True),
        ("SIP:alice@EXAMPLE.test", LIST, "MESSAGE", NOW, True),
        ("sip:Alice@example.test", LIST, "MESSAGE", NOW, False),
        ("sip:alice@example.test", LIST, "INVITE", NOW, False),
        ("sip:alice@example.test", "sip:family@relay.example.test", "MESSAGE", NOW, False),
        ("sip:alice@example.test", LIST, "MESSAGE", datetime(2028, 1, 1, tzinfo=UTC), False),
        ("sip:bob@partner.test", LIST, "MESSAGE", datetime(2030, 1, 1, tzinfo=UTC), True),
        ("sip:mallory@partner.test", LIST, "MESSAGE", NOW, False),
        ("sip:eve@elsewhere.test", LIST, "MESSAGE", NOW, False),
        (None, LIST, "MESSAGE", NOW, False),
    ],
)
def test_spec_example_document(
    sender: str | None, target: str, method: str, now: datetime, expected: bool
) -> None:
    assert permitted(SPEC_EXAMPLE, sender, target, method, now) is expected


def test_no_rules_no_permission() -> None:
    assert not permitted(ruleset())


def test_absent_and_empty_conditions_match_everything() -> None:
    assert permitted(ruleset(rule(None)), sender=None, target=None, method=None)
    assert permitted(ruleset(rule("")), sender=None)


def test_all_conditions_must_match() -> None:
    root = ruleset(rule(f'<cr:target uri="{LIST}"/><identity><one id="sip:x@y"/></identity>'))
    assert not permitted(root)
    assert permitted(root, sender="sip:x@y")


@pytest.mark.parametrize(
    "condition",
    [
        '<sphere value="work"/>',
        "<x:unknown-condition/>",
        "<identity><x:other-identity/></identity>",
    ],
)
def test_unknown_or_unsupported_conditions_never_match(condition: str) -> None:
    assert not permitted(ruleset(rule(condition)))


def test_many_without_domain_matches_any_authenticated_identity() -> None:
    root = ruleset(rule('<identity><many><except domain="bad.test"/></many></identity>'))
    assert permitted(root, sender="sip:anyone@example.test")
    assert not permitted(root, sender="sip:someone@BAD.test")
    assert not permitted(root, sender=None)


def test_sender_domain_override() -> None:
    root = ruleset(rule('<identity><many domain="corp.test"/></identity>'))
    context = RequestContext("tel:+15551234", LIST, "MESSAGE", NOW, sender_domain="corp.test")
    assert evaluate(root, context).trans_handling == "grant"


def test_validity_any_interval_from_inclusive_until_exclusive() -> None:
    start = datetime(2027, 1, 1, tzinfo=UTC)
    root = ruleset(
        rule(
            "<validity><from>2020-01-01T00:00:00Z</from><until>2020-02-01T00:00:00Z</until>"
            "<from>2027-01-01T01:00:00+01:00</from><until>2027-01-02T00:00:00Z</until>"
            "</validity>"
        )
    )
    assert permitted(root, now=start)
    assert permitted(root, now=datetime(2020, 1, 15, tzinfo=UTC))
    assert not permitted(root, now=start - timedelta(seconds=1))
    assert not permitted(root, now=datetime(2027, 1, 2, tzinfo=UTC))


def test_validity_without_timezone_never_matches() -> None:
    root = ruleset(
        rule(
            "<validity><from>2020-01-01T00:00:00</from><until>2030-01-01T00:00:00</until></validity>"
        )
    )
    assert not permitted(root)


def test_permissions_combine_positively() -> None:
    root = ruleset(
        rule(
            None,
            "<actions><cr:trans-handling>deny</cr:trans-handling><x:flag>false</x:flag>"
            "<x:count>3</x:count></actions>",
            rule_id="a",
        ),
        rule(
            None,
            "<actions><cr:trans-handling>grant</cr:trans-handling><x:flag/>"
            "<x:count>2</x:count></actions>",
            rule_id="b",
        ),
        rule(None, "<actions><cr:trans-handling>deny</cr:trans-handling></actions>", rule_id="c"),
    )
    result = evaluate(root, RequestContext(None, LIST, "MESSAGE", NOW))
    assert result.trans_handling == "grant"
    assert result.values["{urn:example:other}flag"] is True
    assert result.values["{urn:example:other}count"] == 3
    assert result.matched_rules == ("a", "b", "c")


def test_deny_only_is_not_permitted() -> None:
    root = ruleset(rule(None, "<actions><cr:trans-handling>deny</cr:trans-handling></actions>"))
    assert not permitted(root)


def test_rule_without_actions_grants_nothing() -> None:
    root = ruleset(rule(None, ""))
    result = evaluate(root, RequestContext(None, LIST, "MESSAGE", NOW))
    assert result == Permissions({}, ("r",))
    assert not permitted(root)


def test_non_ruleset_root_grants_nothing() -> None:
    root = parse_document(b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists"/>')
    assert evaluate(root, RequestContext(None, LIST, "MESSAGE", NOW)) == Permissions()


def test_rule_matches_exposed_for_single_rules() -> None:
    root = ruleset(rule("<cr:methods><cr:method>MESSAGE</cr:method></cr:methods>"))
    assert rule_matches(root[0], RequestContext(None, None, "MESSAGE", NOW))
    assert not rule_matches(root[0], RequestContext(None, None, "message", NOW))


def test_now_from_injected_clock() -> None:
    clock = Clock()
    clock.advance(1_800_000_000)
    assert now_from_clock(clock) == datetime(2027, 1, 15, 8, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("uri", "normal"),
    [
        ("SIP:Alice@Example.TEST", "sip:Alice@example.test"),
        ("sip:example.test", "sip:example.test"),
        ("sip:bob@Example.TEST:25180;transport=TCP?x=y", "sip:bob@example.test:25180"),
        ("sip:+1;phone-context=x@Example.TEST", "sip:+1;phone-context=x@example.test"),
        ("not-a-uri", "not-a-uri"),
    ],
)
def test_normalize_identity(uri: str, normal: str) -> None:
    assert normalize_identity(uri) == normal
