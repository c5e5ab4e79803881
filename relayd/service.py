"""Wiring: a prepared config in (relayd.bootstrap), a ``MultiService`` out.

``build_service`` only connects objects: everything that can fail because of
the operator's files failed earlier, in ``prepare``.  Each surface's
listeners are Twisted's listener services, bound together when the services
start (``privilegedStartService`` under twistd, relayd.net.listeners); one
that cannot be bound is one critical log line and exit status 1, before the
reactor runs, so the daemon never serves with a surface missing.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable
from typing import Any, cast

from lxml import etree
from OpenSSL import crypto
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import CertificateOptions

from relayd import __version__
from relayd.bootstrap import Prepared
from relayd.config import XCAPConfig
from relayd.digest import DigestAuthenticator
from relayd.logs import logger
from relayd.msrp.relay import AuthPolicy, RelayCore
from relayd.msrp.transport import MSRPRelay
from relayd.net.endpoints import (
    EndpointSpec,
    listener_identity,
    parse_endpoint,
    stream_server_endpoint,
)
from relayd.net.listeners import Listeners
from relayd.net.tls import (
    ServerIdentity,
    client_connection_creator,
    server_context_factory,
    stdlib_server_context,
)
from relayd.sip.auth import SIPAuthenticator
from relayd.sip.consent import (
    ConsentLedger,
    ConsentLimits,
    ConsentURIs,
    ListDirectory,
    PermissionCache,
)
from relayd.sip.events import SubscriptionLimits
from relayd.sip.overload import LagMonitor, any_of
from relayd.sip.registrar import Registrar
from relayd.sip.relay import ConsentRelay, owners_from_users
from relayd.sip.transaction import TransactionLayer
from relayd.sip.transport import SIPTransportLayer, udp_service
from relayd.sip.uas import Capabilities, LoopDetector, UASCore, transaction_pressure
from relayd.xcap.auth import XCAPAuthorizer, permission_uri
from relayd.xcap.resource import XCAPResource, XCAPSite
from relayd.xcap.store import IPermissionStore, MemoryPermissionStore, SQLitePermissionStore
from relayd.xcap.usages import RESOURCE_LISTS_AUID, load_schemas

log = logger()


def exposed_listener_host(hostname: str, listener_hosts: Iterable[str]) -> str | None:
    """The first listener address off loopback, when ``hostname`` is no FQDN; else None.

    RFC 4976 puts the relay's FQDN in Use-Path so that the next hop can check
    it against the relay's certificate.  An IP literal or "localhost" is fine
    while every listener is on loopback (the defaults, the tests), so this
    only warns; it never refuses.
    """
    name = hostname.strip("[]").rstrip(".").lower()
    if name != "localhost":
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return None
    for host in listener_hosts:
        if not _is_loopback(host):
            return host
    return None


def _is_loopback(host: str) -> bool:
    """Loopback only: a wildcard (0.0.0.0, ::) or a name listens beyond this machine."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return host.lower() == "localhost"


class MSRPService(Listeners):
    """The MSRP listeners (``[msrp] listen``), their bound ports recorded as ours."""

    def __init__(
        self,
        relay: MSRPRelay,
        reactor: Any,
        identity: ServerIdentity,
        trust_roots: list[crypto.X509] | None,
        hostname: str,
    ) -> None:
        super().__init__("MSRP")
        self.relay = relay
        self.hostname = hostname
        self._listener_hosts: list[str] = []

        def tls_context(spec: EndpointSpec) -> ssl.SSLContext:
            # The standard library's TLS: half the memory per idle client (relayd.net.tlsio).
            return stdlib_server_context(listener_identity(identity, spec), trust_roots)

        for text in relay.config.listen:
            spec = parse_endpoint(text)
            endpoint = stream_server_endpoint(reactor, spec, tls_context)
            self.add_stream(spec, endpoint, relay.listener_factory(spec.kind == "ssl"))

    def bound(self, spec: EndpointSpec, port: IListeningPort) -> None:
        address: Any = port.getHost()
        self.relay.core.add_local_address(address.port, spec.kind == "ssl", spec.interface or None)
        self._listener_hosts.append(spec.interface or address.host)
        self.log.info(
            "MSRP listening on {kind}:{host}:{port}",
            kind=spec.kind,
            host=address.host,
            port=address.port,
        )

    def all_bound(self) -> None:
        """Warn once when peers beyond this machine get a Use-Path host they cannot verify."""
        exposed = exposed_listener_host(self.hostname, self._listener_hosts)
        if exposed is not None:
            self.log.warn(
                "[relay] hostname {hostname} is not a DNS name, and MSRP listens on {host}:"
                " peers cannot verify it against a certificate (RFC 4976 Use-Path:"
                " the relay's FQDN); set [relay] hostname",
                hostname=self.hostname,
                host=exposed,
            )

    def startService(self) -> None:
        super().startService()
        self.relay.start()

    def stopService(self) -> defer.Deferred[None]:
        self.relay.stop()
        return super().stopService()


class XCAPService(Listeners):
    """The XCAP HTTP listeners (``[xcap] listen``) and the permission store they serve.

    ``store`` is shared with the SIP side; it is closed when this service stops.
    """

    def __init__(
        self,
        site: XCAPSite,
        store: IPermissionStore,
        reactor: Any,
        config: XCAPConfig,
        identity: ServerIdentity,
        hostname: str,
    ) -> None:
        super().__init__("XCAP")
        self.site = site
        self.store = store
        self.root = config.root
        self.hostname = hostname
        self.public_url = config.public_url.rstrip("/")

        def tls_context(spec: EndpointSpec) -> CertificateOptions:
            return server_context_factory(listener_identity(identity, spec), None)

        for text in config.listen:
            spec = parse_endpoint(text)
            self.add_stream(spec, stream_server_endpoint(reactor, spec, tls_context), site)

    def permission_uri(self, recipient: str, token: str) -> str:
        """The Permission URI for a consent request (consent spec §(c)); after start."""
        return permission_uri(self.public_url, recipient, token)

    def before_binding(self) -> None:
        """Compile the schemas before serving (relayd.xcap.usages): a request never
        reads a package file, and an installation without them does not start."""
        try:
            load_schemas(cast(XCAPResource, self.site.resource).usages.values())
        except (OSError, etree.LxmlError) as e:
            self._fail(f"XCAP cannot load its XML schemas: {e}")

    def bound(self, spec: EndpointSpec, port: IListeningPort) -> None:
        address: Any = port.getHost()
        if not self.public_url:
            origin = _origin(spec.kind, self.hostname, address.port)
            self.public_url = origin + self.root.rstrip("/")
        self.log.info(
            "XCAP listening on {kind}:{host}:{port}, root {root}",
            kind=spec.kind,
            host=address.host,
            port=address.port,
            root=self.root,
        )

    def stopService(self) -> defer.Deferred[None]:
        listeners = super().stopService()

        async def stop() -> None:
            try:
                await listeners
            finally:
                await self.store.close()

        return defer.ensureDeferred(stop())


class SIPService(Listeners):
    """The SIP consent relay (``[sip] listen``): registrar, consent flow, subscriptions.

    It shares the XCAP service's store (closed by that service) and mints Permission
    URIs through it.
    """

    def __init__(
        self,
        relay: ConsentRelay,
        transport: SIPTransportLayer,
        registrar: Registrar,
        reactor: Any,
        prepared: Prepared,
        overload: LagMonitor | None = None,
    ) -> None:
        super().__init__("SIP")
        self.relay = relay
        self.transport = transport
        self.registrar = registrar
        self.prepared = prepared
        self.overload = overload
        self.addresses: list[tuple[str, str, int]] = []
        """``(kind, host, port)`` of each bound listener, for tests and tools."""

        def tls_context(spec: EndpointSpec) -> CertificateOptions:
            return server_context_factory(listener_identity(prepared.identity, spec), None)

        for text in prepared.config.sip.listen:
            spec = parse_endpoint(text)
            if spec.kind == "udp":
                protocol = transport.datagram_protocol()
                self.add_datagram(spec, udp_service(reactor, spec, protocol), protocol)
            else:
                endpoint = stream_server_endpoint(reactor, spec, tls_context)
                name = "TLS" if spec.kind == "ssl" else "TCP"
                self.add_stream(spec, endpoint, transport.stream_factory(name))

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
            self.relay.directory.add_local_host(spec.interface)
        self.relay.directory.add_local_host(f"{transport.sent_by(name)[0]}")
        self.relay.directory.add_local_port(address.port)

    def startService(self) -> None:
        super().startService()
        prepared = self.prepared
        owners = owners_from_users(
            prepared.users.entries(), (prepared.sip_domain, prepared.hostname, prepared.realm)
        )
        d = defer.ensureDeferred(self.relay.start(owners))
        d.addErrback(lambda f: self.log.failure("SIP consent relay failed to start", f))
        loaded = defer.ensureDeferred(self.registrar.load())
        loaded.addErrback(lambda f: self.log.failure("restoring registrations failed", f))
        if self.overload is not None:
            self.overload.start()

    def stopService(self) -> defer.Deferred[None]:
        if self.overload is not None:
            self.overload.stop()
        self.relay.stop()
        self.registrar.stop()
        self.transport.close_connections()
        if self.transport.transactions is not None:
            self.transport.transactions.stop()
        return super().stopService()


def build_sip(
    prepared: Prepared,
    reactor: Any,
    digest: DigestAuthenticator,
    store: IPermissionStore,
    xcap_service: XCAPService,
) -> SIPService:
    """The consent relay stack: transport → transactions → UAS core → ConsentRelay."""
    sip = prepared.config.sip
    domain = prepared.sip_domain or prepared.hostname
    authenticator = SIPAuthenticator(digest, domain)
    local_hosts = frozenset({prepared.hostname, "127.0.0.1", "localhost"})
    registrar = Registrar(domain, reactor, authenticator, local_hosts=local_hosts, store=store)
    # A wildcard listener has no address to put in our Via: say the relay's name.
    wildcards = ("", "0.0.0.0", "::")  # noqa: S104 - compared with, not bound to
    wildcard = any(parse_endpoint(text).interface in wildcards for text in sip.listen)
    transport = SIPTransportLayer(
        reactor,
        advertised_host=prepared.hostname if wildcard else None,
        idle_timeout_seconds=sip.idle_timeout_seconds,
        request_idle_timeout_seconds=sip.request_idle_timeout_seconds,
        max_connections=sip.max_connections,
        max_datagrams_per_source=sip.max_datagrams_per_source,
        # sips: members and transport=tls targets: the peers' trust roots if configured,
        # else the platform's; SNI and a service_identity check of the target's name.
        tls_creator=lambda host: client_connection_creator(
            host, prepared.identity, prepared.trust_roots
        ),
    )
    detector = LoopDetector(transport.own_sent_by)
    uas = UASCore(
        Capabilities(
            accept=("text/plain", "application/resource-lists+xml", "multipart/mixed"),
            allow_events=("grant-permission", "wait-permission"),
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
        prepared.sip_lists,
        is_account=lambda user: prepared.users.lookup(user, prepared.realm) is not None,
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
    relay = ConsentRelay(
        clock=reactor,
        transport=transport,
        uas=uas,
        registrar=registrar,
        authenticator=authenticator,
        store=store,
        directory=directory,
        cache=cache,
        ledger=ledger,
        uris=ConsentURIs(domain, prepared.consent_key or None),
        permission_uri=xcap_service.permission_uri,
        subscription_limits=SubscriptionLimits(
            min_expires_seconds=sip.subscription_expires_min_seconds,
            default_expires_seconds=sip.subscription_expires_seconds,
            max_expires_seconds=sip.subscription_expires_max_seconds,
            max_per_subscriber=sip.max_subscriptions_per_user,
        ),
        loop_detector=detector,
    )
    return SIPService(relay, transport, registrar, reactor, prepared, overload)


def _origin(kind: str, hostname: str, port: int) -> str:
    """``https://host:port`` of the first listener (``[xcap] public_url`` empty)."""
    scheme = "https" if kind == "ssl" else "http"
    host = f"[{hostname}]" if ":" in hostname else hostname
    return f"{scheme}://{host}:{port}"


def build_store(prepared: Prepared, reactor: Any) -> IPermissionStore:
    """The configured permission store (``[store] backend``)."""
    if prepared.config.store.backend == "memory":
        return MemoryPermissionStore()
    return SQLitePermissionStore(prepared.store_path, reactor)


class RelayService(MultiService):
    """The whole daemon.  Its start says first who the relay is, so an operator
    reading the log sees the names clients must use before the listeners' lines."""

    def __init__(self, prepared: Prepared) -> None:
        super().__init__()
        self._prepared = prepared
        self._introduced = False

    def privilegedStartService(self) -> None:
        self._introduce()
        super().privilegedStartService()

    def startService(self) -> None:
        self._introduce()
        super().startService()

    def _introduce(self) -> None:
        if self._introduced:
            return
        self._introduced = True
        prepared = self._prepared
        log.info(
            "relayd {version} starting: hostname {hostname}, realm {realm},"
            " SIP domain {domain}, store {store}",
            version=__version__,
            hostname=prepared.hostname,
            realm=prepared.realm,
            domain=prepared.sip_domain or prepared.hostname,
            store=prepared.config.store.backend
            + (f" {prepared.store_path}" if prepared.config.store.backend != "memory" else ""),
        )


def build_service(prepared: Prepared, reactor: Any) -> MultiService:
    """The relay daemon: every part a named child of one MultiService."""
    config = prepared.config
    top = RelayService(prepared)
    digest = DigestAuthenticator(
        prepared.realm,
        prepared.users.lookup,
        reactor,
        nonce_lifetime_seconds=config.auth.nonce_lifetime_seconds,
    )
    msrp = config.msrp
    policy = AuthPolicy(
        realm=prepared.realm,
        expires_seconds=msrp.session_expires_seconds,
        expires_min_seconds=msrp.session_expires_min_seconds,
        expires_max_seconds=msrp.session_expires_max_seconds,
        allowed_users=frozenset(config.auth.allowed_users),
    )
    core = RelayCore(reactor, prepared.hostname, policy, digest)
    relay = MSRPRelay(reactor, core, msrp, prepared.identity, prepared.trust_roots)
    service = MSRPService(
        relay, reactor, prepared.identity, prepared.trust_roots, prepared.hostname
    )
    service.setName("msrp")
    service.setServiceParent(top)

    xcap = config.xcap
    store = build_store(prepared, reactor)
    domains = (prepared.realm, prepared.hostname, prepared.sip_domain)
    authorizer = XCAPAuthorizer(digest, domains, xcap.admins)
    resource = XCAPResource(
        store, authorizer, reactor, root=xcap.root, max_body_bytes=xcap.max_body_bytes
    )
    site = XCAPSite(
        resource,
        max_body_bytes=xcap.max_body_bytes,
        max_header_bytes=xcap.max_header_bytes,
        header_timeout_seconds=xcap.header_timeout_seconds,
        max_connections=xcap.max_connections,
        reactor=reactor,
    )
    xcap_service = XCAPService(site, store, reactor, xcap, prepared.identity, prepared.hostname)
    xcap_service.setName("xcap")
    xcap_service.setServiceParent(top)

    sip_service = build_sip(prepared, reactor, digest, store, xcap_service)
    resource.document_checks[RESOURCE_LISTS_AUID] = sip_service.relay.directory.check_document
    sip_service.setName("sip")
    sip_service.setServiceParent(top)
    return top
