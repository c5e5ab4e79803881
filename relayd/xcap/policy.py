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
* ``cr:target`` (relayd extension): the request goes to that list URI.
* ``cr:methods`` (relayd extension): the request method is listed (case-sensitive,
  as SIP method names are).

Any other condition element is not understood and makes its rule not apply: a
document can only ever grant what the relay fully understands (§10.1's safe default).

Permissions combine positively (§10.2): boolean actions/transformations are OR-ed,
integers take the maximum, ``cr:trans-handling`` takes the largest of
``deny < grant``.  Without a matching rule nothing is permitted; revocation is
deleting the granting rule, never adding a deny rule.

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

from relayd.xcap.usages import COMMON_POLICY_NAMESPACE, CONSENT_POLICY_NAMESPACE

_CP = f"{{{COMMON_POLICY_NAMESPACE}}}"
_CR = f"{{{CONSENT_POLICY_NAMESPACE}}}"

TRANS_HANDLING = _CR + "trans-handling"
TRANS_HANDLING_ORDER: Mapping[str, int] = {"deny": 0, "grant": 1}

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
    sender = normalize_identity(context.sender)
    domain = context.domain()
    for child in identity:
        if child.tag == _CP + "one" and normalize_identity(child.get("id", "")) == sender:
            return True
        if child.tag == _CP + "many" and _many_matches(child, sender, domain):
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
    if element.tag == TRANS_HANDLING:
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


def evaluate(ruleset: etree._Element, context: RequestContext) -> Permissions:
    """Combine the permissions of every rule that matches ``context`` (RFC 4745 §10)."""
    if ruleset.tag != _CP + "ruleset":
        return Permissions()
    values: dict[str, PermissionValue] = {}
    matched: list[str] = []
    for rule in ruleset.iterchildren(_CP + "rule"):
        if not rule_matches(rule, context):
            continue
        matched.append(rule.get("id", ""))
        for container in ("actions", "transformations"):
            section = rule.find(_CP + container)
            if section is None:
                continue
            for permission in section:
                if not isinstance(permission.tag, str):
                    continue
                value = _value_of(permission)
                if value is not None:
                    values[permission.tag] = _combine(
                        permission.tag, values.get(permission.tag), value
                    )
    return Permissions(values, tuple(matched))


def is_permitted(
    ruleset: etree._Element,
    sender: str | None,
    target_list: str | None,
    method: str | None,
    now: datetime,
) -> bool:
    """May ``sender`` reach the document owner through ``target_list`` with ``method``?

    True when the combined ``cr:trans-handling`` is ``grant``.  This is the one call
    the SIP consent check needs.
    """
    context = RequestContext(sender, target_list, method, now)
    return evaluate(ruleset, context).trans_handling == "grant"
