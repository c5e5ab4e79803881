"""Timers that all share one delay, kept in a FIFO instead of the reactor's heap.

SIP transactions arm fixed-delay timers by the thousand per second (Timer J and K, the
TU deadline, 64·T1 give-ups) and cancel most of them. Each ``callLater`` is a heap entry
compared in Python on every push and pop, and a cancelled one stays in the heap until the
reactor compacts it. Timers with one common delay expire in the order they were set, so a
deque and a single pending reactor call serve them all: O(1) to arm, to cancel and to fire.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from relayd.logs import logger

__all__ = ["DelayQueue", "QueuedCall"]

log = logger()


class QueuedCall:
    """One armed timer; :meth:`cancel` is O(1) (the entry is skipped when it comes due)."""

    __slots__ = ("due", "function")

    def __init__(self, due: float, function: Callable[[], object]) -> None:
        self.due = due
        self.function: Callable[[], object] | None = function

    def active(self) -> bool:
        return self.function is not None

    def cancel(self) -> None:
        self.function = None


class DelayQueue:
    """``call(f)`` runs ``f`` after ``delay`` seconds of ``clock`` time."""

    __slots__ = ("_calls", "_clock", "_wakeup", "delay")

    def __init__(self, clock: IReactorTime, delay: float) -> None:
        if delay < 0:
            raise ValueError("delay must not be negative")
        self._clock = clock
        self.delay = delay
        self._calls: deque[QueuedCall] = deque()
        self._wakeup: IDelayedCall | None = None

    def __len__(self) -> int:
        """Armed entries, cancelled ones included until they come due."""
        return len(self._calls)

    def call(self, function: Callable[[], object]) -> QueuedCall:
        entry = QueuedCall(self._clock.seconds() + self.delay, function)
        self._calls.append(entry)
        if self._wakeup is None:
            self._wakeup = self._clock.callLater(self.delay, self._run)
        return entry

    def stop(self) -> None:
        """Forget every armed timer (service shutdown)."""
        for entry in self._calls:
            entry.function = None
        self._calls.clear()
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None

    def _run(self) -> None:
        self._wakeup = None
        calls = self._calls
        now = self._clock.seconds()
        # Entries armed by the callbacks below come after these; with a zero delay they
        # would be due at once and this loop would never end.
        for _ in range(len(calls)):
            entry = calls[0]
            if entry.due > now:
                break
            calls.popleft()
            function = entry.function
            if function is None:
                continue
            entry.function = None
            try:
                function()
            except Exception:
                log.failure("timer callback failed")
        # Cancelled entries at the head would only cost an empty wake-up.
        while calls and calls[0].function is None:
            calls.popleft()
        wakeup = self._wakeup
        if not calls:
            if wakeup is not None and wakeup.active():
                wakeup.cancel()
            self._wakeup = None
            return
        delay = max(0.0, calls[0].due - now)
        if wakeup is None:
            self._wakeup = self._clock.callLater(delay, self._run)
        else:  # a callback armed a new entry: wake for the older head instead
            wakeup.reset(delay)
