"""The SIP consent relay: wires MESSAGE, CONSENT and SUBSCRIBE into the UAS core.

Data flow (STYLE 2.4, seed §11 figures 2 and 3):

* **MESSAGE** to a list URI (or with an RFC 5365 recipient list): digest-authenticate
  the sender as a proxy would (407), expand the list, and ask the
  :class:`~relayd.consent.permissions.PermissionCache` whether every member permits this sender,
  list and method. Anyone missing: **470** naming consent URIs, relayed to nobody.
  Everyone permits: list URIs are *proxied* (parallel branches, §16.7 best response to
  the sender); recipient lists are *exploded* (RFC 5365: one new request per recipient,
  ``202 Accepted`` to the sender at once). Each relayed copy asserts the sender
  (``P-Asserted-Identity``, any incoming one stripped) and carries ``Trigger-Consent``
  with the member's consent URI and ``target-uri`` = the list (RFC 5360 §5.11.2).
* **INVITE** to a user of our domain who is registered: authenticate the caller as for
  MESSAGE (407), then proxy it to the user's contacts (RFC 3261 §16, a binding the user
  made with their own credentials is their own translation, so no consent is asked),
  with our Record-Route when ``[sip] record_route`` is on; the SDP body is not touched
  (:class:`~relayd.sip.proxy.InviteContext` carries the responses).
* **INVITE** to a list URI: the MESSAGE rules with the method INVITE (a grant for
  MESSAGE does not cover it): 407, then **470** when any member has not permitted the
  caller to INVITE through the list, relayed to nobody; else forked in parallel to
  every member's branches, each copy asserting the caller and carrying
  ``Trigger-Consent``, responses per §16.7 as above. A consent-flow URI takes no
  INVITE (405, its Allow naming what it takes).
* **In-dialog requests** (the ACK for a 2xx, BYE, re-INVITE, UPDATE, INFO, MESSAGE...)
  whose top Route is the Record-Route we put into their dialog (its ``rr`` parameter is
  a MAC of the Call-ID and the caller's tag) are forwarded by loose routing (§16.4,
  §16.6, §16.12) without a consent check: the dialog was set up through us, by a
  request that passed it. Its Request-URI must be the remote target the dialog was set
  up with (:class:`~relayd.sip.dialogs.DialogTargets`): any other is 403, a dialog we
  hold no targets for 481, so the route opens no path to anyone else. The ACK goes on
  without a transaction (§16.11, dropped when it fails those checks), everything else
  in one.
* **CONSENT** to a consent URI (or to a member with ``Trigger-Consent: …;target-uri``):
  authenticate (401), open/refresh the pending consent (rate-limited), forward a CONSENT
  with ``Permission: <https Permission URI>`` to the member's registered contacts (or
  the URI itself when not ours), and answer **202** with
  ``Call-Info: <sip:wp-…>;purpose=wait-permission``. A member of our domain who is not
  registered gets nothing now: the relay keeps the request pending for them (the
  permission server role, seed §8.1) and they find it through ``grant-permission``.
  A member whose UA answers the CONSENT 405/501 (or every member, with ``[sip]
  consent_request = message``) is asked by a MESSAGE from the relay with grant and
  deny URIs (RFC 5360 §5.3); a PUBLISH (§5.6) or MESSAGE to ``sip:grant-…``/``sip:deny-…``
  answers.
* **PUBLISH** (empty body) from a member to the URI of a relayed copy's
  ``Trigger-Consent`` (RFC 5360 §5.8, §5.11.1), or a MESSAGE to it or carrying that
  header (for MESSAGE-only UAs): authenticate (401), the member only (403), within
  the hourly rate (503); the relay sends the member the consent requests of that list
  again (pending and granted ones, each with its grant and deny URIs), so a lost deny
  URI is recovered and revokes; 200 (PUBLISH) or 202 (MESSAGE). A PUBLISH to a grant
  or deny URI answers like a MESSAGE there (§5.6.1.3).
* **SUBSCRIBE** (``wait-permission``, ``grant-permission``): authenticate (401), then
  :class:`~relayd.sip.events.SubscriptionManager`.
* Store changes (XCAP PUT/DELETE, consent records opened/granted/expired) reach the
  caches and the subscriptions through one store listener.
* Every request first passes :meth:`ConsentRelay.check_request_uri`: a Request-URI
  that names no host and port of ours is 404 (RFC 3261 §8.2.2.1), before any handler.
"""

from __future__ import annotations

import hmac
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relayd.bounded import remember
from relayd.consent.additions import LIST_METHODS, whole_list_sender
from relayd.consent.answer import ACTIONS, Action, answer, answer_token, find_answer
from relayd.consent.ledger import ConsentLedger, RateExceeded
from relayd.consent.lists import ListDirectory, URIList, URIListError
from relayd.consent.permissions import PermissionCache, requested_methods
from relayd.consent.policy import identity_key
from relayd.consent.settle import settlement
from relayd.consent.store import (
    ConsentState,
    IPermissionStore,
    PendingConsent,
    StoreChange,
    StoreUnavailable,
)
from relayd.logs import logger
from relayd.sip.auth import SIPAuthenticator
from relayd.sip.consent import (
    ConsentURIs,
    TriggerConsentError,
    consent_needed,
    format_trigger_consent,
    parse_trigger_consent,
)
from relayd.sip.consent_request import (
    PLAIN_TEXT,
    Asks,
    answer_uri,
    parse_answer_user,
    request_body,
    request_note,
    takes_plain_text,
)
from relayd.sip.dialogs import DialogTargets
from relayd.sip.events import (
    GrantPermissionPackage,
    PendingAdditionsPackage,
    SubscriptionLimits,
    SubscriptionManager,
    WaitPermissionPackage,
)
from relayd.sip.message import (
    Headers,
    SIPRequest,
    SIPResponse,
    SIPStatus,
    make_response,
    new_tag,
    stateless_tag,
    unstamped_via,
)
from relayd.sip.proxy import Branch, InviteContext, Proxy, select_best, upstream
from relayd.sip.registrar import Registrar
from relayd.sip.resolve import SIPResolver, Target
from relayd.sip.sending import IRequestSender
from relayd.sip.transaction import (
    LocalResponse,
    ServerTransaction,
    TransactionState,
    new_branch,
)
from relayd.sip.uas import Handler, LoopDetector, UASCore, check_max_forwards
from relayd.sip.urilist import RecipientList, TooManyEntries, parse_recipient_list
from relayd.sipuri import SIPURI, NameAddr, SIPURIError
from relayd.tokens import redact

__all__ = ["ConsentRelay"]

ConsentLink = Callable[[PendingConsent, Action], str]
"""The HTTPS grant or deny link of a pending consent (the XCAP site's)."""

ASK_BY_MESSAGE = frozenset({405, 501})
"""Answers to a forwarded CONSENT that mean the UA cannot take one (RFC 3261 §21.4.6,
§21.5.2): the member is asked by MESSAGE instead (RFC 5360 §5.3)."""

MAX_CONSENT_METHODS = 8
MAX_TRIGGERED_REQUESTS = 8
"""At most this many consent requests (one per sender; the newest) go into the one
MESSAGE a ``Trigger-Consent`` sends, so its size stays bounded."""
TRIGGERABLE = frozenset({ConsentState.PENDING, ConsentState.GRANTED})
"""Records a trigger sends again: an open request (its grant link still acts) and a
grant (its deny link revokes it, RFC 5360 §5.8). Denied and expired ones ask nothing."""
MAX_CONSENT_NOTE_BYTES = 4096


def _new_request_headers(method: str, sender: str, recipient: str) -> Headers:
    """The §8.1.1 headers of a request the relay starts itself (a new dialog-less
    transaction on behalf of ``sender``); the transport stamps the Via."""
    headers = Headers()
    headers.add("Via", unstamped_via(new_branch()))
    headers.add("Max-Forwards", "70")
    headers.add("From", f"<{sender}>;tag={new_tag()}")
    headers.add("To", f"<{recipient}>")
    headers.add("Call-ID", new_tag() + new_tag())
    headers.add("CSeq", f"1 {method}")
    return headers


_FROMS: dict[str, NameAddr] = {}
_FROMS_SIZE = 4096


def _split_from(value: str) -> tuple[NameAddr, str]:
    """A From value parsed without its tag, and the tag part (``;tag=…`` or empty).

    A sender's From recurs with a new tag per request, so it is remembered without
    the tag (a header parameter, never part of the URI)."""
    tag = value.rfind(";tag=")
    key, rest = (value[:tag], value[tag:]) if tag > value.rfind(">") else (value, "")
    addr = _FROMS.get(key)
    if addr is None:
        addr = remember(_FROMS, _FROMS_SIZE, key, NameAddr.parse(key))
    return addr, rest


def _from_uri(value: str) -> SIPURI:
    return _split_from(value)[0].uri


def _relayed_from(value: str) -> str:
    """The From of a relayed copy: the sender's, without its display name.

    The display name is the sender's own words, which nothing checks (the users file
    has no names to put in its place), so relaying it would let any account appear as
    someone else next to its asserted identity."""
    addr, tag = _split_from(value)
    if addr.display_name is None:
        return value
    return NameAddr(addr.uri, None, addr.params).format() + tag


def _check_proxy_require(request: SIPRequest) -> None:
    """§16.3 step 5: we forward with no proxy extensions, so any Proxy-Require is 420."""
    required = request.headers.get_all("proxy-require")
    if required:
        raise SIPStatus(420, headers=[("Unsupported", ", ".join(required))])


_CHALLENGES = ("www-authenticate", "proxy-authenticate")


def carried_headers(status: int, responses: Sequence[SIPResponse]) -> list[tuple[str, str]]:
    """What the sender's response takes from the members' responses (§16.7 steps 7, 9).

    A 401/407 carries every challenge any member made (step 7: the sender may answer
    them all at once); a 3xx keeps the chosen response's Contact (its targets) and an
    error its Retry-After, which a response built afresh would lose. Nothing else of a
    member's response (a 2xx's Contact least of all) reaches the sender.
    """
    out: list[tuple[str, str]] = []
    if status in (401, 407):
        for response in responses:
            if response.status in (401, 407):
                for name in _CHALLENGES:
                    out.extend((name, value) for value in response.headers.get_raw(name))
        return out
    kept = "contact" if 300 <= status < 400 else "retry-after" if status >= 400 else None
    chosen = next((r for r in responses if r.status == status), None)
    if kept is not None and chosen is not None:
        out.extend((kept, value) for value in chosen.headers.get_raw(kept))
    return out


@dataclass(frozen=True, slots=True)
class _Delivery:
    """A MESSAGE that passed authentication, waiting for its permission decision."""

    request: SIPRequest
    sender: str
    list_uri: str
    members: Sequence[str]
    recipients: RecipientList | None
    max_forwards: int
    #: The sender may see who is missing in a 470: it owns the list, or wrote it.
    name_members: bool = False


class ConsentRelay:
    """The transaction user's MESSAGE/CONSENT/SUBSCRIBE handlers (module doc)."""

    log = logger()

    def __init__(
        self,
        *,
        clock: IReactorTime,
        transport: IRequestSender,
        uas: UASCore,
        registrar: Registrar,
        authenticator: SIPAuthenticator | None,
        store: IPermissionStore,
        directory: ListDirectory,
        cache: PermissionCache,
        ledger: ConsentLedger,
        uris: ConsentURIs,
        permission_uri: Callable[[str, str], str],
        resolver: SIPResolver | None = None,
        subscription_limits: SubscriptionLimits | None = None,
        loop_detector: LoopDetector | None = None,
        record_route: bool = True,
        consent_link: ConsentLink | None = None,
        consent_request: str = "consent",
        ask_list_additions: bool = False,
    ) -> None:
        self.clock = clock
        self.consent_link = consent_link
        self.consent_request = consent_request
        self.ask_list_additions = ask_list_additions
        self.record_route = record_route
        self.transport = transport
        self.uas = uas
        self.registrar = registrar
        self.authenticator = authenticator
        self.store = store
        self.directory = directory
        self.cache = cache
        self.ledger = ledger
        self.uris = uris
        self.permission_uri = permission_uri
        self.max_list_size = ledger.limits.max_list_size
        self.consent_needed = 0
        """Requests answered 470 (consent spec §(c)): some members lack permission."""
        self.proxy = Proxy(
            self._send,
            resolver or SIPResolver(),
            registrar,
            directory.is_local,
            loop_detector,
            clock=clock,
            flows=transport.flow_target,
        )
        self.subscriptions = SubscriptionManager(
            clock, self._send_in_dialog, self.contact, subscription_limits
        )
        self.wait_package = WaitPermissionPackage(store, cache)
        self.subscriptions.register(self.wait_package)
        self.subscriptions.register(GrantPermissionPackage(store, permission_uri))
        self.subscriptions.register(PendingAdditionsPackage(store, cache, directory))
        cache.add_observer(self._permissions_changed)
        directory.add_observer(self._lists_changed)
        if ask_list_additions:
            directory.add_addition_observer(self._list_gained)
        self._started = False
        #: Response contexts of INVITEs in progress (their timers hold them alive).
        self._invites: weakref.WeakSet[InviteContext] = weakref.WeakSet()
        #: The remote targets of the dialogs we Record-Routed (in-dialog requests go there only).
        self.dialogs = DialogTargets(clock)

    # -- life cycle ---------------------------------------------------------------------

    async def start(self, owners: Sequence[str] = ()) -> None:
        """Plug the handlers in, listen to the store, index lists of ``owners``."""
        self.store.add_listener(self._store_changed)
        self.uas.request_uri_check = self.check_request_uri
        self.uas.router = self.routed
        if self.uas.transactions is not None:
            self.uas.transactions.ack = self.route_ack
        self.uas.set_handler("INVITE", self.handle_invite)
        self.uas.set_handler("MESSAGE", self.handle_message)
        self.uas.set_screen("MESSAGE", self.challenge_message)
        self.uas.set_handler("CONSENT", self.handle_consent)
        self.uas.set_handler("PUBLISH", self.handle_publish)
        self.uas.set_handler("SUBSCRIBE", self.handle_subscribe)
        self._started = True
        await self.ledger.start()
        for owner in owners:
            await self.directory.load_owner(owner)

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self.store.remove_listener(self._store_changed)
        self.uas.request_uri_check = None
        self.uas.router = None
        if self.uas.transactions is not None:
            self.uas.transactions.ack = None
        for method in ("INVITE", "MESSAGE", "CONSENT", "PUBLISH", "SUBSCRIBE"):
            self.uas.set_handler(method, None)
        self.uas.set_screen("MESSAGE", None)
        self.ledger.stop()
        self.subscriptions.stop()
        for context in list(self._invites):
            context.stop()

    def contact(self) -> str:
        """Our UDP address: the Contact of the subscriptions' dialogs."""
        return self._route_uri("UDP")

    # -- plumbing -----------------------------------------------------------------------

    def _send(self, request: SIPRequest, target: Target) -> defer.Deferred[SIPResponse]:
        return self.transport.request(request, target)

    def _send_in_dialog(self, request: SIPRequest, source: object) -> defer.Deferred[SIPResponse]:
        return self.transport.request(request, self.transport.towards(source))

    def _store_changed(self, change: StoreChange) -> None:
        self.directory.store_changed(change)
        self.cache.store_changed(change)
        consent = change.consent
        if change.kind == "consent" and consent is not None:
            self.subscriptions.resource_changed("wait-permission", consent.id)
            recipient = "r:" + identity_key(consent.recipient)
            self.subscriptions.resource_changed("grant-permission", recipient)
            self.subscriptions.resource_changed(
                PendingAdditionsPackage.name, PendingAdditionsPackage.list_key(consent.list_uri)
            )

    def _lists_changed(self) -> None:
        self.subscriptions.resource_changed(
            PendingAdditionsPackage.name, PendingAdditionsPackage.ANY
        )

    def _permissions_changed(self, recipient_key: str) -> None:
        self.subscriptions.resource_changed("wait-permission", "r:" + recipient_key)
        for list_uri in self.directory.lists_with(recipient_key):
            key = PendingAdditionsPackage.list_key(list_uri)
            self.subscriptions.resource_changed(PendingAdditionsPackage.name, key)
        settled = defer.ensureDeferred(self._settle_granted(recipient_key))
        settled.addErrback(self._settling_failed, recipient_key)

    def _settling_failed(self, failure: Failure, recipient_key: str) -> None:
        """The store went away while settling: the records stay pending and the next
        change of the recipient's documents settles them."""
        if failure.check(StoreUnavailable):
            self.log.warn(
                "consents of {recipient} not settled now: store unavailable",
                recipient=recipient_key,
            )
            return
        self.log.failure("settling consents failed", failure)

    async def _settle_granted(self, recipient_key: str) -> None:
        """A recipient may grant through a document of their own rather than the
        Permission URI: the requests it now lets through are granted
        (:func:`relayd.consent.settle.settlement`), so that the permission server
        (grant-permission) stops listing them as open."""
        for record in await self.store.list_consents(state=ConsentState.PENDING):
            if identity_key(record.recipient) != recipient_key:
                continue
            answers = [
                "grant"
                if await self.cache.permitted(
                    record.sender, record.list_uri, record.recipient, method
                )
                else None
                for method in requested_methods(record)
            ]
            state = settlement(record, answers)
            if state is not None:
                await self.store.set_consent_state(record.id, state)

    # -- the Request-URI (§8.2.2.1) -------------------------------------------------------

    def check_request_uri(self, request: SIPRequest) -> None:
        """404 for a Request-URI nothing here accepts requests for (RFC 3261 §8.2.2.1).

        Ours are the relay's hosts (:meth:`ListDirectory.is_local`) with no port or a
        port we listen on: another port is another server. Elsewhere is a domain we
        are not responsible for, and the relay forwards nothing there (§16.5 would),
        so it is 404 too; the one exception is a CONSENT about a member of our list
        who lives elsewhere (``Trigger-Consent`` names the list, RFC 5360 §5.11.2).
        An OPTIONS asks about its Request-URI itself (§11), so a user there must name
        a list, a consent-flow URI or a registered AOR; an account not registered now
        is 480 (§16.5: no target), anyone else 404. Each other method's handler
        decides what its URIs may name.
        """
        uri = request.uri
        if not self.directory.is_local(uri):
            if request.method == "CONSENT" and "trigger-consent" in request.headers:
                return
            raise SIPStatus(404, "Not Served Here")
        if request.method != "OPTIONS" or not uri.user:
            return
        if self._relay_uri(uri):
            return
        self._registered_aor(uri.user)

    def _relay_uri(self, uri: SIPURI) -> bool:
        """Whether ``uri`` names a list or a consent-flow URI of ours (not a user)."""
        user = uri.user or ""
        return (
            self.directory.lookup(uri) is not None
            or self.uris.parse_consent_user(user) is not None
            or self.uris.wait_id(user) is not None
            or parse_answer_user(user) is not None
        )

    def _registered_aor(self, user: str) -> str:
        """The AOR of ``user`` in our domain while registered; an account that is not
        registered now is 480 (§16.5: no target), anyone else 404."""
        aor = f"sip:{user}@{self.registrar.domain}"
        if self.registrar.is_online(aor):
            return aor
        if self.directory.is_account(user):
            raise SIPStatus(480)
        raise SIPStatus(404)

    def _identity(self, request: SIPRequest, *, proxy: bool, peer: object) -> str:
        """The authenticated sender (seed §5); without an authenticator, the From AOR.

        An authenticated sender's From must name them (their user at one of our hosts):
        members see From, so relaying another name next to the asserted identity would
        let any account put words in someone else's mouth.
        """
        try:
            from_uri = _from_uri(request.headers.get("from") or "")
        except SIPURIError:
            raise SIPStatus(400, "Bad From") from None
        if self.authenticator is None:
            return from_uri.aor
        sender = self.authenticator.authenticate(request, proxy=proxy, peer=peer).aor
        user = sender.partition(":")[2].rpartition("@")[0]
        if from_uri.user != user or not self.directory.is_local(from_uri):
            self.log.warn(
                "{user} at {peer} sent {method} with From {from_uri}",
                user=sender,
                peer=peer,
                method=request.method,
                from_uri=from_uri.aor,
            )
            raise SIPStatus(403, "From Is Not The Authenticated User")
        return sender

    # -- MESSAGE ------------------------------------------------------------------------

    def challenge_message(self, request: SIPRequest) -> SIPResponse | None:
        """The 407 for a MESSAGE to one of our lists that carries no proxy credentials,
        sent without a server transaction, as proxies commonly do (Kamailio's stock
        configuration): every sender's first request gets it, and keeping 32 s of
        transaction state for each (Timer J) would double what a steady load holds.
        :meth:`handle_message` gives the same answer to the same request."""
        if self.authenticator is None or "proxy-authorization" in request.headers:
            return None
        if self.directory.lookup(request.uri) is None:
            return None
        if "proxy-require" in request.headers or request.max_forwards == 0:
            return None  # §16.3 steps 3 and 5 come before authentication (step 6)
        challenge = self.authenticator.challenge(proxy=True)
        return make_response(
            request, challenge.status, headers=challenge.headers, to_tag=stateless_tag(request)
        )

    def handle_message(
        self, txn: ServerTransaction, request: SIPRequest
    ) -> SIPResponse | defer.Deferred[SIPResponse]:
        """Synchronous whenever the permissions are cached and the members need no DNS,
        which is every request of a steady load."""
        answered = parse_answer_user(request.uri.user)
        if answered is not None and self.directory.is_local(request.uri):
            return defer.ensureDeferred(self._answer_by_uri(request, *answered))
        triggered = self._triggered(request)
        if triggered is not None:
            return defer.ensureDeferred(self._trigger(txn, request, *triggered))
        content_type = request.headers.get("content-type") or ""
        target = self.directory.lookup(request.uri)
        recipients = None
        if target is None:
            if not self.directory.is_local(request.uri):
                raise SIPStatus(404, "Not A List Served Here")
            try:
                recipients = parse_recipient_list(
                    content_type, request.body, max_entries=self.max_list_size
                )
            except TooManyEntries:
                raise SIPStatus(403, "Too Many Recipients") from None
            except URIListError as e:
                self.log.warn(
                    "bad recipient list from {peer}: {reason}", peer=txn.source, reason=str(e)
                )
                raise SIPStatus(400, "Bad Recipient List") from None
            if recipients is None:
                raise SIPStatus(404, "Not A List Served Here")
        max_forwards = check_max_forwards(request)
        _check_proxy_require(request)
        sender = self._identity(request, proxy=True, peer=txn.source)
        if target is not None:
            list_uri, members = target.uri, target.members
            name_members = self._owns(target, sender)
        else:
            assert recipients is not None
            list_uri, members = request.uri.aor, recipients.recipients
            name_members = True
        self._check_members(list_uri, members)
        delivery = _Delivery(
            request, sender, list_uri, members, recipients, max_forwards, name_members
        )
        missing = self.cache.missing_now(sender, list_uri, members, request.method)
        if missing is None:
            d = defer.ensureDeferred(self.cache.missing(sender, list_uri, members, request.method))
            return d.addCallback(lambda found: self._deliver(delivery, found))
        return self._deliver(delivery, missing)

    @staticmethod
    def _owns(target: URIList, sender: str) -> bool:
        """Whether ``sender`` owns ``target`` (and so may see who is missing in a 470)."""
        owner = target.owner
        return owner is not None and identity_key(owner) == identity_key(sender)

    def _check_members(self, list_uri: str, members: Sequence[str]) -> None:
        if len(members) > self.max_list_size:
            self.log.warn("list {uri} exceeds max_list_size", uri=list_uri)
            raise SIPStatus(403, "List Too Large")
        if not members:
            raise SIPStatus(480, "Empty List")

    def _deliver(
        self, delivery: _Delivery, missing: list[str]
    ) -> SIPResponse | defer.Deferred[SIPResponse]:
        request, sender, list_uri = delivery.request, delivery.sender, delivery.list_uri
        # Per-request outcomes are debug events: at thousands of requests a second
        # an info line each would cost more than the request (see docs/performance/diary.md).
        if missing:
            self.consent_needed += 1
            self.log.debug(
                "470 to {user} for {uri}: {count} of {total} members lack permission",
                user=sender,
                uri=list_uri,
                count=len(missing),
                total=len(delivery.members),
            )
            return consent_needed(
                request, list_uri, missing, self.uris, name_members=delivery.name_members
            )
        recipients = delivery.recipients
        if recipients is not None:
            self._explode(
                request,
                sender,
                list_uri,
                recipients.recipients,
                recipients.content_type,
                recipients.body,
            )
            return make_response(request, 202)
        detector = self.proxy.loop_detector
        loop_hash = detector.loop_hash(request) if detector is not None else None
        max_forwards = delivery.max_forwards

        def build(branch: Branch) -> SIPRequest:
            return self._relayed(request, branch, sender, list_uri, max_forwards, loop_hash)

        def answer(result: tuple[int, str, list[SIPResponse]]) -> SIPResponse:
            status, reason, responses = result
            self.log.debug(
                "{method} from {user} via {uri} relayed to {count} members: {code}",
                method=request.method,
                user=sender,
                uri=list_uri,
                count=len(delivery.members),
                code=status,
            )
            return make_response(request, status, reason, carried_headers(status, responses))

        return self.proxy.fork(delivery.members, build).addCallback(answer)

    def _trigger_consent(self, member: str, list_uri: str) -> str:
        """RFC 5360 §5.11.1: the URI a member sends a request to (or names in its own
        ``Trigger-Consent``) to be sent its consent request again; ``target-uri`` is
        the translation's URI, the list."""
        return format_trigger_consent(self.uris.consent_uri(list_uri, member), list_uri)

    def _relayed(
        self,
        request: SIPRequest,
        branch: Branch,
        sender: str,
        list_uri: str,
        max_forwards: int,
        loop_hash: str | None = None,
    ) -> SIPRequest:
        """The proxied copy for one branch (§16.6 plus the consent headers)."""
        copy = self._asserted(request, branch, sender, max_forwards, loop_hash)
        copy.headers._fields["trigger-consent"] = [self._trigger_consent(branch.member, list_uri)]
        return copy

    def _asserted(
        self,
        request: SIPRequest,
        branch: Branch,
        sender: str,
        max_forwards: int,
        loop_hash: str | None = None,
    ) -> SIPRequest:
        """§16.6 for one branch, asserting the authenticated sender (RFC 3325)."""
        copy = self.proxy.forward_copy(request, branch.uri, max_forwards, loop_hash)
        fields = copy.headers._fields
        fields["from"] = [_relayed_from(request.headers.get("from") or "")]
        fields["p-asserted-identity"] = [f"<{sender}>"]
        fields.pop("p-preferred-identity", None)  # RFC 3325 §9.1: replaced by the assertion
        return copy

    def _explode(
        self,
        request: SIPRequest,
        sender: str,
        list_uri: str,
        recipients: Sequence[str],
        content_type: str,
        body: bytes,
    ) -> None:
        """RFC 5365 §4: a new MESSAGE per recipient; results are only logged."""

        def build(branch: Branch) -> SIPRequest:
            headers = _new_request_headers("MESSAGE", sender, branch.member)
            headers.add("P-Asserted-Identity", f"<{sender}>")
            headers.add("Trigger-Consent", self._trigger_consent(branch.member, list_uri))
            headers.add("Content-Type", content_type)
            return SIPRequest(request.method, branch.uri, headers, body)

        d = self.proxy.fork(recipients, build)
        d.addCallback(
            lambda result: self.log.debug(
                "exploded {method} from {user} to {count} recipients: {code}",
                method=request.method,
                user=sender,
                count=len(recipients),
                code=result[0],
            )
        )

    # -- INVITE -------------------------------------------------------------------------

    def handle_invite(
        self, txn: ServerTransaction, request: SIPRequest
    ) -> defer.Deferred[SIPResponse | None] | defer.Deferred[None] | None:
        """An INVITE to a registered user of ours, proxied to their contacts (module
        doc), or to a list's consenting members; §16.3's checks in its order:
        Max-Forwards, Proxy-Require, then the caller's credentials, as for MESSAGE."""
        uri = request.uri
        found = self.directory.lookup(uri)
        if found is None and (self._relay_uri(uri) or not uri.user):
            allow = ", ".join(m for m in self.uas.allow.split(", ") if m != "INVITE")
            raise SIPStatus(405, headers=[("Allow", allow)])
        max_forwards = check_max_forwards(request)
        _check_proxy_require(request)
        sender = self._identity(request, proxy=True, peer=txn.source)
        if found is not None:
            return defer.ensureDeferred(
                self._invite_list(txn, request, sender, max_forwards, found)
            )
        assert uri.user  # a URI without a user was 405 above
        aor = self._registered_aor(uri.user)
        known = self.proxy.branches_now(aor)
        if known is not None:
            self._fork_invite(txn, request, sender, max_forwards, known)
            return None
        d = defer.ensureDeferred(self.proxy.branches(aor))
        return d.addCallback(
            lambda found: self._fork_invite(txn, request, sender, max_forwards, found)
        )

    async def _invite_list(
        self,
        txn: ServerTransaction,
        request: SIPRequest,
        sender: str,
        max_forwards: int,
        found: URIList,
    ) -> SIPResponse | None:
        """The MESSAGE consent check with the method INVITE (one grant per method,
        RFC 5360 §5.10), then one fork to every member's branches; synchronous when the
        answers are cached and no member needs DNS."""
        list_uri, members = found.uri, found.members
        self._check_members(list_uri, members)
        missing = self.cache.missing_now(sender, list_uri, members, request.method)
        if missing is None:
            missing = await self.cache.missing(sender, list_uri, members, request.method)
        if missing:
            return consent_needed(
                request, list_uri, missing, self.uris, name_members=self._owns(found, sender)
            )
        branches: list[Branch] = []
        for member in members:
            known = self.proxy.branches_now(member)
            branches.extend(known if known is not None else await self.proxy.branches(member))
        self._fork_invite(txn, request, sender, max_forwards, branches, list_uri)
        return None

    def _fork_invite(
        self,
        txn: ServerTransaction,
        request: SIPRequest,
        sender: str,
        max_forwards: int,
        branches: Sequence[Branch],
        list_uri: str | None = None,
    ) -> None:
        """Every branch with a target gets the INVITE (a list's with its
        ``Trigger-Consent``); no reachable branch is 480."""
        if txn.state is not TransactionState.PROCEEDING:
            return  # cancelled while the contacts were looked up
        token = None
        call_id, caller_tag = request.call_id or "", request.from_tag or ""
        if self.record_route:
            token = self.uris.route_token(call_id, caller_tag)
        inbound = _transport_of(txn.source)
        detector = self.proxy.loop_detector
        loop_hash = detector.loop_hash(request) if detector is not None else None
        requests = []
        for branch in branches:
            if branch.target is None:
                continue
            if list_uri is None:
                copy = self._asserted(request, branch, sender, max_forwards, loop_hash)
            else:
                copy = self._relayed(request, branch, sender, list_uri, max_forwards, loop_hash)
            if token is not None:  # §16.6 step 4
                for record_route in self._record_routes(inbound, branch.target.transport, token):
                    copy.headers.add_first("Record-Route", record_route)
            requests.append((copy, branch.target))

        if not requests:  # registered, but no contact can be reached now
            txn.respond(make_response(request, 480))
            return
        on_2xx = None
        if token is not None and caller_tag:
            self.dialogs.caller(call_id, caller_tag, request.headers.get("contact"))

            def on_2xx(response: SIPResponse) -> None:
                contact = response.headers.get("contact")
                self.dialogs.callee(call_id, caller_tag, response.to_tag, contact)

        self._invite_context(txn, request, on_2xx).start(requests)

    def _record_routes(self, inbound: str, outbound: str, token: str) -> list[str]:
        """Our Record-Route values, in the order they are pushed (§16.6 step 4).

        Each names the listener of its side's transport, so each party's in-dialog
        requests reach us the way its own requests do. When the call crosses from one
        transport to another, two are pushed (RFC 5658 §4): the caller's side first,
        the callee's on top, as the callee's route set starts at the top and the
        caller's at the bottom."""
        sides = [inbound] if inbound == outbound else [inbound, outbound]
        return [f"<{self._route_uri(transport)};lr;rr={token}>" for transport in sides]

    def _route_uri(self, transport: str) -> str:
        """The URI of our listener for ``transport`` (§19.1.1 ``transport`` parameter)."""
        host, port = self.transport.sent_by(transport)
        host = f"[{host}]" if ":" in host else host
        suffix = "" if transport == "UDP" else f";transport={transport.lower()}"
        return f"sip:{host}:{port}{suffix}"

    def _invite_context(
        self,
        txn: ServerTransaction,
        request: SIPRequest,
        on_2xx: Callable[[SIPResponse], None] | None = None,
    ) -> InviteContext:
        """The response context of ``request`` (§16.7), on the transaction layer's timers."""
        layer = self.uas.transactions
        timers = layer.timers if layer is not None else None
        final = partial(_best, request)
        context = InviteContext(
            self.transport.request, self.clock, txn, final, timers=timers, on_2xx=on_2xx
        )
        self._invites.add(context)
        return context

    # -- in-dialog requests on our route (§16.4, §16.12) ---------------------------------

    def _routes_after_ours(self, request: SIPRequest) -> list[str] | None:
        """The Route values after ours when the top one is the Record-Route this relay
        put into the request's dialog (an in-dialog request: it has a To tag), else
        ``None``."""
        if request.to_tag is None:
            return None
        routes = request.headers.get_all("route")
        if not routes:
            return None
        try:
            top = NameAddr.parse(routes[0]).uri
        except SIPURIError:
            return None
        token = top.param("rr")
        if token is None or not self.directory.is_local(top):
            return None
        call_id = request.call_id or ""
        for tag in (request.from_tag, request.to_tag):  # the caller's, either way
            if tag and hmac.compare_digest(token, self.uris.route_token(call_id, tag)):
                return self._after_our_second(routes[1:], token)
        return None

    def _after_our_second(self, routes: list[str], token: str) -> list[str]:
        """``routes`` without its first value when that is our other Record-Route of
        the same dialog (RFC 5658 §3.3: a double Record-Route is taken off whole)."""
        if routes:
            try:
                second = NameAddr.parse(routes[0]).uri
            except SIPURIError:
                return routes
            if second.param("rr") == token and self.directory.is_local(second):
                return routes[1:]
        return routes

    def _to_dialog_target(self, request: SIPRequest) -> bool | None:
        """Whether an in-dialog request on our route goes to the remote target its
        dialog was set up with (the To party's, :class:`DialogTargets`); ``None`` when
        we hold no targets for its dialog."""
        call_id = request.call_id or ""
        return self.dialogs.allows(call_id, request.from_tag, request.to_tag, request.uri)

    def routed(self, request: SIPRequest) -> Handler | None:
        """The UAS core's router: in-dialog requests on our route are forwarded."""
        return self.forward_in_dialog if self._routes_after_ours(request) is not None else None

    def _routed_copy(self, request: SIPRequest, routes: list[str]) -> SIPRequest:
        """§16.6 for a request on our route: our Route removed (§16.4), the rest and the
        Request-URI kept (loose routing), Max-Forwards decremented, our Via pushed."""
        max_forwards = check_max_forwards(request)
        headers = request.headers.copy()
        fields = headers._fields
        if routes:
            fields["route"] = list(routes)
        else:
            fields.pop("route", None)
        fields["max-forwards"] = [str(max_forwards)]
        headers.add_first("Via", unstamped_via(new_branch()))
        return SIPRequest(request.method, request.uri, headers, request.body)

    async def _next_hop(self, request: SIPRequest, routes: list[str]) -> Target:
        """§16.6 step 7: the next Route's URI if any, else the Request-URI (the remote
        target), located as a contact is (its flow, its address, RFC 3263)."""
        uri = request.uri
        if routes:
            try:
                uri = NameAddr.parse(routes[0]).uri
            except SIPURIError:
                raise SIPStatus(400, "Bad Route") from None
        found = self.proxy.branches_now(uri.format())
        if found is None:
            found = await self.proxy.branches(uri.format())
        for branch in found:
            if branch.target is not None:
                return branch.target
        raise SIPStatus(480, "Next Hop Unreachable")

    async def forward_in_dialog(
        self, txn: ServerTransaction, request: SIPRequest
    ) -> SIPResponse | None:
        """A request of a dialog we Record-Routed: proxied, never refused for consent
        (the dialog-creating request passed it). A re-INVITE gets an INVITE response
        context (its provisionals, 2xx and CANCEL); anything else one transaction."""
        routes = self._routes_after_ours(request) or []
        copy = self._routed_copy(request, routes)
        _check_proxy_require(request)  # §16.3 step 5, after Max-Forwards (step 3)
        allowed = self._to_dialog_target(request)
        if not allowed:
            raise (
                SIPStatus(403, "Not This Dialog's Target")
                if allowed is False
                else SIPStatus(481, "Dialog Not Routed Here")
            )
        target = await self._next_hop(request, routes)
        if request.method == "INVITE":
            if txn.state is TransactionState.PROCEEDING:
                self._invite_context(txn, request).start([(copy, target)])
            return None

        def provisional(response: SIPResponse) -> None:
            if response.status > 100 and txn.state is TransactionState.PROCEEDING:
                txn.respond(upstream(response))

        response = await self.transport.request(copy, target, provisional)
        if request.method == "BYE" and 200 <= response.status < 300:
            self.dialogs.ended(request.call_id or "", request.from_tag, request.to_tag)
        if response.status == 503 or isinstance(response, LocalResponse):
            return _best(request, [response])  # §16.7 step 6: no 503 upstream
        return upstream(response)

    def route_ack(self, ack: SIPRequest, source: object) -> None:
        """The transaction layer's ACK hook: an ACK for a 2xx on our route goes on
        without a transaction (§16.11); any other is dropped."""
        routes = self._routes_after_ours(ack)
        if (
            routes is None
            or (ack.max_forwards is not None and ack.max_forwards <= 0)
            or not self._to_dialog_target(ack)
        ):
            self.log.debug("dropping an ACK not routed through us from {peer}", peer=source)
            return
        copy = self._routed_copy(ack, routes)

        def send(target: Target) -> None:
            self.transport.forward(copy, target)

        d = defer.ensureDeferred(self._next_hop(ack, routes)).addCallback(send)
        d.addErrback(
            lambda failure: self.log.warn(
                "cannot forward an ACK from {peer}: {reason}", peer=source, reason=failure.value
            )
        )

    # -- CONSENT ------------------------------------------------------------------------

    def _consent_target(self, request: SIPRequest) -> tuple[str, str]:
        """(list URI, member) a CONSENT is about.

        A consent URI is minted (and MAC-protected) by our own 470, so its pair is
        trusted as is; that also covers request-contained lists (RFC 5365), which have
        no stored membership. The ``Trigger-Consent`` form names a list and a member
        freely, so the member must be on that list now.
        """
        if self.directory.is_local(request.uri):
            parsed = self.uris.parse_consent_user(request.uri.user)
            if parsed is not None:
                return parsed
        trigger = request.headers.get("trigger-consent")
        if trigger is None:
            raise SIPStatus(404, "Unknown Consent Target")
        try:
            found = self.directory.lookup(parse_trigger_consent(trigger).target_uri)
        except TriggerConsentError as e:
            raise SIPStatus(400, str(e)) from None
        key = identity_key(request.uri.format())
        member = next((m for m in found.members if identity_key(m) == key), None) if found else None
        if found is None or member is None:
            raise SIPStatus(404, "Not A List Member")
        return found.uri, member

    async def handle_consent(self, txn: ServerTransaction, request: SIPRequest) -> SIPResponse:
        list_uri, member = self._consent_target(request)
        sender = self._identity(request, proxy=False, peer=txn.source)
        methods = tuple(
            m.strip()
            for m in (request.headers.get("consent-methods") or "").split(",")
            if m.strip()
        )
        if not methods:
            raise SIPStatus(400, "Missing Consent-Methods")
        if len(methods) > MAX_CONSENT_METHODS or not all(
            m.isalpha() and m.isupper() for m in methods
        ):
            raise SIPStatus(400, "Bad Consent-Methods")
        if len(request.body) > MAX_CONSENT_NOTE_BYTES:
            raise SIPStatus(413, "Consent Note Too Large")
        opened_at = self.clock.seconds()
        try:
            record = await self.ledger.open(sender, list_uri, member, methods)
        except RateExceeded as e:
            retry = [("Retry-After", str(e.retry_after))]
            raise SIPStatus(503, "Consent Request Rate Exceeded", headers=retry) from None
        permission = self.permission_uri(member, record.permission_token)
        if record.created < opened_at:
            # A refresh (one open record per sender, list, recipient): the recipient
            # already has the Permission URI; asking again would make CONSENT a spam tool.
            self.log.info("consent {consent} refreshed", consent=record.id)
        elif self.proxy.is_online(member):
            note_type = request.headers.get("content-type")
            note = (
                (note_type, request.body)
                if note_type and note_type.lower().startswith("text/plain") and request.body
                else None
            )
            self._forward_consent(sender, member, record, permission, note)
        else:
            self.log.info(
                "{recipient} is offline: consent {consent} kept for grant-permission",
                recipient=member,
                consent=record.id,
            )
        wait = self.uris.wait_uri(record.id)
        return make_response(
            request, 202, headers=[("Call-Info", f"<{wait}>;purpose=wait-permission")]
        )

    def _forward_consent(
        self,
        sender: str,
        member: str,
        record: PendingConsent,
        permission: str,
        note: tuple[str, bytes] | None = None,
    ) -> None:
        """Seed §6: the CONSENT towards the recipient, with the Permission URI and the
        ``text/plain`` ``note`` (its Content-Type and body), if any; a UA that cannot
        take one (or ``[sip] consent_request = message``) is asked by
        :meth:`_ask_by_message`."""
        if self.consent_request == "message":
            self._ask_by_message(member, record)
            return

        def build(branch: Branch) -> SIPRequest:
            headers = _new_request_headers("CONSENT", sender, member)
            headers.add("Consent-Methods", ", ".join(record.methods))
            headers.add("Permission", f"<{permission}>")
            headers.add("P-Asserted-Identity", f"<{sender}>")
            headers.add("Trigger-Consent", self._trigger_consent(member, record.list_uri))
            body = b""
            if note is not None:
                headers.add("Content-Type", note[0])
                body = note[1]
            return SIPRequest("CONSENT", branch.uri, headers, body)

        d = self.proxy.fork([member], build)

        def done(result: tuple[int, str, list[SIPResponse]]) -> None:
            self.log.info(
                "CONSENT to {recipient} answered {code} (permission {token})",
                recipient=member,
                code=result[0],
                # The token's fingerprint, as the ledger and XCAP log it (not the URI's).
                token=redact(record.permission_token),
            )
            if result[0] in ASK_BY_MESSAGE:
                self._ask_by_message(member, record)

        d.addCallback(done)

    # -- members added to a list (RFC 5360 §5.3) ------------------------------------------

    def _list_gained(self, gained: URIList) -> None:
        """A list write committed here added ``gained.members`` to ``gained.uri``."""
        if not self._started:
            return
        d = defer.ensureDeferred(self._ask_added(gained))
        d.addErrback(self._asking_failed, gained.uri)

    def _asking_failed(self, failure: Failure, list_uri: str) -> None:
        if failure.check(StoreUnavailable):
            self.log.warn(
                "members added to {list_uri} not asked: store unavailable", list_uri=list_uri
            )
            return
        self.log.failure("asking members added to a list failed", failure)

    async def _ask_added(self, gained: URIList) -> None:
        """RFC 5360 §5.3: ask each added member without a grant covering every sender
        of the list for one (:mod:`relayd.consent.additions`), as a sender's CONSENT
        asks (CONSENT or MESSAGE, grant-permission when offline). The requests count
        against the list's owner in the ledger's hourly rate; an open request is
        refreshed and asks nothing again, so a member removed and added back while
        it is open is asked once."""
        list_uri = gained.uri
        sender = whole_list_sender(list_uri)
        for member in gained.members:
            granted = [
                await self.cache.permitted(sender, list_uri, member, method)
                for method in LIST_METHODS
            ]
            if all(granted):
                continue
            opened_at = self.clock.seconds()
            # Open already: a refresh (also within one tick of a fake clock).
            was_open = await self.store.find_open_consent(sender, list_uri, member) is not None
            try:
                record = await self.ledger.open(
                    sender, list_uri, member, LIST_METHODS, counted_as=gained.owner
                )
            except RateExceeded:
                self.log.warn(
                    "members added to {list_uri} not asked: rate of {owner} exceeded",
                    list_uri=list_uri,
                    owner=gained.owner or list_uri,
                )
                return
            if was_open or record.created < opened_at:
                self.log.info("consent {consent} refreshed", consent=record.id)
            elif self.proxy.is_online(member):
                note = f"You were added to the list {list_uri}.".encode()
                permission = self.permission_uri(member, record.permission_token)
                self._forward_consent(sender, member, record, permission, (PLAIN_TEXT, note))
            else:
                self.log.info(
                    "{recipient} is offline: consent {consent} kept for grant-permission",
                    recipient=member,
                    consent=record.id,
                )

    def _answer_links(self, record: PendingConsent) -> dict[Action, tuple[str, str]]:
        """Per action, the SIP answer URI and the HTTPS link (empty without one)."""
        return {
            action: (
                answer_uri(self.uris.domain, action, answer_token(record, action)),
                self.consent_link(record, action) if self.consent_link is not None else "",
            )
            for action in ACTIONS
        }

    def _ask_by_message(self, member: str, *records: PendingConsent) -> None:
        """RFC 5360 §5.3: one MESSAGE from the relay (never from the sender) with the
        grant and deny URIs of ``records`` (:mod:`relayd.sip.consent_request`). Sent
        when a record is opened, like the CONSENT (a refresh sends nothing), and when
        the member asks again through ``Trigger-Consent`` (:meth:`_trigger`)."""
        asks = [(record, self._answer_links(record)) for record in records]
        content_type, body = request_body(asks)
        self._send_consent_message(member, asks, content_type, body, plain_retry=True)

    def _send_consent_message(
        self,
        member: str,
        asks: Asks,
        content_type: str,
        body: bytes,
        plain_retry: bool,
    ) -> None:
        """One consent request MESSAGE; a 415 whose ``Accept`` admits ``text/plain``
        gets the note alone, once (:func:`takes_plain_text`)."""

        def build(branch: Branch) -> SIPRequest:
            headers = _new_request_headers("MESSAGE", f"sip:{self.uris.domain}", member)
            headers.add("Content-Type", content_type)
            return SIPRequest("MESSAGE", branch.uri, headers, body)

        def done(result: tuple[int, str, list[SIPResponse]]) -> None:
            code, _reason, responses = result
            self.log.info(
                "consent request MESSAGE to {recipient} answered {code} (consent {consent})",
                recipient=member,
                code=code,
                consent=" ".join(record.id for record, _links in asks),
            )
            accept = [
                value for r in responses if r.status == 415 for value in r.headers.get_all("accept")
            ]
            if plain_retry and code == 415 and takes_plain_text(accept):
                note = request_note(asks).encode("utf-8")
                self._send_consent_message(member, asks, PLAIN_TEXT, note, plain_retry=False)

        self.proxy.fork([member], build).addCallback(done)

    async def _answer_by_uri(self, request: SIPRequest, action: Action, token: str) -> SIPResponse:
        """A PUBLISH (RFC 5360 §5.6.1.3) or MESSAGE to a SIP grant or deny URI answers
        the consent it names; the token is the capability (return routability), as the
        Permission URI is, so no digest."""
        record = await find_answer(self.store, token, action, self.clock.seconds())
        if record is None:
            raise SIPStatus(404, "Unknown Or Expired Consent Link")
        await answer(self.store, record, action, self.clock)
        self.log.info(
            "consent {consent} answered {action} by its SIP link", consent=record.id, action=action
        )
        return make_response(request, 200, headers=_published(request))

    # -- PUBLISH (RFC 5360 §5.6.1.3, §5.8) ----------------------------------------------

    def handle_publish(
        self, txn: ServerTransaction, request: SIPRequest
    ) -> SIPResponse | defer.Deferred[SIPResponse]:
        """The two PUBLISHes of RFC 5360: to a grant or deny URI of a consent request
        (§5.6.1.3, it answers the request) and, with an empty body, to the URI of a
        ``Trigger-Consent`` (§5.8, the relay sends the recipient its consent requests
        again). The relay keeps no event state (RFC 3903), so nothing else is
        published here (404) and a 2xx names no lasting publication."""
        answered = parse_answer_user(request.uri.user)
        if answered is not None:
            return defer.ensureDeferred(self._answer_by_uri(request, *answered))
        pair = self.uris.parse_consent_user(request.uri.user)
        if pair is None:
            raise SIPStatus(404, "Nothing Is Published Here")
        if request.body:
            raise SIPStatus(400, "Trigger-Consent PUBLISH Takes No Body")
        return defer.ensureDeferred(self._trigger(txn, request, *pair))

    # -- Trigger-Consent (RFC 5360 §5.11) ----------------------------------------------

    def _triggered(self, request: SIPRequest) -> tuple[str, str] | None:
        """(list URI, member) a MESSAGE asks to be sent consent requests about again, or
        None when it is no such request.

        RFC 5360 §5.8 and §5.11.1 have the recipient send a PUBLISH with an empty body
        to the URI of a ``Trigger-Consent`` the relay put into a relayed request
        (:meth:`handle_publish`). For a UA that sends MESSAGE only, two more forms
        reach the relay here: a MESSAGE *to* that URI, and a MESSAGE to a URI of ours
        that is not a list *carrying* that ``Trigger-Consent``. Each URI is one the
        relay minted (a MAC over list and member), so the pair is trusted as is; a
        ``target-uri`` naming another translation is refused, not ignored.
        """
        if not self.directory.is_local(request.uri):
            return None
        pair = self.uris.parse_consent_user(request.uri.user)
        if pair is not None:
            return pair
        value = request.headers.get("trigger-consent")
        if value is None or self.directory.lookup(request.uri) is not None:
            return None
        try:
            trigger = parse_trigger_consent(value)
        except TriggerConsentError as e:
            raise SIPStatus(400, str(e)) from None
        pair = (
            self.uris.parse_consent_user(trigger.uri.user)
            if self.directory.is_local(trigger.uri)
            else None
        )
        if pair is None:
            raise SIPStatus(404, "Unknown Trigger-Consent URI")
        if identity_key(trigger.target_uri.format()) != identity_key(pair[0]):
            raise SIPStatus(400, "Trigger-Consent target-uri Does Not Match")
        return pair

    async def _trigger(
        self, txn: ServerTransaction, request: SIPRequest, list_uri: str, member: str
    ) -> SIPResponse:
        """RFC 5360 §5.11.1: send the member the consent requests of this translation
        again, each with its grant and deny URIs (§5.8), so a member who lost a deny
        URI can still revoke. Only the member may ask (403 for anyone else), as often
        as :meth:`ConsentLedger.count_trigger` allows (503 with ``Retry-After``), and
        one MESSAGE goes to the member alone, holding at most
        :data:`MAX_TRIGGERED_REQUESTS` requests: a trigger is never amplified. A MESSAGE
        gets 202 (they are on their way), a PUBLISH the 200 of RFC 5360 figure 5.
        """
        requester = self._identity(request, proxy=False, peer=txn.source)
        if identity_key(requester) != identity_key(member):
            self.log.warn(
                "{user} at {peer} triggered consent for {member}",
                user=requester,
                peer=txn.source,
                member=member,
            )
            raise SIPStatus(403, "Only The Recipient May Trigger Consent")
        key = identity_key(member)
        records = [
            record
            for record in await self.store.list_consents(list_uri=list_uri)
            if record.state in TRIGGERABLE and identity_key(record.recipient) == key
        ][-MAX_TRIGGERED_REQUESTS:]
        if not records:
            raise SIPStatus(404, "No Consent Request To Send Again")
        try:
            await self.ledger.count_trigger(member)
        except RateExceeded as e:
            retry = [("Retry-After", str(e.retry_after))]
            raise SIPStatus(503, "Consent Trigger Rate Exceeded", headers=retry) from None
        self.log.info(
            "consent {consent} requested again by {recipient}",
            consent=" ".join(record.id for record in records),
            recipient=member,
        )
        self._ask_by_message(member, *records)
        if request.method == "PUBLISH":
            return make_response(request, 200, headers=_published(request))
        return make_response(request, 202)

    # -- SUBSCRIBE ----------------------------------------------------------------------

    async def handle_subscribe(self, txn: ServerTransaction, request: SIPRequest) -> SIPResponse:
        subscriber = self._identity(request, proxy=False, peer=txn.source)
        return await self.subscriptions.handle_subscribe(request, subscriber, txn.source)


def _published(request: SIPRequest) -> list[tuple[str, str]]:
    """What a 2xx to a PUBLISH carries (RFC 3903 §6 step 7): an entity-tag, and
    ``Expires: 0``, for the relay keeps no publication; nothing for other methods."""
    if request.method != "PUBLISH":
        return []
    return [("SIP-ETag", new_tag()), ("Expires", "0")]


def _transport_of(source: object) -> str:
    """The transport a request came over (``UDP``, ``TCP``, ``TLS``), from its source."""
    transport = getattr(source, "transport", "UDP")
    return transport if isinstance(transport, str) else "UDP"


def _best(request: SIPRequest, responses: Sequence[SIPResponse]) -> SIPResponse:
    """The caller's final response when no branch answered 2xx (§16.7 steps 6-9)."""
    status, reason = select_best(responses)
    return make_response(request, status, reason, carried_headers(status, responses))


def owners_from_users(entries: Sequence[tuple[str, str]], domains: Sequence[str]) -> list[str]:
    """Candidate list owners (XUIs) for every user of the users file (startup index)."""
    out: list[str] = []
    for user, _realm in entries:
        if "@" in user:
            candidates = [f"sip:{user}"]
        else:
            candidates = [f"sip:{user}@{domain}" for domain in domains]
        for candidate in candidates:
            if candidate not in out:
                out.append(candidate)
    return out
