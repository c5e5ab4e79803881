"""REGISTER processing and the location service (RFC 3261 §10.3).

The relay reaches list members through the contacts bound here; the consent permission
server later watches online/offline transitions through :meth:`Registrar.add_listener`.
Bindings are looked up in memory, bounded per AOR and in total, and written through to
the permission store when one is given: a REGISTER is answered once its change is
committed (one row per contact it changes), and a restarted registrar starts from the
unexpired bindings (:meth:`Registrar.load`), so members stay reachable without
re-registering. Expiry is driven by the injected clock with one timer per AOR, set for
its earliest binding; an expired binding is never used, before or after a restart.

A binding is a translation (RFC 5360: the relay sends the AOR's requests to the
contact), so it never reaches past the address that registered it: a contact whose host
is not the IP address the REGISTER came from is reached at that address instead (UDP,
where a UA behind a NAT is reached too) or over its registering connection (TCP, TLS),
and not at all once that connection is gone (:func:`registered_route`). A user can
therefore not point the relay, or a list's traffic, at a third party's host.

Not implemented: Path (RFC 3327), GRUU (RFC 5627), outbound flows (RFC 5626) and
third-party registration (a user registers only their own AOR, else 403).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from relayd.consent.store import IPermissionStore, StoreChange, StoredBinding, StoreUnavailable
from relayd.logs import logger
from relayd.sip.auth import SIPAuthenticator
from relayd.sip.message import SIPRequest, SIPResponse, SIPStatus, make_response
from relayd.sip.resolve import Target
from relayd.sipuri import SIPURI, NameAddr, SIPURIError

__all__ = [
    "Binding",
    "PresenceListener",
    "Registrar",
    "RegistrarLimits",
    "Unreachable",
    "registered_route",
    "source_of",
]

PresenceListener = Callable[[str, bool], object]
"""``listener(aor, online)``: called when an AOR gains its first or loses its last binding."""


def source_of(peer: object) -> str:
    """``"UDP 192.0.2.1 5060"``: the transport, address and port a REGISTER came from,
    as a binding keeps it; empty when unknown (a request not from the network)."""
    transport, host, port = (getattr(peer, name, None) for name in ("transport", "host", "port"))
    if isinstance(transport, str) and isinstance(host, str) and isinstance(port, int):
        return f"{transport} {host} {port}"
    return ""


class Unreachable:
    """:func:`registered_route`'s answer for a binding that may not be reached at all."""


UNREACHABLE = Unreachable()


def registered_route(contact: SIPURI, source: str) -> Target | Unreachable | None:
    """Where a binding is reached, when not at its contact: ``None`` when the contact's
    host is the address its REGISTER came from (or the source is unknown: bindings
    stored before it was kept), so the contact is used as it is; the REGISTER's own UDP
    address when the contact names another host (a NAT's private address, a name, or
    somebody else's host); :data:`UNREACHABLE` for a stream source, whose connection
    (the only path back, RFC 5626 §5.3) is gone when this is asked."""
    transport, _, rest = source.partition(" ")
    host, _, port_text = rest.partition(" ")
    if not host or not port_text.isdigit():
        return None
    try:
        if ipaddress.ip_address(contact.host.strip("[]")) == ipaddress.ip_address(host):
            return None
    except ValueError:
        pass  # a name in the contact: not the address that registered it
    if transport == "UDP":
        return Target("UDP", host, int(port_text))
    return UNREACHABLE


@dataclass(frozen=True, slots=True)
class RegistrarLimits:
    """Expiry bounds (§10.2.1.1, §10.3 step 7) and memory bounds."""

    min_expires_seconds: int = 60
    default_expires_seconds: int = 3600
    max_expires_seconds: int = 7200
    max_contacts_per_aor: int = 10
    max_bindings: int = 100_000

    def __post_init__(self) -> None:
        if not 0 < self.min_expires_seconds <= self.default_expires_seconds:
            raise ValueError("need 0 < min_expires_seconds <= default_expires_seconds")
        if self.default_expires_seconds > self.max_expires_seconds:
            raise ValueError("need default_expires_seconds <= max_expires_seconds")
        if self.max_contacts_per_aor < 1 or self.max_bindings < 1:
            raise ValueError("contact and binding limits must be at least 1")


@dataclass(slots=True)
class Binding:
    """One contact of an AOR; ``call_id``/``cseq`` order updates (§10.3 step 7)."""

    contact: NameAddr
    expires_at: float
    call_id: str
    cseq: int
    q: float = 1.0
    source: str = ""
    """Where its REGISTER came from (:func:`source_of`)."""
    route: Target | Unreachable | None = field(init=False, default=None)
    """:func:`registered_route` of the contact and source, worked out once here rather
    than on every request routed to the binding."""

    def __post_init__(self) -> None:
        self.route = registered_route(self.contact.uri, self.source)

    @property
    def uri(self) -> SIPURI:
        return self.contact.uri

    def remaining_seconds(self, now: float) -> int:
        return max(0, int(self.expires_at - now + 0.5))

    @property
    def key(self) -> str:
        """The contact URI as the store keys the binding within its AOR."""
        return self.uri.format()

    def stored(self, aor: str) -> StoredBinding:
        return StoredBinding(
            aor,
            self.key,
            self.contact.format(),
            self.expires_at,
            self.call_id,
            self.cseq,
            self.q,
            self.source,
        )

    @classmethod
    def from_stored(cls, row: StoredBinding) -> Binding:
        return cls(
            NameAddr.parse(row.contact), row.expires, row.call_id, row.cseq, row.q, row.source
        )


@dataclass(slots=True)
class _Update:
    contact: NameAddr
    expires: int
    q: float


def _parse_q(value: str | None) -> float:
    if value is None:
        return 1.0
    try:
        q = float(value)
    except ValueError:
        raise SIPStatus(400, "Bad Contact q") from None
    if not 0.0 <= q <= 1.0:
        raise SIPStatus(400, "Bad Contact q")
    return q


def _parse_delta(text: str | None, what: str) -> int | None:
    """delta-seconds (§20.19); values past 2**32-1 are clamped like the RFC says."""
    if text is None:
        return None
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        raise SIPStatus(400, f"Bad {what}")
    return min(int(text[:12]), 2**32 - 1)


class Registrar:
    """REGISTER for one domain (plus ``local_hosts``: addresses UAs may put in the
    Request-URI instead of the domain name). ``authenticator`` None means open
    registration (tests, closed networks); ``store`` None keeps bindings in memory only."""

    log = logger()

    def __init__(
        self,
        domain: str,
        clock: IReactorTime,
        authenticator: SIPAuthenticator | None,
        limits: RegistrarLimits | None = None,
        local_hosts: frozenset[str] = frozenset(),
        store: IPermissionStore | None = None,
    ) -> None:
        self.domain = domain.lower()
        self._clock = clock
        self._auth = authenticator
        self._store = store
        self.limits = limits or RegistrarLimits()
        self._hosts = frozenset({self.domain, *(h.lower() for h in local_hosts)})
        self._bindings: dict[str, list[Binding]] = {}
        self._timers: dict[str, IDelayedCall] = {}
        self._count = 0
        self._listeners: list[PresenceListener] = []
        if store is not None:
            store.add_listener(self.store_changed)

    # -- queries for the relay ----------------------------------------------------------

    @property
    def binding_count(self) -> int:
        return self._count

    def is_online(self, aor: str) -> bool:
        return bool(self._live(aor))

    def contacts(self, aor: str) -> list[Binding]:
        """Live bindings of ``aor``, highest q first (§16.6 target ordering)."""
        return sorted(self._live(aor), key=lambda b: -b.q)

    def _live(self, aor: str) -> list[Binding]:
        now = self._clock.seconds()
        return [b for b in self._bindings.get(aor.lower(), ()) if b.expires_at > now]

    def add_listener(self, listener: PresenceListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: PresenceListener) -> None:
        self._listeners.remove(listener)

    async def load(self) -> None:
        """Start from the store's unexpired bindings (service start).

        An AOR that registered while this ran keeps what it registered: that is newer.
        The table's bounds hold: past them, stored bindings are left out (and logged).
        """
        if self._store is None:
            return
        now = self._clock.seconds()
        await self._store.expire_bindings(now)
        rows = await self._store.list_bindings(now, self.limits.max_bindings)
        by_aor: dict[str, list[Binding]] = {}
        skipped = 0
        for row in rows:
            try:
                binding = Binding.from_stored(row)
            except SIPURIError:
                skipped += 1
                continue
            by_aor.setdefault(row.aor, []).append(binding)
        for aor, bindings in by_aor.items():
            room = self.limits.max_bindings - self._count
            if aor in self._bindings or room <= 0:
                skipped += len(bindings)
                continue
            kept = sorted(bindings, key=lambda b: -b.q)[
                : min(room, self.limits.max_contacts_per_aor)
            ]
            skipped += len(bindings) - len(kept)
            self._replace(aor, kept)
        self.log.info(
            "{count} registered contacts restored from the store ({skipped} left out)",
            count=self._count,
            skipped=skipped,
        )

    def store_changed(self, change: StoreChange) -> None:
        """Apply a registration another node sharing the store committed, so that a
        UA registered there is reached from here too.  Changes arrive in the order
        they were committed; this node's own are in the table already."""
        if change.kind != "binding" or not change.remote or change.aor is None:
            return
        aor = change.aor
        table = {b.key: b for b in self._bindings.get(aor, [])}
        for key in change.removed:
            table.pop(key, None)
        for row in change.bindings:
            try:
                binding = Binding.from_stored(row)
            except SIPURIError:
                continue
            table[binding.key] = binding
        room = self.limits.max_bindings - self._count + len(self._bindings.get(aor, []))
        kept = sorted(table.values(), key=lambda b: -b.q)
        self._replace(aor, kept[: max(0, min(room, self.limits.max_contacts_per_aor))])

    # -- REGISTER -----------------------------------------------------------------------

    async def handle(self, request: SIPRequest, peer: object = None) -> SIPResponse:
        """Process a REGISTER (§10.3 steps 1-8); fails with :class:`SIPStatus`.

        Everything is validated before the location table changes, so a rejected
        request leaves no partial update behind. The table changes at once (a request
        that follows sees it); the 200 waits for the store to commit the change, and a
        store failure is a 500, the UA's cue to register again.
        """
        response, aor, old = self._update(request, peer)
        if self._store is not None and old is not None:
            new = self._bindings.get(aor, [])
            kept = {id(b) for b in old}
            changed = [b.stored(aor) for b in new if id(b) not in kept]
            removed = sorted({b.key for b in old} - {b.key for b in new})
            if changed or removed:
                try:
                    await self._store.save_bindings(aor, changed, removed)
                except StoreUnavailable:
                    retry = [("Retry-After", str(StoreUnavailable.retry_after))]
                    raise SIPStatus(503, "Location Store Unavailable", headers=retry) from None
                except Exception:
                    self.log.failure("storing the bindings of {aor} failed", aor=aor)
                    raise SIPStatus(500, "Location Store Failed") from None
        return response

    def _update(
        self, request: SIPRequest, peer: object
    ) -> tuple[SIPResponse, str, list[Binding] | None]:
        """The table update of :meth:`handle`: its 200, the AOR and the AOR's bindings
        before it (None when nothing changed)."""
        if request.uri.scheme not in ("sip", "sips") or request.uri.host.lower() not in self._hosts:
            raise SIPStatus(404, "Domain Not Served")  # step 1
        aor = self._aor_of_to(request)  # step 5
        if self._auth is not None:  # steps 3-4
            identity = self._auth.authenticate(request, proxy=False, peer=peer)
            if identity.aor != aor:
                self.log.warn(
                    "{user} tried to register {aor} from {peer}",
                    user=identity.user,
                    aor=aor,
                    peer=peer,
                )
                raise SIPStatus(403, "Not Your Address Of Record")
        call_id = request.call_id or ""
        cseq = request.cseq.number
        contacts = request.headers.get_all("contact")
        expires_header = _parse_delta(request.headers.get("expires"), "Expires")
        now = self._clock.seconds()
        old = self._bindings.get(aor, [])
        if contacts == ["*"]:  # step 6
            if expires_header != 0:
                raise SIPStatus(400, "Wildcard Contact Needs Expires 0")
            self._check_order(aor, call_id, cseq, old)
            self._replace(aor, [])
            self.log.info("all bindings of {aor} removed", aor=aor)
            return make_response(request, 200), aor, old
        if "*" in contacts:
            raise SIPStatus(400, "Wildcard Contact Must Be Alone")
        if not contacts:
            return self._ok(request, aor, now), aor, None
        updates = self._updates(contacts, expires_header)
        new = self._apply(aor, updates, call_id, cseq, now, source_of(peer))
        self._replace(aor, new)
        return self._ok(request, aor, now), aor, old

    def _aor_of_to(self, request: SIPRequest) -> str:
        to = request.headers.get("to")
        try:
            uri = NameAddr.parse(to or "").uri
        except SIPURIError:
            raise SIPStatus(400, "Bad To Header") from None
        if uri.scheme not in ("sip", "sips") or not uri.user:
            raise SIPStatus(404, "Not Found")
        if uri.host.lower() not in self._hosts:
            raise SIPStatus(404, "Domain Not Served")
        return f"sip:{uri.user}@{self.domain}"

    def _updates(self, contacts: list[str], expires_header: int | None) -> list[_Update]:
        limits = self.limits
        default = limits.default_expires_seconds if expires_header is None else expires_header
        if len(contacts) > limits.max_contacts_per_aor:
            raise SIPStatus(403, "Too Many Contacts")
        updates: list[_Update] = []
        for text in contacts:
            try:
                contact = NameAddr.parse(text)
            except SIPURIError:
                raise SIPStatus(400, "Bad Contact") from None
            param = _parse_delta(contact.param("expires"), "Contact expires")
            expires = default if param is None else param
            if 0 < expires < limits.min_expires_seconds:  # step 7: 423 + Min-Expires
                raise SIPStatus(423, headers=[("Min-Expires", str(limits.min_expires_seconds))])
            expires = min(expires, limits.max_expires_seconds)
            q = _parse_q(contact.param("q"))
            # Store the contact without expires; the 200 writes the remaining time.
            kept = tuple(p for p in contact.params if p[0] != "expires")
            bare = NameAddr(contact.uri, contact.display_name, kept)
            updates.append(_Update(bare, expires, q))
        return updates

    @staticmethod
    def _check_order(aor: str, call_id: str, cseq: int, bindings: list[Binding]) -> None:
        """§10.3 steps 6-7: same Call-ID needs a higher CSeq, or the update is aborted."""
        for binding in bindings:
            if binding.call_id == call_id and cseq <= binding.cseq:
                raise SIPStatus(500, "Out Of Order CSeq", headers=[("Retry-After", "1")])

    def _apply(
        self,
        aor: str,
        updates: list[_Update],
        call_id: str,
        cseq: int,
        now: float,
        source: str = "",
    ) -> list[Binding]:
        current = [b for b in self._bindings.get(aor, []) if b.expires_at > now]
        result = list(current)
        for update in updates:
            existing = next((b for b in result if b.uri == update.contact.uri), None)
            if existing is not None:
                self._check_order(aor, call_id, cseq, [existing])
                result.remove(existing)
            if update.expires > 0:
                expires_at = now + update.expires
                binding = Binding(update.contact, expires_at, call_id, cseq, update.q, source)
                result.append(binding)
        if len(result) > self.limits.max_contacts_per_aor:
            raise SIPStatus(403, "Too Many Contacts")
        growth = len(result) - len(self._bindings.get(aor, []))
        if growth > 0 and self._count + growth > self.limits.max_bindings:
            self.log.warn("location table full ({count} bindings)", count=self._count)
            raise SIPStatus(503, "Location Table Full", headers=[("Retry-After", "60")])
        return result

    def _ok(self, request: SIPRequest, aor: str, now: float) -> SIPResponse:
        rows = [
            ("Contact", b.contact.with_param("expires", str(b.remaining_seconds(now))).format())
            for b in self.contacts(aor)
        ]
        return make_response(request, 200, headers=rows)

    # -- table maintenance --------------------------------------------------------------

    def _replace(self, aor: str, bindings: list[Binding]) -> None:
        was_online = bool(self._bindings.get(aor))
        self._count += len(bindings) - len(self._bindings.get(aor, []))
        timer = self._timers.pop(aor, None)
        if timer is not None and timer.active():
            timer.cancel()
        if bindings:
            self._bindings[aor] = bindings
            delay = min(b.expires_at for b in bindings) - self._clock.seconds()
            self._timers[aor] = self._clock.callLater(max(0.0, delay), self._expire, aor)
        else:
            self._bindings.pop(aor, None)
        online = bool(bindings)
        if online != was_online:
            self.log.info("{aor} is now {state}", aor=aor, state="online" if online else "offline")
            for listener in list(self._listeners):
                try:
                    listener(aor, online)
                except Exception:
                    self.log.failure("presence listener failed for {aor}", aor=aor)

    def _expire(self, aor: str) -> None:
        self._timers.pop(aor, None)
        now = self._clock.seconds()
        bindings = self._bindings.get(aor, [])
        live = [b for b in bindings if b.expires_at > now]
        self._replace(aor, live)
        self._forget(aor, [b.key for b in bindings if b.expires_at <= now])

    def _forget(self, aor: str, keys: Sequence[str]) -> None:
        """Delete expired bindings from the store too (a later load skips them anyway)."""
        if self._store is None or not keys:
            return
        d: Deferred[None] = self._store.save_bindings(aor, [], keys)
        d.addErrback(
            lambda failure: self.log.failure(
                "forgetting expired bindings of {aor}", failure, aor=aor
            )
        )

    def stop(self) -> None:
        """Cancel expiry timers (service shutdown); the memory table is dropped, the
        store keeps the bindings for the next start."""
        if self._store is not None:
            self._store.remove_listener(self.store_changed)
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._bindings.clear()
        self._count = 0
