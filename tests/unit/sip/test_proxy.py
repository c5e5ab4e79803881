"""Best-response selection (RFC 3261 §16.7 step 6)."""

from __future__ import annotations

import pytest

from relayd.sip.message import SIPResponse
from relayd.sip.proxy import select_best


def _r(*codes: int) -> list[SIPResponse]:
    return [SIPResponse(code, str(code)) for code in codes]


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ((), 408),
        ((404, 200, 480), 200),
        ((486, 603, 200), 200),
        ((486, 603), 603),
        ((500, 404), 404),
        ((408, 480), 480),
        ((503,), 500),
        ((503, 408), 408),
        ((407, 404), 407),
    ],
)
def test_select_best(codes: tuple[int, ...], expected: int) -> None:
    assert select_best(_r(*codes))[0] == expected
