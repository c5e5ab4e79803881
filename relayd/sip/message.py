"""SIP requests, responses and header access (RFC 3261 §7, §8.2.6, §20).

Header values are kept as unfolded text and only split or parsed when asked for: a relay
reads a handful of headers per message and copies the rest, so eager parsing is waste.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Self, overload

from relayd.bounded import parse_once, remember
from relayd.sipuri import (
    SIPURI,
    Params,
    SIPURIError,
    format_host,
    format_params,
    param_value,
    parse_params,
    split_outside_quotes,
)
from relayd.tokens import random_bytes

__all__ = [
    "KNOWN_METHODS",
    "REASON_PHRASES",
    "CSeq",
    "Headers",
    "SIPHeaderError",
    "SIPMessage",
    "SIPRequest",
    "SIPResponse",
    "SIPStatus",
    "Via",
    "make_response",
    "new_tag",
    "reason_phrase",
    "split_header_values",
    "stateless_tag",
    "tag_of",
    "unstamped_via",
]

MAGIC_COOKIE = "z9hG4bK"
"""RFC 3261 §8.1.1.7: branch prefix that marks RFC 3261 transaction matching."""


class SIPHeaderError(ValueError):
    """A header value that does not follow its grammar (Via, CSeq, Max-Forwards...)."""


# RFC 3261 §7.3.3 plus later registrations (RFC 3265/6665, 3515, 3892, 4028, 4474, 3841).
COMPACT_FORMS: dict[str, str] = {
    "i": "call-id",
    "m": "contact",
    "e": "content-encoding",
    "l": "content-length",
    "c": "content-type",
    "f": "from",
    "s": "subject",
    "k": "supported",
    "t": "to",
    "v": "via",
    "o": "event",
    "r": "refer-to",
    "b": "referred-by",
    "u": "allow-events",
    "x": "session-expires",
    "y": "identity",
    "a": "accept-contact",
    "j": "reject-contact",
    "d": "request-disposition",
}

# Names whose canonical spelling is not plain Title-Case-Per-Part.
_CANONICAL_SPECIAL: dict[str, str] = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version",
    "rack": "RAck",
    "rseq": "RSeq",
    "sip-etag": "SIP-ETag",
    "sip-if-match": "SIP-If-Match",
    "min-se": "Min-SE",
    "identity-info": "Identity-Info",
}

# Headers whose grammar is a comma-separated list (RFC 3261 §7.3.1 allows folding rows of
# these into one, so we must split them). Anything not listed is returned whole: auth
# headers, Date, Retry-After, Subject, From/To and unknown extensions may contain commas.
MULTI_VALUE_HEADERS = frozenset(
    {
        "via",
        "contact",
        "route",
        "record-route",
        "path",
        "service-route",
        "allow",
        "allow-events",
        "supported",
        "require",
        "proxy-require",
        "unsupported",
        "accept",
        "accept-encoding",
        "accept-language",
        "accept-contact",
        "reject-contact",
        "request-disposition",
        "content-encoding",
        "content-language",
        "alert-info",
        "call-info",
        "error-info",
        "in-reply-to",
        "warning",
        "p-asserted-identity",
        "p-preferred-identity",
        "privacy",
        "security-client",
        "security-server",
        "security-verify",
        "permission-missing",
        "trigger-consent",
    }
)


_KEYS: dict[str, str] = {}
_KEYS_SIZE = 512


def header_key(name: str) -> str:
    """Lookup key for a header name: lower-case long form (compact forms expanded)."""
    key = _KEYS.get(name)
    if key is None:
        key = name.lower()
        if len(key) == 1:
            key = COMPACT_FORMS.get(key, key)
        if len(_KEYS) < _KEYS_SIZE:
            _KEYS[name] = key
    return key


_CANONICAL_CACHE: dict[str, str] = {}
_CANONICAL_CACHE_SIZE = 512


def canonical_name(key: str) -> str:
    """Wire spelling for a lookup key: ``call-id`` → ``Call-ID``, ``x-foo`` → ``X-Foo``."""
    name = _CANONICAL_CACHE.get(key)
    if name is not None:
        return name
    name = _CANONICAL_SPECIAL.get(key)
    if name is None:
        name = "-".join(part.capitalize() for part in key.split("-"))
    if len(_CANONICAL_CACHE) < _CANONICAL_CACHE_SIZE:
        _CANONICAL_CACHE[key] = name
    return name


def split_header_values(value: str) -> list[str]:
    """Split a list-valued header on commas outside quoted-strings and ``<...>`` (§7.3.1)."""
    if "," not in value:
        stripped = value.strip()
        return [stripped] if stripped else []
    if '"' not in value and "<" not in value:
        # Every comma separates values (the usual multi-value Via row): no scan needed.
        return [p for p in (part.strip() for part in value.split(",")) if p]
    parts, _ = split_outside_quotes(value, ",", angles=True)
    return [p for p in (part.strip() for part in parts) if p]


class Headers:
    """Ordered, case-insensitive multi-dict of header fields.

    Field rows with the same name keep their relative order (the only order RFC 3261 §7.3.1
    makes significant); different names keep the order in which each first appeared.
    Values are stored as written (unfolded); list-valued headers are split on read.
    """

    __slots__ = ("_fields",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: dict[str, list[str]] = {}
        for name, value in items:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        """Append a field row (not split: ``add("Via", "a, b")`` is one row, two values)."""
        key = header_key(name)
        values = self._fields.get(key)
        if values is None:
            self._fields[key] = [value]
        else:
            values.append(value)

    def add_first(self, name: str, value: str) -> None:
        """Prepend a field row; a proxy pushes its Via/Record-Route this way (§16.6)."""
        key = header_key(name)
        self._fields.setdefault(key, []).insert(0, value)

    def set(self, name: str, value: str) -> None:
        """Replace every row of ``name`` with one row."""
        self._fields[header_key(name)] = [value]

    def remove(self, name: str) -> None:
        self._fields.pop(header_key(name), None)

    @overload
    def get(self, name: str) -> str | None: ...

    @overload
    def get(self, name: str, default: str) -> str: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        """First value; for list-valued headers the first list element."""
        key = header_key(name)
        values = self._fields.get(key)
        if not values:
            return default
        if key in MULTI_VALUE_HEADERS:
            for row in values:
                split = split_header_values(row)
                if split:
                    return split[0]
            return default
        return values[0]

    def first(self, key: str) -> str | None:
        """:meth:`get` for a lookup key (already :func:`header_key` form): the hot path
        for the handful of headers read from every message."""
        rows = self._fields.get(key)
        if not rows:
            return None
        row = rows[0]
        if key in MULTI_VALUE_HEADERS:
            comma = row.find(",")
            if comma >= 0:
                if '"' in row or "<" in row:
                    return self.get(key)
                row = row[:comma]  # every comma separates: the first value is before it
            row = row.strip()
            return row or self.get(key)
        return row

    def get_all(self, name: str) -> list[str]:
        """All values in order; list-valued headers are split on commas."""
        key = header_key(name)
        values = self._fields.get(key)
        if not values:
            return []
        if key not in MULTI_VALUE_HEADERS:
            return list(values)
        out: list[str] = []
        for row in values:
            out.extend(split_header_values(row))
        return out

    def get_raw(self, name: str) -> list[str]:
        """Field rows exactly as received (after unfolding), never split."""
        return list(self._fields.get(header_key(name), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and header_key(name) in self._fields

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """``(canonical name, row)`` pairs in wire order."""
        for key, values in self._fields.items():
            name = canonical_name(key)
            for value in values:
                yield name, value

    def __len__(self) -> int:
        return sum(len(v) for v in self._fields.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self._fields == other._fields

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"

    def copy(self) -> Headers:
        new = Headers()
        new._fields = {k: list(v) for k, v in self._fields.items()}
        return new

    def _serialize_into(self, out: list[str]) -> None:
        for key, values in self._fields.items():
            if key == "content-length":
                continue
            name = canonical_name(key)
            for value in values:
                out.append(f"{name}: {value}\r\n")


def _split_host_port(text: str) -> tuple[str, int | None]:
    text = text.replace(" ", "").replace("\t", "")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise SIPHeaderError(f"bad IPv6 sent-by: {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        if ":" not in host:
            raise SIPHeaderError(f"bad IPv6 sent-by: {text!r}")
    else:
        host, sep, port_text = text.partition(":")
        rest = sep + port_text
    if not host:
        raise SIPHeaderError(f"empty host: {text!r}")
    if not rest:
        return host, None
    port_text = rest[1:]
    if not rest.startswith(":") or not port_text.isdigit() or not port_text.isascii():
        raise SIPHeaderError(f"bad port: {text!r}")
    port = int(port_text)
    if port > 65535:
        raise SIPHeaderError(f"bad port: {text!r}")
    return host, port


# The usual via-parm, without the LWS, quoting and escapes the general parser allows:
# what it matches, Via._parse_general would read the same (a property test checks).
_VIA_FAST = re.compile(
    r"SIP/2\.0/([A-Za-z]+) (?:([A-Za-z0-9.\-]+)|\[([0-9A-Fa-f.]*:[0-9A-Fa-f:.]*)\])"
    r"(?::([0-9]{1,5}))?"
    r"((?:;[A-Za-z0-9\-.!%*_+`'~]+(?:=[^;\s\"<>,]+)?)*)"
)

_VIA_CACHE: dict[str, object] = {}
_VIA_CACHE_SIZE = 4096


def remember_via(text: str, via: Via) -> None:
    """Record that ``text`` parses as ``via``: the transport does it for the Via it
    stamps, so the responses echoing it are matched without parsing it again."""
    remember(_VIA_CACHE, _VIA_CACHE_SIZE, text, via)


@dataclass(frozen=True, slots=True)
class Via:
    """One Via value (RFC 3261 §20.42, rport per RFC 3581)."""

    transport: str
    host: str
    port: int | None = None
    params: Params = ()
    protocol: str = "SIP"
    version: str = "2.0"

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse one via-parm; LWS is allowed around ``/``, ``:``, ``;`` and ``=``.

        A relay reads the same top Via several times per message (transport, transaction
        matching, response routing), so recent results are remembered by their text.
        """
        return parse_once(_VIA_CACHE, _VIA_CACHE_SIZE, text, cls, cls._parse)

    @classmethod
    def _parse(cls, text: str) -> Self:
        fast = _VIA_FAST.fullmatch(text)
        if fast is not None:
            transport, host, v6_host, port_text, param_text = fast.groups()
            port = int(port_text) if port_text else None
            if port is None or port <= 65535:
                params = (
                    tuple(
                        (name.lower(), value if eq else None)
                        for name, eq, value in (p.partition("=") for p in param_text[1:].split(";"))
                    )
                    if param_text
                    else ()
                )
                return cls(transport.upper(), host or v6_host, port, params)
        return cls._parse_general(text)

    @classmethod
    def _parse_general(cls, text: str) -> Self:
        sent, semi, param_text = text.partition(";")
        parts = sent.split("/", 2)
        if len(parts) != 3:
            raise SIPHeaderError(f"bad sent-protocol: {text!r}")
        protocol = parts[0].strip()
        version = parts[1].strip()
        transport_and_host = parts[2].strip().split(None, 1)
        if not protocol or not version or len(transport_and_host) != 2:
            raise SIPHeaderError(f"bad Via: {text!r}")
        transport, sent_by = transport_and_host
        host, port = _split_host_port(sent_by)
        if any(c in host for c in '<>"\\,;/@'):
            raise SIPHeaderError(f"bad sent-by host: {text!r}")
        try:
            params = parse_params(param_text) if semi else ()
        except SIPURIError as e:
            raise SIPHeaderError(str(e)) from e
        return cls(transport.upper(), host, port, params, protocol.upper(), version)

    def format(self) -> str:
        return (
            f"{self.protocol}/{self.version}/{self.transport} "
            f"{format_host(self.host, self.port)}{format_params(self.params)}"
        )

    __str__ = format

    def param(self, name: str) -> str | None:
        """``""`` for a valueless parameter, ``None`` when absent."""
        return param_value(self.params, name.lower())

    @property
    def branch(self) -> str | None:
        return self.param("branch") or None

    @property
    def received(self) -> str | None:
        return self.param("received") or None

    @property
    def rport_requested(self) -> bool:
        """The valueless ``rport`` of RFC 3581 §4: answer to the source port."""
        return self.param("rport") is not None

    @property
    def rport(self) -> int | None:
        value = self.param("rport")
        return int(value) if value and value.isdigit() else None

    @property
    def sent_by(self) -> tuple[str, int | None]:
        """Comparable sent-by for transaction matching (§17.2.3): host is case-insensitive."""
        return self.host.lower(), self.port

    def with_param(self, name: str, value: str | None = None) -> Via:
        name = name.lower()
        kept = tuple(p for p in self.params if p[0] != name)
        return Via(
            self.transport,
            self.host,
            self.port,
            (*kept, (name, value)),
            self.protocol,
            self.version,
        )


_CSEQ_CACHE: dict[str, object] = {}
_CSEQ_CACHE_SIZE = 1024


def unstamped_via(branch: str) -> str:
    """The Via a relayed or locally made request starts with: the transport replaces
    the sent-by with its own (``SIPTransportLayer.prepare_request``) once it knows the
    transport. Remembered as parsed, since it is read right away."""
    text = f"SIP/2.0/UDP 0.0.0.0;branch={branch}"
    remember_via(text, Via("UDP", "0.0.0.0", None, (("branch", branch),)))  # noqa: S104 - a placeholder, never bound
    return text


@dataclass(frozen=True, slots=True)
class CSeq:
    """RFC 3261 §20.16: sequence number (below 2**31, §8.1.1.5) and method."""

    number: int
    method: str

    @classmethod
    def parse(cls, text: str) -> Self:
        return parse_once(_CSEQ_CACHE, _CSEQ_CACHE_SIZE, text, cls, cls._parse)

    @classmethod
    def _parse(cls, text: str) -> Self:
        parts = text.split()
        if len(parts) != 2 or not parts[0].isdigit() or not parts[0].isascii():
            raise SIPHeaderError(f"bad CSeq: {text!r}")
        if len(parts[0]) > 10 or int(parts[0]) >= 2**31:
            raise SIPHeaderError(f"CSeq number out of range: {text!r}")
        return cls(int(parts[0]), parts[1])

    def format(self) -> str:
        return f"{self.number} {self.method}"

    __str__ = format


def tag_of(value: str | None) -> str | None:
    """The ``tag`` parameter of a From/To value, without parsing the URI (hot path)."""
    if not value:
        return None
    gt = value.rfind(">")
    if gt >= 0:
        param_text = value[gt + 1 :]
    else:
        semi = value.find(";")
        if semi < 0:
            return None
        param_text = value[semi:]
    if "tag" not in param_text.lower():
        return None
    try:
        return param_value(parse_params(param_text), "tag") or None
    except SIPURIError:
        return None


def new_tag() -> str:
    """A From/To tag with well over the 32 random bits RFC 3261 §19.3 asks for."""
    return random_bytes(8).hex()


def stateless_tag(request: SIPRequest) -> str:
    """The To tag of a response sent without a transaction: the same for a request and
    its retransmissions (§8.2.7), and as unique as the sender's branch and Call-ID."""
    h = request.headers
    material = "\0".join(
        (
            h.first("via") or "",
            h.first("call-id") or "",
            request.from_tag or "",
            h.first("cseq") or "",
        )
    )
    return hashlib.blake2b(material.encode("utf-8"), digest_size=8).hexdigest()


REASON_PHRASES: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    199: "Early Dialog Terminated",
    200: "OK",
    202: "Accepted",
    204: "No Notification",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    412: "Conditional Request Failed",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    417: "Unknown Resource-Priority",
    420: "Bad Extension",
    421: "Extension Required",
    422: "Session Interval Too Small",
    423: "Interval Too Brief",
    428: "Use Identity Header",
    429: "Provide Referrer Identity",
    430: "Flow Failed",
    433: "Anonymity Disallowed",
    436: "Bad Identity-Info",
    437: "Unsupported Certificate",
    438: "Invalid Identity Header",
    439: "First Hop Lacks Outbound Support",
    440: "Max-Breadth Exceeded",
    469: "Bad Info Package",
    470: "Consent Needed",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    493: "Undecipherable",
    494: "Security Agreement Required",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    580: "Precondition Failure",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
    607: "Unwanted",
}

_CLASS_PHRASES = {1: "Trying", 2: "OK", 3: "Redirect", 4: "Client Error", 5: "Server Error"}


def reason_phrase(status: int) -> str:
    """Default reason phrase; unknown codes fall back to their class (§21)."""
    return REASON_PHRASES.get(status) or _CLASS_PHRASES.get(status // 100, "Global Failure")


class _MessageHelpers:
    """Accessors shared by requests and responses; they parse on each call (no cache to
    go stale when headers are edited)."""

    __slots__ = ()
    headers: Headers
    body: bytes

    @property
    def call_id(self) -> str | None:
        return self.headers.first("call-id")

    @property
    def cseq(self) -> CSeq:
        """Raises :class:`SIPHeaderError` when missing or malformed."""
        value = self.headers.first("cseq")
        if value is None:
            raise SIPHeaderError("missing CSeq")
        return CSeq.parse(value)

    @property
    def via(self) -> Via:
        """The top Via (the one transactions match on); raises when missing or malformed."""
        value = self.headers.first("via")
        if value is None:
            raise SIPHeaderError("missing Via")
        return Via.parse(value)

    @property
    def vias(self) -> list[Via]:
        return [Via.parse(v) for v in self.headers.get_all("via")]

    @property
    def from_tag(self) -> str | None:
        return tag_of(self.headers.first("from"))

    @property
    def to_tag(self) -> str | None:
        return tag_of(self.headers.first("to"))

    @property
    def max_forwards(self) -> int | None:
        """RFC 3261 §20.22: 0-255, ``None`` when absent; raises when malformed."""
        value = self.headers.first("max-forwards")
        if value is None:
            return None
        value = value.strip()
        if not value.isdigit() or not value.isascii() or len(value) > 10 or int(value) > 255:
            raise SIPHeaderError(f"bad Max-Forwards: {value!r}")
        return int(value)

    def _serialize(self, start_line: str) -> bytes:
        out = [start_line, "\r\n"]
        self.headers._serialize_into(out)
        out.append(f"Content-Length: {len(self.body)}\r\n\r\n")
        return "".join(out).encode("utf-8") + self.body


@dataclass(eq=True, slots=True)
class SIPRequest(_MessageHelpers):
    method: str
    uri: SIPURI
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""

    def to_bytes(self) -> bytes:
        """Wire form: canonical header names, Content-Length always equal to the body."""
        return self._serialize(f"{self.method} {self.uri.format()} SIP/2.0")


@dataclass(eq=True, slots=True)
class SIPResponse(_MessageHelpers):
    status: int
    reason: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""

    def to_bytes(self) -> bytes:
        return self._serialize(f"SIP/2.0 {self.status} {self.reason}")


SIPMessage = SIPRequest | SIPResponse


class SIPStatus(Exception):
    """Raised by a handler to answer with a non-2xx final response.

    ``headers`` are extra ``(name, value)`` rows (Allow, Min-Expires, Retry-After...).
    """

    def __init__(
        self, status: int, reason: str | None = None, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        self.status = status
        self.reason = reason or reason_phrase(status)
        self.headers = tuple(headers)
        super().__init__(status, self.reason)


_COPIED = ("via", "from", "call-id", "cseq")


def make_response(
    request: SIPRequest,
    status: int,
    reason: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    to_tag: str | None = None,
) -> SIPResponse:
    """Build a response per RFC 3261 §8.2.6.2.

    Via (all rows, in order), From, Call-ID and CSeq are copied verbatim; To is copied and
    gets a tag when it has none and the status is above 100 (``to_tag`` or a fresh one).
    A 100 also echoes Timestamp (§8.2.6.1).
    """
    out = Headers()
    src = request.headers._fields
    for key in _COPIED:
        rows = src.get(key)
        if rows:
            out._fields[key] = list(rows)
        if key == "from":
            to_value = request.headers.get("to")
            if to_value is not None:
                if status > 100 and tag_of(to_value) is None:
                    to_value = f"{to_value};tag={to_tag or new_tag()}"
                out._fields["to"] = [to_value]
    if status == 100 and "timestamp" in src:
        out._fields["timestamp"] = list(src["timestamp"])
    for name, value in headers:
        out.add(name, value)
    return SIPResponse(status, reason or reason_phrase(status), out, body)


def response_for_status(request: SIPRequest, error: SIPStatus) -> SIPResponse:
    """The response a :class:`SIPStatus` raised by a handler stands for."""
    return make_response(request, error.status, error.reason, error.headers)


KNOWN_METHODS = frozenset(
    {
        "ACK",
        "BYE",
        "CANCEL",
        "CONSENT",
        "INFO",
        "INVITE",
        "MESSAGE",
        "NOTIFY",
        "OPTIONS",
        "PRACK",
        "PUBLISH",
        "REFER",
        "REGISTER",
        "SUBSCRIBE",
        "UPDATE",
    }
)
"""The request methods relayd recognises (RFC 3261 and the extensions it serves, CONSENT
of RFC 5360 among them): the UAS answers one it has no handler for 405, anything else
501 (§8.2.1); counters name these and count any other method as "other"."""
