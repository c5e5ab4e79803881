"""The head every benchmark's JSON line starts with: what ran, when, for how long, where."""

from __future__ import annotations

import os
import platform
import time
from typing import Any


def report_head(bench: str, started: float, note: str) -> dict[str, Any]:
    """``started`` is ``time.time()`` when the run began; ``note`` says what shared the
    cores (the figures are only comparable within one run)."""
    return {
        "bench": bench,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": note,
        },
    }
