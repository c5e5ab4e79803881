"""XCAP URIs and node selectors (RFC 4825 §6) and the tree operations on them (§8.2).

A request URI is ``ROOT/<auid>/users/<xui>/<document>`` or ``ROOT/<auid>/global/
<document>`` (§6.2), optionally followed by ``/~~/`` and a node selector (§6.3), with
namespace prefixes for the selector bound in the query as ``xmlns(p=urn:…)`` (§6.4).

Node selector grammar implemented (§6.3)::

    node-selector      = element-selector ["/" terminal-selector]
    element-selector   = step *( "/" step )
    step               = NameorAny [ "[" position "]" ] [ "[" attr-test "]" ]
    attr-test          = "@" att-name "=" att-value      ; att-value is an XML AttValue
    NameorAny          = QName / "*"
    terminal-selector  = "@" att-name / "namespace::*"

Unprefixed element names are in the application usage's default namespace (§6.3),
unprefixed attribute names in no namespace.  Positions count element siblings that
pass the name test, before the attribute test is applied, as in XPath.  ``position``
is ``1*DIGIT`` in §6.3, so ``[0]`` is valid syntax; like XPath's ``[0]`` it selects
nothing (404 for GET and DELETE, 409 ``cannot-insert`` for PUT: no write can make
the URI select what was written, §8.2.5).

The operations enforce the idempotency rule of §8.2.5: after a PUT the same URI must
select exactly what was written (else 409 ``cannot-insert``), after a DELETE it must
select nothing (else 409 ``cannot-delete``); a failed check leaves the tree unchanged.
Schema and uniqueness validation of the result is the caller's job
(:meth:`relayd.xcap.usages.ApplicationUsage.validate`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import unquote

from lxml import etree

from relayd.consent.documents import GLOBAL_XUI, DocumentKey
from relayd.consent.policy import normalize_identity
from relayd.xcap import usages
from relayd.xcap.errors import (
    CANNOT_DELETE,
    CANNOT_INSERT,
    NO_PARENT,
    NOT_XML_ATT_VALUE,
    XCAPError,
)

NODE_SELECTOR_SEPARATOR = "~~"

_NCNAME = r"[^\W\d][\w.\-]*"
_QNAME = rf"(?:{_NCNAME}:)?{_NCNAME}"
_STEP = re.compile(
    rf"""\A(?P<name>\*|{_QNAME})
        (?:\[(?P<position>[0-9]+)\])?
        (?:\[@(?P<attr>{_QNAME})=(?P<value>"[^"]*"|'[^']*')\])?\Z""",
    re.VERBOSE,
)
_ATTRIBUTE = re.compile(rf"\A@(?P<attr>{_QNAME})\Z")
_REFERENCE = re.compile(r"&(?:(lt|gt|amp|quot|apos)|#([0-9]+)|#x([0-9a-fA-F]+));")
_PREDEFINED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}
_XMLNS_SCHEME = re.compile(r"\s*xmlns\(")


def _bad_request(detail: str) -> XCAPError:
    return XCAPError(400, None, detail)


@dataclass(frozen=True)
class DocumentSelector:
    """Which document a URI names (RFC 4825 §6.2); ``xui`` is None for ``global``."""

    auid: str
    xui: str | None
    document: str

    @property
    def is_global(self) -> bool:
        return self.xui is None

    @property
    def key(self) -> DocumentKey:
        """Where the document is stored."""
        return DocumentKey(self.auid, self.xui or GLOBAL_XUI, self.document)


@dataclass(frozen=True)
class AttributeTest:
    """``[@name="value"]``; ``name`` is a Clark name (``{ns}local`` or ``local``)."""

    name: str
    value: str


@dataclass(frozen=True)
class Step:
    """One location step; ``name`` is a Clark name, or None for ``*``."""

    name: str | None
    position: int | None = None
    attribute: AttributeTest | None = None
    text: str = field(default="", compare=False)

    def name_matches(self, element: etree._Element) -> bool:
        return isinstance(element.tag, str) and (self.name is None or element.tag == self.name)


@dataclass(frozen=True)
class NodeSelector:
    """A parsed node selector: element steps plus an optional terminal selector."""

    steps: tuple[Step, ...]
    attribute: str | None = None
    namespace_selector: bool = False
    text: str = field(default="", compare=False)

    @property
    def element_selector(self) -> NodeSelector:
        """The selector without its terminal part (the element it is about)."""
        return NodeSelector(self.steps, text="/".join(step.text for step in self.steps))


@dataclass(frozen=True)
class XCAPURI:
    """A fully parsed XCAP request URI."""

    document: DocumentSelector
    node: NodeSelector | None
    namespaces: Mapping[str, str]


class PutResult(NamedTuple):
    """Outcome of an element PUT: the (possibly new) root and whether it inserted."""

    root: etree._Element
    created: bool


def _percent_decode(text: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise _bad_request("percent-encoding is not valid UTF-8") from None


def parse_namespace_bindings(query: str) -> dict[str, str]:
    """Parse ``xmlns(p=uri)xmlns(q=uri)`` (RFC 4825 §6.4, XPointer xmlns() scheme).

    ``^`` escapes ``(``, ``)`` and ``^`` inside a part (XPointer framework §3.1).
    """
    text = _percent_decode(query)
    bindings: dict[str, str] = {}
    index = 0
    while index < len(text):
        if text[index:].strip() == "":
            break
        match = _XMLNS_SCHEME.match(text, index)
        if match is None:
            raise _bad_request("query must be xmlns() namespace bindings")
        index = match.end()
        body: list[str] = []
        while True:
            if index >= len(text):
                raise _bad_request("unterminated xmlns() binding")
            char = text[index]
            if char == "^":
                if index + 1 >= len(text) or text[index + 1] not in "()^":
                    raise _bad_request("bad ^ escape in xmlns() binding")
                body.append(text[index + 1])
                index += 2
                continue
            if char == "(":
                raise _bad_request("unescaped ( in xmlns() binding")
            index += 1
            if char == ")":
                break
            body.append(char)
        prefix, equals, uri = "".join(body).partition("=")
        prefix, uri = prefix.strip(), uri.strip()
        if not equals or not re.fullmatch(_NCNAME, prefix) or not uri:
            raise _bad_request("xmlns() binding must be prefix=namespace-uri")
        bindings[prefix] = uri
    return bindings


def _decode_att_value(quoted: str) -> str:
    raw = quoted[1:-1]
    if "<" in raw:
        raise _bad_request("'<' in attribute value")
    if "&" in _REFERENCE.sub("", raw):
        raise _bad_request("stray '&' in attribute value")

    def replace(match: re.Match[str]) -> str:
        named, decimal, hexadecimal = match.groups()
        if named:
            return _PREDEFINED[named]
        code = int(decimal) if decimal else int(hexadecimal, 16)
        try:
            return chr(code)
        except (ValueError, OverflowError):
            raise _bad_request("bad character reference") from None

    return _REFERENCE.sub(replace, raw)


def _resolve(qname: str, namespaces: Mapping[str, str], default: str | None) -> str:
    prefix, colon, local = qname.rpartition(":")
    if not colon:
        return local if default is None else etree.QName(default, local).text
    if prefix not in namespaces:
        raise _bad_request(f"namespace prefix {prefix!r} is not bound in the query")
    return etree.QName(namespaces[prefix], local).text


def _split_steps(text: str) -> list[str]:
    """Split on ``/`` outside quoted attribute values."""
    parts: list[str] = []
    current: list[str] = []
    quote: str | None = None
    for char in text:
        if quote is not None:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "/":
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quote is not None:
        raise _bad_request("unterminated quoted value in node selector")
    parts.append("".join(current))
    return parts


def parse_node_selector(
    text: str, namespaces: Mapping[str, str], default_namespace: str
) -> NodeSelector:
    """Parse an already percent-decoded node selector (RFC 4825 §6.3)."""
    parts = _split_steps(text)
    if not parts or any(part == "" for part in parts):
        raise _bad_request("empty step in node selector")
    attribute: str | None = None
    namespace_selector = False
    last = parts[-1]
    if last == "namespace::*":
        namespace_selector = True
        parts = parts[:-1]
    elif last.startswith("@"):
        match = _ATTRIBUTE.match(last)
        if match is None:
            raise _bad_request(f"bad attribute selector {last!r}")
        attribute = _resolve(match["attr"], namespaces, None)
        parts = parts[:-1]
    if not parts:
        raise _bad_request("node selector needs at least one element step")
    steps: list[Step] = []
    for part in parts:
        match = _STEP.match(part)
        if match is None:
            raise _bad_request(f"unsupported node selector step {part!r}")
        name = match["name"]
        position = int(match["position"]) if match["position"] is not None else None
        test = None
        if match["attr"] is not None:
            test = AttributeTest(
                _resolve(match["attr"], namespaces, None), _decode_att_value(match["value"])
            )
        clark = None if name == "*" else _resolve(name, namespaces, default_namespace)
        steps.append(Step(clark, position, test, text=part))
    return NodeSelector(tuple(steps), attribute, namespace_selector, text=text)


def parse_xcap_uri(
    path: str,
    query: str = "",
    *,
    root: str = "",
    default_namespace_for: Callable[[str], str | None] = usages.default_namespace,
) -> XCAPURI:
    """Parse a request path (still percent-encoded) below the XCAP root ``root``.

    Segments are split before decoding, so an XUI such as ``sip:a%2Fb@x`` stays one
    segment.  Unknown AUIDs and paths outside the root are 404; malformed selectors 400.
    """
    root = root.rstrip("/")
    if not path.startswith(root + "/"):
        raise XCAPError(404, None, "not below the XCAP root")
    segments = path[len(root) + 1 :].split("/")
    node_text: str | None = None
    if NODE_SELECTOR_SEPARATOR in segments:
        split = segments.index(NODE_SELECTOR_SEPARATOR)
        node_text = "/".join(segments[split + 1 :])
        segments = segments[:split]
    decoded = [_percent_decode(segment) for segment in segments]
    if len(decoded) < 3:
        raise XCAPError(404, None, "URI does not name a document")
    auid, context, *rest = decoded
    default = default_namespace_for(auid)
    if default is None:
        raise XCAPError(404, None, f"unknown application usage {auid!r}")
    xui: str | None
    if context == "global":
        xui = None
    elif context == "users" and len(rest) >= 2:
        xui, *rest = rest
    else:
        raise XCAPError(404, None, "context must be global or users/<xui>")
    if not xui and xui is not None:
        raise XCAPError(404, None, "empty XUI")
    if xui is not None:
        # One tree per user: SIP:bob@RELAY.TEST is sip:bob@relay.test's tree, so that
        # no spelling of an XUI makes a second copy of a document (RFC 3261 §19.1.4).
        xui = normalize_identity(xui)
    if not rest or any(part in ("", ".", "..") for part in rest):
        raise XCAPError(404, None, "bad document path")
    document = DocumentSelector(auid, xui, "/".join(rest))
    namespaces = parse_namespace_bindings(query) if query else {}
    node = None
    if node_text is not None:
        node = parse_node_selector(_percent_decode(node_text), namespaces, default)
    return XCAPURI(document, node, namespaces)


# -- evaluation --------------------------------------------------------------------


def _apply_step(parent: etree._Element, step: Step) -> list[etree._Element]:
    if step.position == 0:
        return []
    candidates = [child for child in parent.iterchildren() if step.name_matches(child)]
    if step.position is not None:
        candidates = candidates[step.position - 1 : step.position]
    if step.attribute is not None:
        test = step.attribute
        candidates = [child for child in candidates if child.get(test.name) == test.value]
    return candidates


def _evaluate(root: etree._Element, steps: tuple[Step, ...]) -> list[etree._Element]:
    if not steps:
        return []
    # The document node has exactly one element child: the root (position 1).
    current = _apply_step_to_root(root, steps[0])
    for step in steps[1:]:
        current = [match for parent in current for match in _apply_step(parent, step)]
    return current


def _apply_step_to_root(root: etree._Element, step: Step) -> list[etree._Element]:
    if not step.name_matches(root) or step.position not in (None, 1):
        return []
    if step.attribute is not None and root.get(step.attribute.name) != step.attribute.value:
        return []
    return [root]


def _select_one(root: etree._Element, selector: NodeSelector) -> etree._Element:
    matches = _evaluate(root, selector.steps)
    if not matches:
        raise XCAPError(404, None, "node selector selects nothing")
    if len(matches) > 1:
        raise XCAPError(404, None, "node selector selects more than one element")
    return matches[0]


def select_element(root: etree._Element, selector: NodeSelector) -> etree._Element:
    """The one element the selector's element part selects; 404 for none or several."""
    return _select_one(root, selector)


def select_attribute(root: etree._Element, selector: NodeSelector) -> str:
    """The value of the selected attribute; 404 when the element or attribute is absent."""
    if selector.attribute is None:
        raise ValueError("not an attribute selector")
    value = _select_one(root, selector).get(selector.attribute)
    if value is None:
        raise XCAPError(404, None, "attribute does not exist")
    return value


def select_namespaces(root: etree._Element, selector: NodeSelector) -> dict[str | None, str]:
    """In-scope namespace bindings of the selected element (RFC 4825 §7.10)."""
    return dict(_select_one(root, selector).nsmap)


def select(root: etree._Element, selector: NodeSelector) -> etree._Element | str:
    """GET semantics: the selected element, or the attribute value for ``…/@name``.

    Namespace selectors go through :func:`select_namespaces`.
    """
    if selector.attribute is not None:
        return select_attribute(root, selector)
    return select_element(root, selector)


def render_namespace_bindings(element: etree._Element) -> bytes:
    """``application/xcap-ns+xml`` body: the element's name with every in-scope
    namespace declared and nothing else (RFC 4825 §8.3.4)."""
    empty = etree.Element(element.tag, nsmap=element.nsmap)  # type: ignore[arg-type]
    return etree.tostring(empty, encoding="UTF-8")


# -- modification ------------------------------------------------------------------


def _check_can_select(selector: NodeSelector) -> None:
    """A step at position 0 selects nothing, whatever is written (§8.2.5)."""
    if any(step.position == 0 for step in selector.steps):
        raise XCAPError(409, CANNOT_INSERT, "position 0 selects nothing")


def _no_parent(root: etree._Element, steps: tuple[Step, ...]) -> XCAPError:
    """409 no-parent naming the deepest prefix of ``steps`` that selects one element."""
    ancestor = ""
    for length in range(len(steps), 0, -1):
        if len(_evaluate(root, steps[:length])) == 1:
            ancestor = "/".join(step.text for step in steps[:length])
            break
    return XCAPError(409, NO_PARENT, "parent element does not exist", ancestor=ancestor)


def _whitespace(text: str | None) -> str | None:
    return text if text is not None and text.strip() == "" else None


def _insertion_index(parent: etree._Element, step: Step) -> int:
    """Where a new element goes so that ``step`` selects it (RFC 4825 §8.2.3).

    With a position N it is placed before the current Nth sibling passing the name
    test, or after the (N-1)th when there are exactly N-1; fewer is 409
    ``cannot-insert``.  Without a position it goes after the last sibling passing the
    name test, or after the last element child when there is none.
    """
    children = list(parent)
    siblings = [child for child in children if step.name_matches(child)]
    elements = [child for child in children if isinstance(child.tag, str)]
    if step.position is not None:
        if len(siblings) >= step.position:
            return children.index(siblings[step.position - 1])
        if len(siblings) < step.position - 1:
            raise XCAPError(
                409, CANNOT_INSERT, f"fewer than {step.position - 1} siblings to follow"
            )
    if siblings:
        return children.index(siblings[-1]) + 1
    if elements:
        return children.index(elements[-1]) + 1
    return len(children)


def put_element(root: etree._Element, selector: NodeSelector, element: etree._Element) -> PutResult:
    """Replace the selected element with ``element``, or insert it (RFC 4825 §8.2.3).

    ``element`` should come from :func:`relayd.xcap.xml.parse_fragment`.  Returns the
    root (a new one when the root element itself was replaced) and whether the PUT
    created a new element (201) rather than replacing one (200).
    """
    if selector.namespace_selector:
        raise XCAPError(405, None, "namespace bindings are read-only")
    if selector.attribute is not None:
        raise XCAPError(409, CANNOT_INSERT, "attribute selector used for an element")
    _check_can_select(selector)
    matches = _evaluate(root, selector.steps)
    if len(matches) > 1:
        raise XCAPError(404, None, "node selector selects more than one element")
    if matches:
        return _replace(root, selector, matches[0], element)
    if len(selector.steps) == 1:
        raise XCAPError(409, CANNOT_INSERT, "the document already has a root element")
    parents = _evaluate(root, selector.steps[:-1])
    if len(parents) != 1:
        raise _no_parent(root, selector.steps[:-1])
    parent = parents[0]
    index = _insertion_index(parent, selector.steps[-1])
    children = list(parent)
    neighbour_text = children[index - 1].tail if index > 0 else parent.text
    parent.insert(index, element)
    element.tail = _whitespace(neighbour_text)
    if _evaluate(root, selector.steps) != [element]:
        parent.remove(element)
        raise XCAPError(409, CANNOT_INSERT, "the URI would not select the new element")
    return PutResult(root, True)


def _replace(
    root: etree._Element,
    selector: NodeSelector,
    old: etree._Element,
    new: etree._Element,
) -> PutResult:
    if old is root:
        new_root = copy.deepcopy(new)
        if _evaluate(new_root, selector.steps) != [new_root]:
            raise XCAPError(409, CANNOT_INSERT, "the URI would not select the new element")
        return PutResult(new_root, False)
    parent = old.getparent()
    assert parent is not None  # only the root has no parent
    new.tail = old.tail
    parent.replace(old, new)
    if _evaluate(root, selector.steps) != [new]:
        parent.replace(new, old)
        raise XCAPError(409, CANNOT_INSERT, "the URI would not select the new element")
    return PutResult(root, False)


def delete_element(root: etree._Element, selector: NodeSelector) -> None:
    """Remove the selected element (RFC 4825 §8.4); the root cannot be removed this way.

    A positional selector that would then select the next sibling is refused with 409
    ``cannot-delete`` (§8.2.5), as the RFC requires.
    """
    element = _select_one(root, selector)
    parent = element.getparent()
    if parent is None:
        raise XCAPError(409, CANNOT_DELETE, "delete the document, not its root element")
    index = parent.index(element)
    tail = element.tail
    parent.remove(element)
    if _evaluate(root, selector.steps):
        element.tail = tail
        parent.insert(index, element)
        raise XCAPError(409, CANNOT_DELETE, "the URI would still select an element")


def put_attribute(root: etree._Element, selector: NodeSelector, value: str) -> bool:
    """Set the selected attribute (RFC 4825 §8.2.4); True when it was created."""
    name = selector.attribute
    if name is None:
        raise XCAPError(409, CANNOT_INSERT, "not an attribute selector")
    _check_can_select(selector)
    matches = _evaluate(root, selector.steps)
    if not matches:
        raise _no_parent(root, selector.steps)
    if len(matches) > 1:
        raise XCAPError(404, None, "node selector selects more than one element")
    element = matches[0]
    previous = element.get(name)
    try:
        element.set(name, value)
    except ValueError as exc:  # e.g. control characters XML cannot carry
        raise XCAPError(409, NOT_XML_ATT_VALUE, str(exc)[:200]) from None
    if _evaluate(root, selector.steps) != [element]:
        if previous is None:
            del element.attrib[name]
        else:
            element.set(name, previous)
        raise XCAPError(409, CANNOT_INSERT, "the URI would not select the new value")
    return previous is None


def delete_attribute(root: etree._Element, selector: NodeSelector) -> None:
    """Remove the selected attribute (RFC 4825 §8.4); 404 when it does not exist."""
    name = selector.attribute
    if name is None:
        raise ValueError("not an attribute selector")
    element = _select_one(root, selector)
    previous = element.get(name)
    if previous is None:
        raise XCAPError(404, None, "attribute does not exist")
    del element.attrib[name]
    if any(match.get(name) is not None for match in _evaluate(root, selector.steps)):
        element.set(name, previous)
        raise XCAPError(409, CANNOT_DELETE, "the URI would still select an attribute")
