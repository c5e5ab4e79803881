"""XCAP bodies (RFC 4825 §§8.2, 11): documents, element and attribute fragments.

Every one is read with the safe parsing of :mod:`relayd.consent.documents` (no DTDs,
no entities, size and UTF-8 checked first); what that refuses is answered as
:func:`relayd.xcap.errors.rejected` says: 413, or 409 ``not-utf-8`` or
``not-well-formed``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from xml.sax.saxutils import quoteattr

from lxml import etree

from relayd.consent import documents
from relayd.consent.documents import (
    DEFAULT_MAX_BODY_BYTES,
    NO_DTD,
    XML_DECLARATION,
    DocumentRejected,
    declares_dtd,
    make_parser,
    syntax_detail,
)
from relayd.xcap.errors import NOT_XML_ATT_VALUE, NOT_XML_FRAG, XCAPError, rejected

_FRAGMENT_WRAPPER = "relayd-xcap-fragment"


def _check_body(body: bytes, max_bytes: int) -> None:
    try:
        documents.check_body(body, max_bytes)
    except DocumentRejected as e:
        raise rejected(e) from None


_POSITION_SUFFIX = re.compile(r",? line \d+, column \d+\Z")


def _fragment_detail(exc: etree.XMLSyntaxError, body: bytes, opening: int) -> str:
    """libxml2's message with the position in the client's own body.

    The body was parsed after an ``opening`` of that many bytes on its first line
    (quoteattr keeps it to one line), so only first-line columns move; an error in
    the closing wrapper is reported at the end of the body.  Columns count bytes,
    from 1, as libxml2 does.
    """
    line, column = exc.position if exc.position else (1, 1)
    if line == 1:
        column = max(column - opening, 1)
    end = (body.count(b"\n") + 1, len(body) - body.rfind(b"\n"))
    line, column = min((line, column), end)
    message = _POSITION_SUFFIX.sub("", exc.msg or "parse error")
    message = message.replace(_FRAGMENT_WRAPPER, "the end of the body")
    return f"{message[:160]} at line {line}, column {column}"


def parse_document(body: bytes, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> etree._Element:
    """Parse a whole XCAP document body and return its root element.

    Raises :class:`XCAPError` 413 (too large), 409 ``not-utf-8`` or 409
    ``not-well-formed`` (syntax errors, DTDs, entity declarations).
    """
    try:
        return documents.parse_document(body, max_bytes)
    except DocumentRejected as e:
        raise rejected(e) from None


def parse_fragment(
    body: bytes,
    max_bytes: int = DEFAULT_MAX_BODY_BYTES,
    namespaces: Mapping[str | None, str] | None = None,
) -> etree._Element:
    """Parse an ``application/xcap-el+xml`` body: exactly one element (RFC 4825 §8.2.3).

    Prefixes the fragment uses without declaring them resolve against ``namespaces``,
    the bindings in scope where the element goes (RFC 4825 §7.4): a client may write
    ``<rule id="a">`` relying on the document's default namespace.  Anything but one
    element (text, several elements, syntax errors) is 409 ``not-xml-frag``.
    """
    _check_body(body, max_bytes)
    if declares_dtd(body):
        raise XCAPError(409, NOT_XML_FRAG, NO_DTD)
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]  # libxml2 does not count it in columns either
    # A declaration may not appear inside the wrapper; blanking it keeps every byte
    # of the client's body where it was, so errors point into it.
    declaration = XML_DECLARATION.match(body)
    if declaration is not None:
        body = b" " * declaration.end() + body[declaration.end() :]
    declarations = []
    for prefix, uri in (namespaces or {}).items():
        attr = "xmlns" if prefix is None else f"xmlns:{prefix}"
        declarations.append(f"{attr}={quoteattr(uri)}")
    opening = f"<{_FRAGMENT_WRAPPER} {' '.join(declarations)}>".encode()
    closing = f"</{_FRAGMENT_WRAPPER}>".encode()
    try:
        wrapper = etree.fromstring(opening + body + closing, make_parser())
    except etree.XMLSyntaxError as exc:
        raise XCAPError(409, NOT_XML_FRAG, _fragment_detail(exc, body, len(opening))) from None
    elements = [child for child in wrapper if isinstance(child.tag, str)]
    texts = [wrapper.text, *(child.tail for child in wrapper)]
    if len(elements) != 1 or any(text and text.strip() for text in texts):
        raise XCAPError(409, NOT_XML_FRAG, "body must contain exactly one element")
    element = elements[0]
    wrapper.remove(element)
    element.tail = None
    return element


def parse_attribute_value(body: bytes, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> str:
    """Parse an ``application/xcap-att+xml`` body into the attribute's value.

    The body is XML attribute-value content (RFC 4825 §8.2.4): character and predefined
    entity references are decoded, ``<`` and stray ``&`` are 409 ``not-xml-att-value``.
    """
    _check_body(body, max_bytes)
    text = body.decode("utf-8").removeprefix("\ufeff")
    if "<" in text:
        raise XCAPError(409, NOT_XML_ATT_VALUE, "'<' is not allowed in an attribute value")
    probe = '<a v="' + text.replace('"', "&quot;") + '"/>'
    try:
        element = etree.fromstring(probe.encode("utf-8"), make_parser())
    except etree.XMLSyntaxError as exc:
        raise XCAPError(409, NOT_XML_ATT_VALUE, syntax_detail(exc)) from None
    value = element.get("v")
    if value is None or any(isinstance(node, etree._Entity) for node in element.iter()):
        raise XCAPError(409, NOT_XML_ATT_VALUE, "undefined entity reference")
    return value


def serialize_document(root: etree._Element) -> bytes:
    """Serialise a whole document as stored and served: UTF-8 with a declaration."""
    return etree.tostring(root.getroottree(), xml_declaration=True, encoding="UTF-8")


def serialize_element(element: etree._Element) -> bytes:
    """Serialise one element for ``application/xcap-el+xml`` (no tail, no declaration).

    The element reads as it stands in its document: bindings it inherits from its
    ancestors are not added (RFC 4825 §8.3 MUST NOT; clients that want them ask for
    ``namespace::*``, §7.10), and bindings that nothing in it uses are left out. So an
    element PUT in the document's context reads back byte for byte.
    """
    detached = copy.deepcopy(element)
    detached.tail = None
    etree.cleanup_namespaces(detached)
    text = etree.tostring(detached, encoding="UTF-8", with_tail=False)
    parent = element.getparent()
    if parent is None:
        return text
    # lxml writes every declaration the copy needs in its start tag, which ends at
    # the first ">" (attribute values have theirs escaped).
    end = text.index(b">")
    start_tag = text[:end]
    for prefix, uri in parent.nsmap.items():
        name = "xmlns" if prefix is None else f"xmlns:{prefix}"
        start_tag = start_tag.replace(f' {name}="{_attribute_text(uri)}"'.encode(), b"", 1)
    return start_tag + text[end:]


def _attribute_text(value: str) -> str:
    """``value`` escaped as libxml2 writes it in a double-quoted attribute."""
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("\t", "&#9;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
    )
