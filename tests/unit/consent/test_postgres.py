"""The PostgreSQL backend: what a shared server adds to the store's behaviour
(test_store.py runs the store contract on it too).  Every test gets a fresh schema
(the ``postgres_dsn`` fixture) and skips, saying why, when no server answers."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psycopg
import pytest
import pytest_twisted
from psycopg.conninfo import make_conninfo
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from relayd.consent.ledger import ConsentLedger, ConsentLimits, RateExceeded
from relayd.consent.pgchanges import decode, encode
from relayd.consent.postgres import (
    SCHEMA_VERSION,
    PostgresPermissionStore,
    StoreSchemaError,
    connection_string,
    describe,
    migrate,
)
from relayd.consent.store import (
    ConsentState,
    PendingConsent,
    PreconditionFailed,
    StoreChange,
    StoredBinding,
    StoreUnavailable,
)
from relayd.consent.vocabulary import CONSENT_RULES_AUID as AUID
from relayd.testing import captured_log

XUI = "sip:carol@example.test"
DOC = b'<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"/>'
BOB = "sip:bob@example.test"


def _versions(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as connection:
        rows = connection.execute("SELECT version FROM schema_migrations ORDER BY version")
        return [row[0] for row in rows.fetchall()]


@pytest_twisted.ensureDeferred
async def test_postgres_survives_restart(postgres_dsn: str) -> None:
    store = PostgresPermissionStore(postgres_dsn, reactor)
    write = await store.put_document(AUID, XUI, "index", DOC)
    uri = "sip:bob@192.0.2.1;transport=tcp"
    binding = StoredBinding(BOB, uri, f"<{uri}>", 300.0, "call-1", 1, 0.5)
    await store.save_bindings(BOB, [binding], [])
    await store.close()
    reopened = PostgresPermissionStore(postgres_dsn, reactor)
    try:
        assert await reopened.get_document(AUID, XUI, "index") == (DOC, write.etag)
        assert await reopened.list_bindings(100.0, 10) == [binding]
    finally:
        await reopened.close()


@pytest_twisted.ensureDeferred
async def test_postgres_schema_is_built_by_recorded_migrations(postgres_dsn: str) -> None:
    for _ in range(2):  # a second start applies nothing again
        store = PostgresPermissionStore(postgres_dsn, reactor)
        await store.get_document(AUID, XUI, "index")
        await store.close()
    assert _versions(postgres_dsn) == list(range(1, SCHEMA_VERSION + 1))
    with psycopg.connect(postgres_dsn) as connection:
        assert migrate(connection) == SCHEMA_VERSION


def test_postgres_migrate_upgrades_an_empty_database(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as connection:
        assert migrate(connection) == 0
    assert _versions(postgres_dsn) == list(range(1, SCHEMA_VERSION + 1))


@pytest_twisted.ensureDeferred
async def test_nodes_starting_together_migrate_once(postgres_dsn: str) -> None:
    nodes = [PostgresPermissionStore(postgres_dsn, reactor) for _ in range(3)]
    try:
        await defer.gatherResults([node.list_documents(AUID, XUI) for node in nodes])
    finally:
        for node in nodes:
            await node.close()
    assert _versions(postgres_dsn) == list(range(1, SCHEMA_VERSION + 1))


@pytest_twisted.ensureDeferred
async def test_postgres_refuses_newer_schema(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as connection:
        connection.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
        connection.execute("INSERT INTO schema_migrations VALUES (99)")
    store = PostgresPermissionStore(postgres_dsn, reactor)
    try:
        with pytest.raises(StoreSchemaError, match="newer"):
            await store.get_document(AUID, XUI, "index")
    finally:
        await store.close()
    assert _versions(postgres_dsn) == [99]  # nothing applied on top


@pytest_twisted.ensureDeferred
async def test_two_nodes_conflicting_writes_exactly_one_wins(postgres_dsn: str) -> None:
    """Each node has its own connection: PostgreSQL, not the process, must keep
    If-Match a compare-and-set (RFC 9110 §13.1.1)."""
    nodes = [PostgresPermissionStore(postgres_dsn, reactor) for _ in range(2)]
    try:
        for round_ in range(10):
            base = await nodes[0].put_document(AUID, XUI, "index", DOC)
            attempts = [
                node.put_document(AUID, XUI, "index", b"<v%d/>" % round_, if_match=base.etag)
                for node in nodes
            ]
            results: list[tuple[bool, Any]] = await defer.DeferredList(attempts, consumeErrors=True)
            winners = [value for ok, value in results if ok]
            losers: list[Failure] = [value for ok, value in results if not ok]
            assert len(winners) == 1, results
            assert losers[0].check(PreconditionFailed), losers[0]
            stored = await nodes[1].get_document(AUID, XUI, "index")
            assert stored is not None and stored.etag == winners[0].etag
    finally:
        for node in nodes:
            await node.close()


@pytest_twisted.ensureDeferred
async def test_two_nodes_open_one_consent_per_triple(postgres_dsn: str) -> None:
    nodes = [PostgresPermissionStore(postgres_dsn, reactor) for _ in range(2)]
    try:
        for round_ in range(10):
            sender = f"sip:alice{round_}@example.test"
            opened = await defer.gatherResults(
                [
                    node.open_consent(
                        sender, "sip:friends@relay.test", XUI, [method], f"t{round_}{method}", 1, 9
                    )
                    for node, method in zip(nodes, ("MESSAGE", "INVITE"), strict=True)
                ]
            )
            assert opened[0].id == opened[1].id
            (record,) = await nodes[0].list_consents(sender=sender)
            assert set(record.methods) == {"MESSAGE", "INVITE"}
    finally:
        for node in nodes:
            await node.close()


def test_dsn_gains_a_connect_timeout_and_is_logged_without_password() -> None:
    dsn = "host=db.example.test port=5433 dbname=relay user=relayd password=s3cret"
    assert "connect_timeout=10" in connection_string(dsn)
    assert connection_string(dsn + " connect_timeout=2") == dsn + " connect_timeout=2"
    assert describe(dsn) == "relayd@db.example.test:5433/relay"
    assert "s3cret" not in describe("postgresql://relayd:s3cret@db.example.test/relay")


@pytest_twisted.ensureDeferred
async def test_a_dropped_connection_is_reopened_without_failing_a_call(
    postgres_dsn: str,
) -> None:
    """A server restart or failover ends the connection: the next call, found not to
    have reached the server, runs again on a new one instead of failing."""
    name = f"relayd-{secrets.token_hex(6)}"
    store = PostgresPermissionStore(make_conninfo(postgres_dsn, application_name=name), reactor)
    try:
        write = await store.put_document(AUID, XUI, "index", DOC)
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (name,),
            )
        assert await store.get_document(AUID, XUI, "index") == (DOC, write.etag)
        assert (await store.put_document(AUID, XUI, "index", DOC, if_match=write.etag)).etag
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_connection_lost_mid_call_fails_it_quietly_and_the_next_reconnects(
    postgres_dsn: str,
) -> None:
    """The server closed the connection during a call (a restart): the caller gets
    StoreUnavailable and nothing is logged for the rollback adbapi would try on the
    dead connection; the next call opens a new one."""
    store = PostgresPermissionStore(postgres_dsn, reactor)

    def lost(connection: Any) -> None:
        connection._connection.close()  # what a restart does to it
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    try:
        await store.put_document(AUID, XUI, "index", DOC)
        with captured_log() as events:
            d = store._pool.runWithConnection(lost)
            with pytest.raises(psycopg.OperationalError):
                await d
        assert [formatEvent(e) for e in events] == []
        assert (await store.get_document(AUID, XUI, "index")) is not None
    finally:
        await store.close()


async def _until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Let the reactor run until ``condition`` holds (another node's change arrives
    through a thread and the reactor's queue)."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition never held")


def _node(dsn: str, name: str = "", backoff: float = 0.5) -> PostgresPermissionStore:
    if name:
        dsn = make_conninfo(dsn, application_name=name)
    return PostgresPermissionStore(dsn, reactor, backoff=backoff)


def test_changes_are_recorded_as_text_they_are_rebuilt_from() -> None:
    record = PendingConsent(
        "c1", "sip:a@x.test", "sip:l@x.test", BOB, ("MESSAGE", "INVITE"), "tok", 1.0, 2.0
    )
    binding = StoredBinding(BOB, "sip:bob@192.0.2.1", "<sip:bob@192.0.2.1>", 9.0, "c", 2, 0.5)
    for change in (
        StoreChange("document", AUID, XUI, "index", '"e1"'),
        StoreChange("document", AUID, XUI, "index", None),
        StoreChange("consent", consent=replace(record, state=ConsentState.GRANTED)),
        StoreChange("binding", aor=BOB, bindings=(binding,), removed=("sip:bob@192.0.2.2",)),
    ):
        assert decode(encode(change)) == replace(change, remote=True)


@pytest_twisted.ensureDeferred
async def test_a_change_committed_at_one_node_is_announced_at_the_other(
    postgres_dsn: str,
) -> None:
    """A grant written through node A's XCAP reaches node B's listeners (the
    wait-permission subscriber B holds), once; A announces its own change once too."""
    a, b = _node(postgres_dsn), _node(postgres_dsn)
    seen_a: list[StoreChange] = []
    seen_b: list[StoreChange] = []
    a.add_listener(seen_a.append)
    b.add_listener(seen_b.append)
    try:
        await _until(lambda: a.feed.connected.is_set() and b.feed.connected.is_set())
        write = await a.put_document(AUID, XUI, "index", DOC)
        record = await a.open_consent(BOB, "sip:l@x.test", XUI, ["MESSAGE"], "tok", 1.0, 9.0)
        expected = [
            StoreChange("document", AUID, XUI, "index", write.etag, body=DOC),
            StoreChange("consent", consent=record),
        ]
        await _until(lambda: len(seen_b) == 2)
        await task.deferLater(reactor, 0.3, lambda: None)  # nothing more arrives
        # The body stays in the process that wrote it: B reads the document.
        assert seen_b == [replace(change, remote=True, body=None) for change in expected]
        assert seen_a == expected
    finally:
        await a.close()
        await b.close()


@pytest_twisted.ensureDeferred
async def test_a_node_that_lost_its_connection_catches_up_exactly_once(
    postgres_dsn: str,
) -> None:
    """Changes committed while node B was cut off from the server reach B's listeners
    after it reconnects, in order, none twice."""
    name = f"relayd-{secrets.token_hex(6)}"
    a, b = _node(postgres_dsn), _node(postgres_dsn, name, backoff=1.0)
    seen: list[StoreChange] = []
    b.add_listener(seen.append)
    try:
        await _until(lambda: a.feed.connected.is_set() and b.feed.connected.is_set())
        first = await a.put_document(AUID, XUI, "one", DOC)
        await _until(lambda: len(seen) == 1)
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (name,),
            )
        await _until(lambda: not b.feed.connected.is_set())
        missed = await a.put_document(AUID, XUI, "two", DOC)
        deleted = await a.delete_document(AUID, XUI, "one")
        assert deleted and len(seen) == 1  # B is still waiting to reconnect
        await _until(lambda: len(seen) == 3)
        after = await a.put_document(AUID, XUI, "three", DOC)
        await _until(lambda: len(seen) == 4)
        await task.deferLater(reactor, 0.3, lambda: None)
        assert seen == [
            StoreChange("document", AUID, XUI, "one", first.etag, remote=True),
            StoreChange("document", AUID, XUI, "two", missed.etag, remote=True),
            StoreChange("document", AUID, XUI, "one", None, remote=True),
            StoreChange("document", AUID, XUI, "three", after.etag, remote=True),
        ]
        assert await b.get_document(AUID, XUI, "two") == (DOC, missed.etag)
    finally:
        await a.close()
        await b.close()


@pytest_twisted.ensureDeferred
async def test_a_server_that_cannot_be_reached_makes_the_store_unavailable() -> None:
    """What the relay answers 503 with Retry-After for, while it reconnects."""
    store = PostgresPermissionStore(
        "host=127.0.0.1 port=1 dbname=test user=postgres connect_timeout=2", reactor
    )
    try:
        with pytest.raises(StoreUnavailable):
            await store.get_document(AUID, XUI, "index")
        with pytest.raises(StoreUnavailable):
            await store.put_document(AUID, XUI, "index", DOC)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_every_node_counts_a_senders_consent_requests_together(postgres_dsn: str) -> None:
    """The hourly rate holds for the deployment, not per node (consent spec §(b))."""
    clock = task.Clock()
    clock.advance(1_800_000_000)
    limits = ConsentLimits(consent_requests_per_hour=2)
    stores = [PostgresPermissionStore(postgres_dsn, reactor) for _ in range(2)]
    a, b = (ConsentLedger(store, clock, limits) for store in stores)
    try:
        await a.open(BOB, "sip:l@x.test", XUI, ["MESSAGE"])
        await b.open(BOB, "sip:l@x.test", "sip:dave@example.test", ["MESSAGE"])
        with pytest.raises(RateExceeded) as refused:
            await a.open(BOB, "sip:l@x.test", "sip:erin@example.test", ["MESSAGE"])
        assert refused.value.retry_after == 3600
        await b.open("sip:frank@example.test", "sip:l@x.test", XUI, ["MESSAGE"])
    finally:
        for ledger in (a, b):
            ledger.stop()
        for store in stores:
            await store.close()
