"""The 1x1 MSRP latency, from a generator that does no more than it must.

Run by hand (not part of the tests)::

    python -m bench.msrp_ping [--seconds 5] [--rounds 5] [--awake]

``bench.msrp_bench`` measures the 1x1 round trip with its asyncio generator, whose
own turns (event loop, ``asyncio.sslproto``) are part of every figure.  This probe
drives the same exchange from plain non-blocking ``ssl`` sockets and one
``selectors`` loop, so what is left is the relay (or the byte pipe), the kernel, and
the wake-ups between the processes.  Each round measures the relay and then the pipe
(``bench.pipe``) for ``--seconds`` each, so every pair of figures shares the
machine's state; the output is one JSON line.

``--awake`` is a diagnosis, not a way to meet a target: it runs one ``nice 19`` busy
loop per core, which yields at once to the relay and the generator but keeps the
cores from going idle.  On a virtual machine whose idle cores halt, the difference
between a run with and without it is what the wake-ups cost.

The exchange is the small-message load's: A sends a 100-byte SEND with
``Success-Report: yes``, B answers 200 and sends the REPORT, and the round trip ends
when the REPORT reaches A.  Through the relay it is SEND A→relay→B and REPORT
B→relay→A, with the relay's own 200 to A and B's 200 ending at the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import selectors
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.msrp_bench import (
    HOST,
    SMALL_BODY,
    TARGETS,
    USERS,
    PipeProcess,
    RelayProcess,
    _header,
    auth_authorization,
    client_context,
    local_uri,
    log,
    percentile,
)
from bench.report import report_head
from relayd.testing import make_pki

FRAME_END = b"$\r\n"  # every frame here is whole: no body holds a "$"


class Peer:
    """A connected socket with its read buffer; ``frames`` splits what has come in."""

    def __init__(self, port: int, context: ssl.SSLContext | None) -> None:
        sock = socket.create_connection((HOST, port), timeout=15)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = (
            context.wrap_socket(sock, server_hostname=HOST) if context is not None else sock
        )
        self.local = local_uri(context is not None)
        self.buffer = b""

    def exchange(self, frame: bytes, tid: bytes) -> bytes:
        """Blocking: send a request and return the head of the response to ``tid``."""
        self.sock.sendall(frame)
        marker = b"-------" + tid + FRAME_END
        while marker not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed during set-up")
            self.buffer += data
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def read_ready(self) -> None:
        """Take everything readable now, including what TLS already decrypted."""
        sock = self.sock
        while True:
            try:
                data = sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            if not data:
                raise ConnectionError("connection closed during the measurement")
            self.buffer += data
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return

    def frames(self) -> list[bytes]:
        *whole, self.buffer = self.buffer.split(FRAME_END)
        return whole

    def close(self) -> None:
        self.sock.close()


def _auth(peer: Peer, relay_uri: str, user: str) -> bytes:
    """Digest AUTH (401, then 200); returns the Use-Path."""
    start = b"AUTH\r\nTo-Path: %s\r\nFrom-Path: %s\r\n" % (relay_uri.encode(), peer.local)
    tid = secrets.token_hex(6).encode()
    head = peer.exchange(b"MSRP %s %s-------%s$\r\n" % (tid, start, tid), tid)
    authorization = auth_authorization(head, relay_uri, user, USERS[user])
    tid = secrets.token_hex(6).encode()
    frame = b"MSRP %s %sAuthorization: %s\r\n-------%s$\r\n" % (
        tid,
        start,
        authorization.encode(),
        tid,
    )
    head = peer.exchange(frame, tid)
    if b" 200 " not in head[: head.find(b"\r\n")]:
        raise RuntimeError(f"AUTH refused: {head[:200]!r}")
    return _header(head, b"Use-Path").strip()


def _answer(b: Peer, frame: bytes) -> bytes:
    """B's 200 and success REPORT for one SEND, in one write."""
    tid = frame[5 : frame.find(b" ", 5)]
    from_path = _header(frame, b"From-Path")
    previous = from_path.split(b" ", 1)[0]
    message_id = _header(frame, b"Message-ID")
    return (
        b"MSRP %s 200 OK\r\nTo-Path: %s\r\nFrom-Path: %s\r\n-------%s$\r\n"
        b"MSRP r%s REPORT\r\nTo-Path: %s\r\nFrom-Path: %s\r\nMessage-ID: %s\r\n"
        b"Byte-Range: 1-100/100\r\nStatus: 000 200 OK\r\n-------r%s$\r\n"
        % (tid, previous, b.local, tid, tid, from_path, b.local, message_id, tid)
    )


def ping(a: Peer, b: Peer, to_path: bytes, seconds: float) -> list[int]:
    """Round trips in nanoseconds, one message in flight, for ``seconds``."""
    for peer in (a, b):
        peer.sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(a.sock, selectors.EVENT_READ, a)
    selector.register(b.sock, selectors.EVENT_READ, b)
    rtts: list[int] = []
    count = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            count += 1
            tid = b"p%010d" % count
            started = time.perf_counter_ns()
            a.sock.send(
                b"MSRP %s SEND\r\nTo-Path: %s\r\nFrom-Path: %s\r\nMessage-ID: %s\r\n"
                b"Success-Report: yes\r\nByte-Range: 1-100/100\r\n"
                b"Content-Type: text/plain\r\n\r\n%s\r\n-------%s$\r\n"
                % (tid, to_path, a.local, tid, SMALL_BODY, tid)
            )
            reported = False
            while not reported:
                for key, _ in selector.select(5):
                    key.data.read_ready()
                for frame in b.frames():
                    if frame[5 : frame.find(b"\r\n")].endswith(b" SEND"):
                        b.sock.send(_answer(b, frame))
                for frame in a.frames():
                    if b" REPORT\r\n" in frame[: frame.find(b"\r\n") + 2]:
                        if b"Status: 000 200" not in frame:
                            raise RuntimeError(f"failure REPORT: {frame[:300]!r}")
                        reported = True
            rtts.append(time.perf_counter_ns() - started)
    finally:
        selector.close()
    return rtts


def _summary(rtts: list[int], cpu_seconds: float | None) -> dict[str, Any]:
    rtts.sort()
    row: dict[str, Any] = {
        "messages": len(rtts),
        "rtt_p50_ms": round(percentile(rtts, 0.50), 3),
        "rtt_p99_ms": round(percentile(rtts, 0.99), 3),
    }
    if cpu_seconds is not None:
        row["server_cpu_us_per_msg"] = round(cpu_seconds * 1e6 / len(rtts), 1)
    return row


def measure_relay(relay: RelayProcess, context: ssl.SSLContext, seconds: float) -> dict[str, Any]:
    a, b = Peer(relay.tls_port, context), Peer(relay.tls_port, context)
    try:
        to_path = b" ".join((_auth(a, relay.uri, "alice"), _auth(b, relay.uri, "bob"), b.local))
        before = relay.cpu()
        rtts = ping(a, b, to_path, seconds)
        return _summary(rtts, relay.cpu() - before)
    finally:
        a.close()
        b.close()


def measure_pipe(pipe: PipeProcess, context: ssl.SSLContext, seconds: float) -> dict[str, Any]:
    a, b = Peer(pipe.tls_port, context), Peer(pipe.tls_port, context)
    try:
        key = secrets.token_hex(8).encode()
        for peer in (a, b):
            peer.sock.sendall(b"PAIR " + key + b"\r\n")
        time.sleep(0.2)  # the pipe joins the two connections when both have said PAIR
        hops = b"msrps://127.0.0.1:1/%s;tcp msrps://127.0.0.1:1/%s;tcp" % (
            secrets.token_urlsafe(16).encode(),
            secrets.token_urlsafe(16).encode(),
        )
        before = pipe.cpu()
        rtts = ping(a, b, hops + b" " + b.local, seconds)
        return _summary(rtts, pipe.cpu() - before)
    finally:
        a.close()
        b.close()


def _spinners() -> list[subprocess.Popen[bytes]]:
    """One lowest-priority busy loop per core (``--awake``)."""
    command = ["nice", "-n", "19", sys.executable, "-c", "while True: pass"]
    return [subprocess.Popen(command) for _ in range(os.cpu_count() or 1)]


async def run(seconds: float, rounds: int, awake: bool) -> dict[str, Any]:
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="msrp-ping-") as tmp:
        folder = Path(tmp)
        pki = make_pki(folder / "pki")
        context = client_context(pki)
        relay = RelayProcess(folder / "relay", pki)
        pipe = PipeProcess(folder / "pipe", pki)
        spinners: list[subprocess.Popen[bytes]] = []
        try:
            await relay.start()
            await pipe.start()
            if awake:
                spinners = _spinners()
            rows: list[dict[str, Any]] = []
            for number in range(1, rounds + 1):
                relay_row = measure_relay(relay, context, seconds)
                pipe_row = measure_pipe(pipe, context, seconds)
                log(
                    f"round {number}: relay p50 {relay_row['rtt_p50_ms']} ms"
                    f" p99 {relay_row['rtt_p99_ms']} ms"
                    f" ({relay_row['server_cpu_us_per_msg']} us/msg);"
                    f" pipe p50 {pipe_row['rtt_p50_ms']} ms p99 {pipe_row['rtt_p99_ms']} ms"
                )
                rows.append({"round": number, "relay_tls": relay_row, "pipe_tls": pipe_row})
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
            await relay.stop()
            await pipe.stop()
    target = TARGETS["latency_p50_ms"]
    added = sorted(
        round(r["relay_tls"]["rtt_p50_ms"] - r["pipe_tls"]["rtt_p50_ms"], 3) for r in rows
    )
    return {
        **report_head("msrp_ping", started, "relay and pipe alternate; one generator here"),
        "seconds_per_measurement": seconds,
        "cores_kept_awake": awake,
        "rounds": rows,
        "relay_p50_under_target": sum(r["relay_tls"]["rtt_p50_ms"] < target for r in rows),
        "pipe_p50_under_target": sum(r["pipe_tls"]["rtt_p50_ms"] < target for r in rows),
        "relay_added_p50_ms": {"min": added[0], "median": added[len(added) // 2], "max": added[-1]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.msrp_ping", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="relay, then pipe, this many times")
    parser.add_argument(
        "--awake", action="store_true", help="keep every core busy at nice 19 (a diagnosis)"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be positive and --rounds at least 1")
    print(json.dumps(asyncio.run(run(args.seconds, args.rounds, args.awake))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
