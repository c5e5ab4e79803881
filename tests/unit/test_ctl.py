"""relayctl's pure parts: parsing, defaults, progress rendering, users file, file sink."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
from OpenSSL import SSL
from twisted.python.failure import Failure

from relayd.ctl import main as ctl
from relayd.ctl.network import (
    advertised_path,
    delivery_failure,
    describe_loss,
    merge_use_path,
)
from relayd.ctl.progress import (
    BAR_CELLS,
    Progress,
    format_bytes,
    render_bar,
    render_summary,
)
from relayd.ctl.receiving import IncomingMessage, MessageWriter, check_output, file_name_for
from relayd.ctl.settings import (
    PASSWORD_ENV,
    CtlError,
    Locations,
    locate,
    peer_path,
    relay_uri,
    resolve_credentials,
    split_to_and_file,
    trust_anchor,
)
from relayd.digest import ha1
from relayd.msrp.client import MSRPClientError
from relayd.msrp.message import ByteRange, Headers, MSRPRequest

A = "msrps://relay.example:2855/abc;tcp"
B = "msrps://peer.example:2855/xyz;tcp"


def run(argv: list[str], stdin: str = "") -> int:
    """Run relayctl in-process on a fake non-terminal stdin."""
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        return ctl.run(argv)
    finally:
        sys.stdin = saved


# -- argument parsing ---------------------------------------------------------------


def test_usage_error_is_one_relayctl_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ctl.build_parser().parse_args(["send", "file"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("relayctl: the following arguments are required: --via, --to")


def test_send_accepts_path_as_several_words_then_file() -> None:
    args = ctl.build_parser().parse_args(
        ["send", "--via", "localhost:2855", "--to", A, B, "data.bin", "--chunk-size", "100000"]
    )
    assert split_to_and_file(args.to, args.file) == ([A, B], "data.bin")
    assert args.chunk_size == 100000
    assert args.window == 8
    assert args.timeout == 60.0


def test_send_accepts_path_as_one_quoted_argument() -> None:
    args = ctl.build_parser().parse_args(["send", "f", "--via", "r", "--to", f"{A} {B}"])
    assert split_to_and_file(args.to, args.file) == ([A, B], "f")


def test_send_without_file_is_an_error() -> None:
    with pytest.raises(CtlError, match="no file"):
        split_to_and_file([A, B], None)


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_chunk_size_must_be_positive(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ctl.build_parser().parse_args(["send", "f", "--via", "r", "--to", A, "--chunk-size", value])
    assert capsys.readouterr().err.startswith("relayctl: argument --chunk-size")


def test_receive_collects_relays_in_order() -> None:
    args = ctl.build_parser().parse_args(
        ["receive", "--via", "a:1", "--via", "b:2", "--count", "3", "--timeout", "5"]
    )
    assert args.via == ["a:1", "b:2"]
    assert (args.count, args.timeout) == (3, 5.0)


@pytest.mark.parametrize(
    ("typed", "uri"),
    [
        ("msrps://localhost:2855", "msrps://localhost:2855;tcp"),
        ("localhost:2855", "msrps://localhost:2855;tcp"),
        ("MSRPS://Host:1;tcp", "msrps://Host:1;tcp"),
        ("msrp://[::1]:9", "msrp://[::1]:9;tcp"),
    ],
)
def test_relay_uri_completes_what_people_type(typed: str, uri: str) -> None:
    assert relay_uri(typed) == uri


def test_relay_uri_rejects_garbage() -> None:
    with pytest.raises(CtlError, match="bad relay URI 'http://x'"):
        relay_uri("http://x")


def test_peer_path_takes_a_pasted_path_line() -> None:
    assert peer_path([f"Path: {A}", B]) == [A, B]
    with pytest.raises(CtlError, match="bad --to URI"):
        peer_path(["msrps://nohost"])


# -- AUTH chaining (RFC 4976 §5.1) ---------------------------------------------------------


def test_merge_use_path_appends_a_relay_that_names_only_itself() -> None:
    assert merge_use_path([], [A]) == [A]
    assert merge_use_path([A], [B]) == [A, B]


def test_merge_use_path_takes_a_full_route_as_is() -> None:
    assert merge_use_path([A], [A.replace("relay", "RELAY"), B]) == [
        A.replace("relay", "RELAY"),
        B,
    ]


def test_advertised_path_reverses_use_path_then_adds_own_uri() -> None:
    assert advertised_path([A, B], "msrps://me.invalid:2855/s;tcp") == [
        B,
        A,
        "msrps://me.invalid:2855/s;tcp",
    ]


def test_delivery_failure_keeps_status_code_and_comment() -> None:
    error = delivery_failure(MSRPClientError("relay refused a chunk: 481 Session Does Not Exist"))
    assert str(error) == "delivery failed: 481 Session Does Not Exist"
    lost = delivery_failure(MSRPClientError("connection to the relay was lost"))
    assert str(lost) == "delivery failed: connection to the relay was lost"


def test_describe_loss_explains_tls_verification() -> None:
    error = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert describe_loss([Failure(error)], "h") == (
        "TLS failed: certificate verify failed (wrong or missing --ca?)"
    )
    assert describe_loss([], "h") == "connection to the relay was lost"


# -- progress -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (3 * 2**20, "3.0 MiB"),
        (5 * 2**40, "5.0 TiB"),
    ],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


def test_render_bar_half_way() -> None:
    line = render_bar(2**20, 2**21, 2.0)
    half = BAR_CELLS // 2
    assert line.startswith("[" + "#" * half + "-" * (BAR_CELLS - half) + "]")
    assert " 50.0%" in line
    assert "1.0 MiB / 2.0 MiB" in line
    assert line.endswith("512.0 KiB/s")


def test_render_bar_ends_full_and_survives_empty_files_and_no_time() -> None:
    assert render_bar(10, 10, 1.0).startswith("[" + "#" * BAR_CELLS + "]")
    assert "100.0%" in render_bar(0, 0, 0.0)
    assert render_bar(0, 100, 0.0).endswith("0 B/s")


def test_progress_redraws_at_most_every_tenth_of_a_second() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(1000, stream, clock=lambda: now[0], interactive=True)
    progress.update(100)
    progress.update(200)  # same instant: skipped
    now[0] = 0.2
    progress.update(300)
    progress.update(1000)  # the end is always drawn
    progress.finish()
    text = stream.getvalue()
    assert text.count("\r") == 4  # 100, 300, 1000, final
    assert " 30.0%" in text and " 20.0%" not in text
    assert text.endswith("\n")


def test_progress_end_line_leaves_a_half_drawn_bar_on_its_own_line() -> None:
    stream = io.StringIO()
    progress = Progress(1000, stream, clock=lambda: 0.0, interactive=True)
    progress.end_line()
    assert stream.getvalue() == ""  # nothing drawn, nothing to end
    progress.update(300)
    progress.end_line()
    progress.end_line()
    assert stream.getvalue() == "\r" + render_bar(300, 1000, 0.0) + "\n"


def test_progress_finish_ends_the_line_once() -> None:
    stream = io.StringIO()
    progress = Progress(10, stream, clock=lambda: 0.0, interactive=True)
    progress.update(10)
    progress.finish()
    progress.end_line()
    assert stream.getvalue().count("\n") == 1


def test_progress_off_a_terminal_writes_one_summary_line() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(2048, stream, clock=lambda: now[0], interactive=False)
    progress.update(1024)
    now[0] = 2.0
    progress.update(2048)
    progress.finish()
    assert stream.getvalue() == render_summary(2048, 2.0) + "\n"
    assert stream.getvalue() == "sent 2048 bytes (2.0 KiB) in 2.00 s, 1.0 KiB/s\n"


# -- users file -----------------------------------------------------------------------------


def test_adduser_with_password_on_stdin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "state" / "users.htdigest"
    users.parent.mkdir()
    code = run(
        ["adduser", "--users", str(users), "--realm", "r", "alice", "--password-stdin"], "s3cret\n"
    )
    assert code == 0
    assert users.read_text() == f"alice:r:{ha1('alice', 'r', 's3cret')}\n"
    assert users.stat().st_mode & 0o777 == 0o600
    assert capsys.readouterr().out == f"added alice (realm r) in {users}\n"
    code = run(
        ["adduser", "--users", str(users), "--realm", "r", "alice", "--password-stdin"], "new\n"
    )
    assert code == 0
    assert users.read_text() == f"alice:r:{ha1('alice', 'r', 'new')}\n"
    assert capsys.readouterr().out.startswith("updated alice")


def test_adduser_generate_prints_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users.htdigest"
    assert run(["adduser", "--users", str(users), "--realm", "r", "bob", "--generate"]) == 0
    password = capsys.readouterr().out.splitlines()[-1].removeprefix("password=")
    assert len(password) >= 20
    assert users.read_text() == f"bob:r:{ha1('bob', 'r', password)}\n"


def test_adduser_defaults_to_the_relays_file_and_realm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert run(["adduser", "--data-dir", str(data), "carol", "--password-stdin"], "pw\n") == 0
    assert (data / "users.htdigest").read_text().startswith("carol:localhost:")
    assert data.stat().st_mode & 0o777 == 0o700


def test_adduser_explicit_users_file_in_missing_directory_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "nonexistent" / "dir" / "users"
    assert run(["adduser", "eve", "--generate", "--users", str(users)]) == 1
    assert capsys.readouterr().err == (
        f"relayctl: cannot write {users}: directory {users.parent} does not exist\n"
    )
    assert not (tmp_path / "nonexistent").exists()


def test_adduser_users_file_from_config_is_not_created_either(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "typo" / "users"
    ini = tmp_path / "relayd.ini"
    ini.write_text(f"[auth]\nusers = {users}\n", encoding="utf-8")
    assert run(["adduser", "--config", str(ini), "eve", "--generate"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not users.parent.exists()


def test_adduser_without_terminal_or_source_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["adduser", "--users", str(tmp_path / "u"), "dave"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "relayctl: no terminal to ask for the password: use --password-stdin or --generate\n"
    )


def test_adduser_rejects_a_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["adduser", "--users", str(tmp_path / "u"), "a:b", "--generate"]) == 1
    assert capsys.readouterr().err == "relayctl: username must not contain ':'\n"


def test_users_and_deluser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users.htdigest"
    users.write_text(
        f"# managed by relayctl\nalice:r:{ha1('alice', 'r', 'x')}\nbob:r:{ha1('bob', 'r', 'y')}\n"
    )
    assert run(["users", "--users", str(users)]) == 0
    assert capsys.readouterr().out == "alice\tr\nbob\tr\n"
    assert run(["deluser", "--users", str(users), "--realm", "r", "alice"]) == 0
    assert run(["deluser", "--users", str(users), "--realm", "r", "alice"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"relayctl: no user 'alice' in realm 'r' in {users}\n"
    assert users.read_text() == f"# managed by relayctl\nbob:r:{ha1('bob', 'r', 'y')}\n"


def test_malformed_users_file_is_named_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users.htdigest"
    users.write_text("alice:r:nothex\n")
    assert run(["users", "--users", str(users)]) == 1
    assert capsys.readouterr().err == f"relayctl: {users}:1: HA1 is not 32 hex digits\n"


# -- defaults shared with the relay ---------------------------------------------------------


def test_locate_follows_the_relays_config(tmp_path: Path) -> None:
    config = tmp_path / "relayd.ini"
    config.write_text(f"[relay]\ndata_dir = {tmp_path / 'd'}\nhostname = relay.example\n")
    found = locate(str(config), None)
    assert found == Locations(tmp_path / "d", tmp_path / "d" / "users.htdigest", "relay.example")
    config.write_text(f"[relay]\ndata_dir = {tmp_path / 'd'}\n[auth]\nrealm = R\n")
    assert locate(str(config), str(tmp_path / "other")).realm == "R"
    assert locate(str(config), str(tmp_path / "other")).data_dir == tmp_path / "other"


def test_locate_defaults_to_home_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    found = locate(None, None)
    assert found.data_dir == Path("/home/someone/.local/state/relayd")
    assert found.realm == "localhost"
    assert found.credentials_path == found.data_dir / "credentials.txt"


def _no_prompt(prompt: str) -> str:
    raise AssertionError("must not prompt")


def test_credentials_come_from_the_relays_file_without_user(tmp_path: Path) -> None:
    where = Locations(tmp_path, tmp_path / "users.htdigest", "localhost")
    (tmp_path / "credentials.txt").write_text("username=relayd\nrealm=localhost\npassword=p=w\n")
    found = resolve_credentials(None, None, None, where, {}, False, _no_prompt)
    assert (found.username, found.password) == ("relayd", "p=w")


def test_credentials_missing_file_says_what_to_do(tmp_path: Path) -> None:
    where = Locations(tmp_path, tmp_path / "users.htdigest", "localhost")
    with pytest.raises(CtlError, match="no --user given and no credentials file"):
        resolve_credentials(None, None, None, where, {}, False, _no_prompt)


def test_credentials_for_a_user(tmp_path: Path) -> None:
    where = Locations(tmp_path, tmp_path / "users.htdigest", "localhost")
    secret = tmp_path / "pw"
    secret.write_text("from-file\nignored\n")
    assert resolve_credentials("u", str(secret), None, where, {}, False, _no_prompt).password == (
        "from-file"
    )
    env = {PASSWORD_ENV: "from-env"}
    assert resolve_credentials("u", None, None, where, env, False, _no_prompt).password == (
        "from-env"
    )
    asked = resolve_credentials("u", None, None, where, {}, True, lambda prompt: "typed")
    assert asked.password == "typed"
    with pytest.raises(CtlError, match="no password for u"):
        resolve_credentials("u", None, None, where, {}, False, _no_prompt)


def test_loopback_relay_trusts_the_self_signed_certificate(tmp_path: Path) -> None:
    where = Locations(tmp_path, tmp_path / "users.htdigest", "localhost")
    assert trust_anchor(None, "msrps://localhost:2855;tcp", where) is None
    (tmp_path / "tls").mkdir()
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    where.self_signed_cert_path.write_bytes(pem)
    assert trust_anchor(None, "msrps://127.0.0.1:2855;tcp", where) == pem
    assert trust_anchor(None, "msrps://[::1]:2855;tcp", where) == pem
    assert trust_anchor(None, "msrps://relay.example:2855;tcp", where) is None
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(CtlError, match="holds no PEM certificate"):
        trust_anchor(str(not_pem), "msrps://x:1;tcp", where)
    with pytest.raises(CtlError, match="cannot read --ca file"):
        trust_anchor(str(tmp_path / "absent.pem"), "msrps://x:1;tcp", where)


# -- receiving to disk ----------------------------------------------------------------------


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


def test_receive_checks_output_before_anything_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No credentials and no relay: the output check alone decides.
    output = tmp_path / "absent" / "out.bin"
    code = run(["receive", "--via", "127.0.0.1:20001", "--output", str(output)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"relayctl: cannot write {output}: directory {output.parent} does not exist\n"
    )


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
