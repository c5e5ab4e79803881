"""The permission store's SQLite backend: one file in the data directory, behind adbapi.

It keeps rows only; the store's rules are :class:`relayd.consent.store.RuleStore`'s.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from zope.interface import implementer

from relayd.consent.documents import DocumentKey
from relayd.consent.store import (
    ConsentState,
    IPermissionStore,
    PendingConsent,
    Rows,
    RuleStore,
    StoreChange,
    StoredBinding,
    StoredDocument,
    Write,
)
from relayd.logs import logger

_log = logger()

SCHEMA_VERSION = 2
"""1: documents and consents; 2: registrations (``bindings``)."""

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
)

_CONSENT_COLUMNS = (
    "id, sender, list_uri, recipient, methods, permission_token, created, expires, state"
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
    connection.execute("PRAGMA journal_mode=WAL").fetchone()
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA busy_timeout=5000")
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
            yield _SQLiteRows(connection.cursor()), before
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
    finally:
        connection.close()


def _consent_from_row(row: Sequence[Any]) -> PendingConsent:
    return PendingConsent(
        id=row[0],
        sender=row[1],
        list_uri=row[2],
        recipient=row[3],
        methods=tuple(method for method in row[4].split(",") if method),
        permission_token=row[5],
        created=row[6],
        expires=row[7],
        state=ConsentState(row[8]),
    )


class _SQLiteRows:
    """:class:`~relayd.consent.store.Rows` in the tables of :data:`_SCHEMA`, on the
    pool's thread, inside the transaction ``txn`` belongs to."""

    def __init__(self, txn: Any) -> None:
        self.txn = txn

    def _consent_where(self, where: str, args: Sequence[object]) -> list[PendingConsent]:
        # ``where`` is always one of the literal clauses in this module, never input.
        self.txn.execute(f"SELECT {_CONSENT_COLUMNS} FROM consents WHERE {where}", args)  # noqa: S608
        return [_consent_from_row(row) for row in self.txn.fetchall()]

    def _one_consent(self, where: str, args: Sequence[object]) -> PendingConsent | None:
        found = self._consent_where(where, args)
        return found[0] if found else None

    def document(self, key: DocumentKey) -> StoredDocument | None:
        self.txn.execute(
            "SELECT body, etag FROM documents WHERE auid = ? AND xui = ? AND name = ?", key
        )
        row = self.txn.fetchone()
        return StoredDocument(bytes(row[0]), row[1]) if row is not None else None

    def document_etag(self, key: DocumentKey) -> str | None:
        self.txn.execute("SELECT etag FROM documents WHERE auid = ? AND xui = ? AND name = ?", key)
        row = self.txn.fetchone()
        return row[0] if row is not None else None

    def write_document(self, key: DocumentKey, body: bytes, etag: str) -> None:
        self.txn.execute(
            "INSERT INTO documents (auid, xui, name, body, etag) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (auid, xui, name) DO UPDATE"
            " SET body = excluded.body, etag = excluded.etag",
            (*key, sqlite3.Binary(body), etag),
        )

    def remove_document(self, key: DocumentKey) -> None:
        self.txn.execute("DELETE FROM documents WHERE auid = ? AND xui = ? AND name = ?", key)

    def all_documents(self) -> list[tuple[DocumentKey, StoredDocument]]:
        self.txn.execute(
            "SELECT auid, xui, name, body, etag FROM documents ORDER BY auid, xui, name"
        )
        return [
            (DocumentKey(auid, xui, name), StoredDocument(bytes(body), etag))
            for auid, xui, name, body, etag in self.txn.fetchall()
        ]

    def document_names(self, auid: str, xui: str) -> list[str]:
        self.txn.execute(
            "SELECT name FROM documents WHERE auid = ? AND xui = ? ORDER BY name", (auid, xui)
        )
        return [row[0] for row in self.txn.fetchall()]

    def consent(self, consent_id: str) -> PendingConsent | None:
        return self._one_consent("id = ?", (consent_id,))

    def consent_by_token(self, permission_token: str) -> PendingConsent | None:
        return self._one_consent("permission_token = ?", (permission_token,))

    def open_consent(self, sender: str, list_uri: str, recipient: str) -> PendingConsent | None:
        return self._one_consent(
            "sender = ? AND list_uri = ? AND recipient = ? AND state = 'pending'",
            (sender, list_uri, recipient),
        )

    def consents(
        self,
        recipient: str | None,
        sender: str | None,
        list_uri: str | None,
        state: ConsentState | None,
    ) -> list[PendingConsent]:
        return self._consent_where(
            "(?1 IS NULL OR recipient = ?1) AND (?2 IS NULL OR sender = ?2)"
            " AND (?3 IS NULL OR list_uri = ?3) AND (?4 IS NULL OR state = ?4)"
            " ORDER BY created, id",
            (recipient, sender, list_uri, state.value if state is not None else None),
        )

    def due_consents(self, now: float) -> list[PendingConsent]:
        return self._consent_where(
            "state = 'pending' AND expires <= ? ORDER BY created, id", (now,)
        )

    def earliest_expiry(self) -> float | None:
        self.txn.execute("SELECT MIN(expires) FROM consents WHERE state = 'pending'")
        row = self.txn.fetchone()
        return None if row is None else row[0]

    def insert_consent(self, record: PendingConsent) -> None:
        self.txn.execute(
            f"INSERT INTO consents ({_CONSENT_COLUMNS})"  # noqa: S608
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.sender,
                record.list_uri,
                record.recipient,
                ",".join(record.methods),
                record.permission_token,
                record.created,
                record.expires,
                record.state.value,
            ),
        )

    def update_consent(self, record: PendingConsent) -> None:
        self.txn.execute(
            "UPDATE consents SET methods = ?, expires = ?, state = ? WHERE id = ?",
            (",".join(record.methods), record.expires, record.state.value, record.id),
        )

    def remove_consent(self, consent_id: str) -> None:
        self.txn.execute("DELETE FROM consents WHERE id = ?", (consent_id,))

    def write_bindings(
        self, aor: str, bindings: Sequence[StoredBinding], removed: Sequence[str]
    ) -> None:
        for uri in removed:
            self.txn.execute("DELETE FROM bindings WHERE aor = ? AND uri = ?", (aor, uri))
        for b in bindings:
            self.txn.execute(
                "INSERT INTO bindings (aor, uri, contact, expires, call_id, cseq, q)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (aor, uri) DO UPDATE"
                " SET contact = excluded.contact, expires = excluded.expires,"
                " call_id = excluded.call_id, cseq = excluded.cseq, q = excluded.q",
                (aor, b.uri, b.contact, b.expires, b.call_id, b.cseq, b.q),
            )

    def live_bindings(self, now: float, limit: int) -> list[StoredBinding]:
        self.txn.execute(
            "SELECT aor, uri, contact, expires, call_id, cseq, q FROM bindings"
            " WHERE expires > ? ORDER BY aor, uri LIMIT ?",
            (now, limit),
        )
        return [StoredBinding(*row) for row in self.txn.fetchall()]

    def remove_expired_bindings(self, now: float) -> int:
        self.txn.execute("DELETE FROM bindings WHERE expires <= ?", (now,))
        return int(self.txn.rowcount)


@implementer(IPermissionStore)
class SQLitePermissionStore(RuleStore):
    """The default store: one SQLite file (in the data directory) behind adbapi.

    All SQLite work, including opening the file and creating the schema, runs in
    adbapi's single worker thread, never on the reactor thread; one connection means
    writes are serialised, and each write is one ``BEGIN IMMEDIATE`` transaction so
    it is atomic even if another process opens the same file.
    """

    log = logger()

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
        return self._interact(lambda txn: read(_SQLiteRows(txn)))

    def _write(self, write: Write[_T]) -> Deferred[_T]:
        """Run a write transaction, then (on the reactor thread) announce its changes."""

        def transaction(txn: Any) -> tuple[_T, list[StoreChange]]:
            txn.execute("BEGIN IMMEDIATE")
            return write(_SQLiteRows(txn))

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
            self.log.failure("WAL checkpoint before closing {path} failed", path=self._path)
        finally:
            self._pool.close()

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())


def _checkpoint(txn: Any) -> None:
    txn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    txn.fetchall()
