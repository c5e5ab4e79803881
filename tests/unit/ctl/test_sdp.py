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


SHA1 = bytes.fromhex("72245FE8653DDAF371362F86D471913EE4A2CE2E")
PICTURE = sdp.FileSelector("My cool picture.jpg", "image/jpeg", 32349, SHA1, "vBnG916bdberum2f")


def test_a_file_offer_is_sendonly_with_the_rfc_5547_selector_and_transfer_id() -> None:
    body = sdp.build([RELAY, OWN], ("image/jpeg",), "sendonly", PICTURE).decode()
    assert "a=accept-types:image/jpeg\r\na=path:" in body
    assert body.endswith(
        "a=sendonly\r\n"
        'a=file-selector:name:"My cool picture.jpg" type:image/jpeg size:32349'
        " hash:sha-1:72:24:5F:E8:65:3D:DA:F3:71:36:2F:86:D4:71:91:3E:E4:A2:CE:2E\r\n"
        "a=file-transfer-id:vBnG916bdberum2f\r\n"
    )
    media = sdp.parse(body.encode())
    assert media == sdp.MSRPMedia([RELAY, OWN], ["image/jpeg"], "sendonly", PICTURE)


def test_a_chat_session_is_sendrecv_and_carries_no_file() -> None:
    media = sdp.parse(sdp.build([OWN]))
    assert media.direction == "sendrecv" and media.file is None
    assert "a=sendonly" not in sdp.build([OWN]).decode()


def test_a_name_with_quotes_percent_and_non_ascii_survives_the_round_trip() -> None:
    odd = sdp.FileSelector('a "b" 100%\r\n ünï.txt', "text/plain", 0, None, "id-1")
    (selector, _) = odd.attributes()
    assert (
        selector == 'a=file-selector:name:"a %22b%22 100%25%0D%0A ünï.txt" type:text/plain size:0'
    )
    media = sdp.parse(sdp.build([OWN], ("text/plain",), "recvonly", odd))
    assert media.direction == "recvonly" and media.file == odd


def test_selectors_in_any_order_lower_case_hash_and_a_default_type_are_read() -> None:
    value = "size:3 hash:sha-1:" + ":".join(["ab"] * 20) + ' name:"x"'
    selector = sdp.parse_file_selector(value, "t")
    assert selector == sdp.FileSelector("x", "application/octet-stream", 3, b"\xab" * 20, "t")


@pytest.mark.parametrize(
    ("value", "transfer_id", "reason"),
    [
        ('name:"x"', "t", "no file name and size"),
        ("size:3", "t", "no file name and size"),
        ('name:"x" size:3 hash:md5:' + ":".join(["00"] * 16), "t", "only sha-1"),
        ('name:"x" size:3 hash:sha-1:00:11', "t", "not 20 bytes"),
        ('name:"x" size:3 colour:red', "t", "unreadable file-selector"),
        ('name:"x size:3', "t", "unreadable file-selector"),
        ('name:"x" size:3', "", "no file-transfer-id"),
        ('name:"x" size:-3', "t", "unreadable file-selector"),
    ],
)
def test_a_file_selector_we_cannot_use_is_refused_with_the_reason(
    value: str, transfer_id: str, reason: str
) -> None:
    with pytest.raises(sdp.SDPError, match=reason):
        sdp.parse_file_selector(value, transfer_id)


def test_a_bad_file_selector_in_an_offer_makes_the_sdp_unusable() -> None:
    body = sdp.build([OWN]) + b"a=sendonly\r\na=file-selector:size:x\r\n"
    with pytest.raises(sdp.SDPError, match="unreadable file-selector"):
        sdp.parse(body)
