"""Fixtures of the MSRP connection tests (relayd.msrp.testing's relay)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.testing import EventLoggingObserver

from relayd.msrp.testing import Harness, logged_failures_forbidden


@pytest.fixture
def no_logged_failures() -> Iterator[EventLoggingObserver]:
    with logged_failures_forbidden() as observer:
        yield observer


@pytest.fixture
def h() -> Harness:
    return Harness()
