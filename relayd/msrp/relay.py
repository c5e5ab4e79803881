"""Relay decisions (RFC 4976 §6): AUTH, path checks and routing, without sockets.

The transport asks two questions of this module, "what do I answer to this
AUTH?" and "where may this request go?", and carries out the answer.  Every
refusal is an ``MSRPStatus``; nothing here writes to the network, so the
open-relay rules are tested directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from relayd.bounded import remember
from relayd.digest import (
    DigestAuthenticator,
    DigestCredentials,
    DigestError,
    DigestSuccess,
    parse_credentials,
)
from relayd.logs import logger
from relayd.msrp.message import (
    MSRPRequest,
    MSRPResponse,
    MSRPStatus,
    make_response,
    parse_expires,
)
from relayd.msrp.sessions import Session, SessionTable
from relayd.msrp.uri import DEFAULT_PORT, MSRPURI, MSRPURIError, parse_path
from relayd.tokens import redact

KNOWN_METHODS = frozenset({"SEND", "REPORT", "AUTH"})

AUTH_OPAQUE = "msrp"
"""The ``opaque`` of our AUTH challenges (RFC 2617 §3.2.1: the server's choice,
returned unchanged).  We keep nothing in it, but the Blink / SIP SIMPLE client
stack (msrplib) copies it into its credentials unconditionally and fails on a
challenge without one.  It is not checked."""


class Hop(Protocol):
    """What the core needs to know about the connection a request came in on."""

    @property
    def is_tls(self) -> bool: ...

    @property
    def peer(self) -> str:
        """The remote address, for log lines."""

    @property
    def peer_names(self) -> frozenset[str]:
        """Verified certificate names of a peer relay (lower case); empty for clients."""

    def certificate_matches(self, host: str) -> bool: ...


@dataclass(frozen=True)
class AuthPolicy:
    realm: str
    expires_seconds: int
    expires_min_seconds: int
    expires_max_seconds: int
    allowed_users: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes next and with which paths.

    ``connection`` is set when the next hop is a client of ours (the session
    owner's connection); otherwise ``next_uri`` names the hop to connect to.
    """

    to_path: str
    from_path: str
    local_uri: str
    next_uri: MSRPURI
    connection: object | None
    session: Session | None
    #: Every session of ours the decision relied on (the first and the target).
    relied_on: tuple[Session, ...] = field(default=(), compare=False)
    #: Passed on unchanged to the worker that holds the session ([relay] workers):
    #: paths as they came, responses back as they come.
    transparent: bool = False


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    response: MSRPResponse
    #: A failed attempt that counts toward closing a client connection.
    failed: bool
    session: Session | None = None


class RelayCore:
    log = logger()

    def __init__(
        self,
        clock: IReactorTime,
        hostname: str,
        policy: AuthPolicy,
        digest: DigestAuthenticator,
        sessions: SessionTable | None = None,
        pool_names: Iterable[str] = (),
    ) -> None:
        self.clock = clock
        self.hostname = hostname.lower()
        self.pool_names = frozenset(name.lower().strip("[]") for name in pool_names)
        """Names of the pool this node serves AUTH for (RFC 4976 §8, Appendix A)."""
        self.policy = policy
        self.digest = digest
        self.sessions = sessions if sessions is not None else SessionTable(clock)
        self._local_hosts: set[str] = {self.hostname.strip("[]")}
        self._local_ports: set[int] = set()
        self._local_cache: dict[tuple[str, int | None], bool] = {}
        self.use_path_port: int | None = None
        #: With [relay] workers: a URI naming our host on a port that is not ours is
        #: another worker's, and a request for it is passed on (:meth:`route`).
        self.has_siblings = False

    # -- identity -----------------------------------------------------------

    def add_local_address(self, port: int, tls: bool, host: str | None = None) -> None:
        """Record a bound listener so URIs naming it are recognised as ours."""
        self._local_ports.add(port)
        if host and host not in ("0.0.0.0", "::"):  # noqa: S104 - a comparison, not a bind
            self._local_hosts.add(host.lower().strip("[]"))
        if tls and self.use_path_port is None:
            self.use_path_port = port
        self._local_cache.clear()

    def is_local(self, uri: MSRPURI) -> bool:
        """Does this URI name us?  Called several times per message: memoised."""
        key = (uri.host, uri.port)
        known = self._local_cache.get(key)
        if known is None:
            port = uri.port if uri.port is not None else DEFAULT_PORT
            known = uri.host.lower().strip("[]") in self._local_hosts and port in self._local_ports
            remember(self._local_cache, 4096, key, known)
        return known

    def is_pool_auth_target(self, uri: MSRPURI) -> bool:
        """Does this AUTH To-Path URI name our pool?  Clients AUTH to the pool's name and
        reach a node through its SRV records (RFC 4976 §8), so the URI carries no port or
        the one the record gave, which is one of ours; the Use-Path then names this node
        alone, where the session lives (Appendix A)."""
        if uri.host.lower().strip("[]") not in self.pool_names:
            return False
        return uri.port is None or uri.port in self._local_ports

    def is_sibling(self, uri: MSRPURI) -> bool:
        """Does this URI name another worker of this relay (our host, not our port)?"""
        if not self.has_siblings or self.is_local(uri):
            return False
        port = uri.port if uri.port is not None else DEFAULT_PORT
        return uri.host.lower().strip("[]") in self._local_hosts and port not in self._local_ports

    def session_uri(self, session: Session) -> str:
        host = self.hostname
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        port = self.use_path_port or DEFAULT_PORT
        return f"msrps://{host}:{port}/{session.session_id};tcp"

    # -- parsing helpers ------------------------------------------------------

    @staticmethod
    def paths(request: MSRPRequest) -> tuple[tuple[MSRPURI, ...], str, str]:
        to_text = request.headers.get("To-Path") or ""
        from_text = request.headers.get("From-Path") or ""
        try:
            to_path = parse_path(to_text)
            parse_path(from_text)
        except MSRPURIError as e:
            raise MSRPStatus(400, f"bad path: {e.reason}") from None
        return to_path, to_text, from_text

    # -- AUTH (§6.3) -----------------------------------------------------------

    def is_local_auth(self, request: MSRPRequest) -> bool:
        to_path, _, _ = self.paths(request)
        return request.method == "AUTH" and len(to_path) == 1

    def handle_auth(self, request: MSRPRequest, hop: Hop, owner: object) -> AuthOutcome:
        """Answer an AUTH addressed to this relay.

        ``owner`` is the connection object a client session is bound to.
        """
        to_path, to_text, from_text = self.paths(request)
        target = to_path[0]
        from_path = parse_path(from_text)
        if not (self.is_local(target) or self.is_pool_auth_target(target)):
            raise MSRPStatus(403, "not addressed to this relay", close=True)
        from_relay = bool(hop.peer_names)
        if from_relay:
            # The previous hop is a relay: its certificate must name the host
            # of the first From-Path URI (§6.3).
            if not hop.certificate_matches(from_path[0].host.lower().strip("[]")):
                return self._auth_refusal(
                    request, hop, None, 403, "certificate does not match From-Path"
                )
        elif not hop.is_tls:
            return self._auth_refusal(request, hop, None, 403, "AUTH requires TLS")
        header = request.headers.get("Authorization")
        if header is None:
            return AuthOutcome(self._challenge(request, stale=False), failed=False)
        credentials: DigestCredentials | None = None
        try:
            # Without uri= the digest-uri is the To-Path URI as sent (RFC 4976
            # §5.1's example, and the clients that follow it); with it, the
            # two must be the same URI (RFC 4975 §6.1).
            credentials = parse_credentials(header, default_uri=to_text.split()[0])
            if credentials.realm != self.policy.realm:
                raise DigestError("wrong realm")
            try:
                claimed = MSRPURI.parse(credentials.uri)
            except MSRPURIError:
                raise DigestError("digest uri is not an MSRP URI") from None
            if claimed != target:
                raise DigestError("digest uri does not match To-Path")
            success = self.digest.verify("AUTH", credentials, expected_uri=credentials.uri)
        except DigestError as e:
            # Who and from where, never the digest response or the nonce (they
            # are not in the reason); the logger escapes the peer's user name.
            self.log.warn(
                "AUTH from {peer} failed for user {user}: {reason}",
                peer=hop.peer,
                user=credentials.username if credentials is not None else None,
                reason=e.reason,
            )
            return AuthOutcome(self._challenge(request, stale=e.stale), failed=not e.stale)
        if self.policy.allowed_users and success.username not in self.policy.allowed_users:
            return self._auth_refusal(
                request, hop, success.username, 403, "user not allowed to use this relay"
            )
        lifetime = self._lifetime(request)
        if isinstance(lifetime, MSRPResponse):
            # A 423 asks for another Expires: the credentials were right, so
            # it is no failed attempt (one does not close the connection).
            return AuthOutcome(lifetime, failed=False)
        # The previous hop's URI: where requests towards the session go (§6.4).
        if from_relay:
            session = self.sessions.create_for_relay(from_path[0], success.username, lifetime)
        else:
            session = self.sessions.create_for_client(
                owner, from_path[0], success.username, lifetime
            )
        # Debug, not info: at hundreds of AUTHs a second the log line would
        # cost more than the AUTH; refusals are logged as warnings.
        self.log.debug(
            "AUTH accepted for {user}, session {session} for {seconds}s",
            user=success.username,
            session=redact(session.session_id),
            seconds=lifetime,
        )
        return AuthOutcome(self._auth_ok(request, success, session, lifetime), False, session)

    def _lifetime(self, request: MSRPRequest) -> int | MSRPResponse:
        policy = self.policy
        value = request.headers.get("Expires")
        if value is None:
            return policy.expires_seconds
        expires = parse_expires(value)
        if expires < policy.expires_min_seconds:
            return _end_to_end_response(
                request, 423, extra=[("Min-Expires", str(policy.expires_min_seconds))]
            )
        if expires > policy.expires_max_seconds:
            return _end_to_end_response(
                request, 423, extra=[("Max-Expires", str(policy.expires_max_seconds))]
            )
        return expires

    def _challenge(self, request: MSRPRequest, stale: bool) -> MSRPResponse:
        challenge = self.digest.challenge(stale=stale, opaque=AUTH_OPAQUE)
        return _end_to_end_response(request, 401, extra=[("WWW-Authenticate", challenge)])

    def _auth_refusal(
        self, request: MSRPRequest, hop: Hop, user: str | None, code: int, comment: str
    ) -> AuthOutcome:
        self.log.warn(
            "AUTH from {peer} refused for user {user}: {reason}",
            peer=hop.peer,
            user=user,
            reason=comment,
        )
        return AuthOutcome(_end_to_end_response(request, code, comment), failed=True)

    def _auth_ok(
        self, request: MSRPRequest, success: DigestSuccess, session: Session, lifetime: int
    ) -> MSRPResponse:
        # §5.1: the Use-Path names every relay from the client out to us: the
        # relays the AUTH came through (From-Path without the client, reversed)
        # and then our own new URI.
        relays = (request.headers.get("From-Path") or "").split()[:-1]
        use_path = " ".join([*reversed(relays), self.session_uri(session)])
        return _end_to_end_response(
            request,
            200,
            extra=[
                ("Use-Path", use_path),
                ("Expires", str(lifetime)),
                ("Authentication-Info", self.digest.authentication_info(success)),
            ],
        )

    # -- forwarding (§6.4) -------------------------------------------------------

    def route(self, request: MSRPRequest, hop: Hop, connection: object) -> Route:
        """Decide where a request goes; refuse anything that would make us an open relay.

        The first To-Path URI must be a live session we issued.  Then either
        the request comes from that session's owner (it may go anywhere
        next) or it goes towards the owner (from anyone who knows the URI,
        §6.4): the next URI must then be the one the owner authenticated
        from, compared per RFC 4975 §6.1, and the request goes down the
        client's own connection or to the peer relay at that ``msrps`` URI,
        the latter only over TLS, so a plain ``tcp:`` listener reaches
        nothing but our clients.
        Two clients of this relay reach each other through two of our URIs in
        a row: the sender must own the first, and the request then goes
        towards the owner of the second.
        """
        to_path, to_text, from_text = self.paths(request)
        texts = to_text.split()
        if not self.is_local(to_path[0]):
            if self.is_sibling(to_path[0]) and hop.is_tls and request.method != "AUTH":
                # A connection to this worker carried a request for another's URI (a
                # peer relay reusing its connection to this relay, by certificate):
                # that worker holds the session and decides.  Never an AUTH: a
                # session is bound to the connection that authenticated, and the link
                # between two workers is shared by everyone they pass on.
                return Route(to_text, from_text, texts[0], to_path[0], None, None, (), True)
            raise MSRPStatus(403, "first To-Path URI is not this relay", close=True)
        first = self._session(to_path[0])
        from_owner = self._is_owner(first, hop, connection)
        consumed = 1
        target = first
        if len(to_path) > 1 and self.is_local(to_path[1]):
            if not from_owner:
                raise MSRPStatus(403, "not allowed to relay through this session")
            target = self._session(to_path[1])
            consumed = 2
            if len(to_path) > 2 and self.is_local(to_path[2]):
                raise MSRPStatus(403, "too many hops through this relay")
        if len(to_path) <= consumed:
            raise MSRPStatus(403, "no next hop after this relay")
        next_uri = to_path[consumed]
        new_to = " ".join(texts[consumed:])
        new_from = " ".join([*reversed(texts[:consumed]), from_text])
        relied_on = (first,) if target is first else (first, target)
        if consumed == 1 and from_owner:
            # Sent by the owner: on to whatever the next hop is.
            return Route(new_to, new_from, texts[0], next_uri, None, first, relied_on)
        # Towards the owner of ``target``, and nowhere else.
        if not _leads_to_owner(next_uri, target):
            raise MSRPStatus(403, "next hop is not this session's owner")
        if target.owner_connection is not None:
            return Route(
                new_to, new_from, texts[0], next_uri, target.owner_connection, target, relied_on
            )
        if not hop.is_tls:
            # A plain listener only reaches clients connected to us: a relay
            # session would have us open connections on a stranger's behalf.
            raise MSRPStatus(403, "relay sessions are not served over plain TCP")
        return Route(new_to, new_from, texts[0], next_uri, None, target, relied_on)

    def still_valid(self, route: Route) -> bool:
        """May a route decided earlier on the same connection be reused?

        The decision depends only on the paths (the cache key), the
        connection and the sessions it relied on; it holds while each of
        those is still the live session under its id.
        """
        lookup = self.sessions.lookup
        return all([lookup(session.session_id) is session for session in route.relied_on])

    def _session(self, uri: MSRPURI) -> Session:
        if not uri.session_id:
            raise MSRPStatus(481, "no session in relay URI")
        session = self.sessions.lookup(uri.session_id)
        if session is None:
            raise MSRPStatus(481)
        return session

    @staticmethod
    def _is_owner(session: Session, hop: Hop, connection: object) -> bool:
        if session.owner_connection is not None:
            return session.owner_connection is connection
        owner = session.owner_relay
        if owner is None or not hop.peer_names:
            return False
        # Literal names first; a wildcard certificate needs the full check.
        return owner in hop.peer_names or hop.certificate_matches(owner)


def _leads_to_owner(uri: MSRPURI, session: Session) -> bool:
    """Is ``uri`` the next hop back towards the owner of ``session`` (RFC 4976 §6.4)?

    It must be the URI the owner authenticated from, equal per RFC 4975 §6.1
    (scheme, host, port, session id, transport): a host alone would let
    ``msrp://owner:25`` have us open a plain connection to any port of it.
    A peer relay is reached only over TLS.
    """
    return uri == session.owner_uri and (session.owner_relay is None or uri.scheme == "msrps")


def _end_to_end_response(
    request: MSRPRequest,
    code: int,
    comment: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
) -> MSRPResponse:
    """A response that travels back along the whole From-Path (AUTH and others)."""
    return make_response(
        request, code, comment, extra, to_path=request.headers.get("From-Path") or ""
    )


def addressed_to_us(response: MSRPResponse, is_local: Callable[[MSRPURI], bool]) -> bool:
    """Does the response's first To-Path URI name this relay (§6.4.3)?

    A transaction id alone is not proof: the response must also come back
    along the path we wrote into the request.
    """
    try:
        to_path = parse_path(response.headers.get("To-Path") or "")
    except MSRPURIError:
        return False
    return is_local(to_path[0])


def response_route(
    response: MSRPResponse, is_local: Callable[[MSRPURI], bool]
) -> tuple[str, str] | None:
    """Rewrite a response to forward it one hop back (§6.4.3), or None to drop it.

    The first To-Path URI must be ours; it moves to the front of From-Path, and
    so does a second one of ours (a request between two of our clients).
    """
    to_text = response.headers.get("To-Path") or ""
    from_text = response.headers.get("From-Path") or ""
    try:
        to_path = parse_path(to_text)
    except MSRPURIError:
        return None
    if not is_local(to_path[0]):
        return None
    consumed = 2 if len(to_path) > 2 and is_local(to_path[1]) else 1
    if len(to_path) <= consumed:
        return None
    texts = to_text.split()
    return " ".join(texts[consumed:]), " ".join([*reversed(texts[:consumed]), from_text])
