"""Tests for relayd.tokens."""

from __future__ import annotations

import os
import re

import pytest

from relayd import tokens
from relayd.msrp.uri import MSRPURI
from relayd.tokens import (
    MIN_TOKEN_BITS,
    new_session_id,
    new_token,
    new_transaction_id,
    redact,
    tokens_equal,
)

# RFC 4975 §9: transact-id = ident = ALPHANUM 3*31ident-char.
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-+%=]{3,31}")
# RFC 3986 unreserved: safe in a session-id and in a URL path segment, unescaped.
_UNRESERVED = re.compile(r"[A-Za-z0-9\-._~]+")


def test_new_token_default_has_at_least_128_bits() -> None:
    token = new_token()
    assert _UNRESERVED.fullmatch(token)
    # base64url carries 6 bits per character.
    assert len(token) * 6 >= MIN_TOKEN_BITS


def test_new_token_more_bits_gives_longer_token() -> None:
    assert len(new_token(256)) * 6 >= 256


def test_new_token_refuses_weak_tokens() -> None:
    with pytest.raises(ValueError, match="128"):
        new_token(64)


def test_new_token_is_unique() -> None:
    assert len({new_token() for _ in range(1000)}) == 1000


def test_new_session_id_is_a_valid_msrp_session_id() -> None:
    session_id = new_session_id()
    uri = MSRPURI.parse(f"msrps://relay.example.com:2855/{session_id};tcp")
    assert uri.session_id == session_id


def test_new_transaction_id_matches_ident_abnf() -> None:
    for _ in range(200):
        tid = new_transaction_id()
        assert _IDENT.fullmatch(tid), tid
        assert tid.isalnum()


def test_new_transaction_id_is_unique_and_64_bits() -> None:
    ids = {new_transaction_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(tid) * 4 >= 64 for tid in ids)


def test_new_transaction_id_draws_randomness_in_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_urandom = os.urandom

    def urandom(size: int) -> bytes:
        calls.append(size)
        return real_urandom(size)

    monkeypatch.setattr(os, "urandom", urandom)
    tokens._forget_pool()
    ids = [new_transaction_id() for _ in range(1024)]
    assert calls == [4096, 4096]  # 512 ids of 8 random bytes per pool
    assert len(set(ids)) == 1024
    tokens._forget_pool()
    new_transaction_id()
    assert len(calls) == 3


def test_random_bytes_never_repeats_a_slice_and_refills_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pools: list[bytes] = []
    real_urandom = os.urandom

    def urandom(size: int) -> bytes:
        pools.append(real_urandom(size))
        return pools[-1]

    monkeypatch.setattr(os, "urandom", urandom)
    tokens._forget_pool()
    drawn = [tokens.random_bytes(size) for size in (16, 8, 64, 3) * 100]
    # Each draw is the next unused slice of the current pool; a draw that
    # does not fit in what is left starts a fresh pool.
    index, offset = 0, 0
    for piece in drawn:
        if offset + len(piece) > 4096:
            index, offset = index + 1, 0
        assert piece == pools[index][offset : offset + len(piece)]
        offset += len(piece)
    assert len(pools) == index + 1 == 3  # 9,100 bytes: three 4 KiB pools
    with pytest.raises(ValueError):
        tokens.random_bytes(0)
    with pytest.raises(ValueError):
        tokens.random_bytes(65)


def test_redact_is_short_stable_and_does_not_leak() -> None:
    secret = new_token()
    assert redact(secret) == redact(secret)
    assert re.fullmatch(r"[0-9a-f]{10}", redact(secret))
    assert redact(secret) not in secret
    assert redact(secret) != redact(secret + "x")


def test_tokens_equal_compares_exactly() -> None:
    token = new_token()
    assert tokens_equal(token, str(token))
    assert not tokens_equal(token, token[:-1])
    assert not tokens_equal(token, token + "A")
    assert not tokens_equal("session-abc", "session-ABC")


def test_tokens_equal_accepts_non_ascii_without_error() -> None:
    assert tokens_equal("é", "é")
    assert not tokens_equal("é", "e")
