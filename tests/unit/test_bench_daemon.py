"""bench.daemon: waiting for a helper process to log its listening ports."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from bench.daemon import spawn_logged, wait_for_log_sync

PORT_LINE = {"sip": re.compile(rb"SIP listening on udp:127\.0\.0\.1:(\d+)")}


def test_the_logged_port_is_found(tmp_path: Path) -> None:
    log = tmp_path / "relay.log"
    script = "import time; print('SIP listening on udp:127.0.0.1:5070', flush=True); time.sleep(30)"
    process = spawn_logged([sys.executable, "-c", script], log, tmp_path)
    try:
        found = wait_for_log_sync(process, log, PORT_LINE, seconds=20)
    finally:
        process.kill()
        process.wait()
    assert found["sip"][1] == b"5070"


def test_a_process_that_exits_first_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "relay.log"
    process = spawn_logged(
        [sys.executable, "-c", "print('bad config: [sip] listen')"], log, tmp_path
    )
    process.wait()
    with pytest.raises(RuntimeError, match=r"did not start:\n.*bad config: \[sip\] listen"):
        wait_for_log_sync(process, log, PORT_LINE, seconds=20)
