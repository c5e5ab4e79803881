"""XCAP error conditions and their ``application/xcap-error+xml`` bodies (RFC 4825 §11).

One exception type carries every failure the XCAP code can report: the HTTP status the
resource layer must answer with and, for 409 responses, the RFC 4825 §11.2 condition
element that names what went wrong.  The resource turns an :class:`XCAPError` into a
response; nothing below it writes HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from lxml import etree

from relayd.consent.documents import DocumentRejected

XCAP_ERROR_NAMESPACE = "urn:ietf:params:xml:ns:xcap-error"
XCAP_ERROR_MIME_TYPE = "application/xcap-error+xml"

# RFC 4825 §11.2 condition elements.
NOT_WELL_FORMED = "not-well-formed"
NOT_XML_FRAG = "not-xml-frag"
NO_PARENT = "no-parent"
SCHEMA_VALIDATION_ERROR = "schema-validation-error"
NOT_XML_ATT_VALUE = "not-xml-att-value"
CANNOT_INSERT = "cannot-insert"
CANNOT_DELETE = "cannot-delete"
UNIQUENESS_FAILURE = "uniqueness-failure"
CONSTRAINT_FAILURE = "constraint-failure"
NOT_UTF_8 = "not-utf-8"

CONDITIONS = frozenset(
    {
        NOT_WELL_FORMED,
        NOT_XML_FRAG,
        NO_PARENT,
        SCHEMA_VALIDATION_ERROR,
        NOT_XML_ATT_VALUE,
        CANNOT_INSERT,
        CANNOT_DELETE,
        UNIQUENESS_FAILURE,
        CONSTRAINT_FAILURE,
        NOT_UTF_8,
    }
)


_SELECTOR_SAFE = "/!$&'()*+,;=:@-._~"
"""RFC 3986 pchar and "/": what a node selector keeps unescaped in a URI."""


def percent_encoded(node_selector: str) -> str:
    """A node selector as it must appear in a URI or an error body (RFC 4825 §6.3,
    §11.2): brackets, quotes and spaces escaped, so that clients can parse it."""
    return quote(node_selector, safe=_SELECTOR_SAFE)


@dataclass(frozen=True)
class Exists:
    """One ``<exists field=…>`` entry of a uniqueness failure (RFC 4825 §11.2).

    ``field`` names the non-unique element or attribute as a node selector relative to
    the document; ``alt_values`` are optional suggestions the client could use instead.
    """

    field: str
    alt_values: tuple[str, ...] = ()


class XCAPError(Exception):
    """A failed XCAP operation.

    ``status`` is the HTTP status (409 for the §11 conditions, 404 for selectors that
    select nothing, 400 for malformed URIs, 413 for oversized bodies…).  ``condition``
    is set only for 409s and is one of :data:`CONDITIONS`.  ``detail`` becomes the
    optional ``phrase`` attribute: human-readable, never parsed by clients.
    """

    def __init__(
        self,
        status: int,
        condition: str | None = None,
        detail: str | None = None,
        *,
        ancestor: str | None = None,
        exists: Sequence[Exists] = (),
    ) -> None:
        if condition is not None and condition not in CONDITIONS:
            raise ValueError(f"unknown XCAP error condition {condition!r}")
        super().__init__(status, condition, detail)
        self.status = status
        self.condition = condition
        self.detail = detail
        # RFC 4825 §11.2: <no-parent> may name the closest existing ancestor.  This
        # layer only knows node selectors, so it holds the ancestor's node selector;
        # the resource prefixes the document URI before rendering.
        self.ancestor = ancestor
        self.exists = tuple(exists)

    def __str__(self) -> str:
        parts = [str(self.status)]
        if self.condition:
            parts.append(self.condition)
        if self.detail:
            parts.append(self.detail)
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"XCAPError({self.status!r}, {self.condition!r}, {self.detail!r})"

    @property
    def has_body(self) -> bool:
        """Whether the response carries an ``application/xcap-error+xml`` body."""
        return self.condition is not None

    def to_xml(self) -> bytes:
        """Render the RFC 4825 §11 ``<xcap-error>`` document (UTF-8, with declaration).

        Errors without a condition (404, 400, 413…) have no defined body; rendering one
        is a programming error.
        """
        if self.condition is None:
            raise ValueError("only errors with a condition have an xcap-error body")
        ns = f"{{{XCAP_ERROR_NAMESPACE}}}"
        # lxml-stubs types nsmap keys as str; lxml uses None for the default namespace.
        nsmap = {None: XCAP_ERROR_NAMESPACE}
        root = etree.Element(ns + "xcap-error", nsmap=nsmap)  # type: ignore[arg-type]
        element = etree.SubElement(root, ns + self.condition)
        if self.detail:
            element.set("phrase", self.detail)
        if self.condition == NO_PARENT and self.ancestor is not None:
            etree.SubElement(element, ns + "ancestor").text = self.ancestor
        if self.condition == UNIQUENESS_FAILURE:
            for exists in self.exists:
                node = etree.SubElement(element, ns + "exists", field=percent_encoded(exists.field))
                for value in exists.alt_values:
                    etree.SubElement(node, ns + "alt-value").text = value
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def rejected(error: DocumentRejected) -> XCAPError:
    """What answers a document consent refuses: 413 for a body too large, else the
    RFC 4825 §11.2 409 it names."""
    if error.fault == "too-large":
        return XCAPError(413, None, error.reason)
    taken = [Exists(item.field, item.alternatives) for item in error.taken]
    return XCAPError(409, error.fault, error.reason, exists=taken)
