"""The parser's one-step path for canonical input must equal its general path exactly.

``MSRPParser._parse_head`` handles a whole canonical head (and a short body)
in one regular expression; everything else goes through the line-by-line
path.  Every test here parses the same bytes twice, once with the one-step
path switched off, and compares every event, rejection and fatal error.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.msrp.message import MSRPRequest
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

TO = b"msrps://relay.example.com:2855/s1;tcp msrps://bob.example.com:7000/b;tcp"
FROM = b"msrps://alice.example.com:7000/a;tcp"


class GeneralOnly(MSRPParser):
    """The same parser without its one-step path."""

    __slots__ = ()

    def _parse_head(self, events: list[ParseEvent]) -> bool:
        return False


def outcome(parser: MSRPParser, data: bytes, size: int) -> list[object]:
    """Every event, with bodies merged and messages as comparable tuples; errors too."""
    out: list[object] = []
    try:
        for start in range(0, len(data), size):
            for event in parser.feed(data[start : start + size]):
                if isinstance(event, BodyChunk):
                    if out and isinstance(out[-1], bytearray):
                        out[-1] += event.data
                    else:
                        out.append(bytearray(event.data))
                elif isinstance(event, MessageStart):
                    message = event.message
                    headers = list(message.headers)
                    if isinstance(message, MSRPRequest):
                        out.append(("request", message.tid, message.method, headers))
                    else:
                        out.append(
                            ("response", message.tid, message.code, message.comment, headers)
                        )
                    out.append(("has_body", event.has_body))
                else:
                    out.append(event)
    except MSRPParseError as e:
        out.append(("fatal", e.reason))
    out.append(("in_message", parser.in_message))
    return [bytes(item) if isinstance(item, bytearray) else item for item in out]


def assert_same(data: bytes, limits: MSRPLimits | None = None, sizes: tuple[int, ...] = ()) -> None:
    limits = limits or MSRPLimits()
    for size in (len(data) or 1, *sizes):
        fast = outcome(MSRPParser(limits), data, size)
        general = outcome(GeneralOnly(limits), data, size)
        assert fast == general, (size, data)


def send(head_lines: list[bytes], body: bytes | None = b"hello", tid: bytes = b"tid00001") -> bytes:
    head = b"MSRP " + tid + b" SEND\r\n" + b"".join(line + b"\r\n" for line in head_lines)
    if body is None:
        return head + b"-------" + tid + b"$\r\n"
    return head + b"\r\n" + body + b"\r\n-------" + tid + b"$\r\n"


PATHS = [b"To-Path: " + TO, b"From-Path: " + FROM]
REST = [b"Message-ID: m1", b"Byte-Range: 1-5/5", b"Content-Type: text/plain"]


def fast_path_used(data: bytes) -> bool:
    """Did the one-step path keep the first message's header bytes?"""
    events = MSRPParser().feed(data)
    return isinstance(events[0], MessageStart) and events[0].message.headers.block is not None


def test_canonical_send_takes_the_one_step_path_with_the_same_events() -> None:
    data = send(PATHS + REST)
    assert fast_path_used(data)
    assert_same(data, sizes=(1, 7, 64))


CASES = {
    "lower-case path names": send([b"to-path: " + TO, b"FROM-PATH: " + FROM, *REST]),
    "paths in the wrong order": send([PATHS[1], PATHS[0], *REST]),
    "path after another header": send([REST[0], *PATHS, *REST[1:]]),
    "no space after colon": send([*PATHS, b"Message-ID:m1", *REST[1:]]),
    "two spaces after colon": send([*PATHS, b"Message-ID:  m1", *REST[1:]]),
    "tab after colon": send([*PATHS, b"Message-ID:\tm1", *REST[1:]]),
    "trailing space": send([*PATHS, b"Message-ID: m1 ", *REST[1:]]),
    "trailing tab in a path": send([b"To-Path: " + TO + b"\t", PATHS[1], *REST]),
    "empty value": send([*PATHS, b"X-Empty: ", *REST]),
    "empty value without space": send([*PATHS, b"X-Empty:", *REST]),
    "space before colon": send([*PATHS, b"Message-ID : m1", *REST[1:]]),
    "folded continuation line": send([*PATHS, b"Message-ID: m1", b" folded", *REST[1:]]),
    "repeated To-Path": send([*PATHS, b"To-Path: " + TO, *REST]),
    "no From-Path": send([PATHS[0], *REST]),
    "only paths": send(PATHS),
    "no headers": send([]),
    "utf-8 value": send([*PATHS, "X-Name: Zoë".encode(), *REST]),
    "latin-1 value": send([*PATHS, "X-Name: Zoë".encode("latin-1"), *REST]),
    "bare LF in value": send([*PATHS, b"X-Odd: a\nb", *REST]),
    "header named like our end-line": send([*PATHS, b"-------tid00001$: x", *REST]),
    "hyphens in a value": send([*PATHS, b"X-Line: -------", *REST]),
    "end-line right after the paths": send(PATHS, body=None),
    "bad flag on the end-line": send(PATHS, body=None).replace(b"$\r\n", b"!\r\n"),
    "end-line of another transaction": send(PATHS, body=None, tid=b"tid00001").replace(
        b"-------tid00001", b"-------tid00002"
    ),
    "empty body": send([*PATHS, *REST], body=b""),
    "body is a bare end-line": send([*PATHS, *REST], body=None).replace(
        b"text/plain\r\n", b"text/plain\r\n\r\n"
    ),
    "body starting with hyphens": send([*PATHS, *REST], body=b"-- not the end"),
    "body containing the boundary with a bad flag": send(
        [*PATHS, *REST], body=b"x\r\n-------tid00001?\r\ny"
    ),
    "body longer than the inline search": send([*PATHS, *REST], body=b"z" * 40000),
    "continuation flag": send([*PATHS, *REST]).replace(b"$\r\n", b"+\r\n"),
    "response": b"MSRP tid00001 200 OK\r\n"
    + PATHS[0]
    + b"\r\n"
    + PATHS[1]
    + b"\r\n-------tid00001$\r\n",
    "response without comment": b"MSRP tid00001 200\r\n"
    + PATHS[0]
    + b"\r\n"
    + PATHS[1]
    + b"\r\n-------tid00001$\r\n",
    "response with non-utf-8 comment": b"MSRP tid00001 200 \xff\r\n"
    + PATHS[0]
    + b"\r\n"
    + PATHS[1]
    + b"\r\n-------tid00001$\r\n",
    "response with a body": b"MSRP tid00001 200 OK\r\n"
    + PATHS[0]
    + b"\r\n"
    + PATHS[1]
    + b"\r\n\r\nbody\r\n-------tid00001$\r\n",
    "leading CRLFs": b"\r\n\r\n" + send(PATHS + REST),
    "lower-case method": send(PATHS + REST).replace(b" SEND\r\n", b" send\r\n"),
    "two messages": send(PATHS + REST) + send(PATHS, tid=b"tid00002"),
}


@pytest.mark.parametrize("data", CASES.values(), ids=CASES.keys())
def test_odd_input_gives_the_same_events_either_way(data: bytes) -> None:
    assert_same(data, sizes=(1, 2, 5, 13, 100))


def test_non_canonical_headers_are_normalised_not_kept() -> None:
    events = MSRPParser().feed(send([*PATHS, b"Message-ID:  m1 ", *REST[1:]]))
    assert isinstance(events[0], MessageStart)
    headers = events[0].message.headers
    assert headers.block is None
    assert headers.get("Message-ID") == "m1"


@pytest.mark.parametrize(
    "limits",
    [
        MSRPLimits(max_header_count=4),
        MSRPLimits(max_header_count=5),
        MSRPLimits(max_line_bytes=120, max_header_bytes=4096),
        MSRPLimits(max_line_bytes=8192, max_header_bytes=150),
    ],
)
def test_limits_apply_the_same_either_way(limits: MSRPLimits) -> None:
    assert_same(send(PATHS + REST), limits, sizes=(1, 9))
    assert_same(send(PATHS + REST + [b"X-Long: " + b"v" * 200]), limits, sizes=(3,))


_NAMES = st.sampled_from(
    [b"To-Path", b"to-path", b"From-Path", b"FROM-path", b"Message-ID", b"Byte-Range", b"X-A"]
)
_VALUES = st.sampled_from([TO, FROM, b"m1", b"1-5/5", b"", b"a: b", "é".encode(), b"\xff"])
_SEPARATORS = st.sampled_from([b": ", b": ", b": ", b":", b":  ", b":\t", b" : "])
_TRAILERS = st.sampled_from([b"", b"", b"", b" ", b"\t"])


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    lines = [PATHS[0], PATHS[1]] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 5))):
        lines.append(draw(_NAMES) + draw(_SEPARATORS) + draw(_VALUES) + draw(_TRAILERS))
    tid = draw(st.sampled_from([b"tid00001", b"abcd", b"x" * 32]))
    kind = draw(st.sampled_from(["send", "bodyless", "response"]))
    if kind == "response":
        head = b"MSRP " + tid + b" 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines)
        return head + b"-------" + tid + b"$\r\n"
    body = draw(st.binary(max_size=40)) if kind == "send" else None
    return send(lines, body=body, tid=tid)


@settings(max_examples=400, deadline=None)
@given(st.lists(messages(), min_size=1, max_size=3), st.integers(min_value=1, max_value=60))
def test_fuzz_generated_messages_give_the_same_events_either_way(
    stream: list[bytes], size: int
) -> None:
    data = b"".join(stream)
    assert_same(data, sizes=(size,))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_fuzz_bytes_spliced_into_a_canonical_send_give_the_same_events(
    noise: bytes, at: int
) -> None:
    data = send(PATHS + REST)
    at = min(at, len(data))
    assert_same(data[:at] + noise + data[at:], sizes=(11,))


def test_rejections_carry_the_same_details() -> None:
    data = send([*PATHS, b"Bad Header: x", *REST])
    fast = MSRPParser().feed(data)
    assert isinstance(fast[0], MessageRejected)
    assert fast[0].to_path == TO.decode()
    assert fast == GeneralOnly().feed(data)


@pytest.mark.parametrize("parser_class", [MSRPParser, GeneralOnly])
def test_an_idle_parser_keeps_neither_input_nor_message(parser_class: type[MSRPParser]) -> None:
    # Thousands of idle connections each hold a parser: after a whole
    # message it must not pin the last read or the last message's headers.
    parser = parser_class()
    parser.feed(send(PATHS + REST))
    assert (parser._buf, parser._message, parser.in_message) == (b"", None, False)
    parser.feed(send(PATHS + REST, tid=b"tid00002")[:-3])
    assert parser.in_message
    assert parser.feed(b"$\r\n")[-1] == MessageEnd("tid00002", b"$")
    assert (parser._buf, parser._message) == (b"", None)
