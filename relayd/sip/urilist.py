"""Request-contained recipient lists (RFC 5365 §4).

A ``multipart/mixed`` MESSAGE body with one ``application/resource-lists+xml`` part
carrying ``Content-Disposition: recipient-list`` and one payload part. The list is read
as :mod:`relayd.consent.lists` reads every list; here is only what a MESSAGE adds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lxml import etree

from relayd.consent.lists import (
    DEFAULT_MAX_BYTES,
    URIListError,
    every_member,
    parse_resource_lists,
)
from relayd.consent.vocabulary import RESOURCE_LISTS_MIME_TYPE

__all__ = [
    "RecipientList",
    "TooManyEntries",
    "parse_content_type",
    "parse_recipient_list",
]


class TooManyEntries(URIListError):
    """A list longer than the configured cap (``[sip] max_list_size``)."""


@dataclass(frozen=True, slots=True)
class RecipientList:
    """An RFC 5365 request: the recipients and the payload to deliver to each."""

    recipients: tuple[str, ...]
    content_type: str
    body: bytes


def _recipients(root: etree._Element, limit: int) -> list[str]:
    """Every member of a recipient list (RFC 5365): one the relay cannot reach makes
    the whole list unusable, as the sender would not learn who was left out."""
    members, skipped = every_member(root)
    if skipped:
        raise URIListError(f"entry {skipped[0].uri!r}: {skipped[0].reason}")
    if len(members) > limit:
        raise TooManyEntries(f"more than {limit} entries")
    return members


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
    recipients = _recipients(parse_resource_lists(lists[0], max_bytes), max_entries)
    if not recipients:
        raise URIListError("empty recipient list")
    if payload is None:
        raise URIListError("recipient list without a payload part")
    return RecipientList(tuple(recipients), payload[0], payload[1])
