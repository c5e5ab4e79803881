"""The metrics listener (``[metrics] listen``): Prometheus text on ``/metrics``, health
on ``/healthz``.

Nothing here is on a hot path.  The layers count what passes with plain additions
(``MSRPRelay.counts``, ``SIPTransportLayer.requests_received`` and its siblings,
``XCAPSite.requests``, ``UASCore.shed``, ``ConsentRelay.consent_needed``) and keep their
own state (connections, sessions, transactions, bindings, subscriptions); a
:class:`RelayCollector` turns both into metric families when Prometheus scrapes.  Only
the store's latency is a prometheus_client ``Histogram``, observed by :class:`TimedStore`,
the one wrapper every store call goes through whichever backend is configured.

The page is rendered by prometheus_client's own encoder (``generate_latest``) in the
reactor thread.  Its ``twisted.MetricsResource`` is not used: it runs the collectors in
the reactor's thread pool, where they would read the reactor's dicts while it changes
them.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from twisted.copyright import version as twisted_version
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from relayd import __version__
from relayd.config import MetricsConfig
from relayd.consent.store import ConsentState, IPermissionStore
from relayd.logs import logger
from relayd.msrp.transport import MSRPRelay
from relayd.net.endpoints import EndpointSpec, parse_endpoint, stream_server_endpoint
from relayd.net.listeners import Listeners
from relayd.sip.overload import LagMonitor
from relayd.sip.stack import SIPService
from relayd.xcap.resource import XCAPSite

log = logger()

__all__ = ["Health", "Metrics", "MetricsService", "RelayCollector", "TimedStore"]

STORE_TIMEOUT_SECONDS = 5.0
"""A store that has not answered by then counts as down (health, consent counts)."""

STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

COUNTED_CONSENTS = (ConsentState.PENDING, ConsentState.GRANTED, ConsentState.DENIED)

_UNTIMED = frozenset(("add_listener", "remove_listener"))
"""Store methods that return at once (no Deferred): nothing to time."""


@implementer(IPermissionStore)
class TimedStore:
    """A permission store whose every call is timed into ``relayd_store_seconds``
    (label ``operation``: the method's name), failures included."""

    def __init__(
        self,
        store: IPermissionStore,
        histogram: Histogram,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._histogram = histogram
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.store, name)
        if name.startswith("_") or name in _UNTIMED or not callable(attribute):
            return attribute
        observe = self._histogram.labels(name).observe
        clock = self._clock

        def timed(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            started = clock()

            def done(result: object) -> object:
                observe(clock() - started)
                return result

            answer: defer.Deferred[Any] = attribute(*args, **kwargs)
            return answer.addBoth(done)

        setattr(self, name, timed)  # the next call finds it without __getattr__
        return timed


@dataclass
class Sources:
    """The objects whose counters and state the collector reads."""

    msrp: MSRPRelay
    sip: SIPService
    xcap: XCAPSite
    lag: LagMonitor
    started: float
    """Wall-clock start time (``relayd_start_time_seconds``)."""


def _counter(
    name: str, documentation: str, labels: Sequence[str], counts: Mapping[Any, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(counts.items(), key=lambda item: str(item[0])):
        values = key if isinstance(key, tuple) else (key,)
        family.add_metric([str(v) for v in values], value)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class RelayCollector:
    """Every relayd metric but the store histogram, read from the layers when scraped.

    ``consents`` holds the consent records by state as of the last :meth:`refresh`
    (None when the store did not answer): they live in the store, not in memory.
    """

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.consents: dict[str, int] | None = None

    async def refresh(self, store: IPermissionStore, reactor: Any) -> None:
        """Count the consent records by state (consent spec §(b)) before a scrape."""
        try:
            counts = {}
            for state in COUNTED_CONSENTS:
                records = await store.list_consents(state=state).addTimeout(
                    STORE_TIMEOUT_SECONDS, reactor
                )
                counts[str(state)] = len(records)
            self.consents = counts
        except Exception:
            self.consents = None

    def describe(self) -> list[Metric]:
        """Nothing to check at registration (and no store to ask yet)."""
        return []

    def collect(self) -> Iterator[Metric]:
        sources = self.sources
        yield InfoMetricFamily("relayd_build", "relayd's version and platform", value=versions())
        yield _gauge(
            "relayd_start_time_seconds", "When relayd started (Unix time)", sources.started
        )
        yield _gauge(
            "relayd_event_loop_lag_seconds",
            "How late the reactor runs a timer (smallest of the last samples)",
            sources.lag.lag,
        )
        yield from self._msrp(sources.msrp)
        yield from self._sip(sources.sip)
        xcap = sources.xcap
        yield _counter(
            "relayd_xcap_requests",
            "XCAP (HTTP) requests answered, by method and status code",
            ("method", "code"),
            xcap.requests,
        )
        yield _gauge("relayd_xcap_connections", "Open XCAP connections", xcap.connections)
        consents = self.consents
        yield _gauge(
            "relayd_store_up", "Whether the store answered at this scrape", consents is not None
        )
        if consents is not None:
            family = GaugeMetricFamily(
                "relayd_consents", "Consent records in the store, by state", labels=("state",)
            )
            for state, count in consents.items():
                family.add_metric((state,), count)
            yield family

    @staticmethod
    def _msrp(relay: MSRPRelay) -> Iterator[Metric]:
        counts = relay.counts
        yield _counter(
            "relayd_msrp_requests",
            "MSRP requests received, by method",
            ("method",),
            counts.requests,
        )
        yield _counter(
            "relayd_msrp_relayed",
            "MSRP requests accepted and forwarded (AUTH: answered), by method",
            ("method",),
            counts.relayed,
        )
        yield _counter(
            "relayd_msrp_refusals",
            "MSRP error responses this relay answered with, by status code",
            ("code",),
            counts.refusals,
        )
        yield _counter(
            "relayd_msrp_responses",
            "MSRP responses received to requests this relay sent, by status code",
            ("code",),
            counts.responses,
        )
        yield _counter(
            "relayd_msrp_reports",
            "MSRP REPORT requests received, by the code of their Status header",
            ("status",),
            {code.decode("ascii"): count for code, count in counts.reports.items()},
        )
        received = CounterMetricFamily(
            "relayd_msrp_received_bytes", "Bytes read from MSRP connections"
        )
        received.add_metric((), counts.received_bytes)
        yield received
        relayed = CounterMetricFamily(
            "relayd_msrp_relayed_bytes", "Message body bytes forwarded towards next hops"
        )
        relayed.add_metric((), counts.relayed_bytes)
        yield relayed
        yield _gauge("relayd_msrp_connections", "Open MSRP connections", len(relay.connections))
        yield _gauge("relayd_msrp_sessions", "Live MSRP sessions (AUTH)", len(relay.core.sessions))

    @staticmethod
    def _sip(sip: SIPService) -> Iterator[Metric]:
        transport = sip.transport
        relay = sip.consent_relay
        requests = CounterMetricFamily(
            "relayd_sip_requests",
            "SIP requests by direction and method (retransmissions included)",
            labels=("direction", "method"),
        )
        responses = CounterMetricFamily(
            "relayd_sip_responses",
            "SIP responses by direction and status code (retransmissions included)",
            labels=("direction", "code"),
        )
        for family, pairs in (
            (
                requests,
                (("received", transport.requests_received), ("sent", transport.requests_sent)),
            ),
            (
                responses,
                (("received", transport.responses_received), ("sent", transport.responses_sent)),
            ),
        ):
            for direction, counts in pairs:
                for key, value in sorted(counts.items()):
                    family.add_metric((direction, str(key)), value)
            yield family
        consent_needed = CounterMetricFamily(
            "relayd_sip_consent_needed",
            "Requests answered 470 Consent Needed (RFC 5360 §5.6)",
        )
        consent_needed.add_metric((), relay.consent_needed)
        yield consent_needed
        shed = CounterMetricFamily(
            "relayd_sip_shed", "Requests answered 503 to shed load (event loop lag, transactions)"
        )
        layer = transport.transactions
        shed.add_metric((), relay.uas.shed + (layer.shed if layer is not None else 0))
        yield shed
        transactions = GaugeMetricFamily(
            "relayd_sip_transactions", "Live SIP transactions, by kind", labels=("kind",)
        )
        if layer is not None:
            transactions.add_metric(("server",), layer.server_transaction_count)
            transactions.add_metric(("client",), layer.client_transaction_count)
        yield transactions
        yield _gauge(
            "relayd_sip_connections", "Open SIP TCP/TLS connections", transport.stream_count
        )
        yield _gauge(
            "relayd_sip_registrations",
            "Registered contacts (bindings)",
            sip.registrar.binding_count,
        )
        yield _gauge(
            "relayd_sip_subscriptions", "Active SIP subscriptions", relay.subscriptions.count
        )


def versions() -> dict[str, str]:
    """relayd's version and its platform's (``relayd_build_info``, ``/healthz``)."""
    return {
        "version": __version__,
        "python": platform.python_version(),
        "twisted": twisted_version,
    }


def _address(spec: EndpointSpec, port: IListeningPort) -> str:
    host: Any = port.getHost()
    return f"{spec.kind}:{host.host}:{host.port}"


class Health:
    """Whether the daemon serves: every listener of every surface up, and the store
    answering within :data:`STORE_TIMEOUT_SECONDS`."""

    def __init__(
        self,
        surfaces: Callable[[], Iterable[Listeners]],
        store: IPermissionStore,
        reactor: Any,
        backend: str,
        started: float,
    ) -> None:
        self.surfaces = surfaces
        self.store = store
        self.reactor = reactor
        self.backend = backend
        self.started = started

    async def report(self) -> dict[str, Any]:
        """The health document (``/healthz``); ``status`` is "ok" or "failing"."""
        problems: list[str] = []
        listeners: dict[str, Any] = {}
        for surface in self.surfaces():
            ports = list(surface.ports)
            up = surface.running and bool(ports) and all(_listening(port) for port in ports)
            listeners[surface.label] = {
                "up": up,
                "addresses": [
                    _address(spec, port) if _listening(port) else spec.text
                    for spec, port in zip(surface.specs, ports, strict=False)
                ],
            }
            if not up:
                problems.append(f"{surface.label} is not listening")
        store_up = True
        try:
            await self.store.next_consent_expiry().addTimeout(STORE_TIMEOUT_SECONDS, self.reactor)
        except Exception as e:
            store_up = False
            problems.append(f"the store does not answer: {type(e).__name__}: {e}")
        return {
            "status": "failing" if problems else "ok",
            "problems": problems,
            **versions(),
            "uptime_seconds": max(0, int(self.reactor.seconds() - self.started)),
            "listeners": listeners,
            "store": {"backend": self.backend, "up": store_up},
        }


def _listening(port: IListeningPort) -> bool:
    """A TCP or UDP port says ``connected`` while it listens."""
    return bool(getattr(port, "connected", False))


class _Page(Resource):
    """A page computed asynchronously; a client gone meanwhile gets nothing written."""

    isLeaf = True

    def render_GET(self, request: Request) -> int:
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def write(answer: tuple[int, str, bytes]) -> None:
            if gone:
                return
            code, content_type, body = answer
            request.setResponseCode(code)
            request.setHeader(b"Content-Type", content_type.encode())
            request.setHeader(b"Cache-Control", b"no-store")
            request.write(body)
            request.finish()

        answering = defer.ensureDeferred(self.answer())
        answering.addCallback(write)
        answering.addErrback(self._failed, request, gone)
        return NOT_DONE_YET

    def _failed(self, failure: Any, request: Request, gone: list[object]) -> None:
        log.failure("answering {path}", failure, path=request.path)
        if not gone:
            request.setResponseCode(500)
            request.finish()

    async def answer(self) -> tuple[int, str, bytes]:
        raise NotImplementedError


class MetricsPage(_Page):
    """``/metrics``: every metric of ``registry``, in Prometheus text format."""

    def __init__(
        self,
        registry: CollectorRegistry,
        collector: RelayCollector,
        store: IPermissionStore,
        reactor: Any,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.collector = collector
        self.store = store
        self.reactor = reactor

    async def answer(self) -> tuple[int, str, bytes]:
        await self.collector.refresh(self.store, self.reactor)
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)


class HealthPage(_Page):
    """``/healthz``: 200 when healthy, else 503; the health document as JSON either way."""

    def __init__(self, health: Health) -> None:
        super().__init__()
        self.health = health

    async def answer(self) -> tuple[int, str, bytes]:
        report = await self.health.report()
        body = json.dumps(report, indent=2, sort_keys=True).encode() + b"\n"
        return (200 if report["status"] == "ok" else 503), "application/json", body


class _QuietSite(Site):
    """No access log: a line per scrape would say nothing."""

    def log(self, request: Any) -> None:
        pass


class MetricsService(Listeners):
    """The metrics listeners (``[metrics] listen``), plain HTTP, bound with the others.

    It measures event-loop lag with its own :class:`LagMonitor` when SIP has none (its
    threshold infinite: it only measures).
    """

    def __init__(
        self,
        reactor: Any,
        config: MetricsConfig,
        root: Resource,
        own_lag: LagMonitor | None = None,
    ) -> None:
        super().__init__("metrics")
        self.site = _QuietSite(root)
        self.own_lag = own_lag
        for text in config.listen:
            spec = parse_endpoint(text)
            self.add_stream(spec, stream_server_endpoint(reactor, spec), self.site)

    def bound(self, spec: EndpointSpec, port: IListeningPort) -> None:
        self.log.info("metrics listening on {address}", address=_address(spec, port))

    def startService(self) -> None:
        super().startService()
        if self.own_lag is not None:
            self.own_lag.start()

    def stopService(self) -> defer.Deferred[None]:
        if self.own_lag is not None:
            self.own_lag.stop()
        return super().stopService()


class Metrics:
    """One daemon's metrics: its own registry (tests run many daemons in a process)."""

    def __init__(self, reactor: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.reactor = reactor
        self.registry = CollectorRegistry(auto_describe=False)
        self.store_seconds = Histogram(
            "relayd_store_seconds",
            "Time the permission store took to answer, by operation",
            ("operation",),
            registry=self.registry,
            buckets=STORE_BUCKETS,
        )
        self._clock = clock
        self.started = time.time()

    def timed(self, store: IPermissionStore) -> TimedStore:
        """``store`` with every call timed (build the other layers on the result)."""
        return TimedStore(store, self.store_seconds, self._clock)

    def service(
        self,
        config: MetricsConfig,
        *,
        msrp: MSRPRelay,
        sip: SIPService,
        xcap: XCAPSite,
        store: IPermissionStore,
        backend: str,
        surfaces: Sequence[Listeners],
    ) -> MetricsService:
        """The listener, serving these layers' metrics and the health of ``surfaces``
        (and of itself)."""
        own_lag = None if sip.overload is not None else LagMonitor(self.reactor, math.inf)
        lag = sip.overload or own_lag
        assert lag is not None
        collector = RelayCollector(Sources(msrp, sip, xcap, lag, self.started))
        self.registry.register(collector)
        root = Resource()
        listening: list[Listeners] = list(surfaces)
        health = Health(lambda: listening, store, self.reactor, backend, self.reactor.seconds())
        root.putChild(b"metrics", MetricsPage(self.registry, collector, store, self.reactor))
        root.putChild(b"healthz", HealthPage(health))
        service = MetricsService(self.reactor, config, root, own_lag)
        listening.append(service)
        return service
