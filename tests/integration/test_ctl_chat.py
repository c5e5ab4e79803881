"""``relayctl chat`` end to end over loopback: REGISTER, INVITE with an MSRP offer whose
a=path runs through the relay (RFC 4975 §8, RFC 4976 §5.1), lines both ways as SENDs
through the MSRP relay, BYE; and a call to a list without everyone's consent is 470
naming who is missing."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, task
from twisted.internet import reactor as _reactor

from relayd.consent.vocabulary import CONSENT_RULES_AUID
from relayd.ctl import sdp
from relayd.ctl.chat import ChatAccess, queued_lines, run_chat
from relayd.ctl.network import RelayAccess
from relayd.ctl.settings import Credentials, CtlError
from relayd.ctl.sipua import CallRefused, SIPUserAgent
from relayd.testing import RelayPKI, consent_rule, consent_ruleset, grant_document

from .conftest import USERS as CONFTEST_USERS
from .conftest import RelayFactory
from .test_consent_flow import (  # noqa: F401 - start is the fixture
    ALICE,
    BOB,
    CAROL,
    HOST,
    LIST,
    SOLO,
    TIMEOUT,
    USERS,
    Running,
    Start,
    start,
)
from .test_ctl import RELAYCTL, ROOT, environment
from .test_ctl import access as ctl_access

pytestmark = pytest.mark.integration

reactor: Any = _reactor


class Screen(io.StringIO):
    """A terminal's output that a test can wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: list[tuple[str, defer.Deferred[None]]] = []

    def write(self, text: str) -> int:
        written = super().write(text)
        for wanted, waiter in list(self.waiters):
            if wanted in self.getvalue() and not waiter.called:
                self.waiters.remove((wanted, waiter))
                waiter.callback(None)
        return written

    async def shows(self, wanted: str) -> None:
        if wanted in self.getvalue():
            return
        waiter: defer.Deferred[None] = defer.Deferred()
        self.waiters.append((wanted, waiter))
        try:
            await waiter.addTimeout(TIMEOUT, reactor)
        except defer.TimeoutError:
            raise AssertionError(f"{wanted!r} not shown; screen: {self.getvalue()!r}") from None


async def _access(relay: Running, user: str) -> ChatAccess:
    ports = await relay.service.getServiceNamed("msrp").listening.addTimeout(TIMEOUT, reactor)
    msrp = f"msrps://{HOST}:{ports[0].getHost().port};tcp"
    credentials = Credentials(user, USERS[user])
    return ChatAccess(RelayAccess([msrp], credentials, relay.ca_pem), (HOST, relay.udp_port), HOST)


class Terminal:
    """One side of a chat: typed lines in, the screen and the error stream out."""

    def __init__(self) -> None:
        self.typed: defer.DeferredQueue[str | None] = defer.DeferredQueue()
        self.out = Screen()
        self.err = Screen()

    def run(
        self, access: ChatAccess, target: str | None, save_dir: Path | None = None
    ) -> defer.Deferred[None]:
        lines = queued_lines(self.typed)
        return defer.Deferred.fromCoroutine(
            run_chat(reactor, access, target, lines, self.out, self.err, 10, save_dir)
        )


@pytest_twisted.ensureDeferred
async def test_a_chat_call_carries_a_line_each_way_through_the_relays_then_bye(
    start: Start,  # noqa: F811
) -> None:
    relay = await start()
    alice, bob = Terminal(), Terminal()
    answering = bob.run(await _access(relay, "bob"), None)
    await bob.out.shows(f"Waiting for a call to {BOB}")
    calling = alice.run(await _access(relay, "alice"), BOB)
    await alice.out.shows(f"Connected to {BOB}")
    await bob.out.shows(f"Connected to {ALICE}")

    alice.typed.put("hello bob, ünïcode too")
    await bob.out.shows(f"{ALICE}: hello bob, ünïcode too\n")
    bob.typed.put("")  # an empty line sends nothing
    bob.typed.put("hi alice")
    await alice.out.shows(f"{BOB}: hi alice\n")

    alice.typed.put(None)  # Ctrl-D: BYE
    await calling.addTimeout(TIMEOUT, reactor)
    await bob.out.shows(f"{ALICE} hung up\n")
    await answering.addTimeout(TIMEOUT, reactor)
    assert f"{BOB}: \n" not in alice.out.getvalue()
    assert alice.err.getvalue() == bob.err.getvalue() == ""
    # Both unregistered on the way out: bob is no longer reachable.
    assert not relay.sip.registrar.is_online(BOB)
    assert not relay.sip.registrar.is_online(ALICE)


@pytest_twisted.ensureDeferred
async def test_a_call_to_a_list_without_everyones_consent_names_who_is_missing(
    start: Start,  # noqa: F811
) -> None:
    relay = await start()
    store = relay.service.getServiceNamed("xcap").store
    await store.put_document(
        CONSENT_RULES_AUID, BOB, "index", consent_ruleset(consent_rule("a", ALICE, LIST))
    )
    alice = Terminal()
    with pytest.raises(CtlError) as refused:
        await alice.run(await _access(relay, "alice"), LIST).addTimeout(TIMEOUT, reactor)
    text = str(refused.value)
    assert text.startswith(f"{LIST}: 470 ")
    assert f"missing: {CAROL} (sip:" in text
    assert BOB not in text
    assert "CONSENT (Consent-Methods: INVITE)" in text


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest_twisted.ensureDeferred
async def test_after_consent_a_call_carries_lines_and_a_1_mib_file_each_way_bit_exact(
    start: Start,  # noqa: F811
    tmp_path: Path,
) -> None:
    """INVITE → 470 → consent granted → INVITE → 180/200/ACK → a SEND each way, then
    ``/file`` each way as its own session (RFC 5547) through the MSRP relay → BYE."""
    relay = await start()
    alice_dir, bob_dir = tmp_path / "alice", tmp_path / "bob"
    alice_dir.mkdir()
    bob_dir.mkdir()
    there = os.urandom(1 << 20)
    back = os.urandom(1 << 20)
    (alice_dir / "there.bin").write_bytes(there)
    (bob_dir / "back.bin").write_bytes(back)
    (bob_dir / "there.bin").write_bytes(b"bob's own file, never overwritten")
    bob = Terminal()
    answering = bob.run(await _access(relay, "bob"), None, bob_dir)
    await bob.out.shows(f"Waiting for a call to {BOB}")

    refused = Terminal()
    with pytest.raises(CtlError, match=f"^{SOLO}: 470 .*missing: sip:consent-"):
        await refused.run(await _access(relay, "alice"), SOLO).addTimeout(TIMEOUT, reactor)
    store = relay.service.getServiceNamed("xcap").store
    await store.put_document(CONSENT_RULES_AUID, BOB, "index", grant_document(ALICE, SOLO))

    alice = Terminal()
    calling = alice.run(await _access(relay, "alice"), SOLO, alice_dir)
    await alice.out.shows(f"Ringing {SOLO}\n")
    await alice.out.shows(f"Connected to {SOLO}")
    await bob.out.shows(f"Connected to {ALICE}")
    alice.typed.put("hello bob")
    await bob.out.shows(f"{ALICE}: hello bob\n")
    bob.typed.put("hello alice")
    await alice.out.shows(f"{SOLO}: hello alice\n")

    alice.typed.put(f"/file {alice_dir / 'there.bin'}")
    await bob.out.shows(f"received there.bin as {bob_dir / 'there-1.bin'}: 1048576 bytes")
    await alice.out.shows(f"sent there.bin: 1048576 bytes, SHA-256 {_sha256(there)}\n")
    assert (bob_dir / "there-1.bin").read_bytes() == there
    assert f"SHA-256 {_sha256(there)}\n" in bob.out.getvalue()
    assert (bob_dir / "there.bin").read_bytes() == b"bob's own file, never overwritten"

    bob.typed.put(f"/file {bob_dir / 'back.bin'}")
    await alice.out.shows(f"received back.bin as {alice_dir / 'back.bin'}: 1048576 bytes")
    await bob.out.shows(f"sent back.bin: 1048576 bytes, SHA-256 {_sha256(back)}\n")
    assert (alice_dir / "back.bin").read_bytes() == back
    assert f"SHA-256 {_sha256(back)}\n" in alice.out.getvalue()

    alice.typed.put(None)  # Ctrl-D: BYE
    await calling.addTimeout(TIMEOUT, reactor)
    await bob.out.shows(f"{ALICE} hung up\n")
    await answering.addTimeout(TIMEOUT, reactor)
    for side in (alice, bob):  # the progress summary, and nothing else
        assert side.err.getvalue().startswith("sent 1048576 bytes (1.0 MiB) in "), side.err
        assert side.err.getvalue().count("\n") == 1, side.err
    assert sorted(p.name for p in bob_dir.iterdir()) == ["back.bin", "there-1.bin", "there.bin"]


async def _offer_file(relay: Running, user: str, name: str) -> int:
    """The status a file offer named ``name`` from ``user`` (a bare user agent) gets
    from bob, through the relay."""
    ua = SIPUserAgent(reactor, (HOST, relay.udp_port), Credentials(user, USERS[user]), HOST)
    ua.start()
    selector = sdp.FileSelector(name, "application/octet-stream", 3, None, sdp.new_transfer_id())
    offer = sdp.build(
        [f"msrps://{HOST}:2855/offer;tcp"], (selector.content_type,), "sendonly", selector
    )
    try:
        dialog = await defer.Deferred.fromCoroutine(ua.invite(BOB, offer)).addTimeout(
            TIMEOUT, reactor
        )
    except CallRefused as refused:
        return refused.status
    finally:
        await ua.close()
    raise AssertionError(f"the offer was taken: {dialog}")


@pytest_twisted.ensureDeferred
async def test_during_a_call_file_offers_from_others_or_with_a_path_are_refused(
    start: Start,  # noqa: F811
    tmp_path: Path,
) -> None:
    relay = await start()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    bob = Terminal()
    answering = bob.run(await _access(relay, "bob"), None, inbox)
    await bob.out.shows(f"Waiting for a call to {BOB}")
    alice = Terminal()
    calling = alice.run(await _access(relay, "alice"), BOB, tmp_path / "unused")
    with pytest.raises(CtlError, match=r"--save-dir .*unused: not a directory"):
        await calling.addTimeout(TIMEOUT, reactor)
    calling = alice.run(await _access(relay, "alice"), BOB)
    await bob.out.shows(f"Connected to {ALICE}")

    assert await _offer_file(relay, "carol", "hello.txt") == 403  # not the peer of the call
    assert await _offer_file(relay, "alice", "../escape.txt") == 488
    await bob.err.shows(
        "file not received: refused file name '../escape.txt': it names a directory"
    )
    assert list(inbox.iterdir()) == []
    alice.typed.put("/file /nonexistent/file.bin")
    await alice.err.shows("file not sent: cannot read /nonexistent/file.bin: No such file")

    alice.typed.put(None)
    await calling.addTimeout(TIMEOUT, reactor)
    await answering.addTimeout(TIMEOUT, reactor)


# -- the command as a user runs it -------------------------------------------------------------


class ChatProcess(protocol.ProcessProtocol):
    """``relayctl chat`` in a child process: its stdin, and its output to wait on."""

    def __init__(self) -> None:
        self.out = Screen()
        self.err = b""
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.write(data.decode(errors="replace"))

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def type(self, line: str) -> None:
        assert self.transport is not None
        self.transport.write(line.encode() + b"\n")

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


def _spawn(*args: str, home: Path) -> tuple[ChatProcess, Any]:
    child = ChatProcess()
    process = reactor.spawnProcess(
        child,
        sys.executable,
        [sys.executable, *RELAYCTL, "chat", *args],
        env=environment(home),
        path=str(ROOT),
    )
    return child, process


async def _relay_options(start_relay: RelayFactory) -> list[str]:
    """A relay with SIP listening, and the relayctl chat options that name it."""
    relay = await start_relay()
    sip = relay.service.getServiceNamed("sip")
    await sip.listening.addTimeout(TIMEOUT, reactor)
    return ["--via", relay.uri, "--sip", f"{HOST}:{sip.port_of('udp')}"]


def _kill_left(children: list[tuple[ChatProcess, Any]]) -> None:
    """Kill every relayctl a test left running (it failed before they ended)."""
    for child, process in children:
        if not child.ended.called:
            process.signalProcess("KILL")


@pytest_twisted.ensureDeferred
async def test_relayctl_chat_answer_and_call_exchange_lines_and_hang_up_on_ctrl_d(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    where = await _relay_options(start_relay)
    bob, bob_process = _spawn("--answer", *where, *ctl_access(tmp_path, pki, "bob"), home=tmp_path)
    children = [(bob, bob_process)]
    try:
        await bob.out.shows(f"Waiting for a call to {BOB}")
        alice, alice_process = _spawn(
            "bob", *where, *ctl_access(tmp_path, pki, "alice"), home=tmp_path
        )
        children.append((alice, alice_process))
        await alice.out.shows(f"Connected to {BOB}")
        await bob.out.shows(f"Connected to {ALICE}")
        alice.type("hello from a terminal")
        await bob.out.shows(f"{ALICE}: hello from a terminal\n")
        bob.type("and back")
        await alice.out.shows(f"{BOB}: and back\n")
        alice_process.closeStdin()  # Ctrl-D
        assert await alice.ended.addTimeout(TIMEOUT, reactor) == 0, alice.err
        await bob.out.shows(f"{ALICE} hung up\n")
        assert await bob.ended.addTimeout(TIMEOUT, reactor) == 0, bob.err
    finally:
        _kill_left(children)


@pytest_twisted.ensureDeferred
async def test_relayctl_chat_interrupted_with_ctrl_c_hangs_up_with_bye(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    where = await _relay_options(start_relay)
    bob, bob_process = _spawn("--answer", *where, *ctl_access(tmp_path, pki, "bob"), home=tmp_path)
    children = [(bob, bob_process)]
    try:
        await bob.out.shows(f"Waiting for a call to {BOB}")
        alice, alice_process = _spawn(
            f"sip:bob@{HOST}", *where, *ctl_access(tmp_path, pki, "alice"), home=tmp_path
        )
        children.append((alice, alice_process))
        await bob.out.shows(f"Connected to {ALICE}")
        alice_process.signalProcess("INT")
        assert await alice.ended.addTimeout(TIMEOUT, reactor) == 130
        assert alice.err.decode().strip() == "relayctl: interrupted"
        await bob.out.shows(f"{ALICE} hung up\n")
        assert await bob.ended.addTimeout(TIMEOUT, reactor) == 0, bob.err
    finally:
        _kill_left(children)


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_one_clear_error_before_any_msrp(
    start: Start,  # noqa: F811
) -> None:
    relay = await start()
    access = await _access(relay, "alice")
    wrong = ChatAccess(
        RelayAccess(access.msrp.relays, Credentials("alice", "nope"), relay.ca_pem),
        access.sip,
        access.domain,
    )
    alice = Terminal()
    with pytest.raises(CtlError, match=r"refused our credentials for alice .* wrong user name"):
        await alice.run(wrong, BOB).addTimeout(TIMEOUT, reactor)
    assert len(relay.service.getServiceNamed("msrp").relay.core.sessions) == 0  # no AUTH made


@pytest_twisted.ensureDeferred
async def test_relayctl_chat_interrupted_while_ringing_cancels_the_call(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    relay = await start_relay()
    sip = relay.service.getServiceNamed("sip")
    await sip.listening.addTimeout(TIMEOUT, reactor)
    bob_credentials = Credentials("bob", CONFTEST_USERS["bob"])
    bob = SIPUserAgent(reactor, (HOST, sip.port_of("udp")), bob_credentials, HOST)
    socket = reactor.listenUDP(0, bob, interface=HOST)
    alice: ChatProcess | None = None
    try:
        await defer.Deferred.fromCoroutine(bob.register()).addTimeout(TIMEOUT, reactor)
        ringing = defer.Deferred.fromCoroutine(bob.incoming(TIMEOUT))
        where = ["--via", relay.uri, "--sip", f"{HOST}:{sip.port_of('udp')}"]
        alice, alice_process = _spawn(
            "bob", *where, *ctl_access(tmp_path, pki, "alice"), home=tmp_path
        )
        invite = await ringing  # bob never answers
        alice_process.signalProcess("INT")
        assert await alice.ended.addTimeout(TIMEOUT, reactor) == 130
        for _ in range(50):
            if invite.call_id in bob.cancelled:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        assert bob.cancelled == {invite.call_id}
    finally:
        if alice is not None and not alice.ended.called:
            alice_process.signalProcess("KILL")
        await socket.stopListening()
