"""MSRP messages and header values (RFC 4975 §7, RFC 4976 §7).

Messages carry their header block only: bodies are streamed past the relay in
pieces and never held here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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
    """

    __slots__ = ("_index", "_items")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = list(items)
        # Built on first lookup: most headers we build are only ever written.
        self._index: dict[str, int] | None = None

    def _lookup(self) -> dict[str, int]:
        index: dict[str, int] = {}
        for position, (name, _) in enumerate(self._items):
            lname = name.lower()
            if lname not in index:
                index[lname] = position
        self._index = index
        return index

    def get(self, name: str, default: str | None = None) -> str | None:
        index = self._index
        if index is None:
            index = self._lookup()
        position = index.get(name.lower())
        return default if position is None else self._items[position][1]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        index = self._index if self._index is not None else self._lookup()
        return name.lower() in index

    def set(self, name: str, value: str) -> None:
        """Replace the first occurrence in place (keeping position) or append."""
        index = self._index if self._index is not None else self._lookup()
        lname = name.lower()
        position = index.get(lname)
        if position is None:
            index[lname] = len(self._items)
            self._items.append((name, value))
        else:
            self._items[position] = (self._items[position][0], value)

    def remove(self, name: str) -> None:
        lname = name.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != lname]
        self._index = None

    def copy(self) -> Headers:
        return Headers(self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def to_bytes(self) -> bytes:
        return "".join([f"{k}: {v}\r\n" for k, v in self._items]).encode("utf-8")


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
