"""Starting and stopping the relay (and other helper processes) for the benchmarks."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


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
    with open(log_path, "wb") as output:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=str(cwd),
            preexec_fn=preexec_fn,
        )


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
