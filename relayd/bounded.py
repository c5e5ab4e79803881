"""Bounded memo tables for the hot paths: parse results, routes, decisions.

Every table is emptied whole when it reaches its limit. That keeps its memory bounded
whatever peers send, costs nothing per hit (no recency bookkeeping, unlike an LRU), and
a steady load refills it with the few keys that matter within a handful of requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


def remember(table: dict[K, V], limit: int, key: K, value: V) -> V:
    """Store ``value`` under ``key`` (emptying a full table first) and return it."""
    if len(table) >= limit:
        table.clear()
    table[key] = value
    return value


def parse_once(
    table: dict[str, object], limit: int, text: str, kind: type[T], parse: Callable[[str], T]
) -> T:
    """``parse(text)``, remembered in ``table``: for immutable values read from text
    that recurs (URIs, Via and CSeq values). A value of another class stored under
    the same text (a subclass's parse) is not handed out."""
    found = table.get(text)
    if found is not None and type(found) is kind:
        return found
    value = parse(text)
    remember(table, limit, text, value)
    return value
