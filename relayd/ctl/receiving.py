"""Write incoming MSRP messages to disk chunk by chunk, at their Byte-Range offsets.

Chunks of several messages may interleave on one connection (RFC 4975 §7.1),
and a relay may re-chunk them, so each chunk is written where its Byte-Range
says (a seek), never buffered: a message of any size costs one open file.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from relayd.ctl.settings import CtlError
from relayd.msrp.message import ByteRange, MSRPRequest

HASH_BLOCK_BYTES = 1 << 20
"""Read size when hashing a received file."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


def file_name_for(message_id: str) -> str:
    """A file name from a peer-chosen Message-ID that cannot leave the directory."""
    name = _UNSAFE.sub("_", message_id)[:200]
    if not name or name.startswith("."):
        name = "message-" + name
    return name


def digests_of(source: BinaryIO, *algorithms: str) -> list[bytes]:
    """The ``hashlib`` digests of what is left in ``source``, read once."""
    hashes = [hashlib.new(name) for name in algorithms]
    while block := source.read(HASH_BLOCK_BYTES):
        for digest in hashes:
            digest.update(block)
    return [digest.digest() for digest in hashes]


def sha256_of(path: Path) -> str:
    """Hash from disk: chunks may have arrived out of order, so no running hash."""
    with open(path, "rb") as handle:
        return digests_of(handle, "sha256")[0].hex()


@dataclass
class IncomingMessage:
    """One message being written; a ``MessageSink`` for its chunks."""

    message_id: str
    path: Path
    handle: BinaryIO
    on_end: Callable[[IncomingMessage], None]
    on_error: Callable[[CtlError], None]
    total_bytes: int | None = None
    aborted: bool = False
    complete: bool = False
    #: Byte spans written so far, merged, 0-based and end-exclusive: a relay may
    #: resend a range (RFC 4975 §7.1.1), so counting bytes would overshoot.
    covered: list[tuple[int, int]] = field(default_factory=list)
    _chunk_start: int = field(default=0, repr=False)
    _position: int = field(default=0, repr=False)

    @property
    def received_bytes(self) -> int:
        return sum(end - start for start, end in self.covered)

    def chunk_started(self, request: MSRPRequest, byte_range: ByteRange) -> None:
        if byte_range.total is not None:
            self.total_bytes = byte_range.total
        self._chunk_start = self._position = byte_range.start - 1
        self._io(lambda: self.handle.seek(self._position))

    def chunk_data(self, data: bytes) -> None:
        self._io(lambda: self.handle.write(data))
        self._position += len(data)

    def _io(self, operation: Callable[[], object]) -> bool:
        """Run a file operation; a full disk must not escape into the protocol.

        False when it failed (and ``on_error`` has been told) or the file was
        already given up on.
        """
        if self.handle.closed:
            return False
        try:
            operation()
        except OSError as e:
            try:
                self.handle.close()
            except OSError:
                pass  # the first error is the one to report
            self.on_error(CtlError(f"cannot write {self.path}: {e.strerror or e}"))
            return False
        return True

    def _cover(self, start: int, end: int) -> None:
        spans = sorted([*self.covered, (start, end)])
        merged: list[tuple[int, int]] = []
        for low, high in spans:
            if merged and low <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            elif high > low:
                merged.append((low, high))
        self.covered = merged

    def chunk_ended(self, flag: bytes) -> None:
        if self.handle.closed:  # a write failed; on_error has reported it
            return
        self._cover(self._chunk_start, self._position)
        if flag == b"#":
            self.aborted = True
        elif flag == b"$" and self.total_bytes is None:
            self.total_bytes = self.covered[-1][1] if self.covered else 0
        if self.aborted or (self.total_bytes is not None and self._has_all(self.total_bytes)):
            # Buffered data reaches the disk here: a full disk shows up at close.
            if not self._io(self.handle.close):
                return
            self.complete = not self.aborted
            self.on_end(self)

    def _has_all(self, total: int) -> bool:
        return total == 0 or (bool(self.covered) and self.covered[0] == (0, total))


def check_output(output: Path | None, count: int) -> None:
    """Refuse an output we could not write before connecting, not when data arrives.

    A directory (or the current one, without ``--output``) must be writable; a
    file must be writable if it exists, else its directory must be.
    """
    if output is None or output.is_dir():
        folder = output or Path()
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CtlError(f"cannot write to directory {folder.absolute()}: permission denied")
        return
    if count > 1:
        raise CtlError("--output must be an existing directory when --count is above 1")
    if output.exists():
        if not os.access(output, os.W_OK):
            raise CtlError(f"cannot write {output}: permission denied")
        return
    folder = output.parent
    if not folder.is_dir():
        raise CtlError(f"cannot write {output}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CtlError(f"cannot write {output}: directory {folder} is not writable")


class MessageWriter:
    """Routes SENDs to per-message files; the client answers and REPORTs for us."""

    def __init__(
        self,
        output: Path | None,
        on_end: Callable[[IncomingMessage], None],
        on_error: Callable[[CtlError], None],
    ) -> None:
        #: None: the current directory; an existing directory: one file per message.
        self.output = output
        self.on_end = on_end
        self.on_error = on_error
        self.messages: dict[str, IncomingMessage] = {}
        self.closed = False

    def _path_for(self, message_id: str) -> Path | None:
        """Where a new message goes; None when a single output file is taken."""
        if self.output is not None and not self.output.is_dir():
            return None if self.messages else self.output
        folder = self.output or Path()
        name = file_name_for(message_id)
        path = folder / name
        used = {message.path for message in self.messages.values()}
        suffix = 1
        while path in used:  # two Message-IDs that differ only in unsafe characters
            suffix += 1
            path = folder / f"{name}-{suffix}"
        return path

    def sink_for(self, request: MSRPRequest) -> IncomingMessage | None:
        if self.closed:
            return None
        message_id = request.headers.get("Message-ID") or ""
        message = self.messages.get(message_id)
        if message is not None:
            return None if message.complete or message.aborted else message
        path = self._path_for(message_id)
        if path is None:
            return None
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            self.on_error(CtlError(f"cannot write {path}: {e.strerror}"))
            return None
        message = IncomingMessage(
            message_id, path, os.fdopen(descriptor, "r+b"), self.on_end, self.on_error
        )
        self.messages[message_id] = message
        return message

    def close(self) -> None:
        """Stop accepting messages and close files of unfinished ones."""
        self.closed = True
        for message in self.messages.values():
            if not message.handle.closed:
                try:
                    message.handle.close()
                except OSError:
                    pass  # an unfinished message: the failure already reported wins
