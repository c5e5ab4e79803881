"""SEND streams and whole requests on their way to the next hop: rewriting,
streaming, cutting and re-chunking (RFC 4976 §6.4), REPORT and unknown methods.

On the in-process relay of relayd.msrp.testing.
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509

from relayd.msrp.testing import (
    FAR_HOP,
    RELAY_URI,
    Harness,
    answer,
    as_request,
    as_response,
    body_end,
    header,
    hold_next_hop,
    nickname,
    parse_frames,
    path_to,
    response_bytes,
    send_bytes,
    send_head,
)
from relayd.msrp.uri import MSRPURI
from relayd.testing import make_pki

pytestmark = pytest.mark.usefixtures("no_logged_failures")


# -- A -> B through one relay ---------------------------------------------------------------


def test_send_between_clients_is_rewritten_streamed_and_answered(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    body = bytes(range(256)) * 8
    head = send_head(
        "atid0001",
        path_to(a, b),
        a.uri,
        total=len(body),
        extra=(("Success-Report", "no"), ("X-Custom", "kept; as is")),
        content_type="application/octet-stream",
    )
    a.feed(head + body + body_end("atid0001"))

    (frame,) = b.take()
    forwarded = as_request(frame)
    assert forwarded.method == "SEND"
    assert forwarded.tid != "atid0001"
    assert list(forwarded.headers) == [
        ("To-Path", b.uri),
        ("From-Path", f"{b.use_path} {a.use_path} {a.uri}"),
        ("Message-ID", "msg-1"),
        ("Byte-Range", f"1-{len(body)}/{len(body)}"),
        ("Success-Report", "no"),
        ("X-Custom", "kept; as is"),
        ("Content-Type", "application/octet-stream"),
    ]
    assert frame.body == body
    assert frame.flag == b"$"

    (ok,) = a.take()
    response = as_response(ok)
    assert (response.tid, response.code, response.comment) == ("atid0001", 200, "OK")
    assert list(response.headers) == [("To-Path", a.uri), ("From-Path", a.use_path)]

    # B's own 200 is hop-by-hop: the relay absorbs it.
    answer(b, frame)
    assert a.transport.value() == b""
    assert b.transport.value() == b""
    assert not b.connection.transactions


def test_send_without_byte_range_gets_one_after_the_paths(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    data = (
        f"MSRP nobr0001 SEND\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Message-ID: m-nobr\r\nContent-Type: text/plain\r\n\r\nhello\r\n-------nobr0001$\r\n"
    ).encode()
    a.feed(data)
    (frame,) = b.take()
    names = [name for name, _ in frame.message.headers]
    assert names == ["To-Path", "From-Path", "Byte-Range", "Message-ID", "Content-Type"]
    assert header(frame, "Byte-Range") == "1-5/*"
    assert frame.body == b"hello"


def test_send_without_body_is_forwarded_with_its_byte_range(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    data = (
        f"MSRP empty001 SEND\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Message-ID: m-empty\r\nByte-Range: 1-0/0\r\n-------empty001$\r\n"
    ).encode()
    a.feed(data)
    (frame,) = b.take()
    assert header(frame, "Byte-Range") == "1-0/0"
    assert frame.body == b""
    assert frame.flag == b"$"
    (ok,) = a.take()
    assert as_response(ok).code == 200


def test_send_with_continuation_flag_keeps_flag_and_offset(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    body = b"second part"
    head = send_head("cont0001", path_to(a, b), a.uri, byte_range="101-*/*")
    a.feed(head + body + body_end("cont0001", b"+"))
    (frame,) = b.take()
    assert header(frame, "Byte-Range") == f"101-{100 + len(body)}/*"
    assert frame.flag == b"+"
    assert frame.body == body


# -- streaming, cutting and chunk size ---------------------------------------------------------


def test_body_streams_through_before_the_end_line(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    pieces = [bytes([ord("a") + i]) * 100 for i in range(5)]
    a.feed(send_head("strm0001", path_to(a, b), a.uri, byte_range="1-*/500"))
    forwarded = b""
    for index, piece in enumerate(pieces):
        a.feed(piece)
        forwarded += b.transport.value()
        b.clear()
        if index == 0:
            assert forwarded == b"", "the header block waits for the first byte to forward"
        else:
            # Everything but the latest piece is already on its way.
            assert forwarded.endswith(pieces[index - 1])
            assert b"".join(pieces[:index]) in forwarded
    assert b"-------" not in forwarded
    a.feed(body_end("strm0001"))
    (frame,) = parse_frames(forwarded + b.transport.value())
    assert frame.body == b"".join(pieces)
    assert header(frame, "Byte-Range") == "1-*/500"


def test_small_message_cuts_a_large_one_in_progress(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    big = [bytes([ord("A") + i]) * 1000 for i in range(6)]
    a.feed(send_head("big00001", path_to(a, b), a.uri, byte_range="1-6000/6000", message_id="big"))
    for piece in big[:3]:
        a.feed(piece)
    c.feed(send_bytes(c, b, "small001", b"hi bob", message_id="small"))
    for piece in big[3:]:
        a.feed(piece)
    a.feed(body_end("big00001"))

    frames = b.take()
    assert [header(f, "Message-ID") for f in frames] == ["big", "small", "big"]
    first, small, rest = frames
    assert first.flag == b"+"
    assert header(first, "Byte-Range") == "1-*/6000"
    assert small.body == b"hi bob"
    assert small.flag == b"$"
    assert header(small, "Byte-Range") == "1-6/6"
    assert header(small, "From-Path") == f"{b.use_path} {c.use_path} {c.uri}"
    assert rest.flag == b"$"
    assert header(rest, "Byte-Range") == f"{len(first.body) + 1}-*/6000"
    assert first.body + rest.body == b"".join(big)
    tids = {as_request(f).tid for f in frames}
    assert len(tids) == 3
    # Every frame a separate transaction: the message's sender gets one 200 per chunk.
    assert [as_response(f).code for f in a.take()] == [200]
    assert [as_response(f).code for f in c.take()] == [200]


def test_error_on_a_cut_frame_reports_that_frames_range(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    a.feed(send_head("big00002", path_to(a, b), a.uri, byte_range="1-*/*", message_id="big"))
    a.feed(b"1" * 100, b"2" * 100)
    c.feed(send_bytes(c, b, "small002", b"x"))
    first, _small = b.take()
    answer(b, first, 413, "Stop Sending Message")
    (report,) = a.take()
    assert header(report, "Byte-Range") == f"1-{len(first.body)}/*"
    assert header(report, "Status") == "000 413 Stop Sending Message"
    # The rest of the message is no longer forwarded.
    a.feed(b"3" * 100, body_end("big00002"))
    assert b.transport.value() == b""


def test_response_to_a_client_cuts_a_frame_streaming_towards_it(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    c.feed(send_head("tob00001", path_to(c, b), c.uri, byte_range="1-*/*", message_id="c"))
    c.feed(b"1" * 100, b"2" * 100)
    # B sends a message of its own: the relay's 200 to B must not land inside C's frame.
    b.feed(send_bytes(b, a, "froma001", b"hello alice"))
    c.feed(b"3" * 100, body_end("tob00001"))
    frames = b.take()
    assert [(type(f.message).__name__, f.flag) for f in frames] == [
        ("MSRPRequest", b"+"),
        ("MSRPResponse", b"$"),
        ("MSRPRequest", b"$"),
    ]
    assert as_response(frames[1]).tid == "froma001"
    assert frames[0].body + frames[2].body == b"1" * 100 + b"2" * 100 + b"3" * 100
    assert header(frames[2], "Byte-Range") == f"{len(frames[0].body) + 1}-*/*"
    (to_alice,) = a.take()
    assert to_alice.body == b"hello alice"


@pytest.mark.parametrize("split", [False, True])
def test_max_chunk_bytes_splits_large_bodies(split: bool) -> None:
    h = Harness({("msrp", "max_chunk_bytes"): "1024"})
    a, b = h.client("alice"), h.client("bob")
    body = bytes(i % 251 for i in range(5000))
    head = send_head("huge0001", path_to(a, b), a.uri, total=5000)
    if split:
        a.feed(head, *(body[i : i + 700] for i in range(0, 5000, 700)), body_end("huge0001"))
    else:
        a.feed(head + body + body_end("huge0001"))
    frames = b.take()
    assert all(len(f.body) <= 1024 for f in frames)
    assert b"".join(f.body for f in frames) == body
    assert [f.flag for f in frames] == [b"+"] * (len(frames) - 1) + [b"$"]
    offset = 1
    for frame in frames:
        start, _, rest = (header(frame, "Byte-Range") or "").partition("-")
        end, _, total = rest.partition("/")
        assert int(start) == offset
        assert total == "5000"
        assert end in ("*", str(offset + len(frame.body) - 1))
        offset += len(frame.body)
    assert offset == 5001
    assert len({as_request(f).tid for f in frames}) == len(frames)
    if not split:
        assert [len(f.body) for f in frames] == [1024, 1024, 1024, 1024, 904]
        assert header(frames[-1], "Byte-Range") == "4097-5000/5000"


def test_max_chunk_error_report_byte_range() -> None:
    h = Harness({("msrp", "max_chunk_bytes"): "1024"})
    a, b = h.client("alice"), h.client("bob")
    body = b"z" * 5000
    a.feed(send_bytes(a, b, "huge0002", body, message_id="m-huge"))
    a.clear()
    frames = b.take()
    answer(b, frames[0], 200)
    answer(b, frames[1], 413, "Stop Sending Message")
    (report,) = a.take()
    assert header(report, "Byte-Range") == "1025-2048/5000"
    assert header(report, "Message-ID") == "m-huge"
    for frame in frames[2:]:
        answer(b, frame, 500, "Later errors")
    assert a.transport.value() == b"", "a message is reported once"


def test_sender_gone_mid_chunk_ends_forwarded_frame_with_hash(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(send_head("gone0001", path_to(a, b), a.uri, byte_range="1-*/*"), b"a" * 50, b"b" * 50)
    a.hang_up()
    (frame,) = b.take()
    assert frame.flag == b"#"
    assert frame.body == b"a" * 50 + b"b" * 50


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ("", 8192),
        ("peer.example.net=65536", 65536),
        ("peer.example.net:2855=65536 other.example.net=32768", 8192),
        ("peer.example.net=4194304", 1048576),  # never above max_chunk_bytes
    ],
)
def test_chunk_limit_towards_a_peer_relay(tmp_path: Any, overrides: str, expected: int) -> None:
    """Kamailio drops the connection above ~10 KiB of body; relayd peers take anything."""
    h = Harness({("msrp", "peer_chunk_overrides"): overrides})
    cert_path, _ = make_pki(tmp_path).leaf("peer.example.net")
    with open(cert_path, "rb") as handle:
        certificate = x509.load_pem_x509_certificate(handle.read())
    peer = h.connect("peer")
    assert peer.connection.chunk_bytes == h.config.max_chunk_bytes  # a client, so far
    peer.transport.peer_certificate = certificate
    peer.connection.handshakeCompleted()
    assert peer.connection.chunk_bytes == expected
    # A relayd peer says so on the AUTHs it forwards, and is answered in kind.
    peer.feed(
        f"MSRP pauth001 AUTH\r\nTo-Path: {RELAY_URI}\r\n"
        "From-Path: msrps://peer.example.net:2855/p;tcp msrps://a.example.net:9/a;tcp\r\n"
        "Relay-Chunk-Limit: none\r\n-------pauth001$\r\n".encode()
    )
    (challenge,) = peer.take()
    assert as_response(challenge).code == 401
    assert header(challenge, "Relay-Chunk-Limit") == "none"
    assert peer.connection.chunk_bytes == h.config.max_chunk_bytes


def test_forwarded_auth_tells_the_next_hop_we_are_relayd(h: Harness) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    peer = h.connect("far")
    peer.connection.chunk_bytes = 8192
    a.feed(
        f"MSRP fwdc0001 AUTH\r\nTo-Path: {a.use_path} {FAR_HOP}\r\nFrom-Path: {a.uri}\r\n"
        "Relay-Chunk-Limit: none\r\n-------fwdc0001$\r\n".encode()
    )
    waiting[-1].callback(peer.connection)
    (forwarded,) = peer.take()
    assert forwarded.message.headers.to_bytes().count(b"Relay-Chunk-Limit: none\r\n") == 1
    ours = (header(forwarded, "From-Path") or "").split()[0]
    reply = response_bytes(
        as_request(forwarded).tid, 401, "Unauthorized", f"{ours} {a.uri}", FAR_HOP
    )
    peer.feed(reply.replace(b"\r\n---", b"\r\nRelay-Chunk-Limit: none\r\n---"))
    (answer,) = a.take()
    assert as_response(answer).code == 401
    assert header(answer, "Relay-Chunk-Limit") is None  # hop by hop: not for the client
    assert peer.connection.chunk_bytes == h.config.max_chunk_bytes


def test_send_towards_a_peer_relay_is_cut_at_its_chunk_limit(h: Harness) -> None:
    waiting = hold_next_hop(h)
    a = h.client("alice")
    peer = h.connect("far")
    peer.connection.chunk_bytes = h.relay.peer_chunk_bytes(frozenset({"far.example.net"}), 9)
    data = bytes(range(256)) * 80
    tid = "peer0001"
    a.feed(send_head(tid, f"{a.use_path} {FAR_HOP}", a.uri, total=len(data)) + data[:5000])
    waiting[-1].callback(peer.connection)
    a.feed(data[5000:] + body_end(tid))
    frames = peer.take()
    assert [len(f.body) for f in frames] == [8192, 8192, 4096]
    assert [header(f, "Byte-Range") for f in frames] == [
        "1-*/20480",
        "8193-*/20480",
        "16385-20480/20480",
    ]
    assert b"".join(f.body for f in frames) == data


def test_oversized_non_send_request_is_413() -> None:
    h = Harness({("msrp", "max_request_body_bytes"): "10"})
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP big00003 NICKNAME\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Content-Type: text/plain\r\n\r\n".encode(),
        b"x" * 11,
        b"\r\n-------big00003$\r\n",
    )
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("big00003", 413)
    assert header(frame, "To-Path") == a.uri
    assert b.transport.value() == b""


def test_sending_through_someone_elses_session_is_403(h: Harness) -> None:
    a, b, c = h.client("alice"), h.client("bob"), h.client("carol")
    # C uses A's session as its first hop: only A may do that.
    c.feed(
        send_head("steal001", f"{a.use_path} {b.use_path} {b.uri}", c.uri, total=1)
        + b"x"
        + body_end("steal001")
    )
    (frame,) = c.take()
    assert as_response(frame).code == 403
    assert b.transport.value() == b""


@pytest.mark.parametrize(
    ("tls", "next_hop"),
    [
        # The audit's case: a made-up port on the owning relay's host, plain TCP.
        (True, "msrp://peer.example.net:25;tcp"),
        (True, "msrps://peer.example.net:25/p1;tcp"),
        # On the plain listener not even the owning relay itself is reachable.
        (False, "msrps://peer.example.net:2855/p1;tcp"),
        (False, "msrp://peer.example.net:25;tcp"),
    ],
)
def test_stranger_cannot_reach_beyond_a_relay_session(h: Harness, tls: bool, next_hop: str) -> None:
    owner = MSRPURI.parse("msrps://peer.example.net:2855/p1;tcp")
    session = h.core.sessions.create_for_relay(owner, "alice", 600)
    stranger = h.connect("stranger", tls=tls)
    to_path = f"{h.core.session_uri(session)} {next_hop}"
    stranger.feed(
        send_head("open0001", to_path, stranger.uri, total=3) + b"abc" + body_end("open0001")
    )
    stranger.feed(
        f"MSRP open0002 NICKNAME\r\nTo-Path: {to_path}\r\nFrom-Path: {stranger.uri}\r\n"
        "-------open0002$\r\n".encode()
    )
    codes = [(as_response(f).tid, as_response(f).code) for f in stranger.take()]
    assert codes == [("open0001", 403), ("open0002", 403)]
    # Refused before any next hop was looked for: nothing connects anywhere.
    assert h.clock.tcpClients == []
    assert h.clock.sslClients == []
    assert not h.relay._outbound.keys()


# -- REPORT and other methods ---------------------------------------------------------------------


def test_report_to_unknown_session_is_not_answered(h: Harness) -> None:
    a = h.client("alice")
    bogus = "msrps://relay.example.com:2855/nosuchsession;tcp msrps://x.example.com:1/s;tcp"
    a.feed(
        f"MSRP rep00001 REPORT\r\nTo-Path: {bogus}\r\nFrom-Path: {a.uri}\r\n"
        "Message-ID: m1\r\nByte-Range: 1-1/1\r\nStatus: 000 200 OK\r\n-------rep00001$\r\n".encode()
    )
    assert a.transport.value() == b""
    assert not a.closed


def test_malformed_report_is_not_answered(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP rep00002 REPORT\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "no colon here\r\n-------rep00002$\r\n".encode()
    )
    assert a.transport.value() == b""
    assert b.transport.value() == b""


def test_report_is_forwarded_and_never_answered(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(
        f"MSRP rep00003 REPORT\r\nTo-Path: {path_to(a, b)}\r\nFrom-Path: {a.uri}\r\n"
        "Message-ID: m1\r\nByte-Range: 1-5/5\r\nStatus: 000 200 OK\r\n-------rep00003$\r\n".encode()
    )
    (frame,) = b.take()
    report = as_request(frame)
    assert report.method == "REPORT"
    assert report.tid != "rep00003"
    assert header(frame, "To-Path") == b.uri
    assert header(frame, "From-Path") == f"{b.use_path} {a.use_path} {a.uri}"
    assert header(frame, "Status") == "000 200 OK"
    assert not b.connection.transactions
    h.clock.advance(h.config.transaction_timeout_seconds * 2)
    assert a.transport.value() == b""


def _forwarded_head(h: Harness, request: bytes) -> bytes:
    """What the relay writes to B for ``request`` from A, tid blanked, and A's answer codes."""
    a, b = h.client("alice"), h.client("bob")
    a.feed(request.replace(b"{PATH}", path_to(a, b).encode()).replace(b"{FROM}", a.uri.encode()))
    data: bytes = b.transport.value()
    (frame,) = parse_frames(data)
    tid = as_request(frame).tid.encode()
    return (
        data.replace(tid, b"TID")
        .replace(b.use_path.encode(), b"B")
        .replace(a.use_path.encode(), b"A")
    )


_CANONICAL_SEND = (
    b"MSRP fwd00001 SEND\r\nTo-Path: {PATH}\r\nFrom-Path: {FROM}\r\nMessage-ID: m1\r\n"
    b"Success-Report: yes\r\nByte-Range: 1-5/5\r\nX-Colon: a: b\r\nContent-Type: text/plain\r\n"
    b"\r\nhello\r\n-------fwd00001$\r\n"
)


_CANONICAL_REPORT = (
    b"MSRP fwd00002 REPORT\r\nTo-Path: {PATH}\r\nFrom-Path: {FROM}\r\nMessage-ID: m1\r\n"
    b"Byte-Range: 1-5/5\r\nStatus: 000 200 OK\r\n-------fwd00002$\r\n"
)


@pytest.mark.parametrize(
    ("canonical", "variant"),
    [
        (_CANONICAL_SEND, _CANONICAL_SEND.replace(b"Message-ID: m1", b"Message-ID:m1")),
        (
            _CANONICAL_SEND,
            _CANONICAL_SEND.replace(b"Success-Report: yes", b"Success-Report:\tyes "),
        ),
        (_CANONICAL_SEND, _CANONICAL_SEND.replace(b"To-Path: ", b"to-path:  ")),
        (_CANONICAL_REPORT, _CANONICAL_REPORT.replace(b"Status: 000", b"Status:  000")),
        (_CANONICAL_REPORT, _CANONICAL_REPORT.replace(b"From-Path: ", b"From-Path:")),
    ],
)
def test_forwarded_bytes_do_not_depend_on_how_the_headers_were_spaced(
    canonical: bytes, variant: bytes
) -> None:
    # The canonical request is forwarded from its own bytes, the variant from
    # parsed pairs: the relay must write the same frame either way.
    assert _forwarded_head(Harness(), canonical) == _forwarded_head(Harness(), variant)


def test_forwarded_send_keeps_header_order_around_the_new_byte_range(h: Harness) -> None:
    head = _forwarded_head(h, _CANONICAL_SEND)
    assert head == (
        b"MSRP TID SEND\r\nTo-Path: msrps://bob.example.com:7000/bobs1;tcp\r\n"
        b"From-Path: B A msrps://alice.example.com:7000/alices1;tcp\r\nMessage-ID: m1\r\n"
        b"Success-Report: yes\r\nByte-Range: 1-5/5\r\nX-Colon: a: b\r\n"
        b"Content-Type: text/plain\r\n\r\nhello\r\n-------TID$\r\n"
    )


def test_unknown_method_is_forwarded_and_response_routed_back(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(nickname(a, b, "nick0001"))
    (frame,) = b.take()
    request = as_request(frame)
    assert request.method == "NICKNAME"
    assert request.tid != "nick0001"
    assert list(request.headers) == [
        ("To-Path", b.uri),
        ("From-Path", f"{b.use_path} {a.use_path} {a.uri}"),
        ("Use-Nickname", '"Al"'),
    ]
    assert a.transport.value() == b""
    # Non-SEND responses travel end to end, along the whole From-Path.
    b.feed(
        response_bytes(
            request.tid, 425, "Nickname usage failed", header(frame, "From-Path") or "", b.uri
        )
    )
    (back,) = a.take()
    response = as_response(back)
    assert (response.tid, response.code, response.comment) == (
        "nick0001",
        425,
        "Nickname usage failed",
    )
    h.clock.advance(h.config.transaction_timeout_seconds * 2)
    assert a.transport.value() == b""


def test_unknown_method_response_reaches_sender_with_its_own_uri(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(nickname(a, b, "nick0002"))
    (frame,) = b.take()
    b.feed(
        response_bytes(as_request(frame).tid, 200, "OK", header(frame, "From-Path") or "", b.uri)
    )
    (back,) = a.take()
    assert header(back, "To-Path") == a.uri
    assert header(back, "From-Path") == f"{a.use_path} {b.use_path} {b.uri}"


def test_unknown_method_without_response_times_out_408(h: Harness) -> None:
    a, b = h.client("alice"), h.client("bob")
    a.feed(nickname(a, b, "nick0003"))
    b.take()
    h.clock.advance(h.config.transaction_timeout_seconds)
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("nick0003", 408)
    assert header(frame, "To-Path") == a.uri


def test_blocked_unknown_method_is_501() -> None:
    h = Harness({("msrp", "block_unknown_methods"): "yes"})
    a, b = h.client("alice"), h.client("bob")
    a.feed(nickname(a, b, "nick0004"))
    (frame,) = a.take()
    response = as_response(frame)
    assert (response.tid, response.code) == ("nick0004", 501)
    assert header(frame, "To-Path") == a.uri
    assert b.transport.value() == b""
