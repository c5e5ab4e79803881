"""In-process cost of one small-message cycle through the relay, without sockets or TLS.

``python -m bench.msrp_cycle [--messages N] [--batch K] [--profile FILE]``

Two clients AUTH to a real ``MSRPRelay`` over ``StringTransport``s, then A
sends 100-byte SENDs with ``Success-Report: yes`` and B answers each
forwarded frame with 200 and a success REPORT, exactly as the load generator
of ``bench.msrp_bench`` does.  Only the relay's ``dataReceived`` calls are
timed, so the figure is the relay's own Python work per SEND / 200 / REPORT
cycle: reproducible on a busy machine, unlike the socket benchmark, and the
quickest way to see what a change to the MSRP code path is worth.  ``--batch``
puts K SENDs (and then K answers) in one read, as under load.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relayd.config import load_config
from relayd.digest import DigestAuthenticator, answer_challenge, ha1
from relayd.msrp.connection import MSRPConnection
from relayd.msrp.relay import AuthPolicy, RelayCore
from relayd.msrp.service import relay_limits
from relayd.msrp.transport import MSRPRelay

HOST = "relay.example.com"
RELAY_URI = f"msrps://{HOST}:2855;tcp"
BODY = b"x" * 100
PASSWORD = "pw"  # noqa: S105 - every in-process client's


class _Transport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def _header(head: bytes, name: bytes) -> bytes:
    start = head.index(b"\r\n" + name + b": ") + len(name) + 4
    return head[start : head.index(b"\r\n", start)]


class Cycle:
    """A relay with two authenticated clients, alice (sender) and bob (receiver)."""

    def __init__(self) -> None:
        clock = MemoryReactorClock()
        config = load_config(None, None).msrp
        digest = DigestAuthenticator(HOST, lambda user, realm: ha1(user, realm, PASSWORD), clock)
        policy = AuthPolicy(HOST, 600, 60, 3600)
        core = RelayCore(clock, HOST, policy, digest)
        core.add_local_address(2855, tls=True)
        self.relay = MSRPRelay(clock, core, relay_limits(config))
        self.a, self.a_transport, self.a_uri, a_use = self._client("alice", 40001)
        self.b, self.b_transport, self.b_uri, b_use = self._client("bob", 40002)
        self.to_path = f"{a_use} {b_use} {self.b_uri}".encode()
        self.counter = 0

    def _client(self, user: str, port: int) -> tuple[MSRPConnection, StringTransport, str, str]:
        connection = MSRPConnection(self.relay, inbound=True, tls=True)
        transport = _Transport(peerAddress=IPv4Address("TCP", "192.0.2.1", port))
        connection.makeConnection(transport)
        uri = f"msrps://{user}.example.com:7000/s;tcp"
        head = f"MSRP a1{user} AUTH\r\nTo-Path: {RELAY_URI}\r\nFrom-Path: {uri}\r\n"
        connection.dataReceived(f"{head}-------a1{user}$\r\n".encode())
        challenge = _header(transport.value(), b"WWW-Authenticate").decode()
        transport.clear()
        authorization = answer_challenge(
            challenge,
            username=user,
            password=PASSWORD,
            method="AUTH",
            uri=RELAY_URI,
            cnonce="c0ffee",
        ).authorization
        connection.dataReceived(
            f"{head}Authorization: {authorization}\r\n-------a1{user}$\r\n".encode()
        )
        use_path = _header(transport.value(), b"Use-Path").decode()
        transport.clear()
        return connection, transport, uri, use_path

    def sends(self, count: int) -> bytes:
        out: list[bytes] = []
        for _ in range(count):
            self.counter += 1
            tid = b"s%011x" % self.counter
            out += (b"MSRP ", tid, b" SEND\r\nTo-Path: ", self.to_path, b"\r\nFrom-Path: ")
            out += (self.a_uri.encode(), b"\r\nMessage-ID: ", tid)
            out.append(b"\r\nSuccess-Report: yes\r\nByte-Range: 1-100/100\r\n")
            out += (b"Content-Type: text/plain\r\n\r\n", BODY, b"\r\n-------", tid, b"$\r\n")
        return b"".join(out)

    def answers(self, forwarded: bytes) -> bytes:
        """B's 200 and success REPORT for every SEND frame the relay wrote to B."""
        out: list[bytes] = []
        b_uri = self.b_uri.encode()
        for frame in forwarded.split(b"MSRP ")[1:]:
            tid = frame[: frame.index(b" ")]
            from_path = _header(frame, b"From-Path")
            previous = from_path.split(b" ", 1)[0]
            out += (b"MSRP ", tid, b" 200 OK\r\nTo-Path: ", previous, b"\r\nFrom-Path: ")
            out += (b_uri, b"\r\n-------", tid, b"$\r\n")
            rtid = b"r" + tid
            out += (b"MSRP ", rtid, b" REPORT\r\nTo-Path: ", from_path, b"\r\nFrom-Path: ")
            out += (b_uri, b"\r\nMessage-ID: ", _header(frame, b"Message-ID"))
            out += (b"\r\nByte-Range: 1-100/100\r\nStatus: 000 200 OK\r\n-------", rtid, b"$\r\n")
        return b"".join(out)

    def run(self, messages: int, batch: int) -> float:
        """Relay nanoseconds spent per message over ``messages`` messages."""
        spent = 0
        clock = time.perf_counter_ns
        for _ in range(messages // batch):
            data = self.sends(batch)
            started = clock()
            self.a.dataReceived(data)
            spent += clock() - started
            forwarded = self.b_transport.value()
            self.b_transport.clear()
            answers = self.answers(forwarded)
            started = clock()
            self.b.dataReceived(answers)
            spent += clock() - started
            back = self.a_transport.value()
            self.a_transport.clear()
            if back.count(b" REPORT\r\n") != batch or back.count(b" 200 OK\r\nTo-Path: ") != batch:
                raise AssertionError(f"unexpected answer to alice: {back[:300]!r}")
        return spent / (messages // batch * batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.msrp_cycle")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1, help="SENDs per read")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many runs")
    parser.add_argument("--profile", default=None, help="cProfile one run, stats to this file")
    args = parser.parse_args(argv)
    cycle = Cycle()
    cycle.run(1000, args.batch)  # warm caches
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        cycle.run(args.messages, args.batch)
        profiler.disable()
        profiler.dump_stats(args.profile)
    best = min(cycle.run(args.messages, args.batch) for _ in range(args.repeat))
    result: dict[str, Any] = {"batch": args.batch, "relay_us_per_message": round(best / 1000, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
