"""REGISTER semantics (RFC 3261 §10.3) on a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from relayd.digest import DigestAuthenticator, ha1
from relayd.sip.auth import SIPAuthenticator, client_authorization
from relayd.sip.message import Headers, SIPRequest, SIPResponse, SIPStatus
from relayd.sip.registrar import Registrar, RegistrarLimits
from relayd.sip.uri import SIPURI, NameAddr

DOMAIN = "example.com"
AOR = "sip:alice@example.com"


def register(
    *contacts: str,
    expires: int | None = None,
    call_id: str = "reg-1",
    cseq: int = 1,
    to: str = "<sip:alice@example.com>",
    uri: str = "sip:example.com",
) -> SIPRequest:
    rows = [
        ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1"),
        ("From", f"{to};tag=x"),
        ("To", to),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} REGISTER"),
    ]
    rows += [("Contact", c) for c in contacts]
    if expires is not None:
        rows.append(("Expires", str(expires)))
    return SIPRequest("REGISTER", SIPURI.parse(uri), Headers(rows))


def status_of(registrar: Registrar, request: SIPRequest) -> SIPStatus:
    with pytest.raises(SIPStatus) as info:
        registrar.handle(request)
    return info.value


def expires_of(response: SIPResponse) -> dict[str, str | None]:
    return {
        NameAddr.parse(c).uri.format(): NameAddr.parse(c).param("expires")
        for c in response.headers.get_all("contact")
    }


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registrar(clock: Clock) -> Registrar:
    limits = RegistrarLimits(
        min_expires_seconds=60,
        default_expires_seconds=600,
        max_expires_seconds=3600,
        max_contacts_per_aor=3,
        max_bindings=5,
    )
    return Registrar(DOMAIN, clock, None, limits, local_hosts=frozenset({"192.0.2.100"}))


def test_binding_with_default_and_clamped_expiry(registrar: Registrar) -> None:
    response = registrar.handle(register("<sip:alice@192.0.2.1:5060>"))
    assert response.status == 200
    assert expires_of(response) == {"sip:alice@192.0.2.1:5060": "600"}
    response = registrar.handle(register("<sip:a2@192.0.2.1>;expires=99999", cseq=2))
    assert expires_of(response)["sip:a2@192.0.2.1"] == "3600"
    assert registrar.is_online(AOR) and len(registrar.contacts(AOR)) == 2


def test_contact_expires_param_beats_expires_header(registrar: Registrar) -> None:
    response = registrar.handle(register("<sip:alice@192.0.2.1>;expires=120", expires=900))
    assert expires_of(response) == {"sip:alice@192.0.2.1": "120"}


def test_expiry_is_clock_driven_and_notifies(clock: Clock, registrar: Registrar) -> None:
    events: list[tuple[str, bool]] = []
    registrar.add_listener(lambda aor, online: events.append((aor, online)))
    registrar.handle(register("<sip:alice@192.0.2.1>", expires=60))
    registrar.handle(register("<sip:alice@192.0.2.2>", expires=120, cseq=2))
    assert events == [(AOR, True)]
    clock.advance(61)
    assert [b.uri.host for b in registrar.contacts(AOR)] == ["192.0.2.2"]
    assert registrar.binding_count == 1
    clock.advance(60)
    assert not registrar.is_online(AOR)
    assert events == [(AOR, True), (AOR, False)]
    assert registrar.binding_count == 0 and not clock.getDelayedCalls()


def test_interval_too_brief_names_min_expires(registrar: Registrar) -> None:
    status = status_of(registrar, register("<sip:alice@192.0.2.1>", expires=30))
    assert status.status == 423
    assert ("Min-Expires", "60") in status.headers
    assert not registrar.is_online(AOR)


def test_expires_zero_removes_one_binding(registrar: Registrar) -> None:
    registrar.handle(register("<sip:alice@192.0.2.1>", "<sip:alice@192.0.2.2>"))
    response = registrar.handle(register("<sip:alice@192.0.2.1>;expires=0", cseq=2))
    assert list(expires_of(response)) == ["sip:alice@192.0.2.2"]


def test_wildcard_removes_everything(registrar: Registrar) -> None:
    registrar.handle(register("<sip:alice@192.0.2.1>", "<sip:alice@192.0.2.2>"))
    response = registrar.handle(register("*", expires=0, cseq=2))
    assert response.status == 200 and not response.headers.get_all("contact")
    assert not registrar.is_online(AOR)


def test_wildcard_needs_expires_zero_and_to_be_alone(registrar: Registrar) -> None:
    assert status_of(registrar, register("*", expires=10)).status == 400
    assert status_of(registrar, register("*")).status == 400
    assert status_of(registrar, register("*", "<sip:a@192.0.2.1>", expires=0)).status == 400


def test_cseq_ordering_within_one_call_id(registrar: Registrar) -> None:
    registrar.handle(register("<sip:alice@192.0.2.1>", cseq=5))
    old = status_of(registrar, register("<sip:alice@192.0.2.1>;expires=0", cseq=5))
    assert old.status == 500
    assert registrar.is_online(AOR)
    assert status_of(registrar, register("*", expires=0, cseq=4)).status == 500
    # Another Call-ID (a rebooted UA) may replace the binding whatever its CSeq.
    registrar.handle(register("<sip:alice@192.0.2.1>;expires=0", call_id="reg-2", cseq=1))
    assert not registrar.is_online(AOR)


def test_query_without_contact_lists_bindings(registrar: Registrar) -> None:
    registrar.handle(register("<sip:alice@192.0.2.1>"))
    response = registrar.handle(register(cseq=2))
    assert list(expires_of(response)) == ["sip:alice@192.0.2.1"]


def test_domain_checks(registrar: Registrar) -> None:
    assert status_of(registrar, register("<sip:a@h>", uri="sip:other.org")).status == 404
    to_elsewhere = register("<sip:a@h>", to="<sip:alice@other.org>")
    assert status_of(registrar, to_elsewhere).status == 404
    by_address = register("<sip:alice@192.0.2.1>", uri="sip:192.0.2.100")
    assert registrar.handle(by_address).status == 200


def test_limits_per_aor_and_in_total(registrar: Registrar) -> None:
    many = [f"<sip:alice@192.0.2.{i}>" for i in range(1, 5)]
    assert status_of(registrar, register(*many)).status == 403
    registrar.handle(register(*many[:3]))
    registrar.handle(register("<sip:bob@192.0.2.9>", to="<sip:bob@example.com>"))
    two = register("<sip:c@192.0.2.9>", "<sip:d@192.0.2.9>", to="<sip:c@example.com>")
    full = status_of(registrar, two)
    assert full.status == 503 and ("Retry-After", "60") in full.headers
    assert registrar.binding_count == 4 and not registrar.is_online("sip:c@example.com")
    # Replacing a binding does not grow the table, so it still works when full.
    registrar.handle(register("<sip:bob@192.0.2.9>", to="<sip:bob@example.com>", cseq=2))


def test_bad_values_are_400_and_leave_no_trace(registrar: Registrar) -> None:
    assert status_of(registrar, register("<sip:a@h>", expires=-1)).status == 400
    assert status_of(registrar, register("<sip:a@h>;q=2")).status == 400
    assert status_of(registrar, register("<sip:a@h>;expires=x")).status == 400
    assert status_of(registrar, register("not a contact <")).status == 400
    assert registrar.binding_count == 0


def test_digest_authentication_and_own_aor_only(clock: Clock) -> None:
    def lookup(user: str, realm: str) -> str | None:
        return ha1(user, realm, "secret") if user in ("alice", "bob") else None

    auth = SIPAuthenticator(DigestAuthenticator(DOMAIN, lookup, clock), DOMAIN)
    registrar = Registrar(DOMAIN, clock, auth)
    request = register("<sip:alice@192.0.2.1>")
    challenge = status_of(registrar, request)
    assert challenge.status == 401
    credentials = client_authorization(
        challenge.headers[0][1],
        method="REGISTER",
        uri="sip:example.com",
        username="bob",
        password="secret",
    )
    request.headers.set("Authorization", credentials)
    assert status_of(registrar, request).status == 403
    credentials = client_authorization(
        challenge.headers[0][1],
        method="REGISTER",
        uri="sip:example.com",
        username="alice",
        password="secret",
        nc=2,
    )
    request.headers.set("Authorization", credentials)
    assert registrar.handle(request).status == 200
    assert registrar.is_online(AOR)


def test_stop_cancels_timers(clock: Clock, registrar: Registrar) -> None:
    registrar.handle(register("<sip:alice@192.0.2.1>"))
    registrar.stop()
    assert not clock.getDelayedCalls() and not registrar.is_online(AOR)
