"""``relayctl chat``: a SIP call whose media is an MSRP text session through the relay.

Both ends REGISTER with the SIP relay and AUTH with their MSRP relay first; the
caller's INVITE offers ``a=path`` = its Use-Path reversed and its own session URI
(RFC 4976 §5.1), the callee answers with its own. Each line typed is one SEND to
the peer's path behind our own Use-Path (RFC 4975 §7.1); each SEND received is
printed. ``/file PATH`` sends a file in a session of its own and files the peer
offers are saved (:mod:`relayd.ctl.filetransfer`, RFC 5547). End of input (Ctrl-D)
sends BYE; the peer's BYE ends the command.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.internet.stdio import StandardIO
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from relayd.ctl import filetransfer, network, sdp
from relayd.ctl.settings import CtlError
from relayd.ctl.sipua import CallRefused, Dialog, SIPUserAgent, missing_members
from relayd.msrp.client import MessageSink, MSRPClientError
from relayd.msrp.message import ByteRange, MSRPRequest
from relayd.sip.message import SIPRequest, SIPResponse
from relayd.sipuri import SIPURI, NameAddr, SIPURIError

MAX_LINE_BYTES = 65536
"""A chat line longer than this is shown shortened (the rest is not kept)."""

TEXT = "text/plain"

HANG_UP_SECONDS = 2.0
"""On Ctrl-C the BYE gets this long before the command exits anyway."""

log = Logger()


@dataclass(frozen=True)
class ChatAccess:
    """The MSRP relay to AUTH with, and the SIP relay (address resolved) and domain."""

    msrp: network.RelayAccess
    sip: tuple[str, int]
    domain: str


def host_of(text: str) -> str:
    """The host of ``host[:port]``, as a SIP URI writes it (IPv6 in brackets)."""
    if text.startswith("["):
        return text[: text.find("]") + 1]
    if text.count(":") == 1:
        return text.partition(":")[0]
    return f"[{text}]" if ":" in text else text


def target_uri(text: str, domain: str) -> str:
    """A SIP URI as given, or ``sip:<name>@<domain>`` for a bare user name."""
    uri = text if text.startswith(("sip:", "sips:")) else f"sip:{text}@{domain}"
    try:
        return SIPURI.parse(uri).format()
    except SIPURIError as e:
        raise CtlError(f"cannot call {text!r}: {e}") from None


@dataclass
class _Incoming:
    """One message arriving in chunks, kept up to MAX_LINE_BYTES."""

    content_type: str
    data: bytearray = field(default_factory=bytearray)
    total: int = 0


class Printer:
    """The MSRP sink of a chat: each complete message is one printed line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.peer = "peer"
        self._messages: dict[str, _Incoming] = {}
        self._current: _Incoming | None = None
        self._current_id = ""

    def sink_for(self, request: MSRPRequest) -> MessageSink | None:
        return self

    def chunk_started(self, request: MSRPRequest, byte_range: ByteRange) -> None:
        self._current_id = request.headers.get("Message-ID") or ""
        kind = (request.headers.get("Content-Type") or TEXT).split(";")[0].strip().lower()
        self._current = self._messages.setdefault(self._current_id, _Incoming(kind))

    def chunk_data(self, data: bytes) -> None:
        message = self._current
        if message is None:
            return
        message.total += len(data)
        room = MAX_LINE_BYTES - len(message.data)
        if room > 0:
            message.data += data[:room]

    def chunk_ended(self, flag: bytes) -> None:
        message = self._messages.get(self._current_id)
        self._current = None
        if message is None or flag == b"+":
            return
        del self._messages[self._current_id]
        if flag == b"#":
            return  # the sender gave it up (RFC 4975 §7.1.1)
        if message.content_type.startswith("text/"):
            text = message.data.decode("utf-8", "replace").rstrip("\r\n")
            if message.total > len(message.data):
                text += f" … ({message.total} bytes, shortened)"
        else:
            text = f"[{message.total} bytes of {message.content_type}]"
        self.out.write(f"{self.peer}: {text}\n")
        self.out.flush()


class TerminalLines(LineReceiver):
    """Standard input as lines into a queue; ``None`` at its end (Ctrl-D)."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE_BYTES

    def __init__(self, queue: defer.DeferredQueue[str | None]) -> None:
        self.queue = queue

    def lineReceived(self, line: bytes) -> None:
        self.queue.put(line.rstrip(b"\r").decode("utf-8", "replace"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.queue.put(None)


async def queued_lines(queue: defer.DeferredQueue[str | None]) -> AsyncIterator[str]:
    """The lines put into ``queue`` until a ``None``."""
    while (line := await queue.get()) is not None:
        yield line


def refusal(target: str, refused: CallRefused, user: str) -> CtlError:
    """One clear message for a final non-2xx answer; for 470 who has not consented
    and how to ask (RFC 5360 §5.9.1: a CONSENT to each URI of Permission-Missing)."""
    if refused.status == 470:
        who = missing_members(refused.missing) or ["(the relay named nobody)"]
        return CtlError(
            f"{target}: {refused.status} {refused.reason}: not everyone on the list has"
            f" consented to calls from {user}; missing: {', '.join(who)}."
            " Ask them with a CONSENT (Consent-Methods: INVITE) to each URI given,"
            " then call again"
        )
    if refused.status == 404:
        return CtlError(f"{target}: {refused.status} {refused.reason}: no such user or list")
    if refused.status == 480:
        return CtlError(f"{target}: {refused.status} {refused.reason}: not registered now")
    return CtlError(f"{target} did not answer the call: {refused.status} {refused.reason}")


def _name(value: str | None) -> str:
    try:
        address = NameAddr.parse(value or "")
    except SIPURIError:
        return "peer"
    return address.display_name or address.uri.format()


def identity(request: SIPRequest) -> str:
    """Who sent ``request``: the relay's P-Asserted-Identity (it authenticated them,
    RFC 3325 §9.1), else the From URI."""
    for name in ("P-Asserted-Identity", "From"):
        try:
            return NameAddr.parse(request.headers.get(name) or "").uri.format()
        except SIPURIError:
            continue
    return ""


def check_save_dir(folder: Path) -> Path:
    """Refuse a save directory we could not write before calling, not when a file comes."""
    if not folder.is_dir():
        raise CtlError(f"--save-dir {folder}: not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CtlError(f"--save-dir {folder}: not writable")
    return folder


@dataclass(frozen=True)
class _Call:
    """One answered call: where our file offers go, and whose offers we take (the
    peer's own URI; a callee that answered a list call is known by its Contact)."""

    ua: SIPUserAgent
    dialog: Dialog
    session: network.Session
    peer: str
    peer_uri: str
    identities: frozenset[str]


def _callee_identities(target: str, dialog: Dialog, domain: str) -> frozenset[str]:
    user = SIPURI.parse(dialog.remote_target).user
    return frozenset({target, f"sip:{user}@{domain}"} if user else {target})


async def run_chat(
    reactor: Any,
    access: ChatAccess,
    target: str | None,
    lines: AsyncIterator[str],
    out: TextIO,
    err: TextIO,
    call_timeout: float | None = None,
    save_dir: Path | None = None,
) -> None:
    """Call ``target`` (or, with ``None``, wait for a call) and chat until either side
    ends; files the peer sends are saved in ``save_dir`` (default: here)."""
    folder = check_save_dir(save_dir or Path())
    credentials = access.msrp.credentials
    ua = SIPUserAgent(reactor, access.sip, credentials, access.domain)
    ua.start()
    printer = Printer(out)
    session: network.Session | None = None
    registered = False
    try:
        await ua.register()
        registered = True
        session = await network.open_session(reactor, access.msrp, sink_for=printer.sink_for)
        our_path = network.advertised_path(session.use_path, session.protocol.local_uri)
        if target is not None:
            dialog = await _call(reactor, ua, target, sdp.build(our_path), out)
            printer.peer = target
            known = _callee_identities(target, dialog, access.domain)
            call = _Call(ua, dialog, session, target, target, known)
        else:
            out.write(f"Waiting for a call to {ua.aor}\n")
            out.flush()
            dialog, invite = await _answer(ua, sdp.build(our_path), call_timeout)
            printer.peer = _name(invite.headers.get("From"))
            caller = identity(invite)
            call = _Call(ua, dialog, session, printer.peer, caller, frozenset({caller}))
        await _converse(reactor, access, call, folder, lines, out, err)
    finally:
        if session is not None:
            await network.close(reactor, session.protocol)
        if registered:
            try:
                await ua.register(expires=0)
            except CtlError:
                pass  # the binding expires by itself
        await ua.close()


async def _call(reactor: Any, ua: SIPUserAgent, target: str, offer: bytes, out: TextIO) -> Dialog:
    def progress(response: SIPResponse) -> None:
        if response.status == 180:
            out.write(f"Ringing {target}\n")
            out.flush()

    def give_up() -> defer.Deferred[object] | None:
        """Ctrl-C while ringing: CANCEL, so the callee stops ringing."""
        cancelling = ua.cancel_call()
        return cancelling and cancelling.addTimeout(HANG_UP_SECONDS, reactor).addErrback(
            lambda _: None
        )

    trigger = reactor.addSystemEventTrigger("before", "shutdown", give_up)
    try:
        dialog = await ua.invite(target, offer, progress)
    except CallRefused as refused:
        raise refusal(target, refused, ua.aor) from None
    finally:
        reactor.removeSystemEventTrigger(trigger)
    try:
        sdp.parse(dialog.body)
    except sdp.SDPError as e:
        await ua.bye(dialog)
        raise CtlError(f"{target} answered without a usable MSRP session: {e}") from None
    return dialog


async def _answer(
    ua: SIPUserAgent, answer: bytes, timeout: float | None
) -> tuple[Dialog, SIPRequest]:
    """Accept the first INVITE offering MSRP text; others get 488 (RFC 3261 §13.3.1.3)."""
    while True:
        invite = await ua.incoming(timeout)
        try:
            media = sdp.parse(invite.body)
        except sdp.SDPError:
            ua.reject(invite, 488)
            continue
        if not sdp.accepts(media, TEXT):
            ua.reject(invite, 488)
            continue
        ua.ring(invite)
        return await ua.accept(invite, answer), invite


async def _converse(
    reactor: Any,
    access: ChatAccess,
    call: _Call,
    save_dir: Path,
    lines: AsyncIterator[str],
    out: TextIO,
    err: TextIO,
) -> None:
    """Lines to SENDs (``/file PATH`` to a file transfer) and the peer's file offers
    taken, until end of input (then BYE), the peer's BYE, or the relay leaving."""
    ua, dialog, protocol = call.ua, call.dialog, call.session.protocol
    to_path = " ".join([*call.session.use_path, *sdp.parse(dialog.body).path])
    events: defer.DeferredQueue[tuple[str, str]] = defer.DeferredQueue()
    receiving: list[defer.Deferred[None]] = []

    async def pump() -> None:
        async for line in lines:
            events.put(("line", line))
        events.put(("eof", ""))

    async def offers() -> None:
        while True:
            invite = await ua.incoming()
            taking = defer.Deferred.fromCoroutine(
                _take_file(reactor, access, call, invite, save_dir, out)
            )
            receiving.append(taking.addErrback(_report_failure, err, "file not received"))

    def notify(kind: str) -> Callable[[object], object]:
        def put(result: object) -> object:
            events.put((kind, ""))
            return None

        return put

    hanging_up = []

    def hang_up() -> defer.Deferred[None] | None:
        """Ctrl-C (the reactor shutting down) hangs up too."""
        if dialog.ended.called:
            return None
        hanging_up.append(True)
        bye = defer.Deferred.fromCoroutine(ua.bye(dialog))
        return bye.addTimeout(HANG_UP_SECONDS, reactor).addErrback(lambda _: None)

    trigger = reactor.addSystemEventTrigger("before", "shutdown", hang_up)
    reading = defer.Deferred.fromCoroutine(pump())
    offered = defer.Deferred.fromCoroutine(offers())
    dialog.ended.addBoth(notify("bye"))
    protocol.lost.addBoth(notify("lost"))
    out.write(
        f"Connected to {call.peer}; type a line to send it, /file PATH to send a file,"
        " Ctrl-D to hang up\n"
    )
    out.flush()
    try:
        while True:
            kind, line = await events.get()
            if kind == "line":
                await _typed(reactor, access, call, to_path, line, out, err)
                continue
            if kind == "bye":
                if not hanging_up:
                    out.write(f"{call.peer} hung up\n")
                    out.flush()
                return
            await ua.bye(dialog)
            if kind == "lost":
                raise CtlError("the MSRP relay closed the connection: call ended")
            return
    finally:
        reactor.removeSystemEventTrigger(trigger)
        ua.taking_calls = False
        for task in (reading, offered, *receiving):
            task.cancel()
            task.addErrback(lambda _: None)


async def _typed(
    reactor: Any, access: ChatAccess, call: _Call, to_path: str, line: str, out: TextIO, err: TextIO
) -> None:
    """One line typed: a chat SEND, or the ``/file`` command (its errors are one line
    each: the chat goes on)."""
    try:
        file_path = filetransfer.file_command(line)
        if file_path is not None:
            await filetransfer.send_file(
                reactor, call.ua, access.msrp, call.peer_uri, file_path, out, err
            )
            return
    except CtlError as e:
        err.write(f"file not sent: {e}\n")
        err.flush()
        return
    if line:
        await _send_line(call.session.protocol, to_path, line, err)


async def _take_file(
    reactor: Any, access: ChatAccess, call: _Call, invite: SIPRequest, save_dir: Path, out: TextIO
) -> None:
    """An INVITE during the call: the peer's file offer is taken; another call is busy
    (486), an offer from anyone else refused (403), an SDP we cannot read 488."""
    try:
        media = sdp.parse(invite.body)
    except sdp.SDPError:
        call.ua.reject(invite, 488)
        return
    if not filetransfer.is_file_offer(media):
        call.ua.reject(invite, 486)
        return
    if identity(invite) not in call.identities:
        call.ua.reject(invite, 403, "Files Only From The Peer Of This Call")
        return
    await filetransfer.receive_file(reactor, call.ua, access.msrp, invite, media, save_dir, out)


def _report_failure(failure: Failure, err: TextIO, what: str) -> None:
    """A background transfer's failure as one line (a hang-up's cancel says nothing)."""
    if failure.check(defer.CancelledError):
        return
    if failure.check(CtlError):
        err.write(f"{what}: {failure.value}\n")
    else:
        err.write(f"{what}: unexpected error: {failure.getErrorMessage()}\n")
        log.failure("file transfer failed", failure)
    err.flush()


async def _send_line(protocol: Any, to_path: str, line: str, err: TextIO) -> None:
    data = line.encode("utf-8")
    try:
        await protocol.send_message(to_path, data, len(data), content_type=TEXT)
    except MSRPClientError as e:
        err.write(f"not delivered: {network.delivery_failure(e)}\n")
        err.flush()


async def run_terminal_chat(
    reactor: Any,
    access: ChatAccess,
    target: str | None,
    call_timeout: float | None,
    out: TextIO,
    err: TextIO,
    save_dir: Path | None = None,
) -> None:
    """:func:`run_chat` with the lines typed on standard input."""
    typed: defer.DeferredQueue[str | None] = defer.DeferredQueue()
    terminal = StandardIO(TerminalLines(typed), reactor=reactor)
    try:
        lines = queued_lines(typed)
        await run_chat(reactor, access, target, lines, out, err, call_timeout, save_dir)
    finally:
        terminal.loseConnection()
