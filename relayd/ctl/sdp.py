"""The SDP of an MSRP chat session: offer and answer (RFC 4975 §8, RFC 4976 §5.1).

One ``m=message`` line with ``TCP/TLS/MSRP`` (``TCP/MSRP`` for ``msrp:``), the
accepted types, and ``a=path``: the route a peer puts in To-Path to reach us,
the relays' Use-Path reversed first, our own session URI last.  Pure: no I/O.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from relayd.msrp.uri import MSRPURI

MAX_SDP_BYTES = 8192
"""A chat SDP is a few hundred bytes; anything longer is refused unread."""


class SDPError(ValueError):
    """The SDP offers no MSRP session we can use."""


@dataclass(frozen=True)
class MSRPMedia:
    path: list[str]
    accept_types: list[str]


def build(path: list[str], accept_types: tuple[str, ...] = ("text/plain",)) -> bytes:
    """An offer or answer for ``path`` (RFC 4975 §8.1: the port and c= are the last
    hop's, here our own URI's; the media are reached through the path, not them)."""
    last = MSRPURI.parse(path[-1])
    host = last.host.strip("[]")
    family = "IP6" if ":" in host else "IP4"
    proto = "TCP/TLS/MSRP" if last.scheme == "msrps" else "TCP/MSRP"
    session = secrets.randbelow(1 << 31)
    lines = [
        "v=0",
        f"o=- {session} 1 IN {family} {host}",
        "s=-",
        f"c=IN {family} {host}",
        "t=0 0",
        f"m=message {last.effective_port} {proto} *",
        f"a=accept-types:{' '.join(accept_types)}",
        f"a=path:{' '.join(path)}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def parse(body: bytes) -> MSRPMedia:
    """The first MSRP ``m=message`` stream's path and accept-types (RFC 4975 §8.1);
    :class:`SDPError` when there is none or its path is not MSRP URIs."""
    if len(body) > MAX_SDP_BYTES:
        raise SDPError(f"SDP longer than {MAX_SDP_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SDPError("SDP is not UTF-8") from None
    in_msrp = False
    path: list[str] | None = None
    accept: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            if in_msrp:
                break
            fields = line[2:].split()
            in_msrp = len(fields) >= 3 and fields[0] == "message" and fields[2].endswith("MSRP")
        elif in_msrp and line.startswith("a=path:"):
            path = line[len("a=path:") :].split()
        elif in_msrp and line.startswith("a=accept-types:"):
            accept = line[len("a=accept-types:") :].split()
    if not in_msrp:
        raise SDPError("no MSRP media line (m=message … TCP/TLS/MSRP) in the SDP")
    if not path:
        raise SDPError("the MSRP media line has no a=path")
    for uri in path:
        try:
            MSRPURI.parse(uri)
        except ValueError as e:
            raise SDPError(f"bad URI in a=path: {uri!r} ({e})") from None
    if not accept:
        raise SDPError("the MSRP media line has no a=accept-types (RFC 4975 §8.1)")
    return MSRPMedia(path, accept)


def accepts(media: MSRPMedia, content_type: str) -> bool:
    """Does the peer take ``content_type`` (``*`` and ``type/*`` wildcards, §8.6)?"""
    major = content_type.split("/", 1)[0]
    return any(t in ("*", content_type, f"{major}/*") for t in media.accept_types)
