"""Tests for relayd.reload: what SIGHUP rereads, and that a bad file changes nothing.

The reload is called directly, on the daemon built over a fake reactor; the real
signal is sent to a real twistd in tests/integration/test_twistd_process.py.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.protocols.tls import TLSMemoryBIOProtocol

from relayd.msrp.service import MSRPService
from relayd.net.tls import certificate_dns_names
from relayd.net.tlsio import StdlibTLSServerFactory
from relayd.reload import Reloader
from relayd.service import RelayService
from relayd.sip.stack import SIPService
from relayd.sipuri import SIPURI
from relayd.testing import (
    captured_log,
    make_pki,
    prepared_relay,
    relay_config_overrides,
    relay_service,
    write_users,
)

REALM = "relayd-test"


def _lists(path: Path, *names: str) -> str:
    lists = "".join(f'<list name="{name}"><entry uri="sip:a@b.example"/></list>' for name in names)
    path.write_text(
        f'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">{lists}</resource-lists>'
    )
    return str(path)


class _TCPTransport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class Relay:
    """The daemon on a fake reactor, with its certificate, users and lists files."""

    def __init__(
        self,
        folder: Path,
        self_signed: bool = False,
        extra: dict[tuple[str, str], str] | None = None,
    ) -> None:
        self.pki = make_pki(folder / "pki")
        self.cert = folder / "cert.pem"
        self.key = folder / "key.pem"
        self._install("old.example.com")
        self.users = folder / "users"
        write_users(self.users, REALM, {"alice": "a"})
        self.lists = folder / "lists.xml"
        _lists(self.lists, "friends")
        overrides = relay_config_overrides(
            str(folder / "data"),
            "127.0.0.1",
            "" if self_signed else str(self.cert),
            "" if self_signed else str(self.key),
            str(self.users),
        )
        overrides[("store", "backend")] = "memory"
        overrides[("sip", "listen")] = "tcp:0:interface=127.0.0.1"  # no UDP in MemoryReactor
        overrides[("sip", "lists")] = str(self.lists)
        overrides[("sip", "domain")] = "relay.example.com"
        overrides.update(extra or {})
        self.reactor = MemoryReactorClock()
        self.top = cast(RelayService, relay_service(prepared_relay(overrides), self.reactor))
        self.top.startService()
        assert self.top.reloader is not None
        self.reloader: Reloader = self.top.reloader

    def _install(self, name: str) -> None:
        cert, key = self.pki.leaf(name)
        self.cert.write_bytes(Path(cert).read_bytes())
        self.key.write_bytes(Path(key).read_bytes())

    def renew(self, name: str) -> None:
        self._install(name)

    def served_by_xcap(self) -> list[str]:
        """The names of the certificate a new XCAP (pyOpenSSL) connection is given."""
        _, factory, _, _ = self.reactor.tcpServers[1]
        protocol = cast(
            TLSMemoryBIOProtocol, factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        )
        protocol.makeConnection(_TCPTransport())
        certificate = SSL.Connection(protocol.getHandle().get_context(), None).get_certificate()
        assert certificate is not None
        return certificate_dns_names(certificate)

    def msrp_context(self) -> Any:
        _, factory, _, _ = self.reactor.tcpServers[0]
        return cast(StdlibTLSServerFactory, factory).context_of()

    def msrp_outbound_names(self) -> list[str]:
        msrp = cast(MSRPService, self.top.getServiceNamed("msrp"))
        assert msrp.relay.identity is not None
        return msrp.relay.identity.dns_names

    def msrp_trust_roots(self) -> list[bytes]:
        msrp = cast(MSRPService, self.top.getServiceNamed("msrp"))
        roots = msrp.relay.trust_roots or []
        return [root.to_cryptography().public_bytes(Encoding.PEM) for root in roots]

    def has_list(self, name: str) -> bool:
        sip = cast(SIPService, self.top.getServiceNamed("sip"))
        return (
            sip.consent_relay.directory.lookup(SIPURI.parse(f"sip:{name}@relay.example.com"))
            is not None
        )

    def knows(self, user: str) -> bool:
        return self.top._prepared.users.lookup(user, REALM) is not None


@pytest.fixture
def events() -> Iterator[EventLoggingObserver]:
    with captured_log() as observer:
        yield observer


def _lines(events: EventLoggingObserver, level: LogLevel) -> list[str]:
    return [
        formatEvent(e) for e in events if e["log_level"] == level and "Reload" in formatEvent(e)
    ]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    running = Relay(tmp_path)
    yield running
    running.top.stopService()


def test_reload_puts_new_certificate_users_and_lists_in_use(
    relay: Relay, events: EventLoggingObserver
) -> None:
    msrp_before = relay.msrp_context()
    relay.renew("new.example.com")
    write_users(relay.users, REALM, {"alice": "a", "bob": "b"})
    _lists(relay.lists, "friends", "family")
    assert relay.served_by_xcap() == ["old.example.com"]
    assert relay.reloader.reload() is True
    assert relay.served_by_xcap() == ["new.example.com"]
    assert relay.msrp_context() is not msrp_before
    assert relay.msrp_outbound_names() == ["new.example.com"]
    assert relay.knows("bob") and relay.has_list("family")
    [line] = _lines(events, LogLevel.info)
    assert f"certificate {relay.cert}" in line and "(2 entries)" in line and "2 lists" in line
    assert _lines(events, LogLevel.error) == []


def test_a_key_that_does_not_fit_is_refused_and_nothing_changes(
    relay: Relay, events: EventLoggingObserver
) -> None:
    msrp_before = relay.msrp_context()
    new_cert, _ = relay.pki.leaf("new.example.com")
    relay.cert.write_bytes(Path(new_cert).read_bytes())  # the old key stays: no match
    write_users(relay.users, REALM, {"alice": "a", "bob": "b"})
    _lists(relay.lists, "friends", "family")
    assert relay.reloader.reload() is False
    assert relay.served_by_xcap() == ["old.example.com"]
    assert relay.msrp_context() is msrp_before
    assert relay.msrp_outbound_names() == ["old.example.com"]
    assert not relay.knows("bob") and not relay.has_list("family")
    assert _lines(events, LogLevel.error) == [
        "Reload refused, still serving the previous certificates, users and lists:"
        f" {relay.key} does not match the certificate in {relay.cert}"
    ]


def test_a_malformed_users_file_keeps_the_old_certificate(
    relay: Relay, events: EventLoggingObserver
) -> None:
    relay.renew("new.example.com")
    relay.users.write_text("alice:broken\n")
    assert relay.reloader.reload() is False
    assert relay.served_by_xcap() == ["old.example.com"]
    assert relay.knows("alice")
    [line] = _lines(events, LogLevel.error)
    assert f"{relay.users}:1: expected user:realm:HA1" in line


def test_an_unreadable_lists_file_is_named(relay: Relay, events: EventLoggingObserver) -> None:
    relay.lists.write_text("<resource-lists")
    assert relay.reloader.reload() is False
    assert relay.has_list("friends")
    [line] = _lines(events, LogLevel.error)
    assert f": {relay.lists}: " in line


def test_on_the_generated_certificate_only_users_and_lists_are_reread(
    tmp_path: Path, events: EventLoggingObserver
) -> None:
    relay = Relay(tmp_path, self_signed=True)
    write_users(relay.users, REALM, {"alice": "a", "bob": "b"})
    try:
        assert relay.reloader.reload() is True
    finally:
        relay.top.stopService()
    assert relay.knows("bob")
    [line] = _lines(events, LogLevel.info)
    assert "no [tls] certificate (the generated self-signed one has nothing to reread)" in line


def test_peer_relay_trust_roots_are_reread(tmp_path: Path, events: EventLoggingObserver) -> None:
    roots = tmp_path / "peers.pem"
    first, second = make_pki(tmp_path / "first"), make_pki(tmp_path / "second")
    roots.write_bytes(first.ca_pem)
    relay = Relay(tmp_path, extra={("msrp", "ca_certificates"): str(roots)})
    try:
        assert relay.msrp_trust_roots() == [first.ca_pem]
        roots.write_bytes(second.ca_pem)
        assert relay.reloader.reload() is True
        assert relay.msrp_trust_roots() == [second.ca_pem]
        roots.write_text("not a certificate\n")
        assert relay.reloader.reload() is False
        assert relay.msrp_trust_roots() == [second.ca_pem]
    finally:
        relay.top.stopService()
    [line] = _lines(events, LogLevel.error)
    assert line.endswith(f"{roots}: no certificates found")


def test_a_listeners_own_keys_are_reread(tmp_path: Path) -> None:
    own = make_pki(tmp_path / "own")
    cert, key = tmp_path / "xcap-cert.pem", tmp_path / "xcap-key.pem"

    def install(name: str) -> None:
        issued_cert, issued_key = own.leaf(name)
        cert.write_bytes(Path(issued_cert).read_bytes())
        key.write_bytes(Path(issued_key).read_bytes())

    install("xcap-old.example.com")
    listen = f"ssl:0:interface=127.0.0.1:certKey={cert}:privateKey={key}"
    relay = Relay(tmp_path, extra={("xcap", "listen"): listen})
    try:
        assert relay.served_by_xcap() == ["xcap-old.example.com"]
        install("xcap-new.example.com")
        assert relay.reloader.reload() is True
        assert relay.served_by_xcap() == ["xcap-new.example.com"]
    finally:
        relay.top.stopService()


def test_sighup_is_handled_while_the_relay_runs_and_handed_to_the_reactor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = signal.getsignal(signal.SIGHUP)
    relay = Relay(tmp_path)
    scheduled: list[Any] = []
    monkeypatch.setattr(relay.reactor, "callFromThread", scheduled.append, raising=False)
    handler = signal.getsignal(signal.SIGHUP)
    assert callable(handler) and handler is not before
    handler(signal.SIGHUP, None)
    # The handler only schedules: the reload runs from the reactor's loop.
    assert scheduled == [relay.reloader.reload]
    relay.top.stopService()
    assert signal.getsignal(signal.SIGHUP) is before
