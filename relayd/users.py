"""The htdigest users file: ``user:realm:HA1`` per line.

The same format as Apache's ``htdigest``, so existing tooling can manage it.
Only HA1 (RFC 2617 §3.2.2.2) is stored, never the password.  A running
daemon picks up changes made by ``relayctl adduser`` on its own: lookups
re-stat the file at most once per second (on the injected clock) and reload
when its identity, size or mtime changed.  Rewrites are atomic (temporary
file in the same directory, fsync, ``os.replace``) so a reader never sees a
half-written file.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from twisted.internet.interfaces import IReactorTime

from relayd.digest import ha1
from relayd.logs import logger

RELOAD_CHECK_INTERVAL_SECONDS = 1.0
"""Least time between two stats of the users file."""

_HEX = frozenset("0123456789abcdefABCDEF")
_Signature = tuple[int, int, int, int]


class UsersFileError(Exception):
    """The users file is malformed; names the file and the line."""

    def __init__(self, path: str, line_number: int | None, reason: str) -> None:
        where = path if line_number is None else f"{path}:{line_number}"
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line_number = line_number
        self.reason = reason


class _MonotonicClock:
    """Stand-in clock for command-line use, where no reactor runs."""

    def seconds(self) -> float:
        return time.monotonic()


def generate_password() -> str:
    """A random password (144 bits, URL-safe) for ``relayctl adduser``."""
    return secrets.token_urlsafe(18)


def _check_name(kind: str, value: str) -> None:
    """Reject names that would corrupt the ``user:realm:HA1`` line format."""
    if not value:
        raise ValueError(f"{kind} must not be empty")
    if ":" in value:
        raise ValueError(f"{kind} must not contain ':'")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"{kind} must not contain newlines or control characters")
    if kind == "username" and value.lstrip().startswith("#"):
        raise ValueError("username must not start with '#' (it would read as a comment)")


def _parse_line(path: str, number: int, line: str) -> tuple[str, str, str] | None:
    """Return (username, realm, HA1) or None for blank and comment lines."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    fields = line.rstrip("\r\n").split(":")
    if len(fields) != 3:
        raise UsersFileError(path, number, "expected user:realm:HA1")
    username, realm, digest = fields
    if not username or not realm:
        raise UsersFileError(path, number, "empty username or realm")
    if len(digest) != 32 or not _HEX.issuperset(digest):
        raise UsersFileError(path, number, "HA1 is not 32 hex digits")
    return username, realm, digest.lower()


def _parse(path: str, text: str) -> dict[tuple[str, str], str]:
    table: dict[tuple[str, str], str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        entry = _parse_line(path, number, line)
        if entry is None:
            continue
        username, realm, digest = entry
        if (username, realm) in table:
            raise UsersFileError(path, number, f"duplicate entry for {username!r} in {realm!r}")
        table[(username, realm)] = digest
    return table


class UsersFile:
    """Users and their HA1 per realm, kept in step with a file on disk.

    A missing file is an empty table, so a fresh install works before the
    first ``relayctl adduser``.  Malformed content raises
    :class:`UsersFileError` at construction and from :meth:`reload`; an
    automatic reload that fails keeps the previous table and logs an error,
    so a half-edited file does not lock every user out.
    """

    log = logger()

    def __init__(self, path: str | os.PathLike[str], clock: IReactorTime | None = None) -> None:
        self.path = os.fspath(path)
        self._clock: IReactorTime | _MonotonicClock = (
            clock if clock is not None else _MonotonicClock()
        )
        self._table: dict[tuple[str, str], str] = {}
        self._signature: _Signature | None = None
        self._next_check = 0.0
        self.reload()

    def use_clock(self, clock: IReactorTime) -> None:
        """Time the re-stats by ``clock`` from now on: the daemon's reactor once it has
        one (the file is read before), a ``task.Clock`` in tests."""
        self._clock = clock
        self._next_check = clock.seconds() + RELOAD_CHECK_INTERVAL_SECONDS

    def _stat_signature(self) -> _Signature | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        # The inode changes on every atomic rewrite, catching edits that keep
        # the size and land within the filesystem's mtime granularity.
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> tuple[_Signature | None, dict[tuple[str, str], str]]:
        signature = self._stat_signature()
        if signature is None:
            return None, {}
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, {}
        except (OSError, UnicodeDecodeError) as e:
            raise UsersFileError(self.path, None, f"cannot read: {e}") from e
        return signature, _parse(self.path, text)

    def reload(self) -> None:
        """Read the file now; raises :class:`UsersFileError` if malformed."""
        self.stage_reload()()

    def stage_reload(self) -> Callable[[], None]:
        """Read the file now (raises :class:`UsersFileError` if malformed); the
        returned callable puts what was read in use, so that a reload of several
        files switches to all of them or to none (relayd.reload)."""
        signature, table = self._read()

        def commit() -> None:
            self._table = table
            self._signature = signature
            self._next_check = self._clock.seconds() + RELOAD_CHECK_INTERVAL_SECONDS

        return commit

    def _maybe_reload(self) -> None:
        now = self._clock.seconds()
        if now < self._next_check:
            return
        self._next_check = now + RELOAD_CHECK_INTERVAL_SECONDS
        if self._stat_signature() == self._signature:
            return
        try:
            signature, table = self._read()
        except UsersFileError as e:
            # Remember the bad version so the error is logged once, not every second.
            self._signature = self._stat_signature()
            self.log.error("users file not reloaded, keeping previous: {reason}", reason=str(e))
            return
        self._table = table
        self._signature = signature
        self.log.info("users file reloaded: {count} entries", count=len(table))

    def lookup(self, username: str, realm: str) -> str | None:
        """HA1 for ``username`` in ``realm`` or None; fits DigestAuthenticator."""
        self._maybe_reload()
        return self._table.get((username, realm))

    def entries(self) -> list[tuple[str, str]]:
        """(username, realm) of every user, in file order."""
        self._maybe_reload()
        return list(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def add_or_update(self, username: str, realm: str, password: str) -> None:
        """Set the password of ``username`` in ``realm``, adding the user if new."""
        _check_name("username", username)
        _check_name("realm", realm)
        line = f"{username}:{realm}:{ha1(username, realm, password)}"
        lines = self._current_lines()
        for index, existing in enumerate(lines):
            entry = _parse_line(self.path, index + 1, existing)
            if entry is not None and entry[:2] == (username, realm):
                lines[index] = line
                break
        else:
            lines.append(line)
        self._write(lines)

    def remove(self, username: str, realm: str) -> bool:
        """Delete ``username`` from ``realm``; False if there was no such entry."""
        _check_name("username", username)
        _check_name("realm", realm)
        lines = self._current_lines()
        kept = [
            line
            for index, line in enumerate(lines)
            if (entry := _parse_line(self.path, index + 1, line)) is None
            or entry[:2] != (username, realm)
        ]
        if len(kept) == len(lines):
            return False
        self._write(kept)
        return True

    def _current_lines(self) -> list[str]:
        """The file's lines, validated, with comments kept for the rewrite."""
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as e:
            raise UsersFileError(self.path, None, f"cannot read: {e}") from e
        _parse(self.path, text)  # refuse to rewrite a file we cannot understand
        return text.splitlines()

    def _write(self, lines: list[str]) -> None:
        """Replace the file atomically with ``lines``, mode 0600."""
        directory = os.path.dirname(os.path.abspath(self.path))
        base = os.path.basename(self.path)
        fd, tmp_path = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                os.fchmod(tmp.fileno(), 0o600)
                tmp.write("".join(line + "\n" for line in lines))
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_path, self.path)
        except BaseException:
            try:
                os.unlink(tmp_path)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        self.reload()
