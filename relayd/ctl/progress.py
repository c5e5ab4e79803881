"""Progress display for ``relayctl send``: pure rendering plus a throttled writer.

A bar only makes sense on a terminal; when stderr is a pipe or a file (CI
logs, scripts) one summary line is written at the end instead, so logs are
not filled with carriage returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

BAR_CELLS = 24
"""Width of the bar itself, in characters."""

REFRESH_SECONDS = 0.1
"""Least time between two redraws: redrawing per chunk would cost more than sending it."""

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(count: float) -> str:
    """Binary units with one decimal (``3.0 MiB``); bytes stay whole."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_rate(bytes_per_second: float) -> str:
    return f"{format_bytes(bytes_per_second)}/s"


def render_bar(done_bytes: int, total_bytes: int, elapsed_seconds: float) -> str:
    """One line: ``[#####-----]  42.0%  1.3 MiB / 3.0 MiB  5.1 MiB/s``."""
    fraction = 1.0 if total_bytes <= 0 else min(max(done_bytes / total_bytes, 0.0), 1.0)
    filled = int(fraction * BAR_CELLS)
    bar = "#" * filled + "-" * (BAR_CELLS - filled)
    rate = done_bytes / elapsed_seconds if elapsed_seconds > 0 else 0.0
    return (
        f"[{bar}] {fraction * 100:5.1f}%  {format_bytes(done_bytes)} / "
        f"{format_bytes(total_bytes)}  {format_rate(rate)}"
    )


def render_summary(done_bytes: int, elapsed_seconds: float) -> str:
    """The non-terminal replacement for the bar, written once at the end."""
    rate = done_bytes / elapsed_seconds if elapsed_seconds > 0 else 0.0
    return (
        f"sent {done_bytes} bytes ({format_bytes(done_bytes)}) in {elapsed_seconds:.2f} s,"
        f" {format_rate(rate)}"
    )


class Progress:
    """Feeds ``render_bar`` to a terminal at most every ``REFRESH_SECONDS``."""

    def __init__(
        self,
        total_bytes: int,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
        interactive: bool | None = None,
    ) -> None:
        self.total_bytes = total_bytes
        self.stream = stream
        self.clock = clock
        self.interactive = stream.isatty() if interactive is None else interactive
        self.started = clock()
        self.done_bytes = 0
        self._last_draw: float | None = None
        self._drawn_chars = 0
        self._line_open = False

    def update(self, done_bytes: int) -> None:
        self.done_bytes = done_bytes
        if not self.interactive:
            return
        now = self.clock()
        if (
            self._last_draw is not None
            and now - self._last_draw < REFRESH_SECONDS
            and done_bytes < self.total_bytes
        ):
            return
        self._last_draw = now
        self._draw(now)

    def _draw(self, now: float) -> None:
        line = render_bar(self.done_bytes, self.total_bytes, now - self.started)
        # Pad over the previous line: it may have been longer (rates shrink).
        padding = " " * max(0, self._drawn_chars - len(line))
        self.stream.write("\r" + line + padding)
        self.stream.flush()
        self._drawn_chars = len(line)
        self._line_open = True

    def end_line(self) -> None:
        """Leave a half-drawn bar on its own line before anything else is written."""
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def finish(self) -> None:
        """End the bar's line, or write the one-line summary when not on a terminal."""
        now = self.clock()
        if self.interactive:
            self._draw(now)
            self.end_line()
        else:
            self.stream.write(render_summary(self.done_bytes, now - self.started) + "\n")
            self.stream.flush()
