"""``relayctl permissions | lists``: a recipient's consent rules and an owner's lists over XCAP.

Documents (consent spec §(c), RFC 4826):

* permissions live in ``consent-rules/users/<xui>/index``, the recipient's general
  document ("anyone on list X").  The server offers no directory listing (RFC 4825
  has none; the OMA xcap-directory usage is not served), so ``permissions list``
  shows the rules of that one document; ``show`` reads any document of the user
  (``index`` by default, or a minted ``p-<token>.xml``).
* lists live in ``resource-lists/users/<xui>/index`` as ``<list name=…>`` elements
  with ``<entry uri=…/>`` members.  The document may hold lists and entries the relay
  does not route (other clients share it); ``lists`` shows them and says why, by the
  relay's own rule (:mod:`relayd.consent.lists`) for what it reads, and by the relay's
  answer for what it writes (its list report, docs/consent.md).  Creating a list the
  relay could not route is refused: a list named here is meant to be a list URI.

Every change is a conditional write: GET the document and its ETag, edit it in
memory, PUT it back with ``If-Match`` (``If-None-Match: *`` when creating), and on
412 start over from a fresh GET, a few times.  Revoking one rule is an element
DELETE with ``If-Match``.  The edits are pure functions on lxml trees, parsed with
relayd's safe parser, so they are unit-tested without a server.

A name without a scheme (``carol`` or ``carol@example.test``) becomes a ``sip:`` URI
in the realm the server announces in its digest challenge, which is the domain the
relay gives digest users (relayd.xcap.auth).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

from lxml import etree

from relayd.config import ConfigError, load_config
from relayd.consent.lists import Unroutable, URIListError, list_uri, parse_list_report, read_lists
from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as CP
from relayd.consent.vocabulary import CONSENT_FORMAT_NAMESPACE as CF
from relayd.consent.vocabulary import CONSENT_POLICY_NAMESPACE as CR
from relayd.consent.vocabulary import (
    CONSENT_RULES_AUID,
    CONSENT_RULES_MIME_TYPE,
    LIST_REPORT_MIME_TYPE,
    RESOURCE_LISTS_AUID,
    RESOURCE_LISTS_MIME_TYPE,
)
from relayd.consent.vocabulary import RESOURCE_LISTS_NAMESPACE as RL
from relayd.ctl.settings import Credentials, CtlError, Locations, trust_anchor
from relayd.endpoints import EndpointSyntaxError, parse_endpoint
from relayd.xcap.client import (
    XCAPClient,
    XCAPClientError,
    XCAPResponse,
    document_path,
    node_path,
)
from relayd.xcap.errors import XCAPError
from relayd.xcap.xml import parse_document, serialize_document

DEFAULT_DOCUMENT = "index"
DEFAULT_METHODS = ("MESSAGE",)
WRITE_ATTEMPTS = 5
"""GET + conditional write rounds before a change gives up (each 412 costs one)."""
CLOCK_SKEW = timedelta(minutes=5)
"""``--until`` rules start this long before now, so a slow relay clock still sees them."""

_CP = f"{{{CP}}}"
_CR = f"{{{CR}}}"
_CF = f"{{{CF}}}"
_RL = f"{{{RL}}}"
_T = TypeVar("_T")


class XCAPRequestError(CtlError):
    """An HTTP error answer, as one line (see :func:`http_error_line`)."""

    def __init__(self, method: str, path: str, response: XCAPResponse) -> None:
        super().__init__(http_error_line(method, path, response))
        self.status = response.status


def http_error_line(method: str, path: str, response: XCAPResponse) -> str:
    """``<METHOD> <path>: <status> <reason>[: <condition> (<phrase>)]``."""
    line = f"{method} {path}: {response.status} {response.reason}".rstrip()
    found = response.xcap_error()
    if found is not None:
        condition, phrase = found
        line += f": {condition}"
        if phrase:
            line += f" ({' '.join(phrase.split())[:160]})"
    elif response.status == 401:
        line += ": wrong user name or password"
    elif response.status == 403:
        line += ": not your document (use the owner's account or an admin's)"
    return line


# -- names and defaults -------------------------------------------------------------


def expand_xui(name: str, realm: str) -> str:
    """``carol`` → ``sip:carol@<realm>``, ``carol@x`` → ``sip:carol@x``; URIs unchanged."""
    text = name.strip()
    if not text:
        raise CtlError("empty user or URI")
    if ":" in text.split("@", 1)[0]:
        return text
    return f"sip:{text}" if "@" in text else f"sip:{text}@{realm}"


def default_xcap_url(locations_config: str | None) -> str:
    """The XCAP root of the relay configured in ``--config`` (or the defaults).

    ``[xcap] public_url`` when set, else the first ``[xcap] listen`` endpoint:
    ``https://<hostname or interface>:<port><root>`` (``http`` for ``tcp:``).
    """
    try:
        config = load_config(locations_config)
    except ConfigError as e:
        raise CtlError(str(e)) from None
    xcap = config.xcap
    if xcap.public_url:
        return xcap.public_url.rstrip("/")
    try:
        spec = parse_endpoint(xcap.listen[0])
    except (EndpointSyntaxError, IndexError) as e:
        raise CtlError(f"cannot derive the XCAP URL from [xcap] listen: {e}") from None
    interface = spec.interface if spec.interface not in ("", "0.0.0.0", "::") else "localhost"  # noqa: S104
    host = config.hostname or interface
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if spec.kind == "ssl" else "http"
    return f"{scheme}://{host}:{spec.port}{xcap.root.rstrip('/')}"


def xcap_trust(ca: str | None, url: str, locations: Locations) -> bytes | None:
    """The PEM to trust, chosen exactly like the MSRP commands do (settings.trust_anchor)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise CtlError(f"bad --xcap URL {url!r}: expected https://host:port/root")
    if parts.scheme == "http" and not ca:
        return None
    host = parts.hostname
    host = f"[{host}]" if ":" in host else host
    return trust_anchor(ca, f"msrps://{host}:{parts.port or 443};tcp", locations)


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
    nsmap: Any = {None: CP, "cr": CR}
    return etree.Element(_CP + "ruleset", nsmap=nsmap)


def parse_xcap_document(body: bytes, root_tag: str) -> etree._Element:
    """Parse a document fetched from the server with relayd's safe parser."""
    try:
        root = parse_document(body, max(len(body), 1))
    except XCAPError as e:
        raise CtlError(f"the server sent an unreadable document: {e}") from None
    if root.tag != root_tag:
        raise CtlError(f"the server sent a {root.tag} document, expected {root_tag}")
    return root


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
    nsmap: Any = {None: CP, "cr": CR}
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
    nsmap: Any = {None: RL}
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

    A new list must be one the relay routes (``sip:<name>@<domain>``): CtlError,
    nothing changed, otherwise.  An existing list is edited whatever its name."""
    element = find_list(root, name)
    created = element is None
    if element is None:
        try:
            list_uri(name, domain)
        except URIListError as e:
            raise CtlError(
                f"LIST is a list's name, such as friends for sip:friends@{domain}: {e};"
                " relayctl creates no list the relay cannot route"
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


def report_of(response: XCAPResponse) -> tuple[list[Unroutable], int]:
    """The relay's list report in a write's answer: the items and how many more it
    counted; nothing when it sent none (docs/consent.md)."""
    media = (response.header("Content-Type") or "").split(";", 1)[0].strip().lower()
    if media != LIST_REPORT_MIME_TYPE or not response.body:
        return [], 0
    try:
        return parse_list_report(response.body)
    except URIListError:
        return [], 0


def remove_list(root: etree._Element, name: str) -> list[str]:
    """Remove list ``name`` whole; returns its members. CtlError if there is none."""
    element = find_list(root, name)
    if element is None:
        raise CtlError(f"no list named {name!r}")
    members = [entry.get("uri", "") for entry in element.iterchildren(_RL + "entry")]
    parent = element.getparent()
    assert parent is not None
    parent.remove(element)
    return members


def remove_members(root: etree._Element, name: str, uris: Sequence[str]) -> list[str]:
    """Remove ``uris`` from list ``name``; CtlError (nothing changed) if any is absent."""
    element = find_list(root, name)
    if element is None:
        raise CtlError(f"no list named {name!r}")
    entries = {entry.get("uri"): entry for entry in element.iterchildren(_RL + "entry")}
    missing = [uri for uri in uris if uri not in entries]
    if missing:
        raise CtlError(f"not in list {name!r}: {', '.join(missing)}")
    removed = []
    for uri in dict.fromkeys(uris):
        element.remove(entries[uri])
        removed.append(uri)
    return removed


# -- rendering ----------------------------------------------------------------------


def render_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; no trailing blanks."""
    body = [[str(cell) for cell in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in body:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in [list(columns), *body]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def render_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _joined(values: Sequence[str], empty: str) -> str:
    return ",".join(values) if values else empty


def rules_table(rules: Sequence[RuleView]) -> str:
    rows = [
        (
            rule.id,
            _joined(rule.senders, "-"),
            _joined(rule.lists, "any list"),
            _joined(rule.methods, "any"),
            _joined([u for _, u in rule.validity], "forever"),
            rule.action,
        )
        for rule in rules
    ]
    return render_table(("RULE", "FROM", "LIST", "METHODS", "UNTIL", "ACTION"), rows)


def unroutable_json(items: Sequence[Unroutable], more: int = 0) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"node": i.node, "list": i.list_name, "uri": i.uri, "reason": i.reason} for i in items
    ]
    if more:
        rows.append({"more": more})
    return rows


def unroutable_lines(items: Sequence[Unroutable], more: int = 0) -> str:
    """One ``not routed:`` line per item: the list (and entry) and the relay's reason."""
    lines = []
    for item in items:
        where = f"list {item.list_name}" if item.list_name else item.node
        if item.uri is not None:
            where += f", entry {item.uri}"
        lines.append(f"not routed: {where}: {item.reason}\n")
    if more:
        lines.append(f"not routed: {more} more\n")
    return "".join(lines)


def lists_table(lists: Sequence[ListView]) -> str:
    rows = [(view.name or "-", str(len(view.members)), view.display_name or "-") for view in lists]
    return render_table(("LIST", "MEMBERS", "DISPLAY NAME"), rows)


def members_table(view: ListView) -> str:
    rows = [(uri, name or "-") for uri, name in view.members]
    return render_table(("MEMBER", "DISPLAY NAME"), rows)


# -- talking to the server ----------------------------------------------------------


@dataclass(frozen=True)
class XCAPAccess:
    """Where the XCAP root is and who we are, resolved before the reactor starts."""

    url: str
    credentials: Credentials
    trust_pem: bytes | None
    timeout_seconds: float


@dataclass
class Fetched:
    root: etree._Element | None
    etag: str | None


class Session:
    """A client plus the helpers every subcommand needs."""

    def __init__(self, client: XCAPClient) -> None:
        self.client = client

    async def call(self, method: str, path: str, **kw: Any) -> XCAPResponse:
        try:
            if method == "GET":
                return await self.client.get(path, **kw)
            if method == "PUT":
                return await self.client.put(path, **kw)
            return await self.client.delete(path, **kw)
        except XCAPClientError as e:
            raise CtlError(str(e)) from None

    async def realm(self) -> str:
        realm = self.client.realm
        if realm is not None:
            return realm
        path = f"{self.client.root}/xcap-caps/global/index"
        response = await self.call("GET", path)
        if response.status != 200 or self.client.realm is None:
            raise XCAPRequestError("GET", path, response)
        return self.client.realm

    async def xui(self, name: str | None) -> str:
        realm = await self.realm()
        return expand_xui(name or self.client.username, realm)

    async def fetch(self, path: str, root_tag: str) -> Fetched:
        response = await self.call("GET", path)
        if response.status == 404:
            return Fetched(None, None)
        if response.status != 200:
            raise XCAPRequestError("GET", path, response)
        return Fetched(parse_xcap_document(response.body, root_tag), response.etag)

    async def update(
        self,
        path: str,
        root_tag: str,
        mime_type: str,
        edit: Callable[[etree._Element], _T],
        new: Callable[[], etree._Element] | None,
    ) -> tuple[_T, XCAPResponse]:
        """GET, ``edit`` in memory, conditional PUT; start over on 412 (module doc).
        Returns what ``edit`` returned and the PUT's answer."""
        for _attempt in range(WRITE_ATTEMPTS):
            fetched = await self.fetch(path, root_tag)
            root = fetched.root
            if root is None:
                if new is None:
                    raise CtlError(f"GET {path}: 404 Not Found: no such document")
                root = new()
            result = edit(root)
            response = await self.call(
                "PUT",
                path,
                body=serialize_document(root),
                content_type=mime_type,
                if_match=fetched.etag,
                if_none_match=None if fetched.etag else "*",
            )
            if response.status == 412:
                continue
            if response.status not in (200, 201):
                raise XCAPRequestError("PUT", path, response)
            return result, response
        raise CtlError(f"PUT {path}: gave up after {WRITE_ATTEMPTS} concurrent changes (412)")

    async def delete_rules(self, path: str, rule_ids: Callable[[etree._Element], list[str]]) -> int:
        """Element DELETE of each selected rule with If-Match; start over on 412."""
        for _attempt in range(WRITE_ATTEMPTS):
            fetched = await self.fetch(path, _CP + "ruleset")
            if fetched.root is None:
                raise CtlError(f"GET {path}: 404 Not Found: no such document")
            ids = rule_ids(fetched.root)
            etag = fetched.etag
            raced = False
            for rule_id in ids:
                target = node_path(path, f'ruleset/rule[@id="{rule_id}"]')
                response = await self.call("DELETE", target, if_match=etag)
                if response.status == 412:
                    raced = True
                    break
                if response.status != 200:
                    raise XCAPRequestError("DELETE", target, response)
                etag = response.etag
            if not raced:
                return len(ids)
        raise CtlError(f"DELETE {path}: gave up after {WRITE_ATTEMPTS} concurrent changes (412)")


def _parse_until(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CtlError(f"--until {text!r} is not an ISO 8601 date or time") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def _methods(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_METHODS
    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not methods:
        raise CtlError("--methods needs at least one method, e.g. MESSAGE")
    return methods


async def run_permissions(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    action = args.action
    root = session.client.root
    if action in ("list", "show"):
        xui = await session.xui(getattr(args, "owner", None) or getattr(args, "recipient", None))
        document = getattr(args, "document", None) or DEFAULT_DOCUMENT
        path = document_path(root, CONSENT_RULES_AUID, xui, document)
        fetched = await session.fetch(path, _CP + "ruleset")
        if fetched.root is None:
            if action == "show":
                raise CtlError(f"GET {path}: 404 Not Found: no such document")
            rules: list[RuleView] = []
        else:
            rules = describe_rules(fetched.root)
        if args.json:
            payload = {
                "xui": xui,
                "document": document,
                "etag": fetched.etag,
                "rules": [r.as_json() for r in rules],
            }
            out.write(render_json(payload))
        elif getattr(args, "xml", False) and fetched.root is not None:
            out.write(serialize_document(fetched.root).decode("utf-8") + "\n")
        elif rules:
            out.write(rules_table(rules))
        else:
            out.write(f"no rules for {xui} ({document})\n")
        return
    xui = await session.xui(args.recipient)
    path = document_path(root, CONSENT_RULES_AUID, xui, args.document or DEFAULT_DOCUMENT)
    if action == "grant":
        sender = expand_xui(args.sender, await session.realm())
        until = _parse_until(args.until) if args.until else None
        rule = make_rule(
            args.id or rule_id_for(sender, args.list),
            sender,
            args.list,
            _methods(args.methods),
            until,
        )

        def edit(ruleset: etree._Element) -> tuple[bool, RuleView]:
            replaced = grant_rule(ruleset, rule, sender, args.list)
            return replaced, describe_rule(rule)

        (replaced, view), written = await session.update(
            path, _CP + "ruleset", CONSENT_RULES_MIME_TYPE, edit, new_ruleset
        )
        etag = written.etag
        if args.json:
            out.write(
                render_json({"xui": xui, "etag": etag, "replaced": replaced, **view.as_json()})
            )
        else:
            verb = "updated" if replaced else "added"
            out.write(f"{verb} rule {view.id}: {sender} may reach {xui} via {args.list}\n")
        return
    # revoke
    if args.all:
        fetched = await session.fetch(path, _CP + "ruleset")
        if fetched.root is None:
            raise CtlError(f"GET {path}: 404 Not Found: no such document")
        response = await session.call("DELETE", path, if_match=fetched.etag)
        if response.status != 200:
            raise XCAPRequestError("DELETE", path, response)
        count = len(describe_rules(fetched.root))
    else:
        revoked = expand_xui(args.sender, await session.realm()) if args.sender else None

        def select(ruleset: etree._Element) -> list[str]:
            if args.rule:
                ids = [r.get("id", "") for r in ruleset.iterchildren(_CP + "rule")]
                if args.rule not in ids:
                    raise CtlError(f"no rule {args.rule!r} in {path}")
                return [args.rule]
            assert revoked is not None
            found = [r.get("id", "") for r in find_rules(ruleset, revoked, args.list)]
            if not found:
                raise CtlError(f"no rule lets {revoked} reach {xui} via {args.list}")
            return found

        count = await session.delete_rules(path, select)
    if args.json:
        out.write(render_json({"xui": xui, "removed_rules": count, "document_deleted": args.all}))
    else:
        out.write(f"revoked {count} rule{'s' if count != 1 else ''} of {xui}\n")


async def run_lists(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    owner = await session.xui(args.owner)
    path = document_path(session.client.root, RESOURCE_LISTS_AUID, owner, DEFAULT_DOCUMENT)
    tag = _RL + "resource-lists"
    action = args.action
    realm = await session.realm()
    if action in ("list", "show"):
        fetched = await session.fetch(path, tag)
        views = describe_lists(fetched.root) if fetched.root is not None else []
        skipped = not_routable(fetched.root, realm) if fetched.root is not None else []
        if action == "list":
            if args.json:
                out.write(
                    render_json(
                        {
                            "owner": owner,
                            "etag": fetched.etag,
                            "lists": [v.as_json() for v in views],
                            "not_routable": unroutable_json(skipped),
                        }
                    )
                )
            elif views:
                out.write(lists_table(views) + unroutable_lines(skipped))
            else:
                out.write(f"no lists for {owner}\n")
            return
        view = next((v for v in views if v.name == args.list), None)
        if view is None:
            raise CtlError(f"no list named {args.list!r} for {owner}")
        skipped = [item for item in skipped if item.list_name == view.name]
        if args.json:
            out.write(
                render_json(
                    {
                        "owner": owner,
                        "etag": fetched.etag,
                        **view.as_json(),
                        "not_routable": unroutable_json(skipped),
                    }
                )
            )
        elif view.members:
            out.write(members_table(view) + unroutable_lines(skipped))
        else:
            out.write(f"list {view.name} has no members\n" + unroutable_lines(skipped))
        return
    members = [expand_xui(member, realm) for member in args.members]
    if action == "add":
        (added, created), written = await session.update(
            path,
            tag,
            RESOURCE_LISTS_MIME_TYPE,
            lambda root: add_members(root, args.list, members, realm),
            new_resource_lists,
        )
        skipped, more = report_of(written)
        if args.json:
            out.write(
                render_json(
                    {
                        "owner": owner,
                        "list": args.list,
                        "etag": written.etag,
                        "added": added,
                        "created": created,
                        "not_routable": unroutable_json(skipped, more),
                    }
                )
            )
        else:
            note = " (new list)" if created else ""
            out.write(
                f"added {len(added)} member{'s' if len(added) != 1 else ''} to {args.list}{note}\n"
                + unroutable_lines(skipped, more)
            )
        return
    removed, written = await session.update(
        path,
        tag,
        RESOURCE_LISTS_MIME_TYPE,
        (lambda root: remove_list(root, args.list))
        if args.all
        else (lambda root: remove_members(root, args.list, members)),
        None,
    )
    skipped, more = report_of(written)
    if args.json:
        out.write(
            render_json(
                {
                    "owner": owner,
                    "list": args.list,
                    "etag": written.etag,
                    "removed": removed,
                    "list_removed": bool(args.all),
                    "not_routable": unroutable_json(skipped, more),
                }
            )
        )
    else:
        plural = "s" if len(removed) != 1 else ""
        if args.all:
            out.write(f"removed list {args.list} ({len(removed)} member{plural})\n")
        else:
            out.write(f"removed {len(removed)} member{plural} from {args.list}\n")
        out.write(unroutable_lines(skipped, more))


async def run_xcap_command(
    reactor: Any, access: XCAPAccess, args: argparse.Namespace, out: TextIO
) -> None:
    """``relayctl permissions …`` or ``relayctl lists …`` under the reactor."""
    credentials = access.credentials
    client = XCAPClient(
        access.url,
        credentials.username,
        credentials.password,
        access.trust_pem,
        reactor,
        timeout_seconds=access.timeout_seconds,
    )
    session = Session(client)
    try:
        if args.command == "permissions":
            await run_permissions(session, args, out)
        else:
            await run_lists(session, args, out)
    finally:
        await client.close()


# -- argument parsing ---------------------------------------------------------------


def add_parsers(command: Callable[[str, str, list[Any]], Any], parents: list[Any]) -> None:
    """Register ``permissions`` and ``lists`` (``command`` is main.build_parser's helper)."""
    # Options go on the leaf parsers only: argparse lets a subparser's defaults
    # overwrite what its parent parsed.
    permissions = command(
        "permissions",
        "Show, grant and revoke who may reach a recipient through the relay's URI lists"
        " (consent-rules documents over XCAP).",
        [],
    )
    actions = permissions.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list", help="rules of a user's index document (default: yours)", parents=parents
    )
    listing.add_argument("--owner", metavar="XUI", help="whose rules (default: the --user's)")
    show = actions.add_parser("show", help="rules of one permission document", parents=parents)
    show.add_argument("recipient", help="recipient XUI, e.g. sip:carol@example.test or carol")
    show.add_argument("document", nargs="?", help="document name (default: index)")
    show.add_argument("--xml", action="store_true", help="print the document itself")
    grant = actions.add_parser(
        "grant", help="let a sender reach the recipient through a list", parents=parents
    )
    grant.add_argument("recipient", help="recipient XUI, e.g. sip:carol@example.test or carol")
    grant.add_argument("--from", dest="sender", required=True, metavar="SENDER_URI")
    grant.add_argument("--list", required=True, metavar="LIST_URI")
    grant.add_argument("--methods", metavar="M1,M2", help="SIP methods allowed (default: MESSAGE)")
    grant.add_argument(
        "--until", metavar="ISO8601", help="the permission ends then (UTC if no zone)"
    )
    grant.add_argument(
        "--id", metavar="RULE_ID", help="rule id (default: derived from sender and list)"
    )
    grant.add_argument("--document", metavar="NAME", help="document (default: index)")
    revoke = actions.add_parser("revoke", help="remove granting rules", parents=parents)
    revoke.add_argument("recipient", help="recipient XUI")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--rule", metavar="ID", help="the rule with this id")
    which.add_argument(
        "--from", dest="sender", metavar="SENDER_URI", help="rules for this sender (with --list)"
    )
    which.add_argument("--all", action="store_true", help="delete the whole document")
    revoke.add_argument("--list", metavar="LIST_URI", help="with --from: the list")
    revoke.add_argument("--document", metavar="NAME", help="document (default: index)")

    lists = command(
        "lists",
        "Show and edit a user's resource lists (RFC 4826) over XCAP.",
        [],
    )
    actions = lists.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, summary in (
        ("list", "the owner's lists and their sizes"),
        ("show", "the members of one list"),
        ("add", "add members (the list is created if missing)"),
        ("remove", "remove members, or the whole list with --all"),
    ):
        sub = actions.add_parser(name, help=summary, parents=parents)
        sub.add_argument("--owner", metavar="XUI", help="whose lists (default: the --user's)")
        if name != "list":
            sub.add_argument(
                "list", metavar="LIST", help="list name, e.g. friends for sip:friends@DOMAIN"
            )
        if name == "add":
            sub.add_argument("members", nargs="+", metavar="MEMBER_URI")
        if name == "remove":
            sub.add_argument("members", nargs="*", metavar="MEMBER_URI")
            sub.add_argument("--all", action="store_true", help="remove the whole list")


def check_arguments(args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; CtlError before anything connects."""
    if args.command == "lists" and args.action == "remove" and args.all == bool(args.members):
        raise CtlError("lists remove takes MEMBER_URI... or --all, one of the two")
    if args.command == "permissions" and args.action == "revoke":
        if args.sender and not args.list:
            raise CtlError("revoke --from needs --list LIST_URI")
        if args.list and not args.sender:
            raise CtlError("revoke --list needs --from SENDER_URI")
