"""When to shed SIP load: the event loop's own lag.

Over UDP a relay past its knee does not slow down gracefully: requests wait in the
socket buffer, senders retransmit after T1, the retransmissions are more work, and the
relay ends up answering requests their senders gave up on (RFC 3261 §21.5.4 and RFC 6357
describe the collapse). What all of that has in common is queued work, and queued work
shows as lag: a timer that should fire every ``interval`` fires late because the reactor
is busy reading and handling datagrams. The lag that counts is the smallest of the last
few samples: a process that merely waited for a CPU once is late once, a process behind
its work is late every time. Above ``threshold`` new requests get ``503`` with
``Retry-After`` (cheap: no fan-out) until the lag has fallen below half of it again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from relayd.logs import logger

__all__ = ["LagMonitor", "any_of"]


class LagMonitor:
    """Sustained reactor lag, sampled by a timer on ``clock`` every ``interval``."""

    log = logger()

    def __init__(
        self,
        clock: IReactorTime,
        threshold_seconds: float,
        interval_seconds: float = 0.02,
        samples: int = 5,
    ) -> None:
        if threshold_seconds <= 0 or interval_seconds <= 0 or samples < 1:
            raise ValueError("threshold, interval and samples must be positive")
        self.clock = clock
        self.threshold = threshold_seconds
        self.interval = interval_seconds
        self._samples: deque[float] = deque(maxlen=samples)
        self.lag = 0.0
        self.shedding = False
        self._due = 0.0
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        if self._call is None:
            self._schedule()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.lag = 0.0
        self.shedding = False
        self._samples.clear()

    def _schedule(self) -> None:
        self._due = self.clock.seconds() + self.interval
        self._call = self.clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        samples = self._samples
        samples.append(max(0.0, self.clock.seconds() - self._due))
        self.lag = min(samples) if len(samples) == samples.maxlen else 0.0
        if not self.shedding and self.lag > self.threshold:
            self.shedding = True
            self.log.warn(
                "SIP overload: event loop {lag:.0f} ms late; answering 503 until it recovers",
                lag=self.lag * 1000,
            )
        elif self.shedding and self.lag < self.threshold / 2:
            self.shedding = False
            self.log.info("SIP overload over; accepting requests again")
        self._schedule()

    def overloaded(self) -> bool:
        return self.shedding


def any_of(*signals: Callable[[], bool]) -> Callable[[], bool]:
    """One ``overloaded`` hook from several."""
    return lambda: any(signal() for signal in signals)
