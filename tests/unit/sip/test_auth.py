"""SIP digest (RFC 3261 §22): 401/407 challenges, replay, stale nonces, identities."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from relayd.digest import DigestAuthenticator, answer_challenge, ha1, parse_challenge
from relayd.sip.auth import SIPAuthenticator
from relayd.sip.message import Headers, SIPRequest, SIPStatus
from relayd.sipuri import SIPURI

REALM = "example.com"
PASSWORDS = {"alice": "wonderland"}


def make_auth(clock: Clock) -> SIPAuthenticator:
    def lookup(user: str, realm: str) -> str | None:
        password = PASSWORDS.get(user)
        return ha1(user, realm, password) if password and realm == REALM else None

    digest = DigestAuthenticator(REALM, lookup, clock, nonce_lifetime_seconds=60)
    return SIPAuthenticator(digest, "Example.COM")


def request(method: str = "SUBSCRIBE", uri: str = "sip:list@example.com") -> SIPRequest:
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKa"),
            ("From", "<sip:alice@example.com>;tag=1"),
            ("To", "<sip:list@example.com>"),
            ("Call-ID", "c1"),
            ("CSeq", f"1 {method}"),
        ]
    )
    return SIPRequest(method, SIPURI.parse(uri), headers)


def challenge_of(auth: SIPAuthenticator, req: SIPRequest, proxy: bool) -> SIPStatus:
    with pytest.raises(SIPStatus) as info:
        auth.authenticate(req, proxy=proxy)
    return info.value


def answer(
    req: SIPRequest,
    status: SIPStatus,
    password: str = PASSWORDS["alice"],
    nc: int = 1,
    uri: str = "",
) -> SIPRequest:
    challenge_header, challenge = status.headers[0]
    header = "Proxy-Authorization" if challenge_header == "Proxy-Authenticate" else "Authorization"
    req.headers.set(
        header,
        answer_challenge(
            challenge,
            method=req.method,
            uri=uri or req.uri.format(),
            username="alice",
            password=password,
            nc=nc,
        ).authorization,
    )
    return req


def test_terminated_request_gets_401_www_authenticate() -> None:
    auth = make_auth(Clock())
    status = challenge_of(auth, request(), proxy=False)
    assert status.status == 401
    name, value = status.headers[0]
    assert name == "WWW-Authenticate"
    params = parse_challenge(value)
    assert params["realm"] == REALM and params["qop"] == "auth"


def test_forwarded_request_gets_407_and_uses_proxy_authorization() -> None:
    auth = make_auth(Clock())
    req = request("MESSAGE")
    status = challenge_of(auth, req, proxy=True)
    assert status.status == 407 and status.headers[0][0] == "Proxy-Authenticate"
    answer(req, status)
    identity = auth.authenticate(req, proxy=True)
    assert identity.user == "alice" and identity.aor == "sip:alice@example.com"
    # Authorization (not Proxy-) does not count for a proxy challenge.
    req2 = request("MESSAGE")
    answer(req2, challenge_of(auth, req2, proxy=False))
    assert challenge_of(auth, req2, proxy=True).status == 407


def test_wrong_password_is_challenged_again() -> None:
    auth = make_auth(Clock())
    req = answer(request(), challenge_of(auth, request(), proxy=False), password="nope")
    assert challenge_of(auth, req, proxy=False).status == 401


def test_nonce_count_replay_is_rejected() -> None:
    auth = make_auth(Clock())
    status = challenge_of(auth, request(), proxy=False)
    first = answer(request(), status, nc=1)
    auth.authenticate(first, proxy=False)
    replay = answer(request(), status, nc=1)
    again = challenge_of(auth, replay, proxy=False)
    assert again.status == 401 and "stale" not in again.headers[0][1]
    assert auth.authenticate(answer(request(), status, nc=2), proxy=False).user == "alice"


def test_expired_nonce_gives_stale_true() -> None:
    clock = Clock()
    auth = make_auth(clock)
    status = challenge_of(auth, request(), proxy=False)
    clock.advance(61)
    stale = challenge_of(auth, answer(request(), status), proxy=False)
    assert parse_challenge(stale.headers[0][1]).get("stale") == "true"


def test_digest_uri_must_match_request_uri() -> None:
    auth = make_auth(Clock())
    status = challenge_of(auth, request(), proxy=False)
    mismatch = answer(request(), status, uri="sip:other@example.com")
    assert challenge_of(auth, mismatch, proxy=False).status == 400
    # Equivalent spelling (§19.1.4) is fine.
    equivalent = answer(request(), status, uri="sip:list@EXAMPLE.com")
    assert auth.authenticate(equivalent, proxy=False).user == "alice"


def test_malformed_credentials_are_400_and_other_realms_ignored() -> None:
    auth = make_auth(Clock())
    req = request()
    req.headers.set("Authorization", "Digest username=")
    assert challenge_of(auth, req, proxy=False).status == 400
    other = request()
    other.headers.set(
        "Authorization",
        'Digest username="a", realm="elsewhere", nonce="n", uri="sip:x", '
        'response="00000000000000000000000000000000"',
    )
    assert challenge_of(auth, other, proxy=False).status == 401


def test_user_with_domain_keeps_its_host() -> None:
    auth = make_auth(Clock())
    assert auth.identity_for("bob@Other.example").aor == "sip:bob@other.example"
