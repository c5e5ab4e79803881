"""CPU instructions per unit of relay work, counted by valgrind: the same on a busy machine.

Run by hand (needs ``apt-get install valgrind``)::

    python -m bench.instructions sip [--stranger] [--members 10] [--metrics]
    python -m bench.instructions msrp [--batch 1]

Timings of ``bench.sip_cycle`` and ``bench.msrp_cycle`` move by ±20 % between runs on
shared cores, more than most single changes are worth. This runs one of them twice
under ``valgrind --tool=cachegrind`` (no cache simulation), with a small and a large
amount of work, and divides the difference in instructions executed by the
difference in work: start-up, set-up and warm-up cancel out. Instructions are not
time (cache misses and system calls are not in them), but a change that lowers them
lowers the Python work, and the count repeats to within a fraction of a percent.
The output is one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys

_REFS = re.compile(rb"I\s+refs:\s+([\d,]+)")

# module, its work-size option, small and large sizes, what one unit is
_LOADS = {
    "sip": ("bench.sip_cycle", "--calls", 100, 600, "call"),
    "msrp": ("bench.msrp_cycle", "--messages", 1000, 6000, "SEND/200/REPORT cycle"),
}


def instructions(command: list[str]) -> int:
    """Instructions the command executed (all of its own process)."""
    result = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            *command,
        ],
        capture_output=True,
        check=False,
    )
    found = _REFS.search(result.stderr)
    if result.returncode != 0 or found is None:
        tail = result.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(command)} failed under valgrind:\n{tail}")
    return int(found.group(1).replace(b",", b""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("load", choices=sorted(_LOADS))
    parser.add_argument("--stranger", action="store_true", help="sip: 470s instead of relaying")
    parser.add_argument("--members", type=int, default=10, help="sip: list size")
    parser.add_argument("--batch", type=int, default=1, help="msrp: SENDs per read")
    parser.add_argument("--metrics", action="store_true", help="sip: with [metrics] listen set")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    module, size_option, small, large, unit = _LOADS[args.load]
    extra = ["--repeat", "1"]
    if args.load == "sip":
        extra += ["--members", str(args.members)] + (["--stranger"] if args.stranger else [])
        extra += ["--metrics"] if args.metrics else []
    else:
        extra += ["--batch", str(args.batch)]
    counts = [
        instructions([sys.executable, "-m", module, size_option, str(size), *extra])
        for size in (small, large)
    ]
    per_unit = (counts[1] - counts[0]) / (large - small)
    out: dict[str, object] = {
        "bench": "instructions",
        "load": args.load,
        "unit": unit,
        "args": extra,
        "instructions_per_unit": round(per_unit),
    }
    if args.load == "sip" and not args.stranger:
        out["instructions_per_delivered"] = round(per_unit / args.members)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
