"""The seed's flows (figures 2 and 3) against the relay as relayd.service builds it.

Real UDP, TCP and TLS sockets on 127.0.0.1; members are small Twisted UAs that register
with the relay's registrar and answer 200; the recipient grants, refuses and revokes
through the XCAP HTTPS site with the Permission URI it was given (capability access, no
account) or with its own digest credentials on its own documents.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from lxml import etree
from treq import content
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredQueue, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import DatagramProtocol, Protocol, ServerFactory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher

from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as CP
from relayd.consent.vocabulary import CONSENT_POLICY_NAMESPACE as CR
from relayd.consent.vocabulary import CONSENT_RULES_AUID, CONSENT_STATUS_NAMESPACE
from relayd.consent.vocabulary import CONSENT_RULES_MIME_TYPE as POLICY_TYPE
from relayd.consent.vocabulary import PENDING_ADDITIONS_NAMESPACE as CS
from relayd.consent.vocabulary import RESOURCE_LISTS_NAMESPACE as RL
from relayd.ctl import consent as ctl_consent
from relayd.ctl.settings import Credentials, CtlError
from relayd.ctl.sipua import SIPUserAgent
from relayd.sip.consent import parse_trigger_consent
from relayd.sip.message import (
    SIPRequest,
    SIPResponse,
    make_response,
    new_tag,
    tag_of,
)
from relayd.sip.parser import StreamFramer, parse_datagram
from relayd.sip.stack import SIPService
from relayd.sipuri import NameAddr
from relayd.testing import (
    RelayPKI,
    consent_rule,
    prepared_relay,
    relay_config_overrides,
    relay_service,
    sip_credentials,
    uac_request,
)
from relayd.testing import consent_ruleset as ruleset
from relayd.testing import grant_document as granting_rules
from relayd.testing import write_users as write_users_file
from relayd.tokens import redact
from relayd.xcap.client import XCAPClient, document_path, node_path

from .conftest import Capability
from .test_ctl import environment, relayctl

pytestmark = pytest.mark.integration

reactor: Any = _reactor

HOST = "127.0.0.1"
REALM = "relayd-test"
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "mallory": "evil-pw"}
LIST = f"sip:friends@{HOST}"
SOLO = f"sip:solo@{HOST}"
BOB = f"sip:bob@{HOST}"
CAROL = f"sip:carol@{HOST}"
ALICE = f"sip:alice@{HOST}"
TIMEOUT = 5.0
NOTIFY_WITHIN_SECONDS = 1.0
"""From the start of an XCAP write to the NOTIFY it causes. A generous bound that only
catches polling or a lost change event; the 100 ms target is bench/notify_bench.py's."""

LISTS_XML = f"""<?xml version="1.0" encoding="UTF-8"?>
<resource-lists xmlns="{RL}" xmlns:cr="{CR}">
  <list name="friends" cr:owner="{ALICE}">
    <entry uri="{BOB}"/>
    <entry uri="{CAROL}"/>
  </list>
  <list name="solo">
    <entry uri="{BOB}"/>
  </list>
</resource-lists>
"""


def grant_document(sender: str = ALICE, target: str = LIST) -> bytes:
    return granting_rules(sender, target)


def rule(rule_id: str, sender: str, target: str = SOLO, handling: str = "grant") -> str:
    return consent_rule(rule_id, sender, target, handling)


# -- a small UA -------------------------------------------------------------------------


@dataclass
class UA:
    """One user agent on its own UDP socket or TCP connection to the relay."""

    user: str
    transport: str
    relay_port: int
    answer_status: int = 200
    answer_headers: tuple[tuple[str, str], ...] = ()
    received: list[SIPRequest] = field(default_factory=list)
    incoming: DeferredQueue[SIPRequest] = field(default_factory=DeferredQueue)
    waiting: dict[str, Deferred[SIPResponse]] = field(default_factory=dict)
    local_port: int = 0
    contact_port: int = 0
    """The port its Contact names, when not the one it sends from (a UA behind a NAT)."""
    _write: Callable[[bytes], None] | None = None
    _closer: Callable[[], object] | None = None
    cseq: int = 0

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@{HOST}"

    @property
    def contact(self) -> str:
        port = self.contact_port or self.local_port
        return f"<sip:{self.user}@{HOST}:{port};transport={self.transport.lower()}>"

    def feed(self, message: SIPRequest | SIPResponse) -> None:
        if isinstance(message, SIPResponse):
            if message.status < 200:
                return
            waiter = self.waiting.pop(message.via.branch or "", None)
            if waiter is not None:
                waiter.callback(message)
            return
        if message.method != "ACK":
            self.received.append(message)
            self.incoming.put(message)
            response = make_response(message, self.answer_status, headers=self.answer_headers)
            self.send_bytes(response.to_bytes())

    def send_bytes(self, data: bytes) -> None:
        assert self._write is not None
        self._write(data)

    async def request(
        self,
        method: str,
        uri: str,
        headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
        body: bytes = b"",
        *,
        to: str | None = None,
        call_id: str | None = None,
        from_tag: str | None = None,
        authenticate: bool = True,
    ) -> SIPResponse:
        call_id = call_id or new_tag()
        from_tag = from_tag or new_tag()
        authorization: tuple[str, str] | None = None
        for _ in range(3):
            self.cseq += 1
            branch, request = uac_request(
                method,
                uri,
                via=f"SIP/2.0/{self.transport} {HOST}:{self.local_port}",
                aor=self.aor,
                from_tag=from_tag,
                to=to,
                call_id=call_id,
                cseq=self.cseq,
                contact=self.contact,
                headers=headers,
                authorization=authorization,
                body=body,
            )
            waiter: Deferred[SIPResponse] = Deferred()
            self.waiting[branch] = waiter
            self.send_bytes(request.to_bytes())
            response: SIPResponse = await waiter.addTimeout(TIMEOUT, reactor)
            if not authenticate:
                return response
            authorization = sip_credentials(
                response, method=method, uri=uri, username=self.user, password=USERS[self.user]
            )
            if authorization is None:
                return response
        raise AssertionError("authentication loop")

    async def register(self) -> None:
        response = await self.request(
            "REGISTER", f"sip:{HOST}", [("Expires", "600")], to=f"<{self.aor}>"
        )
        assert response.status == 200, response

    async def next_request(
        self, method: str | None = None, call_id: str | None = None
    ) -> SIPRequest:
        """The next request of that method (and dialog); others are skipped."""
        while True:
            request: SIPRequest = await self.incoming.get().addTimeout(TIMEOUT, reactor)
            if method is not None and request.method != method:
                continue
            if call_id is None or request.call_id == call_id:
                return request

    def close(self) -> object:
        return self._closer() if self._closer is not None else None


class _UDP(DatagramProtocol):
    def __init__(self, ua: UA) -> None:
        self.ua = ua

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.ua.feed(parse_datagram(datagram))


class _TCP(Protocol):
    def __init__(self, ua: UA) -> None:
        self.ua = ua
        self.framer = StreamFramer()

    def dataReceived(self, data: bytes) -> None:
        for event in self.framer.feed(data):
            assert isinstance(event, SIPRequest | SIPResponse), event
            self.ua.feed(event)


async def start_ua(user: str, transport: str, relay: Running, **kw: Any) -> UA:
    port = {"UDP": relay.udp_port, "TCP": relay.tcp_port, "TLS": relay.tls_port}[transport]
    ua = UA(user, transport, port, **kw)
    if transport == "UDP":
        protocol = _UDP(ua)
        listening = reactor.listenUDP(0, protocol, interface=HOST)
        ua.local_port = listening.getHost().port
        ua._write = lambda data: listening.write(data, (HOST, port))
        ua._closer = listening.stopListening
    else:
        stream = _TCP(ua)
        endpoint: IStreamClientEndpoint = TCP4ClientEndpoint(reactor, HOST, port)
        if transport == "TLS":
            # Verifies the relay's certificate (IP SAN) against the test CA only.
            trust = Certificate.loadPEM(relay.ca_pem)
            endpoint = wrapClientTLS(optionsForClientTLS(HOST, trustRoot=trust), endpoint)
        await connectProtocol(endpoint, stream)
        assert stream.transport is not None
        ua.local_port = stream.transport.getHost().port  # type: ignore[attr-defined]
        ua._write = stream.transport.write
        ua._closer = stream.transport.loseConnection
    relay.uas.append(ua)
    return ua


def bind_udp_ua(user: str) -> UA:
    """A UA on its own UDP port before any relay runs, so that a list can name it by
    that port; :func:`attach_ua` points it at the relay once one is started."""
    ua = UA(user, "UDP", 0)
    listening = reactor.listenUDP(0, _UDP(ua), interface=HOST)
    ua.local_port = listening.getHost().port
    ua._write = lambda data: listening.write(data, (HOST, ua.relay_port))
    ua._closer = listening.stopListening
    return ua


def attach_ua(ua: UA, relay: Running) -> None:
    ua.relay_port = relay.udp_port
    relay.uas.append(ua)


# -- the relay --------------------------------------------------------------------------


@dataclass
class Running:
    service: Any
    sip: SIPService
    udp_port: int
    tcp_port: int
    tls_port: int
    xcap: Capability
    ca_pem: bytes
    uas: list[UA] = field(default_factory=list)

    @property
    def xcap_root(self) -> str:
        """The public XCAP root (``https://127.0.0.1:<port>/xcap-root``)."""
        return str(self.service.getServiceNamed("xcap").public_url)


Start = Callable[..., Awaitable[Running]]


@pytest_twisted.async_yield_fixture
async def start(tmp_path: Path, pki: RelayPKI) -> AsyncIterator[Start]:
    running: list[Running] = []
    cert, key = pki.leaf(HOST)
    users = write_users_file(tmp_path / "users.htdigest", REALM, USERS)
    lists = tmp_path / "lists.xml"
    lists.write_text(LISTS_XML, encoding="utf-8")

    async def factory(**extra: str) -> Running:
        overrides = relay_config_overrides(
            str(tmp_path / "data"),
            HOST,
            cert,
            key,
            users,
            extra={
                ("sip", "lists"): str(lists),
                ("sip", "listen"): "\n".join(
                    f"{kind}:0:interface={HOST}" for kind in ("udp", "tcp", "ssl")
                ),
                **{(k.split("__")[0], k.split("__")[1]): v for k, v in extra.items()},
            },
        )
        service = relay_service(prepared_relay(overrides), reactor)
        service.startService()
        sip: SIPService = service.getServiceNamed("sip")
        await sip.listening.addTimeout(TIMEOUT, reactor)
        await service.getServiceNamed("xcap").listening.addTimeout(TIMEOUT, reactor)
        item = Running(
            service,
            sip,
            sip.port_of("udp"),
            sip.port_of("tcp"),
            sip.port_of("ssl"),
            Capability(pki.ca_pem),
            pki.ca_pem,
        )
        running.append(item)
        return item

    yield factory
    for item in running:
        for ua in item.uas:
            closed = ua.close()
            if isinstance(closed, Deferred):
                await closed
        await item.service.stopService()
    await deferLater(reactor, 0.05, lambda: None)
    # Stopping ends every transaction: nothing of theirs may still be scheduled.
    left = [
        name
        for name in (getattr(call.func, "__qualname__", "") for call in reactor.getDelayedCalls())
        if name.startswith(("ServerTransaction", "ClientTransaction", "DelayQueue"))
    ]
    assert not left


def consent_uris(response: SIPResponse) -> list[str]:
    assert response.headers.get("content-type") == "application/resource-lists+xml"
    root = etree.fromstring(response.body)
    return [entry.get("uri") or "" for entry in root.iter(f"{{{RL}}}entry")]


def status_entries(notify: SIPRequest) -> list[dict[str, str]]:
    root = etree.fromstring(notify.body)
    assert root.tag == f"{{{CONSENT_STATUS_NAMESPACE}}}consent-status"
    return [{str(k): str(v) for k, v in entry.attrib.items()} for entry in root]


def call_info_uri(response: SIPResponse) -> str:
    value = response.headers.get("call-info") or ""
    assert value.endswith(";purpose=wait-permission"), value
    return value[value.index("<") + 1 : value.index(">")]


async def send_message(ua: UA, uri: str = LIST, text: bytes = b"hello list") -> SIPResponse:
    return await ua.request("MESSAGE", uri, [("Content-Type", "text/plain")], text)


async def ask_consent(ua: UA, consent_uri: str) -> SIPResponse:
    return await ua.request(
        "CONSENT", consent_uri, [("Consent-Methods", "MESSAGE")], to=f"<{consent_uri}>"
    )


async def subscribe(
    ua: UA, uri: str, event: str = "wait-permission", expires: int = 600
) -> tuple[SIPResponse, SIPRequest]:
    response = await ua.request(
        "SUBSCRIBE", uri, [("Event", event), ("Expires", str(expires))], to=f"<{uri}>"
    )
    assert response.status == 200, response
    notify = await ua.next_request("NOTIFY", response.call_id)
    return response, notify


async def notify_after(
    ua: UA, dialog: str | None, change: Awaitable[int]
) -> tuple[int, SIPRequest]:
    """Make an XCAP ``change`` and take the NOTIFY it causes in ``dialog``.

    Timed from before the request: the NOTIFY is pushed by the store change, so it may
    overtake the HTTP answer, and a poll or a lost change would show as a late one."""
    started = time.monotonic()
    code = await change
    notify = await ua.next_request("NOTIFY", dialog)
    assert time.monotonic() - started < NOTIFY_WITHIN_SECONDS
    return code, notify


# -- the flows ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["UDP", "TCP", "TLS"])
@pytest_twisted.ensureDeferred
async def test_figure_2_online_recipients(start: Start, transport: str) -> None:
    relay = await start()
    alice = await start_ua("alice", transport, relay)
    bob = await start_ua("bob", transport, relay)
    carol = await start_ua("carol", transport, relay)
    await bob.register()
    await carol.register()

    first = await send_message(alice)
    assert first.status == 470
    targets = consent_uris(first)
    assert len(targets) == 2
    missing = first.headers.get_all("permission-missing")
    assert [NameAddr.parse(v).uri.format() for v in missing] == targets
    # Alice owns the list: each consent URI names its member.
    assert [NameAddr.parse(v).display_name for v in missing] == [BOB, CAROL]
    assert not [r for r in bob.received + carol.received if r.method == "MESSAGE"]

    permission: dict[str, str] = {}
    waits: list[str] = []
    for target, member in zip(targets, (bob, carol), strict=True):
        accepted = await ask_consent(alice, target)
        assert accepted.status == 202, accepted
        waits.append(call_info_uri(accepted))
        forwarded = await member.next_request("CONSENT")
        assert forwarded.headers.get("consent-methods") == "MESSAGE"
        value = forwarded.headers.get("permission") or ""
        assert value.startswith("<https://") and value.endswith(".xml>")
        permission[member.user] = value[1:-1]
        assert forwarded.headers.get("p-asserted-identity") == f"<{ALICE}>"

    dialogs: dict[str, str | None] = {}
    for user, wait in (("bob", waits[0]), ("carol", waits[1])):
        ok, notify = await subscribe(alice, wait)
        dialogs[user] = ok.call_id
        assert notify.headers.get("subscription-state", "").startswith("active")
        assert [e["state"] for e in status_entries(notify)] == ["pending"]
        put = relay.xcap.call("PUT", permission[user], grant_document())
        code, granted = await notify_after(alice, ok.call_id, put)
        assert code == 201
        assert [e["state"] for e in status_entries(granted)] == ["granted"]

    relayed = await send_message(alice, text=b"now it works")
    assert relayed.status == 200, relayed
    for member in (bob, carol):
        message = await member.next_request("MESSAGE")
        assert message.body == b"now it works"
        assert message.headers.get("p-asserted-identity") == f"<{ALICE}>"
        trigger = message.headers.get("trigger-consent") or ""
        # RFC 5360 §5.11.2: a bare SIP URI, the list quoted as target-uri.
        assert trigger.endswith(f';target-uri="{LIST}"') and trigger.startswith("sip:")
        assert "proxy-authorization" not in message.headers

    # Revocation (seed §10): bob deletes his permission; his watcher hears of it.
    delete = relay.xcap.call("DELETE", permission["bob"])
    code, revoked = await notify_after(alice, dialogs["bob"], delete)
    assert code == 200
    assert status_entries(revoked)[0]["state"] == "revoked"
    before = len(carol.received)
    again = await send_message(alice, text=b"after revocation")
    assert again.status == 470
    assert len(consent_uris(again)) == 1
    await deferLater(reactor, 0.1, lambda: None)
    assert len(carol.received) == before


def member_states(notify: SIPRequest) -> dict[str, str]:
    """An RFC 5362 NOTIFY body: member URI → its consent state."""
    assert notify.headers.get("content-type") == "application/resource-lists+xml"
    root = etree.fromstring(notify.body)
    return {
        entry.get("uri") or "": entry.findtext(f"{{{CS}}}consent-status") or ""
        for entry in root.iter(f"{{{RL}}}entry")
    }


@pytest_twisted.ensureDeferred
async def test_the_list_owner_watches_members_consent_as_pending_additions(start: Start) -> None:
    """RFC 5362: alice owns the friends list and sees bob go pending → waiting →
    granted as she asks him and he writes his permission; bob may not watch her list."""
    relay = await start()
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()
    event = "consent-pending-additions"
    options = await bob.request("OPTIONS", f"sip:{HOST}")
    assert event in (options.headers.get("allow-events") or "").split(", ")
    refused = await bob.request("SUBSCRIBE", LIST, [("Event", event)], to=f"<{LIST}>")
    assert refused.status == 403
    watching, first = await subscribe(alice, LIST, event=event)
    assert first.headers.get("event") == event
    assert member_states(first) == {BOB: "pending", CAROL: "pending"}

    refusal = await send_message(alice)
    target = consent_uris(refusal)[0]
    assert (await ask_consent(alice, target)).status == 202
    forwarded = await bob.next_request("CONSENT")
    waiting = await alice.next_request("NOTIFY", watching.call_id)
    assert member_states(waiting) == {BOB: "waiting", CAROL: "pending"}

    permission = (forwarded.headers.get("permission") or "")[1:-1]
    put = relay.xcap.call("PUT", permission, grant_document())
    code, granted = await notify_after(alice, watching.call_id, put)
    assert code == 201
    assert member_states(granted) == {BOB: "granted", CAROL: "pending"}


@pytest.mark.parametrize("transport", ["UDP", "TCP", "TLS"])
@pytest_twisted.ensureDeferred
async def test_figure_3_permission_server_for_offline_recipient(
    start: Start, transport: str
) -> None:
    relay = await start()
    alice = await start_ua("alice", transport, relay)
    bob = await start_ua("bob", transport, relay)
    first = await send_message(alice, f"sip:solo@{HOST}")
    assert first.status == 470
    (target,) = consent_uris(first)
    accepted = await ask_consent(alice, target)
    assert accepted.status == 202
    waiting, pending = await subscribe(alice, call_info_uri(accepted))
    assert status_entries(pending)[0]["state"] == "pending"
    assert bob.received == []  # offline: nothing was sent to bob

    # B goes on-line and asks its permission server (the relay) what is pending.
    await bob.register()
    watching, listing = await subscribe(bob, BOB, event="grant-permission")
    (entry,) = status_entries(listing)
    assert entry["sender"] == ALICE and entry["list"] == f"sip:solo@{HOST}"
    assert entry["methods"] == "MESSAGE" and entry["permission"].startswith("https://")

    assert (
        await relay.xcap.call("PUT", entry["permission"], grant_document(target=f"sip:solo@{HOST}"))
        == 201
    )
    granted = await alice.next_request("NOTIFY", waiting.call_id)
    assert status_entries(granted)[0]["state"] == "granted"
    settled = await bob.next_request("NOTIFY", watching.call_id)
    assert status_entries(settled) == []

    relayed = await send_message(alice, f"sip:solo@{HOST}", b"hi bob")
    assert relayed.status == 200
    assert (await bob.next_request("MESSAGE")).body == b"hi bob"


@pytest_twisted.ensureDeferred
async def test_a_member_with_a_port_is_reached_at_that_port(start: Start, tmp_path: Path) -> None:
    """A member written with a port is someone else's server on our host: its consent
    URI, its record and every request keep the URI as the list writes it, and it is
    routed to (RFC 3263), never looked up in our registrar."""
    dave = bind_udp_ua("dave")
    far_member = f"sip:dave@{HOST}:{dave.local_port}"
    far = f"sip:far@{HOST}"
    lists = tmp_path / "far.xml"
    lists.write_text(
        f'<resource-lists xmlns="{RL}"><list name="far"><entry uri="{far_member}"/></list>'
        "</resource-lists>",
        encoding="utf-8",
    )
    relay = await start(sip__lists=str(lists))
    attach_ua(dave, relay)
    alice = await start_ua("alice", "UDP", relay)

    refused = await send_message(alice, far)
    assert refused.status == 470
    (target,) = consent_uris(refused)
    assert relay.sip.consent_relay.uris.parse_consent_user(
        NameAddr.parse(f"<{target}>").uri.user
    ) == (
        far,
        far_member,
    )
    accepted = await ask_consent(alice, target)
    assert accepted.status == 202
    forwarded = await dave.next_request("CONSENT")
    assert forwarded.uri.format() == far_member
    permission = (forwarded.headers.get("permission") or "")[1:-1]
    assert f"/consent-rules/users/{far_member}/p-" in permission
    assert await relay.xcap.call("PUT", permission, grant_document(target=far)) == 201

    relayed = await send_message(alice, far, b"hi dave")
    assert relayed.status == 200, relayed
    message = await dave.next_request("MESSAGE")
    assert message.body == b"hi dave" and message.uri.format() == far_member


@dataclass
class SoloConsent:
    relay: Running
    alice: UA
    bob: UA
    #: Alice's wait-permission subscription (its 200) and the NOTIFY that opened it.
    waiting: SIPResponse
    pending: SIPRequest
    #: The Permission URI the relay gave bob with the forwarded CONSENT.
    permission: str


async def solo_consent(start: Start) -> SoloConsent:
    """Bob registered; alice asked him for consent on the solo list and watches it."""
    relay = await start()
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()
    refused = await send_message(alice, SOLO)
    assert refused.status == 470
    (target,) = consent_uris(refused)
    # The solo list is not alice's: who is on it stays hidden.
    assert b"display-name" not in refused.body
    assert NameAddr.parse(refused.headers.get("permission-missing") or "").display_name is None
    accepted = await ask_consent(alice, target)
    assert accepted.status == 202
    forwarded = await bob.next_request("CONSENT")
    waiting, pending = await subscribe(alice, call_info_uri(accepted))
    permission = (forwarded.headers.get("permission") or "")[1:-1]
    return SoloConsent(relay, alice, bob, waiting, pending, permission)


PLAIN_PERMISSION = f"""<?xml version="1.0" encoding="UTF-8"?>
<ruleset xmlns="{CP}">
  <rule id="alice">
    <conditions>
      <identity><one id="{ALICE}"/></identity>
      <validity><from>2020-01-01T00:00:00Z</from><until>2100-01-01T00:00:00Z</until></validity>
    </conditions>
  </rule>
</ruleset>
"""
RFC5361_PERMISSION = f"""<?xml version="1.0" encoding="UTF-8"?>
<cp:ruleset xmlns="urn:ietf:params:xml:ns:consent-rules" xmlns:cp="{CP}">
  <cp:rule id="alice">
    <cp:conditions>
      <cp:identity><cp:one id="{ALICE}"/></cp:identity>
      <recipient><cp:one id="{BOB}"/></recipient>
      <target><cp:one id="{SOLO}"/></target>
    </cp:conditions>
    <cp:actions><trans-handling>grant</trans-handling></cp:actions>
  </cp:rule>
</cp:ruleset>
"""


@pytest.mark.parametrize("document", [PLAIN_PERMISSION, RFC5361_PERMISSION], ids=["seed", "5361"])
@pytest_twisted.ensureDeferred
async def test_the_seeds_plain_permission_at_the_permission_uri_delivers(
    start: Start, document: str
) -> None:
    """Seed §4, §8: a permission names the sender; the Permission URI was minted for
    bob, the solo list and MESSAGE, so that is what the plain form grants."""
    solo = await solo_consent(start)
    put = solo.relay.xcap.call("PUT", solo.permission, document.encode())
    code, granted = await notify_after(solo.alice, solo.waiting.call_id, put)
    assert code == 201
    assert [e["state"] for e in status_entries(granted)] == ["granted"]
    relayed = await send_message(solo.alice, SOLO, b"plainly permitted")
    assert relayed.status == 200, relayed
    assert (await solo.bob.next_request("MESSAGE")).body == b"plainly permitted"
    # Only through the list it was minted for: on alice's friends list bob is missing.
    friends = await send_message(solo.alice, LIST)
    assert friends.status == 470
    names = [NameAddr.parse(v).display_name for v in friends.headers.get_all("permission-missing")]
    assert names == [BOB, CAROL]


@pytest_twisted.ensureDeferred
async def test_deny_before_a_grant_refuses_until_a_later_grant(start: Start) -> None:
    solo = await solo_consent(start)
    relay, alice, bob = solo.relay, solo.alice, solo.bob
    waiting, permission = solo.waiting, solo.permission
    pending = solo.pending
    assert [e["state"] for e in status_entries(pending)] == ["pending"]
    watching, listing = await subscribe(bob, BOB, event="grant-permission")
    assert [(e["sender"], e["state"]) for e in status_entries(listing)] == [(ALICE, "pending")]

    deny = relay.xcap.call("PUT", permission, ruleset(rule("no", ALICE, handling="deny")))
    code, denied = await notify_after(alice, waiting.call_id, deny)
    assert code == 201
    assert [e["state"] for e in status_entries(denied)] == ["denied"]
    assert denied.headers.get("subscription-state", "").startswith("active")
    # A refused request is no longer pending: the permission server's view drops it.
    settled = await bob.next_request("NOTIFY", watching.call_id)
    assert status_entries(settled) == []
    assert (await send_message(alice, SOLO)).status == 470

    # The Permission URI still opens the document: the recipient changes their mind.
    grant = relay.xcap.call("PUT", permission, ruleset(rule("yes", ALICE)))
    code, granted = await notify_after(alice, waiting.call_id, grant)
    assert code == 200
    assert [e["state"] for e in status_entries(granted)] == ["granted"]
    relayed = await send_message(alice, SOLO, b"after all")
    assert relayed.status == 200
    assert (await bob.next_request("MESSAGE")).body == b"after all"


@pytest_twisted.ensureDeferred
async def test_deleting_an_undecided_permission_document_denies(start: Start) -> None:
    solo = await solo_consent(start)
    relay, alice = solo.relay, solo.alice
    waiting, permission = solo.waiting, solo.permission
    # A rule for someone else says nothing about alice: her request stays open.
    other = ruleset(rule("carol", CAROL))
    assert await relay.xcap.call("PUT", permission, other) == 201
    delete = relay.xcap.call("DELETE", permission)
    code, denied = await notify_after(alice, waiting.call_id, delete)
    assert code == 200
    # The first NOTIFY after the subscription's own: "pending" was not re-sent.
    assert etree.fromstring(denied.body).get("version") == "2"
    assert [e["state"] for e in status_entries(denied)] == ["denied"]
    assert (await send_message(alice, SOLO)).status == 470


@pytest.mark.parametrize("via", ["permission-uri", "digest"])
@pytest_twisted.ensureDeferred
async def test_deleting_one_rule_revokes_the_grant(start: Start, via: str) -> None:
    """Seed §10 with an XCAP node selector: only alice's rule goes, the document stays."""
    solo = await solo_consent(start)
    relay, alice, bob = solo.relay, solo.alice, solo.bob
    waiting, permission = solo.waiting, solo.permission
    owner = XCAPClient(
        relay.xcap_root, "bob", USERS["bob"], relay.ca_pem, reactor, persistent=False
    )

    async def call(method: str, url: str, body: bytes | None = None) -> int:
        if via == "permission-uri":
            return await relay.xcap.call(method, url, body)
        headers = {"Content-Type": POLICY_TYPE} if body is not None else None
        response = await owner.request(method, url.removeprefix(owner.origin), body, headers)
        return response.status

    document = permission
    if via == "digest":
        # Bob's own document, not the Permission URI: his account, not the capability.
        path = document_path(owner.root, "consent-rules", BOB, "friends.xml")
        document = owner.origin + path
    try:
        rules = ruleset(rule("carol", CAROL), rule("alice", ALICE))
        code, granted = await notify_after(alice, waiting.call_id, call("PUT", document, rules))
        assert code == 201
        assert [e["state"] for e in status_entries(granted)] == ["granted"]
        # The record is settled too (no longer open for the permission server); through
        # bob's own document that happens just after the grant's NOTIFY, so wait for it:
        # a revocation before it would show the request as pending, not revoked.
        watching, listing = await subscribe(bob, BOB, event="grant-permission")
        if status_entries(listing):
            listing = await bob.next_request("NOTIFY", watching.call_id)
        assert status_entries(listing) == []
        assert (await send_message(alice, SOLO)).status == 200
        await bob.next_request("MESSAGE")

        selected = node_path(document, 'ruleset/rule[@id="alice"]')
        code, revoked = await notify_after(alice, waiting.call_id, call("DELETE", selected))
        assert code == 200
        assert [e["state"] for e in status_entries(revoked)] == ["revoked"]
        assert (await send_message(alice, SOLO)).status == 470
        assert await call("GET", node_path(document, 'ruleset/rule[@id="carol"]')) == 200
        assert await call("GET", selected) == 404
    finally:
        await owner.close()


@pytest_twisted.ensureDeferred
async def test_grant_permission_notifies_a_consent_as_it_arrives(start: Start) -> None:
    relay = await start()
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)  # never registers: the relay holds his requests
    watching, empty = await subscribe(bob, BOB, event="grant-permission")
    assert status_entries(empty) == []

    (target,) = consent_uris(await send_message(alice, SOLO))
    asked_at = datetime.now(UTC)
    accepted = await ask_consent(alice, target)
    assert accepted.status == 202
    arrived = await bob.next_request("NOTIFY", watching.call_id)
    assert arrived.headers.get("content-type") == "application/vnd.relayd.consent-status+xml"
    root = etree.fromstring(arrived.body)
    assert (root.get("package"), root.get("version")) == ("grant-permission", "2")
    (entry,) = status_entries(arrived)
    assert f"sip:wp-{entry['id']}@" in call_info_uri(accepted)
    assert entry["state"] == "pending"
    assert (entry["sender"], entry["recipient"], entry["list"]) == (ALICE, BOB, SOLO)
    assert entry["methods"] == "MESSAGE"
    users = f"{relay.xcap_root}/consent-rules/users/sip:bob@{HOST}/p-"
    assert entry["permission"].startswith(users)
    assert entry["permission"].endswith(".xml")
    expires = datetime.strptime(entry["expires"], "%Y-%m-%dT%H:%M:%S%z")
    assert expires > asked_at
    assert [r.method for r in bob.received] == ["NOTIFY", "NOTIFY"]  # no CONSENT offline
    # The listed Permission URI is the capability for exactly this request.
    grant = relay.xcap.call("PUT", entry["permission"], ruleset(rule("a", ALICE)))
    code, settled = await notify_after(bob, watching.call_id, grant)
    assert code == 201
    assert status_entries(settled) == []


@pytest_twisted.ensureDeferred
async def test_pending_consent_expires_with_final_notify(start: Start) -> None:
    relay = await start(sip__pending_consent_seconds="1")
    alice = await start_ua("alice", "UDP", relay)
    (target,) = consent_uris(await send_message(alice, f"sip:solo@{HOST}"))
    accepted = await ask_consent(alice, target)
    _, pending = await subscribe(alice, call_info_uri(accepted))
    assert status_entries(pending)[0]["state"] == "pending"
    final = await alice.next_request("NOTIFY")
    assert final.headers.get("subscription-state") == "terminated;reason=noresource"
    assert status_entries(final)[0]["state"] == "expired"


@pytest_twisted.ensureDeferred
async def test_abuse_limits_and_hostile_input_relay_nothing(start: Start) -> None:
    relay = await start(sip__consent_requests_per_hour="2", sip__max_list_size="1")
    alice = await start_ua("alice", "UDP", relay)
    mallory = await start_ua("mallory", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()

    # A list over max_list_size is refused outright.
    assert (await send_message(alice)).status == 403
    (target,) = consent_uris(await send_message(alice, f"sip:solo@{HOST}"))
    # One open consent per (sender, list, recipient): a repeat refreshes it.
    first = await ask_consent(alice, target)
    second = await ask_consent(alice, target)
    assert call_info_uri(first) == call_info_uri(second)
    third = await ask_consent(alice, target)
    assert third.status == 503 and third.headers.get("retry-after")
    # Forged consent URIs, other people's wait URIs, unknown packages, short expiry.
    forged = target.replace("consent-", "consent-A")
    assert (await ask_consent(alice, forged)).status == 404
    wait = call_info_uri(first)
    denied = await mallory.request(
        "SUBSCRIBE", wait, [("Event", "wait-permission")], to=f"<{wait}>"
    )
    assert denied.status == 403
    bad_event = await alice.request("SUBSCRIBE", wait, [("Event", "presence")], to=f"<{wait}>")
    assert bad_event.status == 489 and "wait-permission" in bad_event.headers.get_all(
        "allow-events"
    )
    brief = await alice.request(
        "SUBSCRIBE", wait, [("Event", "wait-permission"), ("Expires", "1")], to=f"<{wait}>"
    )
    assert brief.status == 423 and brief.headers.get("min-expires") == "60"
    stray = await alice.request(
        "SUBSCRIBE", wait, [("Event", "wait-permission")], to=f"<{wait}>;tag=nosuchdialog"
    )
    assert stray.status == 481
    # Recipient-list bodies with DTDs or garbage are refused; MESSAGE without auth: 407.
    hostile = (
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
        b"Content-Type: application/resource-lists+xml\r\n"
        b"Content-Disposition: recipient-list\r\n\r\n"
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><resource-lists xmlns="'
        + RL.encode()
        + b'"><list><entry uri="sip:bob@127.0.0.1"/></list></resource-lists>\r\n--b--\r\n'
    )
    refused = await alice.request(
        "MESSAGE",
        f"sip:uri-list@{HOST}",
        [("Content-Type", 'multipart/mixed;boundary="b"')],
        hostile,
    )
    assert refused.status == 400
    transactions = relay.sip.transport.transactions
    assert transactions is not None
    before = transactions.server_transaction_count
    unauth = await alice.request("MESSAGE", f"sip:solo@{HOST}", authenticate=False)
    assert unauth.status == 407 and unauth.headers.get("proxy-authenticate")
    assert transactions.server_transaction_count == before  # challenged statelessly
    alice.send_bytes(b"MESSAGE garbage\r\n\r\n")
    await deferLater(reactor, 0.1, lambda: None)
    # The first CONSENT was forwarded, the refresh was not; nothing else reached bob.
    assert [r.method for r in bob.received] == ["CONSENT"]


@pytest_twisted.ensureDeferred
async def test_recipient_list_message_is_exploded(start: Start) -> None:
    relay = await start()
    alice = await start_ua("alice", "TCP", relay)
    bob = await start_ua("bob", "TCP", relay)
    await bob.register()
    exploder = f"sip:uri-list@{HOST}"
    body = (
        b"--b\r\nContent-Type: text/plain\r\n\r\nexploded\r\n--b\r\n"
        b"Content-Type: application/resource-lists+xml\r\n"
        b"Content-Disposition: recipient-list\r\n\r\n"
        b'<?xml version="1.0"?><resource-lists xmlns="'
        + RL.encode()
        + b'"><list><entry uri="sip:bob@127.0.0.1"/></list></resource-lists>\r\n--b--\r\n'
    )
    headers = [("Content-Type", 'multipart/mixed;boundary="b"')]
    refused = await alice.request("MESSAGE", exploder, headers, body)
    assert refused.status == 470
    (target,) = consent_uris(refused)
    await ask_consent(alice, target)
    consent = await bob.next_request("CONSENT")
    permission = (consent.headers.get("permission") or "")[1:-1]
    assert await relay.xcap.call("PUT", permission, grant_document(target=exploder)) == 201
    await deferLater(reactor, 0.05, lambda: None)
    accepted = await alice.request("MESSAGE", exploder, headers, body)
    assert accepted.status == 202
    message = await bob.next_request("MESSAGE")
    assert message.body == b"exploded" and message.headers.get("content-type") == "text/plain"


@pytest_twisted.ensureDeferred
async def test_log_lines_of_one_consent_share_its_permission_fingerprint(start: Start) -> None:
    """The log follows a consent by its Permission token's fingerprint (never the token):
    the ledger, the forwarded CONSENT's answer and the XCAP grant print the same one."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        relay = await start()
        alice = await start_ua("alice", "UDP", relay)
        bob = await start_ua("bob", "UDP", relay)
        await bob.register()
        (target,) = consent_uris(await send_message(alice, f"sip:solo@{HOST}"))
        assert (await ask_consent(alice, target)).status == 202
        permission = ((await bob.next_request("CONSENT")).headers.get("permission") or "")[1:-1]
        grant = grant_document(target=f"sip:solo@{HOST}")
        assert await relay.xcap.call("PUT", permission, grant) == 201
        for _ in range(50):
            if any("answered" in e.get("log_format", "") for e in events):
                break
            await deferLater(reactor, 0.02, lambda: None)
    finally:
        globalLogPublisher.removeObserver(observer)
    fingerprint = redact(permission.rsplit("/p-", 1)[1].removesuffix(".xml"))
    lines = [formatEvent(e) or "" for e in events]
    pending = [line for line in lines if " pending: " in line]
    answered = [line for line in lines if "CONSENT to sip:bob@" in line]
    granted = [line for line in lines if "XCAP PUT" in line]
    assert pending and answered and granted, lines
    for line in pending + answered + granted:
        assert fingerprint in line, (fingerprint, line)


class _Stopped:
    """Stands in for a relay the test already stopped (the fixture stops the rest)."""

    def stopService(self) -> Deferred[None]:
        return succeed(None)


@pytest_twisted.ensureDeferred
async def test_waiting_subscriber_is_told_the_truth_after_a_restart(start: Start) -> None:
    first = await start()
    alice = await start_ua("alice", "UDP", first)
    bob = await start_ua("bob", "UDP", first)
    await bob.register()
    refused = await send_message(alice)
    assert refused.status == 470
    bob_target = next(uri for uri in consent_uris(refused) if uri)
    accepted = await ask_consent(alice, bob_target)
    wait = call_info_uri(accepted)
    forwarded = await bob.next_request("CONSENT")
    permission = (forwarded.headers.get("permission") or "")[1:-1]
    ok, notify = await subscribe(alice, wait)
    assert [e["state"] for e in status_entries(notify)] == ["pending"]

    # The relay restarts on the same data directory: consents are in the store,
    # subscriptions were in memory.
    await first.service.stopService()
    first.service = _Stopped()
    second = await start()
    alice_again = await start_ua("alice", "UDP", second)
    refresh = await alice_again.request(
        "SUBSCRIBE",
        wait,
        [("Event", "wait-permission"), ("Expires", "600")],
        to=ok.headers.get("to"),
        call_id=ok.call_id,
        from_tag=tag_of(ok.headers.get("from")),
    )
    assert refresh.status == 481  # RFC 6665 §4.1.2.4: the subscriber subscribes afresh
    renewed, state = await subscribe(alice_again, wait)
    assert [e["state"] for e in status_entries(state)] == ["pending"]

    # The Permission URI survived too (its port is fixed in production; here the
    # new listener has another one).
    xcap = second.service.getServiceNamed("xcap")
    path = permission.split("/", 3)[3]
    moved = f"{xcap.public_url.split('/xcap-root')[0]}/{path}"
    assert await second.xcap.call("PUT", moved, grant_document()) == 201
    granted = await alice_again.next_request("NOTIFY", renewed.call_id)
    assert [e["state"] for e in status_entries(granted)] == ["granted"]


@pytest_twisted.ensureDeferred
async def test_a_registration_made_before_a_restart_delivers_after_it(
    start: Start, durable_store: dict[str, str]
) -> None:
    store_keys = {f"store__{name}": value for name, value in durable_store.items()}
    first = await start(**store_keys)
    bob = await start_ua("bob", "UDP", first)
    await bob.register()
    store = first.service.getServiceNamed("xcap").store
    await store.put_document(CONSENT_RULES_AUID, BOB, "index", grant_document(target=SOLO))
    await first.service.stopService()
    first.service = _Stopped()

    # Same data directory and UDP port, new store and registrar; bob stays silent.
    listen = f"udp:{first.udp_port}:interface={HOST}\n" + "\n".join(
        f"{kind}:0:interface={HOST}" for kind in ("tcp", "ssl")
    )
    second = await start(sip__listen=listen, **store_keys)
    alice = await start_ua("alice", "UDP", second)
    delivered = await send_message(alice, SOLO, b"after the restart")
    assert delivered.status == 200, delivered
    message = await bob.next_request("MESSAGE")
    assert message.body == b"after the restart"


@pytest_twisted.ensureDeferred
async def test_stop_abandons_an_unanswered_notify(start: Start) -> None:
    """A NOTIFY still unanswered when the relay stops ends with its client transaction;
    a retransmission after the listeners closed could only fail (and log a traceback)."""
    relay = await start()
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()
    (target,) = consent_uris(await send_message(alice, f"sip:solo@{HOST}"))
    await subscribe(alice, call_info_uri(await ask_consent(alice, target)))
    permission = ((await bob.next_request("CONSENT")).headers.get("permission") or "")[1:-1]
    closed = alice.close()
    assert isinstance(closed, Deferred)
    await closed  # alice is gone: the NOTIFY of the grant goes unanswered
    relay.uas.remove(alice)
    grant = grant_document(target=f"sip:solo@{HOST}")
    assert await relay.xcap.call("PUT", permission, grant) == 201
    failures: list[LogEvent] = []
    observer = cast(ILogObserver, lambda e: failures.append(e) if "log_failure" in e else None)
    globalLogPublisher.addObserver(observer)
    try:
        await relay.service.stopService()
        relay.service = _Stopped()
        # Timer E (T1 = 0.5 s) would have retransmitted the NOTIFY by now.
        await deferLater(reactor, 0.6, lambda: None)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [formatEvent(e) for e in failures] == []


class _Answering(Protocol):
    """A connection accepted for a UA: the UA now answers over it."""

    def __init__(self, ua: UA) -> None:
        self.stream = _TCP(ua)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.stream.ua._write = self.transport.write

    def dataReceived(self, data: bytes) -> None:
        self.stream.dataReceived(data)


@pytest_twisted.ensureDeferred
async def test_a_member_behind_a_nat_is_reached_over_its_registering_connection(
    start: Start,
) -> None:
    """RFC 5626 §5: requests for a contact registered over TCP take that connection while
    it is open, the contact's own address (unreachable behind a NAT) only after."""
    relay = await start()
    alice = await start_ua("alice", "UDP", relay)
    with socket.socket() as probe:  # a port where nothing listens, for now
        probe.bind((HOST, 0))
        unreachable = probe.getsockname()[1]
    bob = await start_ua("bob", "TCP", relay, contact_port=unreachable)
    await bob.register()
    refused = await send_message(alice, SOLO)
    assert refused.status == 470
    (target,) = consent_uris(refused)
    assert (await ask_consent(alice, target)).status == 202
    consent = await bob.next_request("CONSENT")
    permission = (consent.headers.get("permission") or "")[1:-1]
    assert await relay.xcap.call("PUT", permission, grant_document(target=SOLO)) == 201
    await deferLater(reactor, 0.05, lambda: None)
    relayed = await send_message(alice, SOLO, b"through the flow")
    assert relayed.status == 200, relayed
    assert (await bob.next_request("MESSAGE")).body == b"through the flow"

    # The connection is gone: the Contact is used, as for any registration.
    closed = bob.close()
    assert isinstance(closed, Deferred) or closed is None
    await deferLater(reactor, 0.1, lambda: None)
    factory = ServerFactory.forProtocol(lambda: _Answering(bob))
    listening = reactor.listenTCP(unreachable, factory, interface=HOST)
    try:
        again = await send_message(alice, SOLO, b"to the contact")
        assert again.status == 200, again
        assert (await bob.next_request("MESSAGE")).body == b"to the contact"
    finally:
        await listening.stopListening()


class _Silent(Protocol):
    """A client that connects and says nothing (not even a TLS ClientHello)."""

    def __init__(self) -> None:
        self.lost: Deferred[float] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(time.monotonic())


async def _connect_silent(port: int) -> _Silent:
    client = _Silent()
    await connectProtocol(TCP4ClientEndpoint(reactor, HOST, port), client)
    return client


@pytest_twisted.ensureDeferred
async def test_a_tls_connect_that_never_handshakes_is_closed(start: Start) -> None:
    relay = await start(sip__idle_timeout_seconds="1")
    started = time.monotonic()
    client = await _connect_silent(relay.tls_port)
    closed_at = await client.lost.addTimeout(TIMEOUT, reactor)
    assert 0.9 <= closed_at - started < 3


@pytest_twisted.ensureDeferred
async def test_at_the_connection_cap_the_one_idle_the_longest_closes(start: Start) -> None:
    relay = await start(sip__max_connections="2")
    first = await _connect_silent(relay.tcp_port)
    second = await _connect_silent(relay.tls_port)
    await deferLater(reactor, 0.05, lambda: None)
    assert first.transport is not None
    first.transport.write(b"\r\n\r\n")  # a keep-alive (RFC 5626 §3.5.1): first is busy
    await deferLater(reactor, 0.05, lambda: None)
    third = await _connect_silent(relay.tcp_port)
    await second.lost.addTimeout(TIMEOUT, reactor)
    await deferLater(reactor, 0.1, lambda: None)
    assert not first.lost.called and not third.lost.called
    for client in (first, third):
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost


def _parts(message: SIPRequest) -> dict[str, bytes]:
    """The parts of a ``multipart/alternative`` body, by Content-Type (no parameters)."""
    content_type = message.headers.get("content-type") or ""
    assert content_type.startswith("multipart/alternative;")
    boundary = content_type.split('boundary="', 1)[1].rstrip('"').encode()
    out: dict[str, bytes] = {}
    for part in message.body.split(b"--" + boundary)[1:-1]:
        head, _, data = part.strip(b"\r\n").partition(b"\r\n\r\n")
        out[head.split(b":", 1)[1].strip().split(b";")[0].decode()] = data
    return out


@pytest.mark.parametrize(("mode", "refusal"), [("consent", 501), ("consent", 405), ("message", 0)])
@pytest_twisted.ensureDeferred
async def test_a_member_that_cannot_take_a_consent_is_asked_by_message(
    start: Start, mode: str, refusal: int
) -> None:
    """RFC 5360 §5.8: bob's UA answers CONSENT 501 (or the relay is told to ask by
    MESSAGE); the relay sends him a MESSAGE of its own with the grant and deny URIs,
    once, and his MESSAGE to the SIP grant URI lets alice's MESSAGE through."""
    relay = await start(sip__consent_request=mode)
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()
    (target,) = consent_uris(await send_message(alice, SOLO))
    bob.answer_status = refusal or 200
    assert (await ask_consent(alice, target)).status == 202
    if mode == "consent":
        await bob.next_request("CONSENT")
        bob.answer_status = 200
    asked = await bob.next_request("MESSAGE")
    bob.answer_status = 200
    assert NameAddr.parse((asked.headers.get("from") or "").split(";tag=")[0]).uri.aor == (
        f"sip:{HOST}"
    )
    parts = _parts(asked)
    note = parts["text/plain"].decode()
    assert ALICE in note and SOLO in note and "MESSAGE" in note and "https://" in note
    policy = etree.fromstring(parts[POLICY_TYPE])
    uris = {
        (e.text, e.get("perm-uri", "").split(":")[0]): e.get("perm-uri", "")
        for e in policy.iter("{urn:ietf:params:xml:ns:consent-rules}trans-handling")
    }
    assert set(uris) == {("grant", "sip"), ("grant", "https"), ("deny", "sip"), ("deny", "https")}
    # Asking again refreshes the request and sends bob nothing more.
    assert (await ask_consent(alice, target)).status == 202
    granted = await bob.request("MESSAGE", uris["grant", "sip"], to=f"<{uris['grant', 'sip']}>")
    assert granted.status == 200, granted
    relayed = await send_message(alice, SOLO, b"asked by message")
    assert relayed.status == 200, relayed
    assert (await bob.next_request("MESSAGE")).body == b"asked by message"
    expected = ["CONSENT", "MESSAGE", "MESSAGE"] if mode == "consent" else ["MESSAGE", "MESSAGE"]
    assert [r.method for r in bob.received] == expected


def _sip_links(asked: SIPRequest) -> dict[str, str]:
    """The ``sip:`` grant and deny URIs of a consent request MESSAGE (RFC 5361)."""
    policy = etree.fromstring(_parts(asked)[POLICY_TYPE])
    return {
        e.text or "": e.get("perm-uri", "")
        for e in policy.iter("{urn:ietf:params:xml:ns:consent-rules}trans-handling")
        if e.get("perm-uri", "").startswith("sip:")
    }


@pytest_twisted.ensureDeferred
async def test_a_member_who_lost_the_deny_uri_gets_it_again_and_revokes(start: Start) -> None:
    """RFC 5360 §5.8 figure 5: bob granted alice by his SIP grant URI and then lost
    the message with the deny URI. Alice's relayed MESSAGE carries ``Trigger-Consent``
    (a bare URI and the list as ``target-uri``, §5.11.2); bob sends an empty PUBLISH
    to that URI (200), the relay sends him the consent request again (from itself,
    with the same deny URI), and a PUBLISH there revokes: alice is refused again.
    Mallory, not the recipient, cannot make the relay send bob anything; bob's UA may
    also echo the header in a MESSAGE to the relay (for MESSAGE-only UAs)."""
    relay = await start(sip__consent_request="message")
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    mallory = await start_ua("mallory", "UDP", relay)
    await bob.register()
    (target,) = consent_uris(await send_message(alice, SOLO))
    assert (await ask_consent(alice, target)).status == 202
    first = _sip_links(await bob.next_request("MESSAGE"))
    assert (await bob.request("MESSAGE", first["grant"], to=f"<{first['grant']}>")).status == 200
    assert (await send_message(alice, SOLO, b"granted")).status == 200
    relayed = await bob.next_request("MESSAGE")
    trigger = relayed.headers.get("trigger-consent") or ""
    assert trigger.startswith("sip:") and trigger.endswith(f';target-uri="{SOLO}"'), trigger
    trigger_uri = parse_trigger_consent(trigger).uri.format()
    received = len(bob.received)
    refused = await mallory.request("PUBLISH", trigger_uri, to=f"<{trigger_uri}>")
    assert (refused.status, refused.reason) == (403, "Only The Recipient May Trigger Consent")

    triggered = await bob.request("PUBLISH", trigger_uri, to=f"<{trigger_uri}>")
    assert triggered.status == 200, triggered
    again = await bob.next_request("MESSAGE")
    assert len(bob.received) == received + 1  # mallory's trigger sent bob nothing
    assert NameAddr.parse((again.headers.get("from") or "").split(";tag=")[0]).uri.aor == (
        f"sip:{HOST}"
    )
    links = _sip_links(again)
    assert links == first
    echoed = await bob.request("MESSAGE", f"sip:{HOST}", [("Trigger-Consent", trigger)])
    assert echoed.status == 202, echoed
    assert _sip_links(await bob.next_request("MESSAGE")) == first
    denied = await bob.request("PUBLISH", links["deny"], to=f"<{links['deny']}>")
    assert denied.status == 200, denied
    assert (await send_message(alice, SOLO, b"after revocation")).status == 470


TEAM = f"sip:team@{HOST}"


def team_document(*members: str) -> bytes:
    entries = "".join(f'<entry uri="{member}"/>' for member in members)
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><resource-lists xmlns="{RL}">'
        f'<list name="team">{entries}</list></resource-lists>'
    ).encode()


async def put_team(owner: XCAPClient, *members: str) -> int:
    path = document_path(owner.root, "resource-lists", ALICE, "index")
    headers = {"Content-Type": "application/resource-lists+xml"}
    return (await owner.request("PUT", path, team_document(*members), headers)).status


@pytest.mark.parametrize(("mode", "refusal"), [("consent", 501), ("message", 0)])
@pytest_twisted.ensureDeferred
async def test_a_member_added_to_a_list_is_asked_once_and_grants_every_sender(
    start: Start, mode: str, refusal: int
) -> None:
    """RFC 5360 §5.3 with ``[sip] ask_list_additions``: alice's XCAP PUTs add bob, then
    carol, to her list team; the relay asks each (CONSENT, then MESSAGE as the UA
    answers 501; or the MESSAGE at once) for the list's every sender (``cp:many``),
    once: dropping bob and adding him back asks nothing more while his request is
    open. Their MESSAGEs to the SIP grant URIs let alice's and mallory's MESSAGEs to
    the list through."""
    relay = await start(sip__ask_list_additions="yes", sip__consent_request=mode)
    alice = await start_ua("alice", "UDP", relay)
    mallory = await start_ua("mallory", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    carol = await start_ua("carol", "UDP", relay)
    owner = XCAPClient(
        relay.xcap_root, "alice", USERS["alice"], relay.ca_pem, reactor, persistent=False
    )
    asked_by = ["CONSENT", "MESSAGE"] if mode == "consent" else ["MESSAGE"]

    async def asked(ua: UA) -> SIPRequest:
        if mode == "consent":
            consent = await ua.next_request("CONSENT")
            assert consent.headers.get("p-asserted-identity") == f"<{TEAM}>"
        message = await ua.next_request("MESSAGE")
        ua.answer_status = 200
        return message

    try:
        for ua in (bob, carol):
            await ua.register()
            ua.answer_status = refusal or 200
        assert await put_team(owner, BOB) == 201
        to_bob = await asked(bob)
        assert TEAM in _parts(to_bob)["text/plain"].decode()
        policy = etree.fromstring(_parts(to_bob)[POLICY_TYPE])
        identity = policy.find(f".//{{{CP}}}identity")
        assert identity is not None and [etree.QName(e).localname for e in identity] == ["many"]
        assert await put_team(owner, BOB, CAROL) == 200
        to_carol = await asked(carol)
        assert await put_team(owner, CAROL) == 200
        assert await put_team(owner, CAROL, BOB) == 200
        assert (await send_message(alice, TEAM)).status == 470
        for ua, request in ((bob, to_bob), (carol, to_carol)):
            grant = _sip_links(request)["grant"]
            assert (await ua.request("MESSAGE", grant, to=f"<{grant}>")).status == 200
        for sender in (alice, mallory):
            relayed = await send_message(sender, TEAM, b"to the team")
            assert relayed.status == 200, relayed
            for ua in (bob, carol):
                assert (await ua.next_request("MESSAGE")).body == b"to the team"
        assert [r.method for r in bob.received] == [*asked_by, "MESSAGE", "MESSAGE"]
        assert [r.method for r in carol.received] == [*asked_by, "MESSAGE", "MESSAGE"]
    finally:
        await owner.close()


@pytest_twisted.ensureDeferred
async def test_without_ask_list_additions_a_list_write_asks_nobody(start: Start) -> None:
    """The default: a list write sends nothing; members are asked on a sender's CONSENT."""
    relay = await start()
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()
    owner = XCAPClient(
        relay.xcap_root, "alice", USERS["alice"], relay.ca_pem, reactor, persistent=False
    )
    try:
        assert await put_team(owner, BOB) == 201
        assert (await send_message(alice, TEAM)).status == 470
        # One more round trip through the relay: anything the write caused is sent by now.
        assert (await bob.request("OPTIONS", f"sip:{HOST}")).status == 200
        assert bob.received == []
    finally:
        await owner.close()


@pytest_twisted.ensureDeferred
async def test_a_member_that_takes_only_plain_text_is_asked_by_its_note_alone(
    start: Start,
) -> None:
    """bob's UA answers the ``multipart/alternative`` request with 415 and ``Accept:
    text/plain`` (as baresip does, RFC 3261 §21.4.13): the relay sends the note alone,
    once, and bob grants through the SIP URI it names."""
    relay = await start(sip__consent_request="message")
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()
    (target,) = consent_uris(await send_message(alice, SOLO))
    bob.answer_status, bob.answer_headers = 415, (("Accept", "text/plain"),)
    assert (await ask_consent(alice, target)).status == 202
    rich = await bob.next_request("MESSAGE")
    assert (rich.headers.get("content-type") or "").startswith("multipart/alternative;")
    plain = await bob.next_request("MESSAGE")
    bob.answer_status, bob.answer_headers = 200, ()  # (set before the answer is sent)
    assert plain.headers.get("content-type") == "text/plain; charset=utf-8"
    assert plain.body.rstrip(b"\r\n") == _parts(rich)["text/plain"]
    (grant,) = re.findall(r"sip:grant-[^ ]+@[^ ]+(?= \(allow\))", plain.body.decode())
    assert (await bob.request("MESSAGE", grant, to=f"<{grant}>")).status == 200
    assert (await send_message(alice, SOLO, b"after the note")).status == 200
    assert (await bob.next_request("MESSAGE")).body == b"after the note"
    assert [r.method for r in bob.received] == ["MESSAGE"] * 3


@pytest_twisted.ensureDeferred
async def test_the_https_links_page_grants_only_on_its_form_and_deny_revokes(
    start: Start,
) -> None:
    """The HTTPS links of the consent MESSAGE, over the XCAP listener's real TLS: a GET
    (what a link preview does) changes nothing, the page's form grants and alice's
    wait-permission watch hears of it; the deny link later revokes."""
    relay = await start(sip__consent_request="message")
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()
    (target,) = consent_uris(await send_message(alice, SOLO))
    accepted = await ask_consent(alice, target)
    asked = await bob.next_request("MESSAGE")
    waiting, pending = await subscribe(alice, call_info_uri(accepted))
    assert [e["state"] for e in status_entries(pending)] == ["pending"]
    policy = etree.fromstring(_parts(asked)[POLICY_TYPE])
    links = {
        e.text: e.get("perm-uri", "")
        for e in policy.iter("{urn:ietf:params:xml:ns:consent-rules}trans-handling")
        if e.get("perm-uri", "").startswith("https:")
    }
    assert links["grant"].startswith(relay.xcap_root.split("/xcap-root")[0] + "/consent/grant/")
    http = relay.xcap.http

    async def fetch(method: str, url: str, **kw: Any) -> tuple[int, bytes]:
        response = await http.request(method, url, **kw).addTimeout(TIMEOUT, reactor)
        return int(response.code), await content(response).addTimeout(TIMEOUT, reactor)

    code, page = await fetch("GET", links["grant"])
    assert code == 200 and ALICE.encode() in page and SOLO.encode() in page
    assert (await send_message(alice, SOLO)).status == 470  # the GET granted nothing
    fields = _form_fields(page)
    posted = fetch("POST", links["grant"], data=fields | {"action": "grant"})
    code, granted = await notify_after(alice, waiting.call_id, _code(posted))
    assert code == 200
    assert [e["state"] for e in status_entries(granted)] == ["granted"]
    assert (await send_message(alice, SOLO, b"by the page")).status == 200
    code, page = await fetch("GET", links["deny"])
    fields = _form_fields(page)
    assert (await fetch("POST", links["deny"], data=fields | {"action": "deny"}))[0] == 200
    assert (await send_message(alice, SOLO)).status == 470
    forged = f"sip:grant-{'A' * 22}.{'B' * 22}@{HOST}"
    assert (await bob.request("MESSAGE", forged, to=f"<{forged}>")).status == 404


def _form_fields(page: bytes) -> dict[str, str]:
    """The hidden fields of a consent page's form."""
    found = re.findall(rb'name="(nonce|csrf)" value="([^"]+)"', page)
    return {k.decode(): v.decode() for k, v in found}


async def _code(fetched: Awaitable[tuple[int, bytes]]) -> int:
    return (await fetched)[0]


def _click_in_browser(url: str, button: str, shots: Path) -> tuple[str, str]:
    """Open ``url`` in headless Chromium with JavaScript off and click ``button``;
    the page text before and after, each page's screenshot saved in ``shots``
    (blocking: run in a thread)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--ignore-certificate-errors")  # the test CA is not the system's
    options.add_experimental_option(
        "prefs", {"profile.managed_default_content_settings.javascript": 2}
    )
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.set_page_load_timeout(TIMEOUT * 4)
        driver.get(url)
        page = driver.find_element(By.TAG_NAME, "body")
        before = page.text
        driver.save_screenshot(str(shots / "1-asked.png"))
        driver.find_element(By.XPATH, f"//button[text()='{button}']").click()
        # The form's POST loads a new page: read it once the old one is gone.
        WebDriverWait(driver, TIMEOUT * 4).until(expected_conditions.staleness_of(page))
        after = driver.find_element(By.TAG_NAME, "body").text
        driver.save_screenshot(str(shots / "2-answered.png"))
        return before, after
    finally:
        driver.quit()


@pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="needs chromium and chromedriver",
)
@pytest_twisted.ensureDeferred
async def test_a_person_allows_in_a_browser_without_javascript(
    start: Start, tmp_path: Path
) -> None:
    pytest.importorskip("selenium")
    relay = await start(sip__consent_request="message")
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()
    (target,) = consent_uris(await send_message(alice, SOLO))
    assert (await ask_consent(alice, target)).status == 202
    asked = await bob.next_request("MESSAGE")
    link = re.search(r"Allow: (\S+)", _parts(asked)["text/plain"].decode())
    assert link is not None
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"consent page screenshots: {shots}")
    before, after = await deferToThread(_click_in_browser, link[1], "Allow", shots)
    assert ALICE in before and SOLO in before and "MESSAGE" in before
    assert "You allowed" in after
    for shot in ("1-asked.png", "2-answered.png"):
        assert (shots / shot).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), shot
    relayed = await send_message(alice, SOLO, b"allowed in a browser")
    assert relayed.status == 200, relayed
    assert (await bob.next_request("MESSAGE")).body == b"allowed in a browser"


@pytest_twisted.ensureDeferred
async def test_two_relays_sharing_a_postgresql_store_act_as_one(
    start: Start, postgres_dsn: str
) -> None:
    """Bob registers at relay B and alice talks to relay A: A reaches bob through the
    registration B stored, and bob's grant PUT through B's XCAP releases alice's
    MESSAGE held at A and NOTIFYs her wait-permission subscription there."""
    store_keys = {"store__backend": "postgresql", "store__dsn": postgres_dsn}
    a = await start(**store_keys)
    b = await start(**store_keys)
    bob = bind_udp_ua("bob")
    attach_ua(bob, b)
    await bob.register()
    for _ in range(int(TIMEOUT / 0.02)):
        if a.sip.registrar.is_online(BOB):
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert a.sip.registrar.is_online(BOB)
    bob.relay_port = a.udp_port  # bob answers what relay A sends him

    alice = await start_ua("alice", "UDP", a)
    refused = await send_message(alice, SOLO)
    assert refused.status == 470
    (target,) = consent_uris(refused)
    accepted = await ask_consent(alice, target)
    assert accepted.status == 202
    forwarded = await bob.next_request("CONSENT")
    waiting, pending = await subscribe(alice, call_info_uri(accepted))
    assert [e["state"] for e in status_entries(pending)] == ["pending"]

    permission = (forwarded.headers.get("permission") or "")[1:-1]
    at_b = f"{b.xcap_root.split('/xcap-root')[0]}/{permission.split('/', 3)[3]}"
    code, granted = await notify_after(
        alice, waiting.call_id, b.xcap.call("PUT", at_b, grant_document(target=SOLO))
    )
    assert code == 201
    assert [e["state"] for e in status_entries(granted)] == ["granted"]
    delivered = await send_message(alice, SOLO, b"through relay A")
    assert delivered.status == 200, delivered
    assert (await bob.next_request("MESSAGE")).body == b"through relay A"


# -- relayctl consent: a sender without a consent-aware UA --------------------------------


async def _ctl_client(relay: Running, timeout: float = TIMEOUT) -> SIPUserAgent:
    client = SIPUserAgent(reactor, (HOST, relay.udp_port), Credentials("alice", "alice-pw"), HOST)
    client.deadline_seconds = timeout
    client.start()
    return client


async def _printed(out: io.StringIO, lines: int) -> list[str]:
    """The output once it has ``lines`` lines (the watch runs on; the test waits)."""
    for _ in range(int(TIMEOUT / 0.02)):
        if out.getvalue().count("\n") >= lines:
            return out.getvalue().splitlines()
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"printed only {out.getvalue()!r}")


async def _ctl_requested(start: Start) -> tuple[Running, UA, SIPUserAgent, str, str]:
    """Alice got a 470 for solo and pasted it to ``relayctl consent request``."""
    relay = await start()
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()
    refused = await send_message(alice, SOLO)
    assert refused.status == 470
    pasted = "SIP/2.0 470 Consent Needed\n" + "".join(
        f"Permission-Missing: {value}\n" for value in refused.headers.get_all("permission-missing")
    )
    (target,) = ctl_consent.consent_uris(pasted)
    client = await _ctl_client(relay)
    out = io.StringIO()
    await ctl_consent.run_request(client, [target], "MESSAGE", False, out)
    first, second = out.getvalue().splitlines()
    assert first == f"{target}: 202 Accepted"
    wait = second.removeprefix("  wait-permission: ")
    assert wait.startswith("sip:wp-") and "@" in wait, second
    forwarded = await bob.next_request("CONSENT")
    assert forwarded.headers.get("consent-methods") == "MESSAGE"
    return relay, alice, client, wait, (forwarded.headers.get("permission") or "")[1:-1]


@pytest_twisted.ensureDeferred
async def test_relayctl_consent_request_then_watch_until_granted(start: Start) -> None:
    relay, alice, client, wait, permission = await _ctl_requested(start)
    out = io.StringIO()
    watching = Deferred.fromCoroutine(ctl_consent.run_watch(client, [wait], 600, True, out))
    (pending,) = [json.loads(line) for line in await _printed(out, 1)]
    assert pending == {
        "watch": wait,
        "recipient": BOB,
        "list": SOLO,
        "methods": ["MESSAGE"],
        "state": "pending",
    }
    assert await relay.xcap.call("PUT", permission, PLAIN_PERMISSION.encode()) == 201
    await watching.addTimeout(TIMEOUT, reactor)  # ends by itself: all granted
    assert [json.loads(line)["state"] for line in out.getvalue().splitlines()] == [
        "pending",
        "granted",
    ]
    # It unsubscribed on the way out (RFC 6665 §4.1.2.3): gone once the final NOTIFY
    # is answered.
    manager = relay.sip.consent_relay.subscriptions
    for _ in range(int(TIMEOUT / 0.02)):
        if not manager.subscriptions("wait-permission"):
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert not manager.subscriptions("wait-permission")
    assert (await send_message(alice, SOLO)).status == 200
    await client.close()


@pytest_twisted.ensureDeferred
async def test_relayctl_consent_watch_fails_on_denial_and_on_timeout(start: Start) -> None:
    relay, _, client, wait, permission = await _ctl_requested(start)
    out = io.StringIO()
    client.deadline_seconds = 0.5
    with pytest.raises(CtlError, match="timed out"):
        await ctl_consent.run_watch(client, [wait], 600, False, out)
    assert out.getvalue() == f"{BOB}: pending (MESSAGE via {SOLO}) [{wait}]\n"
    client.deadline_seconds = TIMEOUT
    out = io.StringIO()
    watching = Deferred.fromCoroutine(ctl_consent.run_watch(client, [wait], 600, False, out))
    await _printed(out, 1)
    denial = ruleset(rule("no", ALICE, SOLO, "deny"))
    assert await relay.xcap.call("PUT", permission, denial) in (200, 201)
    with pytest.raises(CtlError, match="not granted"):
        await watching.addTimeout(TIMEOUT, reactor)
    assert out.getvalue().splitlines()[-1].startswith(f"{BOB}: denied")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_relayctl_consent_commands_end_to_end(start: Start, tmp_path: Path) -> None:
    """The installed commands: the 470 pasted on stdin, then a watch until bob grants."""
    relay = await start()
    alice = await start_ua("alice", "UDP", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()
    refused = await send_message(alice, SOLO)
    pasted = "".join(
        f"Permission-Missing: {v}\n" for v in refused.headers.get_all("permission-missing")
    )
    secret = tmp_path / "alice.password"
    secret.write_text("alice-pw\n", encoding="utf-8")
    sip = ["--relay", f"{HOST}:{relay.udp_port}", "--user", "alice", "--password-file", str(secret)]
    env = environment(tmp_path)
    out, err, code = await relayctl(
        env, "consent", "request", *sip, "--from-470", "-", stdin=pasted.encode()
    )
    assert (code, err) == (0, ""), err
    wait = out.splitlines()[1].removeprefix("  wait-permission: ")
    permission = ((await bob.next_request("CONSENT")).headers.get("permission") or "")[1:-1]
    watching = Deferred.fromCoroutine(
        relayctl(env, "consent", "watch", *sip, "--json", "--timeout", "20", wait)
    )
    manager = relay.sip.consent_relay.subscriptions
    for _ in range(int(20 / 0.05)):
        if manager.subscriptions("wait-permission") or watching.called:
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert not watching.called, watching.result
    assert await relay.xcap.call("PUT", permission, PLAIN_PERMISSION.encode()) == 201
    out, err, code = await watching
    assert (code, err) == (0, ""), err
    assert [json.loads(line)["state"] for line in out.splitlines()] == ["pending", "granted"]


@pytest_twisted.ensureDeferred
async def test_a_call_from_tls_to_udp_is_double_record_routed(start: Start) -> None:
    """RFC 5658 §4: alice calls over TLS, bob is registered over UDP. The INVITE bob gets
    carries two Record-Routes, his side's (UDP) on top and alice's (TLS) below, so each
    party's in-dialog requests reach the relay over its own transport; alice's BYE along
    her route set reaches bob with both taken off."""
    relay = await start()
    alice = await start_ua("alice", "TLS", relay)
    bob = await start_ua("bob", "UDP", relay)
    await bob.register()
    bob.answer_status = 180
    call_id, alice_tag = new_tag(), new_tag()
    sdp = b"v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    calling = Deferred.fromCoroutine(
        alice.request(
            "INVITE",
            BOB,
            [("Content-Type", "application/sdp")],
            sdp,
            call_id=call_id,
            from_tag=alice_tag,
        )
    )
    invite = await bob.next_request("INVITE", call_id)
    routes = invite.headers.get_all("record-route")
    assert len(routes) == 2, routes
    callee_side, caller_side = (NameAddr.parse(r).uri for r in routes)
    assert (callee_side.port, callee_side.param("transport")) == (relay.udp_port, None)
    assert (caller_side.port, caller_side.param("transport")) == (relay.tls_port, "tls")
    assert callee_side.param("rr") == caller_side.param("rr")
    assert invite.body == sdp
    bob_contact = f"sip:bob@{HOST}:{bob.local_port}"
    ok = make_response(invite, 200, to_tag="bob-call")
    for route in routes:
        ok.headers.add("Record-Route", route)
    ok.headers.add("Contact", f"<{bob_contact}>")
    bob.answer_status = 200
    bob.send_bytes(ok.to_bytes())
    answered = await calling
    assert answered.status == 200 and answered.headers.get_all("record-route") == routes
    # Alice's route set is the Record-Routes reversed (RFC 3261 §12.1.2): TLS first.
    route_set = [("Route", route) for route in reversed(routes)]
    bob_side = answered.headers.get("to") or ""
    _, ack = uac_request(
        "ACK",
        bob_contact,
        via=f"SIP/2.0/TLS {HOST}:{alice.local_port}",
        aor=alice.aor,
        from_tag=alice_tag,
        to=bob_side,
        call_id=call_id,
        cseq=alice.cseq,
        contact=alice.contact,
        headers=route_set,
    )
    alice.send_bytes(ack.to_bytes())  # (the test UA keeps no ACK to look at)
    bye = await alice.request(
        "BYE",
        bob_contact,
        route_set,
        to=bob_side,
        call_id=call_id,
        from_tag=alice_tag,
        authenticate=False,
    )
    assert bye.status == 200, bye
    ended = await bob.next_request("BYE", call_id)
    assert "route" not in ended.headers and ended.uri.format() == bob_contact
