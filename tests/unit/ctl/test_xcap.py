"""relayctl permissions|lists: names, URLs, arguments, and the conditional writes."""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from lxml import etree
from twisted.internet.defer import ensureDeferred
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from relayd.consent.edits import make_rule, new_ruleset
from relayd.consent.lists import Unroutable, build_list_report
from relayd.ctl import main as ctl
from relayd.ctl.settings import CtlError, Locations
from relayd.ctl.xcap import (
    WRITE_ATTEMPTS,
    Session,
    XCAPRequestError,
    check_arguments,
    default_xcap_url,
    parse_xcap_document,
    report_of,
    xcap_trust,
)
from relayd.xcap.client import XCAPClient, XCAPResponse
from relayd.xcap.xml import serialize_document

LIST = "sip:friends@relay.example.test"
BOB = "sip:bob@example.test"
_T = TypeVar("_T")


def test_lists_remove_takes_members_or_all() -> None:
    parser = ctl.build_parser()
    check_arguments(parser.parse_args(["lists", "add", "friends", BOB]))
    check_arguments(parser.parse_args(["lists", "remove", "friends", BOB]))
    check_arguments(parser.parse_args(["lists", "remove", "friends", "--all"]))
    for both_or_neither in (["friends"], ["friends", BOB, "--all"]):
        with pytest.raises(CtlError, match="or --all"):
            check_arguments(parser.parse_args(["lists", "remove", *both_or_neither]))


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


class _Server:
    """An XCAP server in memory whose conditional writes are answered 412 ``conflicts``
    times (another writer got in first), then ``status``."""

    root = "/xcap-root"
    username = "alice"
    realm = "relay.example.test"

    def __init__(self, conflicts: int, status: int = 200, get_status: int = 200) -> None:
        self.conflicts = conflicts
        self.status = status
        self.get_status = get_status
        self.requests: list[tuple[str, str | None]] = []
        self.paths: list[str] = []
        self.written: list[bytes] = []
        self.body = serialize_document(ruleset(make_rule("r1", BOB, LIST)))

    async def get(self, path: str) -> XCAPResponse:
        self.requests.append(("GET", None))
        self.paths.append(path)
        etag = Headers({"ETag": [f'"v{len(self.requests)}"']})
        return XCAPResponse(self.get_status, etag, self.body)

    def _write(self, method: str, if_match: str | None) -> XCAPResponse:
        self.requests.append((method, if_match))
        if self.conflicts:
            self.conflicts -= 1
            return XCAPResponse(412, Headers(), b"")
        return XCAPResponse(self.status, Headers({"ETag": ['"new"']}), b"")

    async def put(
        self, path: str, body: bytes, content_type: str, **kw: str | None
    ) -> XCAPResponse:
        self.written.append(body)
        return self._write("PUT", kw.get("if_match"))

    async def delete(self, path: str, if_match: str | None = None) -> XCAPResponse:
        return self._write("DELETE", if_match)


def ruleset(*rules: etree._Element) -> etree._Element:
    root = new_ruleset()
    root.extend(rules)
    return root


def _run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """The result of a coroutine that never waits (the server above answers at once)."""
    outcome: list[_T | Failure] = []
    ensureDeferred(coroutine).addBoth(outcome.append)
    (result,) = outcome
    if isinstance(result, Failure):
        result.raiseException()
    return result


PATH = "/xcap-root/consent-rules/users/sip:alice@relay.example.test/index"
RULESET = "{urn:ietf:params:xml:ns:common-policy}ruleset"


def test_a_write_answered_412_starts_over_from_a_fresh_get() -> None:
    server = _Server(conflicts=1)
    session = Session(cast(XCAPClient, server))
    edited, written = _run(
        session.update(PATH, RULESET, "application/auth-policy+xml", len, new_ruleset)
    )
    assert (edited, written.status) == (1, 200)
    assert server.requests == [("GET", None), ("PUT", '"v1"'), ("GET", None), ("PUT", '"v3"')]


def test_deleting_the_document_starts_over_on_412_too() -> None:
    server = _Server(conflicts=1)
    assert _run(Session(cast(XCAPClient, server)).delete_document(PATH)) == 1
    assert [method for method, _ in server.requests] == ["GET", "DELETE", "GET", "DELETE"]


def test_a_change_gives_up_after_a_bounded_number_of_412s() -> None:
    server = _Server(conflicts=100)
    session = Session(cast(XCAPClient, server))
    with pytest.raises(CtlError, match=f"PUT {PATH}: gave up after {WRITE_ATTEMPTS} "):
        _run(session.revoke_rules(PATH, lambda root: ["r1"], delete_emptied=False))
    assert [method for method, _ in server.requests].count("GET") == WRITE_ATTEMPTS


def test_revoking_a_rule_is_one_conditional_put_of_the_document() -> None:
    server = _Server(conflicts=1)
    server.body = serialize_document(
        ruleset(make_rule("r1", BOB, LIST), make_rule("r2", BOB, LIST))
    )
    session = Session(cast(XCAPClient, server))
    assert _run(session.revoke_rules(PATH, lambda root: ["r1"], delete_emptied=True)) == (
        ["r1"],
        False,
    )
    assert server.requests == [("GET", None), ("PUT", '"v1"'), ("GET", None), ("PUT", '"v3"')]
    assert b'id="r1"' not in server.written[-1] and b'id="r2"' in server.written[-1]


def test_a_permission_document_left_without_rules_is_deleted() -> None:
    server = _Server(conflicts=0)
    session = Session(cast(XCAPClient, server))
    assert _run(session.revoke_rules(PATH, lambda root: ["r1"], delete_emptied=True)) == (
        ["r1"],
        True,
    )
    assert server.requests == [("GET", None), ("DELETE", '"v1"')]
    # index keeps its (empty) ruleset.
    server = _Server(conflicts=0)
    session = Session(cast(XCAPClient, server))
    assert _run(session.revoke_rules(PATH, lambda root: ["r1"], delete_emptied=False)) == (
        ["r1"],
        False,
    )
    assert [method for method, _ in server.requests] == ["GET", "PUT"]


def test_a_document_without_a_matching_rule_is_not_written() -> None:
    server = _Server(conflicts=0)
    session = Session(cast(XCAPClient, server))
    assert _run(session.revoke_rules(PATH, lambda root: [], delete_emptied=True)) == ([], False)
    assert server.requests == [("GET", None)]


DIRECTORY_PATH = (
    "/xcap-root/org.openmobilealliance.xcap-directory/users/sip:alice@relay.example.test"
    "/directory.xml"
)


def test_documents_come_from_the_xcap_directory() -> None:
    server = _Server(conflicts=0)
    server.body = (
        b'<xcap-directory xmlns="urn:oma:xml:xdm:xcap-directory">'
        b'<folder auid="consent-rules">'
        b'<entry uri="/xcap-root/consent-rules/users/sip:alice@relay.example.test/p-abc.xml"'
        b' etag="a"/>'
        b'<entry uri="https://x.test/xcap-root/consent-rules/users/sip:alice@x/index" etag="b"/>'
        b'</folder><folder auid="resource-lists">'
        b'<entry uri="/xcap-root/resource-lists/users/sip:alice@x/index" etag="c"/>'
        b"</folder></xcap-directory>"
    )
    session = Session(cast(XCAPClient, server))
    names = _run(session.documents("consent-rules", "sip:alice@relay.example.test"))
    assert names == ["index", "p-abc.xml"]
    assert server.paths == [DIRECTORY_PATH]


def test_a_server_without_the_directory_has_index_only() -> None:
    server = _Server(conflicts=0, get_status=404)
    session = Session(cast(XCAPClient, server))
    assert _run(session.documents("consent-rules", "sip:alice@relay.example.test")) == ["index"]
    server = _Server(conflicts=0, get_status=403)
    with pytest.raises(XCAPRequestError, match="403"):
        _run(Session(cast(XCAPClient, server)).documents("consent-rules", "sip:a@x"))


def test_any_other_refusal_ends_the_change_at_once() -> None:
    server = _Server(conflicts=0, status=409)
    session = Session(cast(XCAPClient, server))
    with pytest.raises(XCAPRequestError, match="409") as caught:
        _run(session.update(PATH, RULESET, "application/auth-policy+xml", len, None))
    assert caught.value.status == 409 and len(server.requests) == 2


def test_parse_refuses_a_document_of_another_kind() -> None:
    with pytest.raises(CtlError, match="expected"):
        parse_xcap_document(b"<a/>", "{urn:ietf:params:xml:ns:common-policy}ruleset")
    with pytest.raises(CtlError, match="unreadable"):
        parse_xcap_document(b'<!DOCTYPE a [<!ENTITY x "y">]><a/>', "a")


def test_the_relays_list_report_is_read_from_a_write_answer() -> None:
    items = [Unroutable("resource-lists/list[2]", "no name")]
    report = build_list_report(items)
    answer = _response(200, report, "application/vnd.relayd.list-report+xml")
    assert report_of(answer) == (items, 0)
    assert report_of(_response(200)) == ([], 0)
    assert report_of(_response(200, report, "text/plain")) == ([], 0)


def _response(status: int, body: bytes = b"", content_type: str | None = None) -> XCAPResponse:
    headers = Headers()
    if content_type:
        headers.setRawHeaders("Content-Type", [content_type])
    return XCAPResponse(status, headers, body)
