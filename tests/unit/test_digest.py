"""Tests for relayd.digest: RFC 2617 Digest as used by RFC 4976, RFC 3261 and XCAP."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from relayd.digest import (
    MAX_HEADER_CHARS,
    MAX_PARAMS,
    Challenge,
    DigestAuthenticator,
    DigestCredentials,
    DigestError,
    _parse_params_checked,
    _parse_params_fast,
    answer_challenge,
    format_authentication_info,
    format_challenge,
    ha1,
    is_stale,
    parse_credentials,
    read_challenge,
    request_digest,
)

REALM = "relay.example.com"
USER = "alice"
PASSWORD = "s3cret pass"
URI = "msrps://relay.example.com:2855;tcp"


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


# RFC 2617 §3.5 example.
RFC_HEADER = (
    'Digest username="Mufasa", realm="testrealm@host.com", '
    'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", '
    'qop=auth, nc=00000001, cnonce="0a4f113b", '
    'response="6629fae49393a05397450978507c4ef1", '
    'opaque="5ccc069c403ebaf9f0171e9517f40e41"'
)


def test_rfc2617_example_parses_to_expected_fields() -> None:
    cred = parse_credentials(RFC_HEADER)
    assert cred == DigestCredentials(
        username="Mufasa",
        realm="testrealm@host.com",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        uri="/dir/index.html",
        response="6629fae49393a05397450978507c4ef1",
        qop="auth",
        nc="00000001",
        cnonce="0a4f113b",
        algorithm=None,
        opaque="5ccc069c403ebaf9f0171e9517f40e41",
    )


def test_uri_is_required_unless_the_protocol_supplies_one() -> None:
    # RFC 4976 §5.1's AUTH example has no uri=: MSRP passes the To-Path URI.
    header = RFC_HEADER.replace('uri="/dir/index.html", ', "")
    with pytest.raises(DigestError, match="lack uri"):
        parse_credentials(header)
    assert parse_credentials(header, default_uri=URI).uri == URI
    # A uri= that is there is never replaced.
    assert parse_credentials(RFC_HEADER, default_uri=URI).uri == "/dir/index.html"


def test_rfc2617_example_response_vector() -> None:
    h1 = ha1("Mufasa", "testrealm@host.com", "Circle Of Life")
    assert h1 == _md5("Mufasa:testrealm@host.com:Circle Of Life")
    response = request_digest(
        h1,
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        nc="00000001",
        cnonce="0a4f113b",
        qop="auth",
        method="GET",
        uri="/dir/index.html",
    )
    assert response == "6629fae49393a05397450978507c4ef1"


# The client side.

RFC_CHALLENGE = (
    'Digest realm="testrealm@host.com", qop="auth,auth-int", '
    'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
)


def test_answer_challenge_gives_the_rfc2617_example_response() -> None:
    answer = answer_challenge(
        RFC_CHALLENGE,
        username="Mufasa",
        password="Circle Of Life",
        method="GET",
        uri="/dir/index.html",
        cnonce="0a4f113b",
    )
    # The RFC's own credentials, with the algorithm named.
    expected = replace(parse_credentials(RFC_HEADER), algorithm="MD5")
    assert parse_credentials(answer.authorization) == expected
    h1 = _md5("Mufasa:testrealm@host.com:Circle Of Life")
    ha2 = _md5(":/dir/index.html")
    assert answer.rspauth == _md5(
        f"{h1}:dcd98b7102dd2f0e8b11d0f600bfb0c093:00000001:0a4f113b:auth:{ha2}"
    )


def test_a_kept_challenge_counts_its_nonce_uses() -> None:
    challenge = read_challenge(RFC_CHALLENGE)
    counts = [
        parse_credentials(
            answer_challenge(
                challenge, username="u", password="p", method="GET", uri="/"
            ).authorization
        ).nc
        for _ in range(3)
    ]
    assert counts == ["00000001", "00000002", "00000003"] and challenge.uses == 3
    pinned = answer_challenge(challenge, username="u", password="p", method="GET", uri="/", nc=9)
    assert parse_credentials(pinned.authorization).nc == "00000009" and challenge.uses == 3


def test_answers_are_accepted_by_the_authenticator_and_match_its_rspauth() -> None:
    clock = Clock()
    auth = _authenticator(clock)
    challenge = read_challenge(auth.challenge(opaque="op"))
    assert challenge.opaque == "op" and challenge.qop and not challenge.stale
    for _ in range(2):
        answer = answer_challenge(
            challenge, username=USER, password=PASSWORD, method="AUTH", uri=URI
        )
        success = auth.verify("AUTH", parse_credentials(answer.authorization), expected_uri=URI)
        info = auth.authentication_info(success)
        assert f'rspauth="{answer.rspauth}"' in info
    wrong = answer_challenge(challenge, username=USER, password="nope", method="AUTH", uri=URI)
    with pytest.raises(DigestError):
        auth.verify("AUTH", parse_credentials(wrong.authorization), expected_uri=URI)


def test_a_challenge_without_qop_is_answered_the_rfc2069_way() -> None:
    answer = answer_challenge(
        'Digest realm="r", nonce="n"', username="u", password="p", method="GET", uri="/x"
    )
    cred = parse_credentials(answer.authorization)
    assert (cred.qop, cred.nc, cred.cnonce, cred.opaque) == (None, None, None, None)
    assert cred.response == _md5(f"{_md5('u:r:p')}:n:{_md5('GET:/x')}")


@pytest.mark.parametrize(
    ("challenge", "reason"),
    [
        ('Basic realm="r"', "not Digest"),
        ('Digest realm="r"', "realm or nonce"),
        ('Digest realm="r", nonce="n", algorithm=SHA-256', "unsupported algorithm"),
        ('Digest realm="r", nonce="n", qop="auth-int"', "qop"),
    ],
)
def test_read_challenge_refuses_what_it_cannot_answer(challenge: str, reason: str) -> None:
    with pytest.raises(DigestError, match=reason):
        read_challenge(challenge)


def test_read_challenge_notes_stale() -> None:
    stale = 'Digest realm="r", nonce="n", qop="auth", stale=TRUE'
    assert read_challenge(stale) == Challenge("r", "n", None, True, True)
    assert is_stale(stale)
    assert not is_stale(stale.replace("TRUE", "false"))
    assert not is_stale('Basic realm="r", stale=true') and not is_stale(None)


# Header formatting.


def test_format_challenge_offers_only_qop_auth_and_no_domain() -> None:
    value = format_challenge("r", "n1")
    assert value == 'Digest realm="r", nonce="n1", qop="auth"'
    assert "domain" not in value
    assert "auth-int" not in value


def test_format_challenge_stale_and_opaque() -> None:
    value = format_challenge('we"ird\\realm', "n", stale=True, opaque="o")
    assert (
        value == 'Digest realm="we\\"ird\\\\realm", nonce="n", qop="auth", opaque="o", stale=true'
    )


def test_format_challenge_rejects_header_injection() -> None:
    with pytest.raises(ValueError):
        format_challenge("r\r\nX-Evil: 1", "n")


def test_format_authentication_info_fields() -> None:
    value = format_authentication_info(rspauth="ab", cnonce="c", nc="00000002", nextnonce="nn")
    assert value == 'nextnonce="nn", rspauth="ab", cnonce="c", nc=00000002, qop=auth'


# Parsing.


def test_parse_quoted_escapes_and_token_values() -> None:
    cred = parse_credentials(
        'digest  username = "a\\"l\\\\ice" ,realm="r",nonce=n,uri="sip:bob@example.com",'
        "response=6629FAE49393A05397450978507C4EF1,algorithm=MD5,,"
    )
    assert cred.username == 'a"l\\ice'
    assert cred.nonce == "n"
    assert cred.response == "6629fae49393a05397450978507c4ef1"
    assert cred.algorithm == "MD5"


def test_parse_ignores_unknown_parameters() -> None:
    cred = parse_credentials(RFC_HEADER + ', future-param="x"')
    assert cred.username == "Mufasa"


@pytest.mark.parametrize(
    ("value", "reason_part"),
    [
        ("", "not Digest"),
        ("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", "not Digest"),
        ('Digest username="a"', "lack"),
        (RFC_HEADER + ', username="again"', "duplicate"),
        (RFC_HEADER.replace('realm="', 'REALM="') + ', realm="x"', "duplicate"),
        ('Digest username="unterminated', "unterminated"),
        ("Digest username", "no value"),
        ("Digest =x", "name"),
        ('Digest username="a" realm="b"', "junk"),
        ("Digest username=,realm=r", "empty value"),
        (RFC_HEADER.replace("6629fae49393a05397450978507c4ef1", "xyz"), "32 hex"),
        (RFC_HEADER.replace("nc=00000001", "nc=1"), "8 hex"),
        (RFC_HEADER.replace("Mufasa", "Mu\nfasa"), "control"),
        (RFC_HEADER + " " * MAX_HEADER_CHARS, "too long"),
    ],
)
def test_parse_rejects_malformed_credentials(value: str, reason_part: str) -> None:
    with pytest.raises(DigestError) as excinfo:
        parse_credentials(value)
    assert reason_part in excinfo.value.reason
    assert excinfo.value.stale is False


def test_parse_rejects_too_many_parameters() -> None:
    extra = ", ".join(f"x{i}=1" for i in range(MAX_PARAMS))
    with pytest.raises(DigestError, match="too many"):
        parse_credentials(RFC_HEADER + ", " + extra)


@given(st.text(max_size=300))
def test_parse_raises_only_digesterror_on_arbitrary_text(value: str) -> None:
    try:
        parse_credentials(value)
    except DigestError:
        pass


@given(st.text(alphabet='Digest usernamerealmnoceuriqp=",\\ \t0123456789abcdef', max_size=300))
def test_parse_raises_only_digesterror_on_near_miss_text(value: str) -> None:
    try:
        cred = parse_credentials("Digest " + value)
    except DigestError:
        return
    assert len(cred.response) == 32


# The authenticator.


class _Users:
    def __init__(self) -> None:
        self.table = {(USER, REALM): ha1(USER, REALM, PASSWORD)}
        self.calls: list[tuple[str, str]] = []

    def __call__(self, username: str, realm: str) -> str | None:
        self.calls.append((username, realm))
        return self.table.get((username, realm))


def _authenticator(clock: Clock, **kwargs: Any) -> DigestAuthenticator:
    return DigestAuthenticator(REALM, _Users(), clock, secret=b"k" * 32, **kwargs)


def _nonce_from(challenge: str) -> str:
    match = re.search(r'nonce="([^"]+)"', challenge)
    assert match is not None
    return match.group(1)


def _credentials(
    nonce: str,
    *,
    nc: str = "00000001",
    cnonce: str = "c0ffee",
    password: str = PASSWORD,
    username: str = USER,
    realm: str = REALM,
    uri: str = URI,
    method: str = "AUTH",
) -> DigestCredentials:
    h1 = _md5(f"{username}:{realm}:{password}")
    h2 = _md5(f"{method}:{uri}")
    response = _md5(f"{h1}:{nonce}:{nc}:{cnonce}:auth:{h2}")
    header = (
        f'Digest username="{username}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
        f'qop=auth, nc={nc}, cnonce="{cnonce}", response="{response}"'
    )
    return parse_credentials(header)


def test_challenge_header_shape_and_nonce_entropy() -> None:
    auth = _authenticator(Clock())
    challenge = auth.challenge()
    assert challenge.startswith(f'Digest realm="{REALM}", nonce="')
    assert challenge.endswith('qop="auth"')
    nonce = _nonce_from(challenge)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", nonce)
    raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
    assert len(raw) >= 8 + 16  # time + at least 128 random bits (+ MAC)
    assert len({_nonce_from(auth.challenge()) for _ in range(50)}) == 50


def test_challenge_stale_flag() -> None:
    assert _authenticator(Clock()).challenge(stale=True).endswith("stale=true")


def test_verify_accepts_correct_credentials() -> None:
    auth = _authenticator(Clock())
    nonce = auth.new_nonce()
    success = auth.verify("AUTH", _credentials(nonce), expected_uri=URI)
    assert success.username == USER
    assert success.nc == "00000001"
    assert auth.tracked_nonce_count == 1


def test_verify_accepts_increasing_nonce_counts() -> None:
    auth = _authenticator(Clock())
    nonce = auth.new_nonce()
    auth.verify("AUTH", _credentials(nonce, nc="00000001"))
    auth.verify("AUTH", _credentials(nonce, nc="00000003"))
    assert auth.tracked_nonce_count == 1


def test_verify_rejects_replayed_nonce_count() -> None:
    auth = _authenticator(Clock())
    nonce = auth.new_nonce()
    auth.verify("AUTH", _credentials(nonce, nc="00000002"))
    with pytest.raises(DigestError, match="replayed") as excinfo:
        auth.verify("AUTH", _credentials(nonce, nc="00000002"))
    assert excinfo.value.stale is False
    # A lower count not seen yet is a request that overtook another: accepted once.
    auth.verify("AUTH", _credentials(nonce, nc="00000001"))
    with pytest.raises(DigestError, match="replayed"):
        auth.verify("AUTH", _credentials(nonce, nc="00000001"))


def test_verify_rejects_zero_nonce_count() -> None:
    auth = _authenticator(Clock())
    with pytest.raises(DigestError, match="nc"):
        auth.verify("AUTH", _credentials(auth.new_nonce(), nc="00000000"))


def test_verify_expired_nonce_is_stale() -> None:
    clock = Clock()
    auth = _authenticator(clock, nonce_lifetime_seconds=300)
    nonce = auth.new_nonce()
    clock.advance(299)
    auth.verify("AUTH", _credentials(nonce))
    clock.advance(2)
    with pytest.raises(DigestError) as excinfo:
        auth.verify("AUTH", _credentials(nonce, nc="00000002"))
    assert excinfo.value.stale is True


def test_verify_nonce_from_the_future_is_stale() -> None:
    clock = Clock()
    clock.advance(1000)
    auth = _authenticator(clock)
    nonce = auth.new_nonce()
    clock.rightNow = 0.0  # wall clock stepped backwards
    with pytest.raises(DigestError) as excinfo:
        auth.verify("AUTH", _credentials(nonce))
    assert excinfo.value.stale is True


def test_verify_rejects_tampered_nonce() -> None:
    auth = _authenticator(Clock())
    nonce = auth.new_nonce()
    raw = bytearray(base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4)))
    raw[0] ^= 0x01  # move the creation time
    forged = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    with pytest.raises(DigestError, match="invalid nonce") as excinfo:
        auth.verify("AUTH", _credentials(forged))
    assert excinfo.value.stale is False


@pytest.mark.parametrize("nonce", ["dcd98b7102dd2f0e8b11d0f600bfb0c093", "!!!", "", "a" * 54])
def test_verify_rejects_foreign_or_garbage_nonce(nonce: str) -> None:
    auth = _authenticator(Clock())
    with pytest.raises(DigestError, match="invalid nonce"):
        auth.verify("AUTH", _credentials(nonce))


def test_verify_rejects_nonce_minted_with_another_secret() -> None:
    other = DigestAuthenticator(REALM, _Users(), Clock(), secret=b"z" * 32)
    auth = _authenticator(Clock())
    with pytest.raises(DigestError, match="invalid nonce"):
        auth.verify("AUTH", _credentials(other.new_nonce()))


def test_workers_accept_only_their_own_nonces_and_call_the_others_stale() -> None:
    clock = Clock()
    first = _authenticator(clock, issuer=b"\x00\x00\x00\x01")
    second = _authenticator(clock, issuer=b"\x00\x00\x00\x02")
    nonce = first.new_nonce()
    assert first.verify("AUTH", _credentials(nonce)).username == USER
    with pytest.raises(DigestError, match="another worker") as info:
        second.verify("AUTH", _credentials(nonce, nc="00000002"))
    assert info.value.stale
    # A nonce under another key stays invalid, not stale.
    other = DigestAuthenticator(REALM, _Users(), clock, secret=b"z" * 32, issuer=b"1234")
    with pytest.raises(DigestError, match="invalid nonce") as info:
        second.verify("AUTH", _credentials(other.new_nonce()))
    assert not info.value.stale
    with pytest.raises(ValueError, match="issuer"):
        _authenticator(clock, issuer=b"12")


def test_verify_rejects_wrong_digest_uri() -> None:
    auth = _authenticator(Clock())
    cred = _credentials(auth.new_nonce(), uri="msrps://elsewhere.example;tcp")
    with pytest.raises(DigestError, match="uri"):
        auth.verify("AUTH", cred, expected_uri=URI)


def test_verify_rejects_wrong_realm() -> None:
    auth = _authenticator(Clock())
    with pytest.raises(DigestError, match="realm"):
        auth.verify("AUTH", _credentials(auth.new_nonce(), realm="other.example"))


def test_verify_rejects_wrong_method() -> None:
    auth = _authenticator(Clock())
    cred = _credentials(auth.new_nonce(), method="SEND")
    with pytest.raises(DigestError):
        auth.verify("AUTH", cred)


def test_verify_unknown_user_and_wrong_password_fail_identically() -> None:
    users = _Users()
    auth = DigestAuthenticator(REALM, users, Clock(), secret=b"k" * 32)
    with pytest.raises(DigestError) as wrong_password:
        auth.verify("AUTH", _credentials(auth.new_nonce(), password="nope"))
    with pytest.raises(DigestError) as unknown_user:
        auth.verify("AUTH", _credentials(auth.new_nonce(), username="mallory"))
    assert wrong_password.value.reason == unknown_user.value.reason
    assert wrong_password.value.stale is unknown_user.value.stale is False
    assert users.calls == [(USER, REALM), ("mallory", REALM)]
    assert auth.tracked_nonce_count == 0


def test_verify_failed_attempt_does_not_burn_nonce_count() -> None:
    auth = _authenticator(Clock())
    nonce = auth.new_nonce()
    with pytest.raises(DigestError):
        auth.verify("AUTH", _credentials(nonce, nc="00000005", password="nope"))
    assert auth.verify("AUTH", _credentials(nonce, nc="00000001")).username == USER


@pytest.mark.parametrize(
    ("header_tail", "reason_part"),
    [
        ("", "qop"),
        (', qop=auth-int, nc=00000001, cnonce="x"', "qop"),
        (', qop=auth, cnonce="x"', "nc"),
        (", qop=auth, nc=00000001", "cnonce"),
        (', qop=auth, nc=00000001, cnonce="x", algorithm=MD5-sess', "algorithm"),
    ],
)
def test_verify_requires_qop_auth_with_nc_and_cnonce(header_tail: str, reason_part: str) -> None:
    auth = _authenticator(Clock())
    header = (
        f'Digest username="{USER}", realm="{REALM}", nonce="{auth.new_nonce()}", '
        f'uri="{URI}", response="{"0" * 32}"' + header_tail
    )
    with pytest.raises(DigestError, match=reason_part):
        auth.verify("AUTH", parse_credentials(header))


def test_authentication_info_rspauth_and_nextnonce() -> None:
    auth = _authenticator(Clock())
    nonce = auth.new_nonce()
    success = auth.verify("AUTH", _credentials(nonce, cnonce="abc123"), expected_uri=URI)
    info = auth.authentication_info(success)

    h1 = _md5(f"{USER}:{REALM}:{PASSWORD}")
    expected_rspauth = _md5(f"{h1}:{nonce}:00000001:abc123:auth:{_md5(':' + URI)}")
    fields = dict(re.findall(r'(\w+)=("[^"]*"|[^,\s]+)', info))
    assert fields["rspauth"] == f'"{expected_rspauth}"'
    assert fields["cnonce"] == '"abc123"'
    assert fields["nc"] == "00000001"
    assert fields["qop"] == "auth"
    nextnonce = fields["nextnonce"].strip('"')
    assert nextnonce != nonce
    # The nextnonce is a real nonce: the client's refresh uses it directly.
    assert auth.verify("AUTH", _credentials(nextnonce)).username == USER


def test_authentication_info_without_nextnonce() -> None:
    auth = _authenticator(Clock())
    success = auth.verify("AUTH", _credentials(auth.new_nonce()))
    assert "nextnonce" not in auth.authentication_info(success, nextnonce=False)


def test_success_repr_hides_ha1() -> None:
    auth = _authenticator(Clock())
    success = auth.verify("AUTH", _credentials(auth.new_nonce()))
    assert success.ha1 not in repr(success)


def test_tracked_nonces_are_bounded_under_flood() -> None:
    clock = Clock()
    auth = _authenticator(clock, max_tracked_nonces=10)
    for _ in range(50):
        clock.advance(0.01)
        auth.verify("AUTH", _credentials(auth.new_nonce()))
    assert auth.tracked_nonce_count == 10


def test_forgotten_nonce_cannot_be_replayed() -> None:
    auth = _authenticator(Clock(), max_tracked_nonces=2)
    first = auth.new_nonce()
    auth.verify("AUTH", _credentials(first))
    for _ in range(2):
        auth.verify("AUTH", _credentials(auth.new_nonce()))
    # `first` was evicted; replaying it must not be accepted as fresh.
    with pytest.raises(DigestError) as excinfo:
        auth.verify("AUTH", _credentials(first))
    assert excinfo.value.stale is True


def test_expired_nonces_are_pruned_before_live_ones() -> None:
    clock = Clock()
    auth = _authenticator(clock, max_tracked_nonces=3, nonce_lifetime_seconds=10)
    for _ in range(3):
        auth.verify("AUTH", _credentials(auth.new_nonce()))
    clock.advance(11)
    fresh = auth.new_nonce()
    auth.verify("AUTH", _credentials(fresh))
    assert auth.tracked_nonce_count == 1
    # Nothing live was forgotten, so a fresh unused nonce is still accepted.
    assert auth.verify("AUTH", _credentials(auth.new_nonce())).username == USER


def test_failed_attempts_do_not_grow_state() -> None:
    auth = _authenticator(Clock(), max_tracked_nonces=5)
    for _ in range(100):
        with pytest.raises(DigestError):
            auth.verify("AUTH", _credentials(auth.new_nonce(), password="guess"))
    assert auth.tracked_nonce_count == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"nonce_lifetime_seconds": 0}, {"max_tracked_nonces": 0}, {"secret": b"short"}],
)
def test_authenticator_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DigestAuthenticator(REALM, _Users(), Clock(), **kwargs)  # type: ignore[arg-type]


def test_nonce_counts_out_of_order_are_each_accepted_once() -> None:
    """Parallel requests over several connections share a nonce (RFC 2617 §3.2.2)."""
    auth = _authenticator(Clock())
    nonce = _nonce_from(auth.challenge())

    def attempt(nc: int) -> None:
        auth.verify("AUTH", _credentials(nonce, nc=f"{nc:08x}"), expected_uri=URI)

    for nc in (1, 3, 2, 5, 4):
        attempt(nc)
    for nc in (1, 2, 3, 4, 5):
        with pytest.raises(DigestError, match="replayed"):
            attempt(nc)
    attempt(200)
    # Far below the window: refused, since it can no longer be told apart.
    with pytest.raises(DigestError, match="replayed"):
        attempt(100)
    attempt(199)


_PARAM_TEXT = st.text(alphabet='ab=,"\\ \t\x01xyz', max_size=40)


@given(
    st.one_of(
        _PARAM_TEXT,
        st.lists(
            st.tuples(
                st.sampled_from(["nonce", "uri", "qop", "Realm", "x"]),
                st.text(alphabet='ab ,"\\=', max_size=8),
                st.booleans(),
            ),
            max_size=5,
        ).map(
            lambda items: ", ".join(
                f'{k}="{v}"' if quoted else f"{k}={v}" for k, v, quoted in items
            )
        ),
    )
)
def test_fast_param_path_agrees_with_the_checked_one(text: str) -> None:
    fast = _parse_params_fast(text)
    if fast is None:
        return
    try:
        checked = _parse_params_checked(text, None)
    except DigestError as e:
        raise AssertionError(f"fast path accepted what the checked one refuses: {e}") from e
    assert fast == checked
