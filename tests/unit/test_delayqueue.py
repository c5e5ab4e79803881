"""relayd.delayqueue on a task.Clock: order, cancellation, re-arming from callbacks."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from relayd.delayqueue import DelayQueue


def test_fires_in_order_after_the_delay() -> None:
    clock = Clock()
    queue = DelayQueue(clock, 2.0)
    fired: list[tuple[str, float]] = []
    queue.call(lambda: fired.append(("a", clock.seconds())))
    clock.advance(0.5)
    queue.call(lambda: fired.append(("b", clock.seconds())))
    clock.advance(1.4)
    assert fired == []
    clock.advance(0.1)
    assert fired == [("a", 2.0)]
    clock.advance(0.4)
    assert fired == [("a", 2.0)]
    clock.advance(0.1)
    assert fired == [("a", 2.0), ("b", 2.5)]
    assert len(queue) == 0
    assert clock.getDelayedCalls() == []


def test_cancelled_entries_never_fire_and_are_dropped() -> None:
    clock = Clock()
    queue = DelayQueue(clock, 1.0)
    fired: list[str] = []
    first = queue.call(lambda: fired.append("first"))
    second = queue.call(lambda: fired.append("second"))
    first.cancel()
    assert not first.active() and second.active()
    clock.advance(1.0)
    assert fired == ["second"]
    assert not second.active()  # fired entries are inactive, like a DelayedCall
    second.cancel()  # harmless after firing
    only = queue.call(lambda: fired.append("late"))
    only.cancel()
    clock.advance(1.0)
    assert fired == ["second"]
    assert len(queue) == 0


def test_a_callback_may_arm_another_and_the_older_head_keeps_its_time() -> None:
    clock = Clock()
    queue = DelayQueue(clock, 1.0)
    fired: list[tuple[str, float]] = []

    def rearm() -> None:
        fired.append(("first", clock.seconds()))
        queue.call(lambda: fired.append(("rearmed", clock.seconds())))

    queue.call(rearm)
    clock.advance(0.25)
    queue.call(lambda: fired.append(("second", clock.seconds())))
    clock.advance(0.75)
    clock.advance(0.25)
    clock.advance(0.75)
    assert fired == [("first", 1.0), ("second", 1.25), ("rearmed", 2.0)]


def test_zero_delay_fires_on_the_next_turn_and_stop_forgets() -> None:
    clock = Clock()
    queue = DelayQueue(clock, 0.0)
    fired: list[str] = []
    queue.call(lambda: fired.append("now"))
    clock.advance(0)
    assert fired == ["now"]
    queue.call(lambda: fired.append("never"))
    queue.stop()
    clock.advance(1)
    assert fired == ["now"]
    assert clock.getDelayedCalls() == []


def test_a_failing_callback_does_not_stop_the_others() -> None:
    clock = Clock()
    queue = DelayQueue(clock, 1.0)
    fired: list[str] = []

    def boom() -> None:
        raise RuntimeError("boom")

    queue.call(boom)
    queue.call(lambda: fired.append("after"))
    clock.advance(1.0)
    assert fired == ["after"]


def test_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError):
        DelayQueue(Clock(), -1.0)
