"""``relayctl permissions | lists``: a recipient's consent rules and an owner's lists over XCAP.

Documents (consent spec §(c), RFC 4826):

* permissions live in the recipient's consent-rules documents: ``index``, which
  ``grant`` writes, and one ``p-<token>.xml`` per consent request answered at its
  Permission URI (an XCAP PUT there, a grant or deny link).  RFC 4825 cannot list a
  user's documents; the relay serves OMA's xcap-directory usage for that
  (:mod:`relayd.xcap.directory`), so ``list``, ``show`` and ``revoke`` cover every
  document of the user, each rule shown with the document it is in, and ``--document``
  restricts them to one.  A server without the directory (404) has ``index`` only.
  ``revoke`` edits each document that holds a matching rule on its own, one GET and
  one conditional write per document; a ``p-<token>.xml`` left without rules is
  deleted, which the relay settles as the Permission URI's answer withdrawn
  (:func:`relayd.consent.settle.settlement`: a pending request refused, a granted
  one shown revoked), where an empty ruleset would leave a pending request open.
* lists live in ``resource-lists/users/<xui>/index`` as ``<list name=…>`` elements
  with ``<entry uri=…/>`` members.  The document may hold lists and entries the relay
  does not route (other clients share it); ``lists`` shows them and says why, by the
  relay's own rule (:mod:`relayd.consent.lists`) for what it reads, and by the relay's
  answer for what it writes (its list report, docs/consent.md).  Creating a list the
  relay could not route is refused: a list named here is meant to be a list URI.

Every change is a conditional write: GET the document and its ETag, edit it in
memory, PUT it back with ``If-Match`` (``If-None-Match: *`` when creating), or
DELETE it with ``If-Match``, and on 412 start over from a fresh GET, a few times;
all of it goes through :meth:`Session.read_modify_write`.
The edits are pure (:mod:`relayd.consent.edits`), and so is their display
(:mod:`relayd.ctl.render`); this module is the network and argparse glue.

A name without a scheme (``carol`` or ``carol@example.test``) becomes a ``sip:`` URI
in the realm the server announces in its digest challenge, which is the domain the
relay gives digest users (relayd.xcap.auth).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO, TypeVar
from urllib.parse import unquote, urlsplit

from lxml import etree

from relayd.config import ConfigError, load_config
from relayd.consent.edits import (
    DEFAULT_DOCUMENT,
    DEFAULT_METHODS,
    EditError,
    RuleView,
    add_members,
    describe_lists,
    describe_rule,
    describe_rules,
    expand_xui,
    find_rules,
    grant_rule,
    make_rule,
    new_resource_lists,
    new_ruleset,
    not_routable,
    remove_list,
    remove_members,
    remove_rules,
    rule_id_for,
)
from relayd.consent.lists import Unroutable, URIListError, parse_list_report
from relayd.consent.permissions import PERMISSION_DOCUMENT
from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as CP
from relayd.consent.vocabulary import (
    CONSENT_RULES_AUID,
    CONSENT_RULES_MIME_TYPE,
    LIST_REPORT_MIME_TYPE,
    RESOURCE_LISTS_AUID,
    RESOURCE_LISTS_MIME_TYPE,
)
from relayd.consent.vocabulary import RESOURCE_LISTS_NAMESPACE as RL
from relayd.ctl.render import (
    http_error_line,
    lists_table,
    members_table,
    render_json,
    revoke_line,
    rules_table,
    unroutable_json,
    unroutable_lines,
)
from relayd.ctl.settings import Credentials, CtlError, Locations, trust_anchor
from relayd.net.endpoints import EndpointSyntaxError, parse_endpoint
from relayd.xcap.client import (
    XCAPClient,
    XCAPClientError,
    XCAPResponse,
    document_path,
)
from relayd.xcap.directory import (
    DIRECTORY_DOCUMENT,
    XCAP_DIRECTORY_AUID,
    DirectoryError,
    parse_directory,
)
from relayd.xcap.errors import XCAPError
from relayd.xcap.xml import parse_document, serialize_document

WRITE_ATTEMPTS = 5
"""GET + conditional write rounds before a change gives up (each 412 costs one)."""

_CP = f"{{{CP}}}"
_RL = f"{{{RL}}}"
_T = TypeVar("_T")


class XCAPRequestError(CtlError):
    """An HTTP error answer, as one line (see :func:`relayd.ctl.render.http_error_line`)."""

    def __init__(self, method: str, path: str, response: XCAPResponse) -> None:
        super().__init__(http_error_line(method, path, response))
        self.status = response.status


class _Changed(Exception):
    """A conditional request was answered 412: the document changed since the GET."""


# -- documents as the server sends them ----------------------------------------------


def parse_xcap_document(body: bytes, root_tag: str) -> etree._Element:
    """Parse a document fetched from the server with relayd's safe parser."""
    try:
        root = parse_document(body, max(len(body), 1))
    except XCAPError as e:
        raise CtlError(f"the server sent an unreadable document: {e}") from None
    if root.tag != root_tag:
        raise CtlError(f"the server sent a {root.tag} document, expected {root_tag}")
    return root


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


# -- names and defaults -------------------------------------------------------------


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

    async def read_modify_write(
        self, path: str, root_tag: str, method: str, write: Callable[[Fetched], Awaitable[_T]]
    ) -> _T:
        """GET the document, then ``write`` it with conditional requests (If-Match the
        ETag, RFC 4825 §7.11); when one is answered 412, someone changed the document
        in between: start over from a fresh GET, at most WRITE_ATTEMPTS times."""
        for _attempt in range(WRITE_ATTEMPTS):
            fetched = await self.fetch(path, root_tag)
            try:
                return await write(fetched)
            except _Changed:
                continue
        raise CtlError(f"{method} {path}: gave up after {WRITE_ATTEMPTS} concurrent changes (412)")

    async def conditional(self, method: str, path: str, **kw: Any) -> XCAPResponse:
        """A PUT or DELETE inside :meth:`read_modify_write`: 412 starts over, any
        other failure is the command's error."""
        response = await self.call(method, path, **kw)
        if response.status == 412:
            raise _Changed()
        if response.status not in (200, 201):
            raise XCAPRequestError(method, path, response)
        return response

    async def update(
        self,
        path: str,
        root_tag: str,
        mime_type: str,
        edit: Callable[[etree._Element], _T],
        new: Callable[[], etree._Element] | None,
    ) -> tuple[_T, XCAPResponse]:
        """``edit`` the document in memory and PUT it back (``new`` makes a missing
        one, ``If-None-Match: *``). Returns what ``edit`` returned and the PUT's answer."""

        async def put(fetched: Fetched) -> tuple[_T, XCAPResponse]:
            root = fetched.root
            if root is None:
                if new is None:
                    raise CtlError(f"GET {path}: 404 Not Found: no such document")
                root = new()
            result = edit(root)
            response = await self.conditional(
                "PUT",
                path,
                body=serialize_document(root),
                content_type=mime_type,
                if_match=fetched.etag,
                if_none_match=None if fetched.etag else "*",
            )
            return result, response

        return await self.read_modify_write(path, root_tag, "PUT", put)

    async def documents(self, auid: str, xui: str) -> list[str]:
        """Names of ``xui``'s documents of ``auid``, from the OMA xcap-directory
        (module doc); ``index`` alone when the server serves no directory (404)."""
        path = document_path(self.client.root, XCAP_DIRECTORY_AUID, xui, DIRECTORY_DOCUMENT)
        response = await self.call("GET", path)
        if response.status == 404:
            return [DEFAULT_DOCUMENT]
        if response.status != 200:
            raise XCAPRequestError("GET", path, response)
        try:
            folders = parse_directory(response.body)
        except DirectoryError as e:
            raise CtlError(f"GET {path}: {e}") from None
        names = [unquote(urlsplit(e.uri).path.rsplit("/", 1)[-1]) for e in folders.get(auid, [])]
        return sorted(dict.fromkeys(name for name in names if name))

    async def revoke_rules(
        self, path: str, select: Callable[[etree._Element], list[str]], *, delete_emptied: bool
    ) -> tuple[list[str], bool]:
        """Remove the rules ``select`` picks from one document in one conditional
        write; ``delete_emptied``: DELETE the document instead when no rule is left.
        Returns the ids removed and whether the document was deleted; nothing when the
        document is gone or holds no such rule."""

        async def write(fetched: Fetched) -> tuple[list[str], bool]:
            root = fetched.root
            if root is None:
                return [], False
            ids = select(root)
            if not ids:
                return [], False
            remove_rules(root, ids)
            if delete_emptied and not describe_rules(root):
                await self.conditional("DELETE", path, if_match=fetched.etag)
                return ids, True
            await self.conditional(
                "PUT",
                path,
                body=serialize_document(root),
                content_type=CONSENT_RULES_MIME_TYPE,
                if_match=fetched.etag,
            )
            return ids, False

        return await self.read_modify_write(path, _CP + "ruleset", "PUT", write)

    async def delete_document(self, path: str, *, missing_ok: bool = False) -> int | None:
        """DELETE the whole consent-rules document If-Match its ETag; how many rules it
        had (None: there was none, when ``missing_ok``)."""

        async def delete(fetched: Fetched) -> int | None:
            if fetched.root is None:
                if missing_ok:
                    return None
                raise CtlError(f"GET {path}: 404 Not Found: no such document")
            await self.conditional("DELETE", path, if_match=fetched.etag)
            return len(describe_rules(fetched.root))

        return await self.read_modify_write(path, _CP + "ruleset", "DELETE", delete)


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


def is_permission_document(name: str) -> bool:
    """Whether ``name`` is a document minted at a Permission URI (``p-<token>.xml``)."""
    return PERMISSION_DOCUMENT.match(name) is not None


@dataclass
class DocumentRules:
    """The rules of one consent-rules document, with the ETag they were read at."""

    name: str
    etag: str | None
    rules: list[RuleView]


async def read_rules(session: Session, xui: str, names: list[str]) -> list[DocumentRules]:
    """The rules of each of ``names`` that exists (a document deleted since the
    listing is left out)."""
    read: list[DocumentRules] = []
    for name in names:
        path = document_path(session.client.root, CONSENT_RULES_AUID, xui, name)
        fetched = await session.fetch(path, _CP + "ruleset")
        if fetched.root is not None:
            read.append(DocumentRules(name, fetched.etag, describe_rules(fetched.root)))
    return read


async def _show_permissions(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    """``list`` and ``show``: the rules of every consent-rules document of the user
    (module doc), or of ``--document``/DOCUMENT only."""
    root = session.client.root
    xui = await session.xui(getattr(args, "owner", None) or getattr(args, "recipient", None))
    document = getattr(args, "document", None)
    if getattr(args, "xml", False):
        name = document or DEFAULT_DOCUMENT
        path = document_path(root, CONSENT_RULES_AUID, xui, name)
        fetched = await session.fetch(path, _CP + "ruleset")
        if fetched.root is None:
            raise CtlError(f"GET {path}: 404 Not Found: no such document")
        out.write(serialize_document(fetched.root).decode("utf-8") + "\n")
        return
    names = [document] if document else await session.documents(CONSENT_RULES_AUID, xui)
    documents = await read_rules(session, xui, names)
    if document and not documents and args.action == "show":
        path = document_path(root, CONSENT_RULES_AUID, xui, document)
        raise CtlError(f"GET {path}: 404 Not Found: no such document")
    rows = [(d.name, rule) for d in documents for rule in d.rules]
    if args.json:
        payload = {
            "xui": xui,
            "documents": [
                {"document": d.name, "etag": d.etag, "rules": len(d.rules)} for d in documents
            ],
            "rules": [{**rule.as_json(), "document": name} for name, rule in rows],
        }
        out.write(render_json(payload))
    elif rows:
        out.write(rules_table(rows))
    else:
        where = f" ({document})" if document else ""
        out.write(f"no rules for {xui}{where}\n")


async def _revoke(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    """``revoke``: the matching rules (``--from``/``--list`` or ``--rule``) in whichever
    of the user's documents hold them, or ``--all`` of them (module doc)."""
    root = session.client.root
    xui = await session.xui(args.recipient)
    names = [args.document] if args.document else await session.documents(CONSENT_RULES_AUID, xui)
    changed: list[tuple[str, int, bool]] = []
    if args.all:
        for name in names:
            path = document_path(root, CONSENT_RULES_AUID, xui, name)
            count = await session.delete_document(path, missing_ok=not args.document)
            if count is not None:
                changed.append((name, count, True))
        if not changed:
            raise CtlError(f"{xui} has no consent-rules document")
    else:
        revoked = expand_xui(args.sender, await session.realm()) if args.sender else None
        if args.rule and not args.document:
            # Rule ids are unique within a document only (every grant link writes id
            # "grant"): an id found in several documents needs --document.
            held = [
                d.name
                for d in await read_rules(session, xui, names)
                if any(rule.id == args.rule for rule in d.rules)
            ]
            if len(held) > 1:
                raise CtlError(
                    f"rule {args.rule!r} is in {len(held)} documents of {xui}"
                    f" ({', '.join(held)}): name one with --document"
                )
            names = held

        def select(ruleset: etree._Element) -> list[str]:
            if args.rule:
                ids = [r.get("id", "") for r in ruleset.iterchildren(_CP + "rule")]
                return [args.rule] if args.rule in ids else []
            assert revoked is not None
            return [r.get("id", "") for r in find_rules(ruleset, revoked, args.list)]

        for name in names:
            path = document_path(root, CONSENT_RULES_AUID, xui, name)
            ids, deleted = await session.revoke_rules(
                path, select, delete_emptied=is_permission_document(name)
            )
            if ids:
                changed.append((name, len(ids), deleted))
        if not changed:
            where = f" in {args.document}" if args.document else ""
            if args.rule:
                raise CtlError(f"no rule {args.rule!r} for {xui}{where}")
            raise CtlError(f"no rule lets {revoked} reach {xui} via {args.list}{where}")
    count = sum(n for _, n, _ in changed)
    if args.json:
        out.write(
            render_json(
                {
                    "xui": xui,
                    "removed_rules": count,
                    "document_deleted": any(deleted for _, _, deleted in changed),
                    "documents": [
                        {"document": name, "removed_rules": n, "deleted": deleted}
                        for name, n, deleted in changed
                    ],
                }
            )
        )
    else:
        out.write(revoke_line(xui, changed))


async def run_permissions(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    action = args.action
    if action in ("list", "show"):
        await _show_permissions(session, args, out)
        return
    if action == "revoke":
        await _revoke(session, args, out)
        return
    xui = await session.xui(args.recipient)
    path = document_path(
        session.client.root, CONSENT_RULES_AUID, xui, args.document or DEFAULT_DOCUMENT
    )
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
        out.write(render_json({"xui": xui, "etag": etag, "replaced": replaced, **view.as_json()}))
    else:
        verb = "updated" if replaced else "added"
        out.write(f"{verb} rule {view.id}: {sender} may reach {xui} via {args.list}\n")


def _report_list_write(
    out: TextIO,
    args: argparse.Namespace,
    owner: str,
    written: XCAPResponse,
    fields: dict[str, Any],
    line: str,
) -> None:
    """What ``lists add``/``lists remove`` print: the change, then the members the relay
    will not route (its list report, docs/consent.md); as JSON, the same with the new
    ETag."""
    skipped, more = report_of(written)
    if args.json:
        out.write(
            render_json(
                {
                    "owner": owner,
                    "list": args.list,
                    "etag": written.etag,
                    **fields,
                    "not_routable": unroutable_json(skipped, more),
                }
            )
        )
    else:
        out.write(line + unroutable_lines(skipped, more))


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
        note = " (new list)" if created else ""
        _report_list_write(
            out,
            args,
            owner,
            written,
            {"added": added, "created": created},
            f"added {len(added)} member{'s' if len(added) != 1 else ''} to {args.list}{note}\n",
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
    plural = "s" if len(removed) != 1 else ""
    _report_list_write(
        out,
        args,
        owner,
        written,
        {"removed": removed, "list_removed": bool(args.all)},
        f"removed list {args.list} ({len(removed)} member{plural})\n"
        if args.all
        else f"removed {len(removed)} member{plural} from {args.list}\n",
    )


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
    except EditError as e:  # the edit's own one line
        raise CtlError(str(e)) from None
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
        "list",
        help="rules of all of a user's consent-rules documents (default: yours)",
        parents=parents,
    )
    listing.add_argument("--owner", metavar="XUI", help="whose rules (default: the --user's)")
    listing.add_argument(
        "--document", metavar="NAME", help="only this document (index, p-<token>.xml)"
    )
    show = actions.add_parser(
        "show", help="rules of a recipient's consent-rules documents", parents=parents
    )
    show.add_argument("recipient", help="recipient XUI, e.g. sip:carol@example.test or carol")
    show.add_argument(
        "document", nargs="?", help="only this document (default: all; with --xml: index)"
    )
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
    revoke = actions.add_parser(
        "revoke",
        help="remove rules, from whichever of the recipient's documents hold them",
        parents=parents,
    )
    revoke.add_argument("recipient", help="recipient XUI")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--rule", metavar="ID", help="the rule with this id")
    which.add_argument(
        "--from", dest="sender", metavar="SENDER_URI", help="rules for this sender (with --list)"
    )
    which.add_argument(
        "--all", action="store_true", help="delete the documents (every one, or --document's)"
    )
    revoke.add_argument("--list", metavar="LIST_URI", help="with --from: the list")
    revoke.add_argument(
        "--document", metavar="NAME", help="only this document (default: every one)"
    )

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
