"""Store benchmark: what one operation costs on SQLite and on PostgreSQL, side by side.

Run by hand (not part of the tests)::

    python -m bench.store_bench [--quick] [--postgres DSN]

Both backends run in this process, as the relay runs them (adbapi, one connection, one
worker thread): SQLite in a temporary file (WAL, ``synchronous=FULL``), PostgreSQL in a
schema of the run's own (dropped afterwards; default DSN the tests' server).  Each
round runs every operation ``OPS`` times on one backend, then on the other, so both see
the same machine; the figures are medians over the rounds.  The operations are what
the relay's requests cost the store:

- ``register``: a REGISTER refresh, one binding written (``save_bindings``);
- ``put``: an XCAP PUT of a consent-rules document (``put_document``, with its change
  recorded for the other nodes on PostgreSQL);
- ``get``: an XCAP GET (``get_document``);
- ``consent``: a CONSENT's open record (``open_consent``);
- ``rate``: the per-sender rate count a CONSENT makes (``count_request``).

Reported per operation: wall µs (one at a time: the latency a request waits), relay
process CPU µs, and for PostgreSQL the server's CPU µs (its backends for this run's
connections, from /proc), with ratios PostgreSQL / SQLite.  One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorThreads, IReactorTime

from bench.pgscratch import scratch_schema
from relayd.consent.postgres import PostgresPermissionStore
from relayd.consent.sqlite import SQLitePermissionStore
from relayd.consent.store import IPermissionStore, StoredBinding
from relayd.testing import consent_rule, consent_ruleset

DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
TICKS = os.sysconf("SC_CLK_TCK")
OPERATIONS = ("register", "put", "get", "consent", "rate")


def log(message: str) -> None:
    print(f"[store-bench] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def operations(store: IPermissionStore, tag: str) -> dict[str, Callable[[int], Awaitable[Any]]]:
    """One call of each measured operation; ``i`` makes each write its own row."""
    rules = consent_ruleset(consent_rule("r", "sip:alice@bench.test", "sip:l@bench.test"))

    def register(i: int) -> Awaitable[Any]:
        aor = f"sip:u{i % 1000}@bench.test"
        binding = StoredBinding(
            aor, f"sip:u@192.0.2.1:{5060 + i % 1000}", "<sip:u@192.0.2.1>", 1e10 + i, tag, i, 1.0
        )
        return store.save_bindings(aor, [binding], [])

    def put(i: int) -> Awaitable[Any]:
        return store.put_document("consent-rules", f"sip:u{i}@bench.test", tag, rules)

    def get(i: int) -> Awaitable[Any]:
        return store.get_document("consent-rules", f"sip:u{i}@bench.test", tag)

    def consent(i: int) -> Awaitable[Any]:
        return store.open_consent(
            "sip:alice@bench.test",
            f"sip:l{tag}@bench.test",
            f"sip:r{i}@bench.test",
            ["MESSAGE"],
            secrets.token_urlsafe(16),
            1e9,
            1e10,
        )

    def rate(i: int) -> Awaitable[Any]:
        return store.count_request(f"consent:{tag}:{i % 10}", 1e9 + i, 1_000_000, 3600.0)

    return {"register": register, "put": put, "get": get, "consent": consent, "rate": rate}


async def measure(
    store: IPermissionStore, tag: str, count: int, servers: Callable[[], list[int]]
) -> dict[str, dict[str, float]]:
    """µs per operation (wall, this process's CPU, the server's CPU) over ``count`` calls."""
    out: dict[str, dict[str, float]] = {}
    calls = operations(store, tag)
    for name in OPERATIONS:
        pids = servers()
        server_before = sum(cpu_seconds(pid) for pid in pids)
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        for i in range(count):
            await calls[name](i)
        wall = time.perf_counter() - wall_before
        cpu = time.process_time() - cpu_before
        server = sum(cpu_seconds(pid) for pid in pids) - server_before
        out[name] = {
            "wall_us": wall * 1e6 / count,
            "relay_cpu_us": cpu * 1e6 / count,
            "server_cpu_us": server * 1e6 / count,
        }
    return out


def medians(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        name: {
            key: round(statistics.median(r[name][key] for r in rounds), 1)
            for key in ("wall_us", "relay_cpu_us", "server_cpu_us")
        }
        for name in OPERATIONS
    }


async def run(reactor: Any, dsn: str, quick: bool) -> dict[str, Any]:
    rounds, count = (3, 100) if quick else (5, 400)
    sqlite_rounds: list[dict[str, dict[str, float]]] = []
    pg_rounds: list[dict[str, dict[str, float]]] = []
    with (
        tempfile.TemporaryDirectory(prefix="store-bench-") as temp,
        scratch_schema(dsn) as (
            scoped,
            backends,
        ),
    ):
        threads: IReactorThreads | IReactorTime = reactor
        sqlite = SQLitePermissionStore(str(Path(temp) / "store.sqlite3"), threads)
        postgres = PostgresPermissionStore(scoped, threads)
        try:
            # Connect and migrate before measuring.
            await sqlite.get_document("consent-rules", "sip:warm@bench.test", "x")
            await postgres.get_document("consent-rules", "sip:warm@bench.test", "x")
            for number in range(rounds):
                tag = f"r{number}"
                sqlite_rounds.append(await measure(sqlite, tag, count, list))
                pg_rounds.append(await measure(postgres, tag, count, backends))
                log(f"round {number + 1}/{rounds} done")
        finally:
            await sqlite.close()
            await postgres.close()
    lite, pg = medians(sqlite_rounds), medians(pg_rounds)
    ratios = {
        name: {
            "wall": round(pg[name]["wall_us"] / max(lite[name]["wall_us"], 0.1), 2),
            "relay_cpu": round(pg[name]["relay_cpu_us"] / max(lite[name]["relay_cpu_us"], 0.1), 2),
            "relay_plus_server_cpu": round(
                (pg[name]["relay_cpu_us"] + pg[name]["server_cpu_us"])
                / max(lite[name]["relay_cpu_us"], 0.1),
                2,
            ),
        }
        for name in OPERATIONS
    }
    return {
        "bench": "store",
        "quick": quick,
        "rounds": rounds,
        "ops_per_round": count,
        "cpus": os.cpu_count(),
        "sqlite": lite,
        "postgresql": pg,
        "postgresql_over_sqlite": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 100, not 5 of 400")
    parser.add_argument("--postgres", metavar="DSN", default=DEFAULT_DSN, help="the server")
    args = parser.parse_args(argv)

    async def main_async(reactor: Any) -> None:
        report = await run(reactor, args.postgres, args.quick)
        print(json.dumps(report, separators=(",", ":")), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(main_async(reactor)))  # exits
    return 0


if __name__ == "__main__":
    sys.exit(main())
