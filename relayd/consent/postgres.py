"""The permission store's PostgreSQL backend: shared by every node that names the same
database, behind adbapi with psycopg 3.

It connects, migrates and runs transactions; the rows are :class:`relayd.consent.sqlrows.SQLRows`
(shared with SQLite) and the store's rules :class:`relayd.consent.store.RuleStore`'s.
Its schema is built and upgraded by the numbered steps of :data:`MIGRATIONS`, never by
ad-hoc DDL: each applied step is a row of ``schema_migrations``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.consent.pgchanges import ChangeFeed, record
from relayd.consent.sqlrows import SQLRows
from relayd.consent.store import (
    IPermissionStore,
    Rows,
    RuleStore,
    StoreChange,
    StoreUnavailable,
    Write,
)

_T = TypeVar("_T")

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: documents, consents and registrations (SQLite's versions 1 and 2).
    (
        """CREATE TABLE documents (
            auid TEXT COLLATE "C" NOT NULL,
            xui TEXT COLLATE "C" NOT NULL,
            name TEXT COLLATE "C" NOT NULL,
            body BYTEA NOT NULL,
            etag TEXT NOT NULL,
            PRIMARY KEY (auid, xui, name)
        )""",
        """CREATE TABLE consents (
            id TEXT COLLATE "C" PRIMARY KEY,
            sender TEXT NOT NULL,
            list_uri TEXT NOT NULL,
            recipient TEXT NOT NULL,
            methods TEXT NOT NULL,
            permission_token TEXT NOT NULL UNIQUE,
            created DOUBLE PRECISION NOT NULL,
            expires DOUBLE PRECISION NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('pending', 'granted', 'denied', 'expired'))
        )""",
        """CREATE UNIQUE INDEX consents_one_open
            ON consents (sender, list_uri, recipient) WHERE state = 'pending'""",
        "CREATE INDEX consents_recipient ON consents (recipient)",
        "CREATE INDEX consents_pending_expiry ON consents (expires) WHERE state = 'pending'",
        """CREATE TABLE bindings (
            aor TEXT COLLATE "C" NOT NULL,
            uri TEXT COLLATE "C" NOT NULL,
            contact TEXT NOT NULL,
            expires DOUBLE PRECISION NOT NULL,
            call_id TEXT NOT NULL,
            cseq INTEGER NOT NULL,
            q DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (aor, uri)
        )""",
        "CREATE INDEX bindings_expiry ON bindings (expires)",
    ),
    # 2: every node's committed changes, for the others (relayd.consent.pgchanges).
    (
        """CREATE TABLE changes (
            seq BIGSERIAL PRIMARY KEY,
            node TEXT NOT NULL,
            payload TEXT NOT NULL
        )""",
    ),
    # 3: rate counts, shared by every node (relayd.consent.ledger).
    (
        """CREATE TABLE requests (
            key TEXT COLLATE "C" NOT NULL,
            at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX requests_by_key ON requests (key, at)",
        "CREATE INDEX requests_by_time ON requests (at)",
    ),
    # 4: where each registration came from (relayd.sip.registrar).
    ("ALTER TABLE bindings ADD COLUMN source TEXT NOT NULL DEFAULT ''",),
)
"""Step *n* (from 1) turns schema version *n - 1* into *n*; steps are only ever appended.
Sorted keys are ``COLLATE "C"``: names and ids sort by code point, as in the other backends."""

SCHEMA_VERSION = len(MIGRATIONS)

_MIGRATION_LOCK = 0x72656C6179  # "relay": one node migrates at a time
_ATTEMPTS = 5
"""Tries of a transaction that PostgreSQL refused to serialise against another node's."""
_CONNECT_TIMEOUT = "10"
"""Seconds to reach the server when the DSN gives no ``connect_timeout``."""


class StoreSchemaError(Exception):
    """The database was migrated by a newer relayd (schema version too high)."""


def connection_string(dsn: str) -> str:
    """``dsn`` (a libpq connection string) with a connect timeout when it has none:
    a server that does not answer fails the store's calls instead of hanging them."""
    if "connect_timeout" in conninfo_to_dict(dsn):
        return dsn
    return make_conninfo(dsn, connect_timeout=_CONNECT_TIMEOUT)


def describe(dsn: str) -> str:
    """Where ``dsn`` points, for the log: host, port, database and user, no password."""
    params = conninfo_to_dict(dsn)
    where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
    return f"{params.get('user', '')}@{where}/{params.get('dbname', '')}".lstrip("@")


def migrate(connection: psycopg.Connection[Any]) -> int:
    """Apply the steps of :data:`MIGRATIONS` the database lacks; the version it had.

    One transaction under a database-wide advisory lock, in READ COMMITTED so that a
    node which waited for the lock sees what the node before it applied.  A database
    migrated by a newer relayd is refused with :class:`StoreSchemaError`.
    """
    connection.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY,"
            " applied TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now())"
        )
        row = connection.execute("SELECT max(version) FROM schema_migrations").fetchone()
        current = int(row[0]) if row is not None and row[0] is not None else 0
        if current > SCHEMA_VERSION:
            raise StoreSchemaError(f"database schema {current} is newer than {SCHEMA_VERSION}")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                connection.execute(statement)
            connection.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
    return current


def _open_connection(connection: psycopg.Connection[Any]) -> int:
    """adbapi ``cp_openfun``, in the pool thread for each new connection: migrate, then
    make every transaction SERIALIZABLE, so that a rule's read-then-write (If-Match, one
    open consent per triple) holds against every node's writes, not only this one's.
    The schema version the database had."""
    try:
        before = migrate(connection)
    except BaseException:
        connection.close()  # adbapi keeps only connections that opened
        raise
    connection.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
    return before


@contextmanager
def session(dsn: str) -> Iterator[tuple[Rows, int]]:
    """The store's rows in one blocking transaction, committed when the block ends
    (rolled back if it raises), and the schema version the database had before it was
    brought up to date: for ``relayctl store``, never in the daemon."""
    with psycopg.connect(connection_string(dsn)) as connection:
        before = _open_connection(connection)
        with connection.transaction(), connection.cursor() as cursor:
            yield SQLRows(cursor), before


def _transaction(connection: Any, work: Callable[[Any], _T]) -> _T:
    """Run ``work`` on a cursor and commit, in the pool's thread.

    Again from the start when PostgreSQL refused to serialise it against a concurrent
    transaction (of this or another node), up to :data:`_ATTEMPTS` times; and once more
    on a new connection (adbapi's ``reconnect``) when the server had closed this one
    (a restart, a failover) before the commit was sent, so nothing can have been
    written.  A connection lost during the commit is the caller's error: whether the
    write happened is unknown, and running it twice could apply it twice.
    """
    refused = 0
    reconnected = False
    while True:
        committing = False
        try:
            with connection.cursor() as cursor:
                outcome = work(cursor)
            committing = True
            connection.commit()
        except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected):
            connection.rollback()
            refused += 1
            if refused == _ATTEMPTS:
                raise
            time.sleep(0.005 * refused)  # the pool's thread, never the reactor's
        except psycopg.OperationalError:
            if committing or reconnected or not connection.closed:
                raise
            connection.reconnect()
            reconnected = True
        else:
            return outcome


class _Pool(adbapi.ConnectionPool):
    """adbapi's pool, but a connection the server closed (a restart, a failover) is
    dropped without the rollback adbapi would try first: on a closed connection that
    can only fail, and adbapi logs a traceback for each request made meanwhile.  The
    next call opens a new connection; :func:`_transaction` decides what to retry."""

    def _runWithConnection(self, func: Callable[..., _T], *args: Any, **kw: Any) -> _T:
        conn = self.connectionFactory(self)
        try:
            result: _T = func(conn, *args, **kw)
            conn.commit()
            return result
        except BaseException:
            raw = self.connections.get(self.threadID())
            if raw is None or raw.closed:
                if raw is not None:
                    self.disconnect(raw)
            else:
                conn.rollback()
            raise


@implementer(IPermissionStore)
class PostgresPermissionStore(RuleStore):
    """The store every node of a deployment shares: one PostgreSQL database.

    psycopg 3's connections block, so, as with SQLite, all database work (connecting
    and migrating included) runs in adbapi's worker thread, never on the reactor
    thread.  One connection per process keeps this node's changes announced in the
    order they were committed; transactions are SERIALIZABLE, so several nodes'
    concurrent writes keep the store's compare-and-set rules (a refused transaction
    is retried from its first read).  A connection the server closed is reopened.

    Other nodes' changes reach this node's listeners too, through a
    :class:`~relayd.consent.pgchanges.ChangeFeed` (LISTEN/NOTIFY and the ``changes``
    table): a grant written at one node wakes the wait-permission subscriber held by
    another.  ``node`` names this process in the table (a fresh random id by default).
    """

    def __init__(
        self,
        dsn: str,
        reactor: IReactorThreads | IReactorTime,
        node: str | None = None,
        backoff: float = 0.5,
    ) -> None:
        super().__init__()
        self.node = node if node is not None else secrets.token_hex(8)
        self._closed = False
        self._pool = _Pool(
            "psycopg",
            connection_string(dsn),
            cp_min=1,
            cp_max=1,
            cp_openfun=_open_connection,
            cp_reconnect=True,
            cp_reactor=reactor,
        )
        self.feed = ChangeFeed(
            connection_string(dsn),
            self.node,
            self._remote,
            cast(IReactorFromThreads, reactor),
            prepare=migrate,
            backoff=backoff,
        )
        self.feed.start()

    def _transact(self, work: Callable[[Any], _T]) -> Deferred[_T]:
        """Run ``work`` in a transaction; a server that cannot be reached (or that kept
        refusing to serialise it) fails it with :class:`StoreUnavailable`."""

        def unavailable(failure: Failure) -> Failure:
            if failure.check(psycopg.OperationalError):
                raise StoreUnavailable(str(failure.value).strip()) from failure.value
            return failure

        result: Deferred[_T] = self._pool.runWithConnection(_transaction, work)
        return result.addErrback(unavailable)

    def _read(self, read: Callable[[Rows], _T]) -> Deferred[_T]:
        return self._transact(lambda cursor: read(SQLRows(cursor)))

    def _write(self, write: Write[_T]) -> Deferred[_T]:
        """Run a write transaction that records its changes for the other nodes, then
        (on the reactor thread) announce them here."""
        node = self.node

        def recorded(cursor: Any) -> tuple[_T, list[StoreChange]]:
            value, changes = write(SQLRows(cursor))
            record(cursor, node, changes)
            return value, changes

        def committed(outcome: tuple[_T, list[StoreChange]]) -> _T:
            value, changes = outcome
            self._listeners.emit(changes)
            return value

        return self._transact(recorded).addCallback(committed)

    def _remote(self, changes: list[StoreChange]) -> None:
        """Another node's committed changes, announced as this node's own are."""
        if not self._closed:
            self._listeners.emit(changes)

    def close(self) -> Deferred[None]:
        self._closed = True
        self._pool.close()
        return self.feed.stop()
