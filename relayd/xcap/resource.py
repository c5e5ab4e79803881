"""The XCAP HTTP surface (RFC 4825 §§6-8, consent spec §(c)) on twisted.web.

One leaf resource answers every request below the site: it parses the request URI
(:func:`relayd.xcap.selector.parse_xcap_uri`), authorises (:mod:`relayd.xcap.auth`),
and reads or writes the :class:`~relayd.consent.store.IPermissionStore`.  Failures are
:class:`~relayd.xcap.errors.XCAPError`\\ s turned into responses in one place;
anything unexpected is logged and answered 500.

Conditional requests (RFC 9110 §13, RFC 4825 §7.11): every success response carries
the *document's* strong ETag, also for element and attribute resources.  A specific
entity tag in ``If-Match``/``If-None-Match`` is compared with the document's tag; ``*``
asks whether the *target* exists (the document, the element or the attribute), so
``If-None-Match: *`` on an element PUT means "insert, never replace".

Node writes are read-modify-write: read the document and its ETag, check the client's
preconditions against that state, apply the change in memory, validate the whole
document with its application usage, then store it with ``if_match=<that ETag>``.
The store's compare-and-set turns a concurrent writer between our read and our write
into :class:`~relayd.consent.store.PreconditionFailed` on *our internal* tag.  That is
not the client's failure, so the whole operation is retried on the fresh document
(re-checking the client's preconditions there): a client that sent
``If-Match: "<old>"`` then gets its 412, because the document changed under it,
while a client without preconditions gets its change applied on top of the other
one, as if it had arrived second.  After :data:`MAX_WRITE_ATTEMPTS` lost races the
answer is 503 with ``Retry-After``.  Whole-document PUT and DELETE need no read: the
client's own preconditions go straight into the store's compare-and-set, so of two
PUTs with the same ``If-Match`` exactly one wins and the other gets 412.

XML parsing and schema validation run on the reactor thread (lxml validators are not
thread-safe, usages.py); bodies are bounded by ``max_body_bytes`` first.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from xml.sax.saxutils import escape

from lxml import etree
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request, Site

from relayd.consent.documents import (
    DEFAULT_MAX_BODY_BYTES,
    GLOBAL_XUI,
    DocumentKey,
    DocumentRejected,
)
from relayd.consent.permissions import bound_consent, consent_scope
from relayd.consent.policy import check_scope, now_from_clock
from relayd.consent.settle import settle_document
from relayd.consent.store import (
    DocumentWrite,
    ETagCondition,
    IPermissionStore,
    PendingConsent,
    PreconditionFailed,
    StoredDocument,
    StoreUnavailable,
    check_preconditions,
)
from relayd.logs import logger
from relayd.tokens import redact
from relayd.xcap import selector as sel
from relayd.xcap.auth import (
    CAPABILITY_STATES,
    Principal,
    Unauthorized,
    XCAPAuthorizer,
    redact_document,
)
from relayd.xcap.directory import DIRECTORY_DOCUMENT, XCAP_DIRECTORY_AUID, read_directory
from relayd.xcap.errors import (
    CONSTRAINT_FAILURE,
    NO_PARENT,
    XCAP_ERROR_MIME_TYPE,
    XCAPError,
    percent_encoded,
    rejected,
)
from relayd.xcap.usages import (
    USAGES,
    XCAP_ATTRIBUTE_MIME_TYPE,
    XCAP_CAPS_AUID,
    XCAP_ELEMENT_MIME_TYPE,
    XCAP_NAMESPACE_MIME_TYPE,
    ApplicationUsage,
    listed_auids,
    xcap_caps_document,
)
from relayd.xcap.xml import (
    parse_attribute_value,
    parse_document,
    parse_fragment,
    serialize_document,
    serialize_element,
)

DocumentNote = tuple[bytes, str]
"""``(body, content type)`` a successful write is answered with instead of no body."""

DocumentCheck = Callable[[DocumentKey, bytes], DocumentNote | None]
"""A check of a document about to be stored, by the application that reads it: it
raises :class:`~relayd.consent.documents.DocumentRejected` to refuse the write, or
returns a note on what it will make of the document (clients that expect no body on a
200/201 may ignore it)."""

MAX_WRITE_ATTEMPTS = 3
"""Read-modify-write rounds before a node write gives up with 503 (module docstring)."""

RETRY_AFTER_SECONDS = 1

READ_METHODS = ("GET", "HEAD")
WRITE_METHODS = ("PUT", "DELETE")

_ENTITY_TAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|\Z)')


@dataclass
class Response:
    """What one request is answered with; written by :meth:`XCAPResource._send`."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    etag: str | None = None


@dataclass(frozen=True)
class _Conditions:
    """Parsed ``If-Match`` / ``If-None-Match`` (None when the header is absent)."""

    if_match: frozenset[str] | None
    if_none_match: frozenset[str] | None

    @property
    def any(self) -> bool:
        return self.if_match is not None or self.if_none_match is not None


def parse_entity_tags(value: str, *, weak_ok: bool) -> frozenset[str]:
    """``*`` or a comma-separated list of entity tags (RFC 9110 §8.8.3, §13.1).

    ``If-Match`` uses strong comparison, so weak tags can never match and are dropped
    (``weak_ok=False``); ``If-None-Match`` compares weakly, so ``W/"x"`` counts as
    ``"x"``.  Malformed values are 400.
    """
    text = value.strip()
    if text == "*":
        return frozenset({"*"})
    tags: set[str] = set()
    position = 0
    while position < len(text):
        match = _ENTITY_TAG.match(text, position)
        if match is None or match.end() == position:
            raise XCAPError(400, None, "malformed entity-tag list")
        weak, tag = match.groups()
        if weak is None or weak_ok:
            tags.add(tag)
        position = match.end()
    if not tags and not text:
        raise XCAPError(400, None, "empty entity-tag list")
    return frozenset(tags)


def _node_conditions_hold(
    doc_etag: str | None, exists: bool, conditions: _Conditions
) -> tuple[bool, bool]:
    """(If-Match holds, If-None-Match holds) for a node of a document.

    ``*`` is about the node itself; specific tags compare with the document's tag.
    """
    if_match_ok = True
    if conditions.if_match is not None:
        tags = conditions.if_match
        if_match_ok = exists if "*" in tags else doc_etag is not None and doc_etag in tags
    if_none_match_ok = True
    if conditions.if_none_match is not None:
        tags = conditions.if_none_match
        if_none_match_ok = not exists if "*" in tags else doc_etag not in tags
    return if_match_ok, if_none_match_ok


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _header(request: Request, name: str) -> str | None:
    values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
    if not values:
        return None
    raw = b", ".join(values) if isinstance(values[0], bytes) else ", ".join(values)
    return raw.decode("latin-1") if isinstance(raw, bytes) else raw


def _caps_etag(body: bytes) -> str:
    return f'"caps-{hashlib.sha256(body).hexdigest()[:24]}"'


class XCAPResource(Resource):
    """Every XCAP request below the site root (RFC 4825 §6).

    ``root`` is the path prefix of the XCAP root (``/xcap-root``); ``clock`` provides
    "now" for deciding whether a Permission-URI document grants its consent.
    """

    isLeaf = True
    log = logger()

    def __init__(
        self,
        store: IPermissionStore,
        authorizer: XCAPAuthorizer,
        clock: IReactorTime,
        *,
        root: str = "/xcap-root",
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        usages: Mapping[str, ApplicationUsage] = USAGES,
    ) -> None:
        super().__init__()
        self.store = store
        self.authorizer = authorizer
        self.clock = clock
        self.root = root.rstrip("/")
        self.max_body_bytes = max_body_bytes
        self.usages = usages
        self.document_checks: dict[str, DocumentCheck] = {}
        """Per AUID, checks that need more than the document (the SIP side's list
        ownership); each raises DocumentRejected to refuse a write."""
        self._caps = xcap_caps_document(usages)
        self._listed = listed_auids(usages)

    # -- twisted.web boundary --------------------------------------------------------

    def render(self, request: Request) -> Any:
        state = _RequestState()
        request.notifyFinish().addErrback(state.lost)
        d = defer.ensureDeferred(self._handle(request, state))
        d.addErrback(self._internal_error, request, state)
        return NOT_DONE_YET

    def _internal_error(self, failure: Failure, request: Request, state: _RequestState) -> None:
        if failure.check(StoreUnavailable):
            self.log.warn("XCAP {method} {uri}: store unavailable", **state.fields)
            retry = [("Retry-After", str(StoreUnavailable.retry_after))]
            self._send(request, state, Response(503, headers=retry))
            return
        self.log.failure(
            "XCAP {method} {uri} failed",
            failure,
            method=state.method,
            uri=state.log_uri,
        )
        try:
            self._send(request, state, Response(500, headers=[("Connection", "close")]))
        except Exception:
            self.log.failure("XCAP could not answer 500 for {uri}", uri=state.log_uri)

    def _send(self, request: Request, state: _RequestState, response: Response) -> None:
        if state.gone or request.finished:
            return
        request.setResponseCode(response.status)
        if response.etag is not None:
            request.setHeader(b"ETag", response.etag.encode("ascii"))
        if response.content_type is not None:
            request.setHeader(b"Content-Type", response.content_type.encode("ascii"))
        for name, value in response.headers:
            request.setHeader(name.encode("ascii"), value.encode("latin-1"))
        if response.status != 304:
            request.setHeader(b"Content-Length", str(len(response.body)).encode("ascii"))
        if response.body and response.status != 304:
            request.write(response.body)
        request.finish()

    async def _handle(self, request: Request, state: _RequestState) -> None:
        state.method = request.method.decode("ascii", "replace")
        try:
            response = await self._respond(request, state)
        except XCAPError as e:
            response = self._error(e, state)
        except DocumentRejected as e:
            response = self._error(rejected(e), state)
        except Unauthorized as e:
            if state.had_credentials:
                self.log.warn(
                    "XCAP {method} {uri} from {peer}: authentication failed: {reason}",
                    method=state.method,
                    uri=state.log_uri,
                    peer=_peer(request),
                    reason=e.reason,
                )
            response = Response(401, headers=[("WWW-Authenticate", e.challenge)])
        self.log.debug(
            "XCAP {method} {uri} by {user}: {code}",
            method=state.method,
            uri=state.log_uri,
            user=state.principal_label,
            code=response.status,
        )
        self._send(request, state, response)

    def _error(self, error: XCAPError, state: _RequestState) -> Response:
        if error.status >= 500:
            self.log.error("XCAP {method} {uri}: {reason}", reason=str(error), **state.fields)
        elif error.status not in (404, 412):
            self.log.warn(
                "XCAP {method} {uri} by {user} refused: {reason}",
                reason=str(error),
                **state.fields,
            )
        if isinstance(error, _MethodNotAllowed):
            return Response(405, headers=[("Allow", ", ".join(error.allowed))])
        if error.status == 503:
            return Response(503, headers=[("Retry-After", str(RETRY_AFTER_SECONDS))])
        if error.condition is None:
            return Response(error.status)
        if error.condition == NO_PARENT and error.ancestor is not None:
            suffix = f"/~~/{percent_encoded(error.ancestor)}" if error.ancestor else ""
            error.ancestor = state.document_path + suffix
        return Response(error.status, error.to_xml(), XCAP_ERROR_MIME_TYPE)

    # -- request handling ------------------------------------------------------------

    async def _respond(self, request: Request, state: _RequestState) -> Response:
        method = state.method
        try:
            request_uri = request.uri.decode("ascii")
        except UnicodeDecodeError:
            raise XCAPError(400, None, "request URI is not ASCII") from None
        path, _, query = request_uri.partition("?")
        state.document_path = path.split("/~~/", 1)[0]
        state.log_uri = _redact_path(path)  # until parsed: never log a token
        uri = sel.parse_xcap_uri(path, query, root=self.root)
        document = uri.document
        state.log_uri = redact_document(document) + (
            f"/~~/{uri.node.text}" if uri.node is not None else ""
        )
        usage = self.usages[document.auid]
        allowed = self._allowed_methods(usage, uri)
        if method not in allowed:
            raise _MethodNotAllowed(allowed)
        consent = await bound_consent(self.store, document.key)
        principal = self._authorize(request, request_uri, method, document, consent, state)
        state.principal_label = principal.label
        conditions = _Conditions(
            self._tags(request, "If-Match", weak_ok=False),
            self._tags(request, "If-None-Match", weak_ok=True),
        )
        if method in READ_METHODS:
            return await self._get(usage, uri, conditions)
        if method == "DELETE":
            response = await self._delete(usage, uri, conditions, consent)
        else:
            body = self._read_body(request, usage, uri)
            response = await self._put(usage, uri, body, conditions, consent)
        self.log.info(
            "XCAP {method} {uri} by {user}: {code}",
            method=method,
            uri=state.log_uri,
            user=principal.label,
            code=response.status,
        )
        return response

    def _allowed_methods(self, usage: ApplicationUsage, uri: sel.XCAPURI) -> tuple[str, ...]:
        if usage.read_only or (uri.node is not None and uri.node.namespace_selector):
            return READ_METHODS
        return READ_METHODS + WRITE_METHODS

    def _authorize(
        self,
        request: Request,
        request_uri: str,
        method: str,
        document: sel.DocumentSelector,
        consent: PendingConsent | None,
        state: _RequestState,
    ) -> Principal:
        """Capability first (no account needed), then digest and the ownership rule."""
        if consent is not None and consent.state in CAPABILITY_STATES:
            return Principal(None, consent=consent)
        authorization = _header(request, "Authorization")
        state.had_credentials = authorization is not None
        user = self.authorizer.authenticate(method, authorization, request_uri)
        principal = self.authorizer.principal_for(user)
        state.principal_label = principal.label
        if not self.authorizer.may_access(principal, document, write=method in WRITE_METHODS):
            raise XCAPError(403, None, "not your document")
        return principal

    @staticmethod
    def _tags(request: Request, name: str, *, weak_ok: bool) -> frozenset[str] | None:
        value = _header(request, name)
        return None if value is None else parse_entity_tags(value, weak_ok=weak_ok)

    def _read_body(self, request: Request, usage: ApplicationUsage, uri: sel.XCAPURI) -> bytes:
        """The request body after the 413 and 415 checks (RFC 4825 §§8.2.1-8.2.4)."""
        limit = self.max_body_bytes
        length = _header(request, "Content-Length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise XCAPError(400, None, "bad Content-Length") from None
            if declared > limit:
                raise XCAPError(413, None, f"Content-Length {declared} exceeds {limit}")
        expected = self._content_type(usage, uri)
        given = _media_type(_header(request, "Content-Type"))
        if given != expected:
            raise XCAPError(415, None, f"Content-Type must be {expected}, not {given or 'none'}")
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        body: bytes = content.read(limit + 1)
        if len(body) > limit:
            raise XCAPError(413, None, f"body exceeds {limit} bytes")
        return body

    @staticmethod
    def _content_type(usage: ApplicationUsage, uri: sel.XCAPURI) -> str:
        if uri.node is None:
            return usage.mime_type
        if uri.node.attribute is not None:
            return XCAP_ATTRIBUTE_MIME_TYPE
        if uri.node.namespace_selector:
            return XCAP_NAMESPACE_MIME_TYPE
        return XCAP_ELEMENT_MIME_TYPE

    # -- GET -------------------------------------------------------------------------

    async def _read(self, document: sel.DocumentSelector) -> StoredDocument | None:
        if document.auid == XCAP_CAPS_AUID:
            if document.is_global and document.document == "index":
                return StoredDocument(self._caps, _caps_etag(self._caps))
            return None
        if document.auid == XCAP_DIRECTORY_AUID:
            # Generated (relayd.xcap.directory): only users have one, named directory.xml.
            if document.xui is None or document.document != DIRECTORY_DOCUMENT:
                return None
            return await read_directory(self.store, self.root, document.xui, self._listed)
        return await self.store.get_document(
            document.auid, document.xui or GLOBAL_XUI, document.document
        )

    async def _get(
        self, usage: ApplicationUsage, uri: sel.XCAPURI, conditions: _Conditions
    ) -> Response:
        stored = await self._read(uri.document)
        if stored is None:
            raise XCAPError(404, None, "no such document")
        node = uri.node
        if node is None:
            response = Response(200, stored.body, usage.mime_type, etag=stored.etag)
        else:
            root = _parse_stored(stored)
            if node.namespace_selector:
                element = sel.select_element(root, node)
                body = sel.render_namespace_bindings(element)
                response = Response(200, body, XCAP_NAMESPACE_MIME_TYPE, etag=stored.etag)
            elif node.attribute is not None:
                value = sel.select_attribute(root, node)
                body = escape(value, {'"': "&quot;"}).encode("utf-8")
                response = Response(200, body, XCAP_ATTRIBUTE_MIME_TYPE, etag=stored.etag)
            else:
                body = serialize_element(sel.select_element(root, node))
                response = Response(200, body, XCAP_ELEMENT_MIME_TYPE, etag=stored.etag)
        if_match_ok, if_none_match_ok = _node_conditions_hold(stored.etag, True, conditions)
        if not if_match_ok:
            raise XCAPError(412, None, "If-Match does not match")
        if not if_none_match_ok:
            return Response(304, etag=stored.etag)
        return response

    # -- PUT -------------------------------------------------------------------------

    async def _put(
        self,
        usage: ApplicationUsage,
        uri: sel.XCAPURI,
        body: bytes,
        conditions: _Conditions,
        consent: PendingConsent | None,
    ) -> Response:
        if uri.node is None:
            return await self.write_document(
                uri.document,
                body,
                if_match=conditions.if_match,
                if_none_match=conditions.if_none_match,
                consent=consent,
            )
        node = uri.node

        def put_node(root: etree._Element) -> tuple[etree._Element, bool]:
            if node.attribute is not None:
                value = parse_attribute_value(body, self.max_body_bytes)
                return root, sel.put_attribute(root, node, value)
            element = parse_fragment(body, self.max_body_bytes, _scope_namespaces(root, node))
            result = sel.put_element(root, node, element)
            return result.root, result.created

        return await self._modify(usage, uri, conditions, consent, put_node)

    async def write_document(
        self,
        document: sel.DocumentSelector,
        body: bytes,
        *,
        if_match: ETagCondition = None,
        if_none_match: ETagCondition = None,
        consent: PendingConsent | None = None,
    ) -> Response:
        """Store a whole document the way every XCAP PUT does: parse, validate with
        its usage (RFC 4825 §8.2.5), the application's own check, compare-and-set on
        the given conditions (412 when they fail), then settle a Permission-URI
        consent.  The store announces the change to its listeners (the SIP side).

        Also what the admin pages write through, so the two cannot disagree.
        """
        usage = self.usages[document.auid]
        root = parse_document(body, self.max_body_bytes)
        self._validate(usage, root, consent)
        note = self._check_document(document, body)
        try:
            write = await self.store.put_document(
                document.auid,
                document.xui or GLOBAL_XUI,
                document.document,
                body,
                if_match=if_match,
                if_none_match=if_none_match,
            )
        except PreconditionFailed:
            raise XCAPError(412, None, "precondition failed") from None
        await self._after_write(consent, root)
        return _written(201 if write.created else 200, write.etag, note)

    # -- DELETE ----------------------------------------------------------------------

    async def _delete(
        self,
        usage: ApplicationUsage,
        uri: sel.XCAPURI,
        conditions: _Conditions,
        consent: PendingConsent | None,
    ) -> Response:
        document = uri.document
        if uri.node is None:
            if_match: ETagCondition = conditions.if_match
            if conditions.if_none_match is not None:
                # The store's delete knows only If-Match: check If-None-Match on a
                # read, then make the delete conditional on what was read.
                stored = await self._read(document)
                _check_document_conditions(stored, conditions)
                if stored is not None:
                    if_match = stored.etag
            return await self.delete_document(document, if_match=if_match, consent=consent)
        node = uri.node

        def delete_node(root: etree._Element) -> tuple[etree._Element, bool]:
            if node.attribute is not None:
                sel.delete_attribute(root, node)
            else:
                sel.delete_element(root, node)
            return root, False

        return await self._modify(usage, uri, conditions, consent, delete_node, deleting=True)

    async def delete_document(
        self,
        document: sel.DocumentSelector,
        *,
        if_match: ETagCondition = None,
        consent: PendingConsent | None = None,
    ) -> Response:
        """Delete a whole document the way every XCAP DELETE does: compare-and-set on
        ``if_match`` (412; 404 when there is nothing to delete, RFC 9110 §13.2.1), then
        settle a Permission-URI consent as withdrawn.

        Also what the admin pages delete through."""
        xui = document.xui or GLOBAL_XUI
        try:
            deleted = await self.store.delete_document(
                document.auid, xui, document.document, if_match=if_match
            )
        except PreconditionFailed as e:
            if e.current_etag is None:
                raise XCAPError(404, None, "no such document") from None
            raise XCAPError(412, None, "precondition failed") from None
        if not deleted:
            raise XCAPError(404, None, "no such document")
        await self._after_write(consent, None)
        return Response(200)

    # -- shared read-modify-write ----------------------------------------------------

    async def _modify(
        self,
        usage: ApplicationUsage,
        uri: sel.XCAPURI,
        conditions: _Conditions,
        consent: PendingConsent | None,
        change: Callable[[etree._Element], tuple[etree._Element, bool]],
        *,
        deleting: bool = False,
    ) -> Response:
        """Apply ``change`` to the stored document under compare-and-set.

        ``change(root) -> (new root, whether a node was created)``.  See the
        module docstring for why a lost race is retried rather than answered 412.
        """
        document = uri.document
        node = uri.node
        assert node is not None
        xui = document.xui or GLOBAL_XUI
        for _attempt in range(MAX_WRITE_ATTEMPTS):
            stored = await self._read(document)
            # RFC 9110 §13.2.1: a DELETE of nothing is 404 whatever the preconditions.
            if stored is None:
                if deleting:
                    raise XCAPError(404, None, "no such document")
                if conditions.if_match is not None:
                    raise XCAPError(412, None, "If-Match: the document does not exist")
                raise XCAPError(409, NO_PARENT, "the document does not exist")
            root = _parse_stored(stored)
            exists = _node_exists(root, node)
            if deleting and not exists:
                raise XCAPError(404, None, "node selector selects nothing")
            if_match_ok, if_none_match_ok = _node_conditions_hold(stored.etag, exists, conditions)
            if not (if_match_ok and if_none_match_ok):
                raise XCAPError(412, None, "precondition failed")
            root, created = change(root)
            self._validate(usage, root, consent)
            new_body = serialize_document(root)
            if len(new_body) > self.max_body_bytes:
                raise XCAPError(
                    409, CONSTRAINT_FAILURE, f"document would exceed {self.max_body_bytes} bytes"
                )
            note = self._check_document(document, new_body)
            try:
                write: DocumentWrite = await self.store.put_document(
                    document.auid, xui, document.document, new_body, if_match=stored.etag
                )
            except PreconditionFailed:
                self.log.debug(
                    "XCAP write to {uri} raced another writer; retrying",
                    uri=redact_document(document),
                )
                continue
            await self._after_write(consent, root)
            return _written(201 if created else 200, write.etag, note)
        raise XCAPError(503, None, "too many concurrent writers")

    def _validate(
        self, usage: ApplicationUsage, root: etree._Element, consent: PendingConsent | None
    ) -> None:
        """Usage rules (RFC 4825 §5), plus the Permission-URI scope (consent spec §(c))."""
        usage.validate(root)
        if consent is not None:
            check_scope(root, consent_scope(consent))

    def _check_document(self, document: sel.DocumentSelector, body: bytes) -> DocumentNote | None:
        check = self.document_checks.get(document.auid)
        return check(document.key, body) if check is not None else None

    async def _after_write(
        self, consent: PendingConsent | None, root: etree._Element | None
    ) -> None:
        """Settle the consent a Permission-URI document answers (``root`` None: deleted),
        by the one rule for what a permission change releases
        (:func:`relayd.consent.settle.settlement`)."""
        if consent is None:
            return
        try:
            state = await settle_document(self.store, consent, root, now_from_clock(self.clock))
        except Exception:
            # The document is stored and the SIP side evaluates documents, so the
            # answer still takes effect; only the consent record lags.
            self.log.failure("marking consent {consent} failed", consent=consent.id)
            return
        if state is None:
            return
        self.log.info(
            "permission {state}: {recipient} answered {sender} via {list_uri}",
            state=state,
            recipient=consent.recipient,
            sender=consent.sender,
            list_uri=consent.list_uri,
        )


class _MethodNotAllowed(XCAPError):
    def __init__(self, allowed: Sequence[str]) -> None:
        super().__init__(405, None, "method not allowed")
        self.allowed = tuple(allowed)


@dataclass
class _RequestState:
    """Per-request facts for logging and for not writing to a closed connection."""

    method: str = "?"
    log_uri: str = "?"
    document_path: str = ""
    principal_label: str = "-"
    had_credentials: bool = False
    gone: bool = False

    def lost(self, failure: Failure) -> None:
        self.gone = True

    @property
    def fields(self) -> dict[str, str]:
        return {"method": self.method, "uri": self.log_uri, "user": self.principal_label}


_TOKEN_IN_PATH = re.compile(r"p-([A-Za-z0-9_-]{16,128})\.xml")


def _redact_path(path: str) -> str:
    return _TOKEN_IN_PATH.sub(lambda match: f"p-<{redact(match[1])}>.xml", path)


def _peer(request: Request) -> str:
    return _address_text(request.getClientAddress())


def _address_text(address: Any) -> str:
    host = getattr(address, "host", None)
    return f"{host}:{getattr(address, 'port', '?')}" if host is not None else str(address)


def _parse_stored(stored: StoredDocument) -> etree._Element:
    # Stored documents were validated on the way in; only the size bound is relaxed.
    return parse_document(stored.body, max(len(stored.body), 1))


def _written(status: int, etag: str, note: DocumentNote | None) -> Response:
    """A write's success response, carrying the document check's note if it made one."""
    if note is None:
        return Response(status, etag=etag)
    return Response(status, note[0], note[1], etag=etag)


def _check_document_conditions(stored: StoredDocument | None, conditions: _Conditions) -> None:
    try:
        check_preconditions(
            stored.etag if stored is not None else None,
            conditions.if_match,
            conditions.if_none_match,
        )
    except PreconditionFailed:
        raise XCAPError(412, None, "precondition failed") from None


def _node_exists(root: etree._Element, node: sel.NodeSelector) -> bool:
    select = sel.select_attribute if node.attribute is not None else sel.select_element
    try:
        select(root, node)
    except XCAPError:
        return False
    return True


def _scope_namespaces(root: etree._Element, node: sel.NodeSelector) -> dict[str | None, str]:
    """Bindings in scope where an element PUT lands (RFC 4825 §7.4): its parent's."""
    if len(node.steps) > 1:
        parent = sel.NodeSelector(node.steps[:-1])
        try:
            return dict(sel.select_element(root, parent).nsmap)
        except XCAPError:
            pass
    return dict(root.nsmap)


# -- the Site ------------------------------------------------------------------------

DEFAULT_MAX_HEADER_BYTES = 16384
DEFAULT_HEADER_TIMEOUT_SECONDS = 10
DEFAULT_MAX_CONNECTIONS = 256

REFUSAL_LINGER_SECONDS = 2
"""How long a refused connection may stay open for the client to read its answer."""


class XCAPRequest(Request):
    """A request that buffers at most the site's ``max_body_bytes`` of body.

    A declared ``Content-Length`` over the limit never gets here (the channel answers
    413 at once); a chunked body is counted as it arrives and refused the same way the
    moment it passes the limit.
    """

    channel: XCAPChannel
    _body_bytes = 0

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel.refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.channel.site.max_body_bytes:
            self.channel.refuse(413, f"body of more than {self.channel.site.max_body_bytes} bytes")
            return
        super().handleContentChunk(data)


class XCAPChannel(HTTPChannel):
    """HTTP/1.1 for the XCAP site, with an answer at once for every limit.

    twisted.web closes an over-long header line without a word, reads a body it is
    going to refuse, and lets a client trickle its request head one byte per idle
    timeout for ever.  Here, with the :class:`XCAPSite`'s limits:

    * a ``Content-Length`` above ``max_body_bytes`` is 413 as soon as the head is
      read, before any of the body (RFC 9110 §15.5.14); a chunked body, the moment
      it passes the limit;
    * a request line or header block above ``max_header_bytes`` is 414 or 431
      (RFC 9110 §15.5.15, RFC 6585 §5);
    * the request head must be complete ``header_timeout_seconds`` after the
      connection opens or the previous response went out, else 408 (RFC 9110
      §15.5.9); a connection that sent nothing of a next request is just closed;
    * beyond ``max_connections`` open connections, a new one is aborted at once.

    A refused connection is closed: what follows on it cannot be framed.  Its
    answer goes first, the client's further bytes are read and dropped for up to
    :data:`REFUSAL_LINGER_SECONDS` so that a close with unread data (a TCP reset)
    does not destroy the answer, then it is aborted.
    """

    site: XCAPSite
    log = logger()
    refused = False
    _admitted = False
    _head_started = False
    _head_timer: IDelayedCall | None = None
    _linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        if not self.site.admit():
            self.refused = True
            self._transport.abortConnection()
            return
        self._admitted = True
        self.MAX_LENGTH = self.totalHeadersSize = self.site.max_header_bytes
        super().connectionMade()
        self._await_head()

    @property
    def _transport(self) -> Any:
        return self.transport

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_head_timer()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        if self._admitted:
            self._admitted = False
            self.site.release()
        super().connectionLost(reason)

    # -- the request head ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if self._head_timer is not None:
            self._head_started = True
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse_head()
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse_head()

    def _refuse_head(self) -> None:
        limit = self.site.max_header_bytes
        if self._receivedHeaderSize == 0:
            self.refuse(414, f"request line of more than {limit} bytes")
        else:
            self.refuse(431, f"request head of more than {limit} bytes")

    def allHeadersReceived(self) -> None:
        self._stop_head_timer()
        limit = self.site.max_body_bytes
        if self.length is not None and self.length > limit:
            self.refuse(413, f"Content-Length {self.length} above {limit}")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self.refused:
            super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Before the base class replays what the client pipelined: that may be the
        # next head already, which stops the timer again.
        if self.persistent and not self.refused:
            self._await_head()
        super().requestDone(request)

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_started = False
        self._head_timer = self.callLater(self.site.header_timeout_seconds, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_started:
            self.refuse(408, f"no request head in {self.site.header_timeout_seconds} s")
        else:
            self.loseConnection()  # idle between requests: nothing to answer

    # -- refusing --------------------------------------------------------------------

    def refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` with ``Connection: close`` and close (class docstring)."""
        if self.refused:
            return
        self.refused = True
        self._stop_head_timer()
        self.log.warn(
            "XCAP request from {peer} refused {status}: {reason}",
            peer=_address_text(self._transport.getPeer()),
            status=status,
            reason=reason,
        )
        phrase = RESPONSES.get(status, b"Refused")
        self._transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (status, phrase)
        )
        half_close = getattr(self._transport, "loseWriteConnection", None)
        if self.isSecure() or half_close is None:
            self.loseConnection()  # TLS: close_notify, and reads go on until the peer's
        else:
            half_close()
        self._linger = self.callLater(REFUSAL_LINGER_SECONDS, self._transport.abortConnection)


_COUNTED_METHODS = frozenset(("GET", "PUT", "DELETE", "HEAD", "OPTIONS", "POST"))
"""Methods counted by name; any other is "other", so a client cannot grow the counts."""


class XCAPSite(Site):
    """The XCAP site: bounded bodies, heads and connections; no access log.

    HTTP/1.1 only (:class:`XCAPChannel`; no HTTP/2 upgrade, whose framing would
    bypass these limits).  twisted.web's access log would write every request path,
    Permission-URI tokens included; the resource logs each request itself with the
    token redacted.
    """

    protocol = XCAPChannel  # type: ignore[assignment]
    requestFactory: ClassVar[Any] = XCAPRequest  # type: ignore[misc]
    events = logger()  # ``log`` is the access log, switched off below

    def __init__(
        self,
        resource: XCAPResource,
        *,
        max_body_bytes: int,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT_SECONDS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        timeout_seconds: float = 60,
        reactor: IReactorTime | None = None,
    ) -> None:
        super().__init__(resource, timeout=timeout_seconds, reactor=reactor)
        self.xcap = resource
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.header_timeout_seconds = header_timeout_seconds
        self.max_connections = max_connections
        self.connections = 0
        self._full = False
        self.requests: Counter[tuple[str, int]] = Counter()
        """Finished requests by method and status code (read by relayd.web.metrics)."""
        self.mounts: dict[bytes, Resource] = {}

    def mount(self, name: str, resource: Resource) -> None:
        """Serve ``resource`` at ``/<name>/``, outside the XCAP root (the admin page,
        the consent links' pages).

        The XCAP resource is a leaf that parses the whole request URI itself, so other
        resources sit beside it here rather than as its children."""
        if self.xcap.root.lstrip("/").split("/", 1)[0] == name:
            raise ValueError(f"/{name}/ is inside the XCAP root {self.xcap.root}")
        self.mounts[name.encode("ascii")] = resource

    def getResourceFor(self, request: Request) -> Any:
        postpath = request.postpath or []
        mounted = self.mounts.get(postpath[0]) if postpath else None
        if mounted is None:
            return super().getResourceFor(request)
        request.site = self
        request.sitepath = list(request.prepath or [])  # type: ignore[attr-defined]
        request.prepath = [*(request.prepath or []), postpath.pop(0)]
        return getChildForRequest(mounted, request)

    def admit(self) -> bool:
        """Count a new connection in, or say it is one too many (logged once per spell)."""
        if self.connections >= self.max_connections:
            if not self._full:
                self._full = True
                self.events.warn(
                    "XCAP has {count} connections open, its limit: refusing new ones",
                    count=self.connections,
                )
            return False
        self.connections += 1
        return True

    def release(self) -> None:
        self.connections -= 1
        if self._full and self.connections < self.max_connections:
            self._full = False
            self.events.info("XCAP accepts connections again")

    def log(self, request: Any) -> None:
        """Called by twisted.web as each request finishes: counted, not logged."""
        method = request.method.decode("ascii", "replace")
        self.requests[method if method in _COUNTED_METHODS else "other", request.code] += 1
