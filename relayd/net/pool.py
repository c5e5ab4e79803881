"""Outbound connections by key: reused while open, one connect at a time per key.

MSRP (RFC 4976 §6.4.2) and SIP (RFC 3261 §18.1.1) both reuse a connection
to a next hop, and a burst of messages towards a hop not yet connected must
make one connection, not one each.  ``ConnectionPool`` holds the open
connection per key and, while one is being made, queues whoever asks for it
behind that single attempt.  The caller says how to connect (resolution,
endpoints, TLS are its own); the pool only counts attempts and waiters, and
bounds how long they wait when asked to.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure


class Connected(Protocol):
    """What the pool asks of a connection: is it still open? (Twisted's Protocol has it.)"""

    @property
    def connected(self) -> int: ...


K = TypeVar("K", bound=Hashable)
C = TypeVar("C", bound=Connected)


class _Attempt(Generic[C]):
    __slots__ = ("deferred", "timer", "waiters")

    def __init__(self) -> None:
        self.waiters: list[defer.Deferred[C]] = []
        self.deferred: defer.Deferred[C] | None = None
        self.timer: IDelayedCall | None = None


class ConnectionPool(Generic[K, C]):
    """Open connections by key, and the one attempt per key under way.

    ``wait_seconds`` bounds an attempt as its waiters see it: when it passes,
    they fail with ``twisted.internet.error.TimeoutError`` and the attempt is
    cancelled.  None leaves the bound to the connect itself (its endpoint
    timeouts).
    """

    def __init__(self, clock: IReactorTime, wait_seconds: float | None = None) -> None:
        self._clock = clock
        self._wait_seconds = wait_seconds
        self._open: dict[K, C] = {}
        self._attempts: dict[K, _Attempt[C]] = {}

    def get(self, key: K) -> C | None:
        """The open connection for ``key``, if there is one."""
        existing = self._open.get(key)
        return existing if existing is not None and existing.connected else None

    def connecting(self, key: K) -> bool:
        return key in self._attempts

    def keys(self) -> set[K]:
        """Every key with a connection, open or under way."""
        return {*self._open, *self._attempts}

    def acquire(
        self, key: K, connect: Callable[[], Coroutine[Any, Any, C] | defer.Deferred[C]]
    ) -> defer.Deferred[C]:
        """The open connection for ``key``, else the outcome of the attempt under way.

        ``connect`` is called only when no attempt is under way: every
        other caller meanwhile waits for that one.
        """
        existing = self._open.get(key)
        if existing is not None and existing.connected:
            return defer.succeed(existing)
        waiter: defer.Deferred[C] = defer.Deferred()
        attempt = self._attempts.get(key)
        if attempt is not None:
            attempt.waiters.append(waiter)
            return waiter
        attempt = self._attempts[key] = _Attempt()
        attempt.waiters.append(waiter)
        if self._wait_seconds is not None:
            attempt.timer = self._clock.callLater(self._wait_seconds, self._expired, key, attempt)
        deferred: defer.Deferred[C]
        try:
            deferred = defer.ensureDeferred(connect())
        except Exception:
            deferred = defer.fail()
        attempt.deferred = deferred
        deferred.addCallbacks(
            lambda connection: self._connected(connection, key, attempt),
            lambda failure: self._failed(failure, key, attempt),
        )
        return waiter

    def put(self, key: K, connection: C) -> None:
        """Use ``connection`` for ``key`` from now on (one opened the other way, say)."""
        self._open[key] = connection

    def discard(self, key: K, connection: C) -> bool:
        """``connection`` closed: forget it, unless another has taken its key since;
        whether it was the one known for ``key``."""
        if self._open.get(key) is connection:
            del self._open[key]
            return True
        return False

    def _connected(self, connection: C, key: K, attempt: _Attempt[C]) -> None:
        if self._attempts.get(key) is not attempt:
            return  # cancelled when its waiters gave up (_expired)
        self._open[key] = connection
        waiters = self._finish(key, attempt)
        for waiter in waiters:
            waiter.callback(connection)

    def _failed(self, failure: Failure, key: K, attempt: _Attempt[C]) -> None:
        if self._attempts.get(key) is not attempt:
            return  # its waiters were told already (_expired): its CancelledError
        waiters = self._finish(key, attempt)
        for waiter in waiters:
            waiter.errback(Failure(failure.value))

    def _expired(self, key: K, attempt: _Attempt[C]) -> None:
        attempt.timer = None
        waiters = self._finish(key, attempt)
        if attempt.deferred is not None:
            attempt.deferred.cancel()
        reason = error.TimeoutError(string=f"no connection after {self._wait_seconds} s")
        for waiter in waiters:
            waiter.errback(Failure(reason))

    def _finish(self, key: K, attempt: _Attempt[C]) -> list[defer.Deferred[C]]:
        del self._attempts[key]
        if attempt.timer is not None and attempt.timer.active():
            attempt.timer.cancel()
        attempt.timer = None
        return attempt.waiters
