"""Use-Path sessions handed out by AUTH (RFC 4976 §6.3).

A session id is a capability: whoever knows the URI may send *to* its owner,
and only to the URI the owner authenticated from (the first From-Path URI of
its AUTH, RFC 4976 §6.4).  Who may send *through* it is tied to the owner:
the one client connection that authenticated (a reconnect invalidates the
URI), or a peer relay identified by its certificate (valid over any
connection to that relay).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

from relayd.msrp.uri import MSRPURI
from relayd.tokens import new_session_id


@dataclass(eq=False, slots=True)
class Session:
    session_id: str
    user: str
    expires_at: float
    #: The first From-Path URI of the AUTH: the next hop back towards the
    #: owner, and the only next URI a request towards the session may name.
    owner_uri: MSRPURI
    #: The client connection that did the AUTH, for client sessions.
    owner_connection: object | None = None
    #: Lower-cased host of the peer relay the session was issued to.
    owner_relay: str | None = None
    created_at: float = field(default=0.0)

    def expires_in(self, now: float) -> int:
        return max(0, int(self.expires_at - now + 0.5))


class SessionTable:
    """Session id → Session, with expiry on an injected clock."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._by_connection: dict[object, set[str]] = {}
        #: Grows whenever a session leaves the table: while it has not changed,
        #: every session seen earlier is still here (until it expires).
        self.generation = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def create_for_client(
        self, connection: object, owner_uri: MSRPURI, user: str, lifetime_seconds: int
    ) -> Session:
        session = self._new(owner_uri, user, lifetime_seconds)
        session.owner_connection = connection
        self._by_connection.setdefault(connection, set()).add(session.session_id)
        return session

    def create_for_relay(self, owner_uri: MSRPURI, user: str, lifetime_seconds: int) -> Session:
        """A session for the peer relay named by ``owner_uri`` (its certificate's host)."""
        session = self._new(owner_uri, user, lifetime_seconds)
        session.owner_relay = owner_uri.host.lower().strip("[]")
        return session

    def _new(self, owner_uri: MSRPURI, user: str, lifetime_seconds: int) -> Session:
        now = self._clock.seconds()
        session_id = new_session_id()
        while session_id in self._sessions:  # pragma: no cover - 128 random bits
            session_id = new_session_id()
        session = Session(session_id, user, now + lifetime_seconds, owner_uri, created_at=now)
        self._sessions[session_id] = session
        return session

    def lookup(self, session_id: str) -> Session | None:
        """The live session with this id; expired ones are removed on sight."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self._clock.seconds():
            self._remove(session)
            return None
        return session

    def drop_connection(self, connection: object) -> int:
        """Invalidate every client session of a closed connection."""
        ids = self._by_connection.pop(connection, set())
        for session_id in ids:
            self._sessions.pop(session_id, None)
        if ids:
            self.generation += 1
        return len(ids)

    def sweep(self) -> int:
        """Remove expired sessions; returns how many."""
        now = self._clock.seconds()
        expired = [s for s in self._sessions.values() if s.expires_at <= now]
        for session in expired:
            self._remove(session)
        return len(expired)

    def _remove(self, session: Session) -> None:
        self.generation += 1
        self._sessions.pop(session.session_id, None)
        if session.owner_connection is not None:
            ids = self._by_connection.get(session.owner_connection)
            if ids is not None:
                ids.discard(session.session_id)
                if not ids:
                    del self._by_connection[session.owner_connection]
