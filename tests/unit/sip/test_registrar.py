"""REGISTER semantics (RFC 3261 §10.3) on a fake clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from relayd.consent.sqlite import SQLitePermissionStore
from relayd.consent.store import MemoryPermissionStore, StoredBinding, StoreUnavailable
from relayd.digest import DigestAuthenticator, answer_challenge, ha1
from relayd.sip.auth import SIPAuthenticator
from relayd.sip.message import Headers, SIPRequest, SIPResponse, SIPStatus
from relayd.sip.registrar import (
    UNREACHABLE,
    Registrar,
    RegistrarLimits,
    Unreachable,
    registered_route,
)
from relayd.sip.resolve import Target
from relayd.sipuri import SIPURI, NameAddr
from relayd.testing import captured_log

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


def handle(registrar: Registrar, request: SIPRequest) -> SIPResponse:
    """The answer of a registrar whose store (if any) answers at once."""
    outcome: list[SIPResponse | Failure] = []
    ensureDeferred(registrar.handle(request)).addBoth(outcome.append)
    (result,) = outcome
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, SIPResponse)
    return result


def status_of(registrar: Registrar, request: SIPRequest) -> SIPStatus:
    with pytest.raises(SIPStatus) as info:
        handle(registrar, request)
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
    response = handle(registrar, register("<sip:alice@192.0.2.1:5060>"))
    assert response.status == 200
    assert expires_of(response) == {"sip:alice@192.0.2.1:5060": "600"}
    response = handle(registrar, register("<sip:a2@192.0.2.1>;expires=99999", cseq=2))
    assert expires_of(response)["sip:a2@192.0.2.1"] == "3600"
    assert registrar.is_online(AOR) and len(registrar.contacts(AOR)) == 2


def test_contact_expires_param_beats_expires_header(registrar: Registrar) -> None:
    response = handle(registrar, register("<sip:alice@192.0.2.1>;expires=120", expires=900))
    assert expires_of(response) == {"sip:alice@192.0.2.1": "120"}


def test_expiry_is_clock_driven_and_notifies(clock: Clock, registrar: Registrar) -> None:
    events: list[tuple[str, bool]] = []
    registrar.add_listener(lambda aor, online: events.append((aor, online)))
    handle(registrar, register("<sip:alice@192.0.2.1>", expires=60))
    handle(registrar, register("<sip:alice@192.0.2.2>", expires=120, cseq=2))
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
    handle(registrar, register("<sip:alice@192.0.2.1>", "<sip:alice@192.0.2.2>"))
    response = handle(registrar, register("<sip:alice@192.0.2.1>;expires=0", cseq=2))
    assert list(expires_of(response)) == ["sip:alice@192.0.2.2"]


def test_wildcard_removes_everything(registrar: Registrar) -> None:
    handle(registrar, register("<sip:alice@192.0.2.1>", "<sip:alice@192.0.2.2>"))
    response = handle(registrar, register("*", expires=0, cseq=2))
    assert response.status == 200 and not response.headers.get_all("contact")
    assert not registrar.is_online(AOR)


def test_wildcard_needs_expires_zero_and_to_be_alone(registrar: Registrar) -> None:
    assert status_of(registrar, register("*", expires=10)).status == 400
    assert status_of(registrar, register("*")).status == 400
    assert status_of(registrar, register("*", "<sip:a@192.0.2.1>", expires=0)).status == 400


def test_cseq_ordering_within_one_call_id(registrar: Registrar) -> None:
    handle(registrar, register("<sip:alice@192.0.2.1>", cseq=5))
    old = status_of(registrar, register("<sip:alice@192.0.2.1>;expires=0", cseq=5))
    assert old.status == 500
    assert registrar.is_online(AOR)
    assert status_of(registrar, register("*", expires=0, cseq=4)).status == 500
    # Another Call-ID (a rebooted UA) may replace the binding whatever its CSeq.
    handle(registrar, register("<sip:alice@192.0.2.1>;expires=0", call_id="reg-2", cseq=1))
    assert not registrar.is_online(AOR)


def test_query_without_contact_lists_bindings(registrar: Registrar) -> None:
    handle(registrar, register("<sip:alice@192.0.2.1>"))
    response = handle(registrar, register(cseq=2))
    assert list(expires_of(response)) == ["sip:alice@192.0.2.1"]


def test_domain_checks(registrar: Registrar) -> None:
    assert status_of(registrar, register("<sip:a@h>", uri="sip:other.org")).status == 404
    to_elsewhere = register("<sip:a@h>", to="<sip:alice@other.org>")
    assert status_of(registrar, to_elsewhere).status == 404
    by_address = register("<sip:alice@192.0.2.1>", uri="sip:192.0.2.100")
    assert handle(registrar, by_address).status == 200


def test_limits_per_aor_and_in_total(registrar: Registrar) -> None:
    many = [f"<sip:alice@192.0.2.{i}>" for i in range(1, 5)]
    assert status_of(registrar, register(*many)).status == 403
    handle(registrar, register(*many[:3]))
    handle(registrar, register("<sip:bob@192.0.2.9>", to="<sip:bob@example.com>"))
    two = register("<sip:c@192.0.2.9>", "<sip:d@192.0.2.9>", to="<sip:c@example.com>")
    full = status_of(registrar, two)
    assert full.status == 503 and ("Retry-After", "60") in full.headers
    assert registrar.binding_count == 4 and not registrar.is_online("sip:c@example.com")
    # Replacing a binding does not grow the table, so it still works when full.
    handle(registrar, register("<sip:bob@192.0.2.9>", to="<sip:bob@example.com>", cseq=2))


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
    credentials = answer_challenge(
        challenge.headers[0][1],
        method="REGISTER",
        uri="sip:example.com",
        username="bob",
        password="secret",
    ).authorization
    request.headers.set("Authorization", credentials)
    assert status_of(registrar, request).status == 403
    credentials = answer_challenge(
        challenge.headers[0][1],
        method="REGISTER",
        uri="sip:example.com",
        username="alice",
        password="secret",
        nc=2,
    ).authorization
    request.headers.set("Authorization", credentials)
    assert handle(registrar, request).status == 200
    assert registrar.is_online(AOR)


def test_stop_cancels_timers(clock: Clock, registrar: Registrar) -> None:
    handle(registrar, register("<sip:alice@192.0.2.1>"))
    registrar.stop()
    assert not clock.getDelayedCalls() and not registrar.is_online(AOR)


# -- bindings in the store: written through, restored after a restart ------------------


class _RecordingStore(MemoryPermissionStore):
    """The memory store, recording what each write carries (or failing them all)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.error: Exception = RuntimeError("disk full")
        self.writes: list[tuple[str, list[str], list[str]]] = []

    def save_bindings(
        self, aor: str, bindings: Sequence[StoredBinding], removed: Sequence[str]
    ) -> Deferred[None]:
        if self.fail:
            return fail(self.error)
        self.writes.append((aor, [b.uri for b in bindings], list(removed)))
        return super().save_bindings(aor, bindings, removed)


def test_each_register_writes_only_the_contacts_it_changes(clock: Clock) -> None:
    store = _RecordingStore()
    registrar = Registrar(DOMAIN, clock, None, store=store)
    handle(registrar, register("<sip:alice@192.0.2.1>", "<sip:alice@192.0.2.2>", expires=600))
    handle(registrar, register("<sip:alice@192.0.2.1>", expires=600, cseq=2))  # a refresh
    handle(registrar, register(cseq=3))  # a query
    handle(registrar, register("<sip:alice@192.0.2.2>;expires=0", cseq=4))
    assert store.writes == [
        (AOR, ["sip:alice@192.0.2.1", "sip:alice@192.0.2.2"], []),
        (AOR, ["sip:alice@192.0.2.1"], []),
        (AOR, [], ["sip:alice@192.0.2.2"]),
    ]
    clock.advance(601)
    assert store.writes[-1] == (AOR, [], ["sip:alice@192.0.2.1"])
    handle(registrar, register("<sip:alice@192.0.2.3>", cseq=5))
    handle(registrar, register("*", expires=0, cseq=6))
    assert store.writes[-1] == (AOR, [], ["sip:alice@192.0.2.3"])


def test_a_register_the_store_cannot_keep_is_500(clock: Clock) -> None:
    registrar = Registrar(DOMAIN, clock, None, store=_RecordingStore(fail=True))
    with captured_log():
        assert status_of(registrar, register("<sip:alice@192.0.2.1>")).status == 500


def test_a_register_while_the_store_is_unreachable_is_503(clock: Clock) -> None:
    store = _RecordingStore(fail=True)
    store.error = StoreUnavailable("connection lost")
    refused = status_of(Registrar(DOMAIN, clock, None, store=store), register("<sip:a@h>"))
    assert refused.status == 503
    assert dict(refused.headers) == {"Retry-After": str(StoreUnavailable.retry_after)}


@pytest.fixture(params=["memory", "sqlite"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """A store each call: the same memory store, or a new one on the same SQLite file."""
    memory = MemoryPermissionStore()
    opened: list[SQLitePermissionStore] = []

    def open_store() -> Any:
        if request.param == "memory":
            return memory
        opened.append(SQLitePermissionStore(str(tmp_path / "relay.sqlite3"), reactor))
        return opened[-1]

    yield open_store
    for store in opened:
        pytest_twisted.blockon(store.close())


@pytest_twisted.ensureDeferred
async def test_bindings_outlive_a_restart_until_they_expire(
    reopen: Callable[[], Any], clock: Clock
) -> None:
    clock.advance(1_800_000_000)  # the registrar's times are POSIX seconds
    first = Registrar(DOMAIN, clock, None, store=reopen())
    await first.handle(register("<sip:alice@192.0.2.1>;q=0.5", expires=600))
    await first.handle(register("<sip:bob@192.0.2.2>", expires=60, to="<sip:bob@example.com>"))
    first.stop()
    assert not first.is_online(AOR)

    clock.advance(120)  # down for two minutes: bob's binding expired meanwhile
    second = Registrar(DOMAIN, clock, None, store=reopen())
    online: list[tuple[str, bool]] = []
    second.add_listener(lambda aor, state: online.append((aor, state)))
    await second.load()
    (binding,) = second.contacts(AOR)
    assert binding.contact.format() == "<sip:alice@192.0.2.1>;q=0.5"
    assert binding.q == 0.5 and binding.remaining_seconds(clock.seconds()) == 480
    assert not second.is_online("sip:bob@example.com")
    assert online == [(AOR, True)] and second.binding_count == 1
    # The refresh after the restart is ordered against the stored Call-ID and CSeq.
    assert status_of(second, register("<sip:alice@192.0.2.1>", cseq=1)).status == 500
    clock.advance(481)
    assert not second.is_online(AOR) and online[-1] == (AOR, False)
    second.stop()

    third = Registrar(DOMAIN, clock, None, store=reopen())
    await third.load()
    assert third.binding_count == 0


@pytest_twisted.ensureDeferred
async def test_a_contact_registered_at_one_node_is_reached_from_another(
    postgres_dsn: str, clock: Clock
) -> None:
    """Two relays sharing one PostgreSQL store: B delivers to the UA registered at A,
    and stops when A removes the binding; A's table is not changed twice."""
    from relayd.consent.postgres import PostgresPermissionStore

    clock.advance(1_800_000_000)
    stores = [PostgresPermissionStore(postgres_dsn, reactor) for _ in range(2)]
    a, b = (Registrar(DOMAIN, clock, None, store=store) for store in stores)
    online: list[tuple[str, bool]] = []
    b.add_listener(lambda aor, state: online.append((aor, state)))

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(500):
            if condition():
                return
            await deferLater(reactor, 0.02, lambda: None)
        raise AssertionError("node B never saw the registration")

    try:
        await until(lambda: all(store.feed.connected.is_set() for store in stores))
        await a.handle(register("<sip:alice@192.0.2.1>;q=0.5", "<sip:alice@192.0.2.2>"))
        await until(lambda: len(b.contacts(AOR)) == 2)
        assert [c.contact.format() for c in b.contacts(AOR)] == [
            "<sip:alice@192.0.2.2>",
            "<sip:alice@192.0.2.1>;q=0.5",
        ]
        assert b.contacts(AOR)[0].remaining_seconds(clock.seconds()) == 3600
        await a.handle(register("<sip:alice@192.0.2.2>;expires=0", cseq=2))
        await until(lambda: len(b.contacts(AOR)) == 1)
        await a.handle(register("*", expires=0, cseq=3))
        await until(lambda: not b.is_online(AOR))
        assert online == [(AOR, True), (AOR, False)]
        assert a.binding_count == b.binding_count == 0
    finally:
        a.stop()
        b.stop()
        for store in stores:
            await store.close()


@pytest.mark.parametrize(
    ("contact", "source", "expected"),
    [
        # The contact is where it registered from (any port): the contact as it is.
        ("sip:bob@192.0.2.1:5070", "UDP 192.0.2.1 40000", None),
        ("sip:bob@[2001:db8::1]:5070", "TCP 2001:db8:0::1 40000", None),
        # Stored before the source was kept: the contact as it is.
        ("sip:bob@198.51.100.9", "", None),
        # Another host (a NAT's private address, a name, someone else's host): back to
        # the address that registered it over UDP...
        ("sip:bob@10.0.0.5:5060", "UDP 192.0.2.1 40000", Target("UDP", "192.0.2.1", 40000)),
        ("sip:bob@victim.example", "UDP 192.0.2.1 40000", Target("UDP", "192.0.2.1", 40000)),
        # ...and not at all over a stream whose connection is gone.
        ("sip:bob@198.51.100.9;transport=tcp", "TLS 192.0.2.1 40000", UNREACHABLE),
    ],
)
def test_a_binding_reaches_no_further_than_where_it_was_registered_from(
    contact: str, source: str, expected: Target | Unreachable | None
) -> None:
    assert registered_route(SIPURI.parse(contact), source) == expected
