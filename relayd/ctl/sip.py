"""A small SIP user agent client over UDP for ``relayctl consent`` (RFC 3261).

One socket for requests out and NOTIFYs in: non-INVITE client transactions with
Timer E retransmission (T1 doubling, capped at T2, T2 once a provisional arrives) and
Timer F (64·T1, or the command's own deadline when shorter) (§17.1.2.2); a 401/407 is
answered once with :func:`relayd.digest.answer_challenge` (§22.2, §22.3). Incoming
requests are answered at once: NOTIFY 200 (queued for the command, each CSeq once),
anything else 405 (§8.2.1).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol

from relayd.ctl.settings import Credentials, CtlError
from relayd.digest import DigestError, answer_challenge
from relayd.sip.message import Headers, SIPRequest, SIPResponse, make_response, new_tag
from relayd.sip.parser import SIPParseError, parse_datagram
from relayd.sip.transaction import SIPTimers, new_branch
from relayd.sip.uri import SIPURI, SIPURIError

DEFAULT_PORT = 5060
TIMERS = SIPTimers()
MAX_QUEUED_NOTIFIES = 1000
"""A relay flooding NOTIFYs cannot grow the client without bound."""


def relay_address(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``sip:HOST[:PORT]`` of the relay's UDP listener."""
    uri_text = text if text.lower().startswith("sip:") else f"sip:{text}"
    try:
        uri = SIPURI.parse(uri_text)
    except SIPURIError as e:
        raise CtlError(f"bad relay address {text!r}: {e}") from None
    if uri.user or uri.scheme != "sip":
        raise CtlError(f"bad relay address {text!r}: give sip:HOST[:PORT]")
    return uri.host.strip("[]"), uri.port or DEFAULT_PORT


def route_to(host: str, port: int) -> tuple[str, str]:
    """``(local address, relay address)``: the relay's first address, and the local one
    that reaches it, which the Via and Contact must name so the relay's answers and
    NOTIFYs come back (a UDP connect sends nothing)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return str(probe.getsockname()[0]), str(address[0])
    except OSError as e:
        raise CtlError(f"cannot reach relay {host}:{port}: {e.strerror or e}") from None


@dataclass
class _Pending:
    answer: defer.Deferred[SIPResponse]
    provisional: bool = False


@dataclass(eq=False)
class SIPClient(DatagramProtocol):
    """The user ``credentials.username`` at ``domain``, talking to one relay."""

    reactor: Any
    relay: tuple[str, int]
    credentials: Credentials
    domain: str
    deadline_seconds: float = TIMERS.timeout_seconds
    incoming: defer.DeferredQueue[SIPRequest] = field(default_factory=defer.DeferredQueue)
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _seen: set[tuple[str | None, int]] = field(default_factory=set)
    _host: str = ""
    _peer: tuple[str, int] = ("", 0)
    _port: Any = None
    _cseq: int = 0

    @property
    def aor(self) -> str:
        return f"sip:{self.credentials.username}@{self.domain}"

    def start(self) -> None:
        self._host, peer = route_to(*self.relay)
        self._peer = (peer, self.relay[1])
        self._port = self.reactor.listenUDP(0, self, interface=self._host)

    def _hostport(self) -> str:
        port = self._port.getHost().port
        return f"[{self._host}]:{port}" if ":" in self._host else f"{self._host}:{port}"

    @property
    def contact(self) -> str:
        return f"<sip:{self.credentials.username}@{self._hostport()}>"

    async def close(self) -> None:
        if self._port is not None:
            await defer.maybeDeferred(self._port.stopListening)
            self._port = None

    # -- receiving ---------------------------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            message = parse_datagram(datagram)
        except SIPParseError:
            return  # §18.3: a malformed datagram is dropped
        if isinstance(message, SIPResponse):
            pending = self._pending.get(message.via.branch or "")
            if pending is None:
                return
            if message.status < 200:
                pending.provisional = True
            elif not pending.answer.called:
                pending.answer.callback(message)
            return
        status = 200 if message.method == "NOTIFY" else 405
        self._send(make_response(message, status).to_bytes(), addr)
        key = (message.call_id, message.cseq.number)
        if status == 200 and key not in self._seen:  # a retransmission is answered again
            self._seen.add(key)
            if len(self.incoming.pending) < MAX_QUEUED_NOTIFIES:
                self.incoming.put(message)

    # -- sending -----------------------------------------------------------------------

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:  # None once closed
            self.transport.write(data, addr)

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
        """The final response to ``method``, a 401/407 answered once with credentials;
        each transaction waits at most ``wait_seconds`` (default: the client's deadline)."""
        call_id, from_tag = call_id or new_tag(), from_tag or new_tag()
        extra = list(headers)
        limit = min(wait_seconds or self.deadline_seconds, TIMERS.timeout_seconds)  # Timer F
        dialog = (to, call_id, from_tag, limit)
        response = await self._transaction(method, uri, extra, body, *dialog)
        if response.status not in (401, 407):
            return response
        proxy = response.status == 407
        challenge = response.headers.get("proxy-authenticate" if proxy else "www-authenticate")
        try:
            answer = answer_challenge(
                challenge or "",
                username=self.credentials.username,
                password=self.credentials.password,
                method=method,
                uri=uri,
            )
        except DigestError as e:
            raise CtlError(f"{method} {uri}: unusable challenge: {e}") from None
        extra.append(("Proxy-Authorization" if proxy else "Authorization", answer.authorization))
        response = await self._transaction(method, uri, extra, body, *dialog)
        if response.status in (401, 407):
            raise CtlError(f"{method} {uri}: credentials for {self.aor} refused")
        return response

    async def _transaction(
        self,
        method: str,
        uri: str,
        headers: list[tuple[str, str]],
        body: bytes,
        to: str | None,
        call_id: str,
        from_tag: str,
        limit: float,
    ) -> SIPResponse:
        try:
            request_uri = SIPURI.parse(uri)
        except SIPURIError as e:
            raise CtlError(f"bad URI {uri!r}: {e}") from None
        self._cseq += 1
        branch = new_branch()
        h = Headers()
        h.add("Via", f"SIP/2.0/UDP {self._hostport()};rport;branch={branch}")
        h.add("Max-Forwards", "70")
        h.add("From", f"<{self.aor}>;tag={from_tag}")
        h.add("To", to or f"<{uri}>")
        h.add("Call-ID", call_id)
        h.add("CSeq", f"{self._cseq} {method}")
        h.add("Contact", self.contact)
        for name, value in headers:
            h.add(name, value)
        data = SIPRequest(method, request_uri, h, body).to_bytes()
        pending = self._pending[branch] = _Pending(defer.Deferred())
        interval = [TIMERS.t1_seconds]
        timer_e: list[Any] = []

        def retransmit() -> None:  # Timer E (§17.1.2.2)
            self._send(data, self._peer)
            if timer_e:
                doubled = min(2 * interval[0], TIMERS.t2_seconds)
                interval[0] = TIMERS.t2_seconds if pending.provisional else doubled
            timer_e[:] = [self.reactor.callLater(interval[0], retransmit)]

        retransmit()
        try:
            return await pending.answer.addTimeout(limit, self.reactor)
        except defer.TimeoutError:
            raise CtlError(
                f"no answer to {method} from {self.relay[0]}:{self.relay[1]} within {limit:g}s"
            ) from None
        finally:
            del self._pending[branch]
            if timer_e[0].active():
                timer_e[0].cancel()
