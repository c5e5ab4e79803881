"""Tests for relayd.msrp.sessions: Use-Path sessions and their expiry."""

from __future__ import annotations

import re

import pytest
from twisted.internet.task import Clock

from relayd.msrp.sessions import Session, SessionTable
from relayd.msrp.uri import MSRPURI

ALICE = MSRPURI.parse("msrps://alice.example.org:40001/a1;tcp")
PEER = MSRPURI.parse("msrps://relay.example.com/r;tcp")


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest.fixture
def table(clock: Clock) -> SessionTable:
    return SessionTable(clock)


def test_create_for_client(table: SessionTable, clock: Clock) -> None:
    connection = object()
    session = table.create_for_client(connection, ALICE, "alice", 60)
    assert session.user == "alice"
    assert session.owner_connection is connection
    assert session.owner_uri is ALICE
    assert session.owner_relay is None
    assert session.created_at == 1000
    assert session.expires_at == 1060
    assert len(table) == 1
    assert table.lookup(session.session_id) is session


def test_create_for_relay_lower_cases_the_host(table: SessionTable) -> None:
    owner = MSRPURI.parse("msrps://Relay1.Example.COM:4000/r1;tcp")
    session = table.create_for_relay(owner, "bob", 60)
    assert session.owner_relay == "relay1.example.com"
    assert session.owner_uri is owner
    assert session.owner_connection is None
    assert table.lookup(session.session_id) is session


def test_create_for_relay_strips_ipv6_brackets(table: SessionTable) -> None:
    session = table.create_for_relay(MSRPURI.parse("msrps://[::1]:2855/r1;tcp"), "bob", 60)
    assert session.owner_relay == "::1"


def test_lookup_unknown_id(table: SessionTable) -> None:
    assert table.lookup("no-such-session") is None
    assert table.lookup("") is None


def test_lookup_is_case_sensitive(table: SessionTable) -> None:
    session = table.create_for_client(object(), ALICE, "alice", 60)
    changed = session.session_id.swapcase()
    if changed != session.session_id:
        assert table.lookup(changed) is None


def test_session_ids_have_at_least_128_bits_and_are_url_safe(table: SessionTable) -> None:
    session = table.create_for_client(object(), ALICE, "alice", 60)
    # token_urlsafe(16): 22 base64url characters carry 128 random bits.
    assert len(session.session_id) >= 22
    assert re.fullmatch(r"[A-Za-z0-9_-]+", session.session_id)


def test_session_ids_are_unique(table: SessionTable) -> None:
    connection = object()
    ids = {table.create_for_client(connection, ALICE, "alice", 60).session_id for _ in range(2000)}
    assert len(ids) == 2000
    assert len(table) == 2000


def test_session_expires_on_the_clock(table: SessionTable, clock: Clock) -> None:
    session = table.create_for_client(object(), ALICE, "alice", 60)
    clock.advance(59.9)
    assert table.lookup(session.session_id) is session
    clock.advance(0.1)
    assert table.lookup(session.session_id) is None
    assert len(table) == 0


def test_expired_session_is_removed_on_lookup(table: SessionTable, clock: Clock) -> None:
    connection = object()
    session = table.create_for_client(connection, ALICE, "alice", 10)
    clock.advance(11)
    assert table.lookup(session.session_id) is None
    # Its connection no longer has anything to drop.
    assert table.drop_connection(connection) == 0


def test_expires_in_rounds_to_whole_seconds(table: SessionTable, clock: Clock) -> None:
    session = table.create_for_client(object(), ALICE, "alice", 60)
    assert session.expires_in(clock.seconds()) == 60
    clock.advance(0.6)
    assert session.expires_in(clock.seconds()) == 59
    assert session.expires_in(clock.seconds() + 1000) == 0


def test_drop_connection_removes_only_its_sessions(table: SessionTable) -> None:
    mine, other = object(), object()
    first = table.create_for_client(mine, ALICE, "alice", 60)
    second = table.create_for_client(mine, ALICE, "alice", 60)
    kept = table.create_for_client(other, ALICE, "bob", 60)
    relay = table.create_for_relay(PEER, "carol", 60)
    assert table.drop_connection(mine) == 2
    assert table.lookup(first.session_id) is None
    assert table.lookup(second.session_id) is None
    assert table.lookup(kept.session_id) is kept
    assert table.lookup(relay.session_id) is relay
    assert len(table) == 2


def test_drop_unknown_connection(table: SessionTable) -> None:
    assert table.drop_connection(object()) == 0
    assert table.drop_connection(object()) == 0


def test_drop_connection_twice(table: SessionTable) -> None:
    connection = object()
    table.create_for_client(connection, ALICE, "alice", 60)
    assert table.drop_connection(connection) == 1
    assert table.drop_connection(connection) == 0


def test_drop_connection_after_partial_expiry(table: SessionTable, clock: Clock) -> None:
    connection = object()
    table.create_for_client(connection, ALICE, "alice", 10)
    live = table.create_for_client(connection, ALICE, "alice", 100)
    clock.advance(20)
    assert table.sweep() == 1
    assert table.drop_connection(connection) == 1
    assert table.lookup(live.session_id) is None


def test_sweep_removes_expired_sessions(table: SessionTable, clock: Clock) -> None:
    connection = object()
    short = table.create_for_client(connection, ALICE, "alice", 10)
    relay_short = table.create_for_relay(PEER, "bob", 10)
    long = table.create_for_client(connection, ALICE, "alice", 100)
    assert table.sweep() == 0
    clock.advance(10)
    assert table.sweep() == 2
    assert len(table) == 1
    assert table.lookup(short.session_id) is None
    assert table.lookup(relay_short.session_id) is None
    assert table.lookup(long.session_id) is long
    clock.advance(90)
    assert table.sweep() == 1
    assert len(table) == 0
    assert table.drop_connection(connection) == 0


def test_sessions_compare_by_identity() -> None:
    a = Session("x", "alice", 1.0, ALICE)
    b = Session("x", "alice", 1.0, ALICE)
    assert a != b
    assert a == a


def test_generation_changes_only_when_a_session_leaves(table: SessionTable, clock: Clock) -> None:
    connection = object()
    start = table.generation
    kept = table.create_for_client(connection, ALICE, "alice", 60)
    short = table.create_for_relay(MSRPURI.parse("msrps://relay1.example.com/r;tcp"), "bob", 10)
    assert table.lookup(kept.session_id) is kept
    assert table.generation == start  # creating and finding change nothing
    clock.advance(10)
    assert table.lookup(short.session_id) is None  # expired, removed on sight
    after_expiry = table.generation
    assert after_expiry > start
    assert table.drop_connection(object()) == 0
    assert table.generation == after_expiry  # nothing left
    assert table.drop_connection(connection) == 1
    assert table.generation > after_expiry
