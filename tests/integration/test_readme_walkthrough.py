"""The README's consent walkthrough with the README's commands: the real daemon on its
defaults (generated certificate and first user, realm and domain ``localhost``; only the
ports are ephemeral), ``relayctl`` for users, list and grant, and baresip (Debian's
``baresip-core``) as alice, who sends, and as bob, who is on the list.

MESSAGE to the list → 407 → 470; bob's grant → 200 and bob prints the message; the
revocation → 470 again. Skipped without baresip.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from .readme_relay import (  # noqa: F401 - the fixture
    BARESIP,
    BARESIP_CONFIG,
    ROOT,
    SECONDS,
    STATUS,
    Relay,
    account,
    add_users,
    baresip_folder,
    relay,
)

pytestmark = pytest.mark.integration

reactor: Any = _reactor

LIST = "sip:friends@localhost"
SEND = ["-s", "-e", "/message hello friends"]  # the README's alice, less its -t 2
DELIVERED = b'sip:alice@localhost: "hello friends"'


async def send_to_list(daemon: Relay, alice: Path) -> tuple[list[str], bytes]:
    """Alice's ``/message`` to the list: the responses she got, in order (a UDP
    retransmission's repeat counted once), and her SIP trace."""
    out, process = daemon.baresip(alice, *SEND, "-t", str(int(SECONDS)))

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


def test_readme_writes_the_tested_baresip_configuration() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for line in BARESIP_CONFIG:
        assert f"'{line}'" in readme, line
    assert f"baresip -f alice {' '.join(SEND[:2])} '{SEND[2]}' -t 2" in readme


@pytest.mark.skipif(BARESIP is None, reason="baresip not on PATH (apt install baresip-core)")
@pytest_twisted.ensureDeferred
async def test_message_to_list_waits_for_consent_then_reaches_the_member(
    tmp_path: Path,
    relay: Relay,  # noqa: F811
) -> None:
    # 1. Two users.
    passwords = await add_users(relay, "alice", "bob")
    # 2. A list with bob in it, owned by the generated user.
    out = await relay.relayctl("lists", "add", "friends", "sip:bob@localhost")
    assert out == "added 1 member to friends (new list)\n"
    # 3. A baresip folder each; bob registers.
    folders = {
        "alice": baresip_folder(
            tmp_path / "alice", account("alice", passwords["alice"], relay, "regint=0")
        ),
        "bob": baresip_folder(tmp_path / "bob", account("bob", passwords["bob"], relay)),
    }
    (folders["alice"] / "contacts").write_text(f"<{LIST}>\n", encoding="utf-8")
    bob, bob_process = relay.baresip(folders["bob"])
    try:
        await bob.wait(lambda text: b"bob@localhost: {0/UDP/v4} 200 OK" in text, "registration")
        # 4. Alice is challenged, then refused for want of consent; nothing reaches bob.
        statuses, trace = await send_to_list(relay, folders["alice"])
        assert statuses == ["407 Proxy Authentication Required", "470 Consent Needed"], trace
        assert b"Permission-Missing: <sip:consent-" in trace
        assert DELIVERED not in bob.output
        # 5. Bob grants.
        grant = ["bob", "--user", "bob", "--from", "sip:alice@localhost", "--list", LIST]
        out = await relay.relayctl(
            "permissions", "grant", *grant, RELAYCTL_PASSWORD=passwords["bob"]
        )
        assert re.fullmatch(
            r"added rule grant-alice-[0-9a-f]+: sip:alice@localhost may reach "
            r"sip:bob@localhost via sip:friends@localhost\n",
            out,
        ), out
        # 6. Delivered: 200 to alice, the message on bob's console.
        statuses, trace = await send_to_list(relay, folders["alice"])
        assert statuses == ["407 Proxy Authentication Required", "200 OK"], trace
        await bob.wait(lambda text: DELIVERED in text, "the message on bob's console")
        # Revoked: 470 again.
        out = await relay.relayctl(
            "permissions", "revoke", *grant, RELAYCTL_PASSWORD=passwords["bob"]
        )
        assert out == "revoked 1 rule of sip:bob@localhost\n"
        statuses, trace = await send_to_list(relay, folders["alice"])
        assert statuses == ["407 Proxy Authentication Required", "470 Consent Needed"], trace
        assert bob.output.count(DELIVERED) == 1
    finally:
        if not bob.ended.called:
            bob_process.signalProcess("TERM")
        await bob.ended.addTimeout(SECONDS, reactor)
