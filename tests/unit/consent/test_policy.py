"""Common Policy evaluation (RFC 4745 §10) with relayd's consent extension."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from lxml import etree
from twisted.internet.task import Clock

from relayd.consent.documents import DocumentRejected, parse_document
from relayd.consent.policy import (
    Permissions,
    PermissionScope,
    RequestContext,
    check_rule_uris,
    check_scope,
    evaluate,
    is_permitted,
    normalize_identity,
    now_from_clock,
    rule_matches,
)

LIST = "sip:friends@relay.example.test"
NOW = datetime(2027, 1, 1, tzinfo=UTC)
HEAD = (
    '<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"'
    ' xmlns:cr="urn:relayd:params:xml:ns:consent-policy"'
    ' xmlns:f="urn:ietf:params:xml:ns:consent-rules"'
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


# -- the seed's plain form at a Permission URI, and RFC 5361's elements ----------------

BOB = "sip:bob@relay.example.test"
SCOPE = PermissionScope(BOB, LIST, ("MESSAGE",))
PLAIN = ruleset(
    rule(
        '<identity><one id="sip:alice@example.test"/></identity>'
        "<validity><from>2026-11-24T00:00:00Z</from><until>2027-11-24T00:00:00Z</until>"
        "</validity>",
        actions="",
    )
)


def scoped(
    root: etree._Element,
    target: str = LIST,
    method: str = "MESSAGE",
    recipient: str | None = BOB,
    scope: PermissionScope | None = SCOPE,
) -> bool:
    return is_permitted(
        root, "sip:alice@example.test", target, method, NOW, recipient=recipient, scope=scope
    )


def test_plain_form_grants_what_its_permission_uri_was_minted_for() -> None:
    assert scoped(PLAIN)
    assert scoped(PLAIN, recipient="SIP:bob@Relay.Example.TEST")
    # Only that list, those methods, that recipient; nothing at all outside a scope.
    assert not scoped(PLAIN, target="sip:family@relay.example.test")
    assert not scoped(PLAIN, method="INVITE")
    assert not scoped(PLAIN, recipient="sip:carol@relay.example.test")
    assert not scoped(PLAIN, scope=None)
    # Its conditions still hold: another sender, or after the validity, gets nothing.
    assert not is_permitted(PLAIN, "sip:eve@x.test", LIST, "MESSAGE", NOW, scope=SCOPE)
    later = datetime(2028, 1, 1, tzinfo=UTC)
    assert not is_permitted(PLAIN, "sip:alice@example.test", LIST, "MESSAGE", later, scope=SCOPE)


def test_an_explicit_deny_in_scope_is_not_a_grant() -> None:
    for spelling in (
        "<cr:trans-handling>deny</cr:trans-handling>",
        "<f:trans-handling>deny</f:trans-handling>",
    ):
        root = ruleset(
            rule(
                '<identity><one id="sip:alice@example.test"/></identity>',
                f"<actions>{spelling}</actions>",
            )
        )
        assert not scoped(root)


RFC5361 = (
    '<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"'
    ' xmlns:f="urn:ietf:params:xml:ns:consent-rules">'
    '<rule id="a"><conditions><identity><one id="sip:alice@example.test"/></identity>'
    f'<f:recipient><one id="{BOB}"/></f:recipient><f:target><one id="{LIST}"/></f:target>'
    "</conditions><actions>"
    '<f:trans-handling perm-uri="sip:perm@relay.example.test">{handling}</f:trans-handling>'
    "</actions></rule></ruleset>"
)


def test_rfc_5361_recipient_target_and_trans_handling() -> None:
    root = parse_document(RFC5361.format(handling="grant").encode())
    assert scoped(root, scope=None)
    assert not scoped(root, scope=None, recipient="sip:carol@relay.example.test")
    assert not scoped(root, scope=None, recipient=None)
    assert not scoped(root, scope=None, target="sip:family@relay.example.test")
    both = evaluate(root, RequestContext("sip:alice@example.test", LIST, "MESSAGE", NOW))
    assert both.matched_rules == ()  # no recipient known: the condition does not hold
    denied = parse_document(RFC5361.format(handling="deny").encode())
    assert not scoped(denied) and not scoped(denied, scope=None)


@pytest.mark.parametrize(
    "conditions",
    [
        "",
        f'<cr:target uri="{LIST}"/>',
        f'<f:target><one id="{LIST}"/></f:target><f:recipient><one id="{BOB}"/></f:recipient>',
        '<f:target><many domain="relay.example.test"/></f:target>',
        "<cr:methods><cr:method>MESSAGE</cr:method><cr:method>INVITE</cr:method></cr:methods>",
    ],
)
def test_a_permission_uri_takes_rules_that_can_apply_under_it(conditions: str) -> None:
    check_scope(_scope_doc(conditions), SCOPE)


@pytest.mark.parametrize(
    "conditions",
    [
        '<cr:target uri="sip:family@relay.example.test"/>',
        '<f:target><one id="sip:family@relay.example.test"/></f:target>',
        '<f:recipient><one id="sip:carol@relay.example.test"/></f:recipient>',
        "<cr:methods><cr:method>INVITE</cr:method></cr:methods>",
    ],
)
def test_a_permission_uri_refuses_rules_that_never_apply_under_it(conditions: str) -> None:
    with pytest.raises(DocumentRejected) as info:
        check_scope(_scope_doc(conditions), SCOPE)
    assert info.value.fault == "constraint-failure"


def _scope_doc(conditions: str) -> etree._Element:
    return parse_document(
        (
            HEAD
            + rule('<identity><one id="sip:alice@example.test"/></identity>' + conditions, "")
            + "</ruleset>"
        ).encode()
    )


@pytest.mark.parametrize(
    ("condition", "what"),
    [
        ('<cr:target uri="sip:friends@relay example.test"/>', "target"),
        ('<identity><one id="not a uri"/></identity>', "identity"),
    ],
)
def test_a_rule_naming_no_sip_uri_is_refused(condition: str, what: str) -> None:
    check_rule_uris(ruleset(rule(f'<cr:target uri="{LIST}"/>')))
    with pytest.raises(DocumentRejected) as info:
        check_rule_uris(ruleset(rule(condition)))
    assert info.value.fault == "constraint-failure"
    assert info.value.reason.startswith(what) and "is not a SIP URI" in info.value.reason
