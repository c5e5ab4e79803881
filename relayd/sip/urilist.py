"""URI lists: the relay's list definitions and request-contained recipient lists.

Three uses of RFC 4826 ``resource-lists`` documents, all parsed with the shared safe
lxml parser (:mod:`relayd.xcap.xml`: no DTDs, no entities, size capped first):

* list definitions, from the ``[sip] lists`` file or from ``resource-lists`` documents in
  the permission store (XUI = owner). Each top-level ``<list>`` is one list; its URI is
  the ``cr:uri`` extension attribute (namespace ``urn:relayd:params:xml:ns:consent-policy``)
  or ``sip:<name>@<domain>``; nested lists are flattened; ``entry-ref``/``external`` are
  not followed (a relay must not fetch documents on a sender's behalf);
* request-contained lists (RFC 5365 §4): a ``multipart/mixed`` MESSAGE body with one
  ``application/resource-lists+xml`` part carrying ``Content-Disposition: recipient-list``
  and one payload part;
* the 470 body (seed §5, consent spec §(a) step 2): one ``<entry uri>`` per URI lacking
  permission.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from lxml import etree

from relayd.sip.uri import SIPURI, SIPURIError
from relayd.xcap.errors import XCAPError
from relayd.xcap.policy import normalize_identity
from relayd.xcap.usages import CONSENT_POLICY_NAMESPACE, RESOURCE_LISTS_NAMESPACE
from relayd.xcap.xml import parse_document

__all__ = [
    "RESOURCE_LISTS_MIME_TYPE",
    "RecipientList",
    "TooManyEntries",
    "URIList",
    "URIListError",
    "build_uri_list",
    "parse_content_type",
    "parse_lists_document",
    "parse_recipient_list",
]

RESOURCE_LISTS_MIME_TYPE = "application/resource-lists+xml"
DEFAULT_MAX_BYTES = 256 * 1024

_RL = f"{{{RESOURCE_LISTS_NAMESPACE}}}"
_CR = f"{{{CONSENT_POLICY_NAMESPACE}}}"


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


@dataclass(frozen=True, slots=True)
class RecipientList:
    """An RFC 5365 request: the recipients and the payload to deliver to each."""

    recipients: tuple[str, ...]
    content_type: str
    body: bytes


def _user_uri(text: str) -> SIPURI:
    """Only sip/sips URIs with a user part are relayable."""
    try:
        uri = SIPURI.parse(text.strip())
    except SIPURIError as e:
        raise URIListError(f"bad entry URI: {e}") from None
    if uri.scheme not in ("sip", "sips") or not uri.user:
        raise URIListError(f"entry is not a sip user URI: {text[:80]!r}")
    return uri


def _aor(text: str) -> str:
    """A list or owner URI as an AOR (``sip:user@host``): lists are ours, and owners
    are the XUIs their documents live under."""
    return _user_uri(text).aor


def _member(text: str) -> str:
    """A member URI exactly as the list writes it (seed §2: the translation's output).

    Routing, consent URIs and consent records use it unchanged, so a port or a
    parameter that says where the member is reached survives; only comparisons use the
    canonical form (:func:`~relayd.xcap.policy.normalize_identity`)."""
    _user_uri(text)
    return text.strip()


def _parse(body: bytes, max_bytes: int) -> etree._Element:
    try:
        root = parse_document(body, max_bytes)
    except XCAPError as e:
        raise URIListError(f"{e.condition or e.status}: {e}") from None
    if root.tag != _RL + "resource-lists":
        raise URIListError("root element is not resource-lists")
    return root


def _entries(container: etree._Element, limit: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for element in container.iter(_RL + "entry"):
        uri = element.get("uri")
        if uri is None:
            raise URIListError("entry without uri")
        member = _member(uri)
        key = normalize_identity(member)
        if key not in seen:
            seen.add(key)
            out.append(member)
            if len(out) > limit:
                raise TooManyEntries(f"more than {limit} entries")
    return out


def parse_lists_document(
    body: bytes,
    domain: str,
    owner: str | None = None,
    *,
    max_entries: int = 10_000,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[URIList]:
    """The lists defined by a resource-lists document (module doc for naming rules).

    ``owner`` is the document's XUI for store documents; file lists may name theirs with
    ``cr:owner``. Raises :class:`URIListError` for a document we cannot use at all.
    """
    root = _parse(body, max_bytes)
    lists: list[URIList] = []
    for element in root.iterchildren(_RL + "list"):
        name = element.get("name") or ""
        uri_text = element.get(_CR + "uri") or (f"sip:{name}@{domain}" if name else "")
        if not uri_text:
            raise URIListError("list without name or cr:uri")
        uri = _aor(uri_text)
        list_owner = owner if owner is not None else element.get(_CR + "owner")
        lists.append(
            URIList(
                uri,
                tuple(_entries(element, max_entries)),
                _aor(list_owner) if list_owner else None,
                name,
            )
        )
    return lists


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
    recipients = _entries(root, max_entries)
    if not recipients:
        raise URIListError("empty recipient list")
    if payload is None:
        raise URIListError("recipient list without a payload part")
    return RecipientList(tuple(recipients), payload[0], payload[1])
