"""Suite-wide settings.

Hypothesis runs derandomized by default so that the suite gives the same
answer on every run (CI included); `HYPOTHESIS_PROFILE=dev pytest` explores
with fresh random examples instead.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


POSTGRES_DSN = os.environ.get(
    "RELAYD_TEST_POSTGRES_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)
"""The PostgreSQL server the store tests use (CI starts one before each run)."""


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """A DSN of :data:`POSTGRES_DSN` whose ``search_path`` is a fresh schema, dropped
    afterwards, so that runs never collide and leave nothing behind.  Skips, saying
    why, when no server answers."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is the postgresql extra")
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    try:
        admin = psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        pytest.skip(
            f"no PostgreSQL answers at {POSTGRES_DSN!r} ({first_line});"
            " start one or set RELAYD_TEST_POSTGRES_DSN"
        )
    schema = sql.Identifier(f"relayd_test_{secrets.token_hex(8)}")
    with admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        try:
            yield make_conninfo(POSTGRES_DSN, options=f"-c search_path={schema.as_string()}")
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))
