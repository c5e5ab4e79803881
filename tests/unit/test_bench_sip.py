"""bench.sip_bench: the pure parts of the store-by-store comparison."""

from __future__ import annotations

from typing import Any

import pytest

from bench.sip_bench import DEFAULT_DSN, by_store, cpu_delta, parse_args


def step(store: str, rate: int, per_s: float, cpu: float | None, **more: Any) -> dict[str, Any]:
    return {
        "load": "list10",
        "rate_offered": rate,
        "workers": 1,
        "store": store,
        "delivered_per_s": per_s,
        "cpu_us_per_delivered": cpu,
        "lost": 0,
        "failed": 0,
        **more,
    }


def test_cpu_delta_counts_new_processes_from_zero_and_leaves_out_ended_ones() -> None:
    before = {10: 1.0, 11: 2.0, 12: 5.0}
    after = {10: 1.5, 11: 2.25, 13: 0.5}  # 12 ended, 13 started
    assert cpu_delta(before, after) == pytest.approx(0.5 + 0.25 + 0.5)


def test_cpu_delta_of_no_processes_is_zero() -> None:
    assert cpu_delta({}, {}) == 0.0


def test_by_store_sets_each_backend_beside_the_first_with_ratios() -> None:
    steps = [
        step("sqlite", 100, 1000.0, 200.0),
        step("sqlite", 200, 2000.0, 180.0),
        step("postgresql", 100, 990.0, 220.0, db_cpu_us_per_delivered=30.0),
        step("postgresql", 200, 1000.0, 198.0, db_cpu_us_per_delivered=20.0, lost=7, failed=1),
    ]
    rows = by_store(steps)
    assert [(r["load"], r["rate_offered"], r["workers"]) for r in rows] == [
        ("list10", 100, 1),
        ("list10", 200, 1),
    ]
    first, second = rows
    assert first["per_s_sqlite"] == 1000.0 and first["per_s_postgresql"] == 990.0
    assert first["cpu_us_sqlite"] == 200.0 and first["cpu_us_postgresql"] == 220.0
    assert first["db_cpu_us_postgresql"] == 30.0 and "db_cpu_us_sqlite" not in first
    assert first["cpu_ratio_postgresql_to_sqlite"] == 1.1
    assert first["cpu_with_db_ratio_postgresql_to_sqlite"] == 1.25
    assert first["per_s_ratio_postgresql_to_sqlite"] == 0.99
    assert second["cpu_ratio_postgresql_to_sqlite"] == 1.1
    assert second["per_s_ratio_postgresql_to_sqlite"] == 0.5
    assert second["lost_postgresql"] == 8 and second["lost_sqlite"] == 0


def test_by_store_adds_the_database_cpu_to_whichever_backend_has_one() -> None:
    steps = [
        step("postgresql", 100, 1000.0, 220.0, db_cpu_us_per_delivered=30.0),
        step("sqlite", 100, 1000.0, 200.0),
    ]
    (row,) = by_store(steps)
    assert row["cpu_ratio_sqlite_to_postgresql"] == 0.91
    assert row["cpu_with_db_ratio_sqlite_to_postgresql"] == 0.8


def test_by_store_has_no_database_ratio_without_a_database() -> None:
    (row,) = by_store([step("memory", 100, 1000.0, 180.0), step("sqlite", 100, 1000.0, 200.0)])
    assert row["cpu_ratio_sqlite_to_memory"] == 1.11
    assert "cpu_with_db_ratio_sqlite_to_memory" not in row


def test_by_store_has_no_ratio_where_a_backend_delivered_nothing() -> None:
    steps = [
        step("sqlite", 100, 1000.0, 200.0),
        step("postgresql", 100, 0.0, None, db_cpu_us_per_delivered=None),
    ]
    (row,) = by_store(steps)
    assert row["cpu_ratio_postgresql_to_sqlite"] is None
    assert row["per_s_ratio_postgresql_to_sqlite"] is None
    assert row.get("cpu_with_db_ratio_postgresql_to_sqlite") is None


def test_by_store_reads_470_steps_too() -> None:
    rows = by_store(
        [
            {
                "load": "470",
                "rate_offered": 50,
                "store": "sqlite",
                "consent_needed_per_s": 50.0,
                "cpu_us_per_470": 400.0,
                "failed": 0,
            },
            {
                "load": "470",
                "rate_offered": 50,
                "store": "postgresql",
                "consent_needed_per_s": 49.0,
                "cpu_us_per_470": 500.0,
                "db_cpu_us_per_470": 10.0,
                "failed": 2,
            },
        ]
    )
    assert rows[0]["cpu_ratio_postgresql_to_sqlite"] == 1.25
    assert rows[0]["lost_postgresql"] == 2


def test_stores_option_runs_each_backend_with_the_first_as_the_base() -> None:
    args = parse_args(["--stores", "sqlite, postgresql"])
    assert args.stores == ["sqlite", "postgresql"]
    assert args.store == "sqlite"
    assert args.dsn == DEFAULT_DSN


def test_without_stores_the_single_store_is_the_one_the_workers_imply() -> None:
    assert parse_args([]).stores == ["memory"]
    assert parse_args(["--workers", "1,2"]).stores == ["sqlite"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stores", "sqlite,mysql"], "--stores: memory, sqlite, postgresql"),
        (["--stores", ""], "--stores: memory, sqlite, postgresql"),
        (["--stores", "sqlite,sqlite"], "each backend once"),
        (["--stores", "memory,sqlite", "--workers", "2"], "workers need a durable store"),
    ],
)
def test_bad_stores_are_refused_naming_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
