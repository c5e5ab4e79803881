"""The remote targets of Record-Routed dialogs (RFC 3261 §12.1, §16.12), on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from relayd.sip.dialogs import DialogTargets
from relayd.sipuri import SIPURI

CALLER = "<sip:alice@192.0.2.1:5070>"
ALICE, BOB, CAROL = (
    SIPURI.parse("sip:alice@192.0.2.1:5070"),
    SIPURI.parse("sip:bob@192.0.2.2"),
    SIPURI.parse("sip:carol@192.0.2.3"),
)


def _call(clock: Clock, idle_seconds: float = 3600.0) -> DialogTargets:
    dialogs = DialogTargets(clock, idle_seconds=idle_seconds)
    dialogs.caller("c1", "a", CALLER)
    dialogs.callee("c1", "a", "b", "<sip:bob@192.0.2.2>;expires=60")
    return dialogs


def test_each_direction_goes_only_to_the_other_partys_target() -> None:
    dialogs = _call(Clock())
    assert dialogs.allows("c1", "a", "b", BOB) is True  # alice -> bob
    assert dialogs.allows("c1", "b", "a", ALICE) is True  # bob -> alice
    assert dialogs.allows("c1", "a", "b", ALICE) is False  # alice pointing at herself
    assert dialogs.allows("c1", "a", "b", CAROL) is False
    assert dialogs.allows("c1", "a", "x", BOB) is None  # no such party
    assert dialogs.allows("c2", "a", "b", BOB) is None  # no such call
    assert dialogs.allows("c1", "z", "b", BOB) is None  # neither tag is the caller's
    assert dialogs.allows("c1", "a", "a", ALICE) is None


def test_a_2xx_to_another_callers_invite_with_the_same_call_id_sets_nothing() -> None:
    dialogs = _call(Clock())
    dialogs.callee("c1", "z", "c", "<sip:carol@192.0.2.3>")
    assert dialogs.allows("c1", "z", "c", CAROL) is None
    assert dialogs.allows("c1", "a", "c", CAROL) is None


def test_no_dialog_before_a_2xx_and_no_target_is_set_twice() -> None:
    dialogs = DialogTargets(Clock())
    dialogs.caller("c1", "a", CALLER)
    assert dialogs.allows("c1", "b", "a", ALICE) is None  # nobody answered yet
    dialogs.callee("c1", "a", "a", "<sip:carol@192.0.2.3>")  # a 2xx with the caller's tag
    dialogs.callee("c1", "a", "b", "<sip:bob@192.0.2.2>")
    dialogs.callee("c1", "a", "b", "<sip:carol@192.0.2.3>")  # a later 2xx of the same dialog
    dialogs.caller("c1", "z", "<sip:carol@192.0.2.3>")  # another INVITE reusing the Call-ID
    assert dialogs.allows("c1", "b", "a", ALICE) is True
    assert dialogs.allows("c1", "a", "b", BOB) is True
    assert dialogs.allows("c1", "b", "a", CAROL) is False
    assert dialogs.allows("c1", "a", "b", CAROL) is False


def test_forked_dialogs_end_one_by_one_on_bye() -> None:
    dialogs = _call(Clock())
    dialogs.callee("c1", "a", "c", "<sip:carol@192.0.2.3>")
    dialogs.ended("c1", "a", "c")
    assert dialogs.allows("c1", "a", "c", CAROL) is None
    assert dialogs.allows("c1", "a", "b", BOB) is True
    dialogs.ended("c1", "b", "a")  # bob hangs up: the call is gone
    assert dialogs.allows("c1", "b", "a", ALICE) is None
    assert len(dialogs) == 0


def test_an_idle_dialog_expires_and_use_keeps_it() -> None:
    clock = Clock()
    dialogs = _call(clock, idle_seconds=100)
    clock.advance(99)
    assert dialogs.allows("c1", "a", "b", BOB) is True  # used: another 100 s
    clock.advance(99)
    assert dialogs.allows("c1", "a", "b", BOB) is True
    clock.advance(100)
    assert dialogs.allows("c1", "a", "b", BOB) is None
    assert len(dialogs) == 0


def test_the_table_is_bounded_and_drops_the_least_recently_used_call() -> None:
    clock = Clock()
    dialogs = DialogTargets(clock, max_dialogs=2)
    for call in ("c1", "c2"):
        dialogs.caller(call, "a", CALLER)
        dialogs.callee(call, "a", "b", "<sip:bob@192.0.2.2>")
    assert dialogs.allows("c1", "a", "b", BOB) is True  # c1 used: c2 is the oldest
    dialogs.caller("c3", "a", CALLER)
    assert len(dialogs) == 2
    assert dialogs.allows("c2", "a", "b", BOB) is None
    assert dialogs.allows("c1", "a", "b", BOB) is True


def test_a_call_nobody_answers_is_forgotten_after_its_setup_time() -> None:
    clock = Clock()
    dialogs = DialogTargets(clock, setup_seconds=300)
    dialogs.caller("c1", "a", CALLER)
    clock.advance(300)
    dialogs.callee("c1", "a", "b", "<sip:bob@192.0.2.2>")  # too late: no dialog
    assert dialogs.allows("c1", "a", "b", BOB) is None
    dialogs.caller("c1", "x", "<sip:carol@192.0.2.3>")  # the Call-ID is free again
    dialogs.callee("c1", "x", "b", "<sip:bob@192.0.2.2>")
    assert dialogs.allows("c1", "b", "x", CAROL) is True
    dialogs.caller("c2", "a", CALLER)
    clock.advance(299)
    dialogs.callee("c2", "a", "b", "<sip:bob@192.0.2.2>")  # answered: now the idle time counts
    clock.advance(3000)
    assert dialogs.allows("c2", "a", "b", BOB) is True
