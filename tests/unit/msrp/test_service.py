"""relayd.msrp.service: the start-up warning for a Use-Path host that peers cannot
verify (RFC 4976 §5, §6.1).

Listeners are bound on a ``MemoryReactorClock``: nothing listens for real, so a
wildcard listener can be tried without leaving loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock

from relayd.bootstrap import prepare
from relayd.config import load_config
from relayd.msrp.service import MSRPService, exposed_listener_host
from relayd.service import build_service
from relayd.testing import captured_log


@pytest.mark.parametrize(
    ("hostname", "hosts", "exposed"),
    [
        ("127.0.0.1", ["127.0.0.1"], None),
        ("127.0.0.1", ["127.0.0.1", "0.0.0.0"], "0.0.0.0"),  # noqa: S104 - only compared
        ("localhost", ["::1", "127.0.0.2"], None),
        ("localhost", ["::"], "::"),
        ("LocalHost.", ["192.0.2.7"], "192.0.2.7"),
        ("[2001:db8::1]", ["2001:db8::1"], "2001:db8::1"),
        ("::1", ["localhost"], None),
        # A DNS name is what peers verify: never a warning.
        ("relay.example.com", ["0.0.0.0"], None),  # noqa: S104 - only compared
        ("localhost.example.com", ["192.0.2.7"], None),
    ],
)
def test_exposed_listener_host(hostname: str, hosts: list[str], exposed: str | None) -> None:
    assert exposed_listener_host(hostname, hosts) == exposed


@pytest.fixture
def warnings() -> Iterator[EventLoggingObserver]:
    with captured_log() as observer:
        yield observer


def start_msrp(tmp_path: Path, hostname: str, listen: str) -> MSRPService:
    overrides = {
        ("relay", "data_dir"): str(tmp_path / "data"),
        ("relay", "hostname"): hostname,
        ("msrp", "listen"): listen,
        ("store", "backend"): "memory",
    }
    service = build_service(prepare(load_config(None, overrides)), MemoryReactorClock())
    msrp = service.getServiceNamed("msrp")
    assert isinstance(msrp, MSRPService)
    msrp.startService()
    assert msrp.listening.called
    return msrp


def hostname_warnings(observer: EventLoggingObserver) -> list[dict[str, Any]]:
    return [
        event
        for event in observer
        if "[relay] hostname" in (event.get("log_format") or "")
        and event["log_level"].name == "warn"
    ]


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_ip_or_localhost_hostname_off_loopback_warns_once(
    tmp_path: Path, warnings: EventLoggingObserver, hostname: str
) -> None:
    listen = "tcp:2855\nssl:2856\ntcp:2857:interface=127.0.0.1"
    msrp = start_msrp(tmp_path, hostname, listen)
    (event,) = hostname_warnings(warnings)
    assert event["hostname"] == hostname
    assert event["host"] == "0.0.0.0"  # noqa: S104 - the wildcard a bare port listens on
    assert "cannot verify" in event["log_format"]
    # Only a warning: the listeners are up and the Use-Path keeps the name.
    assert len(msrp.ports) == 3
    assert msrp.relay.core.hostname == hostname


@pytest.mark.parametrize(
    ("hostname", "listen"),
    [
        ("127.0.0.1", "ssl:2855:interface=127.0.0.1\ntcp:2856:interface=127.0.0.1"),
        ("localhost", r"ssl:2855:interface=\:\:1"),
        ("relay.example.com", "tcp:2855"),
    ],
)
def test_no_warning_on_loopback_or_with_a_dns_name(
    tmp_path: Path, warnings: EventLoggingObserver, hostname: str, listen: str
) -> None:
    start_msrp(tmp_path, hostname, listen)
    assert hostname_warnings(warnings) == []
