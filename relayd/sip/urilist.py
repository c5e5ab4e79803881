"""URI lists: the relay's list definitions and request-contained recipient lists.

Three uses of RFC 4826 ``resource-lists`` documents, all parsed with the shared safe
lxml parser (:mod:`relayd.consent.documents`: no DTDs, no entities, size capped first):

* list definitions, from the ``[sip] lists`` file or from ``resource-lists`` documents in
  the permission store (XUI = owner). Each top-level ``<list>`` is one list; its URI is
  the ``cr:uri`` extension attribute (namespace ``urn:relayd:params:xml:ns:consent-policy``)
  or ``sip:<name>@<domain>``; nested lists are flattened; ``entry-ref``/``external`` are
  not followed (a relay must not fetch documents on a sender's behalf). Any document
  RFC 4826 allows is read: a list with no usable list URI is not a list URI, an entry
  that is not a ``sip:``/``sips:`` user URI is not a member, and each is reported as
  :class:`Unroutable` (the XCAP PUT answers them as a list report, see
  :func:`build_list_report`);
* request-contained lists (RFC 5365 §4): a ``multipart/mixed`` MESSAGE body with one
  ``application/resource-lists+xml`` part carrying ``Content-Disposition: recipient-list``
  and one payload part;
* the 470 body (seed §5, consent spec §(a) step 2): one ``<entry uri>`` per URI lacking
  permission.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lxml import etree

from relayd.consent.documents import DocumentRejected, parse_document
from relayd.consent.policy import normalize_identity
from relayd.consent.vocabulary import (
    CONSENT_POLICY_NAMESPACE,
    LIST_REPORT_NAMESPACE,
    RESOURCE_LISTS_MIME_TYPE,
    RESOURCE_LISTS_NAMESPACE,
)
from relayd.sip.uri import SIPURI, SIPURIError

__all__ = [
    "ListsDocument",
    "RecipientList",
    "TooManyEntries",
    "URIList",
    "URIListError",
    "Unroutable",
    "build_list_report",
    "build_uri_list",
    "list_uri",
    "parse_content_type",
    "parse_list_report",
    "parse_lists_document",
    "parse_recipient_list",
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


class TooManyEntries(URIListError):
    """A list longer than the configured cap (``[sip] max_list_size``)."""


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


@dataclass(frozen=True, slots=True)
class RecipientList:
    """An RFC 5365 request: the recipients and the payload to deliver to each."""

    recipients: tuple[str, ...]
    content_type: str
    body: bytes


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


def _parse(body: bytes, max_bytes: int) -> etree._Element:
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


def _recipients(root: etree._Element, limit: int) -> list[str]:
    """Every member of a recipient list (RFC 5365): one the relay cannot reach makes
    the whole list unusable, as the sender would not learn who was left out."""
    members: list[str] = []
    skipped: list[Unroutable] = []
    _members(root, "resource-lists", "", members, skipped)
    if skipped:
        raise URIListError(f"entry {skipped[0].uri!r}: {skipped[0].reason}")
    if len(members) > limit:
        raise TooManyEntries(f"more than {limit} entries")
    return members


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
    return read_lists(_parse(body, max_bytes), domain, owner, refuse)


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
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower-cased) and its parameters (names lower-cased, quotes gone)."""
    head, *params = value.split(";")
    out: dict[str, str] = {}
    for param in params:
        name, eq, raw = param.partition("=")
        if not eq:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        out[name.strip().lower()] = raw
    return head.strip().lower(), out


def _split_part(part: bytes) -> tuple[dict[str, str], bytes]:
    if part.startswith(b"\r\n"):  # no headers at all
        return {}, part[2:]
    head, sep, body = part.partition(b"\r\n\r\n")
    if not sep:
        raise URIListError("multipart part without header/body separator")
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").split("\r\n"):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise URIListError("bad header in multipart part")
        headers[name.strip().lower()] = value.strip()
    return headers, body


def _multipart(
    body: bytes, boundary: str, max_parts: int = 8
) -> list[tuple[dict[str, str], bytes]]:
    """RFC 2046 §5.1.1, the subset SIP bodies use: CRLF line ends, no nested multiparts."""
    if not boundary or len(boundary) > 70 or not boundary.isascii():
        raise URIListError("bad multipart boundary")
    delimiter = b"--" + boundary.encode("ascii")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise URIListError("multipart body without parts")
    parts: list[tuple[dict[str, str], bytes]] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # close-delimiter
        if not chunk.startswith(b"\r\n"):
            raise URIListError("malformed multipart delimiter line")
        chunk = chunk[2:]
        if chunk.endswith(b"\r\n"):
            chunk = chunk[:-2]  # the CRLF belongs to the next delimiter
        parts.append(_split_part(chunk))
        if len(parts) > max_parts:
            raise URIListError("too many multipart parts")
    else:
        raise URIListError("multipart body without close-delimiter")
    return parts


def parse_recipient_list(
    content_type: str,
    body: bytes,
    *,
    max_entries: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> RecipientList | None:
    """The RFC 5365 recipient list of a MESSAGE, or None when the body carries none.

    Raises :class:`URIListError` when a recipient list is present but unusable, or when
    it has more than ``max_entries`` recipients.
    """
    mime, params = parse_content_type(content_type)
    if mime != "multipart/mixed":
        return None
    lists: list[bytes] = []
    payload: tuple[str, bytes] | None = None
    for headers, part in _multipart(body, params.get("boundary", "")):
        part_type, _ = parse_content_type(headers.get("content-type", "text/plain"))
        disposition, _ = parse_content_type(headers.get("content-disposition", ""))
        if part_type == RESOURCE_LISTS_MIME_TYPE and disposition == "recipient-list":
            lists.append(part)
        elif payload is None:
            payload = (headers.get("content-type", "text/plain"), part)
        else:
            raise URIListError("more than one payload part")
    if not lists:
        return None
    if len(lists) > 1:
        raise URIListError("more than one recipient-list part")
    root = _parse(lists[0], max_bytes)
    recipients = _recipients(root, max_entries)
    if not recipients:
        raise URIListError("empty recipient list")
    if payload is None:
        raise URIListError("recipient list without a payload part")
    return RecipientList(tuple(recipients), payload[0], payload[1])
