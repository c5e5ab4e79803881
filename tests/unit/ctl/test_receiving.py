"""relayctl receive: chunks written to disk at their offsets, output checks, file names."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from relayd.ctl.receiving import IncomingMessage, MessageWriter, check_output, file_name_for
from relayd.ctl.settings import CtlError
from relayd.msrp.message import ByteRange, Headers, MSRPRequest


def _unexpected(value: object) -> None:
    raise AssertionError(f"unexpected call with {value!r}")


def _send(message_id: str, byte_range: str) -> MSRPRequest:
    return MSRPRequest(
        "t1", "SEND", Headers([("Message-ID", message_id), ("Byte-Range", byte_range)])
    )


def _deliver(writer: MessageWriter, message_id: str, start: int, data: bytes, total: int) -> None:
    flag = b"$" if start + len(data) - 1 == total else b"+"
    request = _send(message_id, f"{start}-{start + len(data) - 1}/{total}")
    sink = writer.sink_for(request)
    assert sink is not None
    sink.chunk_started(request, ByteRange.parse(request.headers.get("Byte-Range") or ""))
    sink.chunk_data(data[: len(data) // 2])
    sink.chunk_data(data[len(data) // 2 :])
    sink.chunk_ended(flag)


def test_interleaved_out_of_order_chunks_land_at_their_offsets(tmp_path: Path) -> None:
    ended: list[IncomingMessage] = []
    writer = MessageWriter(tmp_path, ended.append, _unexpected)
    one, two = bytes(range(256)) * 40, b"second message" * 300
    _deliver(writer, "m1", 5001, one[5000:], len(one))
    _deliver(writer, "m2", 1, two[:2000], len(two))
    _deliver(writer, "m1", 1, one[:5000], len(one))
    assert [m.message_id for m in ended] == ["m1"]
    _deliver(writer, "m2", 2001, two[2000:], len(two))
    assert [m.message_id for m in ended] == ["m1", "m2"]
    assert (tmp_path / "m1").read_bytes() == one
    assert (tmp_path / "m2").read_bytes() == two
    assert all(m.complete and m.handle.closed for m in ended)
    assert writer.sink_for(_send("m1", "1-1/1")) is None  # done: not rewritten


def test_unknown_total_completes_on_the_last_chunk(tmp_path: Path) -> None:
    ended: list[IncomingMessage] = []
    writer = MessageWriter(tmp_path / "out.bin", ended.append, _unexpected)
    for start, flag in ((1, b"+"), (4, b"$")):
        request = _send("m", f"{start}-*/*")
        sink = writer.sink_for(request)
        assert sink is not None
        sink.chunk_started(request, ByteRange(start, None, None))
        sink.chunk_data(b"abc")
        sink.chunk_ended(flag)
    assert ended and ended[0].total_bytes == 6
    assert (tmp_path / "out.bin").read_bytes() == b"abcabc"


def test_a_resent_range_is_not_counted_twice(tmp_path: Path) -> None:
    ended: list[IncomingMessage] = []
    writer = MessageWriter(tmp_path, ended.append, _unexpected)
    _deliver(writer, "m", 1, b"abcd", 10)
    _deliver(writer, "m", 3, b"cdef", 10)
    _deliver(writer, "m", 1, b"abcdef", 10)  # 12 bytes delivered, 6 distinct
    assert not ended
    _deliver(writer, "m", 7, b"ghij", 10)
    assert ended[0].received_bytes == 10
    assert (tmp_path / "m").read_bytes() == b"abcdefghij"


def test_empty_message_completes(tmp_path: Path) -> None:
    ended: list[IncomingMessage] = []
    writer = MessageWriter(tmp_path, ended.append, _unexpected)
    request = _send("m", "1-0/0")
    sink = writer.sink_for(request)
    assert sink is not None
    sink.chunk_started(request, ByteRange(1, 0, 0))
    sink.chunk_ended(b"$")
    assert ended[0].complete and (tmp_path / "m").read_bytes() == b""


def test_single_output_file_takes_only_the_first_message(tmp_path: Path) -> None:
    writer = MessageWriter(tmp_path / "out.bin", _unexpected, _unexpected)
    assert writer.sink_for(_send("first", "1-1/9")) is not None
    assert writer.sink_for(_send("second", "1-1/9")) is None
    assert writer.sink_for(_send("first", "2-2/9")) is not None


def test_message_ids_that_clash_after_cleaning_get_distinct_files(tmp_path: Path) -> None:
    writer = MessageWriter(tmp_path, _unexpected, _unexpected)
    one = writer.sink_for(_send("a/b", "1-1/9"))
    two = writer.sink_for(_send("a:b", "1-1/9"))
    assert one is not None and two is not None
    assert (one.path, two.path) == (tmp_path / "a_b", tmp_path / "a_b-2")


def test_aborted_message_is_reported(tmp_path: Path) -> None:
    ended: list[IncomingMessage] = []
    writer = MessageWriter(tmp_path, ended.append, _unexpected)
    request = _send("m", "1-3/10")
    sink = writer.sink_for(request)
    assert sink is not None
    sink.chunk_started(request, ByteRange(1, 3, 10))
    sink.chunk_ended(b"#")
    assert ended[0].aborted and not ended[0].complete


def test_unwritable_output_is_an_error_not_an_exception(tmp_path: Path) -> None:
    errors: list[CtlError] = []
    writer = MessageWriter(tmp_path / "missing" / "f", _unexpected, errors.append)
    assert writer.sink_for(_send("m", "1-1/1")) is None
    assert str(errors[0]).startswith(f"cannot write {tmp_path / 'missing' / 'f'}")


class _FullDisk(io.BytesIO):
    """Stands in for /dev/full: data is accepted into a buffer, flushing fails."""

    def close(self) -> None:
        raise OSError(28, "No space left on device")


def test_write_error_at_close_is_reported_not_a_finished_message(tmp_path: Path) -> None:
    errors: list[CtlError] = []
    message = IncomingMessage("m", tmp_path / "m", _FullDisk(), _unexpected, errors.append)
    message.chunk_started(_send("m", "1-3/3"), ByteRange(1, 3, 3))
    message.chunk_data(b"abc")
    message.chunk_ended(b"$")
    assert [str(e) for e in errors] == [f"cannot write {tmp_path / 'm'}: No space left on device"]
    assert not message.complete


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_to_dev_full_reports_the_write_error() -> None:
    errors: list[CtlError] = []
    writer = MessageWriter(Path("/dev/full"), _unexpected, errors.append)
    _deliver(writer, "m", 1, b"x" * 100, 100)
    writer.close()
    assert [str(e) for e in errors] == ["cannot write /dev/full: No space left on device"]


def test_check_output_refuses_a_file_in_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CtlError) as info:
        check_output(tmp_path / "absent" / "out.bin", 1)
    assert str(info.value) == (
        f"cannot write {tmp_path / 'absent' / 'out.bin'}:"
        f" directory {tmp_path / 'absent'} does not exist"
    )


def test_check_output_accepts_a_new_file_an_existing_file_and_a_directory(
    tmp_path: Path,
) -> None:
    check_output(tmp_path / "new.bin", 1)
    (tmp_path / "old.bin").write_bytes(b"")
    check_output(tmp_path / "old.bin", 1)
    check_output(tmp_path, 3)
    check_output(None, 1)


def test_check_output_wants_a_directory_for_several_messages(tmp_path: Path) -> None:
    with pytest.raises(CtlError, match="must be an existing directory"):
        check_output(tmp_path / "out.bin", 2)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes regardless of modes")
def test_check_output_refuses_a_read_only_directory(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(CtlError, match="is not writable"):
        check_output(folder / "out.bin", 1)


@pytest.mark.parametrize(
    ("message_id", "name"),
    [
        ("abc-1.2+x=", "abc-1.2+x="),
        ("../../etc/passwd", "message-.._.._etc_passwd"),
        ("", "message-"),
    ],
)
def test_file_name_for_never_leaves_the_directory(message_id: str, name: str) -> None:
    assert file_name_for(message_id) == name
