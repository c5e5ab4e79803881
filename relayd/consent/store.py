"""Permission store: XCAP documents, their ETags and pending consents.

:class:`IPermissionStore` is what the XCAP resource and the SIP consent code talk to.
Every method returns a Deferred; every committed change is announced to listeners as
a :class:`StoreChange`, on the reactor thread, *after* the commit, so a listener that
re-reads the store sees the change (this is how a PUT of a permission document wakes
wait-permission subscribers, consent spec §(a) step 9).

Documents are keyed by (AUID, XUI, name); documents of the ``global`` tree use
:data:`GLOBAL_XUI`.  Resource lists are documents of the ``resource-lists`` AUID, so a
list change is a ``document`` change with that AUID.

ETags are strong and opaque: ``"<24 hex digits>"`` drawn from :mod:`secrets` on every
write.  A fresh random tag per write (rather than a content hash or a per-document
counter) can never repeat after a delete and re-create, so a stale ``If-Match`` never
matches by accident.

Writes are compare-and-set: the precondition is checked and the write done in one
transaction, so of two conflicting writes carrying the same ``If-Match`` exactly one
wins and the other fails with :class:`PreconditionFailed` (HTTP 412).

Pending consents (consent spec §(b) rate limits): at most one *open* (``pending``)
record per (sender, list, recipient); opening it again refreshes it, keeping its id
and permission token so the sender gets the same wait-permission URI.

Registrations (RFC 3261 §10.3) are kept here too, one row per contact of an AOR, so
that a restarted relay still reaches every registered UA. They are the registrar's
working copy on disk, not documents: their writes announce no :class:`StoreChange`.
"""

from __future__ import annotations

import enum
import os
import secrets
import sqlite3
import stat
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple, TypeVar

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from zope.interface import Interface, implementer

from relayd.logs import logger

GLOBAL_XUI = ""
SCHEMA_VERSION = 2
"""1: documents and consents; 2: registrations (``bindings``)."""

ETagCondition = str | Collection[str] | None
_T = TypeVar("_T")


class ConsentState(enum.StrEnum):
    """Life cycle of a pending consent record (consent spec §(b), model)."""

    PENDING = "pending"
    GRANTED = "granted"
    DENIED = "denied"
    EXPIRED = "expired"


@dataclass(frozen=True)
class PendingConsent:
    """A sender's request to reach ``recipient`` through ``list_uri``.

    ``created`` and ``expires`` are POSIX seconds from the caller's clock; the store
    never reads a clock itself.  ``permission_token`` is the secret in the minted
    Permission URI (``p-<token>.xml``).
    """

    id: str
    sender: str
    list_uri: str
    recipient: str
    methods: tuple[str, ...]
    permission_token: str
    created: float
    expires: float
    state: ConsentState = ConsentState.PENDING


@dataclass(frozen=True)
class StoredBinding:
    """One contact registered for ``aor`` (RFC 3261 §10.3), keyed by its URI.

    ``contact`` is the Contact value without ``expires``; ``expires`` is POSIX seconds
    from the registrar's clock, which the store never reads itself.
    """

    aor: str
    uri: str
    contact: str
    expires: float
    call_id: str
    cseq: int
    q: float = 1.0


class StoredDocument(NamedTuple):
    body: bytes
    etag: str


class DocumentWrite(NamedTuple):
    """Result of a PUT: the new ETag and whether the document was new (201 vs 200)."""

    etag: str
    created: bool


@dataclass(frozen=True)
class StoreChange:
    """One committed change.  ``etag`` is None when a document was deleted."""

    kind: Literal["document", "consent"]
    auid: str | None = None
    xui: str | None = None
    name: str | None = None
    etag: str | None = None
    consent: PendingConsent | None = None


Listener = Callable[[StoreChange], object]


class PreconditionFailed(Exception):
    """``If-Match``/``If-None-Match`` did not hold (HTTP 412); nothing was written."""

    def __init__(self, current_etag: str | None) -> None:
        super().__init__(current_etag)
        self.current_etag = current_etag


class IPermissionStore(Interface):
    """Durable storage for XCAP documents and pending consents."""

    def get_document(auid: str, xui: str, name: str) -> Deferred[StoredDocument | None]:
        """The document body and ETag, or None."""

    def put_document(
        auid: str,
        xui: str,
        name: str,
        body: bytes,
        if_match: ETagCondition = None,
        if_none_match: ETagCondition = None,
    ) -> Deferred[DocumentWrite]:
        """Create or replace atomically; fails with PreconditionFailed."""

    def delete_document(
        auid: str, xui: str, name: str, if_match: ETagCondition = None
    ) -> Deferred[bool]:
        """Delete; False when there was nothing to delete."""

    def list_documents(auid: str, xui: str) -> Deferred[list[str]]:
        """Names of the user's documents in that AUID, sorted."""

    def open_consent(
        sender: str,
        list_uri: str,
        recipient: str,
        methods: Sequence[str],
        permission_token: str,
        created: float,
        expires: float,
    ) -> Deferred[PendingConsent]:
        """Create the open record or refresh the existing one (methods merged,
        ``expires`` replaced; id, token and ``created`` kept)."""

    def get_consent(consent_id: str) -> Deferred[PendingConsent | None]:
        """The record with that id."""

    def find_consent_by_token(permission_token: str) -> Deferred[PendingConsent | None]:
        """The record a Permission URI was minted for."""

    def find_open_consent(
        sender: str, list_uri: str, recipient: str
    ) -> Deferred[PendingConsent | None]:
        """The pending record for that triple, if any."""

    def list_consents(
        recipient: str | None = None,
        sender: str | None = None,
        list_uri: str | None = None,
        state: ConsentState | None = None,
    ) -> Deferred[list[PendingConsent]]:
        """Records matching every given filter, oldest first."""

    def set_consent_state(consent_id: str, state: ConsentState) -> Deferred[PendingConsent | None]:
        """Move a record to ``state``; None when the id is unknown."""

    def expire_consents(now: float) -> Deferred[list[PendingConsent]]:
        """Mark pending records with ``expires <= now`` expired; return them."""

    def next_consent_expiry() -> Deferred[float | None]:
        """When the earliest pending record expires; None when none is pending.

        What the expiry timer re-arms from, so that each expiry costs a lookup
        rather than a pass over every pending record."""

    def delete_consent(consent_id: str) -> Deferred[bool]:
        """Remove a record; False when the id is unknown."""

    def save_bindings(
        aor: str, bindings: Sequence[StoredBinding], removed: Sequence[str]
    ) -> Deferred[None]:
        """In one transaction, write ``bindings`` (of ``aor``; a contact URI already
        stored is replaced) and delete the contacts of ``aor`` whose URIs are ``removed``.
        A refresh of one contact is one row written."""

    def list_bindings(now: float, limit: int) -> Deferred[list[StoredBinding]]:
        """At most ``limit`` bindings with ``expires > now``, by AOR: what a restarted
        registrar starts from. An expired binding is never returned."""

    def expire_bindings(now: float) -> Deferred[int]:
        """Delete the bindings with ``expires <= now``; how many there were."""

    def add_listener(listener: Listener) -> None:
        """Call ``listener(change)`` after each committed change."""

    def remove_listener(listener: Listener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""

    def close() -> Deferred[None]:
        """Release resources; the store is unusable afterwards."""


def new_etag() -> str:
    """A strong, opaque, quoted entity tag (RFC 9110 §8.8.3)."""
    return f'"{secrets.token_hex(12)}"'


def _tags(condition: str | Collection[str]) -> frozenset[str]:
    return frozenset((condition,) if isinstance(condition, str) else condition)


def check_preconditions(
    current_etag: str | None, if_match: ETagCondition, if_none_match: ETagCondition
) -> None:
    """RFC 9110 §13.1.1/§13.1.2 with strong comparison; ``"*"`` means "exists"."""
    if if_match is not None:
        tags = _tags(if_match)
        if current_etag is None or ("*" not in tags and current_etag not in tags):
            raise PreconditionFailed(current_etag)
    if if_none_match is not None and current_etag is not None:
        tags = _tags(if_none_match)
        if "*" in tags or current_etag in tags:
            raise PreconditionFailed(current_etag)


def _merge_methods(old: Sequence[str], new: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*old, *new]))


class _Listeners:
    """Listener registry shared by both stores; one failing listener never stops
    the others or the write that triggered it."""

    log = logger()

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def emit(self, changes: Sequence[StoreChange]) -> None:
        for change in changes:
            for listener in list(self._listeners):
                try:
                    listener(change)
                except Exception:
                    self.log.failure("store listener failed for {kind} change", kind=change.kind)


@implementer(IPermissionStore)
class MemoryPermissionStore:
    """In-memory store for tests: synchronous, every call returns a fired Deferred."""

    def __init__(self) -> None:
        self._documents: dict[tuple[str, str, str], StoredDocument] = {}
        self._consents: dict[str, PendingConsent] = {}
        self._bindings: dict[tuple[str, str], StoredBinding] = {}
        self._listeners = _Listeners()

    @staticmethod
    def _run(function: Callable[[], _T]) -> Deferred[_T]:
        try:
            return defer.succeed(function())
        except Exception:
            return defer.fail()

    def get_document(self, auid: str, xui: str, name: str) -> Deferred[StoredDocument | None]:
        return defer.succeed(self._documents.get((auid, xui, name)))

    def put_document(
        self,
        auid: str,
        xui: str,
        name: str,
        body: bytes,
        if_match: ETagCondition = None,
        if_none_match: ETagCondition = None,
    ) -> Deferred[DocumentWrite]:
        def put() -> DocumentWrite:
            key = (auid, xui, name)
            current = self._documents.get(key)
            check_preconditions(current.etag if current else None, if_match, if_none_match)
            etag = new_etag()
            self._documents[key] = StoredDocument(bytes(body), etag)
            self._listeners.emit([StoreChange("document", auid, xui, name, etag)])
            return DocumentWrite(etag, current is None)

        return self._run(put)

    def delete_document(
        self, auid: str, xui: str, name: str, if_match: ETagCondition = None
    ) -> Deferred[bool]:
        def delete() -> bool:
            key = (auid, xui, name)
            current = self._documents.get(key)
            check_preconditions(current.etag if current else None, if_match, None)
            if current is None:
                return False
            del self._documents[key]
            self._listeners.emit([StoreChange("document", auid, xui, name, None)])
            return True

        return self._run(delete)

    def list_documents(self, auid: str, xui: str) -> Deferred[list[str]]:
        names = sorted(n for (a, x, n) in self._documents if a == auid and x == xui)
        return defer.succeed(names)

    def open_consent(
        self,
        sender: str,
        list_uri: str,
        recipient: str,
        methods: Sequence[str],
        permission_token: str,
        created: float,
        expires: float,
    ) -> Deferred[PendingConsent]:
        def open_() -> PendingConsent:
            existing = self._find_open(sender, list_uri, recipient)
            if existing is not None:
                record = replace(
                    existing,
                    methods=_merge_methods(existing.methods, methods),
                    expires=expires,
                )
            else:
                record = PendingConsent(
                    id=secrets.token_urlsafe(16),
                    sender=sender,
                    list_uri=list_uri,
                    recipient=recipient,
                    methods=_merge_methods((), methods),
                    permission_token=permission_token,
                    created=created,
                    expires=expires,
                )
            self._consents[record.id] = record
            self._listeners.emit([StoreChange("consent", consent=record)])
            return record

        return self._run(open_)

    def _find_open(self, sender: str, list_uri: str, recipient: str) -> PendingConsent | None:
        for record in self._consents.values():
            if record.state is ConsentState.PENDING and (
                record.sender,
                record.list_uri,
                record.recipient,
            ) == (sender, list_uri, recipient):
                return record
        return None

    def get_consent(self, consent_id: str) -> Deferred[PendingConsent | None]:
        return defer.succeed(self._consents.get(consent_id))

    def find_consent_by_token(self, permission_token: str) -> Deferred[PendingConsent | None]:
        for record in self._consents.values():
            if secrets.compare_digest(record.permission_token, permission_token):
                return defer.succeed(record)
        return defer.succeed(None)

    def find_open_consent(
        self, sender: str, list_uri: str, recipient: str
    ) -> Deferred[PendingConsent | None]:
        return defer.succeed(self._find_open(sender, list_uri, recipient))

    def list_consents(
        self,
        recipient: str | None = None,
        sender: str | None = None,
        list_uri: str | None = None,
        state: ConsentState | None = None,
    ) -> Deferred[list[PendingConsent]]:
        records = [
            record
            for record in self._consents.values()
            if (recipient is None or record.recipient == recipient)
            and (sender is None or record.sender == sender)
            and (list_uri is None or record.list_uri == list_uri)
            and (state is None or record.state is state)
        ]
        records.sort(key=lambda record: (record.created, record.id))
        return defer.succeed(records)

    def set_consent_state(
        self, consent_id: str, state: ConsentState
    ) -> Deferred[PendingConsent | None]:
        def update() -> PendingConsent | None:
            record = self._consents.get(consent_id)
            if record is None:
                return None
            reopening = state is ConsentState.PENDING and record.state is not state
            if reopening and self._find_open(record.sender, record.list_uri, record.recipient):
                raise ValueError("another record for this triple is already pending")
            record = replace(record, state=state)
            self._consents[consent_id] = record
            self._listeners.emit([StoreChange("consent", consent=record)])
            return record

        return self._run(update)

    def expire_consents(self, now: float) -> Deferred[list[PendingConsent]]:
        expired = [
            replace(record, state=ConsentState.EXPIRED)
            for record in self._consents.values()
            if record.state is ConsentState.PENDING and record.expires <= now
        ]
        expired.sort(key=lambda record: (record.created, record.id))
        for record in expired:
            self._consents[record.id] = record
        self._listeners.emit([StoreChange("consent", consent=record) for record in expired])
        return defer.succeed(expired)

    def next_consent_expiry(self) -> Deferred[float | None]:
        pending = (r.expires for r in self._consents.values() if r.state is ConsentState.PENDING)
        return defer.succeed(min(pending, default=None))

    def delete_consent(self, consent_id: str) -> Deferred[bool]:
        record = self._consents.pop(consent_id, None)
        if record is not None:
            self._listeners.emit([StoreChange("consent", consent=record)])
        return defer.succeed(record is not None)

    def save_bindings(
        self, aor: str, bindings: Sequence[StoredBinding], removed: Sequence[str]
    ) -> Deferred[None]:
        for uri in removed:
            self._bindings.pop((aor, uri), None)
        for binding in bindings:
            self._bindings[(aor, binding.uri)] = replace(binding, aor=aor)
        return defer.succeed(None)

    def list_bindings(self, now: float, limit: int) -> Deferred[list[StoredBinding]]:
        live = sorted(
            (b for b in self._bindings.values() if b.expires > now), key=lambda b: (b.aor, b.uri)
        )
        return defer.succeed(live[: max(0, limit)])

    def expire_bindings(self, now: float) -> Deferred[int]:
        expired = [key for key, b in self._bindings.items() if b.expires <= now]
        for key in expired:
            del self._bindings[key]
        return defer.succeed(len(expired))

    def add_listener(self, listener: Listener) -> None:
        self._listeners.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def close(self) -> Deferred[None]:
        return defer.succeed(None)


# -- SQLite ------------------------------------------------------------------------

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


def _open_connection(connection: sqlite3.Connection) -> None:
    """adbapi ``cp_openfun``: runs in the pool thread for each new connection.

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
            connection.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        elif version > SCHEMA_VERSION:
            raise StoreSchemaError(f"database schema {version} is newer than {SCHEMA_VERSION}")
        elif version < SCHEMA_VERSION:
            connection.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


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


def _fetch_consent(txn: Any, where: str, args: Sequence[object]) -> PendingConsent | None:
    # ``where`` is always one of the literal clauses in this module, never input.
    txn.execute(f"SELECT {_CONSENT_COLUMNS} FROM consents WHERE {where}", args)  # noqa: S608
    row = txn.fetchone()
    return _consent_from_row(row) if row is not None else None


@implementer(IPermissionStore)
class SQLitePermissionStore:
    """The default store: one SQLite file (in the data directory) behind adbapi.

    All SQLite work, including opening the file and creating the schema, runs in
    adbapi's single worker thread, never on the reactor thread; one connection means
    writes are serialised, and each write is one ``BEGIN IMMEDIATE`` transaction so
    it is atomic even if another process opens the same file.
    """

    log = logger()

    def __init__(self, path: str, reactor: IReactorThreads | IReactorTime) -> None:
        self._path = path
        self._restrict_files()
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
        self._listeners = _Listeners()

    def _restrict_files(self) -> None:
        """The store and its ``-wal``/``-shm`` files are 0600: they hold every user's
        rules and lists and the Permission-URI tokens.

        The database is created here, 0600 and empty, before SQLite opens it; SQLite
        gives the ``-wal`` and ``-shm`` files it creates the database's mode.  Files of
        ours left wider by an older relayd are tightened, with a log line; files of
        another owner are theirs to set.  Runs once, before anything is served.
        """
        try:
            descriptor = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            os.fchmod(descriptor, 0o600)  # whatever the umask
            os.close(descriptor)
        for name in (self._path, self._path + "-wal", self._path + "-shm"):
            try:
                info = os.stat(name)
            except FileNotFoundError:
                continue
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o077 == 0 or info.st_uid != os.geteuid():
                continue
            os.chmod(name, 0o600)
            self.log.warn(
                "Store file {path} had mode {mode}; changed it to 0600",
                path=name,
                mode=f"{mode:04o}",
            )

    def _interact(self, interaction: Callable[..., _T], *args: object) -> Deferred[_T]:
        result: Deferred[_T] = self._pool.runInteraction(interaction, *args)
        return result

    def _write(
        self, interaction: Callable[..., tuple[_T, list[StoreChange]]], *args: object
    ) -> Deferred[_T]:
        """Run a write transaction, then (on the reactor thread) announce its changes."""

        def transaction(txn: Any) -> tuple[_T, list[StoreChange]]:
            txn.execute("BEGIN IMMEDIATE")
            return interaction(txn, *args)

        def committed(outcome: tuple[_T, list[StoreChange]]) -> _T:
            value, changes = outcome
            self._listeners.emit(changes)
            return value

        return self._interact(transaction).addCallback(committed)

    def get_document(self, auid: str, xui: str, name: str) -> Deferred[StoredDocument | None]:
        def read(txn: Any) -> StoredDocument | None:
            txn.execute(
                "SELECT body, etag FROM documents WHERE auid = ? AND xui = ? AND name = ?",
                (auid, xui, name),
            )
            row = txn.fetchone()
            return StoredDocument(bytes(row[0]), row[1]) if row is not None else None

        return self._interact(read)

    def put_document(
        self,
        auid: str,
        xui: str,
        name: str,
        body: bytes,
        if_match: ETagCondition = None,
        if_none_match: ETagCondition = None,
    ) -> Deferred[DocumentWrite]:
        def put(txn: Any) -> tuple[DocumentWrite, list[StoreChange]]:
            txn.execute(
                "SELECT etag FROM documents WHERE auid = ? AND xui = ? AND name = ?",
                (auid, xui, name),
            )
            row = txn.fetchone()
            current = row[0] if row is not None else None
            check_preconditions(current, if_match, if_none_match)
            etag = new_etag()
            txn.execute(
                "INSERT INTO documents (auid, xui, name, body, etag) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (auid, xui, name) DO UPDATE"
                " SET body = excluded.body, etag = excluded.etag",
                (auid, xui, name, sqlite3.Binary(body), etag),
            )
            change = StoreChange("document", auid, xui, name, etag)
            return DocumentWrite(etag, current is None), [change]

        return self._write(put)

    def delete_document(
        self, auid: str, xui: str, name: str, if_match: ETagCondition = None
    ) -> Deferred[bool]:
        def delete(txn: Any) -> tuple[bool, list[StoreChange]]:
            txn.execute(
                "SELECT etag FROM documents WHERE auid = ? AND xui = ? AND name = ?",
                (auid, xui, name),
            )
            row = txn.fetchone()
            check_preconditions(row[0] if row is not None else None, if_match, None)
            if row is None:
                return False, []
            txn.execute(
                "DELETE FROM documents WHERE auid = ? AND xui = ? AND name = ?",
                (auid, xui, name),
            )
            return True, [StoreChange("document", auid, xui, name, None)]

        return self._write(delete)

    def list_documents(self, auid: str, xui: str) -> Deferred[list[str]]:
        def read(txn: Any) -> list[str]:
            txn.execute(
                "SELECT name FROM documents WHERE auid = ? AND xui = ? ORDER BY name",
                (auid, xui),
            )
            return [row[0] for row in txn.fetchall()]

        return self._interact(read)

    def open_consent(
        self,
        sender: str,
        list_uri: str,
        recipient: str,
        methods: Sequence[str],
        permission_token: str,
        created: float,
        expires: float,
    ) -> Deferred[PendingConsent]:
        def open_(txn: Any) -> tuple[PendingConsent, list[StoreChange]]:
            existing = _fetch_consent(
                txn,
                "sender = ? AND list_uri = ? AND recipient = ? AND state = 'pending'",
                (sender, list_uri, recipient),
            )
            if existing is not None:
                record = replace(
                    existing,
                    methods=_merge_methods(existing.methods, methods),
                    expires=expires,
                )
                txn.execute(
                    "UPDATE consents SET methods = ?, expires = ? WHERE id = ?",
                    (",".join(record.methods), record.expires, record.id),
                )
            else:
                record = PendingConsent(
                    id=secrets.token_urlsafe(16),
                    sender=sender,
                    list_uri=list_uri,
                    recipient=recipient,
                    methods=_merge_methods((), methods),
                    permission_token=permission_token,
                    created=created,
                    expires=expires,
                )
                txn.execute(
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
            return record, [StoreChange("consent", consent=record)]

        return self._write(open_)

    def get_consent(self, consent_id: str) -> Deferred[PendingConsent | None]:
        return self._interact(_fetch_consent, "id = ?", (consent_id,))

    def find_consent_by_token(self, permission_token: str) -> Deferred[PendingConsent | None]:
        return self._interact(_fetch_consent, "permission_token = ?", (permission_token,))

    def find_open_consent(
        self, sender: str, list_uri: str, recipient: str
    ) -> Deferred[PendingConsent | None]:
        return self._interact(
            _fetch_consent,
            "sender = ? AND list_uri = ? AND recipient = ? AND state = 'pending'",
            (sender, list_uri, recipient),
        )

    def list_consents(
        self,
        recipient: str | None = None,
        sender: str | None = None,
        list_uri: str | None = None,
        state: ConsentState | None = None,
    ) -> Deferred[list[PendingConsent]]:
        state_value = state.value if state is not None else None

        def read(txn: Any) -> list[PendingConsent]:
            txn.execute(
                f"SELECT {_CONSENT_COLUMNS} FROM consents"  # noqa: S608
                " WHERE (?1 IS NULL OR recipient = ?1) AND (?2 IS NULL OR sender = ?2)"
                " AND (?3 IS NULL OR list_uri = ?3) AND (?4 IS NULL OR state = ?4)"
                " ORDER BY created, id",
                (recipient, sender, list_uri, state_value),
            )
            return [_consent_from_row(row) for row in txn.fetchall()]

        return self._interact(read)

    def set_consent_state(
        self, consent_id: str, state: ConsentState
    ) -> Deferred[PendingConsent | None]:
        def update(txn: Any) -> tuple[PendingConsent | None, list[StoreChange]]:
            record = _fetch_consent(txn, "id = ?", (consent_id,))
            if record is None:
                return None, []
            try:
                txn.execute("UPDATE consents SET state = ? WHERE id = ?", (state.value, consent_id))
            except sqlite3.IntegrityError:
                raise ValueError("another record for this triple is already pending") from None
            record = replace(record, state=state)
            return record, [StoreChange("consent", consent=record)]

        return self._write(update)

    def expire_consents(self, now: float) -> Deferred[list[PendingConsent]]:
        def expire(txn: Any) -> tuple[list[PendingConsent], list[StoreChange]]:
            txn.execute(
                f"SELECT {_CONSENT_COLUMNS} FROM consents"  # noqa: S608
                " WHERE state = 'pending' AND expires <= ? ORDER BY created, id",
                (now,),
            )
            records = [
                replace(_consent_from_row(row), state=ConsentState.EXPIRED)
                for row in txn.fetchall()
            ]
            for record in records:
                txn.execute("UPDATE consents SET state = 'expired' WHERE id = ?", (record.id,))
            return records, [StoreChange("consent", consent=record) for record in records]

        return self._write(expire)

    def next_consent_expiry(self) -> Deferred[float | None]:
        def read(txn: Any) -> float | None:
            txn.execute("SELECT MIN(expires) FROM consents WHERE state = 'pending'")
            row = txn.fetchone()
            return None if row is None else row[0]

        return self._interact(read)

    def delete_consent(self, consent_id: str) -> Deferred[bool]:
        def delete(txn: Any) -> tuple[bool, list[StoreChange]]:
            record = _fetch_consent(txn, "id = ?", (consent_id,))
            if record is None:
                return False, []
            txn.execute("DELETE FROM consents WHERE id = ?", (consent_id,))
            return True, [StoreChange("consent", consent=record)]

        return self._write(delete)

    def save_bindings(
        self, aor: str, bindings: Sequence[StoredBinding], removed: Sequence[str]
    ) -> Deferred[None]:
        rows = [(aor, b.uri, b.contact, b.expires, b.call_id, b.cseq, b.q) for b in bindings]

        def save(txn: Any) -> tuple[None, list[StoreChange]]:
            for uri in removed:
                txn.execute("DELETE FROM bindings WHERE aor = ? AND uri = ?", (aor, uri))
            for row in rows:
                txn.execute(
                    "INSERT INTO bindings (aor, uri, contact, expires, call_id, cseq, q)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (aor, uri) DO UPDATE"
                    " SET contact = excluded.contact, expires = excluded.expires,"
                    " call_id = excluded.call_id, cseq = excluded.cseq, q = excluded.q",
                    row,
                )
            return None, []

        return self._write(save)

    def list_bindings(self, now: float, limit: int) -> Deferred[list[StoredBinding]]:
        def read(txn: Any) -> list[StoredBinding]:
            txn.execute(
                "SELECT aor, uri, contact, expires, call_id, cseq, q FROM bindings"
                " WHERE expires > ? ORDER BY aor, uri LIMIT ?",
                (now, max(0, limit)),
            )
            return [StoredBinding(*row) for row in txn.fetchall()]

        return self._interact(read)

    def expire_bindings(self, now: float) -> Deferred[int]:
        def expire(txn: Any) -> tuple[int, list[StoreChange]]:
            txn.execute("DELETE FROM bindings WHERE expires <= ?", (now,))
            return int(txn.rowcount), []

        return self._write(expire)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

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
