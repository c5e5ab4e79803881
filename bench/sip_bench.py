"""SIP consent relay benchmark: the relay in its own process, SIPp as senders and members.

Run by hand (not part of the tests)::

    python -m bench.sip_bench [--quick] [--rates 500,1000,2000,4000] [--duration S]
                              [--only list1,list10,470] [--profile FILE]

It prints one JSON line with every figure on stdout and its progress on stderr.

Set-up: ``twistd -n msrprelay --config <tmp ini>`` with a UDP SIP listener on a free
port, an in-memory store and a resource-lists file holding ``sip:list1@127.0.0.1``
(member m0) and ``sip:list10@127.0.0.1`` (m0 … m9).  Once it listens, every member is
granted ``alice`` on both lists with ``relayctl permissions grant`` over the XCAP HTTPS
API (digest as the ``[xcap] admins`` user ``admin``), and each member registers (digest,
from here) a contact pointing to its own SIPp UAS sink (``bench/sipp/message_sink.xml``,
one SIPp process and port per member: copies of one MESSAGE share a Call-ID, which SIPp
would take for one call on a shared port).

Loads, each at fixed rates stepping up (``-r``), ``duration`` seconds per step:

* ``list1`` / ``list10``: SIPp UAC ``alice`` (``bench/sipp/message_200.xml``): MESSAGE
  → 407 → MESSAGE with ``[authentication]`` (digest uri = Request-URI) → 200.  Every
  relayed MESSAGE costs the sender a 407 round trip (the relay's nonces are single-call).
* ``470``: SIPp UAC ``mallory`` (no permission) to list10 (``message_470.xml``): 407 →
  authenticated MESSAGE → 470 Consent Needed.

Figures per step: transactions answered per second (over SIPp's whole run, so a
backlog counts against it), SIPp failures, retransmissions and 503s
(``-trace_counts``), MESSAGEs created at the sinks (each distinct Call-ID once;
a retransmitted copy is a retransmission there, not a new call), the loss against
``ok x members``, and the relay's CPU (utime+stime from /proc) per delivered MESSAGE or
per 470 over the step (UAC run plus the sinks' drain).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.daemon import spawn_twistd, stop_sync
from relayd.sip.auth import client_authorization
from relayd.testing import RelayPKI, make_pki, write_users

HOST = "127.0.0.1"
REALM = "relayd-sip-bench"
SENDER = "alice"
STRANGER = "mallory"
ADMIN = "admin"
MEMBERS = [f"m{i}" for i in range(10)]
USERS = {
    SENDER: "alice-bench",
    STRANGER: "mallory-bench",
    ADMIN: "admin-bench",
    **{m: f"{m}-bench" for m in MEMBERS},
}
LISTS = {"list1": MEMBERS[:1], "list10": MEMBERS}
REPO = Path(__file__).resolve().parents[1]
SCENARIOS = Path(__file__).resolve().parent / "sipp"
TICKS = os.sysconf("SC_CLK_TCK")
RL = "urn:ietf:params:xml:ns:resource-lists"
CR = "urn:relayd:params:xml:ns:consent-policy"

DEFAULT_RATES = {"list1": [100, 200, 400, 800, 1600], "list10": [20, 50, 100, 200, 400]}
DEFAULT_RATES["470"] = DEFAULT_RATES["list1"]

TARGETS = {
    "kamailio_cpu_us_per_message_reference": 63.0,
    "cpu_us_per_delivered_message": 95.0,  # 1.5 x Kamailio
    "delivered_per_s_list10": 5000.0,
    "consent_needed_per_s": 5000.0,
}

_started = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def udp_rcvbuf_errors() -> int:
    """Datagrams the kernel dropped for a full socket receive buffer (machine-wide)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    rows = [line for line in lines if line and line[0] == "Udp:"]
    return int(dict(zip(rows[0], rows[1], strict=False)).get("RcvbufErrors", 0))


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# -- the relay --------------------------------------------------------------------------


def lists_xml() -> str:
    body = "".join(
        f'  <list name="{name}" cr:owner="sip:{ADMIN}@{HOST}">\n'
        + "".join(f'    <entry uri="sip:{m}@{HOST}"/>\n' for m in members)
        + "  </list>\n"
        for name, members in LISTS.items()
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<resource-lists xmlns="{RL}" xmlns:cr="{CR}">\n{body}</resource-lists>\n'
    )


@dataclass
class Relay:
    folder: Path
    pki: RelayPKI
    sip_port: int
    profile: str | None = None
    process: subprocess.Popen[bytes] | None = None
    xcap_port: int = 0
    log_path: Path = field(default_factory=Path)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def start(self) -> None:
        cert, key = self.pki.leaf(HOST)
        users = write_users(self.folder / "users.htdigest", REALM, USERS)
        lists = self.folder / "lists.xml"
        lists.write_text(lists_xml(), encoding="utf-8")
        config = self.folder / "relayd.ini"
        config.write_text(
            f"[relay]\nhostname = {HOST}\ndata_dir = {self.folder / 'data'}\n\n"
            f"[msrp]\nlisten = ssl:0:interface={HOST}\n\n"
            f"[xcap]\nlisten = ssl:0:interface={HOST}\nadmins = {ADMIN}\n\n"
            f"[sip]\nlisten = udp:{self.sip_port}:interface={HOST}\ndomain = {HOST}\n"
            f"lists = {lists}\nmax_list_size = 20\nconsent_requests_per_hour = 1000000\n\n"
            f"[store]\nbackend = memory\n\n"
            f"[auth]\nrealm = {REALM}\nusers = {users}\n\n"
            f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n",
            encoding="utf-8",
        )
        self.log_path = self.folder / "relayd.log"
        self.process = spawn_twistd(config, self.log_path, REPO, self.profile)
        deadline = time.monotonic() + 30
        xcap = re.compile(rb"XCAP listening on ssl:127\.0\.0\.1:(\d+)")
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()
            found = xcap.search(text)
            if found and b"SIP listening on udp" in text:
                self.xcap_port = int(found.group(1))
                log(f"relayd pid {self.pid}: SIP udp {self.sip_port}, XCAP {self.xcap_port}")
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"relayd did not start:\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        stop_sync(self.process)

    def wait_idle(self, limit: float = 35.0) -> float:
        """Until the relay uses < 2 % CPU over 1 s (backlog drained, and the client
        transactions' retransmissions (Timer E/F, 32 s) of an overloaded step gone)."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
            before = self.cpu()
            time.sleep(1.0)
            if self.cpu() - before < 0.02:
                break
        return time.monotonic() - started


# -- provisioning -----------------------------------------------------------------------


def grant_all(relay: Relay, folder: Path) -> None:
    """``relayctl permissions grant`` alice → every member, for each list it is on."""
    password = folder / "admin.password"
    password.write_text(USERS[ADMIN] + "\n", encoding="utf-8")
    xcap = f"https://{HOST}:{relay.xcap_port}/xcap-root"
    jobs: list[tuple[str, subprocess.Popen[bytes]]] = []
    for name, members in LISTS.items():
        for member in members:
            command = ["relayctl", "permissions", "grant", f"sip:{member}@{HOST}"]
            command += ["--from", f"sip:{SENDER}@{HOST}", "--list", f"sip:{name}@{HOST}"]
            command += ["--xcap", xcap, "--user", ADMIN, "--password-file", str(password)]
            command += ["--ca", relay.pki.ca_path, "--timeout", "20"]
            job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            jobs.append((f"{member} {name}", job))
            if len(jobs) % 4 == 0:  # a few at a time on 2 cores; a document per member
                _finish(jobs[-4:])
    _finish([j for j in jobs if j[1].returncode is None])


def _finish(jobs: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    for what, job in jobs:
        out, _ = job.communicate(timeout=60)
        if job.returncode != 0:
            raise RuntimeError(f"relayctl grant {what} failed: {out.decode(errors='replace')}")


def register(relay_port: int, user: str, contact_port: int) -> None:
    """REGISTER ``sip:user@HOST`` → ``sip:user@HOST:contact_port`` (401, digest, 200)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(5)
        local = sock.getsockname()[1]
        call_id = f"reg-{user}-{os.getpid()}"
        authorization = ""
        for cseq in (1, 2, 3):
            message = (
                f"REGISTER sip:{HOST} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {HOST}:{local};rport;branch=z9hG4bK{user}{cseq}{os.getpid()}\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:{user}@{HOST}>;tag={user}\r\n"
                f"To: <sip:{user}@{HOST}>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n"
                f"Contact: <sip:{user}@{HOST}:{contact_port}>\r\nExpires: 3600\r\n"
                f"{authorization}Content-Length: 0\r\n\r\n"
            )
            sock.sendto(message.encode(), (HOST, relay_port))
            text = sock.recv(65535).decode(errors="replace")
            status = int(text.split(" ", 2)[1])
            if status == 200:
                return
            found = re.search(r"(?im)^WWW-Authenticate:\s*(.+?)\r?$", text)
            if status != 401 or found is None:
                raise RuntimeError(f"REGISTER {user}: {text[:300]}")
            value = client_authorization(
                found.group(1),
                method="REGISTER",
                uri=f"sip:{HOST}",
                username=user,
                password=USERS[user],
            )
            authorization = f"Authorization: {value}\r\n"
        raise RuntimeError(f"REGISTER {user}: authentication loop")


# -- SIPp -------------------------------------------------------------------------------


def read_stats(path: Path) -> dict[str, str]:
    """The last row of a SIPp ``-trace_stat`` file (``;``-separated, header first)."""
    if not path.exists():
        return {}
    rows = [
        row
        for row in csv.reader(path.open(encoding="utf-8", errors="replace"), delimiter=";")
        if row
    ]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


def read_counts(folder: Path) -> list[dict[str, str]]:
    """SIPp ``-trace_counts``: a row per second, a column per scenario message and counter
    (``<index>_<message>_Recv``, ``…_Retrans``, ``…_Timeout``, ``…_Unexp``)."""
    files = sorted(folder.glob("*_counts.csv"))
    if not files:
        return []
    rows = [
        row
        for row in csv.reader(files[-1].open(encoding="utf-8", errors="replace"), delimiter=";")
        if row
    ]
    return [dict(zip(rows[0], row, strict=False)) for row in rows[1:]] if rows else []


def _int(stats: dict[str, str], key: str) -> int:
    try:
        return int(stats.get(key, "0") or 0)
    except ValueError:
        return 0


def sipp_command(folder: Path, scenario: str, port: int) -> list[str]:
    return [
        "sipp",
        "-sf",
        str(SCENARIOS / scenario),
        "-i",
        HOST,
        "-p",
        str(port),
        "-nostdin",
        "-buff_size",
        str(4 << 20),
        "-trace_stat",
        "-stf",
        str(folder / "stat.csv"),
        "-fd",
        "1",
        "-trace_counts",
        "-trace_err",
        "-error_file",
        str(folder / "errors.log"),
    ]


@dataclass
class Sinks:
    """One SIPp UAS per member, on the ports the members registered."""

    root: Path
    ports: dict[str, int]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    folders: dict[str, Path] = field(default_factory=dict)

    def start(self, tag: str) -> None:
        for member, port in self.ports.items():
            folder = self.root / tag / member
            folder.mkdir(parents=True, exist_ok=True)
            command = [*sipp_command(folder, "message_sink.xml", port), "-timeout", "600s"]
            self.folders[member] = folder
            self.processes[member] = subprocess.Popen(
                command,
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(0.3)
        for member, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"sink {member} exited {process.returncode}")

    def stop(self) -> dict[str, int]:
        for process in self.processes.values():
            stop_sync(process, signal.SIGUSR1)
        for process in self.processes.values():
            stop_sync(process)
        totals = {"created": 0, "answered": 0, "retransmissions": 0, "dead_call_msgs": 0}
        totals["out_of_call_msgs"] = 0
        for member in self.processes:
            stats = read_stats(self.folders[member] / "stat.csv")
            totals["created"] += _int(stats, "TotalCallCreated")
            totals["answered"] += _int(stats, "SuccessfulCall(C)")
            totals["retransmissions"] += _int(stats, "Retransmissions(C)")
            totals["dead_call_msgs"] += _int(stats, "DeadCallMsgs(C)")
            totals["out_of_call_msgs"] += _int(stats, "OutOfCallMsgs(C)")
        self.processes.clear()
        return totals


def run_uac(
    folder: Path, relay: Relay, scenario: str, list_name: str, user: str, rate: int, duration: float
) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    calls = int(rate * duration)
    command = [*sipp_command(folder, scenario, free_udp_port()), f"{HOST}:{relay.sip_port}"]
    command += ["-s", list_name, "-key", "sender", user, "-au", user, "-ap", USERS[user]]
    command += ["-auth_uri", f"{list_name}@{HOST}", "-r", str(rate), "-rp", "1000"]
    command += ["-m", str(calls), "-l", str(max(1000, rate * 40))]
    command += ["-timeout", f"{int(duration + 40)}s", "-max_retrans", "5"]
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=folder, capture_output=True, timeout=duration + 90, check=False
    )
    elapsed = time.monotonic() - started
    stats = read_stats(folder / "stat.csv")
    counts = read_counts(folder)
    last = counts[-1] if counts else {}
    shed = sum(_int(last, key) for key in last if re.fullmatch(r"\d+_503_Recv", key))
    out = {
        "offered_calls": calls,
        "sipp_exit": result.returncode,
        "elapsed_s": round(elapsed, 2),
        "created": _int(stats, "TotalCallCreated"),
        "ok": _int(stats, "SuccessfulCall(C)") - shed,
        "failed": _int(stats, "FailedCall(C)"),
        "retransmissions": _int(stats, "Retransmissions(C)"),
        "timeouts": _int(stats, "FailedMaxUDPRetrans(C)") + _int(stats, "FailedCallRejected(C)"),
        "unexpected": _int(stats, "FailedUnexpectedMessage(C)"),
        "shed_503": shed,
        "counts": counts,
    }
    if not stats:
        out["sipp_stderr"] = result.stderr.decode(errors="replace")[-500:]
    return out


# -- loads ------------------------------------------------------------------------------


def run_step(
    root: Path, relay: Relay, sinks: Sinks, load: str, rate: int, duration: float
) -> dict[str, Any]:
    tag = f"{load}-{rate}"
    settle = relay.wait_idle()
    list_name = "list1" if load == "list1" else "list10"
    members = len(LISTS[list_name])
    scenario, user = ("message_470.xml", STRANGER) if load == "470" else ("message_200.xml", SENDER)
    sinks.start(tag)
    cpu0, wall0, drops0 = relay.cpu(), time.monotonic(), udp_rcvbuf_errors()
    uac = run_uac(root / tag / "uac", relay, scenario, list_name, user, rate, duration)
    time.sleep(2.5)  # the sinks' 2 s pause, and the last branches' answers
    cpu = relay.cpu() - cpu0
    wall = time.monotonic() - wall0
    drops = udp_rcvbuf_errors() - drops0
    sink = sinks.stop()
    ok = uac["ok"]
    row: dict[str, Any] = {
        "load": load,
        "rate_offered": rate,
        "duration_s": duration,
        **{k: v for k, v in uac.items() if k != "counts"},
        "answered_per_s": round(ok / uac["elapsed_s"], 1) if uac["elapsed_s"] else None,
        "relay_cpu_s": round(cpu, 2),
        "relay_cpu_share": round(cpu / wall, 2),
        "relay_rss_kib": rss_kib(relay.pid),
        "settle_before_s": round(settle, 1),
        "udp_rcvbuf_drops": drops,
    }
    if load == "470":
        row["consent_needed_per_s"] = row["answered_per_s"]
        row["cpu_us_per_470"] = _round(1e6 * cpu / ok) if ok else None
        # Must stay 0 but for copies the relay still retransmits from an earlier step.
        row["sink_messages"] = sink["created"]
    else:
        expected = ok * members
        row["sink"] = sink
        row["delivered"] = sink["created"]
        row["expected_min"] = expected
        row["lost"] = max(0, expected - sink["created"])
        row["delivered_per_s"] = round(sink["created"] / uac["elapsed_s"], 1)
        row["cpu_us_per_delivered"] = (
            _round(1e6 * cpu / sink["created"]) if sink["created"] else None
        )
    log(
        f"{tag}: ok {ok}/{uac['offered_calls']} in {uac['elapsed_s']} s, failed {uac['failed']},"
        f" retrans {uac['retransmissions']}, 503 {uac['shed_503']}, relay cpu {cpu:.1f} s,"
        f" rcvbuf drops {drops}"
        + (
            f", delivered {row.get('delivered')} ({row.get('cpu_us_per_delivered')} us each)"
            if load != "470"
            else f", {row['cpu_us_per_470']} us per 470"
        )
    )
    return row


def profile_top(path: str, count: int = 25) -> list[list[Any]]:
    stats = pstats.Stats(path)
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = sorted(table.items(), key=lambda item: -item[1][2])[:count]
    return [
        [
            f"{Path(func[0]).name}:{func[1]}({func[2]})",
            calls[1],
            round(calls[2], 3),
            round(calls[3], 3),
        ]
        for func, calls in rows
    ]


def run(settings: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"steps": [], "errors": []}
    with tempfile.TemporaryDirectory(prefix="sip-bench-") as tmp:
        root = Path(tmp)
        pki = make_pki(root / "pki")
        relay = Relay(root / "relay", pki, free_udp_port(), settings.profile)
        relay.folder.mkdir(parents=True)
        sinks = Sinks(root / "sinks", {m: free_udp_port() for m in MEMBERS})
        try:
            relay.start()
            t = time.monotonic()
            grant_all(relay, root)
            log(f"granted {SENDER} on every member in {time.monotonic() - t:.1f} s")
            for member, port in sinks.ports.items():
                register(relay.sip_port, member, port)
            log(f"registered {len(MEMBERS)} members")
            for load in settings.only:
                for rate in settings.rates[load]:
                    try:
                        results["steps"].append(
                            run_step(root, relay, sinks, load, rate, settings.duration)
                        )
                    except Exception as e:
                        log(f"{load} {rate}: {e!r}")
                        results["errors"].append(f"{load} {rate}: {e!r}")
                        sinks.stop()
            text = relay.log_path.read_text(errors="replace")
            results["relay_log"] = {
                "table_full_503": text.count("transaction table full"),
                "tu_failures": text.count("TU failed"),
                "tracebacks": text.count("Traceback"),
                "bytes": len(text),
            }
        finally:
            sinks.stop()
            relay.stop()
            if settings.keep:
                shutil.copytree(root, settings.keep, dirs_exist_ok=True)
    if settings.profile and Path(settings.profile).exists():
        results["profile"] = {
            "file": settings.profile,
            "top_tottime": profile_top(settings.profile),
        }
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    steps = results["steps"]
    best10 = max(
        (s for s in steps if s["load"] == "list10"),
        key=lambda s: s["delivered_per_s"],
        default=None,
    )
    clean10 = [
        s
        for s in steps
        if s["load"] == "list10"
        and s["lost"] == 0
        and s["failed"] == 0
        and s["ok"] == s["offered_calls"]
    ]
    best470 = max(
        (s for s in steps if s["load"] == "470"),
        key=lambda s: s["consent_needed_per_s"] or 0,
        default=None,
    )
    cpu = [
        s["cpu_us_per_delivered"] for s in steps if s["load"] != "470" and s["cpu_us_per_delivered"]
    ]
    out: dict[str, Any] = {}
    if cpu:
        out["cpu_us_per_delivered_min"] = {
            "measured": min(cpu),
            "target": TARGETS["cpu_us_per_delivered_message"],
            "met": min(cpu) <= TARGETS["cpu_us_per_delivered_message"],
        }
    if best10 is not None:
        clean = max((s["delivered_per_s"] for s in clean10), default=0.0)
        out["list10_delivered_per_s"] = {
            "best": best10["delivered_per_s"],
            "best_clean": clean,
            "target": TARGETS["delivered_per_s_list10"],
            "met": clean >= TARGETS["delivered_per_s_list10"],
        }
    if best470 is not None:
        out["consent_needed_per_s"] = {
            "best": best470["consent_needed_per_s"],
            "target": TARGETS["consent_needed_per_s"],
            "met": (best470["consent_needed_per_s"] or 0) >= TARGETS["consent_needed_per_s"],
        }
    out["shed_503_total"] = sum(s["shed_503"] for s in steps)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sip_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="5 s per step")
    parser.add_argument(
        "--rates",
        default=None,
        help="calls/s steps for every load (default: list1 and 470 100,200,400,800,1600;"
        " list10 20,50,100,200,400)",
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per step")
    parser.add_argument("--only", default="list1,list10,470", help="loads: list1, list10, 470")
    parser.add_argument(
        "--profile", default=None, help="run the relay under cProfile, stats to this file"
    )
    parser.add_argument("--keep", default=None, help="copy the work folder (logs, SIPp files) here")
    args = parser.parse_args(argv)
    given = [int(r) for r in args.rates.split(",") if r.strip()] if args.rates else None
    args.rates = {load: given or DEFAULT_RATES[load] for load in ("list1", "list10", "470")}
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if set(args.only) - {"list1", "list10", "470"}:
        parser.error("--only: list1, list10, 470")
    args.duration = args.duration or (5.0 if args.quick else 10.0)
    args.profile = os.path.abspath(args.profile) if args.profile else None
    return args


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    if shutil.which("sipp") is None:
        print("sipp not found", file=sys.stderr)
        return 2
    started = time.time()
    results = run(settings)
    report = {
        "bench": "sip",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": "loopback UDP; relay, 1 SIPp UAC and 10 SIPp UAS share these cores",
        },
        "settings": {
            "quick": settings.quick,
            "rates": settings.rates,
            "duration_s": settings.duration,
            "loads": settings.only,
            "profiled": bool(settings.profile),
        },
        "targets": TARGETS,
        **results,
        "summary": summarize(results),
    }
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
