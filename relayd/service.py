"""Wiring: a prepared config in (relayd.bootstrap), a ``MultiService`` out.

``build_service`` only connects objects: everything that can fail because of
the operator's files failed earlier, in ``prepare``.  Each surface's
listeners are Twisted's listener services, bound together when the services
start (``privilegedStartService`` under twistd, relayd.net.listeners); one
that cannot be bound is one critical log line and exit status 1, before the
reactor runs, so the daemon never serves with a surface missing.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
from dataclasses import replace
from types import FrameType
from typing import Any

from twisted.application.service import MultiService

from relayd import __version__
from relayd.bootstrap import Prepared
from relayd.consent.sqlite import SQLitePermissionStore
from relayd.consent.store import IPermissionStore, MemoryPermissionStore
from relayd.consent.vocabulary import RESOURCE_LISTS_AUID
from relayd.digest import ISSUER_BYTES, DigestAuthenticator
from relayd.keyfile import derive_key
from relayd.logs import logger
from relayd.msrp.relay import AuthPolicy, RelayCore
from relayd.msrp.service import MSRPService, relay_limits
from relayd.msrp.transport import MSRPRelay
from relayd.net.tls import TLSMaterial
from relayd.reload import Reloader
from relayd.sip.stack import build_sip
from relayd.web.admin import AdminResource
from relayd.web.consent_page import ConsentPage
from relayd.web.metrics import Metrics
from relayd.workers import own_udp, shared_listen, worker_listen
from relayd.xcap.auth import XCAPAuthorizer
from relayd.xcap.resource import XCAPResource, XCAPSite
from relayd.xcap.service import XCAPService

log = logger()


def build_store(prepared: Prepared, reactor: Any, worker: int | None = None) -> IPermissionStore:
    """The configured permission store (``[store] backend``); a worker's SQLite store
    follows the other workers' changes (relayd.consent.sqlite)."""
    store = prepared.config.store
    if store.backend == "memory":
        return MemoryPermissionStore()
    if store.backend == "postgresql":
        from relayd.consent.postgres import PostgresPermissionStore  # the postgresql extra

        return PostgresPermissionStore(store.dsn, reactor)
    node = None if worker is None else f"worker-{worker}-{os.getpid()}"
    return SQLitePermissionStore(prepared.store_path, reactor, node=node)


def _describe_store(prepared: Prepared) -> str:
    """The backend and where it keeps the store; a DSN is shown without its password."""
    store = prepared.config.store
    if store.backend == "postgresql":
        from relayd.consent.postgres import describe

        return f"postgresql {describe(store.dsn)}"
    if store.backend == "sqlite":
        return f"sqlite {prepared.store_path}"
    return store.backend


class RelayService(MultiService):
    """The whole daemon.  Its start says first who the relay is, so an operator
    reading the log sees the names clients must use before the listeners' lines.

    While it runs, SIGHUP rereads certificates, keys, users and lists (``reloader``);
    the reload itself runs in the reactor, not in the signal handler.
    """

    def __init__(
        self,
        prepared: Prepared,
        reactor: Any = None,
        reloader: Reloader | None = None,
        worker: int | None = None,
    ) -> None:
        super().__init__()
        self._prepared = prepared
        self._worker = worker
        self._introduced = False
        self._reactor = reactor
        self.reloader = reloader
        self._previous_hangup: Any = None

    def privilegedStartService(self) -> None:
        self._introduce()
        super().privilegedStartService()

    def startService(self) -> None:
        self._introduce()
        super().startService()
        # Signal handlers can only be set from the main thread (not so in some tests).
        if self.reloader is not None and threading.current_thread() is threading.main_thread():
            self._previous_hangup = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> Any:
        if self._previous_hangup is not None:
            signal.signal(signal.SIGHUP, self._previous_hangup)
            self._previous_hangup = None
        return super().stopService()

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        if self.reloader is not None:
            self._reactor.callFromThread(self.reloader.reload)

    def _introduce(self) -> None:
        if self._introduced:
            return
        self._introduced = True
        prepared = self._prepared
        log.info(
            "relayd {version} {who}starting: hostname {hostname}, realm {realm},"
            " SIP domain {domain}, store {store}",
            version=__version__,
            who="" if self._worker is None else f"worker {self._worker} ",
            hostname=prepared.hostname,
            realm=prepared.realm,
            domain=prepared.sip_domain or prepared.hostname,
            store=_describe_store(prepared),
        )


def for_worker(prepared: Prepared, index: int) -> Prepared:
    """What worker ``index`` of ``[relay] workers`` runs (relayd.workers): the SIP and
    XCAP listeners shared with the other workers, its own MSRP and metrics ports."""
    config = prepared.config
    config = replace(
        config,
        msrp=replace(config.msrp, listen=worker_listen(config.msrp.listen, index)),
        metrics=replace(config.metrics, listen=worker_listen(config.metrics.listen, index)),
        sip=replace(config.sip, listen=shared_listen(config.sip.listen)),
        xcap=replace(config.xcap, listen=shared_listen(config.xcap.listen)),
    )
    return replace(prepared, config=config)


def build_service(prepared: Prepared, reactor: Any, worker: int | None = None) -> MultiService:
    """The relay daemon: every part a named child of one MultiService; with ``worker``,
    worker number ``worker`` of several (:func:`for_worker`)."""
    if worker is not None:
        prepared = for_worker(prepared, worker)
    config = prepared.config
    top = RelayService(prepared, reactor, worker=worker)

    def shared(purpose: str) -> bytes | None:
        """A worker's key for ``purpose``, the same in every worker; None: drawn here."""
        if worker is None or not prepared.worker_key:
            return None
        return derive_key(prepared.worker_key, purpose)

    tls = TLSMaterial(prepared.identity, prepared.trust_roots)
    prepared.users.use_clock(reactor)  # reloads are timed like every other wait
    digest = DigestAuthenticator(
        prepared.realm,
        prepared.users.lookup,
        reactor,
        nonce_lifetime_seconds=config.auth.nonce_lifetime_seconds,
        # Workers share the nonce key; each marks its own nonces (relayd.digest).
        secret=shared("digest nonces"),
        issuer=secrets.token_bytes(ISSUER_BYTES) if worker is not None else None,
    )
    msrp = config.msrp
    policy = AuthPolicy(
        realm=prepared.realm,
        expires_seconds=msrp.session_expires_seconds,
        expires_min_seconds=msrp.session_expires_min_seconds,
        expires_max_seconds=msrp.session_expires_max_seconds,
        allowed_users=frozenset(config.auth.allowed_users),
    )
    core = RelayCore(reactor, prepared.hostname, policy, digest, pool_names=msrp.pool_names)
    relay = MSRPRelay(reactor, core, relay_limits(msrp), prepared.identity, prepared.trust_roots)
    if worker is not None:
        relay.sibling_host = prepared.hostname.strip("[]").lower()
        core.has_siblings = True
    service = MSRPService(relay, reactor, tls, prepared.hostname, msrp.listen)
    service.setName("msrp")
    service.setServiceParent(top)

    xcap = config.xcap
    metrics = Metrics(reactor) if config.metrics.listen else None
    store = build_store(prepared, reactor, worker)
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

    def forms_secret(purpose: str) -> bytes | None:
        """The forms' CSRF key, from the stored consent key: the same in every worker
        and after a restart, so a form served by one process is taken by any other."""
        return derive_key(prepared.consent_key, purpose) if prepared.consent_key else None

    site.mount("consent", ConsentPage(store, reactor, secret=forms_secret("consent page forms")))
    site.mount(
        "admin",
        AdminResource(
            resource,
            reactor,
            domain=prepared.sip_domain or prepared.hostname,
            secret=forms_secret("admin page forms"),
        ),
    )
    xcap_service = XCAPService(site, store, reactor, xcap, tls, prepared.hostname)
    xcap_service.setName("xcap")
    xcap_service.setServiceParent(top)

    sip_service = build_sip(
        config.sip,
        reactor,
        hostname=prepared.hostname,
        domain=prepared.sip_domain or prepared.hostname,
        realm=prepared.realm,
        users=prepared.users,
        tls=tls,
        lists=prepared.sip_lists,
        consent_key=prepared.consent_key,
        digest=digest,
        store=store,
        permission_uri=xcap_service.permission_uri,
        consent_link=xcap_service.consent_link,
        loop_key=shared("SIP loop detection"),
        request_listen=() if worker is None else own_udp(config.sip.listen),
    )
    resource.document_checks[RESOURCE_LISTS_AUID] = (
        sip_service.consent_relay.directory.check_document
    )
    sip_service.setName("sip")
    sip_service.setServiceParent(top)
    top.reloader = Reloader(
        config,
        tls,
        prepared.users,
        sip_service.consent_relay.directory,
        prepared.sip_domain or prepared.hostname,
    )
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
