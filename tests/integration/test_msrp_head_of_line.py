"""A large transfer towards a slow reader must not hold up a small message.

RFC 4976 §6.4 / RFC 4975 §7.1: the relay re-chunks large SENDs so other
messages can go in between.  That only helps if little enough is queued in
front of the new message: in the relay's own buffers, in the TLS layer, and in
the kernel's send buffer.  Here a reader takes 1 MiB/s through a 64 KiB
receive buffer, so every KiB queued towards it is a millisecond of delay.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import ssl
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from relayd.digest import ha1, parse_challenge, request_digest
from relayd.msrp.message import MSRPRequest, MSRPResponse
from relayd.msrp.parser import BodyChunk, MessageEnd, MessageStart, MSRPParser
from relayd.testing import RelayPKI

from .conftest import USERS, RelayFactory, client, deferLater

pytestmark = pytest.mark.integration

RATE = 1024 * 1024  # bytes per second B reads
BIG = 8 * 1024 * 1024
DELAY_LIMIT = 0.2


class ThrottledReader:
    """Client B on plain blocking sockets: two sessions on one connection, slow reads."""

    def __init__(self, port: int, ca_pem: bytes) -> None:
        self.relay_uri = f"msrps://127.0.0.1:{port};tcp"
        self.local = f"msrps://127.0.0.1:1/{secrets.token_urlsafe(8)};tcp"
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect, so the window scale it announces is the small one.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.settimeout(30)
        raw.connect(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = ssl.create_default_context(cadata=ca_pem.decode())
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.parser = MSRPParser()
        self.responses: list[MSRPResponse] = []
        self.received = 0
        self.digests: dict[str, hashlib._Hash] = {}
        self.sizes: dict[str, int] = {}
        self.arrived: dict[str, float] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._current = ""

    # -- set-up: two AUTHs on the one connection (blocking, run in a thread) --------------

    def sessions(self, count: int) -> list[str]:
        return [self._auth() for _ in range(count)]

    def _auth(self) -> str:
        challenge = self._request(b"")
        params = parse_challenge(challenge.headers.get("WWW-Authenticate") or "")
        realm, nonce, cnonce = params["realm"], params["nonce"], secrets.token_hex(8)
        digest = request_digest(
            ha1("bob", realm, USERS["bob"]),
            nonce=nonce,
            nc="00000001",
            cnonce=cnonce,
            qop="auth",
            method="AUTH",
            uri=self.relay_uri,
        )
        authorization = (
            f'Digest username="bob", realm="{realm}", nonce="{nonce}", uri="{self.relay_uri}", '
            f'qop=auth, nc=00000001, cnonce="{cnonce}", response="{digest}"'
        )
        answer = self._request(f"Authorization: {authorization}\r\n".encode())
        assert answer.code == 200, answer.comment
        return (answer.headers.get("Use-Path") or "").strip()

    def _request(self, extra: bytes) -> MSRPResponse:
        tid = secrets.token_hex(6).encode()
        self.sock.sendall(
            b"MSRP %s AUTH\r\nTo-Path: %s\r\nFrom-Path: %s\r\n%s-------%s$\r\n"
            % (tid, self.relay_uri.encode(), self.local.encode(), extra, tid)
        )
        while not self.responses:
            self._handle(self.sock.recv(65536))
        return self.responses.pop()

    # -- the measurement: read at RATE, answer every SEND frame ----------------------------

    def run(self) -> None:
        try:
            started = time.monotonic()
            while not self.stop.is_set():
                data = self.sock.recv(16384)
                if not data:
                    return
                self._handle(data)
                self.received += len(data)
                pause = started + self.received / RATE - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
        except BaseException as e:  # reported by the test
            if not self.stop.is_set():
                self.error = e

    def _handle(self, data: bytes) -> None:
        for event in self.parser.feed(data):
            if isinstance(event, MessageStart):
                message = event.message
                if isinstance(message, MSRPResponse):
                    self.responses.append(message)
                    continue
                assert isinstance(message, MSRPRequest) and message.method == "SEND"
                self._current = message.headers.get("Message-ID") or ""
                self.digests.setdefault(self._current, hashlib.sha256())
                self.sizes.setdefault(self._current, 0)
                previous = (message.headers.get("From-Path") or "").split(" ", 1)[0]
                self.sock.sendall(
                    b"MSRP %s 200 OK\r\nTo-Path: %s\r\nFrom-Path: %s\r\n-------%s$\r\n"
                    % (
                        message.tid.encode(),
                        previous.encode(),
                        self.local.encode(),
                        message.tid.encode(),
                    )
                )
            elif isinstance(event, BodyChunk):
                self.digests[self._current].update(event.data)
                self.sizes[self._current] += len(event.data)
            elif isinstance(event, MessageEnd) and event.flag == b"$":
                self.arrived[self._current] = time.monotonic()


async def _until(condition: object, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(0.01)


@pytest_twisted.ensureDeferred
async def test_small_send_overtakes_large_transfer_to_slow_reader(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay()
    b = await threads.deferToThread(ThrottledReader, relay.port, pki.ca_pem)
    first, second = await threads.deferToThread(b.sessions, 2)
    reader = threading.Thread(target=b.run, daemon=True)
    reader.start()
    try:
        c1, c1_auth = await client(relay, "alice", trust=pki.ca_pem)
        c2, c2_auth = await client(relay, "carol", trust=pki.ca_pem)
        big = os.urandom(BIG)
        transfer = defer.Deferred.fromCoroutine(
            c1.send_message(
                " ".join([*c1_auth.use_path, first, b.local]),
                big,
                len(big),
                chunk_bytes=32768,
                message_id="big",
            )
        ).addTimeout(60, reactor)
        # Let every queue on the way to B fill before the small message goes.
        await _until(lambda: b.received > 2 * 1024 * 1024 or b.error, 20)
        sent_at = time.monotonic()
        await defer.Deferred.fromCoroutine(
            c2.send_message(
                " ".join([*c2_auth.use_path, second, b.local]),
                b"small message!!",
                15,
                message_id="small",
            )
        ).addTimeout(10, reactor)
        await _until(lambda: "small" in b.arrived or b.error, 10)
        delay = b.arrived["small"] - sent_at
        queued = BIG - b.sizes["big"]
        print(
            f"\nsmall SEND delay behind the 8 MiB transfer: {delay * 1000:.0f} ms"
            f" (big message {b.sizes['big']} of {BIG} bytes at B then)"
        )
        await transfer
        await _until(lambda: "big" in b.arrived or b.error, 20)
        assert b.error is None, b.error
        assert b.sizes["big"] == BIG
        assert b.digests["big"].hexdigest() == hashlib.sha256(big).hexdigest()
        assert b.digests["small"].digest() == hashlib.sha256(b"small message!!").digest()
        assert queued > 0, "the transfer had ended before the small message: nothing measured"
        assert delay < DELAY_LIMIT, f"small SEND took {delay * 1000:.0f} ms behind the transfer"
    finally:
        b.stop.set()
        b.sock.close()
