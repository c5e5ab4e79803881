"""``/file`` in ``relayctl chat``: one file per MSRP session, set up by its own INVITE.

RFC 5547 §8: the sender opens a new MSRP session (a new AUTH, so a new session URI),
offers it ``a=sendonly`` with the file's ``a=file-selector`` (name, type, size, SHA-1)
and ``a=file-transfer-id``, and sends the file as one message with Success-Report
once the answer (``a=recvonly``, the same selector) arrives; the REPORT ends it with a
BYE. The receiver saves the file under a name of its own choosing in its save
directory (never over an existing file, never outside the directory), checks the size
and hash it was promised, and says so in one line.
"""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from twisted.internet import defer
from twisted.python.failure import Failure

from relayd.ctl import network, sdp
from relayd.ctl.progress import format_bytes
from relayd.ctl.receiving import IncomingMessage, digests_of, sha256_of
from relayd.ctl.settings import CtlError
from relayd.ctl.sipua import CallRefused, Dialog, SIPUserAgent
from relayd.msrp.message import ByteRange, MSRPRequest
from relayd.sip.message import SIPRequest

COMMAND = "/file"

MAX_NAME_BYTES = 255
"""Longest file name most file systems take (NAME_MAX)."""

MAX_RENAMES = 1000
"""``name-1.ext`` … ``name-1000.ext``: a directory that full is refused, not searched on."""

REPORT_TIMEOUT_SECONDS = 60.0
"""Longest wait for the receiver's REPORT after the last chunk."""

BYE_WAIT_SECONDS = 32.0
"""After the file is in, how long the receiver waits for the sender's BYE (Timer F)."""


def file_command(line: str) -> str | None:
    """The PATH of a ``/file PATH`` line (the rest of the line, spaces kept), else None."""
    if line != COMMAND and not line.startswith(COMMAND + " "):
        return None
    path = line[len(COMMAND) :].strip()
    if not path:
        raise CtlError("/file: give the path of the file to send")
    return path


def save_name(name: str) -> str:
    """The offered name as a file name in the save directory, or a clear refusal: no
    directory part (``/``, ``\\``), no ``.``/``..``, no control characters."""
    if not name or name in (".", ".."):
        raise CtlError(f"refused file name {name!r}: not a file name")
    if "/" in name or "\\" in name:
        raise CtlError(f"refused file name {name!r}: it names a directory")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise CtlError(f"refused file name {name!r}: control characters")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise CtlError(f"refused file name {name[:40]!r}…: longer than {MAX_NAME_BYTES} bytes")
    return name


def create_unused(folder: Path, name: str) -> tuple[Path, BinaryIO]:
    """A new file ``name`` in ``folder``, or ``stem-N.suffix`` when that exists: an
    existing file is never opened (O_EXCL, so no race with another writer either)."""
    base = Path(name)
    for attempt in range(MAX_RENAMES + 1):
        candidate = name if attempt == 0 else f"{base.stem}-{attempt}{base.suffix}"
        path = folder / candidate
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        except OSError as e:
            raise CtlError(f"cannot save {name} in {folder}: {e.strerror}") from None
        return path, os.fdopen(descriptor, "r+b")
    raise CtlError(f"cannot save {name} in {folder}: {MAX_RENAMES} files of that name exist")


# -- sending ---------------------------------------------------------------------------------


async def send_file(
    reactor: Any,
    ua: SIPUserAgent,
    access: network.RelayAccess,
    peer: str,
    file_path: str,
    out: TextIO,
    err: TextIO,
    interactive: bool | None = None,
) -> None:
    """Offer ``file_path`` to ``peer`` in a session of its own and send it, with the
    progress bar on ``err``; one line on ``out`` once the receiver has it all."""
    raw, size = network.open_for_sending(file_path)
    reader = network.HashingReader(raw)
    try:
        (sha1,) = digests_of(raw, "sha1")
        raw.seek(0)
        name = os.path.basename(file_path)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        selector = sdp.FileSelector(name, content_type, size, sha1, sdp.new_transfer_id())
        session = await network.open_session(reactor, access)
        try:
            path = network.advertised_path(session.use_path, session.protocol.local_uri)
            offer = sdp.build(path, (content_type,), "sendonly", selector)
            try:
                dialog = await ua.invite(peer, offer)
            except CallRefused as refused:
                raise CtlError(f"{peer} did not take {name}: {refused}") from None
            try:
                await _transfer(reactor, session, dialog, selector, reader, err, interactive)
            finally:
                await ua.bye(dialog)
        finally:
            await network.close(reactor, session.protocol)
    finally:
        reader.close()
    out.write(f"sent {name}: {size} bytes, SHA-256 {reader.digest.hexdigest()}\n")
    out.flush()


async def _transfer(
    reactor: Any,
    session: network.Session,
    dialog: Dialog,
    selector: sdp.FileSelector,
    reader: BinaryIO,
    err: TextIO,
    interactive: bool | None,
) -> None:
    try:
        media = sdp.parse(dialog.body)
    except sdp.SDPError as e:
        raise CtlError(f"{selector.name}: unusable answer: {e}") from None
    if media.direction not in ("recvonly", "sendrecv"):
        raise CtlError(f"{selector.name}: the answer does not receive ({media.direction})")
    to_path = " ".join([*session.use_path, *media.path])
    await network.send_reported(
        reactor,
        session.protocol,
        to_path,
        reader,
        selector.size,
        selector.content_type,
        REPORT_TIMEOUT_SECONDS,
        err,
        interactive,
    )


# -- receiving -------------------------------------------------------------------------------


def is_file_offer(media: sdp.MSRPMedia) -> bool:
    """A session offering us one file (RFC 5547 §8: sendonly with a file-selector)."""
    return media.file is not None and media.direction == "sendonly"


class _FileSink:
    """The first message of the session, written where its Byte-Ranges say, never
    past the size the file-selector promised; anything else is dropped."""

    def __init__(self, size: int, path: Path, handle: BinaryIO) -> None:
        self.size = size
        self.message = IncomingMessage("", path, handle, self.ended, self.fail)
        self.message_id: str | None = None
        self.done: defer.Deferred[IncomingMessage] = defer.Deferred()
        self._end = 0

    def sink_for(self, request: MSRPRequest) -> _FileSink | None:
        message_id = request.headers.get("Message-ID") or ""
        if self.message_id is None:
            self.message_id = message_id
        if message_id != self.message_id or self.done.called:
            return None
        return self

    def chunk_started(self, request: MSRPRequest, byte_range: ByteRange) -> None:
        if byte_range.total not in (None, self.size):
            self.fail(CtlError(f"the sender sends {byte_range.total} bytes, not {self.size}"))
            return
        self._end = byte_range.start - 1
        self.message.chunk_started(request, byte_range)

    def chunk_data(self, data: bytes) -> None:
        self._end += len(data)
        if self._end > self.size:
            self.fail(CtlError(f"the sender sends more than the {self.size} bytes promised"))
        elif not self.done.called:
            self.message.chunk_data(data)

    def chunk_ended(self, flag: bytes) -> None:
        if not self.done.called:
            self.message.chunk_ended(flag)

    def ended(self, message: IncomingMessage) -> None:
        if message.aborted:
            self.fail(CtlError("the sender gave the file up"))
        elif not self.done.called:
            self.done.callback(message)

    def fail(self, error: CtlError) -> None:
        if not self.message.handle.closed:
            self.message.handle.close()
        if not self.done.called:
            self.done.errback(Failure(error))


async def receive_file(
    reactor: Any,
    ua: SIPUserAgent,
    access: network.RelayAccess,
    invite: SIPRequest,
    media: sdp.MSRPMedia,
    save_dir: Path,
    out: TextIO,
) -> None:
    """Take the file ``invite`` offers into ``save_dir``: answer recvonly in a session
    of our own, write it, check its size and SHA-1, and print where it went. A name we
    cannot use is refused (488) before anything is written."""
    selector = media.file
    assert selector is not None  # is_file_offer
    try:
        name = save_name(selector.name)
        path, handle = create_unused(save_dir, name)
    except CtlError:
        ua.reject(invite, 488, "Unacceptable File")
        raise
    sink = _FileSink(selector.size, path, handle)
    complete = answering = False
    try:
        session = await network.open_session(reactor, access, sink_for=sink.sink_for)
        try:
            answer = sdp.build(
                network.advertised_path(session.use_path, session.protocol.local_uri),
                (selector.content_type,),
                "recvonly",
                selector,
            )
            answering = True
            dialog = await ua.accept(invite, answer, more_calls=True)
            dialog.ended.addBoth(lambda _: sink.fail(CtlError("the sender hung up first")))
            session.protocol.lost.addBoth(lambda _: sink.fail(CtlError("the MSRP relay left")))
            await sink.done
            complete = _verified(path, selector)
            out.write(
                f"received {selector.name} as {path}: {selector.size} bytes"
                f" ({format_bytes(selector.size)}), SHA-256 {sha256_of(path)}\n"
            )
            out.flush()
            await _ended(reactor, ua, dialog)
        finally:
            await network.close(reactor, session.protocol)
    finally:
        if not answering:  # no MSRP session, or hung up meanwhile: the offer gets an answer
            ua.reject(invite, 480, "Cannot Take Files Now")
        if not handle.closed:
            handle.close()
        if not complete:
            path.unlink(missing_ok=True)


def _verified(path: Path, selector: sdp.FileSelector) -> bool:
    """True, or a CtlError saying what differs from the file-selector's promise."""
    got = path.stat().st_size
    if got != selector.size:
        raise CtlError(f"{selector.name}: {got} bytes arrived, {selector.size} promised")
    if selector.sha1 is not None:
        with open(path, "rb") as saved:
            (sha1,) = digests_of(saved, "sha1")
        if sha1 != selector.sha1:
            raise CtlError(f"{selector.name}: the SHA-1 differs from the one offered")
    return True


async def _ended(reactor: Any, ua: SIPUserAgent, dialog: Dialog) -> None:
    """The sender BYEs once it has our REPORT; if it never does, we do."""
    try:
        await dialog.ended.addTimeout(BYE_WAIT_SECONDS, reactor)
    except defer.TimeoutError:
        await ua.bye(dialog)
