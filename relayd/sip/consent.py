"""Consent decisions (seed §§4-6, §10; consent spec §(a) steps 2-6, §(b)).

Everything here is about *who may reach whom through which list*, without sockets:

* :class:`PermissionCache`: the parsed ``consent-rules`` documents of each recipient,
  loaded from the permission store on first use and kept current by the store's change
  listener, so relaying a MESSAGE costs no store round-trip once a recipient is known.
  A document at a Permission URI is kept with the scope it was minted for
  (:class:`~relayd.consent.policy.PermissionScope`), which it is evaluated within.
  Observers hear about every change of a recipient's documents (wait-permission NOTIFYs).
* :class:`ListDirectory`: list URI → :class:`~relayd.sip.urilist.URIList`, from the
  ``[sip] lists`` file and from ``resource-lists`` documents in the store (XUI = owner),
  also kept current by the change listener. File lists win over store lists.
* :class:`ConsentURIs`: the relay-local URIs of the flow. The 470 names, for each member
  lacking permission, ``sip:consent-<list,member>.<mac>@domain``; a CONSENT sent there
  needs no server state to find its list (consent spec gap 11), and the MAC keeps a
  sender from making the relay forward CONSENTs to arbitrary URIs. Wait-permission URIs
  are ``sip:wp-<consent id>@domain``.
* :func:`consent_needed`: the 470 response (resource-lists body + ``Permission-Missing``,
  RFC 5360 §5.9.1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets
from collections.abc import Callable, Iterable, Sequence

from lxml import etree
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from relayd.bounded import remember
from relayd.consent.documents import DocumentRejected, parse_document
from relayd.consent.policy import (
    PermissionScope,
    identity_key,
    is_permitted,
    now_from_clock,
    validity_boundaries,
)
from relayd.consent.store import IPermissionStore, StoreChange
from relayd.consent.vocabulary import (
    CONSENT_RULES_AUID,
    LIST_REPORT_MIME_TYPE,
    RESOURCE_LISTS_AUID,
    RESOURCE_LISTS_MIME_TYPE,
)
from relayd.logs import logger
from relayd.sip.message import SIPRequest, SIPResponse, make_response
from relayd.sip.uri import SIPURI, NameAddr
from relayd.sip.urilist import (
    URIList,
    URIListError,
    build_list_report,
    build_uri_list,
    parse_lists_document,
)
from relayd.xcap.auth import permission_document_name, permission_scope
from relayd.xcap.errors import CONSTRAINT_FAILURE, UNIQUENESS_FAILURE, Exists, XCAPError
from relayd.xcap.selector import DocumentSelector

__all__ = [
    "ConsentURIs",
    "ListDirectory",
    "PermissionCache",
    "consent_needed",
]

CONSENT_PREFIX = "consent-"
MAX_CACHED_URIS = 4096
WAIT_PREFIX = "wp-"


class ConsentURIs:
    """Mints and reads the relay-local URIs of the consent flow (module doc)."""

    def __init__(self, domain: str, key: bytes | None = None) -> None:
        self.domain = domain
        self._key = key or secrets.token_bytes(32)
        # Every relayed copy and every 470 names these; the MAC makes them worth keeping.
        self._minted: dict[tuple[str, str], str] = {}

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode("utf-8"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:12]).decode("ascii")

    def consent_uri(self, list_uri: str, member: str) -> str:
        uri = self._minted.get((list_uri, member))
        if uri is None:
            payload = base64.urlsafe_b64encode(f"{list_uri}\n{member}".encode()).decode("ascii")
            payload = payload.rstrip("=")
            uri = f"sip:{CONSENT_PREFIX}{payload}.{self._mac(payload)}@{self.domain}"
            remember(self._minted, MAX_CACHED_URIS, (list_uri, member), uri)
        return uri

    def parse_consent_user(self, user: str | None) -> tuple[str, str] | None:
        """``(list_uri, member)`` of a consent URI's user part, None when not ours/forged."""
        if not user or not user.startswith(CONSENT_PREFIX):
            return None
        payload, dot, mac = user[len(CONSENT_PREFIX) :].rpartition(".")
        if not dot or not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            return None
        try:
            text = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        list_uri, newline, member = text.partition("\n")
        return (list_uri, member) if newline else None

    def wait_uri(self, consent_id: str) -> str:
        return f"sip:{WAIT_PREFIX}{consent_id}@{self.domain}"

    @staticmethod
    def wait_id(user: str | None) -> str | None:
        if not user or not user.startswith(WAIT_PREFIX):
            return None
        return user[len(WAIT_PREFIX) :] or None


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

        update.addErrback(lambda f: self.log.failure("permission cache update failed", f))
        update.addBoth(done)

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
        selector = DocumentSelector(CONSENT_RULES_AUID, xui, name)
        return root, await permission_scope(self.store, selector)

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
                loading.addErrback(
                    lambda f: self.log.failure(
                        "loading permissions of {recipient}", f, recipient=recipient
                    )
                )
            await _wait(loading)
            docs = self._docs.get(key, {})
        return list(docs.values())

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


class ListDirectory:
    """List URI → :class:`URIList`; requests name lists by user part on a local host."""

    log = logger()

    def __init__(
        self,
        store: IPermissionStore,
        domain: str,
        local_hosts: Iterable[str] = (),
        file_lists: Iterable[URIList] = (),
        is_account: Callable[[str], bool] = lambda user: False,
    ) -> None:
        self.store = store
        self.domain = domain.lower()
        self.local_hosts = {self.domain, *(h.lower() for h in local_hosts)}
        self.local_ports: set[int] = set()
        self.is_account = is_account
        self._file: dict[str, URIList] = {}
        self._store_docs: dict[tuple[str, str], list[URIList]] = {}
        self._by_user: dict[str, URIList] = {}
        self._defined_in: dict[str, tuple[str, str]] = {}
        for item in file_lists:
            user = self._local_user(item.uri)
            if user is None:
                self.log.warn("list {uri} is not in our domain; ignored", uri=item.uri)
            else:
                self._file[user] = item
        self._rebuild()

    def is_local(self, uri: SIPURI) -> bool:
        """Whether ``uri`` names the relay: one of its hosts, with no port or one it
        listens on. A port names a server (RFC 3261 §19.1.1), so ``sip:bob@<our
        host>:25180`` is someone else's server on our host: it is routed to (RFC 3263),
        never looked up in our registrar or lists."""
        return uri.host.lower() in self.local_hosts and (
            uri.port is None or uri.port in self.local_ports
        )

    def add_local_host(self, host: str) -> None:
        self.local_hosts.add(host.lower())

    def add_local_port(self, port: int) -> None:
        self.local_ports.add(port)

    def _local_user(self, uri_text: str) -> str | None:
        try:
            uri = SIPURI.parse(uri_text)
        except ValueError:
            return None
        return uri.user if uri.user and self.is_local(uri) else None

    def _rebuild(self) -> None:
        table: dict[str, URIList] = {}
        defined_in: dict[str, tuple[str, str]] = {}
        # A document already indexed keeps its lists: the ownership check refuses
        # a claim on a taken URI, so two documents can only both hold one after a
        # race, and then the earlier holder must not lose it to sort order.
        held = set(self._defined_in.values())
        ordered = sorted(self._store_docs, key=lambda doc: (doc not in held, doc))
        for doc in ordered:
            owner, name = doc
            for item in self._store_docs[doc]:
                user = self._local_user(item.uri)
                if user is None:
                    continue
                if user in table or user in self._file:
                    self.log.warn(
                        "list {uri} in {owner}/{name} is already defined; ignored",
                        uri=item.uri,
                        owner=owner,
                        name=name,
                    )
                    continue
                table[user] = item
                defined_in[user] = doc
        table.update(self._file)
        self._by_user = table
        self._defined_in = defined_in

    def check_document(self, document: DocumentSelector, body: bytes) -> tuple[bytes, str] | None:
        """Refuse a resource-lists document that names a list URI it may not hold,
        else report what in it the relay will not route (an XCAP
        :data:`~relayd.xcap.resource.DocumentCheck`).

        List URIs share the domain's user namespace: without the refusal any user
        could take over another owner's list (or an account's address) by storing a
        list of the same name. First come, first served; the lists file always wins.
        Anything else RFC 4826 allows is stored; lists that are no list URI here and
        entries that are no member are answered as a list report (docs/consent.md).
        """
        if document.xui is None:
            return None  # global documents define no lists
        owner, name = document.xui, document.document
        try:
            parsed = parse_lists_document(body, self.domain, owner=owner, refuse=self._foreign)
        except URIListError as e:
            raise XCAPError(409, CONSTRAINT_FAILURE, f"unusable list: {e}") from e
        taken: list[Exists] = []
        for item in parsed.lists:
            user = self._local_user(item.uri)
            if user is None:
                continue  # reported as not in the domain
            holder = self._defined_in.get(user)
            if user in self._file or self.is_account(user) or holder not in (None, (owner, name)):
                field = "resource-lists/list/@" + ("name" if item.name == user else "cr:uri")
                taken.append(Exists(field, (self._free_name(user),)))
        if taken:
            raise XCAPError(409, UNIQUENESS_FAILURE, "list URI already in use", exists=taken)
        if not parsed.unroutable:
            return None
        return build_list_report(parsed.unroutable), LIST_REPORT_MIME_TYPE

    def _foreign(self, item: URIList) -> str | None:
        if self._local_user(item.uri) is None:
            return f"{item.uri} is not in domain {self.domain}"
        return None

    def _free_name(self, user: str) -> str:
        counter = 2
        while self._taken(f"{user}-{counter}"):
            counter += 1
        return f"{user}-{counter}"

    def _taken(self, user: str) -> bool:
        return user in self._by_user or self.is_account(user)

    def lookup(self, uri: SIPURI) -> URIList | None:
        if not uri.user or not self.is_local(uri):
            return None
        return self._by_user.get(uri.user)

    def _set_document(self, owner: str, name: str, body: bytes | None) -> None:
        if body is None:
            self._store_docs.pop((owner, name), None)
        else:
            try:
                # What is not routable was answered to the PUT: skipped quietly.
                parsed = parse_lists_document(body, self.domain, owner=owner, refuse=self._foreign)
                self._store_docs[(owner, name)] = list(parsed.lists)
            except URIListError as e:
                self.log.warn(
                    "resource-lists {owner}/{name} unusable: {reason}",
                    owner=owner,
                    name=name,
                    reason=str(e),
                )
                self._store_docs.pop((owner, name), None)
        self._rebuild()

    async def load_owner(self, owner: str) -> None:
        """Index every resource-lists document of ``owner`` (startup)."""
        owner = identity_key(owner)
        for name in await self.store.list_documents(RESOURCE_LISTS_AUID, owner):
            stored = await self.store.get_document(RESOURCE_LISTS_AUID, owner, name)
            self._set_document(owner, name, stored.body if stored is not None else None)

    def store_changed(self, change: StoreChange) -> None:
        if change.kind != "document" or change.auid != RESOURCE_LISTS_AUID or not change.xui:
            return
        owner, name = change.xui, change.name or ""
        if change.etag is None:
            self._set_document(owner, name, None)
            return

        async def fetch() -> None:
            stored = await self.store.get_document(RESOURCE_LISTS_AUID, owner, name)
            self._set_document(owner, name, stored.body if stored is not None else None)

        d = defer.ensureDeferred(fetch())
        d.addErrback(lambda f: self.log.failure("list index update failed", f))


def consent_needed(
    request: SIPRequest,
    list_uri: str,
    missing: Sequence[str],
    uris: ConsentURIs,
    *,
    name_members: bool = False,
) -> SIPResponse:
    """470 (seed §5; RFC 5360 §5.9.1): nothing was relayed; here is whom to ask.

    Each URI is a relay-local consent URI for one member; the body and the
    ``Permission-Missing`` header carry the same URIs (consent spec §(a) step 2).
    The URIs stay opaque; with ``name_members`` (the sender may know the members: it
    owns the list or wrote it into the request) each also names its member, as the
    header's display-name (``"sip:bob@example.com" <sip:consent-…>``) and the body
    entry's ``<display-name>``, so the sender sees who is missing.
    """
    targets = tuple(uris.consent_uri(list_uri, member) for member in missing)
    key = (targets, name_members)
    built = _CONSENT_NEEDED.get(key)
    if built is None:
        # A sender retrying without permission gets the same answer every time.
        if name_members:
            header = ", ".join(
                NameAddr(SIPURI.parse(target), member).format()
                for target, member in zip(targets, missing, strict=True)
            )
            body = build_uri_list(targets, missing)
        else:
            header = ", ".join(f"<{t}>" for t in targets)
            body = build_uri_list(targets)
        built = remember(_CONSENT_NEEDED, MAX_CACHED_URIS, key, (header, body))
    missing_header, body = built
    headers = [
        ("Permission-Missing", missing_header),
        ("Content-Type", RESOURCE_LISTS_MIME_TYPE),
    ]
    return make_response(request, 470, headers=headers, body=body)


_CONSENT_NEEDED: dict[tuple[tuple[str, ...], bool], tuple[str, bytes]] = {}
