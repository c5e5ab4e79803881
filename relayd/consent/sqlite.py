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
from typing import Any, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from zope.interface import implementer

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

SCHEMA_VERSION = 3
"""1: documents and consents; 2: registrations (``bindings``); 3: rate counts (``requests``)."""

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
        PRIMARY KEY (aor, uri)
    )""",
    "CREATE INDEX IF NOT EXISTS bindings_expiry ON bindings (expires)",
    # Version 3.
    "CREATE TABLE IF NOT EXISTS requests (key TEXT NOT NULL, at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS requests_by_key ON requests (key, at)",
    "CREATE INDEX IF NOT EXISTS requests_by_time ON requests (at)",
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
    """

    def __init__(self, path: str, reactor: IReactorThreads | IReactorTime) -> None:
        super().__init__()
        self._path = path
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

    def _interact(self, interaction: Callable[..., _T], *args: object) -> Deferred[_T]:
        result: Deferred[_T] = self._pool.runInteraction(interaction, *args)
        return result

    def _read(self, read: Callable[[Rows], _T]) -> Deferred[_T]:
        return self._interact(lambda txn: read(SQLRows(txn, qmark)))

    def _write(self, write: Write[_T]) -> Deferred[_T]:
        """Run a write transaction, then (on the reactor thread) announce its changes."""

        def transaction(txn: Any) -> tuple[_T, list[StoreChange]]:
            txn.execute("BEGIN IMMEDIATE")
            return write(SQLRows(txn, qmark))

        def committed(outcome: tuple[_T, list[StoreChange]]) -> _T:
            value, changes = outcome
            self._listeners.emit(changes)
            return value

        return self._interact(transaction).addCallback(committed)

    async def _close(self) -> None:
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


def _checkpoint(txn: Any) -> None:
    txn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    txn.fetchall()
