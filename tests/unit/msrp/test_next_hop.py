"""Next-hop lookup (RFC 4976 §8): SRV when the URI has no port, then A/AAAA on 2855."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock

from relayd.config import load_config
from relayd.digest import DigestAuthenticator
from relayd.msrp.connection import MSRPConnection
from relayd.msrp.relay import AuthPolicy, RelayCore
from relayd.msrp.service import relay_limits
from relayd.msrp.transport import MSRPRelay
from relayd.msrp.uri import MSRPURI


class Recorder:
    def __init__(self, reachable: set[tuple[str, int]]) -> None:
        self.reachable = reachable
        self.tried: list[tuple[str, str, int]] = []
        self.lookups: list[tuple[str, str]] = []

    def resolver(self, service: str, host: str) -> defer.Deferred[list[tuple[str, int]]]:
        self.lookups.append((service, host))
        return defer.succeed([("b1.example.com", 5000), ("b2.example.com", 5001)])


def make_relay(recorder: Recorder, tmp_path: Any) -> MSRPRelay:
    clock = MemoryReactorClock()
    config = load_config(None, {("relay", "data_dir"): str(tmp_path)})
    digest = DigestAuthenticator("r", lambda user, realm: None, clock)
    core = RelayCore(clock, "relay.example.com", AuthPolicy("r", 1800, 60, 86400), digest)
    relay = MSRPRelay(clock, core, relay_limits(config.msrp), resolver=recorder.resolver)

    async def fake_open(key: Any, scheme: str, name: str, host: str, port: int) -> MSRPConnection:
        recorder.tried.append((name, host, port))
        if (host, port) not in recorder.reachable:
            raise error.ConnectionRefusedError(host)
        connection = MSRPConnection(relay, inbound=False, tls=scheme == "msrps")
        connection.connected = True
        return connection

    relay._open = fake_open  # type: ignore[method-assign]
    return relay


@pytest.mark.parametrize(
    ("reachable", "expected_last"),
    [
        ({("b1.example.com", 5000)}, ("next.example.com", "b1.example.com", 5000)),
        ({("b2.example.com", 5001)}, ("next.example.com", "b2.example.com", 5001)),
        ({("next.example.com", 2855)}, ("next.example.com", "next.example.com", 2855)),
    ],
)
def test_uri_without_port_uses_srv_in_order_then_default_port(
    tmp_path: Any, reachable: set[tuple[str, int]], expected_last: tuple[str, str, int]
) -> None:
    recorder = Recorder(reachable)
    relay = make_relay(recorder, tmp_path)
    result = relay.connection_for(MSRPURI.parse("msrps://next.example.com/s1;tcp"))
    connections: list[MSRPConnection] = []
    result.addCallback(connections.append)
    assert recorder.lookups == [("_msrps._tcp", "next.example.com")]
    assert connections and recorder.tried[-1] == expected_last
    # The TLS name checked is always the URI host, whatever address SRV gave.
    assert all(name == "next.example.com" for name, _, _ in recorder.tried)


def test_uri_with_port_skips_srv(tmp_path: Any) -> None:
    recorder = Recorder({("next.example.com", 7000)})
    relay = make_relay(recorder, tmp_path)
    relay.connection_for(MSRPURI.parse("msrp://next.example.com:7000/s1;tcp"))
    assert recorder.lookups == []
    assert recorder.tried == [("next.example.com", "next.example.com", 7000)]


def test_unreachable_next_hop_fails_every_waiter_once(tmp_path: Any) -> None:
    recorder = Recorder(set())
    relay = make_relay(recorder, tmp_path)
    answer: defer.Deferred[list[tuple[str, int]]] = defer.Deferred()
    relay._resolver = lambda service, host: answer
    uri = MSRPURI.parse("msrps://next.example.com/s1;tcp")
    failures: list[Any] = []
    first = relay.connection_for(uri)
    second = relay.connection_for(uri)
    first.addErrback(failures.append)
    second.addErrback(failures.append)
    answer.callback([("b1.example.com", 5000), ("b2.example.com", 5001)])
    assert len(failures) == 2
    # Three addresses tried once, shared by both waiters.
    assert len(recorder.tried) == 3


def test_srv_targets_of_equal_weight_take_turns_first(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 2782 (relayd.net.srv): equal priority and weight is a random order, not by name."""
    from twisted.names import client, dns

    class Answers:
        def lookupService(self, name: str) -> defer.Deferred[Any]:
            records = [dns.Record_SRV(10, 1, 5000, "b1.example.com")]
            records.append(dns.Record_SRV(10, 1, 5001, "b2.example.com"))
            answers = [dns.RRHeader(name, dns.SRV, payload=r) for r in records]
            return defer.succeed((answers, [], []))

    monkeypatch.setattr(client, "getResolver", Answers)
    firsts = set()
    for _ in range(40):
        recorder = Recorder({("b1.example.com", 5000), ("b2.example.com", 5001)})
        relay = make_relay(recorder, tmp_path)
        relay._resolver = _default_resolver()
        relay.connection_for(MSRPURI.parse("msrps://next.example.com/s1;tcp"))
        firsts.add(recorder.tried[0][1])
    assert firsts == {"b1.example.com", "b2.example.com"}


def _default_resolver() -> Any:
    """The resolver MSRPRelay uses when it is given none."""
    clock = MemoryReactorClock()
    digest = DigestAuthenticator("r", lambda user, realm: None, clock)
    core = RelayCore(clock, "relay.example.com", AuthPolicy("r", 1800, 60, 86400), digest)
    config = load_config(None, {})
    return MSRPRelay(clock, core, relay_limits(config.msrp))._resolver
