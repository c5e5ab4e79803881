"""RFC 3261 §17 transaction layer, sans-IO: an injected clock and a ``send`` callable.

Implemented: the non-INVITE client transaction (§17.1.2, timers E/F/K), the non-INVITE
server transaction (§17.2.2, timer J), the INVITE server transaction (§17.2.1, timers
G/H/I) and the INVITE client transaction (§17.1.1, timers A/B/D, the ACK for a non-2xx
made here, hop by hop). Both INVITE transactions follow RFC 6026 for a 2xx: they enter
Accepted (timers L and M) instead of ending at once, so that a retransmitted INVITE is
absorbed rather than proxied again as a new request, and so that a retransmitted or
forked 2xx still finds its way upstream through them (RFC 6026 §1, §7.1). Matching
follows §17.1.3 (responses) and §17.2.3 (requests), with a simplified RFC 2543 fallback
for branches without the magic cookie. Transactions are forgotten as soon as they
terminate, so memory is bounded by the request rate times the longest timer (64·T1, and
Timer C for a ringing INVITE); completed server transactions drop their request and keep
only the response they must repeat.

Also here, because it needs the open server transactions: merged-request detection
(§8.2.2.2, 482) and the CANCEL lookup of §9.2, which matches a transaction of any method.
"""

from __future__ import annotations

import enum
from base64 import urlsafe_b64encode
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from relayd.delayqueue import DelayQueue, QueuedCall
from relayd.logs import logger
from relayd.sip.message import (
    MAGIC_COOKIE,
    Headers,
    SIPHeaderError,
    SIPRequest,
    SIPResponse,
    SIPStatus,
    Via,
    make_response,
    response_for_status,
    stateless_tag,
    tag_of,
)
from relayd.tokens import random_bytes

__all__ = [
    "ClientTransaction",
    "ITransactionUser",
    "InviteClientTransaction",
    "LocalResponse",
    "SIPTimers",
    "Send",
    "ServerTransaction",
    "TransactionLayer",
    "TransactionState",
    "TransportError",
    "ack_for",
    "cancel_for",
    "local_response",
    "new_branch",
]

log = logger()


class TransportError(Exception):
    """A message could not be handed to the network (no listener, connect failed...):
    what ``Send`` raises."""


class LocalResponse(SIPResponse):
    """A final response made up here because the peer sent none: the 408 of a timeout
    with no response at all, or the 503 of a transport failure (§8.1.3.1). RFC 3263 §4.3
    fails over to the next target on exactly these (and on a peer's own 503), so they
    must be told apart from a 408 a downstream element sent."""

    __slots__ = ()


def local_response(request: SIPRequest, status: int) -> LocalResponse:
    """The :class:`LocalResponse` standing for a timeout (408) or transport failure (503)."""
    made = make_response(request, status)
    return LocalResponse(made.status, made.reason, made.headers, made.body)


Send = Callable[[SIPRequest | SIPResponse, object], None]
"""``send(message, destination)``: hand a message to the transport. For server
transactions ``destination`` is the ``source`` the request came from; the transport
applies §18.2.2 (Via received/rport) itself."""


@dataclass(frozen=True, slots=True)
class SIPTimers:
    """RFC 3261 §17.1.1.1 / Table 4 base timers."""

    t1_seconds: float = 0.5
    t2_seconds: float = 4.0
    t4_seconds: float = 5.0
    c_seconds: float = 185.0
    """§16.8 Timer C: a proxied INVITE's branch may ring this long ("larger than 3
    minutes"); the proxy keeps it, the INVITE server transaction's TU deadline follows."""

    @property
    def timeout_seconds(self) -> float:
        """64·T1: timers B, F, H, J."""
        return 64 * self.t1_seconds


class TransactionState(enum.Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


class ITransactionUser(Protocol):
    """The core above the transaction layer (UAS core / relay)."""

    def request(self, txn: ServerTransaction, request: SIPRequest) -> None:
        """A new request; answer now or later with ``txn.respond``. Raising
        :class:`SIPStatus` answers with that status; any other exception answers 500."""


_WAITING = (TransactionState.CALLING, TransactionState.TRYING, TransactionState.PROCEEDING)
"""Client states that still wait for a final response."""


def _copied(request: SIPRequest, method: str) -> Headers:
    """§9.1 / §17.1.1.3: the headers a CANCEL or an ACK for a non-2xx shares with the
    request it follows: the top Via only, From, Call-ID, the CSeq number, Route."""
    src = request.headers
    headers = Headers([("Via", request.via.format())])
    for name in ("from", "to", "call-id"):
        value = src.get(name)
        if value is not None:
            headers.add(name, value)
    headers.add("CSeq", f"{request.cseq.number} {method}")
    for row in src.get_raw("route"):
        headers.add("Route", row)
    headers.add("Max-Forwards", "70")
    return headers


def cancel_for(request: SIPRequest) -> SIPRequest:
    """The CANCEL of a pending INVITE (§9.1): same Request-URI, top Via (so the same
    branch, and the same hop), From, To, Call-ID, CSeq number and Route."""
    return SIPRequest("CANCEL", request.uri, _copied(request, "CANCEL"))


def ack_for(request: SIPRequest, response: SIPResponse) -> SIPRequest:
    """The ACK an INVITE client transaction sends for a non-2xx final (§17.1.1.3): as
    :func:`cancel_for`, but To is the response's (it carries the tag)."""
    headers = _copied(request, "ACK")
    to_value = response.headers.get("to")
    if to_value is not None:
        headers.set("To", to_value)
    return SIPRequest("ACK", request.uri, headers)


def new_branch() -> str:
    """A globally unique branch with the §8.1.1.7 magic cookie (128 random bits)."""
    return MAGIC_COOKIE + urlsafe_b64encode(random_bytes(16)).rstrip(b"=").decode()


Timer = IDelayedCall | QueuedCall
"""A reactor call (variable delays) or a :class:`DelayQueue` entry (the fixed ones)."""


def _cancel(call: Timer | None) -> None:
    if call is not None and call.active():
        call.cancel()


def _server_key(request: SIPRequest, via: Via, method: str | None = None) -> Hashable:
    """§17.2.3: branch + sent-by + method, with ACK matching its INVITE; ``method``
    replaces the request's own (a CANCEL looking for what it cancels, §9.2)."""
    if method is None:
        method = "INVITE" if request.method == "ACK" else request.method
    branch = via.branch
    if branch is not None and branch.startswith(MAGIC_COOKIE):
        return (branch, via.sent_by, method)
    # RFC 2543 peers: no usable branch. Approximate §17.2.3's fallback with the fields
    # that are equal between a request, its retransmission and (for INVITE) its ACK.
    return (
        "2543",
        request.uri,
        request.from_tag,
        request.call_id,
        request.cseq.number,
        method,
        via.sent_by,
        branch,
    )


class _Transaction:
    """What both kinds hold: their layer, their key in its table, the request and whether
    the transport is reliable (§17: no retransmissions over a reliable one)."""

    __slots__ = ("_key", "_layer", "_request", "reliable", "state")

    def __init__(
        self,
        layer: TransactionLayer,
        key: Hashable,
        request: SIPRequest,
        reliable: bool,
        state: TransactionState,
    ) -> None:
        self._layer = layer
        self._key = key
        self._request: SIPRequest | None = request
        self.reliable = reliable
        self.state = state

    @property
    def request(self) -> SIPRequest:
        """The request; released at the final response (see the module doc): a server
        transaction then only repeats its response, a client one only absorbs
        retransmitted responses (Timer K), and a relay forking to many members would
        otherwise hold every copy for T4."""
        if self._request is None:
            raise RuntimeError("request released after the final response")
        return self._request


class ServerTransaction(_Transaction):
    """A server transaction (§17.2.1 for INVITE, §17.2.2 otherwise); the TU answers with
    :meth:`respond`."""

    __slots__ = (
        "_deadline",
        "_last_response",
        "_merge_key",
        "_retransmit_interval",
        "_timer_g",
        "_timer_h",
        "_timer_i_or_j",
        "is_invite",
        "on_cancel",
        "source",
    )

    def __init__(
        self,
        layer: TransactionLayer,
        key: Hashable,
        request: SIPRequest,
        source: object,
        reliable: bool,
    ) -> None:
        self.is_invite = request.method == "INVITE"
        state = TransactionState.PROCEEDING if self.is_invite else TransactionState.TRYING
        super().__init__(layer, key, request, reliable, state)
        self.source = source
        self._last_response: SIPResponse | None = None
        self._retransmit_interval = layer.timers.t1_seconds
        self._timer_g: IDelayedCall | None = None
        self._timer_h: IDelayedCall | None = None
        self._timer_i_or_j: Timer | None = None
        self._deadline: Timer | None = None
        self._merge_key: tuple[str, str, str] | None = None  # registered for §8.2.2.2
        #: Called when a CANCEL ends this pending INVITE (§9.2), before its 487: a
        #: proxy cancels its branches (§16.10).
        self.on_cancel: Callable[[], object] | None = None

    @property
    def last_response(self) -> SIPResponse | None:
        return self._last_response

    def respond(self, response: SIPResponse) -> None:
        """Send a response from the TU, driving the state machine."""
        state = self.state
        if state is TransactionState.ACCEPTED:
            # RFC 6026 §7.1: a 2xx from the TU (a retransmission, or another fork's)
            # goes out as is; nothing else may follow a 2xx.
            if 200 <= response.status < 300:
                self._layer._send(response, self.source)
            return
        if state not in (TransactionState.TRYING, TransactionState.PROCEEDING):
            log.debug(
                "dropping {code} from TU: transaction already {state}",
                code=response.status,
                state=state.value,
            )
            return
        self._last_response = response
        self._layer._send(response, self.source)
        if response.status < 200:
            self.state = TransactionState.PROCEEDING
            if self.is_invite and self._deadline is not None:
                _cancel(self._deadline)  # still ringing: Timer C restarted too (§16.8)
                self._deadline = None
                self._arm_deadline()
            return
        _cancel(self._deadline)
        self._deadline = None
        self._request = None
        self.on_cancel = None  # a CANCEL after the final changes nothing (§9.2)
        timers = self._layer.timers
        if not self.is_invite:
            self.state = TransactionState.COMPLETED
            self._wait_then_terminate(0 if self.reliable else timers.timeout_seconds)  # Timer J
        elif response.status < 300:
            # RFC 6026 §7.1: Accepted until Timer L, absorbing retransmitted INVITEs;
            # the TU owns 2xx retransmission (the UAS core retransmits, a proxy relays).
            self.state = TransactionState.ACCEPTED
            self._timer_i_or_j = self._layer._after(timers.timeout_seconds, self._terminate)
        else:
            self.state = TransactionState.COMPLETED
            if not self.reliable:
                self._timer_g = self._layer.clock.callLater(
                    self._retransmit_interval, self._timer_g_fired
                )
            self._timer_h = self._layer.clock.callLater(timers.timeout_seconds, self._timer_h_fired)

    def _arm_deadline(self) -> None:
        """Not in RFC 3261: a TU that never answers must not pin the transaction forever.
        After 64·T1 the client has given up anyway (Timer F/B). T4 more than that, so a
        TU waiting on its own client transactions, started a moment later, still sends
        the 408 their Timer F gives (§16.8) instead of being cut off just before it.
        An INVITE may ring for minutes: its TU is bounded by Timer C (§16.8) instead,
        and the deadline comes T4 after that, counted again from each provisional the
        TU passes on (each restarts Timer C). Armed only when the TU did not answer
        synchronously, which keeps the common path free of extra timers."""
        if self.state in (TransactionState.TRYING, TransactionState.PROCEEDING):
            timers = self._layer.timers
            wait = timers.c_seconds if self.is_invite else timers.timeout_seconds
            self._deadline = self._layer._after(wait + timers.t4_seconds, self._tu_deadline)

    def _retransmission(self, request: SIPRequest) -> None:
        """A request that matched this transaction (§17.2.1, §17.2.2)."""
        if request.method == "ACK":
            if self.is_invite and self.state is TransactionState.COMPLETED:
                self.state = TransactionState.CONFIRMED
                _cancel(self._timer_g)
                _cancel(self._timer_h)
                self._timer_g = self._timer_h = None
                self._wait_then_terminate(0 if self.reliable else self._layer.timers.t4_seconds)
            return  # Timer I absorbs further ACKs
        if self.state is TransactionState.ACCEPTED:
            return  # RFC 6026 §7.1: a retransmitted INVITE is absorbed
        in_progress = self.state in (TransactionState.PROCEEDING, TransactionState.COMPLETED)
        if in_progress and self._last_response is not None:
            self._layer._send(self._last_response, self.source)
        # Trying: absorbed; the TU has not answered yet.

    def _timer_g_fired(self) -> None:
        self._timer_g = None
        if self.state is not TransactionState.COMPLETED or self._last_response is None:
            return
        self._layer._send(self._last_response, self.source)
        self._retransmit_interval = min(
            2 * self._retransmit_interval, self._layer.timers.t2_seconds
        )
        self._timer_g = self._layer.clock.callLater(self._retransmit_interval, self._timer_g_fired)

    def _timer_h_fired(self) -> None:
        self._timer_h = None
        log.warn(
            "no ACK for INVITE {code} before Timer H from {peer}",
            code=self._last_response.status if self._last_response else 0,
            peer=self.source,
        )
        self._terminate()

    def _tu_deadline(self) -> None:
        self._deadline = None
        log.warn(
            "TU never answered a {method} request from {peer}",
            method=self._request.method if self._request else "?",
            peer=self.source,
        )
        self._terminate()

    def _wait_then_terminate(self, seconds: float) -> None:
        if seconds <= 0:
            self._terminate()
        else:
            self._timer_i_or_j = self._layer._after(seconds, self._terminate)

    def _terminate(self) -> None:
        if self.state is TransactionState.TERMINATED:
            return
        self.state = TransactionState.TERMINATED
        for call in (self._timer_g, self._timer_h, self._timer_i_or_j, self._deadline):
            _cancel(call)
        self._timer_g = self._timer_h = self._timer_i_or_j = self._deadline = None
        self._request = None
        self.on_cancel = None
        layer = self._layer
        layer._server.pop(self._key, None)
        merge_key = self._merge_key
        if merge_key is not None and layer._merging.get(merge_key) is self:
            del layer._merging[merge_key]

    def _spiralled_from(self, request: SIPRequest) -> bool:
        """Whether ``request`` carries this transaction's branch in a lower Via: it went
        out through us and came back (a spiral, §16.6 step 8), not a merged copy."""
        key = self._key
        if not isinstance(key, tuple):
            return False
        branch = key[-1] if key[0] == "2543" else key[0]
        if not isinstance(branch, str) or not branch:
            return False
        return any(branch in row for row in request.headers._fields.get("via", ()))


class ClientTransaction(_Transaction):
    """Non-INVITE client transaction (§17.1.2). ``result`` fires with the final response,
    a synthesized 408 on Timer F, or a synthesized 503 when the transport fails (§8.1.3.1)."""

    __slots__ = (
        "_give_up_at",
        "_interval",
        "_on_provisional",
        "_timer_e",
        "_timer_f",
        "_timer_k",
        "destination",
        "result",
    )

    def __init__(
        self,
        layer: TransactionLayer,
        key: Hashable,
        request: SIPRequest,
        destination: object,
        reliable: bool,
        on_provisional: Callable[[SIPResponse], object] | None,
    ) -> None:
        super().__init__(layer, key, request, reliable, TransactionState.TRYING)
        self.destination = destination
        self._on_provisional = on_provisional
        self.result: Deferred[SIPResponse] = Deferred(self._cancelled)
        self._interval = layer.timers.t1_seconds
        self._give_up_at = 0.0
        self._timer_e: Timer | None = None
        self._timer_f: Timer | None = None
        self._timer_k: Timer | None = None

    def _start(self) -> None:
        layer = self._layer
        timeout = layer.timers.timeout_seconds
        if self.reliable:
            self._timer_f = layer._after(timeout, self._timer_f_fired)
        else:
            # Over UDP Timer E keeps firing until the transaction ends, so it also
            # checks Timer F: one timer per transaction instead of two.
            self._give_up_at = layer.clock.seconds() + timeout
            self._timer_e = layer._after(min(self._interval, timeout), self._timer_e_fired)
        self._transmit()

    def _transmit(self) -> None:
        try:
            self._layer._send(self.request, self.destination)
        except TransportError as e:
            log.warn(
                "cannot send {method} to {peer}: {reason}",
                method=self.request.method,
                peer=self.destination,
                reason=str(e),
            )
            if self.state in _WAITING:
                self._finish(local_response(self.request, 503))
        except Exception:
            log.failure(
                "transport error sending {method} to {peer}",
                method=self.request.method,
                peer=self.destination,
            )
            if self.state in _WAITING:
                self._finish(local_response(self.request, 503))

    def _timer_e_fired(self) -> None:
        self._timer_e = None
        layer = self._layer
        if self.state is TransactionState.TRYING:
            self._interval = min(2 * self._interval, layer.timers.t2_seconds)
        elif self.state is TransactionState.PROCEEDING:
            self._interval = layer.timers.t2_seconds
        else:
            return
        remaining = self._give_up_at - layer.clock.seconds()
        if remaining <= 0:
            self._timer_f_fired()
            return
        self._timer_e = layer._after(min(self._interval, remaining), self._timer_e_fired)
        self._transmit()

    def _timer_f_fired(self) -> None:
        self._timer_f = None
        state = self.state
        if state in (TransactionState.TRYING, TransactionState.PROCEEDING):
            log.debug(
                "{method} to {peer} timed out (Timer F)",
                method=self.request.method,
                peer=self.destination,
            )
            # RFC 3263 §4.3: only silence (no provisional either) is a failed target.
            if state is TransactionState.TRYING:
                self._finish(local_response(self.request, 408))
            else:
                self._finish(make_response(self.request, 408))

    def _receive(self, response: SIPResponse) -> None:
        state = self.state
        if state not in (TransactionState.TRYING, TransactionState.PROCEEDING):
            return  # Completed: Timer K absorbs retransmitted responses
        if response.status < 200:
            self.state = TransactionState.PROCEEDING
            if self._on_provisional is not None:
                try:
                    self._on_provisional(response)
                except Exception:
                    log.failure("provisional-response callback failed")
            return
        _cancel(self._timer_e)
        _cancel(self._timer_f)
        self._timer_e = self._timer_f = None
        self._request = None
        self._on_provisional = None
        self.state = TransactionState.COMPLETED
        if self.reliable:
            self._terminate()
        else:
            self._timer_k = self._layer._after(self._layer.timers.t4_seconds, self._terminate)
        self.result.callback(response)

    def _finish(self, synthesized: SIPResponse) -> None:
        """Timeout or transport error: terminate at once and report (§17.1.2.2)."""
        self._terminate()
        if not self.result.called:
            self.result.callback(synthesized)

    def _cancelled(self, _: Deferred[SIPResponse]) -> None:
        """The caller gave up: stop retransmitting and forget the transaction."""
        self._terminate()

    def _terminate(self) -> None:
        if self.state is TransactionState.TERMINATED:
            return
        self.state = TransactionState.TERMINATED
        for call in (self._timer_e, self._timer_f, self._timer_k):
            _cancel(call)
        self._timer_e = self._timer_f = self._timer_k = None
        self._request = None
        self._on_provisional = None
        self._layer._client.pop(self._key, None)


class InviteClientTransaction(ClientTransaction):
    """INVITE client transaction (§17.1.1, RFC 6026 §8.4 for a 2xx).

    Calling: Timer A retransmits over UDP (T1 doubling, §17.1.1.2), Timer B gives up
    after 64·T1 with a 408. A provisional moves to Proceeding, where only the TU's
    Timer C (§16.8) or a CANCEL ends the wait. A 300-699 final is answered with an ACK
    made here (§17.1.1.3, hop by hop) and again for each retransmission of it until
    Timer D. A 2xx moves to Accepted until Timer M (64·T1): ``on_2xx`` gets every
    further 2xx (retransmissions and other forks'), which the TU relays upstream.
    ``result`` fires with the first final response, as for non-INVITE."""

    __slots__ = ("_ack", "_on_2xx")

    def __init__(
        self,
        layer: TransactionLayer,
        key: Hashable,
        request: SIPRequest,
        destination: object,
        reliable: bool,
        on_provisional: Callable[[SIPResponse], object] | None,
        on_2xx: Callable[[SIPResponse], object] | None,
    ) -> None:
        super().__init__(layer, key, request, destination, reliable, on_provisional)
        self.state = TransactionState.CALLING
        self._on_2xx = on_2xx
        self._ack: SIPRequest | None = None

    def _start(self) -> None:
        layer = self._layer
        self._timer_f = layer._after(layer.timers.timeout_seconds, self._timer_b_fired)
        if not self.reliable:
            self._timer_e = layer.clock.callLater(self._interval, self._timer_a_fired)
        self._transmit()

    def _timer_a_fired(self) -> None:
        self._timer_e = None
        if self.state is not TransactionState.CALLING:
            return
        self._interval *= 2  # §17.1.1.2: doubled each time, no T2 cap; B ends it
        self._timer_e = self._layer.clock.callLater(self._interval, self._timer_a_fired)
        self._transmit()

    def _timer_b_fired(self) -> None:
        self._timer_f = None
        if self.state is TransactionState.CALLING:
            log.debug("INVITE to {peer} timed out (Timer B)", peer=self.destination)
            self._finish(local_response(self.request, 408))

    def _receive(self, response: SIPResponse) -> None:
        state = self.state
        status = response.status
        if state is TransactionState.ACCEPTED:
            if 200 <= status < 300 and self._on_2xx is not None:
                self._notify(self._on_2xx, response)
            return
        if state is TransactionState.COMPLETED:
            if status >= 300 and self._ack is not None:
                self._send_ack(self._ack)  # the final again: our ACK was lost
            return
        if state not in _WAITING:
            return
        _cancel(self._timer_e)
        self._timer_e = None
        if status < 200:
            _cancel(self._timer_f)  # Timer B only runs in Calling
            self._timer_f = None
            self.state = TransactionState.PROCEEDING
            if self._on_provisional is not None:
                self._notify(self._on_provisional, response)
            return
        _cancel(self._timer_f)
        self._timer_f = None
        layer = self._layer
        if status < 300:
            self.state = TransactionState.ACCEPTED
            self._timer_k = layer._after(layer.timers.timeout_seconds, self._terminate)  # M
        else:
            self.state = TransactionState.COMPLETED
            self._ack = ack_for(self.request, response)
            self._send_ack(self._ack)
            if self.reliable:
                self._terminate()
            else:  # Timer D: at least 32 s over UDP
                self._timer_k = layer._after(
                    max(32.0, layer.timers.timeout_seconds), self._terminate
                )
        self._request = None
        self._on_provisional = None
        self.result.callback(response)

    @staticmethod
    def _notify(callback: Callable[[SIPResponse], object], response: SIPResponse) -> None:
        try:
            callback(response)
        except Exception:
            log.failure("INVITE response callback failed")

    def _send_ack(self, ack: SIPRequest) -> None:
        try:
            self._layer._send(ack, self.destination)
        except Exception as e:
            log.warn("cannot send ACK to {peer}: {reason}", peer=self.destination, reason=str(e))

    def _terminate(self) -> None:
        super()._terminate()
        self._ack = None
        self._on_2xx = None


class TransactionLayer:
    """Demultiplexes messages from the transport to transactions and new requests to the TU.

    ``max_server_transactions`` bounds memory under floods: beyond it new requests get a
    stateless 503 with Retry-After (§21.5.4) instead of a transaction.

    Open server transactions of requests without a To tag are also indexed by From,
    Call-ID and CSeq, so a merged request (§8.2.2.2: the same request reaching us again
    by another path, with another branch) is answered 482 in O(1).
    """

    def __init__(
        self,
        clock: IReactorTime,
        send: Send,
        tu: ITransactionUser,
        timers: SIPTimers | None = None,
        max_server_transactions: int = 200_000,
        overload_retry_after_seconds: int = 5,
    ) -> None:
        self.clock = clock
        self._send = send
        self.tu = tu
        self.timers = timers or SIPTimers()
        self.max_server_transactions = max_server_transactions
        self.overload_retry_after_seconds = overload_retry_after_seconds
        self._server: dict[Hashable, ServerTransaction] = {}
        self._client: dict[Hashable, ClientTransaction] = {}
        self._merging: dict[tuple[str, str, str], ServerTransaction] = {}
        self.shed = 0
        """New requests answered 503 because the server transaction table was full."""
        #: Asked about every new request before a transaction is made: a response it
        #: returns is sent statelessly (``UASCore.stateless``).
        self.screen: Callable[[SIPRequest], SIPResponse | None] | None = None
        #: Given every ACK no transaction absorbs (``ack(request, source)``): an ACK
        #: for a 2xx is end to end, and a proxy on its route forwards it (§16.4).
        self.ack: Callable[[SIPRequest, object], object] | None = None
        # T1 (first Timer E), T4 (K, I), 64·T1 (F on streams, J) and 64·T1 + T4 (TU
        # deadline) are armed for nearly every transaction: one FIFO each
        # (relayd.delayqueue).
        self._queues = {
            delay: DelayQueue(clock, delay)
            for delay in (
                self.timers.t1_seconds,
                self.timers.t4_seconds,
                self.timers.timeout_seconds,
                self.timers.timeout_seconds + self.timers.t4_seconds,
            )
        }

    def _after(self, seconds: float, function: Callable[[], object]) -> Timer:
        queue = self._queues.get(seconds)
        if queue is not None:
            return queue.call(function)
        return self.clock.callLater(seconds, function)

    def stop(self) -> None:
        """The service is stopping: end every transaction quietly (no retransmission
        may reach a closed listener) and drop every pending timer."""
        for client in list(self._client.values()):
            client._terminate()
        for server in list(self._server.values()):
            server._terminate()
        for queue in self._queues.values():
            queue.stop()

    def connection_lost(self, used: Callable[[object], bool]) -> None:
        """A stream connection closed (§18.4): requests sent over it that still wait for
        a final response get a 503 now, not a 408 at Timer F (``used(destination)``
        tells whether a transaction's destination went over that connection)."""
        for client in list(self._client.values()):
            if client.state in _WAITING and client.reliable and used(client.destination):
                client._finish(local_response(client.request, 503))

    @property
    def server_transaction_count(self) -> int:
        return len(self._server)

    @property
    def client_transaction_count(self) -> int:
        return len(self._client)

    def request_received(self, request: SIPRequest, source: object, reliable: bool) -> None:
        """Entry point for every parsed request from the transport (§17.2.3)."""
        try:
            via = request.via
            key = _server_key(request, via)
        except SIPHeaderError:
            log.warn("dropping request without usable Via/CSeq from {peer}", peer=source)
            return
        txn = self._server.get(key)
        is_ack = request.method == "ACK"
        if txn is not None and not (is_ack and txn.state is TransactionState.ACCEPTED):
            txn._retransmission(request)
            return
        if is_ack:
            # The ACK for a 2xx (its own transaction, §17.1.1.1; RFC 6026 §7.1 hands one
            # matching an Accepted transaction up too) or a stray one: the TU's to route.
            if self.ack is not None:
                self.ack(request, source)
            else:
                log.debug("dropping unmatched ACK from {peer}", peer=source)
            return
        screen = self.screen
        if screen is not None:
            answer = screen(request)
            if answer is not None:
                self._send(answer, source)
                return
        if len(self._server) >= self.max_server_transactions:
            self.shed += 1
            log.warn(
                "transaction table full; 503 to {method} from {peer}",
                method=request.method,
                peer=source,
            )
            retry = str(self.overload_retry_after_seconds)
            headers = [("Retry-After", retry)]
            self._send(
                make_response(request, 503, headers=headers, to_tag=stateless_tag(request)), source
            )
            return
        txn = ServerTransaction(self, key, request, source, reliable)
        self._server[key] = txn
        fields = request.headers._fields
        to_rows = fields.get("to")
        if to_rows and tag_of(to_rows[0]) is None:
            # §8.2.2.2 keyed by the From row (it carries the tag; proxies never change
            # it), Call-ID and CSeq as received: merged copies are byte-identical there.
            merge_key = (
                fields.get("from", ("",))[0],
                fields.get("call-id", ("",))[0],
                fields.get("cseq", ("",))[0],
            )
            merged = self._merging.get(merge_key)
            if merged is None:
                self._merging[merge_key] = txn
                txn._merge_key = merge_key
            elif not merged._spiralled_from(request):
                log.warn(
                    "merged {method} from {peer} answered 482", method=request.method, peer=source
                )
                txn.respond(make_response(request, 482))
                return
        try:
            self.tu.request(txn, request)
        except SIPStatus as e:
            txn.respond(response_for_status(request, e))
        except Exception:
            log.failure("TU failed on {method} from {peer}", method=request.method, peer=source)
            txn.respond(make_response(request, 500))
        if txn.is_invite and txn.state is TransactionState.PROCEEDING and txn.last_response is None:
            # §17.2.1: 100 Trying unless the TU answers within 200 ms; it did not answer
            # synchronously, so quench retransmissions now (no To tag, per §17.2.1).
            txn.respond(make_response(request, 100))
        txn._arm_deadline()

    def response_received(self, response: SIPResponse, source: object) -> None:
        """Entry point for every parsed response (§17.1.3: top Via branch + CSeq method)."""
        try:
            branch = response.via.branch
            method = response.cseq.method
        except SIPHeaderError:
            log.warn("dropping response without usable Via/CSeq from {peer}", peer=source)
            return
        txn = self._client.get((branch, method))
        if txn is None:
            log.debug(
                "dropping stray {code} response from {peer}", code=response.status, peer=source
            )
            return
        txn._receive(response)

    def client_request(
        self,
        request: SIPRequest,
        destination: object,
        reliable: bool,
        on_provisional: Callable[[SIPResponse], object] | None = None,
        on_2xx: Callable[[SIPResponse], object] | None = None,
    ) -> Deferred[SIPResponse]:
        """Start a client transaction (INVITE: :class:`InviteClientTransaction`, which
        gives ``on_2xx`` every 2xx after the first); the request's top Via must carry a
        fresh branch from :func:`new_branch`. Fires with the final response (a
        synthesized 408 after Timer F or B). Cancelling the Deferred abandons the
        transaction; a pending INVITE is ended with a CANCEL instead (§9.1)."""
        if request.method == "ACK":
            raise ValueError("no client transaction for ACK")
        branch = request.via.branch
        if branch is None or not branch.startswith(MAGIC_COOKIE):
            raise ValueError("client requests need an RFC 3261 branch (z9hG4bK...)")
        key = (branch, request.method)
        if key in self._client:
            raise ValueError(f"branch already in use: {branch}")
        txn: ClientTransaction
        if request.method == "INVITE":
            txn = InviteClientTransaction(
                self, key, request, destination, reliable, on_provisional, on_2xx
            )
        else:
            txn = ClientTransaction(self, key, request, destination, reliable, on_provisional)
        self._client[key] = txn
        txn._start()
        return txn.result

    def find_cancelled(
        self, cancel: SIPRequest, methods: Iterable[str] = ()
    ) -> ServerTransaction | None:
        """The server transaction a CANCEL targets (§9.2), for the TU's 200/481: matched
        as §17.2.3 says but whatever its method (INVITE first, then ``methods``), with
        the RFC 2543 fallback for branches without the magic cookie."""
        try:
            via = cancel.via
        except SIPHeaderError:
            return None
        server = self._server
        for method in ("INVITE", *methods):
            if method in ("CANCEL", "ACK"):
                continue
            try:
                txn = server.get(_server_key(cancel, via, method))
            except SIPHeaderError:
                return None
            if txn is not None:
                return txn
        return None
