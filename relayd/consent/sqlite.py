"""The permission store's SQLite backend: one file in the data directory, behind adbapi.

It opens, migrates and runs transactions; the rows are :class:`relayd.consent.sqlrows.SQLRows`
(shared with PostgreSQL) and the store's rules :class:`relayd.consent.store.RuleStore`'s.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.consent.changes import decode, encode
from relayd.consent.sqlrows import SQLRows, qmark
from relayd.consent.store import (
    IPermissionStore,
    Rows,
    RuleStore,
    StoreChange,
    Write,
)
from relayd.logs import logger

_log = logger()

SCHEMA_VERSION = 5
"""1: documents and consents; 2: registrations (``bindings``); 3: rate counts (``requests``);
4: every process's committed changes, for the others (``changes``, [relay] workers);
5: where each registration came from (``bindings.source``)."""

KEPT_CHANGES = 10_000
"""Rows the ``changes`` table keeps: far more than the workers read between two polls."""

POLL_SECONDS = 0.1
"""How often a worker looks for the other workers' changes (``PRAGMA data_version``,
which reads no table): the most a grant written through one worker waits before a
subscriber held by another is told."""

_BATCH = 500

_T = TypeVar("_T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS documents (
        auid TEXT NOT NULL,
        xui TEXT NOT NULL,
        name TEXT NOT NULL,
        body BLOB NOT NULL,
        etag TEXT NOT NULL,
        PRIMARY KEY (auid, xui, name)
    )""",
    """CREATE TABLE IF NOT EXISTS consents (
        id TEXT PRIMARY KEY,
        sender TEXT NOT NULL,
        list_uri TEXT NOT NULL,
        recipient TEXT NOT NULL,
        methods TEXT NOT NULL,
        permission_token TEXT NOT NULL UNIQUE,
        created REAL NOT NULL,
        expires REAL NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('pending', 'granted', 'denied', 'expired'))
    )""",
    """CREATE UNIQUE INDEX IF NOT EXISTS consents_one_open
        ON consents (sender, list_uri, recipient) WHERE state = 'pending'""",
    "CREATE INDEX IF NOT EXISTS consents_recipient ON consents (recipient)",
    """CREATE INDEX IF NOT EXISTS consents_pending_expiry
        ON consents (expires) WHERE state = 'pending'""",
    # Version 2.
    """CREATE TABLE IF NOT EXISTS bindings (
        aor TEXT NOT NULL,
        uri TEXT NOT NULL,
        contact TEXT NOT NULL,
        expires REAL NOT NULL,
        call_id TEXT NOT NULL,
        cseq INTEGER NOT NULL,
        q REAL NOT NULL,
        source TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (aor, uri)
    )""",
    "CREATE INDEX IF NOT EXISTS bindings_expiry ON bindings (expires)",
    # Version 3.
    "CREATE TABLE IF NOT EXISTS requests (key TEXT NOT NULL, at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS requests_by_key ON requests (key, at)",
    "CREATE INDEX IF NOT EXISTS requests_by_time ON requests (at)",
    # Version 4.
    """CREATE TABLE IF NOT EXISTS changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        node TEXT NOT NULL,
        payload TEXT NOT NULL
    )""",
)


class StoreSchemaError(Exception):
    """The database was written by a newer relayd (schema version too high)."""


def _open_connection(connection: sqlite3.Connection) -> int:
    """adbapi ``cp_openfun``: runs in the pool thread for each new connection; the
    schema version the file had (0 when new).

    WAL plus ``synchronous=FULL`` makes every committed transaction durable (the WAL
    is fsynced at commit), so a crash or ``kill -9`` loses nothing acknowledged.

    Schema changes are additive: every table and index is created if missing, so an
    older file gains what a newer version added and is then marked with its number;
    a file marked newer than this code is refused.
    """
    # The wait first: several processes ([relay] workers) may open the file at once.
    connection.execute("PRAGMA busy_timeout=5000")
    connection.execute("PRAGMA journal_mode=WAL").fetchone()
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            connection.execute(statement)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(bindings)")}
        if "source" not in columns:  # version 5, on a file made before it
            connection.execute("ALTER TABLE bindings ADD COLUMN source TEXT NOT NULL DEFAULT ''")
        row = connection.execute("SELECT max(version) FROM schema_version").fetchone()
        version = row[0] if row else None
        if version is None:
            version = 0
            connection.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        elif version > SCHEMA_VERSION:
            raise StoreSchemaError(f"database schema {version} is newer than {SCHEMA_VERSION}")
        elif version < SCHEMA_VERSION:
            connection.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return int(version)


def restrict_files(path: str) -> None:
    """The store and its ``-wal``/``-shm`` files are 0600: they hold every user's
    rules and lists and the Permission-URI tokens.

    The database is created here, 0600 and empty, before SQLite opens it; SQLite
    gives the ``-wal`` and ``-shm`` files it creates the database's mode.  Files of
    ours left wider by an older relayd are tightened, with a log line; files of
    another owner are theirs to set.  Runs once, before anything is served.
    """
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        os.fchmod(descriptor, 0o600)  # whatever the umask
        os.close(descriptor)
    for name in (path, path + "-wal", path + "-shm"):
        try:
            info = os.stat(name)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077 == 0 or info.st_uid != os.geteuid():
            continue
        os.chmod(name, 0o600)
        _log.warn(
            "Store file {path} had mode {mode}; changed it to 0600", path=name, mode=f"{mode:04o}"
        )


@contextmanager
def session(path: str) -> Iterator[tuple[Rows, int]]:
    """The store's rows in one blocking ``BEGIN IMMEDIATE`` transaction, committed when
    the block ends (rolled back if it raises), and the schema version the file had
    before it was brought up to date: for ``relayctl store``, never in the daemon."""
    restrict_files(path)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        before = _open_connection(connection)
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield SQLRows(connection.cursor(), qmark), before
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
    finally:
        connection.close()


@implementer(IPermissionStore)
class SQLitePermissionStore(RuleStore):
    """The default store: one SQLite file (in the data directory) behind adbapi.

    All SQLite work, including opening the file and creating the schema, runs in
    adbapi's single worker thread, never on the reactor thread; one connection means
    writes are serialised, and each write is one ``BEGIN IMMEDIATE`` transaction so
    it is atomic even if another process opens the same file.

    With ``node`` (a name for this process: the workers of ``[relay] workers`` share
    the file), each write also appends its changes to the ``changes`` table in the
    same transaction, and every :data:`POLL_SECONDS` the store asks SQLite whether
    another connection committed (``PRAGMA data_version``); if so it reads the rows
    after the last one it has seen and announces the other processes' changes to its
    listeners, marked ``remote``, as the PostgreSQL store does with LISTEN/NOTIFY.
    """

    def __init__(
        self,
        path: str,
        reactor: IReactorThreads | IReactorTime,
        node: str | None = None,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        super().__init__()
        self._path = path
        self.node = node
        self._closed = False
        # Read and written only in the pool's one thread.
        self._last_seq: int | None = None
        self._data_version: int | None = None
        restrict_files(path)
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            isolation_level=None,
            cp_min=1,
            cp_max=1,
            cp_openfun=_open_connection,
            cp_reactor=reactor,
        )
        self._poller: LoopingCall | None = None
        self._polling: Deferred[None] | None = None
        if node is not None:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = cast(IReactorTime, reactor)
            self._poller.start(poll_seconds, now=True).addErrback(
                lambda failure: _log.failure("store change poll stopped", failure)
            )

    def _interact(self, interaction: Callable[..., _T], *args: object) -> Deferred[_T]:
        result: Deferred[_T] = self._pool.runInteraction(interaction, *args)
        return result

    def _read(self, read: Callable[[Rows], _T]) -> Deferred[_T]:
        return self._interact(lambda txn: read(SQLRows(txn, qmark)))

    def _write(self, write: Write[_T]) -> Deferred[_T]:
        """Run a write transaction, then (on the reactor thread) announce its changes."""

        node = self.node

        def transaction(txn: Any) -> tuple[_T, list[StoreChange]]:
            txn.execute("BEGIN IMMEDIATE")
            value, changes = write(SQLRows(txn, qmark))
            if node is not None and changes:
                _record(txn, node, changes)
            return value, changes

        def committed(outcome: tuple[_T, list[StoreChange]]) -> _T:
            value, changes = outcome
            self._listeners.emit(changes)
            return value

        return self._interact(transaction).addCallback(committed)

    def _poll(self) -> None:
        """Announce the changes other processes committed since the last poll."""
        if self._polling is not None or self._closed:
            return  # the previous poll is still reading

        def delivered(changes: list[StoreChange]) -> None:
            if changes and not self._closed:
                self._listeners.emit(changes)

        def done(result: object) -> None:
            self._polling = None
            if isinstance(result, Failure):
                _log.failure("reading other processes' store changes failed", result)

        polling: Deferred[None] = self._interact(self._read_changes).addCallback(delivered)
        self._polling = polling
        polling.addBoth(done)

    def _read_changes(self, txn: Any) -> list[StoreChange]:
        """In the pool thread: the other nodes' rows after the last one seen."""
        version = int(txn.execute("PRAGMA data_version").fetchone()[0])
        if self._last_seq is None:
            row = txn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()
            self._last_seq, self._data_version = int(row[0]), version
            return []
        if version == self._data_version:
            return []  # no other connection has committed
        self._data_version = version
        changes: list[StoreChange] = []
        while True:
            rows = txn.execute(
                "SELECT seq, node, payload FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                (self._last_seq, _BATCH),
            ).fetchall()
            if not rows:
                return changes
            self._last_seq = int(rows[-1][0])
            changes += [decode(payload) for _, node, payload in rows if node != self.node]
            if len(rows) < _BATCH:
                return changes

    async def _close(self) -> None:
        self._closed = True
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._polling is not None:
            await self._polling
        # Checkpoint in the worker thread so that closing the connection (which
        # happens on the calling thread) has no WAL left to copy back.
        try:
            await self._interact(_checkpoint)
        except Exception:
            _log.failure("WAL checkpoint before closing {path} failed", path=self._path)
        finally:
            self._pool.close()

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())


def _record(txn: Any, node: str, changes: list[StoreChange]) -> None:
    """Inside a write transaction: append ``changes`` for the other processes and drop
    the rows past :data:`KEPT_CHANGES`."""
    txn.executemany(
        "INSERT INTO changes (node, payload) VALUES (?, ?)",
        [(node, encode(change)) for change in changes],
    )
    last = int(txn.execute("SELECT last_insert_rowid()").fetchone()[0])
    txn.execute("DELETE FROM changes WHERE seq <= ?", (last - KEPT_CHANGES,))


def _checkpoint(txn: Any) -> None:
    txn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    txn.fetchall()
