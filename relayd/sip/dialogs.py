"""The remote targets of the dialogs the relay Record-Routed (RFC 3261 §12.2, §16.12).

Our Route's ``rr`` MAC binds a request to its dialog (Call-ID and caller's tag), not to
where it goes: an in-dialog request is sent to its Request-URI, which its sender writes.
Without more, anyone in a dialog through us could point a request at any URI and use
the relay as an open path to someone who never consented. So each dialog's two remote
targets are kept here, as they were when the dialog was set up through us: the caller's
Contact from the INVITE, each callee's Contact from its 2xx (one per forked dialog).
A request towards the party with To tag *t* may only go to *t*'s target.

State rather than a MAC over the target in the Record-Route: the callee's target is only
known from the 2xx, whose Record-Route the caller's route set comes from, and a MAC
there would need our Record-Route rewritten in every 2xx. Target refreshes
(re-INVITE/UPDATE Contacts) are not learnt: nothing tells the relay which party wrote a
Contact, and learning them would let either party set the other's target. The table is
bounded (least recently used call dropped); a call nobody answered 2xx goes after
``setup_seconds`` (past Timer C), a dialog when idle for ``idle_seconds`` or when its
last callee's BYE is answered 2xx.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

from relayd.sipuri import SIPURI, NameAddr, SIPURIError

__all__ = ["DialogTargets"]

MAX_DIALOGS = 65536
MAX_FORKS = 16
IDLE_SECONDS = 24 * 3600.0
SETUP_SECONDS = 300.0
"""How long an INVITE may go unanswered (Timer C is 185 s, then 64·T1 for a CANCEL)."""


def contact_uri(value: str | None) -> str | None:
    """The URI of a Contact value, as a Request-URI naming it is formatted."""
    if not value:
        return None
    try:
        return NameAddr.parse(value).uri.format()
    except SIPURIError:
        return None


@dataclass(slots=True)
class _Call:
    caller_tag: str
    expires: float
    #: tag -> that party's remote target (the caller's and each answering callee's).
    targets: dict[str, str] = field(default_factory=dict)


class DialogTargets:
    """Per Call-ID, the remote target of each party of the dialogs we routed (module doc)."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        max_dialogs: int = MAX_DIALOGS,
        idle_seconds: float = IDLE_SECONDS,
        setup_seconds: float = SETUP_SECONDS,
    ) -> None:
        self._clock = clock
        self._max = max_dialogs
        self._idle = idle_seconds
        self._setup = setup_seconds
        self._calls: OrderedDict[str, _Call] = OrderedDict()

    def __len__(self) -> int:
        return len(self._calls)

    def caller(self, call_id: str, tag: str, contact: str | None) -> None:
        """The caller's INVITE went out through us with our Record-Route."""
        target = contact_uri(contact)
        if target is None:
            return
        now = self._clock.seconds()
        known = self._calls.get(call_id)
        if known is not None and known.expires > now:
            return  # a Call-ID is one call's (§8.1.1.4): its first caller keeps it
        self._calls.pop(call_id, None)
        while len(self._calls) >= self._max:
            self._calls.popitem(last=False)
        call = _Call(tag, now + self._setup)
        call.targets[tag] = target
        self._calls[call_id] = call

    def callee(self, call_id: str, caller_tag: str, tag: str | None, contact: str | None) -> None:
        """A callee's 2xx to the INVITE of ``caller_tag`` went upstream: its dialog's
        other target. A To tag equal to the caller's, or a second Contact for a known
        tag, is ignored: nobody sets a target once set."""
        call = self._calls.get(call_id)
        target = contact_uri(contact)
        if call is None or call.caller_tag != caller_tag or tag is None or target is None:
            return
        if tag in call.targets:
            return
        if len(call.targets) > MAX_FORKS or call.expires <= self._clock.seconds():
            return
        call.targets[tag] = target
        call.expires = self._clock.seconds() + self._idle

    def allows(
        self, call_id: str, from_tag: str | None, to_tag: str | None, uri: SIPURI
    ) -> bool | None:
        """Whether a request of the call from ``from_tag`` towards the party ``to_tag``
        may go to ``uri``; ``None`` when the relay knows no such dialog (never, expired,
        dropped, or neither tag is its caller's)."""
        call = self._calls.get(call_id)
        now = self._clock.seconds()
        if call is not None and call.expires <= now:
            del self._calls[call_id]
            call = None
        if call is None or call.caller_tag not in (from_tag, to_tag) or from_tag == to_tag:
            return None
        if to_tag is None or to_tag not in call.targets:
            return None
        if len(call.targets) < 2:
            return None  # no callee answered: no dialog yet
        call.expires = now + self._idle
        self._calls.move_to_end(call_id)
        return call.targets[to_tag] == uri.format()

    def ended(self, call_id: str, from_tag: str | None, to_tag: str | None) -> None:
        """A BYE between the two tags was answered 2xx: that callee's dialog is over,
        and the call with it once no callee's dialog remains."""
        call = self._calls.get(call_id)
        if call is None:
            return
        for tag in (from_tag, to_tag):
            if tag is not None and tag != call.caller_tag:
                call.targets.pop(tag, None)
        if len(call.targets) < 2:
            del self._calls[call_id]
