"""Timers, probation, expiry, reconnects and open-relay attempts over real sockets."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from relayd import testing
from relayd.msrp.client import MSRPClientError, MSRPClientProtocol, connect
from relayd.msrp.uri import MSRPURI
from relayd.testing import RawProtocol, RelayPKI

from .conftest import USERS, RecordingSink, RelayFactory, client, deferLater, path_to

pytestmark = pytest.mark.integration


def send(
    sender: MSRPClientProtocol, to_path: list[str], data: bytes, **kwargs: Any
) -> defer.Deferred[Any]:
    return defer.Deferred.fromCoroutine(
        sender.send_message(" ".join(to_path), data, len(data), **kwargs)
    ).addTimeout(30, reactor)


async def raw_tls(relay: Any, pki: RelayPKI) -> RawProtocol:
    return await testing.raw_tls(reactor, "127.0.0.1", relay.port, pki.ca_pem)


@pytest_twisted.ensureDeferred
async def test_silent_next_hop_gives_408_report(start_relay: RelayFactory, pki: RelayPKI) -> None:
    relay = await start_relay(extra={("msrp", "transaction_timeout_seconds"): "1"})
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", trust=pki.ca_pem)
    bob.refuse_with = 0  # answer nothing
    setattr(bob, "_respond", lambda request, code: None)  # noqa: B010
    await send(alice, [*alice_auth.use_path, *path_to(bob, bob_auth)], b"hello?", message_id="t")
    report = await alice.wait_report("t").addTimeout(5, reactor)
    assert (report.headers.get("Status") or "").startswith("000 408")
    assert report.headers.get("Byte-Range") == "1-6/6"


@pytest_twisted.ensureDeferred
async def test_idle_new_connection_is_closed_after_probation(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay(extra={("msrp", "probation_seconds"): "1"})
    raw = await raw_tls(relay, pki)
    await raw.closed.addTimeout(5, reactor)


@pytest_twisted.ensureDeferred
async def test_repeated_failures_on_probation_close_the_connection(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay()
    raw = await raw_tls(relay, pki)
    ours = f"msrps://127.0.0.1:{relay.port}/doesnotexist;tcp"
    for index in range(3):
        raw.transport.write(  # type: ignore[union-attr]
            f"MSRP bad{index}x SEND\r\nTo-Path: {ours} msrp://a.invalid:1/x;tcp\r\n"
            f"From-Path: msrp://b.invalid:1/y;tcp\r\nMessage-ID: m\r\n"
            f"-------bad{index}x$\r\n".encode()
        )
    await raw.closed.addTimeout(5, reactor)
    assert raw.received.count(b" 481 ") == 3


@pytest_twisted.ensureDeferred
async def test_failed_auths_close_client_connection(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay()
    mallory = await connect(reactor, relay.uri, pki.ca_pem)
    for _ in range(3):
        with pytest.raises(MSRPClientError):
            await defer.Deferred.fromCoroutine(mallory.auth([relay.uri], "mallory", "guess"))
        if not mallory.connected:
            break
    await mallory.lost.addTimeout(5, reactor)


@pytest_twisted.ensureDeferred
async def test_session_expires(start_relay: RelayFactory, pki: RelayPKI) -> None:
    relay = await start_relay(extra={("msrp", "session_expires_min_seconds"): "1"})
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    bob = await connect(reactor, relay.uri, pki.ca_pem)
    bob_auth = await defer.Deferred.fromCoroutine(
        bob.auth([relay.uri], "bob", USERS["bob"], expires_seconds=1)
    )
    assert bob_auth.expires_seconds == 1
    await deferLater(1.2)
    with pytest.raises(MSRPClientError, match="481"):
        await send(alice, [*alice_auth.use_path, *path_to(bob, bob_auth)], b"late")


@pytest_twisted.ensureDeferred
async def test_expires_out_of_range_gets_423(start_relay: RelayFactory, pki: RelayPKI) -> None:
    relay = await start_relay()
    bob = await connect(reactor, relay.uri, pki.ca_pem)
    with pytest.raises(MSRPClientError, match=r"423 .*\(60\)"):
        await defer.Deferred.fromCoroutine(
            bob.auth([relay.uri], "bob", USERS["bob"], expires_seconds=5)
        )
    with pytest.raises(MSRPClientError, match="423"):
        await defer.Deferred.fromCoroutine(
            bob.auth([relay.uri], "bob", USERS["bob"], expires_seconds=10**9)
        )


@pytest_twisted.ensureDeferred
async def test_reconnect_invalidates_client_uri(start_relay: RelayFactory, pki: RelayPKI) -> None:
    relay = await start_relay()
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", trust=pki.ca_pem)
    old_path = path_to(bob, bob_auth)
    bob.transport.loseConnection()  # type: ignore[union-attr]
    await bob.lost
    await deferLater(0.05)
    await client(relay, "bob", trust=pki.ca_pem)
    with pytest.raises(MSRPClientError, match="481"):
        await send(alice, [*alice_auth.use_path, *old_path], b"to the old bob")


class Witness(protocol.Protocol):
    connections: ClassVar[list[Any]] = []

    def connectionMade(self) -> None:
        Witness.connections.append(self.transport)


@pytest_twisted.ensureDeferred
async def test_stranger_cannot_use_relay_to_reach_a_third_party(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay(
        extra={("msrp", "listen"): "ssl:0:interface=127.0.0.1\ntcp:0:interface=127.0.0.1"}
    )
    tcp_port = relay.msrp.ports[1].getHost().port  # type: ignore[attr-defined]
    # A third party the stranger would like to reach through the relay.
    Witness.connections = []
    factory = protocol.Factory.forProtocol(Witness)
    witness_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    evil = f"msrp://127.0.0.1:{witness_port.getHost().port}/victim;tcp"
    sink = RecordingSink()
    alice, alice_auth = await client(relay, "alice", sink, trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", trust=pki.ca_pem)
    stranger = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", tcp_port),
        MSRPClientProtocol("msrp://stranger.invalid:2855/s;tcp"),
    )
    # 1. Through Alice's session towards a third party: refused and delivered
    #    to nobody, neither out nor to Alice (RFC 4976 §6.4); towards the URI
    #    Alice authenticated from, it reaches her.
    with pytest.raises(MSRPClientError, match="403"):
        await send(stranger, [*alice_auth.use_path, evil], b"spam", message_id="s1")
    await send(stranger, path_to(alice, alice_auth), b"hello", message_id="s2")
    assert await sink.wait("s2") == b"hello"
    assert "s1" not in sink.messages
    # 2. Through two of the relay's sessions without owning the first: refused.
    with pytest.raises(MSRPClientError, match="403"):
        await send(stranger, [*alice_auth.use_path, *path_to(bob, bob_auth)], b"x")
    # 3. A made-up session: 481.
    with pytest.raises(MSRPClientError, match="481"):
        await send(stranger, [f"msrps://127.0.0.1:{relay.port}/guessed;tcp", evil], b"x")
    # 4. A session issued to a peer relay (as its AUTH would leave one) at the
    #    third party's address: reachable only as msrps at that exact
    #    authority, and never from the plain listener.
    core = relay.relay.core
    owner = f"msrps://127.0.0.1:{witness_port.getHost().port}/peer;tcp"
    peer_session = core.session_uri(
        core.sessions.create_for_relay(MSRPURI.parse(owner), "alice", 600)
    )
    for sender, next_hop in [(stranger, evil), (stranger, owner), (alice, evil)]:
        with pytest.raises(MSRPClientError, match="403"):
            await send(sender, [peer_session, next_hop], b"x")
    # 5. AUTH over plain TCP is refused (RFC 4976 §9.2).
    response = await stranger.request("AUTH", f"msrp://127.0.0.1:{tcp_port};tcp")
    assert response.code == 403
    # 6. A request for some other host: the connection is dropped (§6.2).
    stranger.request("SEND", f"{evil} {evil}", [("Message-ID", "z")], b"x")
    await stranger.lost.addTimeout(5, reactor)
    await deferLater(0.1)
    assert Witness.connections == []
    await witness_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_small_message_crosses_while_huge_one_is_in_flight(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay()
    sink = RecordingSink(keep=False)
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    carol, carol_auth = await client(relay, "carol", trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", sink, trust=pki.ca_pem)
    bob_path = path_to(bob, bob_auth)
    huge = os.urandom(1 << 20) * 64  # 64 MiB in one chunk
    big = send(
        alice, [*alice_auth.use_path, *bob_path], huge, chunk_bytes=len(huge), message_id="big"
    )
    # Wait until the big message is flowing to Bob.
    while sink.counts.get("big", 0) < (4 << 20):
        await deferLater(0.005)
    sent_at = reactor.seconds()
    await send(carol, [*carol_auth.use_path, *bob_path], b"tiny", message_id="small")
    await sink.wait("small")
    delay = sink.arrived_at["small"] - sent_at
    assert "big" not in sink.arrived_at, "the small message waited for the big one"
    assert delay < 0.5, f"small message took {delay:.3f}s"
    await big
    await sink.wait("big", timeout=60)
    assert sink.counts["big"] == len(huge)
    import hashlib

    assert sink.digests["big"].digest() == hashlib.sha256(huge).digest()


@pytest_twisted.ensureDeferred
async def test_recipient_gone_mid_transfer_becomes_481_report(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay()
    sink = RecordingSink(keep=False)
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", sink, trust=pki.ca_pem)
    data = os.urandom(1 << 20) * 16
    sending = send(
        alice,
        [*alice_auth.use_path, *path_to(bob, bob_auth)],
        data,
        chunk_bytes=len(data),
        message_id="cut",
    )
    while sink.counts.get("cut", 0) < (1 << 20):
        await deferLater(0.005)
    bob.transport.abortConnection()  # type: ignore[union-attr]
    report = await alice.wait_report("cut").addTimeout(10, reactor)
    assert (report.headers.get("Status") or "").startswith("000 481")
    first, _, rest = (report.headers.get("Byte-Range") or "").partition("-")
    assert int(first) >= 1 and rest.endswith(f"/{len(data)}")
    # The chunk failed before its end-line: its one response is that failure.
    with pytest.raises(MSRPClientError, match="481"):
        await sending
    # Bob's session went with his connection.
    with pytest.raises(MSRPClientError, match="481"):
        await send(alice, [*alice_auth.use_path, *path_to(bob, bob_auth)], b"more")


@pytest.mark.parametrize("paths_first", [True, False])
@pytest_twisted.ensureDeferred
async def test_eight_mib_header_gets_400_then_close(
    start_relay: RelayFactory, pki: RelayPKI, paths_first: bool
) -> None:
    relay = await start_relay()
    raw = await raw_tls(relay, pki)
    ours = f"msrps://127.0.0.1:{relay.port}/doesnotexist;tcp"
    head = b"MSRP huge0001 SEND\r\n"
    if paths_first:
        head += f"To-Path: {ours}\r\nFrom-Path: msrps://127.0.0.1:9/c;tcp\r\nX-Big: ".encode()
    else:
        head += b"To-Path: "
    raw.transport.write(head + b"v" * (8 << 20) + b"\r\n\r\n")  # type: ignore[union-attr]
    await raw.closed.addTimeout(10, reactor)
    if paths_first:
        assert raw.received.startswith(b"MSRP huge0001 400 header block too large\r\n")
        assert b"To-Path: msrps://127.0.0.1:9/c;tcp\r\n" in raw.received
    else:
        assert raw.received == b""  # nothing to address a 400 with
