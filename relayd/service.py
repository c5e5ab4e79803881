"""Wiring: a validated config in, a ``MultiService`` out.

``prepare`` does everything that can fail because of the operator's files
(certificates, users file, trust roots) and turns each failure into a
``ConfigError`` naming the key, so twistd stops with one line before anything
listens.  ``build_service`` then only connects objects.  Listeners are bound
when the services start (``privilegedStartService`` under twistd); one that
cannot be bound is one critical log line and exit status 1, before the
reactor runs, so the daemon never serves with a surface missing.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from lxml import etree
from OpenSSL import crypto
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from relayd import __version__
from relayd.config import ConfigError, RelaydConfig
from relayd.consent.ledger import ConsentLedger, ConsentLimits
from relayd.consent.lists import ListDirectory, URIList, URIListError, parse_lists_document
from relayd.consent.permissions import PermissionCache
from relayd.consent.sqlite import SQLitePermissionStore
from relayd.consent.store import IPermissionStore, MemoryPermissionStore
from relayd.consent.vocabulary import RESOURCE_LISTS_AUID
from relayd.digest import DigestAuthenticator
from relayd.endpoints import EndpointSpec, parse_endpoint, stream_server_endpoint
from relayd.keyfile import KeyFileError, load_or_create_key
from relayd.logs import logger
from relayd.msrp.relay import AuthPolicy, RelayCore
from relayd.msrp.transport import MSRPRelay
from relayd.sip.auth import SIPAuthenticator
from relayd.sip.consent import ConsentURIs
from relayd.sip.events import SubscriptionLimits
from relayd.sip.overload import LagMonitor, any_of
from relayd.sip.registrar import Registrar
from relayd.sip.relay import ConsentRelay, owners_from_users
from relayd.sip.transaction import TransactionLayer
from relayd.sip.transport import SIPTransportLayer, udp_service
from relayd.sip.uas import Capabilities, LoopDetector, UASCore, transaction_pressure
from relayd.tls import (
    ServerIdentity,
    TLSSetupError,
    client_connection_creator,
    ensure_self_signed,
    load_identity,
    load_trust_roots,
    server_context_factory,
    stdlib_server_context,
    with_extra_chain,
)
from relayd.users import UsersFile, UsersFileError, generate_password
from relayd.xcap.auth import XCAPAuthorizer, permission_uri
from relayd.xcap.resource import XCAPResource, XCAPSite
from relayd.xcap.usages import load_schemas

log = logger()

GENERATED_USER = "relayd"


@dataclass(frozen=True)
class Prepared:
    config: RelaydConfig
    identity: ServerIdentity
    trust_roots: list[crypto.X509] | None
    users: UsersFile
    hostname: str
    realm: str
    store_path: str = ""
    sip_domain: str = ""
    sip_lists: tuple[URIList, ...] = ()
    consent_key: bytes = b""


def prepare(config: RelaydConfig) -> Prepared:
    """Check and load the operator's files; create safe defaults on first start."""
    origin = config.source_of
    data_dir = Path(config.data_dir)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            origin("relay", "data_dir"), "relay", "data_dir", f"cannot create: {e.strerror}"
        ) from None
    _restrict(data_dir, origin("relay", "data_dir"))
    if config.tls.certificate:
        try:
            identity = load_identity(config.tls.certificate, config.tls.private_key)
        except TLSSetupError as e:
            raise ConfigError(origin("tls", "certificate"), "tls", "certificate", str(e)) from None
    else:
        cert, key, _ = ensure_self_signed(data_dir / "tls")
        identity = load_identity(cert, key)
    listener_keys = (
        ("msrp", config.msrp.listen),
        ("xcap", config.xcap.listen),
        ("sip", config.sip.listen),
    )
    for section, listeners in listener_keys:
        for text in listeners:
            try:
                _listener_identity(identity, parse_endpoint(text))
            except TLSSetupError as e:
                raise ConfigError(origin(section, "listen"), section, "listen", str(e)) from None
    store_path = config.store.path or str(data_dir / "relay.sqlite3")
    if config.store.backend == "sqlite":
        folder = Path(store_path).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(
                origin("store", "path"),
                "store",
                "path",
                f"directory {str(folder)!r} is not writable",
            )
    trust_roots = None
    if config.msrp.ca_certificates:
        try:
            trust_roots = load_trust_roots(config.msrp.ca_certificates)
        except TLSSetupError as e:
            raise ConfigError(
                origin("msrp", "ca_certificates"), "msrp", "ca_certificates", str(e)
            ) from None
    names = identity.dns_names
    hostname = config.hostname or (names[0] if names else "localhost")
    realm = config.auth.realm or hostname
    users_path = config.auth.users or str(data_dir / "users.htdigest")
    try:
        users = UsersFile(users_path)
    except UsersFileError as e:
        raise ConfigError(origin("auth", "users"), "auth", "users", str(e)) from None
    if not config.auth.users and len(users) == 0:
        _generate_user(users, data_dir, realm)
    domain = config.sip.domain or hostname
    lists: tuple[URIList, ...] = ()
    if config.sip.lists:
        try:
            with open(config.sip.lists, "rb") as handle:
                # Oversized lists load; requests to them are refused (403) instead.
                document = parse_lists_document(handle.read(), domain)
        except (OSError, URIListError) as e:
            raise ConfigError(origin("sip", "lists"), "sip", "lists", str(e)) from None
        if document.unroutable:
            # The file exists only to define routes: a list or entry it cannot
            # route is the operator's mistake, not a document to keep as it is.
            first = document.unroutable[0]
            raise ConfigError(
                origin("sip", "lists"), "sip", "lists", f"{first.node}: {first.reason}"
            )
        lists = document.lists
    try:
        consent_key = load_or_create_key(data_dir / "consent.key")
    except KeyFileError as e:
        raise ConfigError(origin("relay", "data_dir"), "relay", "data_dir", str(e)) from None
    return Prepared(
        config,
        identity,
        trust_roots,
        users,
        hostname,
        realm,
        store_path,
        domain,
        lists,
        consent_key,
    )


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


def _restrict(data_dir: Path, source: str) -> None:
    """0700 for a data directory of ours that already existed with a wider mode.

    ``mkdir(mode=0o700)`` only applies to a directory it creates, and this one
    holds the private key, the users file and the generated password.  A
    directory owned by someone else is left alone: it is theirs to set.
    """
    try:
        info = data_dir.stat()
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid != os.geteuid() or mode == 0o700:
            return
        os.chmod(data_dir, 0o700)
    except OSError as e:
        raise ConfigError(
            source, "relay", "data_dir", f"cannot restrict to mode 0700: {e.strerror}"
        ) from None
    log.warn(
        "Data directory {path} had mode {mode}; changed it to 0700",
        path=str(data_dir),
        mode=f"{mode:04o}",
    )


def _generate_user(users: UsersFile, data_dir: Path, realm: str) -> None:
    """First start on defaults: one user, credentials in a 0600 file, logged once."""
    password = generate_password()
    users.add_or_update(GENERATED_USER, realm, password)
    path = data_dir / "credentials.txt"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(f"username={GENERATED_USER}\nrealm={realm}\npassword={password}\n")
    log.info(
        "Created user {user} for realm {realm}; its password is in {path}",
        user=GENERATED_USER,
        realm=realm,
        path=str(path),
    )


async def stop_listening(ports: list[Any]) -> None:
    """Stop every listener, waiting for those that close asynchronously."""
    for port in ports:
        stopped = port.stopListening()
        if stopped is not None:
            await stopped


def listener_identity(prepared: Prepared, spec: EndpointSpec) -> ServerIdentity:
    """The certificate for an ``ssl:`` listener: its own keys if given, else the relay's."""
    return _listener_identity(prepared.identity, spec)


def _listener_identity(relay_identity: ServerIdentity, spec: EndpointSpec) -> ServerIdentity:
    """``certKey``/``privateKey`` replace the relay's keys; ``extraCertChain`` is served
    after the chain (intermediates kept in a file of their own)."""
    identity = relay_identity
    if "certKey" in spec.options or "privateKey" in spec.options:
        identity = load_identity(
            spec.options.get("certKey") or spec.options["privateKey"],
            spec.options.get("privateKey") or spec.options["certKey"],
        )
    extra = spec.options.get("extraCertChain")
    if extra:
        identity = with_extra_chain(identity, extra)
    return identity


class ListenerError(Exception):
    """A listener could not be bound; its text names it and says why, in one line.

    Raised out of ``privilegedStartService``, so twistd stops before the reactor
    runs: it tells a daemon's waiting parent and removes the pid file, then lets
    the exception end the process with status 1, where ``relayd.tap`` prints
    this line instead of a traceback.
    """


class _Listeners(Service):
    """A service that owns listening ports: ``listening`` fires with them once they are
    bound, and stopping closes them after whatever :meth:`_stop` of the subclass adds."""

    log = logger()

    def __init__(self, reactor: Any, prepared: Prepared) -> None:
        self.reactor = reactor
        self.prepared = prepared
        self.ports: list[IListeningPort] = []
        self.listening: defer.Deferred[list[IListeningPort]] = defer.Deferred()

    async def _stop(self) -> None:
        ports, self.ports = self.ports, []
        await stop_listening(ports)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())


class _BoundAtStart(_Listeners):
    """Listeners bound synchronously in ``privilegedStartService`` (or ``startService``
    when started without it), so a port that cannot be bound makes starting fail at
    once (twistd exits) instead of leaving a relay without that surface."""

    label = ""
    _bound = False

    def _endpoints(self) -> Sequence[str]:
        raise NotImplementedError

    def _bind_one(self, spec: EndpointSpec) -> None:
        """Bind one listener, append it to ``ports``; raise if it cannot be bound."""
        raise NotImplementedError

    def _tls_context(self, spec: EndpointSpec) -> Any:
        return server_context_factory(listener_identity(self.prepared, spec), None)

    def _bind(self) -> None:
        self._bound = True
        for text in self._endpoints():
            try:
                self._bind_one(parse_endpoint(text))
            except Exception as e:
                message = f"{self.label} cannot listen on {text}: {e}"
                self.log.critical("{message}", message=message)
                for port in self.ports:
                    port.stopListening()
                self.ports = []
                raise ListenerError(message) from None
        self.listening.callback(list(self.ports))

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        super().startService()
        if not self._bound:
            self._bind()


def _listen_now(endpoint: Any, factory: Any) -> IListeningPort:
    """``endpoint.listen(factory)`` for an endpoint that binds synchronously."""
    outcome: list[object] = []
    endpoint.listen(factory).addBoth(outcome.append)
    result = outcome[0] if outcome else None
    if isinstance(result, Failure):
        result.raiseException()
    if result is None:
        raise RuntimeError("listener did not bind synchronously")
    return cast(IListeningPort, result)


class MSRPService(_BoundAtStart):
    """The MSRP listeners (``[msrp] listen``), their bound ports recorded as ours."""

    label = "MSRP"

    def __init__(self, relay: MSRPRelay, reactor: Any, prepared: Prepared) -> None:
        super().__init__(reactor, prepared)
        self.relay = relay
        self._listener_hosts: list[str] = []

    def _tls_context(self, spec: EndpointSpec) -> Any:
        identity = listener_identity(self.prepared, spec)
        # The standard library's TLS: half the memory per idle client (relayd.tlsio).
        return stdlib_server_context(identity, self.prepared.trust_roots)

    def _endpoints(self) -> Sequence[str]:
        return self.relay.config.listen

    def _bind_one(self, spec: EndpointSpec) -> None:
        endpoint = stream_server_endpoint(self.reactor, spec, self._tls_context)
        tls = spec.kind == "ssl"
        port = _listen_now(endpoint, self.relay.listener_factory(tls))
        self.ports.append(port)
        address: Any = port.getHost()
        self.relay.core.add_local_address(address.port, tls, spec.interface or None)
        self._listener_hosts.append(spec.interface or address.host)
        self.log.info(
            "MSRP listening on {kind}:{host}:{port}",
            kind=spec.kind,
            host=address.host,
            port=address.port,
        )

    def _bind(self) -> None:
        super()._bind()
        self._check_use_path_host(self._listener_hosts)

    def startService(self) -> None:
        super().startService()
        self.relay.start()

    def _check_use_path_host(self, listener_hosts: list[str]) -> None:
        """Warn once when peers beyond this machine get a Use-Path host they cannot verify."""
        hostname = self.prepared.hostname
        exposed = exposed_listener_host(hostname, listener_hosts)
        if exposed is not None:
            self.log.warn(
                "[relay] hostname {hostname} is not a DNS name, and MSRP listens on {host}:"
                " peers cannot verify it against a certificate (RFC 4976 Use-Path:"
                " the relay's FQDN); set [relay] hostname",
                hostname=hostname,
                host=exposed,
            )

    async def _stop(self) -> None:
        self.relay.stop()
        await super()._stop()


class XCAPService(_BoundAtStart):
    """The XCAP HTTP listeners (``[xcap] listen``) and the permission store they serve.

    ``store`` is shared with the SIP side; it is closed when this service stops.
    """

    label = "XCAP"

    def __init__(
        self, site: XCAPSite, store: IPermissionStore, reactor: Any, prepared: Prepared
    ) -> None:
        super().__init__(reactor, prepared)
        self.site = site
        self.store = store
        self.public_url = prepared.config.xcap.public_url.rstrip("/")

    def permission_uri(self, recipient: str, token: str) -> str:
        """The Permission URI for a consent request (consent spec §(c)); after start."""
        return permission_uri(self.public_url, recipient, token)

    def _endpoints(self) -> Sequence[str]:
        return self.prepared.config.xcap.listen

    def _bind(self) -> None:
        """Compile the schemas before serving (relayd.xcap.usages): a request never
        reads a package file, and an installation without them does not start."""
        try:
            load_schemas(cast(XCAPResource, self.site.resource).usages.values())
        except (OSError, etree.LxmlError) as e:
            message = f"XCAP cannot load its XML schemas: {e}"
            self.log.critical("{message}", message=message)
            raise ListenerError(message) from None
        super()._bind()

    def _bind_one(self, spec: EndpointSpec) -> None:
        xcap = self.prepared.config.xcap
        endpoint = stream_server_endpoint(self.reactor, spec, self._tls_context)
        port = _listen_now(endpoint, self.site)
        self.ports.append(port)
        address: Any = port.getHost()
        if not self.public_url:
            origin = _origin(spec.kind, self.prepared.hostname, address.port)
            self.public_url = origin + xcap.root.rstrip("/")
        self.log.info(
            "XCAP listening on {kind}:{host}:{port}, root {root}",
            kind=spec.kind,
            host=address.host,
            port=address.port,
            root=xcap.root,
        )

    async def _stop(self) -> None:
        try:
            await super()._stop()
        finally:
            await self.store.close()


class SIPService(_BoundAtStart):
    """The SIP consent relay (``[sip] listen``): registrar, consent flow, subscriptions.

    It shares the XCAP service's store (closed by that service) and mints Permission
    URIs through it.
    """

    label = "SIP"

    def __init__(
        self,
        relay: ConsentRelay,
        transport: SIPTransportLayer,
        registrar: Registrar,
        reactor: Any,
        prepared: Prepared,
        overload: LagMonitor | None = None,
    ) -> None:
        super().__init__(reactor, prepared)
        self.relay = relay
        self.transport = transport
        self.registrar = registrar
        self.overload = overload
        self.addresses: list[tuple[str, str, int]] = []
        """``(kind, host, port)`` of each bound listener, for tests and tools."""

    def port_of(self, kind: str) -> int:
        """The bound port of the first ``kind`` (udp/tcp/ssl) listener."""
        return next(port for k, _, port in self.addresses if k == kind)

    def _endpoints(self) -> Sequence[str]:
        return self.prepared.config.sip.listen

    def _bind_one(self, spec: EndpointSpec) -> None:
        transport = self.transport
        port: IListeningPort
        if spec.kind == "udp":
            udp = udp_service(self.reactor, spec, transport.datagram_protocol())
            udp.privilegedStartService()
            port = udp.port
            name = "UDP"
        else:
            name = "TLS" if spec.kind == "ssl" else "TCP"
            endpoint = stream_server_endpoint(self.reactor, spec, self._tls_context)
            port = _listen_now(endpoint, transport.stream_factory(name))
            address: Any = port.getHost()
            transport.set_listen_port(name, address.port)
            self.log.info(
                "SIP listening on {kind}:{host}:{port}",
                kind=spec.kind,
                host=address.host,
                port=address.port,
            )
        self.ports.append(port)
        bound: Any = port.getHost()
        self.addresses.append((spec.kind, bound.host, bound.port))
        if spec.interface:
            self.relay.directory.add_local_host(spec.interface)
        self.relay.directory.add_local_host(f"{transport.sent_by(name)[0]}")
        self.relay.directory.add_local_port(bound.port)

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

    async def _stop(self) -> None:
        if self.overload is not None:
            self.overload.stop()
        self.relay.stop()
        self.registrar.stop()
        self.transport.close_connections()
        if self.transport.transactions is not None:
            self.transport.transactions.stop()
        await super()._stop()


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
    service = MSRPService(relay, reactor, prepared)
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
    xcap_service = XCAPService(site, store, reactor, prepared)
    xcap_service.setName("xcap")
    xcap_service.setServiceParent(top)

    sip_service = build_sip(prepared, reactor, digest, store, xcap_service)
    resource.document_checks[RESOURCE_LISTS_AUID] = sip_service.relay.directory.check_document
    sip_service.setName("sip")
    sip_service.setServiceParent(top)
    return top
