"""The SIP side of consent (seed §§4-6, §10; consent spec §(a) steps 2-6).

* :class:`ConsentURIs`: the relay-local URIs of the flow. The 470 names, for each member
  lacking permission, ``sip:consent-<list,member>.<mac>@domain``; a CONSENT sent there
  needs no server state to find its list (consent spec gap 11), and the MAC keeps a
  sender from making the relay forward CONSENTs to arbitrary URIs. Wait-permission URIs
  are ``sip:wp-<consent id>@domain``.
* :class:`ListDirectory`: list URI → :class:`~relayd.sip.urilist.URIList`, from the
  ``[sip] lists`` file and from ``resource-lists`` documents in the store (XUI = owner),
  also kept current by the change listener. File lists win over store lists.
* :func:`consent_needed`: the 470 response (resource-lists body + ``Permission-Missing``,
  RFC 5360 §5.9.1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Sequence

from twisted.internet import defer

from relayd.bounded import remember
from relayd.consent.policy import identity_key
from relayd.consent.store import IPermissionStore, StoreChange
from relayd.consent.vocabulary import (
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
from relayd.xcap.errors import CONSTRAINT_FAILURE, UNIQUENESS_FAILURE, Exists, XCAPError
from relayd.xcap.selector import DocumentSelector

__all__ = [
    "ConsentURIs",
    "ListDirectory",
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
