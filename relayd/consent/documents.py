"""Consent documents: what they are keyed by, how they are parsed, how one is refused.

Neutral types, so that consent's rules speak of documents without speaking XCAP or
SIP: the XCAP server answers a :class:`DocumentRejected` as the status and RFC 4825
§11 condition it names, the SIP side logs it.

Every untrusted XML body relayd reads is a consent document (permission rules, lists,
list reports) or, over XCAP, a piece of one, so the safe parsing lives here too: all of
it goes through :func:`make_parser`: entities are never substituted, no DTD is loaded,
nothing is fetched from the network and libxml2's "huge tree" limits stay on.  On top
of the parser, bodies are checked *before* parsing:

* size first: a body over ``max_bytes`` is ``too-large`` (HTTP's 413: RFC 4825 §11
  defines no condition for it);
* UTF-8 next: RFC 4825 §8.2.1 requires UTF-8, so undecodable bytes or an XML
  declaration naming another encoding are ``not-utf-8``;
* any ``<!DOCTYPE`` or ``<!ENTITY`` declaration is ``not-well-formed``: the documents
  are schema-validated and have no use for DTDs, and refusing them outright closes
  billion-laughs, external-entity (XXE) and external-DTD tricks without relying on
  parser internals.  The check is a byte scan, so the string also trips it inside a
  comment or CDATA section; that false positive is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from lxml import etree

GLOBAL_XUI = ""
"""The XUI of the documents of the ``global`` tree (RFC 4825 §6.2)."""


class DocumentKey(NamedTuple):
    """Where a document is stored: AUID, XUI (:data:`GLOBAL_XUI` for the global tree)
    and document name."""

    auid: str
    xui: str
    name: str


@dataclass(frozen=True)
class Taken:
    """A value a document repeats or may not claim: ``field`` names it as a node
    selector relative to the document, ``alternatives`` are free values to use instead."""

    field: str
    alternatives: tuple[str, ...] = ()


Fault = Literal[
    "too-large", "not-utf-8", "not-well-formed", "constraint-failure", "uniqueness-failure"
]
"""Why a document is refused: too large, or an RFC 4825 §11.2 condition."""


class DocumentRejected(ValueError):
    """A document consent cannot store or use; the text is safe to log and to answer."""

    def __init__(self, fault: Fault, reason: str, taken: Sequence[Taken] = ()) -> None:
        super().__init__(reason)
        self.fault = fault
        self.reason = reason
        self.taken = tuple(taken)


DEFAULT_MAX_BODY_BYTES = 1024 * 1024

XML_DECLARATION = re.compile(rb"\A(?:\xef\xbb\xbf)?<\?xml\s[^>]*?\?>")
_DECLARED_ENCODING = re.compile(rb"""encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_FORBIDDEN_MARKUP = (b"<!DOCTYPE", b"<!ENTITY")


def make_parser() -> etree.XMLParser:
    """The one parser configuration for untrusted XML (STYLE 2.6).

    A fresh parser per call: lxml parsers keep state and must not be shared between
    threads, and store work may run in a thread pool.
    """
    return etree.XMLParser(
        encoding="utf-8",
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        collect_ids=False,
        remove_blank_text=False,
    )


def check_body(body: bytes, max_bytes: int) -> None:
    """Size, then UTF-8 (module doc)."""
    if len(body) > max_bytes:
        raise DocumentRejected("too-large", f"body of {len(body)} bytes exceeds {max_bytes}")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentRejected("not-utf-8", f"invalid UTF-8 at byte {exc.start}") from None
    declaration = XML_DECLARATION.match(body)
    if declaration is not None:
        encoding = _DECLARED_ENCODING.search(declaration.group(0))
        if encoding is not None and encoding.group(1).lower() not in (b"utf-8", b"utf8"):
            raise DocumentRejected("not-utf-8", "declared encoding is not UTF-8")


def declares_dtd(body: bytes) -> bool:
    """Whether ``body`` holds a DTD or entity declaration (module doc)."""
    return any(marker in body for marker in _FORBIDDEN_MARKUP)


NO_DTD = "DTDs and entity declarations are not allowed"


def syntax_detail(exc: etree.XMLSyntaxError) -> str:
    # libxml2 messages can be long and echo input; keep the first line, bounded.
    return str(exc).splitlines()[0][:200] if str(exc) else "parse error"


def parse_document(body: bytes, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> etree._Element:
    """Parse a whole document body and return its root element.

    Raises :class:`DocumentRejected`: ``too-large``, ``not-utf-8`` or
    ``not-well-formed`` (syntax errors, DTDs, entity declarations).
    """
    check_body(body, max_bytes)
    if declares_dtd(body):
        raise DocumentRejected("not-well-formed", NO_DTD)
    try:
        root = etree.fromstring(body, make_parser())
    except etree.XMLSyntaxError as exc:
        raise DocumentRejected("not-well-formed", syntax_detail(exc)) from None
    if getattr(root.getroottree().docinfo, "doctype", ""):
        # Unreachable given the byte scan; kept so a future scan bug fails closed.
        raise DocumentRejected("not-well-formed", "DTDs are not allowed")
    return root
