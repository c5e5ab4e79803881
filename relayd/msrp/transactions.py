"""Requests relayd sent on a connection and the responses it awaits (RFC 4975 §7.1).

A forwarded SEND frame awaits its hop-by-hop response (``FrameTransaction``,
RFC 4976 §6.4.1); any other forwarded request awaits the response that
travels back to its sender (``EndToEndTransaction``, §6.4.3).  When a next
hop fails, ``hop_failure`` says what its senders are told.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.python.failure import Failure

from relayd.msrp.link import Link, Stream
from relayd.msrp.message import (
    CHUNK_LIMIT,
    HOP_HEADERS,
    Headers,
    MSRPRequest,
    MSRPResponse,
    make_response,
)
from relayd.msrp.relay import addressed_to_us, response_route
from relayd.net.tls import tls_failure


def hop_failure(reason: Failure | None, connected: bool) -> tuple[int, str, str]:
    """The status a failed next hop is reported with (RFC 4975 §10), and its cause.

    * 403: TLS with it failed (its certificate refused, RFC 4976 §9.2): we
      do not forward to a hop we cannot authenticate.  MSRP has no 5xx for
      an unavailable hop; 403 is its "action not allowed".
    * 408: it never answered the connect (the code RFC 4975 §10 gives a
      downstream transaction that did not complete in time).
    * 481: it refused the connection or has no address (``connected``
      false), or the connection dropped: the session is gone that way.

    The cause (the error text) is for the log line; the sender gets the code
    and a short comment.
    """
    value = reason.value if reason is not None else None
    cause = reason.getErrorMessage() if reason is not None else "connection closed"
    tls = tls_failure(value)
    if tls is not None:
        return 403, "next hop failed TLS verification", f"TLS failed: {tls}"
    if isinstance(value, error.TimeoutError):
        return 408, "next hop did not answer", cause
    if connected:
        return 481, "next hop connection lost", cause
    return 481, "next hop unreachable", cause


class FrameTransaction:
    __slots__ = ("deadline", "first_byte", "last_byte", "stream")

    def __init__(self, stream: Stream, first_byte: int, last_byte: int) -> None:
        self.stream = stream
        self.first_byte = first_byte
        self.last_byte = last_byte
        self.deadline = 0.0

    def timeout(self) -> None:
        self.stream.timed_out(self.first_byte, self.last_byte)

    def response(self, response: MSRPResponse) -> bool:
        stream = self.stream
        # Usually the To-Path is our URI byte for byte as we wrote it: one
        # comparison; anything else is parsed and compared as URIs.
        block = response.headers.block
        if not (block is not None and block.startswith(stream.response_to)) and not (
            addressed_to_us(response, stream.relay.core.is_local)
        ):
            # §6.4.3: only a response coming back along our own path counts;
            # the timer still answers for this frame.
            stream.relay.log.debug(
                "Response {code} {tid} not addressed to this relay: dropped",
                code=response.code,
                tid=response.tid,
            )
            return False
        if response.code // 100 != 2:
            stream.fail(response.code, response.comment, self.first_byte, self.last_byte)
        return True

    def lost(self, code: int, comment: str, cause: str) -> None:
        self.stream.fail(code, comment, self.first_byte, self.last_byte, cause)


class EndToEndTransaction:
    """A forwarded AUTH or other request whose response travels back (§6.4.3)."""

    __slots__ = ("deadline", "hop", "local_uri", "relay", "request", "source", "transparent")

    def __init__(
        self,
        hop: Link,
        source: Link,
        request: MSRPRequest,
        local_uri: str,
        transparent: bool = False,
    ) -> None:
        self.relay = hop.relay
        #: Passed on to another worker unchanged: so is its response (Route).
        self.transparent = transparent
        self.hop = hop
        self.source = source
        self.request = request
        #: Our URI as the forwarded request's From-Path began with it.
        self.local_uri = local_uri
        self.deadline = 0.0

    def response(self, response: MSRPResponse) -> bool:
        rewritten = None if self.transparent else response_route(response, self.relay.core.is_local)
        if self.transparent:
            to_path = response.headers.get("To-Path") or ""
            from_path = response.headers.get("From-Path") or ""
        elif rewritten is not None:
            to_path, from_path = rewritten
        else:
            # §6.4.3 has the response come back along the request's path; some
            # relays (Kamailio's 401 to a forwarded AUTH) name only us. The
            # transaction id is ours, sent to this hop alone: the answer goes
            # back along the path the request came by, rather than a 408 later.
            self.hop.deviating_response(response)
            to_path = self.request.headers.get("From-Path") or ""
            from_path = f"{self.local_uri} {response.headers.get('From-Path') or ''}".rstrip()
        headers = Headers(
            [("To-Path", to_path), ("From-Path", from_path)]
            + [(k, v) for k, v in response.headers if k.lower() not in HOP_HEADERS]
        )
        if self.request.method == "AUTH" and CHUNK_LIMIT in response.headers:
            self.hop.takes_any_chunk()
        if not self.source.connected:
            return True  # §6.4.3: the connection is gone, drop quietly
        forwarded = MSRPResponse(self.request.tid, response.code, response.comment, headers)
        self.source.write_atomic(forwarded.to_bytes())
        if self.request.method == "AUTH":
            challenge = (response.headers.get("WWW-Authenticate") or "").lower()
            if (
                response.code == 401
                and "Authorization" in self.request.headers
                and "stale=true" not in challenge.replace(" ", "")
            ):
                self.source.auth_failed()
            elif response.code == 200:
                self.source.succeeded()
        return True

    def timeout(self) -> None:
        self._answer(408, "Request Timeout")

    def lost(self, code: int, comment: str, cause: str) -> None:
        self.relay.log.info(
            "{method} answered {code} {comment}: {cause}",
            method=self.request.method,
            code=code,
            comment=comment,
            cause=cause,
        )
        self._answer(code, comment)

    def _answer(self, code: int, comment: str) -> None:
        if self.source.connected:
            response = make_response(
                self.request, code, comment, to_path=self.request.headers.get("From-Path") or ""
            )
            self.source.write_atomic(response.to_bytes())
