"""XCAP application usages served by relayd (RFC 4825 §5).

An application usage ties an AUID to a MIME type, a default namespace for node
selectors (§5.2), an XML Schema (§5.3) and the constraints the schema cannot express
(§5.4): uniqueness (409 ``uniqueness-failure``) and other data constraints (409
``constraint-failure``).

``consent-rules``
    Permission documents of the consent relay: Common Policy (RFC 4745,
    ``urn:ietf:params:xml:ns:common-policy``, ``application/auth-policy+xml``, as
    RFC 5025 pres-rules) with RFC 5361's elements
    (``urn:ietf:params:xml:ns:consent-rules``: conditions ``recipient`` and ``target``,
    action ``trans-handling``) and relayd's namespace
    ``urn:relayd:params:xml:ns:consent-policy`` (prefix ``cr`` by convention) for
    what the RFCs do not cover:

    * condition ``<cr:methods><cr:method>MESSAGE</cr:method></cr:methods>``: the
      request method is one of those listed;
    * ``<cr:target uri="…"/>`` and ``<cr:trans-handling>``: relayd's spellings from
      before RFC 5361 support, read as the RFC's ``target`` and ``trans-handling``.

    What a document at a Permission URI may say is :func:`relayd.consent.policy.check_scope`.

    Rule ``id`` values are unique within the ruleset.
``resource-lists``
    RFC 4826 lists (``urn:ietf:params:xml:ns:resource-lists``,
    ``application/resource-lists+xml``).  The constraints of RFC 4826 §3.4.5:
    uniqueness of ``list`` names among siblings and, within one list, of the ``entry``
    URIs, ``entry-ref`` refs and ``external`` anchors (compared as exact strings);
    an ``entry-ref`` is a relative HTTP URI below the XCAP root, an ``external``
    anchor an absolute HTTP(S) URI.  Nothing more: entries may use any URI scheme
    and lists need no name.  Which lists the relay routes is the SIP side's business
    (``relayd.consent.lists``); it never makes a document unstorable.
``xcap-caps``
    RFC 4825 §12 server capabilities, generated from this registry, read-only.
``org.openmobilealliance.xcap-directory``
    OMA XDM's listing of a user's documents (``users/<xui>/directory.xml``), generated
    from the store, read-only (:mod:`relayd.xcap.directory`).

Schemas live in ``relayd/xcap/schemas`` (see the README there) and are compiled once
per process, when the XCAP service starts (:func:`load_schemas`): a reinstall that
replaces the package's files under a running daemon must not break validation, and an
installation without them must not start.  lxml validators are not shared across
threads: validate on one thread (the reactor's).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from relayd.consent.documents import DocumentRejected, make_parser
from relayd.consent.policy import check_rule_uris
from relayd.consent.vocabulary import (
    COMMON_POLICY_NAMESPACE,
    CONSENT_FORMAT_NAMESPACE,
    CONSENT_POLICY_NAMESPACE,
    CONSENT_RULES_AUID,
    CONSENT_RULES_MIME_TYPE,
    RESOURCE_LISTS_AUID,
    RESOURCE_LISTS_MIME_TYPE,
    RESOURCE_LISTS_NAMESPACE,
)
from relayd.xcap.directory import (
    ROOT_ELEMENT as XCAP_DIRECTORY_ROOT,
)
from relayd.xcap.directory import (
    XCAP_DIRECTORY_AUID,
    XCAP_DIRECTORY_MIME_TYPE,
    XCAP_DIRECTORY_NAMESPACE,
)
from relayd.xcap.errors import (
    CONSTRAINT_FAILURE,
    SCHEMA_VALIDATION_ERROR,
    UNIQUENESS_FAILURE,
    Exists,
    XCAPError,
    rejected,
)

SCHEMA_DIR = Path(__file__).parent / "schemas"

XCAP_CAPS_NAMESPACE = "urn:ietf:params:xml:ns:xcap-caps"

XCAP_CAPS_AUID = "xcap-caps"

# MIME types of node resources (RFC 4825 §§15.2.1-15.2.3) and xcap-caps (§12.3).
XCAP_ELEMENT_MIME_TYPE = "application/xcap-el+xml"
XCAP_ATTRIBUTE_MIME_TYPE = "application/xcap-att+xml"
XCAP_NAMESPACE_MIME_TYPE = "application/xcap-ns+xml"

Check = Callable[[etree._Element], None]


@functools.cache
def load_schema(file_name: str) -> etree.XMLSchema:
    """Compile a shipped schema; imports resolve only to files next to it."""
    document = etree.parse(str(SCHEMA_DIR / file_name), make_parser())
    return etree.XMLSchema(document)


def load_schemas(usages: Iterable[ApplicationUsage]) -> None:
    """Compile every schema ``usages`` validate with, now (see the module docstring).

    Raises OSError or :class:`lxml.etree.LxmlError` for a missing or broken file.
    """
    for usage in usages:
        if usage.schema_file is not None:
            load_schema(usage.schema_file)


@dataclass(frozen=True)
class ApplicationUsage:
    """One AUID's rules (RFC 4825 §5)."""

    auid: str
    mime_type: str
    default_namespace: str
    root_element: str
    schema_file: str | None = None
    read_only: bool = False
    uniqueness_check: Check | None = None
    constraint_check: Check | None = None

    def validate(self, root: etree._Element) -> None:
        """Check a complete candidate document; raise the 409 that describes the fault.

        Uniqueness runs before schema validation on purpose: RFC 4745 types rule ids
        as ``xs:ID``, so the schema would otherwise report a duplicate id as a
        ``schema-validation-error`` instead of the ``uniqueness-failure`` clients can
        act on.
        """
        if root.tag != self.root_element:
            raise XCAPError(
                409, SCHEMA_VALIDATION_ERROR, f"root element must be {self.root_element}"
            )
        if self.uniqueness_check is not None:
            self.uniqueness_check(root)
        if self.schema_file is not None:
            schema = load_schema(self.schema_file)
            try:
                schema.assertValid(root.getroottree())
            except etree.DocumentInvalid as exc:
                raise XCAPError(409, SCHEMA_VALIDATION_ERROR, str(exc)[:200]) from None
        if self.constraint_check is not None:
            try:
                self.constraint_check(root)
            except DocumentRejected as e:
                raise rejected(e) from None


def _clark(namespace: str, local: str) -> str:
    return etree.QName(namespace, local).text


def _unique(elements: Iterable[etree._Element], attribute: str, field: str) -> list[Exists]:
    """Report each repeated value of ``attribute`` once, with a free alternative for a
    name or an id (a URI with a suffix would name some other party: none offered)."""
    seen: set[str] = set()
    values = [value for el in elements if (value := el.get(attribute)) is not None]
    conflicts: list[Exists] = []
    reported: set[str] = set()
    for value in values:
        if value in seen and value not in reported:
            reported.add(value)
            names = attribute in ("id", "name")
            conflicts.append(Exists(field, (_alternative(value, set(values)),) if names else ()))
        seen.add(value)
    return conflicts


def _alternative(value: str, taken: set[str]) -> str:
    counter = 2
    while f"{value}-{counter}" in taken:
        counter += 1
    return f"{value}-{counter}"


def _raise_conflicts(conflicts: list[Exists]) -> None:
    if conflicts:
        raise XCAPError(409, UNIQUENESS_FAILURE, "value is not unique", exists=conflicts)


_CP_RULE = _clark(COMMON_POLICY_NAMESPACE, "rule")


def _check_rule_ids(root: etree._Element) -> None:
    """RFC 4745 §7: rule ``id`` is unique within a ruleset."""
    _raise_conflicts(_unique(root.iterchildren(_CP_RULE), "id", "ruleset/rule/@id"))


_RL_LIST = _clark(RESOURCE_LISTS_NAMESPACE, "list")
_RL_ENTRY = _clark(RESOURCE_LISTS_NAMESPACE, "entry")
_RL_ENTRY_REF = _clark(RESOURCE_LISTS_NAMESPACE, "entry-ref")
_RL_EXTERNAL = _clark(RESOURCE_LISTS_NAMESPACE, "external")


def _list_path(element: etree._Element) -> str:
    steps: list[str] = []
    node: etree._Element | None = element
    while node is not None:
        local = etree.QName(node).localname
        name = node.get("name") if node.tag == _RL_LIST else None
        steps.append(f'{local}[@name="{name}"]' if name is not None else local)
        node = node.getparent()
    return "/".join(reversed(steps))


def _check_resource_lists(root: etree._Element) -> None:
    """RFC 4826 §3.4.5 uniqueness constraints."""
    conflicts: list[Exists] = []
    containers = [root, *root.iter(_RL_LIST)]
    for container in containers:
        path = _list_path(container)
        conflicts += _unique(container.iterchildren(_RL_LIST), "name", f"{path}/list/@name")
        if container is root:
            continue
        conflicts += _unique(container.iterchildren(_RL_ENTRY), "uri", f"{path}/entry/@uri")
        conflicts += _unique(container.iterchildren(_RL_ENTRY_REF), "ref", f"{path}/entry-ref/@ref")
        conflicts += _unique(
            container.iterchildren(_RL_EXTERNAL), "anchor", f"{path}/external/@anchor"
        )
    _raise_conflicts(conflicts)


# RFC 3986 §2: unreserved, reserved and percent-encoded octets; nothing else.
_URI_TEXT = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+\Z")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


def _entry_ref_problem(ref: str) -> str | None:
    """Why ``ref`` is not a relative HTTP URI resolving below the XCAP root, or None.

    A scheme, an authority (``//host``) or an absolute path would leave the root,
    and so would ``..`` segments climbing above it."""
    if not _URI_TEXT.match(ref):
        return "is not a URI reference (RFC 3986 characters, percent-encoded)"
    if _SCHEME.match(ref):
        return "must be relative to the XCAP root, not an absolute URI"
    if ref.startswith("/"):
        return "must be relative to the XCAP root, not start with /"
    depth = 0
    for segment in re.split(r"[?#]", ref, maxsplit=1)[0].split("/"):
        depth += -1 if segment == ".." else 0 if segment in ("", ".") else 1
        if depth < 0:
            return "must stay below the XCAP root (.. climbs above it)"
    return None


def _external_problem(anchor: str) -> str | None:
    """Why ``anchor`` is not an absolute HTTP(S) URI, or None."""
    if not _URI_TEXT.match(anchor):
        return "is not a URI (RFC 3986 characters, percent-encoded)"
    scheme, colon, rest = anchor.partition(":")
    if not colon or scheme.lower() not in ("http", "https") or not rest.startswith("//"):
        return "must be an absolute http: or https: URI"
    if not rest[2:].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]:
        return "must name a host"
    return None


_RL_REFERENCES = (
    (_RL_ENTRY_REF, "ref", _entry_ref_problem),
    (_RL_EXTERNAL, "anchor", _external_problem),
)


def _check_list_references(root: etree._Element) -> None:
    """RFC 4826 §3.4.5: an ``entry-ref`` ref is a relative HTTP URI whose base is the
    XCAP root; an ``external`` anchor is an absolute HTTP URI.  Violations are 409
    ``constraint-failure`` naming the node."""
    for tag, attribute, problem in _RL_REFERENCES:
        for element in root.iter(tag):
            value = element.get(attribute, "")
            reason = problem(value)
            if reason is not None:
                parent = element.getparent()
                path = _list_path(parent) if parent is not None else ""
                local = etree.QName(element).localname
                raise XCAPError(
                    409,
                    CONSTRAINT_FAILURE,
                    f"{path}/{local}/@{attribute} {value[:200]!r} {reason}",
                )


CONSENT_RULES = ApplicationUsage(
    auid=CONSENT_RULES_AUID,
    mime_type=CONSENT_RULES_MIME_TYPE,
    default_namespace=COMMON_POLICY_NAMESPACE,
    root_element=_clark(COMMON_POLICY_NAMESPACE, "ruleset"),
    schema_file="consent-rules.xsd",
    uniqueness_check=_check_rule_ids,
    constraint_check=check_rule_uris,
)

RESOURCE_LISTS = ApplicationUsage(
    auid=RESOURCE_LISTS_AUID,
    mime_type=RESOURCE_LISTS_MIME_TYPE,
    default_namespace=RESOURCE_LISTS_NAMESPACE,
    root_element=_clark(RESOURCE_LISTS_NAMESPACE, "resource-lists"),
    schema_file="resource-lists.xsd",
    uniqueness_check=_check_resource_lists,
    constraint_check=_check_list_references,
)

XCAP_CAPS = ApplicationUsage(
    auid=XCAP_CAPS_AUID,
    mime_type="application/xcap-caps+xml",
    default_namespace=XCAP_CAPS_NAMESPACE,
    root_element=_clark(XCAP_CAPS_NAMESPACE, "xcap-caps"),
    read_only=True,
)

XCAP_DIRECTORY = ApplicationUsage(
    auid=XCAP_DIRECTORY_AUID,
    mime_type=XCAP_DIRECTORY_MIME_TYPE,
    default_namespace=XCAP_DIRECTORY_NAMESPACE,
    root_element=XCAP_DIRECTORY_ROOT,
    read_only=True,
)

USAGES: Mapping[str, ApplicationUsage] = {
    usage.auid: usage for usage in (CONSENT_RULES, RESOURCE_LISTS, XCAP_CAPS, XCAP_DIRECTORY)
}


def listed_auids(usages: Mapping[str, ApplicationUsage] = USAGES) -> tuple[str, ...]:
    """The usages whose documents a user's xcap-directory lists: those users write."""
    return tuple(sorted(auid for auid, usage in usages.items() if not usage.read_only))


def get_usage(auid: str) -> ApplicationUsage:
    """The usage for ``auid``; an unknown AUID is 404 (RFC 4825 §6.2)."""
    try:
        return USAGES[auid]
    except KeyError:
        raise XCAPError(404, None, f"unknown application usage {auid!r}") from None


def default_namespace(auid: str) -> str | None:
    """Default node-selector namespace of ``auid`` (RFC 4825 §5.2), None if unknown."""
    usage = USAGES.get(auid)
    return usage.default_namespace if usage is not None else None


def xcap_caps_document(usages: Mapping[str, ApplicationUsage] = USAGES) -> bytes:
    """The generated ``xcap-caps/global/index`` document (RFC 4825 §12)."""
    ns = f"{{{XCAP_CAPS_NAMESPACE}}}"
    nsmap = {None: XCAP_CAPS_NAMESPACE}
    root = etree.Element(ns + "xcap-caps", nsmap=nsmap)  # type: ignore[arg-type]
    auids = etree.SubElement(root, ns + "auids")
    for auid in sorted(usages):
        etree.SubElement(auids, ns + "auid").text = auid
    etree.SubElement(root, ns + "extensions")
    namespaces = etree.SubElement(root, ns + "namespaces")
    known = {usage.default_namespace for usage in usages.values()}
    if CONSENT_RULES_AUID in usages:
        known |= {CONSENT_FORMAT_NAMESPACE, CONSENT_POLICY_NAMESPACE}
    for namespace in sorted(known):
        etree.SubElement(namespaces, ns + "namespace").text = namespace
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")
