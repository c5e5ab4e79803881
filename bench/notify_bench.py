"""Consent benchmark: latency from an XCAP PUT acknowledged to the "granted" NOTIFY.

Run by hand (not part of the tests)::

    python -m bench.notify_bench [--quick]

The relay runs as ``twistd -n --pidfile= msrprelay --config <tmp ini>`` with every
listener on port 0 (SIP on UDP); the ports are read from its "SIP listening on" and
"XCAP listening on" log lines.  The load generator is asyncio in this process with two
UDP sockets: one for the senders (``s0`` … ``s9``) and one for the recipients (``r0`` …),
each answering 200 to every request it receives (CONSENT, NOTIFY).  Every consent cycle
has its own list ``l<i>`` whose single member is its own registered recipient ``r<i>``,
so every (sender, list, recipient) triple is new and no subscription watches another
cycle's recipient:

1. sender: MESSAGE to the list → 407 → MESSAGE with credentials → 470 (consent URI);
2. sender: CONSENT to that URI → 401 → 202 (wait-permission URI in ``Call-Info``); the
   recipient's socket gets the forwarded CONSENT with the ``Permission`` header;
3. sender: SUBSCRIBE wait-permission → 401 → 200, then the immediate NOTIFY (pending);
4. recipient: PUT of a grant document to the Permission URI over a fresh HTTPS
   connection (capability, no account).  ``t_sent`` = request written, ``t_ack`` = the
   HTTP response read completely;
5. ``t_notify`` = the sender's socket receives the NOTIFY whose body says "granted".

Reported: ``t_notify - t_ack`` (raw: negative when the NOTIFY overtakes the HTTP answer;
and clamped at 0), ``t_notify - t_sent``, the PUT round trip, and the relay CPU per whole
cycle (/proc/PID/stat around each load).  Concurrency 1 and 10 cycles in flight.
Every wait is bounded (``TIMEOUT``), every load has a deadline, the relay is stopped in
a ``finally``.  One JSON line goes to stdout, progress to stderr.

Across nodes (``--postgres DSN``): two relays on 127.0.0.2 (A) and 127.0.0.3 (B) share
a PostgreSQL store, in a schema of the run's own (dropped afterwards).  Senders and
recipients use A's SIP; the grant is PUT to B's XCAP (the Permission URI's path at B),
so the NOTIFY A sends is woken by B's commit through the store's change feed
(LISTEN/NOTIFY).  The same loads then run with the PUT at A itself, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from lxml import etree

from bench.daemon import spawn_twistd, stop_async, wait_for_log
from bench.pgscratch import scratch_schema
from relayd.consent.vocabulary import CONSENT_RULES_MIME_TYPE as MIME
from relayd.consent.vocabulary import CONSENT_STATUS_NAMESPACE as CS
from relayd.consent.vocabulary import RESOURCE_LISTS_NAMESPACE as RL
from relayd.sip.message import SIPRequest, SIPResponse, make_response, new_tag
from relayd.sip.parser import parse_datagram
from relayd.testing import (
    RelayPKI,
    grant_document,
    make_pki,
    sip_credentials,
    uac_request,
    write_users,
)

HOST = "127.0.0.1"
REALM = "relayd-bench"
REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
CONCURRENCY = (1, 10)
SENDERS = 10
TIMEOUT = 5.0
LOAD_DEADLINE = 300.0
TARGET_P99_MS = 100.0

_started = time.monotonic()


def log(message: str) -> None:
    print(
        f"[notify-bench {time.monotonic() - _started:6.1f}s] {message}",
        file=sys.stderr,
        flush=True,
    )


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def idle_cpu(relay: Relay, seconds: float = 1.0) -> float:
    """CPU seconds per second ``relay`` spends with nothing to do (timers, the feed's poll)."""
    assert relay.process is not None
    before = cpu_seconds(relay.process.pid)
    time.sleep(seconds)
    return (cpu_seconds(relay.process.pid) - before) / seconds


def password(user: str) -> str:
    return f"bench-pw-{user}"


def aor(user: str) -> str:
    return f"sip:{user}@{HOST}"


@dataclass(frozen=True)
class Job:
    """One consent cycle: its own list with one member, the recipient."""

    list_name: str
    recipient: str
    sender: str


def jobs(total: int, shared: int) -> list[Job]:
    """``l<i>`` → ``r<i>`` (one recipient each), then ``ls<j>`` → the shared ``rs``."""
    own = [Job(f"l{i}", f"r{i}", f"s{i % SENDERS}") for i in range(total)]
    return own + [Job(f"ls{j}", "rs", f"s{j % SENDERS}") for j in range(shared)]


def lists_xml(work: Sequence[Job]) -> str:
    lists = "".join(
        f'<list name="{j.list_name}"><entry uri="{aor(j.recipient)}"/></list>\n' for j in work
    )
    head = f'<?xml version="1.0" encoding="UTF-8"?>\n<resource-lists xmlns="{RL}">\n'
    return head + lists + "</resource-lists>\n"


def states(body: bytes) -> list[str]:
    root = etree.fromstring(body)
    return [str(entry.get("state")) for entry in root.iter(f"{{{CS}}}consent")]


# -- the relay ----------------------------------------------------------------------------


@dataclass
class Relay:
    folder: Path
    pki: RelayPKI
    work: list[Job]
    process: subprocess.Popen[bytes] | None = None
    sip_port: int = 0
    xcap_port: int = 0
    host: str = HOST
    dsn: str | None = None
    """The PostgreSQL store shared with other relays; None: the default (SQLite)."""

    @property
    def log_path(self) -> Path:
        return self.folder / f"relayd-{self.host}.log"

    def write_config(self) -> Path:
        cert, key = self.pki.leaf(self.host)
        recipients = sorted({j.recipient for j in self.work})
        accounts = [f"s{i}" for i in range(SENDERS)] + recipients
        htdigest = write_users(
            self.folder / "users.htdigest", REALM, {u: password(u) for u in accounts}
        )
        lists = self.folder / "lists.xml"
        lists.write_text(lists_xml(self.work), encoding="utf-8")
        host = self.host
        text = (
            f"[relay]\nhostname = {host}\ndata_dir = {self.folder / ('data-' + host)}\n\n"
            f"[msrp]\nlisten = ssl:0:interface={host}\n\n"
            f"[xcap]\nlisten = ssl:0:interface={host}\n\n"
            f"[auth]\nrealm = {REALM}\nusers = {htdigest}\n\n"
            f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n\n"
            f"[sip]\nlisten = udp:0:interface={host}\ndomain = {HOST}\nlists = {lists}\n"
            "max_list_size = 10\nconsent_requests_per_hour = 1000000\n"
            "max_subscriptions_per_user = 1000000\n"
        )
        if self.dsn is not None:
            text += f"\n[store]\nbackend = postgresql\ndsn = {self.dsn}\n"
        config = self.folder / f"relayd-{host}.ini"
        config.write_text(text, encoding="utf-8")
        return config

    async def start(self) -> None:
        config = self.write_config()
        self.process = spawn_twistd(config, self.log_path, REPO)
        escaped = re.escape(self.host).encode()
        listening = {
            "xcap": re.compile(rb"XCAP listening on ssl:" + escaped + rb":(\d+)"),
            "sip": re.compile(rb"SIP listening on udp:" + escaped + rb":(\d+)"),
        }
        found = await wait_for_log(self.process, self.log_path, listening)
        self.xcap_port, self.sip_port = int(found["xcap"][1]), int(found["sip"][1])
        log(
            f"relayd {self.host} pid {self.process.pid}:"
            f" SIP udp {self.sip_port}, XCAP {self.xcap_port}"
        )

    async def stop(self) -> None:
        await stop_async(self.process)

    def log_problems(self) -> dict[str, Any]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        lines = text.splitlines()
        bad = [ln for ln in lines if re.search(r"Traceback|Unhandled|\bfailed\b|CRITICAL", ln)]
        return {"log_lines": len(lines), "error_lines": len(bad), "first_errors": bad[:5]}


# -- SIP over asyncio UDP -------------------------------------------------------------------


@dataclass
class Received:
    request: SIPRequest
    at: float


@dataclass
class SIPSocket(asyncio.DatagramProtocol):
    """One UDP socket for many users: responses by branch, requests answered 200."""

    relay_port: int
    relay_host: str = HOST
    transport: asyncio.DatagramTransport | None = None
    local_port: int = 0
    waiting: dict[str, asyncio.Future[SIPResponse]] = field(default_factory=dict)
    by_call: dict[str, asyncio.Queue[Received]] = field(default_factory=dict)
    by_user: dict[str, asyncio.Future[Received]] = field(default_factory=dict)
    seen: set[tuple[str, str]] = field(default_factory=set)
    duplicates: int = 0
    stray: int = 0
    stray_kinds: dict[str, int] = field(default_factory=dict)
    cseq: int = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.local_port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        at = time.perf_counter()
        try:
            message = parse_datagram(data)
        except Exception:
            self.stray += 1
            return
        if isinstance(message, SIPResponse):
            if message.status >= 200:
                waiter = self.waiting.pop(message.via.branch or "", None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
            return
        if message.method == "ACK":
            return
        self.send(make_response(message, 200).to_bytes())
        key = (message.call_id or "", message.headers.get("cseq") or "")
        if key in self.seen:
            self.duplicates += 1
            return
        self.seen.add(key)
        item = Received(message, at)
        queue = self.by_call.get(message.call_id or "")
        if queue is not None:
            queue.put_nowait(item)
            return
        user = message.uri.user or ""
        pending = self.by_user.pop(user, None)
        if pending is not None and not pending.done():
            pending.set_result(item)
            return
        self.stray += 1
        kind = f"{message.method} {message.headers.get('event') or ''}".strip()
        self.stray_kinds[kind] = self.stray_kinds.get(kind, 0) + 1

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (self.relay_host, self.relay_port))

    async def request(
        self,
        user: str,
        method: str,
        uri: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        to: str | None = None,
        call_id: str | None = None,
    ) -> SIPResponse:
        call_id = call_id or new_tag()
        from_tag = new_tag()
        authorization: tuple[str, str] | None = None
        loop = asyncio.get_running_loop()
        for _ in range(3):
            self.cseq += 1
            branch, request = uac_request(
                method,
                uri,
                via=f"SIP/2.0/UDP {HOST}:{self.local_port}",
                aor=aor(user),
                from_tag=from_tag,
                to=to,
                call_id=call_id,
                cseq=self.cseq,
                contact=f"<sip:{user}@{HOST}:{self.local_port};transport=udp>",
                headers=headers,
                authorization=authorization,
                body=body,
            )
            waiter: asyncio.Future[SIPResponse] = loop.create_future()
            self.waiting[branch] = waiter
            try:
                response = await self._send_with_retransmission(request.to_bytes(), waiter)
            finally:
                self.waiting.pop(branch, None)
            authorization = sip_credentials(
                response, method=method, uri=uri, username=user, password=password(user)
            )
            if authorization is None:
                return response
        raise RuntimeError(f"{method} {uri}: authentication loop")

    async def _send_with_retransmission(
        self, data: bytes, waiter: asyncio.Future[SIPResponse]
    ) -> SIPResponse:
        """Timer E style: resend at 0.5, 1, 2 s … until TIMEOUT (UDP on loopback)."""
        deadline = time.monotonic() + TIMEOUT
        interval = 0.5
        while True:
            self.send(data)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no final response")
            try:
                return await asyncio.wait_for(asyncio.shield(waiter), min(interval, left))
            except TimeoutError:
                interval = min(interval * 2, 4.0)


async def open_socket(relay_port: int, relay_host: str = HOST) -> SIPSocket:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(
        lambda: SIPSocket(relay_port, relay_host), local_addr=(HOST, 0)
    )
    return protocol


# -- one consent cycle ----------------------------------------------------------------------


@dataclass
class Cycle:
    job: Job
    put_rtt_ms: float = 0.0
    ack_to_notify_ms: float = 0.0
    sent_to_notify_ms: float = 0.0
    extra_notifies: int = 0


async def put_permission(
    url: str, body: bytes, context: ssl.SSLContext
) -> tuple[int, float, float]:
    """PUT over a fresh HTTPS connection: (status, t_sent, t_ack)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(parts.hostname, parts.port or 443, ssl=context), TIMEOUT
    )
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        head = (
            f"PUT {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {MIME}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        t_sent = time.perf_counter()
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length:
            await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
        t_ack = time.perf_counter()
        return status, t_sent, t_ack
    finally:
        writer.close()


async def next_notify(queue: asyncio.Queue[Received], deadline: float) -> Received:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("NOTIFY")
    return await asyncio.wait_for(queue.get(), left)


def put_target(permission: str, put_at: str | None) -> str:
    """The Permission URI, or its path at another node's XCAP origin (``https://h:p``)."""
    if put_at is None:
        return permission
    parts = urlsplit(permission)
    return put_at + parts.path + (f"?{parts.query}" if parts.query else "")


async def cycle(
    job: Job,
    senders: SIPSocket,
    recipients: SIPSocket,
    context: ssl.SSLContext,
    put_at: str | None = None,
) -> Cycle:
    sender, recipient = job.sender, job.recipient
    target_list = f"sip:{job.list_name}@{HOST}"
    loop = asyncio.get_running_loop()

    refused = await senders.request(
        sender, "MESSAGE", target_list, [("Content-Type", "text/plain")], b"hello list"
    )
    if refused.status != 470:
        raise RuntimeError(f"MESSAGE: {refused.status} (expected 470)")
    entries = etree.fromstring(refused.body).iter(f"{{{RL}}}entry")
    (consent_uri,) = [str(e.get("uri")) for e in entries]

    forwarded: asyncio.Future[Received] = loop.create_future()
    recipients.by_user[recipient] = forwarded
    accepted = await senders.request(
        sender, "CONSENT", consent_uri, [("Consent-Methods", "MESSAGE")], to=f"<{consent_uri}>"
    )
    if accepted.status != 202:
        raise RuntimeError(f"CONSENT: {accepted.status} (expected 202)")
    info = accepted.headers.get("call-info") or ""
    wait_uri = info[info.index("<") + 1 : info.index(">")]
    consent = await asyncio.wait_for(forwarded, TIMEOUT)
    permission = (consent.request.headers.get("permission") or "").strip("<>")
    if not permission.startswith("https://"):
        raise RuntimeError(f"forwarded CONSENT without Permission URI: {permission!r}")

    call_id = new_tag()
    queue: asyncio.Queue[Received] = asyncio.Queue()
    senders.by_call[call_id] = queue
    try:
        ok = await senders.request(
            sender,
            "SUBSCRIBE",
            wait_uri,
            [("Event", "wait-permission"), ("Expires", "600")],
            to=f"<{wait_uri}>",
            call_id=call_id,
        )
        if ok.status != 200:
            raise RuntimeError(f"SUBSCRIBE: {ok.status}")
        first = await next_notify(queue, time.monotonic() + TIMEOUT)
        if states(first.request.body) != ["pending"]:
            raise RuntimeError(f"first NOTIFY: {states(first.request.body)}")

        status, t_sent, t_ack = await put_permission(
            put_target(permission, put_at), grant_document(aor(sender), target_list), context
        )
        if status not in (200, 201):
            raise RuntimeError(f"PUT: {status}")
        deadline = time.monotonic() + TIMEOUT
        extra = 0
        while True:
            notify = await next_notify(queue, deadline)
            if states(notify.request.body) == ["granted"]:
                break
            extra += 1
        result = Cycle(job, extra_notifies=extra)
        result.put_rtt_ms = (t_ack - t_sent) * 1000
        result.ack_to_notify_ms = (notify.at - t_ack) * 1000
        result.sent_to_notify_ms = (notify.at - t_sent) * 1000
        return result
    except BaseException:
        senders.by_call.pop(call_id, None)
        raise


# -- loads and the report -------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 3)

    return {
        "min": round(ordered[0], 3),
        "p50": at(0.50),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": round(ordered[-1], 3),
    }


async def register_all(recipients: SIPSocket, users: list[str]) -> int:
    gate = asyncio.Semaphore(20)
    failures = 0

    async def one(user: str) -> None:
        nonlocal failures
        async with gate:
            try:
                response = await recipients.request(
                    user, "REGISTER", f"sip:{HOST}", [("Expires", "3600")], to=f"<{aor(user)}>"
                )
                if response.status != 200:
                    failures += 1
            except (TimeoutError, RuntimeError):
                failures += 1

    await asyncio.gather(*(one(u) for u in users))
    return failures


async def load(
    relay: Relay,
    senders: SIPSocket,
    recipients: SIPSocket,
    context: ssl.SSLContext,
    work: list[Job],
    in_flight: int,
    label: str,
    put_at: Relay | None = None,
) -> dict[str, Any]:
    assert relay.process is not None
    origin = None if put_at is None else f"https://{put_at.host}:{put_at.xcap_port}"
    todo = list(work)
    cycles: list[Cycle] = []
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + LOAD_DEADLINE

    async def worker() -> None:
        while todo and time.monotonic() < stop_at:
            job = todo.pop(0)
            try:
                cycles.append(await cycle(job, senders, recipients, context, origin))
            except Exception as error:  # counted and reported, the load goes on
                key = f"{type(error).__name__}: {error}"[:120]
                errors[key] = errors.get(key, 0) + 1

    cpu_before, wall_before = cpu_seconds(relay.process.pid), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    wall = time.monotonic() - wall_before
    cpu = cpu_seconds(relay.process.pid) - cpu_before
    # NOTIFYs after "granted" (the subscriptions stay active): wait briefly, then count.
    await asyncio.sleep(0.3)
    after: dict[str, int] = {}
    for call_id in list(senders.by_call):
        queue = senders.by_call.pop(call_id)
        while not queue.empty():
            key = ",".join(states(queue.get_nowait().request.body)) or "none"
            after[key] = after.get(key, 0) + 1
    raw = [c.ack_to_notify_ms for c in cycles]
    result = {
        "cycles": len(cycles),
        "failures": sum(errors.values()),
        "errors": errors,
        "wall_s": round(wall, 2),
        "cycles_per_s": round(len(cycles) / wall, 1) if wall else 0.0,
        "relay_cpu_ms_per_cycle": round(cpu * 1000 / max(len(cycles), 1), 2),
        "ack_to_notify_ms": percentiles(raw),
        "ack_to_notify_clamped_ms": percentiles([max(0.0, v) for v in raw]),
        "notify_before_ack": sum(1 for v in raw if v < 0),
        "sent_to_notify_ms": percentiles([c.sent_to_notify_ms for c in cycles]),
        "put_rtt_ms": percentiles([c.put_rtt_ms for c in cycles]),
        "extra_notifies_before_granted": sum(c.extra_notifies for c in cycles),
        "notifies_after_granted": after,
    }
    quarter = max(1, len(cycles) // 4)
    result["ack_to_notify_p50_by_quarter_ms"] = [
        percentiles([c.ack_to_notify_ms for c in cycles[i : i + quarter]]).get("p50")
        for i in range(0, quarter * 4, quarter)
    ]
    result["relay_cpu_ms_per_cycle"] = round(cpu * 1000 / max(len(cycles), 1), 2)
    log(f"{label} (in flight {in_flight}): {json.dumps(result)}")
    return result


async def run(quick: bool) -> dict[str, Any]:
    per_load = 50 if quick else 200
    total = per_load * len(CONCURRENCY)
    shared = 25 if quick else 100
    work = jobs(total, shared)
    results: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    problems: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="notify-bench-") as temp:
        folder = Path(temp)
        pki = make_pki(folder / "pki")
        context = ssl.create_default_context(cafile=pki.ca_path)
        relay = Relay(folder, pki, work)
        sockets: list[SIPSocket] = []
        try:
            await relay.start()
            senders = await open_socket(relay.sip_port)
            recipients = await open_socket(relay.sip_port)
            sockets += [senders, recipients]
            accounts = sorted({j.recipient for j in work})
            failed = await register_all(recipients, accounts)
            log(f"registered {len(accounts) - failed}/{len(accounts)} recipients")
            for number, in_flight in enumerate(CONCURRENCY):
                part = work[number * per_load : (number + 1) * per_load]
                label = f"in_flight_{in_flight}"
                results[label] = await load(
                    relay, senders, recipients, context, part, in_flight, label
                )
            # Fan-out: every consent of this load goes to the same recipient ``rs``, and
            # every earlier wait-permission subscription stays active and watches it.
            extra = {
                "shared_recipient": await load(
                    relay, senders, recipients, context, work[total:], 1, "shared_recipient"
                )
            }
            await asyncio.sleep(0.2)
            problems = {
                "registration_failures": failed,
                "retransmitted_requests_seen": senders.duplicates + recipients.duplicates,
                "unmatched_requests": senders.stray + recipients.stray,
                "unmatched_to_senders": senders.stray_kinds,
                "unmatched_to_recipients": recipients.stray_kinds,
                **relay.log_problems(),
            }
        finally:
            for sock in sockets:
                if sock.transport is not None:
                    sock.transport.close()
            await relay.stop()
    p99s = [r["ack_to_notify_ms"].get("p99") for r in results.values()]
    worst = max((p for p in p99s if p is not None), default=None)
    return {
        "bench": "notify",
        "quick": quick,
        "cycles_per_load": per_load,
        "cpus": os.cpu_count(),
        **results,
        **extra,
        "relay": problems,
        "target_p99_ms": TARGET_P99_MS,
        "worst_p99_ms": worst,
        "meets": worst is not None
        and worst < TARGET_P99_MS
        and all(r["failures"] == 0 for r in results.values()),
    }


POOL_NODES = ("127.0.0.2", "127.0.0.3")
#: (label, cycles in flight, PUT at the other node): same- and cross-node loads
#: alternate, so that both see the same machine.
POOL_PLAN = (
    ("cross_node_in_flight_1", 1, True),
    ("same_node_in_flight_1", 1, False),
    ("cross_node_in_flight_10", 10, True),
    ("same_node_in_flight_10", 10, False),
)


async def run_pool(dsn: str, quick: bool) -> dict[str, Any]:
    """PUT at node B, NOTIFY from node A, over one PostgreSQL (module doc)."""
    per_load = 50 if quick else 200
    work = jobs(per_load * len(POOL_PLAN), 0)
    results: dict[str, Any] = {}
    problems: dict[str, Any] = {}
    with (
        scratch_schema(dsn) as (scoped, _backends),
        tempfile.TemporaryDirectory(prefix="notify-pool-") as temp,
    ):
        folder = Path(temp)
        pki = make_pki(folder / "pki")
        context = ssl.create_default_context(cafile=pki.ca_path)
        a, b = (Relay(folder, pki, work, host=host, dsn=scoped) for host in POOL_NODES)
        sockets: list[SIPSocket] = []
        try:
            await a.start()
            await b.start()
            senders = await open_socket(a.sip_port, a.host)
            recipients = await open_socket(a.sip_port, a.host)
            sockets += [senders, recipients]
            accounts = sorted({j.recipient for j in work})
            assert b.process is not None
            await asyncio.sleep(2.0)  # B done starting
            idle = idle_cpu(b, 2.0)
            b_before, wall_before = cpu_seconds(b.process.pid), time.monotonic()
            failed = await register_all(recipients, accounts)
            await asyncio.sleep(1.0)  # B applies the last ones
            # What a registration at A costs B, which only follows the change feed.
            spent = cpu_seconds(b.process.pid) - b_before
            spent -= idle * (time.monotonic() - wall_before)
            remote_us = spent * 1e6 / max(len(accounts) - failed, 1)
            log(f"registered {len(accounts) - failed}/{len(accounts)} recipients at node A")
            for number, (label, in_flight, cross) in enumerate(POOL_PLAN):
                part = work[number * per_load : (number + 1) * per_load]
                results[label] = await load(
                    a, senders, recipients, context, part, in_flight, label, b if cross else None
                )
            await asyncio.sleep(0.2)
            problems = {
                "registration_failures": failed,
                "registration_cpu_us_at_the_other_node": round(remote_us, 1),
                "node_a": a.log_problems(),
                "node_b": b.log_problems(),
            }
        finally:
            for sock in sockets:
                if sock.transport is not None:
                    sock.transport.close()
            await a.stop()
            await b.stop()
    cross_p99 = [
        r["ack_to_notify_ms"].get("p99") for k, r in results.items() if k.startswith("cross")
    ]
    worst = max((p for p in cross_p99 if p is not None), default=None)
    return {
        "bench": "notify-pool",
        "quick": quick,
        "store": "postgresql",
        "cycles_per_load": per_load,
        "cpus": os.cpu_count(),
        **results,
        "relays": problems,
        "target_p99_ms": TARGET_P99_MS,
        "worst_cross_node_p99_ms": worst,
        "meets": worst is not None
        and worst < TARGET_P99_MS
        and all(r["failures"] == 0 for r in results.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.notify_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="50 consents per load instead of 200")
    parser.add_argument(
        "--postgres",
        metavar="DSN",
        help="two relays on one PostgreSQL: the grant PUT at one, the NOTIFY from the other",
    )
    args = parser.parse_args(argv)
    if args.postgres:
        report = asyncio.run(run_pool(args.postgres, args.quick))
    else:
        report = asyncio.run(run(args.quick))
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
