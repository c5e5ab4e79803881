"""``relayctl store migrate | copy``: bring a permission store's schema up to date; move
a store from SQLite to PostgreSQL or back.

Both talk to the database directly, with blocking calls and no reactor, through the
backends' own sessions (the same rows and migrations the daemon uses).  ``copy`` reads
the whole source in one transaction, then writes it in one transaction into a store
that must be empty, ETags and tokens unchanged: a client's ``If-Match`` and every
minted Permission URI still hold afterwards.  Run it while no relay writes the source.
"""

from __future__ import annotations

import math
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import TextIO

from relayd.config import ConfigError, load_config
from relayd.consent import sqlite
from relayd.consent.store import Rows
from relayd.ctl.settings import CtlError

_URI_PREFIXES = ("postgresql://", "postgres://")
STORE_HELP = "sqlite:PATH, postgresql:DSN (a libpq connection string) or a postgresql:// URI"


@dataclass(frozen=True)
class StoreSpec:
    """A store named on the command line or by a configuration: backend and where."""

    backend: str
    where: str

    def __str__(self) -> str:
        if self.backend == "postgresql":
            from relayd.consent.postgres import describe

            try:
                return f"postgresql {describe(self.where)}"
            except Exception:
                return "postgresql (unparsable DSN)"
        return f"sqlite {self.where}"


def parse_store(text: str) -> StoreSpec:
    """``sqlite:PATH``, ``postgresql:DSN``, or a ``postgresql://`` URI as it is."""
    if text.startswith(_URI_PREFIXES):
        return StoreSpec("postgresql", text)
    backend, colon, where = text.partition(":")
    if not (colon and where and backend in ("sqlite", "postgresql")):
        raise CtlError(f"{text!r}: expected {STORE_HELP}")
    return StoreSpec(backend, where)


def configured_store(config_path: str | None, data_dir: str | None) -> StoreSpec:
    """The store the relay of ``config_path`` uses, found as the relay finds it."""
    try:
        config = load_config(config_path)
    except ConfigError as e:
        raise CtlError(str(e)) from None
    store = config.store
    if store.backend == "postgresql":
        return StoreSpec("postgresql", store.dsn)
    if store.backend == "memory":
        raise CtlError("[store] backend is memory: it keeps nothing to migrate or copy")
    folder = Path(data_dir).expanduser() if data_dir else Path(config.data_dir)
    return StoreSpec("sqlite", store.path or str(folder / "relay.sqlite3"))


def _schema_version(spec: StoreSpec) -> int:
    if spec.backend == "sqlite":
        return sqlite.SCHEMA_VERSION
    from relayd.consent import postgres

    return postgres.SCHEMA_VERSION


@contextmanager
def _session(spec: StoreSpec) -> Iterator[tuple[Rows, int]]:
    """The store's rows in one transaction (its schema brought up to date first) and
    the version it had; a database error is one line naming the store."""
    if spec.backend == "sqlite":
        errors: tuple[type[Exception], ...] = (sqlite3.Error, sqlite.StoreSchemaError)
        try:
            with sqlite.session(spec.where) as opened:
                yield opened
        except errors as e:
            raise CtlError(f"{spec}: {_first_line(e)}") from None
        return
    try:
        import psycopg

        from relayd.consent import postgres
    except ImportError:
        raise CtlError("PostgreSQL needs psycopg: pip install 'relayd[postgresql]'") from None
    try:
        with postgres.session(spec.where) as opened:
            yield opened
    except (psycopg.Error, postgres.StoreSchemaError) as e:
        raise CtlError(f"{spec}: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def migrate(spec: StoreSpec, out: TextIO) -> None:
    """Apply the migrations the store lacks; say which version it had and has."""
    with _session(spec) as (_, before):
        pass
    now = _schema_version(spec)
    change = f" (was {before})" if before != now else ", already up to date"
    out.write(f"{spec}: schema version {now}{change}\n")


def copy(source: StoreSpec, target: StoreSpec, out: TextIO) -> None:
    """Every document, consent and registration of ``source`` into the empty ``target``."""
    if source == target:
        raise CtlError(f"{source} is both the source and the target")
    with _session(source) as (rows, _):
        documents = rows.all_documents()
        consents = rows.consents(None, None, None, None)
        bindings = rows.live_bindings(-math.inf, sys.maxsize)  # expired ones too
    with _session(target) as (rows, _):
        if rows.all_documents() or rows.consents(None, None, None, None):
            raise CtlError(f"{target} is not empty: copy into a new store only")
        if rows.live_bindings(-math.inf, 1):
            raise CtlError(f"{target} is not empty: copy into a new store only")
        for key, document in documents:
            rows.write_document(key, document.body, document.etag)
        for record in consents:
            rows.insert_consent(record)
        for aor, of_aor in groupby(bindings, key=lambda binding: binding.aor):
            rows.write_bindings(aor, list(of_aor), [])
    out.write(
        f"copied {len(documents)} documents, {len(consents)} consents and"
        f" {len(bindings)} registrations from {source} to {target}\n"
    )
