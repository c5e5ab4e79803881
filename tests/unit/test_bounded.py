"""relayd.bounded: memo tables that stay bounded whatever keys arrive."""

from __future__ import annotations

from relayd.bounded import parse_once, remember


def test_remember_stores_and_returns_the_value() -> None:
    table: dict[str, int] = {}
    assert remember(table, 3, "a", 1) == 1
    assert table == {"a": 1}


def test_a_full_table_is_emptied_before_the_new_key() -> None:
    table: dict[int, int] = {}
    for key in range(10):
        remember(table, 4, key, key * key)
        assert len(table) <= 4
    assert table == {8: 64, 9: 81}  # emptied at the 9th key (four were held)


class _Word(str):
    pass


def test_parse_once_parses_each_text_once_and_keeps_classes_apart() -> None:
    table: dict[str, object] = {}
    calls: list[str] = []

    def parse(text: str) -> str:
        calls.append(text)
        return text.upper()

    assert parse_once(table, 8, "via", str, parse) == "VIA"
    assert parse_once(table, 8, "via", str, parse) == "VIA"
    assert calls == ["via"]
    # Another class asking for the same text gets its own parse, never the cached str.
    word = parse_once(table, 8, "via", _Word, lambda text: _Word(text * 2))
    assert type(word) is _Word and word == "viavia"
