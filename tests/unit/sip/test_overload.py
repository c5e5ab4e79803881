"""relayd.sip.overload: lag-based load shedding on a task.Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from relayd.sip.overload import LagMonitor, any_of


def _ticks(clock: Clock, count: int, step: float) -> None:
    for _ in range(count):
        clock.advance(step)


def test_on_time_ticks_never_shed() -> None:
    clock = Clock()
    monitor = LagMonitor(clock, threshold_seconds=0.05, interval_seconds=0.02)
    monitor.start()
    _ticks(clock, 100, 0.02)
    assert monitor.lag == pytest.approx(0.0, abs=1e-9)
    assert not monitor.overloaded()


def test_sustained_lag_sheds_and_recovery_has_hysteresis() -> None:
    clock = Clock()
    monitor = LagMonitor(clock, threshold_seconds=0.05, interval_seconds=0.02, samples=5)
    monitor.start()
    _ticks(clock, 4, 0.12)  # the reactor is busy: 100 ms late, but not yet 5 times
    assert not monitor.overloaded()
    clock.advance(0.12)
    assert monitor.overloaded() and monitor.lag == pytest.approx(0.1)
    _ticks(clock, 5, 0.06)  # 40 ms late: below the threshold, above half of it
    assert monitor.overloaded()
    clock.advance(0.02)  # one on-time turn ends it
    assert not monitor.overloaded()


def test_a_process_that_waits_for_a_cpu_now_and_then_is_not_overloaded() -> None:
    clock = Clock()
    monitor = LagMonitor(clock, threshold_seconds=0.05, interval_seconds=0.02, samples=5)
    monitor.start()
    for _ in range(20):
        clock.advance(0.5)  # descheduled for half a second...
        _ticks(clock, 2, 0.02)  # ...then on time again
    assert not monitor.overloaded()


def test_stop_cancels_the_timer_and_forgets_the_state() -> None:
    clock = Clock()
    monitor = LagMonitor(clock, threshold_seconds=0.05)
    monitor.start()
    monitor.start()  # idempotent
    assert len(clock.getDelayedCalls()) == 1
    _ticks(clock, 5, 0.5)
    assert monitor.overloaded()
    monitor.stop()
    assert not clock.getDelayedCalls()
    assert not monitor.overloaded()


@pytest.mark.parametrize(
    ("threshold", "interval", "samples"), [(0, 0.02, 5), (0.05, 0, 5), (0.05, 0.02, 0)]
)
def test_bad_settings_are_refused(threshold: float, interval: float, samples: int) -> None:
    with pytest.raises(ValueError):
        LagMonitor(Clock(), threshold, interval, samples)


def test_any_of_combines_signals() -> None:
    state = {"a": False, "b": False}
    combined = any_of(lambda: state["a"], lambda: state["b"])
    assert not combined()
    state["b"] = True
    assert combined()
