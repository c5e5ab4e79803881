"""relayd.msrp.message: Headers kept as the parser's bytes behave like Headers built
from pairs, and frames built from ready-made bytes equal frames built from pairs.

The byte slicing used to forward a request (``path_lines``, ``forwarded_lines``)
gives exactly what building the copy from the pairs would, or says it cannot; the
one-piece frame builders (``send_frame``, ``request_frame``) write what
``MSRPRequest.to_bytes`` writes.
"""

from __future__ import annotations

import pytest

from relayd.msrp.message import (
    ByteRange,
    Headers,
    MSRPRequest,
    forwarded_lines,
    path_lines,
    report_status_code,
    request_frame,
    send_frame,
    send_head,
)

PAIRS = [
    ("To-Path", "msrps://relay.example.com:2855/s1;tcp msrps://bob.example.com:7000/b;tcp"),
    ("From-Path", "msrps://alice.example.com:7000/a;tcp"),
    ("Message-ID", "m1"),
    ("Byte-Range", "1-5/5"),
    ("X-Colon", "a: b"),
    ("X-Empty", ""),
    ("X-Name", "Zoë"),
    ("Content-Type", "text/plain"),
]


def block_of(pairs: list[tuple[str, str]]) -> bytes:
    return "".join(f"{name}: {value}\r\n" for name, value in pairs).encode()


def both(pairs: list[tuple[str, str]]) -> tuple[Headers, Headers]:
    return Headers(pairs), Headers.from_block(block_of(pairs))


def test_block_headers_read_like_pair_headers() -> None:
    pairs, block = both(PAIRS)
    assert list(block) == PAIRS
    assert len(block) == len(pairs) == len(PAIRS)
    assert block == pairs
    assert block.to_bytes() == pairs.to_bytes() == block_of(PAIRS)
    for name in ("to-path", "FROM-PATH", "Message-ID", "x-colon", "X-Empty", "x-name", "Nope"):
        assert block.get(name) == pairs.get(name), name
        assert (name in block) == (name in pairs), name
    assert block.get("Nope", "default") == "default"
    assert 3 not in block


def test_lookup_finds_whole_names_at_line_starts_only() -> None:
    headers = Headers.from_block(block_of([*PAIRS[:2], ("X-Ref", "Message-ID: fake"), ("Id", "1")]))
    assert headers.get("Message-ID") is None
    assert headers.get("ID") == "1"
    assert headers.get("X-Re") is None


def test_first_occurrence_wins() -> None:
    pairs, block = both([*PAIRS[:2], ("Message-ID", "first"), ("message-id", "second")])
    assert block.get("Message-ID") == pairs.get("Message-ID") == "first"


def test_changing_block_headers_drops_the_block() -> None:
    headers = Headers.from_block(block_of(PAIRS))
    assert headers.block == block_of(PAIRS)
    copy = headers.copy()
    headers.set("Message-ID", "m2")
    assert headers.block is None
    assert headers.get("Message-ID") == "m2"
    assert copy.get("Message-ID") == "m1"
    assert headers.to_bytes() == block_of([(n, "m2" if n == "Message-ID" else v) for n, v in PAIRS])
    copy.remove("byte-range")
    assert copy.block is None
    assert "Byte-Range" not in copy
    assert len(copy) == len(PAIRS) - 1


def test_path_lines_are_the_first_two_lines_as_received() -> None:
    block = block_of(PAIRS)
    assert path_lines(Headers.from_block(block)) == block_of(PAIRS[:2])
    assert path_lines(Headers.from_block(block, len(block_of(PAIRS[:2])))) == block_of(PAIRS[:2])
    assert path_lines(Headers(PAIRS)) is None


def pairs_way(pairs: list[tuple[str, str]], skip_byte_range: bool) -> tuple[bytes, bytes]:
    """What the relay builds from pairs: paths dropped, Byte-Range split out for SEND."""
    before: list[tuple[str, str]] = []
    after: list[tuple[str, str]] = []
    seen = False
    for name, value in pairs:
        lname = name.lower()
        if lname in ("to-path", "from-path"):
            continue
        if skip_byte_range and lname == "byte-range":
            seen = True
            continue
        (after if seen else before).append((name, value))
    if skip_byte_range and not seen:
        before, after = [], before
    return block_of(before), block_of(after)


PATHS = PAIRS[:2]
OTHERS = [("Message-ID", "m1"), ("Success-Report", "yes"), ("Content-Type", "text/plain")]
RANGE = ("Byte-Range", "1-5/5")


@pytest.mark.parametrize("at", range(len(OTHERS) + 1))
@pytest.mark.parametrize("skip", [True, False])
def test_forwarded_lines_split_around_byte_range_anywhere(at: int, skip: bool) -> None:
    pairs = [*PATHS, *OTHERS[:at], RANGE, *OTHERS[at:]]
    lines = forwarded_lines(Headers.from_block(block_of(pairs)), skip_byte_range=skip)
    assert lines == pairs_way(pairs, skip)
    if skip:
        assert lines == (block_of(OTHERS[:at]), block_of(OTHERS[at:]))
    else:
        assert lines == (block_of([*OTHERS[:at], RANGE, *OTHERS[at:]]), b"")


@pytest.mark.parametrize("skip", [True, False])
def test_forwarded_lines_without_byte_range(skip: bool) -> None:
    pairs = [*PATHS, *OTHERS]
    lines = forwarded_lines(Headers.from_block(block_of(pairs)), skip_byte_range=skip)
    assert lines == pairs_way(pairs, skip)
    assert lines == ((b"", block_of(OTHERS)) if skip else (block_of(OTHERS), b""))


def test_forwarded_lines_of_paths_only() -> None:
    headers = Headers.from_block(block_of(PATHS))
    assert forwarded_lines(headers, skip_byte_range=True) == (b"", b"")
    assert forwarded_lines(headers, skip_byte_range=False) == (b"", b"")


@pytest.mark.parametrize("name", ["Byte-Range", "byte-range", "BYTE-RANGE"])
def test_byte_range_name_in_any_case_is_found(name: str) -> None:
    pairs = [*PATHS, OTHERS[0], (name, "1-5/5"), *OTHERS[1:]]
    lines = forwarded_lines(Headers.from_block(block_of(pairs)), skip_byte_range=True)
    assert lines == (block_of(OTHERS[:1]), block_of(OTHERS[1:]))


def test_similar_names_are_not_taken_for_byte_range_or_paths() -> None:
    pairs = [*PATHS, ("Byte-Ranges", "x"), ("X-To-Path", "y"), ("From-Paths", "z"), RANGE]
    lines = forwarded_lines(Headers.from_block(block_of(pairs)), skip_byte_range=True)
    assert lines == pairs_way(pairs, True)
    assert lines == (block_of(pairs[2:5]), b"")


@pytest.mark.parametrize(
    "extra",
    [
        [("To-Path", "msrps://x.example.com;tcp")],
        [("from-path", "msrps://x.example.com;tcp")],
        [RANGE, ("byte-range", "1-5/5")],
    ],
    ids=["repeated To-Path", "repeated From-Path", "two Byte-Ranges"],
)
def test_repeats_that_slicing_cannot_drop_fall_back_to_pairs(extra: list[tuple[str, str]]) -> None:
    headers = Headers.from_block(block_of([*PATHS, *OTHERS, *extra]))
    dropped_by_send = any(name.lower() == "byte-range" for name, _ in extra)
    assert forwarded_lines(headers, skip_byte_range=True) is None
    if dropped_by_send:
        # Without a Byte-Range rewrite both lines are simply kept.
        lines = forwarded_lines(headers, skip_byte_range=False)
        assert lines == (block_of([*OTHERS, *extra]), b"")
    else:
        assert forwarded_lines(headers, skip_byte_range=False) is None


def test_forwarded_lines_needs_a_block() -> None:
    assert forwarded_lines(Headers(PAIRS), skip_byte_range=True) is None


def test_byte_range_parse_is_cached_and_still_validates() -> None:
    assert ByteRange.parse("1-5/5") is ByteRange.parse("1-5/5")
    assert ByteRange.parse(" 3-*/* ") == ByteRange(3, None, None)
    for bad in ("0-5/5", "5-3/9", "1-9/5", "1-5", "x-5/5"):
        with pytest.raises(ValueError):
            ByteRange.parse(bad)


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("Status: 000 200 OK", b"200"),
        ("Status: 000 413", b"413"),
        ("status:  000 481 gone", b"481"),
        ("Status: 000 20000 x", b"none"),
        ("Message-ID: m", b"none"),
    ],
)
def test_report_status_code_is_the_status_code_or_none(line: str, code: bytes) -> None:
    block = f"To-Path: msrp://a/s;tcp\r\nFrom-Path: msrp://b/t;tcp\r\n{line}\r\n".encode()
    name, _, value = line.partition(": ")
    for headers in (Headers.from_block(block), Headers([(name, value)])):
        assert report_status_code(headers) == code


FORWARD_PATHS = b"To-Path: msrps://bob.example.com:7000/b;tcp\r\nFrom-Path: msrps://r/s;tcp\r\n"


@pytest.mark.parametrize("body", [b"hello\r\nworld", b"", None], ids=["body", "empty", "none"])
@pytest.mark.parametrize("flag", [b"$", b"+", b"#"])
def test_send_frame_is_the_request_built_from_pairs(body: bytes | None, flag: bytes) -> None:
    before = b"Message-ID: m1\r\n"
    after = b"Content-Type: text/plain\r\n" + (b"\r\n" if body is not None else b"")
    frame = send_frame("tid0001", FORWARD_PATHS + before, "1-12/12", after, body, flag)
    pairs = [
        ("To-Path", "msrps://bob.example.com:7000/b;tcp"),
        ("From-Path", "msrps://r/s;tcp"),
        ("Message-ID", "m1"),
        ("Byte-Range", "1-12/12"),
        ("Content-Type", "text/plain"),
    ]
    assert frame == MSRPRequest("tid0001", "SEND", Headers(pairs)).to_bytes(body, flag)
    # The head alone is what a stream writes before its body's first piece.
    head = send_head("tid0001", FORWARD_PATHS + before, "1-12/12", after)
    assert frame.startswith(head)


@pytest.mark.parametrize("body", [b"<report/>", None], ids=["body", "none"])
def test_request_frame_is_the_request_built_from_pairs(body: bytes | None) -> None:
    lines = b"Message-ID: m1\r\nStatus: 000 200 OK\r\n"
    frame = request_frame("tid0002", "REPORT", FORWARD_PATHS, lines, body, b"$")
    pairs = [
        ("To-Path", "msrps://bob.example.com:7000/b;tcp"),
        ("From-Path", "msrps://r/s;tcp"),
        ("Message-ID", "m1"),
        ("Status", "000 200 OK"),
    ]
    assert frame == MSRPRequest("tid0002", "REPORT", Headers(pairs)).to_bytes(body, b"$")
