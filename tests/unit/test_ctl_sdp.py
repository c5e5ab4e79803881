"""The MSRP SDP of ``relayctl chat`` (RFC 4975 §8, RFC 4976 §5.1)."""

from __future__ import annotations

import pytest

from relayd.ctl import sdp

RELAY = "msrps://127.0.0.1:2855;tcp"
OWN = "msrps://client.invalid:2855/s3ss10n;tcp"


def test_an_offer_carries_the_path_through_the_relay_and_the_accepted_types() -> None:
    body = sdp.build([RELAY, OWN]).decode()
    assert "m=message 2855 TCP/TLS/MSRP *\r\n" in body
    assert "a=accept-types:text/plain\r\n" in body
    assert body.endswith(f"a=path:{RELAY} {OWN}\r\n")
    assert sdp.parse(body.encode()) == sdp.MSRPMedia([RELAY, OWN], ["text/plain"])


def test_plain_msrp_and_ipv6_are_described_as_such() -> None:
    body = sdp.build(["msrp://[::1]:3000/abc;tcp"]).decode()
    assert "m=message 3000 TCP/MSRP *" in body
    assert "c=IN IP6 ::1" in body


def test_the_msrp_stream_is_found_among_others_and_its_own_attributes_read() -> None:
    body = (
        "v=0\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
        "m=audio 4000 RTP/AVP 0\r\na=path:msrp://wrong.example:1/x;tcp\r\n"
        f"m=message 2855 TCP/TLS/MSRP *\r\na=accept-types:text/* message/cpim\r\na=path:{OWN}\r\n"
        "m=video 5000 RTP/AVP 31\r\na=accept-types:nope/nope\r\n"
    ).encode()
    media = sdp.parse(body)
    assert media.path == [OWN]
    assert media.accept_types == ["text/*", "message/cpim"]
    assert sdp.accepts(media, "text/plain")
    assert not sdp.accepts(media, "image/png")
    assert sdp.accepts(sdp.MSRPMedia([OWN], ["*"]), "image/png")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"v=0\r\nm=audio 4000 RTP/AVP 0\r\n", "no MSRP media line"),
        (b"m=message 2855 TCP/TLS/MSRP *\r\na=accept-types:text/plain\r\n", "no a=path"),
        (f"m=message 2855 TCP/TLS/MSRP *\r\na=path:{OWN}\r\n".encode(), "no a=accept-types"),
        (
            b"m=message 2855 TCP/TLS/MSRP *\r\na=accept-types:text/plain\r\na=path:http://x/\r\n",
            "bad URI in a=path",
        ),
        (b"\xff\xfe", "not UTF-8"),
        (b"v=0\r\n" * 5000, "longer than"),
    ],
)
def test_an_sdp_without_a_usable_msrp_session_is_refused_with_the_reason(
    body: bytes, reason: str
) -> None:
    with pytest.raises(sdp.SDPError, match=reason):
        sdp.parse(body)
