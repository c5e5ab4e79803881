"""Permission documents: their Permission URIs, and the cache the relay decides from.

* A consent request mints a Permission URI, ``consent-rules/users/<recipient>/
  p-<token>.xml`` (consent spec §(c)); the document stored there is read within the
  :class:`~relayd.consent.policy.PermissionScope` it was minted for
  (:func:`permission_scope`), whoever wrote it.
* :class:`PermissionCache`: the parsed ``consent-rules`` documents of each recipient,
  loaded from the permission store on first use and kept current by the store's change
  listener, so relaying a MESSAGE costs no store round-trip once a recipient is known.
  Observers hear about every change of a recipient's documents (wait-permission NOTIFYs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from lxml import etree
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relayd.bounded import remember
from relayd.consent.documents import GLOBAL_XUI, DocumentKey, DocumentRejected, parse_document
from relayd.consent.policy import (
    PermissionScope,
    identity_key,
    is_permitted,
    normalize_identity,
    now_from_clock,
    validity_boundaries,
)
from relayd.consent.store import IPermissionStore, PendingConsent, StoreChange, StoreUnavailable
from relayd.consent.vocabulary import CONSENT_RULES_AUID
from relayd.logs import logger

PERMISSION_DOCUMENT = re.compile(r"\Ap-(?P<token>[A-Za-z0-9_-]{16,128})\.xml\Z")
"""Document names minted for consent requests (consent spec §(c), "URI layout")."""


def permission_token(document: DocumentKey) -> str | None:
    """The token of a ``consent-rules/users/<xui>/p-<token>.xml`` document, else None."""
    if document.auid != CONSENT_RULES_AUID or document.xui == GLOBAL_XUI:
        return None
    match = PERMISSION_DOCUMENT.match(document.name)
    return match["token"] if match is not None else None


def permission_document_name(token: str) -> str:
    """The document name minted for ``token``."""
    return f"p-{token}.xml"


async def bound_consent(store: IPermissionStore, document: DocumentKey) -> PendingConsent | None:
    """The consent a ``p-<token>.xml`` document was minted for, in any state.

    Only a consent whose recipient is the document's XUI counts: a token pasted into
    another user's tree opens nothing.
    """
    token = permission_token(document)
    if token is None:
        return None
    consent = await store.find_consent_by_token(token)
    if consent is None:
        return None
    if normalize_identity(consent.recipient) != normalize_identity(document.xui):
        return None
    return consent


def requested_methods(consent: PendingConsent) -> tuple[str, ...]:
    """The methods ``consent`` asks for; a record without methods asked for MESSAGE,
    the one method the relay relays."""
    return consent.methods or ("MESSAGE",)


def consent_scope(consent: PendingConsent) -> PermissionScope:
    """What the Permission URI of ``consent`` was minted for (seed §4, §8)."""
    return PermissionScope(consent.recipient, consent.list_uri, requested_methods(consent))


async def permission_scope(
    store: IPermissionStore, document: DocumentKey
) -> PermissionScope | None:
    """The scope a consent-rules document is read within: its consent's when it is a
    Permission-URI document (:func:`bound_consent`), else None (the owner's own)."""
    consent = await bound_consent(store, document)
    return consent_scope(consent) if consent is not None else None


MAX_CACHED_DECISIONS = 1024
"""Per recipient: (sender, list, method) answers kept between document changes."""

RecipientObserver = Callable[[str], object]
Ruleset = tuple[etree._Element, PermissionScope | None]
"""A parsed document and, for one stored at a Permission URI, its scope."""


class PermissionCache:
    """Parsed consent-rules documents per recipient, kept current by store changes."""

    log = logger()

    def __init__(self, store: IPermissionStore, clock: IReactorTime) -> None:
        self.store = store
        self.clock = clock
        self._docs: dict[str, dict[str, Ruleset]] = {}
        self._loading: dict[str, Deferred[None]] = {}
        self._dirty: set[str] = set()
        self._updating: dict[str, Deferred[None]] = {}
        self._observers: list[RecipientObserver] = []
        # recipient key -> {(sender, list, method): permitted}, valid until _valid_until.
        self._decisions: dict[str, dict[tuple[str, str, str], bool]] = {}
        self._valid_until: dict[str, float] = {}
        # (sender, list, method, members) -> (generation, valid until, missing members):
        # a whole list's answer, good while no document changed (generation) and no
        # member's cp:validity boundary passed.
        self._generation = 0
        self._missing: dict[
            tuple[str, str, str, tuple[str, ...]], tuple[int, float, list[str]]
        ] = {}

    def add_observer(self, observer: RecipientObserver) -> None:
        """``observer(recipient_key)`` after that recipient's documents changed."""
        self._observers.append(observer)

    def store_changed(self, change: StoreChange) -> None:
        """The store listener's share for consent-rules documents, and for the consent
        records that scope Permission-URI documents (a refresh adds methods).

        Updates of one recipient run one after another; :meth:`rulesets` waits for the
        ones in flight, so a reader never sees a document older than the last change.
        """
        record = change.consent
        if change.kind == "consent" and record is not None:
            key = identity_key(record.recipient)
            name = permission_document_name(record.permission_token)
            if f"{key}\0{name}" in self._docs.get(key, {}):
                self._reload(key, key, name)
            return
        if change.kind != "document" or change.auid != CONSENT_RULES_AUID or not change.xui:
            return
        self._reload(identity_key(change.xui), change.xui, change.name or "")

    def _reload(self, key: str, xui: str, name: str) -> None:
        if key in self._loading:
            self._dirty.add(key)
            return
        if key not in self._docs:
            self._notify(key)
            return
        previous = self._updating.get(key)
        update = defer.ensureDeferred(self._reload_one(previous, key, xui, name))
        self._updating[key] = update
        self._generation += 1  # the recipient's decisions wait for the update now

        def done(_: object) -> None:
            if self._updating.get(key) is update:
                del self._updating[key]

        update.addErrback(self._update_failed, key)
        update.addBoth(done)

    def _update_failed(self, failure: Failure, key: str) -> None:
        """A changed document could not be read (the store went away): forget the
        recipient's documents, so that the next decision reads them afresh (or fails,
        503) instead of trusting the version before the change."""
        if failure.check(StoreUnavailable):
            self.log.warn(
                "permission cache: documents of {recipient} dropped, store unavailable",
                recipient=key,
            )
        else:
            self.log.failure("permission cache update failed", failure)
        self._docs.pop(key, None)
        self._notify(key)

    async def _reload_one(
        self, previous: Deferred[None] | None, key: str, xui: str, name: str
    ) -> None:
        if previous is not None:
            await _wait(previous)
        ruleset = await self._read(xui, name)
        docs = self._docs.get(key)
        if docs is not None:
            if ruleset is None:
                docs.pop(f"{xui}\0{name}", None)
            else:
                docs[f"{xui}\0{name}"] = ruleset
        self._notify(key)

    async def _read(self, xui: str, name: str) -> Ruleset | None:
        """A stored document, parsed, with its scope; None when absent or unusable."""
        stored = await self.store.get_document(CONSENT_RULES_AUID, xui, name)
        root = self._parse(stored.body, xui, name) if stored is not None else None
        if root is None:
            return None
        key = DocumentKey(CONSENT_RULES_AUID, xui, name)
        return root, await permission_scope(self.store, key)

    def _notify(self, key: str) -> None:
        self._forget_decisions(key)
        for observer in list(self._observers):
            try:
                observer(key)
            except Exception:
                self.log.failure("permission observer failed")

    def _parse(self, body: bytes, xui: str, name: str) -> etree._Element | None:
        try:
            return parse_document(body)
        except DocumentRejected as e:
            self.log.warn(
                "unusable consent-rules document {name} of {recipient}: {reason}",
                name=name[:2] + "…" if name.startswith("p-") else name,
                recipient=xui,
                reason=str(e),
            )
            return None

    async def _load(self, recipient: str) -> None:
        key = identity_key(recipient)
        while True:
            self._dirty.discard(key)
            docs: dict[str, Ruleset] = {}
            # Documents live under the canonical XUI (the XCAP resource writes there),
            # whatever the case of the list's spelling of the member's scheme and host.
            for name in await self.store.list_documents(CONSENT_RULES_AUID, key):
                ruleset = await self._read(key, name)
                if ruleset is not None:
                    docs[f"{key}\0{name}"] = ruleset
            if key not in self._dirty:
                self._docs[key] = docs
                self._forget_decisions(key)
                return

    async def rulesets(self, recipient: str) -> list[Ruleset]:
        key = identity_key(recipient)
        updating = self._updating.get(key)
        if updating is not None:
            await _wait(updating)
        docs = self._docs.get(key)
        if docs is None:
            loading = self._loading.get(key)
            if loading is None:
                loading = defer.ensureDeferred(self._load(recipient))
                self._loading[key] = loading

                def done(result: object) -> object:
                    self._loading.pop(key, None)
                    return result

                loading.addBoth(done)
                loading.addErrback(self._load_failed, recipient)
            await _wait(loading)
            docs = self._docs.get(key, {})
        return list(docs.values())

    def _load_failed(self, failure: Failure, recipient: str) -> None:
        """Nothing is cached, so the decisions wait for no rules: consent is asked for
        (470), never assumed, while the store is away."""
        if failure.check(StoreUnavailable):
            self.log.warn(
                "permissions of {recipient} not loaded: store unavailable", recipient=recipient
            )
        else:
            self.log.failure("loading permissions of {recipient}", failure, recipient=recipient)

    def _forget_decisions(self, key: str) -> None:
        self._decisions.pop(key, None)
        self._valid_until.pop(key, None)
        self._generation += 1

    def permitted_now(self, sender: str, list_uri: str, recipient: str, method: str) -> bool | None:
        """The decision without waiting, or ``None`` when the documents of ``recipient``
        are not loaded (or an update is in flight): then :meth:`permitted` must be used.

        Decisions are cached per recipient until a document changes or the clock passes
        the next ``cp:validity`` boundary of the recipient's documents, so the answer is
        always the one a fresh evaluation would give.
        """
        key = identity_key(recipient)
        if key in self._updating:
            return None
        docs = self._docs.get(key)
        if docs is None:
            return None
        seconds = self.clock.seconds()
        decisions = self._decisions.get(key)
        if decisions is None or seconds >= self._valid_until[key]:
            decisions = self._decisions[key] = {}
            self._valid_until[key] = min(
                (b for root, _ in docs.values() for b in validity_boundaries(root) if b > seconds),
                default=math.inf,
            )
        question = (sender, list_uri, method)
        answer = decisions.get(question)
        if answer is None:
            now = now_from_clock(self.clock)
            answer = remember(
                decisions,
                MAX_CACHED_DECISIONS,
                question,
                any(
                    is_permitted(
                        root, sender, list_uri, method, now, recipient=recipient, scope=scope
                    )
                    for root, scope in docs.values()
                ),
            )
        return answer

    def missing_now(
        self, sender: str, list_uri: str, members: Sequence[str], method: str
    ) -> list[str] | None:
        """:meth:`missing` without waiting, or ``None`` if some documents must be loaded.

        Remembered per list, so that a steady load asks one question per request, not
        one per member."""
        memo_key = (sender, list_uri, method, tuple(members))
        memo = self._missing.get(memo_key)
        if memo is not None and memo[0] == self._generation and self.clock.seconds() < memo[1]:
            return list(memo[2])
        generation = self._generation
        out: list[str] = []
        until = math.inf
        for member in members:
            answer = self.permitted_now(sender, list_uri, member, method)
            if answer is None:
                return None
            if not answer:
                out.append(member)
            until = min(until, self._valid_until.get(identity_key(member), math.inf))
        if generation == self._generation:
            remember(self._missing, MAX_CACHED_DECISIONS, memo_key, (generation, until, out))
        return list(out)

    async def permitted(self, sender: str, list_uri: str, recipient: str, method: str) -> bool:
        """RFC 4745 evaluation over every document of ``recipient`` (policy.is_permitted)."""
        now = now_from_clock(self.clock)
        return any(
            is_permitted(root, sender, list_uri, method, now, recipient=recipient, scope=scope)
            for root, scope in await self.rulesets(recipient)
        )

    async def missing(
        self, sender: str, list_uri: str, members: Sequence[str], method: str
    ) -> list[str]:
        """Members that have not permitted ``sender`` to reach them via ``list_uri``."""
        known = self.missing_now(sender, list_uri, members, method)
        if known is not None:
            return known
        return [m for m in members if not await self.permitted(sender, list_uri, m, method)]


async def _wait(d: Deferred[None]) -> None:
    """Await a shared Deferred without consuming its result for other waiters."""
    waiter: Deferred[None] = Deferred()

    def passthrough(result: object) -> object:
        waiter.callback(None)
        return result

    d.addBoth(passthrough)
    await waiter
