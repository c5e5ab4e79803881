"""relayctl's display of XCAP documents and answers: tables, JSON, error lines."""

from __future__ import annotations

import json

from twisted.web.http_headers import Headers

from relayd.consent.edits import describe_rule, make_rule
from relayd.ctl.render import http_error_line, render_json, render_table, revoke_line, rules_table
from relayd.xcap.client import XCAPResponse
from relayd.xcap.errors import SCHEMA_VALIDATION_ERROR, XCAPError


def test_render_table_aligns_columns() -> None:
    text = render_table(("A", "LONGER"), [("xyz", "1"), ("q", "")])
    assert text == "A    LONGER\nxyz  1\nq\n"


def test_render_json_round_trips() -> None:
    assert json.loads(render_json({"rules": [{"id": "é"}]})) == {"rules": [{"id": "é"}]}


def test_http_error_line_names_the_condition() -> None:
    error = XCAPError(409, SCHEMA_VALIDATION_ERROR, "bad\nvalue")
    headers = Headers({"Content-Type": ["application/xcap-error+xml"]})
    response = XCAPResponse(409, headers, error.to_xml())
    line = http_error_line("PUT", "/x/index", response)
    assert line == "PUT /x/index: 409 Conflict: schema-validation-error (bad value)"
    assert (
        http_error_line("GET", "/x", XCAPResponse(404, Headers(), b"")) == "GET /x: 404 Not Found"
    )
    assert "wrong user name or password" in http_error_line(
        "GET", "/x", XCAPResponse(401, Headers(), b"")
    )


def test_rules_table_names_the_document_of_each_rule() -> None:
    view = describe_rule(make_rule("r1", "sip:bob@x.test", "sip:friends@x.test"))
    lines = rules_table([("index", view), ("p-abc.xml", view)]).splitlines()
    assert lines[0].split() == ["DOCUMENT", "RULE", "FROM", "LIST", "METHODS", "UNTIL", "ACTION"]
    assert lines[1].split() == [
        "index",
        "r1",
        "sip:bob@x.test",
        "sip:friends@x.test",
        "MESSAGE",
        "forever",
        "grant",
    ]
    assert lines[2].split()[0] == "p-abc.xml"


def test_revoke_line_says_where_rules_went() -> None:
    assert revoke_line("sip:a@x", [("index", 1, False)]) == "revoked 1 rule of sip:a@x: index (1)\n"
    assert revoke_line("sip:a@x", [("index", 2, False), ("p-t.xml", 1, True)]) == (
        "revoked 3 rules of sip:a@x: index (2), p-t.xml (1, document deleted)\n"
    )
