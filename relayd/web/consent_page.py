"""The HTTPS grant and deny links (RFC 5360 §5.6): a page a person answers with.

``/consent/grant/<token>`` and ``/consent/deny/<token>`` on the XCAP listeners (tokens:
:mod:`relayd.consent.answer`). What each request does:

* ``GET`` from a browser (or a link preview, a prefetcher, a mail scanner) only shows a
  page naming the sender, the list and the methods, with Allow and Deny buttons: a form
  that POSTs back, no JavaScript. It never changes anything.
* ``POST`` of that form acts: its CSRF field is an HMAC, under a key of this process,
  of the link's token and a per-page nonce, so only a form this relay served for this
  link is accepted.
* ``GET`` whose ``Accept`` names ``application/auth-policy+xml`` acts at once, as RFC 5360
  has a request to the grant/deny URI do; the answer is the document written. No
  browser or prefetcher asks for that type, so this is how a consent-aware client is
  told apart.

Responses are ``Cache-Control: no-store`` and ``Referrer-Policy: no-referrer`` (the
token is in the URL), framed by nobody and with a CSP that allows no script.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relayd.consent.additions import is_whole_list
from relayd.consent.answer import (
    ACTIONS,
    LINK_PATH,
    Action,
    answer,
    answer_document,
    answer_token,
    find_answer,
    link_acts,
)
from relayd.consent.permissions import requested_methods
from relayd.consent.store import IPermissionStore, PendingConsent
from relayd.consent.vocabulary import CONSENT_RULES_MIME_TYPE
from relayd.logs import logger
from relayd.tokens import redact
from relayd.web.templating import environment

CONSENT_PATH = LINK_PATH.encode("ascii")

_HEADERS = (
    (b"Cache-Control", b"no-store"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Frame-Options", b"DENY"),
    (b"X-Content-Type-Options", b"nosniff"),
    (
        b"Content-Security-Policy",
        b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    ),
)


class ConsentPage(Resource):
    """Every request below :data:`CONSENT_PATH` (module doc)."""

    isLeaf = True
    log = logger()

    def __init__(
        self, store: IPermissionStore, clock: IReactorTime, *, secret: bytes | None = None
    ) -> None:
        """``secret`` keys the forms' CSRF fields: every process serving the same links
        (workers, a restart between GET and POST) must share it; none draws one."""
        super().__init__()
        self.store = store
        self.clock = clock
        self._csrf_key = secret if secret is not None else secrets.token_bytes(32)
        self._template = environment().get_template("consent.html")

    def render(self, request: Request) -> Any:
        for name, value in _HEADERS:
            request.setHeader(name, value)
        d = defer.ensureDeferred(self._handle(request))
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _failed(self, failure: Any, request: Request) -> None:
        self.log.failure("consent page failed", failure)
        if not request.finished:
            self._page(request, 500, "Something went wrong", "Please try again later.")

    def csrf(self, token: str, nonce: str) -> str:
        return hmac.new(self._csrf_key, f"{token}\0{nonce}".encode(), hashlib.sha256).hexdigest()

    async def _handle(self, request: Request) -> None:
        method = request.method
        parts = request.path[len(CONSENT_PATH) :].decode("ascii", "replace").split("/")
        if method not in (b"GET", b"HEAD", b"POST"):
            request.setHeader(b"Allow", b"GET, HEAD, POST")
            self._page(request, 405, "Not allowed", "This address takes GET and POST only.")
            return
        now = self.clock.seconds()
        record = None
        if len(parts) == 2 and parts[0] in ACTIONS:
            action: Action = "grant" if parts[0] == "grant" else "deny"
            token = parts[1]
            record = await find_answer(self.store, token, action, now)
        if record is None:
            self._page(request, 404, "Link not valid", "This link is unknown or has expired.")
            return
        if method == b"POST":
            await self._post(request, record, token)
        elif method == b"GET" and CONSENT_RULES_MIME_TYPE in _header(request, b"Accept"):
            await answer(self.store, record, action, self.clock)
            self._logged(record, action, "link")
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", CONSENT_RULES_MIME_TYPE.encode("ascii"))
            body = answer_document(record, action)
            request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
            request.write(body)
            request.finish()
        else:
            self._form(request, record, token, now)

    async def _post(self, request: Request, record: PendingConsent, token: str) -> None:
        args = request.args or {}
        nonce = _arg(args, b"nonce")
        sent = _arg(args, b"csrf")
        chosen = _arg(args, b"action")
        if not (nonce and sent and hmac.compare_digest(sent, self.csrf(token, nonce))):
            self._page(request, 403, "Form expired", "Please open the link again.")
            return
        if chosen not in ACTIONS:
            self._page(request, 400, "Nothing chosen", "Choose Allow or Deny.")
            return
        action: Action = "grant" if chosen == "grant" else "deny"
        if not link_acts(record, answer_token(record, action), action, self.clock.seconds()):
            self._page(request, 409, "Too late", "This request is no longer open.")
            return
        await answer(self.store, record, action, self.clock)
        self._logged(record, action, "page")
        verb = "allowed" if action == "grant" else "refused"
        self._page(
            request,
            200,
            "Done",
            f"You {verb} {_who(record)} to reach you through {record.list_uri}.",
        )

    def _form(self, request: Request, record: PendingConsent, token: str, now: float) -> None:
        nonce = secrets.token_urlsafe(16)
        ask = {
            "sender": _who(record).capitalize() if is_whole_list(record) else record.sender,
            "methods": ", ".join(requested_methods(record)),
            "list_uri": record.list_uri,
            "nonce": nonce,
            "csrf": self.csrf(token, nonce),
            "can_grant": link_acts(record, answer_token(record, "grant"), "grant", now),
        }
        self._page(request, 200, "Consent request", ask=ask)

    def _page(
        self,
        request: Request,
        status: int,
        title: str,
        message: str = "",
        ask: dict[str, Any] | None = None,
    ) -> None:
        """The page (``consent.html``): a consent request's form, or one message."""
        page = self._template.render(title=title, message=message, ask=ask).encode()
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Length", str(len(page)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(page)
        request.finish()

    def _logged(self, record: PendingConsent, action: Action, how: str) -> None:
        self.log.info(
            "consent {consent} answered {action} by its {how} link ({token})",
            consent=record.id,
            action=action,
            how=how,
            token=redact(record.permission_token),
        )


def _header(request: Request, name: bytes) -> str:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else ""


def _arg(args: dict[bytes, list[bytes]], name: bytes) -> str:
    values = args.get(name) or [b""]
    return values[0].decode("ascii", "replace")


def _who(record: PendingConsent) -> str:
    """Who ``record`` asks for: its sender, or every sender of its list (RFC 5360 §5.3,
    :mod:`relayd.consent.additions`)."""
    return "every sender of the list" if is_whole_list(record) else record.sender
