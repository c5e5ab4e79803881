"""relayd.net.tlsio over in-memory transports: reads of several records, close_notify, writes."""

from __future__ import annotations

import ssl

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relayd.net.tls import load_identity, stdlib_server_context
from relayd.net.tlsio import StdlibTLSServerFactory, StdlibTLSServerProtocol
from relayd.testing import RelayPKI, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> RelayPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Recorder(Protocol):
    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)
        self.transport.write(b"echo:" + data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


class Pair:
    """A server-side StdlibTLSServerProtocol and a client SSLObject, joined by hand."""

    def __init__(self, pki: RelayPKI) -> None:
        cert, key = pki.leaf("relay.example.com")
        context = stdlib_server_context(load_identity(cert, key), None)
        self.app = Recorder()
        factory = StdlibTLSServerFactory(context, Factory.forProtocol(lambda: self.app))
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, StdlibTLSServerProtocol)
        self.server = protocol
        self.wire = StringTransport()
        self.server.makeConnection(self.wire)
        client_context = ssl.create_default_context(cafile=pki.ca_path)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_context.wrap_bio(
            self.incoming, self.outgoing, server_hostname="relay.example.com"
        )
        while True:
            try:
                self.client.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.to_server()
                self.to_client()
        self.to_server()  # the client's Finished

    def to_server(self) -> None:
        data = self.outgoing.read()
        if data:
            self.server.dataReceived(data)

    def to_client(self) -> None:
        self.incoming.write(self.wire.value())
        self.wire.clear()

    def client_reads(self) -> tuple[bytes, bool]:
        """What the client can read now, and whether the server's close_notify followed."""
        self.to_client()
        out = b""
        while True:
            try:
                out += self.client.read(65536)
            except ssl.SSLWantReadError:
                return out, False
            except ssl.SSLZeroReturnError:
                return out, True


def test_several_records_in_one_read_are_delivered_together(pki: RelayPKI) -> None:
    pair = Pair(pki)
    for piece in (b"one", b"two", b"three"):
        pair.client.write(piece)  # one record each
    pair.to_server()
    assert pair.app.reads == [b"onetwothree"]
    assert pair.client_reads() == (b"echo:onetwothree", False)


def test_data_and_close_notify_in_one_read(pki: RelayPKI) -> None:
    pair = Pair(pki)
    pair.client.write(b"last words")
    with pytest.raises(ssl.SSLWantReadError):
        pair.client.unwrap()  # queues close_notify, then wants the server's
    pair.to_server()
    assert pair.app.reads == [b"last words"]
    assert pair.server.disconnecting
    assert pair.wire.disconnecting
    # The echo went out before the server's own close_notify.
    assert pair.client_reads() == (b"echo:last words", True)


def test_a_record_split_across_reads_waits_for_the_rest(pki: RelayPKI) -> None:
    pair = Pair(pki)
    pair.client.write(b"split record")
    data = pair.outgoing.read()
    pair.server.dataReceived(data[:10])
    assert pair.app.reads == []
    pair.server.dataReceived(data[10:])
    assert pair.app.reads == [b"split record"]


def test_tls_state_is_released_with_the_connection(pki: RelayPKI) -> None:
    """Something may keep the protocol a while after the connection; OpenSSL's
    buffers go at once, and writes after it are ignored."""
    pair = Pair(pki)
    pair.server.connectionLost(Failure(ConnectionError("gone")))
    assert pair.app.lost is not None
    assert not hasattr(pair.server, "_tls")
    pair.server.write(b"too late")
    pair.server.loseConnection()
    assert pair.wire.value() == b""
    assert pair.server.getPeerCertificate() is None
