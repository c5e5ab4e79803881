"""The seed's figure 2 end to end: the real daemon (``twistd -n msrprelay``) with SIPp as
the sender and as every list member, over UDP and over TCP.

SIPp signs every ``[authentication]`` of a run with one digest uri (``-auth_uri``), and
relayd holds the digest uri to the Request-URI (RFC 2617 §3.2.2.5), so the sender is one
SIPp run per Request-URI, each fed the URI the previous run logged (``<log>`` actions,
``-trace_logs``): list → 470 consent URIs → CONSENT → 202 wait-permission URI →
SUBSCRIBE. Each member is a SIPp UAS that runs throughout (``sipp/list_member.xml``),
registered by a short UAC run (SIPp's server mode cannot send the REGISTER itself). The
recipient's HTTP side (the PUT of a permission document to the Permission URI its UAS
was given, the DELETE that revokes it) is this test.

A SIPp run that fails (wrong or missing response or header, a ``check_it`` regexp,
its ``-timeout``) fails the test with SIPp's own error output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.task import deferLater

from relayd.consent.vocabulary import CONSENT_POLICY_NAMESPACE as CR
from relayd.consent.vocabulary import RESOURCE_LISTS_NAMESPACE as RL
from relayd.sip.consent import parse_trigger_consent
from relayd.testing import ProcessOutput, RelayPKI, grant_document, write_users

from .conftest import Capability

SIPP = shutil.which("sipp")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(SIPP is None, reason="sipp not on PATH (apt install sip-tester)"),
    pytest.mark.skipif(not Path("/proc/net/udp").exists(), reason="needs Linux /proc/net"),
]

reactor: Any = _reactor

HOST = "127.0.0.1"
REALM = "relayd-test"
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
MEMBERS = ("bob", "carol")
LIST = f"sip:friends@{HOST}"
SENDER = "alice"
ALICE = f"sip:{SENDER}@{HOST}"
SCENARIOS = Path(__file__).parent / "sipp"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
SIPP_SECONDS = 10  # a sender run's -timeout
MEMBER_SECONDS = 30  # a member's -timeout: the whole flow
START_SECONDS = 30.0  # for the daemon to listen
WAIT = 5.0  # for a log line, a stopped process

LISTS_XML = f"""<?xml version="1.0" encoding="UTF-8"?>
<resource-lists xmlns="{RL}" xmlns:cr="{CR}">
  <list name="friends" cr:owner="{ALICE}">
    <entry uri="sip:bob@{HOST}"/>
    <entry uri="sip:carol@{HOST}"/>
  </list>
  <list name="callees" cr:owner="{ALICE}">
    <entry uri="sip:bob@{HOST}"/>
  </list>
</resource-lists>
"""


# -- the daemon ---------------------------------------------------------------------------


@dataclass
class Relay:
    process: IProcessTransport
    out: ProcessOutput
    ports: dict[str, int]
    xcap: Capability


LISTENING = re.compile(rb"(SIP|XCAP) listening on (udp|tcp|ssl):127\.0\.0\.1:(\d+)")


@pytest_twisted.async_yield_fixture
async def relay(tmp_path: Path, pki: RelayPKI) -> AsyncIterator[Relay]:
    cert, key = pki.leaf(HOST)
    lists = tmp_path / "lists.xml"
    lists.write_text(LISTS_XML, encoding="utf-8")
    config = tmp_path / "relayd.ini"
    config.write_text(
        f"[relay]\nhostname = {HOST}\ndata_dir = {tmp_path / 'data'}\n\n"
        f"[msrp]\nlisten = tcp:0:interface={HOST}\n\n"
        f"[xcap]\nlisten = ssl:0:interface={HOST}\n\n"
        f"[sip]\nlisten = udp:0:interface={HOST}\n  tcp:0:interface={HOST}\nlists = {lists}\n\n"
        f"[store]\nbackend = memory\n\n"
        f"[auth]\nrealm = {REALM}\nusers = {write_users(tmp_path / 'users', REALM, USERS)}\n\n"
        f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n",
        encoding="utf-8",
    )
    out = ProcessOutput()
    command = [*TWISTD, "-n", "--pidfile=", "msrprelay", "--config", str(config)]
    process = reactor.spawnProcess(out, sys.executable, command, env=None, path=str(tmp_path))
    ports: dict[str, int] = {}
    for _ in range(int(START_SECONDS / 0.05)):
        for match in LISTENING.finditer(out.output):
            ports[match.group(2).decode()] = int(match.group(3))
        if len(ports) == 3 or out.ended.called:
            break
        await deferLater(reactor, 0.05, lambda: None)
    try:
        assert len(ports) == 3, "relayd did not start:\n" + out.text()
        yield Relay(process, out, ports, Capability(pki.ca_pem))
    finally:
        if not out.ended.called:
            process.signalProcess("TERM")
        code = await out.ended.addTimeout(WAIT * 3, reactor)
        (tmp_path / "relayd.log").write_bytes(out.output)  # kept for a failure's post-mortem
    # twistd re-raises the signal that stopped it.
    assert code in (0, -signal.SIGTERM), out.text()
    assert "Traceback" not in out.output.decode(errors="replace"), out.text(20000)


# -- SIPp ---------------------------------------------------------------------------------


@dataclass
class SIPp:
    """One SIPp process in its own folder (its -trace_logs, -trace_msg, -trace_err files)."""

    name: str
    folder: Path
    process: IProcessTransport
    out: ProcessOutput

    def logged(self) -> list[str]:
        """The lines of the scenario's ``<log>`` actions so far."""
        path = self.folder / "log.txt"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def report(self, why: str) -> str:
        def tail(name: str, size: int = 4000) -> str:
            path = self.folder / name
            return path.read_text(errors="replace")[-size:] if path.exists() else ""

        return (
            f"SIPp {self.name}: {why}\n--- errors\n{tail('errors.txt')}\n"
            f"--- messages (tail)\n{tail('messages.txt')}\n--- output\n{self.out.text()}"
        )

    async def finished(self) -> list[str]:
        """Its ``<log>`` lines once it has exited 0; its own error output otherwise."""
        code = await self.out.ended.addTimeout(SIPP_SECONDS + WAIT, reactor)
        assert code == 0, self.report(f"exit status {code}")
        return self.logged()

    async def stop(self) -> list[str]:
        """SIGUSR1: no new calls, exit once the current ones end (a member's 500 ms)."""
        if not self.out.ended.called:
            self.process.signalProcess(signal.SIGUSR1)
        return await self.finished()

    async def wait_logged(self, prefix: str, count: int = 1) -> list[str]:
        """Until ``count`` logged lines start with ``prefix``; those lines."""
        for _ in range(int(WAIT / 0.02)):
            lines = [line for line in self.logged() if line.startswith(prefix)]
            if len(lines) >= count:
                return lines
            assert not self.out.ended.called, self.report(f"ended before logging {prefix!r}")
            await deferLater(reactor, 0.02, lambda: None)
        raise AssertionError(self.report(f"no {count} x {prefix!r} within {WAIT} s"))


def free_port(transport: str) -> int:
    kind = socket.SOCK_DGRAM if transport == "u1" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def bound(port: int, transport: str) -> bool:
    """Is a socket bound (UDP) or listening (TCP) on HOST:port? From /proc, without
    touching the port (a probe bind could race SIPp's own)."""
    table, listening = ("udp", None) if transport == "u1" else ("tcp", "0A")
    local = f"0100007F:{port:04X}"
    for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and (listening is None or fields[3] == listening):
            return True
    return False


@dataclass
class Players:
    """Starts SIPp processes against the relay, one folder each."""

    root: Path
    transport: str
    relay_port: int
    started: list[SIPp] = field(default_factory=list)

    def start(
        self,
        name: str,
        scenario: str,
        *args: str,
        port: int | None = None,
        seconds: int = SIPP_SECONDS,
    ) -> SIPp:
        assert SIPP is not None
        folder = self.root / name
        folder.mkdir()
        command = [SIPP, "-sf", str(SCENARIOS / scenario), "-t", self.transport, "-i", HOST]
        command += ["-p", str(port or free_port(self.transport))]
        command += ["-nostdin", "-timeout", f"{seconds}s", "-timeout_error"]
        command += ["-trace_logs", "-log_file", "log.txt", "-trace_msg"]
        command += ["-message_file", "messages.txt", "-trace_err", "-error_file", "errors.txt"]
        out = ProcessOutput()
        process = reactor.spawnProcess(
            out, SIPP, [*command, *args], env=dict(os.environ), path=str(folder)
        )
        player = SIPp(name, folder, process, out)
        self.started.append(player)
        return player

    def uac(self, name: str, scenario: str, user: str, auth_uri: str, *args: str) -> SIPp:
        """A run as ``user`` (digest as that user, with that digest uri) to the relay."""
        return self.start(
            name,
            scenario,
            f"{HOST}:{self.relay_port}",
            *("-key", "sender", user, "-au", user, "-ap", USERS[user]),
            *("-auth_uri", auth_uri.removeprefix("sip:"), "-m", "1", *args),
        )

    async def member(self, user: str, scenario: str = "list_member.xml") -> SIPp:
        """The member's UAS, up and registered at the relay with digest."""
        port = free_port(self.transport)
        uas = self.start(user, scenario, port=port, seconds=MEMBER_SECONDS)
        for _ in range(int(WAIT / 0.02)):
            if bound(port, self.transport):
                break
            assert not uas.out.ended.called, uas.report("did not start")
            await deferLater(reactor, 0.02, lambda: None)
        register = self.start(
            f"{user}-register",
            "member_register.xml",
            f"{HOST}:{self.relay_port}",
            *("-s", user, "-key", "contact_port", str(port)),
            *("-au", user, "-ap", USERS[user], "-m", "1"),
        )
        await register.finished()
        return uas

    async def message(self, name: str) -> str:
        """alice → the list (407, credentials): the final answer's log line."""
        (line,) = await self.uac(
            name, "consent_sender.xml", SENDER, LIST, "-s", "friends"
        ).finished()
        return line

    def stop_all(self) -> None:
        for player in self.started:
            if not player.out.ended.called:
                player.process.signalProcess("KILL")


@pytest_twisted.async_yield_fixture
async def players(
    relay: Relay, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Players]:
    transport: str = request.param
    root = tmp_path / f"sipp-{transport}"
    root.mkdir()
    cast = Players(root, transport, relay.ports["udp" if transport == "u1" else "tcp"])
    yield cast
    cast.stop_all()
    for player in cast.started:
        await player.out.ended.addTimeout(WAIT, reactor)


def uris(line: str) -> list[str]:
    return re.findall(r"<([^>]+)>", line)


@pytest.mark.parametrize("players", ["u1", "t1"], indirect=True, ids=["udp", "tcp"])
@pytest_twisted.ensureDeferred
async def test_sipp_sender_and_members_through_consent(relay: Relay, players: Players) -> None:
    # 1. The members' UAS run throughout, registered.
    members = {user: await players.member(user) for user in MEMBERS}

    # 2. MESSAGE to the list: 470, one consent URI per member (Permission-Missing).
    first = await players.message("message-1")
    assert first.startswith("470 "), first
    consent = uris(first)
    assert len(consent) == 2 and all(uri.startswith("sip:consent-") for uri in consent)
    assert re.findall(r'"([^"]+)" <', first) == [f"sip:{user}@{HOST}" for user in MEMBERS]

    # 3. CONSENT to each: 202 with a wait-permission URI. The relay forwards a CONSENT to
    #    the member with a Permission URI and Trigger-Consent (the consent URI).
    wait_uri: dict[str, str] = {}
    for number, target in enumerate(consent, 1):
        run = players.uac(
            f"consent-{number}",
            "consent_request.xml",
            SENDER,
            target,
            *("-key", "consent", target, "-key", "methods", "MESSAGE"),
        )
        (accepted,) = await run.finished()
        assert accepted.startswith("202 sip:wp-"), accepted
        wait_uri[target] = accepted.split(" ", 1)[1]
    permission: dict[str, str] = {}
    wait: dict[str, str] = {}
    for user, uas in members.items():
        (line,) = await uas.wait_logged("CONSENT ")
        _, url, trigger = line.split(" ", 2)
        assert re.fullmatch(
            rf"https://{HOST}:{relay.ports['ssl']}/xcap-root/consent-rules/users/"
            rf"sip:{user}@{HOST}/p-[\w-]{{22,}}\.xml",
            url,
        ), line
        assert trigger.endswith(f';target-uri="{LIST}"'), line
        permission[user] = url
        wait[user] = wait_uri[parse_trigger_consent(trigger).uri.format()]

    # 4. SUBSCRIBE wait-permission per member: NOTIFY pending; the member PUTs its
    #    permission document to the Permission URI; NOTIFY granted.
    watchers = {
        user: players.uac(f"wait-{user}", "wait_permission.xml", SENDER, uri, "-key", "wait", uri)
        for user, uri in wait.items()
    }
    for user, watcher in watchers.items():
        await watcher.wait_logged("NOTIFY pending")
        assert await relay.xcap.call("PUT", permission[user], grant_document(ALICE, LIST)) == 201
    for watcher in watchers.values():
        assert await watcher.finished() == ["NOTIFY pending", "NOTIFY granted"]

    # 5. MESSAGE again: 200; every member got it once, with P-Asserted-Identity and
    #    Trigger-Consent (their presence is checked by the member's scenario).
    assert await players.message("message-2") == "200"
    for user, uas in members.items():
        (line,) = await uas.wait_logged("MESSAGE ")
        identity, trigger = line.split(" ", 2)[1:]
        assert identity == f"<{ALICE}>", line
        target = parse_trigger_consent(trigger).uri.format()
        assert wait_uri[target] == wait[user] and trigger.endswith(f';target-uri="{LIST}"'), line

    # 6. bob revokes (DELETE): the next MESSAGE gets 470 naming bob alone, relays nothing;
    #    a new wait-permission subscription tells alice at once.
    assert await relay.xcap.call("DELETE", permission["bob"]) == 200
    third = await players.message("message-3")
    assert third.startswith("470 ") and len(uris(third)) == 1, third
    assert wait_uri[uris(third)[0]] == wait["bob"]
    again = players.uac(
        "wait-again", "wait_permission.xml", SENDER, wait["bob"], "-key", "wait", wait["bob"]
    )
    assert await again.finished() == ["NOTIFY revoked"]

    # 7. The members stop cleanly (every call passed): one CONSENT and one MESSAGE each.
    for user, uas in members.items():
        lines = await uas.stop()
        assert [line.split(" ", 1)[0] for line in lines] == ["CONSENT", "MESSAGE"], (user, lines)
