"""Secret keys that must survive a restart, kept in the data directory.

The consent URIs a relay hands out (in 470s and in every relayed ``Trigger-Consent``)
carry a MAC under a key of the relay's. A key drawn afresh at each start would make
every one of them a 404 after a restart, so the key lives in a 0600 file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32


class KeyFileError(Exception):
    """A key file that exists but cannot be used; the text names the problem."""


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


def derived_key(key: bytes, purpose: str) -> bytes:
    """A key for one ``purpose`` drawn from ``key`` (HMAC-SHA-256 of the purpose, as
    HKDF-Expand's first block, RFC 5869 §2.3): the forms' CSRF keys come from the
    stored key, so every worker and every restart accepts the forms any of them served,
    and no purpose's key tells anything of another's."""
    return hmac.new(key, purpose.encode("utf-8") + b"\x01", hashlib.sha256).digest()
