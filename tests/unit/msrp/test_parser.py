from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.msrp.message import MSRPRequest, MSRPResponse
from relayd.msrp.parser import (
    BodyChunk,
    MessageEnd,
    MessageRejected,
    MessageStart,
    MSRPLimits,
    MSRPParseError,
    MSRPParser,
    ParseEvent,
)

SEND = (
    b"MSRP a786hjs2 SEND\r\n"
    b"To-Path: msrp://biloxi.example.com:12763/kjhd37s2s20w2a;tcp\r\n"
    b"From-Path: msrp://atlanta.example.com:7654/jshA7weztas;tcp\r\n"
    b"Message-ID: 87652491\r\n"
    b"Byte-Range: 1-25/25\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"Hey Bob, are you there?\r\n"
    b"-------a786hjs2$\r\n"
)
RESPONSE = (
    b"MSRP a786hjs2 200 OK\r\n"
    b"To-Path: msrp://atlanta.example.com:7654/jshA7weztas;tcp\r\n"
    b"From-Path: msrp://biloxi.example.com:12763/kjhd37s2s20w2a;tcp\r\n"
    b"-------a786hjs2$\r\n"
)
AUTH = (
    b"MSRP 49fh AUTH\r\n"
    b"To-Path: msrps://alice@intra.example.com;tcp\r\n"
    b"From-Path: msrps://alice.example.com:9892/98cjs;tcp\r\n"
    b"-------49fh$\r\n"
)


def normalise(events: list[ParseEvent]) -> list[object]:
    """Merge adjacent body chunks: how the body is cut up is not behaviour."""
    out: list[object] = []
    for event in events:
        if isinstance(event, BodyChunk) and out and isinstance(out[-1], bytearray):
            out[-1] += event.data
        elif isinstance(event, BodyChunk):
            out.append(bytearray(event.data))
        elif isinstance(event, MessageStart):
            message = event.message
            if isinstance(message, MSRPRequest):
                out.append(("request", message.tid, message.method, list(message.headers)))
            else:
                out.append(("response", message.tid, message.code, message.comment))
            out.append(("has_body", event.has_body))
        else:
            out.append(event)
    return [bytes(item) if isinstance(item, bytearray) else item for item in out]


def feed_all(
    data: bytes, sizes: int | None = None, parser: MSRPParser | None = None
) -> list[ParseEvent]:
    parser = parser or MSRPParser()
    if sizes is None:
        return parser.feed(data)
    events: list[ParseEvent] = []
    for i in range(0, len(data), sizes):
        events.extend(parser.feed(data[i : i + sizes]))
    return events


def test_send_with_body_parses_to_start_body_end() -> None:
    events = normalise(feed_all(SEND))
    assert events[0][:3] == ("request", "a786hjs2", "SEND")  # type: ignore[index]
    assert events[1] == ("has_body", True)
    assert events[2] == b"Hey Bob, are you there?"
    assert events[3] == MessageEnd("a786hjs2", b"$")


def test_response_without_body() -> None:
    events = feed_all(RESPONSE)
    assert isinstance(events[0], MessageStart)
    response = events[0].message
    assert isinstance(response, MSRPResponse)
    assert (response.code, response.comment) == (200, "OK")
    assert response.headers.get("to-path") == "msrp://atlanta.example.com:7654/jshA7weztas;tcp"
    assert events[1] == MessageEnd("a786hjs2", b"$")


def test_response_status_without_comment() -> None:
    data = RESPONSE.replace(b"200 OK", b"200")
    message = feed_all(data)[0]
    assert isinstance(message, MessageStart)
    assert isinstance(message.message, MSRPResponse)
    assert message.message.comment == ""


@pytest.mark.parametrize("message", [SEND, RESPONSE, AUTH], ids=["send", "response", "auth"])
def test_every_split_offset_gives_the_same_events(message: bytes) -> None:
    stream = message + SEND + RESPONSE
    expected = normalise(feed_all(stream))
    for cut in range(len(stream) + 1):
        parser = MSRPParser()
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert normalise(events) == expected, cut
    for cut1 in range(0, len(message), 7):
        for cut2 in range(cut1, len(stream), 11):
            parser = MSRPParser()
            events = (
                parser.feed(stream[:cut1])
                + parser.feed(stream[cut1:cut2])
                + parser.feed(stream[cut2:])
            )
            assert normalise(events) == expected


def test_binary_body_with_every_byte_value_is_bit_exact() -> None:
    body = (
        bytes(range(256)) * 64 + b"\r\n-------a786hjs2" + b"\r\n-------a786hjs2x\r\n" + b"\r\n-----"
    )
    frame = SEND.replace(b"Hey Bob, are you there?", body)
    for size in (1, 3, 17, 4096, len(frame)):
        events = normalise(feed_all(frame, size))
        assert events[2] == body
        assert events[3] == MessageEnd("a786hjs2", b"$")


@pytest.mark.parametrize("flag", [b"$", b"+", b"#"])
def test_continuation_flags(flag: bytes) -> None:
    events = feed_all(SEND.replace(b"a786hjs2$", b"a786hjs2" + flag))
    assert events[-1] == MessageEnd("a786hjs2", flag)


def test_empty_body_with_and_without_crlf_before_end_line() -> None:
    head = SEND.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    for frame in (head + b"\r\n-------a786hjs2$\r\n", head + b"-------a786hjs2$\r\n"):
        for size in (1, 2, len(frame)):
            events = normalise(feed_all(frame + RESPONSE, size))
            assert events[2] == MessageEnd("a786hjs2", b"$"), (frame, size)
            assert events[3][0] == "response"  # type: ignore[index]


def test_end_line_of_other_transaction_is_body_data() -> None:
    body = b"abc\r\n-------othertid$\r\nxyz"
    events = normalise(feed_all(SEND.replace(b"Hey Bob, are you there?", body), 1))
    assert events[2] == body


def test_keepalive_crlfs_between_messages_are_ignored() -> None:
    events = feed_all(b"\r\n\r\n" + RESPONSE + b"\r\n" + RESPONSE)
    assert sum(isinstance(e, MessageEnd) for e in events) == 2


def test_unknown_method_is_a_request() -> None:
    data = AUTH.replace(b"AUTH", b"NICKNAME")
    start = feed_all(data)[0]
    assert isinstance(start, MessageStart)
    assert isinstance(start.message, MSRPRequest)
    assert start.message.method == "NICKNAME"


@pytest.mark.parametrize(
    "start_line",
    [
        b"HTTP/1.1 200 OK",
        b"MSRP abc SEND",  # transaction id too short
        b"MSRP " + b"a" * 33 + b" SEND",  # too long
        b"MSRP -abc SEND",  # must start alphanumeric
        b"MSRP abcd send",  # methods are upper case
        b"MSRP abcd 20x OK",
        b"MSRP abcd",
        b"MSRP abcd SE ND",
    ],
)
def test_bad_start_line_is_fatal(start_line: bytes) -> None:
    with pytest.raises(MSRPParseError):
        MSRPParser().feed(start_line + b"\r\nTo-Path: x\r\n")


def test_start_line_without_crlf_beyond_limit_is_fatal() -> None:
    parser = MSRPParser(MSRPLimits(max_line_bytes=100))
    parser.feed(b"MSRP abcd SEND" + b"x" * 50)
    with pytest.raises(MSRPParseError):
        parser.feed(b"x" * 100)


def test_bad_header_rejects_message_and_parser_recovers() -> None:
    bad = SEND.replace(b"Message-ID: 87652491\r\n", b"Message-ID 87652491\r\n")
    events = feed_all(bad + RESPONSE, 5)
    assert events[0] == MessageRejected(
        "a786hjs2",
        "SEND",
        "malformed header field",
        "msrp://biloxi.example.com:12763/kjhd37s2s20w2a;tcp",
        "msrp://atlanta.example.com:7654/jshA7weztas;tcp",
    )
    assert not any(isinstance(e, BodyChunk) for e in events)
    assert isinstance(events[1], MessageStart)
    assert isinstance(events[1].message, MSRPResponse)


@pytest.mark.parametrize(
    ("to_name", "from_name"), [(b"to-path", b"from-path"), (b"TO-PATH", b"From-path")]
)
def test_rejected_message_keeps_paths_whatever_their_case(to_name: bytes, from_name: bytes) -> None:
    """Header names are case-insensitive (RFC 4975 §9): the 400 is addressed all the same."""
    bad = (
        SEND.replace(b"To-Path:", to_name + b":")
        .replace(b"From-Path:", from_name + b":")
        .replace(b"Message-ID: 87652491\r\n", b"Message-ID 87652491\r\n")
    )
    stream = bad + RESPONSE
    expected = MessageRejected(
        "a786hjs2",
        "SEND",
        "malformed header field",
        "msrp://biloxi.example.com:12763/kjhd37s2s20w2a;tcp",
        "msrp://atlanta.example.com:7654/jshA7weztas;tcp",
    )
    for cut in range(len(stream) + 1):
        parser = MSRPParser()
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert events[0] == expected, cut
        assert isinstance(events[1], MessageStart), cut
        assert len(events) == 3, cut


def test_paths_must_come_first() -> None:
    bad = AUTH.replace(
        b"To-Path: msrps://alice@intra.example.com;tcp\r\nFrom-Path: msrps://alice.example.com:9892/98cjs;tcp\r\n",
        b"From-Path: msrps://alice.example.com:9892/98cjs;tcp\r\nTo-Path: msrps://alice@intra.example.com;tcp\r\n",
    )
    events = feed_all(bad + AUTH)
    assert isinstance(events[0], MessageRejected)
    assert isinstance(events[1], MessageStart)


def test_header_count_limit() -> None:
    limits = MSRPLimits(max_header_count=4)
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(10))
    bad = SEND.replace(b"Content-Type", extra + b"Content-Type")
    events = feed_all(bad + RESPONSE, None, MSRPParser(limits))
    assert isinstance(events[0], MessageRejected)
    assert events[0].reason == "too many header fields"
    assert isinstance(events[1], MessageStart)


def test_header_bytes_limit() -> None:
    limits = MSRPLimits(max_header_bytes=200)
    bad = SEND.replace(b"Content-Type", b"X-Big: " + b"v" * 150 + b"\r\nContent-Type")
    events = feed_all(bad, 3, MSRPParser(limits))
    assert isinstance(events[0], MessageRejected)
    assert events[0].reason == "header block too large"
    assert len(events) == 1


def test_header_line_without_crlf_beyond_limit_is_rejected_and_skipped() -> None:
    limits = MSRPLimits(max_line_bytes=64)
    parser = MSRPParser(limits)
    events = parser.feed(b"MSRP abcd SEND\r\nTo-Path: " + b"x" * 1000)
    assert events == [MessageRejected("abcd", "SEND", "header line too long", fatal=True)]
    rejected = events[0]
    assert isinstance(rejected, MessageRejected)
    assert rejected.to_path is None
    events = parser.feed(b"y" * 100000 + b"\r\n-------abcd$\r\n" + RESPONSE)
    assert isinstance(events[0], MessageStart)


def test_only_heads_over_a_size_limit_are_fatal() -> None:
    """Past a size limit the end-line may never come: the connection must not wait for it."""
    limits = MSRPLimits(max_line_bytes=256, max_header_bytes=1024)
    paths = (
        b"MSRP abcd SEND\r\nTo-Path: msrps://a.example.com/s;tcp\r\nFrom-Path: msrps://b/c;tcp\r\n"
    )
    for head in (paths + b"X-Big: " + b"v" * 300, paths + (b"X-H: " + b"v" * 200 + b"\r\n") * 6):
        (event,) = MSRPParser(limits).feed(head)
        assert isinstance(event, MessageRejected) and event.fatal, event
        assert event.to_path == "msrps://a.example.com/s;tcp"
    (event, *_) = MSRPParser(limits).feed(paths + b"no colon\r\n\r\nx\r\n-------abcd$\r\n")
    assert isinstance(event, MessageRejected) and not event.fatal


def test_response_with_body_is_rejected() -> None:
    bad = RESPONSE.replace(b"-------", b"\r\nbody\r\n-------")
    events = feed_all(bad + RESPONSE)
    assert isinstance(events[0], MessageRejected)
    assert events[0].method is None
    assert isinstance(events[1], MessageStart)


def test_non_utf8_header_is_rejected() -> None:
    bad = SEND.replace(b"Message-ID: 87652491", b"Message-ID: \xff\xfe")
    events = feed_all(bad)
    assert isinstance(events[0], MessageRejected)


def test_linear_one_mebibyte_in_single_byte_reads_equals_one_read() -> None:
    body = os.urandom(1 << 20).replace(b"-------", b"=======")
    frame = SEND.replace(b"Hey Bob, are you there?", body)
    one = normalise(feed_all(frame))
    parser = MSRPParser()
    events: list[ParseEvent] = []
    view = memoryview(frame)
    for i in range(len(frame)):
        events.extend(parser.feed(bytes(view[i : i + 1])))
    assert normalise(events) == one
    assert one[2] == body


def test_body_is_streamed_not_buffered() -> None:
    parser = MSRPParser()
    head = SEND.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    parser.feed(head)
    events = parser.feed(b"z" * 100000)
    assert sum(len(e.data) for e in events if isinstance(e, BodyChunk)) >= 100000 - 32
    assert parser.in_message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=50))
def test_fuzz_only_parse_errors_escape(data: bytes, size: int) -> None:
    parser = MSRPParser(MSRPLimits(max_line_bytes=128, max_header_count=8, max_header_bytes=512))
    try:
        for i in range(0, len(data), size):
            parser.feed(data[i : i + size])
    except MSRPParseError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([SEND, RESPONSE, AUTH]), min_size=1, max_size=5), st.data())
def test_fuzz_splits_of_valid_streams(messages: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = MSRPParser()
    events: list[ParseEvent] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        events.extend(parser.feed(stream[last:cut]))
        last = cut
    assert normalise(events) == normalise(MSRPParser().feed(stream))
