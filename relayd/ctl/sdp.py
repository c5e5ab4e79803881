"""The SDP of an MSRP chat session: offer and answer (RFC 4975 §8, RFC 4976 §5.1).

One ``m=message`` line with ``TCP/TLS/MSRP`` (``TCP/MSRP`` for ``msrp:``), the
accepted types, and ``a=path``: the route a peer puts in To-Path to reach us,
the relays' Use-Path reversed first, our own session URI last. A file transfer
session adds its direction and the RFC 5547 §6 ``a=file-selector`` and
``a=file-transfer-id`` of the one file it carries. Pure: no I/O.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from relayd.msrp.uri import MSRPURI

MAX_SDP_BYTES = 8192
"""A chat SDP is a few hundred bytes; anything longer is refused unread."""

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
"""RFC 4566 §6 direction attributes; a media line without one is sendrecv."""

SHA1_BYTES = 20

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")
_SELECTOR = re.compile(
    r'name:"(?P<name>[^"]*)"'
    r"|type:(?P<type>[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(?:;[^\s]*)?)"
    r"|size:(?P<size>[0-9]{1,18})"
    r"|hash:(?P<algorithm>[A-Za-z0-9-]+):(?P<hash>[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*)"
)
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class FileSelector:
    """The one file a session carries (RFC 5547 §6): its name (no path), media type,
    size in bytes, SHA-1 when the sender gave it, and the transfer's id (§8.1)."""

    name: str
    content_type: str
    size: int
    sha1: bytes | None
    transfer_id: str

    def attributes(self) -> list[str]:
        """``a=file-selector`` and ``a=file-transfer-id``; the name percent-encodes
        what it may not hold (``"``, ``%``, CR, LF, NUL), the hash is upper-case hex
        pairs joined by colons."""
        selector = f'name:"{_encode_name(self.name)}" type:{self.content_type} size:{self.size}'
        if self.sha1 is not None:
            selector += " hash:sha-1:" + ":".join(f"{b:02X}" for b in self.sha1)
        return [f"a=file-selector:{selector}", f"a=file-transfer-id:{self.transfer_id}"]


def new_transfer_id() -> str:
    """Unique across transfers, a token (RFC 5547 §6)."""
    return secrets.token_urlsafe(24)


def _encode_name(name: str) -> str:
    return "".join(f"%{ord(c):02X}" if c in '"%\r\n\0' else c for c in name)


def parse_file_selector(value: str, transfer_id: str) -> FileSelector:
    """The selectors of one ``a=file-selector`` value; we need a name and a size to
    save a file, and take a SHA-1 (the only hash RFC 5547 §6 defines) to check it."""
    found: dict[str, str] = {}
    position = 0
    text = value.strip()
    while position < len(text):
        match = _SELECTOR.match(text, position)
        if match is None:
            raise SDPError(f"unreadable file-selector at {text[position : position + 20]!r}")
        found.update({k: v for k, v in match.groupdict().items() if v is not None})
        position = match.end()
        while position < len(text) and text[position] == " ":
            position += 1
    if "name" not in found or "size" not in found:
        raise SDPError("the file-selector names no file name and size (RFC 5547 §6)")
    raw = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), found["name"].encode("utf-8"))
    name = raw.decode("utf-8", "replace")
    sha1 = None
    if "hash" in found:
        if found["algorithm"].lower() != "sha-1":
            raise SDPError(f"file-selector hash {found['algorithm']!r}: only sha-1 is defined")
        sha1 = bytes.fromhex(found["hash"].replace(":", ""))
        if len(sha1) != SHA1_BYTES:
            raise SDPError("file-selector sha-1 is not 20 bytes")
    if not _TOKEN.fullmatch(transfer_id):
        raise SDPError("the file-selector has no file-transfer-id token (RFC 5547 §8.1)")
    kind = found.get("type", "application/octet-stream")
    return FileSelector(name, kind, int(found["size"]), sha1, transfer_id)


class SDPError(ValueError):
    """The SDP offers no MSRP session we can use."""


@dataclass(frozen=True)
class MSRPMedia:
    path: list[str]
    accept_types: list[str]
    direction: str = "sendrecv"
    file: FileSelector | None = None


def build(
    path: list[str],
    accept_types: tuple[str, ...] = ("text/plain",),
    direction: str = "sendrecv",
    file: FileSelector | None = None,
) -> bytes:
    """An offer or answer for ``path`` (RFC 4975 §8.1: the port and c= are the last
    hop's, here our own URI's; the media are reached through the path, not them);
    a file transfer's ``direction`` and ``file`` (RFC 5547 §8: sendonly to offer a
    file, recvonly with the same selector to take it)."""
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
    if direction != "sendrecv":
        lines.append(f"a={direction}")
    if file is not None:
        lines.extend(file.attributes())
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")  # a file name may be any text


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
    direction = "sendrecv"
    selector: str | None = None
    transfer_id = ""
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
        elif in_msrp and line[2:] in DIRECTIONS:
            direction = line[2:]
        elif in_msrp and line.startswith("a=file-selector:"):
            selector = line[len("a=file-selector:") :]
        elif in_msrp and line.startswith("a=file-transfer-id:"):
            transfer_id = line[len("a=file-transfer-id:") :].strip()
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
    file = None if selector is None else parse_file_selector(selector, transfer_id)
    return MSRPMedia(path, accept, direction, file)


def accepts(media: MSRPMedia, content_type: str) -> bool:
    """Does the peer take ``content_type`` (``*`` and ``type/*`` wildcards, §8.6)?"""
    major = content_type.split("/", 1)[0]
    return any(t in ("*", content_type, f"{major}/*") for t in media.accept_types)
