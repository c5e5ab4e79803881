"""The SQLite backend: what a file adds to the store's behaviour (test_store.py runs
the store's behavioural suite on it too)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from relayd.consent.sqlite import SCHEMA_VERSION, SQLitePermissionStore
from relayd.consent.store import IPermissionStore, PendingConsent, StoreChange, StoredBinding
from relayd.consent.vocabulary import CONSENT_RULES_AUID as AUID
from relayd.consent.vocabulary import RESOURCE_LISTS_AUID
from relayd.testing import captured_log

XUI = "sip:carol@example.test"
DOC = b'<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"/>'
BOB = "sip:bob@example.test"


async def _open(store: IPermissionStore, expires: float = 200.0) -> PendingConsent:
    return await store.open_consent(
        "sip:alice@example.test",
        "sip:friends@relay.example.test",
        XUI,
        ["MESSAGE"],
        "tok",
        100.0,
        expires,
    )


@pytest_twisted.ensureDeferred
async def test_sqlite_survives_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "store.sqlite")
    store = SQLitePermissionStore(path, reactor)
    write = await store.put_document(AUID, XUI, "index", DOC)
    await store.put_document(RESOURCE_LISTS_AUID, XUI, "index", b"<resource-lists/>")
    record = await _open(store)
    await store.close()

    reopened = SQLitePermissionStore(path, reactor)
    try:
        assert await reopened.get_document(AUID, XUI, "index") == (DOC, write.etag)
        assert await reopened.list_documents(RESOURCE_LISTS_AUID, XUI) == ["index"]
        assert await reopened.get_consent(record.id) == record
        again = await _open(reopened, expires=900.0)
        assert again.id == record.id
    finally:
        await reopened.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_file_uses_wal_and_versioned_schema(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = SQLitePermissionStore(str(path), reactor)
    await store.put_document(AUID, XUI, "index", DOC)
    await store.close()
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)
        ]
    finally:
        connection.close()


def _modes(path: Path) -> dict[str, int]:
    return {
        suffix: stat.S_IMODE(Path(f"{path}{suffix}").stat().st_mode)
        for suffix in ("", "-wal", "-shm")
    }


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest_twisted.ensureDeferred
async def test_sqlite_files_are_created_0600(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "store.sqlite"
    store = SQLitePermissionStore(str(path), reactor)
    try:
        await store.put_document(AUID, XUI, "index", DOC)
        assert _modes(path) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_files_left_wider_are_tightened_at_open(
    tmp_path: Path, open_umask: None
) -> None:
    path = tmp_path / "store.sqlite"
    older = sqlite3.connect(path)  # an older relayd, still holding -wal and -shm open
    older.execute("PRAGMA journal_mode=WAL")
    older.execute("CREATE TABLE t (x)")
    older.commit()
    for name in _modes(path):
        os.chmod(f"{path}{name}", 0o644)  # the too-open mode under test
    with captured_log() as events:
        store = SQLitePermissionStore(str(path), reactor)
    try:
        assert _modes(path) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
        tightened = [e for e in events if "had mode" in (e.get("log_format") or "")]
        assert [(e["path"], e["mode"]) for e in tightened] == [
            (f"{path}{suffix}", "0644") for suffix in ("", "-wal", "-shm")
        ]
        await store.put_document(AUID, XUI, "index", DOC)
    finally:
        older.close()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_version_1_file_gains_bindings_and_rate_counts(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = SQLitePermissionStore(str(path), reactor)
    await store.put_document(AUID, XUI, "index", DOC)
    await store.close()
    connection = sqlite3.connect(path)
    connection.execute("DROP TABLE bindings")  # what version 1 wrote
    connection.execute("DROP TABLE requests")
    connection.execute("UPDATE schema_version SET version = 1")
    connection.commit()
    connection.close()
    reopened = SQLitePermissionStore(str(path), reactor)
    try:
        assert (await reopened.get_document(AUID, XUI, "index") or (b"",))[0] == DOC
        await reopened.save_bindings(
            BOB, [StoredBinding(BOB, "sip:bob@h", "<sip:bob@h>", 300.0, "call-1", 1)], []
        )
        assert [b.uri for b in await reopened.list_bindings(0.0, 10)] == ["sip:bob@h"]
        assert await reopened.count_request(BOB, 0.0, 1, 10.0) is None
    finally:
        await reopened.close()
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)
        ]
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_bindings_survive_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "store.sqlite")
    store = SQLitePermissionStore(path, reactor)
    uri = "sip:bob@192.0.2.1;transport=tcp"
    binding = StoredBinding(BOB, uri, f"<{uri}>", 300.0, "call-1", 1, 0.5)
    await store.save_bindings(BOB, [binding], [])
    await store.close()
    reopened = SQLitePermissionStore(path, reactor)
    try:
        assert await reopened.list_bindings(100.0, 10) == [binding]
    finally:
        await reopened.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    connection.execute("INSERT INTO schema_version VALUES (99)")
    connection.commit()
    connection.close()
    store = SQLitePermissionStore(str(path), reactor)
    try:
        with pytest.raises(Exception, match="newer"):
            await store.get_document(AUID, XUI, "index")
    finally:
        await store.close()


_WRITER = textwrap.dedent(
    """
    import sys
    from twisted.internet import defer, task
    from relayd.consent.sqlite import SQLitePermissionStore

    async def main(reactor):
        store = SQLitePermissionStore(sys.argv[1], reactor)
        index = 0
        while True:
            await store.put_document("a", "u", "d%d" % index, b"<d/>")
            print(index, flush=True)  # acknowledged only after the commit
            index += 1

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    """
)


def test_sqlite_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
    process = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert process.stdout is not None
    acknowledged = -1
    try:
        for line in process.stdout:
            acknowledged = int(line)
            if acknowledged >= 30:
                break
    finally:
        process.kill()  # SIGKILL, mid-write
        process.wait()
    assert acknowledged >= 30
    connection = sqlite3.connect(path)
    try:
        names = {row[0] for row in connection.execute("SELECT name FROM documents")}
    finally:
        connection.close()
    assert {f"d{index}" for index in range(acknowledged + 1)} <= names


async def _until(condition: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition not met in time")


@pytest_twisted.ensureDeferred
async def test_sqlite_workers_hear_each_others_changes(tmp_path: Path) -> None:
    path = str(tmp_path / "store.sqlite")
    first = SQLitePermissionStore(path, reactor, node="w0", poll_seconds=0.02)
    second = SQLitePermissionStore(path, reactor, node="w1", poll_seconds=0.02)
    heard: dict[str, list[StoreChange]] = {"w0": [], "w1": []}
    first.add_listener(heard["w0"].append)
    second.add_listener(heard["w1"].append)
    try:
        # Each has polled once (where it starts reading from) before anything is written.
        await first.get_document(AUID, XUI, "index")
        await second.get_document(AUID, XUI, "index")
        await first.put_document(AUID, XUI, "index", DOC)
        await _until(lambda: heard["w1"])
        (change,) = heard["w1"]
        assert (change.kind, change.xui, change.remote) == ("document", XUI, True)
        assert change.etag is not None
        await second.save_bindings(
            BOB, [StoredBinding(BOB, "sip:bob@h", "<sip:bob@h>", 300.0, "call-1", 1)], []
        )
        await _until(lambda: len(heard["w0"]) == 2)
        mine, theirs = heard["w0"]
        assert (mine.kind, mine.remote) == ("document", False)
        assert (theirs.kind, theirs.aor, theirs.remote) == ("binding", BOB, True)
        assert [b.uri for b in theirs.bindings] == ["sip:bob@h"]
        await task.deferLater(reactor, 0.1, lambda: None)
        # Nobody hears its own change twice.
        assert [c.remote for c in heard["w1"]] == [True, False]
        assert len(heard["w0"]) == 2
    finally:
        await first.close()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_without_node_records_no_changes(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = SQLitePermissionStore(str(path), reactor)
    await store.put_document(AUID, XUI, "index", DOC)
    await store.close()
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("SELECT count(*) FROM changes").fetchone() == (0,)
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_version_4_file_gains_where_registrations_came_from(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = SQLitePermissionStore(str(path), reactor)
    await store.close()
    connection = sqlite3.connect(path)
    connection.execute("DROP TABLE bindings")  # as version 4 made it: no source column
    connection.execute(
        "CREATE TABLE bindings (aor TEXT NOT NULL, uri TEXT NOT NULL, contact TEXT NOT NULL,"
        " expires REAL NOT NULL, call_id TEXT NOT NULL, cseq INTEGER NOT NULL, q REAL NOT NULL,"
        " PRIMARY KEY (aor, uri))"
    )
    connection.execute(
        "INSERT INTO bindings VALUES (?, 'sip:bob@old', '<sip:bob@old>', 900.0, 'c', 1, 1.0)",
        (BOB,),
    )
    connection.execute("UPDATE schema_version SET version = 4")
    connection.commit()
    connection.close()
    reopened = SQLitePermissionStore(str(path), reactor)
    try:
        new = StoredBinding(BOB, "sip:bob@new", "<sip:bob@new>", 900.0, "d", 1, 1.0, "UDP h 5")
        await reopened.save_bindings(BOB, [new], [])
        assert [(b.uri, b.source) for b in await reopened.list_bindings(0.0, 10)] == [
            ("sip:bob@new", "UDP h 5"),
            ("sip:bob@old", ""),
        ]
    finally:
        await reopened.close()
