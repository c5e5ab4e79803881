"""Responses awaited from the next hop: Failure-Report, the transaction timer and
what the sender is told when a next hop fails (RFC 4975 §7.1.2, §10).

On the in-process relay of relayd.msrp.testing.
"""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.exceptions import DNSMismatch
from service_identity.hazmat import DNS_ID
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.testing import EventLoggingObserver
from twisted.python.failure import Failure

from relayd.msrp.connection import MSRPConnection
from relayd.msrp.testing import (
    FAR_HOP,
    Client,
    FakeTransport,
    Harness,
    answer,
    as_request,
    as_response,
    body_end,
    header,
    hold_next_hop,
    refuse_connection,
    response_bytes,
    send_bytes,
    send_head,
)
from relayd.testing import captured_log

pytestmark = pytest.mark.usefixtures("no_logged_failures")


# -- Failure-Report ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["partial", "no"])
def test_no_success_response_unless_failure_report_yes(h: Harness, mode: str) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "frep0001", b"payload", failure_report=mode))
    (frame,) = b.take()
    assert header(frame, "Failure-Report") == mode
    assert a.transport.value() == b""


@pytest.mark.parametrize("mode", ["yes", "partial"])
def test_error_response_from_next_hop_becomes_report(h: Harness, mode: str) -> None:
    a, b = h.client("alice"), h.client("bob")
    body = b"x" * 300
    a.feed(send_bytes(a, b, "err00001", body, failure_report=mode, message_id="m-415"))
    a.clear()
    (frame,) = b.take()
    answer(b, frame, 415, "Unsupported Media Type")

    (report_frame,) = a.take()
    report = as_request(report_frame)
    assert report.method == "REPORT"
    assert report.tid != "err00001"
    assert header(report_frame, "To-Path") == a.uri
    assert header(report_frame, "From-Path") == a.use_path
    assert header(report_frame, "Message-ID") == "m-415"
    assert header(report_frame, "Byte-Range") == "1-300/300"
    assert header(report_frame, "Status") == "000 415 Unsupported Media Type"
    # A REPORT is never answered, so the relay waits for nothing.
    h.clock.advance(h.config.transaction_timeout_seconds)
    assert a.transport.value() == b""


def test_report_to_path_is_senders_whole_from_path(h: Harness) -> None:
    """A sender behind another relay: the REPORT retraces the whole From-Path."""
    a, b = h.client("alice"), h.client("bob")
    from_path = f"{a.uri} msrps://origin.example.org:9/o1;tcp"
    head = send_head("far00001", f"{a.use_path} {b.use_path} {b.uri}", from_path, total=3)
    a.feed(head + b"abc" + body_end("far00001"))
    (ok,) = a.take()
    assert header(ok, "To-Path") == a.uri  # a response goes one hop back only
    (frame,) = b.take()
    answer(b, frame, 403, "Forbidden")
    (report,) = a.take()
    assert header(report, "To-Path") == from_path
    assert header(report, "Status") == "000 403 Forbidden"


def test_failure_report_no_ignores_errors_and_timeouts(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "nofr0001", b"abc", failure_report="no"))
    (frame,) = b.take()
    answer(b, frame, 415, "Unsupported Media Type")
    h.clock.advance(h.config.transaction_timeout_seconds + 1)
    assert a.transport.value() == b""
    assert not b.connection.transactions


def test_bad_failure_report_value_is_400(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "badfr001", b"abc", failure_report="sometimes"))
    (frame,) = a.take()
    assert as_response(frame).code == 400
    assert header(frame, "To-Path") == a.uri
    assert b.transport.value() == b""


# -- transaction timer ------------------------------------------------------------------------


def test_no_response_from_next_hop_gives_408_report(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "tout0001", b"hello", message_id="m-408"))
    a.clear()
    b.take()
    h.clock.advance(h.config.transaction_timeout_seconds - 1)
    assert a.transport.value() == b""
    h.clock.advance(1)
    (report_frame,) = a.take()
    assert as_request(report_frame).method == "REPORT"
    assert header(report_frame, "Status") == "000 408 Request Timeout"
    assert header(report_frame, "Message-ID") == "m-408"
    assert header(report_frame, "Byte-Range") == "1-5/5"
    assert header(report_frame, "To-Path") == a.uri
    assert header(report_frame, "From-Path") == a.use_path


def test_response_before_timeout_cancels_the_timer(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "tout0002", b"hello"))
    a.clear()
    (frame,) = b.take()
    h.clock.advance(h.config.transaction_timeout_seconds - 1)
    answer(b, frame)
    h.clock.advance(h.config.transaction_timeout_seconds * 2)
    assert a.transport.value() == b""
    assert not b.connection.transactions


@pytest.mark.parametrize(
    "to_path",
    [
        "msrps://elsewhere.example.org:2855/x;tcp",
        "msrps://relay.example.com:2856/x;tcp",
        "not a uri",
    ],
)
def test_response_not_addressed_to_us_is_dropped(h: Harness, to_path: str) -> None:
    """§6.4.3: a matching transaction id is not enough; the To-Path must be ours."""
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "addr0001", b"hello", message_id="m-addr"))
    a.clear()
    (frame,) = b.take()
    tid = as_request(frame).tid
    b.feed(response_bytes(tid, 415, "Unsupported Media Type", to_path, b.uri))
    assert a.transport.value() == b""
    assert tid in b.connection.transactions
    # The next hop's real answer still settles the frame.
    answer(b, frame, 415, "Unsupported Media Type")
    (report,) = a.take()
    assert header(report, "Status") == "000 415 Unsupported Media Type"
    assert not b.connection.transactions


def test_response_to_our_uri_spelled_differently_is_accepted(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "addr0002", b"hello", message_id="m-case"))
    a.clear()
    (frame,) = b.take()
    ours = (header(frame, "From-Path") or "").split()[0]
    respelled = ours.replace("msrps://relay.example.com:", "MSRPS://Relay.Example.COM:")
    assert respelled != ours
    b.feed(response_bytes(as_request(frame).tid, 403, "Forbidden", respelled, b.uri))
    (report,) = a.take()
    assert header(report, "Status") == "000 403 Forbidden"
    assert not b.connection.transactions


def test_partial_failure_report_times_out_silently(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "tout0003", b"hello", failure_report="partial"))
    b.take()
    assert len(b.connection.transactions) == 1
    h.clock.advance(h.config.transaction_timeout_seconds)
    assert a.transport.value() == b""
    assert not b.connection.transactions


def test_next_hop_lost_gives_481_report(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "lost0001", b"hello", message_id="m-lost"))
    a.clear()
    b.hang_up()
    (report,) = a.take()
    assert header(report, "Status") == "000 481 next hop connection lost"
    assert header(report, "Byte-Range") == "1-5/5"


def test_unreachable_next_hop_after_the_chunk_reports_all_of_it(h: Harness) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    tid = "unre0001"
    head = send_head(tid, f"{a.use_path} {FAR_HOP}", a.uri, total=13, message_id="m-unr")
    a.feed(head + b"anyone there?" + body_end(tid))
    # The whole chunk is here: answered at once (§6.4.1), before the connect fails.
    (ok,) = a.take()
    assert (as_response(ok).tid, as_response(ok).code) == (tid, 200)
    refuse_connection(waiting)
    (report,) = a.take()
    assert as_request(report).method == "REPORT"
    assert header(report, "Status") == "000 481 next hop unreachable"
    assert header(report, "Message-ID") == "m-unr"
    assert header(report, "Byte-Range") == "1-13/13"


def test_peer_answer_with_short_to_path_goes_back_to_the_sender(h: Harness) -> None:
    """Kamailio answers an AUTH forwarded to it with To-Path naming only us (§6.4.3)."""
    waiting = hold_next_hop(h)
    a = h.client("alice")
    peer = h.connect("far")
    auth = (
        f"MSRP fwda0001 AUTH\r\nTo-Path: {a.use_path} {FAR_HOP}\r\nFrom-Path: {a.uri}\r\n"
        "-------fwda0001$\r\n"
    ).encode()
    with captured_log() as observer:
        for number in (1, 2):
            a.feed(auth.replace(b"fwda0001", b"fwda000%d" % number))
            waiting[-1].callback(peer.connection)
            (forwarded,) = peer.take()
            ours = (header(forwarded, "From-Path") or "").split()[0]
            challenge = response_bytes(
                as_request(forwarded).tid, 401, "Unauthorized", ours, FAR_HOP
            )
            peer.feed(challenge)
            (frame,) = a.take()
            response = as_response(frame)
            assert (response.tid, response.code) == (f"fwda000{number}", 401)
            assert header(frame, "To-Path") == a.uri
            assert header(frame, "From-Path") == f"{ours} {FAR_HOP}"
            assert not peer.connection.transactions
    warnings = [e for e in observer if "not the request's path back" in e.get("log_format", "")]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    ("byte_range", "reported"),
    [("1-13/13", "1-13/13"), ("1-*/13", "1-5/13"), ("1-*/*", "1-5/*"), ("9-21/30", "9-21/30")],
)
def test_unreachable_next_hop_before_the_end_line_answers_the_chunk_with_481(
    h: Harness, byte_range: str, reported: str
) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    tid = "unre0002"
    a.feed(send_head(tid, f"{a.use_path} {FAR_HOP}", a.uri, byte_range=byte_range) + b"anyon")
    refuse_connection(waiting)
    (report,) = a.take()
    assert header(report, "Status") == "000 481 next hop unreachable"
    # The inbound chunk's range: its known end, else the bytes received.
    assert header(report, "Byte-Range") == reported
    a.feed(b"e there?" + body_end(tid))
    # One response for the chunk's transaction, and it is the failure.
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == (tid, 481)
    assert header(frame, "To-Path") == a.uri
    assert header(frame, "From-Path") == a.use_path
    h.clock.advance(h.config.transaction_timeout_seconds + 1)
    assert a.transport.value() == b""


@pytest.mark.parametrize(("mode", "answered"), [("partial", True), ("no", False)])
def test_failure_before_the_end_line_with_other_failure_report_modes(
    h: Harness, mode: str, answered: bool
) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    tid = "unre0003"
    path = f"{a.use_path} {FAR_HOP}"
    a.feed(send_head(tid, path, a.uri, total=13, failure_report=mode) + b"anyon")
    refuse_connection(waiting)
    a.feed(b"e there?" + body_end(tid))
    frames = a.take()
    if answered:
        # "partial": errors only, as a REPORT and as the transaction's response.
        report, frame = frames
        assert header(report, "Byte-Range") == "1-13/13"
        assert (as_response(frame).tid, as_response(frame).code) == (tid, 481)
    else:
        assert frames == []


# Each way a next hop can fail, as the sender's REPORT and the relay's log say it
# (RFC 4975 §10 codes; the cause in the log line only).
_UNTRUSTED = SSL.Error([("SSL routines", "", "certificate verify failed")])


_WRONG_NAME = VerificationError(errors=[DNSMismatch(DNS_ID("far.example.net"))])


def report_logged(events: EventLoggingObserver) -> str:
    (event,) = [e for e in events if e.get("log_format", "").startswith("REPORT ")]
    return str(event["log_format"].format(**event))


def _open_next_hop(h: Harness, waiting: list[defer.Deferred[MSRPConnection]]) -> Client:
    """The outbound TLS connection the relay asked for, handed to it (handshake pending)."""
    connection = MSRPConnection(h.relay, inbound=False, tls=True)
    transport = FakeTransport(h.clock, IPv4Address("TCP", "198.51.100.9", 9))
    transport.protocol = connection
    connection.makeConnection(transport)
    waiting.pop().callback(connection)
    return Client("far", connection, transport, FAR_HOP)


@pytest.mark.parametrize(
    ("reason", "opened", "status", "cause"),
    [
        # The connect fails...
        (ConnectionRefusedError("far"), False, "481 next hop unreachable", "refused"),
        (ConnectTimeoutError(), False, "408 next hop did not answer", "User timeout"),
        # ...or the connection opened, the SEND went out, and then it ends.
        (_UNTRUSTED, True, "403 next hop failed TLS verification", "certificate verify failed"),
        (_WRONG_NAME, True, "403 next hop failed TLS verification", "does not name the host"),
        (ConnectionLost(), True, "481 next hop connection lost", "Connection to the other side"),
    ],
)
def test_each_way_a_next_hop_fails_has_its_own_report(
    h: Harness, reason: Exception, opened: bool, status: str, cause: str
) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    tid = "fail0001"
    head = send_head(tid, f"{a.use_path} {FAR_HOP}", a.uri, total=5, message_id="m-f")
    a.feed(head + b"hello" + body_end(tid))
    a.take()
    with captured_log() as events:
        if opened:
            far = _open_next_hop(h, waiting)
            assert as_request(far.take()[0]).method == "SEND"
            far.connection.connectionLost(Failure(reason))
        else:
            waiting[0].errback(Failure(reason))
    (report,) = a.take()
    assert header(report, "Status") == f"000 {status}"
    assert header(report, "Byte-Range") == "1-5/5"
    logged = report_logged(events)
    assert logged.startswith(f"REPORT {status} sent for message m-f: ")
    assert cause in logged


def test_a_request_forwarded_whole_is_answered_403_when_tls_fails(h: Harness) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    a.feed(
        f"MSRP nick0009 NICKNAME\r\nTo-Path: {a.use_path} {FAR_HOP}\r\n"
        f"From-Path: {a.uri}\r\n-------nick0009$\r\n".encode()
    )
    far = _open_next_hop(h, waiting)
    far.take()
    far.connection.connectionLost(Failure(_UNTRUSTED))
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("nick0009", 403)
    assert response.comment == "next hop failed TLS verification"


def test_a_request_forwarded_whole_is_answered_408_when_the_connect_times_out(
    h: Harness,
) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    a.feed(
        f"MSRP nick0010 NICKNAME\r\nTo-Path: {a.use_path} {FAR_HOP}\r\n"
        f"From-Path: {a.uri}\r\n-------nick0010$\r\n".encode()
    )
    waiting[0].errback(Failure(ConnectTimeoutError()))
    (frame,) = a.take()
    assert (as_response(frame).tid, as_response(frame).code) == ("nick0010", 408)
