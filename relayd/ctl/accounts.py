"""``relayctl adduser | deluser | users``: edit the relay's htdigest file in place.

The running relay notices the rewrite by itself (``UsersFile`` re-stats the
file), so no restart or signal is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from relayd.ctl.settings import CtlError
from relayd.users import UsersFile, UsersFileError, generate_password


def _open(path: Path) -> UsersFile:
    try:
        return UsersFile(path)
    except UsersFileError as e:
        raise CtlError(str(e)) from None


def add_user(
    path: Path,
    realm: str,
    username: str,
    password: str | None,
    out: TextIO,
    create_directory: bool = False,
) -> None:
    """Add or update ``username``; a None password means generate one and print it.

    ``create_directory`` is for the relay's default data directory only (made
    0700, as the relay makes it): a missing directory in a path the operator
    typed is a typo, and creating it would hide the file from the relay.
    """
    generated = password is None
    secret = generate_password() if password is None else password
    if not secret:
        raise CtlError("empty password")
    if create_directory:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise CtlError(f"cannot create {path.parent}: {e.strerror}") from None
    elif not path.parent.is_dir():
        raise CtlError(f"cannot write {path}: directory {path.parent} does not exist")
    users = _open(path)
    existed = users.lookup(username, realm) is not None
    try:
        users.add_or_update(username, realm, secret)
    except ValueError as e:
        raise CtlError(str(e)) from None
    except OSError as e:
        raise CtlError(f"cannot write {path}: {e.strerror}") from None
    verb = "updated" if existed else "added"
    out.write(f"{verb} {username} (realm {realm}) in {path}\n")
    if generated:
        out.write(f"password={secret}\n")


def remove_user(path: Path, realm: str, username: str, out: TextIO) -> None:
    users = _open(path)
    try:
        removed = users.remove(username, realm)
    except ValueError as e:
        raise CtlError(str(e)) from None
    except OSError as e:
        raise CtlError(f"cannot write {path}: {e.strerror}") from None
    if not removed:
        raise CtlError(f"no user {username!r} in realm {realm!r} in {path}")
    out.write(f"removed {username} (realm {realm}) from {path}\n")


def list_users(path: Path, out: TextIO, err: TextIO) -> None:
    """``user<TAB>realm`` per entry, after the same validation the relay applies."""
    _open(path)  # raises with file:line on anything the relay would reject
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        err.write(f"relayctl: no users file at {path} (no users yet)\n")
        return
    except OSError as e:
        raise CtlError(f"cannot read {path}: {e.strerror}") from None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            username, realm, _ = line.split(":", 2)
            out.write(f"{username}\t{realm}\n")


def new_password(
    from_stdin: bool,
    generate: bool,
    stdin: TextIO,
    interactive: bool,
    ask: Callable[[str], str],
) -> str | None:
    """The password for ``adduser``; None asks ``add_user`` to generate one."""
    if generate:
        return None
    if from_stdin:
        password = stdin.readline().rstrip("\r\n")
        if not password:
            raise CtlError("no password on standard input")
        return password
    if not interactive:
        raise CtlError("no terminal to ask for the password: use --password-stdin or --generate")
    first = ask("New password: ")
    if not first:
        raise CtlError("empty password")
    if ask("Repeat the password: ") != first:
        raise CtlError("the passwords differ")
    return first
