"""relayd.logs: one level for every relayd logger, applied before formatting."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import cast

import pytest
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher

from relayd import logs


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    seen: list[LogEvent] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)
        logs.set_level("info")


class _Owner:
    log = logs.logger()


def test_debug_events_are_dropped_at_the_default_level(events: list[LogEvent]) -> None:
    log = logs.logger()
    log.debug("per-request detail {n}", n=1)
    log.info("lifecycle {n}", n=2)
    assert [(e["log_level"], e["n"]) for e in events] == [(LogLevel.info, 2)]
    assert events[0]["log_namespace"] == __name__


def test_the_level_applies_to_every_relayd_logger(events: list[LogEvent]) -> None:
    logs.set_level("debug")
    _Owner().log.debug("now {what}", what="written")
    logs.set_level("error")
    _Owner().log.warn("dropped")
    assert [e["what"] for e in events] == ["written"]
    assert events[0]["log_namespace"] == f"{__name__}._Owner"


def test_unknown_level_is_refused() -> None:
    with pytest.raises(KeyError):
        logs.set_level("chatty")


class _Forged:
    """An object whose text carries what a client sent (as a parsed URI would)."""

    def __str__(self) -> str:
        return "sip:x@y\r\nforged"


def test_control_characters_in_fields_are_escaped(events: list[LogEvent]) -> None:
    log = logs.logger()
    log.warn(
        "{user} {uri} {header} {count} {raw}",
        user="alice\r\n2026-01-01 [relayd] admin logged in",
        uri=_Forged(),
        header="a\x00b\x1b[31mred\x7f\u2028",
        count=3,
        raw=b"\r\n",
    )
    text = formatEvent(events[0])
    assert "\n" not in text and "\r" not in text and "\x00" not in text and "\x1b" not in text
    assert text == (
        "alice\\r\\n2026-01-01 [relayd] admin logged in sip:x@y\\r\\nforged"
        " a\\x00b\\x1b[31mred\\x7f\\u2028 3 b'\\r\\n'"
    )
    assert events[0]["count"] == 3


def test_plain_fields_keep_their_type(events: list[LogEvent]) -> None:
    log = logs.logger()
    owner = _Owner()
    log.info("{owner} {name}", owner=owner, name="bob")
    assert events[0]["owner"] is owner
    assert events[0]["name"] == "bob"


def test_json_lines_writes_one_object_per_line(
    events: list[LogEvent], capsys: pytest.CaptureFixture[str]
) -> None:
    observer = logs.json_lines()
    logs.logger().warn("AUTH from {peer} failed for user {user}", peer="127.0.0.1:5", user="a\nb")
    observer(events[0])
    line = capsys.readouterr().out
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["peer"] == "127.0.0.1:5"
    assert record["user"] == "a\\nb"
    assert record["log_level"]["name"] == "warn"
