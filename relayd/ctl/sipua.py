"""The one SIP user agent of relayctl, over UDP: every request goes to the relay.

``relayctl consent`` sends CONSENT and SUBSCRIBE and reads the wait-permission
NOTIFYs; ``relayctl chat`` REGISTERs, INVITEs, ACKs, BYEs and CANCELs, and answers
incoming INVITEs and the BYEs of its dialogs. One client transaction serves them all:
retransmitted per Timer A (INVITE, doubling) or Timer E (others, doubling up to T2, T2
once a provisional arrives) until a response, given up after Timer B/F, 64·T1 or the
command's shorter deadline (RFC 3261 §17.1.1.2, §17.1.2.2); a 401/407 is answered once
with :func:`relayd.digest.answer_challenge` (§22.2, §22.3). A 2xx we send is
retransmitted until its ACK (§13.3.1.4). Every wait is bounded, and time comes from
the injected reactor.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from relayd.ctl.settings import Credentials, CtlError
from relayd.digest import DigestError, answer_challenge
from relayd.sip.message import (
    Headers,
    SIPHeaderError,
    SIPRequest,
    SIPResponse,
    make_response,
    new_tag,
)
from relayd.sip.parser import SIPParseError, parse_datagram
from relayd.sip.transaction import SIPTimers, new_branch
from relayd.sipuri import SIPURI, NameAddr, SIPURIError, format_host

DEFAULT_PORT = 5060
TIMERS = SIPTimers()
T1 = TIMERS.t1_seconds
T2 = TIMERS.t2_seconds
TRANSACTION_TIMEOUT = TIMERS.timeout_seconds
"""Timer B and F: no response to a request by then is a failure (§17.1.1.2)."""

ANSWER_TIMEOUT_SECONDS = 120.0
"""Longest ring: the INVITE is CANCELled after this long without a final response."""

MAX_QUEUED_NOTIFIES = 1000
"""A relay flooding NOTIFYs cannot grow the agent without bound."""

SDP_TYPE = "application/sdp"

_NO_CONTACT = frozenset({"ACK", "BYE", "CANCEL"})
"""Requests that neither set up nor refresh a dialog carry no Contact (§8.1.1.8)."""


def relay_address(text: str) -> tuple[str, int]:
    """``HOST[:PORT]``, ``[V6]:PORT``, a bare IPv6 address or ``sip:HOST[:PORT]`` of
    the relay's UDP listener, as ``(host, port)``; the port defaults to 5060."""
    if ":" in text and text.count(":") > 1 and not text.startswith(("[", "sip:")):
        text = f"[{text}]"  # a bare IPv6 address: its colons are not a port
    uri_text = text if text.lower().startswith("sip:") else f"sip:{text}"
    try:
        uri = SIPURI.parse(uri_text)
    except SIPURIError as e:
        raise CtlError(f"bad relay address {text!r}: {e}") from None
    if uri.user or uri.scheme != "sip":
        raise CtlError(f"bad relay address {text!r}: give sip:HOST[:PORT]")
    if uri.port is not None and not 0 < uri.port < 65536:
        raise CtlError(f"bad relay address {text!r}: the port must be 1-65535")
    return uri.host.strip("[]"), uri.port or DEFAULT_PORT


def resolve(host: str, port: int) -> tuple[str, int]:
    """The relay's address for UDP. A name with both kinds of address takes its IPv4
    one: UDP cannot tell which one a relay listens on, and its default listener is on
    127.0.0.1."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as e:
        raise CtlError(f"cannot resolve the SIP relay {host}: {e}") from None
    found.sort(key=lambda entry: entry[0] != socket.AF_INET)
    address = found[0][4]
    return str(address[0]), int(address[1])


def local_address_for(relay: tuple[str, int]) -> str:
    """The address of ours the relay sees, which the Via and Contact must name so its
    answers and requests come back (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in relay[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(relay)
        except OSError as e:
            raise CtlError(f"no route to the SIP relay {relay[0]}: {e.strerror}") from None
        return str(probe.getsockname()[0])


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


def missing_members(missing: list[NameAddr]) -> list[str]:
    """One text per missing member: its AOR when the relay named it, else the consent URI."""
    return [
        f"{m.display_name} ({m.uri.format()})" if m.display_name else m.uri.format()
        for m in missing
    ]


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
    """The user ``credentials.username`` at ``domain``, whose every request goes to
    ``relay`` (its outbound proxy); no transaction waits past ``deadline_seconds``."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        relay: tuple[str, int],
        credentials: Credentials,
        domain: str,
        deadline_seconds: float = TRANSACTION_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.relay = relay
        self.credentials = credentials
        self.domain = domain
        self.deadline_seconds = deadline_seconds
        #: Where datagrams go: the relay's address (resolved by :meth:`start`).
        self.peer = relay
        self.host = relay[0]
        self.port = 0
        self._listening: Any = None
        self._cseq = 0
        self._register_call_id = new_tag() + new_tag()
        self._clients: dict[str, Callable[[SIPResponse], None]] = {}
        self._dialogs: dict[str, Dialog] = {}
        self._invites: defer.DeferredQueue[SIPRequest] = defer.DeferredQueue()
        self._answered: dict[str, SIPResponse] = {}  # INVITE branch -> our final response
        self._acks: dict[str, bytes] = {}  # Call-ID -> our ACK for its 2xx
        self._failure_acks: dict[str, bytes] = {}  # INVITE branch -> our ACK of its 3xx-6xx
        self._unanswered: dict[str, SIPRequest] = {}  # branch -> INVITE not yet answered
        self._tags: dict[str, str] = {}  # INVITE branch -> our To tag
        self._notified: set[tuple[str | None, int]] = set()
        #: NOTIFYs received (each once; already answered 200), for the consent watch.
        self.notifications: defer.DeferredQueue[SIPRequest] = defer.DeferredQueue()
        #: INVITEs are queued for :meth:`incoming` from its first call until :meth:`accept`.
        self.taking_calls = False
        #: Our INVITE while it waits for its final response.
        self.ringing: SIPRequest | None = None
        #: Call-IDs of incoming INVITEs their caller CANCELled.
        self.cancelled: set[str] = set()

    # -- addresses -------------------------------------------------------------------------

    @property
    def aor(self) -> str:
        return f"sip:{self.credentials.username}@{self.domain}"

    @property
    def contact(self) -> str:
        return f"<sip:{self.credentials.username}@{format_host(self.host, self.port)}>"

    # -- Twisted ---------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on an ephemeral port of the local address that reaches the relay."""
        self.peer = resolve(*self.relay)
        local = local_address_for(self.peer)
        self._listening = self.reactor.listenUDP(0, self, interface=local)

    async def close(self) -> None:
        if self._listening is not None:
            listening, self._listening = self._listening, None
            await defer.maybeDeferred(listening.stopListening)

    def startProtocol(self) -> None:
        transport: Any = self.transport
        address = transport.getHost()
        self.host, self.port = address.host, address.port

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            message = parse_datagram(datagram)
        except SIPParseError as e:  # §18.3: dropped
            self.log.debug("unparsable datagram from {peer}: {e}", peer=addr, e=e)
            return
        try:
            if isinstance(message, SIPResponse):
                self._response_received(message)
            else:
                self._request_received(message)
        except SIPHeaderError as e:
            self.log.debug("bad message from {peer}: {e}", peer=addr, e=e)

    def _response_received(self, response: SIPResponse) -> None:
        handler = self._clients.get(f"{response.via.branch} {response.cseq.method}")
        if handler is not None:
            handler(response)
        elif response.status // 100 == 2 and response.call_id in self._acks:
            self._send(self._acks[response.call_id or ""])  # our ACK was lost
        elif response.status >= 300 and response.via.branch in self._failure_acks:
            self._send(self._failure_acks[response.via.branch or ""])

    def _send(self, data: bytes) -> None:
        transport: Any = self.transport
        if transport is not None:  # None once closed
            transport.write(data, self.peer)

    # -- building requests -----------------------------------------------------------------

    def _build(
        self,
        method: str,
        uri: SIPURI,
        cseq: int,
        call_id: str,
        local: str,
        remote: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        route: Iterable[str] = (),
    ) -> SIPRequest:
        """A new request with a new branch (§8.1.1); ``local``/``remote`` are the From
        and To values, ``route`` the dialog's route set (§12.2.1.1)."""
        h = Headers()
        h.add("Via", f"SIP/2.0/UDP {format_host(self.host, self.port)};rport;branch={new_branch()}")
        h.add("Max-Forwards", "70")
        for hop in route:
            h.add("Route", hop)
        h.add("From", local)
        h.add("To", remote)
        h.add("Call-ID", call_id)
        h.add("CSeq", f"{cseq} {method}")
        if method not in _NO_CONTACT:
            h.add("Contact", self.contact)
        for name, value in headers:
            h.add(name, value)
        return SIPRequest(method, uri, h, body)

    def _in_invite_transaction(self, invite: SIPRequest, method: str, to: str) -> SIPRequest:
        """The ACK of a non-2xx answer or a CANCEL: the INVITE's branch, From, Call-ID,
        CSeq number and Route (§17.1.1.3, §9.1)."""
        h = Headers()
        h.add("Via", invite.headers.get("Via") or "")
        h.add("Max-Forwards", "70")
        for hop in invite.headers.get_all("Route"):
            h.add("Route", hop)
        h.add("From", invite.headers.get("From") or "")
        h.add("To", to)
        h.add("Call-ID", invite.call_id or "")
        h.add("CSeq", f"{invite.cseq.number} {method}")
        return SIPRequest(method, invite.uri, h)

    def _in_dialog(self, dialog: Dialog, method: str, cseq: int) -> SIPRequest:
        """A request within ``dialog`` (§12.2.1.1): to the remote target, along the route."""
        target = SIPURI.parse(dialog.remote_target)
        return self._build(
            method, target, cseq, dialog.call_id, dialog.local, dialog.remote, route=dialog.route
        )

    # -- client transactions ---------------------------------------------------------------

    def _transaction(
        self,
        request: SIPRequest,
        on_provisional: Callable[[SIPResponse], None] | None = None,
        timeout_seconds: float | None = None,
    ) -> defer.Deferred[SIPResponse]:
        """Send ``request`` and retransmit it (Timer A or E) until a response; the
        final response, or a CtlError after Timer B/F (or ``timeout_seconds``, or the
        agent's deadline, when shorter). A ringing INVITE waits for its final answer."""
        key = f"{request.via.branch} {request.method}"
        data = request.to_bytes()
        limit = min(timeout_seconds or self.deadline_seconds, TRANSACTION_TIMEOUT)
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
                        f"no answer to {request.method} from the SIP relay"
                        f" {format_host(*self.relay)} within {limit:g} s"
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
        timers.append(self.reactor.callLater(limit, give_up))
        return final

    async def _authenticated(
        self,
        build: Callable[[int], SIPRequest],
        cseq: int,
        on_provisional: Callable[[SIPResponse], None] | None = None,
        timeout_seconds: float | None = None,
    ) -> tuple[SIPRequest, SIPResponse]:
        """``build(cseq)`` sent, and once more with credentials for a 401/407."""
        request = build(cseq)
        response = await self._transaction(request, on_provisional, timeout_seconds)
        if response.status not in (401, 407):
            return request, response
        if request.method == "INVITE":
            self._ack_failure(request, response)
        proxy = response.status == 407
        challenge = response.headers.get("Proxy-Authenticate" if proxy else "WWW-Authenticate")
        if not challenge:
            return request, response
        try:
            answer = answer_challenge(
                challenge,
                username=self.credentials.username,
                password=self.credentials.password,
                method=request.method,
                uri=request.uri.format(),
            )
        except DigestError as e:
            raise CtlError(
                f"{request.method}: unusable challenge from the SIP relay: {e}"
            ) from None
        again = build(cseq + 1)
        again.headers.add("Proxy-Authorization" if proxy else "Authorization", answer.authorization)
        response = await self._transaction(again, on_provisional, timeout_seconds)
        if response.status in (401, 407):
            if again.method == "INVITE":
                self._ack_failure(again, response)
            raise CtlError(
                f"the SIP relay refused our credentials for {self.credentials.username}"
                f" ({response.status} {response.reason}): wrong user name or password?"
            )
        return again, response

    def _ack_failure(self, invite: SIPRequest, response: SIPResponse) -> None:
        """The ACK of a non-2xx final response: same branch, hop by hop (§17.1.1.3)."""
        ack = self._in_invite_transaction(invite, "ACK", response.headers.get("To") or "")
        self._failure_acks[invite.via.branch or ""] = ack.to_bytes()  # for the response resent
        self._send(self._failure_acks[invite.via.branch or ""])

    async def request(
        self,
        method: str,
        uri: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        to: str | None = None,
        call_id: str | None = None,
        from_tag: str | None = None,
        wait_seconds: float | None = None,
    ) -> SIPResponse:
        """The final response to a non-INVITE ``method`` outside any dialog of ours
        (REGISTER, CONSENT, SUBSCRIBE); a 401/407 answered once with credentials."""
        try:
            request_uri = SIPURI.parse(uri)
        except SIPURIError as e:
            raise CtlError(f"bad URI {uri!r}: {e}") from None
        call_id = call_id or new_tag()
        local = f"<{self.aor}>;tag={from_tag or new_tag()}"
        extra = list(headers)

        def build(cseq: int) -> SIPRequest:
            return self._build(
                method, request_uri, cseq, call_id, local, to or f"<{uri}>", extra, body
            )

        self._cseq += 1
        sent, response = await self._authenticated(build, self._cseq, timeout_seconds=wait_seconds)
        self._cseq = max(self._cseq, sent.cseq.number)  # CSeq grows within a Call-ID (§8.1.1.5)
        return response

    # -- REGISTER --------------------------------------------------------------------------

    async def register(self, expires: int = 3600) -> None:
        """Bind our contact to our AOR at the relay; one Call-ID for all (RFC 3261 §10.2)."""
        response = await self.request(
            "REGISTER",
            f"sip:{self.domain}",
            [("Expires", str(expires))],
            to=f"<{self.aor}>",
            call_id=self._register_call_id,
        )
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
        content = [("Content-Type", SDP_TYPE)]

        def build(cseq: int) -> SIPRequest:
            local = f"<{self.aor}>;tag={tag}"
            request = self._build("INVITE", uri, cseq, call_id, local, f"<{target}>", content, sdp)
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
        cancel = self._in_invite_transaction(invite, "CANCEL", invite.headers.get("To") or "")
        cancelling: defer.Deferred[object] = defer.Deferred()
        self._transaction(cancel).addBoth(cancelling.callback)
        return cancelling

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

    # -- being called, and notified --------------------------------------------------------

    def _request_received(self, request: SIPRequest) -> None:
        handler = {
            "INVITE": self._invite_received,
            "ACK": self._ack_received,
            "BYE": self._bye_received,
            "CANCEL": self._cancel_received,
            "NOTIFY": self._notify_received,
        }.get(request.method)
        if handler is None:
            self._send(make_response(request, 501).to_bytes())
            return
        handler(request)

    def _invite_received(self, request: SIPRequest) -> None:
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

    def _ack_received(self, request: SIPRequest) -> None:
        dialog = self._dialogs.get(request.call_id or "")
        if dialog is not None and not dialog.acked.called:
            dialog.acked.callback(None)

    def _bye_received(self, request: SIPRequest) -> None:
        dialog = self._dialogs.pop(request.call_id or "", None)
        self._send(make_response(request, 200 if dialog else 481).to_bytes())
        if dialog is not None and not dialog.ended.called:
            self._acks.pop(dialog.call_id, None)
            dialog.ended.callback(None)

    def _cancel_received(self, request: SIPRequest) -> None:
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

    def _notify_received(self, request: SIPRequest) -> None:
        """200 at once (RFC 6665 §4.1.3); a retransmission is answered again, queued once."""
        self._send(make_response(request, 200).to_bytes())
        key = (request.call_id, request.cseq.number)
        if key not in self._notified:
            self._notified.add(key)
            if len(self.notifications.pending) < MAX_QUEUED_NOTIFIES:
                self.notifications.put(request)

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

    def _to_tag(self, invite: SIPRequest) -> str:
        """Our tag for ``invite``'s dialog: the same in its 180 and its 200 (§12.1.1)."""
        return self._tags.setdefault(invite.via.branch or "", new_tag())

    def ring(self, invite: SIPRequest) -> None:
        """180 Ringing (§13.3.1.1): the caller learns we have the call before the 200."""
        if invite.via.branch in self._unanswered:
            self._send(make_response(invite, 180, to_tag=self._to_tag(invite)).to_bytes())

    def reject(self, invite: SIPRequest, status: int, reason: str | None = None) -> None:
        """A final non-2xx answer (its ACK is absorbed by the ACK handler)."""
        response = make_response(invite, status, reason, to_tag=new_tag())
        self._answered[invite.via.branch or ""] = response
        self._unanswered.pop(invite.via.branch or "", None)
        self._send(response.to_bytes())

    async def accept(self, invite: SIPRequest, sdp: bytes, *, more_calls: bool = False) -> Dialog:
        """Answer 200 with ``sdp`` and retransmit it until the ACK (§13.3.1.4). One call
        at a time: the next INVITE is 486, unless ``more_calls`` (a session beside a call)."""
        self.taking_calls = self.taking_calls and more_calls
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
        ok = make_response(invite, 200, headers=headers, body=sdp, to_tag=self._to_tag(invite))
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
