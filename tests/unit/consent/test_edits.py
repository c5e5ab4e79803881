"""The pure edits of consent-rules and resource-lists documents (relayctl and the admin
page both edit through them)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relayd.consent.documents import parse_document
from relayd.consent.edits import (
    EditError,
    add_members,
    describe_lists,
    describe_rules,
    expand_xui,
    find_rules,
    grant_rule,
    make_rule,
    new_resource_lists,
    new_ruleset,
    not_routable,
    remove_list,
    remove_members,
    remove_rules,
    rule_id_for,
)
from relayd.consent.policy import is_permitted
from relayd.ctl.render import lists_table, rules_table, unroutable_json, unroutable_lines
from relayd.xcap.errors import SCHEMA_VALIDATION_ERROR, XCAPError
from relayd.xcap.usages import CONSENT_RULES, RESOURCE_LISTS
from relayd.xcap.xml import serialize_document

LIST = "sip:friends@relay.example.test"
DOMAIN = "relay.example.test"
BOB = "sip:bob@example.test"
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def test_grant_rule_adds_a_valid_permitting_rule() -> None:
    ruleset = new_ruleset()
    replaced = grant_rule(ruleset, make_rule(rule_id_for(BOB, LIST), BOB, LIST), BOB, LIST)
    assert not replaced
    CONSENT_RULES.validate(ruleset)
    assert is_permitted(ruleset, BOB, LIST, "MESSAGE", NOW)
    assert not is_permitted(ruleset, BOB, LIST, "INVITE", NOW)
    assert not is_permitted(ruleset, BOB, "sip:other@relay.example.test", "MESSAGE", NOW)


def test_grant_rule_replaces_the_rule_for_the_same_pair() -> None:
    ruleset = new_ruleset()
    grant_rule(ruleset, make_rule("first", BOB, LIST), BOB, LIST)
    until = datetime(2031, 1, 1, tzinfo=UTC)
    replaced = grant_rule(ruleset, make_rule("second", BOB, LIST, until=until, now=NOW), BOB, LIST)
    assert replaced
    [view] = describe_rules(ruleset)
    assert view.id == "first"
    assert view.validity == (("2029-12-31T23:55:00Z", "2031-01-01T00:00:00Z"),)
    CONSENT_RULES.validate(ruleset)
    assert is_permitted(ruleset, BOB, LIST, "MESSAGE", NOW)
    assert not is_permitted(ruleset, BOB, LIST, "MESSAGE", datetime(2032, 1, 1, tzinfo=UTC))


def test_grant_rule_picks_a_free_id() -> None:
    ruleset = new_ruleset()
    grant_rule(ruleset, make_rule("r", BOB, LIST), BOB, LIST)
    grant_rule(ruleset, make_rule("r", "sip:carol@x.test", LIST), "sip:carol@x.test", LIST)
    assert [v.id for v in describe_rules(ruleset)] == ["r", "r-2"]
    CONSENT_RULES.validate(ruleset)


def test_bad_method_is_left_for_the_server_to_refuse() -> None:
    ruleset = new_ruleset()
    grant_rule(ruleset, make_rule("r", BOB, LIST, ["BAD METHOD"]), BOB, LIST)
    with pytest.raises(XCAPError) as caught:
        CONSENT_RULES.validate(ruleset)
    assert caught.value.condition == SCHEMA_VALIDATION_ERROR


def test_find_and_remove_rules() -> None:
    ruleset = new_ruleset()
    grant_rule(ruleset, make_rule("a", BOB, LIST), BOB, LIST)
    grant_rule(ruleset, make_rule("b", BOB, "sip:x@y"), BOB, "sip:x@y")
    assert [r.get("id") for r in find_rules(ruleset, BOB, LIST)] == ["a"]
    assert remove_rules(ruleset, ["a", "zzz"]) == ["zzz"]
    assert [v.id for v in describe_rules(ruleset)] == ["b"]


def test_describe_rules_reads_the_spec_example() -> None:
    body = (
        b'<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"'
        b' xmlns:cr="urn:relayd:params:xml:ns:consent-policy">'
        b'<rule id="partner"><conditions><identity><many domain="partner.test">'
        b'<except id="sip:mallory@partner.test"/></many></identity>'
        b'<cr:target uri="sip:friends@relay.example.test"/></conditions>'
        b"<actions><cr:trans-handling>grant</cr:trans-handling></actions></rule></ruleset>"
    )
    ruleset = parse_document(body)
    [view] = describe_rules(ruleset)
    assert view.senders == ("anyone@partner.test except sip:mallory@partner.test",)
    assert view.methods == ()
    assert "any" in rules_table([("index", view)])


def test_describe_rules_reads_rfc_5361_documents() -> None:
    body = (
        b'<cp:ruleset xmlns="urn:ietf:params:xml:ns:consent-rules"'
        b' xmlns:cp="urn:ietf:params:xml:ns:common-policy"><cp:rule id="a"><cp:conditions>'
        b'<cp:identity><cp:one id="sip:alice@x.test"/></cp:identity>'
        b'<target><cp:one id="sip:friends@relay.example.test"/></target></cp:conditions>'
        b'<cp:actions><trans-handling perm-uri="sip:p@x.test">grant</trans-handling>'
        b"</cp:actions></cp:rule></cp:ruleset>"
    )
    ruleset = parse_document(body)
    [view] = describe_rules(ruleset)
    assert view.senders == ("sip:alice@x.test",)
    assert view.lists == ("sip:friends@relay.example.test",)
    assert view.action == "grant"


def test_list_members_added_once_and_removed() -> None:
    root = new_resource_lists()
    assert add_members(root, "friends", [BOB, BOB, "sip:c@x"], DOMAIN) == ([BOB, "sip:c@x"], True)
    assert add_members(root, "friends", [BOB], DOMAIN) == ([], False)
    RESOURCE_LISTS.validate(root)
    assert remove_members(root, "friends", [BOB]) == [BOB]
    [view] = describe_lists(root)
    assert view.members == (("sip:c@x", ""),)
    with pytest.raises(EditError, match="not in list"):
        remove_members(root, "friends", [BOB])
    with pytest.raises(EditError, match="no list"):
        remove_members(root, "family", [BOB])
    assert b"<entry" in serialize_document(root)
    assert remove_list(root, "friends") == ["sip:c@x"]
    assert describe_lists(root) == []
    with pytest.raises(EditError, match="no list"):
        remove_list(root, "friends")


def test_lists_creates_only_lists_the_relay_routes_but_edits_any() -> None:
    """A list relayctl is asked to create is meant to be a list URI: refused, nothing
    changed, when its name cannot make one; one another client made is still edited."""
    shared = parse_document(
        b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        b'<list name="my friends"><entry uri="mailto:bob@x.test"/></list></resource-lists>',
    )
    before = serialize_document(shared)
    for bad in ("sip:friends@relay.test", "friends@relay.test", "new friends", ""):
        with pytest.raises(
            EditError, match=r"list's name.*no list is created that the relay cannot route"
        ):
            add_members(shared, bad, [BOB], DOMAIN)
        assert serialize_document(shared) == before
    assert add_members(shared, "my friends", [BOB], DOMAIN) == ([BOB], False)
    RESOURCE_LISTS.validate(shared)


def test_lists_say_what_the_relay_does_not_route() -> None:
    shared = parse_document(
        b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        b'<list name="my friends"><entry uri="sip:bob@x.test"/></list>'
        b'<list name="ok"><entry uri="mailto:bob@x.test"/><entry uri="sip:c@x.test"/></list>'
        b"<list/></resource-lists>",
    )
    skipped = not_routable(shared, DOMAIN)
    assert unroutable_lines(skipped).splitlines() == [
        "not routed: list my friends: the name 'my friends' cannot be the user part of a list URI",
        "not routed: list ok, entry mailto:bob@x.test: mailto: URIs are not relayed"
        " (only sip: and sips:)",
        "not routed: resource-lists/list[3]: a list without a name (or cr:uri) has no list URI",
    ]
    assert unroutable_json(skipped[1:2], more=3) == [
        {
            "node": 'resource-lists/list[@name="ok"]/entry[@uri="mailto:bob@x.test"]',
            "list": "ok",
            "uri": "mailto:bob@x.test",
            "reason": "mailto: URIs are not relayed (only sip: and sips:)",
        },
        {"more": 3},
    ]
    assert lists_table(describe_lists(shared)).splitlines()[3].split() == ["-", "0", "-"]


def test_expand_xui() -> None:
    assert expand_xui("carol", "example.test") == "sip:carol@example.test"
    assert expand_xui("carol@other.test", "example.test") == "sip:carol@other.test"
    assert expand_xui("sips:carol@x", "example.test") == "sips:carol@x"
    with pytest.raises(EditError):
        expand_xui(" ", "r")
