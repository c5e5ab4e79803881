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
    monitor = LagMonitor(clock, threshold_seconds=0.05, interval_seconds=0.02)
    monitor.start()
    clock.advance(0.12)  # one busy turn: 100 ms late, smoothed to 25 ms
    assert not monitor.overloaded()
    _ticks(clock, 4, 0.12)  # the reactor stays busy
    assert monitor.overloaded()
    clock.advance(0.02)  # on time again, but the smoothed lag is still high
    assert monitor.overloaded()
    _ticks(clock, 2, 0.02)
    assert 0.025 < monitor.lag < 0.05 and monitor.overloaded()  # below the threshold, above half
    _ticks(clock, 10, 0.02)
    assert monitor.lag < 0.025
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
    ("threshold", "interval", "smoothing"), [(0, 0.02, 0.25), (0.05, 0, 0.25), (0.05, 0.02, 0)]
)
def test_bad_settings_are_refused(threshold: float, interval: float, smoothing: float) -> None:
    with pytest.raises(ValueError):
        LagMonitor(Clock(), threshold, interval, smoothing)


def test_any_of_combines_signals() -> None:
    state = {"a": False, "b": False}
    combined = any_of(lambda: state["a"], lambda: state["b"])
    assert not combined()
    state["b"] = True
    assert combined()
