"""The web admin pages on the XCAP listener (``/admin/``): permissions, lists and
pending consents of a user, with forms that edit them.

Authentication is the XCAP listener's HTTP Digest against the shared users file
(RFC 2617); who may see and edit whose documents is the XCAP rule
(:meth:`relayd.xcap.auth.XCAPAuthorizer.may_access`): ``[xcap] admins`` every user's,
everyone else their own.  Edits are the ones relayctl makes
(:mod:`relayd.consent.edits`) and are stored through
:meth:`relayd.xcap.resource.XCAPResource.write_document`, the path of an XCAP PUT:
validation, the SIP side's document check, compare-and-set and the store's change
notification.  Each form carries the ETag of the document it was rendered from, so a
form from before someone else's edit is refused as a conflict (RFC 9110 §13.1.1)
instead of overwriting that edit.

The permissions shown are the rules of every consent-rules document of the user:
``index``, which the grant form writes, and each ``p-<token>.xml`` a consent request's
Permission URI holds (written by an XCAP PUT there or a grant or deny link), each rule
with its document and each revoke form with that document's ETag.  A Permission-URI
document is named on the page by a short hash of its token and in the forms by an HMAC
of its name (the page never shows a Permission-URI token); revoking its last rule
deletes it through the XCAP DELETE path, which settles that consent as withdrawn
(:func:`relayd.consent.settle.settlement`), as ``relayctl permissions revoke`` does.

Forms carry a CSRF token bound to the digest user and an hour's time bucket (HMAC
under a per-process secret); GET never changes anything.  Templates are Jinja2 with
autoescaping on; responses forbid framing and scripts (Content-Security-Policy).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlencode

from lxml import etree
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relayd.consent import edits
from relayd.consent.documents import DocumentRejected
from relayd.consent.edits import DEFAULT_DOCUMENT, EditError, RuleView, expand_xui
from relayd.consent.permissions import bound_consent, permission_token
from relayd.consent.store import ConsentState, PendingConsent
from relayd.consent.vocabulary import (
    COMMON_POLICY_NAMESPACE,
    CONSENT_RULES_AUID,
    RESOURCE_LISTS_AUID,
    RESOURCE_LISTS_NAMESPACE,
)
from relayd.logs import logger
from relayd.tokens import redact
from relayd.web.templating import environment
from relayd.xcap.auth import Principal, Unauthorized
from relayd.xcap.errors import XCAPError
from relayd.xcap.resource import XCAPResource
from relayd.xcap.selector import DocumentSelector
from relayd.xcap.xml import parse_document, serialize_document

CSRF_BUCKET_SECONDS = 3600
"""A form's token is good for the hour it was rendered in and the next one."""

MAX_FIELD_CHARS = 2048
MAX_MEMBERS = 100
MAX_NOTICE_CHARS = 300
MAX_PENDING_SHOWN = 200
"""Pending consents listed on a page; the count of the others is shown instead."""

_SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)

_REFILLED = ("sender", "list", "methods", "members")
"""Fields a refused grant or add-members form gets back as they were typed."""

CSRF_TEXT = "The form expired or did not come from this page: reload and try again."
CONFLICT_TEXT = "The document changed meanwhile (another edit was saved): reload and try again."


class _Refused(Exception):
    """Answer ``status`` with ``message`` on the page (nothing was changed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Document:
    selector: DocumentSelector
    root: etree._Element
    etag: str


@dataclass(frozen=True)
class RulesShown:
    """One consent-rules document as the page shows it: ``label`` for people,
    ``handle`` for the forms (neither holds a Permission-URI token)."""

    label: str
    handle: str
    etag: str
    rules: list[RuleView]


class AdminResource(Resource):
    """``/admin/`` (the page), ``/admin/<action>`` (form POSTs), ``/admin/admin.css``."""

    isLeaf = True
    log = logger()

    def __init__(
        self,
        xcap: XCAPResource,
        clock: IReactorTime,
        *,
        domain: str,
        secret: bytes | None = None,
    ) -> None:
        super().__init__()
        self.xcap = xcap
        self.clock = clock
        self.domain = domain
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._templates = environment()
        self._css = resources.files("relayd.web").joinpath("static/admin.css").read_bytes()
        self._actions = {
            b"grant": self._grant,
            b"revoke": self._revoke,
            b"add-members": self._add_members,
            b"remove-member": self._remove_member,
            b"remove-list": self._remove_list,
        }

    # -- twisted.web boundary --------------------------------------------------------

    def render(self, request: Request) -> Any:
        d = defer.ensureDeferred(self._handle(request))
        d.addErrback(self._internal_error, request)
        return NOT_DONE_YET

    def _internal_error(self, failure: Failure, request: Request) -> None:
        self.log.failure("admin page {uri} failed", failure, uri=request.path)
        if not request.finished:
            self._send(request, 500, b"internal error\n", "text/plain; charset=utf-8")

    def _send(self, request: Request, status: int, body: bytes, content_type: str) -> None:
        if request.finished or request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        for name, value in _SECURITY_HEADERS:
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        request.write(body)
        request.finish()

    def _redirect(self, request: Request, location: str) -> None:
        request.setHeader(b"Location", location.encode("ascii"))
        self._send(request, 303, b"", "text/plain; charset=utf-8")

    async def _handle(self, request: Request) -> None:
        path = list(request.postpath or [])
        method = request.method.decode("ascii", "replace")
        if not path:  # /admin without the slash: relative links need it
            self._redirect(request, "/admin/")
            return
        if path == [b"admin.css"] and method in ("GET", "HEAD"):
            self._send(request, 200, self._css, "text/css; charset=utf-8")
            return
        try:
            principal = self._authenticate(request, method)
        except Unauthorized as e:
            if request.requestHeaders.hasHeader(b"Authorization"):
                self.log.warn(
                    "admin page {uri} from {peer}: authentication failed: {reason}",
                    uri=request.path.decode("latin-1"),
                    peer=_peer(request),
                    reason=e.reason,
                )
            request.setHeader(b"WWW-Authenticate", e.challenge.encode("latin-1"))
            self._send(request, 401, b"authentication required\n", "text/plain; charset=utf-8")
            return
        assert principal.user is not None
        if path == [b""] and method in ("GET", "HEAD"):
            await self._page(request, principal, self._arg_value(request, "user"))
            return
        action = self._actions.get(path[0]) if len(path) == 1 else None
        if action is None:
            self._send(request, 404, b"no such page\n", "text/plain; charset=utf-8")
            return
        if method != "POST":
            request.setHeader(b"Allow", b"POST")
            self._send(request, 405, b"POST only\n", "text/plain; charset=utf-8")
            return
        xui = None
        try:
            xui = self._arg(request, "user")
            if not self._csrf_ok(principal.user, self._arg(request, "csrf")):
                raise _Refused(403, CSRF_TEXT)
            xui = self._target(principal, xui)
            notice = await action(request, xui)
        except _Refused as e:
            refill = {
                name: value[:MAX_FIELD_CHARS]
                for name in _REFILLED
                if (value := self._arg_value(request, name)) is not None
            }
            await self._page(
                request, principal, xui, error=(e.status, e.message), refill=(path[0], refill)
            )
            return
        self.log.info(
            "admin {user} {action} for {xui}",
            user=principal.user,
            action=path[0].decode("ascii"),
            xui=xui,
        )
        # The notice rides in the URL: bounded so that it stays far below the
        # listener's request-head limit, digest header included.
        shown = notice if len(notice) <= MAX_NOTICE_CHARS else notice[: MAX_NOTICE_CHARS - 1] + "…"
        self._redirect(request, "/admin/?" + urlencode({"user": xui, "notice": shown}))

    # -- who ---------------------------------------------------------------------------

    def _authenticate(self, request: Request, method: str) -> Principal:
        values = request.requestHeaders.getRawHeaders(b"Authorization")
        header = values[0].decode("latin-1") if values else None
        uri = request.uri.decode("latin-1")
        user = self.xcap.authorizer.authenticate(method, header, uri)
        return self.xcap.authorizer.principal_for(user)

    def _own_xui(self, principal: Principal) -> str:
        assert principal.user is not None
        return expand_xui(principal.user, self.xcap.authorizer.realm)

    def _target(self, principal: Principal, requested: str | None) -> str:
        """Whose documents: the requested XUI if the XCAP rule lets ``principal`` write
        there, else 403; none requested means the principal's own."""
        if not requested:
            return self._own_xui(principal)
        if len(requested) > MAX_FIELD_CHARS:
            raise _Refused(400, f"user is longer than {MAX_FIELD_CHARS} characters")
        try:
            xui = expand_xui(requested, self.xcap.authorizer.realm)
        except EditError as e:
            raise _Refused(400, str(e)) from None
        selector = DocumentSelector(CONSENT_RULES_AUID, xui, DEFAULT_DOCUMENT)
        if not self.xcap.authorizer.may_access(principal, selector, write=True):
            raise _Refused(403, "Only administrators see other users' documents.")
        return xui

    # -- CSRF --------------------------------------------------------------------------

    def csrf_token(self, user: str, bucket: int | None = None) -> str:
        if bucket is None:
            bucket = int(self.clock.seconds() // CSRF_BUCKET_SECONDS)
        message = f"{bucket}\n{user}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _csrf_ok(self, user: str, token: str | None) -> bool:
        if not token:
            return False
        now = int(self.clock.seconds() // CSRF_BUCKET_SECONDS)
        return any(
            hmac.compare_digest(token, self.csrf_token(user, bucket)) for bucket in (now, now - 1)
        )

    # -- the page ----------------------------------------------------------------------

    @staticmethod
    def _arg_value(request: Request, name: str) -> str | None:
        args: dict[bytes, list[bytes]] = request.args or {}
        values = args.get(name.encode("ascii"))
        return values[0].decode("utf-8", "replace").strip() if values else None

    def _arg(self, request: Request, name: str) -> str | None:
        text = self._arg_value(request, name)
        if text is not None and len(text) > MAX_FIELD_CHARS:
            raise _Refused(400, f"{name} is longer than {MAX_FIELD_CHARS} characters")
        return text

    async def _page(
        self,
        request: Request,
        principal: Principal,
        requested: str | None,
        *,
        notice: str | None = None,
        error: tuple[int, str] | None = None,
        refill: tuple[bytes, dict[str, str]] = (b"", {}),
    ) -> None:
        """Render the page; ``refill`` is a refused form's action and what was typed
        into it, shown again so that nothing typed is lost."""
        status = 200
        try:
            xui = self._target(principal, requested)
        except _Refused as e:
            xui, error = self._own_xui(principal), (e.status, e.message)
        if notice is None and error is None:
            notice = (self._arg_value(request, "notice") or "")[:MAX_NOTICE_CHARS] or None
        if error is not None:
            status = error[0]
        assert principal.user is not None
        rules = await self._read(xui, CONSENT_RULES_AUID)
        shown = [self._shown(rules)] + [
            self._shown(await self._read(xui, CONSENT_RULES_AUID, name))
            for name in await self._rules_documents(xui)
            if name != DEFAULT_DOCUMENT
        ]
        lists = await self._read(xui, RESOURCE_LISTS_AUID)
        pending = await self._pending(principal, xui)
        body = self._templates.get_template("admin.html").render(
            user=principal.user,
            admin=principal.admin,
            xui=xui,
            csrf=self.csrf_token(principal.user),
            notice=notice,
            error=error[1] if error is not None else None,
            documents=[d for d in shown if d.rules],
            rules_etag=rules.etag,
            lists=edits.describe_lists(lists.root),
            lists_etag=lists.etag,
            pending=[_consent_row(c) for c in pending[:MAX_PENDING_SHOWN]],
            pending_more=max(0, len(pending) - MAX_PENDING_SHOWN),
            refill_action=refill[0].decode("ascii", "replace"),
            refill=refill[1],
        )
        self._send(request, status, body.encode("utf-8"), "text/html; charset=utf-8")

    async def _pending(self, principal: Principal, xui: str) -> list[PendingConsent]:
        """Pending consents: every one for an administrator, else the user's own."""
        recipient = None if principal.admin else xui
        return list(
            await self.xcap.store.list_consents(recipient=recipient, state=ConsentState.PENDING)
        )

    def document_handle(self, name: str) -> str:
        """What a form names a consent-rules document by: ``index`` as it is, a
        Permission-URI document by an HMAC of its name (module doc)."""
        if name == DEFAULT_DOCUMENT:
            return name
        mac = hmac.new(self._secret, f"document\n{name}".encode(), hashlib.sha256)
        return "d-" + mac.hexdigest()[:32]

    def _shown(self, document: _Document) -> RulesShown:
        name = document.selector.document
        token = permission_token(document.selector.key)
        label = f"Permission URI {redact(token)}" if token is not None else name
        rules = edits.describe_rules(document.root)
        return RulesShown(label, self.document_handle(name), document.etag, rules)

    async def _rules_documents(self, xui: str) -> list[str]:
        return list(await self.xcap.store.list_documents(CONSENT_RULES_AUID, xui))

    async def _named(self, xui: str, handle: str) -> str:
        """The consent-rules document a form's ``handle`` names; a conflict when it is
        gone (deleted since the page was rendered)."""
        if handle == DEFAULT_DOCUMENT:
            return handle
        for name in await self._rules_documents(xui):
            if hmac.compare_digest(self.document_handle(name), handle):
                return name
        raise _Refused(409, CONFLICT_TEXT)

    async def _read(self, xui: str, auid: str, name: str = DEFAULT_DOCUMENT) -> _Document:
        selector = DocumentSelector(auid, xui, name)
        stored = await self.xcap.store.get_document(auid, xui, name)
        if stored is None:
            root = edits.new_ruleset() if auid == CONSENT_RULES_AUID else edits.new_resource_lists()
            return _Document(selector, root, "")
        tag = (
            f"{{{COMMON_POLICY_NAMESPACE}}}ruleset"
            if auid == CONSENT_RULES_AUID
            else f"{{{RESOURCE_LISTS_NAMESPACE}}}resource-lists"
        )
        root = parse_document(stored.body, max(len(stored.body), 1))
        if root.tag != tag:
            raise _Refused(500, f"the stored {auid} document is not a {tag}")
        return _Document(selector, root, stored.etag)

    # -- edits -------------------------------------------------------------------------

    async def _edit(
        self,
        request: Request,
        xui: str,
        auid: str,
        change: Any,
        name: str = DEFAULT_DOCUMENT,
    ) -> str:
        """Apply ``change(root) -> notice`` to the document the form was rendered from
        and store it through the XCAP write path, conditional on the form's ETag.

        A Permission-URI document is written within its consent's scope, and deleted
        when no rule is left (module doc)."""
        document = await self._read(xui, auid, name)
        shown = self._arg(request, "etag") or ""
        if shown != document.etag:
            raise _Refused(409, CONFLICT_TEXT)
        try:
            notice: str = change(document.root)
        except EditError as e:
            raise _Refused(400, str(e)) from None
        consent = await bound_consent(self.xcap.store, document.selector.key)
        minted = permission_token(document.selector.key) is not None
        emptied = minted and not edits.describe_rules(document.root)
        try:
            if emptied:
                await self.xcap.delete_document(
                    document.selector, if_match=document.etag, consent=consent
                )
            else:
                await self.xcap.write_document(
                    document.selector,
                    serialize_document(document.root),
                    if_match=document.etag or None,
                    if_none_match=None if document.etag else "*",
                    consent=consent,
                )
        except XCAPError as e:
            if e.status in (404, 412):
                raise _Refused(409, CONFLICT_TEXT) from None
            raise _Refused(e.status, f"The server refused the document: {e}") from None
        except DocumentRejected as e:
            raise _Refused(409, f"The server refused the document: {e.reason}") from None
        return notice

    def _required(self, request: Request, name: str) -> str:
        value = self._arg(request, name)
        if not value:
            raise _Refused(400, f"{name} is required")
        return value

    async def _grant(self, request: Request, xui: str) -> str:
        realm = self.xcap.authorizer.realm
        try:
            sender = expand_xui(self._required(request, "sender"), realm)
        except EditError as e:
            raise _Refused(400, str(e)) from None
        list_uri = self._required(request, "list")
        methods = (
            tuple(
                m.upper() for m in (self._arg(request, "methods") or "").replace(",", " ").split()
            )
            or edits.DEFAULT_METHODS
        )

        def grant(ruleset: etree._Element) -> str:
            rule = edits.make_rule(edits.rule_id_for(sender, list_uri), sender, list_uri, methods)
            replaced = edits.grant_rule(ruleset, rule, sender, list_uri)
            verb = "replaced" if replaced else "granted"
            return f"{verb} rule {rule.get('id')}: {sender} may reach {xui} via {list_uri}"

        return await self._edit(request, xui, CONSENT_RULES_AUID, grant)

    async def _revoke(self, request: Request, xui: str) -> str:
        rule_id = self._required(request, "rule")
        name = await self._named(xui, self._arg(request, "document") or DEFAULT_DOCUMENT)
        token = permission_token(DocumentSelector(CONSENT_RULES_AUID, xui, name).key)
        where = f" of Permission URI {redact(token)}" if token is not None else ""

        def revoke(ruleset: etree._Element) -> str:
            if edits.remove_rules(ruleset, [rule_id]):
                raise EditError(f"no rule {rule_id!r}")
            return f"revoked rule {rule_id}{where}"

        return await self._edit(request, xui, CONSENT_RULES_AUID, revoke, name)

    async def _add_members(self, request: Request, xui: str) -> str:
        realm = self.xcap.authorizer.realm
        name = self._required(request, "list")
        try:
            members = [expand_xui(m, realm) for m in self._required(request, "members").split()]
        except EditError as e:
            raise _Refused(400, str(e)) from None
        if len(members) > MAX_MEMBERS:
            raise _Refused(400, f"at most {MAX_MEMBERS} members at a time")

        def add(root: etree._Element) -> str:
            added, created = edits.add_members(root, name, members, self.domain)
            prefix = f"created list {name}; " if created else ""
            return f"{prefix}added {len(added)} member(s) to {name}"

        return await self._edit(request, xui, RESOURCE_LISTS_AUID, add)

    async def _remove_member(self, request: Request, xui: str) -> str:
        name = self._required(request, "list")
        member = self._required(request, "member")

        def remove(root: etree._Element) -> str:
            edits.remove_members(root, name, [member])
            return f"removed {member} from {name}"

        return await self._edit(request, xui, RESOURCE_LISTS_AUID, remove)

    async def _remove_list(self, request: Request, xui: str) -> str:
        name = self._required(request, "list")

        def remove(root: etree._Element) -> str:
            members = edits.remove_list(root, name)
            return f"removed list {name} and its {len(members)} member(s)"

        return await self._edit(request, xui, RESOURCE_LISTS_AUID, remove)


def _peer(request: Request) -> str:
    address: Any = request.getClientAddress()
    return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '?')}"


def _consent_row(consent: PendingConsent) -> dict[str, str]:
    """What the page shows of a pending consent: never its Permission-URI token."""
    return {
        "sender": consent.sender,
        "recipient": consent.recipient,
        "list": consent.list_uri,
        "methods": " ".join(consent.methods),
        "expires": datetime.fromtimestamp(consent.expires, UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
