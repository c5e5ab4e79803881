"""Pending consents: who asked whom, how often, until when (consent spec §(b)).

:class:`ConsentLedger` opens pending consents (one per sender, list, recipient; a
repeat refreshes), enforces the per-sender hourly rate (counted in the store, so every
node sharing it and every restart count together), and expires records on a timer
set for the earliest expiry (no polling); expiry is a store change like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from relayd.consent.policy import identity_key
from relayd.consent.store import ConsentState, IPermissionStore, PendingConsent, StoreChange
from relayd.logs import logger
from relayd.tokens import new_token, redact

_RATE_WINDOW = 3600.0
"""The rate's sliding window: consent requests per sender per hour."""


class RateExceeded(Exception):
    """A sender asked for more consents than the hourly rate allows (seed §6): the
    request is refused (SIP answers 503 with ``Retry-After: retry_after``)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ConsentLimits:
    """Abuse limits of the consent flow (seed §6, consent spec §(b) "Rate limits")."""

    max_list_size: int = 100
    consent_requests_per_hour: int = 30
    pending_consent_seconds: int = 86400


class ConsentLedger:
    """Pending consents: open/refresh with rate limits, expire on time (module doc)."""

    log = logger()

    def __init__(
        self,
        store: IPermissionStore,
        clock: IReactorTime,
        limits: ConsentLimits,
    ) -> None:
        self.store = store
        self.clock = clock
        self.limits = limits
        self._timer: IDelayedCall | None = None
        self._timer_at: float | None = None
        store.add_listener(self._store_changed)

    async def start(self) -> None:
        """Schedule expiry for the records already pending (restart)."""
        await self._schedule_next()

    def _store_changed(self, change: StoreChange) -> None:
        """A consent another node opened expires on time here too, should that node
        be gone by then (expiring a record twice changes nothing)."""
        record = change.consent
        if change.remote and record is not None and record.state is ConsentState.PENDING:
            self._schedule(record.expires)

    def stop(self) -> None:
        self.store.remove_listener(self._store_changed)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._timer_at = None

    async def open(
        self,
        sender: str,
        list_uri: str,
        recipient: str,
        methods: Sequence[str],
        *,
        counted_as: str | None = None,
    ) -> PendingConsent:
        """Open or refresh the record; raises :class:`RateExceeded` past the rate.

        The request counts against ``counted_as`` (default: ``sender``): a whole-list
        request (:mod:`relayd.consent.additions`) against the user whose list write
        caused it, in the same bucket as that user's own CONSENTs."""
        now = self.clock.seconds()
        who = counted_as if counted_as is not None else sender
        wait = await self.store.count_request(
            identity_key(who), now, self.limits.consent_requests_per_hour, _RATE_WINDOW
        )
        if wait is not None:
            self.log.warn("consent rate limit hit by {user}", user=who)
            raise RateExceeded(int(wait))
        expires = now + self.limits.pending_consent_seconds
        record = await self.store.open_consent(
            sender, list_uri, recipient, list(methods), new_token(), now, expires
        )
        self.log.info(
            "consent {consent} pending: {sender} asks {recipient} via {list_uri}"
            " (permission {token})",
            consent=record.id,
            sender=sender,
            recipient=recipient,
            list_uri=list_uri,
            token=redact(record.permission_token),
        )
        self._schedule(record.expires)
        return record

    async def count_trigger(self, recipient: str) -> None:
        """Count a recipient's request to be sent its consent requests again (RFC 5360
        §5.11, ``Trigger-Consent``); raises :class:`RateExceeded` past the hourly rate.

        The same rate as a sender's consent requests, in its own bucket (a recipient
        recovering links spends none of what they may ask of others as a sender): the
        relay answers a trigger with consent requests, so triggers must be as bounded
        as the requests themselves.
        """
        wait = await self.store.count_request(
            "trigger:" + identity_key(recipient),
            self.clock.seconds(),
            self.limits.consent_requests_per_hour,
            _RATE_WINDOW,
        )
        if wait is not None:
            self.log.warn("consent trigger rate limit hit by {user}", user=recipient)
            raise RateExceeded(int(wait))

    def _schedule(self, at: float) -> None:
        if self._timer_at is not None and self._timer_at <= at and self._timer is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = self._timer_at = None
        d = defer.ensureDeferred(self._expire())
        d.addErrback(lambda f: self.log.failure("consent expiry failed", f))

    async def _expire(self) -> None:
        now = self.clock.seconds()
        for record in await self.store.expire_consents(now):
            self.log.info("consent {consent} expired", consent=record.id)
        await self._schedule_next()

    async def _schedule_next(self) -> None:
        at = await self.store.next_consent_expiry()
        if at is not None:
            self._schedule(at)
