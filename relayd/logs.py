"""One log level for every relayd logger (``[relay] log_level``).

twistd writes whatever reaches its observer, debug events included, and formatting and
writing a line costs more than relaying a small message. relayd's loggers therefore
publish through a level filter: below the configured level an event is dropped before
anything formats it.
"""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

__all__ = ["LEVELS", "logger", "set_level"]

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def logger() -> Logger:
    """A Logger named after the calling module (or, as a class attribute, its class)."""
    namespace = sys._getframe(1).f_globals.get("__name__", "relayd")
    return Logger(namespace=namespace, observer=_observer)


def set_level(name: str) -> None:
    """Publish events of ``name`` (a key of :data:`LEVELS`) and above."""
    _predicate.setLogLevelForNamespace("", LEVELS[name])
