"""A real user agent's call through a list, on the README's set-up (``readme_relay``):
baresip as alice and as bob, both registered, alice dialling the list from her console.

INVITE to the list → 407 → 470 (bob has not consented, his phone stays silent); bob's
grant → the call rings bob, who answers on his own (``answermode=auto``), the call is
established on both sides and alice hangs up: the ACK and the BYE reach bob through the
relay (its Record-Route). Everything is read from baresip's own output (its console and
its SIP trace, ``-s``). No audio device: the sine source and the audio bridge stand in.
Skipped without baresip.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IProcessTransport

from .readme_relay import (  # noqa: F401 - the fixture
    BARESIP,
    HOST,
    SECONDS,
    STATUS,
    Output,
    Relay,
    account,
    add_users,
    baresip_folder,
    relay,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(BARESIP is None, reason="baresip not on PATH (apt install baresip-core)"),
]

reactor: Any = _reactor

LIST = "sip:friends@localhost"
# Loopback only (SDP and RTP on 127.0.0.1) and audio without hardware: a sine wave as
# the microphone (it takes 48 kHz stereo only), the audio bridge as speaker and ringer;
# G.711 to agree on.
AUDIO = (
    "net_interface 127.0.0.1",
    "module g711.so",
    "module ausine.so",
    "module aubridge.so",
    "audio_source ausine,440",
    "ausrc_srate 48000",
    "ausrc_channels 2",
    "audio_player aubridge,speaker",
    "audio_alert aubridge,ringer",
)
TRACE = re.compile(rb"^UDP 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:(\d+)\r?\n([^\r\n]+)", re.MULTILINE)


def console(process: IProcessTransport, command: str) -> None:
    """A command typed on baresip's console (the stdio module reads its standard input)."""
    process.write(command.encode() + b"\n")


def trace(output: bytes, relay_port: int) -> list[str]:
    """The SIP messages of baresip's trace (``-s``), each as ``"> start-line"`` (sent to
    the relay), ``"< start-line"`` (came from the relay) or ``"? start-line"`` (neither)."""
    out = []
    for source, destination, line in TRACE.findall(output):
        way = ">" if int(destination) == relay_port else "<" if int(source) == relay_port else "?"
        out.append(f"{way} {line.decode()}")
    return out


def contains(needle: str, text: bytes) -> bool:
    return needle.encode() in text


def methods(lines: list[str]) -> list[str]:
    """``"> INVITE sip:…"`` → ``"> INVITE"``, ``"< SIP/2.0 200 OK"`` → ``"< 200"``."""
    return [" ".join(line.replace("SIP/2.0 ", "").split()[:2]) for line in lines]


@pytest_twisted.ensureDeferred
async def test_baresip_calls_a_list_after_consent_bob_answers_alice_hangs_up(
    tmp_path: Path,
    relay: Relay,  # noqa: F811
) -> None:
    # 1. alice and bob, each with a baresip that registers (bob answers by himself);
    #    a list with bob in it.
    passwords = await add_users(relay, "alice", "bob")
    added = await relay.relayctl("lists", "add", "friends", "sip:bob@localhost")
    assert added == "added 1 member to friends (new list)\n"
    alice_folder = baresip_folder(
        tmp_path / "alice", account("alice", passwords["alice"], relay), *AUDIO
    )
    bob_folder = baresip_folder(
        tmp_path / "bob", account("bob", passwords["bob"], relay, "answermode=auto"), *AUDIO
    )
    started: list[tuple[Output, IProcessTransport]] = []
    try:
        bob, bob_process = relay.baresip(bob_folder, "-s")
        started.append((bob, bob_process))
        alice, alice_process = relay.baresip(alice_folder, "-s")
        started.append((alice, alice_process))
        for peer, user in ((alice, "alice"), (bob, "bob")):
            await peer.wait(partial(contains, f"{user}@localhost: {{0/UDP/v4}} 200 OK"), user)

        # 2. alice calls the list: 407, then 470 Consent Needed; bob hears nothing.
        console(alice_process, f"/dial {LIST}")
        refused = f"{LIST}: session closed: 470 Consent Needed".encode()
        await alice.wait(lambda text: refused in text, "the 470")
        statuses = [s.decode() for s in STATUS.findall(bytes(alice.output))]
        assert statuses[-3:] == [
            "407 Proxy Authentication Required",
            "100 Trying",
            "470 Consent Needed",
        ], statuses
        assert b"Permission-Missing: <sip:consent-" in alice.output
        before = len(alice.output)
        assert b"INVITE sip:bob" not in bob.output

        # 3. bob lets alice call him through the list.
        grant = ["bob", "--user", "bob", "--from", "sip:alice@localhost", "--list", LIST]
        grant += ["--methods", "INVITE"]
        await relay.relayctl("permissions", "grant", *grant, RELAYCTL_PASSWORD=passwords["bob"])

        # 4. alice calls again: bob's baresip rings and answers, both are in the call;
        #    alice hangs up and bob's side closes.
        console(alice_process, f"/dial {LIST}")
        await bob.wait(lambda text: b"Call established: sip:alice@localhost" in text, "answered")
        await alice.wait(lambda text: f"Call established: {LIST}".encode() in text, "answered")
        console(alice_process, "/hangup")
        await bob.wait(lambda text: b"session closed" in text, "bob's side closed")
        await alice.wait(lambda text: b"call: terminate call" in text, "alice's side closed")
        assert b"Connection reset by peer" in bob.output
        for peer, closed in ((alice, b"call: terminate call"), (bob, b"session closed")):
            text = bytes(peer.output)
            assert text.index(b"Call established") < text.index(closed), peer.text()

        # 5. Every message of the call crossed the relay, the in-dialog ones along its
        #    Record-Route (bob's contact is reached through it, never directly).
        port = relay.sip_port
        call = methods(trace(bytes(alice.output[before:]), port))
        assert call[:4] == ["> INVITE", "< 407", "> ACK", "> INVITE"], call
        assert [m for m in call[4:] if m != "< 100"] == [
            "< 180",
            "< 200",
            "> ACK",
            "> BYE",
            "< 200",
        ], call
        answered = methods(trace(bytes(bob.output), port))
        assert [m for m in answered if m[2:] not in ("REGISTER", "401", "200")] == [
            "< INVITE",
            "> 180",
            "< ACK",
            "< BYE",
        ], answered
        assert [m for m in answered if m.startswith("? ")] == [], answered
        record_route = f"Record-Route: <sip:{HOST}:{port};lr;rr=".encode()
        assert bob.output.count(record_route) >= 1, bob.text(6000)
    finally:
        for peer, process in started:
            if not peer.ended.called:
                process.signalProcess("TERM")
            await peer.ended.addTimeout(SECONDS, reactor)
