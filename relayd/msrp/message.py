"""MSRP messages and header values (RFC 4975 §7, RFC 4976 §7).

Messages carry their header block only: bodies are streamed past the relay in
pieces and never held here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

STATUS_COMMENTS: dict[int, str] = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    408: "Request Timeout",
    413: "Stop Sending Message",
    415: "Unsupported Media Type",
    423: "Interval Out-of-Bounds",
    481: "Session Does Not Exist",
    501: "Unknown Method",
    506: "Session Already In Use",
}

CONTINUATION_FLAGS = frozenset(b"$+#")
#: Put by relayd on the AUTHs it forwards and on its answers to them: "this
#: relay takes chunks of any size" (it re-chunks them itself).  Other relays
#: may not: Kamailio drops the connection above about 10 KiB of body.
CHUNK_LIMIT = "Relay-Chunk-Limit"
#: Said by each hop for itself: never forwarded.
HOP_HEADERS = frozenset({"to-path", "from-path", CHUNK_LIMIT.lower()})
_STREAM_SKIP = frozenset({"to-path", "from-path", "byte-range"})


class MSRPStatus(Exception):
    """A failure that becomes an MSRP response with this status."""

    def __init__(
        self,
        code: int,
        comment: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        close: bool = False,
    ) -> None:
        self.code = code
        self.comment = comment if comment is not None else STATUS_COMMENTS.get(code, "")
        self.headers = tuple(headers)
        #: Close the connection after answering (RFC 4976 §6.2, repeated failures).
        self.close = close
        super().__init__(f"{code} {self.comment}")


class Headers:
    """Ordered MSRP header fields; lookup ignores case, order and spelling are kept.

    RFC 4975 fixes the first two (To-Path, From-Path); the relay needs
    first-occurrence lookup and in-place rewrite, so a name index is kept.

    Headers from the network are usually in canonical form already (each
    line ``Name: value`` with one space and nothing around the value), and
    most of them are only forwarded.  Those keep the parser's bytes
    (:meth:`from_block`): lookups search the bytes, forwarding slices them
    (:func:`forwarded_lines`), and the list of pairs is only built if asked for.
    """

    __slots__ = ("_block", "_index", "_items", "_lower", "_paths_end")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] | None = list(items)
        # Built on first lookup: most headers we build are only ever written.
        self._index: dict[str, int] | None = None
        self._block: bytes | None = None
        self._lower: bytes | None = None
        self._paths_end = 0

    @classmethod
    def from_block(cls, block: bytes, paths_end: int = 0) -> Headers:
        """Headers backed by a canonical, UTF-8 header block (every line ends in CRLF).

        The block starts with the To-Path and From-Path lines (the parser
        checks that); ``paths_end`` is the offset after them, if known.
        """
        headers = cls.__new__(cls)
        headers._items = None
        headers._index = None
        headers._block = block
        headers._lower = None
        if not paths_end:
            paths_end = block.index(b"\r\n", block.index(b"\r\n") + 2) + 2
        headers._paths_end = paths_end
        return headers

    @property
    def block(self) -> bytes | None:
        """The canonical bytes these headers came from, while unmodified."""
        return self._block

    def _list(self) -> list[tuple[str, str]]:
        items = self._items
        if items is None:
            assert self._block is not None
            lines = self._block.decode("utf-8").split("\r\n")
            lines.pop()  # after the last CRLF
            items = self._items = [(n, v) for n, _, v in [x.partition(": ") for x in lines]]
        return items

    def _lookup(self) -> dict[str, int]:
        index: dict[str, int] = {}
        for position, (name, _) in enumerate(self._list()):
            lname = name.lower()
            if lname not in index:
                index[lname] = position
        self._index = index
        return index

    def _find(self, name: str) -> int:
        """Offset of the value of ``name`` in the block, or -1: no list needed."""
        lower = self._lower
        if lower is None:
            assert self._block is not None
            lower = self._lower = b"\r\n" + self._block.lower()
        key = b"\r\n" + name.lower().encode("utf-8") + b": "
        at = lower.find(key)
        return at if at < 0 else at + len(key) - 2

    def get(self, name: str, default: str | None = None) -> str | None:
        block = self._block
        if block is not None and self._index is None:
            start = self._find(name)
            if start < 0:
                return default
            return block[start : block.index(b"\r\n", start)].decode("utf-8")
        index = self._index
        if index is None:
            index = self._lookup()
        position = index.get(name.lower())
        return default if position is None else self._list()[position][1]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if self._block is not None and self._index is None:
            return self._find(name) >= 0
        index = self._index if self._index is not None else self._lookup()
        return name.lower() in index

    def set(self, name: str, value: str) -> None:
        """Replace the first occurrence in place (keeping position) or append."""
        items = self._list()
        index = self._index if self._index is not None else self._lookup()
        self._block = self._lower = None
        lname = name.lower()
        position = index.get(lname)
        if position is None:
            index[lname] = len(items)
            items.append((name, value))
        else:
            items[position] = (items[position][0], value)

    def remove(self, name: str) -> None:
        lname = name.lower()
        self._items = [(k, v) for k, v in self._list() if k.lower() != lname]
        self._index = None
        self._block = self._lower = None

    def copy(self) -> Headers:
        if self._block is not None:
            return Headers.from_block(self._block)
        return Headers(self._list())

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._list())

    def __len__(self) -> int:
        block = self._block
        if block is not None and self._items is None:
            return block.count(b"\n")
        return len(self._list())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._list() == other._list()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({self._list()!r})"

    def to_bytes(self) -> bytes:
        if self._block is not None:
            return self._block
        return "".join([f"{k}: {v}\r\n" for k, v in self._list()]).encode("utf-8")


def path_lines(headers: Headers) -> bytes | None:
    """The To-Path and From-Path lines as received (a cache key for routes), or None."""
    block = headers._block
    return None if block is None else block[: headers._paths_end]


def forwarded_lines(headers: Headers, skip_byte_range: bool) -> tuple[bytes, bytes] | None:
    """The header lines a forwarded copy keeps after its new To-Path and From-Path.

    The relay drops the received path headers (any To-Path or From-Path) and,
    for SEND, the Byte-Range it rewrites per frame.  Returns the lines before
    and after that Byte-Range line (all lines come "before" when it is not
    dropped, all "after" when it is absent), sliced from the block.  None
    when the headers have no canonical block or repeat a header the slicing
    would have to drop: the caller then builds them from the pairs.
    """
    block = headers._block
    if block is None:
        return None
    rest = block[headers._paths_end :]
    lower = b"\r\n" + rest.lower()
    if b"\r\nto-path:" in lower or b"\r\nfrom-path:" in lower:
        return None
    if not skip_byte_range:
        return rest, b""
    at = lower.find(b"\r\nbyte-range:")
    if at < 0:
        return b"", rest
    end = rest.index(b"\r\n", at) + 2
    if lower.find(b"\r\nbyte-range:", end) >= 0:
        return None
    return rest[:at], rest[end:]


def stream_lines(headers: Headers) -> tuple[bytes, bytes]:
    """forwarded_lines(headers, True) built from the pairs, for any headers."""
    before: list[str] = []
    after: list[str] = []
    seen_range = False
    for name, value in headers:
        lname = name.lower()
        if lname == "byte-range":
            seen_range = True
        elif lname not in _STREAM_SKIP:
            (after if seen_range else before).append(f"{name}: {value}\r\n")
    if not seen_range:
        after, before = before, []
    return "".join(before).encode(), "".join(after).encode()


def send_head(tid: str, head_before: bytes, byte_range: str, head_after: bytes) -> bytes:
    """A forwarded SEND frame up to its body: its new Byte-Range between the kept lines."""
    return b"MSRP %s SEND\r\n%sByte-Range: %s\r\n%s" % (
        tid.encode(),
        head_before,
        byte_range.encode(),
        head_after,
    )


def ok_bytes(tid: str, paths: bytes) -> bytes:
    """A 200 OK with ready-made To-Path and From-Path lines (make_response's paths)."""
    raw = tid.encode()
    return b"MSRP %s 200 OK\r\n%s-------%s$\r\n" % (raw, paths, raw)


def report_status_code(headers: Headers) -> bytes:
    """The code of a REPORT's ``Status: 000 200 OK`` (RFC 4975 §7.1.2), b"none" without one.

    Every REPORT a relay receives is counted by it: the canonical header line is
    found in the parser's bytes, without the lower-casing and decoding of a
    lookup; any other spelling takes the lookup."""
    block = headers._block
    if block is not None:
        at = block.find(b"\r\nStatus: 000 ")
        if at >= 0:
            code = block[at + 14 : at + 17]
            if block[at + 17 : at + 18] in _AFTER_CODE and code.isdigit():
                return code
            return b"none"
    parts = (headers.get("Status") or "").split(None, 2)
    code = parts[1].encode() if len(parts) > 1 and parts[1].isascii() else b""
    return code if len(code) == 3 and code.isdigit() else b"none"


#: What may follow a Status code: its comment, or the end of the line.
_AFTER_CODE = (b" ", b"\r")


def send_frame(
    tid: str,
    head_before: bytes,
    byte_range: str,
    head_after: bytes,
    body: bytes | None,
    flag: bytes,
) -> bytes:
    """A whole forwarded SEND frame in one piece: send_head's lines, the body (None
    for a SEND without one) and the end-line; the usual small message is one of these."""
    raw = tid.encode()
    if body is None:
        return b"MSRP %s SEND\r\n%sByte-Range: %s\r\n%s-------%s%s\r\n" % (
            raw,
            head_before,
            byte_range.encode(),
            head_after,
            raw,
            flag,
        )
    return b"MSRP %s SEND\r\n%sByte-Range: %s\r\n%s%s\r\n-------%s%s\r\n" % (
        raw,
        head_before,
        byte_range.encode(),
        head_after,
        body,
        raw,
        flag,
    )


def request_frame(
    tid: str, method: str, paths: bytes, lines: bytes, body: bytes | None, flag: bytes
) -> bytes:
    """A whole request frame from ready-made path lines and the other header lines."""
    raw = tid.encode()
    if body is None:
        return b"MSRP %s %s\r\n%s%s-------%s%s\r\n" % (
            raw,
            method.encode(),
            paths,
            lines,
            raw,
            flag,
        )
    return b"MSRP %s %s\r\n%s%s\r\n%s\r\n-------%s%s\r\n" % (
        raw,
        method.encode(),
        paths,
        lines,
        body,
        raw,
        flag,
    )


@dataclass(slots=True)
class MSRPRequest:
    tid: str
    method: str
    headers: Headers

    def head_bytes(self, has_body: bool) -> bytes:
        """Start line and header block; a body (if any) follows the blank line."""
        start = f"MSRP {self.tid} {self.method}\r\n".encode()
        return start + self.headers.to_bytes() + (b"\r\n" if has_body else b"")

    def to_bytes(self, body: bytes | None = None, flag: bytes = b"$") -> bytes:
        """A whole frame, for messages small enough to build in one piece."""
        if body is None:
            return self.head_bytes(False) + end_line(self.tid, flag)
        return self.head_bytes(True) + body + b"\r\n" + end_line(self.tid, flag)


@dataclass(slots=True)
class MSRPResponse:
    tid: str
    code: int
    comment: str
    headers: Headers

    def to_bytes(self) -> bytes:
        comment = f" {self.comment}" if self.comment else ""
        start = f"MSRP {self.tid} {self.code:03d}{comment}\r\n".encode()
        return start + self.headers.to_bytes() + end_line(self.tid, b"$")


MSRPMessage = MSRPRequest | MSRPResponse


def end_line(tid: str, flag: bytes = b"$") -> bytes:
    return b"-------" + tid.encode("ascii") + flag + b"\r\n"


def make_response(
    request: MSRPRequest,
    code: int,
    comment: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
    to_path: str | None = None,
) -> MSRPResponse:
    """Build the hop-by-hop response to a request (RFC 4975 §7.2).

    The response's To-Path is the request's From-Path reduced to its first URI
    (the previous hop), its From-Path the URI the request was addressed to.
    """
    if comment is None:
        comment = STATUS_COMMENTS.get(code, "")
    from_path = request.headers.get("From-Path") or ""
    request_to = request.headers.get("To-Path") or ""
    if to_path is None:
        to_path = from_path.split(" ", 1)[0]
    headers = [("To-Path", to_path), ("From-Path", request_to.split(" ", 1)[0])]
    headers.extend(extra)
    return MSRPResponse(request.tid, code, comment, Headers(headers))


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Byte-Range header (RFC 4975 §7.1.1): 1-based, end and total may be unknown."""

    start: int
    end: int | None
    total: int | None

    @classmethod
    def parse(cls, value: str) -> ByteRange:
        """Raise ValueError unless ``value`` is a valid Byte-Range."""
        return _parse_byte_range(value)

    @classmethod
    def _parse(cls, value: str) -> ByteRange:
        start_text, dash, rest = value.strip().partition("-")
        end_text, slash, total_text = rest.partition("/")
        if not (dash and slash) or not _is_number(start_text):
            raise ValueError(f"malformed Byte-Range {value!r}")
        if end_text != "*" and not _is_number(end_text):
            raise ValueError(f"malformed Byte-Range {value!r}")
        if total_text != "*" and not _is_number(total_text):
            raise ValueError(f"malformed Byte-Range {value!r}")
        start = int(start_text)
        end = None if end_text == "*" else int(end_text)
        total = None if total_text == "*" else int(total_text)
        if start < 1 or (end is not None and end < start - 1):
            raise ValueError(f"Byte-Range out of order {value!r}")
        if total is not None and end is not None and end > total:
            raise ValueError(f"Byte-Range beyond total {value!r}")
        return cls(start, end, total)

    def format(self) -> str:
        end = "*" if self.end is None else str(self.end)
        total = "*" if self.total is None else str(self.total)
        return f"{self.start}-{end}/{total}"


# A sender's messages repeat the same few ranges ("1-100/100"): parse each once.
_parse_byte_range = lru_cache(maxsize=512)(ByteRange._parse)


def _is_number(text: str) -> bool:
    return 0 < len(text) <= 19 and text.isascii() and text.isdigit()


def parse_report_mode(value: str | None, default: str) -> str:
    """Success-Report / Failure-Report values, lower-cased; unknown values are errors."""
    if value is None:
        return default
    mode = value.strip().lower()
    if mode not in ("yes", "no", "partial"):
        raise MSRPStatus(400, f"bad report header value {value!r}")
    return mode


def parse_expires(value: str, name: str = "Expires") -> int:
    """A delta-seconds value (RFC 4976 §7.3), bounded so arithmetic stays sane."""
    text = value.strip()
    if not text.isdigit() or len(text) > 10:
        raise MSRPStatus(400, f"malformed {name}")
    return int(text)
