"""Wiring: a prepared config in (relayd.bootstrap), a ``MultiService`` out.

``build_service`` only connects objects: everything that can fail because of
the operator's files failed earlier, in ``prepare``.  Each surface's
listeners are Twisted's listener services, bound together when the services
start (``privilegedStartService`` under twistd, relayd.net.listeners); one
that cannot be bound is one critical log line and exit status 1, before the
reactor runs, so the daemon never serves with a surface missing.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService

from relayd import __version__
from relayd.bootstrap import Prepared
from relayd.consent.sqlite import SQLitePermissionStore
from relayd.consent.store import IPermissionStore, MemoryPermissionStore
from relayd.consent.vocabulary import RESOURCE_LISTS_AUID
from relayd.digest import DigestAuthenticator
from relayd.logs import logger
from relayd.msrp.relay import AuthPolicy, RelayCore
from relayd.msrp.service import MSRPService, relay_limits
from relayd.msrp.transport import MSRPRelay
from relayd.sip.stack import build_sip
from relayd.web.metrics import Metrics
from relayd.xcap.auth import XCAPAuthorizer
from relayd.xcap.resource import XCAPResource, XCAPSite
from relayd.xcap.service import XCAPService

log = logger()


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
    prepared.users.use_clock(reactor)  # reloads are timed like every other wait
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
    relay = MSRPRelay(reactor, core, relay_limits(msrp), prepared.identity, prepared.trust_roots)
    service = MSRPService(
        relay, reactor, prepared.identity, prepared.trust_roots, prepared.hostname, msrp.listen
    )
    service.setName("msrp")
    service.setServiceParent(top)

    xcap = config.xcap
    metrics = Metrics(reactor) if config.metrics.listen else None
    store = build_store(prepared, reactor)
    if metrics is not None:
        store = metrics.timed(store)
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

    sip_service = build_sip(
        config.sip,
        reactor,
        hostname=prepared.hostname,
        domain=prepared.sip_domain or prepared.hostname,
        realm=prepared.realm,
        users=prepared.users,
        identity=prepared.identity,
        trust_roots=prepared.trust_roots,
        lists=prepared.sip_lists,
        consent_key=prepared.consent_key,
        digest=digest,
        store=store,
        permission_uri=xcap_service.permission_uri,
    )
    resource.document_checks[RESOURCE_LISTS_AUID] = (
        sip_service.consent_relay.directory.check_document
    )
    sip_service.setName("sip")
    sip_service.setServiceParent(top)
    if metrics is not None:
        # Last: it binds after the others, and its /healthz reports on them.
        metrics_service = metrics.service(
            config.metrics,
            msrp=relay,
            sip=sip_service,
            xcap=site,
            store=store,
            backend=config.store.backend,
            surfaces=(service, xcap_service, sip_service),
        )
        metrics_service.setName("metrics")
        metrics_service.setServiceParent(top)
    return top
