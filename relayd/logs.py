"""One log level for every relayd logger (``[relay] log_level``).

twistd writes whatever reaches its observer, debug events included, and formatting and
writing a line costs more than relaying a small message. relayd's loggers therefore
check the level first: below the configured level an event is dropped before anything
builds or formats it.
"""

from __future__ import annotations

import sys

from twisted.logger import Logger, LogLevel, globalLogPublisher

__all__ = ["LEVELS", "logger", "set_level"]

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

_threshold = [LogLevel.info]


class _LevelLogger(Logger):
    """A Logger that drops events below the configured level before building them:
    a per-request debug call then costs a comparison, not an event dictionary."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level < _threshold[0]:
            return
        super().emit(level, format, **kwargs)


def logger() -> Logger:
    """A Logger named after the calling module (or, as a class attribute, its class)."""
    namespace = sys._getframe(1).f_globals.get("__name__", "relayd")
    return _LevelLogger(namespace=namespace, observer=globalLogPublisher)


def set_level(name: str) -> None:
    """Publish events of ``name`` (a key of :data:`LEVELS`) and above."""
    _threshold[0] = LEVELS[name]
