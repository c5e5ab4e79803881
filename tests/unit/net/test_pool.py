"""relayd.net.pool.ConnectionPool: one connect per key, its waiters queued, their wait bounded."""

from __future__ import annotations

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from relayd.net.pool import ConnectionPool


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.connected = 1


class Dialer:
    """Connect attempts that stay pending until the test settles them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, defer.Deferred[Conn]]] = []

    def __call__(self, key: str) -> defer.Deferred[Conn]:
        pending: defer.Deferred[Conn] = defer.Deferred()
        self.calls.append((key, pending))
        return pending


def outcome(d: defer.Deferred[Conn]) -> list[object]:
    seen: list[object] = []
    d.addBoth(seen.append)
    return seen


def test_waiters_share_one_attempt_and_then_reuse_the_connection() -> None:
    pool: ConnectionPool[str, Conn] = ConnectionPool(Clock())
    dial = Dialer()
    first = outcome(pool.acquire("a", lambda: dial("a")))
    second = outcome(pool.acquire("a", lambda: dial("a")))
    assert [key for key, _ in dial.calls] == ["a"]
    assert pool.connecting("a")
    assert first == second == []
    conn = Conn("a1")
    dial.calls[0][1].callback(conn)
    assert first == second == [conn]
    assert not pool.connecting("a")
    assert pool.get("a") is conn
    assert outcome(pool.acquire("a", lambda: dial("a"))) == [conn]
    assert len(dial.calls) == 1


def test_keys_connect_independently() -> None:
    pool: ConnectionPool[str, Conn] = ConnectionPool(Clock())
    dial = Dialer()
    pool.acquire("a", lambda: dial("a"))
    pool.acquire("b", lambda: dial("b"))
    assert [key for key, _ in dial.calls] == ["a", "b"]
    assert pool.keys() == {"a", "b"}


def test_a_closed_connection_is_replaced() -> None:
    pool: ConnectionPool[str, Conn] = ConnectionPool(Clock())
    dial = Dialer()
    old = Conn("old")
    pool.acquire("a", lambda: dial("a"))
    dial.calls[0][1].callback(old)
    old.connected = 0
    assert pool.get("a") is None
    got = outcome(pool.acquire("a", lambda: dial("a")))
    assert len(dial.calls) == 2
    new = Conn("new")
    dial.calls[1][1].callback(new)
    assert got == [new]


def test_failure_reaches_every_waiter_and_the_next_caller_tries_again() -> None:
    pool: ConnectionPool[str, Conn] = ConnectionPool(Clock())
    dial = Dialer()
    results = [outcome(pool.acquire("a", lambda: dial("a"))) for _ in range(3)]
    dial.calls[0][1].errback(Failure(error.ConnectionRefusedError("a")))
    for seen in results:
        (failure,) = seen
        assert isinstance(failure, Failure)
        assert failure.check(error.ConnectionRefusedError)
    assert pool.keys() == set()
    pool.acquire("a", lambda: dial("a"))
    assert len(dial.calls) == 2


def test_a_connect_that_raises_fails_its_waiter() -> None:
    pool: ConnectionPool[str, Conn] = ConnectionPool(Clock())

    def broken() -> defer.Deferred[Conn]:
        raise ValueError("no endpoint")

    (failure,) = outcome(pool.acquire("a", broken))
    assert isinstance(failure, Failure)
    assert failure.check(ValueError)
    assert not pool.connecting("a")


def test_a_connect_that_completes_at_once_answers_at_once() -> None:
    pool: ConnectionPool[str, Conn] = ConnectionPool(Clock())
    conn = Conn("now")

    async def connect() -> Conn:
        return conn

    assert outcome(pool.acquire("a", connect)) == [conn]
    assert pool.get("a") is conn


def test_waiters_give_up_after_wait_seconds_and_the_attempt_is_cancelled() -> None:
    clock = Clock()
    pool: ConnectionPool[str, Conn] = ConnectionPool(clock, wait_seconds=5)
    dial = Dialer()
    first = outcome(pool.acquire("a", lambda: dial("a")))
    clock.advance(3)
    second = outcome(pool.acquire("a", lambda: dial("a")))
    clock.advance(1.9)
    assert first == second == []
    clock.advance(0.1)
    for seen in (first, second):
        (failure,) = seen
        assert isinstance(failure, Failure)
        assert failure.check(error.TimeoutError)
    (_, attempt) = dial.calls[0]
    assert attempt.called  # cancelled: its own failure is handled by the pool
    assert not pool.connecting("a")
    assert clock.getDelayedCalls() == []
    pool.acquire("a", lambda: dial("a"))
    assert len(dial.calls) == 2


def test_success_cancels_the_wait_timer() -> None:
    clock = Clock()
    pool: ConnectionPool[str, Conn] = ConnectionPool(clock, wait_seconds=5)
    dial = Dialer()
    pool.acquire("a", lambda: dial("a"))
    dial.calls[0][1].callback(Conn("a1"))
    assert clock.getDelayedCalls() == []


def test_discard_forgets_only_the_connection_it_names() -> None:
    pool: ConnectionPool[str, Conn] = ConnectionPool(Clock())
    dial = Dialer()
    conn = Conn("a1")
    pool.acquire("a", lambda: dial("a"))
    dial.calls[0][1].callback(conn)
    pool.discard("a", Conn("other"))
    assert pool.get("a") is conn
    pool.discard("a", conn)
    assert pool.get("a") is None
    assert pool.keys() == set()


@pytest.mark.parametrize("wait_seconds", [None, 5.0])
def test_nothing_is_left_scheduled_after_an_attempt(wait_seconds: float | None) -> None:
    clock = Clock()
    pool: ConnectionPool[str, Conn] = ConnectionPool(clock, wait_seconds=wait_seconds)
    dial = Dialer()
    pool.acquire("a", lambda: dial("a"))
    dial.calls[0][1].errback(Failure(error.ConnectError("a")))
    assert clock.getDelayedCalls() == []


def test_a_connection_put_under_a_key_is_reused_and_replaces_the_old() -> None:
    pool: ConnectionPool[str, Conn] = ConnectionPool(Clock())
    dial = Dialer()
    first, inbound = Conn("first"), Conn("inbound")
    pool.put("a", first)
    pool.put("a", inbound)
    assert outcome(pool.acquire("a", lambda: dial("a"))) == [inbound]
    assert dial.calls == []
    pool.discard("a", first)
    assert pool.get("a") is inbound
