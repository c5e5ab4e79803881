"""relayctl's display of XCAP documents and answers: tables, JSON, error lines."""

from __future__ import annotations

import json

from twisted.web.http_headers import Headers

from relayd.ctl.render import http_error_line, render_json, render_table
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
