"""Reference for the MSRP benchmark: a plain asyncio byte pipe, nothing else.

``python -m bench.pipe --cert C --key K`` listens on 127.0.0.1 (one plain TCP
and one TLS port) and joins connections in pairs: each connection's first
line is ``PAIR <key>``, and the two connections that name the same key get
every later byte of each other, unchanged, with back-pressure (a full write
buffer pauses reading on the other side).  It is written with asyncio
Protocols and ``transport.write`` only, so it is the cheapest relay Python can
be: the MSRP relay's cost is measured against it.

It prints ``PIPE LISTENING tcp PORT`` and ``PIPE LISTENING tls PORT`` once
bound, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys

_MAX_PAIR_LINE = 256


class _Hub:
    def __init__(self) -> None:
        self.waiting: dict[bytes, PipeSide] = {}


class PipeSide(asyncio.Protocol):
    """One accepted connection; forwards to its partner once paired."""

    def __init__(self, hub: _Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.peer: PipeSide | None = None
        self.head = b""
        self.pending: list[bytes] = []
        self.paired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            assert peer.transport is not None
            peer.transport.write(data)
            return
        if self.paired:
            self.pending.append(data)
            return
        self.head += data
        end = self.head.find(b"\r\n")
        if end < 0:
            if len(self.head) > _MAX_PAIR_LINE:
                self._close()
            return
        line, rest = self.head[:end], self.head[end + 2 :]
        self.head = b""
        if not line.startswith(b"PAIR "):
            self._close()
            return
        self.paired = True
        if rest:
            self.pending.append(rest)
        key = line[5:]
        other = self.hub.waiting.pop(key, None)
        if other is None:
            self.hub.waiting[key] = self
            return
        self._join(other)

    def _join(self, other: PipeSide) -> None:
        self.peer = other
        other.peer = self
        assert self.transport is not None and other.transport is not None
        for chunk in self.pending:
            other.transport.write(chunk)
        for chunk in other.pending:
            self.transport.write(chunk)
        self.pending = []
        other.pending = []

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # Back-pressure: our write buffer is full, so stop reading from the partner.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        self.peer = None
        if peer is not None:
            peer.peer = None
            peer._close()


async def serve(host: str, tcp_port: int, tls_port: int | None, cert: str, key: str) -> None:
    loop = asyncio.get_running_loop()
    hub = _Hub()
    servers = [await loop.create_server(lambda: PipeSide(hub), host, tcp_port)]
    print(f"PIPE LISTENING tcp {servers[0].sockets[0].getsockname()[1]}", flush=True)
    if tls_port is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        tls = await loop.create_server(lambda: PipeSide(hub), host, tls_port, ssl=context)
        servers.append(tls)
        print(f"PIPE LISTENING tls {tls.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tcp-port", type=int, default=0)
    parser.add_argument("--tls-port", type=int, default=0)
    parser.add_argument("--no-tls", action="store_true")
    parser.add_argument("--cert", default="")
    parser.add_argument("--key", default="")
    args = parser.parse_args(argv)
    tls_port = None if args.no_tls else args.tls_port
    if tls_port is not None and not (args.cert and args.key):
        parser.error("TLS needs --cert and --key (or use --no-tls)")
    asyncio.run(serve(args.host, args.tcp_port, tls_port, args.cert, args.key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
