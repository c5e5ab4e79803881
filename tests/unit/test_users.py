"""Tests for relayd.users: the htdigest users file."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver

from relayd.digest import ha1
from relayd.testing import captured_log
from relayd.users import UsersFile, UsersFileError, generate_password

REALM = "relay.example.com"


def _ha1(user: str, realm: str, password: str) -> str:
    return hashlib.md5(f"{user}:{realm}:{password}".encode(), usedforsecurity=False).hexdigest()


@pytest.fixture
def users_path(tmp_path: Path) -> Path:
    path = tmp_path / "users.htdigest"
    path.write_text(
        "# relayd users\n"
        "\n"
        f"alice:{REALM}:{_ha1('alice', REALM, 'pw-a')}\n"
        f"   # indented comment\n"
        f"bob:{REALM}:{_ha1('bob', REALM, 'pw-b').upper()}\n"
        f"alice:other.realm:{_ha1('alice', 'other.realm', 'pw-o')}\n"
    )
    return path


@pytest.fixture
def events() -> Iterator[EventLoggingObserver]:
    with captured_log() as observer:
        yield observer


def test_lookup_returns_ha1_per_user_and_realm(users_path: Path) -> None:
    users = UsersFile(users_path, Clock())
    assert users.lookup("alice", REALM) == _ha1("alice", REALM, "pw-a")
    assert users.lookup("alice", "other.realm") == _ha1("alice", "other.realm", "pw-o")
    assert users.lookup("bob", REALM) == _ha1("bob", REALM, "pw-b")  # normalised to lower case
    assert users.lookup("carol", REALM) is None
    assert users.lookup("bob", "other.realm") is None
    assert len(users) == 3


def test_missing_file_is_empty(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "absent", Clock())
    assert users.lookup("alice", REALM) is None
    assert len(users) == 0


@pytest.mark.parametrize(
    ("content", "line", "reason_part"),
    [
        ("alice:realm\n", 1, "user:realm:HA1"),
        ("# ok\nalice:realm:abc:def\n", 2, "user:realm:HA1"),
        ("\n\nalice:realm:nothex" + "0" * 25 + "\n", 3, "32 hex"),
        (":realm:" + "0" * 32 + "\n", 1, "empty"),
        (f"a:r:{'0' * 32}\na:r:{'1' * 32}\n", 2, "duplicate"),
    ],
)
def test_malformed_line_names_path_and_line(
    tmp_path: Path, content: str, line: int, reason_part: str
) -> None:
    path = tmp_path / "users"
    path.write_text(content)
    with pytest.raises(UsersFileError) as excinfo:
        UsersFile(path, Clock())
    assert excinfo.value.path == str(path)
    assert excinfo.value.line_number == line
    assert reason_part in excinfo.value.reason
    assert f"{path}:{line}" in str(excinfo.value)


def test_undecodable_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"\xff\xfe:realm:" + b"0" * 32)
    with pytest.raises(UsersFileError, match="cannot read"):
        UsersFile(path, Clock())


def test_external_change_seen_after_one_second(users_path: Path) -> None:
    clock = Clock()
    users = UsersFile(users_path, clock)
    other = UsersFile(users_path, clock)
    other.add_or_update("carol", REALM, "pw-c")

    # Within the check interval the file is not even stat'ed.
    clock.advance(0.5)
    assert users.lookup("carol", REALM) is None
    clock.advance(0.6)
    assert users.lookup("carol", REALM) == _ha1("carol", REALM, "pw-c")


def test_a_clock_given_later_times_the_checks(users_path: Path) -> None:
    users = UsersFile(users_path)
    clock = Clock()
    clock.advance(100)
    users.use_clock(clock)
    UsersFile(users_path, clock).add_or_update("carol", REALM, "pw-c")
    clock.advance(0.9)
    assert users.lookup("carol", REALM) is None
    clock.advance(0.1)
    assert users.lookup("carol", REALM) == _ha1("carol", REALM, "pw-c")


def test_external_in_place_edit_is_seen(users_path: Path) -> None:
    clock = Clock()
    users = UsersFile(users_path, clock)
    with users_path.open("a") as f:
        f.write(f"dave:{REALM}:{_ha1('dave', REALM, 'pw-d')}\n")
    clock.advance(1)
    assert users.lookup("dave", REALM) == _ha1("dave", REALM, "pw-d")


def test_broken_reload_keeps_previous_table_and_logs_once(
    users_path: Path, events: EventLoggingObserver
) -> None:
    clock = Clock()
    users = UsersFile(users_path, clock)
    users_path.write_text("garbage line that is not a user\n")
    clock.advance(1)
    assert users.lookup("alice", REALM) == _ha1("alice", REALM, "pw-a")
    clock.advance(1)
    users.lookup("alice", REALM)
    errors = [e for e in events if "not reloaded" in e.get("log_format", "")]
    assert len(errors) == 1
    assert f"{users_path}:1" in errors[0]["reason"]

    # Once fixed, the next check picks the file up again.
    users_path.write_text(f"erin:{REALM}:{_ha1('erin', REALM, 'pw-e')}\n")
    clock.advance(1)
    assert users.lookup("erin", REALM) == _ha1("erin", REALM, "pw-e")
    assert users.lookup("alice", REALM) is None


def test_reload_raises_on_malformed_file(users_path: Path) -> None:
    users = UsersFile(users_path, Clock())
    users_path.write_text("bad\n")
    with pytest.raises(UsersFileError):
        users.reload()


def test_add_creates_file_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "users"
    users = UsersFile(path, Clock())
    users.add_or_update("alice", REALM, "pw")
    assert path.read_text() == f"alice:{REALM}:{ha1('alice', REALM, 'pw')}\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert users.lookup("alice", REALM) == _ha1("alice", REALM, "pw")


def test_update_replaces_line_in_place_and_keeps_comments(users_path: Path) -> None:
    users = UsersFile(users_path, Clock())
    users.add_or_update("alice", REALM, "new-pw")
    lines = users_path.read_text().splitlines()
    assert lines[0] == "# relayd users"
    assert lines[2] == f"alice:{REALM}:{_ha1('alice', REALM, 'new-pw')}"
    assert lines[3] == "   # indented comment"
    assert len(lines) == 6
    assert users.lookup("alice", REALM) == _ha1("alice", REALM, "new-pw")
    assert users.lookup("alice", "other.realm") == _ha1("alice", "other.realm", "pw-o")


def test_remove_deletes_only_that_entry(users_path: Path) -> None:
    users = UsersFile(users_path, Clock())
    assert users.remove("alice", REALM) is True
    assert users.lookup("alice", REALM) is None
    assert users.lookup("alice", "other.realm") is not None
    assert "# relayd users" in users_path.read_text()
    assert users.remove("alice", REALM) is False


def test_rewrite_leaves_no_temporary_files(users_path: Path) -> None:
    users = UsersFile(users_path, Clock())
    users.add_or_update("carol", REALM, "x")
    users.remove("carol", REALM)
    assert sorted(p.name for p in users_path.parent.iterdir()) == [users_path.name]


def test_rewrite_refuses_malformed_file(users_path: Path) -> None:
    users = UsersFile(users_path, Clock())
    users_path.write_text("broken\n")
    with pytest.raises(UsersFileError):
        users.add_or_update("carol", REALM, "x")
    assert users_path.read_text() == "broken\n"


@pytest.mark.parametrize(
    ("username", "realm"),
    [
        ("al:ice", REALM),
        ("alice", "re:alm"),
        ("ali\nce", REALM),
        ("alice", "realm\r"),
        ("", REALM),
        ("alice", ""),
        ("#alice", REALM),
    ],
)
def test_names_that_would_corrupt_the_file_are_refused(
    tmp_path: Path, username: str, realm: str
) -> None:
    users = UsersFile(tmp_path / "users", Clock())
    with pytest.raises(ValueError):
        users.add_or_update(username, realm, "pw")
    with pytest.raises(ValueError):
        users.remove(username, realm)
    assert not (tmp_path / "users").exists()


def test_password_with_colon_is_fine(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "users", Clock())
    users.add_or_update("alice", REALM, "pa:ss\nword")
    assert users.lookup("alice", REALM) == _ha1("alice", REALM, "pa:ss\nword")


def test_generate_password_is_random_and_printable() -> None:
    passwords = {generate_password() for _ in range(100)}
    assert len(passwords) == 100
    for password in passwords:
        assert len(password) >= 20
        assert password.isprintable()
        assert ":" not in password


def test_default_clock_works_without_reactor(users_path: Path) -> None:
    users = UsersFile(users_path)
    assert users.lookup("alice", REALM) == _ha1("alice", REALM, "pw-a")
