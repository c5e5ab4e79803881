"""The permission store's rows in SQL: one :class:`SQLRows` for the SQLite and the
PostgreSQL backend, whose tables have the same names, columns and keys.

Consent methods are one comma-separated TEXT column in both, so a store copied between
them (``relayctl store copy``) is the same rows.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from relayd.consent.documents import DocumentKey
from relayd.consent.store import ConsentState, PendingConsent, StoredBinding, StoredDocument

_CONSENT_COLUMNS = (
    "id, sender, list_uri, recipient, methods, permission_token, created, expires, state"
)


@functools.cache
def qmark(statement: str) -> str:
    """A statement's ``%s`` and ``%(name)s`` placeholders as SQLite's ``?`` and ``:name``."""
    return re.sub(r"%\((\w+)\)s", r":\1", statement).replace("%s", "?")


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


class SQLRows:
    """:class:`~relayd.consent.store.Rows` in the tables both SQL backends create, on
    the pool's thread, inside the transaction ``cursor`` (a DB-API cursor) belongs to.

    Statements are written with psycopg's placeholders; ``placeholders`` turns them into
    the driver's own (:func:`qmark` for SQLite)."""

    def __init__(self, cursor: Any, placeholders: Callable[[str], str] = str) -> None:
        self._cursor = cursor
        self._placeholders = placeholders

    def _execute(self, statement: str, args: Sequence[object] | Mapping[str, object] = ()) -> Any:
        self._cursor.execute(self._placeholders(statement), args)
        return self._cursor

    def _consent_where(
        self, where: str, args: Sequence[object] | Mapping[str, object]
    ) -> list[PendingConsent]:
        # ``where`` is always one of the literal clauses in this module, never input.
        self._execute(
            f"SELECT {_CONSENT_COLUMNS} FROM consents WHERE {where}",  # noqa: S608
            args,
        )
        return [_consent_from_row(row) for row in self._cursor.fetchall()]

    def _one_consent(self, where: str, args: Sequence[object]) -> PendingConsent | None:
        found = self._consent_where(where, args)
        return found[0] if found else None

    def document(self, key: DocumentKey) -> StoredDocument | None:
        self._execute(
            "SELECT body, etag FROM documents WHERE auid = %s AND xui = %s AND name = %s", key
        )
        row = self._cursor.fetchone()
        return StoredDocument(bytes(row[0]), row[1]) if row is not None else None

    def document_etag(self, key: DocumentKey) -> str | None:
        self._execute("SELECT etag FROM documents WHERE auid = %s AND xui = %s AND name = %s", key)
        row = self._cursor.fetchone()
        return row[0] if row is not None else None

    def write_document(self, key: DocumentKey, body: bytes, etag: str) -> None:
        self._execute(
            "INSERT INTO documents (auid, xui, name, body, etag) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (auid, xui, name) DO UPDATE"
            " SET body = excluded.body, etag = excluded.etag",
            (*key, bytes(body), etag),
        )

    def remove_document(self, key: DocumentKey) -> None:
        self._execute("DELETE FROM documents WHERE auid = %s AND xui = %s AND name = %s", key)

    def all_documents(self) -> list[tuple[DocumentKey, StoredDocument]]:
        self._execute("SELECT auid, xui, name, body, etag FROM documents ORDER BY auid, xui, name")
        return [
            (DocumentKey(auid, xui, name), StoredDocument(bytes(body), etag))
            for auid, xui, name, body, etag in self._cursor.fetchall()
        ]

    def document_names(self, auid: str, xui: str) -> list[str]:
        self._execute(
            "SELECT name FROM documents WHERE auid = %s AND xui = %s ORDER BY name",
            (auid, xui),
        )
        return [row[0] for row in self._cursor.fetchall()]

    def consent(self, consent_id: str) -> PendingConsent | None:
        return self._one_consent("id = %s", (consent_id,))

    def consent_by_token(self, permission_token: str) -> PendingConsent | None:
        return self._one_consent("permission_token = %s", (permission_token,))

    def open_consent(self, sender: str, list_uri: str, recipient: str) -> PendingConsent | None:
        return self._one_consent(
            "sender = %s AND list_uri = %s AND recipient = %s AND state = 'pending'",
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
            "(CAST(%(r)s AS TEXT) IS NULL OR recipient = %(r)s)"
            " AND (CAST(%(s)s AS TEXT) IS NULL OR sender = %(s)s)"
            " AND (CAST(%(l)s AS TEXT) IS NULL OR list_uri = %(l)s)"
            " AND (CAST(%(t)s AS TEXT) IS NULL OR state = %(t)s)"
            " ORDER BY created, id",
            {
                "r": recipient,
                "s": sender,
                "l": list_uri,
                "t": state.value if state is not None else None,
            },
        )

    def due_consents(self, now: float) -> list[PendingConsent]:
        return self._consent_where(
            "state = 'pending' AND expires <= %s ORDER BY created, id", (now,)
        )

    def earliest_expiry(self) -> float | None:
        self._execute("SELECT min(expires) FROM consents WHERE state = 'pending'")
        row = self._cursor.fetchone()
        return None if row is None else row[0]

    def insert_consent(self, record: PendingConsent) -> None:
        self._execute(
            f"INSERT INTO consents ({_CONSENT_COLUMNS})"  # noqa: S608
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
        self._execute(
            "UPDATE consents SET methods = %s, expires = %s, state = %s WHERE id = %s",
            (",".join(record.methods), record.expires, record.state.value, record.id),
        )

    def remove_consent(self, consent_id: str) -> None:
        self._execute("DELETE FROM consents WHERE id = %s", (consent_id,))

    def write_bindings(
        self, aor: str, bindings: Sequence[StoredBinding], removed: Sequence[str]
    ) -> None:
        for uri in removed:
            self._execute("DELETE FROM bindings WHERE aor = %s AND uri = %s", (aor, uri))
        for b in bindings:
            self._execute(
                "INSERT INTO bindings (aor, uri, contact, expires, call_id, cseq, q, source)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (aor, uri) DO UPDATE"
                " SET contact = excluded.contact, expires = excluded.expires,"
                " call_id = excluded.call_id, cseq = excluded.cseq, q = excluded.q,"
                " source = excluded.source",
                (aor, b.uri, b.contact, b.expires, b.call_id, b.cseq, b.q, b.source),
            )

    def live_bindings(self, now: float, limit: int) -> list[StoredBinding]:
        self._execute(
            "SELECT aor, uri, contact, expires, call_id, cseq, q, source FROM bindings"
            " WHERE expires > %s ORDER BY aor, uri LIMIT %s",
            (now, limit),
        )
        return [StoredBinding(*row) for row in self._cursor.fetchall()]

    def remove_expired_bindings(self, now: float) -> int:
        self._execute("DELETE FROM bindings WHERE expires <= %s", (now,))
        return int(self._cursor.rowcount)

    def request_times(self, key: str) -> list[float]:
        self._execute("SELECT at FROM requests WHERE key = %s ORDER BY at", (key,))
        return [float(row[0]) for row in self._cursor.fetchall()]

    def add_request(self, key: str, at: float) -> None:
        self._execute("INSERT INTO requests (key, at) VALUES (%s, %s)", (key, at))

    def forget_requests(self, before: float) -> None:
        self._execute("DELETE FROM requests WHERE at <= %s", (before,))
