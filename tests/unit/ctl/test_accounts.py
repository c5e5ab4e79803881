"""relayctl adduser, deluser and users on the htdigest users file."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from relayd.ctl import main as ctl
from relayd.digest import ha1


def run(argv: list[str], stdin: str = "") -> int:
    """Run relayctl in-process on a fake non-terminal stdin."""
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        return ctl.run(argv)
    finally:
        sys.stdin = saved


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
