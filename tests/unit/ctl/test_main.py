"""relayctl's command line: what parses, and what is checked before anything connects."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.ctl import main as ctl
from relayd.ctl.settings import (
    split_to_and_file,
)

A = "msrps://relay.example:2855/abc;tcp"
B = "msrps://peer.example:2855/xyz;tcp"


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


def test_receive_checks_output_before_anything_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No credentials and no relay: the output check alone decides.
    output = tmp_path / "absent" / "out.bin"
    code = ctl.run(["receive", "--via", "127.0.0.1:20001", "--output", str(output)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"relayctl: cannot write {output}: directory {output.parent} does not exist\n"
    )
