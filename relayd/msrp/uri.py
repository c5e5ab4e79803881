"""MSRP URIs: parse, format and compare (RFC 4975 §6, §6.1 and §9).

This module sits on the relay's hot path: every forwarded chunk has its
To-Path and From-Path parsed and compared.  Parsing is one anchored,
precompiled regular expression without nested quantifiers (so it is linear in
the input), behind a length check and an LRU cache, because a session sends
the same few paths over and over.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

DEFAULT_PORT = 2855
"""RFC 4975 §6.2: the port to use when an MSRP URI has none."""

MAX_URI_CHARS = 2048
"""Longest MSRP URI accepted; anything longer is an attack, not an address."""

Scheme = Literal["msrp", "msrps"]

# RFC 3986 character classes used by RFC 4975 §9.  Hosts exclude ";" (a
# sub-delim in RFC 3986) because ";" separates the transport in an MSRP URI.
_UNRESERVED = r"A-Za-z0-9\-._~"
_SUB_DELIMS_NO_SEMI = r"!$&'()*+,="
# RFC 4975 §9 token: %x21 / %x23-27 / %x2A-2B / %x2D-2E / %x30-39 / %x41-5A / %x5E-7E
_PARAM_CHARS = r"!#$%&'*+\-.0-9A-Z^_`a-z{|}~"

_URI_RE = re.compile(
    rf"""
    (?P<scheme>[Mm][Ss][Rr][Pp][Ss]?)://
    (?:(?P<user>[{_UNRESERVED}{_SUB_DELIMS_NO_SEMI};:%]*)@)?
    (?P<host>\[[0-9A-Fa-f:.]+\]|[{_UNRESERVED}{_SUB_DELIMS_NO_SEMI}%]+)
    (?::(?P<port>[0-9]{{1,5}}))?
    (?:/(?P<session_id>[{_UNRESERVED}+=/]+))?
    ;(?P<transport>[A-Za-z0-9]+)
    (?P<params>(?:;[{_PARAM_CHARS}]+(?:=[{_PARAM_CHARS}]+)?)*)
    """,
    re.VERBOSE,
)
_PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
_PCT_VALID_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_UNRESERVED_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class MSRPURIError(ValueError):
    """A malformed MSRP URI or path; ``reason`` says what was wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED_CHARS else match.group(0).upper()


def _host_key(host: str) -> str:
    """Normalise a host for comparison (RFC 4975 §6.1, RFC 3986 §6.2.2).

    IP literals compare by address, names case-insensitively after decoding
    percent-encoded unreserved characters.
    """
    if host.startswith("["):
        return "[" + ipaddress.IPv6Address(host[1:-1]).compressed + "]"
    if "%" in host:
        host = _PCT_RE.sub(_decode_unreserved, host)
    return host.lower()


@dataclass(frozen=True, eq=False, slots=True)
class MSRPURI:
    """One MSRP URI (RFC 4975 §6).

    Construct with :meth:`parse` for input from the network; the constructor
    itself does not validate.  Equality and hashing follow RFC 4975 §6.1, so
    two URIs that differ only in userinfo, host case or URI parameters are
    equal; ``str()`` gives the canonical text (scheme lower-cased, everything
    else as received).
    """

    scheme: Scheme
    user: str | None
    host: str
    port: int | None
    session_id: str | None
    transport: str = "tcp"
    params: tuple[tuple[str, str | None], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MSRPURI:
        """Parse ``text`` per the RFC 4975 §9 ABNF; raise :class:`MSRPURIError`."""
        return _parse(text)

    def format(self) -> str:
        """Canonical text form, suitable for To-Path/From-Path/Use-Path."""
        parts = [self.scheme, "://"]
        if self.user is not None:
            parts += [self.user, "@"]
        parts.append(self.host)
        if self.port is not None:
            parts += [":", str(self.port)]
        if self.session_id is not None:
            parts += ["/", self.session_id]
        parts += [";", self.transport]
        for name, value in self.params:
            parts += [";", name] if value is None else [";", name, "=", value]
        return "".join(parts)

    __str__ = format

    @property
    def effective_port(self) -> int:
        """The port to connect to: the explicit one or RFC 4975 §6.2's 2855."""
        return DEFAULT_PORT if self.port is None else self.port

    @property
    def is_secure(self) -> bool:
        """True for ``msrps``, which RFC 4975 §6 binds to TLS."""
        return self.scheme == "msrps"

    def authority_key(self) -> tuple[str, str, int, str]:
        """Key for "same next hop": scheme, host, effective port, transport.

        The scheme is included because ``msrps`` and ``msrp`` to the same
        host/port need different (TLS vs. plain) connections.
        """
        return (self.scheme, _host_key(self.host), self.effective_port, self.transport.lower())

    def _comparison_key(self) -> tuple[str, str, int | None, str | None, str]:
        # RFC 4975 §6.1: scheme and host case-insensitive, userinfo ignored, an
        # explicit port never equals an absent one, session-id case-sensitive
        # and present-vs-absent unequal, transport case-insensitive.
        return (
            self.scheme.lower(),
            _host_key(self.host),
            self.port,
            self.session_id,
            self.transport.lower(),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MSRPURI):
            return NotImplemented
        return self._comparison_key() == other._comparison_key()

    def __hash__(self) -> int:
        return hash(self._comparison_key())


@lru_cache(maxsize=4096)
def _parse(text: str) -> MSRPURI:
    if len(text) > MAX_URI_CHARS:
        raise MSRPURIError(f"MSRP URI longer than {MAX_URI_CHARS} characters")
    match = _URI_RE.fullmatch(text)
    if match is None:
        raise MSRPURIError(_diagnose(text))
    user, host, port_text, params_text = match.group("user", "host", "port", "params")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise MSRPURIError("invalid IPv6 literal in MSRP URI host") from None
    elif "%" in host and _PCT_VALID_RE.search(host):
        raise MSRPURIError("invalid percent-encoding in MSRP URI host")
    if user is not None and "%" in user and _PCT_VALID_RE.search(user):
        raise MSRPURIError("invalid percent-encoding in MSRP URI userinfo")
    port: int | None = None
    if port_text is not None:
        port = int(port_text)
        if not 0 < port <= 65535:
            raise MSRPURIError("MSRP URI port out of range 1-65535")
    params: tuple[tuple[str, str | None], ...] = ()
    if params_text:
        params = tuple(_split_param(p) for p in params_text[1:].split(";"))
    scheme: Scheme = "msrps" if len(match.group("scheme")) == 5 else "msrp"
    return MSRPURI(
        scheme=scheme,
        user=user,
        host=host,
        port=port,
        session_id=match.group("session_id"),
        transport=match.group("transport"),
        params=params,
    )


def _split_param(param: str) -> tuple[str, str | None]:
    name, sep, value = param.partition("=")
    return (name, value if sep else None)


def _diagnose(text: str) -> str:
    """Give a specific reason for a URI the regular expression rejected."""
    lowered = text[:8].lower()
    if not (lowered.startswith("msrp://") or lowered.startswith("msrps://")):
        return "MSRP URI must start with msrp:// or msrps://"
    rest = text[text.index("://") + 3 :]
    if ";" not in rest:
        return "MSRP URI lacks the mandatory ;transport"
    authority = rest.split("/", 1)[0].split(";", 1)[0]
    if not authority or authority.endswith("@"):
        return "MSRP URI has an empty host"
    return "malformed MSRP URI"


def parse_path(header_value: str) -> tuple[MSRPURI, ...]:
    """Parse a To-Path, From-Path or Use-Path value (RFC 4975 §9, RFC 4976 §7.1).

    The value is one or more MSRP URIs separated by spaces.
    """
    return _parse_path(header_value)


@lru_cache(maxsize=1024)
def _parse_path(header_value: str) -> tuple[MSRPURI, ...]:
    items = header_value.split()
    if not items:
        raise MSRPURIError("empty MSRP path")
    return tuple(_parse(item) for item in items)


def format_path(uris: tuple[MSRPURI, ...] | list[MSRPURI]) -> str:
    """Format URIs as a path header value: canonical forms joined by one SP."""
    if not uris:
        raise MSRPURIError("empty MSRP path")
    return " ".join(uri.format() for uri in uris)
