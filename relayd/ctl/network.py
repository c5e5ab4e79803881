"""``relayctl auth | receive | send``: an MSRP endpoint behind relays (RFC 4976 §5).

Every command first authenticates with each ``--via`` relay in order over one
connection to the first: the i-th AUTH goes to the Use-Path collected so far
plus the i-th relay's URI (§5.1), so later relays are reached through earlier
ones.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import ssl
import stat
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, TextIO, TypeVar

from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from relayd.ctl.progress import Progress
from relayd.ctl.receiving import IncomingMessage, MessageWriter, sha256_of
from relayd.ctl.settings import Credentials, CtlError
from relayd.msrp.client import (
    MessageSink,
    MSRPClientError,
    MSRPClientProtocol,
    SendResult,
    connect,
)
from relayd.msrp.message import MSRPRequest
from relayd.msrp.uri import MSRPURI
from relayd.net.tls import tls_failure

AUTH_TIMEOUT_SECONDS = 30.0
"""Longest wait for one AUTH transaction (two round trips through the relays)."""

CLOSE_TIMEOUT_SECONDS = 5.0
"""Longest wait for a clean TLS close before the connection is aborted."""

DEFAULT_CHUNK_BYTES = 65536
"""Bytes per SEND chunk unless ``--chunk-size`` says otherwise."""

DEFAULT_WINDOW = 8
"""Chunks in flight before waiting for the oldest one's 200, unless ``--window``."""

CONNECT_TIMEOUT_SECONDS = 10.0
"""Longest wait for the TCP connection to the first relay, and again for its TLS handshake."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class RelayAccess:
    """How to reach and authenticate with the relays, in order (nearest first)."""

    relays: list[str]
    credentials: Credentials
    trust_pem: bytes | None
    expires_seconds: int | None = None


@dataclass
class Session:
    protocol: MSRPClientProtocol
    use_path: list[str]
    expires_seconds: int
    #: Relays whose 200 carried no Authentication-Info (RFC 2617 makes it
    #: optional): they did not prove they know the password.
    unproved: list[str] = field(default_factory=list)


def merge_use_path(so_far: list[str], returned: list[str]) -> list[str]:
    """The route after one more AUTH (RFC 4976 §5.1).

    The RFC has the outermost relay answer the whole route ("B C"); a relay
    that answers only its own URI gets it appended to what we have.
    """
    prefix = [MSRPURI.parse(uri) for uri in returned[: len(so_far)]]
    if len(returned) > len(so_far) and prefix == [MSRPURI.parse(uri) for uri in so_far]:
        return list(returned)
    return [*so_far, *returned]


def advertised_path(use_path: list[str], local_uri: str) -> list[str]:
    """What a peer appends to its To-Path to reach us: Use-Path reversed, then our URI (§5.1)."""
    return [*reversed(use_path), local_uri]


def describe_loss(reasons: list[Failure], host: str) -> str:
    """Turn the reason a connection closed into advice; TLS failures are the common case."""
    if not reasons:
        return "connection to the relay was lost"
    value = reasons[0].value
    if isinstance(value, VerificationError):
        return f"TLS failed: the relay's certificate is not valid for {host}"
    text = tls_failure(value)
    if text is not None:
        return f"TLS failed: {text} (wrong or missing --ca?)"
    return f"connection to the relay was lost: {reasons[0].getErrorMessage()}"


async def _within(reactor: Any, work: Coroutine[Any, Any, _T], seconds: float, message: str) -> _T:
    try:
        return await defer.Deferred.fromCoroutine(work).addTimeout(seconds, reactor)
    except defer.TimeoutError:
        raise CtlError(message) from None


async def open_session(
    reactor: Any,
    access: RelayAccess,
    sink_for: Callable[[MSRPRequest], MessageSink | None] | None = None,
) -> Session:
    """Connect to the first relay and AUTH with each relay in turn."""
    first = access.relays[0]
    try:
        protocol = await connect(
            reactor,
            first,
            access.trust_pem,
            sink_for=sink_for,
            timeout_seconds=CONNECT_TIMEOUT_SECONDS,
        )
    except MSRPClientError as e:
        if e.reason is None:
            raise CtlError(str(e)) from None
        host = MSRPURI.parse(first).host
        raise CtlError(f"{first}: {describe_loss([e.reason], host)}") from None
    path: list[str] = []
    expires: list[int] = []
    unproved: list[str] = []
    credentials = access.credentials
    for index, uri in enumerate(access.relays):
        try:
            result = await _within(
                reactor,
                protocol.auth(
                    [*path, uri], credentials.username, credentials.password, access.expires_seconds
                ),
                AUTH_TIMEOUT_SECONDS,
                f"{uri}: no answer to AUTH within {AUTH_TIMEOUT_SECONDS:g} s",
            )
        except (MSRPClientError, CtlError) as e:
            await close(reactor, protocol)
            text = str(e)
            plain = MSRPURI.parse(first)
            if (
                index == 0
                and plain.scheme == "msrp"
                and (isinstance(e, CtlError) or e.reason is not None)
                and await speaks_tls(reactor, plain.host.strip("[]"), plain.effective_port)
            ):
                # A TLS listener drops a plain AUTH without a word (no TLS
                # alert either): ask the port itself what it speaks.
                raise CtlError(
                    f"{first}: that port speaks TLS: use {replace(plain, scheme='msrps')}"
                ) from None
            if isinstance(e, MSRPClientError) and e.reason is not None:
                host = MSRPURI.parse(access.relays[0]).host
                if index == 0 and e.reason.check(error.ConnectionDone):
                    # A relay drops an AUTH that does not name it (RFC 4976 §6.3)
                    # without an answer; the common cause is the host typed.
                    text = (
                        f"{uri}: the relay closed the connection: is {host} its [relay] hostname?"
                    )
                else:
                    text = f"{uri}: {describe_loss([e.reason], host)}"
            elif isinstance(e, MSRPClientError):
                hint = " (wrong user name or password?)" if "refused: 401" in text else ""
                text = f"{uri}: {text}{hint}"
            raise CtlError(text) from None
        path = merge_use_path(path, list(result.use_path))
        expires.append(result.expires_seconds)
        if not result.relay_proved:
            unproved.append(uri)
    return Session(protocol, path, min(expires), unproved)


class _TLSProbe(Protocol):
    """Sends a TLS ClientHello; tells whether the answer is a TLS record."""

    def __init__(self, hello: bytes, answer: defer.Deferred[bool]) -> None:
        self.hello = hello
        self.answer = answer

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.hello)

    def dataReceived(self, data: bytes) -> None:
        # A handshake (22) or alert (21) record of TLS 1.x: a TLS server.
        if not self.answer.called:
            self.answer.callback(len(data) >= 2 and data[0] in (21, 22) and data[1] == 3)
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if not self.answer.called:
            self.answer.callback(False)


def _client_hello(host: str) -> bytes:
    """The first flight of a TLS client, to see what a port answers (nothing more is sent)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


async def speaks_tls(reactor: Any, host: str, port: int) -> bool:
    """Does ``host:port`` answer a TLS ClientHello in TLS?  Bounded by CONNECT_TIMEOUT_SECONDS."""
    answer: defer.Deferred[bool] = defer.Deferred()
    endpoint = HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT_SECONDS)
    hello = _client_hello(host)
    try:
        probe: Any = await endpoint.connect(Factory.forProtocol(lambda: _TLSProbe(hello, answer)))
    except Exception:
        return False
    try:
        return await answer.addTimeout(CONNECT_TIMEOUT_SECONDS, reactor)
    except defer.TimeoutError:
        probe.transport.abortConnection()
        return False


async def close(reactor: Any, protocol: MSRPClientProtocol) -> None:
    """Close cleanly (TLS close_notify, pending REPORTs flushed), but never hang."""
    transport: Any = protocol.transport
    if transport is None:
        return
    closed: defer.Deferred[None] = defer.Deferred()

    def fire(result: object) -> object:
        if not closed.called:
            closed.callback(None)
        return result

    protocol.lost.addBoth(fire)
    transport.loseConnection()
    try:
        await closed.addTimeout(CLOSE_TIMEOUT_SECONDS, reactor)
    except defer.TimeoutError:
        transport.abortConnection()


async def run_auth(reactor: Any, access: RelayAccess, out: TextIO) -> None:
    """Check the relays and credentials; show what a session would get."""
    session = await open_session(reactor, access)
    out.write(f"Use-Path: {' '.join(session.use_path)}\nExpires: {session.expires_seconds}\n")
    for uri in session.unproved:
        out.write(
            f"Note: {uri} sent no Authentication-Info (optional in RFC 2617),"
            " so it did not prove it knows the password\n"
        )
    out.flush()
    await close(reactor, session.protocol)


async def run_receive(
    reactor: Any,
    access: RelayAccess,
    output: Path | None,
    count: int,
    timeout_seconds: float | None,
    out: TextIO,
) -> None:
    """Print our path, then write ``count`` messages to disk and their SHA-256."""
    finished: defer.Deferred[None] = defer.Deferred()
    done: list[IncomingMessage] = []

    def fail(error: CtlError) -> None:
        if not finished.called:
            finished.errback(Failure(error))

    def succeed() -> None:
        if not finished.called:
            finished.callback(None)

    def on_end(message: IncomingMessage) -> None:
        if message.aborted:
            fail(CtlError(f"the sender aborted message {message.message_id}"))
            return
        done.append(message)
        if len(done) >= count:
            # Later, so the client first answers this chunk and sends its REPORT.
            reactor.callLater(0, succeed)

    writer = MessageWriter(output, on_end, fail)
    session = await open_session(reactor, access, sink_for=writer.sink_for)
    protocol = session.protocol

    def lost(result: object) -> object:
        fail(CtlError(f"relay closed the connection after {len(done)} of {count} messages"))
        return result

    protocol.lost.addBoth(lost)
    out.write(f"Path: {' '.join(advertised_path(session.use_path, protocol.local_uri))}\n")
    out.flush()
    if timeout_seconds:
        finished.addTimeout(timeout_seconds, reactor)
    try:
        await finished
    except defer.TimeoutError:
        raise CtlError(
            f"received {len(done)} of {count} messages within {timeout_seconds:g} s"
        ) from None
    finally:
        writer.close()
        await close(reactor, protocol)
    for message in done:
        out.write(
            f"Message-ID: {message.message_id}\nFile: {message.path}\n"
            f"Bytes: {message.received_bytes}\nSHA-256: {sha256_of(message.path)}\n"
        )
    out.flush()


class HashingReader(io.BufferedReader):
    """Hashes what ``send_message`` actually reads, so the file is read once."""

    def __init__(self, raw: io.FileIO) -> None:
        super().__init__(raw)
        self.digest = hashlib.sha256()

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.digest.update(data)
        return data


_STATUS_IN_ERROR = re.compile(r"(\d{3})(?: (.*))?$")


def delivery_failure(error: MSRPClientError) -> CtlError:
    """``delivery failed: 481 …`` from the client's error text."""
    text = str(error)
    match = _STATUS_IN_ERROR.search(text) if text.startswith("relay refused") else None
    if match is not None:
        text = f"{match.group(1)} {match.group(2) or ''}".rstrip()
    return CtlError(f"delivery failed: {text}")


def open_for_sending(path: str) -> tuple[io.FileIO, int]:
    """Open before connecting, so a typo costs no AUTH; size from the open file."""
    try:
        raw = io.FileIO(path, "r")
    except OSError as e:
        raise CtlError(f"cannot read {path}: {e.strerror}") from None
    info = os.fstat(raw.fileno())
    if not stat.S_ISREG(info.st_mode):
        raw.close()
        raise CtlError(f"{path} is not a regular file")
    return raw, info.st_size


async def run_send(
    reactor: Any,
    access: RelayAccess,
    to: list[str],
    file_path: str,
    chunk_bytes: int,
    window: int,
    content_type: str,
    timeout_seconds: float,
    out: TextIO,
    err: TextIO,
    interactive: bool | None = None,
) -> None:
    """Stream a file with Success-Report: yes and wait for the REPORT (RFC 4975 §7.1.2)."""
    raw, size = open_for_sending(file_path)
    reader = HashingReader(raw)
    try:
        session = await open_session(reactor, access)
        try:
            result = await send_reported(
                reactor,
                session.protocol,
                " ".join([*session.use_path, *to]),
                reader,
                size,
                content_type,
                timeout_seconds,
                err,
                interactive,
                chunk_bytes,
                window,
            )
        finally:
            await close(reactor, session.protocol)
    finally:
        reader.close()
    out.write(
        f"Message-ID: {result.message_id}\nBytes: {result.bytes_sent}\n"
        f"SHA-256: {reader.digest.hexdigest()}\n"
    )
    out.flush()


async def send_reported(
    reactor: Any,
    protocol: MSRPClientProtocol,
    to_path: str,
    reader: BinaryIO,
    size: int,
    content_type: str,
    report_timeout_seconds: float,
    err: TextIO,
    interactive: bool | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    window: int = DEFAULT_WINDOW,
) -> SendResult:
    """``reader`` as one message with Success-Report: yes, the progress bar on ``err``,
    then its REPORT (RFC 4975 §7.1.2); a CtlError unless that says 200."""
    progress = Progress(size, err, interactive=interactive)
    try:
        result = await protocol.send_message(
            to_path,
            reader,
            size,
            chunk_bytes=chunk_bytes,
            window=window,
            content_type=content_type,
            success_report=True,
            progress=progress.update,
        )
    except MSRPClientError as e:
        progress.end_line()
        raise delivery_failure(e) from None
    except BaseException:
        progress.end_line()  # the error line must not continue a half-drawn bar
        raise
    progress.finish()
    try:
        report = await protocol.wait_report(result.message_id).addTimeout(
            report_timeout_seconds, reactor
        )
    except defer.TimeoutError:
        waited = f"{report_timeout_seconds:g} s"
        raise CtlError(f"no delivery report within {waited}") from None
    except MSRPClientError as e:
        raise CtlError(f"delivery unknown: {e}") from None
    status = (report.headers.get("Status") or "").split(" ", 2)
    code = status[1] if len(status) > 1 else "?"
    if code != "200":
        comment = status[2] if len(status) > 2 else ""
        raise CtlError(f"delivery failed: {code} {comment}".rstrip())
    return result
