"""HTTP Digest authentication (RFC 2617), MD5 with qop="auth" only.

Both sides live here: :class:`DigestAuthenticator` for the relay, and
:func:`answer_challenge` for every client (relayctl's MSRP and XCAP clients,
tests and benchmarks).

One implementation serves three protocols that reuse RFC 2617 unchanged:
MSRP AUTH (RFC 4976: 401 + WWW-Authenticate, 200 + Authentication-Info, no
auth-int, no MD5-sess, no domain), SIP (RFC 3261 §22: 401/407) and HTTP for
the XCAP server.

Nonces are stateless until used: each carries its creation time and random
bytes, authenticated by an HMAC with a server secret, so forged or altered
nonces are rejected without any lookup and a client asking for challenges
costs no memory.  Only nonces that have authenticated successfully are
remembered (for the strictly increasing nonce-count, RFC 2617 §3.2.2), in a
table with a hard size bound.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

from relayd.tokens import random_bytes

MAX_HEADER_CHARS = 4096
"""Longest Authorization/Proxy-Authorization value parsed."""

MAX_PARAMS = 20
"""Most auth-params accepted in one credentials header."""

NONCE_RANDOM_BYTES = 16
"""Randomness per nonce: 128 bits (96 with an ``issuer``)."""
ISSUER_BYTES = 4
"""Bytes of a nonce's random part that name the process that issued it (``issuer``)."""

_NONCE_MAC_BYTES = 16
_NONCE_TIME = struct.Struct(">Q")
_NONCE_RAW_BYTES = _NONCE_TIME.size + NONCE_RANDOM_BYTES + _NONCE_MAC_BYTES
_NONCE_FUTURE_SKEW_MS = 5000

# Deliberately one reason for both, so a client cannot probe for user names.
_BAD_CREDENTIALS = "invalid username or password"

_REQUIRED = ("username", "realm", "nonce", "uri", "response")
_KNOWN = frozenset((*_REQUIRED, "qop", "nc", "cnonce", "algorithm", "opaque"))
_HEX = frozenset("0123456789abcdefABCDEF")
# RFC 2616 §2.2 separators, plus the characters that end a bare value.
_SEPARATORS = frozenset('()<>@,;:\\"/[]?={} \t')
_VALUE_END = frozenset(', \t"')
_WHITESPACE = " \t"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# One well-formed ``name=value`` or ``name="quoted"`` list element and what follows it.
# Anything else takes the character-by-character path, which names the problem.
_PARAM = re.compile(
    r'[ \t,]*([^()<>@,;:\\"/\[\]?={} \t]+)[ \t]*=[ \t]*'
    r'(?:"([^"\\]*)"|([^, \t"]+))[ \t]*(?:,|$)'
)


class DigestError(ValueError):
    """Authentication failed or the credentials were malformed.

    ``stale`` is True when the credentials were sound but the nonce is too
    old; the caller then re-challenges with ``stale=true`` (RFC 2617 §3.2.1)
    so the client retries without asking its user for a password again.
    """

    def __init__(self, reason: str, *, stale: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stale = stale


@dataclass(frozen=True)
class DigestCredentials:
    """The parsed ``Digest`` credentials of an (Proxy-)Authorization header."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    qop: str | None = None
    nc: str | None = None
    cnonce: str | None = None
    algorithm: str | None = None
    opaque: str | None = None


@dataclass(frozen=True)
class DigestSuccess:
    """A verified request: who it was, and what rspauth needs (RFC 2617 §3.2.3)."""

    username: str
    realm: str
    uri: str
    nonce: str
    cnonce: str
    nc: str
    qop: str
    ha1: str = field(repr=False)


def _md5_hex(text: str) -> str:
    # MD5 is what RFC 2617/3261/4976 mandate; it is not used for anything else.
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def ha1(username: str, realm: str, password: str) -> str:
    """HA1 = MD5(username ":" realm ":" password), RFC 2617 §3.2.2.2."""
    return _md5_hex(f"{username}:{realm}:{password}")


def request_digest(
    ha1_hex: str, *, nonce: str, nc: str, cnonce: str, qop: str, method: str, uri: str
) -> str:
    """The request-digest for qop="auth" (RFC 2617 §3.2.2.1).

    ``method`` empty gives the rspauth of RFC 2617 §3.2.3, whose A2 is
    ``":" digest-uri``.
    """
    ha2 = _md5_hex(f"{method}:{uri}")
    return _md5_hex(f"{ha1_hex}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def _quote(value: str) -> str:
    """A quoted-string (RFC 2616 §2.2) for ``value``; refuses line breaks."""
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("header parameter value contains a control character")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_challenge(realm: str, nonce: str, stale: bool = False, opaque: str | None = None) -> str:
    """A ``WWW-Authenticate``/``Proxy-Authenticate`` value offering qop="auth".

    RFC 4976 forbids ``domain`` for MSRP, so it is never sent; the algorithm is
    left at its MD5 default.
    """
    parts = [f"Digest realm={_quote(realm)}", f"nonce={_quote(nonce)}", 'qop="auth"']
    if opaque is not None:
        parts.append(f"opaque={_quote(opaque)}")
    if stale:
        parts.append("stale=true")
    return ", ".join(parts)


def format_authentication_info(
    *, rspauth: str, cnonce: str, nc: str, nextnonce: str | None = None, qop: str = "auth"
) -> str:
    """An ``Authentication-Info`` value (RFC 2617 §3.2.3, RFC 4976)."""
    parts = []
    if nextnonce is not None:
        parts.append(f"nextnonce={_quote(nextnonce)}")
    parts += [f"rspauth={_quote(rspauth)}", f"cnonce={_quote(cnonce)}", f"nc={nc}", f"qop={qop}"]
    return ", ".join(parts)


def parse_credentials(header_value: str, default_uri: str | None = None) -> DigestCredentials:
    """Parse ``Digest k=v, k="quoted", ...`` (RFC 2617 §3.2.2).

    Raises :class:`DigestError` for anything malformed: a scheme other than
    Digest, syntax errors, control characters, duplicate or missing
    parameters, an over-long header or too many parameters.  Unknown
    parameters are ignored, as RFC 2617 asks, but still count to the limit.

    ``default_uri`` stands in for an absent ``uri``: an MSRP AUTH may leave it
    out (RFC 4976 §5.1's own example does, and so do deployed clients), the
    digest-uri then being the AUTH's To-Path URI.  Without it ``uri`` is
    required, as RFC 2617 has it for SIP and HTTP.
    """
    if len(header_value) > MAX_HEADER_CHARS:
        raise DigestError("credentials header too long")
    if _CONTROL.search(header_value):
        raise DigestError("control character in credentials")
    text = header_value.strip(_WHITESPACE)
    scheme, _, rest = text.partition(" ")
    if scheme.lower() != "digest":
        raise DigestError("credentials scheme is not Digest")
    params = _parse_params(rest)
    if default_uri is not None:
        params.setdefault("uri", default_uri)
    missing = [name for name in _REQUIRED if name not in params]
    if missing:
        raise DigestError("credentials lack " + ", ".join(missing))
    response = params["response"]
    if len(response) != 32 or not _HEX.issuperset(response):
        raise DigestError("response is not 32 hex digits")
    nc = params.get("nc")
    if nc is not None and (len(nc) != 8 or not _HEX.issuperset(nc)):
        raise DigestError("nc is not 8 hex digits")
    return DigestCredentials(
        username=params["username"],
        realm=params["realm"],
        nonce=params["nonce"],
        uri=params["uri"],
        response=response.lower(),
        qop=params.get("qop"),
        nc=nc,
        cnonce=params.get("cnonce"),
        algorithm=params.get("algorithm"),
        opaque=params.get("opaque"),
    )


NC_WINDOW = 64
_NC_WINDOW_MASK = (1 << NC_WINDOW) - 1


def _seen(highest: int, mask: int, nc_value: int) -> bool:
    """Was this nonce-count used already (or is it too old to tell)?"""
    if nc_value > highest:
        return False
    if nc_value == highest:
        return True
    distance = highest - nc_value
    return distance > NC_WINDOW or bool(mask >> (distance - 1) & 1)


def parse_challenge(header_value: str) -> dict[str, str]:
    """Parameters of a ``WWW-Authenticate: Digest …`` challenge, for our clients.

    Also reads ``Authentication-Info`` values when ``header_value`` has no scheme.
    """
    if len(header_value) > MAX_HEADER_CHARS:
        raise DigestError("challenge header too long")
    text = header_value.strip(_WHITESPACE)
    scheme, _, rest = text.partition(" ")
    if scheme.lower() != "digest":
        raise DigestError("challenge scheme is not Digest")
    return _parse_params(rest, keep=None)


@dataclass
class Challenge:
    """A server's Digest challenge as a client keeps it between requests.

    ``uses`` counts the requests answered with this nonce, so reusing it sends
    nonce-counts 1, 2, 3… (RFC 2617 §3.2.2); ``qop`` is False when the server
    offered none, and the answer then takes the RFC 2069 form.
    """

    realm: str
    nonce: str
    opaque: str | None = None
    stale: bool = False
    qop: bool = True
    uses: int = 0


def read_challenge(header_value: str) -> Challenge:
    """The :class:`Challenge` in a ``WWW-Authenticate``/``Proxy-Authenticate`` value.

    :class:`DigestError` when it is not Digest, lacks realm or nonce, offers
    qop values without ``auth`` (auth-int needs the body), or names an
    algorithm other than MD5.
    """
    params = parse_challenge(header_value)
    if "realm" not in params or "nonce" not in params:
        raise DigestError("challenge lacks realm or nonce")
    algorithm = params.get("algorithm", "MD5")
    if algorithm.lower() != "md5":
        raise DigestError(f"unsupported algorithm {algorithm!r}")
    qop = params.get("qop")
    if qop is not None and "auth" not in [q.strip().lower() for q in qop.split(",")]:
        raise DigestError('challenge offers no qop="auth"')
    return Challenge(
        params["realm"],
        params["nonce"],
        params.get("opaque"),
        params.get("stale", "").lower() == "true",
        qop is not None,
    )


def is_stale(header_value: str | None) -> bool:
    """Does this challenge say only the nonce was old (``stale=true``, RFC 2617
    §3.2.1), so the credentials are worth one more try with the new nonce?"""
    try:
        return header_value is not None and read_challenge(header_value).stale
    except DigestError:
        return False


@dataclass(frozen=True)
class Answer:
    """An ``Authorization``/``Proxy-Authorization`` value, and the ``rspauth`` a
    server that knows the password sends back with it (RFC 2617 §3.2.3)."""

    authorization: str
    rspauth: str


def answer_challenge(
    challenge: Challenge | str,
    *,
    username: str,
    password: str,
    method: str,
    uri: str,
    cnonce: str | None = None,
    nc: int | None = None,
) -> Answer:
    """Credentials answering ``challenge`` for a ``method`` request to ``uri``.

    The digest-uri is the request's own: the Request-URI (SIP, RFC 3261
    §22.4), the path (HTTP), the AUTH's To-Path URI (MSRP, RFC 4976 §5.1).
    The nonce-count is the next of the challenge's ``uses`` unless ``nc``
    says otherwise; ``opaque`` is echoed as RFC 2617 §3.2.2 requires. Tests
    pin ``cnonce`` and ``nc``; everyone else leaves them out.
    """
    if isinstance(challenge, str):
        challenge = read_challenge(challenge)
    if nc is None:
        challenge.uses += 1
        nc = challenge.uses
    secret = ha1(username, challenge.realm, password)
    parts = [
        f"Digest username={_quote(username)}",
        f"realm={_quote(challenge.realm)}",
        f"nonce={_quote(challenge.nonce)}",
        f"uri={_quote(uri)}",
    ]
    if challenge.qop:
        nc_text, cnonce = f"{nc:08x}", cnonce or secrets.token_hex(8)
        response = request_digest(
            secret,
            nonce=challenge.nonce,
            nc=nc_text,
            cnonce=cnonce,
            qop="auth",
            method=method,
            uri=uri,
        )
        rspauth = request_digest(
            secret, nonce=challenge.nonce, nc=nc_text, cnonce=cnonce, qop="auth", method="", uri=uri
        )
        parts += [f"response={_quote(response)}", "algorithm=MD5", "qop=auth", f"nc={nc_text}"]
        parts.append(f"cnonce={_quote(cnonce)}")
    else:
        # RFC 2069 compatibility (RFC 2617 §3.2.2.1): no qop, nc or cnonce.
        response = _md5_hex(f"{secret}:{challenge.nonce}:{_md5_hex(f'{method}:{uri}')}")
        rspauth = _md5_hex(f"{secret}:{challenge.nonce}:{_md5_hex(f':{uri}')}")
        parts += [f"response={_quote(response)}", "algorithm=MD5"]
    if challenge.opaque is not None:
        parts.append(f"opaque={_quote(challenge.opaque)}")
    return Answer(", ".join(parts), rspauth)


def parse_auth_info(header_value: str) -> dict[str, str]:
    """Parameters of an ``Authentication-Info`` header (RFC 2617 §3.2.3)."""
    if len(header_value) > MAX_HEADER_CHARS:
        raise DigestError("Authentication-Info header too long")
    return _parse_params(header_value.strip(_WHITESPACE), keep=None)


def _parse_params(text: str, keep: frozenset[str] | None = _KNOWN) -> dict[str, str]:
    """Split a comma-separated auth-param list; one left-to-right pass."""
    fast = _parse_params_fast(text)
    if fast is not None:
        return fast if keep is None else {k: v for k, v in fast.items() if k in keep}
    return _parse_params_checked(text, keep)


def _parse_params_fast(text: str) -> dict[str, str] | None:
    """The common case (no escapes, no empty elements, no oddities) by regular
    expression; ``None`` sends the input to :func:`_parse_params_checked`."""
    params: dict[str, str] = {}
    match = _PARAM.match
    i, end = 0, len(text.rstrip(_WHITESPACE))
    while i < end:
        found = match(text, i)
        if found is None:
            return None
        name = found.group(1).lower()
        if name in params or len(params) >= MAX_PARAMS:
            return None
        quoted = found.group(2)
        params[name] = quoted if quoted is not None else found.group(3)
        i = found.end()
    return params if params else None


def _parse_params_checked(text: str, keep: frozenset[str] | None) -> dict[str, str]:
    """Character by character, with a reason for every refusal."""
    params: dict[str, str] = {}
    count = 0
    i, end = 0, len(text)
    while True:
        # Skip whitespace and empty list elements ("a, , b" is legal #rule).
        while i < end and (text[i] in _WHITESPACE or text[i] == ","):
            i += 1
        if i == end:
            break
        start = i
        while i < end and text[i] not in _SEPARATORS:
            i += 1
        name = text[start:i].lower()
        if not name:
            raise DigestError("expected a parameter name")
        while i < end and text[i] in _WHITESPACE:
            i += 1
        if i == end or text[i] != "=":
            raise DigestError(f"parameter {name!r} has no value")
        i += 1
        while i < end and text[i] in _WHITESPACE:
            i += 1
        if i < end and text[i] == '"':
            value, i = _read_quoted(text, i + 1)
        else:
            start = i
            while i < end and text[i] not in _VALUE_END:
                i += 1
            value = text[start:i]
            if not value:
                raise DigestError(f"parameter {name!r} has an empty value")
        while i < end and text[i] in _WHITESPACE:
            i += 1
        if i < end and text[i] != ",":
            raise DigestError(f"junk after parameter {name!r}")
        count += 1
        if count > MAX_PARAMS:
            raise DigestError("too many credentials parameters")
        if name in params:
            raise DigestError(f"duplicate parameter {name!r}")
        params[name] = value
    if keep is None:
        return params
    # Unknown parameters were counted and duplicate-checked; now drop them.
    return {k: v for k, v in params.items() if k in keep}


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    """Read a quoted-string body starting after the opening quote."""
    out: list[str] = []
    end = len(text)
    while i < end:
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\":
            i += 1
            if i == end:
                break
            ch = text[i]
        out.append(ch)
        i += 1
    raise DigestError("unterminated quoted string")


class DigestAuthenticator:
    """Issues challenges and verifies Digest credentials for one realm.

    ``lookup(username, realm)`` returns the stored HA1 (hex) or None.  Time
    comes from ``clock`` (an ``IReactorTime``) so tests drive nonce expiry.
    """

    def __init__(
        self,
        realm: str,
        lookup: Callable[[str, str], str | None],
        clock: IReactorTime,
        *,
        nonce_lifetime_seconds: float = 300,
        max_tracked_nonces: int = 10_000,
        secret: bytes | None = None,
        issuer: bytes | None = None,
    ) -> None:
        if nonce_lifetime_seconds <= 0:
            raise ValueError("nonce_lifetime_seconds must be positive")
        if max_tracked_nonces < 1:
            raise ValueError("max_tracked_nonces must be at least 1")
        if secret is not None and len(secret) < 16:
            raise ValueError("secret must be at least 16 bytes")
        if issuer is not None and len(issuer) != ISSUER_BYTES:
            raise ValueError(f"issuer must be {ISSUER_BYTES} bytes")
        # With a secret shared by several processes ([relay] workers), each process's
        # nonces carry its own ``issuer`` (drawn at each start) in place of as many
        # random bytes: another's nonce is authentic but answered stale=true, so the
        # client retries at once with ours, and a nonce-count is only ever tracked by
        # the process that issued the nonce (no replay at a sibling, or at a restarted
        # process).
        self._issuer = issuer
        self.realm = realm
        self._lookup = lookup
        self._clock = clock
        self._lifetime_ms = int(nonce_lifetime_seconds * 1000)
        self._max_tracked = max_tracked_nonces
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._realm_bytes = realm.encode("utf-8")
        # nonce -> (creation ms, last nonce-count), oldest first use first.
        # nonce -> (created ms, highest nc, bitmask of the NC_WINDOW counts below it)
        self._tracked: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        # Creation time of the newest still-valid nonce forgotten for space:
        # untracked nonces no newer than this might be replays, so are stale.
        self._forgotten_until = -1

    def challenge(self, stale: bool = False, opaque: str | None = None) -> str:
        """A fresh ``WWW-Authenticate`` value with a new nonce (and ``opaque``, if given)."""
        return format_challenge(self.realm, self.new_nonce(), stale=stale, opaque=opaque)

    def new_nonce(self) -> str:
        """Mint a nonce: creation time (ms), 128 random bits, HMAC-SHA256 tag."""
        if self._issuer is None:
            random_part = random_bytes(NONCE_RANDOM_BYTES)
        else:
            random_part = self._issuer + random_bytes(NONCE_RANDOM_BYTES - ISSUER_BYTES)
        body = _NONCE_TIME.pack(self._now_ms()) + random_part
        raw = body + self._mac(body)
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def _now_ms(self) -> int:
        # Milliseconds, so "forgotten until" (see _remember) rarely catches
        # nonces minted after an eviction.
        return int(self._clock.seconds() * 1000)

    def _mac(self, body: bytes) -> bytes:
        msg = b"relayd-digest-nonce\0" + self._realm_bytes + b"\0" + body
        return hmac.digest(self._secret, msg, "sha256")[:_NONCE_MAC_BYTES]

    def _nonce_time(self, nonce: str) -> int:
        """Creation time (ms) of an authentic nonce; DigestError if not ours."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):
            raise DigestError("invalid nonce") from None
        if len(raw) != _NONCE_RAW_BYTES:
            raise DigestError("invalid nonce")
        body, tag = raw[:-_NONCE_MAC_BYTES], raw[-_NONCE_MAC_BYTES:]
        if not hmac.compare_digest(tag, self._mac(body)):
            raise DigestError("invalid nonce")
        if self._issuer is not None and not body.startswith(self._issuer, _NONCE_TIME.size):
            raise DigestError("nonce issued by another worker", stale=True)
        (created,) = _NONCE_TIME.unpack_from(body)
        return int(created)

    def verify(
        self, method: str, credentials: DigestCredentials, expected_uri: str | None = None
    ) -> DigestSuccess:
        """Check ``credentials`` for a request with ``method``.

        ``expected_uri`` is the request's own URI (MSRP: the first To-Path
        URI); RFC 2617 §3.2.2.5 requires digest-uri to match it.  Raises
        :class:`DigestError`; unknown users and wrong passwords share one
        reason so failures do not reveal which user names exist.
        """
        cred = credentials
        if cred.algorithm is not None and cred.algorithm.lower() != "md5":
            raise DigestError("unsupported algorithm")
        if cred.realm != self.realm:
            raise DigestError("wrong realm")
        if cred.qop is None or cred.qop.lower() != "auth":
            raise DigestError('qop must be "auth"')
        if cred.nc is None or not cred.cnonce:
            raise DigestError("nc and cnonce are required with qop")
        nc_value = int(cred.nc, 16)
        if nc_value == 0:
            raise DigestError("nc must start at 00000001")
        if expected_uri is not None and cred.uri != expected_uri:
            raise DigestError("digest uri does not match the request")
        created = self._nonce_time(cred.nonce)
        now = self._now_ms()
        if now - created > self._lifetime_ms or created - now > _NONCE_FUTURE_SKEW_MS:
            raise DigestError("nonce expired", stale=True)
        previous = self._tracked.get(cred.nonce)
        if previous is not None:
            if _seen(previous[1], previous[2], nc_value):
                raise DigestError("nonce count replayed")
        elif created <= self._forgotten_until:
            raise DigestError("nonce no longer tracked", stale=True)

        stored = self._lookup(cred.username, cred.realm)
        # Do the same work for unknown users so timing does not tell them apart.
        ha1_hex = stored.lower() if stored is not None else _md5_hex(secrets.token_hex(16))
        expected = request_digest(
            ha1_hex,
            nonce=cred.nonce,
            nc=cred.nc,
            cnonce=cred.cnonce,
            qop=cred.qop,
            method=method,
            uri=cred.uri,
        )
        matches = hmac.compare_digest(expected.encode(), cred.response.encode("utf-8"))
        if stored is None or not matches:
            raise DigestError(_BAD_CREDENTIALS)

        self._remember(cred.nonce, created, nc_value)
        return DigestSuccess(
            username=cred.username,
            realm=cred.realm,
            uri=cred.uri,
            nonce=cred.nonce,
            cnonce=cred.cnonce,
            nc=cred.nc,
            qop=cred.qop,
            ha1=ha1_hex,
        )

    def _remember(self, nonce: str, created: int, nc_value: int) -> None:
        """Record the nonce-count, keeping the table within its bound.

        Counts may arrive out of order when a client sends requests in
        parallel over several connections with one nonce, so each entry keeps
        the highest count and a bitmask of the NC_WINDOW counts below it:
        every count is accepted once, and counts below the window never.
        """
        tracked = self._tracked
        entry = tracked.get(nonce)
        if entry is not None:
            _, highest, mask = entry
            if nc_value > highest:
                shift = nc_value - highest
                mask = ((mask << shift) | (1 << (shift - 1))) & _NC_WINDOW_MASK
                highest = nc_value
            else:
                mask |= 1 << (highest - nc_value - 1)
            tracked[nonce] = (created, highest, mask)
            return
        oldest_valid = self._now_ms() - self._lifetime_ms
        while tracked:
            first = next(iter(tracked))
            first_created = tracked[first][0]
            if first_created < oldest_valid:
                del tracked[first]  # expired: its nonce is refused anyway
            elif len(tracked) >= self._max_tracked:
                del tracked[first]
                self._forgotten_until = max(self._forgotten_until, first_created)
            else:
                break
        tracked[nonce] = (created, nc_value, 0)

    def authentication_info(self, success: DigestSuccess, nextnonce: bool = True) -> str:
        """The ``Authentication-Info`` value for a verified request.

        rspauth uses A2 = ":" digest-uri (RFC 2617 §3.2.3); a nextnonce lets
        the client's next AUTH (a refresh) skip the 401 round trip.
        """
        rspauth = request_digest(
            success.ha1,
            nonce=success.nonce,
            nc=success.nc,
            cnonce=success.cnonce,
            qop=success.qop,
            method="",
            uri=success.uri,
        )
        return format_authentication_info(
            rspauth=rspauth,
            cnonce=success.cnonce,
            nc=success.nc,
            nextnonce=self.new_nonce() if nextnonce else None,
            qop=success.qop,
        )

    @property
    def tracked_nonce_count(self) -> int:
        """How many nonces are remembered now (bounded by max_tracked_nonces)."""
        return len(self._tracked)
