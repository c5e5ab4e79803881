"""The SIP consent relay wired together, and the service that listens for it.

``build_sip`` connects the layers (RFC 3261 §16-§18 and the consent
framework, RFC 5360): transport → transactions → UAS core → ConsentRelay,
with the consent state (lists, permissions, pending requests) on the shared
permission store.  :class:`SIPService` binds ``[sip] listen`` and starts and
stops them in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort

from relayd.config import SIPConfig
from relayd.consent.ledger import ConsentLedger, ConsentLimits
from relayd.consent.lists import ListDirectory, URIList
from relayd.consent.permissions import PermissionCache
from relayd.consent.store import IPermissionStore
from relayd.digest import DigestAuthenticator
from relayd.net.endpoints import (
    EndpointSpec,
    datagram_server,
    listener_tls,
    parse_endpoint,
    stream_server_endpoint,
)
from relayd.net.listeners import Listeners
from relayd.net.tls import TLSMaterial
from relayd.sip.auth import SIPAuthenticator
from relayd.sip.consent import ConsentURIs
from relayd.sip.consent_relay import ConsentLink, ConsentRelay, owners_from_users
from relayd.sip.events import SubscriptionLimits
from relayd.sip.overload import LagMonitor, any_of
from relayd.sip.registrar import Registrar, RegistrarLimits
from relayd.sip.transaction import TransactionLayer
from relayd.sip.transport import UDP_MAX_DATAGRAM_BYTES, SIPTransportLayer
from relayd.sip.uas import Capabilities, LoopDetector, UASCore, transaction_pressure
from relayd.users import UsersFile


class SIPService(Listeners):
    """The SIP consent relay (``[sip] listen``): registrar, consent flow, subscriptions.

    It shares the XCAP service's store (closed by that service) and mints Permission
    URIs through it.
    """

    def __init__(
        self,
        consent_relay: ConsentRelay,
        transport: SIPTransportLayer,
        registrar: Registrar,
        reactor: Any,
        config: SIPConfig,
        tls: TLSMaterial,
        users: UsersFile,
        names: tuple[str, ...],
        overload: LagMonitor | None = None,
        request_listen: tuple[str, ...] = (),
    ) -> None:
        super().__init__("SIP")
        self.consent_relay = consent_relay
        self.transport = transport
        self.registrar = registrar
        self.users = users
        self.names = names
        """The names of this relay's users' addresses of record: SIP domain, host, realm."""
        self.overload = overload
        self.addresses: list[tuple[str, str, int]] = []
        """``(kind, host, port)`` of each bound listener, for tests and tools."""

        tls_context = listener_tls(tls)
        for text in config.listen:
            spec = parse_endpoint(text)
            if spec.kind == "udp":
                protocol = transport.datagram_protocol()
                udp = datagram_server(reactor, spec, protocol, UDP_MAX_DATAGRAM_BYTES)
                self.add_datagram(spec, udp, protocol)
            else:
                endpoint = stream_server_endpoint(reactor, spec, tls_context)
                name = "TLS" if spec.kind == "ssl" else "TCP"
                self.add_stream(spec, endpoint, transport.stream_factory(name))
        # A worker's own UDP socket for the requests it sends (SIPTransportLayer).
        for text in request_listen:
            spec = parse_endpoint(text)
            protocol = transport.request_protocol()
            udp = datagram_server(reactor, spec, protocol, UDP_MAX_DATAGRAM_BYTES)
            self.add_datagram(spec, udp, protocol)

    def port_of(self, kind: str) -> int:
        """The bound port of the first ``kind`` (udp/tcp/ssl) listener."""
        return next(port for k, _, port in self.addresses if k == kind)

    def bound(self, spec: EndpointSpec, port: IListeningPort) -> None:
        transport = self.transport
        address: Any = port.getHost()
        name = {"udp": "UDP", "ssl": "TLS"}.get(spec.kind, "TCP")
        if spec.kind != "udp":  # a UDP listener says so itself, and records its port
            transport.set_listen_port(name, address.port)
            self.log.info(
                "SIP listening on {kind}:{host}:{port}",
                kind=spec.kind,
                host=address.host,
                port=address.port,
            )
        self.addresses.append((spec.kind, address.host, address.port))
        if spec.interface:
            self.consent_relay.directory.add_local_host(spec.interface)
        self.consent_relay.directory.add_local_host(f"{transport.sent_by(name)[0]}")
        self.consent_relay.directory.add_local_port(address.port)

    def startService(self) -> None:
        super().startService()
        owners = owners_from_users(self.users.entries(), self.names)
        d = defer.ensureDeferred(self.consent_relay.start(owners))
        d.addErrback(lambda f: self.log.failure("SIP consent relay failed to start", f))
        loaded = defer.ensureDeferred(self.registrar.load())
        loaded.addErrback(lambda f: self.log.failure("restoring registrations failed", f))
        if self.overload is not None:
            self.overload.start()

    def stopService(self) -> defer.Deferred[None]:
        if self.overload is not None:
            self.overload.stop()
        self.consent_relay.stop()
        self.registrar.stop()
        self.transport.close_connections()
        if self.transport.transactions is not None:
            self.transport.transactions.stop()
        return super().stopService()


def build_sip(
    sip: SIPConfig,
    reactor: Any,
    *,
    hostname: str,
    domain: str,
    realm: str,
    users: UsersFile,
    tls: TLSMaterial,
    lists: tuple[URIList, ...],
    consent_key: bytes,
    digest: DigestAuthenticator,
    store: IPermissionStore,
    permission_uri: Callable[[str, str], str],
    consent_link: ConsentLink | None = None,
    loop_key: bytes | None = None,
    request_listen: tuple[str, ...] = (),
) -> SIPService:
    """The consent relay stack: transport → transactions → UAS core → ConsentRelay.

    ``domain`` is the SIP domain of the relay's users, ``hostname`` its own name,
    ``permission_uri`` mints the Permission URI of a consent request (XCAP's),
    ``consent_link`` its HTTPS grant and deny links.
    """
    authenticator = SIPAuthenticator(digest, domain)
    local_hosts = frozenset({hostname, "127.0.0.1", "localhost"})
    registrar = Registrar(
        domain,
        reactor,
        authenticator,
        local_hosts=local_hosts,
        store=store,
        limits=RegistrarLimits(max_bindings=sip.max_bindings),
    )
    # A wildcard listener has no address to put in our Via: say the relay's name.
    wildcards = ("", "0.0.0.0", "::")  # noqa: S104 - compared with, not bound to
    wildcard = any(parse_endpoint(text).interface in wildcards for text in sip.listen)
    transport = SIPTransportLayer(
        reactor,
        advertised_host=hostname if wildcard else None,
        idle_timeout_seconds=sip.idle_timeout_seconds,
        request_idle_timeout_seconds=sip.request_idle_timeout_seconds,
        max_connections=sip.max_connections,
        max_datagrams_per_source=sip.max_datagrams_per_source,
        # sips: members and transport=tls targets: the peers' trust roots if configured,
        # else the platform's; SNI and a service_identity check of the target's name.
        tls_creator=tls.client_creator,
    )
    detector = LoopDetector(transport.own_sent_by, loop_key)
    uas = UASCore(
        Capabilities(
            accept=("text/plain", "application/resource-lists+xml", "multipart/mixed"),
        ),
        registrar=registrar,
        loop_detector=detector,
    )
    transactions = TransactionLayer(
        reactor, transport.send, uas, max_server_transactions=sip.max_server_transactions
    )
    overload = LagMonitor(reactor, sip.overload_lag_ms / 1000) if sip.overload_lag_ms else None
    uas.overloaded = transaction_pressure(transactions)
    if overload is not None:
        uas.overloaded = any_of(uas.overloaded, overload.overloaded)
    transport.attach(transactions)
    uas.attach(transactions)
    uas.registered = transport.bind_flows
    directory = ListDirectory(
        store,
        domain,
        local_hosts,
        lists,
        is_account=lambda user: users.lookup(user, realm) is not None,
    )
    cache = PermissionCache(store, reactor)
    ledger = ConsentLedger(
        store,
        reactor,
        ConsentLimits(
            max_list_size=sip.max_list_size,
            consent_requests_per_hour=sip.consent_requests_per_hour,
            pending_consent_seconds=sip.pending_consent_seconds,
        ),
    )
    consent_relay = ConsentRelay(
        clock=reactor,
        transport=transport,
        uas=uas,
        registrar=registrar,
        authenticator=authenticator,
        store=store,
        directory=directory,
        cache=cache,
        ledger=ledger,
        uris=ConsentURIs(domain, consent_key or None),
        permission_uri=permission_uri,
        subscription_limits=SubscriptionLimits(
            min_expires_seconds=sip.subscription_expires_min_seconds,
            default_expires_seconds=sip.subscription_expires_seconds,
            max_expires_seconds=sip.subscription_expires_max_seconds,
            max_per_subscriber=sip.max_subscriptions_per_user,
        ),
        loop_detector=detector,
        record_route=sip.record_route,
        consent_link=consent_link,
        consent_request=sip.consent_request,
        ask_list_additions=sip.ask_list_additions,
    )
    # OPTIONS advertises the event packages the subscription manager serves (§11.2).
    uas.capabilities = replace(
        uas.capabilities, allow_events=consent_relay.subscriptions.allow_events
    )
    names = (domain, hostname, realm)
    return SIPService(
        consent_relay,
        transport,
        registrar,
        reactor,
        sip,
        tls,
        users,
        names,
        overload,
        request_listen=request_listen,
    )
