"""Every node's committed changes, for every other node sharing the PostgreSQL store.

A write transaction that changes something also appends its :class:`StoreChange`\\ s to
the ``changes`` table, under a transaction-wide lock so that sequence numbers commit
in order, and sends ``NOTIFY relayd_changes`` with the last number (delivered only if
the transaction commits).  The notification is only a wake-up: each node's
:class:`ChangeFeed` reads the rows after the last one it has seen and announces those
written by other nodes to its own listeners.  So a node whose listening connection
was lost catches up, on reconnect, on what it missed, and no change is announced
twice: the sequence number, not the notification, says what is new.

Rows are kept for the last :data:`KEPT_CHANGES` changes: a node away for longer
misses the oldest ones (and says so in its log).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads

from relayd.consent.changes import decode, encode
from relayd.consent.store import StoreChange
from relayd.logs import logger

CHANNEL = "relayd_changes"
KEPT_CHANGES = 100_000
"""Rows the ``changes`` table keeps: how far back a reconnecting node can catch up."""
_CHANGES_LOCK = 0x7265636861  # "recha": numbers are taken and committed in one order
_BATCH = 500
"""Rows read per query while catching up."""

__all__ = ["ChangeFeed", "decode", "encode", "record"]


def record(cursor: Any, node: str, changes: Sequence[StoreChange]) -> None:
    """Inside a write transaction: append ``changes`` (of ``node``), drop the rows past
    :data:`KEPT_CHANGES` and notify every node, on commit, that there is more to read."""
    if not changes:
        return
    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_CHANGES_LOCK,))
    cursor.executemany(
        "INSERT INTO changes (node, payload) VALUES (%s, %s)",
        [(node, encode(change)) for change in changes],
    )
    cursor.execute("SELECT currval(pg_get_serial_sequence('changes', 'seq'))")
    last = int(cursor.fetchone()[0])
    cursor.execute("DELETE FROM changes WHERE seq <= %s", (last - KEPT_CHANGES,))
    cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(last)))


class ChangeFeed:
    """One node's listening connection and what it has seen (module doc).

    psycopg's connections block, so the feed owns one thread: it connects, LISTENs,
    reads the new rows and hands other nodes' changes to ``deliver`` on the reactor
    thread, in sequence order.  A lost connection is reopened after ``backoff``
    seconds, doubled up to ``max_backoff``; then the rows written meanwhile are read.
    A notification-driven thread rather than the reactor watching the socket: the
    connect, the LISTEN and each catch-up query block, and would block the reactor.
    """

    log = logger()

    def __init__(
        self,
        dsn: str,
        node: str,
        deliver: Callable[[list[StoreChange]], object],
        reactor: IReactorFromThreads,
        prepare: Callable[[psycopg.Connection[Any]], object] = lambda connection: None,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        poll: float = 1.0,
    ) -> None:
        self._dsn = dsn
        self._node = node
        self._deliver = deliver
        self._reactor = reactor
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._poll = poll
        self._prepare = prepare
        self._stopped: Deferred[None] = Deferred()
        self._last: int | None = None
        self._stopping = threading.Event()
        self.connected = threading.Event()
        """Set while listening, once caught up (tests wait on it)."""
        self._thread = threading.Thread(target=self._run, name=f"relayd-changes-{node}")
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> Deferred[None]:
        """Stop listening; fires, on the reactor thread, once the thread has ended
        (within ``poll`` seconds)."""
        self._stopping.set()
        return self._stopped

    def _run(self) -> None:
        try:
            self._follow()
        except Exception:  # a schema newer than this relayd: the store's calls say so too
            self.log.failure("store change feed stopped")
        finally:
            self.connected.clear()
            self._reactor.callFromThread(self._stopped.callback, None)

    def _follow(self) -> None:
        delay = self._backoff
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as connection:
                    self._listen(connection)
                    delay = self._backoff
                    while not self._stopping.is_set():
                        woken = list(connection.notifies(timeout=self._poll, stop_after=1))
                        if woken:
                            self._catch_up(connection)
            except psycopg.Error as e:
                self.connected.clear()
                if self._stopping.is_set():
                    return
                self.log.warn(
                    "store change feed lost ({error}); reconnecting in {delay}s",
                    error=str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
                    delay=delay,
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, self._max_backoff)

    def _listen(self, connection: psycopg.Connection[Any]) -> None:
        """LISTEN first, then read: a change committed in between is read, not lost."""
        self._prepare(connection)
        connection.execute(f"LISTEN {CHANNEL}")
        if self._last is None:
            row = connection.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()
            self._last = int(row[0]) if row is not None else 0
        else:
            self._catch_up(connection)
        self.connected.set()

    def _catch_up(self, connection: psycopg.Connection[Any]) -> None:
        """Read the rows after the last one seen; deliver other nodes' changes."""
        assert self._last is not None
        oldest = connection.execute("SELECT min(seq) FROM changes").fetchone()
        if oldest is not None and oldest[0] is not None and int(oldest[0]) > self._last + 1:
            # Rows are only removed past KEPT_CHANGES; a number never used (a rolled
            # back transaction) looks the same, so this is a warning, not proof.
            self.log.warn(
                "store changes after {last} may have been dropped before this node read them",
                last=self._last,
            )
        while True:
            rows = connection.execute(
                "SELECT seq, node, payload FROM changes WHERE seq > %s ORDER BY seq LIMIT %s",
                (self._last, _BATCH),
            ).fetchall()
            if not rows:
                return
            self._last = int(rows[-1][0])
            changes = [decode(payload) for _, node, payload in rows if node != self._node]
            if changes:
                self._reactor.callFromThread(self._deliver, changes)
            if len(rows) < _BATCH:
                return
