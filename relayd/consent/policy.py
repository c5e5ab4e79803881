"""Common Policy evaluation for consent-rules documents (RFC 4745 §§7-10).

A rule applies when *every* condition in its ``<conditions>`` matches (an absent or
empty ``<conditions>`` always matches, §10.1).  Conditions understood here:

* ``cp:identity`` (§7.1): true when any child matches the *authenticated* sender:
  ``<one id>`` exact identity, ``<many>`` any identity, ``<many domain>`` any
  identity in that domain; ``<except id|domain>`` inside ``<many>`` removes
  identities.  No authenticated sender, no match.
* ``cp:validity`` (§7.2): true when ``from <= now < until`` for one of its
  intervals; a timestamp without a timezone never matches.
* ``cp:sphere`` (§7.3): never true; the relay knows no presentity sphere.
* ``target`` (RFC 5361 §3.1.3): the list URI the request goes to matches its
  ``cp:one``/``cp:many`` children, as ``cp:identity`` matches the sender.
* ``recipient`` (RFC 5361 §3.1.1): likewise the document's recipient (its owner).
* ``cr:target`` (relayd extension, the older spelling of ``target``): the request
  goes to that list URI.
* ``cr:methods`` (relayd extension; RFC 5361 has no method condition): the request
  method is listed (case-sensitive, as SIP method names are).

Any other condition element is not understood and makes its rule not apply: a
document can only ever grant what the relay fully understands (§10.1's safe default).

Permissions combine positively (§10.2): boolean actions/transformations are OR-ed,
integers take the maximum, ``trans-handling`` (RFC 5361 §3.2, or ``cr:trans-handling``:
one action, two spellings) takes the largest of ``deny < grant``.  Without a matching
rule nothing is permitted; revocation is deleting the granting rule, never adding a
deny rule.

A document stored at a Permission URI is read within the :class:`PermissionScope`
that URI was minted for (seed §4, §8): a permission names sender, recipient and
methods, and the URI already fixes the recipient, the list and the methods the
CONSENT asked for. Such a document speaks only for that list, those methods and that
recipient, and a rule of it that matches and says nothing about ``trans-handling``
grants: the seed's plain form, a common-policy rule with the sender's identity (and a
validity), is a complete permission there.

Identities are compared after lower-casing the URI scheme and the host part, so that
``SIP:alice@Example.TEST`` is ``sip:alice@example.test``; the user part stays
case-sensitive (RFC 3261 §19.1.4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from lxml import etree
from twisted.internet.interfaces import IReactorTime

from relayd.bounded import remember
from relayd.consent.documents import DocumentRejected
from relayd.consent.vocabulary import (
    COMMON_POLICY_NAMESPACE,
    CONSENT_FORMAT_NAMESPACE,
    CONSENT_POLICY_NAMESPACE,
)
from relayd.sipuri import SIPURI, SIPURIError

_CP = f"{{{COMMON_POLICY_NAMESPACE}}}"
_CR = f"{{{CONSENT_POLICY_NAMESPACE}}}"
_CF = f"{{{CONSENT_FORMAT_NAMESPACE}}}"

TRANS_HANDLING = _CR + "trans-handling"
"""The key :class:`Permissions` combines both spellings of trans-handling under."""
TRANS_HANDLING_TAGS = frozenset({TRANS_HANDLING, _CF + "trans-handling"})
TRANS_HANDLING_ORDER: Mapping[str, int] = {"deny": 0, "grant": 1}
_SCOPED_CONDITIONS = frozenset({_CR + "target", _CF + "target", _CF + "recipient", _CR + "methods"})

PermissionValue = bool | int | str


@dataclass(frozen=True)
class RequestContext:
    """What the relay knows about a request when it asks for permission.

    ``sender`` is the *authenticated* identity (None when unauthenticated);
    ``sender_domain`` defaults to the host part of ``sender``.
    """

    sender: str | None
    target_list: str | None
    method: str | None
    now: datetime
    sender_domain: str | None = None
    recipient: str | None = None

    def domain(self) -> str | None:
        if self.sender_domain is not None:
            return self.sender_domain.lower()
        return _domain_of(self.sender) if self.sender is not None else None


@dataclass(frozen=True)
class Permissions:
    """Combined result of all matching rules (RFC 4745 §10.2).

    ``values`` maps each action/transformation (Clark name) to its combined value;
    ``matched_rules`` lists the ids of the rules that applied, in document order.
    """

    values: Mapping[str, PermissionValue] = field(default_factory=dict)
    matched_rules: tuple[str, ...] = ()

    @property
    def trans_handling(self) -> str | None:
        value = self.values.get(TRANS_HANDLING)
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class PermissionScope:
    """What a Permission URI was minted for (seed §4, §8): one recipient, one list,
    the methods its CONSENT asked for. See the module doc."""

    recipient: str
    list_uri: str
    methods: tuple[str, ...]

    def covers(self, context: RequestContext) -> bool:
        """Whether ``context`` is a request this scope speaks for."""
        if context.target_list is None or context.method not in self.methods:
            return False
        if normalize_identity(context.target_list) != normalize_identity(self.list_uri):
            return False
        return context.recipient is None or normalize_identity(
            context.recipient
        ) == normalize_identity(self.recipient)


def now_from_clock(clock: IReactorTime) -> datetime:
    """``now`` for :class:`RequestContext` from an injectable Twisted clock."""
    return datetime.fromtimestamp(clock.seconds(), UTC)


def normalize_identity(uri: str) -> str:
    """``scheme:user@host[:port]`` of a URI, scheme and host lower-cased (module doc).

    The canonical form identities, recipients and XUIs are compared by: parameters
    and headers after the host are dropped (they say how to reach a party, not who
    it is); a port stays, since it names another server."""
    scheme, colon, rest = uri.strip().partition(":")
    if not colon:
        return uri.strip()
    user, at, host = rest.rpartition("@")
    for separator in (";", "?"):
        host = host.partition(separator)[0]
    return f"{scheme.lower()}:{user}{at}{host.lower()}"


_IDENTITY_KEYS: dict[str, str] = {}
_IDENTITY_KEYS_SIZE = 4096


def identity_key(uri: str) -> str:
    """The key recipients and senders are compared by (scheme/host lower-cased).

    Asked for every member of a list on every request: remembered (bounded)."""
    key = _IDENTITY_KEYS.get(uri)
    if key is None:
        key = remember(_IDENTITY_KEYS, _IDENTITY_KEYS_SIZE, uri, normalize_identity(uri))
    return key


def _domain_of(uri: str) -> str | None:
    _, _, rest = uri.partition(":")
    _, at, host = rest.rpartition("@")
    if not at:
        return None
    for separator in (";", "?", ">"):
        host = host.split(separator, 1)[0]
    if host.startswith("["):  # IPv6 reference
        return host.lower()
    return host.rsplit(":", 1)[0].lower() or None


def _identity_matches(identity: etree._Element, context: RequestContext) -> bool:
    if context.sender is None:
        return False
    return _one_of(identity, context.sender, context.domain())


def _uri_matches(identity: etree._Element, uri: str | None) -> bool:
    """An RFC 5361 ``recipient``/``target``: ``cp:one``/``cp:many`` against ``uri``."""
    return uri is not None and _one_of(identity, uri, _domain_of(uri))


def _one_of(identity: etree._Element, uri: str, domain: str | None) -> bool:
    """Whether a ``cp:identity``-typed element's children admit ``uri``."""
    wanted = normalize_identity(uri)
    for child in identity:
        if child.tag == _CP + "one" and normalize_identity(child.get("id", "")) == wanted:
            return True
        if child.tag == _CP + "many" and _many_matches(child, wanted, domain):
            return True
        # Anything else (comments, extensions) does not match.
    return False


def _many_matches(many: etree._Element, sender: str, domain: str | None) -> bool:
    wanted = many.get("domain")
    if wanted is not None and (domain is None or wanted.lower() != domain):
        return False
    for exception in many.iterchildren(_CP + "except"):
        excluded_id = exception.get("id")
        excluded_domain = exception.get("domain")
        if excluded_id is not None and normalize_identity(excluded_id) == sender:
            return False
        if excluded_domain is not None and excluded_domain.lower() == domain:
            return False
    return True


def _parse_datetime(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return value if value.tzinfo is not None else None


def _validity_matches(validity: etree._Element, now: datetime) -> bool:
    start: datetime | None = None
    for child in validity:
        if child.tag == _CP + "from":
            start = _parse_datetime(child.text)
        elif child.tag == _CP + "until":
            end = _parse_datetime(child.text)
            if start is not None and end is not None and start <= now < end:
                return True
            start = None
    return False


def validity_boundaries(ruleset: etree._Element) -> list[float]:
    """Every instant (POSIX seconds) at which a ``cp:validity`` interval of ``ruleset``
    opens or closes: between two of them every decision on the document stays the same,
    which is what lets the relay cache decisions exactly."""
    out: list[float] = []
    for tag in ("from", "until"):
        for element in ruleset.iter(_CP + tag):
            when = _parse_datetime(element.text)
            if when is not None:
                out.append(when.timestamp())
    return sorted(out)


def _methods_matches(methods: etree._Element, method: str | None) -> bool:
    if method is None:
        return False
    listed = {(m.text or "").strip() for m in methods.iterchildren(_CR + "method")}
    return method in listed


def _condition_matches(condition: etree._Element, context: RequestContext) -> bool:
    tag = condition.tag
    if tag == _CP + "identity":
        return _identity_matches(condition, context)
    if tag == _CP + "validity":
        return _validity_matches(condition, context.now)
    if tag == _CF + "target":
        return _uri_matches(condition, context.target_list)
    if tag == _CF + "recipient":
        return _uri_matches(condition, context.recipient)
    if tag == _CR + "target":
        uri = condition.get("uri")
        return (
            uri is not None
            and context.target_list is not None
            and normalize_identity(uri) == normalize_identity(context.target_list)
        )
    if tag == _CR + "methods":
        return _methods_matches(condition, context.method)
    # cp:sphere and every unknown condition: never true.
    return False


def rule_matches(rule: etree._Element, context: RequestContext) -> bool:
    """Whether all conditions of ``rule`` hold (RFC 4745 §10.1)."""
    conditions = rule.find(_CP + "conditions")
    if conditions is None:
        return True
    return all(
        _condition_matches(condition, context)
        for condition in conditions
        if isinstance(condition.tag, str)
    )


def _value_of(element: etree._Element) -> PermissionValue | None:
    text = (element.text or "").strip()
    if element.tag in TRANS_HANDLING_TAGS:
        return text if text in TRANS_HANDLING_ORDER else None
    if text in ("", "true"):
        return True  # an empty element is a boolean permission that is present
    if text == "false":
        return False
    try:
        return int(text)
    except ValueError:
        return None  # no combining rule known for free text: ignore it


def _combine(name: str, old: PermissionValue | None, new: PermissionValue) -> PermissionValue:
    if old is None:
        return new
    if name == TRANS_HANDLING and isinstance(old, str) and isinstance(new, str):
        return max(old, new, key=TRANS_HANDLING_ORDER.__getitem__)
    if isinstance(old, bool) and isinstance(new, bool):
        return old or new
    if isinstance(old, int) and isinstance(new, int):
        return max(old, new)
    return old  # mismatched types: keep the first value seen


def evaluate(
    ruleset: etree._Element, context: RequestContext, scope: PermissionScope | None = None
) -> Permissions:
    """Combine the permissions of every rule that matches ``context`` (RFC 4745 §10),
    within ``scope`` for a document stored at a Permission URI (module doc)."""
    if ruleset.tag != _CP + "ruleset" or (scope is not None and not scope.covers(context)):
        return Permissions()
    values: dict[str, PermissionValue] = {}
    matched: list[str] = []
    for rule in ruleset.iterchildren(_CP + "rule"):
        if not rule_matches(rule, context):
            continue
        matched.append(rule.get("id", ""))
        handled = False
        for container in ("actions", "transformations"):
            section = rule.find(_CP + container)
            if section is None:
                continue
            for permission in section:
                if not isinstance(permission.tag, str):
                    continue
                value = _value_of(permission)
                if value is None:
                    continue
                name = TRANS_HANDLING if permission.tag in TRANS_HANDLING_TAGS else permission.tag
                handled = handled or name == TRANS_HANDLING
                values[name] = _combine(name, values.get(name), value)
        if scope is not None and not handled:
            values[TRANS_HANDLING] = _combine(TRANS_HANDLING, values.get(TRANS_HANDLING), "grant")
    return Permissions(values, tuple(matched))


def is_permitted(
    ruleset: etree._Element,
    sender: str | None,
    target_list: str | None,
    method: str | None,
    now: datetime,
    *,
    recipient: str | None = None,
    scope: PermissionScope | None = None,
) -> bool:
    """May ``sender`` reach ``recipient`` (the document owner) through ``target_list``
    with ``method``?

    True when the combined trans-handling is ``grant``.  This is the one call the SIP
    consent check needs; ``scope`` is that of a Permission-URI document.
    """
    context = RequestContext(sender, target_list, method, now, recipient=recipient)
    return evaluate(ruleset, context, scope).trans_handling == "grant"


def check_scope(root: etree._Element, scope: PermissionScope) -> None:
    """Refuse a Permission-URI document with a rule that could never apply there.

    Everything such a document says is read within ``scope`` (module doc), so the
    plain form needs no target, recipient or methods. A rule whose ``target``,
    ``recipient`` or ``cr:methods`` names another list, another recipient or only
    methods that were not asked for would silently grant nothing: its writer meant
    something this URI cannot give: a ``constraint-failure``.
    """
    contexts = [
        RequestContext(None, scope.list_uri, method, _EPOCH, recipient=scope.recipient)
        for method in scope.methods
    ]
    for rule in root.iterchildren(_CP + "rule"):
        conditions = rule.find(_CP + "conditions")
        for condition in () if conditions is None else conditions:
            if condition.tag not in _SCOPED_CONDITIONS:
                continue
            if not any(_condition_matches(condition, context) for context in contexts):
                what = etree.QName(condition).localname
                raise DocumentRejected(
                    "constraint-failure",
                    f"rule {rule.get('id')!r}: its {what} is not what this Permission URI"
                    f" was minted for ({scope.list_uri}; {' '.join(scope.methods)})",
                )


_EPOCH = datetime.fromtimestamp(0, UTC)


def _require_sip_uris(root: etree._Element, tag: str, attribute: str, what: str) -> None:
    """XML Schema's anyURI accepts "sip:x y"; a rule that can never match anything
    must be refused, not stored (a ``constraint-failure``)."""
    for element in root.iter(tag):
        value = element.get(attribute)
        if value is None:
            continue
        try:
            SIPURI.parse(value)
        except SIPURIError as e:
            raise DocumentRejected(
                "constraint-failure", f"{what} {value!r} is not a SIP URI: {e}"
            ) from None


def check_rule_uris(root: etree._Element) -> None:
    """Refuse a ruleset whose ``cr:target`` or ``cp:one`` identity is no SIP URI."""
    _require_sip_uris(root, _CR + "target", "uri", "target")
    _require_sip_uris(root, _CP + "one", "id", "identity")
