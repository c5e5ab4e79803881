"""INVITE load: calls through the relay to a registered user, Kamailio in the same run.

Run by hand (not part of the tests)::

    python -m bench.invite_bench [--quick] [--rates 100,200,400,800] [--duration S]
                                 [--overload-lag-ms MS] [--profile FILE]
                                 [--no-kamailio] [--keep DIR]

It prints one JSON line with every figure on stdout and its progress on stderr.

Set-up: relayd as in ``bench/sip_bench.py`` (``twistd -n msrprelay``, a UDP SIP
listener on a free port, memory store, ``[sip] record_route`` on as by default); the
callee ``m0`` registers (digest) a contact pointing at one SIPp UAS
(``bench/sipp/invite_answer.xml``: 200 at once with the Record-Route copied, then the
ACK and the BYE along it). The caller is one SIPp UAC (``bench/sipp/invite_call.xml``):
INVITE → 407 → ACK → INVITE with credentials → 100, 200 → ACK → BYE → 200, the ACK and
the BYE to the callee's Contact through the proxy (its Record-Route).

Each rate (calls per second, ``-r``) runs ``duration`` seconds, stepping up. Figures
per step: calls completed per second (over SIPp's whole run), calls failed, shed (503;
the scenario fails a 503 without Retry-After), SIPp's retransmissions, INVITEs and BYEs
seen at the callee, and the proxy's CPU (utime+stime from /proc) per completed call over
the step and its drain; ``cpu_us_per_call_net`` leaves out what the proxy burns idle (its
CPU share over 5 s with no load, times the step's wall time). The knee is the highest
rate at which every offered call completed with no 503 and no failure.

Then the same steps against Kamailio (``bench/kamailio/sip-invite.cfg`` through
``bench/kamailio_sip.py``: tm, rr, the same proxy digest, 2 UDP workers), its CPU
summed over all its processes. ``summary.vs_kamailio`` holds relayd / Kamailio CPU per
call at each rate; the target (relayd at most 3 x Kamailio) is checked at every rate
both completed cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.daemon import stop_sync
from bench.kamailio_sip import INVITE_TEMPLATE, Kamailio, find_kamailio, kamailio_version
from bench.report import report_head
from bench.sip_bench import (
    HOST,
    LISTS,
    REALM,
    SENDER,
    USERS,
    Relay,
    Target,
    _int,
    _round,
    free_udp_port,
    log,
    profile_top,
    read_counts,
    read_stats,
    register,
    run_uac,
    sipp_command,
    udp_rcvbuf_errors,
)
from relayd.testing import make_pki

CALLEE = "m0"
DEFAULT_RATES = [100, 200, 300, 400, 500, 600, 800]
CPU_FACTOR = 3.0  # the target: relay CPU per call at most 3 x Kamailio's


@dataclass
class Callee:
    """The callee's SIPp UAS on the port it registered."""

    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    folder: Path = field(default_factory=Path)

    def start(self, tag: str) -> None:
        self.folder = self.root / tag / "callee"
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [*sipp_command(self.folder, "invite_answer.xml", self.port), "-timeout", "600s"]
        self.process = subprocess.Popen(
            command,
            cwd=self.folder,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)
        if self.process.poll() is not None:
            raise RuntimeError(f"callee exited {self.process.returncode}")

    def stop(self) -> dict[str, int]:
        """SIGUSR1 (no new calls, the current ones end), then the totals."""
        process, self.process = self.process, None
        if process is None:
            return {}
        stop_sync(process, signal.SIGUSR1)
        stop_sync(process)
        stats = read_stats(self.folder / "stat.csv")
        counts = read_counts(self.folder)
        last = counts[-1] if counts else {}
        return {
            "invites": _int(stats, "TotalCallCreated"),
            "completed": _int(stats, "SuccessfulCall(C)"),
            "failed": _int(stats, "FailedCall(C)"),
            "byes": sum(_int(last, k) for k in last if re.fullmatch(r"\d+_BYE_Recv", k)),
            "retransmissions": _int(stats, "Retransmissions(C)"),
            "dead_call_msgs": _int(stats, "DeadCallMsgs(C)"),
        }


IDLE_SECONDS = 5.0


def idle_share(proxy: Target) -> float:
    """The proxy's CPU share (cores) with nothing to do: its timers (tm's, relayd's lag
    monitor) cost this much whatever the load; ``cpu_us_per_call_net`` leaves it out."""
    proxy.wait_idle()
    before, started = proxy.cpu(), time.monotonic()
    time.sleep(IDLE_SECONDS)
    return (proxy.cpu() - before) / (time.monotonic() - started)


def run_caller(folder: Path, proxy: Target, rate: int, duration: float) -> dict[str, Any]:
    """The caller's SIPp run (``invite_call.xml``), as ``sip_bench.run_uac`` runs a
    sender: the calls it completed, shed (503), failed and retransmitted."""
    out = run_uac(folder, proxy, "invite_call.xml", CALLEE, SENDER, rate, duration)
    out["completed"] = out.pop("ok")
    del out["counts"]
    return out


def run_step(
    root: Path,
    proxy: Target,
    callee: Callee,
    rate: int,
    duration: float,
    server: str,
    idle: float = 0.0,
) -> dict[str, Any]:
    tag = f"{server}-{rate}"
    settle = proxy.wait_idle()
    callee.start(tag)
    cpu0, wall0, drops0 = proxy.cpu(), time.monotonic(), udp_rcvbuf_errors()
    caller = run_caller(root / tag / "caller", proxy, rate, duration)
    time.sleep(2.5)  # the callee's 2 s pause, and the last BYEs
    cpu = proxy.cpu() - cpu0
    wall = time.monotonic() - wall0
    drops = udp_rcvbuf_errors() - drops0
    seen = callee.stop()
    done = caller["completed"]
    row: dict[str, Any] = {
        "server": server,
        "rate_offered": rate,
        "duration_s": duration,
        **caller,
        "calls_per_s": round(done / caller["elapsed_s"], 1) if caller["elapsed_s"] else None,
        "cpu_s": round(cpu, 2),
        "cpu_share": round(cpu / wall, 2),
        "cpu_us_per_call": _round(1e6 * cpu / done) if done else None,
        "cpu_us_per_call_net": _round(1e6 * (cpu - idle * wall) / done) if done else None,
        "rss_kib": proxy.rss(),
        "settle_before_s": round(settle, 1),
        "udp_rcvbuf_drops": drops,
        "callee": seen,
        "clean": done == caller["offered_calls"]
        and caller["failed"] == 0
        and caller["shed_503"] == 0,
    }
    log(
        f"{tag}: {done}/{caller['offered_calls']} calls in {caller['elapsed_s']} s"
        f" ({row['calls_per_s']}/s), failed {caller['failed']}, 503 {caller['shed_503']},"
        f" retrans {caller['retransmissions']}, cpu {cpu:.2f} s"
        f" ({row['cpu_us_per_call']} us per call), callee {seen}, rcvbuf drops {drops}"
    )
    return row


def run_relayd(settings: argparse.Namespace, root: Path, callee: Callee) -> dict[str, Any]:
    results: dict[str, Any] = {"steps": [], "errors": []}
    pki = make_pki(root / "pki")
    sip = "max_datagrams_per_source = 0\n"  # one SIPp socket sends every call
    if settings.overload_lag_ms is not None:
        sip += f"overload_lag_ms = {settings.overload_lag_ms}\n"
    relay = Relay(root / "relay", pki, free_udp_port(), settings.profile, sip)
    relay.folder.mkdir(parents=True)
    try:
        relay.start()
        register(relay.sip_port, CALLEE, callee.port)
        results["idle_cpu_share"] = idle = round(idle_share(relay), 4)
        log(f"relayd idle: {idle:.4f} of a core")
        for rate in settings.rates:
            try:
                results["steps"].append(
                    run_step(root, relay, callee, rate, settings.duration, "relayd", idle)
                )
            except Exception as e:
                log(f"relayd {rate}: {e!r}")
                results["errors"].append(f"relayd {rate}: {e!r}")
                callee.stop()
        text = relay.log_path.read_text(errors="replace")
        results["log"] = {
            "tracebacks": text.count("Traceback"),
            "shed_lines": text.count("shedding"),
            "bytes": len(text),
        }
    finally:
        callee.stop()
        relay.stop()
    return results


def run_kamailio(settings: argparse.Namespace, root: Path, callee: Callee) -> dict[str, Any]:
    binary = find_kamailio()
    kamailio = Kamailio(
        HOST,
        free_udp_port(),
        REALM,
        USERS,
        {},
        children=settings.kamailio_children,
        binary=binary,
        template=INVITE_TEMPLATE,
    )
    out: dict[str, Any] = {
        "version": kamailio_version(binary),
        "config": "bench/kamailio/sip-invite.cfg",
        "children": kamailio.children,
        "cpu": "utime+stime summed over the main process and all its children",
        "steps": [],
        "errors": [],
    }
    try:
        kamailio.start()
        out["processes"] = kamailio.processes()
        log(f"kamailio pid {kamailio.pid} ({out['processes']} processes)")
        register(kamailio.sip_port, CALLEE, callee.port)
        out["idle_cpu_share"] = idle = round(idle_share(kamailio), 4)
        log(f"kamailio idle: {idle:.4f} of a core")
        for rate in settings.rates:
            try:
                out["steps"].append(
                    run_step(root, kamailio, callee, rate, settings.duration, "kamailio", idle)
                )
            except Exception as e:
                log(f"kamailio {rate}: {e!r}")
                out["errors"].append(f"kamailio {rate}: {e!r}")
                callee.stop()
        text = kamailio.log_text()
        out["log"] = {"errors": len(re.findall(r"\bERROR:", text)), "bytes": len(text)}
        if out["log"]["errors"]:
            out["log"]["tail"] = text[-1500:]
    finally:
        callee.stop()
        kamailio.stop()
    return out


def knee(steps: list[dict[str, Any]]) -> int | None:
    """The highest offered rate below which every step was clean (all calls completed,
    no 503, no failure)."""
    best = None
    for step in sorted(steps, key=lambda s: s["rate_offered"]):
        if not step["clean"]:
            break
        best = step["rate_offered"]
    return best


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    relayd = results.get("steps", [])
    out: dict[str, Any] = {
        "relayd_knee_calls_per_s": knee(relayd),
        "relayd_best_calls_per_s": max((s["calls_per_s"] or 0 for s in relayd), default=None),
        "relayd_past_knee": [
            {
                "rate": s["rate_offered"],
                "completed": s["completed"],
                "shed_503": s["shed_503"],
                "failed": s["failed"],
                "retransmissions": s["retransmissions"],
            }
            for s in relayd
            if not s["clean"]
        ],
    }
    kamailio = results.get("kamailio", {}).get("steps", [])
    if kamailio:
        out["kamailio_knee_calls_per_s"] = knee(kamailio)
        by_rate = {s["rate_offered"]: s for s in relayd}
        rows = []
        for k in kamailio:
            r = by_rate.get(k["rate_offered"])
            if r is None:
                continue
            rc, kc = r["cpu_us_per_call"], k["cpu_us_per_call"]
            rn, kn = r["cpu_us_per_call_net"], k["cpu_us_per_call_net"]
            rows.append(
                {
                    "rate": k["rate_offered"],
                    "both_clean": r["clean"] and k["clean"],
                    "relayd_cpu_us_per_call": rc,
                    "kamailio_cpu_us_per_call": kc,
                    "cpu_ratio": round(rc / kc, 2) if rc and kc else None,
                    "cpu_ratio_net": round(rn / kn, 2) if rn and kn else None,
                }
            )
        clean = [x["cpu_ratio"] for x in rows if x["both_clean"] and x["cpu_ratio"]]
        net = [x["cpu_ratio_net"] for x in rows if x["both_clean"] and x["cpu_ratio_net"]]
        best_r = min((s["cpu_us_per_call"] for s in relayd if s["cpu_us_per_call"]), default=None)
        best_k = min((s["cpu_us_per_call"] for s in kamailio if s["cpu_us_per_call"]), default=None)
        out["vs_kamailio"] = {
            "steps": rows,
            "cpu_ratio_clean": [min(clean), max(clean)] if clean else None,
            "cpu_ratio_net_clean": [min(net), max(net)] if net else None,
            "cpu_ratio_best": round(best_r / best_k, 2) if best_r and best_k else None,
            "target": CPU_FACTOR,
            "met": bool(clean) and max(clean) <= CPU_FACTOR,
        }
    return out


def run(settings: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"steps": [], "errors": []}
    with tempfile.TemporaryDirectory(prefix="invite-bench-") as tmp:
        root = Path(tmp)
        callee = Callee(root, free_udp_port())
        try:
            results = run_relayd(settings, root, callee)
            if settings.kamailio:
                results["kamailio"] = run_kamailio(settings, root, callee)
        finally:
            callee.stop()
            if settings.keep:
                shutil.copytree(root, settings.keep, dirs_exist_ok=True)
    if settings.profile and Path(settings.profile).exists():
        results["profile"] = {
            "file": settings.profile,
            "top_tottime": profile_top(settings.profile),
        }
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.invite_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="5 s per step")
    parser.add_argument(
        "--rates", default=None, help="calls/s steps (default: 100,200,300,400,500,600,800)"
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per step")
    parser.add_argument(
        "--profile", default=None, help="run the relay under cProfile, stats to this file"
    )
    parser.add_argument("--keep", default=None, help="copy the work folder (logs, SIPp files) here")
    parser.add_argument("--no-kamailio", dest="kamailio", action="store_false", help="relayd only")
    parser.add_argument(
        "--kamailio-children", type=int, default=2, help="Kamailio UDP workers (default 2)"
    )
    parser.add_argument(
        "--overload-lag-ms",
        type=int,
        default=None,
        help="relayd's [sip] overload_lag_ms (default: its own, 50): when to shed",
    )
    args = parser.parse_args(argv)
    args.rates = (
        [int(r) for r in args.rates.split(",") if r.strip()] if args.rates else DEFAULT_RATES
    )
    args.duration = args.duration or (5.0 if args.quick else 10.0)
    args.profile = os.path.abspath(args.profile) if args.profile else None
    return args


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    if shutil.which("sipp") is None:
        print("sipp not found", file=sys.stderr)
        return 2
    assert CALLEE in LISTS["list1"]  # a user of relayd's bench set-up
    signal.signal(signal.SIGTERM, _terminate)  # so the finally blocks stop what we started
    started = time.time()
    results = run(settings)
    report = {
        **report_head(
            "invite",
            started,
            "loopback UDP; the proxy, 1 SIPp UAC and 1 SIPp UAS share these cores",
        ),
        "settings": {
            "rates": settings.rates,
            "duration_s": settings.duration,
            "profiled": bool(settings.profile),
            "kamailio": settings.kamailio,
            "kamailio_children": settings.kamailio_children,
            "overload_lag_ms": settings.overload_lag_ms,
        },
        **results,
        "summary": summarize(results),
    }
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 1 if results["errors"] or results.get("kamailio", {}).get("errors") else 0


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
