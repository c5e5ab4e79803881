"""relayd.testing's client helpers: requests the relay accepts, challenges answered."""

from __future__ import annotations

from twisted.internet.task import Clock

from relayd.digest import DigestAuthenticator, ha1
from relayd.sip.auth import SIPAuthenticator
from relayd.sip.message import SIPRequest, make_response
from relayd.sip.parser import parse_datagram
from relayd.testing import sip_credentials, uac_request

REALM = "relay.test"


def _request(authorization: tuple[str, str] | None = None) -> tuple[str, SIPRequest]:
    return uac_request(
        "MESSAGE",
        "sip:list@relay.test",
        via="SIP/2.0/UDP 127.0.0.1:5062",
        aor="sip:alice@relay.test",
        from_tag="f1",
        to=None,
        call_id="c1",
        cseq=7,
        contact="<sip:alice@127.0.0.1:5062>",
        headers=[("Content-Type", "text/plain")],
        authorization=authorization,
        body=b"hi",
    )


def test_the_request_is_well_formed_and_carries_its_branch() -> None:
    branch, request = _request()
    parsed = parse_datagram(request.to_bytes())
    assert parsed.via.branch == branch and branch.startswith("z9hG4bK")
    assert parsed.headers.get("to") == "<sip:list@relay.test>"
    assert parsed.headers.get("cseq") == "7 MESSAGE" and parsed.body == b"hi"


def test_a_407_is_answered_with_credentials_the_relay_accepts() -> None:
    digest = DigestAuthenticator(
        REALM, lambda user, realm: ha1(user, realm, "pw") if user == "alice" else None, Clock()
    )
    relay = SIPAuthenticator(digest, "relay.test")
    _, first = _request()
    challenge = relay.challenge(proxy=True)
    response = make_response(first, challenge.status, headers=challenge.headers)
    answer = sip_credentials(
        response, method="MESSAGE", uri="sip:list@relay.test", username="alice", password="pw"
    )
    assert answer is not None and answer[0] == "Proxy-Authorization"
    _, second = _request(answer)
    assert relay.authenticate(second, proxy=True).aor == "sip:alice@relay.test"
    ok = make_response(second, 200)
    assert sip_credentials(ok, method="MESSAGE", uri="x", username="alice", password="pw") is None
