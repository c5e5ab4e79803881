from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq import content
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers as HTTPHeaders

from relayd.bootstrap import Prepared
from relayd.msrp.client import AuthResult, MSRPClientProtocol, connect
from relayd.msrp.message import ByteRange, MSRPRequest
from relayd.msrp.service import MSRPService
from relayd.msrp.transport import MSRPRelay
from relayd.testing import (
    RelayPKI,
    TrustTestCA,
    make_pki,
    prepared_relay,
    relay_config_overrides,
    relay_service,
    write_users,
)

USERS = {"alice": "wonderland", "bob": "builder", "carol": "singer", "mallory": "evil"}
REALM = "relayd-test"

pytestmark = pytest.mark.integration


@dataclass
class RunningRelay:
    service: Any
    msrp: MSRPService
    relay: MSRPRelay
    host: str
    port: int
    prepared: Prepared

    @property
    def uri(self) -> str:
        return f"msrps://{self.host}:{self.port};tcp"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> RelayPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["sqlite", "postgresql"])
def durable_store(request: pytest.FixtureRequest) -> dict[str, str]:
    """The ``[store]`` keys of each durable backend: a test taking them runs on both."""
    if request.param == "sqlite":
        return {"backend": "sqlite"}
    return {"backend": "postgresql", "dsn": request.getfixturevalue("postgres_dsn")}


RelayFactory = Callable[..., Awaitable[RunningRelay]]


@pytest_twisted.async_yield_fixture
async def start_relay(tmp_path: Path, pki: RelayPKI) -> AsyncIterator[RelayFactory]:
    running: list[RunningRelay] = []

    async def factory(
        host: str = "127.0.0.1",
        extra: dict[tuple[str, str], str] | None = None,
        trust_peers: bool | str = True,
        alt_names: tuple[str, ...] = (),
    ) -> RunningRelay:
        folder = tmp_path / f"relay-{host}-{len(running)}"
        folder.mkdir()
        cert, key = pki.leaf(host, *alt_names)
        users = write_users(folder / "users.htdigest", REALM, USERS)
        if isinstance(trust_peers, str):
            ca_path = trust_peers
        else:
            ca_path = pki.ca_path if trust_peers else ""
        overrides = relay_config_overrides(
            str(folder / "data"), host, cert, key, users, ca_path, extra
        )
        prepared = prepared_relay(overrides)
        service = relay_service(prepared, reactor)
        service.startService()
        msrp = service.getServiceNamed("msrp")
        ports = await msrp.listening.addTimeout(5, reactor)
        address: Any = ports[0].getHost()
        instance = RunningRelay(service, msrp, msrp.relay, host, address.port, prepared)
        running.append(instance)
        return instance

    yield factory
    for instance in running:
        await instance.service.stopService()
    # Let connection teardown callbacks run before the next test.
    await deferLater(0.01)


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


@dataclass
class RecordingSink:
    """Collects SEND chunks per Message-ID; fires when a message completes."""

    messages: dict[str, bytearray] = field(default_factory=dict)
    ranges: list[tuple[str, ByteRange, bytes]] = field(default_factory=list)
    waiters: dict[str, defer.Deferred[bytes]] = field(default_factory=dict)
    arrived_at: dict[str, float] = field(default_factory=dict)
    keep: bool = True
    digests: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    _current: str = ""

    def chunk_started(self, request: MSRPRequest, byte_range: ByteRange) -> None:
        self._current = request.headers.get("Message-ID") or ""
        self.messages.setdefault(self._current, bytearray())
        self.digests.setdefault(self._current, hashlib.sha256())
        self.counts.setdefault(self._current, 0)
        self.ranges.append((self._current, byte_range, b""))
        expected = byte_range.start - 1
        if self.counts[self._current] != expected:
            raise AssertionError(
                f"chunk starts at {byte_range.start}, have {self.counts[self._current]}"
            )

    def chunk_data(self, data: bytes) -> None:
        self.counts[self._current] += len(data)
        self.digests[self._current].update(data)
        if self.keep:
            self.messages[self._current] += data

    def chunk_ended(self, flag: bytes) -> None:
        if flag == b"$":
            self.arrived_at[self._current] = reactor.seconds()
            waiter = self.waiters.pop(self._current, None)
            if waiter is not None:
                waiter.callback(bytes(self.messages[self._current]))

    def wait(self, message_id: str, timeout: float = 10) -> defer.Deferred[bytes]:
        if message_id in self.arrived_at:
            return defer.succeed(bytes(self.messages[message_id]))
        waiter: defer.Deferred[bytes] = defer.Deferred()
        self.waiters[message_id] = waiter
        return waiter.addTimeout(timeout, reactor)


async def client(
    relay: RunningRelay,
    user: str,
    sink: RecordingSink | None = None,
    trust: bytes | None = None,
) -> tuple[MSRPClientProtocol, AuthResult]:
    protocol = await connect(
        reactor, relay.uri, trust, sink_for=(lambda request: sink) if sink else None
    )
    result = await defer.Deferred.fromCoroutine(
        protocol.auth([relay.uri], user, USERS[user])
    ).addTimeout(5, reactor)
    return protocol, result


def path_to(protocol: MSRPClientProtocol, auth: AuthResult) -> list[str]:
    """What a peer puts in To-Path to reach this client (its SDP path, §5.1)."""
    return [*auth.use_path, protocol.local_uri]


# -- consent: what a recipient does over HTTPS with its Permission URI ------------------


class Capability:
    """HTTP client for a Permission URI (no account: the URI is the capability)."""

    def __init__(self, ca_pem: bytes, timeout: float = 5.0) -> None:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, contextFactory=TrustTestCA(ca_pem), pool=pool))
        self.timeout = timeout

    async def call(self, method: str, url: str, body: bytes | None = None) -> int:
        headers = HTTPHeaders({"Content-Type": ["application/auth-policy+xml"]})
        response = await self.http.request(method, url, data=body, headers=headers).addTimeout(
            self.timeout, reactor
        )
        await content(response).addTimeout(self.timeout, reactor)
        return int(response.code)
