"""SIP URI parsing, formatting and RFC 3261 §19.1.4 comparison."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.sipuri import SIPURI, NameAddr, SIPURIError, UnsupportedURIScheme, parse_params


def test_parse_all_components() -> None:
    uri = SIPURI.parse("sips:alice:secret@Example.COM:5061;transport=TCP;lr?Subject=hi%20there&X=1")
    assert uri.scheme == "sips"
    assert uri.user == "alice"
    assert uri.password == "secret"
    assert uri.host == "Example.COM"
    assert uri.port == 5061
    assert uri.params == (("transport", "TCP"), ("lr", None))
    assert uri.headers == (("Subject", "hi there"), ("X", "1"))
    assert uri.transport == "tcp"
    assert uri.param("lr") == ""
    assert uri.param("maddr") is None
    assert uri.has_param("LR")


def test_parse_without_user() -> None:
    uri = SIPURI.parse("sip:example.com")
    assert uri.user is None
    assert uri.host == "example.com"
    assert uri.port is None


def test_escaped_user_is_decoded_and_reescaped() -> None:
    uri = SIPURI.parse("sip:sips%3Auser%40example.com@example.net")
    assert uri.user == "sips:user@example.com"
    assert uri.host == "example.net"
    assert uri.format() == "sip:sips%3Auser%40example.com@example.net"


def test_user_may_contain_semicolon_and_question_mark() -> None:
    uri = SIPURI.parse("sip:alice;day=tuesday@atlanta.com")
    assert uri.user == "alice;day=tuesday"
    assert uri.params == ()


def test_ipv6_reference_with_port() -> None:
    uri = SIPURI.parse("sip:bob@[2001:db8::10]:5070;maddr=x")
    assert uri.host == "2001:db8::10"
    assert uri.port == 5070
    assert uri.format() == "sip:bob@[2001:db8::10]:5070;maddr=x"


def test_ipv6_equality_ignores_textual_form() -> None:
    assert SIPURI.parse("sip:[2001:db8::1]") == SIPURI.parse("sip:[2001:DB8:0:0:0:0:0:1]")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # The equivalent pairs listed in RFC 3261 §19.1.4.
        ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
        ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
        ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
        ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;security=on"),
        (
            "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
            "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
        ),
        (
            "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
            "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
        ),
    ],
)
def test_equivalent_uris(a: str, b: str) -> None:
    ua, ub = SIPURI.parse(a), SIPURI.parse(b)
    assert ua == ub
    assert hash(ua) == hash(ub)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # The non-equivalent pairs listed in RFC 3261 §19.1.4.
        ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
        ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
        ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
        ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
        ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
        ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
        # Further rules of the same section.
        ("sip:alice@atlanta.com", "sips:alice@atlanta.com"),
        ("sip:alice@atlanta.com", "sip:atlanta.com"),
        ("sip:alice:pw@atlanta.com", "sip:alice@atlanta.com"),
        ("sip:a@h;user=phone", "sip:a@h"),
        ("sip:a@h;ttl=1", "sip:a@h"),
        ("sip:a@h;method=INVITE", "sip:a@h"),
        ("sip:a@h;maddr=1.2.3.4", "sip:a@h"),
        ("sip:a@h;foo=1", "sip:a@h;foo=2"),
        ("sip:a@h?Subject=x", "sip:a@h?Subject=X"),
    ],
)
def test_non_equivalent_uris(a: str, b: str) -> None:
    assert SIPURI.parse(a) != SIPURI.parse(b)


def test_uri_usable_as_dict_key() -> None:
    table = {SIPURI.parse("sip:alice@atlanta.com;transport=TCP"): 1}
    assert table[SIPURI.parse("sip:%61lice@ATLANTA.com;transport=tcp")] == 1


def test_tel_uri_ignores_visual_separators() -> None:
    a = SIPURI.parse("tel:+1-201-555-0123")
    b = SIPURI.parse("tel:+1.201.555.0123")
    assert a.scheme == "tel"
    assert a.user == "+1-201-555-0123"
    assert a == b
    assert hash(a) == hash(b)
    assert SIPURI.parse("tel:7042;phone-context=example.com").param("phone-context") == (
        "example.com"
    )
    assert a.format() == "tel:+1-201-555-0123"


@pytest.mark.parametrize(
    "text",
    [
        "sip:",
        "sip",
        "sip:@example.com",
        "sip:alice@",
        "sip:alice@example.com:99999",
        "sip:alice@example.com:5o60",
        "sip:alice@[2001:db8::1",
        "sip:alice@[not-ipv6]",
        "sip:alice@[::1]x",
        "sip:a b@example.com",
        "sip:a<b@example.com",
        "sip:alice@exa mple.com",
        "sip:alice@example.com;=x",
        "sip:alice@example.com;a=b c",
        "sip:alice@example.com?novalue",
        "sip:%ZZ@example.com",
        "sip:%C3%28@example.com",
        "tel:",
        "tel:abc@x",
    ],
)
def test_malformed_uris_raise(text: str) -> None:
    with pytest.raises(SIPURIError):
        SIPURI.parse(text)


def test_unsupported_scheme_is_distinguishable() -> None:
    with pytest.raises(UnsupportedURIScheme):
        SIPURI.parse("im:alice@example.com")
    with pytest.raises(UnsupportedURIScheme):
        SIPURI.parse("http://example.com/")


def test_with_param_replaces_existing() -> None:
    uri = SIPURI.parse("sip:a@h;transport=udp;lr")
    assert uri.with_param("Transport", "tcp").format() == "sip:a@h;lr;transport=tcp"
    assert uri.without_param("lr").format() == "sip:a@h;transport=udp"


def test_aor_drops_port_params_and_headers() -> None:
    assert SIPURI.parse("sip:Alice@Atlanta.com:5070;lr?X=1").aor == "sip:Alice@atlanta.com"


def test_format_escapes_what_the_grammar_requires() -> None:
    uri = SIPURI(scheme="sip", host="example.com", user="a b@c", params=(("p", "x y"),))
    assert uri.format() == "sip:a%20b%40c@example.com;p=x%20y"
    assert SIPURI.parse(uri.format()) == uri


_user = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1)
_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10)


@given(
    user=st.none() | _user,
    host=st.sampled_from(["example.com", "192.0.2.1", "2001:db8::1", "a-b.c"]),
    port=st.none() | st.integers(0, 65535),
    params=st.lists(st.tuples(_token, st.none() | _user), max_size=3, unique_by=lambda p: p[0]),
)
def test_format_parse_round_trip(
    user: str | None, host: str, port: int | None, params: list[tuple[str, str | None]]
) -> None:
    uri = SIPURI(scheme="sip", host=host, user=user, port=port, params=tuple(params))
    parsed = SIPURI.parse(uri.format())
    assert parsed == uri
    assert parsed.user == user
    assert parsed.params == uri.params


# -------------------------------------------------------------------------- name-addr


def test_name_addr_with_quoted_display_name() -> None:
    na = NameAddr.parse('"Alice \\"A\\", Smith" <sip:alice@atlanta.com;lr>;tag=1928301774')
    assert na.display_name == 'Alice "A", Smith'
    assert na.uri.params == (("lr", None),)
    assert na.tag == "1928301774"
    assert NameAddr.parse(na.format()) == na


def test_name_addr_with_token_display_name() -> None:
    na = NameAddr.parse("Bob   Smith <sip:bob@biloxi.com>")
    assert na.display_name == "Bob Smith"
    assert na.format() == "Bob Smith <sip:bob@biloxi.com>"


def test_addr_spec_params_belong_to_the_header() -> None:
    # RFC 3261 §20.10: without angle brackets, ";tag" is a header parameter.
    na = NameAddr.parse("sip:alice@atlanta.com;tag=88sja8x;expires=60")
    assert na.uri == SIPURI.parse("sip:alice@atlanta.com")
    assert na.uri.params == ()
    assert na.params == (("tag", "88sja8x"), ("expires", "60"))
    assert na.display_name is None


def test_name_addr_uri_params_stay_inside_brackets() -> None:
    na = NameAddr.parse("<sip:alice@atlanta.com;transport=tcp>;tag=x")
    assert na.uri.param("transport") == "tcp"
    assert na.param("transport") is None
    assert na.tag == "x"


def test_name_addr_lws_around_params_and_quoted_values() -> None:
    na = NameAddr.parse('<sip:a@b> ; tag = abc ; +sip.instance="<urn:uuid:1;2>"')
    assert na.tag == "abc"
    assert na.param("+sip.instance") == '"<urn:uuid:1;2>"'


def test_name_addr_with_param() -> None:
    na = NameAddr.parse("<sip:a@b>").with_param("tag", "t1")
    assert na.format() == "<sip:a@b>;tag=t1"


@pytest.mark.parametrize(
    "text",
    [
        '"unterminated <sip:a@b>',
        '"Alice" sip:a@b',
        "<sip:a@b",
        "Al<ice <sip:a@b>",
        "<sip:a@b>;tag=",
        "<sip:a@b>;=x",
        "<sip:a@b>;tag=a b",
        "<mailto:a@b>",
    ],
)
def test_malformed_name_addr_raises(text: str) -> None:
    with pytest.raises(SIPURIError):
        NameAddr.parse(text)


def test_parse_params_unterminated_quote_raises() -> None:
    with pytest.raises(SIPURIError):
        parse_params(';a="x;b=1')
