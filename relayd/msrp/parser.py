"""Incremental MSRP framing (RFC 4975 §7.1, §9): bytes in, events out, no I/O.

The parser keeps one buffer and a scan offset, so every input byte is looked
at a bounded number of times whatever the read sizes are. Bodies are handed
out as they arrive, holding back only the few bytes that could be the start of
the end-line; a message is never assembled in memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayd.msrp.message import Headers, MSRPRequest, MSRPResponse

# RFC 4975 §9: req-start / resp-start; transact-id = ALPHANUM 3*31ident-char.
_START_LINE = re.compile(
    rb"MSRP ([A-Za-z0-9][A-Za-z0-9.+%=-]{3,31}) (?:(\d{3})(?: ([^\r\n]*))?|([A-Z]+))"
)
_FLAG_SET = frozenset((b"$", b"+", b"#"))
_NO_HEADERS = Headers()
_HYPHENS = b"-------"


@dataclass(frozen=True, slots=True)
class MSRPLimits:
    """Every length the parser accepts is bounded (values in bytes or counts)."""

    max_line_bytes: int = 8192
    max_header_count: int = 64
    max_header_bytes: int = 32768
    max_leading_crlf: int = 16


DEFAULT_LIMITS = MSRPLimits()


@dataclass(slots=True)
class MessageStart:
    """A request or response whose header block is complete."""

    message: MSRPRequest | MSRPResponse
    has_body: bool


@dataclass(slots=True)
class BodyChunk:
    data: bytes


@dataclass(slots=True)
class MessageEnd:
    """The end-line arrived; flag is one of b"$", b"+", b"#"."""

    tid: str
    flag: bytes


@dataclass(slots=True)
class MessageRejected:
    """A message whose start line parsed but whose headers did not.

    The parser skips to its end-line by itself and stays usable, so a request
    can be answered with 400 (RFC 4975 §7.3) instead of losing the connection.
    """

    tid: str
    method: str | None
    reason: str
    #: The first two header values when they parsed, so a 400 can be addressed.
    to_path: str | None = None
    from_path: str | None = None
    #: Over a size limit before the head was even complete: skipping to the
    #: end-line could mean reading without bound, so the connection closes.
    fatal: bool = False


ParseEvent = MessageStart | BodyChunk | MessageEnd | MessageRejected


class MSRPParseError(Exception):
    """The stream cannot be resynchronised: the connection must be closed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


_START, _HEADERS, _BODY, _BODY_OPEN, _SKIP = range(5)


class MSRPParser:
    """Feed bytes, get a list of events; raises MSRPParseError on fatal input."""

    __slots__ = (
        "_boundary",
        "_buf",
        "_head_limit",
        "_leading_crlf",
        "_limits",
        "_message",
        "_pos",
        "_scan",
        "_state",
        "_tid",
    )

    def __init__(self, limits: MSRPLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._head_limit = min(limits.max_line_bytes, limits.max_header_bytes)
        self._buf = b""
        self._pos = 0
        self._scan = 0
        self._state = _START
        self._tid = ""
        self._boundary = b""
        self._message: MSRPRequest | MSRPResponse | None = None
        self._leading_crlf = 0

    @property
    def in_message(self) -> bool:
        """True between a message's start line and its end-line."""
        return self._state != _START

    def feed(self, data: bytes) -> list[ParseEvent]:
        if self._pos >= len(self._buf):
            self._buf = data
            self._scan = 0
        else:
            # Only an unfinished line or an end-line-sized tail is carried over.
            self._buf = self._buf[self._pos :] + data
            self._scan = max(0, self._scan - self._pos)
        self._pos = 0
        events: list[ParseEvent] = []
        while True:
            state = self._state
            if state == _START:
                if self._pos >= len(self._buf):
                    break
                if self._scan <= self._pos and self._parse_head(events):
                    continue
                if not self._parse_start_line():
                    break
            elif state in (_BODY, _SKIP):
                if not self._scan_body(events):
                    break
            elif state == _HEADERS:
                if not self._parse_header_block(events):
                    break
            elif not self._open_body(events):
                break
        if self._pos >= len(self._buf):
            # Nothing left to look at: an idle connection keeps no input.
            self._buf = b""
            self._pos = self._scan = 0
        return events

    # -- the common case in one step --------------------------------------

    def _parse_head(self, events: list[ParseEvent]) -> bool:
        """A whole message head (and a short body) at once, when canonical.

        Does exactly what _parse_start_line, _parse_header_block and
        _scan_body would do for such input, with one regular expression and
        one search.  Anything else (partial input, leading CRLFs,
        non-canonical or invalid headers, limits) returns False and takes
        that general path, which also says what is wrong.  Only tried while
        no partial line is pending (``_scan``), so input arriving in small
        pieces is not matched over and over.
        """
        buf = self._buf
        pos = self._pos
        match = _HEAD.match(buf, pos)
        if match is None:
            return False
        tid_bytes, code, comment, method, paths, _ = match.groups()
        head_end = match.end()
        block = buf[match.start(5) : head_end]
        lines = block.count(b"\n")
        if (
            head_end - pos > self._head_limit
            or lines > self._limits.max_header_count
            or block.count(b"\r") != lines
            or _HYPHENS in block  # a line starting "-------tid" is this message's end-line
            or not (block.isascii() or _is_utf8(block))
        ):
            return False
        terminator = buf[head_end : head_end + 2]
        if terminator == b"--":
            after = head_end + 7 + len(tid_bytes)
            flag = buf[after : after + 1]
            if (
                buf[head_end:after] != _HYPHENS + tid_bytes
                or flag not in _FLAG_SET
                or buf[after + 1 : after + 3] != b"\r\n"
            ):
                return False
            next_pos = after + 3
        elif terminator != b"\r\n" or method is None:
            return False  # incomplete, not a header line, or a response with a body
        else:
            flag = b""
            next_pos = head_end + 2
        tid = tid_bytes.decode("ascii")
        headers = Headers.from_block(block, len(paths))
        message: MSRPRequest | MSRPResponse
        if method is not None:
            message = MSRPRequest(tid, method.decode("ascii"), headers)
        else:
            try:
                text = comment.decode("utf-8") if comment is not None else ""
            except UnicodeDecodeError:
                return False
            message = MSRPResponse(tid, int(code), text, headers)
        self._leading_crlf = 0
        self._tid = tid
        self._scan = 0
        if flag:
            self._pos = next_pos
            events.append(MessageStart(message, False))
            events.append(MessageEnd(tid, flag))
            return True
        boundary = self._boundary = b"\r\n" + _HYPHENS + tid_bytes
        events.append(MessageStart(message, True))
        self._pos = next_pos
        if buf[next_pos : next_pos + 1] in (b"-", b""):
            self._state = _BODY_OPEN  # the body might be a bare end-line
            return True
        self._state = _BODY
        # A short body whose end-line is here too: done without _scan_body.
        # The search is bounded, so a long body is not scanned twice.
        end = buf.find(boundary, next_pos, next_pos + _INLINE_BODY)
        if end >= 0:
            after = end + len(boundary)
            flag = buf[after : after + 1]
            if flag in _FLAG_SET and buf[after + 1 : after + 3] == b"\r\n":
                if end > next_pos:
                    events.append(BodyChunk(buf[next_pos:end]))
                events.append(MessageEnd(tid, flag))
                self._pos = after + 3
                self._state = _START
        return True

    # -- start line -------------------------------------------------------

    def _line_end(self) -> int:
        """Index of the CRLF ending the current line, or -1; never rescans."""
        buf = self._buf
        end = buf.find(b"\r\n", max(self._pos, self._scan))
        if end < 0:
            self._scan = max(self._pos, len(buf) - 1)
        else:
            self._scan = end + 2
        return end

    def _parse_start_line(self) -> bool:
        buf = self._buf
        end = self._line_end()
        if end < 0:
            if len(buf) - self._pos > self._limits.max_line_bytes:
                raise MSRPParseError("start line too long")
            return False
        line = buf[self._pos : end]
        self._pos = end + 2
        if not line:
            # Tolerate a few stray CRLFs between messages (keep-alives).
            self._leading_crlf += 1
            if self._leading_crlf > self._limits.max_leading_crlf:
                raise MSRPParseError("too many empty lines between messages")
            return True
        if len(line) > self._limits.max_line_bytes:
            raise MSRPParseError("start line too long")
        match = _START_LINE.fullmatch(line)
        if match is None:
            raise MSRPParseError(_start_line_problem(line))
        tid_bytes, code, comment, method = match.groups()
        tid = tid_bytes.decode("ascii")
        self._leading_crlf = 0
        self._tid = tid
        self._boundary = b"\r\n" + _HYPHENS + tid_bytes
        self._scan = 0
        if method is not None:
            self._message = MSRPRequest(tid, method.decode("ascii"), _NO_HEADERS)
        else:
            try:
                text = comment.decode("utf-8") if comment is not None else ""
            except UnicodeDecodeError:
                raise MSRPParseError("response comment is not UTF-8") from None
            self._message = MSRPResponse(tid, int(code), text, _NO_HEADERS)
        self._state = _HEADERS
        return True

    # -- headers ----------------------------------------------------------

    def _parse_header_block(self, events: list[ParseEvent]) -> bool:
        """Find the end of the header block once, then split it in one pass.

        The block ends at a blank line (a body follows) or at this
        transaction's end-line (no body).  Both searches resume from a saved
        offset, and the end-line search stops at the blank line, so neither
        the headers nor the body are scanned twice.
        """
        buf = self._buf
        pos = self._pos
        limits = self._limits
        boundary = self._boundary
        # The start line's CRLF sits just before pos: include it so that an
        # end-line directly after the last header (or a blank line) is found.
        scan = self._scan
        if scan < pos - 2:
            scan = pos - 2
        blank = buf.find(b"\r\n\r\n", scan)
        if blank >= 0:
            end_line = buf.find(boundary, scan, blank + 2 + len(boundary))
        else:
            end_line = buf.find(boundary, scan)
        if end_line >= 0 and (blank < 0 or end_line <= blank):
            has_body = False
            stop = end_line
            after = end_line + len(boundary)
            if len(buf) < after + 3:
                if stop - pos > limits.max_header_bytes:
                    return self._reject(events, "header block too large", pos, fatal=True)
                self._scan = end_line
                return False
            flag = buf[after : after + 1]
            if flag not in _FLAG_SET or buf[after + 1 : after + 3] != b"\r\n":
                return self._reject(events, "malformed end-line", pos)
            next_pos = after + 3
        elif blank >= 0:
            has_body = True
            stop = blank
            flag = b""
            next_pos = blank + 4
        else:
            waiting = len(buf) - pos
            if waiting > limits.max_header_bytes:
                return self._reject(events, "header block too large", pos, fatal=True)
            if waiting > limits.max_line_bytes:
                line_start = buf.rfind(b"\r\n", pos) + 2
                if len(buf) - max(line_start, pos) > limits.max_line_bytes:
                    return self._reject(events, "header line too long", pos, fatal=True)
            self._scan = len(buf) - len(boundary)
            return False
        if stop - pos > limits.max_header_bytes:
            return self._reject(events, "header block too large", pos, fatal=True)
        self._scan = 0
        block = buf[pos : stop + 2]
        if _is_canonical(block, limits):
            headers = Headers.from_block(block)
        else:
            parsed = self._headers_from_text(events, block, pos)
            if parsed is None:
                return True
            headers = parsed
        message = self._message
        assert message is not None
        if has_body and type(message) is MSRPResponse:
            self._pos = next_pos
            return self._reject(events, "response with a body", pos)
        self._pos = next_pos
        message.headers = headers
        self._message = None  # only needed to describe a rejected head
        events.append(MessageStart(message, has_body))
        if has_body:
            self._state = _BODY_OPEN
        else:
            self._state = _START
            events.append(MessageEnd(self._tid, flag))
        return True

    def _headers_from_text(
        self, events: list[ParseEvent], block: bytes, pos: int
    ) -> Headers | None:
        """Validate and normalise a block that is not in canonical form; None if rejected."""
        limits = self._limits
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            self._reject(events, "header field is not UTF-8", pos)
            return None
        # One pass both splits and validates: findall skips anything that is
        # not a header line, so the pieces cover the block only if all are.
        pairs = _HEADER_LINE.findall(text)
        reason = None
        if sum([len(name) + len(value) for name, value in pairs]) + 3 * len(pairs) != len(text):
            reason = _header_problem(text, limits)
        elif len(pairs) > limits.max_header_count:
            reason = "too many header fields"
        elif len(text) > limits.max_line_bytes and any(
            len(name) + len(value) + 1 > limits.max_line_bytes for name, value in pairs
        ):
            reason = "header line too long"
        items = [(name, value.strip(" \t")) for name, value in pairs]
        if reason is None and not _paths_first(items):
            # RFC 4975 §7.1: To-Path then From-Path come first.
            reason = "To-Path and From-Path must come first"
        if reason is not None:
            self._reject(events, reason, pos)
            return None
        return Headers(items)

    def _reject(
        self, events: list[ParseEvent], reason: str, line_start: int, fatal: bool = False
    ) -> bool:
        """Skip the rest of this message up to its end-line; stay in sync."""
        rejection = self._rejection(reason, line_start)
        rejection.fatal = fatal
        events.append(rejection)
        # Rescan from the CRLF that ended the start line so that an end-line
        # directly after the bad header block is still recognised.
        self._pos = max(line_start - 2, 0)
        self._scan = 0
        self._state = _SKIP
        return True

    def _rejection(self, reason: str, head_start: int) -> MessageRejected:
        message = self._message
        method = message.method if isinstance(message, MSRPRequest) else None
        limit = 2 * self._limits.max_line_bytes
        lines = self._buf[head_start : head_start + limit].split(b"\r\n", 2)
        to_path = from_path = None
        # Header names are case-insensitive (RFC 4975 §9): "to-path" addresses a 400 too.
        if (
            len(lines) == 3
            and lines[0][:8].lower() == b"to-path:"
            and lines[1][:10].lower() == b"from-path:"
        ):
            try:
                to_path = lines[0][8:].decode("utf-8").strip()
                from_path = lines[1][10:].decode("utf-8").strip()
            except UnicodeDecodeError:
                to_path = from_path = None
        return MessageRejected(self._tid, method, reason, to_path, from_path)

    # -- body -------------------------------------------------------------

    def _open_body(self, events: list[ParseEvent]) -> bool:
        """Accept an end-line with no CRLF before it when the body is empty.

        RFC 4975 wants CRLF before the end-line; some clients omit it for an
        empty body, and that input is unambiguous, so take it.
        """
        buf = self._buf
        pos = self._pos
        bare = self._boundary[2:]
        need = len(bare) + 3
        head = buf[pos : pos + need]
        if len(head) < need and _may_become_end_line(head, bare):
            return False
        self._state = _BODY
        if len(head) == need and _may_become_end_line(head, bare):
            self._pos = pos + need
            self._state = _START
            events.append(MessageEnd(self._tid, head[len(bare) : len(bare) + 1]))
        return True

    def _scan_body(self, events: list[ParseEvent]) -> bool:
        buf = self._buf
        boundary = self._boundary
        pos = self._pos
        skipping = self._state == _SKIP
        search_from = pos
        while True:
            index = buf.find(boundary, search_from)
            if index < 0:
                break
            after = index + len(boundary)
            if len(buf) < after + 3:
                # Could be the end-line: wait for the flag and CRLF.
                if index > pos and not skipping:
                    events.append(BodyChunk(buf[pos:index]))
                self._pos = index
                return False
            flag = buf[after : after + 1]
            if flag in (b"$", b"+", b"#") and buf[after + 1 : after + 3] == b"\r\n":
                if index > pos and not skipping:
                    events.append(BodyChunk(buf[pos:index]))
                self._pos = after + 3
                self._state = _START
                if not skipping:
                    events.append(MessageEnd(self._tid, flag))
                return True
            search_from = index + 1
        # Hold back what could be the beginning of the boundary.
        keep = len(boundary) - 1
        cut = max(pos, len(buf) - keep)
        tail_start = buf.find(b"\r", cut)
        cut = len(buf) if tail_start < 0 else tail_start
        if cut > pos and not skipping:
            events.append(BodyChunk(buf[pos:cut]))
        self._pos = cut
        return False


_HEADER_LINE = re.compile(r"([A-Za-z0-9!#$%&'*+.^_`|~-]+):([^\r\n]*)\r\n")
# Header lines exactly as the relay writes them: one SP after the colon, no
# SP or HTAB around the value.  Linear: a value cannot cross its CRLF.
_CANONICAL_BLOCK = re.compile(
    rb"(?:[A-Za-z0-9!#$%&'*+.^_`|~-]+: (?:[^ \t\r\n](?:[^\r\n]*[^ \t\r\n])?)?\r\n)*"
)


# _START_LINE and its CRLF, then as many canonical header lines as follow.
# _START_LINE with its CRLF, To-Path and From-Path, then the header lines
# that follow, canonical: one SP, no SP or HTAB at either end of a value.
# A value is matched as "anything up to LF" (much faster than "neither CR
# nor LF"), so _parse_head checks that the block has no CR but its CRLFs.
_VALUE = rb" (?![ \t])[^\n]*(?<![ \t])\r\n"
_HEAD = re.compile(
    rb"MSRP ([A-Za-z0-9][A-Za-z0-9.+%=-]{3,31}) (?:(\d{3})(?: ([^\r\n]*))?|([A-Z]+))\r\n"
    rb"((?i:to-path):" + _VALUE + rb"(?i:from-path):" + _VALUE + rb")"
    rb"((?:[A-Za-z0-9!#$%&'*+.^_`|~-]+:" + _VALUE + rb")*)"
)
#: Longest body _parse_head looks for the end-line of (see there).
_INLINE_BODY = 16384


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_canonical(block: bytes, limits: MSRPLimits) -> bool:
    """Can ``block`` be kept as bytes (Headers.from_block) and forwarded as is?

    True only for a block the normalising path would accept and write back
    byte for byte: UTF-8, canonical lines, To-Path then From-Path first, and
    within the limits.  Anything else takes that path, which also names the
    problem when there is one.
    """
    if len(block) > limits.max_line_bytes or block[:8].lower() != b"to-path:":
        return False
    second = block.find(b"\r\n") + 2
    if block[second : second + 10].lower() != b"from-path:":
        return False
    if not (block.isascii() or _is_utf8(block)):
        return False
    return (
        block.count(b"\n") <= limits.max_header_count
        and _CANONICAL_BLOCK.fullmatch(block) is not None
    )


def _start_line_problem(line: bytes) -> str:
    parts = line.split(b" ", 2)
    if len(parts) < 3 or parts[0] != b"MSRP":
        return "malformed start line"
    if _START_LINE.fullmatch(b"MSRP " + parts[1] + b" SEND") is None:
        return "malformed transaction id"
    return "malformed method or status"


def _header_problem(text: str, limits: MSRPLimits) -> str:
    """Name what is wrong with a header block that failed the fast check."""
    for line in text.split("\r\n"):
        if len(line) > limits.max_line_bytes:
            return "header line too long"
    return "malformed header field"


def _paths_first(headers: list[tuple[str, str]]) -> bool:
    return (
        len(headers) >= 2
        and headers[0][0].lower() == "to-path"
        and headers[1][0].lower() == "from-path"
    )


def _may_become_end_line(head: bytes, bare: bytes) -> bool:
    """Is head a prefix of bare + flag + CRLF (or all of it)?"""
    n = len(bare)
    if head[:n] != bare[: len(head)]:
        return False
    if len(head) > n and head[n : n + 1] not in (b"$", b"+", b"#"):
        return False
    return head[n + 1 :] == b"\r\n"[: max(0, len(head) - n - 1)]
