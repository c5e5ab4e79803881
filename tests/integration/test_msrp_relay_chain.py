"""Two relays with mutual TLS: the intra/extra AUTH chain of RFC 4976 §5.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, ssl

from relayd.msrp.client import MSRPClientError, connect
from relayd.msrp.message import MSRPRequest
from relayd.msrp.parser import BodyChunk, MessageEnd, MessageStart, MSRPParser
from relayd.testing import RelayPKI, make_pki

from .conftest import USERS, RecordingSink, RelayFactory, client, deferLater, path_to

pytestmark = pytest.mark.integration


@pytest_twisted.ensureDeferred
async def test_client_through_two_relays_with_auth_chain(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    intra = await start_relay("127.0.0.1")
    extra = await start_relay("127.0.0.2")
    # Alice: AUTH with her intra relay, then with extra *through* intra.
    alice = await connect(reactor, intra.uri, pki.ca_pem)
    first = await defer.Deferred.fromCoroutine(alice.auth([intra.uri], "alice", USERS["alice"]))
    second = await defer.Deferred.fromCoroutine(
        alice.auth([*first.use_path, extra.uri], "alice", USERS["alice"])
    )
    # §5.1: the outer relay's Use-Path names the whole route, intra first.
    assert second.use_path[0] == first.use_path[0]
    assert second.use_path[1].startswith(f"msrps://127.0.0.2:{extra.port}/")
    # The AUTH reached extra over a mutually authenticated connection from intra.
    peers = [c for c in extra.relay.connections if c.peer_names]
    assert peers and "127.0.0.1" in peers[0].peer_names
    # Bob is a client of extra only.
    sink = RecordingSink()
    bob, bob_auth = await client(extra, "bob", sink, trust=pki.ca_pem)
    to_path = [*second.use_path, *path_to(bob, bob_auth)]
    data = b"x" * 200_000
    await defer.Deferred.fromCoroutine(
        alice.send_message(
            " ".join(to_path),
            data,
            len(data),
            chunk_bytes=50_000,
            success_report=True,
            message_id="chain",
        )
    ).addTimeout(10, reactor)
    assert await sink.wait("chain") == data
    # relayd knows relayd (ALPN): the chunks cross both relays uncut.
    assert [r.start for m, r, _ in sink.ranges if m == "chain"] == [1, 50_001, 100_001, 150_001]
    report = await alice.wait_report("chain").addTimeout(5, reactor)
    assert report.headers.get("Status") == "000 200 OK"
    # And back: Bob answers through extra and intra to Alice's path (reverse of hers).
    alice_path = [*reversed(second.use_path), alice.local_uri]
    alice_sink = RecordingSink()
    alice.sink_for = lambda request: alice_sink
    await defer.Deferred.fromCoroutine(
        bob.send_message(" ".join([*bob_auth.use_path, *alice_path]), b"pong", 4, message_id="back")
    ).addTimeout(10, reactor)
    assert await alice_sink.wait("back") == b"pong"


@pytest_twisted.ensureDeferred
async def test_peer_relay_with_untrusted_certificate_cannot_forward(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # extra only trusts another CA: intra's client certificate fails the
    # handshake, so the AUTH never reaches extra and Alice gets an error that
    # says TLS failed, not that a connection was lost (RFC 4975 §10: 403).
    other = make_pki(tmp_path_factory.mktemp("other-ca"))
    intra = await start_relay("127.0.0.1")
    extra = await start_relay("127.0.0.2", trust_peers=other.ca_path)
    alice = await connect(reactor, intra.uri, pki.ca_pem)
    first = await defer.Deferred.fromCoroutine(alice.auth([intra.uri], "alice", USERS["alice"]))
    with pytest.raises(MSRPClientError, match="403 next hop failed TLS verification"):
        await defer.Deferred.fromCoroutine(
            alice.auth([*first.use_path, extra.uri], "alice", USERS["alice"])
        ).addTimeout(10, reactor)
    assert not [c for c in extra.relay.connections if c.peer_names]


@pytest_twisted.ensureDeferred
async def test_next_hop_whose_certificate_we_refuse_is_reported_as_such(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # intra trusts only another CA: extra's certificate fails intra's check.
    # The sender's REPORT says TLS failed (403), not "connection lost" (481).
    other = make_pki(tmp_path_factory.mktemp("other-ca"))
    intra = await start_relay("127.0.0.1", trust_peers=other.ca_path)
    extra = await start_relay("127.0.0.2")
    alice, alice_auth = await client(intra, "alice", trust=pki.ca_pem)
    to_path = [*alice_auth.use_path, f"msrps://127.0.0.2:{extra.port}/x;tcp"]
    await defer.Deferred.fromCoroutine(
        alice.send_message(" ".join(to_path), b"hello", 5, message_id="tls")
    ).addTimeout(10, reactor)
    report = await alice.wait_report("tls").addTimeout(10, reactor)
    assert report.headers.get("Status") == "000 403 next hop failed TLS verification"
    assert report.headers.get("Byte-Range") == "1-5/5"


@pytest_twisted.ensureDeferred
async def test_relay_without_peer_trust_treats_relays_as_clients(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    # RFC 4976 §6.1: no certificate accepted means an MSRP client with digest.
    intra = await start_relay("127.0.0.1")
    extra = await start_relay("127.0.0.2", trust_peers=False)
    alice = await connect(reactor, intra.uri, pki.ca_pem)
    first = await defer.Deferred.fromCoroutine(alice.auth([intra.uri], "alice", USERS["alice"]))
    second = await defer.Deferred.fromCoroutine(
        alice.auth([*first.use_path, extra.uri], "alice", USERS["alice"])
    ).addTimeout(10, reactor)
    session_id = second.use_path[-1].rsplit("/", 1)[1].split(";")[0]
    session = extra.relay.core.sessions.lookup(session_id)
    assert session is not None
    assert session.owner_relay is None and session.owner_connection is not None


class SmallChunkPeer(protocol.Protocol):
    """A peer relay like Kamailio's msrp module: more than 10 KiB of body in one
    chunk and it drops the connection; otherwise every SEND chunk gets its 200."""

    LIMIT = 10240

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.parser = MSRPParser()
        self.bodies: list[int] = []
        self.received = 0
        self.dropped = False
        self._request: MSRPRequest | None = None

    def dataReceived(self, data: bytes) -> None:
        for event in self.parser.feed(data):
            if isinstance(event, MessageStart) and isinstance(event.message, MSRPRequest):
                self._request = event.message
                self.bodies.append(0)
            elif isinstance(event, BodyChunk):
                self.bodies[-1] += len(event.data)
                self.received += len(event.data)
                if self.bodies[-1] > self.LIMIT:
                    self.dropped = True
                    self.transport.abortConnection()  # type: ignore[union-attr]
                    return
            elif isinstance(event, MessageEnd) and self._request is not None:
                request, self._request = self._request, None
                back = (request.headers.get("From-Path") or "").split()[0]
                self.transport.write(  # type: ignore[union-attr]
                    f"MSRP {request.tid} 200 OK\r\nTo-Path: {back}\r\n"
                    f"From-Path: {self.uri}\r\n-------{request.tid}$\r\n".encode()
                )


@pytest_twisted.ensureDeferred
async def test_chunks_towards_a_small_chunk_peer_relay_fit_its_limit(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay("127.0.0.1")
    cert, key = pki.leaf("127.0.0.3")
    pem = Path(cert).read_text() + Path(key).read_text()
    options = ssl.PrivateCertificate.loadPEM(pem).options()
    peers: list[SmallChunkPeer] = []

    def build() -> SmallChunkPeer:
        peers.append(SmallChunkPeer(uri))
        return peers[-1]

    factory = protocol.Factory.forProtocol(build)
    port = reactor.listenSSL(0, factory, options, interface="127.0.0.3")  # type: ignore[attr-defined]
    uri = f"msrps://127.0.0.3:{port.getHost().port}/kamailio;tcp"
    try:
        alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
        data = os.urandom(200_000)
        await defer.Deferred.fromCoroutine(
            alice.send_message(
                " ".join([*alice_auth.use_path, uri, "msrps://127.0.0.9:1/bob;tcp"]),
                data,
                len(data),
                chunk_bytes=65536,
                message_id="to-kamailio",
            )
        ).addTimeout(10, reactor)
        for _ in range(100):
            if (peers and peers[0].received == len(data)) or any(p.dropped for p in peers):
                break
            await deferLater(0.02)
        assert not any(p.dropped for p in peers), "the peer dropped an oversized chunk"
        assert peers[0].received == len(data)
        assert max(peers[0].bodies) <= 8192
    finally:
        await port.stopListening()
