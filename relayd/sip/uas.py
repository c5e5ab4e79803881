"""UAS core (RFC 3261 §8.2): method dispatch above the transaction layer.

An explicit method table: OPTIONS (§11) and CANCEL (§9.2) are answered here, REGISTER goes
to the :class:`~relayd.sip.registrar.Registrar`, and INVITE, MESSAGE, CONSENT, SUBSCRIBE
(and any other method the consent relay adds) go to handlers plugged in with
:meth:`UASCore.set_handler`. A known method without a handler gets 405 + Allow, an
unknown one 501 (§8.2.1). Before dispatch: load shedding (a stateless 503 + Retry-After,
§21.5.4), the Request-URI (416 for a scheme other than sip/sips, then the composer's
:attr:`UASCore.request_uri_check`, 404, §8.2.2.1), ``Require`` (420 + Unsupported,
§8.2.2.3) and loop detection (482, §16.3 step 4). OPTIONS and load shedding leave no
server transaction behind (:meth:`UASCore.stateless`).

Also here, for the relay that forwards requests: :func:`check_max_forwards` (§16.3 step 3,
483) and :class:`LoopDetector`, whose branch values carry a keyed hash of the request so a
request that comes back unchanged is recognised (§16.6 step 8; the hash leaves out the
top Via, which changes on every hop and would defeat detection).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from relayd.consent.store import StoreUnavailable
from relayd.logs import logger
from relayd.sip.message import (
    KNOWN_METHODS,
    MAGIC_COOKIE,
    SIPHeaderError,
    SIPRequest,
    SIPResponse,
    SIPStatus,
    make_response,
    response_for_status,
    stateless_tag,
)
from relayd.sip.registrar import Registrar
from relayd.sip.transaction import ServerTransaction, TransactionLayer, TransactionState
from relayd.tokens import random_bytes

__all__ = [
    "HOOK_METHODS",
    "Capabilities",
    "Handler",
    "LoopDetector",
    "RequestURICheck",
    "UASCore",
    "check_max_forwards",
    "transaction_pressure",
]


HOOK_METHODS = ("INVITE", "MESSAGE", "CONSENT", "SUBSCRIBE")
"""Methods the consent relay plugs in (STYLE 2.4)."""

Handler = Callable[[ServerTransaction, SIPRequest], object]
"""``handler(txn, request)`` returns a :class:`SIPResponse` (sent at once), ``None`` (the
handler calls ``txn.respond`` itself, now or later) or an awaitable/Deferred resolving to
a response. Raising (or failing with) :class:`SIPStatus` answers that status."""

RequestURICheck = Callable[[SIPRequest], None]
"""Raises :class:`SIPStatus` (404) when a request's Request-URI names nothing served here."""

Screen = Callable[[SIPRequest], SIPResponse | None]
"""A stateless answer for a method's requests, or ``None`` to handle them in a transaction."""

DEFAULT_MAX_FORWARDS = 70
"""§8.1.1.6: what a request we originate starts with."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Values advertised in OPTIONS (§11.2) and used for 415/420; set by the composer."""

    accept: tuple[str, ...] = ()
    allow_events: tuple[str, ...] = ()
    supported: tuple[str, ...] = ()


def check_max_forwards(request: SIPRequest) -> int:
    """§16.3 step 3 for a request about to be forwarded: 483 at zero; returns the value
    for the forwarded copy (decremented, or 70 when absent, §16.6 step 3)."""
    value = request.max_forwards
    if value is None:
        return DEFAULT_MAX_FORWARDS
    if value <= 0:
        raise SIPStatus(483)
    return value - 1


class LoopDetector:
    """Loop detection through our own Via branches (§16.3 step 4, §16.6 step 8).

    :meth:`branch` yields ``z9hG4bK-rl-<hash>.<random>``: the hash covers Request-URI,
    From/To tags, Call-ID, CSeq and Proxy-Require under a per-process key, the random part
    keeps the branch unique per transaction. A request carrying a Via with one of our
    sent-by values and a branch whose hash equals that of the request as received is a
    loop (482); a different hash is a spiral (e.g. the Request-URI was rewritten).
    """

    PREFIX = MAGIC_COOKIE + "-rl-"

    def __init__(
        self, own_sent_by: Callable[[], Iterable[tuple[str, int | None]]], key: bytes | None = None
    ) -> None:
        self._own_sent_by = own_sent_by
        self._key = key or secrets.token_bytes(32)

    def loop_hash(self, request: SIPRequest) -> str:
        h = request.headers
        material = "\0".join(
            (
                request.uri.format(),
                request.from_tag or "",
                request.to_tag or "",
                request.call_id or "",
                h.get("cseq", ""),
                ",".join(h.get_all("proxy-require")),
            )
        )
        return hmac.new(self._key, material.encode("utf-8"), hashlib.sha256).hexdigest()[:20]

    def branch(self, request: SIPRequest) -> str:
        """Branch for the Via we push when forwarding ``request`` (as received)."""
        return self.branch_for(self.loop_hash(request))

    def branch_for(self, loop_hash: str) -> str:
        """Branch from a :meth:`loop_hash` already computed (one per fork, not per copy)."""
        return f"{self.PREFIX}{loop_hash}.{random_bytes(8).hex()}"

    def is_loop(self, request: SIPRequest) -> bool:
        rows = request.headers.get_raw("via")
        if not any(self.PREFIX in row for row in rows):
            return False  # the common case: none of our branches, no parsing
        try:
            vias = request.vias
        except SIPHeaderError:
            return False
        own = set(self._own_sent_by())
        mine = self.loop_hash(request)
        for via in vias:
            branch = via.branch or ""
            if (
                branch.startswith(self.PREFIX)
                and via.sent_by in own
                and hmac.compare_digest(branch[len(self.PREFIX) :].split(".", 1)[0], mine)
            ):
                return True
        return False


def transaction_pressure(layer: TransactionLayer, fraction: float = 0.9) -> Callable[[], bool]:
    """An ``overloaded`` hook: true above ``fraction`` of the layer's transaction cap, so
    the UAS sheds load (a stateless 503, :meth:`UASCore.stateless`) before the
    layer's own stateless 503 at the hard limit."""
    threshold = int(layer.max_server_transactions * fraction)
    return lambda: layer.server_transaction_count > threshold


class UASCore:
    """The transaction user (``ITransactionUser``) for requests addressed to the relay."""

    log = logger()

    def __init__(
        self,
        capabilities: Capabilities | None = None,
        *,
        registrar: Registrar | None = None,
        handlers: dict[str, Handler] | None = None,
        overloaded: Callable[[], bool] | None = None,
        retry_after_seconds: int = 5,
        loop_detector: LoopDetector | None = None,
    ) -> None:
        self.capabilities = capabilities or Capabilities()
        self.registrar = registrar
        self.overloaded = overloaded
        self.shed = 0
        """Requests answered 503 because ``overloaded`` said so (load shed)."""
        self.retry_after_seconds = retry_after_seconds
        self.loop_detector = loop_detector
        self.request_uri_check: RequestURICheck | None = None
        #: ``router(request)``: the handler of a request routed through the relay (its
        #: top Route is ours, §16.4), whatever its method and Request-URI, or ``None``;
        #: asked before the method table. CANCEL stays hop by hop (§16.10).
        self.router: Callable[[SIPRequest], Handler | None] | None = None
        #: Told of every REGISTER the registrar accepted, with its source: the transport
        #: keeps the connection it came over as the way to its contacts (RFC 5626 §5).
        self.registered: Callable[[SIPRequest, SIPResponse, object], object] | None = None
        self.transactions: TransactionLayer | None = None
        self._handlers: dict[str, Handler] = {}
        self._screens: dict[str, Screen] = {"OPTIONS": self._options_stateless}
        self._table: dict[str, Handler] = {}
        self._allow = ""
        self._cancellable: tuple[str, ...] = ()
        for method, handler in (handlers or {}).items():
            self._handlers[method.upper()] = handler
        self._rebuild()

    def attach(self, transactions: TransactionLayer) -> None:
        """Needed for CANCEL matching (§9.2); screens new requests (:meth:`stateless`)."""
        self.transactions = transactions
        transactions.screen = self.stateless

    def set_handler(self, method: str, handler: Handler | None) -> None:
        """Plug (or unplug, with ``None``) the handler for ``method``; Allow follows."""
        method = method.upper()
        if method in ("OPTIONS", "CANCEL", "ACK"):
            raise ValueError(f"{method} is handled by the UAS core itself")
        if handler is None:
            self._handlers.pop(method, None)
        else:
            self._handlers[method] = handler
        self._rebuild()

    def set_screen(self, method: str, screen: Screen | None) -> None:
        """Plug (or unplug) a stateless answer for ``method`` (see :meth:`stateless`)."""
        if screen is None:
            self._screens.pop(method.upper(), None)
        else:
            self._screens[method.upper()] = screen

    def stateless(self, request: SIPRequest) -> SIPResponse | None:
        """The answer to ``request`` when it needs no server transaction, else ``None``.

        While overloaded, every new request but CANCEL gets its 503 here: shedding that
        made a transaction per shed request would grow, for 64·T1 each, exactly the
        state an overload (or a flood) must not grow (§21.5.4; a retransmission just
        gets another 503). Requests of a dialog routed through us (the :attr:`router`
        takes them) pass: a BYE shed would leave its call up at both ends, and the
        work was accepted with the dialog (RFC 7339 §5.10.1 ranks in-dialog requests
        above new ones). Otherwise a method's screen gives it: OPTIONS has one from
        the start (§11: the answer depends on nothing but the request, and the To tag
        comes out the same for a retransmission, §8.2.7), a handler may bring one (a
        digest challenge, which a proxy may send statelessly), asked only when
        :meth:`request` would reach that handler. Each of them only when the Request-URI
        passes, nothing is required that we lack and the request is no loop; everything
        else takes the stateful path.
        """
        method = request.method
        if (
            method != "CANCEL"
            and self.overloaded is not None
            and self.overloaded()
            and self._routed(request) is None
        ):
            self.shed += 1
            retry = [("Retry-After", str(self.retry_after_seconds))]
            return make_response(request, 503, headers=retry, to_tag=stateless_tag(request))
        screen = self._screens.get(method)
        if screen is None or method not in self._table or self._routed(request) is not None:
            return None
        answer = screen(request)  # first: it passes most requests, and cheaply
        if answer is None:
            return None
        try:
            self._check_request_uri(request)
        except SIPStatus:
            return None
        if self._unsupported(request):
            return None
        detector = self.loop_detector
        if detector is not None and detector.is_loop(request):
            return None
        return answer

    def _rebuild(self) -> None:
        table: dict[str, Handler] = {"OPTIONS": self._options, "CANCEL": self._cancel}
        if self.registrar is not None:
            table["REGISTER"] = self._register
        table.update(self._handlers)
        self._table = table
        self._allow = ", ".join(sorted({*table, "ACK"}))
        # Methods whose server transactions a CANCEL may find: those we answer at all.
        self._cancellable = tuple(sorted(KNOWN_METHODS.union(table)))

    @property
    def allow(self) -> str:
        """The ``Allow`` value: every method with a handler (ACK is always accepted)."""
        return self._allow

    # -- ITransactionUser ---------------------------------------------------------------

    def _routed(self, request: SIPRequest) -> Handler | None:
        router = self.router
        if router is None or request.method == "CANCEL" or "route" not in request.headers:
            return None
        return router(request)

    def request(self, txn: ServerTransaction, request: SIPRequest) -> None:
        method = request.method
        routed = self._routed(request)
        if routed is not None:  # §16.4: ours to forward, not to answer
            self._finish(txn, request, routed(txn, request))
            return
        handler = self._table.get(method)
        if handler is None:
            if method in KNOWN_METHODS:
                raise SIPStatus(405, headers=[("Allow", self._allow)])
            raise SIPStatus(501)
        if method != "CANCEL":  # §9.2: matched to its request, whatever it names
            self._check_request_uri(request)
            unsupported = self._unsupported(request)
            if unsupported:
                raise SIPStatus(420, headers=[("Unsupported", ", ".join(unsupported))])
            detector = self.loop_detector
            if detector is not None and detector.is_loop(request):
                self.log.warn("loop detected for {method} {uri}", method=method, uri=request.uri)
                raise SIPStatus(482)
        self._finish(txn, request, handler(txn, request))

    def _check_request_uri(self, request: SIPRequest) -> None:
        """§8.2.2.1: 416 for a scheme we do not support, else whatever the composer's
        check says (404 for an address nothing here accepts requests for)."""
        if request.uri.scheme not in ("sip", "sips"):
            raise SIPStatus(416)
        if self.request_uri_check is not None:
            self.request_uri_check(request)

    def _unsupported(self, request: SIPRequest) -> list[str]:
        required = request.headers.get_all("require")
        if not required:
            return []
        supported = self.capabilities.supported
        return [tag for tag in required if tag not in supported]

    def _finish(self, txn: ServerTransaction, request: SIPRequest, result: object) -> None:
        if result is None:
            return
        if isinstance(result, SIPResponse):
            txn.respond(result)
            return
        if isinstance(result, Deferred) or inspect.isawaitable(result):
            d: Deferred[object] = ensureDeferred(result)  # type: ignore[arg-type]
            d.addCallbacks(
                lambda value: self._finish(txn, request, value),
                lambda failure: self._failed(txn, request, failure),
            )
            return
        raise TypeError(f"handler returned {type(result).__name__}")

    def _failed(self, txn: ServerTransaction, request: SIPRequest, failure: Failure) -> None:
        if failure.check(SIPStatus):
            response = response_for_status(request, failure.value)  # type: ignore[arg-type]
        elif failure.check(StoreUnavailable):
            retry = [("Retry-After", str(StoreUnavailable.retry_after))]
            response = make_response(request, 503, headers=retry)
        else:
            self.log.failure(
                "handler failed on {method} from {peer}",
                failure,
                method=request.method,
                peer=txn.source,
            )
            response = make_response(request, 500)
        if txn.state in (TransactionState.TRYING, TransactionState.PROCEEDING):
            txn.respond(response)

    # -- built-in methods ---------------------------------------------------------------

    def _options(self, txn: ServerTransaction, request: SIPRequest) -> SIPResponse:
        return self._options_response(request)

    def _options_stateless(self, request: SIPRequest) -> SIPResponse:
        return self._options_response(request, stateless_tag(request))

    def _options_response(self, request: SIPRequest, to_tag: str | None = None) -> SIPResponse:
        """§11.2: what we accept and support; answered the same in or out of dialog.
        We apply no content coding and write our reason phrases in English."""
        caps = self.capabilities
        headers = [("Allow", self._allow)]
        if caps.accept:
            headers.append(("Accept", ", ".join(caps.accept)))
        headers.append(("Accept-Encoding", "identity"))
        headers.append(("Accept-Language", "en"))
        if caps.allow_events:
            headers.append(("Allow-Events", ", ".join(caps.allow_events)))
        headers.append(("Supported", ", ".join(caps.supported)))
        return make_response(request, 200, headers=headers, to_tag=to_tag)

    def _register(self, txn: ServerTransaction, request: SIPRequest) -> Deferred[SIPResponse]:
        assert self.registrar is not None
        return ensureDeferred(self._registered(txn, request))

    async def _registered(self, txn: ServerTransaction, request: SIPRequest) -> SIPResponse:
        assert self.registrar is not None
        response = await self.registrar.handle(request, peer=txn.source)
        if self.registered is not None:
            self.registered(request, response, txn.source)
        return response

    def _cancel(self, txn: ServerTransaction, request: SIPRequest) -> SIPResponse:
        """§9.2: 200 when the CANCEL matches a server transaction of any method, 481
        otherwise. A pending INVITE then gets 487; anything else goes on unaffected (a
        non-INVITE request is never cut short). The 200's To tag is the one of the final
        response to the cancelled request, as §9.2 asks, when there is one."""
        layer = self.transactions
        if layer is None:
            return make_response(request, 481)
        cancelled = layer.find_cancelled(request, self._cancellable)
        if cancelled is None:
            return make_response(request, 481)
        if cancelled.is_invite and cancelled.state is TransactionState.PROCEEDING:
            if cancelled.on_cancel is not None:
                try:
                    cancelled.on_cancel()
                except Exception:
                    self.log.failure("cancelling the branches of an INVITE failed")
            if cancelled.state is TransactionState.PROCEEDING:
                cancelled.respond(make_response(cancelled.request, 487))
        last = cancelled.last_response
        tag = last.to_tag if last is not None and last.status >= 200 else None
        return make_response(request, 200, to_tag=tag)
