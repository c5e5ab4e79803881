"""Tests for relayd.msrp.relay: AUTH answers and the open-relay rules, without sockets."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatch

import pytest
from twisted.internet.task import Clock

from relayd.digest import (
    Challenge,
    DigestAuthenticator,
    answer_challenge,
    ha1,
    parse_auth_info,
    parse_challenge,
    read_challenge,
)
from relayd.msrp.message import Headers, MSRPRequest, MSRPResponse, MSRPStatus
from relayd.msrp.relay import AuthOutcome, AuthPolicy, RelayCore, Route, response_route
from relayd.msrp.sessions import Session
from relayd.msrp.uri import MSRPURI
from relayd.testing import captured_log

HOST = "relay.example.com"
REALM = "example"
RELAY_URI = "msrps://relay.example.com:2855;tcp"
ALICE_URI = "msrps://alice.example.org:40001/a1;tcp"
BOB_URI = "msrps://bob.example.org:40002/b2;tcp"
PEER_RELAY_URI = "msrps://relay1.example.net:2855/r1;tcp"
USERS = {"alice": "wonderland", "bob": "builder", "mallory": "evil"}
NONCE_LIFETIME_SECONDS = 300


@dataclass
class FakeHop:
    """The connection a request arrived on, as RelayCore sees it."""

    is_tls: bool = True
    peer_names: frozenset[str] = frozenset()
    peer: str = "192.0.2.7:40000"
    #: Names the certificate would match; defaults to peer_names.
    matches: Iterable[str] | None = None
    asked: list[str] = field(default_factory=list)

    def certificate_matches(self, host: str) -> bool:
        self.asked.append(host)
        names = self.peer_names if self.matches is None else self.matches
        return host.lower() in names


class IPAwareHop(FakeHop):
    """Matches like relayd.net.tls.peer_certificate_matches: IP literals by address."""

    def certificate_matches(self, host: str) -> bool:
        self.asked.append(host)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return any(fnmatch(host.lower(), name) for name in self.peer_names)
        return any(_same_ip(address, name) for name in self.peer_names)


def _same_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address, name: str) -> bool:
    try:
        return ipaddress.ip_address(name) == address
    except ValueError:
        return False


def client_hop() -> FakeHop:
    return FakeHop(is_tls=True)


def relay_hop(*names: str) -> FakeHop:
    return FakeHop(is_tls=True, peer_names=frozenset(names))


def _lookup(user: str, realm: str) -> str | None:
    password = USERS.get(user)
    if password is None or realm != REALM:
        return None
    return ha1(user, realm, password)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_000_000)
    return clock


def make_core(
    clock: Clock,
    allowed: frozenset[str] = frozenset({"alice", "bob"}),
    pool_names: Iterable[str] = (),
) -> RelayCore:
    policy = AuthPolicy(
        realm=REALM,
        expires_seconds=1800,
        expires_min_seconds=60,
        expires_max_seconds=86400,
        allowed_users=allowed,
    )
    digest = DigestAuthenticator(
        REALM, _lookup, clock, nonce_lifetime_seconds=NONCE_LIFETIME_SECONDS
    )
    core = RelayCore(clock, "Relay.Example.COM", policy, digest, pool_names=pool_names)
    core.add_local_address(2855, tls=True)
    return core


@pytest.fixture
def core(clock: Clock) -> RelayCore:
    return make_core(clock)


def request(
    method: str,
    to_path: str,
    from_path: str,
    extra: Iterable[tuple[str, str]] = (),
    tid: str = "tid0001",
) -> MSRPRequest:
    return MSRPRequest(
        tid, method, Headers([("To-Path", to_path), ("From-Path", from_path), *extra])
    )


def authorization(
    challenge: str,
    user: str,
    password: str,
    uri: str = RELAY_URI,
    *,
    nonce: str | None = None,
    nc: str = "00000001",
    cnonce: str = "0a4f113b",
    realm: str = REALM,
) -> str:
    kept = Challenge(realm, nonce if nonce is not None else read_challenge(challenge).nonce)
    answer = answer_challenge(
        kept,
        username=user,
        password=password,
        method="AUTH",
        uri=uri,
        cnonce=cnonce,
        nc=int(nc, 16),
    )
    return answer.authorization


def challenge_for(core: RelayCore, hop: FakeHop, owner: object, from_path: str = ALICE_URI) -> str:
    outcome = core.handle_auth(request("AUTH", RELAY_URI, from_path), hop, owner)
    assert outcome.response.code == 401
    value = outcome.response.headers.get("WWW-Authenticate")
    assert value is not None
    return value


def auth(
    core: RelayCore,
    hop: FakeHop,
    owner: object,
    user: str = "alice",
    password: str | None = None,
    from_path: str = ALICE_URI,
    extra: Iterable[tuple[str, str]] = (),
    **digest_args: str,
) -> AuthOutcome:
    challenge = challenge_for(core, hop, owner, from_path)
    header = authorization(challenge, user, password or USERS[user], **digest_args)
    return core.handle_auth(
        request("AUTH", RELAY_URI, from_path, [("Authorization", header), *extra]), hop, owner
    )


def header(response: MSRPResponse, name: str) -> str:
    value = response.headers.get(name)
    assert value is not None, f"{name} missing from {response.headers!r}"
    return value


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def route(core: RelayCore, to_path: str, from_path: str, hop: FakeHop, connection: object) -> Route:
    return core.route(request("SEND", to_path, from_path), hop, connection)


def refused(
    core: RelayCore, to_path: str, from_path: str, hop: FakeHop, connection: object
) -> MSRPStatus:
    with pytest.raises(MSRPStatus) as info:
        route(core, to_path, from_path, hop, connection)
    return info.value


# -- identity ------------------------------------------------------------------------


def test_local_addresses(core: RelayCore) -> None:
    assert core.hostname == "relay.example.com"
    assert core.use_path_port == 2855
    assert core.is_local(MSRPURI.parse("msrps://relay.example.com:2855;tcp"))
    assert core.is_local(MSRPURI.parse("msrps://RELAY.example.com;tcp"))  # default port 2855
    assert not core.is_local(MSRPURI.parse("msrps://relay.example.com:2856;tcp"))
    assert not core.is_local(MSRPURI.parse("msrps://other.example.com:2855;tcp"))


def test_add_local_address_records_specific_interfaces(core: RelayCore) -> None:
    core.add_local_address(2856, tls=False, host="127.0.0.1")
    core.add_local_address(2857, tls=True, host="0.0.0.0")  # noqa: S104
    assert core.use_path_port == 2855  # the first TLS port stays the Use-Path port
    assert core.is_local(MSRPURI.parse("msrp://127.0.0.1:2856;tcp"))
    assert not core.is_local(MSRPURI.parse("msrps://0.0.0.0:2857;tcp"))


def test_session_uri_brackets_ipv6_hostnames(clock: Clock) -> None:
    policy = AuthPolicy(REALM, 1800, 60, 86400)
    core = RelayCore(clock, "::1", policy, DigestAuthenticator(REALM, _lookup, clock))
    core.add_local_address(4000, tls=True)
    session = core.sessions.create_for_client(object(), MSRPURI.parse(ALICE_URI), "alice", 60)
    uri = core.session_uri(session)
    assert uri == f"msrps://[::1]:4000/{session.session_id};tcp"
    assert core.is_local(MSRPURI.parse(uri))


def test_is_local_auth(core: RelayCore) -> None:
    assert core.is_local_auth(request("AUTH", RELAY_URI, ALICE_URI))
    assert not core.is_local_auth(request("AUTH", f"{RELAY_URI} {BOB_URI}", ALICE_URI))
    assert not core.is_local_auth(request("SEND", RELAY_URI, ALICE_URI))


# -- AUTH ------------------------------------------------------------------------------


def test_auth_without_authorization_is_challenged(core: RelayCore) -> None:
    outcome = core.handle_auth(
        request("AUTH", RELAY_URI, f"{ALICE_URI} msrps://x.example.org;tcp"), client_hop(), object()
    )
    assert outcome.failed is False
    assert outcome.session is None
    response = outcome.response
    assert (response.tid, response.code, response.comment) == ("tid0001", 401, "Unauthorized")
    # AUTH responses travel the whole From-Path back.
    assert header(response, "To-Path") == f"{ALICE_URI} msrps://x.example.org;tcp"
    assert header(response, "From-Path") == RELAY_URI
    challenge = header(response, "WWW-Authenticate")
    assert challenge.startswith(f'Digest realm="{REALM}", nonce="')
    # An opaque, because the Blink client stack (msrplib) cannot do without one.
    assert challenge.endswith('", qop="auth", opaque="msrp"')
    assert "domain" not in challenge.lower()
    assert "stale" not in challenge.lower()
    params = parse_challenge(challenge)
    assert set(params) == {"realm", "nonce", "qop", "opaque"}
    assert len(params["nonce"]) >= 22
    assert len(core.sessions) == 0


def test_each_challenge_has_a_fresh_nonce(core: RelayCore) -> None:
    nonces = {
        parse_challenge(challenge_for(core, client_hop(), object()))["nonce"] for _ in range(5)
    }
    assert len(nonces) == 5


def test_auth_with_correct_credentials(core: RelayCore, clock: Clock) -> None:
    owner = object()
    hop = client_hop()
    challenge = challenge_for(core, hop, owner)
    nonce = parse_challenge(challenge)["nonce"]
    credentials = authorization(challenge, "alice", "wonderland", cnonce="c0ffee", nc="00000001")
    outcome = core.handle_auth(
        request("AUTH", RELAY_URI, ALICE_URI, [("Authorization", credentials)]), hop, owner
    )
    response = outcome.response
    assert (response.code, response.comment) == (200, "OK")
    assert outcome.failed is False
    assert header(response, "To-Path") == ALICE_URI
    assert header(response, "From-Path") == RELAY_URI

    use_path = MSRPURI.parse(header(response, "Use-Path"))
    assert use_path.scheme == "msrps"
    assert use_path.host == "relay.example.com"
    assert use_path.port == 2855
    assert use_path.transport == "tcp"
    assert use_path.session_id is not None
    assert len(use_path.session_id) >= 22
    assert (
        header(response, "Use-Path") == f"msrps://relay.example.com:2855/{use_path.session_id};tcp"
    )
    assert header(response, "Expires") == "1800"

    session = outcome.session
    assert session is not None
    assert session.session_id == use_path.session_id
    assert session.user == "alice"
    assert session.owner_connection is owner
    assert session.owner_relay is None
    # The From-Path URI of the AUTH: the one next hop towards alice (§6.4).
    assert session.owner_uri == MSRPURI.parse(ALICE_URI)
    assert session.expires_at == clock.seconds() + 1800
    assert core.sessions.lookup(session.session_id) is session

    info = parse_auth_info(header(response, "Authentication-Info"))
    assert set(info) == {"nextnonce", "rspauth", "cnonce", "nc", "qop"}
    assert (info["cnonce"], info["nc"], info["qop"]) == ("c0ffee", "00000001", "auth")
    ha1_hex = _md5(f"alice:{REALM}:wonderland")
    rspauth = _md5(f"{ha1_hex}:{nonce}:00000001:c0ffee:auth:{_md5(':' + RELAY_URI)}")
    assert info["rspauth"] == rspauth
    assert info["nextnonce"] != nonce


def test_auth_refresh_with_nextnonce_skips_the_challenge(core: RelayCore) -> None:
    owner = object()
    first = auth(core, client_hop(), owner)
    nextnonce = parse_auth_info(header(first.response, "Authentication-Info"))["nextnonce"]
    credentials = authorization("", "alice", "wonderland", nonce=nextnonce)
    again = core.handle_auth(
        request("AUTH", RELAY_URI, ALICE_URI, [("Authorization", credentials)]), client_hop(), owner
    )
    assert again.response.code == 200
    assert again.session is not None and first.session is not None
    assert again.session.session_id != first.session.session_id


def test_auth_replayed_nonce_count_is_refused(core: RelayCore) -> None:
    owner = object()
    challenge = challenge_for(core, client_hop(), owner)
    credentials = authorization(challenge, "alice", "wonderland")
    message = request("AUTH", RELAY_URI, ALICE_URI, [("Authorization", credentials)])
    assert core.handle_auth(message, client_hop(), owner).response.code == 200
    replay = core.handle_auth(message, client_hop(), owner)
    assert replay.response.code == 401
    assert replay.failed is True


def test_auth_stale_nonce_is_not_a_failure(core: RelayCore, clock: Clock) -> None:
    owner = object()
    challenge = challenge_for(core, client_hop(), owner)
    clock.advance(NONCE_LIFETIME_SECONDS + 1)
    credentials = authorization(challenge, "alice", "wonderland")
    outcome = core.handle_auth(
        request("AUTH", RELAY_URI, ALICE_URI, [("Authorization", credentials)]), client_hop(), owner
    )
    assert outcome.response.code == 401
    assert outcome.failed is False
    assert outcome.session is None
    fresh = header(outcome.response, "WWW-Authenticate")
    assert parse_challenge(fresh)["stale"] == "true"
    assert parse_challenge(fresh)["nonce"] != parse_challenge(challenge)["nonce"]


def test_auth_wrong_password(core: RelayCore) -> None:
    outcome = auth(core, client_hop(), object(), "alice", password="not-the-password")
    assert outcome.response.code == 401
    assert outcome.failed is True
    assert outcome.session is None
    assert "stale" not in header(outcome.response, "WWW-Authenticate")
    assert len(core.sessions) == 0


def test_auth_unknown_user(core: RelayCore) -> None:
    outcome = auth(core, client_hop(), object(), "trudy", password="x")
    assert (outcome.response.code, outcome.failed) == (401, True)


@pytest.mark.parametrize(
    "uri",
    [
        "msrps://relay.example.com:2856;tcp",
        "msrps://relay.example.com;tcp",
        "msrps://other.example.com:2855;tcp",
        "/not/an/msrp/uri",
    ],
)
def test_auth_wrong_digest_uri(core: RelayCore, uri: str) -> None:
    outcome = auth(core, client_hop(), object(), uri=uri)
    assert (outcome.response.code, outcome.failed) == (401, True)
    assert outcome.session is None


def test_auth_digest_uri_compared_as_msrp_uri(core: RelayCore) -> None:
    outcome = auth(core, client_hop(), object(), uri="MSRPS://RELAY.EXAMPLE.COM:2855;TCP")
    assert outcome.response.code == 200


def _without_uri(header_value: str) -> str:
    return ", ".join(p for p in header_value.split(", ") if not p.startswith("uri="))


@pytest.mark.parametrize("to_path", [RELAY_URI, "msrps://alice@RELAY.example.com:2855;tcp"])
def test_auth_without_digest_uri_uses_the_to_path_uri(core: RelayCore, to_path: str) -> None:
    # RFC 4976 §5.1's example and Blink-style clients send no uri=: the
    # digest-uri is then the To-Path URI exactly as the AUTH spells it.
    hop, owner = client_hop(), object()
    challenge = challenge_for(core, hop, owner)
    nonce = parse_challenge(challenge)["nonce"]
    credentials = _without_uri(authorization(challenge, "alice", "wonderland", uri=to_path))
    assert "uri=" not in credentials
    outcome = core.handle_auth(
        request("AUTH", to_path, ALICE_URI, [("Authorization", credentials)]), hop, owner
    )
    assert outcome.response.code == 200
    assert outcome.session is not None
    # rspauth is over the same digest-uri: the client can check it.
    info = parse_auth_info(header(outcome.response, "Authentication-Info"))
    ha1_hex = _md5(f"alice:{REALM}:wonderland")
    ha2 = _md5(":" + to_path)
    assert info["rspauth"] == _md5(f"{ha1_hex}:{nonce}:00000001:0a4f113b:auth:{ha2}")


def test_auth_without_digest_uri_but_digest_over_another_uri_fails(core: RelayCore) -> None:
    hop, owner = client_hop(), object()
    challenge = challenge_for(core, hop, owner)
    other = "msrps://relay.example.com:2856;tcp"
    credentials = _without_uri(authorization(challenge, "alice", "wonderland", uri=other))
    outcome = core.handle_auth(
        request("AUTH", RELAY_URI, ALICE_URI, [("Authorization", credentials)]), hop, owner
    )
    assert (outcome.response.code, outcome.failed) == (401, True)


@pytest.mark.parametrize(
    ("user", "shown"),
    [
        ("alice", "alice"),
        # Line breaks of every kind come out escaped (relayd.logs): no forged line.
        ("eve\u2028AUTH accepted for root", "eve\\u2028AUTH accepted for root"),
        ("eve\x85root", "eve\\x85root"),
    ],
)
def test_failed_auth_logs_user_and_peer_escaped_never_the_secrets(
    core: RelayCore, user: str, shown: str
) -> None:
    hop = client_hop()
    challenge = challenge_for(core, hop, object())
    credentials = authorization(challenge, "alice", "not-her-password").replace(
        'username="alice"', f'username="{user}"'
    )
    response = credentials.split('response="')[1][:32]
    with captured_log() as events:
        outcome = core.handle_auth(
            request("AUTH", RELAY_URI, ALICE_URI, [("Authorization", credentials)]), hop, object()
        )
    assert outcome.response.code == 401
    (event,) = [e for e in events if e.get("log_format", "").startswith("AUTH from")]
    text = event["log_format"].format(**event)
    assert text == (
        f"AUTH from 192.0.2.7:40000 failed for user {shown}: invalid username or password"
    )
    assert response not in repr(event)
    assert "not-her-password" not in repr(event)
    assert parse_challenge(challenge)["nonce"] not in repr(event)


def test_auth_of_a_user_not_allowed_logs_user_and_peer(core: RelayCore) -> None:
    with captured_log() as events:
        outcome = auth(core, client_hop(), object(), "mallory")
    assert outcome.response.code == 403
    texts = [e["log_format"].format(**e) for e in events if "log_format" in e]
    assert (
        "AUTH from 192.0.2.7:40000 refused for user mallory: user not allowed to use this relay"
        in texts
    )


def test_auth_wrong_realm(core: RelayCore) -> None:
    outcome = auth(core, client_hop(), object(), realm="elsewhere")
    assert (outcome.response.code, outcome.failed) == (401, True)


def test_auth_garbage_authorization(core: RelayCore) -> None:
    outcome = core.handle_auth(
        request("AUTH", RELAY_URI, ALICE_URI, [("Authorization", "Basic YWxpY2U6eA==")]),
        client_hop(),
        object(),
    )
    assert (outcome.response.code, outcome.failed) == (401, True)


def test_auth_user_not_allowed(core: RelayCore) -> None:
    outcome = auth(core, client_hop(), object(), "mallory")
    assert outcome.response.code == 403
    assert outcome.failed is True
    assert outcome.session is None
    assert header(outcome.response, "To-Path") == ALICE_URI


def test_auth_every_user_allowed_when_list_empty(clock: Clock) -> None:
    core = make_core(clock, allowed=frozenset())
    assert auth(core, client_hop(), object(), "mallory").response.code == 200


def test_auth_expires_within_bounds(core: RelayCore, clock: Clock) -> None:
    outcome = auth(core, client_hop(), object(), extra=[("Expires", "600")])
    assert outcome.response.code == 200
    assert header(outcome.response, "Expires") == "600"
    assert outcome.session is not None
    assert outcome.session.expires_at == clock.seconds() + 600


@pytest.mark.parametrize("value", ["60", "86400"])
def test_auth_expires_at_the_bounds(core: RelayCore, value: str) -> None:
    outcome = auth(core, client_hop(), object(), extra=[("Expires", value)])
    assert outcome.response.code == 200
    assert header(outcome.response, "Expires") == value


def test_auth_expires_below_minimum(core: RelayCore) -> None:
    outcome = auth(core, client_hop(), object(), extra=[("Expires", "59")])
    assert outcome.response.code == 423
    assert outcome.response.comment == "Interval Out-of-Bounds"
    assert header(outcome.response, "Min-Expires") == "60"
    assert outcome.response.headers.get("Max-Expires") is None
    assert outcome.session is None
    assert len(outcome.response.headers) == 3
    # Right credentials, wrong interval: not a failed attempt (nothing counts).
    assert outcome.failed is False


def test_auth_expires_above_maximum(core: RelayCore) -> None:
    outcome = auth(core, client_hop(), object(), extra=[("Expires", "86401")])
    assert outcome.response.code == 423
    assert outcome.failed is False
    assert header(outcome.response, "Max-Expires") == "86400"
    assert outcome.response.headers.get("Min-Expires") is None
    assert len(core.sessions) == 0


@pytest.mark.parametrize("value", ["soon", "-5", "1.5", "99999999999", ""])
def test_auth_malformed_expires(core: RelayCore, value: str) -> None:
    with pytest.raises(MSRPStatus) as info:
        auth(core, client_hop(), object(), extra=[("Expires", value)])
    assert info.value.code == 400
    assert len(core.sessions) == 0


def test_auth_over_plain_tcp_is_forbidden(core: RelayCore) -> None:
    hop = FakeHop(is_tls=False)
    outcome = core.handle_auth(request("AUTH", RELAY_URI, ALICE_URI), hop, object())
    assert outcome.response.code == 403
    assert outcome.failed is True
    assert outcome.response.headers.get("WWW-Authenticate") is None


def test_auth_not_addressed_to_us_closes(core: RelayCore) -> None:
    with pytest.raises(MSRPStatus) as info:
        core.handle_auth(
            request("AUTH", "msrps://elsewhere.example.com:2855;tcp", ALICE_URI),
            client_hop(),
            object(),
        )
    assert info.value.code == 403
    assert info.value.close is True


def test_auth_bad_path_is_400(core: RelayCore) -> None:
    with pytest.raises(MSRPStatus) as info:
        core.handle_auth(request("AUTH", RELAY_URI, "not a uri"), client_hop(), object())
    assert info.value.code == 400


def test_auth_from_relay_with_mismatching_certificate(core: RelayCore) -> None:
    hop = relay_hop("relay2.example.net")
    from_path = f"{PEER_RELAY_URI} {ALICE_URI}"
    outcome = core.handle_auth(request("AUTH", RELAY_URI, from_path), hop, object())
    assert outcome.response.code == 403
    assert outcome.failed is True
    assert hop.asked == ["relay1.example.net"]
    assert header(outcome.response, "To-Path") == from_path


def test_auth_from_matching_relay_gives_relay_session(core: RelayCore) -> None:
    hop = relay_hop("relay1.example.net")
    connection = object()
    from_path = f"{PEER_RELAY_URI} {ALICE_URI}"
    outcome = auth(core, hop, connection, from_path=from_path)
    assert outcome.response.code == 200
    assert header(outcome.response, "To-Path") == from_path
    session = outcome.session
    assert session is not None
    assert session.owner_relay == "relay1.example.net"
    assert session.owner_uri == MSRPURI.parse(PEER_RELAY_URI)
    assert session.owner_connection is None
    # Bound to the relay, not to this connection: it survives the connection.
    assert core.sessions.drop_connection(connection) == 0
    assert core.sessions.lookup(session.session_id) is session


def test_auth_from_relay_whose_certificate_matches_nothing(core: RelayCore) -> None:
    hop = FakeHop(is_tls=True, peer_names=frozenset({"relay1.example.net"}), matches=())
    outcome = core.handle_auth(
        request("AUTH", RELAY_URI, f"{PEER_RELAY_URI} {ALICE_URI}"), hop, object()
    )
    assert outcome.response.code == 403


def test_auth_from_ipv6_relay(core: RelayCore) -> None:
    hop = IPAwareHop(is_tls=True, peer_names=frozenset({"::1"}))
    connection = object()
    outcome = auth(core, hop, connection, from_path=f"msrps://[::1]:2855/r1;tcp {ALICE_URI}")
    assert outcome.response.code == 200
    assert outcome.session is not None
    route = core.route(
        request(
            "SEND", f"{core.session_uri(outcome.session)} {BOB_URI}", "msrps://[::1]:2855/r1;tcp"
        ),
        hop,
        connection,
    )
    assert route.connection is None


def test_ipv6_relay_session_towards_its_owner(core: RelayCore) -> None:
    hop = IPAwareHop(is_tls=True, peer_names=frozenset({"::1"}))
    outcome = auth(core, hop, object(), from_path=f"msrps://[::1]:2855/r1;tcp {ALICE_URI}")
    assert outcome.session is not None
    r = core.session_uri(outcome.session)
    towards = route(core, f"{r} msrps://[::1]:2855/r1;tcp", BOB_URI, client_hop(), object())
    assert towards.connection is None
    assert towards.next_uri == MSRPURI.parse("msrps://[::1]:2855/r1;tcp")
    status = refused(core, f"{r} msrps://[::2]:2855/r1;tcp", BOB_URI, client_hop(), object())
    assert status.code == 403


def test_wildcard_relay_is_not_owner_of_another_domain(core: RelayCore) -> None:
    session = core.sessions.create_for_relay(MSRPURI.parse(PEER_RELAY_URI), "alice", 600)
    hop = IPAwareHop(is_tls=True, peer_names=frozenset({"*.example.org"}))
    r = core.session_uri(session)
    status = refused(core, f"{r} {BOB_URI}", PEER_RELAY_URI, hop, object())
    assert status.code == 403


def test_relay_with_wildcard_certificate_owns_its_session(core: RelayCore) -> None:
    hop = IPAwareHop(is_tls=True, peer_names=frozenset({"*.example.net"}))
    connection = object()
    outcome = auth(core, hop, connection, from_path=f"{PEER_RELAY_URI} {ALICE_URI}")
    assert outcome.response.code == 200
    assert outcome.session is not None
    route = core.route(
        request("SEND", f"{core.session_uri(outcome.session)} {BOB_URI}", PEER_RELAY_URI),
        hop,
        connection,
    )
    assert route.connection is None


# -- routing -----------------------------------------------------------------------------


@dataclass
class Clients:
    core: RelayCore
    alice_connection: object = field(default_factory=object)
    bob_connection: object = field(default_factory=object)

    def __post_init__(self) -> None:
        sessions = self.core.sessions
        self.alice = sessions.create_for_client(
            self.alice_connection, MSRPURI.parse(ALICE_URI), "alice", 600
        )
        self.bob = sessions.create_for_client(
            self.bob_connection, MSRPURI.parse(BOB_URI), "bob", 600
        )

    def uri(self, session: Session) -> str:
        return self.core.session_uri(session)


@pytest.fixture
def clients(core: RelayCore) -> Clients:
    return Clients(core)


def test_owner_sends_out(clients: Clients) -> None:
    core = clients.core
    a = clients.uri(clients.alice)
    result = route(core, f"{a} {BOB_URI}", ALICE_URI, client_hop(), clients.alice_connection)
    assert result == Route(
        to_path=BOB_URI,
        from_path=f"{a} {ALICE_URI}",
        local_uri=a,
        next_uri=MSRPURI.parse(BOB_URI),
        connection=None,
        session=clients.alice,
    )


def test_owner_sends_out_through_further_relays(clients: Clients) -> None:
    core = clients.core
    a = clients.uri(clients.alice)
    far = f"{PEER_RELAY_URI} {BOB_URI}"
    result = route(core, f"{a} {far}", ALICE_URI, client_hop(), clients.alice_connection)
    assert result.to_path == far
    assert result.next_uri == MSRPURI.parse(PEER_RELAY_URI)
    assert result.connection is None


def test_stranger_sends_to_a_client_session(clients: Clients) -> None:
    core = clients.core
    a = clients.uri(clients.alice)
    stranger = object()
    from_path = f"{PEER_RELAY_URI} {BOB_URI}"
    result = route(core, f"{a} {ALICE_URI}", from_path, relay_hop("relay1.example.net"), stranger)
    assert result.connection is clients.alice_connection
    assert result.session is clients.alice
    assert result.to_path == ALICE_URI
    assert result.from_path == f"{a} {from_path}"
    assert result.local_uri == a
    assert result.next_uri == MSRPURI.parse(ALICE_URI)


def test_other_client_sends_to_a_client_session(clients: Clients) -> None:
    core = clients.core
    a = clients.uri(clients.alice)
    result = route(core, f"{a} {ALICE_URI}", BOB_URI, client_hop(), clients.bob_connection)
    assert result.connection is clients.alice_connection


def test_two_local_sessions_from_the_owner_of_the_first(clients: Clients) -> None:
    core = clients.core
    a, b = clients.uri(clients.alice), clients.uri(clients.bob)
    result = route(core, f"{a} {b} {BOB_URI}", ALICE_URI, client_hop(), clients.alice_connection)
    assert result.connection is clients.bob_connection
    assert result.session is clients.bob
    assert result.to_path == BOB_URI
    assert result.from_path == f"{b} {a} {ALICE_URI}"
    assert result.local_uri == a
    assert result.next_uri == MSRPURI.parse(BOB_URI)


def test_stranger_through_two_local_sessions_is_forbidden(clients: Clients) -> None:
    core = clients.core
    a, b = clients.uri(clients.alice), clients.uri(clients.bob)
    status = refused(core, f"{a} {b} {BOB_URI}", ALICE_URI, client_hop(), object())
    assert status.code == 403
    # Not even the owner of the *second* session may enter through the first.
    status = refused(core, f"{a} {b} {BOB_URI}", BOB_URI, client_hop(), clients.bob_connection)
    assert status.code == 403


def test_three_local_uris_are_forbidden(clients: Clients) -> None:
    core = clients.core
    a, b = clients.uri(clients.alice), clients.uri(clients.bob)
    status = refused(
        core, f"{a} {b} {a} {BOB_URI}", ALICE_URI, client_hop(), clients.alice_connection
    )
    assert status.code == 403
    assert status.close is False


def test_unknown_session_is_481(clients: Clients) -> None:
    status = refused(
        clients.core,
        f"msrps://relay.example.com:2855/doesnotexist;tcp {BOB_URI}",
        ALICE_URI,
        client_hop(),
        clients.alice_connection,
    )
    assert status.code == 481


def test_local_uri_without_session_is_481(clients: Clients) -> None:
    status = refused(
        clients.core, f"{RELAY_URI} {BOB_URI}", ALICE_URI, client_hop(), clients.alice_connection
    )
    assert status.code == 481


def test_second_local_session_unknown_is_481(clients: Clients) -> None:
    a = clients.uri(clients.alice)
    status = refused(
        clients.core,
        f"{a} msrps://relay.example.com:2855/gone;tcp {BOB_URI}",
        ALICE_URI,
        client_hop(),
        clients.alice_connection,
    )
    assert status.code == 481


def test_expired_session_is_481(clients: Clients, clock: Clock) -> None:
    a = clients.uri(clients.alice)
    clock.advance(600)
    status = refused(
        clients.core, f"{a} {BOB_URI}", ALICE_URI, client_hop(), clients.alice_connection
    )
    assert status.code == 481


def test_session_of_closed_connection_is_481(clients: Clients) -> None:
    a = clients.uri(clients.alice)
    clients.core.sessions.drop_connection(clients.alice_connection)
    status = refused(clients.core, f"{a} {ALICE_URI}", BOB_URI, client_hop(), object())
    assert status.code == 481


def test_reconnected_owner_is_a_stranger(clients: Clients) -> None:
    a = clients.uri(clients.alice)
    # Not the owner any more: the request can only go back to the owner.
    status = refused(clients.core, f"{a} {BOB_URI}", ALICE_URI, client_hop(), object())
    assert (status.code, status.close) == (403, False)
    result = route(clients.core, f"{a} {ALICE_URI}", BOB_URI, client_hop(), object())
    assert result.connection is clients.alice_connection


@pytest.mark.parametrize(
    "next_uri",
    [
        BOB_URI,
        # RFC 4975 §6.1: another session id, port, scheme or host is another URI.
        "msrps://alice.example.org:40001/a2;tcp",
        "msrps://alice.example.org:40002/a1;tcp",
        "msrps://alice.example.org/a1;tcp",
        "msrp://alice.example.org:40001/a1;tcp",
        "msrps://mallory.example.org:40001/a1;tcp",
    ],
)
def test_towards_a_client_session_the_next_uri_must_be_its_owners(
    clients: Clients, next_uri: str
) -> None:
    # RFC 4976 §6.4: a request from anyone but the owner goes only to the URI
    # the owner authenticated from (the From-Path URI of its AUTH).
    a = clients.uri(clients.alice)
    status = refused(clients.core, f"{a} {next_uri}", BOB_URI, client_hop(), object())
    assert (status.code, status.close) == (403, False)


def test_towards_a_client_session_its_owners_uri_in_another_spelling(clients: Clients) -> None:
    a = clients.uri(clients.alice)
    odd = "MSRPS://someone@Alice.Example.ORG:40001/a1;TCP;x=1"
    result = route(clients.core, f"{a} {odd}", BOB_URI, client_hop(), object())
    assert result.connection is clients.alice_connection
    assert result.to_path == odd


def test_between_two_clients_the_next_uri_must_be_the_second_owners(clients: Clients) -> None:
    a, b = clients.uri(clients.alice), clients.uri(clients.bob)
    status = refused(
        clients.core, f"{a} {b} {ALICE_URI}", ALICE_URI, client_hop(), clients.alice_connection
    )
    assert status.code == 403


@pytest.mark.parametrize(
    "first",
    [
        "msrps://elsewhere.example.com:2855/x;tcp",
        "msrps://relay.example.com:2999/x;tcp",
    ],
)
def test_first_uri_not_ours_closes_the_connection(clients: Clients, first: str) -> None:
    status = refused(clients.core, f"{first} {BOB_URI}", ALICE_URI, client_hop(), object())
    assert status.code == 403
    assert status.close is True


def test_no_next_hop_is_forbidden(clients: Clients) -> None:
    a, b = clients.uri(clients.alice), clients.uri(clients.bob)
    status = refused(clients.core, a, ALICE_URI, client_hop(), clients.alice_connection)
    assert status.code == 403
    status = refused(clients.core, f"{a} {b}", ALICE_URI, client_hop(), clients.alice_connection)
    assert status.code == 403


@pytest.mark.parametrize(
    ("to_path", "from_path"),
    [("", ALICE_URI), ("garbage", ALICE_URI), (RELAY_URI, ""), (RELAY_URI, "msrp://x")],
)
def test_malformed_paths_are_400(core: RelayCore, to_path: str, from_path: str) -> None:
    with pytest.raises(MSRPStatus) as info:
        route(core, to_path, from_path, client_hop(), object())
    assert info.value.code == 400


def test_host_comparison_ignores_case(clients: Clients) -> None:
    a = clients.uri(clients.alice).replace("relay.example.com", "RELAY.Example.com")
    result = route(
        clients.core, f"{a} {BOB_URI}", ALICE_URI, client_hop(), clients.alice_connection
    )
    assert result.connection is None
    assert result.local_uri == a


def test_path_rewriting_keeps_other_uris_verbatim(clients: Clients) -> None:
    a = clients.uri(clients.alice)
    odd = "MSRPS://bob.example.org:40002/b2;TCP;x=1"
    from_path = f"{ALICE_URI} msrp://origin.example.org/o;tcp"
    result = route(clients.core, f"{a}  {odd}", from_path, client_hop(), clients.alice_connection)
    assert result.to_path == odd
    assert result.from_path == f"{a} {from_path}"


# -- relay-owned sessions -------------------------------------------------------------------


@pytest.fixture
def relay_session(core: RelayCore) -> Session:
    return core.sessions.create_for_relay(MSRPURI.parse(PEER_RELAY_URI), "alice", 600)


def test_relay_session_towards_owning_relay(core: RelayCore, relay_session: Session) -> None:
    r = core.session_uri(relay_session)
    to_rest = f"{PEER_RELAY_URI} {ALICE_URI}"
    result = route(core, f"{r} {to_rest}", BOB_URI, client_hop(), object())
    assert result.connection is None
    assert result.next_uri == MSRPURI.parse(PEER_RELAY_URI)
    assert result.session is relay_session
    assert result.to_path == to_rest
    assert result.from_path == f"{r} {BOB_URI}"


def test_relay_session_next_hop_host_is_case_insensitive(
    core: RelayCore, relay_session: Session
) -> None:
    r = core.session_uri(relay_session)
    result = route(
        core, f"{r} msrps://RELAY1.example.net:2855/r1;tcp", BOB_URI, client_hop(), object()
    )
    assert result.connection is None


@pytest.mark.parametrize(
    "next_hop",
    [
        # The audit's case: the owning host, but plain TCP to any port.
        "msrp://relay1.example.net:25;tcp",
        "msrp://relay1.example.net:2855/r1;tcp",
        "msrp://relay1.example.net/r1;tcp",
        "msrps://relay1.example.net:25/r1;tcp",
        "msrps://relay1.example.net:2856/r1;tcp",
    ],
)
def test_relay_session_next_hop_must_be_the_owners_tls_authority(
    core: RelayCore, relay_session: Session, next_hop: str
) -> None:
    r = core.session_uri(relay_session)
    status = refused(core, f"{r} {next_hop} {ALICE_URI}", BOB_URI, client_hop(), object())
    assert status.code == 403
    assert status.close is False


def test_relay_session_next_hop_port_compares_as_rfc_4975_says(core: RelayCore) -> None:
    # RFC 4975 §6.1: an explicit port never equals an absent one, even 2855.
    hop = relay_hop("relay1.example.net")
    peer = "msrps://relay1.example.net/r1;tcp"
    outcome = auth(core, hop, object(), from_path=f"{peer} {ALICE_URI}")
    assert outcome.session is not None
    r = core.session_uri(outcome.session)
    result = route(core, f"{r} {peer}", BOB_URI, client_hop(), object())
    assert result.next_uri.effective_port == 2855
    status = refused(core, f"{r} {PEER_RELAY_URI}", BOB_URI, client_hop(), object())
    assert status.code == 403


def test_relay_session_remembers_the_port_its_relay_authenticated_from(core: RelayCore) -> None:
    hop = relay_hop("relay1.example.net")
    peer = "msrps://relay1.example.net:4000/r1;tcp"
    outcome = auth(core, hop, object(), from_path=f"{peer} {ALICE_URI}")
    assert outcome.session is not None
    assert outcome.session.owner_relay == "relay1.example.net"
    assert outcome.session.owner_uri == MSRPURI.parse(peer)
    r = core.session_uri(outcome.session)
    assert route(core, f"{r} {peer}", BOB_URI, client_hop(), object()).next_uri.port == 4000
    # The same host on the default port is another relay as far as we know.
    status = refused(core, f"{r} {PEER_RELAY_URI}", BOB_URI, client_hop(), object())
    assert status.code == 403


def test_relay_session_is_not_served_over_plain_tcp(
    core: RelayCore, relay_session: Session, clients: Clients
) -> None:
    plain = FakeHop(is_tls=False)
    r = core.session_uri(relay_session)
    status = refused(core, f"{r} {PEER_RELAY_URI} {ALICE_URI}", BOB_URI, plain, object())
    assert status.code == 403
    assert status.close is False
    # A plain listener still reaches a client of ours, and only that.
    a = clients.uri(clients.alice)
    result = route(core, f"{a} {ALICE_URI}", BOB_URI, plain, object())
    assert result.connection is clients.alice_connection


def test_relay_session_elsewhere_is_forbidden(core: RelayCore, relay_session: Session) -> None:
    r = core.session_uri(relay_session)
    status = refused(core, f"{r} {ALICE_URI}", BOB_URI, client_hop(), object())
    assert status.code == 403
    status = refused(
        core, f"{r} {BOB_URI}", PEER_RELAY_URI, relay_hop("relay2.example.net"), object()
    )
    assert status.code == 403


def test_owning_relay_may_send_anywhere(core: RelayCore, relay_session: Session) -> None:
    r = core.session_uri(relay_session)
    hop = relay_hop("relay1.example.net", "other-name.example.net")
    result = route(core, f"{r} {BOB_URI}", f"{PEER_RELAY_URI} {ALICE_URI}", hop, object())
    assert result.connection is None
    assert result.next_uri == MSRPURI.parse(BOB_URI)
    assert result.session is relay_session
    assert result.from_path == f"{r} {PEER_RELAY_URI} {ALICE_URI}"


def test_owning_relay_through_two_local_sessions(
    core: RelayCore, relay_session: Session, clients: Clients
) -> None:
    r, b = core.session_uri(relay_session), clients.uri(clients.bob)
    hop = relay_hop("relay1.example.net")
    result = route(core, f"{r} {b} {BOB_URI}", PEER_RELAY_URI, hop, object())
    assert result.connection is clients.bob_connection
    assert result.from_path == f"{b} {r} {PEER_RELAY_URI}"


def test_client_through_own_session_to_relay_session(
    core: RelayCore, relay_session: Session, clients: Clients
) -> None:
    a, r = clients.uri(clients.alice), core.session_uri(relay_session)
    result = route(
        core, f"{a} {r} {PEER_RELAY_URI}", ALICE_URI, client_hop(), clients.alice_connection
    )
    assert result.connection is None
    assert result.session is relay_session
    assert result.next_uri == MSRPURI.parse(PEER_RELAY_URI)
    status = refused(core, f"{a} {r} {BOB_URI}", ALICE_URI, client_hop(), clients.alice_connection)
    assert status.code == 403


# -- responses ---------------------------------------------------------------------------


def response(to_path: str, from_path: str) -> MSRPResponse:
    return MSRPResponse(
        "tid0001", 200, "OK", Headers([("To-Path", to_path), ("From-Path", from_path)])
    )


def test_response_route_moves_our_uri_to_from_path(clients: Clients) -> None:
    a = clients.uri(clients.alice)
    rewritten = response_route(response(f"{a} {ALICE_URI}", BOB_URI), clients.core.is_local)
    assert rewritten == (ALICE_URI, f"{a} {BOB_URI}")


def test_response_route_keeps_further_hops(clients: Clients) -> None:
    a = clients.uri(clients.alice)
    rest = f"{PEER_RELAY_URI} {ALICE_URI}"
    rewritten = response_route(response(f"{a} {rest}", BOB_URI), clients.core.is_local)
    assert rewritten == (rest, f"{a} {BOB_URI}")


def test_response_route_drops_responses_not_for_us(core: RelayCore) -> None:
    assert response_route(response(f"{BOB_URI} {ALICE_URI}", RELAY_URI), core.is_local) is None


def test_response_route_drops_responses_ending_here(core: RelayCore) -> None:
    assert response_route(response(RELAY_URI, ALICE_URI), core.is_local) is None


@pytest.mark.parametrize("to_path", ["", "not a uri", "msrps://x"])
def test_response_route_drops_malformed_paths(core: RelayCore, to_path: str) -> None:
    assert response_route(response(to_path, ALICE_URI), core.is_local) is None


def test_route_is_reusable_only_while_its_sessions_live(clients: Clients, clock: Clock) -> None:
    core = clients.core
    a = clients.uri(clients.alice)
    result = route(core, f"{a} {BOB_URI}", ALICE_URI, client_hop(), clients.alice_connection)
    assert result.relied_on == (clients.alice,)
    assert core.still_valid(result)
    clock.advance(1800 + 1)
    assert not core.still_valid(result)


def test_route_through_two_sessions_relies_on_both(clients: Clients) -> None:
    core = clients.core
    a, b = clients.uri(clients.alice), clients.uri(clients.bob)
    result = route(core, f"{a} {b} {BOB_URI}", ALICE_URI, client_hop(), clients.alice_connection)
    assert result.relied_on == (clients.alice, clients.bob)
    core.sessions.drop_connection(clients.bob_connection)
    assert not core.still_valid(result)


@pytest.mark.parametrize(
    "pool_uri",
    ["msrps://pool.example.com;tcp", "msrps://POOL.example.com:2855;tcp"],
)
def test_auth_to_the_pool_name_is_answered_with_this_nodes_use_path(
    clock: Clock, pool_uri: str
) -> None:
    """RFC 4976 §8: a client AUTHs to the pool's name, reached through its SRV records;
    the session lives at this node, so the Use-Path names this node (Appendix A)."""
    core = make_core(clock, pool_names=["Pool.Example.com"])
    hop, owner = client_hop(), object()
    first = core.handle_auth(request("AUTH", pool_uri, ALICE_URI), hop, owner)
    assert first.response.code == 401
    challenge = header(first.response, "WWW-Authenticate")
    answer = authorization(challenge, "alice", "wonderland", uri=pool_uri)
    outcome = core.handle_auth(
        request("AUTH", pool_uri, ALICE_URI, [("Authorization", answer)]), hop, owner
    )
    assert outcome.response.code == 200
    use_path = MSRPURI.parse(header(outcome.response, "Use-Path"))
    assert (use_path.host, use_path.port) == ("relay.example.com", 2855)
    assert header(outcome.response, "From-Path") == pool_uri


@pytest.mark.parametrize(
    ("pool_names", "to_uri"),
    [
        ((), "msrps://pool.example.com;tcp"),  # no pool configured
        (("pool.example.com",), "msrps://pool.example.com:2856;tcp"),  # not our port
        (("pool.example.com",), "msrps://other.example.com;tcp"),
    ],
)
def test_auth_to_a_name_not_of_our_pool_is_refused(
    clock: Clock, pool_names: tuple[str, ...], to_uri: str
) -> None:
    core = make_core(clock, pool_names=pool_names)
    with pytest.raises(MSRPStatus) as info:
        core.handle_auth(request("AUTH", to_uri, ALICE_URI), client_hop(), object())
    assert info.value.code == 403


def test_the_pool_name_is_no_session_uri_of_ours(clock: Clock) -> None:
    """Only AUTH may name the pool: a SEND must reach the node holding its session."""
    core = make_core(clock, pool_names=["pool.example.com"])
    assert not core.is_local(MSRPURI.parse("msrps://pool.example.com:2855/s1;tcp"))


# -- [relay] workers ---------------------------------------------------------------------

SIBLING = "msrps://relay.example.com:2856/s1bling;tcp"


def test_another_workers_uri_is_a_sibling_only_with_workers(core: RelayCore) -> None:
    uri = MSRPURI.parse(SIBLING)
    assert not core.is_sibling(uri)
    core.has_siblings = True
    assert core.is_sibling(uri)
    assert not core.is_sibling(MSRPURI.parse("msrps://relay.example.com:2855/x;tcp"))  # ours
    assert not core.is_sibling(MSRPURI.parse("msrps://other.example.com:2856/x;tcp"))


def test_a_request_for_another_worker_is_passed_on_unchanged(core: RelayCore) -> None:
    core.has_siblings = True
    send = request("SEND", f"{SIBLING} {BOB_URI}", "msrps://peer.example.net:2855/p;tcp")
    route = core.route(send, relay_hop("peer.example.net"), object())
    assert route.transparent
    assert (route.to_path, route.from_path) == (
        f"{SIBLING} {BOB_URI}",
        "msrps://peer.example.net:2855/p;tcp",
    )
    assert route.next_uri == MSRPURI.parse(SIBLING)
    assert route.connection is None and route.relied_on == ()
    # Never an AUTH: it must reach the worker its URI names (a session belongs to the
    # connection that authenticated, and the workers' link is shared).
    auth = request("AUTH", "msrps://relay.example.com:2856;tcp", ALICE_URI)
    assert core.is_local_auth(auth)
    with pytest.raises(MSRPStatus) as info:
        core.handle_auth(auth, client_hop(), object())
    assert info.value.code == 403 and info.value.close
    relayed = request("AUTH", f"{SIBLING} msrps://other.example.com;tcp", ALICE_URI)
    with pytest.raises(MSRPStatus):
        core.route(relayed, client_hop(), object())


def test_a_request_for_another_worker_over_plain_tcp_is_refused(core: RelayCore) -> None:
    core.has_siblings = True
    send = request("SEND", f"{SIBLING} {BOB_URI}", ALICE_URI)
    with pytest.raises(MSRPStatus) as info:
        core.route(send, FakeHop(is_tls=False), object())
    assert info.value.code == 403 and info.value.close


def test_without_workers_another_port_is_not_this_relay(core: RelayCore) -> None:
    send = request("SEND", f"{SIBLING} {BOB_URI}", ALICE_URI)
    with pytest.raises(MSRPStatus) as info:
        core.route(send, client_hop(), object())
    assert info.value.code == 403
