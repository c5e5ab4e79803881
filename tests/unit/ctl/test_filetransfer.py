"""``/file`` in ``relayctl chat``: the command, the names a received file may take, and
what a received file is checked against (RFC 5547 §8)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from twisted.internet import defer

from relayd.ctl import filetransfer, sdp
from relayd.ctl.receiving import IncomingMessage
from relayd.ctl.settings import CtlError
from relayd.msrp.message import ByteRange, Headers, MSRPRequest


def test_a_file_command_takes_the_rest_of_the_line_as_the_path() -> None:
    assert filetransfer.file_command("/file my notes.txt") == "my notes.txt"
    assert filetransfer.file_command("/file  /tmp/x ") == "/tmp/x"
    assert filetransfer.file_command("hello") is None
    assert filetransfer.file_command("/filex") is None
    with pytest.raises(CtlError, match="give the path"):
        filetransfer.file_command("/file")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "not a file name"),
        ("..", "not a file name"),
        ("../etc/passwd", "names a directory"),
        ("a/b", "names a directory"),
        ("a\\b", "names a directory"),
        ("bell\x07", "control characters"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_a_name_that_could_leave_the_save_directory_is_refused(name: str, reason: str) -> None:
    with pytest.raises(CtlError, match=reason):
        filetransfer.save_name(name)


def test_a_plain_name_is_kept() -> None:
    assert filetransfer.save_name("Ünï photo.2.jpg") == "Ünï photo.2.jpg"


def test_an_existing_file_is_never_overwritten_a_new_name_is_taken(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"mine")
    (tmp_path / "a-1.txt").write_bytes(b"mine too")
    path, handle = filetransfer.create_unused(tmp_path, "a.txt")
    handle.close()
    assert path == tmp_path / "a-2.txt"
    assert (tmp_path / "a.txt").read_bytes() == b"mine"
    path, handle = filetransfer.create_unused(tmp_path, "b")
    handle.close()
    assert path == tmp_path / "b"


def test_a_missing_save_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CtlError, match=r"cannot save a\.txt in"):
        filetransfer.create_unused(tmp_path / "gone", "a.txt")


def test_only_a_sendonly_session_with_a_file_selector_is_a_file_offer() -> None:
    selector = sdp.FileSelector("a", "text/plain", 1, None, "t")
    assert filetransfer.is_file_offer(sdp.MSRPMedia(["x"], ["*"], "sendonly", selector))
    assert not filetransfer.is_file_offer(sdp.MSRPMedia(["x"], ["*"], "sendrecv", selector))
    assert not filetransfer.is_file_offer(sdp.MSRPMedia(["x"], ["*"], "sendonly"))


def _send(message_id: str, byte_range: str) -> MSRPRequest:
    return MSRPRequest(
        "t1", "SEND", Headers([("Message-ID", message_id), ("Byte-Range", byte_range)])
    )


def _sink(tmp_path: Path, size: int) -> filetransfer._FileSink:
    path, handle = filetransfer.create_unused(tmp_path, "in.bin")
    return filetransfer._FileSink(size, path, handle)


def _chunk(
    sink: filetransfer._FileSink, message_id: str, byte_range: str, data: bytes, flag: bytes
) -> None:
    request = _send(message_id, byte_range)
    target = sink.sink_for(request)
    if target is None:
        return
    target.chunk_started(request, ByteRange.parse(byte_range))
    target.chunk_data(data)
    target.chunk_ended(flag)


def test_the_first_message_is_written_where_its_byte_ranges_say_and_others_dropped(
    tmp_path: Path,
) -> None:
    sink = _sink(tmp_path, 6)
    _chunk(sink, "m1", "4-6/6", b"def", b"+")
    _chunk(sink, "other", "1-6/6", b"XXXXXX", b"$")  # not the file's message
    assert not sink.done.called
    _chunk(sink, "m1", "1-3/6", b"abc", b"$")
    assert sink.done.called
    assert sink.message.path.read_bytes() == b"abcdef"


def _failure(done: defer.Deferred[IncomingMessage]) -> str:
    got: list[str] = []
    done.addErrback(lambda f: got.append(str(f.value)))
    assert got, "not failed"
    return got[0]


def test_more_bytes_than_the_selector_promised_fail_the_transfer(tmp_path: Path) -> None:
    sink = _sink(tmp_path, 4)
    _chunk(sink, "m1", "1-6/6", b"abcdef", b"$")
    assert "sends 6 bytes, not 4" in _failure(sink.done)
    sink = _sink(tmp_path, 4)
    _chunk(sink, "m1", "3-*/4", b"abcdef", b"$")
    assert "more than the 4 bytes promised" in _failure(sink.done)
    assert sink.message.handle.closed


def test_a_message_the_sender_gives_up_fails_the_transfer(tmp_path: Path) -> None:
    sink = _sink(tmp_path, 6)
    _chunk(sink, "m1", "1-3/6", b"abc", b"#")
    assert "gave the file up" in _failure(sink.done)


def test_a_received_file_must_match_the_size_and_sha1_offered(tmp_path: Path) -> None:
    saved = tmp_path / "f"
    saved.write_bytes(b"payload")
    sha1 = hashlib.sha1(b"payload").digest()  # noqa: S324 - RFC 5547 names SHA-1
    assert filetransfer._verified(saved, sdp.FileSelector("f", "a/b", 7, sha1, "t"))
    assert filetransfer._verified(saved, sdp.FileSelector("f", "a/b", 7, None, "t"))
    with pytest.raises(CtlError, match="7 bytes arrived, 8 promised"):
        filetransfer._verified(saved, sdp.FileSelector("f", "a/b", 8, sha1, "t"))
    with pytest.raises(CtlError, match="SHA-1 differs"):
        filetransfer._verified(saved, sdp.FileSelector("f", "a/b", 7, b"\0" * 20, "t"))
