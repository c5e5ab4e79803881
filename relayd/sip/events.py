"""SIP-specific event notification (RFC 6665) for the consent packages (seed §§7, 8.1).

:class:`SubscriptionManager` is the notifier side: it accepts SUBSCRIBE (new dialog or
refresh; ``Expires`` negotiation with 423/Min-Expires and clamping to the maximum;
``Expires: 0`` ends it; 489 + ``Allow-Events`` for unknown packages; 481 for unknown
dialogs), sends the immediate NOTIFY, and sends a NOTIFY whenever a package reports a
change of a resource (:meth:`SubscriptionManager.resource_changed`; the relay calls it
from the store's change listener, so nothing polls). NOTIFYs are client transactions
(retransmitted on UDP by the transaction layer); at most one is outstanding per
subscription, changes made meanwhile are merged into the next one; 481 or 408 (also a
timeout) ends the subscription (RFC 6665 §4.2.2). Expiry sends a final NOTIFY with
``Subscription-State: terminated;reason=timeout``.

Packages (:class:`EventPackage`) decide who may subscribe to what and render state.
NOTIFY bodies of wait-permission and grant-permission are
``application/vnd.relayd.consent-status+xml`` (:func:`consent_status_body`; format in
docs/consent.md); those of consent-pending-additions are RFC 5362 §4 resource-lists
documents (:func:`pending_additions_body`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from lxml import etree
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from relayd.consent.lists import ListDirectory
from relayd.consent.permissions import PermissionCache
from relayd.consent.policy import identity_key
from relayd.consent.store import ConsentState, IPermissionStore, PendingConsent, StoreUnavailable
from relayd.consent.vocabulary import (
    CONSENT_STATUS_MIME_TYPE,
    CONSENT_STATUS_NAMESPACE,
    PENDING_ADDITIONS_ELEMENT,
    PENDING_ADDITIONS_NAMESPACE,
    RESOURCE_LISTS_MIME_TYPE,
    RESOURCE_LISTS_NAMESPACE,
)
from relayd.logs import logger
from relayd.sip.consent import ConsentURIs
from relayd.sip.message import (
    Headers,
    SIPHeaderError,
    SIPRequest,
    SIPResponse,
    SIPStatus,
    make_response,
    new_tag,
    unstamped_via,
)
from relayd.sip.transaction import new_branch
from relayd.sipuri import SIPURI, NameAddr, SIPURIError, parse_params

__all__ = [
    "ConsentStatusEntry",
    "EventPackage",
    "Grant",
    "GrantPermissionPackage",
    "PendingAdditionsPackage",
    "Subscription",
    "SubscriptionLimits",
    "SubscriptionManager",
    "WaitPermissionPackage",
    "consent_status_body",
    "pending_additions_body",
]


@dataclass(frozen=True, slots=True)
class ConsentStatusEntry:
    """One pending or settled consent as NOTIFY bodies show it."""

    id: str
    sender: str
    list_uri: str
    recipient: str
    methods: tuple[str, ...]
    state: str
    expires: float
    permission_uri: str | None = None

    @classmethod
    def of(
        cls, record: PendingConsent, state: str, permission_uri: str | None = None
    ) -> ConsentStatusEntry:
        """The entry for a stored consent, in the ``state`` the package reports."""
        return cls(
            record.id,
            record.sender,
            record.list_uri,
            record.recipient,
            record.methods,
            state,
            record.expires,
            permission_uri,
        )


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def consent_status_body(package: str, version: int, entries: Iterable[ConsentStatusEntry]) -> bytes:
    """The consent-status document (docs/consent.md): one ``<consent>`` per entry."""
    ns = f"{{{CONSENT_STATUS_NAMESPACE}}}"
    root = etree.Element(
        ns + "consent-status",
        nsmap={None: CONSENT_STATUS_NAMESPACE},  # type: ignore[dict-item]
        package=package,
        version=str(version),
    )
    for entry in entries:
        element = etree.SubElement(
            root,
            ns + "consent",
            id=entry.id,
            state=entry.state,
            sender=entry.sender,
            recipient=entry.recipient,
            list=entry.list_uri,
            methods=" ".join(entry.methods),
            expires=_timestamp(entry.expires),
        )
        if entry.permission_uri is not None:
            element.set("permission", entry.permission_uri)
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


@dataclass(frozen=True, slots=True)
class Grant:
    """What a package's ``authorize`` returns: the resource and the keys to index it by."""

    resource: str
    keys: frozenset[str]


class EventPackage(Protocol):
    name: str
    content_type: str

    async def authorize(self, request: SIPRequest, subscriber: str) -> Grant:
        """The resource ``subscriber`` subscribes to with ``request``; raise SIPStatus."""

    async def state(self, resource: str, version: int) -> tuple[bytes, str | None]:
        """Body for the next NOTIFY, and a termination reason when the resource is gone."""


@dataclass(frozen=True, slots=True)
class SubscriptionLimits:
    min_expires_seconds: int = 60
    default_expires_seconds: int = 3600
    max_expires_seconds: int = 86400
    max_per_subscriber: int = 100
    max_total: int = 100_000


@dataclass(eq=False)
class Subscription:
    """One subscription dialog (RFC 6665 §4.1.2, RFC 3261 §12)."""

    event: str
    event_id: str | None
    grant: Grant
    subscriber: str
    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: str
    remote_uri: str
    remote_target: SIPURI
    route_set: tuple[str, ...]
    destination: object
    remote_cseq: int
    expires_at: float
    local_cseq: int = 0
    version: int = 0
    timer: IDelayedCall | None = None
    #: A NOTIFY put off while the store was unavailable (:meth:`SubscriptionManager._notify`).
    retry: IDelayedCall | None = None
    busy: bool = False
    again: bool = False
    terminating: str | None = None
    done: bool = False
    notified: list[int] = field(default_factory=list)
    #: The state last sent, without its version: an unchanged state is not re-sent.
    last_state: bytes | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.call_id, self.local_tag, self.remote_tag)


SendRequest = Callable[[SIPRequest, object], "Deferred[SIPResponse]"]


def _event_of(request: SIPRequest) -> tuple[str, str | None]:
    value = request.headers.get("event")
    if not value:
        raise SIPStatus(489, "Event Header Missing")
    name, _, params = value.partition(";")
    try:
        event_id = dict(parse_params(";" + params)).get("id") if params else None
    except SIPURIError:
        raise SIPStatus(400, "Bad Event Header") from None
    return name.strip().lower(), event_id


def _expires_of(request: SIPRequest) -> int | None:
    value = request.headers.get("expires")
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit():
        raise SIPStatus(400, "Bad Expires")
    return min(int(value[:12]), 2**32 - 1)


class SubscriptionManager:
    """The notifier for every registered package (module doc)."""

    log = logger()

    def __init__(
        self,
        clock: IReactorTime,
        send: SendRequest,
        contact: Callable[[], str],
        limits: SubscriptionLimits | None = None,
    ) -> None:
        self.clock = clock
        self.send = send
        self.contact = contact
        self.limits = limits or SubscriptionLimits()
        self.packages: dict[str, EventPackage] = {}
        self._dialogs: dict[tuple[str, str, str], Subscription] = {}
        self._index: dict[tuple[str, str], set[Subscription]] = {}
        self._per_subscriber: dict[str, int] = {}
        self._sending: set[Deferred[None]] = set()

    def register(self, package: EventPackage) -> None:
        self.packages[package.name] = package

    @property
    def allow_events(self) -> tuple[str, ...]:
        return tuple(sorted(self.packages))

    @property
    def count(self) -> int:
        return len(self._dialogs)

    def subscriptions(self, event: str | None = None) -> list[Subscription]:
        return [s for s in self._dialogs.values() if event is None or s.event == event]

    # -- SUBSCRIBE ----------------------------------------------------------------------

    async def handle_subscribe(
        self, request: SIPRequest, subscriber: str, source: object
    ) -> SIPResponse:
        """Answer a SUBSCRIBE from an authenticated ``subscriber`` (RFC 6665 §4.2.1)."""
        event, event_id = _event_of(request)
        package = self.packages.get(event)
        if package is None:
            raise SIPStatus(489, headers=[("Allow-Events", ", ".join(self.allow_events))])
        expires = _expires_of(request)
        limits = self.limits
        if expires is None:
            expires = limits.default_expires_seconds
        elif 0 < expires < limits.min_expires_seconds:
            raise SIPStatus(423, headers=[("Min-Expires", str(limits.min_expires_seconds))])
        expires = min(expires, limits.max_expires_seconds)
        if request.to_tag is not None:
            return self._refresh(request, subscriber, event, expires)
        grant = await package.authorize(request, subscriber)
        if expires == 0:
            # A fetch (RFC 6665 §4.4.3): one NOTIFY with the state, then terminated.
            pass
        elif self.count >= limits.max_total:
            raise SIPStatus(503, "Too Many Subscriptions", headers=[("Retry-After", "60")])
        elif self._per_subscriber.get(subscriber, 0) >= limits.max_per_subscriber:
            raise SIPStatus(403, "Too Many Subscriptions")
        try:
            contact = NameAddr.parse(request.headers.get("contact") or "")
            from_value = request.headers.get("from") or ""
            to_value = request.headers.get("to") or ""
            remote_tag = request.from_tag
            cseq = request.cseq.number
        except (SIPURIError, SIPHeaderError):
            raise SIPStatus(400, "Bad Contact, From or CSeq") from None
        if remote_tag is None or not request.call_id:
            raise SIPStatus(400, "Missing From Tag or Call-ID")
        local_tag = new_tag()
        subscription = Subscription(
            event=event,
            event_id=event_id,
            grant=grant,
            subscriber=subscriber,
            call_id=request.call_id,
            local_tag=local_tag,
            remote_tag=remote_tag,
            local_uri=to_value,
            remote_uri=from_value,
            remote_target=contact.uri,
            route_set=tuple(request.headers.get_all("record-route")),
            destination=source,
            remote_cseq=cseq,
            expires_at=self.clock.seconds() + expires,
        )
        if expires == 0:
            subscription.terminating = "timeout"
        else:
            self._add(subscription)
            subscription.timer = self.clock.callLater(expires, self._expired, subscription)
        self.log.info(
            "{event} subscription from {user} to {uri} for {seconds}s",
            event=event,
            user=subscriber,
            uri=request.uri.format(),
            seconds=expires,
        )
        self.clock.callLater(0, self._notify, subscription)
        return self._ok(request, expires, local_tag)

    def _ok(self, request: SIPRequest, expires: int, local_tag: str) -> SIPResponse:
        return make_response(
            request,
            200,
            headers=[("Expires", str(expires)), ("Contact", f"<{self.contact()}>")],
            to_tag=local_tag,
        )

    def _refresh(
        self, request: SIPRequest, subscriber: str, event: str, expires: int
    ) -> SIPResponse:
        key = (request.call_id or "", request.to_tag or "", request.from_tag or "")
        subscription = self._dialogs.get(key)
        if subscription is None or subscription.event != event or subscription.done:
            raise SIPStatus(481, "Subscription Does Not Exist")
        if subscription.subscriber != subscriber:
            raise SIPStatus(403, "Not Your Subscription")
        try:
            cseq = request.cseq.number
        except SIPHeaderError:
            raise SIPStatus(400, "Bad CSeq") from None
        if cseq <= subscription.remote_cseq:
            raise SIPStatus(500, "CSeq Out Of Order", headers=[("Retry-After", "1")])
        subscription.remote_cseq = cseq
        if subscription.timer is not None and subscription.timer.active():
            subscription.timer.cancel()
        if expires == 0:
            subscription.terminating = "timeout"
        else:
            subscription.expires_at = self.clock.seconds() + expires
            subscription.timer = self.clock.callLater(expires, self._expired, subscription)
        self.clock.callLater(0, self._notify, subscription)
        return self._ok(request, expires, subscription.local_tag)

    # -- bookkeeping --------------------------------------------------------------------

    def _add(self, subscription: Subscription) -> None:
        self._dialogs[subscription.key] = subscription
        for key in subscription.grant.keys:
            self._index.setdefault((subscription.event, key), set()).add(subscription)
        who = subscription.subscriber
        self._per_subscriber[who] = self._per_subscriber.get(who, 0) + 1

    def _remove(self, subscription: Subscription) -> None:
        subscription.done = True
        if subscription.timer is not None and subscription.timer.active():
            subscription.timer.cancel()
        subscription.timer = None
        if subscription.retry is not None and subscription.retry.active():
            subscription.retry.cancel()
        subscription.retry = None
        if self._dialogs.pop(subscription.key, None) is None:
            return
        for key in subscription.grant.keys:
            group = self._index.get((subscription.event, key))
            if group is not None:
                group.discard(subscription)
                if not group:
                    del self._index[(subscription.event, key)]
        who = subscription.subscriber
        left = self._per_subscriber.get(who, 1) - 1
        if left > 0:
            self._per_subscriber[who] = left
        else:
            self._per_subscriber.pop(who, None)

    def _expired(self, subscription: Subscription) -> None:
        subscription.timer = None
        subscription.terminating = "timeout"
        self._notify(subscription)

    def resource_changed(self, event: str, key: str) -> None:
        """A package resource changed: NOTIFY every subscription indexed under ``key``."""
        for subscription in list(self._index.get((event, key), ())):
            self._notify(subscription)

    def stop(self) -> None:
        """Forget every subscription (service stop; no NOTIFYs, the sockets are closing).

        NOTIFYs in flight are abandoned too (cancelled while their state is read or
        their answer awaited): one would otherwise be sent, or retransmitted (Timer E),
        after the listeners closed, and fail with a transport error.
        """
        for subscription in list(self._dialogs.values()):
            self._remove(subscription)
        for sending in list(self._sending):
            sending.cancel()

    # -- NOTIFY -------------------------------------------------------------------------

    def _notify(self, subscription: Subscription) -> None:
        if subscription.retry is not None and subscription.retry.active():
            subscription.retry.cancel()
        subscription.retry = None
        if subscription.done and subscription.terminating is None:
            return
        if subscription.busy:
            subscription.again = True
            return
        subscription.busy = True
        d = defer.ensureDeferred(self._send_notify(subscription))
        self._sending.add(d)

        def settled(result: object) -> object:
            self._sending.discard(d)
            return result

        def failed(f: Failure) -> None:
            if not f.check(defer.CancelledError):
                self.log.failure("NOTIFY for {event} failed", f, event=subscription.event)

        d.addBoth(settled).addErrback(failed)

    async def _send_notify(self, subscription: Subscription) -> None:
        while True:
            subscription.again = False
            package = self.packages[subscription.event]
            version = subscription.version + 1
            resource = subscription.grant.resource
            try:
                # Version 0 renders the state alone, for comparison with the last one sent.
                state, gone = await package.state(resource, 0)
                body = b""
                if gone is None and subscription.terminating is None:
                    if state != subscription.last_state:
                        body, gone = await package.state(resource, version)
                else:
                    body, gone = await package.state(resource, version)
            except defer.CancelledError:
                raise  # stop(): send nothing more
            except StoreUnavailable as e:
                if subscription.terminating is None:
                    # The state is unknown, not gone: keep the subscription and tell
                    # it once the store answers again (a database restart).
                    self._retry_later(subscription, str(e))
                    return
                self.log.warn(
                    "{event} state unavailable for a final NOTIFY: {reason}",
                    event=subscription.event,
                    reason=_first_line(str(e)),
                )
                state, body, gone = b"", b"", None
            except Exception:
                self.log.failure("{event} state failed", event=subscription.event)
                state, body, gone = b"", b"", "noresource"
            reason = subscription.terminating or gone
            if reason is None and state == subscription.last_state:
                # RFC 6665 §4.2.2: NOTIFY reports changes; this subscriber's state
                # did not change (another consent of the recipient did, or a second
                # store event of the same grant).
                if subscription.again:
                    continue
                subscription.busy = False
                return
            subscription.version = version
            subscription.last_state = state
            request = self._build_notify(subscription, package.content_type, body, reason)
            if reason is not None:
                self._remove(subscription)
            response = await self.send(request, subscription.destination)
            subscription.notified.append(response.status)
            if response.status in (408, 481) and not subscription.done:
                self.log.info(
                    "{event} subscription of {user} ended by {code} to NOTIFY",
                    event=subscription.event,
                    user=subscription.subscriber,
                    code=response.status,
                )
                self._remove(subscription)
            if subscription.done or not subscription.again:
                subscription.busy = False
                return

    def _retry_later(self, subscription: Subscription, reason: str) -> None:
        """Put the NOTIFY off by the store's ``Retry-After``; a change meanwhile sends it
        sooner.  The subscriber keeps the state it had, which was true when sent."""
        delay = StoreUnavailable.retry_after
        self.log.warn(
            "{event} state unavailable ({reason}); NOTIFY again in {delay}s",
            event=subscription.event,
            reason=_first_line(reason),
            delay=delay,
        )
        subscription.busy = False
        subscription.again = False
        if subscription.retry is None or not subscription.retry.active():
            subscription.retry = self.clock.callLater(delay, self._notify, subscription)

    def _build_notify(
        self, subscription: Subscription, content_type: str, body: bytes, reason: str | None
    ) -> SIPRequest:
        """An in-dialog NOTIFY (RFC 3261 §12.2.1.1, RFC 6665 §4.2.2)."""
        subscription.local_cseq += 1
        headers = Headers()
        headers.add("Via", unstamped_via(new_branch()))
        headers.add("Max-Forwards", "70")
        for route in reversed(subscription.route_set):
            headers.add("Route", route)
        headers.add("From", f"{subscription.local_uri};tag={subscription.local_tag}")
        headers.add("To", subscription.remote_uri)
        headers.add("Call-ID", subscription.call_id)
        headers.add("CSeq", f"{subscription.local_cseq} NOTIFY")
        headers.add("Contact", f"<{self.contact()}>")
        event = subscription.event
        if subscription.event_id is not None:
            event += f";id={subscription.event_id}"
        headers.add("Event", event)
        if reason is not None:
            headers.add("Subscription-State", f"terminated;reason={reason}")
        else:
            remaining = max(1, int(subscription.expires_at - self.clock.seconds() + 0.5))
            headers.add("Subscription-State", f"active;expires={remaining}")
        if body:
            headers.add("Content-Type", content_type)
        return SIPRequest("NOTIFY", subscription.remote_target, headers, body)


# -- the consent packages ---------------------------------------------------------------


async def _permits_all(
    cache: PermissionCache, sender: str, list_uri: str, recipient: str, methods: Iterable[str]
) -> bool:
    """Whether ``recipient``'s documents let ``sender`` through ``list_uri`` for every
    one of ``methods``: what both packages report as ``granted``."""
    for method in methods:
        if not await cache.permitted(sender, list_uri, recipient, method):
            return False
    return True


class WaitPermissionPackage:
    """``wait-permission`` (seed §7): a sender watches one consent it asked for.

    Subscribed at the Call-Info URI of the 202 (``sip:wp-<consent id>@domain``), by the
    sender only (403 otherwise). The state shown is derived, not stored: ``granted``
    while the recipient's documents let the sender through for every requested method,
    else the record's own state (``pending``, ``denied``, ``expired``), and ``revoked``
    for a record once granted whose permission was deleted (seed §10). An expired or
    deleted record ends the subscription (``terminated;reason=noresource``).
    """

    name = "wait-permission"
    content_type = CONSENT_STATUS_MIME_TYPE

    def __init__(self, store: IPermissionStore, cache: PermissionCache) -> None:
        self.store = store
        self.cache = cache

    async def authorize(self, request: SIPRequest, subscriber: str) -> Grant:
        consent_id = ConsentURIs.wait_id(request.uri.user)
        record = await self.store.get_consent(consent_id) if consent_id else None
        if record is None:
            raise SIPStatus(404, "No Such Consent Request")
        if identity_key(record.sender) != identity_key(subscriber):
            raise SIPStatus(403, "Not Your Consent Request")
        return Grant(record.id, frozenset({record.id, "r:" + identity_key(record.recipient)}))

    async def status(self, record: PendingConsent) -> str:
        methods = record.methods or ("MESSAGE",)
        if await _permits_all(
            self.cache, record.sender, record.list_uri, record.recipient, methods
        ):
            return "granted"
        if record.state is ConsentState.GRANTED:
            return "revoked"
        return str(record.state)

    async def state(self, resource: str, version: int) -> tuple[bytes, str | None]:
        record = await self.store.get_consent(resource)
        if record is None:
            return consent_status_body(self.name, version, ()), "noresource"
        status = await self.status(record)
        entry = ConsentStatusEntry.of(record, status)
        expired = record.state is ConsentState.EXPIRED and status != "granted"
        gone = "noresource" if expired else None
        return consent_status_body(self.name, version, (entry,)), gone


class GrantPermissionPackage:
    """``grant-permission`` (seed §8.1): the permission server's view for a recipient.

    A recipient subscribes to their own AOR (authenticated as themselves, 403 else) and
    sees every pending consent request addressed to them, each with its Permission URI
    (the recipient is the one party allowed to learn it). The relay keeps CONSENTs for
    offline recipients pending, so this is how they learn of them (figure 3).
    """

    name = "grant-permission"
    content_type = CONSENT_STATUS_MIME_TYPE

    def __init__(self, store: IPermissionStore, permission_uri: Callable[[str, str], str]) -> None:
        self.store = store
        self.permission_uri = permission_uri

    async def authorize(self, request: SIPRequest, subscriber: str) -> Grant:
        if identity_key(request.uri.aor) != identity_key(subscriber):
            raise SIPStatus(403, "Only The Recipient May Subscribe")
        key = identity_key(subscriber)
        return Grant(key, frozenset({"r:" + key}))

    async def state(self, resource: str, version: int) -> tuple[bytes, str | None]:
        records = await self.store.list_consents(state=ConsentState.PENDING)
        entries = [
            ConsentStatusEntry.of(
                record,
                str(record.state),
                self.permission_uri(record.recipient, record.permission_token),
            )
            for record in records
            if identity_key(record.recipient) == resource
        ]
        return consent_status_body(self.name, version, entries), None


def pending_additions_body(entries: Iterable[tuple[str, str]]) -> bytes:
    """RFC 5362 §4 and §5.1.11: a resource-lists document, one ``<entry uri>`` per
    member with a ``<cs:consent-status>`` child (``pending``, ``waiting``, ``error``,
    ``denied``, ``granted``), in the entry's ``<any>`` extension place (§5.1.6)."""
    rl, cs = f"{{{RESOURCE_LISTS_NAMESPACE}}}", f"{{{PENDING_ADDITIONS_NAMESPACE}}}"
    root = etree.Element(
        rl + "resource-lists",
        nsmap={None: RESOURCE_LISTS_NAMESPACE, "cs": PENDING_ADDITIONS_NAMESPACE},  # type: ignore[dict-item]
    )
    element = etree.SubElement(root, rl + "list")
    for uri, state in entries:
        entry = etree.SubElement(element, rl + "entry", uri=uri)
        etree.SubElement(entry, cs + PENDING_ADDITIONS_ELEMENT).text = state
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


class PendingAdditionsPackage:
    """``consent-pending-additions`` (RFC 5362): a list owner watches its members' consent.

    Subscribed at the list URI, by the list's owner only (403 otherwise, 404 for no
    list); a list that is gone ends it (``noresource``), one with another owner now
    too (``rejected``). Every NOTIFY lists every member with its state, for the owner
    as sender (permissions and consent records are per sender; a request a list
    addition opened for every sender, :mod:`relayd.consent.additions`, is the owner's
    too):

    * ``granted``: the member's documents let the owner through the list for every
      method of the member's latest consent request (``MESSAGE`` without one);
    * ``waiting``: a consent request is open (sent, or held for an offline member);
    * ``denied``: the latest request was refused, or its grant since revoked;
    * ``error``: the latest request lapsed unanswered (the relay does not record a
      CONSENT that failed to arrive; an expiry is the failure it knows of);
    * ``pending``: no consent request yet (RFC 5362: none sent).

    Indexed under the list key (:meth:`list_key`): the relay names the list on a
    change of a consent record of it or of a member's permissions, and :attr:`ANY`
    when lists themselves changed. An unchanged state is not re-sent.
    """

    name = "consent-pending-additions"
    content_type = RESOURCE_LISTS_MIME_TYPE
    #: The key every subscription of this package is indexed under as well.
    ANY = "*"

    def __init__(
        self, store: IPermissionStore, cache: PermissionCache, directory: ListDirectory
    ) -> None:
        self.store = store
        self.cache = cache
        self.directory = directory

    @staticmethod
    def list_key(list_uri: str) -> str:
        return "l:" + identity_key(list_uri)

    async def authorize(self, request: SIPRequest, subscriber: str) -> Grant:
        found = self.directory.lookup(request.uri)
        if found is None:
            raise SIPStatus(404, "No Such List")
        if found.owner is None or identity_key(found.owner) != identity_key(subscriber):
            raise SIPStatus(403, "Only The List Owner May Subscribe")
        # The resource names the owner too: a list that changes hands ends it.
        resource = f"{found.uri} {identity_key(subscriber)}"
        return Grant(resource, frozenset({self.list_key(found.uri), self.ANY}))

    async def member_state(
        self, owner: str, list_uri: str, member: str, latest: PendingConsent | None
    ) -> str:
        """The RFC 5362 state of ``member`` (class doc)."""
        methods = (latest.methods if latest is not None else ()) or ("MESSAGE",)
        if await _permits_all(self.cache, owner, list_uri, member, methods):
            return "granted"
        if latest is None:
            return "pending"
        return {
            ConsentState.PENDING: "waiting",
            ConsentState.EXPIRED: "error",
        }.get(latest.state, "denied")

    async def state(self, resource: str, version: int) -> tuple[bytes, str | None]:
        list_uri, _, subscriber = resource.partition(" ")
        try:
            found = self.directory.lookup(SIPURI.parse(list_uri))
        except SIPURIError:
            found = None
        if found is None:
            return pending_additions_body(()), "noresource"
        owner = found.owner
        if owner is None or identity_key(owner) != subscriber:
            # RFC 6665 §4.2.2: the subscriber is no longer authorized.
            return pending_additions_body(()), "rejected"
        latest: dict[str, PendingConsent] = {}
        # The owner's requests, and those a list addition opened for every sender.
        askers = {subscriber, identity_key(found.uri)}
        for record in await self.store.list_consents(list_uri=found.uri):
            if identity_key(record.sender) in askers:
                latest[identity_key(record.recipient)] = record  # oldest first
        entries = [
            (
                member,
                await self.member_state(owner, found.uri, member, latest.get(identity_key(member))),
            )
            for member in found.members
        ]
        return pending_additions_body(entries), None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "store unavailable"
