"""Server-side TLS over Python's ``ssl`` module with memory BIOs, as a Twisted wrapper.

Why not Twisted's ``TLSMemoryBIOProtocol``: it rides on pyOpenSSL, whose
bundled OpenSSL costs about twice the memory per idle connection of the
system OpenSSL behind the standard library (measured: ~38 KiB against
~21 KiB), and every read goes through several wrapper layers and raises an
exception.  An MSRP relay holds thousands of mostly idle client connections,
so this is where its memory goes.

The wrapper is a transport for the protocol it wraps: plaintext in and out,
certificates as ``cryptography`` objects.  Outbound (client) TLS keeps using
Twisted's pyOpenSSL path, which carries service_identity checks.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from cryptography import x509
from twisted.internet.interfaces import IHandshakeListener, IProtocol, IProtocolFactory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from relayd.logs import logger
from relayd.net.eager import write_now

_READ_BYTES = 262144


class TLSFailed(Exception):
    """The TLS layer failed (handshake refused, bad record, certificate not trusted)."""


class StdlibTLSServerProtocol(ProtocolWrapper):
    log = logger()

    def __init__(self, factory: StdlibTLSServerFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)  # type: ignore[arg-type]
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = factory.context_of().wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshake_done = False
        self._pending: list[bytes] = []
        self._failure: Failure | None = None
        self.peer_certificate: x509.Certificate | None = None

    # -- from the network ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._incoming.write(data)
        if not self._handshake_done and not self._handshake():
            return
        chunks: list[bytes] = []
        tls = self._tls
        incoming = self._incoming
        while True:
            try:
                chunk = tls.read(_READ_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            except ssl.SSLError as e:
                self._deliver(chunks)
                self._fail(e)
                return
            if not chunk:
                # close_notify from the peer (an empty read means exactly that
                # with memory BIOs): deliver what came before it, then close.
                self._deliver(chunks)
                self._flush()
                self.loseConnection()
                return
            chunks.append(chunk)
            if not incoming.pending and not tls.pending():
                # All input decrypted: reading again would only raise
                # SSLWantReadError, and an exception per read is not free.
                break
        self._flush()  # post-handshake messages (tickets, key updates)
        self._deliver(chunks)

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks:
            self.wrappedProtocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as e:
            self._flush()  # send the alert that says why
            self._fail(e)
            return False
        self._handshake_done = True
        der = self._tls.getpeercert(binary_form=True)
        if der:
            self.peer_certificate = x509.load_der_x509_certificate(der)
        self._flush()
        pending, self._pending = self._pending, []
        for data in pending:
            self._tls.write(data)
        self._flush()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
        return True

    def _fail(self, error: ssl.SSLError) -> None:
        reason = getattr(error, "reason", None) or str(error)
        self._failure = Failure(TLSFailed(reason))
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    # -- to the network ------------------------------------------------------------

    def _flush(self) -> None:
        if self._outgoing.pending:
            data = self._outgoing.read()
            transport: Any = self.transport
            if transport is not None:
                write_now(transport, data)

    def write(self, data: bytes) -> None:
        if self.disconnecting or not data:
            return
        if not self._handshake_done:
            self._pending.append(data)
            return
        self._tls.write(data)
        self._flush()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        if self._handshake_done:
            try:
                self._tls.unwrap()  # queue our close_notify
            except (ssl.SSLWantReadError, ssl.SSLError):
                pass
            self._flush()
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def pauseProducing(self) -> None:
        transport: Any = self.transport
        transport.pauseProducing()

    def resumeProducing(self) -> None:
        transport: Any = self.transport
        transport.resumeProducing()

    def getPeerCertificate(self) -> x509.Certificate | None:
        return self.peer_certificate

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._failure is not None:
            self.log.info(
                "TLS with {peer} failed: {reason}",
                peer=_peer(self),
                reason=self._failure.getErrorMessage(),
            )
            reason = self._failure
        super().connectionLost(reason)
        # The protocol may outlive its connection for a while (a route cached by
        # another connection names it): OpenSSL's buffers, tens of KiB per
        # connection, need not. Nothing reads or writes TLS once disconnecting.
        self.disconnecting = True
        del self._tls, self._incoming, self._outgoing


class StdlibTLSServerFactory(WrappingFactory):
    protocol = StdlibTLSServerProtocol
    noisy = False

    def __init__(
        self,
        context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        wrappedFactory: IProtocolFactory,
    ) -> None:
        """``context``: one context, or where each new connection gets the current one
        (a listener whose keys can be reloaded, relayd.net.tls.ListenerTLS)."""
        super().__init__(wrappedFactory)
        self.context_of = context if callable(context) else lambda: context


def _peer(protocol: StdlibTLSServerProtocol) -> str:
    try:
        address: Any = protocol.getPeer()
        return f"{address.host}:{address.port}"
    except Exception:
        return "?"
