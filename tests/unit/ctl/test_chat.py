"""The pure parts of ``relayctl chat``: addresses, the 470 message, printing messages,
whose file offers are taken, and where files go."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from relayd.ctl import chat
from relayd.ctl import main as ctl
from relayd.ctl.settings import CtlError
from relayd.ctl.sipua import CallRefused
from relayd.msrp.message import ByteRange, Headers, MSRPRequest
from relayd.sip.message import Headers as SIPHeaders
from relayd.sip.message import SIPRequest
from relayd.sipuri import SIPURI, NameAddr


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("example.com", "example.com"),
        ("127.0.0.1:5070", "127.0.0.1"),
        ("[::1]:5060", "[::1]"),
        ("::1", "[::1]"),
    ],
)
def test_the_sip_domain_defaults_to_the_relays_host_as_a_uri_writes_it(
    text: str, host: str
) -> None:
    assert chat.host_of(text) == host


def test_a_bare_user_name_is_called_in_the_domain_and_a_uri_as_given() -> None:
    assert chat.target_uri("bob", "example.com") == "sip:bob@example.com"
    assert (
        chat.target_uri("sip:friends@lists.example", "example.com") == "sip:friends@lists.example"
    )
    with pytest.raises(CtlError, match="cannot call"):
        chat.target_uri("sip:", "example.com")


def test_a_470_says_who_has_not_consented_and_how_to_ask() -> None:
    missing = [
        NameAddr(SIPURI.parse("sip:consent-a@example.com"), "sip:carol@example.com"),
        NameAddr(SIPURI.parse("sip:consent-b@example.com")),
    ]
    text = str(
        chat.refusal(
            "sip:friends@example.com",
            CallRefused(470, "Consent Needed", missing),
            "sip:alice@example.com",
        )
    )
    assert text.startswith("sip:friends@example.com: 470 Consent Needed:")
    assert "calls from sip:alice@example.com" in text
    assert (
        "missing: sip:carol@example.com (sip:consent-a@example.com), sip:consent-b@example.com."
        in text
    )
    assert "CONSENT (Consent-Methods: INVITE)" in text
    busy = chat.refusal(
        "sip:bob@example.com", CallRefused(486, "Busy Here", []), "sip:alice@example.com"
    )
    assert str(busy) == "sip:bob@example.com did not answer the call: 486 Busy Here"
    for status, meaning in ((404, "no such user or list"), (480, "not registered now")):
        away = chat.refusal("sip:bob@example.com", CallRefused(status, "X", []), "sip:a@b")
        assert str(away) == f"sip:bob@example.com: {status} X: {meaning}"


def _send(
    printer: chat.Printer, message_id: str, data: bytes, flag: bytes, kind: str = "text/plain"
) -> None:
    request = MSRPRequest(
        "t", "SEND", Headers([("Message-ID", message_id), ("Content-Type", kind)])
    )
    printer.chunk_started(request, ByteRange(1, None, None))
    printer.chunk_data(data)
    printer.chunk_ended(flag)


def test_each_complete_message_is_one_line_interleaved_chunks_and_all() -> None:
    out = io.StringIO()
    printer = chat.Printer(out)
    printer.peer = "sip:bob@example.com"
    _send(printer, "m1", "hél".encode(), b"+")
    _send(printer, "m2", b"image", b"$", "image/png")
    _send(printer, "m1", b"lo\r\n", b"$")
    _send(printer, "m3", b"given up", b"#")
    assert out.getvalue() == (
        "sip:bob@example.com: [5 bytes of image/png]\nsip:bob@example.com: héllo\n"
    )


def test_a_message_longer_than_a_line_is_shown_shortened() -> None:
    out = io.StringIO()
    printer = chat.Printer(out)
    _send(printer, "m", b"x" * (chat.MAX_LINE_BYTES + 10), b"$")
    assert out.getvalue().endswith(f" … ({chat.MAX_LINE_BYTES + 10} bytes, shortened)\n")
    assert out.getvalue().count("x") == chat.MAX_LINE_BYTES


def _invite(**headers: str) -> SIPRequest:
    return SIPRequest(
        "INVITE",
        SIPURI.parse("sip:bob@127.0.0.1"),
        SIPHeaders([(name.replace("_", "-"), value) for name, value in headers.items()]),
    )


def test_a_file_offer_is_known_by_the_relays_asserted_identity_else_its_from() -> None:
    asserted = _invite(From="<sip:mallory@x>;tag=1", P_Asserted_Identity="<sip:alice@x>")
    assert chat.identity(asserted) == "sip:alice@x"
    assert chat.identity(_invite(From='"Al" <sip:alice@x>;tag=1')) == "sip:alice@x"
    assert chat.identity(_invite()) == ""


def test_the_save_directory_must_exist_and_be_writable(tmp_path: Path) -> None:
    assert chat.check_save_dir(tmp_path) == tmp_path
    with pytest.raises(CtlError, match="not a directory"):
        chat.check_save_dir(tmp_path / "gone")


def test_chat_takes_a_save_directory() -> None:
    args = ctl.build_parser().parse_args(
        ["chat", "--answer", "--via", "msrps://r", "--save-dir", "in"]
    )
    assert args.save_dir == Path("in")
    args = ctl.build_parser().parse_args(["chat", "bob", "--via", "msrps://r"])
    assert args.save_dir is None
