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
from twisted.python.failure import Failure

from relayd.bounded import remember
from relayd.logs import logger
from relayd.sip.message import SIPRequest, SIPResponse, make_response, unstamped_via
from relayd.sip.registrar import Registrar
from relayd.sip.resolve import ResolveError, SIPResolver, Target
from relayd.sip.transaction import new_branch
from relayd.sip.uas import LoopDetector
from relayd.sip.uri import SIPURI, SIPURIError

__all__ = ["Branch", "Proxy", "SendRequest", "select_best"]

MAX_CACHED_MEMBERS = 4096
"""Member URIs kept parsed between requests."""

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

    log = logger()

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
        self._members: dict[str, SIPURI | None] = {}

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

    def _contact_uris(self, member: str) -> list[SIPURI] | None:
        uri = self._member_uri(member)
        if uri is None:
            return None
        if self.is_local(uri):
            contacts = self.registrar.contacts(uri.aor) if self.registrar is not None else []
            return [binding.uri for binding in contacts]
        return [uri]

    def _branch(self, member: str, uri: SIPURI, targets: list[Target] | None) -> Branch:
        return Branch(member, uri, targets[0] if targets else None)

    def branches_now(self, member: str) -> list[Branch] | None:
        """:meth:`branches` when no DNS lookup is needed, else ``None``."""
        uris = self._contact_uris(member)
        if uris is None:
            return [Branch(member, SIPURI("sip", "invalid"), None)]
        out: list[Branch] = []
        for each in uris:
            try:
                targets = self.resolver.resolve_now(each)
            except ResolveError as e:
                self.log.warn("cannot resolve {uri}: {reason}", uri=each.aor, reason=str(e))
                out.append(Branch(member, each, None))
                continue
            if targets is None:
                return None
            out.append(self._branch(member, each, targets))
        return out

    async def branches(self, member: str) -> list[Branch]:
        """Targets for ``member``: every registered contact (ours) or the URI itself."""
        known = self.branches_now(member)
        if known is not None:
            return known
        uris = self._contact_uris(member) or []
        out: list[Branch] = []
        for each in uris:
            try:
                targets = await self.resolver.resolve(each)
            except ResolveError as e:
                self.log.warn("cannot resolve {uri}: {reason}", uri=each.aor, reason=str(e))
                out.append(Branch(member, each, None))
                continue
            out.append(self._branch(member, each, targets))
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
        if branch.target is None:
            return defer.succeed(
                make_response(request, 404 if branch.uri.host == "invalid" else 503)
            )
        try:
            d = self.send(request, branch.target)
        except Exception as e:
            d = defer.fail(e)

        def failed(failure: Failure) -> SIPResponse:
            self.log.warn(
                "sending {method} to {peer} failed: {reason}",
                method=request.method,
                peer=str(branch.target),
                reason=str(failure.value),
            )
            return make_response(request, 503)

        return d.addErrback(failed)

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
