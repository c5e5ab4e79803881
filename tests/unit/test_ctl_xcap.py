"""relayctl permissions|lists: pure parts (document edits, rendering, arguments)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from twisted.web.http_headers import Headers

from relayd.consent.lists import Unroutable, build_list_report
from relayd.consent.policy import is_permitted
from relayd.ctl import main as ctl
from relayd.ctl.settings import CtlError, Locations
from relayd.ctl.xcap import (
    add_members,
    check_arguments,
    default_xcap_url,
    describe_lists,
    describe_rules,
    expand_xui,
    find_rules,
    grant_rule,
    http_error_line,
    lists_table,
    make_rule,
    new_resource_lists,
    new_ruleset,
    not_routable,
    parse_xcap_document,
    remove_list,
    remove_members,
    remove_rules,
    render_json,
    render_table,
    report_of,
    rule_id_for,
    rules_table,
    unroutable_json,
    unroutable_lines,
    xcap_trust,
)
from relayd.xcap.client import XCAPResponse, document_path, node_path
from relayd.xcap.errors import SCHEMA_VALIDATION_ERROR, XCAPError
from relayd.xcap.usages import CONSENT_RULES, RESOURCE_LISTS
from relayd.xcap.xml import serialize_document

LIST = "sip:friends@relay.example.test"
DOMAIN = "relay.example.test"
RL_ROOT = "{urn:ietf:params:xml:ns:resource-lists}resource-lists"
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
    ruleset = parse_xcap_document(body, "{urn:ietf:params:xml:ns:common-policy}ruleset")
    [view] = describe_rules(ruleset)
    assert view.senders == ("anyone@partner.test except sip:mallory@partner.test",)
    assert view.methods == ()
    assert "any" in rules_table([view])


def test_describe_rules_reads_rfc_5361_documents() -> None:
    body = (
        b'<cp:ruleset xmlns="urn:ietf:params:xml:ns:consent-rules"'
        b' xmlns:cp="urn:ietf:params:xml:ns:common-policy"><cp:rule id="a"><cp:conditions>'
        b'<cp:identity><cp:one id="sip:alice@x.test"/></cp:identity>'
        b'<target><cp:one id="sip:friends@relay.example.test"/></target></cp:conditions>'
        b'<cp:actions><trans-handling perm-uri="sip:p@x.test">grant</trans-handling>'
        b"</cp:actions></cp:rule></cp:ruleset>"
    )
    ruleset = parse_xcap_document(body, "{urn:ietf:params:xml:ns:common-policy}ruleset")
    [view] = describe_rules(ruleset)
    assert view.senders == ("sip:alice@x.test",)
    assert view.lists == ("sip:friends@relay.example.test",)
    assert view.action == "grant"


def test_parse_refuses_a_document_of_another_kind() -> None:
    with pytest.raises(CtlError, match="expected"):
        parse_xcap_document(b"<a/>", "{urn:ietf:params:xml:ns:common-policy}ruleset")
    with pytest.raises(CtlError, match="unreadable"):
        parse_xcap_document(b'<!DOCTYPE a [<!ENTITY x "y">]><a/>', "a")


def test_list_members_added_once_and_removed() -> None:
    root = new_resource_lists()
    assert add_members(root, "friends", [BOB, BOB, "sip:c@x"], DOMAIN) == ([BOB, "sip:c@x"], True)
    assert add_members(root, "friends", [BOB], DOMAIN) == ([], False)
    RESOURCE_LISTS.validate(root)
    assert remove_members(root, "friends", [BOB]) == [BOB]
    [view] = describe_lists(root)
    assert view.members == (("sip:c@x", ""),)
    with pytest.raises(CtlError, match="not in list"):
        remove_members(root, "friends", [BOB])
    with pytest.raises(CtlError, match="no list"):
        remove_members(root, "family", [BOB])
    assert b"<entry" in serialize_document(root)
    assert remove_list(root, "friends") == ["sip:c@x"]
    assert describe_lists(root) == []
    with pytest.raises(CtlError, match="no list"):
        remove_list(root, "friends")


def test_lists_creates_only_lists_the_relay_routes_but_edits_any() -> None:
    """A list relayctl is asked to create is meant to be a list URI: refused, nothing
    changed, when its name cannot make one; one another client made is still edited."""
    shared = parse_xcap_document(
        b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        b'<list name="my friends"><entry uri="mailto:bob@x.test"/></list></resource-lists>',
        RL_ROOT,
    )
    before = serialize_document(shared)
    for bad in ("sip:friends@relay.test", "friends@relay.test", "new friends", ""):
        with pytest.raises(CtlError, match=r"list's name.*creates no list the relay cannot route"):
            add_members(shared, bad, [BOB], DOMAIN)
        assert serialize_document(shared) == before
    assert add_members(shared, "my friends", [BOB], DOMAIN) == ([BOB], False)
    RESOURCE_LISTS.validate(shared)


def test_lists_say_what_the_relay_does_not_route() -> None:
    shared = parse_xcap_document(
        b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        b'<list name="my friends"><entry uri="sip:bob@x.test"/></list>'
        b'<list name="ok"><entry uri="mailto:bob@x.test"/><entry uri="sip:c@x.test"/></list>'
        b"<list/></resource-lists>",
        RL_ROOT,
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


def test_the_relays_list_report_is_read_from_a_write_answer() -> None:
    items = [Unroutable("resource-lists/list[2]", "no name")]
    report = build_list_report(items)
    answer = _response(200, report, "application/vnd.relayd.list-report+xml")
    assert report_of(answer) == (items, 0)
    assert report_of(_response(200)) == ([], 0)
    assert report_of(_response(200, report, "text/plain")) == ([], 0)


def test_lists_remove_takes_members_or_all() -> None:
    parser = ctl.build_parser()
    check_arguments(parser.parse_args(["lists", "add", "friends", BOB]))
    check_arguments(parser.parse_args(["lists", "remove", "friends", BOB]))
    check_arguments(parser.parse_args(["lists", "remove", "friends", "--all"]))
    for both_or_neither in (["friends"], ["friends", BOB, "--all"]):
        with pytest.raises(CtlError, match="or --all"):
            check_arguments(parser.parse_args(["lists", "remove", *both_or_neither]))


def test_render_table_aligns_columns() -> None:
    text = render_table(("A", "LONGER"), [("xyz", "1"), ("q", "")])
    assert text == "A    LONGER\nxyz  1\nq\n"


def test_render_json_round_trips() -> None:
    assert json.loads(render_json({"rules": [{"id": "é"}]})) == {"rules": [{"id": "é"}]}


def test_expand_xui() -> None:
    assert expand_xui("carol", "example.test") == "sip:carol@example.test"
    assert expand_xui("carol@other.test", "example.test") == "sip:carol@other.test"
    assert expand_xui("sips:carol@x", "example.test") == "sips:carol@x"
    with pytest.raises(CtlError):
        expand_xui(" ", "r")


def test_paths_escape_what_a_segment_or_selector_cannot_hold() -> None:
    path = document_path("/xcap-root", "consent-rules", "sip:a b@x", "index")
    assert path == "/xcap-root/consent-rules/users/sip:a%20b@x/index"
    assert node_path(path, 'ruleset/rule[@id="r"]').endswith("/~~/ruleset/rule%5B@id=%22r%22%5D")
    assert document_path("/r", "xcap-caps", None, "index") == "/r/xcap-caps/global/index"


def _response(status: int, body: bytes = b"", content_type: str | None = None) -> XCAPResponse:
    headers = Headers()
    if content_type:
        headers.setRawHeaders("Content-Type", [content_type])
    return XCAPResponse(status, headers, body)


def test_http_error_line_names_the_condition() -> None:
    error = XCAPError(409, SCHEMA_VALIDATION_ERROR, "bad\nvalue")
    response = _response(409, error.to_xml(), "application/xcap-error+xml")
    line = http_error_line("PUT", "/x/index", response)
    assert line == "PUT /x/index: 409 Conflict: schema-validation-error (bad value)"
    assert http_error_line("GET", "/x", _response(404)) == "GET /x: 404 Not Found"
    assert "wrong user name or password" in http_error_line("GET", "/x", _response(401))


def test_default_xcap_url_follows_the_config(tmp_path: Path) -> None:
    assert default_xcap_url(None) == "https://127.0.0.1:4443/xcap-root"
    ini = tmp_path / "relayd.ini"
    ini.write_text(
        "[relay]\nhostname = relay.example.test\n[xcap]\nlisten = ssl:8443\nroot = /x\n",
        encoding="utf-8",
    )
    assert default_xcap_url(str(ini)) == "https://relay.example.test:8443/x"
    ini.write_text("[xcap]\npublic_url = https://x.test/root/\n", encoding="utf-8")
    assert default_xcap_url(str(ini)) == "https://x.test/root"


def test_xcap_trust_uses_the_self_signed_certificate_on_loopback(tmp_path: Path) -> None:
    locations = Locations(tmp_path, tmp_path / "users", "localhost")
    assert xcap_trust(None, "https://127.0.0.1:4443/xcap-root", locations) is None
    cert = locations.self_signed_cert_path
    cert.parent.mkdir()
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    assert xcap_trust(None, "https://localhost:4443/xcap-root", locations) == cert.read_bytes()
    assert xcap_trust(None, "https://relay.example.test/xcap-root", locations) is None
    with pytest.raises(CtlError, match="bad --xcap URL"):
        xcap_trust(None, "ftp://x", locations)


def test_parser_accepts_the_documented_synopsis() -> None:
    parser = ctl.build_parser()
    args = parser.parse_args(
        [
            *("permissions", "grant", "carol", "--from", BOB, "--list", LIST),
            *("--methods", "MESSAGE,INVITE", "--until", "2030-01-01", "--json"),
        ]
    )
    assert (args.command, args.action, args.recipient, args.sender) == (
        "permissions",
        "grant",
        "carol",
        BOB,
    )
    assert args.json and args.timeout == 30.0
    args = parser.parse_args(["lists", "add", "friends", BOB, "sip:c@x", "--owner", "alice"])
    assert (args.list, args.members, args.owner) == ("friends", [BOB, "sip:c@x"], "alice")
    args = parser.parse_args(["permissions", "revoke", "carol", "--rule", "r1"])
    check_arguments(args)


def test_revoke_needs_a_sender_and_list_together(capsys: pytest.CaptureFixture[str]) -> None:
    parser = ctl.build_parser()
    args = parser.parse_args(["permissions", "revoke", "carol", "--from", BOB])
    with pytest.raises(CtlError, match="needs --list"):
        check_arguments(args)
    assert ctl.run(["permissions", "revoke", "carol"]) == ctl.EXIT_USAGE
    assert capsys.readouterr().err.count("\n") == 1


def test_existing_commands_still_parse() -> None:
    args = ctl.build_parser().parse_args(["auth", "msrps://localhost:2855", "--expires", "60"])
    assert args.expires == 60
