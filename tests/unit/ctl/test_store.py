"""relayctl store migrate and store copy, on SQLite files and a real PostgreSQL (a fresh
schema per test, from the ``postgres_dsn`` fixture)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relayd.consent import postgres, sqlite
from relayd.consent.documents import DocumentKey
from relayd.consent.store import ConsentState, PendingConsent, Rows, StoredBinding
from relayd.ctl import main as ctl

KEY = DocumentKey("consent-rules", "sip:carol@example.test", "index")
RECORD = PendingConsent(
    "c1", "sip:a@x.test", "sip:l@x.test", "sip:carol@example.test", ("MESSAGE", "INVITE"),
    "token-1", 100.0, 200.5, ConsentState.GRANTED,
)  # fmt: skip
BINDINGS = [
    StoredBinding("sip:bob@x.test", "sip:bob@192.0.2.1", "<sip:bob@192.0.2.1>", 10.0, "c", 1),
    StoredBinding("sip:bob@x.test", "sip:bob@192.0.2.2", "<sip:bob@192.0.2.2>", 9e9, "d", 7, 0.5),
    StoredBinding("sip:eve@x.test", "sip:eve@192.0.2.3", "<sip:eve@192.0.2.3>", 9e9, "e", 2),
]


def _fill(rows: Rows) -> None:
    rows.write_document(KEY, b"<ruleset/>", '"etag-1"')
    rows.write_document(KEY._replace(name="other"), b"\x00\xff", '"etag-2"')
    rows.insert_consent(RECORD)
    rows.write_bindings("sip:bob@x.test", BINDINGS[:2], [])
    rows.write_bindings("sip:eve@x.test", BINDINGS[2:], [])


def _everything(rows: Rows) -> tuple[Any, ...]:
    return (
        rows.all_documents(),
        rows.consents(None, None, None, None),
        rows.live_bindings(-math.inf, 100),
    )


def test_copy_sqlite_to_postgresql_and_back_keeps_every_row(
    tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(tmp_path / "source.sqlite3")
    with sqlite.session(source) as (rows, _):
        _fill(rows)
        expected = _everything(rows)
    assert ctl.run(["store", "copy", f"sqlite:{source}", f"postgresql:{postgres_dsn}"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("copied 2 documents, 1 consents and 3 registrations from sqlite")
    with postgres.session(postgres_dsn) as (rows, _):
        assert _everything(rows) == expected  # ETags, tokens and expired bindings too
    back = str(tmp_path / "back.sqlite3")
    assert ctl.run(["store", "copy", f"postgresql:{postgres_dsn}", f"sqlite:{back}"]) == 0
    with sqlite.session(back) as (rows, _):
        assert _everything(rows) == expected
    assert Path(back).stat().st_mode & 0o077 == 0


def test_copy_into_a_store_with_rows_is_refused(
    tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(tmp_path / "source.sqlite3")
    with sqlite.session(source) as (rows, _):
        _fill(rows)
    with postgres.session(postgres_dsn) as (rows, _):
        rows.write_bindings("sip:bob@x.test", BINDINGS[:1], [])
    assert ctl.run(["store", "copy", f"sqlite:{source}", f"postgresql:{postgres_dsn}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("relayctl: postgresql ") and err.endswith(
        " is not empty: copy into a new store only\n"
    )
    with postgres.session(postgres_dsn) as (rows, _):
        assert _everything(rows) == ([], [], BINDINGS[:1])


def test_migrate_postgresql_applies_what_is_missing_once(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(2):
        assert ctl.run(["store", "migrate", f"postgresql:{postgres_dsn}"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    version = postgres.SCHEMA_VERSION
    assert first.endswith(f": schema version {version} (was 0)")
    assert second.endswith(f": schema version {version}, already up to date")
    with psycopg.connect(postgres_dsn) as connection:
        rows = connection.execute("SELECT version FROM schema_migrations").fetchall()
    assert rows == [(v,) for v in range(1, version + 1)]


def test_migrate_refuses_a_newer_postgresql_schema(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(postgres_dsn) as connection:
        connection.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
        connection.execute("INSERT INTO schema_migrations VALUES (99)")
    assert ctl.run(["store", "migrate", f"postgresql:{postgres_dsn}"]) == 1
    err = capsys.readouterr().err
    assert err.endswith(f": database schema 99 is newer than {postgres.SCHEMA_VERSION}\n")
    assert err.count("\n") == 1


def test_migrate_defaults_to_the_configured_sqlite_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "relay.sqlite3"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    connection.execute("INSERT INTO schema_version VALUES (1)")
    connection.commit()
    connection.close()
    assert ctl.run(["store", "migrate", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == (
        f"sqlite {path}: schema version {sqlite.SCHEMA_VERSION} (was 1)\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["store", "migrate", "redis:x"], "'redis:x': expected sqlite:PATH, postgresql:DSN"),
        (["store", "copy", "sqlite:a", "sqlite:a"], "sqlite a is both the source and the target"),
    ],
)
def test_bad_store_arguments_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl.run(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"relayctl: {message}") and err.count("\n") == 1


def test_migrate_of_a_memory_store_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ini = tmp_path / "relayd.ini"
    ini.write_text("[store]\nbackend = memory\n")
    assert ctl.run(["store", "migrate", "--config", str(ini)]) == 1
    assert capsys.readouterr().err == (
        "relayctl: [store] backend is memory: it keeps nothing to migrate or copy\n"
    )
