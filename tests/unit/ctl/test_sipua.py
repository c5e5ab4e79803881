"""The SIP user agent of ``relayctl chat`` and ``relayctl consent`` on a fake clock and
socket: retransmission (Timer A and E, RFC 3261 §17.1), digest retries, a 470's missing
members, the 2xx retransmitted until its ACK (§13.3.1.4), the BYE of a dialog, and
wait-permission NOTIFYs answered and queued once."""

from __future__ import annotations

import socket
from typing import Any, TypeVar

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from relayd.ctl.settings import Credentials, CtlError
from relayd.ctl.sipua import (
    CallRefused,
    Dialog,
    SIPUserAgent,
    missing_members,
    relay_address,
    resolve,
)
from relayd.digest import format_challenge, parse_credentials
from relayd.sip.message import Headers, SIPRequest, SIPResponse, make_response
from relayd.sip.parser import parse_datagram
from relayd.sipuri import SIPURI

RELAY = ("127.0.0.1", 5060)
_T = TypeVar("_T")
Message = SIPRequest | SIPResponse


class FakeSocket:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, Message]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        assert addr == RELAY
        self.sent.append((self.clock.seconds(), parse_datagram(data)))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", 40000)

    def requests(self, method: str) -> list[SIPRequest]:
        return [m for _, m in self.sent if isinstance(m, SIPRequest) and m.method == method]


def _ua(user: str = "alice", deadline: float = 32.0) -> tuple[SIPUserAgent, FakeSocket, Clock]:
    clock = Clock()
    ua = SIPUserAgent(clock, RELAY, Credentials(user, "secret"), "example.com", deadline)
    socket = FakeSocket(clock)
    ua.makeConnection(socket)  # type: ignore[arg-type]
    return ua, socket, clock


def _value(done: defer.Deferred[_T]) -> _T:
    """What ``done`` has already fired with."""
    got: list[_T] = []
    done.addCallback(got.append)
    assert got, "not fired with a result"
    return got[0]


def _error(done: defer.Deferred[Any]) -> BaseException | None:
    """The exception ``done`` has already failed with."""
    got: list[BaseException | None] = []

    def keep(failure: Failure) -> None:
        got.append(failure.value)

    done.addErrback(keep)
    assert got, "not failed"
    return got[0]


def _receive(ua: SIPUserAgent, message: Message) -> None:
    ua.datagramReceived(message.to_bytes(), RELAY)


def _request(method: str, call_id: str, cseq: int, body: bytes = b"", **extra: str) -> SIPRequest:
    """A request from alice, as the relay forwards it to bob."""
    headers = Headers(
        [
            ("Via", f"SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK{call_id}{method}{cseq}"),
            ("From", "<sip:alice@example.com>;tag=al"),
            ("To", "<sip:bob@example.com>"),
            ("Call-ID", call_id),
            ("CSeq", f"{cseq} {method}"),
            *((name.replace("_", "-"), value) for name, value in extra.items()),
        ]
    )
    return SIPRequest(method, SIPURI.parse("sip:bob@127.0.0.1:40000"), headers, body)


def test_a_register_nobody_answers_is_resent_per_timer_e_and_given_up_after_timer_f() -> None:
    ua, socket, clock = _ua()
    done = defer.Deferred.fromCoroutine(ua.register())
    clock.pump([0.25] * 140)
    times = [at for at, m in socket.sent]
    assert times == [0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert len({m.via.branch for _, m in socket.sent}) == 1  # one transaction
    error = _error(done)
    assert isinstance(error, CtlError) and "within 32 s" in str(error)
    assert not clock.getDelayedCalls()


def test_an_invite_is_resent_per_timer_a_until_a_provisional_response() -> None:
    ua, socket, clock = _ua()
    calling = defer.Deferred.fromCoroutine(ua.invite("sip:bob@example.com", b"v=0\r\n"))
    clock.pump([0.25] * 20)  # 5 s
    assert [at for at, _ in socket.sent] == [0, 0.5, 1.5, 3.5]
    invite = socket.requests("INVITE")[0]
    _receive(ua, make_response(invite, 180, to_tag="b"))
    clock.pump([1.0] * 60)
    assert len(socket.requests("INVITE")) == 4  # ringing: no more, and no Timer B either
    assert not calling.called
    calling.cancel()
    calling.addErrback(lambda _: None)


def test_a_407_is_answered_once_with_credentials_and_acked_hop_by_hop() -> None:
    ua, socket, clock = _ua()
    calling = defer.Deferred.fromCoroutine(ua.invite("sip:bob@example.com", b"v=0\r\n"))
    first = socket.requests("INVITE")[0]
    challenge = make_response(
        first, 407, headers=[("Proxy-Authenticate", format_challenge("example.com", "n1"))]
    )
    _receive(ua, challenge)
    (ack,) = socket.requests("ACK")
    assert ack.via.branch == first.via.branch and ack.cseq.number == 1
    again = socket.requests("INVITE")[1]
    assert again.cseq.number == 2 and again.call_id == first.call_id
    assert 'username="alice"' in (again.headers.get("Proxy-Authorization") or "")
    _receive(
        ua,
        make_response(
            again, 407, headers=[("Proxy-Authenticate", format_challenge("example.com", "n2"))]
        ),
    )
    assert "wrong user name or password" in str(_error(calling))
    assert not clock.getDelayedCalls()


def test_a_470_names_the_members_who_have_not_consented() -> None:
    ua, socket, clock = _ua()
    calling = defer.Deferred.fromCoroutine(ua.invite("sip:friends@example.com", b"v=0\r\n"))
    invite = socket.requests("INVITE")[0]
    missing = '"sip:carol@example.com" <sip:consent-abc@example.com>, <sip:consent-def@example.com>'
    _receive(ua, make_response(invite, 470, headers=[("Permission-Missing", missing)]))
    refused = _error(calling)
    assert isinstance(refused, CallRefused) and refused.status == 470
    assert missing_members(refused.missing) == [
        "sip:carol@example.com (sip:consent-abc@example.com)",
        "sip:consent-def@example.com",
    ]
    assert socket.requests("ACK")[0].via.branch == invite.via.branch
    assert not clock.getDelayedCalls()
    _receive(ua, make_response(invite, 470, headers=[("Permission-Missing", missing)]))
    assert len(socket.requests("ACK")) == 2  # our ACK was lost: the 470 came again


def _answered_call(
    ua: SIPUserAgent, socket: FakeSocket
) -> tuple[defer.Deferred[Dialog], SIPResponse]:
    calling = defer.Deferred.fromCoroutine(ua.invite("sip:bob@example.com", b"offer"))
    invite = socket.requests("INVITE")[0]
    ok = make_response(
        invite,
        200,
        to_tag="bob",
        body=b"answer",
        headers=[
            ("Contact", "<sip:bob@192.0.2.7:5062>"),
            ("Record-Route", "<sip:127.0.0.1:5060;lr;rr=x>"),
        ],
    )
    _receive(ua, ok)
    return calling, ok


def test_an_answered_call_is_acked_along_the_route_and_a_resent_200_acked_again() -> None:
    ua, socket, clock = _ua()
    calling, ok = _answered_call(ua, socket)
    dialog = _value(calling)
    assert dialog.body == b"answer"
    (ack,) = socket.requests("ACK")
    assert ack.uri.format() == "sip:bob@192.0.2.7:5062"
    assert ack.headers.get_all("Route") == ["<sip:127.0.0.1:5060;lr;rr=x>"]
    assert ack.cseq.number == 1 and ack.to_tag == "bob"
    _receive(ua, ok)  # our ACK was lost
    assert len(socket.requests("ACK")) == 2
    hanging_up = defer.Deferred.fromCoroutine(ua.bye(dialog))
    (bye,) = socket.requests("BYE")
    assert bye.cseq.number == 2 and bye.uri.format() == "sip:bob@192.0.2.7:5062"
    _receive(ua, make_response(bye, 200))
    assert hanging_up.called and dialog.ended.called
    assert not clock.getDelayedCalls()


def test_an_accepted_invite_resends_its_200_until_the_ack_and_a_bye_ends_the_dialog() -> None:
    ua, socket, clock = _ua("bob")
    invite = _request(
        "INVITE",
        "call-1",
        2,
        b"offer",
        Contact="<sip:alice@192.0.2.1:5070>",
        Record_Route="<sip:127.0.0.1:5060;lr>",
    )
    waiting = defer.Deferred.fromCoroutine(ua.incoming())
    _receive(ua, invite)
    arrived = _value(waiting)
    assert arrived.body == b"offer"
    assert [m.status for _, m in socket.sent if isinstance(m, SIPResponse)] == [100]
    accepting = defer.Deferred.fromCoroutine(ua.accept(arrived, b"answer"))
    clock.pump([0.25] * 16)  # 4 s
    oks = [at for at, m in socket.sent if isinstance(m, SIPResponse) and m.status == 200]
    assert oks == [0, 0.5, 1.5, 3.5]
    _receive(ua, invite)  # a retransmitted INVITE gets the 200 again
    assert isinstance(socket.sent[-1][1], SIPResponse) and socket.sent[-1][1].status == 200
    _receive(ua, _request("ACK", "call-1", 2))
    dialog = _value(accepting)
    assert dialog.route == ["<sip:127.0.0.1:5060;lr>"]
    count = len(socket.sent)
    clock.pump([1.0] * 40)
    assert len(socket.sent) == count  # no more 200s
    bye = _request("BYE", "call-1", 3)
    _receive(ua, bye)
    answer = socket.sent[-1][1]
    assert isinstance(answer, SIPResponse) and answer.status == 200
    assert dialog.ended.called
    _receive(ua, bye)  # a BYE for a dialog we no longer have
    assert isinstance(socket.sent[-1][1], SIPResponse) and socket.sent[-1][1].status == 481


def test_a_200_never_acknowledged_drops_the_call_after_timer_h() -> None:
    ua, _, clock = _ua("bob")
    invite = _request("INVITE", "c", 1, b"offer", Contact="<sip:alice@192.0.2.1>")
    accepting = defer.Deferred.fromCoroutine(ua.accept(invite, b"answer"))
    clock.pump([1.0] * 40)
    error = _error(accepting)
    assert isinstance(error, CtlError) and "no ACK" in str(error)
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("method", ["OPTIONS", "INFO"])
def test_a_request_the_agent_does_not_handle_is_501(method: str) -> None:
    ua, socket, _ = _ua()
    request = _request(method, "o", 1)
    _receive(ua, request)
    answer = socket.sent[-1][1]
    assert isinstance(answer, SIPResponse) and answer.status == 501


def test_an_invite_while_not_waiting_for_one_is_486_and_a_re_invite_488_or_481() -> None:
    ua, socket, _ = _ua("bob")
    _receive(ua, _request("INVITE", "early", 1, Contact="<sip:alice@192.0.2.1>"))
    assert [m.status for _, m in socket.sent if isinstance(m, SIPResponse)] == [486]
    waiting = defer.Deferred.fromCoroutine(ua.incoming())
    _receive(ua, _request("INVITE", "call", 1, b"offer", Contact="<sip:alice@192.0.2.1>"))
    accepting = defer.Deferred.fromCoroutine(ua.accept(_value(waiting), b"answer"))
    _receive(ua, _request("ACK", "call", 1))
    _value(accepting)
    _receive(ua, _request("INVITE", "second", 1, Contact="<sip:carol@192.0.2.3>"))
    for call_id in ("call", "gone"):  # in our dialog, then in none of ours
        reinvite = _request("INVITE", call_id, 2)
        reinvite.headers.set("To", "<sip:bob@example.com>;tag=bob")
        _receive(ua, reinvite)
    statuses = [m.status for _, m in socket.sent if isinstance(m, SIPResponse)]
    assert statuses[-3:] == [486, 488, 481]


def test_a_bye_nobody_answers_ends_the_call_here_after_timer_f() -> None:
    ua, socket, clock = _ua()
    calling, _ = _answered_call(ua, socket)
    dialog = _value(calling)
    hanging_up = defer.Deferred.fromCoroutine(ua.bye(dialog))
    clock.pump([0.25] * 140)
    assert len(socket.requests("BYE")) == 11  # Timer E
    assert _value(hanging_up) is None and dialog.ended.called
    assert not clock.getDelayedCalls()


def test_a_ringing_call_is_cancelled_with_the_invites_branch_and_ends_on_its_487() -> None:
    ua, socket, _ = _ua()
    assert ua.cancel_call() is None  # nothing rings
    calling = defer.Deferred.fromCoroutine(ua.invite("sip:bob@example.com", b"offer"))
    invite = socket.requests("INVITE")[0]
    _receive(ua, make_response(invite, 180, to_tag="bob"))
    cancelling = ua.cancel_call()
    assert cancelling is not None
    (cancel,) = socket.requests("CANCEL")
    assert cancel.via.branch == invite.via.branch and cancel.cseq.number == invite.cseq.number
    assert cancel.headers.get("To") == invite.headers.get("To")
    _receive(ua, make_response(cancel, 200))
    assert cancelling.called
    _receive(ua, make_response(invite, 487, to_tag="bob"))
    refused = _error(calling)
    assert isinstance(refused, CallRefused) and refused.status == 487
    assert ua.cancel_call() is None


def test_a_cancelled_incoming_invite_is_487_and_no_longer_offered() -> None:
    ua, socket, _ = _ua("bob")
    ua.taking_calls = True
    invite = _request("INVITE", "c", 1, b"offer", Contact="<sip:alice@192.0.2.1>")
    _receive(ua, invite)
    cancel = _request("CANCEL", "c", 1)
    cancel.headers.set("Via", invite.headers.get("Via") or "")
    _receive(ua, cancel)
    answers = [(m.cseq.method, m.status) for _, m in socket.sent if isinstance(m, SIPResponse)]
    assert answers == [("INVITE", 100), ("CANCEL", 200), ("INVITE", 487)]
    assert ua.cancelled == {"c"}
    waiting = defer.Deferred.fromCoroutine(ua.incoming())
    assert not waiting.called  # the cancelled INVITE is gone
    _receive(ua, _request("CANCEL", "unknown", 1))
    assert isinstance(socket.sent[-1][1], SIPResponse) and socket.sent[-1][1].status == 481
    waiting.cancel()
    waiting.addErrback(lambda _: None)


def test_a_relay_address_is_a_host_and_port_or_5060() -> None:
    assert relay_address("127.0.0.1") == ("127.0.0.1", 5060)
    assert relay_address("127.0.0.1:5070") == ("127.0.0.1", 5070)
    assert relay_address("sip:relay.test:5070") == ("relay.test", 5070)
    assert relay_address("[::1]:5080") == ("::1", 5080)
    assert relay_address("::1") == ("::1", 5060)
    with pytest.raises(CtlError, match="bad relay address"):
        relay_address("sip:alice@relay.test")
    with pytest.raises(CtlError, match="port must be 1-65535"):
        relay_address("127.0.0.1:0")


def test_a_relay_name_with_both_kinds_of_address_takes_the_ipv4_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    both = [
        (socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("::1", 5060, 0, 0)),
        (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.1", 5060)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: list(both))
    assert resolve("relay.example", 5060) == ("127.0.0.1", 5060)


def test_a_relay_name_that_does_not_resolve_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unknown(*args: object, **kwargs: object) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    with pytest.raises(CtlError, match=r"cannot resolve the SIP relay relay\.invalid"):
        resolve("relay.invalid", 5060)


CONSENT_URI = "sip:consent-AAA.mac1@example.com"


def test_a_consent_nobody_answers_is_resent_up_to_t2_and_given_up_after_timer_f() -> None:
    """RFC 3261 §17.1.2.2: retransmit at T1, 2·T1, … capped at T2; 64·T1 ends it."""
    ua, socket, clock = _ua()
    answer = defer.Deferred.fromCoroutine(ua.request("CONSENT", CONSENT_URI))
    clock.pump([0.25] * 127)
    assert [at for at, _ in socket.sent] == [
        0,
        0.5,
        1.5,
        3.5,
        7.5,
        11.5,
        15.5,
        19.5,
        23.5,
        27.5,
        31.5,
    ]
    assert not answer.called
    clock.advance(0.25)
    error = _error(answer)
    assert isinstance(error, CtlError) and "no answer to CONSENT" in str(error)
    assert not clock.getDelayedCalls()


def test_a_provisional_response_slows_timer_e_to_t2_and_a_short_deadline_ends_sooner() -> None:
    ua, socket, clock = _ua(deadline=10.0)
    answer = defer.Deferred.fromCoroutine(ua.request("SUBSCRIBE", CONSENT_URI))
    (first,) = socket.requests("SUBSCRIBE")
    _receive(ua, make_response(first, 100))
    clock.pump([0.25] * 40)
    assert [at for at, _ in socket.sent] == [0, 0.5, 4.5, 8.5]
    error = _error(answer)
    assert isinstance(error, CtlError) and "within 10 s" in str(error)
    assert not clock.getDelayedCalls()


def test_a_request_is_sent_once_more_with_credentials_then_refused_clearly() -> None:
    ua, socket, clock = _ua()
    answer = defer.Deferred.fromCoroutine(
        ua.request("CONSENT", CONSENT_URI, [("Consent-Methods", "MESSAGE")])
    )
    (first,) = socket.requests("CONSENT")
    challenge = ("Proxy-Authenticate", format_challenge("example.com", "n1"))
    _receive(ua, make_response(first, 407, headers=[challenge]))
    second = socket.requests("CONSENT")[1]
    assert second.headers.get("consent-methods") == "MESSAGE"
    assert second.cseq.number == first.cseq.number + 1
    assert second.call_id == first.call_id and second.via.branch != first.via.branch
    assert parse_credentials(second.headers.get("proxy-authorization") or "").username == "alice"
    _receive(ua, make_response(second, 407, headers=[challenge]))
    error = _error(answer)
    assert isinstance(error, CtlError)
    assert "refused our credentials for alice (407" in str(error)
    assert not socket.requests("ACK")  # only an INVITE's failure is acknowledged
    assert not clock.getDelayedCalls()


def test_requests_of_one_call_id_keep_growing_their_cseq_past_a_challenge() -> None:
    ua, socket, _ = _ua()
    first = defer.Deferred.fromCoroutine(ua.request("SUBSCRIBE", CONSENT_URI, call_id="w1"))
    challenge = ("WWW-Authenticate", format_challenge("example.com", "n1"))
    _receive(ua, make_response(socket.requests("SUBSCRIBE")[0], 401, headers=[challenge]))
    _receive(ua, make_response(socket.requests("SUBSCRIBE")[1], 200))
    assert _value(first).status == 200
    again = defer.Deferred.fromCoroutine(ua.request("SUBSCRIBE", CONSENT_URI, call_id="w1"))
    _receive(ua, make_response(socket.requests("SUBSCRIBE")[2], 200))
    assert _value(again).status == 200
    assert [r.cseq.number for r in socket.requests("SUBSCRIBE")] == [1, 2, 3]


def _notify(call_id: str, cseq: int) -> SIPRequest:
    request = _request("NOTIFY", call_id, cseq, b"<consent-status/>")
    request.headers.set("From", "<sip:wp-1@example.com>;tag=a")
    request.headers.set("To", "<sip:alice@example.com>;tag=b")
    return request


def test_a_notify_is_answered_each_time_and_queued_once() -> None:
    ua, socket, _ = _ua()
    for _ in range(2):  # a retransmission is answered again but queued once
        _receive(ua, _notify("w1", 1))
    _receive(ua, _notify("w1", 2))
    answers = [(m.cseq.method, m.status) for _, m in socket.sent if isinstance(m, SIPResponse)]
    assert answers == [("NOTIFY", 200)] * 3
    assert [n.cseq.number for n in ua.notifications.pending] == [1, 2]


def test_a_bad_uri_is_a_clear_error_and_nothing_is_sent() -> None:
    ua, socket, _ = _ua()
    error = _error(defer.Deferred.fromCoroutine(ua.request("CONSENT", "sip:")))
    assert isinstance(error, CtlError) and "bad URI" in str(error)
    assert not socket.sent


def test_a_ringing_call_gets_180_then_200_with_one_to_tag_and_a_second_session_may_follow() -> None:
    ua, socket, _ = _ua("bob")
    waiting = defer.Deferred.fromCoroutine(ua.incoming())
    _receive(ua, _request("INVITE", "call", 1, b"offer", Contact="<sip:alice@192.0.2.1>"))
    invite = _value(waiting)
    ua.ring(invite)
    accepting = defer.Deferred.fromCoroutine(ua.accept(invite, b"answer", more_calls=True))
    ringing, ok = [m for _, m in socket.sent if isinstance(m, SIPResponse)][1:3]
    assert (ringing.status, ok.status) == (180, 200)
    assert ringing.to_tag is not None and ringing.to_tag == ok.to_tag
    _receive(ua, _request("ACK", "call", 1))
    _value(accepting)
    assert ua.taking_calls  # a file session beside the call is queued, not 486
    _receive(ua, _request("INVITE", "file", 1, b"offer", Contact="<sip:alice@192.0.2.1>"))
    assert [m.status for _, m in socket.sent if isinstance(m, SIPResponse)][-1] == 100
    ua.ring(invite)  # answered already: no second 180
    assert [m.status for _, m in socket.sent if isinstance(m, SIPResponse)][-1] == 100
