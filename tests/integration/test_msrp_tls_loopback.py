"""Two clients and one or two relays over real loopback TLS."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from relayd.digest import answer_challenge, parse_auth_info
from relayd.msrp.client import MSRPClientError, MSRPClientProtocol, connect
from relayd.testing import RelayPKI

from .conftest import USERS, RecordingSink, RelayFactory, client, deferLater, path_to

pytestmark = pytest.mark.integration


def send(
    sender: MSRPClientProtocol,
    to_path: list[str],
    data: bytes,
    chunk_bytes: int = 65536,
    success_report: bool = False,
    failure_report: str = "yes",
    message_id: str | None = None,
) -> defer.Deferred[object]:
    return defer.Deferred.fromCoroutine(
        sender.send_message(
            " ".join(to_path),
            data,
            len(data),
            chunk_bytes=chunk_bytes,
            success_report=success_report,
            failure_report=failure_report,
            message_id=message_id,
        )
    ).addTimeout(30, reactor)


@pytest_twisted.ensureDeferred
async def test_auth_returns_use_path_and_expires(start_relay: RelayFactory, pki: RelayPKI) -> None:
    relay = await start_relay()
    protocol, auth = await client(relay, "alice", trust=pki.ca_pem)
    assert len(auth.use_path) == 1
    assert auth.use_path[0].startswith(f"msrps://127.0.0.1:{relay.port}/")
    assert auth.expires_seconds == 1800
    assert "nextnonce" in protocol.last_auth_info
    protocol.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_auth_without_digest_uri_as_blink_sends_it(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    # RFC 4976 §5.1's example and the Blink / SIP SIMPLE client stack send no
    # uri=: the digest-uri is the To-Path URI, for the response and rspauth.
    relay = await start_relay()
    protocol = await connect(reactor, relay.uri, pki.ca_pem)
    first = await protocol.request("AUTH", relay.uri).addTimeout(5, reactor)
    assert first.code == 401
    answer = answer_challenge(
        first.headers.get("WWW-Authenticate") or "",
        username="alice",
        password=USERS["alice"],
        method="AUTH",
        uri=relay.uri,
    )
    # As msrplib does: no uri=, and the challenge's opaque copied unconditionally.
    authorization = answer.authorization.replace(f'uri="{relay.uri}", ', "")
    assert "uri=" not in authorization and "opaque=" in authorization
    second = await protocol.request(
        "AUTH", relay.uri, [("Authorization", authorization)]
    ).addTimeout(5, reactor)
    assert (second.code, second.comment) == (200, "OK")
    assert (second.headers.get("Use-Path") or "").startswith(f"msrps://127.0.0.1:{relay.port}/")
    info = parse_auth_info(second.headers.get("Authentication-Info") or "")
    assert info["rspauth"] == answer.rspauth
    protocol.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_two_clients_through_one_relay(start_relay: RelayFactory, pki: RelayPKI) -> None:
    relay = await start_relay()
    sink = RecordingSink()
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", sink, trust=pki.ca_pem)
    to_path = [*alice_auth.use_path, *path_to(bob, bob_auth)]
    await send(alice, to_path, b"Hello Bob", success_report=True, message_id="m1")
    assert await sink.wait("m1") == b"Hello Bob"
    report = await alice.wait_report("m1").addTimeout(5, reactor)
    assert report.headers.get("Status") == "000 200 OK"
    assert report.headers.get("Byte-Range") == "1-9/9"


@pytest_twisted.ensureDeferred
async def test_closed_connections_are_freed_without_waiting_for_the_collector(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    """Two clients that wrote to each other: the relay caches a route on each
    connection naming the other. Once both are gone, nothing may keep them (nor
    their TLS state) alive until a full garbage collection: under churn that
    held hundreds of megabytes."""
    relay = await start_relay()
    alice_sink, bob_sink = RecordingSink(), RecordingSink()
    alice, alice_auth = await client(relay, "alice", alice_sink, trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", bob_sink, trust=pki.ca_pem)
    await send(alice, [*alice_auth.use_path, *path_to(bob, bob_auth)], b"hi", message_id="a")
    await send(bob, [*bob_auth.use_path, *path_to(alice, alice_auth)], b"ho", message_id="b")
    assert await bob_sink.wait("a") == b"hi" and await alice_sink.wait("b") == b"ho"
    served = [weakref.ref(connection) for connection in relay.relay.connections]
    assert len(served) == 2
    gc.disable()
    try:
        for protocol in (alice, bob):
            protocol.transport.loseConnection()  # type: ignore[union-attr]
        for _ in range(100):
            if not relay.relay.connections:
                break
            await deferLater(0.02)
        await deferLater(0.05)  # let the reactor drop its own references
        assert [ref() for ref in served] == [None, None]
    finally:
        gc.enable()


@pytest_twisted.ensureDeferred
async def test_binary_message_is_bit_exact_in_many_chunk_sizes(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay(extra={("msrp", "max_chunk_bytes"): "10000"})
    sink = RecordingSink()
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", sink, trust=pki.ca_pem)
    to_path = [*alice_auth.use_path, *path_to(bob, bob_auth)]
    data = os.urandom(300_000) + b"\r\n-------abcd$\r\n" + bytes(range(256)) * 10
    for index, size in enumerate((1000, 4096, 65536, len(data))):
        message_id = f"bin{index}"
        await send(alice, to_path, data, chunk_bytes=size, message_id=message_id)
        assert await sink.wait(message_id) == data


@pytest_twisted.ensureDeferred
async def test_next_hop_unreachable_becomes_report(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay()
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    to_path = [*alice_auth.use_path, "msrp://127.0.0.1:9/nobody;tcp"]
    # The whole chunk arrives before the connect fails: it is answered 200 (no
    # error from send), and the failure comes as a REPORT for all its bytes.
    await send(alice, to_path, b"anyone there?", message_id="lost")
    report = await alice.wait_report("lost").addTimeout(15, reactor)
    status = report.headers.get("Status") or ""
    assert status.startswith("000 481")
    assert report.headers.get("Byte-Range") == "1-13/13"


@pytest_twisted.ensureDeferred
async def test_next_hop_unreachable_mid_chunk_answers_the_chunk_with_481(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay()
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    to_path = [*alice_auth.use_path, "msrp://127.0.0.1:9/nobody;tcp"]
    # The relay stops reading while it connects: the refusal comes long
    # before the end of 8 MiB, so the chunk's one response is the failure.
    data = bytes(8 << 20)
    with pytest.raises(MSRPClientError, match="481"):
        await send(alice, to_path, data, chunk_bytes=len(data), message_id="cut")
    report = await alice.wait_report("cut").addTimeout(15, reactor)
    assert (report.headers.get("Status") or "").startswith("000 481")
    assert report.headers.get("Byte-Range") == f"1-{len(data)}/{len(data)}"


@pytest_twisted.ensureDeferred
async def test_error_response_from_next_hop_becomes_report(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay()
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", trust=pki.ca_pem)
    bob.refuse_with = 415
    to_path = [*alice_auth.use_path, *path_to(bob, bob_auth)]
    await send(alice, to_path, b"<unknown/>", message_id="m415")
    report = await alice.wait_report("m415").addTimeout(5, reactor)
    assert (report.headers.get("Status") or "").startswith("000 415")
    assert report.headers.get("To-Path") == alice.local_uri


@pytest_twisted.ensureDeferred
async def test_failure_report_no_sends_nothing_back(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay()
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", trust=pki.ca_pem)
    bob.refuse_with = 415
    to_path = [*alice_auth.use_path, *path_to(bob, bob_auth)]
    await send(alice, to_path, b"quiet", failure_report="no", message_id="quiet")
    await deferLater(0.3)
    assert not alice._reports
