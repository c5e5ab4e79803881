"""The HTTPS grant and deny links (RFC 5360 §5.8): a page a person answers with.

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
from html import escape
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relayd.consent.answer import (
    ACTIONS,
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

CONSENT_PATH = b"/consent/"
"""Where the links live on the XCAP site, beside (not below) the XCAP root."""

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


def consent_link_path(record: PendingConsent, action: Action) -> str:
    """The path of ``record``'s HTTPS ``action`` link, below the site's origin."""
    return f"{CONSENT_PATH.decode()}{action}/{answer_token(record, action)}"


class ConsentPage(Resource):
    """Every request below :data:`CONSENT_PATH` (module doc)."""

    isLeaf = True
    log = logger()

    def __init__(
        self, store: IPermissionStore, clock: IReactorTime, csrf_key: bytes | None = None
    ) -> None:
        super().__init__()
        self.store = store
        self.clock = clock
        self._csrf_key = csrf_key or secrets.token_bytes(32)

    def render(self, request: Request) -> Any:
        for name, value in _HEADERS:
            request.setHeader(name, value)
        d = defer.ensureDeferred(self._handle(request))
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _failed(self, failure: Any, request: Request) -> None:
        self.log.failure("consent page failed", failure)
        if not request.finished:
            self._page(request, 500, "Something went wrong", "<p>Please try again later.</p>")

    def csrf(self, token: str, nonce: str) -> str:
        return hmac.new(self._csrf_key, f"{token}\0{nonce}".encode(), hashlib.sha256).hexdigest()

    async def _handle(self, request: Request) -> None:
        method = request.method
        parts = request.path[len(CONSENT_PATH) :].decode("ascii", "replace").split("/")
        if method not in (b"GET", b"HEAD", b"POST"):
            request.setHeader(b"Allow", b"GET, HEAD, POST")
            self._page(request, 405, "Not allowed", "")
            return
        now = self.clock.seconds()
        record = None
        if len(parts) == 2 and parts[0] in ACTIONS:
            action: Action = "grant" if parts[0] == "grant" else "deny"
            token = parts[1]
            record = await find_answer(self.store, token, action, now)
        if record is None:
            self._page(
                request, 404, "Link not valid", "<p>This link is unknown or has expired.</p>"
            )
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
            self._page(request, 403, "Form expired", "<p>Please open the link again.</p>")
            return
        if chosen not in ACTIONS:
            self._page(request, 400, "Nothing chosen", "<p>Choose Allow or Deny.</p>")
            return
        action: Action = "grant" if chosen == "grant" else "deny"
        if not link_acts(record, answer_token(record, action), action, self.clock.seconds()):
            self._page(request, 409, "Too late", "<p>This request is no longer open.</p>")
            return
        await answer(self.store, record, action, self.clock)
        self._logged(record, action, "page")
        verb = "allowed" if action == "grant" else "refused"
        self._page(
            request,
            200,
            "Done",
            f"<p>You {verb} {escape(record.sender)} to reach you through"
            f" {escape(record.list_uri)}.</p>",
        )

    def _form(self, request: Request, record: PendingConsent, token: str, now: float) -> None:
        nonce = secrets.token_urlsafe(16)
        methods = ", ".join(requested_methods(record))
        can_grant = link_acts(record, answer_token(record, "grant"), "grant", now)
        buttons = (
            '<button type="submit" name="action" value="grant">Allow</button> ' if can_grant else ""
        ) + '<button type="submit" name="action" value="deny">Deny</button>'
        body = (
            f"<p><strong>{escape(record.sender)}</strong> asks to send you"
            f" <strong>{escape(methods)}</strong> requests through the list"
            f" <strong>{escape(record.list_uri)}</strong>.</p>"
            f'<form method="post" action="">'
            f'<input type="hidden" name="nonce" value="{nonce}">'
            f'<input type="hidden" name="csrf" value="{self.csrf(token, nonce)}">'
            f"{buttons}</form>"
        )
        self._page(request, 200, "Consent request", body)

    def _page(self, request: Request, status: int, title: str, body: str) -> None:
        page = (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width">'
            f"<title>{escape(title)}</title></head><body><h1>{escape(title)}</h1>{body}"
            "</body></html>"
        ).encode()
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
