"""A scratch schema on a PostgreSQL server, for a benchmark's store: made fresh for one
run and dropped afterwards, so no state leaks between runs or into the database."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def scratch_schema(dsn: str) -> Iterator[tuple[str, Callable[[], list[int]]]]:
    """``dsn`` with a fresh schema first on its search path and an application name of
    the run's own (the schema dropped afterwards, so no state leaks between runs), and
    a function listing the server backends (pids) of connections made with it."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    tag = secrets.token_hex(6)
    name = sql.Identifier(f"relayd_bench_{tag}")
    application = f"relayd-bench-{tag}"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(name))

        def backends() -> list[int]:
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application,)
            ).fetchall()
            return [int(row[0]) for row in rows]

        try:
            yield (
                make_conninfo(
                    dsn,
                    options=f"-c search_path={name.as_string()}",
                    application_name=application,
                ),
                backends,
            )
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(name))
