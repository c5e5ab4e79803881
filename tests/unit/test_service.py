"""Tests for relayd.service: prepare's checks and the listeners bound at start.

Listeners are bound on a ``MemoryReactorClock`` whose ``listenTCP``/``listenUDP``
can be made to fail, as a busy port or a missing address would.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel

from relayd.config import ConfigError, load_config
from relayd.endpoints import parse_endpoint
from relayd.service import (
    ListenerError,
    MSRPService,
    SIPService,
    build_service,
    listener_identity,
    prepare,
)
from relayd.testing import captured_log, consent_rule, consent_ruleset, make_intermediate_pki
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
        return _UDPPort(port, interface)


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


# -- prepare ---------------------------------------------------------------------------------


def test_existing_data_dir_is_tightened_once(tmp_path: Path, events: EventLoggingObserver) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # noqa: S103 - the too-open mode under test
    config = load_config(None, overrides(tmp_path))
    prepare(config)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    changed = [e for e in events if "had mode" in (e.get("log_format") or "")]
    assert [(e["path"], e["mode"], e["log_level"]) for e in changed] == [
        (str(data), "0755", LogLevel.warn)
    ]
    prepare(config)  # already 0700: nothing to say
    assert len([e for e in events if "had mode" in (e.get("log_format") or "")]) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_data_dir_of_another_owner_keeps_its_mode(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)  # noqa: S103 - the too-open mode under test
    os.chown(data, 65534, 65534)
    prepare(load_config(None, overrides(tmp_path)))
    assert stat.S_IMODE(data.stat().st_mode) == 0o755


def test_file_errors_name_the_command_line_when_the_value_came_from_it(tmp_path: Path) -> None:
    ini = tmp_path / "good.ini"
    ini.write_text("[auth]\nrealm = good\n", encoding="utf-8")
    garbage = tmp_path / "not-a-certificate"
    garbage.write_text("hello\n")
    values = overrides(tmp_path, tls__certificate=str(garbage), tls__private_key=str(garbage))
    with pytest.raises(ConfigError) as info:
        prepare(load_config(str(ini), values))
    assert str(info.value).startswith("command line: [tls] certificate: ")


def test_file_errors_name_the_file_when_the_value_came_from_it(tmp_path: Path) -> None:
    garbage = tmp_path / "not-a-certificate"
    garbage.write_text("hello\n")
    ini = tmp_path / "good.ini"
    ini.write_text(f"[tls]\ncertificate = {garbage}\nprivate_key = {garbage}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        prepare(load_config(str(ini), overrides(tmp_path)))
    assert str(info.value).startswith(f"{ini}: [tls] certificate: ")


def test_extra_cert_chain_is_served_by_the_listener(tmp_path: Path) -> None:
    pki = make_intermediate_pki(tmp_path / "pki", "127.0.0.1")
    listen = (
        f"ssl:22855:interface=127.0.0.1:certKey={pki.leaf_path}:privateKey={pki.key_path}"
        f":extraCertChain={pki.intermediate_path}"
    )
    prepared = prepare(load_config(None, overrides(tmp_path, msrp__listen=listen)))
    identity = listener_identity(prepared, parse_endpoint(listen))
    subjects = [c.to_cryptography().subject.rfc4514_string() for c in identity.chain]
    assert subjects == ["CN=127.0.0.1", "CN=relayd test intermediate"]


def test_extra_cert_chain_without_certificates_is_refused_by_prepare(tmp_path: Path) -> None:
    garbage = tmp_path / "chain.pem"
    garbage.write_text("hello\n")
    listen = f"ssl:22855:interface=127.0.0.1:extraCertChain={garbage}"
    with pytest.raises(ConfigError) as info:
        prepare(load_config(None, overrides(tmp_path, msrp__listen=listen)))
    assert str(info.value) == (
        f"command line: [msrp] listen: extraCertChain: {garbage}: no certificate found"
    )


def test_a_lists_file_entry_the_relay_cannot_route_stops_start(tmp_path: Path) -> None:
    """The store keeps such entries (docs/consent.md); the file only defines routes."""
    lists = tmp_path / "lists.xml"
    lists.write_bytes(
        b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        b'<list name="staff"><entry uri="sip:bob@x.test"/><entry uri="mailto:bob@x.test"/>'
        b"</list></resource-lists>"
    )
    with pytest.raises(ConfigError) as info:
        prepare(load_config(None, overrides(tmp_path, sip__lists=str(lists))))
    assert str(info.value).endswith(
        '[sip] lists: resource-lists/list[@name="staff"]/entry[@uri="mailto:bob@x.test"]:'
        " mailto: URIs are not relayed (only sip: and sips:)"
    )
