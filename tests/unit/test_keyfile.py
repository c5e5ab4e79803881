from __future__ import annotations

import stat
from pathlib import Path

import pytest

from relayd.keyfile import KEY_BYTES, KeyFileError, derive_key, load_or_create_key


def test_a_key_is_created_once_private_and_then_kept(tmp_path: Path) -> None:
    path = tmp_path / "consent.key"
    key = load_or_create_key(path)
    assert len(key) == KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"zz\n", "hexadecimal key"), (b"abcd\n", "at least 32"), (b"\xff\xfe", "hexadecimal text")],
)
def test_an_unusable_key_file_is_refused_not_replaced(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "consent.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=problem):
        load_or_create_key(path)
    assert path.read_bytes() == content


def test_a_key_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot create"):
        load_or_create_key(tmp_path / "missing" / "consent.key")


def test_derived_keys_are_stable_and_one_per_purpose() -> None:
    key = b"k" * 32
    assert derive_key(key, "digest nonces") == derive_key(key, "digest nonces")
    assert derive_key(key, "digest nonces") != derive_key(key, "admin page forms")
    assert derive_key(key, "digest nonces") != derive_key(b"j" * 32, "digest nonces")
    assert len(derive_key(key, "x")) == 32
