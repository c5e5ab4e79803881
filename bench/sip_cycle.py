"""In-process cost of the SIP consent relay's work, without sockets or SIPp.

Run by hand::

    python -m bench.sip_cycle [--members 10] [--calls 2000] [--repeat 5] [--profile FILE]

The relay stack is the daemon's (``build_service``), driven through its UDP protocol
object with a recording transport and a :class:`~twisted.internet.task.Clock`. Each call
is what SIPp does in ``bench/sip_bench.py``: MESSAGE → 407 → MESSAGE with credentials,
one copy per member answered 200 by the member, then the 200 (or a 470 for the
``stranger`` load) to the sender. Only the time spent inside the relay's
``datagramReceived`` is counted, so the figure is the Python cost of the relay logic;
the socket calls and reactor turns of a real run come on top (``bench/sip_bench.py``
measures those). The output is one JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import sys
import tempfile
import time
from pathlib import Path

from lxml import etree
from twisted.internet.defer import ensureDeferred

from relayd.consent.edits import make_rule, new_ruleset
from relayd.consent.vocabulary import CONSENT_RULES_AUID
from relayd.digest import answer_challenge
from relayd.sip.message import SIPResponse
from relayd.sip.parser import parse_datagram
from relayd.sip.transport import SOURCE_WINDOW_SECONDS
from relayd.tap import tune_garbage_collector
from relayd.testing import in_process_sip_relay

HOST = "127.0.0.1"
REALM = "relayd-test"
SENDER = "alice"
STRANGER = "mallory"
SENDER_PORT = 5070
MEMBER_PORT = 6000


def _request(
    method: str, uri: str, user: str, call: int, cseq: int, extra: str = "", to: str = ""
) -> bytes:
    body = "hello list"
    return (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{SENDER_PORT};rport;branch=z9hG4bK-{call}-{cseq}\r\n"
        f"From: <sip:{user}@{HOST}>;tag={call}\r\n"
        f"To: <{to or uri}>\r\n"
        f"Call-ID: {call}-bench@{HOST}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        "Max-Forwards: 70\r\n"
        f"{extra}"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def _sink_answer(data: bytes) -> bytes:
    """A 200 as SIPp's UAS writes it: every Via on one line, To with a tag.

    Read from the bytes, not with the relay's parser, so that ``bench.instructions``
    counts as little of the bench's own work as it can."""
    rows: dict[bytes, bytes] = {}
    vias: list[bytes] = []
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b": ")
        name = name.lower()
        if name == b"via":
            vias.append(value)
        else:
            rows.setdefault(name, value)
    return (
        b"SIP/2.0 200 OK\r\nVia: %s\r\nFrom: %s\r\nTo: %s;tag=sink\r\nCall-ID: %s\r\n"
        b"CSeq: %s\r\nContent-Length: 0\r\n\r\n"
        % (b", ".join(vias), rows[b"from"], rows[b"to"], rows[b"call-id"], rows[b"cseq"])
    )


class Harness:
    def __init__(self, folder: Path, members: int, metrics: bool = False) -> None:
        self.passwords = {SENDER: "alice-pw", STRANGER: "mallory-pw"}
        self.passwords.update({f"m{i}": f"m{i}-pw" for i in range(members)})
        uris = [f"sip:m{i}@{HOST}" for i in range(members)]
        # With a metrics listener configured (never bound here) the store is timed.
        extra = {("metrics", "listen"): "tcp:9100:interface=127.0.0.1"} if metrics else None
        relay = in_process_sip_relay(folder, HOST, self.passwords, "list", uris, extra)
        self.reactor, self.sip, self.store = relay.reactor, relay.sip, relay.store
        self.udp, self.protocol = relay.wire, relay.protocol
        self.members = [f"m{i}" for i in range(members)]
        self.elapsed = 0.0
        self.datagrams = 0

    def feed(self, data: bytes, port: int) -> list[tuple[bytes, tuple[str, int]]]:
        started = time.thread_time()
        self.protocol.datagramReceived(data, (HOST, port))
        self.elapsed += time.thread_time() - started
        self.datagrams += 1
        return self.udp.take()

    def setup(self) -> None:
        for i, member in enumerate(self.members):
            uri = f"sip:{HOST}"
            contact = f"Contact: <sip:{member}@{HOST}:{MEMBER_PORT + i}>\r\nExpires: 3600\r\n"
            aor = f"sip:{member}@{HOST}"
            first = self.feed(_request("REGISTER", uri, member, i, 1, contact, aor), SENDER_PORT)
            challenge = _header(first, "www-authenticate")
            auth = answer_challenge(
                challenge,
                method="REGISTER",
                uri=uri,
                username=member,
                password=self.passwords[member],
            ).authorization
            extra = contact + f"Authorization: {auth}\r\n"
            answer = self.feed(_request("REGISTER", uri, member, i, 2, extra, aor), SENDER_PORT)
            assert _status(answer) == 200, answer
            ruleset = new_ruleset()
            ruleset.append(make_rule("bench", f"sip:{SENDER}@{HOST}", f"sip:list@{HOST}"))
            body = etree.tostring(ruleset, xml_declaration=True, encoding="UTF-8")
            ensureDeferred(
                self.store.put_document(CONSENT_RULES_AUID, f"sip:{member}@{HOST}", "index", body)
            )
        self.elapsed = 0.0
        self.datagrams = 0

    def call(self, n: int, user: str) -> int:
        """One sender call; returns the final status the sender got."""
        uri = f"sip:list@{HOST}"
        first = self.feed(_request("MESSAGE", uri, user, n, 1), SENDER_PORT)
        auth = answer_challenge(
            _header(first, "proxy-authenticate"),
            method="MESSAGE",
            uri=uri,
            username=user,
            password=self.passwords[user],
        ).authorization
        extra = f"Proxy-Authorization: {auth}\r\n"
        out = self.feed(_request("MESSAGE", uri, user, n, 2, extra), SENDER_PORT)
        final: list[tuple[bytes, tuple[str, int]]] = []
        for data, (_, port) in out:
            if port == SENDER_PORT:
                final.append((data, (HOST, port)))
                continue
            final += self.feed(_sink_answer(data), port)
        if n % 20 == 0:
            # Time passes (200 calls a second) so transaction timers run, in steps no
            # longer than the per-source budget's window: every call comes from one
            # address, which a second-long step would hold to 100 datagrams.
            self.reactor.advance(SOURCE_WINDOW_SECONDS)
        return _status(final)


def _parsed(sent: list[tuple[bytes, tuple[str, int]]]) -> SIPResponse:
    assert len(sent) == 1, sent
    response = parse_datagram(sent[0][0])
    assert isinstance(response, SIPResponse)
    return response


def _status(sent: list[tuple[bytes, tuple[str, int]]]) -> int:
    return _parsed(sent).status


def _header(sent: list[tuple[bytes, tuple[str, int]]], name: str) -> str:
    value = _parsed(sent).headers.get(name)
    assert value is not None, sent
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sip_cycle", description=__doc__)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--stranger", action="store_true", help="unpermitted sender: 470s")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs")
    parser.add_argument("--profile", default=None, help="cProfile stats to this file")
    parser.add_argument("--metrics", action="store_true", help="with [metrics] listen set")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relayd-sip-cycle-") as folder:
        harness = Harness(Path(folder), args.members, args.metrics)
        harness.setup()
        tune_garbage_collector()  # as twistd's makeService does
        user = STRANGER if args.stranger else SENDER
        want = 470 if args.stranger else 200
        for n in range(50):  # warm caches the way a steady load has them warm
            harness.call(1_000_000 + n, user)
        profile = cProfile.Profile() if args.profile else None
        best: tuple[float, int] | None = None
        wrong = 0
        for run in range(1 if profile is not None else args.repeat):
            harness.elapsed = 0.0
            harness.datagrams = 0
            if profile is not None:
                profile.enable()
            first = run * args.calls
            statuses = [harness.call(n, user) for n in range(first, first + args.calls)]
            if profile is not None:
                profile.disable()
                profile.dump_stats(args.profile)
            wrong += sum(1 for s in statuses if s != want)
            if best is None or harness.elapsed < best[0]:
                best = (harness.elapsed, harness.datagrams)
        assert best is not None
        elapsed, datagrams = best
        delivered = 0 if args.stranger else args.calls * args.members
        per = elapsed / (args.calls if args.stranger else delivered) * 1e6
        print(
            json.dumps(
                {
                    "bench": "sip_cycle",
                    "members": args.members,
                    "calls": args.calls,
                    "load": "470" if args.stranger else "relay",
                    "metrics": args.metrics,
                    "wrong_final_status": wrong,
                    "repeat": args.repeat,
                    "datagrams_in": datagrams,
                    "relay_us_per_" + ("470" if args.stranger else "delivered"): round(per, 1),
                    "relay_us_per_datagram": round(elapsed / datagrams * 1e6, 1),
                }
            )
        )
        return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
