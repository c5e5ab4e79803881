"""Calls through the real daemon (``twistd -n msrprelay``) between SIPp peers, over UDP
and over TCP (RFC 3261 §16, Record-Route on).

The callee is a SIPp UAS that runs throughout (``sipp/invite_callee.xml``), registered
by a short UAC run as a list member is in ``test_sipp_consent_flow``; each caller run is
one call (``sipp/invite_cancel.xml``, ``sipp/invite_call.xml``). The scenarios check the
headers (the relay's Record-Route at the callee and in the 200, the CSeq of each
response) and fail on anything unexpected; this test checks what each side logged, in
order, and that every SIPp run exits 0.

A call to a list waits for the callee's consent as a MESSAGE does: 470, the CONSENT
forwarded to the callee with its Permission URI, the callee's grant (an HTTP PUT there),
then the same call goes through.
"""

from __future__ import annotations

import re

import pytest
import pytest_twisted

from relayd.testing import grant_document

from .test_sipp_consent_flow import (  # noqa: F401 - the fixtures
    ALICE,
    HOST,
    SENDER,
    Players,
    Relay,
    SIPp,
    players,
    relay,
    uris,
)

pytestmark = pytest.mark.integration

CALLEE = "bob"
CALLEE_URI = f"sip:{CALLEE}@{HOST}"
CALLEES = f"sip:callees@{HOST}"  # a list of one: bob (test_sipp_consent_flow.LISTS_XML)


def call(cast: Players, name: str, scenario: str, target: str) -> SIPp:
    """alice's ``scenario`` to ``target`` (a user or a list of ours), with credentials."""
    user = target.removeprefix("sip:").partition("@")[0]
    return cast.uac(name, scenario, SENDER, target, "-s", user)


def record_route(daemon: Relay, transport: str) -> str:
    """The relay's Record-Route, as the scenarios log it: the listener of the call's
    transport (caller and callee use the same one here, so there is one)."""
    if transport == "u1":
        return rf"<sip:{re.escape(HOST)}:{daemon.ports['udp']};lr;rr=[\w-]+>"
    return rf"<sip:{re.escape(HOST)}:{daemon.ports['tcp']};transport=tcp;lr;rr=[\w-]+>"


@pytest.mark.parametrize("players", ["u1", "t1"], indirect=True, ids=["udp", "tcp"])
@pytest_twisted.ensureDeferred
async def test_sipp_calls_cancel_and_bye_through_the_relay(
    relay: Relay,  # noqa: F811
    players: Players,  # noqa: F811
) -> None:
    route = record_route(relay, players.transport)
    callee = await players.member(CALLEE, "invite_callee.xml")

    # 1. INVITE, 180, the caller's CANCEL: 200 for it and 487 for the INVITE at the
    #    caller; the relay's own CANCEL at the callee, which answers 487 and gets the ACK.
    ringing, *finals = await call(players, "cancel", "invite_cancel.xml", CALLEE_URI).finished()
    assert ringing == "180" and sorted(finals) == ["200 CANCEL", "487"], (ringing, finals)
    (invite,) = await callee.wait_logged("INVITE cancel ")
    assert re.fullmatch(rf"INVITE cancel {route} ", invite), invite
    await callee.wait_logged("ACK 487")

    # 2. INVITE, 180, 200 with the relay's Record-Route; the ACK and the BYE go along
    #    it to the callee's Contact, and the callee's 200 comes back through the relay.
    answered, ended = await call(players, "call", "invite_call.xml", CALLEE_URI).finished()
    assert re.fullmatch(rf"200 {route}", answered) and ended == "BYE 200", (answered, ended)
    (invite,) = await callee.wait_logged("INVITE answer ")
    assert invite == f"INVITE answer {answered.removeprefix('200 ')} ", invite
    await callee.wait_logged("BYE")

    # 3. The same call through a list: 470 naming bob's consent URI, nothing rings.
    (refused,) = await call(players, "list-1", "invite_call.xml", CALLEES).finished()
    assert refused.startswith("470 "), refused
    (consent,) = uris(refused)
    assert consent.startswith("sip:consent-"), refused

    # 4. alice's CONSENT for INVITE reaches bob with a Permission URI; bob grants there
    #    (a Permission URI speaks for the methods its CONSENT asked for).
    consent_run = players.uac(
        "consent",
        "consent_request.xml",
        SENDER,
        consent,
        *("-key", "consent", consent, "-key", "methods", "INVITE"),
    )
    (accepted,) = await consent_run.finished()
    assert accepted.startswith("202 sip:wp-"), accepted
    (asked,) = await callee.wait_logged("CONSENT ")
    _, methods, permission, _ = asked.split(" ", 3)
    assert methods == "INVITE", asked
    assert permission.startswith(f"https://{HOST}:{relay.ports['ssl']}/"), asked
    assert await relay.xcap.call("PUT", permission, grant_document(ALICE, CALLEES)) == 201

    # 5. The list call goes through: bob's INVITE carries Trigger-Consent (the list).
    answered, ended = await call(players, "list-2", "invite_call.xml", CALLEES).finished()
    assert re.fullmatch(rf"200 {route}", answered) and ended == "BYE 200", (answered, ended)
    _, second = await callee.wait_logged("INVITE answer ", 2)
    assert second.startswith(f"INVITE answer {answered.removeprefix('200 ')} sip:consent-")
    assert second.endswith(f';target-uri="{CALLEES}"'), second

    # 6. The callee stops cleanly (every call passed), having seen exactly these.
    assert [line.split(" ")[0] for line in await callee.stop()] == [
        "INVITE",
        "CANCEL",
        "ACK",
        "INVITE",
        "ACK",
        "BYE",
        "CONSENT",
        "INVITE",
        "ACK",
        "BYE",
    ]
    for player in players.started:
        errors = player.folder / "errors.txt"
        text = errors.read_text(errors="replace") if errors.exists() else ""
        assert "nexpected" not in text, player.report("unexpected message")
