"""``relayctl consent``: reading 470s and NOTIFY bodies, and the command line."""

from __future__ import annotations

import json

import pytest

from relayd.ctl import main as ctl
from relayd.ctl.consent import (
    ConsentState,
    change_lines,
    consent_methods,
    consent_uris,
    status_states,
    verdict,
    wait_uri,
)
from relayd.ctl.settings import CtlError
from relayd.sip.events import ConsentStatusEntry, consent_status_body
from relayd.sip.message import Headers, SIPResponse

C1 = "sip:consent-AAA.mac1@relay.test"
C2 = "sip:consent-BBB.mac2@relay.test"
BOB = "sip:bob@relay.test"
LIST = "sip:friends@relay.test"


def test_consent_uris_from_a_pasted_470() -> None:
    pasted = (
        "SIP/2.0 470 Consent Needed\r\n"
        "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx\r\n"
        f'permission-missing: "{BOB}" <{C1}>, <{C2}>\r\n'
        f"Permission-Missing: <{C1}>\r\n"
        "Content-Type: application/resource-lists+xml\r\n"
    )
    assert consent_uris(pasted) == [C1, C2]
    assert consent_uris(f"{C2}\n\n<{C1}>\n") == [C2, C1]


def test_consent_uris_refuses_bad_or_no_uris() -> None:
    with pytest.raises(CtlError, match="not a consent URI"):
        consent_uris("Permission-Missing: <sip:>")
    with pytest.raises(CtlError, match="no consent URIs"):
        consent_uris("SIP/2.0 470 Consent Needed\nCall-ID: x\n")


def test_consent_methods() -> None:
    assert consent_methods("message, invite,MESSAGE") == "MESSAGE, INVITE"
    for bad in ("", "MESSAGE;x", "a b"):
        with pytest.raises(CtlError, match="--methods"):
            consent_methods(bad)


def _body(*states: str) -> bytes:
    entries = [
        ConsentStatusEntry(f"id{i}", "sip:alice@relay.test", LIST, BOB, ("MESSAGE",), s, 0.0)
        for i, s in enumerate(states)
    ]
    return consent_status_body("wait-permission", 3, entries)


def test_status_states_reads_what_the_relay_writes() -> None:
    assert status_states(_body("pending")) == [ConsentState(BOB, LIST, "MESSAGE", "pending")]
    assert status_states(_body()) == []
    with pytest.raises(CtlError, match="not a consent-status"):
        status_states(b"<other/>")
    with pytest.raises(CtlError, match="unreadable"):
        status_states(b"<consent-status")
    with pytest.raises(CtlError, match="over"):
        status_states(b" " * 70000)


def test_verdict() -> None:
    pending, granted = (ConsentState(BOB, LIST, "MESSAGE", s) for s in ("pending", "granted"))
    assert verdict([[granted], [granted]]) is True
    assert verdict([[granted], None]) is None
    assert verdict([[granted], [pending]]) is None
    assert verdict([[pending], []]) is False  # the record is gone
    for bad in ("denied", "expired", "revoked"):
        assert verdict([None, [ConsentState(BOB, LIST, "MESSAGE", bad)]]) is False


def test_state_line_and_json() -> None:
    state = ConsentState(BOB, LIST, "MESSAGE INVITE", "granted")
    assert state.line("sip:wp-1@relay.test") == (
        f"{BOB}: granted (MESSAGE INVITE via {LIST}) [sip:wp-1@relay.test]"
    )
    assert state.as_json("w")["methods"] == ["MESSAGE", "INVITE"]


def test_change_lines_print_only_changes() -> None:
    pending, granted = (ConsentState(BOB, LIST, "MESSAGE", s) for s in ("pending", "granted"))
    assert change_lines("w", None, [pending], False) == [f"{BOB}: pending (MESSAGE via {LIST}) [w]"]
    assert change_lines("w", [pending], [pending], False) == []
    assert [json.loads(x)["state"] for x in change_lines("w", [pending], [granted], True)] == [
        "granted"
    ]
    assert change_lines("w", [granted], [], False) == ["w: no such consent (gone)"]
    assert json.loads(change_lines("w", [granted], [], True)[0]) == {"watch": "w", "state": "gone"}


def _response(status: int, *headers: tuple[str, str]) -> SIPResponse:
    return SIPResponse(status, "X", Headers(headers))


def test_wait_uri_takes_the_wait_permission_call_info() -> None:
    info = (
        "Call-Info",
        "<http://x.test/a>;purpose=info, <sip:wp-1@relay.test>;purpose=wait-permission",
    )
    assert wait_uri(_response(202, info)) == "sip:wp-1@relay.test"
    assert wait_uri(_response(202)) is None


def test_consent_parser() -> None:
    args = ctl.build_parser().parse_args(
        ["consent", "request", "--relay", "127.0.0.1:5070", "--from-470", "-", "--user", "a"]
    )
    assert (args.action, args.from_470, args.methods, args.uri) == ("request", "-", "MESSAGE", [])
    args = ctl.build_parser().parse_args(
        ["consent", "watch", "--relay", "r", "--json", "sip:wp-1@r"]
    )
    assert (args.action, args.uri, args.json, args.timeout) == (
        "watch",
        ["sip:wp-1@r"],
        True,
        600.0,
    )
    with pytest.raises(SystemExit):
        ctl.build_parser().parse_args(["consent", "watch", "sip:wp-1@r"])  # no --relay
