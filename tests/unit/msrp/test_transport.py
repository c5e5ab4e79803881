"""MSRPRelay: idle sweep, connection limit and shutdown (RFC 4976 §6.5).

On the in-process relay of relayd.msrp.testing.
"""

from __future__ import annotations

import pytest

from relayd.msrp.testing import (
    Harness,
    as_request,
    as_response,
    challenge,
    send_bytes,
)

pytestmark = pytest.mark.usefixtures("no_logged_failures")


# -- idle sweep and connection limit -------------------------------------------------------------


def test_idle_connections_are_swept(h: Harness) -> None:
    h.relay.start()
    a, b = h.client("alice"), h.client("bob")
    h.clock.advance(h.config.idle_timeout_seconds / 2)
    b.feed(send_bytes(b, a, "keep0001", b"still here"))
    h.clock.advance(h.config.idle_timeout_seconds / 2 + 31)
    assert a.closed
    assert not b.closed
    h.clock.advance(h.config.idle_timeout_seconds)
    assert b.closed
    h.relay.stop()


def test_keepalive_on_one_connection_does_not_spare_idle_ones(h: Harness) -> None:
    h.relay.start()
    a = h.client("alice")
    b = h.client("bob")
    h.clock.advance(h.config.idle_timeout_seconds - 100)
    a.feed(b"\r\n")  # a keep-alive between messages
    h.clock.advance(131)
    assert not a.closed
    assert b.closed
    h.relay.stop()


def test_a_connection_that_only_receives_is_not_idle() -> None:
    # §6.5: forwarded data going out is use too, not only data coming in.
    h = Harness({("msrp", "idle_timeout_seconds"): "600"})
    h.relay.start()
    a, b = h.client("alice"), h.client("bob")
    h.clock.advance(400)
    b.feed(send_bytes(b, a, "only0001", b"for alice"))
    (frame,) = a.take()
    assert frame.body == b"for alice"
    assert a.connection.last_activity == 400
    h.clock.advance(400)  # alice has not sent anything for 800 s
    assert not a.closed
    h.clock.advance(600)
    assert a.closed and b.closed
    h.relay.stop()


def test_a_write_outside_any_read_is_use_too() -> None:
    # The 408 REPORT of a transaction timeout is written from a timer, not from a read.
    h = Harness({("msrp", "idle_timeout_seconds"): "600"})
    h.relay.start()
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "tout0001", b"never answered", failure_report="yes"))
    b.take()
    assert [as_response(f).code for f in a.take()] == [200]
    h.clock.advance(h.config.transaction_timeout_seconds)
    (report,) = a.take()
    assert as_request(report).method == "REPORT"
    assert a.connection.last_activity == h.config.transaction_timeout_seconds
    h.relay.stop()


def test_a_connection_that_only_receives_is_not_evicted_first() -> None:
    h = Harness({("msrp", "max_connections"): "2"})
    a = h.client("alice")
    b = h.client("bob")
    h.clock.advance(1)
    b.feed(send_bytes(b, a, "only0002", b"for alice"))  # alice only receives
    c = h.connect("carol")
    assert b.closed
    assert not a.closed
    assert not c.closed


def test_connection_limit_closes_least_recently_used() -> None:
    h = Harness({("msrp", "max_connections"): "2"})
    a = h.client("alice")
    b = h.client("bob")
    h.clock.advance(1)
    # A is used again, so B is now the least recently used.
    challenge(a)
    c = h.connect("carol")
    assert b.closed
    assert not a.closed
    assert not c.closed
    assert len(h.relay.connections) == 2


def test_relay_stop_closes_everything(h: Harness) -> None:
    h.relay.start()
    a, b = h.client("alice"), h.client("bob")
    h.relay.stop()
    assert a.closed and b.closed
    h.clock.advance(0)
    assert not h.relay.connections
    assert len(h.core.sessions) == 0
