"""Bytes → SIP messages: one-shot datagram parsing and incremental stream framing.

RFC 3261 §7 (message format), §7.3.1 (folding), §7.5 (CRLFs before a start-line on
streams), §18.3 (Content-Length framing), RFC 5626 §4.4.1 (double-CRLF keep-alive).

Parsing has two phases. The *head* phase (start-line, header rows, Content-Length) decides
framing: on a stream, a failure there loses the framing and the connection must close. The
*validation* phase (Request-URI, mandatory headers, Via, CSeq) happens once the message is
framed; its failures are answerable with a 4xx and the stream carries on. Every failure
is a :class:`SIPParseError`; nothing else escapes for any input.

A malformed request is answerable as soon as its top Via parses: the error carries a
``partial`` request holding the rows a response copies (§8.2.6.2), whichever of them
arrived, so the sender learns why instead of retransmitting into silence (RFC 4475).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayd.bounded import remember
from relayd.sip.message import (
    CSeq,
    Headers,
    SIPHeaderError,
    SIPRequest,
    SIPResponse,
    Via,
    header_key,
)
from relayd.sipuri import SIPURI, NameAddr, SIPURIError, UnsupportedURIScheme

__all__ = [
    "DEFAULT_LIMITS",
    "KeepAlivePing",
    "SIPLimits",
    "SIPParseError",
    "StreamEvent",
    "StreamFramer",
    "is_keepalive",
    "parse_datagram",
]


@dataclass(frozen=True, slots=True)
class SIPLimits:
    """Size caps applied before any allocation proportional to the input."""

    max_start_line_bytes: int = 4096
    max_header_count: int = 128
    max_header_bytes: int = 32768
    max_body_bytes: int = 262144


DEFAULT_LIMITS = SIPLimits()


class SIPParseError(Exception):
    """Malformed input.

    ``request_line_ok``: the start-line was a valid request line. ``partial``: when the top
    Via parsed, a request carrying the Via rows and the first From, To, Call-ID and CSeq
    rows that arrived, enough for the transport to answer ``status``/``reason`` (its
    ``uri`` is a placeholder if the Request-URI was the problem). ``framing_lost``: on a
    stream, the message boundary is unknown; close after answering. Malformed responses
    have neither and are simply dropped (§16.7, §18.1.2).
    """

    def __init__(
        self,
        reason: str,
        request_line_ok: bool = False,
        partial: SIPRequest | None = None,
        *,
        status: int = 400,
        framing_lost: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_line_ok = request_line_ok
        self.partial = partial
        self.status = status
        self.framing_lost = framing_lost

    def __repr__(self) -> str:
        return (
            f"SIPParseError({self.reason!r}, status={self.status}, "
            f"request_line_ok={self.request_line_ok}, partial={self.partial is not None}, "
            f"framing_lost={self.framing_lost})"
        )


@dataclass(frozen=True, slots=True)
class KeepAlivePing:
    """A double CRLF between messages on a stream: answer with one CRLF (RFC 5626 §4.4.1)."""


StreamEvent = SIPRequest | SIPResponse | KeepAlivePing | SIPParseError
"""What :meth:`StreamFramer.feed` returns a list of."""

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
# One header row: the name up to the first colon, the value without surrounding SP/HTAB.
_WS = " \t"
_VERSION = "SIP/2.0"
_PLACEHOLDER_URI = SIPURI(scheme="sip", host="invalid.invalid")
_MANDATORY = (("via", "Via"), ("from", "From"), ("to", "To"), ("call-id", "Call-ID"))
_SINGLE = (("from", "From"), ("to", "To"), ("call-id", "Call-ID"), ("cseq", "CSeq"))
"""Mandatory request headers with one value each: a second row is a 400 (RFC 4475
multi01), since nothing says which of the two a response should echo."""
_ECHOED = ("from", "to", "call-id", "cseq")
"""Besides the Via rows, what a response to a malformed request copies (§8.2.6.2)."""
_SALVAGED = frozenset(("via", *_ECHOED))
_URI_SCHEMES = ("sip", "sips", "tel")
_PARAMS = r"(?:;[A-Za-z0-9\-.!%*_+`'~]+(?:=[^;\s\"<>,]+)?)*"
_ABSOLUTE_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*:[^\s<>\"]+")
# The usual From/To spellings, a strict subset of what NameAddr.parse accepts (the URI is
# checked apart): ``["Name" |Name ]<uri>;params`` or ``uri;params``. One character class
# per step, each ending where the next begins: linear, no backtracking.
_ADDRESS_FAST = re.compile(
    r"(?:\"[^\"\\]*\" ?|[A-Za-z0-9\-.!%*_+`'~ ]*)<([A-Za-z][A-Za-z0-9+\-.]*:[^\s<>\"]+)>"
    + _PARAMS
    + r"|([A-Za-z][A-Za-z0-9+\-.]*:[^\s<>\";,?]+)"
    + _PARAMS
)


@dataclass(slots=True)
class _Head:
    """Output of the head phase."""

    method: str | None  # None for responses
    uri_text: str
    status: int
    reason: str
    headers: Headers
    error: SIPParseError | None  # a non-framing problem found while reading rows


# Raw header name (as spelled on the wire) → lookup key. Validated names only; bounded so
# a peer inventing names cannot grow it without limit.
_KEY_CACHE: dict[str, str] = {}
_KEY_CACHE_SIZE = 512


def _append(fields: dict[str, list[str]], key: str, value: str) -> None:
    rows = fields.get(key)
    if rows is None:
        fields[key] = [value]
    else:
        rows.append(value)


def is_keepalive(data: bytes) -> bool:
    """True for a datagram made only of CR/LF (a keep-alive some UAs send over UDP)."""
    return not data.strip(b"\r\n")


def _parse_head(head: bytes, limits: SIPLimits) -> _Head:
    """Start-line and header rows (without the final blank line)."""
    first_end = head.find(b"\r\n")
    first_len = len(head) if first_end < 0 else first_end
    if first_len > limits.max_start_line_bytes:
        raise _head_error(head, limits, "Start Line Too Long", 414)
    if len(head) - first_len > limits.max_header_bytes:
        raise _head_error(head, limits, "Header Too Large", 513)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise _head_error(head, limits, "Invalid UTF-8") from None
    lines = text.split("\r\n")
    # A bare CR or LF anywhere would let a re-serialised header smuggle a new row.
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise _head_error(head, limits, "Bare CR or LF")
    if "\x00" in text:
        raise _head_error(head, limits, "NUL In Header")
    start = lines[0]
    method: str | None = None
    uri_text = ""
    status = 0
    reason = ""
    error: SIPParseError | None = None
    if start[:4].upper() == "SIP/":
        version, _, rest = start.partition(" ")
        code, _, reason = rest.partition(" ")
        if version.upper() != _VERSION:
            raise SIPParseError("Bad Status Line")
        if len(code) != 3 or not code.isdigit() or not code.isascii() or not "1" <= code[0] <= "6":
            raise SIPParseError("Bad Status Line")
        status = int(code)
    else:
        parts = start.split(" ")
        if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0]) or not parts[1]:
            raise SIPParseError("Bad Request Line")
        if parts[2].upper() != _VERSION:
            if parts[2][:4].upper() != "SIP/":
                raise SIPParseError("Bad Request Line")
            # §21.5.6: answered like any request error, so from the rows read below.
            error = SIPParseError("Version Not Supported", True, status=505)
        method, uri_text = parts[0], parts[1]
    headers = Headers()
    fields = headers._fields  # filled directly: this loop is the parser's hot spot
    if first_end >= 0 and _fast_rows(lines[1:], fields, limits):
        return _Head(method, uri_text, status, reason, headers, error)
    count = 0
    key: str | None = None
    value = ""
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            # §7.3.1 folding: the continuation joins the previous row with one SP.
            if key is None:
                error = error or SIPParseError("Bad Header Folding", method is not None)
                continue
            cont = line.strip(_WS)
            if cont:
                value = f"{value} {cont}" if value else cont
            continue
        if key is not None:
            _append(fields, key, value)
        colon = line.find(":")
        candidate = line[:colon] if colon > 0 else ""
        key = _KEY_CACHE.get(candidate)
        if key is None:
            candidate = candidate.rstrip(_WS)
            if not _TOKEN_RE.fullmatch(candidate):
                error = error or SIPParseError("Bad Header Line", method is not None)
                continue
            key = header_key(candidate)
            if len(_KEY_CACHE) < _KEY_CACHE_SIZE:
                _KEY_CACHE[line[:colon]] = key
        count += 1
        if count > limits.max_header_count:
            raise _head_error(head, limits, "Too Many Headers", 513)
        value = line[colon + 1 :].strip(_WS)
    if key is not None:
        _append(fields, key, value)
    return _Head(method, uri_text, status, reason, headers, error)


def _fast_rows(rows: list[str], fields: dict[str, list[str]], limits: SIPLimits) -> bool:
    """Header rows in one pass for the usual message: no folding, every row
    ``name: value`` with a name seen before.  False (``fields`` left empty)
    sends the message to the row-by-row loop, which explains what is wrong."""
    if len(rows) > limits.max_header_count:
        return False
    keys = _KEY_CACHE
    for line in rows:
        name, colon, value = line.partition(":")
        key = keys.get(name)
        if key is None or not colon:
            fields.clear()
            return False
        rows_of = fields.get(key)
        if rows_of is None:
            fields[key] = [value.strip(_WS)]
        else:
            rows_of.append(value.strip(_WS))
    return True


def _content_length(headers: Headers, limits: SIPLimits, available: int = -1) -> int | None:
    """The declared body length. ``available`` (datagrams): the bytes after the head. A
    datagram is the whole message (§18.3), so declaring more than it holds is a 400
    however large the number (RFC 4475 scalarlg), not a 413."""
    rows = headers._fields.get("content-length")
    if not rows:
        return None
    text = rows[0].strip()
    if len(rows) > 1 and any(row.strip() != text for row in rows):
        raise SIPParseError("Conflicting Content-Length")
    if not text.isdigit() or not text.isascii():
        raise SIPParseError("Bad Content-Length")
    if len(text) > 12:  # before int(): bounded work for any digit string
        if available >= 0:
            raise SIPParseError("Content-Length Exceeds Body")
        raise SIPParseError("Body Too Large", status=413)
    length = int(text)
    if length > available >= 0:
        raise SIPParseError("Content-Length Exceeds Body")
    if length > limits.max_body_bytes:
        raise SIPParseError("Body Too Large", status=413)
    return length


def _answerable(method: str, uri: SIPURI, fields: dict[str, list[str]]) -> SIPRequest | None:
    """A request to answer a malformed one from, if its top Via parses (the response goes
    where it says, §18.2.2): the Via rows and the first row of each :data:`_ECHOED`
    header that arrived, copied as they came (§8.2.6.2 copies; it does not repair)."""
    via_rows = fields.get("via")
    if not via_rows:
        return None
    headers = Headers()
    out = headers._fields
    out["via"] = list(via_rows)
    for key in _ECHOED:
        rows = fields.get(key)
        if rows:
            out[key] = rows[:1]
    request = SIPRequest(method, uri, headers)
    try:
        request.via  # noqa: B018 - the one header a response cannot do without
    except SIPHeaderError:
        return None
    return request


def _partial(head: _Head, uri: SIPURI) -> SIPRequest | None:
    assert head.method is not None
    return _answerable(head.method, uri, head.headers._fields)


def _fail_request(head: _Head, uri: SIPURI | None, reason: str, status: int = 400) -> SIPParseError:
    return SIPParseError(reason, True, _partial(head, uri or _PLACEHOLDER_URI), status=status)


def _clean_row(raw: bytes) -> str | None:
    """A raw value as :func:`_parse_head` would keep it, or None if it could not."""
    if b"\r" in raw or b"\n" in raw or b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8").strip(_WS)
    except UnicodeDecodeError:
        return None


def _salvage(data: bytes, limits: SIPLimits, *, complete: bool) -> SIPRequest | None:
    """:func:`_answerable` for a request head refused as a whole (a size limit, bad UTF-8,
    a bare CR or LF): the rows a response copies, picked out of the raw bytes so a 414 or
    513 still reaches the sender. Rare path: reads at most ``max_header_bytes`` of whole
    rows after the start-line. ``complete``: ``data`` ends where a row ends."""
    first_end = data.find(b"\r\n")
    space = data.find(b" ", 0, 64)
    if first_end < 0 or space <= 0:
        return None
    method = data[:space].decode("latin-1")
    if not _TOKEN_RE.fullmatch(method):
        return None  # a response, or no start-line at all
    start = first_end + 2
    window = data[start : start + limits.max_header_bytes]
    lines = window.split(b"\r\n")
    if not complete or start + len(window) < len(data):
        lines.pop()  # may be cut short
    fields: dict[str, list[str]] = {}
    key: str | None = None
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if key is not None:
                cont = _clean_row(line)
                if cont is None:
                    fields[key].pop()
                    if not fields[key]:
                        del fields[key]
                    key = None
                elif cont:
                    fields[key][-1] = f"{fields[key][-1]} {cont}"
            continue
        key = None
        name, colon, raw = line.partition(b":")
        name = name.rstrip(b" \t")
        if not colon or not name or len(name) > 64:
            continue
        name_text = name.decode("latin-1")
        if not _TOKEN_RE.fullmatch(name_text):
            continue
        found = header_key(name_text)
        value = _clean_row(raw)
        if found in _SALVAGED and value is not None and (found == "via" or found not in fields):
            _append(fields, found, value)
            key = found
    return _answerable(method, _PLACEHOLDER_URI, fields)


def _head_error(head: bytes, limits: SIPLimits, reason: str, status: int = 400) -> SIPParseError:
    partial = _salvage(head, limits, complete=True)
    return SIPParseError(reason, partial is not None, partial, status=status)


_GOOD_ADDRESSES: dict[str, None] = {}
_GOOD_ADDRESSES_SIZE = 4096


def _address_ok(value: str) -> bool:
    """A From/To value is a name-addr or addr-spec with parameters (§20.20, §20.39;
    RFC 4475 baddn, quotbal).

    Checked for every request, so values that passed are remembered, and so is each one
    without its trailing tag: a sender's From recurs with a new tag per request, the To
    of a request outside a dialog has none.
    """
    if value in _GOOD_ADDRESSES:
        return True
    tag = value.rfind(";tag=")
    if tag > 0 and value[:tag] in _GOOD_ADDRESSES:
        rest = value[tag + 5 :]
        if rest.isalnum() and rest.isascii():
            return True  # a valid value plus a token-valued parameter
    if not _address_valid(value):
        return False
    remember(_GOOD_ADDRESSES, _GOOD_ADDRESSES_SIZE, value, None)
    if tag > 0 and _address_valid(value[:tag]):
        remember(_GOOD_ADDRESSES, _GOOD_ADDRESSES_SIZE, value[:tag], None)
    return True


def _address_valid(value: str) -> bool:
    """:func:`_address_ok` without memory: the usual spellings by one regex, anything
    else by :meth:`NameAddr.parse` (the regex accepts a strict subset of what it does).
    A URI of a scheme we do not know is an absoluteURI, which only needs a scheme."""
    fast = _ADDRESS_FAST.fullmatch(value)
    if fast is not None and _uri_ok(fast.group(1) or fast.group(2)):
        return True
    try:
        NameAddr.parse(value)
    except UnsupportedURIScheme:
        return True  # unusual spacing around an absoluteURI: tolerated, as before
    except SIPURIError:
        return False
    return True


def _uri_ok(text: str) -> bool:
    """``text`` is a URI as :meth:`NameAddr.parse` takes it between ``<`` and ``>``."""
    scheme = text[: text.find(":")].lower()
    if scheme in _URI_SCHEMES:
        try:
            SIPURI.parse(text)
        except SIPURIError:
            return False
        return True
    return _ABSOLUTE_URI_RE.fullmatch(text) is not None


def _validate(head: _Head, body: bytes) -> SIPRequest | SIPResponse:
    """Validation phase (§8.2.1-§8.2.2 for requests, §8.1.3.3 for responses)."""
    h = head.headers
    if head.method is None:
        if head.error is not None:
            raise SIPParseError(head.error.reason)
        for key, label in _MANDATORY:
            if h.first(key) is None:
                raise SIPParseError(f"Missing {label} Header")
        try:
            Via.parse(h.first("via") or "")
            CSeq.parse(h.first("cseq") or "")
        except SIPHeaderError:
            raise SIPParseError("Bad Via Or CSeq") from None
        h._fields.pop("content-length", None)
        return SIPResponse(head.status, head.reason, h, body)

    if head.error is not None:
        raise _fail_request(head, None, head.error.reason, head.error.status)
    try:
        uri = SIPURI.parse(head.uri_text)
    except UnsupportedURIScheme:
        if _SCHEME_RE.fullmatch(head.uri_text.partition(":")[0]):
            raise _fail_request(head, None, "Unsupported URI Scheme", 416) from None
        raise _fail_request(head, None, "Bad Request-URI") from None  # RFC 4475 ltgtruri
    except SIPURIError:
        raise _fail_request(head, None, "Bad Request-URI") from None
    if uri.headers:
        # §19.1.1's table: headers are not allowed in a Request-URI (RFC 4475 escruri).
        raise _fail_request(head, uri, "Headers Not Allowed In Request-URI")
    via_text = h.first("via")
    if via_text is None:
        raise _fail_request(head, uri, "Missing Via Header")
    fields = h._fields
    for key, label in _SINGLE:
        rows = fields.get(key)
        if rows is None or len(rows) != 1:
            problem = "Missing" if rows is None else "Repeated"
            raise _fail_request(head, uri, f"{problem} {label} Header")
    try:
        Via.parse(via_text)
    except SIPHeaderError:
        raise _fail_request(head, uri, "Bad Via Header") from None
    try:
        cseq = CSeq.parse(fields["cseq"][0])
    except SIPHeaderError:
        raise _fail_request(head, uri, "Bad CSeq Header") from None
    if cseq.method != head.method:
        raise _fail_request(head, uri, "CSeq Method Mismatch")
    if not _address_ok(fields["from"][0]):
        raise _fail_request(head, uri, "Bad From Header")
    if not _address_ok(fields["to"][0]):
        raise _fail_request(head, uri, "Bad To Header")
    max_forwards = fields.get("max-forwards")
    if max_forwards is not None and len(max_forwards) > 1:
        raise _fail_request(head, uri, "Repeated Max-Forwards Header")
    fields.pop("content-length", None)  # framing is done; to_bytes() writes the true length
    request = SIPRequest(head.method, uri, h, body)
    try:
        request.max_forwards  # noqa: B018 - validated here so handlers can trust it
    except SIPHeaderError:
        raise _fail_request(head, uri, "Bad Max-Forwards") from None
    return request


def parse_datagram(data: bytes, limits: SIPLimits = DEFAULT_LIMITS) -> SIPRequest | SIPResponse:
    """Parse one UDP datagram (§18.3: Content-Length optional; extra bytes are ignored)."""
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        raise SIPParseError("Missing End Of Headers")
    head = _parse_head(data[start:end], limits)
    body = data[end + 4 :]
    try:
        length = _content_length(head.headers, limits, len(body))
    except SIPParseError as e:
        if head.method is None:
            raise
        raise _fail_request(head, None, e.reason, e.status) from None
    if length is not None:
        body = body[:length]
    elif len(body) > limits.max_body_bytes:
        if head.method is None:
            raise SIPParseError("Body Too Large", status=413)
        raise _fail_request(head, None, "Body Too Large", 413)
    return _validate(head, body)


_CRLF_CR = 13
_CRLF_LF = 10


class StreamFramer:
    """Incremental framing for TCP/TLS (§18.3: Content-Length is mandatory on streams).

    One growing buffer, consumed from the front; the header terminator search resumes where
    the previous one stopped and a body wait is a length check, so feeding N bytes costs
    O(N) however they are split (the shape of ``IntNStringReceiver.dataReceived``).

    :meth:`feed` returns, in order, messages, :class:`KeepAlivePing` events and
    :class:`SIPParseError` values. An error with ``framing_lost`` is the last thing the
    framer ever returns; the transport answers (if ``partial``) and closes.
    """

    __slots__ = ("_buf", "_crlfs", "_failed", "_head", "_limits", "_need", "_scan", "_start_ok")

    def __init__(self, limits: SIPLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._scan = 0  # where the next search for CRLFCRLF starts
        self._start_ok = False  # a CRLF was seen within the start-line limit
        self._head: _Head | None = None  # parsed head waiting for its body
        self._need = 0  # body length of self._head
        self._crlfs = 0  # keep-alive CRLFs seen since the last message or ping
        self._failed = False

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if self._failed:
            return out
        buf = self._buf
        buf += data
        limits = self._limits
        max_head = limits.max_start_line_bytes + limits.max_header_bytes + 4
        pos = 0
        n = len(buf)
        while pos < n:
            head = self._head
            if head is None:
                # §7.5: ignore CRLFs before a start-line; two make an RFC 5626 ping.
                if buf[pos] == _CRLF_CR:
                    if pos + 1 >= n:
                        break
                    if buf[pos + 1] == _CRLF_LF:
                        pos += 2
                        self._scan = pos
                        self._crlfs += 1
                        if self._crlfs == 2:
                            self._crlfs = 0
                            out.append(KeepAlivePing())
                        continue
                self._crlfs = 0
                end = buf.find(b"\r\n\r\n", max(self._scan, pos))
                if end < 0:
                    self._scan = max(pos, n - 3)
                    pending = n - pos
                    if not self._start_ok and pending > limits.max_start_line_bytes:
                        if buf.find(b"\r\n", pos, pos + limits.max_start_line_bytes + 2) < 0:
                            self._fail(out, self._limit_error(pos, "Start Line Too Long", 414))
                            break
                        self._start_ok = True
                    if pending > max_head:
                        self._fail(out, self._limit_error(pos, "Header Too Large", 513))
                    break
                try:
                    head = _parse_head(bytes(buf[pos:end]), limits)
                except SIPParseError as e:
                    self._fail(out, e)
                    break
                try:
                    length = _content_length(head.headers, limits)
                except SIPParseError as e:
                    if head.method is not None:  # §18.3: answer, then close (framing is lost)
                        e = _fail_request(head, None, e.reason, e.status)
                    self._fail(out, e)
                    break
                if length is None:
                    err = SIPParseError("Missing Content-Length", head.method is not None)
                    if head.method is not None:
                        err = _fail_request(head, None, err.reason)
                    self._fail(out, err)
                    break
                pos = end + 4
                self._head, self._need = head, length
                self._start_ok = False
            if n - pos < self._need:
                break
            body = bytes(buf[pos : pos + self._need])
            pos += self._need
            self._scan = pos
            self._head = None
            try:
                out.append(_validate(head, body))
            except SIPParseError as e:
                out.append(e)
        del buf[:pos]
        self._scan = max(0, self._scan - pos)
        return out

    def _limit_error(self, pos: int, reason: str, status: int) -> SIPParseError:
        """A head too large to wait for: answered from the rows already buffered, if the
        top Via is among them (a start-line too long for the first read has none yet)."""
        partial = _salvage(bytes(self._buf[pos:]), self._limits, complete=False)
        return SIPParseError(reason, partial is not None, partial, status=status)

    def _fail(
        self,
        out: list[StreamEvent],
        error: SIPParseError,
    ) -> None:
        error.framing_lost = True
        out.append(error)
        self._failed = True
        self._buf.clear()
