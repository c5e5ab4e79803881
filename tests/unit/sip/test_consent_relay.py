"""The consent relay's request rules (§16.3 order, sender identity, §16.7 response), driven
in-process: the daemon's SIP stack fed datagrams on a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred

from relayd.consent.documents import DocumentKey, DocumentRejected
from relayd.consent.store import ConsentState
from relayd.consent.vocabulary import CONSENT_RULES_AUID
from relayd.sip.consent_relay import carried_headers
from relayd.sip.message import Headers, SIPRequest, SIPResponse
from relayd.sip.parser import parse_datagram
from relayd.testing import (
    grant_document,
    in_process_sip_relay,
    sip_credentials,
    uac_request,
)

HOST = "127.0.0.1"
LIST = f"sip:club@{HOST}"
ALICE = f"sip:alice@{HOST}"
BOB = f"sip:bob@{HOST}"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}
SENDER_PORT, BOB_PORT = 5070, 6000


class Relay:
    """The relay with one list (club: bob), bob registered and permitting alice."""

    def __init__(self, folder: Path) -> None:
        relay = in_process_sip_relay(folder, HOST, PASSWORDS, "club", [BOB])
        self.wire, self.protocol, store = relay.wire, relay.protocol, relay.store
        self.reactor = relay.reactor
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

    def feed(self, request: SIPRequest, port: int) -> list[tuple[SIPRequest | SIPResponse, int]]:
        self.protocol.datagramReceived(request.to_bytes(), (HOST, port))
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
            body=b"hi" if method == "MESSAGE" else b"",
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
