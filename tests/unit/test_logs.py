"""relayd.logs: one level for every relayd logger, applied before formatting."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher

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
