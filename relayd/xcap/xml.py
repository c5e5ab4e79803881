"""Safe XML parsing for everything XCAP accepts from the network (RFC 4825 §§8.2, 11).

All untrusted XML in relayd goes through :func:`make_parser`: entities are never
substituted, no DTD is loaded, nothing is fetched from the network and libxml2's
"huge tree" limits stay on.  On top of the parser, bodies are checked *before* parsing:

* size first: a body over ``max_bytes`` is refused with **413** (HTTP's own status for
  an oversized request; RFC 4825 §11 defines no condition for it, so there is no
  ``xcap-error`` body);
* UTF-8 next: RFC 4825 §8.2.1 requires UTF-8, so undecodable bytes or an XML
  declaration naming another encoding give **409 not-utf-8**;
* any ``<!DOCTYPE`` or ``<!ENTITY`` declaration gives **409 not-well-formed**: XCAP
  documents are schema-validated and have no use for DTDs, and refusing them outright
  closes billion-laughs, external-entity (XXE) and external-DTD tricks without relying
  on parser internals.  The check is a byte scan, so the string also trips it inside
  a comment or CDATA section; that false positive is accepted.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from xml.sax.saxutils import quoteattr

from lxml import etree

from relayd.xcap.errors import (
    NOT_UTF_8,
    NOT_WELL_FORMED,
    NOT_XML_ATT_VALUE,
    NOT_XML_FRAG,
    XCAPError,
)

DEFAULT_MAX_BODY_BYTES = 1024 * 1024

_XML_DECLARATION = re.compile(rb"\A(?:\xef\xbb\xbf)?<\?xml\s[^>]*?\?>")
_DECLARED_ENCODING = re.compile(rb"""encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_FORBIDDEN_MARKUP = (b"<!DOCTYPE", b"<!ENTITY")
_FRAGMENT_WRAPPER = "relayd-xcap-fragment"


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


def _check_size(body: bytes, max_bytes: int) -> None:
    if len(body) > max_bytes:
        raise XCAPError(413, None, f"body of {len(body)} bytes exceeds {max_bytes}")


def _check_utf8(body: bytes) -> None:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XCAPError(409, NOT_UTF_8, f"invalid UTF-8 at byte {exc.start}") from None
    declaration = _XML_DECLARATION.match(body)
    if declaration is not None:
        encoding = _DECLARED_ENCODING.search(declaration.group(0))
        if encoding is not None and encoding.group(1).lower() not in (b"utf-8", b"utf8"):
            raise XCAPError(409, NOT_UTF_8, "declared encoding is not UTF-8")


def _check_no_dtd(body: bytes, condition: str) -> None:
    for marker in _FORBIDDEN_MARKUP:
        if marker in body:
            raise XCAPError(409, condition, "DTDs and entity declarations are not allowed")


def _syntax_detail(exc: etree.XMLSyntaxError) -> str:
    # libxml2 messages can be long and echo input; keep the first line, bounded.
    return str(exc).splitlines()[0][:200] if str(exc) else "parse error"


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
    _check_size(body, max_bytes)
    _check_utf8(body)
    _check_no_dtd(body, NOT_WELL_FORMED)
    try:
        root = etree.fromstring(body, make_parser())
    except etree.XMLSyntaxError as exc:
        raise XCAPError(409, NOT_WELL_FORMED, _syntax_detail(exc)) from None
    if getattr(root.getroottree().docinfo, "doctype", ""):
        # Unreachable given the byte scan; kept so a future scan bug fails closed.
        raise XCAPError(409, NOT_WELL_FORMED, "DTDs are not allowed")
    return root


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
    _check_size(body, max_bytes)
    _check_utf8(body)
    _check_no_dtd(body, NOT_XML_FRAG)
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]  # libxml2 does not count it in columns either
    # A declaration may not appear inside the wrapper; blanking it keeps every byte
    # of the client's body where it was, so errors point into it.
    declaration = _XML_DECLARATION.match(body)
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
    _check_size(body, max_bytes)
    _check_utf8(body)
    text = body.decode("utf-8").removeprefix("\ufeff")
    if "<" in text:
        raise XCAPError(409, NOT_XML_ATT_VALUE, "'<' is not allowed in an attribute value")
    probe = '<a v="' + text.replace('"', "&quot;") + '"/>'
    try:
        element = etree.fromstring(probe.encode("utf-8"), make_parser())
    except etree.XMLSyntaxError as exc:
        raise XCAPError(409, NOT_XML_ATT_VALUE, _syntax_detail(exc)) from None
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
