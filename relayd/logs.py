"""One log level for every relayd logger (``[relay] log_level``), and safe fields.

twistd writes whatever reaches its observer, debug events included, and formatting and
writing a line costs more than relaying a small message. relayd's loggers therefore
check the level first: below the configured level an event is dropped before anything
builds or formats it.

Log fields often hold what a client sent (URIs, header values, user names).  Every
relayd logger escapes control characters in them, so a CR or LF in a SIP URI cannot
forge a log line and a NUL or an escape sequence cannot reach an operator's terminal.
"""

from __future__ import annotations

import re
import sys

from twisted.logger import (
    FileLogObserver,
    Logger,
    LogLevel,
    globalLogPublisher,
    jsonFileLogObserver,
)

__all__ = ["LEVELS", "escape", "json_lines", "logger", "set_level"]

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

_threshold = [LogLevel.info]

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code > 0xFF:
        return f"\\u{code:04x}"
    return _NAMED.get(match.group(), f"\\x{code:02x}")


def escape(text: str) -> str:
    """``text`` with every control character written as a Python-style escape."""
    return _UNSAFE.sub(_escape_one, text)


def _safe(value: object) -> object:
    """A log field that formats without control characters.

    Strings are escaped; any other object is kept as it is unless its text would
    carry a control character (numbers, bytes and containers format through repr,
    which never does), so observers that read typed fields still get them.
    """
    if isinstance(value, str):
        return escape(value) if _UNSAFE.search(value) else value
    if value is None or isinstance(value, int | float | bytes | list | tuple | dict):
        return value
    text = str(value)
    return escape(text) if _UNSAFE.search(text) else value


class _LevelLogger(Logger):
    """A Logger that drops events below the configured level before building them:
    a per-request debug call then costs a comparison, not an event dictionary."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level < _threshold[0]:
            return
        for key, value in kwargs.items():
            if not key.startswith("log_"):
                kwargs[key] = _safe(value)
        super().emit(level, format, **kwargs)


def logger() -> Logger:
    """A Logger named after the calling module (or, as a class attribute, its class)."""
    namespace = sys._getframe(1).f_globals.get("__name__", "relayd")
    return _LevelLogger(namespace=namespace, observer=globalLogPublisher)


def set_level(name: str) -> None:
    """Publish events of ``name`` (a key of :data:`LEVELS`) and above."""
    _threshold[0] = LEVELS[name]


def json_lines() -> FileLogObserver:
    """One JSON object per line on stdout, for log shippers:
    ``twistd --logger relayd.logs.json_lines msrprelay …`` (twistd calls it)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
