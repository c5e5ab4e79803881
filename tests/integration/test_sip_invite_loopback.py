"""A call through the relay over real UDP on 127.0.0.1 (RFC 3261 §16): the caller's
INVITE reaches the callee's registered contact, 100/180/200 come back, and the ACK and
BYE cross the relay along its Record-Route; an INVITE to a list waits for every
member's consent for INVITE, then forks to them all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import DeferredQueue
from twisted.internet.protocol import DatagramProtocol

from relayd.consent.vocabulary import CONSENT_RULES_AUID
from relayd.sip.message import Headers, SIPRequest, SIPResponse, make_response, new_tag
from relayd.sip.parser import parse_datagram
from relayd.sip.transaction import new_branch
from relayd.sipuri import SIPURI
from relayd.testing import consent_rule, consent_ruleset, sip_credentials

from .test_consent_flow import HOST, TIMEOUT, USERS, Start, start  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

reactor: Any = _reactor

SDP = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
Message = SIPRequest | SIPResponse


class Peer(DatagramProtocol):
    """A user agent's UDP socket: everything it receives, in order."""

    def __init__(self, user: str, relay_port: int) -> None:
        self.user = user
        self.relay_port = relay_port
        self.queue: DeferredQueue[Message] = DeferredQueue()
        self.port = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.queue.put(parse_datagram(datagram))

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@{HOST}:{self.port}"

    def send(self, message: Message) -> None:
        assert self.transport is not None
        self.transport.write(message.to_bytes(), (HOST, self.relay_port))

    async def next(self, want: Callable[[Message], bool]) -> Message:
        while True:
            message: Message = await self.queue.get().addTimeout(TIMEOUT, reactor)
            if want(message):
                return message

    def request(self, method: str, uri: str, call_id: str, cseq: int, **kw: str) -> SIPRequest:
        h = Headers()
        h.add("Via", f"SIP/2.0/UDP {HOST}:{self.port};rport;branch={new_branch()}")
        h.add("Max-Forwards", "70")
        h.add("From", kw.get("from_", f"<sip:{self.user}@{HOST}>;tag={self.user}-tag"))
        h.add("To", kw.get("to", f"<{uri}>"))
        h.add("Call-ID", call_id)
        h.add("CSeq", f"{cseq} {method}")
        h.add("Contact", f"<{self.contact}>")
        if "route" in kw:
            h.add("Route", kw["route"])
        return SIPRequest(method, SIPURI.parse(uri), h)

    async def authenticated(self, request: SIPRequest) -> SIPResponse:
        """``request``, and again with credentials for the relay's challenge."""
        self.send(request)
        branch = request.via.branch
        first = await self.next(_final_of(branch))
        assert isinstance(first, SIPResponse)
        method, uri = request.method, request.uri.format()
        answer = sip_credentials(
            first, method=method, uri=uri, username=self.user, password=USERS[self.user]
        )
        if answer is None:
            return first
        again = SIPRequest(method, request.uri, request.headers.copy(), request.body)
        again.headers.set("Via", f"SIP/2.0/UDP {HOST}:{self.port};rport;branch={new_branch()}")
        again.headers.set("CSeq", f"{request.cseq.number + 1} {method}")
        again.headers.add(*answer)
        self.send(again)
        final = await self.next(_final_of(again.via.branch))
        assert isinstance(final, SIPResponse)
        return final


def _final_of(branch: str | None) -> Callable[[Message], bool]:
    return lambda m: isinstance(m, SIPResponse) and m.status >= 200 and m.via.branch == branch


def _request(method: str) -> Callable[[Message], bool]:
    return lambda m: isinstance(m, SIPRequest) and m.method == method


async def _peer(user: str, relay_port: int) -> tuple[Peer, Any]:
    peer = Peer(user, relay_port)
    listening = reactor.listenUDP(0, peer, interface=HOST)
    peer.port = listening.getHost().port
    return peer, listening


@pytest_twisted.ensureDeferred
async def test_a_call_through_the_relay_invite_ringing_answer_ack_bye(start: Start) -> None:  # noqa: F811
    relay = await start()
    alice, alice_socket = await _peer("alice", relay.udp_port)
    bob, bob_socket = await _peer("bob", relay.udp_port)
    try:
        register = bob.request("REGISTER", f"sip:{HOST}", new_tag(), 1, to=f"<sip:bob@{HOST}>")
        assert (await bob.authenticated(register)).status == 200

        call_id = new_tag()
        invite = alice.request("INVITE", f"sip:bob@{HOST}", call_id, 1)
        invite.headers.add("Content-Type", "application/sdp")
        invite = SIPRequest("INVITE", invite.uri, invite.headers, SDP)
        alice.send(invite)
        challenge = await alice.next(_final_of(invite.via.branch))
        assert isinstance(challenge, SIPResponse) and challenge.status == 407
        answer = sip_credentials(
            challenge,
            method="INVITE",
            uri=invite.uri.format(),
            username="alice",
            password=USERS["alice"],
        )
        assert answer is not None
        # The ACK for the 407 ends at the relay (hop by hop).
        ack_407 = alice.request(
            "ACK", invite.uri.format(), call_id, 1, to=challenge.headers.get("to") or ""
        )
        ack_407.headers.set("Via", invite.headers.get("via") or "")
        alice.send(ack_407)
        invite.headers.set("Via", f"SIP/2.0/UDP {HOST}:{alice.port};rport;branch={new_branch()}")
        invite.headers.set("CSeq", "2 INVITE")
        invite.headers.add(*answer)
        alice.send(invite)
        branch = invite.via.branch

        trying = await alice.next(lambda m: isinstance(m, SIPResponse) and m.status == 100)
        assert trying.via.branch == branch
        arrived = await bob.next(_request("INVITE"))
        assert isinstance(arrived, SIPRequest)
        assert arrived.body == SDP  # the SDP travels unchanged
        (record_route,) = arrived.headers.get_all("record-route")
        assert record_route.startswith(f"<sip:{HOST}:{relay.udp_port};lr")

        bob.send(make_response(arrived, 180, to_tag="bob-tag"))
        ringing = await alice.next(lambda m: isinstance(m, SIPResponse) and m.status == 180)
        assert ringing.to_tag == "bob-tag"
        ok = make_response(arrived, 200, to_tag="bob-tag", body=SDP[::-1])
        ok.headers.add("Record-Route", record_route)
        ok.headers.add("Contact", f"<{bob.contact}>")
        ok.headers.add("Content-Type", "application/sdp")
        bob.send(ok)
        answered = await alice.next(_final_of(branch))
        assert isinstance(answered, SIPResponse) and answered.status == 200
        assert answered.body == SDP[::-1]
        assert answered.headers.get_all("record-route") == [record_route]

        # The dialog: alice's ACK and bob's BYE go along the route set, through the relay.
        alice_side = invite.headers.get("from") or ""
        bob_side = answered.headers.get("to") or ""
        ack = alice.request("ACK", bob.contact, call_id, 2, to=bob_side, route=record_route)
        alice.send(ack)
        got_ack = await bob.next(_request("ACK"))
        assert isinstance(got_ack, SIPRequest) and got_ack.call_id == call_id
        assert "route" not in got_ack.headers

        bye = bob.request(
            "BYE", alice.contact, call_id, 1, from_=bob_side, to=alice_side, route=record_route
        )
        bob.send(bye)
        got_bye = await alice.next(_request("BYE"))
        assert isinstance(got_bye, SIPRequest)
        alice.send(make_response(got_bye, 200))
        done = await bob.next(_final_of(bye.via.branch))
        assert isinstance(done, SIPResponse) and done.status == 200
    finally:
        await alice_socket.stopListening()
        await bob_socket.stopListening()


async def _invite_with_credentials(alice: Peer, uri: str, call_id: str) -> SIPRequest:
    """Alice's INVITE with SDP, sent again with credentials for the relay's 407 (whose
    ACK ends at the relay); returns the authenticated INVITE as sent."""
    invite = alice.request("INVITE", uri, call_id, 1)
    invite.headers.add("Content-Type", "application/sdp")
    invite = SIPRequest("INVITE", invite.uri, invite.headers, SDP)
    alice.send(invite)
    challenge = await alice.next(_final_of(invite.via.branch))
    assert isinstance(challenge, SIPResponse) and challenge.status == 407
    answer = sip_credentials(
        challenge, method="INVITE", uri=uri, username="alice", password=USERS["alice"]
    )
    assert answer is not None
    ack = alice.request("ACK", uri, call_id, 1, to=challenge.headers.get("to") or "")
    ack.headers.set("Via", invite.headers.get("via") or "")
    alice.send(ack)
    again = SIPRequest("INVITE", invite.uri, invite.headers.copy(), SDP)
    again.headers.set("Via", f"SIP/2.0/UDP {HOST}:{alice.port};rport;branch={new_branch()}")
    again.headers.set("CSeq", "2 INVITE")
    again.headers.add(*answer)
    alice.send(again)
    return again


@pytest_twisted.ensureDeferred
async def test_an_invite_to_a_three_member_list_waits_for_consent_then_forks(
    start: Start,  # noqa: F811
    tmp_path: Path,
) -> None:
    members = ("bob", "carol", "mallory")
    trio = f"sip:trio@{HOST}"
    lists = tmp_path / "trio.xml"
    entries = "".join(f'<entry uri="sip:{m}@{HOST}"/>' for m in members)
    lists.write_text(
        '<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        f'<list name="trio">{entries}</list></resource-lists>'
    )
    relay = await start(sip__lists=str(lists))
    store = relay.service.getServiceNamed("xcap").store
    alice_aor = f"sip:alice@{HOST}"
    message_only = consent_rule("m", alice_aor, trio).replace(
        "</conditions>", "<cr:methods><cr:method>MESSAGE</cr:method></cr:methods></conditions>"
    )
    for member in members:
        rules = consent_rule("a", alice_aor, trio) if member != "mallory" else message_only
        await store.put_document(
            CONSENT_RULES_AUID, f"sip:{member}@{HOST}", "index", consent_ruleset(rules)
        )
    alice, alice_socket = await _peer("alice", relay.udp_port)
    peers: dict[str, Peer] = {}
    sockets = [alice_socket]
    try:
        for member in members:
            peer, socket = await _peer(member, relay.udp_port)
            peers[member] = peer
            sockets.append(socket)
            register = peer.request(
                "REGISTER", f"sip:{HOST}", new_tag(), 1, to=f"<sip:{member}@{HOST}>"
            )
            assert (await peer.authenticated(register)).status == 200

        # Mallory granted MESSAGE only: the INVITE is 470 and reaches nobody.
        refused = await _invite_with_credentials(alice, trio, new_tag())
        consent_needed = await alice.next(_final_of(refused.via.branch))
        assert isinstance(consent_needed, SIPResponse) and consent_needed.status == 470
        (missing,) = (consent_needed.headers.get("permission-missing") or "").split(",")
        uris = relay.sip.consent_relay.uris
        assert missing.strip() == f"<{uris.consent_uri(trio, f'sip:mallory@{HOST}')}>"
        assert all(not peer.queue.pending for peer in peers.values())

        await store.put_document(
            CONSENT_RULES_AUID,
            f"sip:mallory@{HOST}",
            "index",
            consent_ruleset(consent_rule("a", alice_aor, trio)),
        )
        call_id = new_tag()
        invite = await _invite_with_credentials(alice, trio, call_id)
        arrived: dict[str, SIPRequest] = {}
        for member, peer in peers.items():
            got = await peer.next(_request("INVITE"))
            assert isinstance(got, SIPRequest) and got.body == SDP
            arrived[member] = got
            peer.send(make_response(got, 180, to_tag=f"{member}-tag"))
        for _ in members:
            ringing = await alice.next(lambda m: isinstance(m, SIPResponse) and m.status == 180)
            assert ringing.via.branch == invite.via.branch
        ok = make_response(arrived["carol"], 200, to_tag="carol-tag", body=SDP[::-1])
        ok.headers.add("Record-Route", arrived["carol"].headers.get("record-route") or "")
        ok.headers.add("Contact", f"<{peers['carol'].contact}>")
        peers["carol"].send(ok)
        answered = await alice.next(_final_of(invite.via.branch))
        assert isinstance(answered, SIPResponse) and answered.status == 200
        assert answered.to_tag == "carol-tag"
        for member in ("bob", "mallory"):  # §16.7 step 10
            cancel = await peers[member].next(_request("CANCEL"))
            assert isinstance(cancel, SIPRequest)
            assert cancel.via.branch == arrived[member].via.branch
            peers[member].send(make_response(cancel, 200))
            peers[member].send(make_response(arrived[member], 487, to_tag=f"{member}-tag"))

        # The dialog with carol opens no path to bob: a request at his contact is 403.
        route = answered.headers.get("record-route") or ""
        carol_side = answered.headers.get("to") or ""
        info = alice.request("INFO", peers["bob"].contact, call_id, 3, to=carol_side, route=route)
        alice.send(info)
        refused_info = await alice.next(_final_of(info.via.branch))
        assert isinstance(refused_info, SIPResponse) and refused_info.status == 403
        assert not [
            m
            for m in peers["bob"].queue.pending
            if isinstance(m, SIPRequest) and m.method == "INFO"
        ]
    finally:
        for socket in sockets:
            await socket.stopListening()
