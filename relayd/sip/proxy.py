"""Fan-out of a request to list members (RFC 3261 §16, seed §2 "translation").

:class:`Proxy` finds where each member can be reached (the registrar's contacts for an
AOR in our domain, RFC 3263 resolution for others), forwards one copy per target in
parallel client transactions (§16.6: Request-URI rewritten, Max-Forwards decremented,
our Via pushed with a loop-detecting branch, our own credentials removed) and picks the
response for the sender with :func:`select_best` (§16.7 step 6). A 2xx is answered at
once; the remaining branches still complete (non-INVITE requests are never CANCELled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from relayd.sip.message import SIPRequest, SIPResponse, make_response
from relayd.sip.registrar import Registrar
from relayd.sip.resolve import ResolveError, SIPResolver, Target
from relayd.sip.transaction import new_branch
from relayd.sip.uas import LoopDetector
from relayd.sip.uri import SIPURI, SIPURIError

__all__ = ["Branch", "Proxy", "SendRequest", "select_best"]

SendRequest = Callable[[SIPRequest, Target], "Deferred[SIPResponse]"]


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


@dataclass(frozen=True, slots=True)
class Branch:
    """One destination of a fork: the Request-URI to use and where to send it."""

    member: str
    uri: SIPURI
    target: Target | None


class Proxy:
    """Locates members and forks requests to them (module doc)."""

    log = Logger()

    def __init__(
        self,
        send: SendRequest,
        resolver: SIPResolver,
        registrar: Registrar | None,
        is_local: Callable[[SIPURI], bool],
        loop_detector: LoopDetector | None = None,
    ) -> None:
        self.send = send
        self.resolver = resolver
        self.registrar = registrar
        self.is_local = is_local
        self.loop_detector = loop_detector

    def is_online(self, member: str) -> bool:
        """Whether ``member`` can be reached now: registered if ours, always if remote."""
        try:
            uri = SIPURI.parse(member)
        except SIPURIError:
            return False
        if self.is_local(uri):
            return self.registrar is not None and self.registrar.is_online(uri.aor)
        return True

    async def branches(self, member: str) -> list[Branch]:
        """Targets for ``member``: every registered contact (ours) or the URI itself."""
        try:
            uri = SIPURI.parse(member)
        except SIPURIError:
            return [Branch(member, SIPURI("sip", "invalid"), None)]
        if self.is_local(uri):
            contacts = self.registrar.contacts(uri.aor) if self.registrar is not None else []
            uris = [binding.uri for binding in contacts]
        else:
            uris = [uri]
        out: list[Branch] = []
        for each in uris:
            try:
                targets = await self.resolver.resolve(each)
            except ResolveError as e:
                self.log.warn("cannot resolve {uri}: {reason}", uri=each.aor, reason=str(e))
                out.append(Branch(member, each, None))
                continue
            out.append(Branch(member, each, targets[0]))
        return out

    def forward_copy(self, request: SIPRequest, uri: SIPURI, max_forwards: int) -> SIPRequest:
        """§16.6 steps 1-8 on a copy of ``request`` for one branch."""
        headers = request.headers.copy()
        headers.remove("proxy-authorization")  # ours; never passed downstream (§22.3)
        headers.remove("route")
        headers.set("Max-Forwards", str(max_forwards))
        detector = self.loop_detector
        branch = detector.branch(request) if detector is not None else new_branch()
        headers.add_first("Via", f"SIP/2.0/UDP 0.0.0.0;branch={branch}")
        return SIPRequest(request.method, uri, headers, request.body)

    async def _one(self, branch: Branch, build: Callable[[Branch], SIPRequest]) -> SIPResponse:
        request = build(branch)
        if branch.target is None:
            return make_response(request, 404 if branch.uri.host == "invalid" else 503)
        try:
            return await self.send(request, branch.target)
        except Exception as e:
            self.log.warn(
                "sending {method} to {peer} failed: {reason}",
                method=request.method,
                peer=str(branch.target),
                reason=str(e),
            )
            return make_response(request, 503)

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
        result: Deferred[tuple[int, str, list[SIPResponse]]] = Deferred()
        responses: list[SIPResponse] = []

        async def run() -> None:
            per_member = [await self.branches(member) for member in members]
            pending: list[Deferred[SIPResponse]] = []
            for member, branches in zip(members, per_member, strict=True):
                if not branches:
                    responses.append(SIPResponse(offline_status, "Temporarily Unavailable"))
                    self.log.info("member {uri} is offline", uri=member)
                for branch in branches:
                    pending.append(defer.ensureDeferred(self._one(branch, build)))
            for d in pending:
                d.addCallback(seen)
            if pending:
                await defer.DeferredList(pending, consumeErrors=True)
            if not result.called:
                result.callback((*select_best(responses), list(responses)))

        def seen(response: SIPResponse) -> SIPResponse:
            responses.append(response)
            if 200 <= response.status < 300 and not result.called:
                result.callback((response.status, response.reason, list(responses)))
            return response

        d = defer.ensureDeferred(run())

        def failed(failure: object) -> None:
            self.log.failure("fork failed", failure)  # type: ignore[arg-type]
            if not result.called:
                result.callback((500, "Server Internal Error", list(responses)))

        d.addErrback(failed)
        return result
