"""The README's set-up, shared by the tests that follow it: the real daemon on its
defaults (generated certificate and first user, realm and domain ``localhost``; only the
ports are ephemeral), ``relayctl`` as the README runs it, and baresip (Debian's
``baresip-core``) with the README's configuration, driven through its console."""

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

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.utils import getProcessOutputAndValue

from relayd.testing import ProcessOutput

from .conftest import deferLater

BARESIP = shutil.which("baresip")

reactor: Any = _reactor

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
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


async def add_users(relay: Relay, *users: str) -> dict[str, str]:
    """``relayctl adduser --generate`` for each: their generated passwords."""
    passwords = {}
    users_file = relay.home / ".local/state/relayd/users.htdigest"
    for user in users:
        out = await relay.relayctl("adduser", "--generate", user)
        added, password = out.splitlines()
        assert added == f"added {user} (realm localhost) in {users_file}"
        passwords[user] = password.removeprefix("password=")
    return passwords


def account(user: str, password: str, relay: Relay, *params: str) -> str:
    outbound = f'outbound="sip:{HOST}:{relay.sip_port}"'
    return ";".join([f"<sip:{user}@localhost>", f"auth_pass={password}", outbound, *params])


def baresip_folder(folder: Path, accounts: str, *config: str) -> Path:
    """A baresip configuration folder: the README's config (and ``config``), one
    accounts line."""
    folder.mkdir()
    lines = [*BARESIP_CONFIG, *config]
    (folder / "config").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "accounts").write_text(accounts + "\n", encoding="utf-8")
    return folder
