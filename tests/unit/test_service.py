"""Tests for relayd.service: the listeners bound at start.

Listeners are bound on a ``MemoryReactorClock`` whose ``listenTCP``/``listenUDP``
can be made to fail, as a busy port or a missing address would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent

from relayd.bootstrap import prepare
from relayd.config import load_config
from relayd.consent.postgres import PostgresPermissionStore
from relayd.msrp.service import MSRPService
from relayd.net.listeners import ListenerError
from relayd.service import RelayService, build_service, build_store
from relayd.sip.stack import SIPService
from relayd.testing import captured_log, consent_rule, consent_ruleset
from relayd.web.metrics import TimedStore
from relayd.xcap import usages


class _UDPPort:
    def __init__(self, port: int, interface: str) -> None:
        self.address = IPv4Address("UDP", interface or "0.0.0.0", port)  # noqa: S104

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        pass


class BusyPorts(MemoryReactorClock):
    """Binding any port in ``busy`` fails as the kernel would refuse it; UDP is
    recorded like TCP (MemoryReactor has no ``listenUDP``)."""

    def __init__(self, *busy: int) -> None:
        super().__init__()
        self.busy = set(busy)
        self.udpServers: list[tuple[int, str]] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> Any:
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        self.udpServers.append((port, interface))
        bound = _UDPPort(port, interface)
        protocol.makeConnection(bound)  # as a real port does once bound
        return bound


LISTENERS = {
    ("msrp", "listen"): "ssl:22855:interface=127.0.0.1",
    ("xcap", "listen"): "ssl:24443:interface=127.0.0.1",
    ("sip", "listen"): "udp:25060:interface=127.0.0.1\ntcp:25060:interface=127.0.0.1",
    ("store", "backend"): "memory",
}


def overrides(tmp_path: Path, **extra: str) -> dict[tuple[str, str], str]:
    values = {("relay", "data_dir"): str(tmp_path / "data"), **LISTENERS}
    for name, value in extra.items():
        section, key = name.split("__")
        values[(section, key)] = value
    return values


@pytest.fixture
def events() -> Iterator[EventLoggingObserver]:
    with captured_log() as observer:
        yield observer


def critical_lines(observer: EventLoggingObserver) -> list[str]:
    return [
        event["message"]
        for event in observer
        if event["log_level"] == LogLevel.critical and "message" in event
    ]


# -- listeners bound at start -------------------------------------------------------------


def test_msrp_binds_in_privileged_start_and_only_once(tmp_path: Path) -> None:
    reactor = BusyPorts()
    top = build_service(prepare(load_config(None, overrides(tmp_path))), reactor)
    top.privilegedStartService()
    msrp = top.getServiceNamed("msrp")
    assert isinstance(msrp, MSRPService)
    assert msrp.listening.called
    assert [port for port, *_ in reactor.tcpServers] == [22855, 24443, 25060]
    assert reactor.udpServers == [(25060, "127.0.0.1")]
    top.startService()  # binds nothing twice
    assert len(reactor.tcpServers) == 3
    assert msrp.relay.core.use_path_port == 22855
    top.stopService()


def test_busy_msrp_port_stops_start_before_anything_else_binds(
    tmp_path: Path, events: EventLoggingObserver
) -> None:
    reactor = BusyPorts(22855)
    top = build_service(prepare(load_config(None, overrides(tmp_path))), reactor)
    with pytest.raises(ListenerError) as info:
        top.privilegedStartService()
    line = (
        "MSRP cannot listen on ssl:22855:interface=127.0.0.1: Couldn't listen on"
        " 127.0.0.1:22855: [Errno 98] Address already in use."
    )
    assert str(info.value) == line
    assert critical_lines(events) == [line]
    assert reactor.tcpServers == [] and reactor.udpServers == []
    msrp = top.getServiceNamed("msrp")
    assert isinstance(msrp, MSRPService)
    assert not msrp.listening.called


def test_busy_sip_port_closes_what_sip_had_bound(
    tmp_path: Path, events: EventLoggingObserver
) -> None:
    reactor = BusyPorts()
    values = overrides(tmp_path)
    values[("sip", "listen")] = "tcp:25061:interface=127.0.0.1\ntcp:25062:interface=127.0.0.1"
    reactor.busy.add(25062)
    top = build_service(prepare(load_config(None, values)), reactor)
    with pytest.raises(ListenerError, match=r"^SIP cannot listen on tcp:25062:"):
        top.privilegedStartService()
    assert len(critical_lines(events)) == 1
    sip = top.getServiceNamed("sip")
    assert isinstance(sip, SIPService)
    assert sip.ports == []  # the first SIP port was closed again


# -- XCAP schemas ----------------------------------------------------------------------------


@pytest.fixture
def fresh_schemas() -> None:
    """Nothing compiled yet, as in a new process."""
    usages.load_schema.cache_clear()


def test_xcap_schemas_are_compiled_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_schemas: None
) -> None:
    top = build_service(prepare(load_config(None, overrides(tmp_path))), BusyPorts())
    top.privilegedStartService()
    # A reinstall removes the package's files under the running daemon.
    monkeypatch.setattr(usages, "SCHEMA_DIR", tmp_path / "removed")
    document = etree.fromstring(consent_ruleset(consent_rule("a", "sip:b@x.test", "sip:l@x.test")))
    usages.CONSENT_RULES.validate(document)
    usages.RESOURCE_LISTS.validate(
        etree.fromstring(b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists"/>')
    )
    top.stopService()


def test_missing_xcap_schemas_stop_start_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_schemas: None,
    events: EventLoggingObserver,
) -> None:
    monkeypatch.setattr(usages, "SCHEMA_DIR", tmp_path / "removed")
    reactor = BusyPorts()
    top = build_service(prepare(load_config(None, overrides(tmp_path))), reactor)
    with pytest.raises(ListenerError, match=r"^XCAP cannot load its XML schemas: ") as info:
        top.privilegedStartService()
    assert critical_lines(events) == [str(info.value)]
    assert [port for port, *_ in reactor.tcpServers] == [22855]  # MSRP only; closed by twistd


# -- the store ----------------------------------------------------------------------------


def test_postgresql_backend_builds_the_shared_store(
    tmp_path: Path, events: EventLoggingObserver
) -> None:
    dsn = "host=192.0.2.1 dbname=relayd user=relayd password=s3cret"
    config = load_config(None, overrides(tmp_path, store__backend="postgresql", store__dsn=dsn))
    prepared = prepare(config)
    store = build_store(prepared, reactor)
    try:
        assert isinstance(store, PostgresPermissionStore)  # nothing connects before use
    finally:
        store.close()
    RelayService(prepared).startService()
    (line,) = [formatEvent(e) for e in events if "starting:" in formatEvent(e)]
    assert line.endswith("store postgresql relayd@192.0.2.1:5432/relayd")
    assert "s3cret" not in line


# -- the metrics listener -----------------------------------------------------------------


def test_no_metrics_listener_unless_configured(tmp_path: Path) -> None:
    top = build_service(prepare(load_config(None, overrides(tmp_path))), BusyPorts())
    assert [child.name for child in top] == ["msrp", "xcap", "sip"]


def test_metrics_listener_binds_last_and_times_the_store(tmp_path: Path) -> None:
    reactor = BusyPorts()
    values = overrides(tmp_path, metrics__listen="tcp:29100:interface=127.0.0.1")
    top = build_service(prepare(load_config(None, values)), reactor)
    top.privilegedStartService()
    assert [port for port, *_ in reactor.tcpServers] == [22855, 24443, 25060, 29100]
    assert isinstance(top.getServiceNamed("xcap").store, TimedStore)
    top.stopService()


def test_busy_metrics_port_stops_start_in_one_line(
    tmp_path: Path, events: EventLoggingObserver
) -> None:
    reactor = BusyPorts(29100)
    values = overrides(tmp_path, metrics__listen="tcp:29100:interface=127.0.0.1")
    top = build_service(prepare(load_config(None, values)), reactor)
    with pytest.raises(ListenerError):
        top.privilegedStartService()
    assert critical_lines(events) == [
        "metrics cannot listen on tcp:29100:interface=127.0.0.1: Couldn't listen on"
        " 127.0.0.1:29100: [Errno 98] Address already in use."
    ]


def test_the_registrar_holds_as_many_bindings_as_configured(tmp_path: Path) -> None:
    """[sip] max_bindings sizes the location table (every node of a pool holds the
    whole pool's registrations: docs/deployment.md)."""
    top = build_service(prepare(load_config(None, overrides(tmp_path))), BusyPorts())
    assert top.getServiceNamed("sip").registrar.limits.max_bindings == 100_000
    values = overrides(tmp_path, sip__max_bindings="1500000")
    top = build_service(prepare(load_config(None, values)), BusyPorts())
    assert top.getServiceNamed("sip").registrar.limits.max_bindings == 1_500_000
