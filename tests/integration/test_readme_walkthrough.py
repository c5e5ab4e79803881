"""The README's consent walkthrough with the README's commands: the real daemon on its
defaults (generated certificate and first user, realm and domain ``localhost``; only the
ports are ephemeral), ``relayctl`` for users, list and consent, and baresip (Debian's
``baresip-core``) as alice, who sends, and as bob, who is on the list.

MESSAGE to the list → 407 → 470; alice's ``relayctl consent request`` reading her 470 →
bob's baresip answers the CONSENT 501, the relay's rich consent MESSAGE 415, and shows
its plain-text note with the links; bob's MESSAGE to the allow URI from baresip → alice's
MESSAGE 200 and bob prints it; his MESSAGE to the deny URI → 470 again. Skipped without
baresip.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from .readme_relay import (  # noqa: F401 - the fixture
    BARESIP,
    BARESIP_CONFIG,
    HOST,
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
ALLOW = ["-s", "-e", "/message allow"]  # the README's bob-allow, traced, less its -t 2
ASK = ["consent", "request", "--domain", "localhost", "--user", "alice", "--from-470", "-"]
DELIVERED = b'sip:alice@localhost: "hello friends"'


async def send_to_list(daemon: Relay, alice: Path) -> tuple[list[str], bytes]:
    """Alice's ``/message`` to the list: the responses she got, in order (a UDP
    retransmission's repeat counted once), and her SIP trace."""
    return await send_message(daemon, alice, SEND)


async def send_message(daemon: Relay, folder: Path, command: list[str]) -> tuple[list[str], bytes]:
    """``baresip -f FOLDER COMMAND``: the responses to its MESSAGE, as ``send_to_list``."""
    out, process = daemon.baresip(folder, *command, "-t", str(int(SECONDS)))

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
    pipe = "2>&1 | grep '^Permission-Missing' | relayctl " + " ".join(ASK)
    assert f"baresip -f alice {' '.join(SEND[:2])} '{SEND[2]}' -t 2 {pipe}" in readme
    assert "sed 's/$/;regint=0/' bob/accounts > bob-allow/accounts" in readme
    assert f"baresip -f bob-allow {ALLOW[1]} '{ALLOW[2]}' -t 2" in readme


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
        answer = tmp_path / "bob-allow"
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
        # Revoked with the deny URI of the same note (RFC 5360 §5.6): 470 again.
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
