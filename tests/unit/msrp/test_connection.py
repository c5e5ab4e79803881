"""MSRPConnection: set-up, batching of a read's output, back-pressure, probation
and failure limits, malformed input, remembered routes, fuzzing.

On the in-process relay of relayd.msrp.testing.
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relayd.msrp.message import MSRPRequest
from relayd.msrp.testing import (
    PASSWORDS,
    RELAY_URI,
    Client,
    Harness,
    PeerRelayConnection,
    answer,
    as_request,
    as_response,
    auth_bytes,
    body_end,
    challenge,
    credentials,
    header,
    logged_failures_forbidden,
    nickname,
    parse_frames,
    path_to,
    response_bytes,
    send_bytes,
    send_head,
)
from relayd.testing import make_pki

pytestmark = pytest.mark.usefixtures("no_logged_failures")


# -- AUTH and connection set-up -------------------------------------------------------------


def test_connection_registers_producer_and_disables_nagle(h: Harness) -> None:
    a = h.connect("alice")
    assert a.transport.producer is a.connection
    assert a.transport.streaming is True
    assert a.transport.no_delay is True
    assert a.connection in h.relay.connections
    assert a.connection.peer == "192.0.2.10:40000"


def test_auth_returns_use_path_expires_and_authentication_info(h: Harness) -> None:
    a = h.connect("alice")
    nonce = challenge(a)
    a.feed(auth_bytes(a, "authtid1", credentials("alice", PASSWORDS["alice"], nonce)))
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("authtid1", 200)
    assert header(frame, "To-Path") == a.uri
    assert header(frame, "From-Path") == RELAY_URI
    use_path = header(frame, "Use-Path") or ""
    assert use_path.startswith("msrps://relay.example.com:2855/")
    assert use_path.endswith(";tcp")
    assert header(frame, "Expires") == str(h.config.session_expires_seconds)
    assert "rspauth=" in (header(frame, "Authentication-Info") or "")


def test_frames_caused_by_one_read_leave_in_one_write_per_connection(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    writes: dict[str, list[bytes]] = {"alice": [], "bob": []}
    order: list[str] = []
    for client in (a, b):
        original = client.transport.write

        def write(data: bytes, name: str = client.name, original: Any = original) -> None:
            writes[name].append(data)
            order.append(name)
            original(data)

        client.transport.write = write  # type: ignore[method-assign]
    a.feed(
        send_bytes(a, b, "batch001", b"one", message_id="m1")
        + send_bytes(a, b, "batch002", b"two", message_id="m2")
    )
    # The forwarded frames go out before the sender's own 200s.
    assert order == ["bob", "alice"]
    assert [frame.body for frame in parse_frames(writes["bob"][0])] == [b"one", b"two"]
    assert len(writes["alice"]) == 1
    oks = parse_frames(writes["alice"][0])
    assert [(as_response(f).tid, as_response(f).code) for f in oks] == [
        ("batch001", 200),
        ("batch002", 200),
    ]
    # Outside a read (here: a timer), frames are written at once.
    h.clock.advance(h.config.transaction_timeout_seconds + 1)
    assert [len(writes["alice"]), len(writes["bob"])] == [3, 1]
    reports = a.take()[2:]
    assert [(as_request(f).method, header(f, "Status")) for f in reports] == [
        ("REPORT", "000 408 Request Timeout"),
        ("REPORT", "000 408 Request Timeout"),
    ]


def test_output_held_for_a_read_is_written_before_a_close(h: Harness) -> None:
    a = h.connect("alice")
    # On probation, the third failed request closes the connection: the 400s
    # for all three, written during the same read, must still go out first.
    bad = b"".join(
        f"MSRP bad{n:05d} SEND\r\nTo-Path: {RELAY_URI}\r\nFrom-Path: {a.uri}\r\nX\r\n"
        f"-------bad{n:05d}$\r\n".encode()
        for n in range(h.config.probation_max_failures)
    )
    original = a.transport.write
    written_while_closing: list[bool] = []

    def write(data: bytes) -> None:
        written_while_closing.append(bool(a.transport.disconnecting))
        original(data)

    a.transport.write = write  # type: ignore[method-assign]
    a.feed(bad)
    assert a.closed
    assert written_while_closing == [False]
    assert [as_response(f).code for f in a.take()] == [400] * h.config.probation_max_failures


# -- back-pressure --------------------------------------------------------------------------------


class SlowWire:
    """The socket under a client's transport, for MSRPConnection.room: what the relay
    wrote stays unsent until the test lets the reader take it (``drain``)."""

    dataBuffer = b""
    offset = 0
    streamingProducer = True
    connected = True

    def __init__(self, client: Client) -> None:
        self.client = client
        self.taken = 0
        self.producer = client.connection
        self.producerPaused = False

    @property
    def _tempDataLen(self) -> int:
        return len(self.client.transport.value()) - self.taken

    def fileno(self) -> int:
        raise ValueError("no socket: no kernel queue")

    def startWriting(self) -> None:
        pass

    def drain(self) -> None:
        """The reader took everything: the transport resumes its producer (doWrite)."""
        self.taken = len(self.client.transport.value())
        if self.producerPaused:
            self.producerPaused = False
            self.producer.resumeProducing()


def test_small_send_overtakes_a_backlogged_transfer_at_a_frame_boundary() -> None:
    h = Harness({("msrp", "send_queue_bytes"): "4096"})
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    wire = b.connection._wire = SlowWire(b)
    big = bytes(range(256)) * 80
    a.feed(send_head("big00001", path_to(a, b), a.uri, total=len(big)) + big[:10000])
    a.feed(big[10000:] + body_end("big00001"))
    # Only send_queue_bytes went out; the rest waits in the stream, not on the wire.
    assert len(b.transport.value()) < 4096 + 400
    # The chunk has ended, but most of it waits in its stream: so does alice.
    assert a.transport.producerState == "paused"
    a.feed(send_bytes(a, b, "big00002", b"next message", message_id="next"))
    wire.drain()
    before = len(b.transport.value())
    c.feed(send_bytes(c, b, "small001", b"small message!!", message_id="small"))
    for _ in range(20):
        wire.drain()
    written = b.transport.value()
    assert written.index(b"small message!!") - before < 4096 + 1000
    frames = parse_frames(written)
    bodies: dict[str, bytes] = {}
    for frame in frames:
        message_id = header(frame, "Message-ID") or ""
        start = int((header(frame, "Byte-Range") or "").split("-")[0])
        assert start == len(bodies.get(message_id, b"")) + 1  # each sender's bytes in order
        bodies[message_id] = bodies.get(message_id, b"") + frame.body
    assert bodies == {"msg-1": big, "next": b"next message", "small": b"small message!!"}
    assert [f.flag for f in frames if header(f, "Message-ID") == "small"] == [b"$"]
    assert a.transport.producerState == "producing"


class CountingWire(SlowWire):
    """A SlowWire that counts how often MSRPConnection.room asks for the unsent bytes."""

    asked = 0

    def fileno(self) -> int:
        self.asked += 1
        return super().fileno()


def test_small_sends_ask_for_the_unsent_bytes_only_near_the_send_budget() -> None:
    h = Harness({("msrp", "send_queue_bytes"): "16384"})
    a, b = h.client("alice"), h.client("bob")
    wire = b.connection._wire = CountingWire(b)
    for number in range(40):
        a.feed(send_bytes(a, b, f"small{number:03d}", b"x" * 100, message_id=f"m{number}"))
        wire.drain()
    # Asked first (nothing known yet), then only once the bytes written since the
    # last answer could have filled the budget: a few times in 40 frames of ~330 bytes.
    assert 1 <= wire.asked <= 5
    assert [header(f, "Message-ID") for f in b.take()] == [f"m{n}" for n in range(40)]


def test_small_sends_to_a_reader_that_takes_nothing_stop_at_the_send_budget() -> None:
    h = Harness({("msrp", "send_queue_bytes"): "4096"})
    a, b = h.client("alice"), h.client("bob")
    wire = b.connection._wire = CountingWire(b)
    messages = [send_bytes(a, b, f"held{n:04d}", b"y" * 100, message_id=f"m{n}") for n in range(30)]
    for message in messages:
        a.feed(message)
    # Not a guess from what was written: the real unsent bytes held the rest back.
    assert len(b.transport.value()) < 4096 + 400
    assert a.transport.producerState == "paused"
    for _ in range(30):
        wire.drain()
    assert [header(f, "Message-ID") for f in b.take()] == [f"m{n}" for n in range(30)]
    assert a.transport.producerState == "producing"


class EagerWire(CountingWire):
    """A reader that takes everything as soon as it is written: nothing stays unsent."""

    @property
    def _tempDataLen(self) -> int:
        return 0


def test_a_backlog_the_kernel_takes_at_once_asks_once_per_slice() -> None:
    h = Harness({("msrp", "send_queue_bytes"): "4096"})
    a, b = h.client("alice"), h.client("bob")
    wire = b.connection._wire = EagerWire(b)
    big = bytes(range(256)) * 80
    a.feed(send_bytes(a, b, "eager001", big))
    frames = parse_frames(b.transport.value())
    assert b"".join(f.body for f in frames) == big
    # Slices of at most send_queue_bytes, drained within the same read: each
    # write_out asks once, and the drain it starts sizes its slice by that answer.
    slices = -(-len(big) // 4096)
    assert wire.asked <= slices + 2
    assert a.transport.producerState == "producing"


def test_requests_relayed_are_those_received_less_those_refused(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "count001", b"hello"))
    bogus = "msrps://relay.example.com:2855/nosuchsession;tcp msrps://x.example.com:1/s;tcp"
    a.feed(send_head("count002", bogus, a.uri, total=1) + b"x" + body_end("count002"))
    counts = h.relay.counts
    assert counts.requests == {"AUTH": 4, "SEND": 2}
    assert counts.relayed == {"AUTH": 4, "SEND": 1}
    assert counts.refusals == {481: 1}


def test_congested_recipient_pauses_the_sender(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_head("bp000001", path_to(a, b), a.uri, byte_range="1-*/*"), b"x" * 100)
    assert a.transport.producerState == "producing"
    b.connection.pauseProducing()  # B's socket buffer is full
    assert a.transport.producerState == "paused"
    b.connection.resumeProducing()
    assert a.transport.producerState == "producing"


def test_stream_into_congested_recipient_starts_paused_and_ends_resumed(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    b.connection.pauseProducing()
    a.feed(send_head("bp000002", path_to(a, b), a.uri, byte_range="1-*/*"), b"x" * 10)
    c.feed(send_head("bp000003", path_to(c, b), c.uri, byte_range="1-*/*"), b"y" * 10)
    assert a.transport.producerState == "paused"
    assert c.transport.producerState == "paused"
    # A's message is complete, but waits for B in A's stream: A waits with it.
    a.feed(body_end("bp000002"))
    assert a.transport.producerState == "paused"
    assert c.transport.producerState == "paused"
    b.connection.resumeProducing()
    assert a.transport.producerState == "producing"
    assert c.transport.producerState == "producing"
    c.feed(body_end("bp000003"))
    assert [f.body for f in b.take()] == [b"x" * 10, b"y" * 10]


def test_recipient_lost_while_congested_resumes_sender(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_head("bp000004", path_to(a, b), a.uri, byte_range="1-*/*"), b"x" * 10)
    b.connection.pauseProducing()
    assert a.transport.producerState == "paused"
    b.hang_up()
    assert a.transport.producerState == "producing"


# -- probation and failure limits ------------------------------------------------------------------


def test_probation_closes_connection_without_success(h: Harness) -> None:
    a = h.connect("alice")
    h.clock.advance(h.config.probation_seconds - 1)
    assert not a.closed
    h.clock.advance(1)
    assert a.closed
    assert a.transport.value() == b""
    h.clock.advance(0)
    assert a.connection not in h.relay.connections


def test_challenge_alone_does_not_end_probation(h: Harness) -> None:
    a = h.connect("alice")
    challenge(a)
    h.clock.advance(h.config.probation_seconds)
    assert a.closed


def test_successful_auth_ends_probation(h: Harness) -> None:
    a = h.client("alice")
    h.clock.advance(h.config.probation_seconds * 3)
    assert not a.closed


def test_failed_requests_on_probation_close_early(h: Harness) -> None:
    a = h.connect("alice")
    bogus = "msrps://relay.example.com:2855/nosuchsession;tcp msrps://x.example.com:1/s;tcp"
    for count in range(1, h.config.probation_max_failures + 1):
        tid = f"fail{count:04d}"
        a.feed(send_head(tid, bogus, a.uri, total=1) + b"x" + body_end(tid))
        (frame,) = a.take()
        assert as_response(frame).code == 481
        assert a.closed == (count == h.config.probation_max_failures)


def test_failures_after_success_do_not_close(h: Harness) -> None:
    a = h.client("alice")
    bogus = "msrps://relay.example.com:2855/nosuchsession;tcp msrps://x.example.com:1/s;tcp"
    for count in range(h.config.probation_max_failures * 2):
        tid = f"fail{count:04d}"
        a.feed(send_head(tid, bogus, a.uri, total=1) + b"x" + body_end(tid))
    assert [as_response(f).code for f in a.take()] == [481] * 6
    assert not a.closed


def _wrong_password_auths(client: Client, count: int, nonce: str) -> None:
    for attempt in range(count):
        client.feed(
            auth_bytes(client, f"bad{attempt:05d}", credentials(client.name, "wrong", nonce))
        )


def test_failed_auth_limit_closes_client_connection() -> None:
    h = Harness({("msrp", "probation_max_failures"): "100"})
    a = h.connect("alice")
    nonce = challenge(a)
    limit = h.config.max_failed_auth
    for attempt in range(1, limit + 1):
        _wrong_password_auths(a, 1, nonce)
        (frame,) = a.take()
        assert as_response(frame).code == 401
        assert a.closed == (attempt == limit)


PEER_FROM_PATH = "msrps://peer.example.net:2855/p1;tcp msrps://alice.example.com:7000/a1;tcp"


def connect_peer(h: Harness) -> Client:
    """A peer relay forwarding its client's AUTH (From-Path: the peer, then the client)."""
    peer = h.connect("peer", PeerRelayConnection)
    peer.connection.peer_names = frozenset({"peer.example.net"})
    peer.uri = PEER_FROM_PATH
    return peer


def test_failed_auth_limit_never_closes_peer_relay() -> None:
    h = Harness({("msrp", "probation_max_failures"): "100"})
    peer = connect_peer(h)
    nonce = challenge(peer)
    for attempt in range(h.config.max_failed_auth * 3):
        peer.feed(auth_bytes(peer, f"pbad{attempt:04d}", credentials("alice", "wrong", nonce)))
    assert [as_response(f).code for f in peer.take()] == [401] * 9
    assert not peer.closed


def test_failed_auths_never_close_peer_relay_with_default_limits(h: Harness) -> None:
    peer = connect_peer(h)
    nonce = challenge(peer)
    for attempt in range(5):
        peer.feed(auth_bytes(peer, f"pbad{attempt:04d}", credentials("alice", "wrong", nonce)))
    assert not peer.closed


def test_peer_relay_auth_creates_relay_session(h: Harness) -> None:
    peer = connect_peer(h)
    nonce = challenge(peer)
    peer.feed(auth_bytes(peer, "pgood001", credentials("alice", PASSWORDS["alice"], nonce)))
    (frame,) = peer.take()
    assert as_response(frame).code == 200
    assert header(frame, "To-Path") == PEER_FROM_PATH
    assert not peer.closed


def test_pipelined_failed_auths_stop_at_the_limit() -> None:
    h = Harness({("msrp", "probation_max_failures"): "100"})
    a = h.connect("alice")
    nonce = challenge(a)
    data = b"".join(
        auth_bytes(a, f"pipe{n:04d}", credentials("alice", f"guess{n}", nonce)) for n in range(50)
    )
    a.feed(data)
    assert a.closed
    assert len(a.take()) == h.config.max_failed_auth


def test_expires_out_of_range_is_not_a_failed_auth(h: Harness) -> None:
    """A 423 comes with the right credentials: asking again is no attack."""
    a = h.connect("alice")
    nonce = challenge(a)
    attempts = max(h.config.max_failed_auth, h.config.probation_max_failures) + 2
    for nc in range(1, attempts + 1):
        tid = f"exp{nc:05d}"
        a.feed(auth_bytes(a, tid, credentials("alice", PASSWORDS["alice"], nonce, nc), "1"))
        (frame,) = a.take()
        assert (as_response(frame).tid, as_response(frame).code) == (tid, 423)
        assert header(frame, "Min-Expires") == str(h.config.session_expires_min_seconds)
    assert not a.closed
    a.feed(auth_bytes(a, "exp99999", credentials("alice", PASSWORDS["alice"], nonce, attempts + 1)))
    (frame,) = a.take()
    assert as_response(frame).code == 200


def test_refused_auths_never_close_a_peer_relay(h: Harness) -> None:
    """A user's malformed Expires is refused with 400; the relay carrying it stays."""
    peer = connect_peer(h)
    nonce = challenge(peer)
    attempts = max(h.config.max_failed_auth, h.config.probation_max_failures) * 2
    for nc in range(1, attempts + 1):
        credential = credentials("alice", PASSWORDS["alice"], nonce, nc)
        peer.feed(auth_bytes(peer, f"pexp{nc:04d}", credential, "soon"))
    assert [as_response(f).code for f in peer.take()] == [400] * attempts
    assert not peer.closed


def test_refused_requests_never_close_a_peer_relay(h: Harness) -> None:
    peer = connect_peer(h)
    bogus = "msrps://relay.example.com:2855/nosuchsession;tcp msrps://x.example.com:1/s;tcp"
    count = h.config.probation_max_failures * 2
    for n in range(count):
        tid = f"pgone{n:03d}"
        peer.feed(send_head(tid, bogus, PEER_FROM_PATH, total=1) + b"x" + body_end(tid))
    assert [as_response(f).code for f in peer.take()] == [481] * count
    assert not peer.closed


def test_refused_auths_still_count_on_a_client_on_probation(h: Harness) -> None:
    a = h.connect("alice")
    nonce = challenge(a)
    for nc in range(1, h.config.probation_max_failures + 1):
        credential = credentials("alice", PASSWORDS["alice"], nonce, nc)
        a.feed(auth_bytes(a, f"cexp{nc:04d}", credential, "soon"))
        assert a.closed == (nc == h.config.probation_max_failures)
    assert [as_response(f).code for f in a.take()] == [400] * h.config.probation_max_failures


def test_peer_relay_certificate_ends_probation(h: Harness, tmp_path: Any) -> None:
    cert_path, _ = make_pki(tmp_path).leaf("peer.example.net")
    with open(cert_path, "rb") as handle:
        certificate = x509.load_pem_x509_certificate(handle.read())
    peer = h.connect("peer")
    peer.transport.peer_certificate = certificate
    peer.connection.handshakeCompleted()
    assert "peer.example.net" in peer.connection.peer_names
    h.clock.advance(h.config.probation_seconds * 3)
    assert not peer.closed
    # A client without a certificate is still on probation.
    client = h.connect("alice")
    client.connection.handshakeCompleted()
    h.clock.advance(h.config.probation_seconds)
    assert client.closed


# -- not for us, malformed input ----------------------------------------------------------------


def test_send_not_addressed_to_us_closes_without_answer(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    tid = "foreign1"
    to_path = f"msrps://elsewhere.example.org:2855/x;tcp {b.uri}"
    a.feed(send_head(tid, to_path, a.uri, total=3) + b"abc" + body_end(tid))
    assert a.closed
    assert a.transport.value() == b""
    assert b.transport.value() == b""


def test_send_to_our_host_on_another_port_closes(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    to_path = f"{a.use_path.replace(':2855/', ':2856/')} {b.use_path} {b.uri}"
    a.feed(send_head("foreign2", to_path, a.uri, total=3) + b"abc" + body_end("foreign2"))
    assert a.closed
    assert a.transport.value() == b""


def test_auth_not_addressed_to_us_closes_without_answer(h: Harness) -> None:
    a = h.connect("alice")
    a.feed(
        b"MSRP foreign3 AUTH\r\nTo-Path: msrps://elsewhere.example.org;tcp\r\n"
        + f"From-Path: {a.uri}\r\n-------foreign3$\r\n".encode()
    )
    assert a.closed
    assert a.transport.value() == b""


def test_malformed_header_gets_400_and_connection_stays_usable(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    bad = (
        f"MSRP bad00001 SEND\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Message-ID: m1\r\nthis line has no colon\r\nContent-Type: text/plain\r\n\r\n"
        "body\r\n-------bad00001$\r\n"
    ).encode()
    a.feed(bad)
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("bad00001", 400)
    assert header(frame, "To-Path") == a.uri
    assert header(frame, "From-Path") == a.use_path
    assert b.transport.value() == b""
    assert not a.closed
    a.feed(send_bytes(a, b, "good0001", b"after the bad one"))
    (forwarded,) = b.take()
    assert forwarded.body == b"after the bad one"
    assert [as_response(f).code for f in a.take()] == [200]


@pytest.mark.parametrize("huge", ["X-Big: " + "v" * 70000, "X-H: v\r\n" * 5000])
def test_oversized_header_block_gets_400_then_close(h: Harness, huge: str) -> None:
    """Skipping it to an end-line that may never come would read without bound."""
    a, b = h.client("alice"), h.client("bob")
    a.feed(f"MSRP huge0001 SEND\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n".encode())
    for offset in range(0, len(huge), 16384):
        a.feed(huge[offset : offset + 16384].encode())
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("huge0001", 400)
    assert header(frame, "To-Path") == a.uri
    assert a.closed
    assert b.transport.value() == b""


def test_oversized_first_header_line_closes_without_answer(h: Harness) -> None:
    a = h.client("alice")
    a.feed(b"MSRP huge0002 SEND\r\nTo-Path: " + b"x" * 70000)
    assert a.take() == []
    assert a.closed


def test_malformed_message_with_lower_case_paths_gets_400(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP low00001 SEND\r\nto-path: {path_to(a, b)}\r\nfrom-path: {a.uri}\r\n"
        "Message-ID: m1\r\nno colon here\r\n\r\nbody\r\n-------low00001$\r\n".encode()
    )
    (frame,) = a.take()
    assert (as_response(frame).tid, as_response(frame).code) == ("low00001", 400)
    assert header(frame, "To-Path") == a.uri
    assert header(frame, "From-Path") == a.use_path
    assert b.transport.value() == b""


@pytest.mark.parametrize("method", ["SEND", "NICKNAME"])
def test_400_never_echoes_a_bare_line_feed(h: Harness, method: str) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP lf000001 {method}\r\nTo-Path: {path_to(a, b)}\r\n"
        f"From-Path: {a.uri}\nX-Injected: 1\r\nMessage-ID: m1\r\n"
        "Byte-Range: 1-1/1\r\nContent-Type: text/plain\r\n\r\nx\r\n-------lf000001$\r\n".encode()
    )
    written = a.transport.value()
    assert b"\nX-Injected" not in written
    parse_frames(written)


def test_missing_message_id_is_400(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP nomid001 SEND\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Byte-Range: 1-1/1\r\nContent-Type: text/plain\r\n\r\nx\r\n-------nomid001$\r\n".encode()
    )
    (frame,) = a.take()
    assert as_response(frame).code == 400
    assert b.transport.value() == b""


def test_bad_byte_range_is_400(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "badbr001", b"abc", byte_range="5-2/9"))
    (frame,) = a.take()
    assert as_response(frame).code == 400
    assert b.transport.value() == b""


@pytest.mark.parametrize(
    "garbage",
    [b"HELLO WORLD\r\n", b"MSRP x SEND\r\n", b"MSRP abcd send\r\n", b"\r\n" * 40],
)
def test_garbage_start_line_aborts_connection(h: Harness, garbage: bytes) -> None:
    a = h.client("alice")
    a.feed(garbage)
    assert a.transport.disconnected
    assert a.transport.value() == b""
    h.clock.advance(0)
    assert a.connection not in h.relay.connections


def test_closed_connections_sessions_are_invalidated(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    old_use_path = a.use_path
    a.hang_up()
    b.feed(send_bytes(b, a, "dead0001", b"anyone there?"))
    (frame,) = b.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("dead0001", 481)
    assert header(frame, "To-Path") == b.uri
    assert header(frame, "From-Path") == b.use_path
    # The same URI is no good from a new connection of the same user either.
    a2 = h.client("alice")
    a2.feed(
        send_head("dead0002", f"{old_use_path} {b.use_path} {b.uri}", a2.uri, total=1)
        + b"x"
        + body_end("dead0002")
    )
    assert as_response(a2.take()[0]).code == 481
    assert b.transport.value() == b""


def test_expired_sessions_are_refused(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    h.clock.advance(h.config.session_expires_seconds)
    a.feed(send_bytes(a, b, "expd0001", b"too late"))
    (frame,) = a.take()
    assert as_response(frame).code == 481
    assert b.transport.value() == b""


def test_a_remembered_route_ends_when_its_session_expires(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_bytes(a, b, "live0001", b"in time"))
    (frame,) = b.take()
    answer(b, frame)
    assert [as_response(f).code for f in a.take()] == [200]
    # Nothing has left the session table: only the clock ends the route.
    h.clock.advance(h.config.session_expires_seconds)
    a.feed(send_bytes(a, b, "live0002", b"too late"))
    assert [as_response(f).code for f in a.take()] == [481]
    assert b.transport.value() == b""


def test_a_remembered_route_ends_when_its_target_session_goes(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    a.feed(send_bytes(a, b, "gone0001", b"first"))
    (frame,) = b.take()
    answer(b, frame)
    c.hang_up()  # another session leaves: the route is checked again, and holds
    a.feed(send_bytes(a, b, "gone0002", b"second"))
    (frame,) = b.take()
    assert frame.body == b"second"
    answer(b, frame)
    assert [as_response(f).code for f in a.take()] == [200, 200]
    b.hang_up()
    a.feed(send_bytes(a, b, "gone0003", b"third"))
    assert [as_response(f).code for f in a.take()] == [481]


def test_nothing_is_answered_after_a_foreign_request_in_the_same_read(h: Harness) -> None:
    a = h.client("alice")
    foreign = "msrps://elsewhere.example.org:2855/x;tcp msrps://bob.example.com:7000/b;tcp"
    a.feed(
        send_head("foreign4", foreign, a.uri, total=3)
        + b"abc"
        + body_end("foreign4")
        + auth_bytes(a, "after001")
    )
    assert a.closed
    assert a.transport.value() == b""


# -- fuzzing ---------------------------------------------------------------------------------------


def assert_relay_still_works(h: Harness) -> None:
    """A well-formed A -> B SEND on fresh connections of the same relay goes through."""
    a, b = h.client("alice"), h.client("bob")
    body = b"still working\r\n-------not-an-end-line$\r\n"
    a.feed(send_bytes(a, b, "check001", body, message_id="m-check"))
    (frame,) = b.take()
    assert frame.body == body
    assert header(frame, "Message-ID") == "m-check"
    assert [as_response(f).code for f in a.take()] == [200]


def feed_in_reads(client: Client, data: bytes, read_size: int) -> None:
    for start in range(0, len(data), read_size):
        if client.transport.lost:
            break
        client.feed(data[start : start + read_size])


def settle(h: Harness, *clients: Client) -> None:
    """Deliver pending closes, end every connection, fire every timer."""
    h.clock.advance(0)
    for client in clients:
        client.hang_up()
    h.clock.advance(h.config.transaction_timeout_seconds + 1)


_FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_FUZZ
@given(st.binary(max_size=2000), st.integers(1, 64))
@example(b"MSRP abcd SEND\r\nTo-Path: msrps://relay.example.com:2855;tcp\r\n", 7)
@example(b"MSRP abcd 200 OK\r\nTo-Path: x\r\nFrom-Path: y\r\n-------abcd$\r\n", 3)
def test_fuzz_arbitrary_bytes_never_break_the_relay(data: bytes, read_size: int) -> None:
    with logged_failures_forbidden():
        h = Harness()
        x = h.client("dave")
        feed_in_reads(x, data, read_size)
        parse_frames(x.transport.value())
        settle(h, x)
        assert_relay_still_works(h)


def _mutate(base: bytes, operations: list[tuple[int, int, int]]) -> bytes:
    data = bytearray(base)
    for kind, position, value in operations:
        if not data:
            break
        at = position % len(data)
        if kind == 0:  # flip one byte
            data[at] ^= value or 1
        elif kind == 1:  # truncate
            del data[at:]
        elif kind == 2:  # duplicate the line containing ``at``
            start = data.rfind(b"\r\n", 0, at) + 2 if data.rfind(b"\r\n", 0, at) >= 0 else 0
            end = data.find(b"\r\n", at)
            if end >= 0:
                data[end + 2 : end + 2] = data[start : end + 2]
        elif kind == 3:  # delete a few bytes
            del data[at : at + value % 16 + 1]
        else:  # insert a byte that matters to MSRP framing
            data[at:at] = b"\r\n-: $+#%"[value % 10 : value % 10 + 1]
    return bytes(data)


_operations = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 10_000), st.integers(0, 255)), max_size=6
)


@_FUZZ
@given(
    operations=_operations,
    read_size=st.integers(1, 64),
    kind=st.sampled_from(["send", "send-partial", "nickname", "report", "auth"]),
    body=st.binary(max_size=300),
    then_valid=st.booleans(),
)
def test_fuzz_mutated_requests_never_break_the_relay(
    operations: list[tuple[int, int, int]],
    read_size: int,
    kind: str,
    body: bytes,
    then_valid: bool,
) -> None:
    with logged_failures_forbidden():
        h = Harness({("msrp", "max_chunk_bytes"): "1024"})
        x, b = h.client("dave"), h.client("bob")
        if kind.startswith("send"):
            mode = "partial" if kind == "send-partial" else None
            base = send_bytes(x, b, "fuzz0001", body, failure_report=mode)
        elif kind == "nickname":
            base = nickname(x, b, "fuzz0001")
        elif kind == "report":
            base = (
                f"MSRP fuzz0001 REPORT\r\nTo-Path: {path_to(x, b)}\r\nFrom-Path: {x.uri}\r\n"
                "Message-ID: m1\r\nByte-Range: 1-5/5\r\nStatus: 000 200 OK\r\n"
                "-------fuzz0001$\r\n"
            ).encode()
        else:
            base = auth_bytes(x, "fuzz0001", credentials("dave", PASSWORDS["dave"], "bogus"))
        data = _mutate(base, operations)
        if then_valid:
            data += send_bytes(x, b, "fuzz0002", b"valid follow-up")
        feed_in_reads(x, data, read_size)
        # B answers whatever reached it, correctly or not.
        for frame in parse_frames(b.transport.value(), complete=False):
            if isinstance(frame.message, MSRPRequest) and frame.message.method == "SEND":
                answer(b, frame, 200)
        parse_frames(x.transport.value())
        settle(h, x)
        parse_frames(b.transport.value())
        settle(h, b)
        assert_relay_still_works(h)


@_FUZZ
@given(operations=_operations, read_size=st.integers(1, 64), code=st.integers(100, 999))
def test_fuzz_mutated_responses_never_break_the_relay(
    operations: list[tuple[int, int, int]], read_size: int, code: int
) -> None:
    with logged_failures_forbidden():
        h = Harness()
        a, y = h.client("alice"), h.client("dave")
        a.feed(send_bytes(a, y, "resp0001", b"hello"), nickname(a, y, "resp0002"))
        a.clear()
        frames = y.take()
        responses = b""
        for frame in frames:
            request = as_request(frame)
            from_path = header(frame, "From-Path") or ""
            to_path = from_path if request.method != "SEND" else from_path.split()[0]
            responses += response_bytes(request.tid, code, "Whatever", to_path, y.uri)
        feed_in_reads(y, _mutate(responses, operations), read_size)
        parse_frames(a.transport.value())
        parse_frames(y.transport.value())
        settle(h, a, y)
        assert_relay_still_works(h)
