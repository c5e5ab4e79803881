"""The README's consent walkthrough with the README's commands: the real daemon on its
defaults (generated certificate and first user, realm and domain ``localhost``; only the
ports are ephemeral), ``relayctl`` for users, list and grant, and baresip (Debian's
``baresip-core``) as alice, who sends, and as bob, who is on the list.

MESSAGE to the list → 407 → 470; alice's ``relayctl consent request`` reading her 470 →
bob's baresip answers the CONSENT 501, the relay's rich consent MESSAGE 415, and shows
its plain-text note with the links; bob's MESSAGE to the allow URI from baresip → alice's
MESSAGE 200 and bob prints it; his MESSAGE to the deny URI → 470 again. Skipped without
baresip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.utils import getProcessOutputAndValue

from relayd.testing import ProcessOutput

from .conftest import deferLater

BARESIP = shutil.which("baresip")

pytestmark = pytest.mark.integration

reactor: Any = _reactor

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
LIST = "sip:friends@localhost"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
# The README's baresip configuration, shared by alice and bob.
BARESIP_CONFIG = (
    "sip_listen 127.0.0.1:0",
    "module_path /usr/lib/baresip/modules",
    "module stdio.so",
    "module_app account.so",
    "module_app contact.so",
    "module_app menu.so",
)
SEND = ["-s", "-e", "/message hello friends"]  # the README's alice, less its -t 2
ALLOW = ["-s", "-e", "/message allow"]  # the README's bob-allow, traced, less its -t 2
ASK = ["consent", "request", "--domain", "localhost", "--user", "alice", "--from-470", "-"]
DELIVERED = b'sip:alice@localhost: "hello friends"'
SECONDS = 30.0  # for a start, a response, a process to end
TAIL = 6000  # bytes of a process's output in a failure's message
LISTENING = re.compile(rb"(SIP|XCAP) listening on (?:udp|ssl):127\.0\.0\.1:(\d+)")
STATUS = re.compile(rb"^SIP/2\.0 (\d{3} [^\r\n]*)", re.MULTILINE)


class Output(ProcessOutput):
    """A child's output, and a wait for what it should print."""

    async def wait(self, found: Callable[[bytes], bool], what: str) -> None:
        """Until ``found(output)`` is true."""
        for _ in range(int(SECONDS / 0.05)):
            if found(bytes(self.output)):
                return
            assert not self.ended.called, f"ended before {what}:\n{self.text(TAIL)}"
            await deferLater(0.05)
        raise AssertionError(f"no {what} within {SECONDS} s:\n{self.text(TAIL)}")


def environment(home: Path, **extra: str) -> dict[str, str]:
    """A HOME of our own: the defaults (data directory, ~/.baresip) live there."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAYCTL_")}
    env.update({"HOME": str(home), "PYTHONPATH": str(ROOT)}, **extra)
    return env


@dataclass
class Relay:
    home: Path
    sip_port: int
    xcap_url: str

    async def relayctl(self, *args: str, **env: str) -> str:
        """relayctl ARGS as in the README; the XCAP port is not the default one."""
        xcap = ["--xcap", self.xcap_url] if args[0] in ("lists", "permissions") else []
        result: tuple[bytes, bytes, int] = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "relayd.ctl.main", *args, *xcap],
            env=environment(self.home, **env),
            path=str(self.home),
        ).addTimeout(SECONDS, reactor)
        out, err, code = result
        assert (code, err) == (0, b""), (args, out, err)
        return out.decode()

    async def relayctl_reading(self, stdin: bytes, *args: str, **env: str) -> str:
        """relayctl ARGS with ``stdin`` piped to it, as the README's ``… | relayctl``."""
        out = Output()
        command = [sys.executable, "-m", "relayd.ctl.main", *args]
        environ = environment(self.home, **env)
        process = reactor.spawnProcess(
            out, sys.executable, command, env=environ, path=str(self.home)
        )
        process.write(stdin)
        process.closeStdin()
        code = await out.ended.addTimeout(SECONDS, reactor)
        assert code == 0, (args, out.text(TAIL))
        return out.output.decode()

    def baresip(self, folder: Path, *args: str) -> tuple[Output, IProcessTransport]:
        """baresip -f FOLDER ARGS, its standard input a pipe kept open (its console)."""
        assert BARESIP is not None
        out = Output()
        command = [BARESIP, "-f", str(folder), *args]
        env = environment(self.home)
        process = reactor.spawnProcess(out, BARESIP, command, env=env, path=str(folder))
        return out, process


@pytest_twisted.async_yield_fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    """``twistd -n msrprelay`` on its defaults but for ephemeral loopback ports."""
    home = tmp_path / "home"
    home.mkdir()
    command = [*TWISTD, "-n", "--pidfile=", "msrprelay", f"--msrp-listen=ssl:0:interface={HOST}"]
    command += [f"--set=xcap.listen=ssl:0:interface={HOST}"]
    command += [f"--set=sip.listen=udp:0:interface={HOST}"]
    out = Output()
    env = environment(home)
    process = reactor.spawnProcess(out, sys.executable, command, env=env, path=str(home))
    try:
        await out.wait(lambda text: len(LISTENING.findall(text)) == 2, "SIP and XCAP listening")
        ports = {kind.decode(): int(port) for kind, port in LISTENING.findall(bytes(out.output))}
        yield Relay(home, ports["SIP"], f"https://{HOST}:{ports['XCAP']}/xcap-root")
    finally:
        if not out.ended.called:
            process.signalProcess("TERM")
        code = await out.ended.addTimeout(SECONDS, reactor)
    # twistd re-raises the signal that stopped it.
    assert code in (0, -signal.SIGTERM), out.text(TAIL)
    assert "Traceback" not in out.output.decode(errors="replace"), out.text(TAIL)


async def send_to_list(relay: Relay, alice: Path) -> tuple[list[str], bytes]:
    """Alice's ``/message`` to the list: the responses she got, in order (a UDP
    retransmission's repeat counted once), and her SIP trace."""
    return await send_message(relay, alice, SEND)


async def send_message(relay: Relay, folder: Path, command: list[str]) -> tuple[list[str], bytes]:
    """``baresip -f FOLDER COMMAND``: the responses to its MESSAGE, as ``send_to_list``."""
    out, process = relay.baresip(folder, *command, "-t", str(int(SECONDS)))

    def final(text: bytes) -> bool:
        return any(not status.startswith(b"407") for status in STATUS.findall(text))

    try:
        await out.wait(final, "final response to the MESSAGE")
    finally:
        if not out.ended.called:
            process.signalProcess("TERM")
        await out.ended.addTimeout(SECONDS, reactor)
    statuses: list[str] = []
    for status in STATUS.findall(bytes(out.output)):
        if not statuses or statuses[-1] != status.decode():
            statuses.append(status.decode())
    return statuses, bytes(out.output)


def account(user: str, password: str, relay: Relay, *params: str) -> str:
    outbound = f'outbound="sip:{HOST}:{relay.sip_port}"'
    return ";".join([f"<sip:{user}@localhost>", f"auth_pass={password}", outbound, *params])


def test_readme_writes_the_tested_baresip_configuration() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for line in BARESIP_CONFIG:
        assert f"'{line}'" in readme, line
    assert f"baresip -f alice {' '.join(SEND[:2])} '{SEND[2]}' -t 2" in readme
    pipe = "2>&1 | grep '^Permission-Missing' | relayctl " + " ".join(ASK)
    assert f"baresip -f alice {' '.join(SEND[:2])} '{SEND[2]}' -t 2 {pipe}" in readme
    assert "sed 's/$/;regint=0/' bob/accounts > bob-allow/accounts" in readme
    assert f"baresip -f bob-allow {ALLOW[1]} '{ALLOW[2]}' -t 2" in readme


@pytest.mark.skipif(BARESIP is None, reason="baresip not on PATH (apt install baresip-core)")
@pytest_twisted.ensureDeferred
async def test_message_to_list_waits_for_consent_then_reaches_the_member(
    tmp_path: Path, relay: Relay
) -> None:
    # 1. Two users.
    passwords = {}
    users_file = relay.home / ".local/state/relayd/users.htdigest"
    for user in ("alice", "bob"):
        out = await relay.relayctl("adduser", "--generate", user)
        added, password = out.splitlines()
        assert added == f"added {user} (realm localhost) in {users_file}"
        passwords[user] = password.removeprefix("password=")
    # 2. A list with bob in it, owned by the generated user.
    out = await relay.relayctl("lists", "add", "friends", "sip:bob@localhost")
    assert out == "added 1 member to friends (new list)\n"
    # 3. A baresip folder each; bob registers.
    folders = {user: tmp_path / user for user in passwords}
    for folder in folders.values():
        folder.mkdir()
        (folder / "config").write_text("\n".join(BARESIP_CONFIG) + "\n", encoding="utf-8")
    (folders["alice"] / "accounts").write_text(
        account("alice", passwords["alice"], relay, "regint=0") + "\n", encoding="utf-8"
    )
    (folders["alice"] / "contacts").write_text(f"<{LIST}>\n", encoding="utf-8")
    (folders["bob"] / "accounts").write_text(
        account("bob", passwords["bob"], relay) + "\n", encoding="utf-8"
    )
    bob, bob_process = relay.baresip(folders["bob"], "-s")
    try:
        await bob.wait(lambda text: b"bob@localhost: {0/UDP/v4} 200 OK" in text, "registration")
        # 4. Alice is challenged, then refused for want of consent; nothing reaches bob.
        statuses, trace = await send_to_list(relay, folders["alice"])
        assert statuses == ["407 Proxy Authentication Required", "470 Consent Needed"], trace
        assert b"Permission-Missing: <sip:consent-" in trace
        assert DELIVERED not in bob.output
        # 5. Alice asks bob, with the Permission-Missing lines of her 470.
        missing = b"".join(re.findall(rb"^Permission-Missing:[^\r\n]*\r?\n", trace, re.M))
        out = await relay.relayctl_reading(
            missing,
            *ASK,
            "--relay",
            f"{HOST}:{relay.sip_port}",
            RELAYCTL_PASSWORD=passwords["alice"],
        )
        assert re.fullmatch(
            r"sip:consent-[^:]+@localhost: 202 Accepted\n  wait-permission: sip:wp-\S+@localhost\n",
            out,
        ), out
        # baresip answers the CONSENT 501 and the MESSAGE of both alternatives 415: bob's
        # console shows the relay's plain-text note with the links.
        note = re.compile(rb'sip:localhost: "sip:alice@localhost asks to send you MESSAGE[^"]*"')
        await bob.wait(
            lambda text: note.search(text) is not None, "the consent note on bob's console"
        )
        shown = note.search(bytes(bob.output))
        assert shown is not None
        assert b"through the list sip:friends@localhost" in shown[0]
        assert re.search(rb"Allow: https://localhost:\d+/consent/grant/", shown[0])
        (allow,) = re.findall(rb"sip:grant-[^ ]+@localhost(?= \(allow\))", shown[0])
        # 6. Bob allows: a MESSAGE to the allow URI from baresip, as the README does it.
        folders["bob-allow"] = answer = tmp_path / "bob-allow"
        answer.mkdir()
        shutil.copy(folders["bob"] / "config", answer / "config")
        # sed 's/$/;regint=0/' bob/accounts > bob-allow/accounts
        bob_account = (folders["bob"] / "accounts").read_text(encoding="utf-8")
        (answer / "accounts").write_text(
            "".join(line + ";regint=0\n" for line in bob_account.splitlines()), encoding="utf-8"
        )
        (answer / "contacts").write_text(f"<{allow.decode()}>\n", encoding="utf-8")
        statuses, trace = await send_message(relay, answer, ALLOW)
        assert statuses == ["200 OK"], trace
        # 7. Delivered: 200 to alice, the message on bob's console.
        statuses, trace = await send_to_list(relay, folders["alice"])
        assert statuses == ["407 Proxy Authentication Required", "200 OK"], trace
        await bob.wait(lambda text: DELIVERED in text, "the message on bob's console")
        # Revoked with the deny URI of the same note (RFC 5360 §5.8): 470 again.
        (deny,) = re.findall(rb"sip:deny-[^ ]+@localhost(?= \(deny\))", shown[0])
        (answer / "contacts").write_text(f"<{deny.decode()}>\n", encoding="utf-8")
        statuses, trace = await send_message(relay, answer, ["-s", "-e", "/message deny"])
        assert statuses == ["200 OK"], trace
        statuses, trace = await send_to_list(relay, folders["alice"])
        assert statuses == ["407 Proxy Authentication Required", "470 Consent Needed"], trace
        assert bob.output.count(DELIVERED) == 1
    finally:
        if not bob.ended.called:
            bob_process.signalProcess("TERM")
        await bob.ended.addTimeout(SECONDS, reactor)
