"""Hostile bytes over real TLS: the relay survives and still serves good clients."""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from relayd.testing import RelayPKI

from .conftest import RecordingSink, RelayFactory, client, deferLater, path_to
from .test_msrp_abuse import raw_tls

pytestmark = pytest.mark.integration


def hostile_inputs(relay_uri: str, seed: int = 4976) -> list[bytes]:
    valid = (
        f"MSRP fz1234 SEND\r\nTo-Path: {relay_uri} msrp://x.invalid:1/a;tcp\r\n"
        "From-Path: msrp://y.invalid:1/b;tcp\r\nMessage-ID: q\r\nByte-Range: 1-5/5\r\n"
        "Content-Type: text/plain\r\n\r\nhello\r\n-------fz1234$\r\n"
    ).encode()
    crafted = [
        b"MSRP",
        b"\r\n" * 100,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"MSRP " + b"a" * 10000 + b" SEND\r\n",
        b"MSRP abcd SEND\r\n" + b"X-Long: " + b"v" * 100000 + b"\r\n",
        b"MSRP abcd SEND\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(500)),
        b"MSRP abcd AUTH\r\nTo-Path: \xff\xfe\r\nFrom-Path: x\r\n-------abcd$\r\n",
        b"MSRP abcd AUTH\r\nTo-Path: msrps://[::1;tcp\r\nFrom-Path: msrp://a:1/b;tcp\r\n-------abcd$\r\n",
        valid.replace(b"Byte-Range: 1-5/5", b"Byte-Range: 9-2/1"),
        valid.replace(b"Byte-Range: 1-5/5", b"Byte-Range: 1-99999999999999999999/*"),
        valid.replace(b"$\r\n", b"?\r\n") + valid,
        valid.replace(b"Message-ID: q\r\n", b""),
        valid.replace(b"AUTH", b"AUTH") + b"\x00" * 1000,
        b"MSRP abcd AUTH\r\nTo-Path: "
        + relay_uri.encode()
        + b"\r\nFrom-Path: msrp://a.invalid:1/b;tcp\r\n"
        b"Authorization: Digest "
        + b"x=" * 5000
        + b"\r\nExpires: 99999999999999999\r\n-------abcd$\r\n",
    ]
    rng = random.Random(seed)
    mutated = []
    for _ in range(40):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.4:
                data[position] = rng.randrange(256)
            elif choice < 0.7:
                del data[position : position + rng.randint(1, 20)]
            else:
                data[position:position] = bytes(
                    rng.randrange(256) for _ in range(rng.randint(1, 20))
                )
        mutated.append(bytes(data))
    return crafted + mutated


@pytest_twisted.ensureDeferred
async def test_hostile_input_then_good_clients_are_served(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay(extra={("msrp", "probation_seconds"): "2"})
    closed_total: list[int] = []
    for batch_start in range(0, 54, 6):
        connections = []
        for data in hostile_inputs(f"msrps://127.0.0.1:{relay.port};tcp")[
            batch_start : batch_start + 6
        ]:
            raw = await raw_tls(relay, pki)
            raw.transport.write(data)  # type: ignore[union-attr]
            connections.append(raw)
        await deferLater(0.05)
        closed_by_relay = 0
        for raw in connections:
            if raw.closed.called:
                closed_by_relay += 1
            else:
                raw.transport.abortConnection()  # type: ignore[union-attr]
        closed_total.append(closed_by_relay)
    await deferLater(0.1)
    sink = RecordingSink()
    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", sink, trust=pki.ca_pem)
    await defer.Deferred.fromCoroutine(
        alice.send_message(
            " ".join([*alice_auth.use_path, *path_to(bob, bob_auth)]),
            b"still here",
            10,
            message_id="after",
        )
    ).addTimeout(10, reactor)
    assert await sink.wait("after") == b"still here"
    # Unparseable streams are cut off at once rather than left to probation.
    assert sum(closed_total) >= 10
