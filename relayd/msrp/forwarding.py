"""Where the body of an inbound message goes: streamed on, forwarded whole, or answered here.

Each inbound request gets a consumer for its body (RFC 4976 §6.4):

* ``SendStream``: a SEND chunk is never assembled; it is written to the next
  hop as data arrives, re-chunked to the next hop's chunk size.  Only one
  frame can be open on a connection at a time: whoever needs the wire cuts
  the open frame with a ``+`` end-line and the message continues later in a
  new frame with a new transaction id and a moved Byte-Range, so a large
  transfer never holds up a small message.  A stream always holds back its
  latest piece of body, so every frame it cuts, and its final frame, carries
  at least one byte.  What the next hop has no room for waits in the
  stream's backlog (connection.py drains it).
* ``BufferedForward``: any other request is small and forwarded whole.
* ``LocalAuth``: an AUTH addressed to this relay is answered here.

Streams see connections only as ``link.Link``.
"""

from __future__ import annotations

from twisted.python.failure import Failure

from relayd.msrp.link import Link, Stream
from relayd.msrp.message import (
    CHUNK_LIMIT,
    HOP_HEADERS,
    ByteRange,
    Headers,
    MSRPRequest,
    MSRPResponse,
    MSRPStatus,
    end_line,
    forwarded_lines,
    make_response,
    ok_bytes,
    parse_report_mode,
    request_frame,
    send_frame,
    send_head,
    stream_lines,
)
from relayd.msrp.relay import Route
from relayd.msrp.transactions import EndToEndTransaction, FrameTransaction, hop_failure
from relayd.tokens import new_transaction_id


class Plan:
    """A routing decision and the header bytes every request on those paths reuses.

    Cached per connection under the request's To-Path and From-Path, like the
    decision itself: the forwarded copy's new path lines and the hop-by-hop
    200's path lines (make_response's rule) are then built once per session.
    """

    __slots__ = (
        "expires_at",
        "forward_paths",
        "generation",
        "ok_paths",
        "report_to",
        "response_to",
        "route",
        "target",
    )

    def __init__(
        self, route: Route, request: MSRPRequest, generation: int, target: Link | None
    ) -> None:
        self.route = route
        #: route.connection when it is a connection of ours (always, but for
        #: a foreign object a session table was given), else None.
        self.target = target
        #: RelayCore.still_valid holds while no session left the table since
        #: (SessionTable.generation) and none of those relied on has expired.
        self.generation = generation
        self.expires_at = min([s.expires_at for s in route.relied_on], default=0.0)
        self.forward_paths = (
            f"To-Path: {route.to_path}\r\nFrom-Path: {route.from_path}\r\n".encode()
        )
        #: How the next hop's responses start: To-Path back to our URI (§6.4.3).
        self.response_to = f"To-Path: {route.from_path.split(' ', 1)[0]}\r\n".encode()
        #: Where failure REPORTs for a SEND go (§7.1.2): the whole From-Path.
        self.report_to = request.headers.get("From-Path") or ""
        previous = self.report_to.split(" ", 1)[0]
        addressed = (request.headers.get("To-Path") or "").split(" ", 1)[0]
        self.ok_paths = f"To-Path: {previous}\r\nFrom-Path: {addressed}\r\n".encode()


class Discard:
    __slots__ = ()

    def data(self, chunk: bytes) -> None:
        pass

    def end(self, flag: bytes) -> None:
        pass

    def abort(self) -> None:
        pass


DISCARD = Discard()


class LocalAuth:
    __slots__ = ("connection", "request")

    def __init__(self, connection: Link, request: MSRPRequest) -> None:
        self.connection = connection
        self.request = request

    def data(self, chunk: bytes) -> None:
        pass

    def end(self, flag: bytes) -> None:
        connection = self.connection
        try:
            outcome = connection.relay.core.handle_auth(self.request, connection, connection)
        except MSRPStatus as status:
            connection.refuse(self.request, status)
            return
        response = outcome.response
        if CHUNK_LIMIT in self.request.headers:
            # A relayd peer forwarded it: answer in kind.
            headers = Headers([*response.headers, (CHUNK_LIMIT, "none")])
            response = MSRPResponse(response.tid, response.code, response.comment, headers)
        connection.write_atomic(response.to_bytes())
        if outcome.session is not None:
            connection.succeeded()
        elif outcome.failed:
            connection.auth_failed()

    def abort(self) -> None:
        pass


class BufferedForward:
    """A request other than SEND: small, forwarded whole, never split (§6.4.2)."""

    __slots__ = ("body", "has_body", "oversized", "plan", "request", "route", "size", "source")

    def __init__(self, source: Link, request: MSRPRequest, plan: Plan, has_body: bool) -> None:
        self.source = source
        self.request = request
        self.plan = plan
        self.route = plan.route
        self.has_body = has_body
        self.body: list[bytes] = []
        self.size = 0
        self.oversized = False

    def data(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.source.relay.limits.max_request_body_bytes:
            self.oversized = True
            self.body = []
        elif not self.oversized:
            self.body.append(chunk)

    def end(self, flag: bytes) -> None:
        if self.oversized:
            self.source.refuse(self.request, MSRPStatus(413, "request body too large"))
            return
        tid = new_transaction_id()
        frame = self._frame(tid, flag)
        relay = self.source.relay
        target = self.plan.target
        if target is not None:
            self._send(target, tid, frame)
            return
        pending = relay.connection_for(self.route.next_uri)
        pending.addCallbacks(
            lambda connection: self._send(connection, tid, frame),
            lambda failure: self._unreachable(failure),
        )
        pending.addErrback(
            lambda f: relay.log.failure("forwarding {method}", f, method=self.request.method)
        )

    def _frame(self, tid: str, flag: bytes) -> bytes:
        """The request with its new paths: header bytes sliced when they allow it."""
        request = self.request
        body = b"".join(self.body) if self.has_body else None
        lines = forwarded_lines(request.headers, skip_byte_range=False)
        if lines is None or request.method == "AUTH":
            own = [(CHUNK_LIMIT, "none")] if request.method == "AUTH" else []
            headers = Headers(
                [("To-Path", self.route.to_path), ("From-Path", self.route.from_path), *own]
                + [(k, v) for k, v in request.headers if k.lower() not in HOP_HEADERS]
            )
            return MSRPRequest(tid, request.method, headers).to_bytes(body, flag)
        return request_frame(tid, request.method, self.plan.forward_paths, lines[0], body, flag)

    def _send(self, target: Link, tid: str, frame: bytes) -> None:
        if not target.connected:
            self._unreachable(None)
            return
        if self.request.method != "REPORT":
            target.add_transaction(
                tid,
                EndToEndTransaction(
                    target,
                    self.source,
                    self.request,
                    self.route.local_uri,
                    transparent=self.route.transparent,
                ),
            )
        target.write_atomic(frame)

    def _unreachable(self, failure: Failure | None) -> None:
        if self.request.method != "REPORT" and self.source.connected:
            code, comment, _ = hop_failure(failure, connected=False)
            self.source.refuse(self.request, MSRPStatus(code, comment), count=False)

    def abort(self) -> None:
        pass


class SendStream:
    """One inbound SEND chunk on its way to the next hop, cut into frames as needed."""

    __slots__ = (
        "backlog",
        "backlog_at",
        "backlog_flag",
        "done",
        "ended",
        "error",
        "failed",
        "failure_report",
        "frame_bytes",
        "frame_first",
        "frame_tid",
        "has_body",
        "head_after",
        "head_before",
        "held",
        "message_id",
        "offset",
        "ok_paths",
        "original_range",
        "pending",
        "range_end",
        "relay",
        "report_from",
        "report_to",
        "request",
        "response_to",
        "source",
        "target",
        "total",
    )

    def __init__(self, source: Link, request: MSRPRequest, plan: Plan, has_body: bool) -> None:
        route = plan.route
        headers = request.headers
        message_id = headers.get("Message-ID")
        if not message_id:
            raise MSRPStatus(400, "SEND without Message-ID")
        range_text = headers.get("Byte-Range")
        try:
            byte_range = ByteRange.parse(range_text) if range_text else ByteRange(1, None, None)
        except ValueError as e:
            raise MSRPStatus(400, str(e)) from None
        self.failure_report = parse_report_mode(headers.get("Failure-Report"), "yes")
        self.relay = source.relay
        self.source = source
        self.request = request
        self.message_id = message_id
        self.has_body = has_body
        self.offset = byte_range.start
        self.total = "*" if byte_range.total is None else str(byte_range.total)
        self.original_range = range_text or byte_range.format()
        self.range_end = byte_range.end
        self.report_to = plan.report_to
        self.report_from = route.local_uri
        self.ok_paths = plan.ok_paths
        self.response_to = plan.response_to
        # Content-Type must stay last before the body: without a Byte-Range
        # to replace, the new one goes first after the paths.
        lines = forwarded_lines(headers, skip_byte_range=True)
        if lines is None:
            lines = stream_lines(headers)
        self.head_before = plan.forward_paths + lines[0]
        self.head_after = lines[1] + b"\r\n" if has_body else lines[1]
        self.held: bytes | None = None
        self.frame_tid: str | None = None
        self.frame_first = 0
        self.frame_bytes = 0
        self.failed = False
        #: Why the stream failed, while its chunk's transaction was unanswered.
        self.error: tuple[int, str] | None = None
        self.ended = False
        self.done = False
        self.target: Link | None = None
        self.pending: list[tuple[bool, bytes]] | None = None
        #: Output the next hop had no room for yet (from backlog_at on), and
        #: the end-line flag that follows it once the chunk has ended.
        self.backlog: bytes | None = None
        self.backlog_at = 0
        self.backlog_flag: bytes | None = None
        target = plan.target
        if route.connection is not None:
            if target is None or not target.connected:
                raise MSRPStatus(481, "recipient is not connected")
            self._attach(target)
        else:
            self.pending = []
            source.pause_reading(self)
            deferred = self.relay.connection_for(route.next_uri)
            deferred.addCallbacks(self._connected, self._unreachable)
            deferred.addErrback(lambda f: self.relay.log.failure("attaching a stream", f))

    # -- consumer interface (inbound side) ----------------------------------------------

    def data(self, chunk: bytes) -> None:
        if self.failed:
            return
        if self.pending is not None:
            self.pending.append((False, chunk))
            return
        held = self.held
        self.held = chunk
        if held is not None:
            self._emit(held, None)

    def end(self, flag: bytes) -> None:
        source = self.source
        self.ended = True
        error = self.error
        if error is not None:
            # Failed before its end-line: the chunk's one response is that
            # failure, never a 200 after the REPORT (RFC 4975 §7.1.2).
            if self.failure_report != "no" and source.connected:
                response = make_response(self.request, error[0], error[1])
                source.write_atomic(response.to_bytes())
            return
        if self.failure_report == "yes" and source.connected:
            # Hop-by-hop success: we have the chunk (§6.4.1); make_response's paths.
            source.write_atomic(ok_bytes(self.request.tid, self.ok_paths))
        if self.failed:
            return
        if self.pending is not None:
            self.pending.append((True, flag))
            return
        self._finish(flag)

    def abort(self) -> None:
        """The sender went away mid-chunk: end what was started with '#'."""
        if self.failed or self.done:
            return
        if self.pending is not None:
            self.pending = None
            self.failed = True
            return
        if (
            self.held is not None
            or self.backlog is not None
            or (self.target is not None and self.target.frame_owner is self)
        ):
            self._finish(b"#")

    # -- outbound side -----------------------------------------------------------------

    def _attach(self, target: Link) -> None:
        self.target = target
        if target.incoming is NO_STREAMS:
            target.incoming = set()
        target.incoming.add(self)
        if target.congested:
            self.source.pause_reading(target)

    def _connected(self, target: Link) -> None:
        pending = self.pending
        if pending is not None and not self.failed and not target.connected:
            self._unreachable(None)
            return
        self.pending = None
        self.source.resume_reading(self)
        if pending is None or self.failed:
            return
        self._attach(target)
        for is_end, value in pending:
            if is_end:
                self._finish(value)
            else:
                self.data(value)

    def _unreachable(self, failure: Failure | None) -> None:
        """Nothing went out: the REPORT covers the whole inbound chunk.

        That is its Byte-Range's end when the sender gave one, else the bytes
        received so far (all of them when the end-line is already here).
        """
        self.source.resume_reading(self)
        pending = self.pending or []
        self.pending = None
        last = self.range_end
        if last is None:
            last = self.offset + sum([len(v) for is_end, v in pending if not is_end]) - 1
        code, comment, cause = hop_failure(failure, connected=False)
        self.fail(code, comment, self.offset, last, cause)

    def _finish(self, flag: bytes) -> None:
        data = self.held or b""
        self.held = None
        self._emit(data, flag)
        self.done = True
        target = self.target
        if target is not None and self.backlog is None:
            # All of it is out: the sender may go on. With a backlog it waits
            # until that drains (MSRPConnection._drain), or backlogs would
            # hold a fast sender's every chunk.
            target.incoming.discard(self)
            source = self.source
            if source.pause_reasons:
                source.resume_reading(target)

    def _emit(self, data: bytes, final: bytes | None) -> None:
        """Write what the next hop has room for now; keep the rest in the backlog."""
        target = self.target
        assert target is not None
        if not target.connected:
            self.fail(481, "next hop connection lost", self.offset, self.offset + len(data) - 1)
            return
        backlog = self.backlog
        if backlog is None:
            # Behind an earlier chunk of the same sender: wait for it (order).
            room = 0 if self.source in target.waiting else target.room(len(data))
            if room > 0 and room >= len(data):
                self._write(data, final)
                return
            if room > 0:
                # The rest is at least one byte: the frame that carries the
                # end-line is never empty.
                self._write(data[:room], None)
                data = data[room:]
            self.backlog = data
            self.backlog_at = 0
            target.wait(self)
        else:
            self.backlog = backlog[self.backlog_at :] + data
            self.backlog_at = 0
        self.backlog_flag = final
        self.source.pause_reading(target)

    def send_backlog(self, room: int) -> bool:
        """Write up to ``room`` bytes of the backlog; True while some is left."""
        backlog = self.backlog
        assert backlog is not None
        at = self.backlog_at
        if len(backlog) - at > room:
            self.backlog_at = at + room
            self._write(backlog[at : at + room], None)
            return True
        final = self.backlog_flag
        self.backlog = None
        self.backlog_flag = None
        data = backlog[at:] if at else backlog
        if data or final is not None:
            self._write(data, final)
        return False

    @property
    def backlog_bytes(self) -> int:
        backlog = self.backlog
        return 0 if backlog is None else len(backlog) - self.backlog_at

    def _write(self, data: bytes, final: bytes | None) -> None:
        """Frame ``data`` (and the end-line when ``final``) onto the wire now."""
        target = self.target
        assert target is not None
        size = len(data)
        target.relay.counts.relayed_bytes += size
        max_chunk = target.chunk_bytes
        owner = target.frame_owner
        if owner is not self and final is not None and size <= max_chunk:
            # The usual case, a whole chunk in a frame of its own: _head, the
            # data and _close_frame in one piece.
            if owner is not None:
                owner.cut()
            tid = new_transaction_id()
            first = self.offset
            self.offset = first + size
            self.frame_first = first
            self.frame_bytes = size
            if self.has_body:
                byte_range = f"{first}-{first + size - 1}/{self.total}"
                frame = send_frame(tid, self.head_before, byte_range, self.head_after, data, final)
            else:
                range_text = self.original_range
                frame = send_frame(tid, self.head_before, range_text, self.head_after, None, final)
            if self.failure_report != "no":
                target.add_transaction(tid, FrameTransaction(self, first, first + size - 1))
            target.write_raw(frame)
            return
        out: list[bytes] = []
        while True:
            if target.frame_owner is not self:
                target.take_wire(self)
                exact = final is not None and len(data) <= max_chunk
                out.append(self._head(len(data) if exact else None))
            room = max_chunk - self.frame_bytes
            if self.has_body and len(data) > room:
                out.append(data[:room])
                data = data[room:]
                self.frame_bytes += room
                self.offset += room
                out.append(self._close_frame(b"+"))
                continue
            if data:
                out.append(data)
                self.frame_bytes += len(data)
                self.offset += len(data)
            if final is not None:
                out.append(self._close_frame(final))
            break
        target.write_raw(b"".join(out))

    def _head(self, exact_length: int | None) -> bytes:
        tid = new_transaction_id()
        self.frame_tid = tid
        self.frame_first = self.offset
        self.frame_bytes = 0
        assert self.target is not None
        self.target.frame_owner = self
        if not self.has_body:
            byte_range = self.original_range
        elif exact_length is not None:
            byte_range = f"{self.offset}-{self.offset + exact_length - 1}/{self.total}"
        else:
            byte_range = f"{self.offset}-*/{self.total}"
        return send_head(tid, self.head_before, byte_range, self.head_after)

    def _close_frame(self, flag: bytes) -> bytes:
        target = self.target
        tid = self.frame_tid
        assert target is not None and tid is not None
        target.frame_owner = None
        self.frame_tid = None
        if self.failure_report != "no":
            # With "partial" only errors come back: the entry is simply
            # forgotten at its deadline (timed_out sends nothing then).
            target.add_transaction(tid, FrameTransaction(self, self.frame_first, self.offset - 1))
        tail = end_line(tid, flag)
        return b"\r\n" + tail if self.has_body else tail

    def unconfirmed(self) -> tuple[int, int]:
        """The bytes a lost next hop leaves unanswered: the open frame's and the backlog's."""
        first = self.frame_first if self.frame_tid is not None else self.offset
        unsent = len(self.backlog) - self.backlog_at if self.backlog is not None else 0
        return first, max(first, self.offset + unsent - 1)

    def cut(self) -> None:
        """Someone else needs the wire: end our open frame with '+'."""
        target = self.target
        assert target is not None
        target.write_raw(self._close_frame(b"+"))

    def timed_out(self, first: int, last: int) -> None:
        if self.failure_report == "yes":
            self.fail(408, "Request Timeout", first, last)

    def fail(
        self, code: int, comment: str, first: int, last: int, cause: str | None = None
    ) -> None:
        """Report a failure once to the original sender and stop forwarding."""
        if self.failed:
            return
        self.failed = True
        if not self.ended:
            self.error = (code, comment)
        self.held = None
        self.backlog = None
        target = self.target
        if target is not None:
            target.incoming.discard(self)
            target.unwait(self)
            if target.frame_owner is self and target.connected:
                target.frame_owner = None
                assert self.frame_tid is not None
                tail = end_line(self.frame_tid, b"#")
                target.write_raw(b"\r\n" + tail if self.has_body else tail)
                self.frame_tid = None
            self.source.resume_reading(target)
        if self.failure_report in ("yes", "partial"):
            last_text = str(last) if last >= first else str(first)
            self.relay.send_report(
                self.source,
                self.report_to,
                self.report_from,
                self.message_id,
                f"{first}-{last_text}/{self.total}",
                code,
                comment,
                cause,
            )


#: Shared by every connection that nothing is streaming into (never added to).
NO_STREAMS: set[Stream] = set()
