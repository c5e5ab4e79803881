"""A list MESSAGE to a member registered with a TLS contact, over real loopback sockets.

The relay is built by ``relayd.service.build_service``; its trust roots for outbound TLS
are ``[msrp] ca_certificates``. Bob registers over UDP with a ``transport=tls`` contact
pointing at his own TLS server; alice sends to the list over UDP. Bob's server records
the bytes as they arrive on the socket (before TLS) so a test can tell that nothing of
the MESSAGE crossed the wire in clear.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredQueue, maybeDeferred
from twisted.internet.interfaces import IAddress, IListeningPort, ISSLTransport
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from relayd.consent.vocabulary import CONSENT_RULES_AUID
from relayd.sip.message import SIPRequest, SIPResponse, make_response, new_tag
from relayd.sip.parser import StreamFramer, parse_datagram
from relayd.testing import (
    grant_document,
    make_pki,
    prepared_relay,
    relay_config_overrides,
    relay_service,
    sip_credentials,
    uac_request,
    write_users,
)

pytestmark = pytest.mark.integration

reactor: Any = _reactor

HOST = "127.0.0.1"
REALM = "relayd-test"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}
ALICE = f"sip:alice@{HOST}"
BOB = f"sip:bob@{HOST}"
LIST = f"sip:club@{HOST}"
TEXT = b"over TLS only, please"
TIMEOUT_SECONDS = 5.0
REFUSAL_SECONDS = 1.0
"""From the failed handshake to the sender's final response: the relay knows at once,
and RFC 3261 §18.4 / §8.1.3.1 make a transport failure a prompt 503, not Timer F's 408."""

LISTS_XML = (
    '<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
    f'<list name="club"><entry uri="{BOB}"/></list></resource-lists>'
)


# -- bob's TLS server ---------------------------------------------------------------------


@dataclass
class TLSMember:
    """Bob's SIP-over-TLS server: answers 200 to every request it can read."""

    wire: bytearray = field(default_factory=bytearray)
    requests: DeferredQueue[SIPRequest] = field(default_factory=DeferredQueue)
    secure: list[bool] = field(default_factory=list)
    connections: list[_WireTap] = field(default_factory=list)
    closed: DeferredQueue[_WireTap] = field(default_factory=DeferredQueue)
    port: IListeningPort | None = None


class _MemberSIP(Protocol):
    """Decrypted side: frames SIP by Content-Length and answers each request."""

    def __init__(self, member: TLSMember) -> None:
        self.member = member
        self.framer = StreamFramer()

    def dataReceived(self, data: bytes) -> None:
        for event in self.framer.feed(data):
            if isinstance(event, SIPRequest):
                self.member.secure.append(ISSLTransport.providedBy(self.transport))
                self.member.requests.put(event)
                assert self.transport is not None
                self.transport.write(make_response(event, 200).to_bytes())


class _WireTap(Protocol):
    """Socket side: records the raw bytes, then hands them to the TLS layer."""

    def __init__(self, member: TLSMember, inner: Protocol) -> None:
        self.member = member
        self.inner = inner
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.member.connections.append(self)
        assert self.transport is not None
        self.inner.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.member.wire += data
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.reason = reason
        self.inner.connectionLost(reason)
        self.lost.callback(None)
        self.member.closed.put(self)


class _TapFactory(Factory):
    def __init__(self, member: TLSMember, tls: TLSMemoryBIOFactory) -> None:
        self.member = member
        self.tls = tls

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        inner = self.tls.buildProtocol(addr)
        assert inner is not None
        return _WireTap(self.member, inner)


def listen_tls_member(cert_path: str, key_path: str) -> TLSMember:
    member = TLSMember()
    pem = Path(cert_path).read_bytes() + Path(key_path).read_bytes()
    options = PrivateCertificate.loadPEM(pem).options()
    sip = Factory.forProtocol(lambda: _MemberSIP(member))
    tls = TLSMemoryBIOFactory(options, False, sip)
    member.port = reactor.listenTCP(0, _TapFactory(member, tls), interface=HOST)
    return member


# -- UDP user agents ----------------------------------------------------------------------


class UDPAgent(DatagramProtocol):
    """A UAC on its own UDP socket: one request at a time, digest answered once."""

    def __init__(self, user: str, relay_port: int) -> None:
        self.user = user
        self.relay_port = relay_port
        self.waiting: dict[str, Deferred[SIPResponse]] = {}
        self.cseq = 0
        self.port: Any = reactor.listenUDP(0, self, interface=HOST)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        message = parse_datagram(datagram)
        if isinstance(message, SIPResponse) and message.status >= 200:
            waiter = self.waiting.pop(message.via.branch or "", None)
            if waiter is not None:
                waiter.callback(message)

    async def request(
        self,
        method: str,
        uri: str,
        headers: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
        *,
        contact: str | None = None,
        to: str | None = None,
    ) -> SIPResponse:
        local = self.port.getHost().port
        call_id, from_tag = new_tag(), new_tag()
        authorization: tuple[str, str] | None = None
        while True:
            self.cseq += 1
            branch, request = uac_request(
                method,
                uri,
                via=f"SIP/2.0/UDP {HOST}:{local}",
                aor=f"sip:{self.user}@{HOST}",
                from_tag=from_tag,
                to=to,
                call_id=call_id,
                cseq=self.cseq,
                contact=contact or f"<sip:{self.user}@{HOST}:{local}>",
                headers=headers,
                authorization=authorization,
                body=body,
            )
            waiter: Deferred[SIPResponse] = Deferred()
            self.waiting[branch] = waiter
            self.port.write(request.to_bytes(), (HOST, self.relay_port))
            response: SIPResponse = await waiter.addTimeout(TIMEOUT_SECONDS, reactor)
            if authorization is not None:
                return response
            authorization = sip_credentials(
                response,
                method=method,
                uri=uri,
                username=self.user,
                password=PASSWORDS[self.user],
            )
            if authorization is None:
                return response


# -- the relay ------------------------------------------------------------------------------


@dataclass
class Scenario:
    """A started relay with bob registered at his TLS server, and alice to send."""

    member: TLSMember
    alice: UDPAgent


Setup = Callable[[bool], Awaitable[Scenario]]


@pytest_twisted.async_yield_fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    """``setup(trusted)``: the relay trusts only its own PKI's CA; bob's server
    certificate (for 127.0.0.1) comes from that PKI or, untrusted, from an unrelated one."""
    relay_pki = make_pki(tmp_path / "relay-pki")
    cleanups: list[Callable[[], object]] = []

    async def build(trusted: bool) -> Scenario:
        cert, key = relay_pki.leaf("relay", HOST)
        users = write_users(tmp_path / "users.htdigest", REALM, PASSWORDS)
        lists = tmp_path / "lists.xml"
        lists.write_text(LISTS_XML, encoding="utf-8")
        overrides = relay_config_overrides(
            str(tmp_path / "data"),
            HOST,
            cert,
            key,
            users,
            ca_path=relay_pki.ca_path,
            extra={
                ("store", "backend"): "memory",
                ("sip", "lists"): str(lists),
                ("sip", "domain"): HOST,
                ("sip", "listen"): f"udp:0:interface={HOST}",
            },
        )
        service = relay_service(prepared_relay(overrides), reactor)
        store = service.getServiceNamed("xcap").store
        await store.put_document(CONSENT_RULES_AUID, BOB, "index", grant_document(ALICE, LIST))
        service.startService()
        cleanups.append(service.stopService)
        sip = service.getServiceNamed("sip")
        await sip.listening.addTimeout(TIMEOUT_SECONDS, reactor)
        udp_port = sip.port_of("udp")

        bob_pki = relay_pki if trusted else make_pki(tmp_path / "stranger-pki")
        member_cert, member_key = bob_pki.leaf("bob", HOST)
        member = listen_tls_member(member_cert, member_key)
        cleanups.append(lambda: Deferred.fromCoroutine(_close_member(member)))
        alice = UDPAgent("alice", udp_port)
        bob = UDPAgent("bob", udp_port)
        for agent in (alice, bob):
            cleanups.append(agent.port.stopListening)

        assert member.port is not None
        address: Any = member.port.getHost()
        tls_contact = f"<sip:bob@{HOST}:{address.port};transport=tls>"
        registered = await bob.request(
            "REGISTER",
            f"sip:{HOST}",
            (("Expires", "600"),),
            contact=tls_contact,
            to=f"<{BOB}>",
        )
        assert registered.status == 200, registered
        return Scenario(member, alice)

    yield build
    for cleanup in reversed(cleanups):
        await maybeDeferred(cleanup)


async def _close_member(member: TLSMember) -> None:
    """Stop bob's listener and drop his connections, waiting until each is gone."""
    if member.port is not None:
        await maybeDeferred(member.port.stopListening)
    for connection in member.connections:
        if connection.reason is None:
            assert connection.transport is not None
            connection.transport.abortConnection()  # type: ignore[attr-defined]
        await connection.lost.addTimeout(TIMEOUT_SECONDS, reactor)


async def send_to_list(alice: UDPAgent) -> SIPResponse:
    return await alice.request("MESSAGE", LIST, (("Content-Type", "text/plain"),), TEXT)


# -- the tests --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_list_message_reaches_a_tls_member_over_verified_tls(setup: Setup) -> None:
    scenario = await setup(True)
    member = scenario.member

    response = await send_to_list(scenario.alice)
    delivered = await member.requests.get().addTimeout(TIMEOUT_SECONDS, reactor)

    assert response.status == 200, response
    assert delivered.method == "MESSAGE"
    assert delivered.body == TEXT
    assert delivered.headers.get("P-Asserted-Identity") == f"<{ALICE}>"
    assert delivered.via.transport == "TLS"
    assert member.secure == [True]
    assert TEXT not in member.wire and b"MESSAGE sip:" not in member.wire
    assert member.wire.startswith(b"\x16\x03")  # a TLS handshake record came first


@pytest_twisted.ensureDeferred
async def test_list_message_is_refused_when_the_members_certificate_is_untrusted(
    setup: Setup,
) -> None:
    scenario = await setup(False)
    member = scenario.member

    sent = Deferred.fromCoroutine(send_to_list(scenario.alice))
    closed = await member.closed.get().addTimeout(TIMEOUT_SECONDS, reactor)
    assert closed.reason is not None  # the relay hung up during the handshake
    assert member.secure == []
    assert TEXT not in member.wire and b"MESSAGE sip:" not in member.wire

    # At once, not after Timer F: a failed handshake is a failed connect (§8.1.3.1).
    response = await sent.addTimeout(REFUSAL_SECONDS, reactor)
    assert response.status >= 300, response
