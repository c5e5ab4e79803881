"""Tests for relayd.msrp.uri: RFC 4975 §6, §6.1 and §9."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.msrp.uri import (
    DEFAULT_PORT,
    MAX_URI_CHARS,
    MSRPURI,
    MSRPURIError,
    format_path,
    parse_path,
)


def test_parse_full_uri_extracts_every_component() -> None:
    uri = MSRPURI.parse("msrp://alice@atlanta.example.com:7654/jshA7weztas;tcp;x=1;flag")
    assert uri == MSRPURI("msrp", "alice", "atlanta.example.com", 7654, "jshA7weztas", "tcp")
    assert uri.user == "alice"
    assert uri.host == "atlanta.example.com"
    assert uri.port == 7654
    assert uri.session_id == "jshA7weztas"
    assert uri.transport == "tcp"
    assert uri.params == (("x", "1"), ("flag", None))


def test_parse_minimal_uri_has_no_optional_parts() -> None:
    uri = MSRPURI.parse("msrps://relay.example.net;tcp")
    assert (uri.scheme, uri.user, uri.port, uri.session_id) == ("msrps", None, None, None)
    assert uri.effective_port == DEFAULT_PORT == 2855
    assert uri.is_secure


def test_parse_ipv6_literal_host() -> None:
    uri = MSRPURI.parse("msrp://[2001:db8::10]:2855/s1;tcp")
    assert uri.host == "[2001:db8::10]"
    assert uri.port == 2855


def test_parse_session_id_allows_plus_equals_and_slash() -> None:
    assert MSRPURI.parse("msrp://h/a+b=c/d_e~f.g-h;tcp").session_id == "a+b=c/d_e~f.g-h"


def test_parse_upper_case_scheme_is_lowered_in_canonical_form() -> None:
    uri = MSRPURI.parse("MSRPS://Relay.Example.com/AbC;TCP")
    assert uri.scheme == "msrps"
    assert str(uri) == "msrps://Relay.Example.com/AbC;TCP"


@pytest.mark.parametrize(
    "text",
    [
        "msrp://alice@atlanta.example.com:7654/jshA7weztas;tcp",
        "msrps://[2001:db8::1]/x;tcp;a=b;c",
        "msrp://192.0.2.1:9;sctp",
        "msrp://u:p%20w@h/s;tcp",
    ],
)
def test_format_round_trips_canonical_text(text: str) -> None:
    uri = MSRPURI.parse(text)
    assert uri.format() == text
    assert str(uri) == text
    assert MSRPURI.parse(str(uri)) == uri


@pytest.mark.parametrize(
    ("text", "reason_part"),
    [
        ("", "msrp://"),
        ("http://h;tcp", "msrp://"),
        ("msrp:/h;tcp", "msrp://"),
        ("msrp://h", "transport"),
        ("msrp://h/session", "transport"),
        ("msrp://;tcp", "empty host"),
        ("msrp://alice@;tcp", "empty host"),
        ("msrp://h:0;tcp", "port"),
        ("msrp://h:65536;tcp", "port"),
        ("msrp://[2001:db8::zz];tcp", "malformed"),
        ("msrp://[1:2:3];tcp", "IPv6"),
        ("msrp://h%zz;tcp", "percent"),
        ("msrp://h/;tcp", "malformed"),
        ("msrp://h/a b;tcp", "malformed"),
        ("msrp://h/a;b;tcp;", "malformed"),
        ("msrp://h;tcp;=v", "malformed"),
        ("msrp://h;tcp;a=", "malformed"),
        ("msrp://h;tcp ", "malformed"),
        ("msrp://h;", "malformed"),
    ],
)
def test_parse_rejects_malformed_uri_with_reason(text: str, reason_part: str) -> None:
    with pytest.raises(MSRPURIError) as excinfo:
        MSRPURI.parse(text)
    assert reason_part in excinfo.value.reason
    assert isinstance(excinfo.value, ValueError)


def test_parse_rejects_uri_over_length_limit() -> None:
    text = "msrp://h/" + "a" * MAX_URI_CHARS + ";tcp"
    with pytest.raises(MSRPURIError, match="longer than"):
        MSRPURI.parse(text)


def test_parse_stays_fast_on_pathological_input() -> None:
    # Inputs that make backtracking parsers explode; each is near the limit.
    near_limit = MAX_URI_CHARS - 20
    hostile = [
        "msrp://" + "a" * near_limit,
        "msrp://" + "a@" * (near_limit // 2),
        "msrp://" + ";" * near_limit,
        "msrp://h/" + "/" * near_limit,
        "msrp://h;tcp" + ";a=b" * (near_limit // 4) + " ",
        "msrp://" + "%" * near_limit + ";tcp",
    ]
    start = time.perf_counter()
    for text in hostile:
        with pytest.raises(MSRPURIError):
            MSRPURI.parse(text)
    assert time.perf_counter() - start < 0.5


# RFC 4975 §6.1 comparison rules, one test per rule.


def test_equal_scheme_compared_case_insensitively_but_must_match() -> None:
    assert MSRPURI.parse("MSRP://h/s;tcp") == MSRPURI.parse("msrp://h/s;tcp")
    assert MSRPURI.parse("msrp://h/s;tcp") != MSRPURI.parse("msrps://h/s;tcp")


def test_equal_host_compared_case_insensitively() -> None:
    assert MSRPURI.parse("msrp://Relay.EXAMPLE.com/s;tcp") == MSRPURI.parse(
        "msrp://relay.example.com/s;tcp"
    )
    assert MSRPURI.parse("msrp://a.example.com/s;tcp") != MSRPURI.parse(
        "msrp://b.example.com/s;tcp"
    )


def test_equal_host_after_decoding_percent_encoded_unreserved() -> None:
    assert MSRPURI.parse("msrp://%72elay/s;tcp") == MSRPURI.parse("msrp://relay/s;tcp")


def test_equal_ipv6_hosts_compared_as_addresses() -> None:
    assert MSRPURI.parse("msrp://[2001:DB8:0::1]/s;tcp") == MSRPURI.parse(
        "msrp://[2001:db8::1]/s;tcp"
    )


def test_equal_userinfo_is_not_compared() -> None:
    assert MSRPURI.parse("msrp://alice@h/s;tcp") == MSRPURI.parse("msrp://bob@h/s;tcp")
    assert MSRPURI.parse("msrp://alice@h/s;tcp") == MSRPURI.parse("msrp://h/s;tcp")


def test_equal_explicit_port_never_matches_absent_port() -> None:
    explicit = MSRPURI.parse("msrp://h:2855/s;tcp")
    implicit = MSRPURI.parse("msrp://h/s;tcp")
    assert explicit != implicit
    assert explicit.effective_port == implicit.effective_port
    assert MSRPURI.parse("msrp://h:1234/s;tcp") != MSRPURI.parse("msrp://h:1235/s;tcp")


def test_equal_session_id_is_case_sensitive() -> None:
    assert MSRPURI.parse("msrp://h/abc;tcp") != MSRPURI.parse("msrp://h/ABC;tcp")
    assert MSRPURI.parse("msrp://h/abc;tcp") == MSRPURI.parse("msrp://h/abc;tcp")


def test_equal_session_id_absent_never_matches_present() -> None:
    assert MSRPURI.parse("msrp://h;tcp") != MSRPURI.parse("msrp://h/abc;tcp")


def test_equal_transport_compared_case_insensitively_but_must_match() -> None:
    assert MSRPURI.parse("msrp://h/s;TCP") == MSRPURI.parse("msrp://h/s;tcp")
    assert MSRPURI.parse("msrp://h/s;tcp") != MSRPURI.parse("msrp://h/s;sctp")


def test_equal_uri_parameters_are_not_compared() -> None:
    assert MSRPURI.parse("msrp://h/s;tcp;a=1") == MSRPURI.parse("msrp://h/s;tcp")


def test_hash_agrees_with_equality() -> None:
    variants = {
        MSRPURI.parse("MSRP://alice@H.example/s;TCP"),
        MSRPURI.parse("msrp://bob@h.EXAMPLE/s;tcp;x"),
        MSRPURI.parse("msrp://h.example/s;tcp"),
    }
    assert len(variants) == 1


def test_equal_to_other_types_is_false() -> None:
    assert MSRPURI.parse("msrp://h;tcp") != "msrp://h;tcp"


def test_authority_key_ignores_session_and_defaults_port() -> None:
    a = MSRPURI.parse("msrps://Relay.example/s1;tcp")
    b = MSRPURI.parse("msrps://relay.example:2855/s2;TCP")
    c = MSRPURI.parse("msrp://relay.example/s1;tcp")
    assert a.authority_key() == b.authority_key() == ("msrps", "relay.example", 2855, "tcp")
    assert a.authority_key() != c.authority_key()


def test_parse_path_returns_uris_in_order() -> None:
    path = parse_path("msrp://relay.example/r1;tcp msrp://bob.example:9/b2;tcp")
    assert [u.session_id for u in path] == ["r1", "b2"]
    assert format_path(path) == "msrp://relay.example/r1;tcp msrp://bob.example:9/b2;tcp"


def test_parse_path_single_uri() -> None:
    assert parse_path("msrp://h/s;tcp") == (MSRPURI.parse("msrp://h/s;tcp"),)


@pytest.mark.parametrize("value", ["", "   "])
def test_parse_path_rejects_empty_value(value: str) -> None:
    with pytest.raises(MSRPURIError, match="empty"):
        parse_path(value)


def test_parse_path_rejects_any_bad_uri() -> None:
    with pytest.raises(MSRPURIError, match="transport"):
        parse_path("msrp://h/s;tcp msrp://broken")


def test_format_path_rejects_empty() -> None:
    with pytest.raises(MSRPURIError):
        format_path([])


_session_ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~+=/",
    min_size=1,
    max_size=40,
)


@given(
    secure=st.booleans(),
    host=st.from_regex(r"[a-z][a-z0-9\-]{0,20}(\.[a-z][a-z0-9\-]{0,20}){0,3}", fullmatch=True),
    port=st.none() | st.integers(min_value=1, max_value=65535),
    session_id=st.none() | _session_ids,
)
def test_constructed_uris_round_trip_through_text(
    secure: bool, host: str, port: int | None, session_id: str | None
) -> None:
    uri = MSRPURI("msrps" if secure else "msrp", None, host, port, session_id)
    parsed = MSRPURI.parse(uri.format())
    assert parsed == uri
    assert parsed.format() == uri.format()


@given(st.text(max_size=200))
def test_parse_raises_only_msrpurierror(text: str) -> None:
    try:
        uri = MSRPURI.parse(text)
    except MSRPURIError:
        return
    assert MSRPURI.parse(uri.format()) == uri
