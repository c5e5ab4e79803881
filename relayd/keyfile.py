"""Secret keys that must survive a restart, kept in the data directory.

The consent URIs a relay hands out (in 470s and in every relayed ``Trigger-Consent``)
carry a MAC under a key of the relay's. A key drawn afresh at each start would make
every one of them a 404 after a restart, so the key lives in a 0600 file.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32


class KeyFileError(Exception):
    """A key file that exists but cannot be used; the text names the problem."""


def derive_key(key: bytes, purpose: str) -> bytes:
    """A key of its own for each ``purpose`` out of one stored key (HMAC-SHA256 as a
    PRF, as HKDF's expand step with one block), so no two uses share a key."""
    return hmac.digest(key, b"relayd key\0" + purpose.encode("utf-8"), "sha256")


def load_or_create_key(path: Path, size: int = KEY_BYTES) -> bytes:
    """The key in ``path``, created (0600, never overwritten) when absent."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise KeyFileError(f"cannot create {path}: {e.strerror}") from None
    else:
        key = secrets.token_bytes(size)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key.hex().encode("ascii") + b"\n")
        return key
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not hexadecimal text"
        raise KeyFileError(f"cannot read {path}: {reason}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{path} does not hold a hexadecimal key") from None
    if len(key) < size:
        raise KeyFileError(f"{path} holds {len(key)} bytes; at least {size} are needed")
    return key
