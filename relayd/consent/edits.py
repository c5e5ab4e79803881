"""Pure edits of the documents people change: a recipient's consent rules (RFC 4745
common-policy, RFC 5361) and an owner's resource lists (RFC 4826).

Functions on lxml trees parsed with relayd's safe parser, without I/O, so they are
unit-tested without a server. relayctl (:mod:`relayd.ctl.xcap`, over XCAP) and the
admin page (:mod:`relayd.web.admin`, in the relay) both edit through them, so a rule or
a list means the same whichever wrote it. An edit that cannot be made raises
:class:`EditError`, its text one line a person reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from lxml import etree

from relayd.consent.lists import (
    Unroutable,
    URIListError,
    list_uri,
    read_lists,
)
from relayd.consent.vocabulary import (
    COMMON_POLICY_NAMESPACE,
    CONSENT_FORMAT_NAMESPACE,
    CONSENT_POLICY_NAMESPACE,
    RESOURCE_LISTS_NAMESPACE,
)

DEFAULT_DOCUMENT = "index"
"""The document relayctl and the admin page keep a user's rules and lists in."""
DEFAULT_METHODS = ("MESSAGE",)
CLOCK_SKEW = timedelta(minutes=5)
"""``--until`` rules start this long before now, so a slow relay clock still sees them."""


class EditError(ValueError):
    """An edit that cannot be made (a list the relay could not route, a member that is
    not there); nothing was changed."""


_CP = f"{{{COMMON_POLICY_NAMESPACE}}}"
_CR = f"{{{CONSENT_POLICY_NAMESPACE}}}"
_CF = f"{{{CONSENT_FORMAT_NAMESPACE}}}"
_RL = f"{{{RESOURCE_LISTS_NAMESPACE}}}"


# -- consent rules (pure) -----------------------------------------------------------


@dataclass(frozen=True)
class RuleView:
    """One rule of a consent-rules document, flattened for display."""

    id: str
    senders: tuple[str, ...]
    lists: tuple[str, ...]
    methods: tuple[str, ...]
    validity: tuple[tuple[str, str], ...]
    action: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "from": list(self.senders),
            "lists": list(self.lists),
            "methods": list(self.methods),
            "validity": [{"from": f, "until": u} for f, u in self.validity],
            "action": self.action,
        }


def new_ruleset() -> etree._Element:
    nsmap: Any = {None: COMMON_POLICY_NAMESPACE, "cr": CONSENT_POLICY_NAMESPACE}
    return etree.Element(_CP + "ruleset", nsmap=nsmap)


def expand_xui(name: str, realm: str) -> str:
    """``carol`` → ``sip:carol@<realm>``, ``carol@x`` → ``sip:carol@x``; URIs unchanged."""
    text = name.strip()
    if not text:
        raise EditError("empty user or URI")
    if ":" in text.split("@", 1)[0]:
        return text
    return f"sip:{text}" if "@" in text else f"sip:{text}@{realm}"


def rule_id_for(sender: str, list_uri: str) -> str:
    """A stable rule id (an xs:ID) for the (sender, list) pair."""
    digest = hashlib.sha256(f"{sender}\n{list_uri}".encode()).hexdigest()[:12]
    user = sender.partition(":")[2].partition("@")[0]
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in user)[:24]
    return f"grant-{stem}-{digest}" if stem else f"grant-{digest}"


def _sender_of(rule: etree._Element) -> tuple[str, ...]:
    senders: list[str] = []
    for identity in rule.iterfind(f"{_CP}conditions/{_CP}identity"):
        for child in identity:
            if child.tag == _CP + "one":
                senders.append(child.get("id", ""))
            elif child.tag == _CP + "many":
                domain = child.get("domain")
                excepted = [e.get("id") or e.get("domain") or "" for e in child]
                text = f"anyone@{domain}" if domain else "anyone"
                if excepted:
                    text += " except " + ",".join(excepted)
                senders.append(text)
    return tuple(senders)


def describe_rule(rule: etree._Element) -> RuleView:
    # relayd's spellings and RFC 5361's (target of cp:one ids, trans-handling).
    lists = tuple(t.get("uri", "") for t in rule.iterfind(f"{_CP}conditions/{_CR}target")) + tuple(
        one.get("id", "") for one in rule.iterfind(f"{_CP}conditions/{_CF}target/{_CP}one")
    )
    methods = tuple(
        (m.text or "").strip() for m in rule.iterfind(f"{_CP}conditions/{_CR}methods/{_CR}method")
    )
    validity: list[tuple[str, str]] = []
    for block in rule.iterfind(f"{_CP}conditions/{_CP}validity"):
        start = ""
        for child in block:
            if child.tag == _CP + "from":
                start = (child.text or "").strip()
            elif child.tag == _CP + "until":
                validity.append((start, (child.text or "").strip()))
    action = rule.findtext(f"{_CP}actions/{_CR}trans-handling") or rule.findtext(
        f"{_CP}actions/{_CF}trans-handling"
    )
    return RuleView(
        rule.get("id", ""),
        _sender_of(rule),
        lists,
        methods,
        tuple(validity),
        (action or "").strip() or "-",
    )


def describe_rules(ruleset: etree._Element) -> list[RuleView]:
    return [describe_rule(rule) for rule in ruleset.iterchildren(_CP + "rule")]


def make_rule(
    rule_id: str,
    sender: str,
    list_uri: str,
    methods: Sequence[str] = DEFAULT_METHODS,
    until: datetime | None = None,
    now: datetime | None = None,
) -> etree._Element:
    """``<rule>``: ``sender`` may reach us via ``list_uri`` with ``methods`` (README)."""
    nsmap: Any = {None: COMMON_POLICY_NAMESPACE, "cr": CONSENT_POLICY_NAMESPACE}
    rule = etree.Element(_CP + "rule", nsmap=nsmap, id=rule_id)
    conditions = etree.SubElement(rule, _CP + "conditions")
    identity = etree.SubElement(conditions, _CP + "identity")
    etree.SubElement(identity, _CP + "one", id=sender)
    if until is not None:
        start = (now or datetime.now(UTC)) - CLOCK_SKEW
        validity = etree.SubElement(conditions, _CP + "validity")
        etree.SubElement(validity, _CP + "from").text = _timestamp(start)
        etree.SubElement(validity, _CP + "until").text = _timestamp(until)
    etree.SubElement(conditions, _CR + "target", uri=list_uri)
    if methods:
        listed = etree.SubElement(conditions, _CR + "methods")
        for method in methods:
            etree.SubElement(listed, _CR + "method").text = method
    actions = etree.SubElement(rule, _CP + "actions")
    etree.SubElement(actions, _CR + "trans-handling").text = "grant"
    return rule


def _timestamp(value: datetime) -> str:
    return value.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def find_rules(ruleset: etree._Element, sender: str, list_uri: str) -> list[etree._Element]:
    """Rules whose only identity is ``<one id=sender>`` and whose targets are ``list_uri``."""
    found = []
    for rule in ruleset.iterchildren(_CP + "rule"):
        view = describe_rule(rule)
        if view.senders == (sender,) and view.lists == (list_uri,):
            found.append(rule)
    return found


def grant_rule(ruleset: etree._Element, rule: etree._Element, sender: str, list_uri: str) -> bool:
    """Put ``rule`` in place of the rules for the same (sender, list), else append it.

    Returns True when an existing rule was replaced.
    """
    existing = find_rules(ruleset, sender, list_uri)
    for old in existing[1:]:
        ruleset.remove(old)
    if existing:
        rule.set("id", existing[0].get("id", rule.get("id", "")))
        ruleset.replace(existing[0], rule)
        return True
    taken = {r.get("id") for r in ruleset.iterchildren(_CP + "rule")}
    base = rule.get("id", "rule")
    candidate, counter = base, 2
    while candidate in taken:
        candidate, counter = f"{base}-{counter}", counter + 1
    rule.set("id", candidate)
    ruleset.append(rule)
    return False


def remove_rules(ruleset: etree._Element, rule_ids: Iterable[str]) -> list[str]:
    """Remove the rules with these ids; return the ids that were not there."""
    wanted = set(rule_ids)
    for rule in list(ruleset.iterchildren(_CP + "rule")):
        if rule.get("id") in wanted:
            ruleset.remove(rule)
            wanted.discard(rule.get("id", ""))
    return sorted(wanted)


# -- resource lists (pure) ----------------------------------------------------------


@dataclass(frozen=True)
class ListView:
    name: str
    display_name: str
    members: tuple[tuple[str, str], ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "members": [{"uri": uri, "display_name": name} for uri, name in self.members],
        }


def new_resource_lists() -> etree._Element:
    nsmap: Any = {None: RESOURCE_LISTS_NAMESPACE}
    return etree.Element(_RL + "resource-lists", nsmap=nsmap)


def describe_list(element: etree._Element) -> ListView:
    members = tuple(
        (entry.get("uri", ""), (entry.findtext(_RL + "display-name") or "").strip())
        for entry in element.iterchildren(_RL + "entry")
    )
    display = (element.findtext(_RL + "display-name") or "").strip()
    return ListView(element.get("name", ""), display, members)


def describe_lists(root: etree._Element) -> list[ListView]:
    return [describe_list(element) for element in root.iterchildren(_RL + "list")]


def find_list(root: etree._Element, name: str) -> etree._Element | None:
    for element in root.iterchildren(_RL + "list"):
        if element.get("name") == name:
            return element
    return None


def add_members(
    root: etree._Element, name: str, uris: Sequence[str], domain: str
) -> tuple[list[str], bool]:
    """Add ``uris`` to list ``name`` (created if missing); return (added, list created).

    A new list must be one the relay routes (``sip:<name>@<domain>``): EditError,
    nothing changed, otherwise.  An existing list is edited whatever its name."""
    element = find_list(root, name)
    created = element is None
    if element is None:
        try:
            list_uri(name, domain)
        except URIListError as e:
            raise EditError(
                f"LIST is a list's name, such as friends for sip:friends@{domain}: {e};"
                " no list is created that the relay cannot route"
            ) from None
        element = etree.SubElement(root, _RL + "list", name=name)
    present = {entry.get("uri") for entry in element.iterchildren(_RL + "entry")}
    added: list[str] = []
    for uri in uris:
        if uri not in present:
            etree.SubElement(element, _RL + "entry", uri=uri)
            present.add(uri)
            added.append(uri)
    return added, created


def not_routable(root: etree._Element, domain: str) -> list[Unroutable]:
    """The lists and entries of ``root`` the relay will not route, by its own rule.

    What only the relay knows (a ``cr:uri`` outside its domain) is in its answer to a
    write instead (:func:`report_of`)."""
    return list(read_lists(root, domain).unroutable)


def remove_list(root: etree._Element, name: str) -> list[str]:
    """Remove list ``name`` whole; returns its members. EditError if there is none."""
    element = find_list(root, name)
    if element is None:
        raise EditError(f"no list named {name!r}")
    members = [entry.get("uri", "") for entry in element.iterchildren(_RL + "entry")]
    parent = element.getparent()
    assert parent is not None
    parent.remove(element)
    return members


def remove_members(root: etree._Element, name: str, uris: Sequence[str]) -> list[str]:
    """Remove ``uris`` from list ``name``; EditError (nothing changed) if any is absent."""
    element = find_list(root, name)
    if element is None:
        raise EditError(f"no list named {name!r}")
    entries = {entry.get("uri"): entry for entry in element.iterchildren(_RL + "entry")}
    missing = [uri for uri in uris if uri not in entries]
    if missing:
        raise EditError(f"not in list {name!r}: {', '.join(missing)}")
    removed = []
    for uri in dict.fromkeys(uris):
        element.remove(entries[uri])
        removed.append(uri)
    return removed
