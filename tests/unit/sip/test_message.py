"""Headers, Via/CSeq helpers, serialisation and make_response (RFC 3261 §7, §8.2.6, §20)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.sip.message import (
    CSeq,
    Headers,
    SIPHeaderError,
    SIPRequest,
    SIPResponse,
    SIPStatus,
    Via,
    make_response,
    reason_phrase,
    response_for_status,
    split_header_values,
    stateless_tag,
    tag_of,
)
from relayd.sipuri import SIPURI


def _request(**extra: str) -> SIPRequest:
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP proxy.example.com;branch=z9hG4bK1, SIP/2.0/UDP a.example.com"),
            ("Via", "SIP/2.0/TCP b.example.com;branch=z9hG4bK3"),
            ("From", '"Alice" <sip:alice@example.com>;tag=f1'),
            ("To", "<sip:list@relay.example.com>"),
            ("Call-ID", "c1@example.com"),
            ("CSeq", "7 MESSAGE"),
            ("Max-Forwards", "70"),
            ("Contact", "<sip:alice@192.0.2.1>"),
            ("Timestamp", "54"),
        ]
    )
    for name, value in extra.items():
        headers.set(name.replace("_", "-"), value)
    return SIPRequest("MESSAGE", SIPURI.parse("sip:list@relay.example.com"), headers, b"hi")


# ------------------------------------------------------------------------------ Headers


def test_headers_case_insensitive_and_compact_forms() -> None:
    h = Headers([("v", "SIP/2.0/UDP h"), ("i", "abc"), ("CALL-ID", "def"), ("l", "0")])
    assert h.get("via") == "SIP/2.0/UDP h"
    assert h.get_all("Call-Id") == ["abc", "def"]
    assert "content-length" in h
    assert "L" in h
    assert list(h) == [
        ("Via", "SIP/2.0/UDP h"),
        ("Call-ID", "abc"),
        ("Call-ID", "def"),
        ("Content-Length", "0"),
    ]


@pytest.mark.parametrize(
    ("compact", "full"),
    [
        ("i", "Call-ID"),
        ("m", "Contact"),
        ("e", "Content-Encoding"),
        ("l", "Content-Length"),
        ("c", "Content-Type"),
        ("f", "From"),
        ("s", "Subject"),
        ("k", "Supported"),
        ("t", "To"),
        ("v", "Via"),
        ("o", "Event"),
        ("r", "Refer-To"),
        ("b", "Referred-By"),
        ("u", "Allow-Events"),
        ("x", "Session-Expires"),
        ("y", "Identity"),
        ("a", "Accept-Contact"),
        ("j", "Reject-Contact"),
        ("d", "Request-Disposition"),
    ],
)
def test_every_compact_form_expands(compact: str, full: str) -> None:
    h = Headers([(compact.upper(), "x")])
    assert list(h) == [(full, "x")]
    assert h.get(full.lower()) == "x"


def test_canonical_names_for_unusual_spellings() -> None:
    h = Headers([("cseq", "1 A"), ("www-authenticate", "Digest x"), ("x-custom-thing", "1")])
    assert [name for name, _ in h] == ["CSeq", "WWW-Authenticate", "X-Custom-Thing"]


def test_list_headers_split_on_commas_outside_quotes_and_brackets() -> None:
    h = Headers(
        [
            ("Contact", '"Doe, John" <sip:j@h;p=a,b>;q=0.5, <sip:k@h>'),
            ("Contact", "sip:l@h"),
        ]
    )
    assert h.get_all("m") == ['"Doe, John" <sip:j@h;p=a,b>;q=0.5', "<sip:k@h>", "sip:l@h"]
    assert h.get("contact") == '"Doe, John" <sip:j@h;p=a,b>;q=0.5'
    assert h.get_raw("contact")[0].count(",") == 3


def test_auth_and_date_headers_are_never_split() -> None:
    digest = 'Digest realm="a,b", nonce="n", qop="auth,auth-int"'
    h = Headers(
        [
            ("WWW-Authenticate", digest),
            ("Authorization", digest),
            ("Proxy-Authenticate", digest),
            ("Proxy-Authorization", digest),
            ("Date", "Sat, 13 Nov 2010 23:29:00 GMT"),
            ("X-Unknown", "a, b"),
        ]
    )
    assert h.get_all("www-authenticate") == [digest]
    assert h.get_all("authorization") == [digest]
    assert h.get_all("proxy-authenticate") == [digest]
    assert h.get_all("proxy-authorization") == [digest]
    assert h.get("date") == "Sat, 13 Nov 2010 23:29:00 GMT"
    assert h.get_all("x-unknown") == ["a, b"]


def test_split_header_values_drops_empty_elements() -> None:
    assert split_header_values("INVITE, ,ACK,") == ["INVITE", "ACK"]
    assert split_header_values("  ") == []


def test_headers_set_remove_add_first_copy() -> None:
    h = Headers([("Via", "SIP/2.0/UDP a"), ("Route", "<sip:r1>")])
    h.add_first("v", "SIP/2.0/UDP top")
    assert h.get_all("via") == ["SIP/2.0/UDP top", "SIP/2.0/UDP a"]
    c = h.copy()
    h.set("Via", "SIP/2.0/UDP only")
    h.remove("route")
    assert h.get_all("via") == ["SIP/2.0/UDP only"]
    assert "route" not in h
    assert c.get_all("via") == ["SIP/2.0/UDP top", "SIP/2.0/UDP a"]
    assert len(c) == 3
    assert h.get("missing", "dflt") == "dflt"


# ---------------------------------------------------------------------------------- Via


def test_via_parse_with_params_and_unusual_whitespace() -> None:
    via = Via.parse(
        "SIP  /   2.0 /UDP  192.0.2.2 : 5070 ; rport ; branch = z9hG4bKx ;received=1.2.3.4"
    )
    assert (via.protocol, via.version, via.transport) == ("SIP", "2.0", "UDP")
    assert (via.host, via.port) == ("192.0.2.2", 5070)
    assert via.branch == "z9hG4bKx"
    assert via.rport_requested
    assert via.rport is None
    assert via.received == "1.2.3.4"


def test_via_ipv6_sent_by_and_rport_value() -> None:
    via = Via.parse("SIP/2.0/tls [2001:db8::9]:5061;branch=z9hG4bKa;rport=4444")
    assert via.transport == "TLS"
    assert via.host == "2001:db8::9"
    assert via.port == 5061
    assert via.rport == 4444
    assert via.format() == "SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bKa;rport=4444"


def test_via_with_param_for_received_and_rport() -> None:
    via = Via.parse("SIP/2.0/UDP h;rport;branch=z9hG4bK1")
    updated = via.with_param("received", "192.0.2.7").with_param("rport", "5099")
    assert updated.format() == "SIP/2.0/UDP h;branch=z9hG4bK1;received=192.0.2.7;rport=5099"


def test_via_sent_by_is_case_insensitive() -> None:
    assert Via.parse("SIP/2.0/UDP HOST.example;branch=z9hG4bK1").sent_by == ("host.example", None)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SIP/2.0 host",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP host:port",
        "SIP/2.0/UDP host:99999",
        "SIP/2.0/UDP [::1",
        "SIP/2.0/UDP [junk]",
        "SIP/2.0/UDP host;=x",
        'SIP/2.0/UDP host;a="unterminated',
        "SIP/2.0/UDP <host>",
    ],
)
def test_bad_via_raises(text: str) -> None:
    with pytest.raises(SIPHeaderError):
        Via.parse(text)


# --------------------------------------------------------------------- CSeq, tags, MF


def test_cseq_parse() -> None:
    assert CSeq.parse("  4711   MESSAGE ") == CSeq(4711, "MESSAGE")
    assert CSeq(1, "INVITE").format() == "1 INVITE"


@pytest.mark.parametrize(
    "text", ["", "1", "x MESSAGE", "-1 MESSAGE", "2147483648 MESSAGE", "1 A B"]
)
def test_bad_cseq_raises(text: str) -> None:
    with pytest.raises(SIPHeaderError):
        CSeq.parse(text)


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("<sip:a@b>;tag=xyz", "xyz"),
        ("<sip:a@b;tag=inside>", None),
        ("sip:a@b;TAG=abc;x=1", "abc"),
        ('"A;tag=fake" <sip:a@b>', None),
        ("sip:a@b", None),
        (None, None),
        ("<sip:a@b>;tagx=1", None),
    ],
)
def test_tag_of(value: str | None, tag: str | None) -> None:
    assert tag_of(value) == tag


def test_message_accessors() -> None:
    req = _request()
    assert req.call_id == "c1@example.com"
    assert req.cseq == CSeq(7, "MESSAGE")
    assert req.via.host == "proxy.example.com"
    assert [v.host for v in req.vias] == ["proxy.example.com", "a.example.com", "b.example.com"]
    assert req.from_tag == "f1"
    assert req.to_tag is None
    assert req.max_forwards == 70


@pytest.mark.parametrize("value", ["256", "-1", "abc", "0070x"])
def test_bad_max_forwards_raises(value: str) -> None:
    with pytest.raises(SIPHeaderError):
        _ = _request(Max_Forwards=value).max_forwards


# ------------------------------------------------------------------------ serialisation


def test_to_bytes_fixes_content_length_and_expands_compact_names() -> None:
    headers = Headers([("v", "SIP/2.0/UDP h;branch=z9hG4bK1"), ("l", "999"), ("c", "text/plain")])
    req = SIPRequest("MESSAGE", SIPURI.parse("sip:b@h"), headers, "héllo".encode())
    assert req.to_bytes() == (
        b"MESSAGE sip:b@h SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 6\r\n\r\n" + "héllo".encode()
    )


def test_response_to_bytes() -> None:
    resp = SIPResponse(470, "Consent Needed", Headers([("Call-ID", "x")]))
    assert (
        resp.to_bytes() == b"SIP/2.0 470 Consent Needed\r\nCall-ID: x\r\nContent-Length: 0\r\n\r\n"
    )


# ------------------------------------------------------------------------ make_response


def test_make_response_copies_per_8_2_6() -> None:
    req = _request()
    resp = make_response(req, 200)
    assert resp.status == 200
    assert resp.reason == "OK"
    assert resp.headers.get_raw("via") == req.headers.get_raw("via")
    assert resp.headers.get("from") == req.headers.get("from")
    assert resp.headers.get("call-id") == "c1@example.com"
    assert resp.headers.get("cseq") == "7 MESSAGE"
    to_tag = resp.to_tag
    assert to_tag is not None
    assert len(to_tag) >= 8
    assert resp.headers.get("to", "").startswith("<sip:list@relay.example.com>;tag=")
    for absent in ("contact", "max-forwards", "timestamp"):
        assert absent not in resp.headers
    assert resp.body == b""


def test_make_response_keeps_existing_to_tag_and_uses_given_tag() -> None:
    assert make_response(_request(To="<sip:b@h>;tag=dialog"), 481).to_tag == "dialog"
    assert make_response(_request(), 202, to_tag="mine").to_tag == "mine"


def test_make_response_100_has_no_to_tag_but_echoes_timestamp() -> None:
    resp = make_response(_request(), 100)
    assert resp.to_tag is None
    assert resp.headers.get("timestamp") == "54"


def test_make_response_extra_headers_reason_and_body() -> None:
    resp = make_response(
        _request(), 405, headers=[("Allow", "MESSAGE, OPTIONS")], body=b"x", reason="Nope"
    )
    assert resp.reason == "Nope"
    assert resp.headers.get_all("allow") == ["MESSAGE", "OPTIONS"]
    assert resp.body == b"x"


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        (202, "Accepted"),
        (423, "Interval Too Brief"),
        (470, "Consent Needed"),
        (481, "Call/Transaction Does Not Exist"),
        (482, "Loop Detected"),
        (483, "Too Many Hops"),
        (489, "Bad Event"),
        (503, "Service Unavailable"),
        (499, "Client Error"),
        (699, "Global Failure"),
    ],
)
def test_reason_phrases(status: int, phrase: str) -> None:
    assert reason_phrase(status) == phrase
    assert make_response(_request(), status).reason == phrase


def test_sip_status_becomes_response() -> None:
    error = SIPStatus(423, headers=[("Min-Expires", "60")])
    assert error.reason == "Interval Too Brief"
    resp = response_for_status(_request(), error)
    assert (resp.status, resp.reason) == (423, "Interval Too Brief")
    assert resp.headers.get("min-expires") == "60"


# Mostly well-formed parts, so that most examples take the fast path, with the
# odd part the fast path must leave to the general parser.
_VIA_PROTOCOLS = st.sampled_from(["SIP/2.0/"] * 6 + ["sip/2.0/", "SIP / 2.0 / "])
_VIA_TRANSPORTS = st.sampled_from(["UDP", "tcp", "TLS", "SCTP", "ws", "UD P", ""])
_VIA_GAPS = st.sampled_from([" "] * 6 + ["  ", "\t"])
_VIA_HOSTS = st.sampled_from(
    ["127.0.0.1", "Proxy.Example.COM", "[::1]", "[2001:db8::5]", "[::1", "a@b", "", "h;x"]
)
_VIA_PORTS = st.sampled_from(["", ":5060", ":0", ":65535", ":65536", ":99999", ":", ":5x"])
_VIA_PARAMS = st.lists(
    st.tuples(
        st.sampled_from(["branch", "RPort", "received", "MADDR", "x~y", "", "b r"]),
        st.sampled_from(
            [None, "z9hG4bK-1-2", "10.0.0.1", "::1", "a=b", '"q"', "", "é", "x y", "a<b"]
        ),
    ),
    max_size=4,
)


@settings(max_examples=500)
@given(_VIA_PROTOCOLS, _VIA_TRANSPORTS, _VIA_GAPS, _VIA_HOSTS, _VIA_PORTS, _VIA_PARAMS)
def test_via_fast_path_reads_what_the_general_parser_reads(
    protocol: str,
    transport: str,
    gap: str,
    host: str,
    port: str,
    params: list[tuple[str, str | None]],
) -> None:
    text = protocol + transport + gap + host + port
    text += "".join(f";{n}" if v is None else f";{n}={v}" for n, v in params)

    def outcome(parse: Callable[[str], Via]) -> object:
        try:
            return parse(text)
        except SIPHeaderError:
            return "refused"

    assert outcome(Via._parse) == outcome(Via._parse_general)


def test_stateless_tags_repeat_for_a_retransmission_only() -> None:
    request = _request()
    again = _request()
    assert stateless_tag(request) == stateless_tag(again)
    assert len(stateless_tag(request)) == 16
    other = _request()
    other.headers.set("Via", "SIP/2.0/UDP proxy.example.com;branch=z9hG4bK2")
    assert stateless_tag(other) != stateless_tag(request)
    other = _request(CSeq="8 MESSAGE")
    assert stateless_tag(other) != stateless_tag(request)


@given(
    st.sampled_from(["via", "contact", "route", "allow", "subject"]),
    st.lists(
        st.lists(
            st.sampled_from(
                ["SIP/2.0/UDP a;branch=x", " ", "", "<sip:a,b@c>", '"x, y" <sip:d>', "b", "c "]
            ),
            max_size=3,
        ).map(",".join),
        min_size=1,
        max_size=3,
    ),
)
def test_first_is_get_for_its_lookup_key(key: str, rows: list[str]) -> None:
    headers = Headers([(key, row) for row in rows])
    assert headers.first(key) == headers.get(key)
