"""Permission store: XCAP documents, their ETags and pending consents.

:class:`IPermissionStore` is what the XCAP resource and the SIP consent code talk to.
Every method returns a Deferred; every committed change is announced to listeners as
a :class:`StoreChange`, on the reactor thread, *after* the commit, so a listener that
re-reads the store sees the change (this is how a PUT of a permission document wakes
wait-permission subscribers, consent spec §(a) step 9).

Documents are keyed by (AUID, XUI, name) (:class:`~relayd.consent.documents.DocumentKey`);
documents of the ``global`` tree use :data:`~relayd.consent.documents.GLOBAL_XUI`.
Resource lists are documents of the ``resource-lists`` AUID, so a list change is a
``document`` change with that AUID.

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
that a restarted relay still reaches every registered UA, and announced as ``binding``
changes, so that every node sharing the store reaches a UA registered at any of them.

These rules are written once, in :class:`RuleStore`, over the :class:`Rows` a backend
keeps: :class:`MemoryPermissionStore` here, for tests, the SQLite file of
:mod:`relayd.consent.sqlite` and the shared database of :mod:`relayd.consent.postgres`.
A backend only stores and finds rows.
"""

from __future__ import annotations

import abc
import enum
import secrets
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import Interface, implementer

from relayd.consent.documents import DocumentKey
from relayd.logs import logger

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
    from the registrar's clock, which the store never reads itself. ``source`` is where
    the REGISTER came from (``UDP 192.0.2.1 5060``): a contact at another address is
    reached there instead (:mod:`relayd.sip.registrar`); empty for bindings stored
    before it was kept.
    """

    aor: str
    uri: str
    contact: str
    expires: float
    call_id: str
    cseq: int
    q: float = 1.0
    source: str = ""


class StoredDocument(NamedTuple):
    body: bytes
    etag: str


class DocumentWrite(NamedTuple):
    """Result of a PUT: the new ETag and whether the document was new (201 vs 200)."""

    etag: str
    created: bool


@dataclass(frozen=True)
class StoreChange:
    """One committed change.  ``etag`` is None when a document was deleted.

    A ``binding`` change is a registration of ``aor``: the ``bindings`` written and the
    contact URIs ``removed``.  ``remote`` marks a change another node committed (a
    shared store): the registrar, whose own changes are in its table before they are
    committed, applies only those. ``body`` is a document written here, for this
    process's listeners (the list index takes it before the write is answered); it is
    not carried to other processes, which read the document."""

    kind: Literal["document", "consent", "binding"]
    auid: str | None = None
    xui: str | None = None
    name: str | None = None
    etag: str | None = None
    consent: PendingConsent | None = None
    aor: str | None = None
    bindings: tuple[StoredBinding, ...] = ()
    removed: tuple[str, ...] = ()
    remote: bool = False
    body: bytes | None = None


Listener = Callable[[StoreChange], object]


class PreconditionFailed(Exception):
    """``If-Match``/``If-None-Match`` did not hold (HTTP 412); nothing was written."""

    def __init__(self, current_etag: str | None) -> None:
        super().__init__(current_etag)
        self.current_etag = current_etag


class StoreUnavailable(Exception):
    """The store cannot be reached now (its database connection is lost): a request
    that needs it is answered 503 with ``Retry-After: retry_after`` (RFC 9110 §15.6.4,
    RFC 3261 §21.5.4), not 500, while the store reconnects."""

    retry_after = 5


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

    def count_request(
        key: str, now: float, limit: int, window_seconds: float
    ) -> Deferred[float | None]:
        """Count a request of ``key`` at ``now`` and fire None, or, when ``key`` made
        ``limit`` in the last ``window_seconds`` already, count nothing and fire the
        seconds until one is allowed (at least 1).  Counts are shared by every node of
        the store and outlive a restart (consent spec §(b) rate limits)."""

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


class Rows(Protocol):
    """What a backend keeps: rows read and written inside one transaction, no rules.

    :class:`RuleStore` writes the store's rules (preconditions, ETags, one open consent
    per triple, expiry) once over this; a backend only stores and finds."""

    def document(self, key: DocumentKey) -> StoredDocument | None: ...

    def document_etag(self, key: DocumentKey) -> str | None: ...

    def write_document(self, key: DocumentKey, body: bytes, etag: str) -> None: ...

    def remove_document(self, key: DocumentKey) -> None: ...

    def document_names(self, auid: str, xui: str) -> list[str]:
        """Sorted."""

    def all_documents(self) -> list[tuple[DocumentKey, StoredDocument]]:
        """Every document of every user: what ``relayctl store copy`` moves."""

    def consent(self, consent_id: str) -> PendingConsent | None: ...

    def consent_by_token(self, permission_token: str) -> PendingConsent | None: ...

    def open_consent(self, sender: str, list_uri: str, recipient: str) -> PendingConsent | None:
        """The ``pending`` record of that triple."""

    def consents(
        self,
        recipient: str | None,
        sender: str | None,
        list_uri: str | None,
        state: ConsentState | None,
    ) -> list[PendingConsent]:
        """Records matching every given filter, oldest first (``created``, then id)."""

    def due_consents(self, now: float) -> list[PendingConsent]:
        """``pending`` records with ``expires <= now``, oldest first."""

    def earliest_expiry(self) -> float | None:
        """The smallest ``expires`` of a ``pending`` record."""

    def insert_consent(self, record: PendingConsent) -> None: ...

    def update_consent(self, record: PendingConsent) -> None:
        """Store ``methods``, ``expires`` and ``state`` of the record with that id."""

    def remove_consent(self, consent_id: str) -> None: ...

    def write_bindings(
        self, aor: str, bindings: Sequence[StoredBinding], removed: Sequence[str]
    ) -> None: ...

    def live_bindings(self, now: float, limit: int) -> list[StoredBinding]:
        """At most ``limit`` with ``expires > now``, by AOR and contact URI."""

    def remove_expired_bindings(self, now: float) -> int: ...

    def request_times(self, key: str) -> list[float]:
        """The counted requests of ``key``, oldest first."""

    def add_request(self, key: str, at: float) -> None: ...

    def forget_requests(self, before: float) -> None:
        """Drop every key's requests counted at or before ``before``."""


Write = Callable[[Rows], tuple[_T, list[StoreChange]]]
"""A write's rule: its value and the changes to announce once it is committed."""


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


class RuleStore(abc.ABC):
    """:class:`IPermissionStore`'s rules, once for every backend (module doc).

    A backend says how to run a read and a write transaction over its :class:`Rows`;
    :meth:`_write` must announce the changes a write returns after it commits, on the
    reactor thread.
    """

    def __init__(self) -> None:
        self._listeners = _Listeners()

    @abc.abstractmethod
    def _read(self, read: Callable[[Rows], _T]) -> Deferred[_T]:
        """Run ``read`` in a transaction."""

    @abc.abstractmethod
    def _write(self, write: Write[_T]) -> Deferred[_T]:
        """Run ``write`` in one atomic transaction; announce its changes once committed."""

    def get_document(self, auid: str, xui: str, name: str) -> Deferred[StoredDocument | None]:
        key = DocumentKey(auid, xui, name)
        return self._read(lambda rows: rows.document(key))

    def put_document(
        self,
        auid: str,
        xui: str,
        name: str,
        body: bytes,
        if_match: ETagCondition = None,
        if_none_match: ETagCondition = None,
    ) -> Deferred[DocumentWrite]:
        key = DocumentKey(auid, xui, name)

        def put(rows: Rows) -> tuple[DocumentWrite, list[StoreChange]]:
            current = rows.document_etag(key)
            check_preconditions(current, if_match, if_none_match)
            etag = new_etag()
            rows.write_document(key, body, etag)
            change = StoreChange("document", *key, etag, body=body)
            return DocumentWrite(etag, current is None), [change]

        return self._write(put)

    def delete_document(
        self, auid: str, xui: str, name: str, if_match: ETagCondition = None
    ) -> Deferred[bool]:
        key = DocumentKey(auid, xui, name)

        def delete(rows: Rows) -> tuple[bool, list[StoreChange]]:
            current = rows.document_etag(key)
            check_preconditions(current, if_match, None)
            if current is None:
                return False, []
            rows.remove_document(key)
            return True, [StoreChange("document", *key, None)]

        return self._write(delete)

    def list_documents(self, auid: str, xui: str) -> Deferred[list[str]]:
        return self._read(lambda rows: rows.document_names(auid, xui))

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
        def open_(rows: Rows) -> tuple[PendingConsent, list[StoreChange]]:
            existing = rows.open_consent(sender, list_uri, recipient)
            if existing is not None:
                record = replace(
                    existing,
                    methods=_merge_methods(existing.methods, methods),
                    expires=expires,
                )
                rows.update_consent(record)
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
                rows.insert_consent(record)
            return record, [StoreChange("consent", consent=record)]

        return self._write(open_)

    def get_consent(self, consent_id: str) -> Deferred[PendingConsent | None]:
        return self._read(lambda rows: rows.consent(consent_id))

    def find_consent_by_token(self, permission_token: str) -> Deferred[PendingConsent | None]:
        return self._read(lambda rows: rows.consent_by_token(permission_token))

    def find_open_consent(
        self, sender: str, list_uri: str, recipient: str
    ) -> Deferred[PendingConsent | None]:
        return self._read(lambda rows: rows.open_consent(sender, list_uri, recipient))

    def list_consents(
        self,
        recipient: str | None = None,
        sender: str | None = None,
        list_uri: str | None = None,
        state: ConsentState | None = None,
    ) -> Deferred[list[PendingConsent]]:
        return self._read(lambda rows: rows.consents(recipient, sender, list_uri, state))

    def set_consent_state(
        self, consent_id: str, state: ConsentState
    ) -> Deferred[PendingConsent | None]:
        def update(rows: Rows) -> tuple[PendingConsent | None, list[StoreChange]]:
            record = rows.consent(consent_id)
            if record is None:
                return None, []
            reopening = state is ConsentState.PENDING and record.state is not state
            if reopening and rows.open_consent(record.sender, record.list_uri, record.recipient):
                raise ValueError("another record for this triple is already pending")
            record = replace(record, state=state)
            rows.update_consent(record)
            return record, [StoreChange("consent", consent=record)]

        return self._write(update)

    def expire_consents(self, now: float) -> Deferred[list[PendingConsent]]:
        def expire(rows: Rows) -> tuple[list[PendingConsent], list[StoreChange]]:
            expired = [replace(r, state=ConsentState.EXPIRED) for r in rows.due_consents(now)]
            for record in expired:
                rows.update_consent(record)
            return expired, [StoreChange("consent", consent=record) for record in expired]

        return self._write(expire)

    def next_consent_expiry(self) -> Deferred[float | None]:
        return self._read(lambda rows: rows.earliest_expiry())

    def delete_consent(self, consent_id: str) -> Deferred[bool]:
        def delete(rows: Rows) -> tuple[bool, list[StoreChange]]:
            record = rows.consent(consent_id)
            if record is None:
                return False, []
            rows.remove_consent(consent_id)
            return True, [StoreChange("consent", consent=record)]

        return self._write(delete)

    def save_bindings(
        self, aor: str, bindings: Sequence[StoredBinding], removed: Sequence[str]
    ) -> Deferred[None]:
        def save(rows: Rows) -> tuple[None, list[StoreChange]]:
            rows.write_bindings(aor, bindings, removed)
            written = tuple(replace(binding, aor=aor) for binding in bindings)
            return None, [StoreChange("binding", aor=aor, bindings=written, removed=(*removed,))]

        return self._write(save)

    def list_bindings(self, now: float, limit: int) -> Deferred[list[StoredBinding]]:
        return self._read(lambda rows: rows.live_bindings(now, max(0, limit)))

    def expire_bindings(self, now: float) -> Deferred[int]:
        return self._write(lambda rows: (rows.remove_expired_bindings(now), []))

    def count_request(
        self, key: str, now: float, limit: int, window_seconds: float
    ) -> Deferred[float | None]:
        def count(rows: Rows) -> tuple[float | None, list[StoreChange]]:
            rows.forget_requests(now - window_seconds)
            times = rows.request_times(key)
            if len(times) >= limit:
                return max(1.0, times[0] + window_seconds - now), []
            rows.add_request(key, now)
            return None, []

        return self._write(count)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)


def _oldest_first(records: Iterable[PendingConsent]) -> list[PendingConsent]:
    return sorted(records, key=lambda record: (record.created, record.id))


class _MemoryRows:
    """:class:`Rows` in dictionaries."""

    def __init__(self) -> None:
        self.documents: dict[DocumentKey, StoredDocument] = {}
        self.consents_by_id: dict[str, PendingConsent] = {}
        self.bindings: dict[tuple[str, str], StoredBinding] = {}
        self.requests: dict[str, list[float]] = {}

    def document(self, key: DocumentKey) -> StoredDocument | None:
        return self.documents.get(key)

    def document_etag(self, key: DocumentKey) -> str | None:
        current = self.documents.get(key)
        return current.etag if current is not None else None

    def write_document(self, key: DocumentKey, body: bytes, etag: str) -> None:
        self.documents[key] = StoredDocument(bytes(body), etag)

    def remove_document(self, key: DocumentKey) -> None:
        del self.documents[key]

    def all_documents(self) -> list[tuple[DocumentKey, StoredDocument]]:
        return sorted(self.documents.items())

    def document_names(self, auid: str, xui: str) -> list[str]:
        return sorted(key.name for key in self.documents if (key.auid, key.xui) == (auid, xui))

    def consent(self, consent_id: str) -> PendingConsent | None:
        return self.consents_by_id.get(consent_id)

    def consent_by_token(self, permission_token: str) -> PendingConsent | None:
        for record in self.consents_by_id.values():
            if secrets.compare_digest(record.permission_token, permission_token):
                return record
        return None

    def open_consent(self, sender: str, list_uri: str, recipient: str) -> PendingConsent | None:
        for record in self.consents_by_id.values():
            if record.state is ConsentState.PENDING and (
                record.sender,
                record.list_uri,
                record.recipient,
            ) == (sender, list_uri, recipient):
                return record
        return None

    def consents(
        self,
        recipient: str | None,
        sender: str | None,
        list_uri: str | None,
        state: ConsentState | None,
    ) -> list[PendingConsent]:
        return _oldest_first(
            record
            for record in self.consents_by_id.values()
            if (recipient is None or record.recipient == recipient)
            and (sender is None or record.sender == sender)
            and (list_uri is None or record.list_uri == list_uri)
            and (state is None or record.state is state)
        )

    def due_consents(self, now: float) -> list[PendingConsent]:
        return _oldest_first(
            record
            for record in self.consents_by_id.values()
            if record.state is ConsentState.PENDING and record.expires <= now
        )

    def earliest_expiry(self) -> float | None:
        pending = self.consents_by_id.values()
        return min((r.expires for r in pending if r.state is ConsentState.PENDING), default=None)

    def insert_consent(self, record: PendingConsent) -> None:
        self.consents_by_id[record.id] = record

    def update_consent(self, record: PendingConsent) -> None:
        self.consents_by_id[record.id] = record

    def remove_consent(self, consent_id: str) -> None:
        del self.consents_by_id[consent_id]

    def write_bindings(
        self, aor: str, bindings: Sequence[StoredBinding], removed: Sequence[str]
    ) -> None:
        for uri in removed:
            self.bindings.pop((aor, uri), None)
        for binding in bindings:
            self.bindings[(aor, binding.uri)] = replace(binding, aor=aor)

    def live_bindings(self, now: float, limit: int) -> list[StoredBinding]:
        live = (b for b in self.bindings.values() if b.expires > now)
        return sorted(live, key=lambda b: (b.aor, b.uri))[:limit]

    def remove_expired_bindings(self, now: float) -> int:
        expired = [key for key, b in self.bindings.items() if b.expires <= now]
        for key in expired:
            del self.bindings[key]
        return len(expired)

    def request_times(self, key: str) -> list[float]:
        return sorted(self.requests.get(key, ()))

    def add_request(self, key: str, at: float) -> None:
        self.requests.setdefault(key, []).append(at)

    def forget_requests(self, before: float) -> None:
        for key, times in list(self.requests.items()):
            kept = [at for at in times if at > before]
            if kept:
                self.requests[key] = kept
            else:
                del self.requests[key]


@implementer(IPermissionStore)
class MemoryPermissionStore(RuleStore):
    """In-memory store for tests: synchronous, every call returns a fired Deferred."""

    def __init__(self) -> None:
        super().__init__()
        self._rows = _MemoryRows()

    def _read(self, read: Callable[[Rows], _T]) -> Deferred[_T]:
        try:
            return defer.succeed(read(self._rows))
        except Exception:
            return defer.fail()

    def _write(self, write: Write[_T]) -> Deferred[_T]:
        try:
            value, changes = write(self._rows)
        except Exception:
            return defer.fail()
        self._listeners.emit(changes)
        return defer.succeed(value)

    def close(self) -> Deferred[None]:
        return defer.succeed(None)
