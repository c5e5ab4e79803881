"""A UDP OPTIONS flood at the relay: its memory, and whether a polite client is answered.

Run by hand (not part of the tests)::

    python -m bench.sip_flood [--count 1100000] [--seconds 10] [--senders 1]
                              [--after 60]

The relay runs in its own process (``twistd -n msrprelay``, the same configuration as
``bench.sip_bench``, one UDP SIP listener on loopback). Once it listens:

* ``--senders`` processes send ``--count`` OPTIONS in all, each with its own branch and
  Call-ID (every one a new transaction), spread evenly over ``--seconds``, to
  127.0.0.1 only. Each sends batches of 256 datagrams per ``sendmmsg(2)`` call (through
  ctypes: a Python ``sendto`` loop manages a few hundred thousand a second at best), on a
  connected socket it never reads: the relay's answers are dropped at its receive
  buffer. A sender stops by itself at its count or at ``--seconds`` + 2 s, whichever
  comes first.
* A polite client sends one OPTIONS every 100 ms from its own socket, from 1 s before
  the flood until 1 s after it, retransmits each as a UAC over UDP must (Timer E, from
  500 ms), and notes when each is answered (any final status; a 503 counts), from its
  first transmission. A request not answered within 5 s counts as lost.
* The relay's VmRSS (``/proc/PID/status``) is read every 100 ms, from just before the
  flood until ``--after`` seconds after it.

It prints one JSON line: the rate achieved (datagrams handed to the kernel per second
over the flood), the RSS at the start, its peak, and ``--after`` s after the flood, and
the polite client's worst answer delay during the flood, how many of its requests were
lost, and the longest time it waited with no answer at all.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.report import report_head
from bench.sip_bench import (
    HOST,
    Relay,
    cpu_seconds,
    free_udp_port,
    log,
    rss_kib,
    udp_rcvbuf_errors,
)
from relayd.testing import make_pki

BATCH = 256
SLOT = 512
POLITE_INTERVAL = 0.1
LOST_AFTER = 5.0
T1, T2 = 0.5, 4.0


def options(branch: str, call_id: str, port: int, relay_port: int) -> bytes:
    return (
        f"OPTIONS sip:{HOST}:{relay_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bK{branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:flood@{HOST}>;tag=f1\r\n"
        f"To: <sip:{HOST}>\r\n"
        f"Call-ID: {call_id}@{HOST}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


# -- the flood ----------------------------------------------------------------------------


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_IOVec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def flood_sender(
    relay_port: int, index: int, count: int, seconds: float, sent: Any, started: Any
) -> None:
    """Send ``count`` OPTIONS evenly over ``seconds`` in sendmmsg batches; stop at the
    count or at ``seconds`` + 2 s. Writes what was handed to the kernel into ``sent``."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((HOST, relay_port))
    port = sock.getsockname()[1]
    # One buffer of BATCH slots; each message's counter is patched in place.
    template = options(f"{index:02x}-%010d", f"flood-{index:02x}-%010d", port, relay_port)
    first = template.index(b"%010d")
    sample = template.replace(b"%010d", b"0" * 10)
    assert len(sample) <= SLOT
    second = sample.index(b"0" * 10, first + 10)
    buffer = ctypes.create_string_buffer(SLOT * BATCH)
    view = memoryview(buffer).cast("B")
    iovecs = (_IOVec * BATCH)()
    headers = (_MMsgHdr * BATCH)()
    base = ctypes.addressof(buffer)
    for i in range(BATCH):
        view[i * SLOT : i * SLOT + len(sample)] = sample
        iovecs[i].iov_base = base + i * SLOT
        iovecs[i].iov_len = len(sample)
        headers[i].msg_hdr.msg_iov = ctypes.pointer(iovecs[i])
        headers[i].msg_hdr.msg_iovlen = 1
    fd = sock.fileno()
    started.wait()
    start = time.monotonic()
    deadline = start + seconds + 2.0
    rate = count / seconds
    done = 0
    while done < count and time.monotonic() < deadline:
        due = start + done / rate
        now = time.monotonic()
        if now < due:
            time.sleep(min(due - now, 0.01))
            continue
        n = min(BATCH, count - done)
        for i in range(n):
            number = b"%010d" % (done + i)
            offset = i * SLOT
            view[offset + first : offset + first + 10] = number
            view[offset + second : offset + second + 10] = number
        result = libc.sendmmsg(fd, headers, n, 0)
        if result < 0:
            time.sleep(0.001)  # ENOBUFS and the like: the kernel is behind
            continue
        done += result
    sent[index] = done
    sock.close()
    log(f"sender {index}: {done} sent")


# -- the polite client ----------------------------------------------------------------------


def polite_client(relay_port: int, seconds: float, results: dict[str, Any]) -> None:
    """One OPTIONS every 100 ms for ``seconds``, each retransmitted as RFC 3261 §17.1.2.2
    says (Timer E: T1 = 500 ms, doubling up to T2 = 4 s) until answered; notes when each
    was first sent and when it was answered."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(0.005)
    port = sock.getsockname()[1]
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}
    retransmit: dict[str, tuple[float, float]] = {}  # key -> (due, interval)
    start = time.monotonic()
    stop_sending = start + seconds
    stop = stop_sending + LOST_AFTER
    number = 0
    while time.monotonic() < stop:
        now = time.monotonic()
        if now < stop_sending and now >= start + number * POLITE_INTERVAL:
            key = f"polite{number}"
            sock.sendto(options(key, key, port, relay_port), (HOST, relay_port))
            sent[key] = now
            retransmit[key] = (now + T1, T1)
            number += 1
        for key, (due, interval) in list(retransmit.items()):
            if key in answered or now - sent[key] > LOST_AFTER:
                del retransmit[key]
            elif now >= due:
                sock.sendto(options(key, key, port, relay_port), (HOST, relay_port))
                interval = min(2 * interval, T2)
                retransmit[key] = (now + interval, interval)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        at = time.monotonic()
        marker = data.find(b"branch=z9hG4bK")
        if marker < 0 or not data.startswith(b"SIP/2.0 "):
            continue
        end = data.find(b";", marker)
        key = data[marker + len(b"branch=z9hG4bK") : end].decode()
        if int(data[8:11]) >= 200 and key in sent and key not in answered:
            answered[key] = at
    sock.close()
    results["sent"] = sent
    results["answered"] = answered


def summarize_polite(
    sent: dict[str, float], answered: dict[str, float], flood: tuple[float, float]
) -> dict[str, Any]:
    """Worst delay of requests sent during the flood, lost ones, longest wait unanswered."""
    during = {k: t for k, t in sent.items() if flood[0] <= t <= flood[1]}
    delays = [answered[k] - t for k, t in during.items() if k in answered]
    lost = [k for k in during if k not in answered]
    # Longest stretch in which the client had a request out and no answer came back.
    events = sorted(answered.values())
    gap = 0.0
    for t in during.values():
        later = [a for a in events if a >= t]
        gap = max(gap, (later[0] if later else t + LOST_AFTER) - t)
    return {
        "requests_during_flood": len(during),
        "answered": len(delays),
        "lost": len(lost),
        "worst_delay_ms": round(max(delays) * 1000, 1) if delays else None,
        "median_delay_ms": round(sorted(delays)[len(delays) // 2] * 1000, 1) if delays else None,
        "longest_wait_without_answer_ms": round(gap * 1000, 1),
    }


# -- the run -----------------------------------------------------------------------------------


def run(settings: argparse.Namespace) -> dict[str, Any]:
    started_at = time.time()
    with tempfile.TemporaryDirectory(prefix="relayd-sip-flood-") as tmp:
        root = Path(tmp)
        relay = Relay(root, make_pki(root / "pki"), free_udp_port())
        relay.start()
        try:
            return measure(relay, settings, started_at)
        finally:
            relay.stop()


def measure(relay: Relay, settings: argparse.Namespace, started_at: float) -> dict[str, Any]:
    pid = relay.pid
    time.sleep(2.0)  # settle after start-up
    rss_start = rss_kib(pid)
    samples: list[tuple[float, int]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            samples.append((time.monotonic(), rss_kib(pid)))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    polite: dict[str, Any] = {}
    client = threading.Thread(
        target=polite_client, args=(relay.sip_port, settings.seconds + 2.0, polite)
    )
    context = multiprocessing.get_context("fork")
    sent = context.Array("l", settings.senders)
    go = context.Event()
    per_sender = settings.count // settings.senders
    senders = [
        context.Process(
            target=flood_sender,
            args=(relay.sip_port, i, per_sender, settings.seconds, sent, go),
            daemon=True,
        )
        for i in range(settings.senders)
    ]
    for process in senders:
        process.start()
    client.start()
    time.sleep(1.0)
    log(f"flooding: {per_sender * settings.senders} OPTIONS over {settings.seconds} s")
    flood_start = time.monotonic()
    cpu_start = cpu_seconds(pid)
    drops_start = udp_rcvbuf_errors()
    go.set()
    for process in senders:
        process.join(settings.seconds + 10)
        if process.is_alive():
            process.kill()
    flood_end = time.monotonic()
    cpu_flood = cpu_seconds(pid) - cpu_start
    kernel_drops = udp_rcvbuf_errors() - drops_start
    total = sum(sent[:])
    client.join()
    log(f"flood over ({total} sent in {flood_end - flood_start:.1f} s); waiting {settings.after} s")
    rss_flood_end = rss_kib(pid)
    time.sleep(max(0.0, flood_end + settings.after - time.monotonic()))
    rss_after = rss_kib(pid)
    sampling.set()
    sampler.join()
    peak = max((rss for _, rss in samples), default=rss_start)
    head = report_head("sip_flood", started_at, "relay, senders and client share the cores")
    return {
        **head,
        "flood": {
            "requested": per_sender * settings.senders,
            "sent": total,
            "senders": settings.senders,
            "seconds": round(flood_end - flood_start, 2),
            "rate_per_s": round(total / (flood_end - flood_start)),
            "relay_cpu_seconds": round(cpu_flood, 1),
            "kernel_drops": kernel_drops,
        },
        "rss_mib": {
            "start": round(rss_start / 1024, 1),
            "peak": round(peak / 1024, 1),
            "flood_end": round(rss_flood_end / 1024, 1),
            f"after_{settings.after:g}s": round(rss_after / 1024, 1),
            "peak_growth": round((peak - rss_start) / 1024, 1),
            "left_after": round((rss_after - rss_start) / 1024, 1),
        },
        "polite_client": summarize_polite(
            polite.get("sent", {}), polite.get("answered", {}), (flood_start, flood_end)
        ),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sip_flood", description=__doc__)
    parser.add_argument("--count", type=int, default=1_100_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--after", type=float, default=60.0)
    settings = parser.parse_args(argv)
    if not 0 < settings.count <= 5_000_000 or not 0 < settings.seconds <= 60:
        parser.error("--count must be in 1..5000000 and --seconds in 0..60")
    return settings


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
