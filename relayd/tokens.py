"""Unguessable identifiers and safe handling of them.

MSRP session ids in Use-Path URIs (RFC 4976) and Permission URIs
(RFC 5360) are capabilities: whoever knows one can use it.  They are minted
from :mod:`secrets`, compared in constant time and only ever logged through
:func:`redact`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

MIN_TOKEN_BITS = 128
"""Fewest random bits a capability token may carry."""


def new_token(bits: int = MIN_TOKEN_BITS) -> str:
    """Return a URL-safe random token with at least ``bits`` bits of entropy.

    The alphabet (``A-Z a-z 0-9 - _``) is RFC 3986 "unreserved", so the token is
    valid both in an MSRP session-id (RFC 4975 §9) and in a URL path segment.
    """
    if bits < MIN_TOKEN_BITS:
        raise ValueError(f"tokens need at least {MIN_TOKEN_BITS} bits, got {bits}")
    return secrets.token_urlsafe((bits + 7) // 8)


def new_session_id() -> str:
    """A fresh MSRP session id for a relay Use-Path URI (RFC 4976)."""
    return new_token()


_POOL_BYTES = 4096
_pool = b""
_pool_offset = _POOL_BYTES


def random_bytes(count: int) -> bytes:
    """``count`` (at most 64) bytes from the OS generator, drawn from a 4 KiB pool.

    Still unpredictable, without a ``getrandom`` system call for every
    transaction id, branch, tag and nonce a relay mints per message.
    Capabilities (:func:`new_token`) come from :mod:`secrets` directly.
    """
    global _pool, _pool_offset
    if not 0 < count <= 64:
        raise ValueError("random_bytes hands out 1 to 64 bytes at a time")
    offset = _pool_offset
    if offset + count > _POOL_BYTES:
        _pool = os.urandom(_POOL_BYTES)
        offset = 0
    _pool_offset = offset + count
    return _pool[offset : offset + count]


def new_transaction_id() -> str:
    """A fresh MSRP transaction id (RFC 4975 §7.1, §9 ``transact-id = ident``).

    ``ident = ALPHANUM 3*31ident-char``: 16 lower-case hex digits are all
    ALPHANUM, well inside 4..32 characters, with 64 random bits.
    """
    return random_bytes(8).hex()


def _forget_pool() -> None:
    """A forked child must not hand out the same bytes as its parent."""
    global _pool_offset
    _pool_offset = _POOL_BYTES


os.register_at_fork(after_in_child=_forget_pool)


def redact(secret: str) -> str:
    """A short, stable stand-in for ``secret`` in logs (STYLE 2.6).

    The first 10 hex digits of SHA-256 (40 bits) correlate log lines without
    revealing the capability.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:10]


def tokens_equal(a: str, b: str) -> bool:
    """Compare two secrets in time independent of where they differ."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
