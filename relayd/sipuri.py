"""SIP, SIPS and tel URIs (RFC 3261 §19.1, RFC 3966) and name-addr values (§20.10).

Components are stored *decoded* (``%61lice`` becomes ``alice``) so that callers compare
plain strings; :meth:`SIPURI.format` re-escapes only what the grammar requires (§19.1.2).
Equality and hashing follow the comparison rules of §19.1.4, not string identity.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Self
from urllib.parse import quote, unquote

from relayd.bounded import parse_once

__all__ = [
    "SIPURI",
    "NameAddr",
    "Params",
    "SIPURIError",
    "UnsupportedURIScheme",
    "format_host",
    "format_params",
    "param_value",
    "parse_params",
]

Params = tuple[tuple[str, str | None], ...]
"""Ordered ``(name, value)`` pairs; names are lower-cased, ``None`` marks a valueless one."""


class SIPURIError(ValueError):
    """A SIP/SIPS/tel URI or name-addr value that does not follow the grammar."""


class UnsupportedURIScheme(SIPURIError):
    """A well-formed absoluteURI whose scheme we do not handle (a 416, RFC 3261 §8.2.2.1)."""


# RFC 3261 §25.1 character classes, written out once; "%XX" is handled separately.
_ALNUM = "A-Za-z0-9"
_MARK = r"\-_.!~*'()"
_ESC = "%[0-9A-Fa-f]{2}"
_USER_RE = re.compile(rf"(?:[{_ALNUM}{_MARK}&=+$,;?/]|{_ESC})+")
_PASSWORD_RE = re.compile(rf"(?:[{_ALNUM}{_MARK}&=+$,]|{_ESC})*")
_PARAM_RE = re.compile(rf"(?:[{_ALNUM}{_MARK}\[\]/:&+$]|{_ESC})+")
_HNV_RE = re.compile(rf"(?:[{_ALNUM}{_MARK}\[\]/?:+$]|{_ESC})*")
# Deliberately loose (one character class, no nested quantifiers: linear, no backtracking);
# it accepts IPv4 literals too. DNS decides whether the name exists.
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-.]*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_TEL_RE = re.compile(rf"\+?(?:[0-9A-Fa-f*#\-.()]|{_ESC})+")
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")

# Characters left unescaped by format(); everything else becomes %XX (UTF-8).
_SAFE_USER = "-_.!~*'()&=+$,;?/"
_SAFE_PASSWORD = "-_.!~*'()&=+$,"  # noqa: S105 - a character set, not a secret
_SAFE_PARAM = "-_.!~*'()[]/:&+$"
_SAFE_HNV = "-_.!~*'()[]/?:+$"

# §19.1.4: these uri-parameters never match when present in only one URI. "transport" is
# not in the rule text but the section's own examples treat it this way ("can resolve to
# different transports"), and so do the common stacks.
_MUST_MATCH_PARAMS = frozenset({"user", "ttl", "method", "maddr", "transport"})
_TEL_SEPARATORS = str.maketrans("", "", "-.()")


def _decode(text: str) -> str:
    if "%" not in text:
        return text
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError as e:
        raise SIPURIError(f"escaped bytes are not UTF-8: {text!r}") from e


def _encode(text: str, safe: str) -> str:
    return quote(text, safe=safe)


_PARSED: dict[str, object] = {}
_PARSED_SIZE = 4096


def _parse_host(text: str) -> tuple[str, int | None]:
    """Split ``host[:port]``; IPv6 references keep no brackets (they come back in format)."""
    port_text: str | None = None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise SIPURIError(f"unterminated IPv6 reference: {text!r}")
        host = text[1:close]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as e:
            raise SIPURIError(f"bad IPv6 reference: {text!r}") from e
        rest = text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise SIPURIError(f"junk after IPv6 reference: {text!r}")
            port_text = rest[1:]
    else:
        host, sep, port_part = text.partition(":")
        if sep:
            port_text = port_part
        if not _HOSTNAME_RE.fullmatch(host):
            raise SIPURIError(f"bad host: {text!r}")
    port: int | None = None
    if port_text is not None:
        if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
            raise SIPURIError(f"bad port: {text!r}")
        port = int(port_text)
    return host, port


def _host_key(host: str) -> str:
    if ":" in host:
        return ipaddress.IPv6Address(host).compressed
    return host.lower()


def format_host(host: str, port: int | None = None) -> str:
    """Render host and optional port, bracketing IPv6 literals (RFC 3261 §25.1 IPv6reference)."""
    text = f"[{host}]" if ":" in host else host
    return text if port is None else f"{text}:{port}"


def _parse_uri_params(parts: list[str]) -> Params:
    params: list[tuple[str, str | None]] = []
    for part in parts:
        name, sep, value = part.partition("=")
        if not _PARAM_RE.fullmatch(name) or (sep and not _PARAM_RE.fullmatch(value)):
            raise SIPURIError(f"bad uri-parameter: {part!r}")
        params.append((_decode(name).lower(), _decode(value) if sep else None))
    return tuple(params)


@dataclass(frozen=True, eq=False, slots=True)
class SIPURI:
    """A parsed ``sip:``, ``sips:`` or ``tel:`` URI (RFC 3261 §19.1.1, RFC 3966 §3).

    For ``tel`` the subscriber number lives in ``user`` and ``host`` is empty. Parameter
    names are lower-cased; values and ``headers`` keep their case.
    """

    scheme: str
    host: str
    user: str | None = None
    password: str | None = None
    port: int | None = None
    params: Params = ()
    headers: tuple[tuple[str, str], ...] = ()
    _key: tuple[object, ...] = field(init=False, repr=False, compare=False)
    # Wire forms, computed on first use: a URI is formatted for every message it heads.
    _text: str | None = field(init=False, repr=False, compare=False, default=None)
    _aor: str | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.scheme == "tel":
            number = (self.user or "").translate(_TEL_SEPARATORS).lower()
            key: tuple[object, ...] = ("tel", number, frozenset(self._lower_params()))
        else:
            must = tuple(sorted((n, v) for n, v in self._lower_params() if n in _MUST_MATCH_PARAMS))
            key = (
                self.scheme,
                self.user,
                self.password,
                _host_key(self.host),
                self.port,
                must,
                frozenset((n.lower(), v) for n, v in self.headers),
            )
        object.__setattr__(self, "_key", key)

    def _lower_params(self) -> list[tuple[str, str | None]]:
        return [(n, v.lower() if v is not None else None) for n, v in self.params]

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse a URI in its bare form (no angle brackets, no surrounding whitespace).

        URIs are immutable and a relay meets the same few again and again (the
        list's Request-URI, senders' and members' addresses), so recent results
        are remembered by their text.
        """
        return parse_once(_PARSED, _PARSED_SIZE, text, cls, cls._parse)

    @classmethod
    def _parse(cls, text: str) -> Self:
        scheme, sep, rest = text.partition(":")
        scheme = scheme.lower()
        if not sep or not rest:
            raise SIPURIError(f"not a URI: {text!r}")
        if scheme == "tel":
            return cls._parse_tel(rest)
        if scheme not in ("sip", "sips"):
            raise UnsupportedURIScheme(f"unsupported URI scheme: {scheme!r}")
        user: str | None = None
        password: str | None = None
        at = rest.find("@")
        if at >= 0:
            userinfo, rest = rest[:at], rest[at + 1 :]
            user_text, colon, password_text = userinfo.partition(":")
            if not _USER_RE.fullmatch(user_text):
                raise SIPURIError(f"bad user part: {text!r}")
            user = _decode(user_text)
            if colon:
                if not _PASSWORD_RE.fullmatch(password_text):
                    raise SIPURIError(f"bad password: {text!r}")
                password = _decode(password_text)
        rest, qmark, header_text = rest.partition("?")
        hostport, *param_parts = rest.split(";")
        host, port = _parse_host(hostport)
        headers: list[tuple[str, str]] = []
        if qmark:
            for item in header_text.split("&"):
                hname, eq, hvalue = item.partition("=")
                if not eq or not hname or not _HNV_RE.fullmatch(hname + hvalue):
                    raise SIPURIError(f"bad URI header: {item!r}")
                headers.append((_decode(hname), _decode(hvalue)))
        return cls(
            scheme=scheme,
            host=host,
            user=user,
            password=password,
            port=port,
            params=_parse_uri_params(param_parts),
            headers=tuple(headers),
        )

    @classmethod
    def _parse_tel(cls, rest: str) -> Self:
        number, *param_parts = rest.split(";")
        if not _TEL_RE.fullmatch(number):
            raise SIPURIError(f"bad telephone-subscriber: {rest!r}")
        return cls(
            scheme="tel", host="", user=_decode(number), params=_parse_uri_params(param_parts)
        )

    def format(self) -> str:
        """Serialise with minimal escaping (§19.1.2); parse(format(u)) == u."""
        text = self._text
        if text is None:
            text = self._format()
            object.__setattr__(self, "_text", text)
        return text

    def _format(self) -> str:
        out = [self.scheme, ":"]
        if self.scheme == "tel":
            out.append(_encode(self.user or "", "+*#-.()"))
        else:
            if self.user is not None:
                out.append(_encode(self.user, _SAFE_USER))
                if self.password is not None:
                    out += [":", _encode(self.password, _SAFE_PASSWORD)]
                out.append("@")
            out.append(format_host(self.host, self.port))
        for name, value in self.params:
            out += [";", _encode(name, _SAFE_PARAM)]
            if value is not None:
                out += ["=", _encode(value, _SAFE_PARAM)]
        if self.headers:
            out.append("?")
            out.append(
                "&".join(
                    f"{_encode(n, _SAFE_HNV)}={_encode(v, _SAFE_HNV)}" for n, v in self.headers
                )
            )
        return "".join(out)

    __str__ = format

    def param(self, name: str) -> str | None:
        """Value of a uri-parameter: ``""`` when valueless, ``None`` when absent."""
        name = name.lower()
        for n, v in self.params:
            if n == name:
                return "" if v is None else v
        return None

    def has_param(self, name: str) -> bool:
        return self.param(name) is not None

    def with_param(self, name: str, value: str | None = None) -> SIPURI:
        """Copy with ``name`` set (replacing any existing occurrence)."""
        name = name.lower()
        kept = tuple(p for p in self.params if p[0] != name)
        return replace(self, params=(*kept, (name, value)))

    def without_param(self, name: str) -> SIPURI:
        name = name.lower()
        return replace(self, params=tuple(p for p in self.params if p[0] != name))

    @property
    def transport(self) -> str | None:
        """Lower-cased ``transport`` parameter, used for next-hop selection (RFC 3263)."""
        value = self.param("transport")
        return value.lower() if value else None

    @property
    def aor(self) -> str:
        """``scheme:user@host`` without port, parameters or headers (an address of record)."""
        aor = self._aor
        if aor is None:
            if self.scheme == "tel":
                aor = f"tel:{_encode(self.user or '', '+*#-.()')}"
            else:
                user = "" if self.user is None else _encode(self.user, _SAFE_USER) + "@"
                aor = f"{self.scheme}:{user}{format_host(self.host.lower())}"
            object.__setattr__(self, "_aor", aor)
        return aor

    def __eq__(self, other: object) -> bool:
        """RFC 3261 §19.1.4 (or RFC 3966 §4 for tel): case and escaping do not matter
        except in userinfo; parameters present in both must agree."""
        if not isinstance(other, SIPURI):
            return NotImplemented
        if self._key != other._key:
            return False
        if self.scheme == "tel":
            return True
        mine = dict(self._lower_params())
        for name, value in other._lower_params():
            if name in mine and mine[name] != value:
                return False
        return True

    def __hash__(self) -> int:
        return hash(self._key)


# ---------------------------------------------------------------------------------------
# Header parameters (generic-param, §25.1) shared by name-addr, Via and friends.


def split_outside_quotes(text: str, sep: str, *, angles: bool = False) -> tuple[list[str], bool]:
    """Split on ``sep`` outside quoted-strings (with backslash escapes) and, with
    ``angles``, outside ``<...>``. Also says whether a quoted-string was left open."""
    parts: list[str] = []
    start = 0
    in_quotes = False
    in_angle = False
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if in_quotes:
            if c == "\\":
                i += 1
            elif c == '"':
                in_quotes = False
        elif c == '"':
            in_quotes = True
        elif angles and c == "<":
            in_angle = True
        elif angles and c == ">":
            in_angle = False
        elif c == sep and not in_angle:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts, in_quotes


def _split_unquoted(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside quoted-strings (with backslash escapes)."""
    if '"' not in text:
        return text.split(sep)
    parts, unterminated = split_outside_quotes(text, sep)
    if unterminated:
        raise SIPURIError(f"unterminated quoted-string: {text!r}")
    return parts


def parse_params(text: str) -> Params:
    """Parse ``;name[=value]...`` (leading ``;`` optional, LWS around ``;``/``=`` allowed).

    Values are kept verbatim (a quoted-string keeps its quotes) so re-serialising is exact.
    """
    text = text.strip()
    if not text:
        return ()
    if text.startswith(";"):
        text = text[1:]
    params: list[tuple[str, str | None]] = []
    for part in _split_unquoted(text, ";"):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not _TOKEN_RE.fullmatch(name):
            raise SIPURIError(f"bad parameter name: {part!r}")
        if sep:
            value = value.strip()
            if not value:
                raise SIPURIError(f"empty parameter value: {part!r}")
            if value.startswith('"'):
                if len(value) < 2 or not value.endswith('"'):
                    raise SIPURIError(f"bad quoted parameter value: {part!r}")
            elif any(c in value for c in ' \t"<>,'):
                raise SIPURIError(f"bad parameter value: {part!r}")
            params.append((name.lower(), value))
        else:
            params.append((name.lower(), None))
    return tuple(params)


def format_params(params: Params) -> str:
    return "".join(f";{n}" if v is None else f";{n}={v}" for n, v in params)


def param_value(params: Params, name: str) -> str | None:
    """``""`` for a valueless parameter, ``None`` when absent."""
    for n, v in params:
        if n == name:
            return "" if v is None else v
    return None


def _unquote_string(text: str) -> str:
    """Body of a quoted-string (§25.1 quoted-pair) given the text between the quotes."""
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            i += 1
            c = text[i]
        out.append(c)
        i += 1
    return "".join(out)


def _quote_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class NameAddr:
    """A From/To/Contact/Route-style value: ``["Name"] <uri>;params`` or ``uri;params``.

    RFC 3261 §20.10: in the addr-spec form (no angle brackets) everything after the first
    ``;`` is a *header* parameter, never a URI parameter.
    """

    uri: SIPURI
    display_name: str | None = None
    params: Params = ()

    @classmethod
    def parse(cls, text: str) -> Self:
        text = text.strip()
        display: str | None = None
        if text.startswith('"'):
            i = 1
            n = len(text)
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                raise SIPURIError(f"unterminated display name: {text!r}")
            display = _unquote_string(text[1:i])
            rest = text[i + 1 :].lstrip()
            if not rest.startswith("<"):
                raise SIPURIError(f"quoted display name without <uri>: {text!r}")
        else:
            lt = text.find("<")
            if lt < 0:
                uri_text, _, param_text = text.partition(";")
                return cls(SIPURI.parse(uri_text.strip()), None, parse_params(param_text))
            words = text[:lt].split()
            if not all(_TOKEN_RE.fullmatch(w) for w in words):
                raise SIPURIError(f"bad display name: {text!r}")
            display = " ".join(words) or None
            rest = text[lt:]
        gt = rest.find(">")
        if gt < 0:
            raise SIPURIError(f"missing '>': {text!r}")
        uri = SIPURI.parse(rest[1:gt].strip())
        return cls(uri, display, parse_params(rest[gt + 1 :]))

    def format(self) -> str:
        if self.display_name is None:
            head = ""
        elif self.display_name and all(
            _TOKEN_RE.fullmatch(w) for w in self.display_name.split(" ")
        ):
            head = self.display_name + " "
        else:
            head = _quote_string(self.display_name) + " "
        return f"{head}<{self.uri.format()}>{format_params(self.params)}"

    __str__ = format

    def param(self, name: str) -> str | None:
        return param_value(self.params, name.lower())

    @property
    def tag(self) -> str | None:
        return self.param("tag") or None

    def with_param(self, name: str, value: str | None = None) -> NameAddr:
        name = name.lower()
        kept = tuple(p for p in self.params if p[0] != name)
        return NameAddr(self.uri, self.display_name, (*kept, (name, value)))
