"""Tests for relayd.web.metrics without sockets: the timed store, the health report and
the consent counts (the whole listener is scraped in tests/integration/test_metrics_http.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from twisted.internet import defer
from twisted.internet.task import Clock

from relayd.consent.store import MemoryPermissionStore
from relayd.net.listeners import Listeners
from relayd.testing import fired, in_process_sip_relay, uac_request
from relayd.web.metrics import STORE_TIMEOUT_SECONDS, Health, RelayCollector, TimedStore


class Ticks:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry(auto_describe=False)
    return registry, Histogram("relayd_store_seconds", "store", ("operation",), registry=registry)


def test_timed_store_observes_each_call_by_operation() -> None:
    registry, seconds = histogram()
    ticks = Ticks()
    inner = MemoryPermissionStore()
    answer: defer.Deferred[Any] = defer.Deferred()
    inner.get_document = lambda *args: answer  # type: ignore[method-assign]
    store = TimedStore(inner, seconds, ticks)
    pending = store.get_document("pres-rules", "sip:a@x", "index")
    ticks.now += 0.25
    answer.callback(None)
    assert fired(pending) is None
    labels = {"operation": "get_document"}
    assert registry.get_sample_value("relayd_store_seconds_count", labels) == 1
    assert registry.get_sample_value("relayd_store_seconds_sum", labels) == 0.25


def test_timed_store_times_failures_and_passes_them_on() -> None:
    registry, seconds = histogram()
    inner = MemoryPermissionStore()
    inner.list_documents = lambda *a: defer.fail(OSError("disk"))  # type: ignore[method-assign]
    store = TimedStore(inner, seconds, Ticks())
    failure: list[Any] = []
    store.list_documents("pres-rules", "sip:a@x").addErrback(failure.append)
    assert failure[0].check(OSError)
    labels = {"operation": "list_documents"}
    assert registry.get_sample_value("relayd_store_seconds_count", labels) == 1


def test_timed_store_leaves_listener_registration_alone() -> None:
    registry, seconds = histogram()
    inner = MemoryPermissionStore()
    store = TimedStore(inner, seconds, Ticks())
    listener = lambda changes: None  # noqa: E731
    store.add_listener(listener)
    store.remove_listener(listener)
    assert (
        registry.get_sample_value("relayd_store_seconds_count", {"operation": "add_listener"})
        is None
    )


class Surface(Listeners):
    def __init__(self, label: str, port: Any = None) -> None:
        super().__init__(label)
        if port is not None:
            self.ports = [port]
            self.running = 1


class Port:
    def __init__(self, connected: bool) -> None:
        self.connected = connected


def health(store: Any, clock: Clock, *surfaces: Listeners) -> Health:
    return Health(lambda: surfaces, store, clock, "memory", started=clock.seconds())


def test_health_is_ok_when_every_surface_listens_and_the_store_answers() -> None:
    clock = Clock()
    check = health(MemoryPermissionStore(), clock, Surface("MSRP", Port(True)))
    clock.advance(90)
    report = fired(defer.ensureDeferred(check.report()))
    assert report["status"] == "ok"
    assert report["problems"] == []
    assert report["uptime_seconds"] == 90
    assert report["store"] == {"backend": "memory", "up": True}


def test_health_names_a_surface_not_listening() -> None:
    clock = Clock()
    surfaces = (Surface("MSRP", Port(True)), Surface("SIP", Port(False)), Surface("XCAP"))
    report = fired(defer.ensureDeferred(health(MemoryPermissionStore(), clock, *surfaces).report()))
    assert report["status"] == "failing"
    assert report["problems"] == ["SIP is not listening", "XCAP is not listening"]
    assert report["listeners"]["MSRP"]["up"] is True


def test_health_gives_the_store_a_bounded_wait() -> None:
    clock = Clock()
    store = MemoryPermissionStore()
    store.next_consent_expiry = lambda: defer.Deferred()  # type: ignore[method-assign]
    checking = defer.ensureDeferred(health(store, clock, Surface("MSRP", Port(True))).report())
    assert not checking.called
    clock.advance(STORE_TIMEOUT_SECONDS)
    report = fired(checking)
    assert report["status"] == "failing"
    assert report["store"]["up"] is False
    assert report["problems"][0].startswith("the store does not answer: TimeoutError")


def test_consent_counts_by_state_and_none_when_the_store_fails() -> None:
    clock = Clock()
    store = MemoryPermissionStore()
    fired(store.open_consent("sip:a@x", "sip:l@x", "sip:b@x", ["MESSAGE"], "t-1", 0.0, 3600.0))
    collector = RelayCollector(sources=None)  # type: ignore[arg-type]
    fired(defer.ensureDeferred(collector.refresh(store, clock)))
    assert collector.consents == {"pending": 1, "granted": 0, "denied": 0}
    store.list_consents = lambda **_: defer.fail(OSError("gone"))  # type: ignore[method-assign]
    fired(defer.ensureDeferred(collector.refresh(store, clock)))
    assert collector.consents is None


# -- the collector, on the daemon as build_service wires it (no sockets) -------------------


def families(collector: RelayCollector) -> dict[str, dict[tuple[str, ...], float]]:
    return {
        family.name: {tuple(s.labels.values()): s.value for s in family.samples}
        for family in collector.collect()
    }


def test_collector_reads_the_sip_and_xcap_layers(tmp_path: Path) -> None:
    extra = {("metrics", "listen"): "tcp:9100:interface=127.0.0.1"}
    relay = in_process_sip_relay(tmp_path, "127.0.0.1", {"alice": "pw"}, "list", [], extra)
    page = relay.service.getServiceNamed("metrics").site.resource.children[b"metrics"]
    collector: RelayCollector = page.collector
    assert isinstance(relay.store, TimedStore)
    before = families(collector)
    assert before["relayd_sip_requests"] == {}
    assert before["relayd_sip_registrations"] == {(): 0}
    _, options = uac_request(
        "OPTIONS",
        "sip:127.0.0.1",
        via="SIP/2.0/UDP 127.0.0.1:5070",
        aor="sip:alice@127.0.0.1",
        from_tag="t",
        to=None,
        call_id="c",
        cseq=1,
        contact="<sip:alice@127.0.0.1:5070>",
    )
    relay.protocol.datagramReceived(options.to_bytes(), ("127.0.0.1", 5070))
    relay.protocol.datagramReceived(
        options.to_bytes().replace(b"OPTIONS", b"FROB"), ("127.0.0.1", 5070)
    )
    site = relay.service.getServiceNamed("xcap").site
    site.log(SimpleNamespace(method=b"PUT", code=201))
    site.log(SimpleNamespace(method=b"BREW", code=405))
    after = families(collector)
    assert after["relayd_sip_requests"] == {("received", "OPTIONS"): 1, ("received", "other"): 1}
    assert after["relayd_sip_responses"][("sent", "200")] == 1
    assert after["relayd_sip_shed"] == {(): 0}
    assert after["relayd_xcap_requests"] == {("PUT", "201"): 1, ("other", "405"): 1}
    assert after["relayd_msrp_sessions"] == {(): 0}
    assert after["relayd_event_loop_lag_seconds"] == {(): 0.0}
