"""Fan-out of a request to list members (RFC 3261 §16, seed §2 "translation").

:class:`Proxy` finds where each member can be reached (the registrar's contacts for an
AOR in our domain, RFC 3263 resolution for others), forwards one copy per target in
parallel client transactions (§16.6: Request-URI rewritten, Max-Forwards decremented,
our Via pushed with a loop-detecting branch, our own credentials removed) and picks the
response for the sender with :func:`select_best` (§16.7 step 6). A 2xx is answered at
once; the remaining branches still complete (non-INVITE requests are never CANCELled).

An INVITE has a response context of its own, :class:`InviteContext` (§16.7-§16.10):
provisional responses and every 2xx go upstream as they come, the best final when no
branch answers 2xx, and a CANCEL from the caller (or Timer C, §16.8) cancels the
branches that are still pending.

A branch whose URI resolved to several targets fails over (RFC 3263 §4.3): after a 503,
a transport failure or a timeout without any response, the same request with a new
Via branch goes to the next target, while the branch's time lasts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import cast

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from relayd.bounded import remember
from relayd.logs import logger
from relayd.sip.message import SIPRequest, SIPResponse, make_response, unstamped_via
from relayd.sip.registrar import Registrar, Unreachable
from relayd.sip.resolve import ResolveError, SIPResolver, Target
from relayd.sip.transaction import (
    LocalResponse,
    ServerTransaction,
    SIPTimers,
    TransactionState,
    cancel_for,
    local_response,
    new_branch,
)
from relayd.sip.uas import LoopDetector
from relayd.sipuri import SIPURI, SIPURIError

__all__ = [
    "Branch",
    "InviteContext",
    "Proxy",
    "SendInvite",
    "SendRequest",
    "select_best",
    "target_failed",
    "upstream",
]

MAX_CACHED_MEMBERS = 4096
"""Member URIs kept parsed between requests."""

SendRequest = Callable[[SIPRequest, Target], "Deferred[SIPResponse]"]
Notify = Callable[[SIPResponse], object]
SendInvite = Callable[[SIPRequest, Target, Notify, Notify], "Deferred[SIPResponse]"]
"""``send(request, target, on_provisional, on_2xx)``: an INVITE client transaction."""


def _rank(status: int) -> tuple[int, int]:
    """Lower is better among non-2xx finals (§16.7 step 6): 6xx first, then the lowest
    class; within a class 401/407 are preferred (§16.7 step 7 aggregates challenges),
    and 408/503 (local failures) come last."""
    klass = status // 100
    if klass == 6:
        return (0, status)
    penalty = 2 if status in (408, 503) else 0 if status in (401, 407) else 1
    return (klass, penalty)


def select_best(responses: Sequence[SIPResponse]) -> tuple[int, str]:
    """Status and reason for the sender: a 2xx if any, else the best final (§16.7 step 6);
    503 becomes 500 (§16.7 step 6: a proxy must not pass 503 on), none at all is 408."""
    if not responses:
        return 408, "Request Timeout"
    for response in responses:
        if 200 <= response.status < 300:
            return response.status, response.reason
    best = min(responses, key=lambda r: _rank(r.status))
    if best.status == 503:
        return 500, "Server Internal Error"
    return best.status, best.reason


def target_failed(response: SIPResponse) -> bool:
    """RFC 3263 §4.3: the target, not the request, failed: a 503 (the peer's own or ours
    for a transport failure) or a timeout that saw no response at all."""
    return response.status == 503 or isinstance(response, LocalResponse)


@dataclass(frozen=True, slots=True)
class Branch:
    """One destination of a fork: the Request-URI to use and where to send it, with the
    targets to fail over to, in order (RFC 3263 §4.3)."""

    member: str
    uri: SIPURI
    target: Target | None
    alternates: tuple[Target, ...] = ()


class Proxy:
    """Locates members and forks requests to them (module doc).

    ``branch_timeout_seconds`` bounds a branch that fails over: no new target is tried
    after it, and an attempt still running then is abandoned (a 408). It defaults to
    64·T1, what the sender's own transaction waits. ``clock`` is the reactor's unless
    given; it is only read when a branch has targets to fail over to.
    """

    log = logger()

    def __init__(
        self,
        send: SendRequest,
        resolver: SIPResolver,
        registrar: Registrar | None,
        is_local: Callable[[SIPURI], bool],
        loop_detector: LoopDetector | None = None,
        *,
        clock: IReactorTime | None = None,
        branch_timeout_seconds: float = 32.0,
        flows: Callable[[SIPURI], Target | None] | None = None,
    ) -> None:
        self.send = send
        self.resolver = resolver
        self.registrar = registrar
        self.is_local = is_local
        self.loop_detector = loop_detector
        self.branch_timeout_seconds = branch_timeout_seconds
        self.flows = flows
        self._clock = clock
        self._members: dict[str, SIPURI | None] = {}

    @property
    def clock(self) -> IReactorTime:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = cast(IReactorTime, reactor)
        return self._clock

    def _member_uri(self, member: str) -> SIPURI | None:
        """``member`` parsed (``None`` when it is no SIP URI); list members repeat."""
        try:
            return self._members[member]
        except KeyError:
            pass
        try:
            uri: SIPURI | None = SIPURI.parse(member)
        except SIPURIError:
            uri = None
        return remember(self._members, MAX_CACHED_MEMBERS, member, uri)

    def is_online(self, member: str) -> bool:
        """Whether ``member`` can be reached now: registered if ours, always if remote."""
        uri = self._member_uri(member)
        if uri is None:
            return False
        if self.is_local(uri):
            return self.registrar is not None and self.registrar.is_online(uri.aor)
        return True

    def _contact_uris(self, member: str) -> list[tuple[SIPURI, Target | Unreachable | None]] | None:
        """Each URI to try for ``member``, with where its binding is reached instead
        (:attr:`relayd.sip.registrar.Binding.route`; None for a member elsewhere, which
        is the URI itself)."""
        uri = self._member_uri(member)
        if uri is None:
            return None
        if self.is_local(uri):
            contacts = self.registrar.contacts(uri.aor) if self.registrar is not None else []
            return [(binding.uri, binding.route) for binding in contacts]
        return [(uri, None)]

    def _flow(self, member: str, contact: SIPURI) -> Branch | None:
        """The branch over the connection ``contact`` was registered on, while it is
        open (RFC 5626 §5.3): behind a NAT the contact itself cannot be reached."""
        target = self.flows(contact) if self.flows is not None else None
        return None if target is None else Branch(member, contact, target)

    def _branch(self, member: str, uri: SIPURI, targets: list[Target] | None) -> Branch:
        if not targets:
            return Branch(member, uri, None)
        if len(targets) == 1:
            return Branch(member, uri, targets[0])
        return Branch(member, uri, targets[0], tuple(targets[1:]))

    def _unresolvable(self, member: str, uri: SIPURI, error: ResolveError) -> Branch:
        self.log.warn("cannot resolve {uri}: {reason}", uri=uri.aor, reason=str(error))
        return Branch(member, uri, None)

    def _known_branch(
        self, member: str, uri: SIPURI, route: Target | Unreachable | None = None
    ) -> Branch | None:
        """The branch to ``uri`` when no DNS lookup is needed: over its registered flow,
        back where it registered from when it names another host
        (:func:`relayd.sip.registrar.registered_route`), to its numeric host, or failed;
        ``None`` when a lookup is."""
        flow = self._flow(member, uri)
        if flow is not None:
            return flow
        if isinstance(route, Unreachable):
            return Branch(member, uri, None)
        if route is not None:
            return Branch(member, uri, route)
        try:
            targets = self.resolver.resolve_now(uri)
        except ResolveError as e:
            return self._unresolvable(member, uri, e)
        return None if targets is None else self._branch(member, uri, targets)

    def branches_now(self, member: str) -> list[Branch] | None:
        """:meth:`branches` when no DNS lookup is needed, else ``None``."""
        uris = self._contact_uris(member)
        if uris is None:
            return [Branch(member, SIPURI("sip", "invalid"), None)]
        out: list[Branch] = []
        for each, route in uris:
            branch = self._known_branch(member, each, route)
            if branch is None:
                return None
            out.append(branch)
        return out

    async def branches(self, member: str) -> list[Branch]:
        """Targets for ``member``: every registered contact (ours) or the URI itself."""
        known = self.branches_now(member)
        if known is not None:
            return known
        out: list[Branch] = []
        for each, route in self._contact_uris(member) or []:
            branch = self._known_branch(member, each, route)
            if branch is None:
                try:
                    branch = self._branch(member, each, await self.resolver.resolve(each))
                except ResolveError as e:
                    branch = self._unresolvable(member, each, e)
            out.append(branch)
        return out

    def forward_copy(
        self,
        request: SIPRequest,
        uri: SIPURI,
        max_forwards: int,
        loop_hash: str | None = None,
    ) -> SIPRequest:
        """§16.6 steps 1-8 on a copy of ``request`` for one branch.

        ``loop_hash`` is :meth:`LoopDetector.loop_hash` of ``request``, computed once
        by a caller that forks the same request to many branches.
        """
        headers = request.headers.copy()
        fields = headers._fields
        fields.pop("proxy-authorization", None)  # ours; never passed downstream (§22.3)
        fields.pop("route", None)
        fields["max-forwards"] = [str(max_forwards)]
        detector = self.loop_detector
        if detector is None:
            branch = new_branch()
        elif loop_hash is None:
            branch = detector.branch(request)
        else:
            branch = detector.branch_for(loop_hash)
        headers.add_first("Via", unstamped_via(branch))
        return SIPRequest(request.method, uri, headers, request.body)

    def _one(self, branch: Branch, build: Callable[[Branch], SIPRequest]) -> Deferred[SIPResponse]:
        try:
            request = build(branch)
        except Exception:
            self.log.failure("building the request for {uri} failed", uri=branch.member)
            return defer.succeed(SIPResponse(500, "Server Internal Error"))
        target = branch.target
        if target is None:
            return defer.succeed(
                make_response(request, 404 if branch.uri.host == "invalid" else 503)
            )
        if branch.alternates:
            return defer.ensureDeferred(self._fail_over(request, target, branch.alternates))
        return self._attempt(request, target)

    def _attempt(self, request: SIPRequest, target: Target) -> Deferred[SIPResponse]:
        """One client transaction; a send that raises or fails counts as a 503 (§8.1.3.1)."""
        try:
            d = self.send(request, target)
        except Exception as e:
            d = defer.fail(e)

        def failed(failure: Failure) -> SIPResponse:
            if failure.check(CancelledError):
                return local_response(request, 408)  # abandoned: the branch's time ran out
            self.log.warn(
                "sending {method} to {peer} failed: {reason}",
                method=request.method,
                peer=str(target),
                reason=str(failure.value),
            )
            return local_response(request, 503)

        return d.addErrback(failed)

    async def _fail_over(
        self, request: SIPRequest, first: Target, alternates: tuple[Target, ...]
    ) -> SIPResponse:
        """RFC 3263 §4.3: each failed target (:func:`target_failed`) hands the request,
        as a new transaction, to the next, until one answers or the branch's time is up.
        The first attempt needs no watch: its own Timer F ends it by then."""
        clock = self.clock
        deadline = clock.seconds() + self.branch_timeout_seconds
        d = self._send_within(request, first, None)
        for target in alternates:
            response = await d
            remaining = deadline - clock.seconds()
            if not target_failed(response) or remaining <= 0:
                return response
            self.log.info(
                "{method} to {uri} failed with {code}; trying {peer}",
                method=request.method,
                uri=request.uri,
                code=response.status,
                peer=str(target),
            )
            request = self._next_attempt(request)
            d = self._send_within(request, target, remaining)
        return await d

    def _send_within(
        self, request: SIPRequest, target: Target, seconds: float | None
    ) -> Deferred[SIPResponse]:
        """:meth:`_attempt`, abandoned (a 408) after ``seconds`` if given."""
        d = self._attempt(request, target)
        if seconds is None:
            return d
        return d.addTimeout(
            seconds, self.clock, lambda result, timeout: local_response(request, 408)
        )

    def _next_attempt(self, request: SIPRequest) -> SIPRequest:
        """The request again as a new transaction (RFC 3263 §4.3): only the top Via's
        branch changes; the loop-detection hash in ours stays (§16.6 step 8)."""
        headers = request.headers.copy()
        vias = headers.get_all("via")
        old = request.via.branch or ""
        detector = self.loop_detector
        if detector is not None and old.startswith(LoopDetector.PREFIX):
            branch = detector.branch_for(old[len(LoopDetector.PREFIX) :].partition(".")[0])
        else:
            branch = new_branch()
        headers._fields["via"] = [unstamped_via(branch), *vias[1:]]
        return SIPRequest(request.method, request.uri, headers, request.body)

    def fork(
        self,
        members: Sequence[str],
        build: Callable[[Branch], SIPRequest],
        offline_status: int = 480,
    ) -> Deferred[tuple[int, str, list[SIPResponse]]]:
        """Send ``build(branch)`` to every target of every member in parallel.

        Fires with the §16.7 choice as soon as a 2xx arrives, else when all branches
        ended; the list holds the responses seen until then. A member without any
        target (offline) counts as ``offline_status``.
        """
        per_member: list[list[Branch]] = []
        for member in members:
            known = self.branches_now(member)
            if known is None:
                return self._fork_after_lookup(members, build, offline_status)
            per_member.append(known)
        return self._launch(members, per_member, build, offline_status)

    def _fork_after_lookup(
        self,
        members: Sequence[str],
        build: Callable[[Branch], SIPRequest],
        offline_status: int,
    ) -> Deferred[tuple[int, str, list[SIPResponse]]]:
        async def lookup() -> list[list[Branch]]:
            return [await self.branches(member) for member in members]

        d = defer.ensureDeferred(lookup())
        return d.addCallback(lambda found: self._launch(members, found, build, offline_status))

    def _launch(
        self,
        members: Sequence[str],
        per_member: Sequence[Sequence[Branch]],
        build: Callable[[Branch], SIPRequest],
        offline_status: int,
    ) -> Deferred[tuple[int, str, list[SIPResponse]]]:
        result: Deferred[tuple[int, str, list[SIPResponse]]] = Deferred()
        responses: list[SIPResponse] = []
        outstanding = [0]

        def settle() -> None:
            if not result.called:
                result.callback((*select_best(responses), list(responses)))

        def seen(response: SIPResponse) -> None:
            responses.append(response)
            outstanding[0] -= 1
            if result.called:
                return
            if 200 <= response.status < 300:
                result.callback((response.status, response.reason, list(responses)))
            elif outstanding[0] == 0:
                settle()

        def lost(failure: Failure) -> None:
            outstanding[0] -= 1
            self.log.failure("fork branch failed", failure)
            if outstanding[0] == 0:
                settle()

        launched: list[Deferred[SIPResponse]] = []
        for member, branches in zip(members, per_member, strict=True):
            if not branches:
                responses.append(SIPResponse(offline_status, "Temporarily Unavailable"))
                self.log.info("member {uri} is offline", uri=member)
            for branch in branches:
                outstanding[0] += 1
                launched.append(self._one(branch, build))
        if not launched:
            settle()
        for d in launched:
            d.addCallbacks(seen, lost)
        return result


def upstream(response: SIPResponse) -> SIPResponse:
    """A branch's response as the caller gets it (§16.7 step 3): our Via removed,
    everything else (To tag, Record-Route, Contact, the SDP body) unchanged."""
    headers = response.headers.copy()
    vias = headers.get_all("via")
    if len(vias) > 1:
        headers._fields["via"] = vias[1:]
    return SIPResponse(response.status, response.reason, headers, response.body)


@dataclass(slots=True, eq=False)
class _InviteBranch:
    request: SIPRequest
    target: Target
    result: Deferred[SIPResponse] | None = None
    final: bool = False
    provisional: bool = False
    cancel_wanted: bool = False
    cancelled: bool = False
    timer: IDelayedCall | None = field(default=None)


class InviteContext:
    """The response context of one proxied INVITE (§16.7, Timer C §16.8, CANCEL §16.10).

    Each branch is an INVITE client transaction. A provisional other than 100 goes
    upstream (step 5) and restarts the branch's Timer C; every 2xx goes upstream at once
    (step 5, RFC 6026: the server transaction stays Accepted to carry later ones), and
    the first 2xx or a 6xx cancels the branches still pending (step 10). When every
    branch ended without a 2xx, ``final(responses)`` is the caller's answer (step 6).
    A CANCEL of the caller's transaction cancels the pending branches; a branch that has
    no provisional yet gets its CANCEL when one arrives (§9.1). A cancelled branch that
    never answers is abandoned after 64·T1 (§9.1) and counts as a 408. ``on_2xx`` sees
    every 2xx that goes upstream (each sets up a dialog, §12.1.2).
    """

    log = logger()

    def __init__(
        self,
        send: SendInvite,
        clock: IReactorTime,
        txn: ServerTransaction,
        final: Callable[[list[SIPResponse]], SIPResponse],
        *,
        timers: SIPTimers | None = None,
        on_2xx: Callable[[SIPResponse], None] | None = None,
    ) -> None:
        self._send = send
        self._on_2xx = on_2xx
        self._clock = clock
        self._txn = txn
        self._final = final
        timers = timers or SIPTimers()
        self._timer_c_seconds = timers.c_seconds
        self._cancel_wait_seconds = timers.timeout_seconds
        self._branches: list[_InviteBranch] = []
        self._responses: list[SIPResponse] = []
        self._answered = False  # a final went upstream
        txn.on_cancel = self.cancel

    def start(self, requests: Sequence[tuple[SIPRequest, Target]]) -> None:
        """Send one INVITE per ``(request, target)``; every one must end in a final."""
        branches = [_InviteBranch(request, target) for request, target in requests]
        self._branches = branches
        if not branches:
            self._settle()
            return
        for branch in branches:
            try:
                d = self._send(
                    branch.request,
                    branch.target,
                    partial(self._provisional, branch),
                    self._forward,
                )
            except Exception as e:
                d = defer.fail(e)
            branch.result = d
            d.addErrback(self._lost, branch)
            d.addCallback(self._branch_final, branch)

    def _lost(self, failure: Failure, branch: _InviteBranch) -> SIPResponse:
        if not failure.check(CancelledError):
            self.log.warn(
                "INVITE to {peer} failed: {reason}",
                peer=str(branch.target),
                reason=str(failure.value),
            )
        return local_response(branch.request, 408 if failure.check(CancelledError) else 503)

    def _provisional(self, branch: _InviteBranch, response: SIPResponse) -> None:
        if branch.final:
            return
        branch.provisional = True
        if branch.cancel_wanted:
            self._send_cancel(branch)
            return
        self._stop_timer(branch)
        branch.timer = self._clock.callLater(self._timer_c_seconds, self._timer_c, branch)
        if response.status > 100 and not self._answered:
            self._forward(response)

    def _timer_c(self, branch: _InviteBranch) -> None:
        """§16.8: a branch ringing for longer than Timer C is cancelled."""
        branch.timer = None
        self.log.info("INVITE to {peer} rang out (Timer C)", peer=str(branch.target))
        self._cancel_branch(branch)

    def _forward(self, response: SIPResponse) -> None:
        txn = self._txn
        if txn.state in (TransactionState.PROCEEDING, TransactionState.ACCEPTED):
            if self._on_2xx is not None and 200 <= response.status < 300:
                self._on_2xx(response)
            txn.respond(upstream(response))

    def _branch_final(self, response: SIPResponse, branch: _InviteBranch) -> None:
        branch.final = True
        self._stop_timer(branch)
        self._responses.append(response)
        status = response.status
        if 200 <= status < 300 or status >= 600:
            if 200 <= status < 300:
                self._forward(response)
            elif not self._answered:
                self._txn.respond(self._final([response]))
            self._answered = True
            for other in self._branches:
                if other is not branch:
                    self._cancel_branch(other)
            return
        if all(b.final for b in self._branches):
            self._settle()

    def _settle(self) -> None:
        if self._answered:
            return
        self._answered = True
        if self._txn.state is TransactionState.PROCEEDING:
            self._txn.respond(self._final(self._responses))

    def cancel(self) -> None:
        """The caller's CANCEL (§16.10): cancel every pending branch."""
        self._answered = True  # the UAS core answers the caller's INVITE with 487
        for branch in self._branches:
            self._cancel_branch(branch)

    def _cancel_branch(self, branch: _InviteBranch) -> None:
        if branch.final or branch.cancel_wanted:
            return
        branch.cancel_wanted = True
        self._stop_timer(branch)
        if branch.provisional:
            self._send_cancel(branch)
        # §9.1: no CANCEL before a provisional; Timer B ends a branch that never sends one.

    def _send_cancel(self, branch: _InviteBranch) -> None:
        if branch.cancelled or branch.final:
            return
        branch.cancelled = True
        self._stop_timer(branch)
        cancel = cancel_for(branch.request)
        try:
            d = self._send(cancel, branch.target, _ignore, _ignore)
        except Exception as e:
            d = defer.fail(e)
        d.addErrback(lambda failure: self.log.warn("CANCEL failed: {f}", f=str(failure.value)))
        # §9.1: no final to the INVITE within 64·T1 of the CANCEL: give the branch up.
        branch.timer = self._clock.callLater(self._cancel_wait_seconds, self._abandon, branch)

    def _abandon(self, branch: _InviteBranch) -> None:
        branch.timer = None
        if not branch.final and branch.result is not None:
            branch.result.cancel()

    def stop(self) -> None:
        """The service is stopping: no Timer C or CANCEL wait may fire after it."""
        for branch in self._branches:
            self._stop_timer(branch)

    @staticmethod
    def _stop_timer(branch: _InviteBranch) -> None:
        timer = branch.timer
        branch.timer = None
        if timer is not None and timer.active():
            timer.cancel()


def _ignore(response: SIPResponse) -> None:
    return None
