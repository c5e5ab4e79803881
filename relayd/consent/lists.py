"""URI lists: the relay's list definitions, where a list URI leads, and list bodies.

RFC 4826 ``resource-lists`` documents, all parsed with the shared safe lxml parser
(:mod:`relayd.consent.documents`: no DTDs, no entities, size capped first):

* list definitions, from the ``[sip] lists`` file or from ``resource-lists`` documents in
  the permission store (XUI = owner). Each top-level ``<list>`` is one list; its URI is
  the ``cr:uri`` extension attribute (namespace ``urn:relayd:params:xml:ns:consent-policy``)
  or ``sip:<name>@<domain>``; nested lists are flattened; ``entry-ref``/``external`` are
  not followed (a relay must not fetch documents on a sender's behalf). Any document
  RFC 4826 allows is read: a list with no usable list URI is not a list URI, an entry
  that is not a ``sip:``/``sips:`` user URI is not a member, and each is reported as
  :class:`Unroutable` (the XCAP PUT answers them as a list report, see
  :func:`build_list_report`);
* :class:`ListDirectory`: list URI → :class:`URIList`, from the ``[sip] lists`` file
  and from ``resource-lists`` documents in the store (XUI = owner), kept current by the
  store's change listener. File lists win over store lists;
* the members of a request-contained list (RFC 5365 §4, read from a MESSAGE on the
  SIP side): :func:`every_member`;
* the 470 body (seed §5, consent spec §(a) step 2): one ``<entry uri>`` per URI lacking
  permission.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from lxml import etree
from twisted.internet import defer

from relayd.consent.documents import (
    GLOBAL_XUI,
    DocumentKey,
    DocumentRejected,
    Taken,
    parse_document,
)
from relayd.consent.policy import identity_key, normalize_identity
from relayd.consent.store import IPermissionStore, StoreChange
from relayd.consent.vocabulary import (
    CONSENT_POLICY_NAMESPACE,
    LIST_REPORT_MIME_TYPE,
    LIST_REPORT_NAMESPACE,
    RESOURCE_LISTS_AUID,
    RESOURCE_LISTS_NAMESPACE,
)
from relayd.logs import logger
from relayd.sipuri import SIPURI, SIPURIError

__all__ = [
    "ListDirectory",
    "ListsDocument",
    "URIList",
    "URIListError",
    "Unroutable",
    "build_list_report",
    "build_uri_list",
    "every_member",
    "list_uri",
    "parse_list_report",
    "parse_lists_document",
    "parse_resource_lists",
    "read_lists",
]

MAX_REPORTED = 100
"""Items a list report names; it counts the rest (``more``)."""
DEFAULT_MAX_BYTES = 256 * 1024

_RL = f"{{{RESOURCE_LISTS_NAMESPACE}}}"
_CR = f"{{{CONSENT_POLICY_NAMESPACE}}}"
_LR = f"{{{LIST_REPORT_NAMESPACE}}}"


class URIListError(ValueError):
    """A list document or recipient-list body we cannot use; the text is safe to log."""


@dataclass(frozen=True, slots=True)
class URIList:
    """One translation (seed §2): the list URI, its owner and its member URIs (as the
    list writes them)."""

    uri: str
    members: tuple[str, ...]
    owner: str | None = None
    name: str = ""
    node: str = ""
    """The list's XCAP node selector in its document (RFC 4825 §6.3)."""


@dataclass(frozen=True, slots=True)
class Unroutable:
    """A list that is no list URI, or an entry that is no member the relay reaches.

    ``node`` is its XCAP node selector in the document (RFC 4825 §6.3), ``list_name``
    the name of the top-level list it is in, ``uri`` the entry's URI (None: a list).
    """

    node: str
    reason: str
    list_name: str = ""
    uri: str | None = None


@dataclass(frozen=True, slots=True)
class ListsDocument:
    """What a resource-lists document gives the relay: its lists, and what it skips."""

    lists: tuple[URIList, ...]
    unroutable: tuple[Unroutable, ...] = ()


def _user_uri(text: str) -> SIPURI:
    """Only sip/sips user URIs are relayable; the error says why any other URI is not."""
    scheme, colon, _ = text.strip().partition(":")
    if colon and scheme.lower() not in ("sip", "sips") and _SCHEME.fullmatch(scheme):
        raise URIListError(f"{scheme.lower()}: URIs are not relayed (only sip: and sips:)")
    try:
        uri = SIPURI.parse(text.strip())
    except SIPURIError as e:
        raise URIListError(f"not a SIP URI: {e}") from None
    if uri.scheme not in ("sip", "sips") or not uri.user:
        raise URIListError(f"not a SIP user URI: {text[:80]!r}")
    return uri


def _aor(text: str) -> str:
    """A list or owner URI as an AOR (``sip:user@host``): lists are ours, and owners
    are the XUIs their documents live under."""
    return _user_uri(text).aor


def _member(text: str) -> str:
    """A member URI exactly as the list writes it (seed §2: the translation's output).

    Routing, consent URIs and consent records use it unchanged, so a port or a
    parameter that says where the member is reached survives; only comparisons use the
    canonical form (:func:`~relayd.consent.policy.normalize_identity`)."""
    _user_uri(text)
    return text.strip()


def list_uri(name: str, domain: str) -> str:
    """``sip:<name>@<domain>``, the URI a list named ``name`` is reached at; raises
    :class:`URIListError` when ``name`` cannot be the user part of a SIP URI."""
    if not name:
        raise URIListError("a list without a name (or cr:uri) has no list URI")
    try:
        uri = SIPURI.parse(f"sip:{name}@{domain}")
    except SIPURIError:
        uri = None
    if uri is None or uri.user != name:
        raise URIListError(f"the name {name[:80]!r} cannot be the user part of a list URI")
    return uri.aor


def parse_resource_lists(body: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> etree._Element:
    """The root of a resource-lists document, parsed safely."""
    try:
        root = parse_document(body, max_bytes)
    except DocumentRejected as e:
        raise URIListError(f"{e.fault}: {e}") from None
    if root.tag != _RL + "resource-lists":
        raise URIListError("root element is not resource-lists")
    return root


def _step(element: etree._Element, attribute: str, position: int) -> str:
    """One node-selector step for ``element``: by attribute when it can be quoted,
    else by position among its same-named siblings (RFC 4825 §6.3)."""
    local = etree.QName(element).localname
    value = element.get(attribute)
    if value is not None:
        for quote in ('"', "'"):
            if quote not in value:
                return f"{local}[@{attribute}={quote}{value}{quote}]"
    return f"{local}[{position}]"


def _members(
    container: etree._Element,
    path: str,
    list_name: str,
    members: list[str],
    skipped: list[Unroutable],
    seen: set[str] | None = None,
) -> None:
    """The members of ``container`` and its nested lists as written, in document order,
    each once (compared canonically); an entry that is not a sip/sips user URI goes to
    ``skipped`` instead."""
    seen = set() if seen is None else seen
    positions = {"entry": 0, "list": 0}
    for child in container.iterchildren(_RL + "entry", _RL + "list"):
        local = etree.QName(child).localname
        positions[local] += 1
        node = f"{path}/{_step(child, 'uri' if local == 'entry' else 'name', positions[local])}"
        if local == "list":
            _members(child, node, list_name, members, skipped, seen)
            continue
        uri = child.get("uri", "")
        try:
            member = _member(uri)
        except URIListError as e:
            skipped.append(Unroutable(node, str(e), list_name, uri))
            continue
        key = normalize_identity(member)
        if key not in seen:
            seen.add(key)
            members.append(member)


def every_member(root: etree._Element) -> tuple[list[str], list[Unroutable]]:
    """Every member of the lists of a resource-lists document, as written and each
    once, and the entries that are no member."""
    members: list[str] = []
    skipped: list[Unroutable] = []
    _members(root, "resource-lists", "", members, skipped)
    return members, skipped


def _read_list(
    element: etree._Element, domain: str, owner: str | None, node: str
) -> tuple[URIList | None, list[Unroutable]]:
    name = element.get("name") or ""
    skipped: list[Unroutable] = []
    members: list[str] = []
    _members(element, node, name, members, skipped)
    try:
        uri_text = element.get(_CR + "uri")
        if uri_text is not None:
            try:
                uri = _aor(uri_text)
            except URIListError as e:
                raise URIListError(f"cr:uri {uri_text[:80]!r}: {e}") from None
        else:
            uri = list_uri(name, domain)
        list_owner = owner if owner is not None else element.get(_CR + "owner")
        try:
            owner_aor = _aor(list_owner) if list_owner else None
        except URIListError as e:
            raise URIListError(f"cr:owner {list_owner!r}: {e}") from None
    except URIListError as e:
        return None, [Unroutable(node, str(e), name), *skipped]
    return URIList(uri, tuple(members), owner_aor, name, node), skipped


def parse_lists_document(
    body: bytes,
    domain: str,
    owner: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    refuse: Callable[[URIList], str | None] | None = None,
) -> ListsDocument:
    """The lists a resource-lists document defines, and what in it the relay skips
    (module doc for naming rules).

    ``owner`` is the document's XUI for store documents; file lists may name theirs with
    ``cr:owner``. Raises :class:`URIListError` only for a document that is no
    resource-lists document at all.  A list as long as the document allows is read;
    requests to one longer than ``[sip] max_list_size`` are refused when they come.
    ``refuse(list)`` gives the reason a list is not routable for what only the caller
    knows (the relay's hosts), None to keep it.
    """
    return read_lists(parse_resource_lists(body, max_bytes), domain, owner, refuse)


def read_lists(
    root: etree._Element,
    domain: str,
    owner: str | None = None,
    refuse: Callable[[URIList], str | None] | None = None,
) -> ListsDocument:
    """:func:`parse_lists_document` of a parsed ``resource-lists`` root element."""
    lists: list[URIList] = []
    unroutable: list[Unroutable] = []
    seen: dict[str, str] = {}
    for position, element in enumerate(root.iterchildren(_RL + "list"), 1):
        node = f"resource-lists/{_step(element, 'name', position)}"
        item, skipped = _read_list(element, domain, owner, node)
        if item is not None:
            reason = (
                f"{item.uri} is already the URI of {seen[item.uri]}"
                if item.uri in seen
                else refuse(item)
                if refuse is not None
                else None
            )
            if reason is not None:
                skipped.insert(0, Unroutable(node, reason, item.name))
                item = None
        if item is not None:
            seen[item.uri] = node
            lists.append(item)
        unroutable += skipped
    return ListsDocument(tuple(lists), tuple(unroutable))


def build_list_report(items: Iterable[Unroutable], limit: int = MAX_REPORTED) -> bytes:
    """The ``application/vnd.relayd.list-report+xml`` body of a list write (docs/consent.md):
    one ``<not-routable>`` per item, at most ``limit`` of them, the rest counted in
    ``more``."""
    root = etree.Element(_LR + "list-report", nsmap={None: LIST_REPORT_NAMESPACE})  # type: ignore[dict-item]
    items = list(items)
    for item in items[:limit]:
        attributes = {"node": item.node, "list": item.list_name, "reason": item.reason}
        if item.uri is not None:
            attributes["uri"] = item.uri
        etree.SubElement(root, _LR + "not-routable", attributes)
    if len(items) > limit:
        root.set("more", str(len(items) - limit))
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


def parse_list_report(body: bytes) -> tuple[list[Unroutable], int]:
    """The items of a list report and how many more it left out."""
    try:
        root = parse_document(body, DEFAULT_MAX_BYTES)
    except DocumentRejected as e:
        raise URIListError(f"list report: {e}") from None
    if root.tag != _LR + "list-report":
        raise URIListError("not a list report")
    items = [
        Unroutable(
            element.get("node", ""),
            element.get("reason", ""),
            element.get("list", ""),
            element.get("uri"),
        )
        for element in root.iterchildren(_LR + "not-routable")
    ]
    more = root.get("more", "0")
    return items, int(more) if more.isdigit() else 0


def build_uri_list(uris: Iterable[str], display_names: Iterable[str] | None = None) -> bytes:
    """An ``application/resource-lists+xml`` body with one entry per URI (470 body),
    each with its ``<display-name>`` (RFC 4826 §3.2) when ``display_names`` are given."""
    root = etree.Element(_RL + "resource-lists", nsmap={None: RESOURCE_LISTS_NAMESPACE})  # type: ignore[dict-item]
    holder = etree.SubElement(root, _RL + "list")
    names = iter(display_names) if display_names is not None else None
    for uri in uris:
        entry = etree.SubElement(holder, _RL + "entry", uri=uri)
        if names is not None:
            etree.SubElement(entry, _RL + "display-name").text = next(names)
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")


def added_members(old: Sequence[URIList], new: Sequence[URIList]) -> list[URIList]:
    """Per list of ``new``, the members the list of the same URI in ``old`` did not
    have (two spellings of one member are one member: identity keys), in document
    order and each once; lists that gained no member are left out.

    A list new to ``old`` (a new document, a list renamed) gains all its members: a new
    translation needs every recipient's consent (RFC 5360 §5.3.1).
    """
    before = {
        identity_key(item.uri): {identity_key(member) for member in item.members} for item in old
    }
    out: list[URIList] = []
    for item in new:
        seen = set(before.get(identity_key(item.uri), ()))
        gained: list[str] = []
        for member in item.members:
            key = identity_key(member)
            if key not in seen:
                seen.add(key)
                gained.append(member)
        if gained:
            out.append(
                URIList(item.uri, tuple(gained), owner=item.owner, name=item.name, node=item.node)
            )
    return out


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
        self._observers: list[Callable[[], object]] = []
        self._addition_observers: list[Callable[[URIList], object]] = []
        self.replace_file_lists(file_lists)

    def add_observer(self, observer: Callable[[], object]) -> None:
        """Call ``observer`` after every change of the lists (RFC 5362 watchers)."""
        self._observers.append(observer)

    def add_addition_observer(self, observer: Callable[[URIList], object]) -> None:
        """Call ``observer(gained)`` for each list a write committed on this node adds
        members to: ``gained`` is the list with only the added members
        (:func:`relayd.consent.additions.added_members`). A write another node committed
        reaches its own observers there, never here (RFC 5360 §5.3: one request per
        addition)."""
        self._addition_observers.append(observer)

    def replace_file_lists(self, file_lists: Iterable[URIList]) -> None:
        """The lists of the ``[sip] lists`` file, at start and again on reload; those
        of XCAP documents stay, and a file list still wins over one of theirs."""
        found: dict[str, URIList] = {}
        for item in file_lists:
            user = self._local_user(item.uri)
            if user is None:
                self.log.warn("list {uri} is not in our domain; ignored", uri=item.uri)
            else:
                found[user] = item
        self._file = found
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
        for observer in self._observers:
            observer()

    def check_document(self, document: DocumentKey, body: bytes) -> tuple[bytes, str] | None:
        """Refuse a resource-lists document that names a list URI it may not hold,
        else report what in it the relay will not route: the report's body and MIME
        type (the XCAP server's check of a document it is about to store).

        List URIs share the domain's user namespace: without the refusal any user
        could take over another owner's list (or an account's address) by storing a
        list of the same name. First come, first served; the lists file always wins.
        Anything else RFC 4826 allows is stored; lists that are no list URI here and
        entries that are no member are answered as a list report (docs/consent.md).
        """
        if document.xui == GLOBAL_XUI:
            return None  # global documents define no lists
        owner, name = document.xui, document.name
        try:
            parsed = parse_lists_document(body, self.domain, owner=owner, refuse=self._foreign)
        except URIListError as e:
            raise DocumentRejected("constraint-failure", f"unusable list: {e}") from e
        taken: list[Taken] = []
        for item in parsed.lists:
            user = self._local_user(item.uri)
            if user is None:
                continue  # reported as not in the domain
            holder = self._defined_in.get(user)
            if user in self._file or self.is_account(user) or holder not in (None, (owner, name)):
                field = "resource-lists/list/@" + ("name" if item.name == user else "cr:uri")
                taken.append(Taken(field, (self._free_name(user),)))
        if taken:
            raise DocumentRejected("uniqueness-failure", "list URI already in use", taken)
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

    def lists_with(self, member_key: str) -> list[str]:
        """The URIs of the lists that have a member of identity key ``member_key``."""
        return [
            item.uri
            for item in self._by_user.values()
            if any(identity_key(member) == member_key for member in item.members)
        ]

    def lookup(self, uri: SIPURI) -> URIList | None:
        if not uri.user or not self.is_local(uri):
            return None
        return self._by_user.get(uri.user)

    def _set_document(
        self, owner: str, name: str, body: bytes | None, *, local: bool = False
    ) -> None:
        before = self._store_docs.get((owner, name), [])
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
        if local and self._addition_observers:
            self._announce_additions(owner, name, before)

    def _announce_additions(self, owner: str, name: str, before: list[URIList]) -> None:
        """Tell the addition observers what the lists this document routes gained."""
        routed = [
            item
            for item in self._store_docs.get((owner, name), [])
            if self._defined_in.get(self._local_user(item.uri) or "") == (owner, name)
        ]
        for gained in added_members(before, routed):
            for observer in list(self._addition_observers):
                try:
                    observer(gained)
                except Exception:
                    self.log.failure("list addition observer failed for {uri}", uri=gained.uri)

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
        if change.body is not None:  # written here: indexed before the write is answered
            self._set_document(owner, name, change.body, local=not change.remote)
            return

        async def fetch() -> None:
            stored = await self.store.get_document(RESOURCE_LISTS_AUID, owner, name)
            body = stored.body if stored is not None else None
            self._set_document(owner, name, body, local=not change.remote)

        d = defer.ensureDeferred(fetch())
        d.addErrback(lambda f: self.log.failure("list index update failed", f))
