"""MSRP benchmark: the relay in its own process, a fast asyncio load generator here.

Run by hand (not part of the tests)::

    python -m bench.msrp_bench [--quick] [--only small,large,memory,auth,workers]
                               [--with-kamailio] [--profile FILE] [--workers 1,2]

It prints one JSON line with every figure on stdout and its progress on
stderr.  The relay runs as ``twistd -n msrprelay --config <tmp ini>``; its CPU
time is read from /proc/PID/stat (utime+stime) before and after each load and
its resident memory from /proc/PID/status (VmRSS).  The references run in
their own processes too: ``python -m bench.pipe`` (a byte pipe, the cheapest
possible relay) and, with ``--with-kamailio``, Kamailio's msrp module.

What the targets mean (all on loopback, 127.0.0.1):

* ``relay_tls``: both clients AUTH over TLS; A sends with To-Path
  ``A's Use-Path, B's Use-Path, B's URI``.  Every byte crosses TLS twice.
* ``relay_tcpin``: AUTH is refused on plain TCP, so there is no all-TCP relay
  path.  B AUTHs over TLS; A (no AUTH) sends over a plain TCP connection to
  B's session URI, the relay delivers to B over B's TLS connection, and B's
  REPORTs come back to A over a TCP connection the relay opens to A's URI.
  Half of the hops are TLS: compare with ``pipe_mixed`` (A on TCP, B on TLS).
* ``pipe_tls`` / ``pipe_tcp`` / ``pipe_mixed``: the same clients and bytes
  through ``bench.pipe``; B still answers 200 and sends the REPORT, so the
  small-message load is an echo-ish exchange through a relay that parses
  nothing.
* ``relay_tls_<N>w_same`` / ``relay_tls_<N>w_cross`` (the ``workers`` load, not run by
  default): ``relay_tls`` with 100 sessions against a relay run with ``[relay] workers =
  N`` for each count of ``--workers``, one after the other.  Pair i authenticates at
  worker i mod N; its receiver at the same worker (``same``) or at the next one
  (``cross``: every SEND and REPORT goes from worker to worker over TLS).  The server
  CPU is the parent's and every worker's.
* ``kamailio_tcp``: Kamailio over TCP; A sends with To-Path ``B's Use-Path,
  B's URI`` (its config routes REPORTs by the address in A's URI over A's
  connection, so A's URI carries A's real address).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import resource
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.daemon import spawn_logged, spawn_twistd, stop_async, wait_for_log
from bench.report import report_head
from relayd.digest import answer_challenge
from relayd.testing import RelayPKI, make_pki, write_users

HOST = "127.0.0.1"
REALM = "relayd-bench"
USERS = {"alice": "wonderland-bench", "bob": "builder-bench"}
REPO = Path(__file__).resolve().parents[1]
# The Kamailio MSRP reference configuration lives beside the repository (../shared).
KAMAILIO_DIR = Path(
    os.environ.get("KAMAILIO_MSRP_DIR", REPO.parent / "shared" / "bench" / "kamailio-msrp")
)
KAMAILIO_RUN = Path(os.environ.get("KAMAILIO_MSRP_RUN", "/tmp/kamailio-msrp-bench"))  # noqa: S108
KAMAILIO_PORT = 22855
KAMAILIO_REALM = "msrp-bench"
KAMAILIO_PASSWORD = "bench123"  # noqa: S105 - the benchmark Kamailio's fixed password
SMALL_BODY = b"x" * 99 + b"\n"
PATTERN_PERIOD = 1_048_583  # 1 MiB + 7: a misplaced chunk of any size 2^k changes the hash
MIB = 1 << 20
CONNECT_TIMEOUT = 15.0
TICKS = os.sysconf("SC_CLK_TCK")

TARGETS = {
    "small_cpu_us_per_msg": 100.0,
    "kamailio_cpu_us_per_msg_reference": 105.0,
    "latency_p50_ms": 0.5,
    "latency_p99_ms": 2.0,
    "large_ratio_tcp": 0.75,
    "large_ratio_tls": 0.50,
    "auth_per_s": 400.0,
    "memory_tls_kib": 24.0,
    "memory_tcp_kib": 12.0,
}

_started = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- process accounting --------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name is in parentheses and may hold spaces: split after it.
    return text[text.rindex(")") + 2 :].split()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 10_000:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """utime+stime of a process (and its descendants when ``tree``), in seconds."""
    total = 0
    for each in _descendants(pid) if tree else [pid]:
        try:
            fields = _stat_fields(each)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / TICKS


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


_MSRP_LISTENING = {
    kind: re.compile(rb"MSRP listening on " + kind.encode() + rb":127\.0\.0\.1:(\d+)")
    for kind in ("ssl", "tcp")
}
_PIPE_LISTENING = {
    kind: re.compile(rb"PIPE LISTENING " + kind.encode() + rb" (\d+)") for kind in ("tcp", "tls")
}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class PySpy:
    """Optional sampling profile of the server during a measured window (``--py-spy DIR``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)

    def start(self, pid: int, label: str) -> tuple[subprocess.Popen[bytes], Path]:
        """Sample until :meth:`finish` interrupts it."""
        output = self.folder / (re.sub(r"[^A-Za-z0-9_.-]+", "_", label) + ".txt")
        command = ["py-spy", "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
        command += ["--nonblocking", "--output", str(output)]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return process, output

    @staticmethod
    async def finish(
        started: tuple[subprocess.Popen[bytes], Path] | None, cpu_us_per_unit: float
    ) -> dict[str, Any] | None:
        if started is None:
            return None
        process, output = started
        process.send_signal(signal.SIGINT)
        for _ in range(200):
            if process.poll() is not None:
                break
            await asyncio.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait(5)
        if not output.exists():
            return {"error": "py-spy wrote nothing (ptrace not allowed?)"}
        return {"file": str(output), **top_functions(output, cpu_us_per_unit)}


def top_functions(path: Path, cpu_us_per_unit: float, count: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of collapsed stacks, scaled to CPU µs per unit of work."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        total += samples
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    if not total:
        return {"samples": 0}

    def table(counts: dict[str, int]) -> list[list[Any]]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:count]
        return [
            [name, round(100 * n / total, 1), _round(cpu_us_per_unit * n / total)]
            for name, n in ranked
        ]

    return {"samples": total, "self_pct_us": table(own), "inclusive_pct_us": table(inclusive)}


PROFILER: list[PySpy] = []


# -- the processes under test ---------------------------------------------------------------


class Server(Protocol):
    name: str

    def cpu(self) -> float: ...


@dataclass
class RelayProcess:
    """``twistd -n msrprelay`` with a throwaway config; stopped by :meth:`stop`."""

    folder: Path
    pki: RelayPKI
    profile: str | None = None
    name: str = "relayd"
    process: subprocess.Popen[bytes] | None = None
    tls_port: int = 0
    tcp_port: int = 0
    log_path: Path = field(default_factory=Path)
    workers: int = 1
    """``[relay] workers``; above 1 the CPU is the parent's and every worker's."""
    worker_tls_ports: list[int] = field(default_factory=list)
    """Worker K's MSRP TLS port at index K."""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def uri(self) -> str:
        return f"msrps://{HOST}:{self.tls_port};tcp"

    def cpu(self) -> float:
        return cpu_seconds(self.pid, tree=self.workers > 1)

    def write_config(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        cert, key = self.pki.leaf(HOST)
        users = write_users(self.folder / "users.htdigest", REALM, USERS)
        config = self.folder / "relayd.ini"
        # Workers share the XCAP and SIP ports: fixed ones.
        xcap, sip = (free_port(), free_port(socket.SOCK_DGRAM)) if self.workers > 1 else (0, 0)
        config.write_text(
            f"[relay]\nhostname = {HOST}\ndata_dir = {self.folder / 'data'}\n"
            f"workers = {self.workers}\n\n"
            f"[msrp]\nlisten = ssl:0:interface={HOST}\n    tcp:0:interface={HOST}\n\n"
            f"[xcap]\nlisten = ssl:{xcap}:interface={HOST}\n\n"
            f"[sip]\nlisten = udp:{sip}:interface={HOST}\n\n"
            f"[auth]\nrealm = {REALM}\nusers = {users}\n\n"
            f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n",
            encoding="utf-8",
        )
        return config

    async def start(self) -> None:
        config = self.write_config()
        self.log_path = self.folder / "relayd.log"
        self.process = spawn_twistd(
            config, self.log_path, REPO, self.profile, preexec_fn=_raise_nofile
        )
        found = await wait_for_log(self.process, self.log_path, _MSRP_LISTENING)
        self.tls_port, self.tcp_port = int(found["ssl"][1]), int(found["tcp"][1])
        if self.workers > 1:
            each = {
                str(k): re.compile(
                    rf"worker {k}: MSRP listening on ssl:127\.0\.0\.1:(\d+)".encode()
                )
                for k in range(self.workers)
            }
            ports = await wait_for_log(self.process, self.log_path, each)
            self.worker_tls_ports = [int(ports[str(k)][1]) for k in range(self.workers)]
        else:
            self.worker_tls_ports = [self.tls_port]
        log(
            f"relayd pid {self.pid} ({self.workers} worker(s)): TLS {self.worker_tls_ports},"
            f" TCP {self.tcp_port}"
        )

    async def stop(self) -> None:
        await stop_async(self.process)


@dataclass
class PipeProcess:
    """``python -m bench.pipe``: TCP and TLS listeners that join connections in pairs."""

    folder: Path
    pki: RelayPKI
    name: str = "pipe"
    process: subprocess.Popen[bytes] | None = None
    tls_port: int = 0
    tcp_port: int = 0

    def cpu(self) -> float:
        assert self.process is not None
        return cpu_seconds(self.process.pid)

    async def start(self) -> None:
        cert, key = self.pki.leaf(HOST)
        log_path = self.folder / "pipe.log"
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "bench.pipe", "--cert", cert, "--key", key]
        self.process = spawn_logged(command, log_path, REPO, _raise_nofile)
        found = await wait_for_log(self.process, log_path, _PIPE_LISTENING, seconds=20)
        self.tcp_port, self.tls_port = int(found["tcp"][1]), int(found["tls"][1])
        log(f"pipe pid {self.process.pid}: TLS {self.tls_port}, TCP {self.tcp_port}")

    async def stop(self) -> None:
        await stop_async(self.process)


@dataclass
class KamailioProcess:
    """The shared Kamailio harness (start.sh --digest / stop.sh); TCP on 22855."""

    name: str = "kamailio"
    pid: int = 0
    started: bool = False

    def cpu(self) -> float:
        return cpu_seconds(self.pid, tree=True)

    async def start(self) -> None:
        script = KAMAILIO_DIR / "start.sh"
        if not script.exists():
            raise RuntimeError(f"{script} not found")
        self.started = True  # stop.sh only acts on its own pid file
        result = await asyncio.to_thread(
            subprocess.run,
            [str(script), "--digest"],
            capture_output=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                "start.sh failed: "
                + (result.stderr or result.stdout).decode(errors="replace")[-500:]
            )
        self.pid = int((KAMAILIO_RUN / "kamailio.pid").read_text().strip())
        log(f"kamailio pid {self.pid}: TCP {KAMAILIO_PORT}")

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        await asyncio.to_thread(
            subprocess.run,
            [str(KAMAILIO_DIR / "stop.sh")],
            capture_output=True,
            timeout=60,
            check=False,
        )


# -- the load generator's MSRP endpoint -----------------------------------------------------


class Sink(Protocol):
    def data(self, chunk: memoryview) -> None: ...

    def end(self, flag: int) -> None: ...


def _ignore_response(tid: bytes, code: int) -> None:
    pass


def _ignore_report(message_id: bytes, code: bytes) -> None:
    pass


class Hub:
    """Process-wide callbacks and transaction ids; each load installs its own handlers."""

    def __init__(self) -> None:
        self.counter = 0
        self.on_response: Callable[[bytes, int], None] = _ignore_response
        self.on_report: Callable[[bytes, bytes], None] = _ignore_report
        self.protocol_errors = 0

    def tid(self) -> bytes:
        self.counter += 1
        return b"b%011x" % self.counter

    def reset(self) -> None:
        self.on_response = _ignore_response
        self.on_report = _ignore_report


def _header(head: bytes, name: bytes) -> bytes:
    start = head.find(b"\r\n" + name + b": ")
    if start < 0:
        return b""
    start += len(name) + 4
    return head[start : head.find(b"\r\n", start)]


class Endpoint(asyncio.Protocol):
    """One MSRP connection of the generator: sender, receiver, or both.

    Parsing is the minimum: the start line gives the transaction id, the
    end-line ``-------tid`` ends the frame, and only the few header fields an
    answer needs are looked up.  An incoming SEND is answered with 200 and,
    when it asks for one, a success REPORT.
    """

    def __init__(self, hub: Hub, local: bytes = b"") -> None:
        self.hub = hub
        self.local = local
        self.transport: asyncio.Transport | None = None
        self.rest = b""
        self.marker: bytes | None = None
        self.send_tid = b""
        self.send_head = b""
        self.sink: Sink | None = None
        self.sends_received = 0
        self.waiters: dict[bytes, asyncio.Future[bytes]] = {}
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("connection lost"))
        self.waiters.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def request(self, tid: bytes, frame: bytes) -> asyncio.Future[bytes]:
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiters[tid] = waiter
        self.write(frame)
        return waiter

    def data_received(self, data: bytes) -> None:
        buf = self.rest + data if self.rest else data
        n = len(buf)
        pos = 0
        while pos < n:
            marker = self.marker
            if marker is not None:
                # Inside a body: everything up to "\r\n-------tid" is payload.
                idx = buf.find(marker, pos)
                end = idx + len(marker) + 3
                if idx < 0 or end > n:
                    stop = idx if idx >= 0 else n - len(marker) - 3
                    if stop > pos:
                        if self.sink is not None:
                            self.sink.data(memoryview(buf)[pos:stop])
                        pos = stop
                    break
                if idx > pos and self.sink is not None:
                    self.sink.data(memoryview(buf)[pos:idx])
                self.marker = None
                pos = end
                self._send_ended(buf[idx + len(marker)])
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            space = buf.find(b" ", pos + 5, eol)
            if space < 0 or not buf.startswith(b"MSRP ", pos):
                self._protocol_error(buf[pos:eol])
                return
            tid = buf[pos + 5 : space]
            end_line = b"-------" + tid
            e = buf.find(end_line, eol)
            blank = buf.find(b"\r\n\r\n", eol, e if e >= 0 else n)
            if blank >= 0:
                self.send_tid = tid
                self.send_head = buf[pos : blank + 2]
                self.marker = b"\r\n" + end_line
                pos = blank + 4
                continue
            if e < 0 or e + len(end_line) + 3 > n:
                break
            head = buf[pos:e]
            pos = e + len(end_line) + 3
            word = buf[space + 1 : space + 4]
            if word.isdigit():
                waiter = self.waiters.pop(tid, None)
                if waiter is not None:
                    waiter.set_result(head)
                else:
                    self.hub.on_response(tid, int(word))
            elif word == b"REP":
                status = _header(head, b"Status")
                self.hub.on_report(_header(head, b"Message-ID"), status[4:7])
        self.rest = buf[pos:] if pos < n else b""
        if len(self.rest) > 1_000_000 and self.marker is None:
            self._protocol_error(self.rest[:80])

    def _protocol_error(self, what: bytes) -> None:
        self.hub.protocol_errors += 1
        log(f"unparseable input {what[:80]!r}: closing")
        self.rest = b""
        self.close()

    def _send_ended(self, flag: int) -> None:
        """Answer a SEND frame: 200 hop by hop, then the success REPORT if asked."""
        head = self.send_head
        tid = self.send_tid
        self.sends_received += 1
        if self.sink is not None:
            self.sink.end(flag)
        from_path = _header(head, b"From-Path")
        out: list[bytes] = []
        if b"\r\nFailure-Report: no\r\n" not in head:
            previous = from_path.split(b" ", 1)[0]
            out += (b"MSRP ", tid, b" 200 OK\r\nTo-Path: ", previous, b"\r\nFrom-Path: ")
            out += (self.local, b"\r\n-------", tid, b"$\r\n")
        if flag == 36 and b"\r\nSuccess-Report: yes\r\n" in head:  # 36: "$"
            byte_range = _header(head, b"Byte-Range")
            total = byte_range[byte_range.rfind(b"/") + 1 :]
            rtid = self.hub.tid()
            out += (b"MSRP ", rtid, b" REPORT\r\nTo-Path: ", from_path, b"\r\nFrom-Path: ")
            out += (self.local, b"\r\nMessage-ID: ", _header(head, b"Message-ID"))
            out += (b"\r\nByte-Range: 1-", total, b"/", total, b"\r\nStatus: 000 200 OK\r\n")
            out += (b"-------", rtid, b"$\r\n")
        if out:
            self.write(b"".join(out))


def local_uri(secure: bool = True, address: tuple[str, int] | None = None) -> bytes:
    session = secrets.token_urlsafe(9)
    if address is not None:
        scheme = "msrps" if secure else "msrp"
        return f"{scheme}://{address[0]}:{address[1]}/{session};tcp".encode()
    return f"msrps://{secrets.token_hex(5)}.invalid:2855/{session};tcp".encode()


async def open_endpoint(
    hub: Hub, port: int, context: ssl.SSLContext | None, local: bytes = b""
) -> Endpoint:
    loop = asyncio.get_running_loop()
    _, protocol = await asyncio.wait_for(
        loop.create_connection(
            lambda: Endpoint(hub, local),
            HOST,
            port,
            ssl=context,
            server_hostname=HOST if context is not None else None,
        ),
        CONNECT_TIMEOUT,
    )
    return protocol


def auth_authorization(challenge_head: bytes, relay_uri: str, user: str, password: str) -> str:
    """The Authorization value answering the 401 whose head is ``challenge_head``."""
    challenge = _header(challenge_head, b"WWW-Authenticate").decode()
    return answer_challenge(
        challenge, username=user, password=password, method="AUTH", uri=relay_uri
    ).authorization


async def auth(hub: Hub, endpoint: Endpoint, relay_uri: str, user: str, password: str) -> str:
    """Digest AUTH (401, then 200); returns the Use-Path."""
    local = endpoint.local.decode()
    tid = hub.tid()
    frame = f"MSRP {tid.decode()} AUTH\r\nTo-Path: {relay_uri}\r\nFrom-Path: {local}\r\n"
    head = await asyncio.wait_for(
        endpoint.request(tid, frame.encode() + b"-------" + tid + b"$\r\n"), CONNECT_TIMEOUT
    )
    if b" 401" not in head[: head.find(b"\r\n")]:
        raise RuntimeError(f"AUTH without credentials: {head[:200]!r}")
    authorization = auth_authorization(head, relay_uri, user, password)
    tid = hub.tid()
    frame = (
        f"MSRP {tid.decode()} AUTH\r\nTo-Path: {relay_uri}\r\nFrom-Path: {local}\r\n"
        f"Authorization: {authorization}\r\n"
    )
    head = await asyncio.wait_for(
        endpoint.request(tid, frame.encode() + b"-------" + tid + b"$\r\n"), CONNECT_TIMEOUT
    )
    if b" 200" not in head[: head.find(b"\r\n")]:
        raise RuntimeError(f"AUTH refused: {head[:200]!r}")
    use_path = _header(head, b"Use-Path").decode().strip()
    if not use_path:
        raise RuntimeError("AUTH answered 200 without Use-Path")
    return use_path


# -- targets: how a sender A and a receiver B are connected -----------------------------------


@dataclass
class Pair:
    a: Endpoint
    b: Endpoint
    to_path: bytes

    def close(self) -> None:
        self.a.close()
        self.b.close()


class Target:
    """A way to connect pairs through one server process."""

    name = "?"
    tls_legs = "?"
    #: Bytes of SEND chunks the sender keeps unanswered in the large-message load.
    large_window_bytes = 4 * MIB

    def __init__(self, hub: Hub, server: Server) -> None:
        self.hub = hub
        self.server = server

    async def make_pair(self, index: int) -> Pair:
        raise NotImplementedError

    async def make_pairs(self, count: int, concurrency: int = 50) -> list[Pair]:
        limit = asyncio.Semaphore(concurrency)

        async def one(index: int) -> Pair:
            async with limit:
                return await self.make_pair(index)

        return list(await asyncio.gather(*(one(i) for i in range(count))))


class RelayTLS(Target):
    name = "relay_tls"
    tls_legs = "A-relay TLS, relay-B TLS"

    def __init__(self, hub: Hub, relay: RelayProcess, context: ssl.SSLContext) -> None:
        super().__init__(hub, relay)
        self.relay = relay
        self.context = context

    async def authed(self, user: str) -> tuple[Endpoint, str]:
        endpoint = await open_endpoint(self.hub, self.relay.tls_port, self.context, local_uri())
        use_path = await auth(self.hub, endpoint, self.relay.uri, user, USERS[user])
        return endpoint, use_path

    async def make_pair(self, index: int) -> Pair:
        (a, a_use), (b, b_use) = await asyncio.gather(self.authed("alice"), self.authed("bob"))
        return Pair(a, b, b" ".join((a_use.encode(), b_use.encode(), b.local)))


class RelayWorkersTLS(RelayTLS):
    """``relay_tls`` over ``[relay] workers``: pair ``i``'s sender authenticates at worker
    ``i mod N``, its receiver at the same worker (``same``: each worker relays between
    its own clients) or at the next one (``cross``: every SEND goes worker to worker)."""

    def __init__(self, hub: Hub, relay: RelayProcess, context: ssl.SSLContext, cross: bool) -> None:
        super().__init__(hub, relay, context)
        self.cross = cross
        self.name = f"relay_tls_{relay.workers}w_{'cross' if cross else 'same'}"

    async def authed_at(self, user: str, worker: int) -> tuple[Endpoint, str]:
        port = self.relay.worker_tls_ports[worker]
        endpoint = await open_endpoint(self.hub, port, self.context, local_uri())
        use_path = await auth(self.hub, endpoint, f"msrps://{HOST}:{port};tcp", user, USERS[user])
        return endpoint, use_path

    async def make_pair(self, index: int) -> Pair:
        count = len(self.relay.worker_tls_ports)
        first = index % count
        second = (first + 1) % count if self.cross else first
        (a, a_use), (b, b_use) = await asyncio.gather(
            self.authed_at("alice", first), self.authed_at("bob", second)
        )
        return Pair(a, b, b" ".join((a_use.encode(), b_use.encode(), b.local)))


class RelayTCPIn(RelayTLS):
    name = "relay_tcpin"
    tls_legs = "A-relay TCP (REPORTs back on a relay-opened TCP connection), relay-B TLS"

    def __init__(self, hub: Hub, relay: RelayProcess, context: ssl.SSLContext) -> None:
        super().__init__(hub, relay, context)
        self.report_server: asyncio.Server | None = None
        self.report_port = 0

    async def make_pair(self, index: int) -> Pair:
        if self.report_server is None:
            # A's URI names this listener: the relay connects here for REPORTs.
            loop = asyncio.get_running_loop()
            listener_uri = b"msrp://127.0.0.1:0/reports;tcp"
            self.report_server = await loop.create_server(
                lambda: Endpoint(self.hub, listener_uri), HOST, 0
            )
            self.report_port = self.report_server.sockets[0].getsockname()[1]
        a_local = local_uri(False, (HOST, self.report_port))
        a = await open_endpoint(self.hub, self.relay.tcp_port, None, a_local)
        b, b_use = await self.authed("bob")
        return Pair(a, b, b" ".join((b_use.encode(), b.local)))

    def close(self) -> None:
        if self.report_server is not None:
            self.report_server.close()
            self.report_server = None


class PipeTarget(Target):
    def __init__(
        self, hub: Hub, pipe: PipeProcess, context: ssl.SSLContext, a_tls: bool, b_tls: bool
    ) -> None:
        super().__init__(hub, pipe)
        self.pipe = pipe
        self.context = context
        self.a_tls = a_tls
        self.b_tls = b_tls
        kinds = {(True, True): "tls", (False, False): "tcp"}
        self.name = "pipe_" + kinds.get((a_tls, b_tls), "mixed")
        self.tls_legs = f"A-pipe {'TLS' if a_tls else 'TCP'}, pipe-B {'TLS' if b_tls else 'TCP'}"

    async def _open(self, tls: bool, key: bytes) -> Endpoint:
        port = self.pipe.tls_port if tls else self.pipe.tcp_port
        endpoint = await open_endpoint(
            self.hub, port, self.context if tls else None, local_uri(tls)
        )
        endpoint.write(b"PAIR " + key + b"\r\n")
        return endpoint

    async def make_pair(self, index: int) -> Pair:
        key = secrets.token_hex(8).encode()
        a, b = await asyncio.gather(self._open(self.a_tls, key), self._open(self.b_tls, key))
        a_use = b"msrps://127.0.0.1:1/" + secrets.token_urlsafe(16).encode() + b";tcp"
        b_use = b"msrps://127.0.0.1:1/" + secrets.token_urlsafe(16).encode() + b";tcp"
        return Pair(a, b, b" ".join((a_use, b_use, b.local)))


class KamailioTCP(Target):
    name = "kamailio_tcp"
    tls_legs = "A-kamailio TCP, kamailio-B TCP"
    # Kamailio answers 200 before forwarding and closes a connection whose write
    # queue passes tcp_conn_wq_max (32 KiB by default): stay below it.
    large_window_bytes = 16 * 1024

    def __init__(self, hub: Hub, kamailio: KamailioProcess) -> None:
        super().__init__(hub, kamailio)
        self.uri = f"msrp://{HOST}:{KAMAILIO_PORT};tcp"

    async def authed(self, user: str) -> tuple[Endpoint, str]:
        endpoint = await open_endpoint(self.hub, KAMAILIO_PORT, None)
        assert endpoint.transport is not None
        address = endpoint.transport.get_extra_info("sockname")
        # Kamailio routes REPORTs to the address in this URI over an existing connection.
        endpoint.local = local_uri(False, (address[0], address[1]))
        use_path = await auth(self.hub, endpoint, self.uri, user, KAMAILIO_PASSWORD)
        return endpoint, use_path

    async def make_pair(self, index: int) -> Pair:
        (a, _), (b, b_use) = await asyncio.gather(self.authed("alice"), self.authed("bob"))
        return Pair(a, b, b" ".join((b_use.encode(), b.local)))


# -- measurement helpers -------------------------------------------------------------------


@dataclass
class Snapshot:
    wall: float
    server_cpu: float
    own_cpu: float
    machine_cpu: float
    count: int


def snapshot(server: Server, count: int) -> Snapshot:
    return Snapshot(
        time.perf_counter(), server.cpu(), time.process_time(), machine_busy_seconds(), count
    )


def other_cpu_pct(before: Snapshot, after: Snapshot) -> float:
    """CPU used meanwhile by processes that are neither the server nor the generator."""
    ours = (after.server_cpu - before.server_cpu) + (after.own_cpu - before.own_cpu)
    other = (after.machine_cpu - before.machine_cpu) - ours
    return _round(max(0.0, other) * 100 / (after.wall - before.wall))


def percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index] / 1e6  # ns -> ms


async def close_pairs(pairs: list[Pair]) -> None:
    for pair in pairs:
        pair.close()
    waits = [p.a.lost for p in pairs] + [p.b.lost for p in pairs]
    if waits:
        await asyncio.wait(waits, timeout=10)


def _round(value: float, digits: int = 1) -> float:
    return round(value, digits) if value == value else value  # keep NaN


# -- load 1: small messages ------------------------------------------------------------------


class SmallLoad:
    """Each pair keeps ``window`` SENDs outstanding; one completes when its REPORT arrives."""

    def __init__(self, hub: Hub, pairs: list[Pair], window: int) -> None:
        self.hub = hub
        self.pairs = pairs
        self.window = window
        self.pending: dict[bytes, tuple[int, int]] = {}
        self.rtts: list[int] = []
        self.done = 0
        self.errors = 0
        self.running = True
        self.recording = False
        self.parts = [
            (
                b" SEND\r\nTo-Path: "
                + pair.to_path
                + b"\r\nFrom-Path: "
                + pair.a.local
                + b"\r\nMessage-ID: ",
                b"\r\nSuccess-Report: yes\r\nByte-Range: 1-100/100\r\n"
                b"Content-Type: text/plain\r\n\r\n" + SMALL_BODY + b"\r\n-------",
            )
            for pair in pairs
        ]

    def send(self, index: int) -> None:
        tid = self.hub.tid()
        middle, tail = self.parts[index]
        self.pending[tid] = (index, time.perf_counter_ns())
        self.pairs[index].a.write(b"".join((b"MSRP ", tid, middle, tid, tail, tid, b"$\r\n")))

    def response(self, tid: bytes, code: int) -> None:
        if code != 200:
            self.errors += 1

    def report(self, message_id: bytes, code: bytes) -> None:
        entry = self.pending.pop(message_id, None)
        if entry is None:
            return
        if code != b"200":
            self.errors += 1
        self.done += 1
        if self.recording:
            self.rtts.append(time.perf_counter_ns() - entry[1])
        if self.running:
            self.send(entry[0])


async def run_small(
    hub: Hub, target: Target, sessions: int, window: int, warmup: float, duration: float
) -> dict[str, Any]:
    label = f"{target.name} {sessions} session(s) x {window} in flight"
    log(f"small: {label}")
    pairs = await asyncio.wait_for(target.make_pairs(sessions), 120)
    load = SmallLoad(hub, pairs, window)
    hub.on_response, hub.on_report = load.response, load.report
    try:
        for index in range(len(pairs)):
            for _ in range(window):
                load.send(index)
        await asyncio.sleep(warmup)
        before = snapshot(target.server, load.done)
        spy = None
        if PROFILER and isinstance(target.server, RelayProcess):
            spy = PROFILER[0].start(target.server.pid, f"small-{target.name}-{sessions}x{window}")
        load.recording = True
        await asyncio.sleep(duration)
        after = snapshot(target.server, load.done)
        load.recording = False
        load.running = False
        for _ in range(200):
            if not load.pending:
                break
            await asyncio.sleep(0.05)
    finally:
        hub.reset()
        await close_pairs(pairs)
    messages = after.count - before.count
    wall = after.wall - before.wall
    rtts = sorted(load.rtts)
    result: dict[str, Any] = {
        "target": target.name,
        "legs": target.tls_legs,
        "sessions": sessions,
        "window": window,
        "messages": messages,
        "msgs_per_s": _round(messages / wall),
        "rtt_p50_ms": _round(percentile(rtts, 0.50), 3),
        "rtt_p99_ms": _round(percentile(rtts, 0.99), 3),
        "server_cpu_us_per_msg": _round(
            (after.server_cpu - before.server_cpu) * 1e6 / messages if messages else float("nan")
        ),
        "server_cpu_pct": _round((after.server_cpu - before.server_cpu) * 100 / wall),
        # What one fully busy core would give at this CPU cost: the figure that
        # does not depend on how much CPU the noisy machine left the server.
        "capacity_msgs_per_s_one_core": _round(
            messages / (after.server_cpu - before.server_cpu)
            if after.server_cpu > before.server_cpu
            else float("nan")
        ),
        "generator_cpu_pct": _round((after.own_cpu - before.own_cpu) * 100 / wall),
        "other_cpu_pct": other_cpu_pct(before, after),
        "errors": load.errors,
        "unanswered": len(load.pending),
    }
    profile = await PySpy.finish(spy, result["server_cpu_us_per_msg"])
    if profile is not None:
        result["py_spy"] = profile
    log(
        f"  {result['msgs_per_s']} msg/s, p50 {result['rtt_p50_ms']} ms,"
        f" p99 {result['rtt_p99_ms']} ms, server {result['server_cpu_us_per_msg']} us/msg"
        f" ({result['server_cpu_pct']}% CPU), generator {result['generator_cpu_pct']}% CPU,"
        f" others {result['other_cpu_pct']}% CPU"
    )
    return result


# -- load 2: one large message -------------------------------------------------------------


_PATTERN: list[memoryview] = []


def pattern() -> memoryview:
    """Test data: byte i of a message is pattern()[i % PATTERN_PERIOD] (chunks up to 1 MiB)."""
    if not _PATTERN:
        period = random.Random(4976).randbytes(PATTERN_PERIOD)
        # The first MiB again at the end, so a chunk may run past one period.
        _PATTERN.append(memoryview(period + period[:MIB]))
    return _PATTERN[0]


def message_chunks(total: int, chunk: int) -> Iterator[tuple[int, memoryview]]:
    assert 0 < chunk <= MIB
    data = pattern()
    offset = 0
    while offset < total:
        size = min(chunk, total - offset)
        start = offset % PATTERN_PERIOD
        yield offset, data[start : start + size]
        offset += size


def expected_digest(total: int) -> str:
    hasher = hashlib.sha256()
    for _, piece in message_chunks(total, MIB):
        hasher.update(piece)
    return hasher.hexdigest()


class HashSink:
    def __init__(self, total: int) -> None:
        self.total = total
        self.hasher = hashlib.sha256()
        self.received = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data(self, chunk: memoryview) -> None:
        self.hasher.update(chunk)
        self.received += len(chunk)

    def end(self, flag: int) -> None:
        if flag != 43 and not self.done.done():  # 43: "+", more chunks follow
            self.done.set_result(None)


async def run_large(
    hub: Hub, target: Target, total: int, chunk: int, digest: str
) -> dict[str, Any]:
    log(f"large: {target.name} {total // MIB} MiB in {chunk // 1024} KiB chunks")
    (pair,) = await asyncio.wait_for(target.make_pairs(1), 60)
    sink = HashSink(total)
    pair.b.sink = sink
    window = max(1, min(512, target.large_window_bytes // chunk))
    state = {"outstanding": 0, "errors": 0}
    wake = asyncio.Event()

    def response(tid: bytes, code: int) -> None:
        state["outstanding"] -= 1
        if code != 200:
            state["errors"] += 1
        wake.set()

    hub.on_response = response
    message_id = hub.tid()
    middle = (
        b" SEND\r\nTo-Path: "
        + pair.to_path
        + b"\r\nFrom-Path: "
        + pair.a.local
        + b"\r\nMessage-ID: "
        + message_id
        + b"\r\nByte-Range: "
    )
    after_range = b"/%d\r\nContent-Type: application/octet-stream\r\n\r\n" % total
    timed_out = False
    spy = None
    if PROFILER and isinstance(target.server, RelayProcess):
        spy = PROFILER[0].start(target.server.pid, f"large-{target.name}-{chunk}")
    try:
        before = snapshot(target.server, 0)
        for offset, piece in message_chunks(total, chunk):
            while state["outstanding"] >= window:
                wake.clear()
                await asyncio.wait_for(wake.wait(), 60)
            if pair.a.lost.done() or pair.b.lost.done():
                raise ConnectionError("the server closed a connection mid-message")
            tid = hub.tid()
            last = offset + len(piece) >= total
            pair.a.write(
                b"".join(
                    (
                        b"MSRP ",
                        tid,
                        middle,
                        b"%d-%d" % (offset + 1, offset + len(piece)),
                        after_range,
                        piece,
                        b"\r\n-------",
                        tid,
                        b"$\r\n" if last else b"+\r\n",
                    )
                )
            )
            state["outstanding"] += 1
        await asyncio.wait(
            [sink.done, pair.b.lost], timeout=120, return_when=asyncio.FIRST_COMPLETED
        )
        if not sink.done.done():
            raise ConnectionError("the message did not arrive whole")
        while state["outstanding"] > 0:
            wake.clear()
            await asyncio.wait_for(wake.wait(), 60)
        after = snapshot(target.server, 0)
    except (TimeoutError, ConnectionError) as e:
        log(f"  failed: {type(e).__name__}: {e}")
        timed_out = True
        after = snapshot(target.server, 0)
    finally:
        hub.reset()
        await close_pairs([pair])
    wall = after.wall - before.wall
    exact = sink.received == total and sink.hasher.hexdigest() == digest
    result: dict[str, Any] = {
        "target": target.name,
        "legs": target.tls_legs,
        "bytes": total,
        "chunk_bytes": chunk,
        "window_chunks": window,
        "seconds": _round(wall, 3),
        "mb_per_s": _round(total / wall / 1e6) if exact else 0.0,
        "bit_exact": exact,
        "received_bytes": sink.received,
        "server_cpu_s": _round(after.server_cpu - before.server_cpu, 2),
        "server_cpu_us_per_mb": _round((after.server_cpu - before.server_cpu) * 1e12 / total),
        "generator_cpu_pct": _round((after.own_cpu - before.own_cpu) * 100 / wall),
        "other_cpu_pct": other_cpu_pct(before, after),
        "errors": state["errors"] + (1 if timed_out else 0),
    }
    profile = await PySpy.finish(spy, result["server_cpu_us_per_mb"])
    if profile is not None:
        result["py_spy_us_per_mb"] = profile
    log(
        f"  {result['mb_per_s']} MB/s, bit-exact {exact}, server CPU {result['server_cpu_s']} s,"
        f" generator {result['generator_cpu_pct']}% CPU"
    )
    return result


# -- load 3: memory per idle session --------------------------------------------------------


async def run_memory(
    hub: Hub, folder: Path, pki: RelayPKI, context: ssl.SSLContext, count: int, kind: str
) -> dict[str, Any]:
    """A fresh relay; ``count`` idle connections; (RSS after - RSS before) / count.

    ``tls``: each connection AUTHs over TLS and stays idle (a session).
    ``tcp``: AUTH is TLS-only, so each plain TCP connection sends one SEND to a
    TLS session (Failure-Report: no) and then stays idle: a live relay
    connection, not a session.
    """
    log(f"memory: {count} idle {kind} connections on a fresh relay")
    relay = RelayProcess(folder / f"memory-{kind}-{count}", pki)
    endpoints: list[Endpoint] = []
    receiver: Endpoint | None = None
    failures = 0
    try:
        await relay.start()
        target = RelayTLS(hub, relay, context)
        warm = [await target.authed("alice") for _ in range(20)]
        for endpoint, _ in warm:
            endpoint.close()
        frame_head = b""
        if kind == "tcp":
            receiver, b_use = await target.authed("bob")
            frame_head = (
                b" SEND\r\nTo-Path: "
                + b_use.encode()
                + b" "
                + receiver.local
                + b"\r\nFrom-Path: msrp://127.0.0.1:9/idle;tcp\r\nMessage-ID: m1\r\n"
                b"Failure-Report: no\r\nByte-Range: 1-5/5\r\nContent-Type: text/plain\r\n\r\n"
                b"idle\n\r\n-------"
            )
        await asyncio.sleep(1.0)
        before = rss_kib(relay.pid)
        limit = asyncio.Semaphore(200)

        async def one() -> None:
            nonlocal failures
            async with limit:
                try:
                    if kind == "tls":
                        endpoint, _ = await target.authed("alice")
                    else:
                        endpoint = await open_endpoint(hub, relay.tcp_port, None)
                        tid = hub.tid()
                        endpoint.write(b"MSRP " + tid + frame_head + tid + b"$\r\n")
                    endpoints.append(endpoint)
                except (OSError, RuntimeError, TimeoutError):
                    failures += 1

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 600)
        opened = time.perf_counter() - started
        if receiver is not None:
            for _ in range(200):
                if receiver.sends_received >= len(endpoints):
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        after = rss_kib(relay.pid)
        alive = sum(1 for e in endpoints if not e.lost.done())
    finally:
        for endpoint in endpoints:
            endpoint.close()
        if receiver is not None:
            receiver.close()
        await relay.stop()
    per = (after - before) / alive if alive else float("nan")
    result: dict[str, Any] = {
        "kind": kind,
        "what": "idle TLS connection with an AUTH session"
        if kind == "tls"
        else "idle plain-TCP connection that relayed one SEND (no session: AUTH is TLS-only)",
        "connections": alive,
        "failures": failures,
        "open_seconds": _round(opened, 2),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": _round(per, 2),
    }
    log(f"  {result['kib_per_connection']} KiB each ({alive} alive, {failures} failed)")
    return result


# -- load 4: new TLS connections with AUTH per second ----------------------------------------


async def run_auth_rate(
    relay: RelayProcess,
    hub: Hub,
    context: ssl.SSLContext,
    concurrency: int,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    log(f"auth: new TLS connection + AUTH + close, {concurrency} at a time")
    target = RelayTLS(hub, relay, context)
    state = {"count": 0, "errors": 0}
    running = True

    async def worker() -> None:
        while running:
            try:
                endpoint, _ = await target.authed("alice")
                endpoint.close()
                state["count"] += 1
            except (OSError, RuntimeError, TimeoutError):
                state["errors"] += 1
                await asyncio.sleep(0.01)

    workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        before = snapshot(relay, state["count"])
        spy = PROFILER[0].start(relay.pid, "auth") if PROFILER else None
        await asyncio.sleep(duration)
        after = snapshot(relay, state["count"])
    finally:
        running = False
        await asyncio.wait(workers, timeout=30)
        for task in workers:
            task.cancel()
    done = after.count - before.count
    wall = after.wall - before.wall
    result: dict[str, Any] = {
        "concurrency": concurrency,
        "auths": done,
        "auth_per_s": _round(done / wall),
        "server_cpu_us_per_auth": _round(
            (after.server_cpu - before.server_cpu) * 1e6 / done if done else float("nan")
        ),
        "server_cpu_pct": _round((after.server_cpu - before.server_cpu) * 100 / wall),
        "generator_cpu_pct": _round((after.own_cpu - before.own_cpu) * 100 / wall),
        "other_cpu_pct": other_cpu_pct(before, after),
        "errors": state["errors"],
    }
    profile = await PySpy.finish(spy, result["server_cpu_us_per_auth"])
    if profile is not None:
        result["py_spy"] = profile
    log(
        f"  {result['auth_per_s']} AUTH/s, server {result['server_cpu_us_per_auth']} us/AUTH"
        f" ({result['server_cpu_pct']}% CPU), generator {result['generator_cpu_pct']}% CPU"
    )
    return result


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Settings:
    quick: bool
    only: set[str]
    window: int
    duration: float
    warmup: float
    large_bytes: int
    memory_counts: tuple[int, ...]
    auth_concurrency: int
    with_kamailio: bool
    profile: str | None
    py_spy: str | None
    workers: tuple[int, ...] = (1, 2)


def client_context(pki: RelayPKI) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca_path)
    return context


async def _guarded(
    errors: list[str], what: str, action: Awaitable[dict[str, Any]]
) -> dict[str, Any] | None:
    try:
        return await action
    except Exception as e:  # one broken measurement must not lose the others
        errors.append(f"{what}: {type(e).__name__}: {e}")
        log(f"FAILED {what}: {type(e).__name__}: {e}")
        return None


async def run_workers(
    hub: Hub,
    folder: Path,
    pki: RelayPKI,
    context: ssl.SSLContext,
    settings: Settings,
    errors: list[str],
) -> list[dict[str, Any]]:
    """The small-message load (100 sessions) against a relay run with each ``[relay]
    workers`` count in turn, one after the other on the same machine."""
    rows: list[dict[str, Any]] = []
    for count in settings.workers:
        relay = RelayProcess(folder / f"relay-{count}w", pki, workers=count)
        try:
            await relay.start()
            placements = [False, True] if count > 1 else [False]
            for cross in placements:
                target = RelayWorkersTLS(hub, relay, context, cross)
                row = await _guarded(
                    errors,
                    f"workers {target.name}",
                    run_small(
                        hub, target, 100, settings.window, settings.warmup, settings.duration
                    ),
                )
                if row is not None:
                    rows.append({**row, "workers": count, "cross": cross})
        finally:
            await relay.stop()
    return rows


async def run(settings: Settings) -> dict[str, Any]:
    _raise_nofile()
    hub = Hub()
    errors: list[str] = []
    results: dict[str, Any] = {"small": [], "large": [], "memory": [], "auth": None}
    stoppers: list[Callable[[], Awaitable[None]]] = []
    with tempfile.TemporaryDirectory(prefix="msrp-bench-") as tmp:
        folder = Path(tmp)
        pki = make_pki(folder / "pki")
        context = client_context(pki)
        try:
            relay = RelayProcess(folder / "relay", pki, profile=settings.profile)
            stoppers.append(relay.stop)
            await relay.start()
            pipe = PipeProcess(folder / "pipe", pki)
            stoppers.append(pipe.stop)
            if settings.only & {"small", "large"}:
                await pipe.start()
            kamailio: KamailioProcess | None = None
            if settings.with_kamailio and settings.only & {"small", "large"}:
                kamailio = KamailioProcess()
                stoppers.append(kamailio.stop)
                try:
                    await kamailio.start()
                except Exception as e:
                    log(f"kamailio unavailable: {e}")
                    results["kamailio"] = f"unavailable: {e}"
                    kamailio = None
            relay_tls = RelayTLS(hub, relay, context)
            relay_tcpin = RelayTCPIn(hub, relay, context)
            pipe_tls = PipeTarget(hub, pipe, context, True, True)
            pipe_tcp = PipeTarget(hub, pipe, context, False, False)
            pipe_mixed = PipeTarget(hub, pipe, context, False, True)
            kam = KamailioTCP(hub, kamailio) if kamailio is not None else None

            if "small" in settings.only:
                w = settings.window
                full = [(1, 1), (1, w), (10, w), (100, w)]
                brief = [(1, 1), (100, w)] if settings.quick else full
                plan: list[tuple[Target, list[tuple[int, int]]]] = [
                    (relay_tls, full),
                    (relay_tcpin, brief),
                    (pipe_tls, brief),
                    (pipe_mixed, brief),
                ]
                if not settings.quick:
                    plan.append((pipe_tcp, full))
                if kam is not None:
                    plan.append((kam, full))
                for target, configs in plan:
                    for sessions, window in configs:
                        row = await _guarded(
                            errors,
                            f"small {target.name} {sessions}x{window}",
                            run_small(
                                hub, target, sessions, window, settings.warmup, settings.duration
                            ),
                        )
                        if row is not None:
                            results["small"].append(row)
                relay_tcpin.close()

            if "large" in settings.only:
                total = settings.large_bytes
                log(f"large: computing the sha256 of the {total // MIB} MiB test message")
                digest = await asyncio.to_thread(expected_digest, total)
                for chunk in (2 * 1024, 64 * 1024, MIB):
                    targets: list[Target] = [relay_tls, relay_tcpin, pipe_tls, pipe_mixed, pipe_tcp]
                    if kam is not None and chunk <= 16 * 1024:
                        targets.append(kam)  # Kamailio breaks above 16 KiB
                    for target in targets:
                        row = await _guarded(
                            errors,
                            f"large {target.name} {chunk}",
                            run_large(hub, target, total, chunk, digest),
                        )
                        if row is not None:
                            results["large"].append(row)
                relay_tcpin.close()

            if "auth" in settings.only:
                results["auth"] = await _guarded(
                    errors,
                    "auth",
                    run_auth_rate(
                        relay,
                        hub,
                        context,
                        settings.auth_concurrency,
                        settings.warmup,
                        settings.duration,
                    ),
                )
            results["relay_rss_kib_at_end"] = rss_kib(relay.pid)
            await relay.stop()

            if "workers" in settings.only:
                results["workers"] = await run_workers(hub, folder, pki, context, settings, errors)

            if "memory" in settings.only:
                for kind in ("tls", "tcp"):
                    for count in settings.memory_counts:
                        row = await _guarded(
                            errors,
                            f"memory {kind} {count}",
                            run_memory(hub, folder, pki, context, count, kind),
                        )
                        if row is not None:
                            results["memory"].append(row)
        finally:
            for stop in reversed(stoppers):
                try:
                    await stop()
                except Exception as e:
                    log(f"stopping: {e}")
        if settings.profile:
            results["profile"] = settings.profile
    results["errors"] = errors
    results["protocol_errors"] = hub.protocol_errors
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios to the references and the targets, from the rows measured."""

    def small(target: str, sessions: int, window: int) -> dict[str, Any] | None:
        for row in results["small"]:
            if (row["target"], row["sessions"], row["window"]) == (target, sessions, window):
                return dict(row)
        return None

    def large(target: str, chunk: int) -> dict[str, Any] | None:
        for row in results["large"]:
            if (row["target"], row["chunk_bytes"]) == (target, chunk):
                return dict(row)
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        if a is None or b is None or not b or a != a or b != b:
            return None
        return round(a / b, 3)

    out: dict[str, Any] = {"small": [], "large": [], "targets": {}}
    configs = sorted({(r["sessions"], r["window"]) for r in results["small"]})
    for sessions, window in configs:
        entry: dict[str, Any] = {"sessions": sessions, "window": window}
        for name, reference in (
            ("relay_tls", "pipe_tls"),
            ("relay_tcpin", "pipe_mixed"),
            ("kamailio_tcp", "pipe_tcp"),
        ):
            row, ref = small(name, sessions, window), small(reference, sessions, window)
            if row is None or ref is None:
                continue
            entry[f"{name}/{reference}_msgs_per_s"] = ratio(row["msgs_per_s"], ref["msgs_per_s"])
            entry[f"{name}/{reference}_cpu_per_msg"] = ratio(
                row["server_cpu_us_per_msg"], ref["server_cpu_us_per_msg"]
            )
        relay_row, kam_row = (
            small("relay_tls", sessions, window),
            small("kamailio_tcp", sessions, window),
        )
        if relay_row and kam_row:
            entry["relay_tls/kamailio_tcp_cpu_per_msg"] = ratio(
                relay_row["server_cpu_us_per_msg"], kam_row["server_cpu_us_per_msg"]
            )
        if len(entry) > 2:
            out["small"].append(entry)
    for chunk in sorted({r["chunk_bytes"] for r in results["large"]}):
        entry = {"chunk_bytes": chunk}
        for name, reference in (
            ("relay_tls", "pipe_tls"),
            ("relay_tcpin", "pipe_mixed"),
            ("relay_tcpin", "pipe_tcp"),
            ("kamailio_tcp", "pipe_tcp"),
        ):
            row, ref = large(name, chunk), large(reference, chunk)
            if row is not None and ref is not None:
                entry[f"{name}/{reference}"] = ratio(row["mb_per_s"], ref["mb_per_s"])
        out["large"].append(entry)

    checks: dict[str, Any] = out["targets"]
    busiest = max(
        (r for r in results["small"] if r["target"] == "relay_tls" and r["sessions"] > 1),
        key=lambda r: r["msgs_per_s"],
        default=None,
    )
    if busiest is not None:
        value = busiest["server_cpu_us_per_msg"]
        checks["small_cpu_us_per_msg"] = {
            "measured": value,
            "at": f"relay_tls {busiest['sessions']}x{busiest['window']}",
            "target": TARGETS["small_cpu_us_per_msg"],
            "met": value <= TARGETS["small_cpu_us_per_msg"],
        }
    latency = small("relay_tls", 1, 1)
    if latency is not None:
        checks["latency_1x1"] = {
            "p50_ms": latency["rtt_p50_ms"],
            "p99_ms": latency["rtt_p99_ms"],
            "target": "p50 < 0.5 ms, p99 < 2 ms",
            "met": latency["rtt_p50_ms"] < TARGETS["latency_p50_ms"]
            and latency["rtt_p99_ms"] < TARGETS["latency_p99_ms"],
        }
    for chunk in (64 * 1024, MIB):
        for name, reference, key in (
            ("relay_tls", "pipe_tls", "large_ratio_tls"),
            ("relay_tcpin", "pipe_mixed", "large_ratio_tcp"),
        ):
            row, ref = large(name, chunk), large(reference, chunk)
            if row is None or ref is None:
                continue
            value = ratio(row["mb_per_s"], ref["mb_per_s"])
            checks[f"large_{chunk // 1024}k_{name}/{reference}"] = {
                "measured": value,
                "target": TARGETS[key],
                "met": value is not None and value >= TARGETS[key],
            }
    if results.get("auth"):
        value = results["auth"]["auth_per_s"]
        checks["auth_per_s"] = {
            "measured": value,
            "target": TARGETS["auth_per_s"],
            "met": value >= TARGETS["auth_per_s"],
        }
    for row in results["memory"]:
        key = "memory_tls_kib" if row["kind"] == "tls" else "memory_tcp_kib"
        checks[f"memory_{row['kind']}_{row['connections']}"] = {
            "measured": row["kib_per_connection"],
            "target": TARGETS[key],
            "met": row["kib_per_connection"] <= TARGETS[key],
        }
    rows = results.get("workers") or []
    one = next((r for r in rows if r["workers"] == 1), None)
    if rows:
        out["workers"] = [
            {
                "target": r["target"],
                "msgs_per_s": r["msgs_per_s"],
                "server_cpu_us_per_msg": r["server_cpu_us_per_msg"],
                "server_cpu_pct": r["server_cpu_pct"],
                "generator_cpu_pct": r["generator_cpu_pct"],
                "ratio_to_1w": ratio(r["msgs_per_s"], one["msgs_per_s"]) if one else None,
            }
            for r in rows
        ]
    return out


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.msrp_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="3 s loads, 64 MiB, 1,000 idle")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only these loads: small, large, memory, auth (repeat or comma-separate)",
    )
    parser.add_argument("--window", type=int, default=4, help="SENDs in flight per session")
    parser.add_argument("--duration", type=float, default=None, help="seconds per timed load")
    parser.add_argument("--auth-concurrency", type=int, default=32)
    parser.add_argument(
        "--with-kamailio", action="store_true", help="also measure Kamailio's msrp module"
    )
    parser.add_argument(
        "--profile", default=None, help="run the relay under cProfile, stats to this file"
    )
    parser.add_argument(
        "--py-spy",
        default=None,
        metavar="DIR",
        help="sample the relay with py-spy during each measured load; stacks to DIR",
    )
    parser.add_argument(
        "--workers",
        default="1,2",
        help="[relay] workers counts for the workers load (default 1,2)",
    )
    args = parser.parse_args(argv)
    loads = {"small", "large", "memory", "auth"}
    only = {name.strip() for text in args.only for name in text.split(",") if name.strip()}
    if only - loads - {"workers"}:
        parser.error(
            f"unknown load(s) {sorted(only - loads - {'workers'})};"
            f" choose from {sorted(loads | {'workers'})}"
        )
    try:
        workers = tuple(int(w) for w in args.workers.split(",") if w.strip())
    except ValueError:
        parser.error("--workers: whole numbers, comma separated")
    if not workers or min(workers) < 1:
        parser.error("--workers: at least 1")
    quick = bool(args.quick)
    return Settings(
        quick=quick,
        only=only or loads,
        window=max(1, min(64, args.window)),
        duration=args.duration if args.duration else (3.0 if quick else 10.0),
        warmup=0.3 if quick else 1.0,
        large_bytes=(64 if quick else 256) * MIB,
        memory_counts=(1000,) if quick else (1000, 10000),
        auth_concurrency=max(1, min(200, args.auth_concurrency)),
        with_kamailio=bool(args.with_kamailio),
        profile=os.path.abspath(args.profile) if args.profile else None,
        py_spy=os.path.abspath(args.py_spy) if args.py_spy else None,
        workers=workers,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    if settings.py_spy:
        PROFILER.append(PySpy(Path(settings.py_spy)))
    started = time.time()
    results = asyncio.run(run(settings))
    report = {
        **report_head(
            "msrp", started, "loopback; relay, references and load generator share these cores"
        ),
        "settings": {
            "quick": settings.quick,
            "only": sorted(settings.only),
            "window": settings.window,
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "large_bytes": settings.large_bytes,
            "memory_counts": list(settings.memory_counts),
            "auth_concurrency": settings.auth_concurrency,
            "kamailio": settings.with_kamailio,
            "profiled": bool(settings.profile or settings.py_spy),
            "workers": list(settings.workers),
        },
        "targets": TARGETS,
        **results,
        "summary": summarize(results),
    }
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
