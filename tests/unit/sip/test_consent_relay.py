"""The consent relay's request rules (§16.3 order, sender identity, §16.7 response), driven
in-process: the daemon's SIP stack fed datagrams on a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet.defer import ensureDeferred

from relayd.consent.documents import DocumentKey, DocumentRejected
from relayd.consent.ledger import ConsentLimits
from relayd.consent.store import ConsentState
from relayd.consent.vocabulary import CONSENT_FORMAT_NAMESPACE, CONSENT_RULES_AUID
from relayd.sip.consent import format_trigger_consent
from relayd.sip.consent_relay import carried_headers
from relayd.sip.message import Headers, SIPRequest, SIPResponse, make_response
from relayd.sip.parser import parse_datagram
from relayd.sip.transaction import cancel_for, new_branch
from relayd.sipuri import SIPURI
from relayd.testing import (
    consent_ruleset,
    grant_document,
    in_process_sip_relay,
    sip_credentials,
    uac_request,
)

HOST = "127.0.0.1"
LIST = f"sip:club@{HOST}"
ALICE = f"sip:alice@{HOST}"
BOB = f"sip:bob@{HOST}"
CAROL = f"sip:carol@{HOST}"
DAVE = f"sip:dave@{HOST}"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw"}
SENDER_PORT, BOB_PORT = 5070, 6000


class Relay:
    """The relay with one list (club: bob), bob registered and permitting alice."""

    def __init__(
        self,
        folder: Path,
        members: tuple[str, ...] = (BOB,),
        extra: dict[tuple[str, str], str] | None = None,
    ) -> None:
        relay = in_process_sip_relay(folder, HOST, PASSWORDS, "club", members, extra)
        self.wire, self.protocol, store = relay.wire, relay.protocol, relay.store
        self.reactor = relay.reactor
        self.sip = relay.service.getServiceNamed("sip")
        xcap = relay.service.getServiceNamed("xcap")
        self.document_checks = xcap.site.resource.document_checks
        self.store = store
        ensureDeferred(
            store.put_document(CONSENT_RULES_AUID, BOB, "index", grant_document(ALICE, LIST))
        )
        self.calls = 0
        self.send_authenticated(
            "REGISTER",
            f"sip:{HOST}",
            "bob",
            BOB_PORT,
            contact=f"<sip:bob@{HOST}:{BOB_PORT}>",
            to=f"<{BOB}>",
        )

    def feed(
        self, message: SIPRequest | SIPResponse, port: int
    ) -> list[tuple[SIPRequest | SIPResponse, int]]:
        self.protocol.datagramReceived(message.to_bytes(), (HOST, port))
        return self.wire_take()

    def wire_take(self) -> list[tuple[SIPRequest | SIPResponse, int]]:
        return [(parse_datagram(data), addr[1]) for data, addr in self.wire.take()]

    def request(
        self,
        method: str,
        uri: str,
        user: str,
        port: int,
        *,
        from_aor: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        authorization: tuple[str, str] | None = None,
        cseq: int = 1,
        contact: str | None = None,
        to: str | None = None,
        from_display: str | None = None,
        body: bytes | None = None,
    ) -> SIPRequest:
        _, request = uac_request(
            method,
            uri,
            via=f"SIP/2.0/UDP {HOST}:{port}",
            aor=from_aor or f"sip:{user}@{HOST}",
            from_tag=f"t{self.calls}",
            to=to,
            call_id=f"c{self.calls}@{HOST}",
            cseq=cseq,
            contact=contact or f"<sip:{user}@{HOST}:{port}>",
            headers=headers,
            authorization=authorization,
            body=body if body is not None else b"hi" if method == "MESSAGE" else b"",
        )
        if from_display is not None:
            request.headers.set("From", f"{from_display} {request.headers.get('from')}")
        return request

    def send_authenticated(
        self, method: str, uri: str, user: str, port: int, **kw: Any
    ) -> list[tuple[SIPRequest | SIPResponse, int]]:
        """The request, and again with credentials when challenged."""
        self.calls += 1
        out = self.feed(self.request(method, uri, user, port, **kw), port)
        first = out[0][0] if len(out) == 1 else None
        if not isinstance(first, SIPResponse):
            return out
        answer = sip_credentials(
            first, method=method, uri=uri, username=user, password=PASSWORDS[user]
        )
        if answer is None:
            return out
        return self.feed(
            self.request(method, uri, user, port, authorization=answer, cseq=2, **kw), port
        )


@pytest.fixture
def relay(tmp_path: Path) -> Relay:
    return Relay(tmp_path)


def _final(out: list[tuple[SIPRequest | SIPResponse, int]]) -> SIPResponse:
    finals = [m for m, port in out if isinstance(m, SIPResponse) and port == SENDER_PORT]
    assert len(finals) == 1, out
    return finals[0]


def test_a_permitted_message_reaches_the_member_with_the_asserted_identity(relay: Relay) -> None:
    out = relay.send_authenticated(
        "MESSAGE", LIST, "alice", SENDER_PORT, headers=(("P-Preferred-Identity", f"<{BOB}>"),)
    )
    copies = [m for m, port in out if isinstance(m, SIPRequest) and port == BOB_PORT]
    assert len(copies) == 1
    copy = copies[0]
    assert copy.headers.get("P-Asserted-Identity") == f"<{ALICE}>"
    assert "P-Preferred-Identity" not in copy.headers


def test_a_contact_at_another_host_is_reached_only_where_it_registered_from(
    relay: Relay,
) -> None:
    """RFC 5360: a binding is a translation. bob binds a second contact naming a host
    that is not his (a victim's, or his NAT's private side): the list's MESSAGE goes
    back to the address his REGISTER came from for both bindings, never to that host."""
    relay.send_authenticated(
        "REGISTER",
        f"sip:{HOST}",
        "bob",
        BOB_PORT,
        contact="<sip:bob@192.0.2.99:5060>",
        to=f"<{BOB}>",
    )
    relay.calls += 1
    first = relay.request("MESSAGE", LIST, "alice", SENDER_PORT)
    relay.protocol.datagramReceived(first.to_bytes(), (HOST, SENDER_PORT))
    (challenge,) = [parse_datagram(data) for data, _ in relay.wire.take()]
    assert isinstance(challenge, SIPResponse) and challenge.status == 407
    answer = sip_credentials(
        challenge, method="MESSAGE", uri=LIST, username="alice", password=PASSWORDS["alice"]
    )
    again = relay.request("MESSAGE", LIST, "alice", SENDER_PORT, authorization=answer, cseq=2)
    relay.protocol.datagramReceived(again.to_bytes(), (HOST, SENDER_PORT))
    sent = relay.wire.take()
    copies = [(addr, parse_datagram(data)) for data, addr in sent]
    relayed = [(addr, m) for addr, m in copies if isinstance(m, SIPRequest)]
    assert [addr for addr, _ in relayed] == [(HOST, BOB_PORT), (HOST, BOB_PORT)], copies
    assert sorted(m.uri.host for _, m in relayed) == ["127.0.0.1", "192.0.2.99"]


def test_the_senders_display_name_is_not_relayed(relay: Relay) -> None:
    out = relay.send_authenticated(
        "MESSAGE", LIST, "alice", SENDER_PORT, from_display='"bob@127.0.0.1 (Bob Admin)"'
    )
    (copy,) = [m for m, port in out if isinstance(m, SIPRequest) and port == BOB_PORT]
    assert copy.headers.get("From") == f"<{ALICE}>;tag=t{relay.calls}"


def test_from_must_name_the_authenticated_sender(relay: Relay) -> None:
    out = relay.send_authenticated("MESSAGE", LIST, "alice", SENDER_PORT, from_aor=BOB)
    response = _final(out)
    assert (response.status, response.reason) == (403, "From Is Not The Authenticated User")
    assert all(port == SENDER_PORT for _, port in out)  # nothing relayed


@pytest.mark.parametrize(
    ("method", "uri", "status"),
    [
        ("OPTIONS", f"sip:{HOST}:9999", 404),  # another port is another server
        ("OPTIONS", "sip:example.org", 404),  # a domain we do not serve
        ("OPTIONS", f"sip:nobody@{HOST}", 404),  # no list, account or registration
        ("OPTIONS", f"sip:alice@{HOST}", 480),  # an account, not registered
        ("OPTIONS", "tel:+15551234", 416),
        ("MESSAGE", f"sip:club@{HOST}:9999", 404),
        ("MESSAGE", "tel:+15551234", 416),
        ("REGISTER", f"sip:{HOST}:9999", 404),
        ("SUBSCRIBE", "sip:bob@example.org", 404),
    ],
)
def test_a_request_uri_not_served_here_is_refused(
    relay: Relay, method: str, uri: str, status: int
) -> None:
    """RFC 3261 §8.2.2.1: 416 for the scheme, 404 for an address nothing here serves."""
    out = relay.send_authenticated(method, uri, "alice", SENDER_PORT, to=f"<{ALICE}>")
    assert _final(out).status == status
    assert all(port == SENDER_PORT for _, port in out)  # nothing relayed


@pytest.mark.parametrize("uri", [f"sip:{HOST}", f"sip:{HOST}:5060", LIST, BOB])
def test_options_to_the_relay_a_list_or_a_registered_member_is_200(relay: Relay, uri: str) -> None:
    assert _final(relay.send_authenticated("OPTIONS", uri, "alice", SENDER_PORT)).status == 200


def test_a_list_uri_with_our_own_port_is_relayed(relay: Relay) -> None:
    out = relay.send_authenticated("MESSAGE", f"sip:club@{HOST}:5060", "alice", SENDER_PORT)
    assert [port for _, port in out] == [BOB_PORT]


def test_consent_about_a_member_elsewhere_reaches_its_handler(relay: Relay) -> None:
    """RFC 5360 §5.11.2: the one request for a URI not ours (the handler then finds
    that this member is not on the list)."""
    trigger = ("Trigger-Consent", f'<sip:zoe@example.org>;target-uri="{LIST}"')
    out = relay.send_authenticated(
        "CONSENT", "sip:zoe@example.org", "alice", SENDER_PORT, headers=(trigger,)
    )
    assert (_final(out).status, _final(out).reason) == (404, "Not A List Member")


def test_max_forwards_and_proxy_require_come_before_the_challenge(relay: Relay) -> None:
    """§16.3: steps 3 (Max-Forwards) and 5 (Proxy-Require) precede step 6 (credentials)."""
    request = relay.request(
        "MESSAGE", LIST, "alice", SENDER_PORT, headers=(("Proxy-Require", "foo, bar"),)
    )
    response = _final(relay.feed(request, SENDER_PORT))
    assert response.status == 420
    assert response.headers.get_raw("Unsupported") == ["foo, bar"]
    relay.calls += 1  # a new request, not a merged copy of the last (§8.2.2.2)
    request = relay.request("MESSAGE", LIST, "alice", SENDER_PORT)
    request.headers.set("Max-Forwards", "0")
    assert _final(relay.feed(request, SENDER_PORT)).status == 483


def test_a_members_challenges_all_reach_the_sender() -> None:
    def response(status: int, *rows: tuple[str, str]) -> SIPResponse:
        return SIPResponse(status, "", Headers(rows))

    responses = [
        response(401, ("WWW-Authenticate", 'Digest realm="a"')),
        response(407, ("Proxy-Authenticate", 'Digest realm="b"'), ("Contact", "<sip:x@h>")),
        response(486, ("Retry-After", "30")),
    ]
    assert carried_headers(407, responses) == [
        ("www-authenticate", 'Digest realm="a"'),
        ("proxy-authenticate", 'Digest realm="b"'),
    ]
    assert carried_headers(486, responses) == [("retry-after", "30")]
    redirect = [response(302, ("Contact", "<sip:y@h>")), response(200, ("Contact", "<sip:z@h>"))]
    assert carried_headers(302, redirect) == [("contact", "<sip:y@h>")]
    # A member's Contact never leaks into a success.
    assert carried_headers(200, redirect) == []


def _lists_document(name: str) -> bytes:
    return (
        '<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        f'<list name="{name}"><entry uri="{BOB}"/></list></resource-lists>'
    ).encode()


def test_a_list_stored_over_xcap_is_served_and_its_name_is_its_owners(relay: Relay) -> None:
    ensureDeferred(
        relay.store.put_document("resource-lists", BOB, "index", _lists_document("pals"))
    )
    # Bob's permission names the club, not his own list: alice is told to ask.
    out = relay.send_authenticated("MESSAGE", f"sip:pals@{HOST}", "alice", SENDER_PORT)
    assert _final(out).status == 470
    check = relay.document_checks["resource-lists"]
    for taken in ("pals", "club", "alice"):  # bob's list, the lists file's, an account
        with pytest.raises(DocumentRejected) as refused:
            check(DocumentKey("resource-lists", ALICE, "index"), _lists_document(taken))
        assert refused.value.fault == "uniqueness-failure"
    check(DocumentKey("resource-lists", ALICE, "index"), _lists_document("chess"))


def test_a_grant_in_the_recipients_own_document_settles_the_open_request(relay: Relay) -> None:
    pals = f"sip:pals@{HOST}"
    ensureDeferred(
        relay.store.put_document("resource-lists", BOB, "index", _lists_document("pals"))
    )
    refused = _final(relay.send_authenticated("MESSAGE", pals, "alice", SENDER_PORT))
    consent_uri = refused.headers.get("Permission-Missing")
    assert refused.status == 470 and consent_uri is not None
    consent_uri = consent_uri.strip("<>")
    asked = relay.send_authenticated(
        "CONSENT", consent_uri, "alice", SENDER_PORT, headers=(("Consent-Methods", "MESSAGE"),)
    )
    assert _final(asked).status == 202
    records: list[Any] = []
    ensureDeferred(relay.store.list_consents()).addCallback(records.extend)
    assert [r.state for r in records] == [ConsentState.PENDING]
    # Bob grants in his own tree, not through the Permission URI.
    ensureDeferred(
        relay.store.put_document(CONSENT_RULES_AUID, BOB, "pals", grant_document(ALICE, pals))
    )
    records.clear()
    ensureDeferred(relay.store.list_consents()).addCallback(records.extend)
    assert [r.state for r in records] == [ConsentState.GRANTED]


def _pals(*members: str) -> bytes:
    entries = "".join(f'<entry uri="{member}"/>' for member in members)
    return (
        '<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        f'<list name="pals">{entries}</list></resource-lists>'
    ).encode()


def _records(relay: Relay) -> list[Any]:
    records: list[Any] = []
    ensureDeferred(relay.store.list_consents()).addCallback(records.extend)
    return records


def test_members_a_list_write_adds_are_asked_once_within_the_owners_rate(
    tmp_path: Path,
) -> None:
    """RFC 5360 §5.3 (``[sip] ask_list_additions``): alice's list write adds bob (asked
    by CONSENT from the list), carol (offline: kept for grant-permission) and gina
    (who granted the list to everyone: not asked). Dropping bob and adding him back
    asks nothing; past alice's hourly rate nobody more is asked."""
    relay = Relay(
        tmp_path,
        extra={("sip", "ask_list_additions"): "yes", ("sip", "consent_requests_per_hour"): "4"},
    )
    relay.wire_take()
    pals, gina = f"sip:pals@{HOST}", f"sip:gina@{HOST}"
    everyone = consent_ruleset(
        f'<rule id="all"><conditions><identity><many/></identity><cr:target uri="{pals}"/>'
        "</conditions><actions><cr:trans-handling>grant</cr:trans-handling></actions></rule>"
    )
    ensureDeferred(relay.store.put_document(CONSENT_RULES_AUID, gina, "index", everyone))
    ensureDeferred(
        relay.store.put_document("resource-lists", ALICE, "index", _pals(BOB, CAROL, gina))
    )
    sent = relay.wire_take()
    assert [(m.method, port) for m, port in sent if isinstance(m, SIPRequest)] == [
        ("CONSENT", BOB_PORT)
    ]
    consent = sent[0][0]
    assert isinstance(consent, SIPRequest)
    assert consent.headers.get("p-asserted-identity") == f"<{pals}>"
    assert consent.headers.get("consent-methods") == "MESSAGE, INVITE"
    assert pals in consent.body.decode()
    records = _records(relay)
    assert sorted((r.sender, r.recipient) for r in records) == [(pals, BOB), (pals, CAROL)]
    for body in (_pals(CAROL), _pals(CAROL, BOB)):
        ensureDeferred(relay.store.put_document("resource-lists", ALICE, "index", body))
    assert [m for m, _ in relay.wire_take() if isinstance(m, SIPRequest)] == []
    assert sorted(r.id for r in _records(relay)) == sorted(r.id for r in records)
    # bob, carol, bob again: the fourth request of the hour opens dave's; alice's is past it.
    ensureDeferred(
        relay.store.put_document("resource-lists", ALICE, "index", _pals(CAROL, BOB, DAVE, ALICE))
    )
    assert sorted(r.recipient for r in _records(relay)) == [BOB, CAROL, DAVE]


def test_by_default_a_list_write_asks_nobody(relay: Relay) -> None:
    relay.wire_take()
    ensureDeferred(relay.store.put_document("resource-lists", ALICE, "index", _pals(CAROL, DAVE)))
    assert relay.wire_take() == [] and _records(relay) == []


def test_consent_uris_outlive_a_restart(tmp_path: Path) -> None:
    def consent_uri_of(relay: Relay) -> str | None:
        ensureDeferred(
            relay.store.put_document("resource-lists", BOB, "index", _lists_document("pals"))
        )
        out = relay.send_authenticated("MESSAGE", f"sip:pals@{HOST}", "alice", SENDER_PORT)
        return _final(out).headers.get("Permission-Missing")

    first = consent_uri_of(Relay(tmp_path))
    assert first is not None
    assert consent_uri_of(Relay(tmp_path)) == first


def test_a_member_who_never_answers_gets_the_sender_a_408(relay: Relay) -> None:
    """§16.8: the branch's Timer F counts as a 408, and the sender's transaction is
    still there to carry it."""
    out = relay.send_authenticated("MESSAGE", LIST, "alice", SENDER_PORT)
    assert [port for _, port in out] == [BOB_PORT]  # relayed; bob stays silent
    finals: list[SIPResponse] = []
    for _ in range(40):
        relay.reactor.advance(1.0)
        sent = relay.wire.take()
        finals += [
            message
            for data, (_, port) in sent
            if port == SENDER_PORT and isinstance(message := parse_datagram(data), SIPResponse)
        ]
    assert [response.status for response in finals] == [408]


# -- INVITE to a registered user: proxied (RFC 3261 §16), responses per §16.7 ------------

SDP = b"v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
Out = list[tuple[SIPRequest | SIPResponse, int]]


def _invite(relay: Relay, uri: str = BOB) -> tuple[SIPRequest, Out]:
    """Alice's INVITE with SDP, answered to the relay's 407 with credentials: the
    authenticated INVITE and what the relay sent for it."""
    relay.calls += 1
    kw: dict[str, Any] = {"body": SDP, "headers": (("Content-Type", "application/sdp"),)}
    first = relay.feed(relay.request("INVITE", uri, "alice", SENDER_PORT, **kw), SENDER_PORT)
    challenge = _final(first)
    assert challenge.status == 407
    answer = sip_credentials(
        challenge, method="INVITE", uri=uri, username="alice", password=PASSWORDS["alice"]
    )
    invite = relay.request("INVITE", uri, "alice", SENDER_PORT, authorization=answer, cseq=2, **kw)
    return invite, relay.feed(invite, SENDER_PORT)


def _to(out: Out, port: int) -> list[SIPRequest | SIPResponse]:
    return [m for m, p in out if p == port]


def _forwarded(out: Out) -> SIPRequest:
    (copy,) = [m for m in _to(out, BOB_PORT) if isinstance(m, SIPRequest)]
    assert copy.method == "INVITE"
    return copy


def _statuses(out: Out) -> list[int]:
    return [m.status for m in _to(out, SENDER_PORT) if isinstance(m, SIPResponse)]


def test_invite_to_a_registered_user_is_proxied_with_record_route_and_sdp_unchanged(
    relay: Relay,
) -> None:
    invite, out = _invite(relay)
    assert _statuses(out) == [100]  # §16.2: the proxy's 100 Trying
    copy = _forwarded(out)
    assert copy.uri.port == BOB_PORT  # the registered contact (§16.5)
    assert copy.body == SDP
    assert copy.headers.get("content-type") == "application/sdp"
    assert len(copy.vias) == 2 and copy.vias[1].branch == invite.via.branch
    assert copy.max_forwards == 69
    assert "proxy-authorization" not in copy.headers
    assert copy.headers.get("P-Asserted-Identity") == f"<{ALICE}>"
    port = relay.wire.getHost().port
    (record_route,) = copy.headers.get_all("record-route")
    assert record_route.startswith(f"<sip:{HOST}:{port};lr;rr=")
    ringing = make_response(copy, 180, to_tag="bob-1")
    ok = make_response(copy, 200, to_tag="bob-1", body=SDP[::-1])
    ok.headers.add("Record-Route", record_route)
    up = relay.feed(ringing, BOB_PORT) + relay.feed(ok, BOB_PORT)
    assert _statuses(up) == [180, 200]
    final = _to(up, SENDER_PORT)[-1]
    assert isinstance(final, SIPResponse)
    assert [v.branch for v in final.vias] == [invite.via.branch]  # ours popped (§16.7)
    assert final.body == SDP[::-1] and final.to_tag == "bob-1"
    assert final.headers.get_all("record-route") == [record_route]
    # The retransmitted 200 also goes upstream (RFC 6026); the retransmitted INVITE
    # is absorbed, not forked again.
    assert _statuses(relay.feed(ok, BOB_PORT)) == [200]
    assert relay.feed(invite, SENDER_PORT) == []


def test_invite_record_route_off_leaves_the_dialog_end_to_end(relay: Relay) -> None:
    relay.sip.consent_relay.record_route = False
    _, out = _invite(relay)
    assert "record-route" not in _forwarded(out).headers


def test_a_busy_callee_is_acked_hop_by_hop_and_its_final_relayed(relay: Relay) -> None:
    invite, out = _invite(relay)
    copy = _forwarded(out)
    busy = make_response(copy, 486, to_tag="bob-2")
    back = relay.feed(busy, BOB_PORT)
    (ack,) = _to(back, BOB_PORT)
    assert isinstance(ack, SIPRequest) and ack.method == "ACK"
    assert ack.via.branch == copy.via.branch and ack.to_tag == "bob-2"
    assert _statuses(back) == [486]
    # The caller's ACK for it ends at the relay (hop by hop): nothing goes on to bob.
    caller_ack = cancel_for(invite)
    caller_ack.method = "ACK"
    caller_ack.headers.set("CSeq", "2 ACK")
    assert relay.feed(caller_ack, SENDER_PORT) == []


def test_a_cancel_from_the_caller_cancels_the_branch_and_ends_with_487(relay: Relay) -> None:
    invite, out = _invite(relay)
    copy = _forwarded(out)
    relay.feed(make_response(copy, 180, to_tag="bob-3"), BOB_PORT)
    back = relay.feed(cancel_for(invite), SENDER_PORT)
    assert sorted(_statuses(back)) == [200, 487]
    (cancel,) = _to(back, BOB_PORT)
    assert isinstance(cancel, SIPRequest) and cancel.method == "CANCEL"
    assert cancel.via.branch == copy.via.branch  # §9.1: the branch's own hop
    assert cancel.headers.get("cseq") == "2 CANCEL"


def test_a_branch_ringing_past_timer_c_is_cancelled(relay: Relay) -> None:
    _, out = _invite(relay)
    copy = _forwarded(out)
    relay.feed(make_response(copy, 180, to_tag="bob-4"), BOB_PORT)
    relay.reactor.advance(184)
    assert not [m for m, p in relay.wire_take() if p == BOB_PORT]
    relay.reactor.advance(2)  # Timer C (§16.8)
    cancels = [m for m, p in relay.wire_take() if p == BOB_PORT]
    assert [getattr(m, "method", None) for m in cancels][:1] == ["CANCEL"]


def test_an_invite_to_a_consent_uri_is_refused_and_reaches_no_member(relay: Relay) -> None:
    consent_uri = relay.sip.consent_relay.uris.consent_uri(LIST, BOB)
    relay.calls += 1
    request = relay.request("INVITE", consent_uri, "alice", SENDER_PORT, body=SDP)
    out = relay.feed(request, SENDER_PORT)
    response = _final(out)
    assert response.status == 405
    assert "INVITE" not in response.headers.get_all("allow")
    assert all(port == SENDER_PORT for _, port in out)


# -- INVITE to a list: consent per method, then a parallel fork (§16.7) ----------------

CAROL_PORT, DAVE_PORT = 6001, 6002
MEMBER_PORTS = {BOB: BOB_PORT, CAROL: CAROL_PORT, DAVE: DAVE_PORT}


def _message_only(sender: str, target: str) -> bytes:
    """Consent rules granting ``sender`` MESSAGE (and nothing else) through ``target``."""
    return consent_ruleset(
        f'<rule id="m"><conditions><identity><one id="{sender}"/></identity>'
        f'<cr:target uri="{target}"/><cr:methods><cr:method>MESSAGE</cr:method></cr:methods>'
        "</conditions><actions><cr:trans-handling>grant</cr:trans-handling></actions></rule>"
    )


@pytest.fixture
def club(tmp_path: Path) -> Relay:
    """The list of bob, carol and dave, all registered; bob and carol permit alice
    everything, dave only MESSAGE."""
    relay = Relay(tmp_path, (BOB, CAROL, DAVE))
    for user, port in (("carol", CAROL_PORT), ("dave", DAVE_PORT)):
        relay.send_authenticated(
            "REGISTER",
            f"sip:{HOST}",
            user,
            port,
            contact=f"<sip:{user}@{HOST}:{port}>",
            to=f"<sip:{user}@{HOST}>",
        )
    put = relay.store.put_document
    ensureDeferred(put(CONSENT_RULES_AUID, CAROL, "index", grant_document(ALICE, LIST)))
    ensureDeferred(put(CONSENT_RULES_AUID, DAVE, "index", _message_only(ALICE, LIST)))
    return relay


def _member_invites(out: Out) -> dict[int, SIPRequest]:
    return {
        port: m
        for m, port in out
        if isinstance(m, SIPRequest) and m.method == "INVITE" and port != SENDER_PORT
    }


def test_an_invite_to_a_list_needs_each_members_consent_for_invite(club: Relay) -> None:
    """RFC 5360 §5.10: permission is per method; dave's grant for MESSAGE does not let
    alice INVITE him, so the INVITE is 470 naming his consent URI and goes nowhere,
    while a MESSAGE still reaches all three."""
    _, out = _invite(club, LIST)
    response = _final(out)
    assert response.status == 470
    consent = club.sip.consent_relay.uris.consent_uri(LIST, DAVE)
    assert response.headers.get_all("permission-missing") == [f"<{consent}>"]
    assert all(port == SENDER_PORT for _, port in out)
    out = club.send_authenticated("MESSAGE", LIST, "alice", SENDER_PORT)
    assert sorted(port for _, port in out) == sorted(MEMBER_PORTS.values())


def _granted_invite(club: Relay) -> tuple[SIPRequest, dict[int, SIPRequest]]:
    """Dave grants alice INVITE too; alice's INVITE to the list, as forked."""
    put = club.store.put_document
    ensureDeferred(put(CONSENT_RULES_AUID, DAVE, "index", grant_document(ALICE, LIST)))
    invite, out = _invite(club, LIST)
    assert _statuses(out) == [100]
    return invite, _member_invites(out)


def test_a_consented_invite_to_a_list_forks_and_the_first_2xx_cancels_the_rest(
    club: Relay,
) -> None:
    invite, copies = _granted_invite(club)
    assert sorted(copies) == sorted(MEMBER_PORTS.values())
    for copy in copies.values():
        assert copy.headers.get("P-Asserted-Identity") == f"<{ALICE}>"
        assert f'target-uri="{LIST}"' in (copy.headers.get("trigger-consent") or "")
        assert copy.body == SDP and copy.headers.get_all("record-route")
    up: Out = []
    for port, copy in copies.items():
        up += club.feed(make_response(copy, 180, to_tag=f"m{port}"), port)
    assert _statuses(up) == [180, 180, 180]  # §16.7 step 5
    ok = make_response(copies[CAROL_PORT], 200, to_tag=f"m{CAROL_PORT}", body=SDP)
    back = club.feed(ok, CAROL_PORT)
    assert _statuses(back) == [200]
    cancelled = {port: m for m, port in back if isinstance(m, SIPRequest) and m.method == "CANCEL"}
    assert sorted(cancelled) == [BOB_PORT, DAVE_PORT]  # step 10: the other branches
    for port, cancel in cancelled.items():
        assert cancel.via.branch == copies[port].via.branch
    # A later 2xx (dave answered before his CANCEL arrived) goes upstream too (§16.7).
    late = make_response(copies[DAVE_PORT], 200, to_tag=f"m{DAVE_PORT}", body=SDP)
    assert _statuses(club.feed(late, DAVE_PORT)) == [200]
    assert invite.call_id


def test_a_cancel_of_an_invite_to_a_list_cancels_every_branch_and_ends_with_487(
    club: Relay,
) -> None:
    invite, copies = _granted_invite(club)
    for port, copy in copies.items():
        club.feed(make_response(copy, 180, to_tag=f"m{port}"), port)
    back = club.feed(cancel_for(invite), SENDER_PORT)
    assert sorted(_statuses(back)) == [200, 487]
    cancelled = sorted(
        port for m, port in back if isinstance(m, SIPRequest) and m.method == "CANCEL"
    )
    assert cancelled == sorted(MEMBER_PORTS.values())


@pytest.mark.parametrize(("uri", "status"), [(f"sip:nobody@{HOST}", 404), (ALICE, 480)])
def test_an_invite_to_no_registered_user_is_refused(relay: Relay, uri: str, status: int) -> None:
    _, out = _invite(relay, uri)
    assert _final(out).status == status
    assert all(port == SENDER_PORT for _, port in out)


# -- in-dialog requests on the relay's route (§16.4, §16.12) --------------------------


def _in_dialog(
    method: str, uri: str, port: int, route: str, from_: str, to: str, call_id: str, cseq: int
) -> SIPRequest:
    h = Headers()
    h.add("Via", f"SIP/2.0/UDP {HOST}:{port};rport;branch={new_branch()}")
    h.add("Max-Forwards", "70")
    h.add("Route", route)
    h.add("From", from_)
    h.add("To", to)
    h.add("Call-ID", call_id)
    h.add("CSeq", f"{cseq} {method}")
    return SIPRequest(method, SIPURI.parse(uri), h)


def _established(relay: Relay) -> tuple[SIPRequest, str]:
    """A call alice → bob answered 200 through the relay: the INVITE and our route."""
    invite, out = _invite(relay)
    copy = _forwarded(out)
    ok = make_response(copy, 200, to_tag="bob-d", body=SDP)
    ok.headers.add("Contact", f"<sip:bob@{HOST}:{BOB_PORT}>")  # §12.1.1: the remote target
    (route,) = copy.headers.get_all("record-route")
    ok.headers.add("Record-Route", route)
    assert _statuses(relay.feed(ok, BOB_PORT)) == [200]
    return invite, route


def test_ack_and_bye_of_a_record_routed_dialog_cross_the_relay(relay: Relay) -> None:
    invite, route = _established(relay)
    alice = invite.headers.get("from") or ""
    bob = f"<{BOB}>;tag=bob-d"
    call_id = invite.call_id or ""
    bob_contact = f"sip:bob@{HOST}:{BOB_PORT}"
    ack = _in_dialog("ACK", bob_contact, SENDER_PORT, route, alice, bob, call_id, 2)
    (forwarded_ack,) = relay.feed(ack, SENDER_PORT)
    message, port = forwarded_ack
    assert isinstance(message, SIPRequest) and port == BOB_PORT
    assert message.method == "ACK" and "route" not in message.headers  # ours removed
    assert len(message.vias) == 2 and message.max_forwards == 69
    # Bob hangs up: his BYE goes to alice's contact through us, her 200 back to him.
    alice_contact = f"sip:alice@{HOST}:{SENDER_PORT}"
    bye = _in_dialog("BYE", alice_contact, BOB_PORT, route, bob, alice, call_id, 1)
    out = relay.feed(bye, BOB_PORT)
    (forwarded_bye,) = _to(out, SENDER_PORT)
    assert isinstance(forwarded_bye, SIPRequest) and forwarded_bye.method == "BYE"
    assert forwarded_bye.uri.port == SENDER_PORT
    back = relay.feed(make_response(forwarded_bye, 200), SENDER_PORT)
    (ok,) = _to(back, BOB_PORT)
    assert isinstance(ok, SIPResponse) and ok.status == 200
    assert [v.branch for v in ok.vias] == [bye.via.branch]


def test_a_route_naming_the_relay_for_another_dialog_opens_nothing(relay: Relay) -> None:
    """The rr MAC binds our Route to its dialog: copying it into another request (to
    reach anyone, a list member included, without consent) is not forwarded."""
    invite, route = _established(relay)
    alice = invite.headers.get("from") or ""
    bob = f"<{BOB}>;tag=bob-d"
    target = f"sip:bob@{HOST}:{BOB_PORT}"
    forged = _in_dialog("BYE", target, SENDER_PORT, route, alice, bob, "other-call", 3)
    out = relay.feed(forged, SENDER_PORT)
    assert all(port == SENDER_PORT for _, port in out)
    assert _final(out).status >= 400
    ack = _in_dialog("ACK", target, SENDER_PORT, route, alice, bob, "other-call", 3)
    assert relay.feed(ack, SENDER_PORT) == []
    stranger = _in_dialog(
        "BYE", target, SENDER_PORT, route, "<sip:x@h>;tag=x", bob, invite.call_id or "", 3
    )
    out = relay.feed(stranger, SENDER_PORT)  # the dialog's Call-ID, not its caller's tag
    assert all(port == SENDER_PORT for _, port in out)


def test_an_in_dialog_request_on_our_route_with_proxy_require_is_420(relay: Relay) -> None:
    invite, route = _established(relay)
    alice = invite.headers.get("from") or ""
    bob = f"<{BOB}>;tag=bob-d"
    info = _in_dialog(
        "INFO",
        f"sip:bob@{HOST}:{BOB_PORT}",
        SENDER_PORT,
        route,
        alice,
        bob,
        invite.call_id or "",
        3,
    )
    info.headers.add("Proxy-Require", "x-unknown")
    out = relay.feed(info, SENDER_PORT)
    assert _final(out).status == 420
    assert all(port == SENDER_PORT for _, port in out)


def test_stopping_the_relay_leaves_no_invite_timer_behind(relay: Relay) -> None:
    _, out = _invite(relay)
    relay.feed(make_response(_forwarded(out), 180, to_tag="bob-s"), BOB_PORT)
    assert any(
        "_timer_c" in repr(getattr(call, "func", None)) for call in relay.reactor.getDelayedCalls()
    )
    relay.sip.consent_relay.stop()
    assert not any(
        "_timer_c" in repr(getattr(call, "func", None)) for call in relay.reactor.getDelayedCalls()
    )


def test_an_in_dialog_request_to_another_target_is_403_and_sent_nowhere(relay: Relay) -> None:
    """Our route opens the dialog's two remote targets only: an in-dialog request (its
    rr MAC valid) pointed at anyone else is refused, so a caller cannot reach a list
    member who never consented through a dialog with someone who did."""
    invite, route = _established(relay)
    alice = invite.headers.get("from") or ""
    bob = f"<{BOB}>;tag=bob-d"
    call_id = invite.call_id or ""
    elsewhere = f"sip:carol@{HOST}:6001"
    message = _in_dialog("MESSAGE", elsewhere, SENDER_PORT, route, alice, bob, call_id, 3)
    out = relay.feed(message, SENDER_PORT)
    assert _final(out).status == 403
    assert all(port == SENDER_PORT for _, port in out)
    ack = _in_dialog("ACK", elsewhere, SENDER_PORT, route, alice, bob, call_id, 2)
    assert relay.feed(ack, SENDER_PORT) == []
    # Bob may not use the dialog to reach anyone but alice's contact either.
    bye = _in_dialog("BYE", elsewhere, BOB_PORT, route, bob, alice, call_id, 1)
    out = relay.feed(bye, BOB_PORT)
    assert [port for _, port in out] == [BOB_PORT]
    # A dialog whose targets the relay does not hold (a tag nobody answered with) is 481.
    stray = f"<{BOB}>;tag=never"
    target = f"sip:bob@{HOST}:{BOB_PORT}"
    info = _in_dialog("INFO", target, SENDER_PORT, route, alice, stray, call_id, 4)
    out = relay.feed(info, SENDER_PORT)
    assert _final(out).status == 481
    assert all(port == SENDER_PORT for _, port in out)


def test_a_bye_answered_2xx_ends_the_dialogs_targets(relay: Relay) -> None:
    invite, route = _established(relay)
    alice = invite.headers.get("from") or ""
    bob = f"<{BOB}>;tag=bob-d"
    call_id = invite.call_id or ""
    bob_contact = f"sip:bob@{HOST}:{BOB_PORT}"
    bye = _in_dialog("BYE", bob_contact, SENDER_PORT, route, alice, bob, call_id, 3)
    (forwarded,) = _to(relay.feed(bye, SENDER_PORT), BOB_PORT)
    assert isinstance(forwarded, SIPRequest)
    relay.feed(make_response(forwarded, 200), BOB_PORT)
    assert len(relay.sip.consent_relay.dialogs) == 0
    again = _in_dialog("INFO", bob_contact, SENDER_PORT, route, alice, bob, call_id, 4)
    out = relay.feed(again, SENDER_PORT)
    assert _final(out).status == 481
    assert all(port == SENDER_PORT for _, port in out)


def test_when_no_member_answers_2xx_the_caller_gets_the_best_final(club: Relay) -> None:
    """§16.7 step 6: a 486 beats a 408 and a 503 (which a proxy never passes on)."""
    invite, copies = _granted_invite(club)
    answers = {BOB_PORT: 503, CAROL_PORT: 486, DAVE_PORT: 408}
    up: Out = []
    for port, status in answers.items():
        up += club.feed(make_response(copies[port], status, to_tag=f"m{port}"), port)
    acks = sorted(port for m, port in up if isinstance(m, SIPRequest) and m.method == "ACK")
    assert acks == sorted(answers)  # each branch's final ACKed hop by hop
    assert _statuses(up) == [486]
    assert _final(up).via.branch == invite.via.branch


# -- Trigger-Consent (RFC 5360 §5.11) ------------------------------------------------------


def _member_out(
    started: _Started, out: list[tuple[SIPRequest | SIPResponse, int]]
) -> tuple[SIPResponse, list[SIPRequest]]:
    """Bob's final response and the consent requests the relay started towards him
    meanwhile (a consent request MESSAGE is over 1300 bytes, so it leaves by TCP,
    RFC 3261 §18.1.1: taken where the relay hands it to its transport)."""
    (final,) = [m for m, port in out if isinstance(m, SIPResponse) and port == BOB_PORT]
    return final, started.pop_all()


class _Started:
    """Records the requests the relay starts (its transport's ``request``)."""

    def __init__(self, relay: Relay) -> None:
        transport = relay.sip.consent_relay.transport
        self._request = transport.request
        self.requests: list[SIPRequest] = []
        transport.request = self

    def __call__(self, request: SIPRequest, target: Any) -> Any:
        self.requests.append(request)
        return self._request(request, target)

    def pop_all(self) -> list[SIPRequest]:
        out, self.requests = [r for r in self.requests if r.method == "MESSAGE"], []
        return out


def _dave_asks_bob(relay: Relay, *, ask: bool = True) -> tuple[str, _Started]:
    """Dave is refused (bob permits alice only) and, with ``ask``, asks bob by CONSENT:
    the consent URI of (club, bob), the one relayed copies carry in Trigger-Consent,
    and what the relay starts from then on."""
    started = _Started(relay)
    refused = _final(relay.send_authenticated("MESSAGE", LIST, "dave", SENDER_PORT))
    assert refused.status == 470
    consent_uri = (refused.headers.get("Permission-Missing") or "").strip("<>")
    if ask:
        asked = relay.send_authenticated(
            "CONSENT", consent_uri, "dave", SENDER_PORT, headers=(("Consent-Methods", "MESSAGE"),)
        )
        assert _final(asked).status == 202
    return consent_uri, started


def _links(message: SIPRequest) -> dict[str, str]:
    """The ``sip:`` perm-uris of the RFC 5361 document in a consent request MESSAGE."""
    assert (message.headers.get("content-type") or "").startswith("multipart/alternative;")
    start = message.body.index(b"<?xml")
    policy = etree.fromstring(message.body[start : message.body.index(b"\r\n--", start)])
    return {
        e.text or "": e.get("perm-uri", "")
        for e in policy.iter(f"{{{CONSENT_FORMAT_NAMESPACE}}}trans-handling")
        if e.get("perm-uri", "").startswith("sip:")
    }


def test_a_message_to_the_trigger_consent_uri_sends_the_member_its_links_again(
    relay: Relay,
) -> None:
    """RFC 5360 §5.11: bob sends a MESSAGE to the URI of a relayed copy's
    Trigger-Consent; the relay (never the sender) sends him dave's consent request
    again, with the grant and deny URIs, and its deny URI works."""
    consent_uri, started = _dave_asks_bob(relay)
    final, sent = _member_out(
        started,
        relay.send_authenticated("MESSAGE", consent_uri, "bob", BOB_PORT, to=f"<{consent_uri}>"),
    )
    assert final.status == 202
    (asked,) = sent
    assert asked.headers.get("from", "").startswith(f"<sip:{HOST}>")
    links = _links(asked)
    assert set(links) == {"grant", "deny"}
    granted = relay.send_authenticated("MESSAGE", links["grant"], "bob", BOB_PORT, to=f"<{BOB}>")
    assert _member_out(started, granted)[0].status == 200
    out = relay.send_authenticated("MESSAGE", LIST, "dave", SENDER_PORT)
    assert [port for m, port in out if isinstance(m, SIPRequest)] == [BOB_PORT]
    relay.send_authenticated("MESSAGE", links["deny"], "bob", BOB_PORT, to=f"<{BOB}>")
    assert _final(relay.send_authenticated("MESSAGE", LIST, "dave", SENDER_PORT)).status == 470


def test_a_message_carrying_trigger_consent_is_a_trigger_too(relay: Relay) -> None:
    consent_uri, started = _dave_asks_bob(relay)
    header = ("Trigger-Consent", format_trigger_consent(consent_uri, LIST))
    final, sent = _member_out(
        started,
        relay.send_authenticated("MESSAGE", f"sip:{HOST}", "bob", BOB_PORT, headers=(header,)),
    )
    assert final.status == 202
    assert [set(_links(r)) for r in sent] == [{"grant", "deny"}]


def test_only_the_recipient_may_trigger_and_nothing_reaches_the_member(relay: Relay) -> None:
    consent_uri, started = _dave_asks_bob(relay)
    out = relay.send_authenticated("MESSAGE", consent_uri, "dave", SENDER_PORT)
    assert (_final(out).status, _final(out).reason) == (
        403,
        "Only The Recipient May Trigger Consent",
    )
    assert all(port == SENDER_PORT for _, port in out) and not started.pop_all()


@pytest.mark.parametrize(
    ("value", "status", "reason"),
    [
        ('{uri};target-uri="sip:pals@127.0.0.1"', 400, "Trigger-Consent target-uri Does Not Match"),
        ("{uri}", 400, "Trigger-Consent Without target-uri"),
        (f'sip:consent-forged.AAAA@{HOST};target-uri="{LIST}"', 404, "Unknown Trigger-Consent URI"),
        (f'sip:consent-x@example.org;target-uri="{LIST}"', 404, "Unknown Trigger-Consent URI"),
    ],
)
def test_a_bad_trigger_is_answered_clearly_and_sends_nothing(
    relay: Relay, value: str, status: int, reason: str
) -> None:
    consent_uri, started = _dave_asks_bob(relay)
    header = ("Trigger-Consent", value.replace("{uri}", consent_uri))
    final, sent = _member_out(
        started,
        relay.send_authenticated("MESSAGE", f"sip:{HOST}", "bob", BOB_PORT, headers=(header,)),
    )
    assert (final.status, final.reason) == (status, reason)
    assert not sent


def test_a_trigger_with_no_consent_request_to_send_is_404(relay: Relay) -> None:
    consent_uri, started = _dave_asks_bob(relay, ask=False)
    final, sent = _member_out(
        started, relay.send_authenticated("MESSAGE", consent_uri, "bob", BOB_PORT)
    )
    assert (final.status, final.reason) == (404, "No Consent Request To Send Again")
    assert not sent


def test_triggers_past_the_hourly_rate_are_503(tmp_path: Path) -> None:
    relay = Relay(tmp_path)
    relay.sip.consent_relay.ledger.limits = ConsentLimits(consent_requests_per_hour=1)
    consent_uri, started = _dave_asks_bob(relay)
    first, _ = _member_out(
        started, relay.send_authenticated("MESSAGE", consent_uri, "bob", BOB_PORT)
    )
    second, sent = _member_out(
        started, relay.send_authenticated("MESSAGE", consent_uri, "bob", BOB_PORT)
    )
    assert first.status == 202
    assert (second.status, second.headers.get("retry-after")) == (503, "3600")
    assert not sent


def test_rfc_5360_figure_5_publish_to_the_trigger_uri_then_to_the_deny_uri(relay: Relay) -> None:
    """RFC 5360 §5.8 figure 5: (4) PUBLISH with an empty body to the Trigger-Consent
    URI, (5) 200 OK, (6) the relay's MESSAGE with the permission document, (8) PUBLISH
    to its deny URI revokes. Grants by PUBLISH too (§5.6)."""
    consent_uri, started = _dave_asks_bob(relay)
    final, sent = _member_out(
        started, relay.send_authenticated("PUBLISH", consent_uri, "bob", BOB_PORT)
    )
    assert final.status == 200 and final.headers.get("sip-etag")
    assert final.headers.get("expires") == "0"
    (asked,) = sent
    links = _links(asked)
    granted = relay.send_authenticated("PUBLISH", links["grant"], "bob", BOB_PORT, to=f"<{BOB}>")
    assert _member_out(started, granted)[0].status == 200
    out = relay.send_authenticated("MESSAGE", LIST, "dave", SENDER_PORT)
    assert [port for m, port in out if isinstance(m, SIPRequest)] == [BOB_PORT]
    denied = relay.send_authenticated("PUBLISH", links["deny"], "bob", BOB_PORT, to=f"<{BOB}>")
    assert _member_out(started, denied)[0].status == 200
    assert _final(relay.send_authenticated("MESSAGE", LIST, "dave", SENDER_PORT)).status == 470


@pytest.mark.parametrize(
    ("uri", "body", "status", "reason"),
    [
        ("{consent}", b"<x/>", 400, "Trigger-Consent PUBLISH Takes No Body"),
        (f"sip:{HOST}", b"", 404, "Nothing Is Published Here"),
        (f"sip:consent-forged.AAAA@{HOST}", b"", 404, "Nothing Is Published Here"),
        (f"sip:grant-{'A' * 22}.{'B' * 22}@{HOST}", b"", 404, "Unknown Or Expired Consent Link"),
    ],
)
def test_a_publish_the_relay_cannot_use_is_answered_clearly(
    relay: Relay, uri: str, body: bytes, status: int, reason: str
) -> None:
    consent_uri, started = _dave_asks_bob(relay)
    uri = uri.replace("{consent}", consent_uri)
    out = relay.send_authenticated("PUBLISH", uri, "bob", BOB_PORT, body=body, to=f"<{BOB}>")
    final, sent = _member_out(started, out)
    assert (final.status, final.reason) == (status, reason)
    assert not sent


def test_one_trigger_sends_one_message_whatever_the_number_of_senders(relay: Relay) -> None:
    """Dave and alice both asked bob through the club: bob's trigger gets one MESSAGE
    (RFC 5360 §5.11.1 "a MESSAGE request") whose document holds one rule per request,
    each with its own grant and deny URIs; the relay's MESSAGEs never outnumber the
    triggers."""
    consent_uri, started = _dave_asks_bob(relay)
    asked = relay.send_authenticated(
        "CONSENT", consent_uri, "alice", SENDER_PORT, headers=(("Consent-Methods", "INVITE"),)
    )
    assert _final(asked).status == 202
    started.pop_all()
    final, sent = _member_out(
        started, relay.send_authenticated("PUBLISH", consent_uri, "bob", BOB_PORT)
    )
    assert final.status == 200
    (message,) = sent
    start = message.body.index(b"<?xml")
    policy = etree.fromstring(message.body[start : message.body.index(b"\r\n--", start)])
    cp, cr = "{urn:ietf:params:xml:ns:common-policy}", f"{{{CONSENT_FORMAT_NAMESPACE}}}"
    rules = policy.findall(f"{cp}rule")
    assert len({rule.get("id") for rule in rules}) == 2
    senders = [
        one.get("id") or ""
        for one in policy.iterfind(f"{cp}rule/{cp}conditions/{cp}identity/{cp}one")
    ]
    assert sorted(senders) == [ALICE, DAVE]
    denies = [
        e.get("perm-uri")
        for rule in rules
        for e in rule.iter(f"{cr}trans-handling")
        if e.text == "deny" and e.get("perm-uri", "").startswith("sip:")
    ]
    assert len(set(denies)) == 2
    assert ALICE in message.body.decode() and DAVE in message.body.decode()
