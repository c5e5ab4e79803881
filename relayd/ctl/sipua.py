"""A small SIP user agent over UDP for ``relayctl chat``: every request goes to the relay.

It REGISTERs and INVITEs with digest credentials (401/407, RFC 3261 §22.2, §22.3),
ACKs, BYEs, and answers one incoming INVITE and the BYE of its dialog. Requests
are retransmitted per Timer A (INVITE, doubling) and Timer E (others, doubling up
to T2) until a response, and given up after Timer B/F, 64*T1 (§17.1.1.2, §17.1.2.2);
a 2xx we send is retransmitted until its ACK (§13.3.1.4). Every wait is bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from relayd.ctl.settings import CtlError
from relayd.digest import answer_challenge
from relayd.sip.message import (
    Headers,
    SIPHeaderError,
    SIPRequest,
    SIPResponse,
    make_response,
    new_tag,
)
from relayd.sip.parser import SIPParseError, parse_datagram
from relayd.sip.transaction import new_branch
from relayd.sip.uri import SIPURI, NameAddr, SIPURIError, format_host

T1 = 0.5
T2 = 4.0
TRANSACTION_TIMEOUT = 64 * T1
"""Timer B and F: no response to a request by then is a failure (§17.1.1.2)."""

ANSWER_TIMEOUT_SECONDS = 120.0
"""Longest ring: the INVITE is CANCELled after this long without a final response."""

SDP_TYPE = "application/sdp"


class CallRefused(CtlError):
    """A final non-2xx answer to our INVITE; ``missing`` from a 470's Permission-Missing."""

    def __init__(self, status: int, reason: str, missing: list[NameAddr]) -> None:
        self.status = status
        self.reason = reason
        self.missing = missing
        super().__init__(f"{status} {reason}")


def permission_missing(response: SIPResponse) -> list[NameAddr]:
    """The consent URIs of a 470, each with its member as display name when the
    relay names them (the caller owns the list)."""
    out = []
    for value in response.headers.get_all("Permission-Missing"):
        try:
            out.append(NameAddr.parse(value))
        except SIPURIError:
            continue
    return out


@dataclass
class Dialog:
    """One call's dialog state (RFC 3261 §12): who is where, and through which route."""

    call_id: str
    local: str
    remote: str
    remote_target: str
    route: list[str]
    cseq: int
    body: bytes = b""
    ended: defer.Deferred[None] = field(default_factory=defer.Deferred)
    #: Fires on the ACK of the 2xx we sent (the answering side only).
    acked: defer.Deferred[None] = field(default_factory=defer.Deferred)


class SIPUserAgent(DatagramProtocol):
    """A UA whose every request goes to ``relay`` (its outbound proxy)."""

    log = Logger()

    def __init__(
        self, reactor: Any, relay: tuple[str, int], user: str, password: str, domain: str
    ) -> None:
        self.reactor = reactor
        self.relay = relay
        self.user = user
        self.password = password
        self.domain = domain
        self.host = relay[0]
        self.port = 0
        self._clients: dict[str, Callable[[SIPResponse], None]] = {}
        self._dialogs: dict[str, Dialog] = {}
        self._invites: defer.DeferredQueue[SIPRequest] = defer.DeferredQueue()
        self._answered: dict[str, SIPResponse] = {}  # INVITE branch -> our final response
        self._acks: dict[str, bytes] = {}  # Call-ID -> our ACK for its 2xx
        self._failure_acks: dict[str, bytes] = {}  # INVITE branch -> our ACK of its 3xx-6xx
        #: INVITEs are queued for :meth:`incoming` from its first call until :meth:`accept`.
        self.taking_calls = False
        #: Our INVITE while it waits for its final response.
        self.ringing: SIPRequest | None = None
        self._unanswered: dict[str, SIPRequest] = {}  # branch -> INVITE not yet answered
        #: Call-IDs of incoming INVITEs their caller CANCELled.
        self.cancelled: set[str] = set()

    # -- addresses -------------------------------------------------------------------------

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@{self.domain}"

    @property
    def contact(self) -> str:
        return f"<sip:{self.user}@{format_host(self.host, self.port)}>"

    # -- Twisted ---------------------------------------------------------------------------

    def startProtocol(self) -> None:
        transport: Any = self.transport
        address = transport.getHost()
        self.host, self.port = address.host, address.port

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            message = parse_datagram(datagram)
        except SIPParseError as e:
            self.log.debug("unparsable datagram from {addr}: {e}", addr=addr, e=e)
            return
        try:
            if isinstance(message, SIPResponse):
                handler = self._clients.get(f"{message.via.branch} {message.cseq.method}")
                if handler is not None:
                    handler(message)
                elif message.status // 100 == 2 and message.call_id in self._acks:
                    self._send(self._acks[message.call_id or ""])  # our ACK was lost
                elif message.status >= 300 and message.via.branch in self._failure_acks:
                    self._send(self._failure_acks[message.via.branch or ""])
                return
            self._request_received(message)
        except SIPHeaderError as e:
            self.log.debug("bad message from {addr}: {e}", addr=addr, e=e)

    def _send(self, data: bytes) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.write(data, self.relay)

    # -- client transactions ---------------------------------------------------------------

    def _headers(self, method: str, cseq: int, call_id: str, from_: str, to: str) -> Headers:
        h = Headers()
        h.add("Via", f"SIP/2.0/UDP {format_host(self.host, self.port)};rport;branch={new_branch()}")
        h.add("Max-Forwards", "70")
        h.add("From", from_)
        h.add("To", to)
        h.add("Call-ID", call_id)
        h.add("CSeq", f"{cseq} {method}")
        return h

    def _transaction(
        self, request: SIPRequest, on_provisional: Callable[[SIPResponse], None] | None = None
    ) -> defer.Deferred[SIPResponse]:
        """Send ``request`` and retransmit it (Timer A or E) until a response; the
        final response, or a CtlError after Timer B/F."""
        key = f"{request.via.branch} {request.method}"
        data = request.to_bytes()
        final: defer.Deferred[SIPResponse] = defer.Deferred(lambda _: finish())
        invite = request.method == "INVITE"
        state = {"interval": T1, "provisional": False}
        timers: list[Any] = []

        def retransmit() -> None:
            if state["provisional"] and invite:
                return
            self._send(data)
            interval = float(state["interval"])
            state["interval"] = interval * 2 if invite else min(interval * 2, T2)
            timers[0] = self.reactor.callLater(state["interval"], retransmit)

        def give_up() -> None:
            if not state["provisional"] or not invite:
                finish()
                final.errback(
                    CtlError(
                        f"no answer from the SIP relay {format_host(*self.relay)} to"
                        f" {request.method} within {TRANSACTION_TIMEOUT:g} s"
                    )
                )

        def finish() -> None:
            self._clients.pop(key, None)
            for timer in timers:
                if timer.active():
                    timer.cancel()

        def on_response(response: SIPResponse) -> None:
            if final.called:
                return
            if response.status < 200:
                state["provisional"] = True
                if not invite:
                    state["interval"] = T2
                if on_provisional is not None:
                    on_provisional(response)
                return
            finish()
            final.callback(response)

        self._clients[key] = on_response
        self._send(data)
        timers.append(self.reactor.callLater(T1, retransmit))
        timers.append(self.reactor.callLater(TRANSACTION_TIMEOUT, give_up))
        return final

    async def _authenticated(
        self,
        build: Callable[[int], SIPRequest],
        cseq: int,
        on_provisional: Callable[[SIPResponse], None] | None = None,
    ) -> tuple[SIPRequest, SIPResponse]:
        """``build(cseq)`` sent, and once more with credentials for a 401/407."""
        request = build(cseq)
        response = await self._transaction(request, on_provisional)
        if response.status not in (401, 407):
            return request, response
        if request.method == "INVITE":
            self._ack_failure(request, response)
        proxy = response.status == 407
        challenge = response.headers.get("Proxy-Authenticate" if proxy else "WWW-Authenticate")
        if not challenge:
            return request, response
        answer = answer_challenge(
            challenge,
            username=self.user,
            password=self.password,
            method=request.method,
            uri=request.uri.format(),
        )
        again = build(cseq + 1)
        again.headers.add("Proxy-Authorization" if proxy else "Authorization", answer.authorization)
        response = await self._transaction(again, on_provisional)
        if response.status in (401, 407):
            raise CtlError(
                f"the SIP relay refused our credentials for {self.user}"
                f" ({response.status} {response.reason}): wrong user name or password?"
            )
        return again, response

    def _ack_failure(self, invite: SIPRequest, response: SIPResponse) -> None:
        """The ACK of a non-2xx final response: same branch, hop by hop (§17.1.1.3)."""
        h = Headers()
        h.add("Via", invite.headers.get("Via") or "")
        h.add("Max-Forwards", "70")
        h.add("From", invite.headers.get("From") or "")
        h.add("To", response.headers.get("To") or "")
        h.add("Call-ID", invite.call_id or "")
        h.add("CSeq", f"{invite.cseq.number} ACK")
        for route in invite.headers.get_all("Route"):
            h.add("Route", route)
        ack = SIPRequest("ACK", invite.uri, h).to_bytes()
        self._failure_acks[invite.via.branch or ""] = ack  # for the response resent
        self._send(ack)

    # -- REGISTER --------------------------------------------------------------------------

    async def register(self, expires: int = 3600) -> None:
        """Bind our contact to our AOR at the relay (RFC 3261 §10.2)."""
        call_id, tag = new_tag(), new_tag()

        def build(cseq: int) -> SIPRequest:
            h = self._headers("REGISTER", cseq, call_id, f"<{self.aor}>;tag={tag}", f"<{self.aor}>")
            h.add("Contact", self.contact)
            h.add("Expires", str(expires))
            return SIPRequest("REGISTER", SIPURI.parse(f"sip:{self.domain}"), h)

        _, response = await self._authenticated(build, 1)
        if response.status != 200:
            raise CtlError(f"REGISTER as {self.aor} refused: {response.status} {response.reason}")

    # -- calling ---------------------------------------------------------------------------

    async def invite(
        self, target: str, sdp: bytes, on_progress: Callable[[SIPResponse], None] | None = None
    ) -> Dialog:
        """Call ``target`` with ``sdp``; the dialog once answered (ACK sent), or
        :class:`CallRefused` for a final non-2xx answer."""
        call_id, tag = new_tag() + new_tag(), new_tag()
        uri = SIPURI.parse(target)

        def build(cseq: int) -> SIPRequest:
            h = self._headers("INVITE", cseq, call_id, f"<{self.aor}>;tag={tag}", f"<{target}>")
            h.add("Contact", self.contact)
            h.add("Content-Type", SDP_TYPE)
            request = SIPRequest("INVITE", uri, h, sdp)
            self.ringing = request
            return request

        ringing = self.reactor.callLater(ANSWER_TIMEOUT_SECONDS, self.cancel_call)
        calling = defer.Deferred.fromCoroutine(self._authenticated(build, 1, on_progress))
        try:
            invite, response = await calling.addTimeout(
                ANSWER_TIMEOUT_SECONDS + TRANSACTION_TIMEOUT, self.reactor
            )
        except defer.TimeoutError:
            raise CtlError(f"{target} neither answered nor gave up: call abandoned") from None
        finally:
            self.ringing = None
            if ringing.active():
                ringing.cancel()
        if response.status >= 300:
            self._ack_failure(invite, response)
            missing = permission_missing(response) if response.status == 470 else []
            raise CallRefused(response.status, response.reason, missing)
        route = list(reversed(response.headers.get_all("Record-Route")))
        contact = response.headers.get("Contact")
        if not contact:
            raise CtlError(f"{target} answered without a Contact: cannot continue the call")
        dialog = Dialog(
            call_id,
            invite.headers.get("From") or "",
            response.headers.get("To") or "",
            NameAddr.parse(contact).uri.format(),
            route,
            invite.cseq.number,
            response.body,
        )
        self._dialogs[call_id] = dialog
        ack = self._in_dialog(dialog, "ACK", dialog.cseq)
        self._acks[call_id] = ack.to_bytes()
        self._send(self._acks[call_id])
        return dialog

    def cancel_call(self) -> defer.Deferred[object] | None:
        """Stop ringing (§9.1): a CANCEL with the INVITE's branch, To and Call-ID; the
        INVITE's 487 ends the call. ``None`` when no call of ours is ringing."""
        invite = self.ringing
        if invite is None:
            return None
        h = Headers()
        for name in ("Via", "From", "To", "Call-ID"):
            h.add(name, invite.headers.get(name) or "")
        h.add("Max-Forwards", "70")
        h.add("CSeq", f"{invite.cseq.number} CANCEL")
        cancelling: defer.Deferred[object] = defer.Deferred()
        self._transaction(SIPRequest("CANCEL", invite.uri, h)).addBoth(cancelling.callback)
        return cancelling

    def _in_dialog(self, dialog: Dialog, method: str, cseq: int) -> SIPRequest:
        """A request within ``dialog`` (§12.2.1.1): to the remote target, along the route."""
        h = self._headers(method, cseq, dialog.call_id, dialog.local, dialog.remote)
        for hop in dialog.route:
            h.add("Route", hop)
        return SIPRequest(method, SIPURI.parse(dialog.remote_target), h)

    async def bye(self, dialog: Dialog) -> None:
        """End the call; a BYE the peer never answers ends it locally after Timer F."""
        self._acks.pop(dialog.call_id, None)
        self._dialogs.pop(dialog.call_id, None)

        def build(cseq: int) -> SIPRequest:
            dialog.cseq = cseq
            return self._in_dialog(dialog, "BYE", cseq)

        try:
            await self._authenticated(build, dialog.cseq + 1)
        except CtlError as e:
            self.log.info("BYE unanswered, the call ends here anyway: {e}", e=e)
        finally:
            if not dialog.ended.called:
                dialog.ended.callback(None)

    # -- being called ----------------------------------------------------------------------

    def _request_received(self, request: SIPRequest) -> None:
        if request.method == "INVITE":
            branch = request.via.branch or ""
            done = self._answered.get(branch)
            if done is not None:
                self._send(done.to_bytes())  # a retransmission of an INVITE we answered
                return
            if request.to_tag is not None:
                # A re-INVITE: the session stays as it is (§14.2); none of ours, 481.
                known = request.call_id in self._dialogs
                self.reject(request, 488 if known else 481)
                return
            if not self.taking_calls:
                self.reject(request, 486)
                return
            self._answered[branch] = make_response(request, 100)
            self._send(self._answered[branch].to_bytes())
            self._unanswered[branch] = request
            self._invites.put(request)
            return
        if request.method == "ACK":
            dialog = self._dialogs.get(request.call_id or "")
            if dialog is not None and not dialog.acked.called:
                dialog.acked.callback(None)
            return
        if request.method == "BYE":
            dialog = self._dialogs.pop(request.call_id or "", None)
            self._send(make_response(request, 200 if dialog else 481).to_bytes())
            if dialog is not None and not dialog.ended.called:
                self._acks.pop(dialog.call_id, None)
                dialog.ended.callback(None)
            return
        if request.method == "CANCEL":
            branch = request.via.branch or ""
            invite = self._unanswered.get(branch)
            if invite is None:
                known = branch in self._answered  # answered already: nothing left to stop
                self._send(make_response(request, 200 if known else 481).to_bytes())
                return
            self._send(make_response(request, 200).to_bytes())
            self.reject(invite, 487)
            if invite in self._invites.pending:
                self._invites.pending.remove(invite)
            self.cancelled.add(invite.call_id or "")
            return
        self._send(make_response(request, 501).to_bytes())

    async def incoming(self, timeout_seconds: float | None = None) -> SIPRequest:
        """The next INVITE (its 100 already sent)."""
        self.taking_calls = True
        waiting = self._invites.get()
        if timeout_seconds is not None:
            waiting.addTimeout(timeout_seconds, self.reactor)
        try:
            return await waiting
        except defer.TimeoutError:
            raise CtlError(f"no call within {timeout_seconds:g} s") from None

    def reject(self, invite: SIPRequest, status: int, reason: str | None = None) -> None:
        """A final non-2xx answer (its ACK is absorbed by the ACK handler)."""
        response = make_response(invite, status, reason, to_tag=new_tag())
        self._answered[invite.via.branch or ""] = response
        self._unanswered.pop(invite.via.branch or "", None)
        self._send(response.to_bytes())

    async def accept(self, invite: SIPRequest, sdp: bytes) -> Dialog:
        """Answer 200 with ``sdp`` and retransmit it until the ACK (§13.3.1.4)."""
        self.taking_calls = False  # one call at a time: the next INVITE is 486
        contact = invite.headers.get("Contact")
        if not contact:
            self.reject(invite, 400, "Missing Contact")
            raise CtlError("an INVITE without a Contact arrived: refused")
        headers = [("Contact", self.contact), ("Content-Type", SDP_TYPE)]
        headers += [("Record-Route", rr) for rr in invite.headers.get_all("Record-Route")]
        if (
            self._unanswered.pop(invite.via.branch or "", None) is None
            and invite.call_id in self.cancelled
        ):
            raise CtlError("the caller gave up before the call was answered")
        ok = make_response(invite, 200, headers=headers, body=sdp, to_tag=new_tag())
        self._answered[invite.via.branch or ""] = ok
        dialog = Dialog(
            invite.call_id or "",
            ok.headers.get("To") or "",
            invite.headers.get("From") or "",
            NameAddr.parse(contact).uri.format(),
            list(invite.headers.get_all("Record-Route")),
            0,
            invite.body,
        )
        self._dialogs[dialog.call_id] = dialog
        data = ok.to_bytes()
        timer: list[Any] = []

        def resend(interval: float) -> None:
            self._send(data)
            timer[:] = [self.reactor.callLater(interval, resend, min(interval * 2, T2))]

        resend(T1)
        try:
            await dialog.acked.addTimeout(TRANSACTION_TIMEOUT, self.reactor)
        except defer.TimeoutError:
            self._dialogs.pop(dialog.call_id, None)
            raise CtlError(
                "the caller never acknowledged our answer (no ACK): call dropped"
            ) from None
        finally:
            if timer[0].active():
                timer[0].cancel()
        return dialog


def missing_members(missing: list[NameAddr]) -> list[str]:
    """One text per missing member: its AOR when the relay named it, else the consent URI."""
    return [
        f"{m.display_name} ({m.uri.format()})" if m.display_name else m.uri.format()
        for m in missing
    ]
