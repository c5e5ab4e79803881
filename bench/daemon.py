"""Starting and stopping the relay (and other helper processes) for the benchmarks."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

#: The lines the relay logs for its XCAP (TLS) and SIP (UDP) listeners on loopback.
RELAY_LISTENING = {
    "xcap": re.compile(rb"XCAP listening on ssl:127\.0\.0\.1:(\d+)"),
    "sip": re.compile(rb"SIP listening on udp:127\.0\.0\.1:(\d+)"),
}


def spawn_twistd(
    config: Path,
    log_path: Path,
    cwd: Path,
    profile: str | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """``twistd -n msrprelay --config CONFIG`` with its output in ``log_path``."""
    command = list(TWISTD)
    if profile:
        command += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
    command += ["-n", "--pidfile=", "msrprelay", "--config", str(config)]
    return spawn_logged(command, log_path, cwd, preexec_fn)


def spawn_logged(
    command: list[str],
    log_path: Path,
    cwd: Path,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """``command`` with its stdout and stderr in ``log_path`` and no stdin."""
    with open(log_path, "wb") as output:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=str(cwd),
            preexec_fn=preexec_fn,
        )


Patterns = dict[str, re.Pattern[bytes]]


def _logged(
    process: subprocess.Popen[bytes], log_path: Path, patterns: Patterns
) -> dict[str, re.Match[bytes]] | None:
    """Every pattern's match in the log, None while one is missing; an error once the
    process has exited without them."""
    text = log_path.read_bytes() if log_path.exists() else b""
    found = {name: pattern.search(text) for name, pattern in patterns.items()}
    if all(found.values()):
        return {name: match for name, match in found.items() if match is not None}
    if process.poll() is not None:
        raise _did_not_start(log_path)
    return None


def _did_not_start(log_path: Path) -> RuntimeError:
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    return RuntimeError(f"{log_path.parent.name}: process did not start:\n{tail}")


async def wait_for_log(
    process: subprocess.Popen[bytes], log_path: Path, patterns: Patterns, seconds: float = 30
) -> dict[str, re.Match[bytes]]:
    """Wait until the process has logged a line for every pattern (its listening
    ports, usually); a RuntimeError with the log's tail if it exits or times out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = _logged(process, log_path, patterns)
        if found is not None:
            return found
        await asyncio.sleep(0.05)
    raise _did_not_start(log_path)


def wait_for_log_sync(
    process: subprocess.Popen[bytes], log_path: Path, patterns: Patterns, seconds: float = 30
) -> dict[str, re.Match[bytes]]:
    """The same as wait_for_log, for code that is not in an event loop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = _logged(process, log_path, patterns)
        if found is not None:
            return found
        time.sleep(0.05)
    raise _did_not_start(log_path)


async def stop_async(
    process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, seconds: float = 15
) -> None:
    """Ask a process to stop, then kill it if it has not within ``seconds``."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return
        await asyncio.sleep(0.05)
    process.kill()
    process.wait(5)


def stop_sync(
    process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, seconds: float = 15
) -> None:
    """The same as stop_async, for code that is not in an event loop."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def wait_idle(cpu_seconds: Callable[[], float], limit: float = 35.0) -> float:
    """Seconds until a process (tree) uses < 2 % CPU over 1 s, at most ``limit``: the
    backlog of a step is drained (and its retransmissions over) before the next one."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = cpu_seconds()
        time.sleep(1.0)
        if cpu_seconds() - before < 0.02:
            break
    return time.monotonic() - started
