"""``[relay] workers = 2``: the real daemon as a parent and two worker processes."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, threads

from relayd.consent.sqlite import SQLitePermissionStore
from relayd.consent.vocabulary import CONSENT_RULES_AUID
from relayd.digest import Challenge, answer_challenge, is_stale, read_challenge
from relayd.msrp.client import connect
from relayd.sip.parser import parse_datagram
from relayd.testing import RelayPKI, grant_document, write_users

from .conftest import REALM, USERS, RecordingSink, deferLater, path_to
from .test_consent_flow import ALICE, BOB, LISTS_XML, SOLO, UA, send_message
from .test_consent_flow import REALM as FLOW_REALM
from .test_consent_flow import USERS as FLOW_USERS

pytestmark = pytest.mark.integration

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
MSRP_LISTENING = re.compile(rb"worker (\d+): MSRP listening on ssl:127\.0\.0\.1:(\d+)")
WORKER_STARTED = re.compile(rb"Worker (\d+) started, process (\d+)")


class Parent(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[tuple[int | None, int | None]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback((reason.value.exitCode, reason.value.signal))

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def msrp_ports(self) -> dict[int, int]:
        """The MSRP port each worker logged last (a restarted worker logs again)."""
        return {int(k): int(port) for k, port in MSRP_LISTENING.findall(self.output)}

    def pids(self) -> dict[int, int]:
        return {int(k): int(pid) for k, pid in WORKER_STARTED.findall(self.output)}

    async def logged(self, text: bytes, count: int = 1, seconds: float = 60) -> None:
        for _ in range(int(seconds / 0.05)):
            if self.output.count(text) >= count:
                return
            if self.ended.called:
                break
            await deferLater(0.05)
        raise AssertionError(f"{text!r} not logged {count} times:\n{self.text()}")


def _free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (at the time of asking)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def _write_config(tmp_path: Path, pki: RelayPKI, sip_port: int, xcap_port: int) -> Path:
    cert, key = pki.leaf("127.0.0.1")
    users = write_users(tmp_path / "users.htdigest", REALM, USERS)
    config = tmp_path / "relayd.ini"
    config.write_text(
        f"""[relay]
hostname = 127.0.0.1
data_dir = {tmp_path / "data"}
workers = 2

[msrp]
listen = ssl:0:interface=127.0.0.1

[xcap]
listen = tcp:{xcap_port}:interface=127.0.0.1

[sip]
listen = udp:{sip_port}:interface=127.0.0.1
    tcp:{sip_port}:interface=127.0.0.1

[auth]
realm = {REALM}
users = {users}

[tls]
certificate = {cert}
private_key = {key}
""",
        encoding="utf-8",
    )
    return config


def _options_request(transport: str, local_port: int, branch: str) -> bytes:
    return (
        f"OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:{local_port};branch=z9hG4bK{branch}\r\n"
        "From: <sip:probe@127.0.0.1>;tag=w1\r\nTo: <sip:127.0.0.1>\r\n"
        f"Call-ID: {branch}@127.0.0.1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _sip_options(port: int, branch: str) -> tuple[bytes, bytes]:
    """The first line of the answers to OPTIONS over UDP and over TCP (blocking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(10)
        udp.bind(("127.0.0.1", 0))
        udp.sendto(_options_request("UDP", udp.getsockname()[1], branch), ("127.0.0.1", port))
        over_udp = udp.recv(65536).split(b"\r\n", 1)[0]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as tcp:
        tcp.sendall(_options_request("TCP", tcp.getsockname()[1], branch + "t"))
        over_tcp = tcp.recv(65536).split(b"\r\n", 1)[0]
    return over_udp, over_tcp


def _xcap_get(port: int) -> int:
    """The status of an XCAP GET (blocking)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/xcap-root/xcap-caps/global/index")
        return connection.getresponse().status
    finally:
        connection.close()


def _xcap_digest_on_new_connections(port: int, requests: int) -> list[int]:
    """Authenticated XCAP GETs, each on a new connection (so the kernel spreads them
    over the workers), reusing the last challenge as a client does; the attempts each
    one took (blocking)."""
    path = "/xcap-root/resource-lists/users/sip:alice@127.0.0.1/index"
    challenge: Challenge | None = None
    attempts = []
    for _ in range(requests):
        # Each new connection may land on either worker: a stale answer sends the client
        # on with the nonce of the worker it reached, never to its user for a password.
        for attempt in range(1, 21):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                headers = {}
                if challenge is not None:
                    answer = answer_challenge(
                        challenge, username="alice", password=USERS["alice"], method="GET", uri=path
                    )
                    headers["Authorization"] = answer.authorization
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                response.read()
            finally:
                connection.close()
            if response.status != 401:
                assert response.status in (200, 404), response.status
                attempts.append(attempt)
                break
            header = response.getheader("WWW-Authenticate")
            # Only the first request, or a nonce another worker issued (stale), is refused.
            assert challenge is None or is_stale(header), header
            challenge = read_challenge(header or "")
        else:
            raise AssertionError("no answer after 20 attempts")
    return attempts


async def _surfaces_answer(sip_port: int, xcap_port: int, branch: str) -> None:
    over_udp, over_tcp = await threads.deferToThread(_sip_options, sip_port, branch)
    assert over_udp == b"SIP/2.0 200 OK"
    assert over_tcp == b"SIP/2.0 200 OK"
    assert await threads.deferToThread(_xcap_get, xcap_port) in (200, 401)


async def _message_across_workers(pki: RelayPKI, ports: dict[int, int], message: str) -> None:
    """Alice is a client of worker 0, Bob of worker 1; Alice's SEND reaches Bob."""
    alice_uri = f"msrps://127.0.0.1:{ports[0]};tcp"
    bob_uri = f"msrps://127.0.0.1:{ports[1]};tcp"
    sink = RecordingSink()
    alice = await connect(reactor, alice_uri, pki.ca_pem)
    bob = await connect(reactor, bob_uri, pki.ca_pem, sink_for=lambda request: sink)
    try:
        alice_auth = await defer.Deferred.fromCoroutine(
            alice.auth([alice_uri], "alice", USERS["alice"])
        )
        bob_auth = await defer.Deferred.fromCoroutine(bob.auth([bob_uri], "bob", USERS["bob"]))
        # Each Use-Path names the worker that holds the session.
        assert alice_auth.use_path[-1].startswith(f"msrps://127.0.0.1:{ports[0]}/")
        assert bob_auth.use_path[-1].startswith(f"msrps://127.0.0.1:{ports[1]}/")
        to_path = " ".join([*alice_auth.use_path, *path_to(bob, bob_auth)])
        body = message.encode()
        await defer.Deferred.fromCoroutine(
            alice.send_message(to_path, body, len(body), message_id=message)
        ).addTimeout(15, reactor)
        assert await sink.wait(message) == body
    finally:
        alice.transport.loseConnection()  # type: ignore[union-attr]
        bob.transport.loseConnection()  # type: ignore[union-attr]


async def _send_landing_on_the_other_worker(pki: RelayPKI, ports: dict[int, int]) -> None:
    """A peer that reuses its connection to worker 0 for a URI of worker 1 (as a relay
    reusing connections by certificate does): worker 0 passes the SEND on."""
    bob_uri = f"msrps://127.0.0.1:{ports[1]};tcp"
    sink = RecordingSink()
    bob = await connect(reactor, bob_uri, pki.ca_pem, sink_for=lambda request: sink)
    peer = await connect(reactor, f"msrps://127.0.0.1:{ports[0]};tcp", pki.ca_pem)
    try:
        bob_auth = await defer.Deferred.fromCoroutine(bob.auth([bob_uri], "bob", USERS["bob"]))
        to_path = " ".join(path_to(bob, bob_auth))
        await defer.Deferred.fromCoroutine(
            peer.send_message(to_path, b"landed elsewhere", 16, message_id="landed")
        ).addTimeout(15, reactor)
        assert await sink.wait("landed") == b"landed elsewhere"
    finally:
        bob.transport.loseConnection()  # type: ignore[union-attr]
        peer.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_two_workers_serve_restart_and_stop(tmp_path: Path, pki: RelayPKI) -> None:
    sip_port, xcap_port = _free_port(), _free_port()
    config = _write_config(tmp_path, pki, sip_port, xcap_port)
    parent = Parent()
    process = reactor.spawnProcess(
        parent,
        sys.executable,
        [*TWISTD, "-n", "--pidfile=", "msrprelay", "--config", str(config)],
        env=None,
        path=str(tmp_path),
    )
    try:
        await parent.logged(b"MSRP listening", 2)
        await parent.logged(b"SIP listening on tcp:", 2)
        await parent.logged(b"XCAP listening", 2)
        ports = parent.msrp_ports()
        assert sorted(ports) == [0, 1] and ports[0] != ports[1], parent.text()
        await _surfaces_answer(sip_port, xcap_port, "before")
        await _message_across_workers(pki, ports, "across-1")
        await _send_landing_on_the_other_worker(pki, ports)
        attempts = await threads.deferToThread(_xcap_digest_on_new_connections, xcap_port, 12)
        assert attempts[0] >= 2 and len(attempts) == 12, attempts

        # kill -9 one worker: the parent restarts it, the other keeps serving meanwhile.
        killed = parent.pids()[1]
        os.kill(killed, signal.SIGKILL)
        await parent.logged(b"Worker 1 ended unexpectedly (signal SIGKILL)")
        await _surfaces_answer(sip_port, xcap_port, "during")
        await parent.logged(b"Worker 1 started", 2)
        await parent.logged(b"MSRP listening", 3)
        assert parent.pids()[1] != killed
        await _message_across_workers(pki, parent.msrp_ports(), "across-2")
        await _surfaces_answer(sip_port, xcap_port, "after")
        workers = list(parent.pids().values())
    finally:
        if not parent.ended.called:
            process.signalProcess(signal.SIGTERM)
    code, signal_number = await parent.ended.addTimeout(60, reactor)
    output = parent.text()
    assert code == 0 or signal_number == signal.SIGTERM, output
    assert "Traceback" not in output
    assert output.count("Server Shut Down") == 3, output  # both workers and the parent
    for worker in (0, 1):
        assert f"Worker {worker} stopped cleanly" in output, output
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest_twisted.ensureDeferred
async def test_workers_stop_when_the_parent_is_killed(tmp_path: Path, pki: RelayPKI) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("workers follow their parent with Linux's PR_SET_PDEATHSIG")
    config = _write_config(tmp_path, pki, _free_port(), _free_port())
    parent = Parent()
    process = reactor.spawnProcess(
        parent,
        sys.executable,
        [*TWISTD, "-n", "--pidfile=", "msrprelay", "--config", str(config)],
        env=None,
        path=str(tmp_path),
    )
    try:
        await parent.logged(b"MSRP listening", 2)
        workers = list(parent.pids().values())
        assert len(workers) == 2
    finally:
        process.signalProcess(signal.SIGKILL)
    await parent.ended.addTimeout(30, reactor)
    for _ in range(600):
        alive = []
        for pid in workers:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            # Reaped by init once it has ended: a zombie counts as gone.
            status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if status != "Z":
                alive.append(pid)
        if not alive:
            return
        await deferLater(0.05)
    raise AssertionError(f"workers {alive} outlived their parent")


class _RepliesToSource(protocol.DatagramProtocol):
    """A UA's socket that answers a request where it came from (the relay's Via, with
    rport), as a UA does: the relay's requests come from the sending worker's own
    socket, and the answer must reach that worker."""

    def __init__(self, ua: UA) -> None:
        self.ua = ua
        self.last: tuple[str, int] | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.last = addr
        self.ua.feed(parse_datagram(datagram))


def _ua(user: str, sip_port: int) -> UA:
    ua = UA(user, "UDP", sip_port)
    socket_protocol = _RepliesToSource(ua)
    listening = cast(Any, reactor).listenUDP(0, socket_protocol, interface="127.0.0.1")
    ua.local_port = listening.getHost().port

    def write(data: bytes) -> None:
        answer = data.startswith(b"SIP/2.0 ") and socket_protocol.last is not None
        listening.write(data, socket_protocol.last if answer else ("127.0.0.1", sip_port))

    ua._write = write
    ua._closer = listening.stopListening
    return ua


@pytest_twisted.ensureDeferred
async def test_list_messages_through_either_worker_reach_the_member(
    tmp_path: Path, pki: RelayPKI
) -> None:
    """Bob registers through one worker; alice's MESSAGEs to a list come from new
    sockets, so the kernel hands them to both workers; each worker fans out from its
    own socket and gets bob's 200 back, and knows bob's registration from the store."""
    sip_port, xcap_port = _free_port(), _free_port()
    config = _write_config(tmp_path, pki, sip_port, xcap_port)
    assert FLOW_REALM == REALM
    write_users(tmp_path / "users.htdigest", REALM, FLOW_USERS)  # the flow's passwords
    lists = tmp_path / "lists.xml"
    lists.write_text(LISTS_XML, encoding="utf-8")
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("[sip]\n", f"[sip]\nlists = {lists}\n"), encoding="utf-8")
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    store = SQLitePermissionStore(str(data / "relay.sqlite3"), reactor)
    await store.put_document(CONSENT_RULES_AUID, BOB, "index", grant_document(ALICE, SOLO))
    await store.close()
    parent = Parent()
    process = reactor.spawnProcess(
        parent,
        sys.executable,
        [*TWISTD, "-n", "--pidfile=", "msrprelay", "--config", str(config)],
        env=None,
        path=str(tmp_path),
    )
    uas: list[UA] = []
    try:
        await parent.logged(b"SIP listening on udp:", 2)
        await parent.logged(b"registered contacts restored from the store", 2)
        bob = _ua("bob", sip_port)
        uas.append(bob)
        await bob.register()
        await deferLater(0.5)  # the other worker reads the registration from the store
        for number in range(8):
            alice = _ua("alice", sip_port)
            uas.append(alice)
            text_body = f"hello {number}".encode()
            answer = await send_message(alice, SOLO, text_body)
            assert answer.status == 200, (number, answer)
            assert (await bob.next_request("MESSAGE")).body == text_body
    finally:
        for ua in uas:
            ua.close()
        if not parent.ended.called:
            process.signalProcess(signal.SIGTERM)
    await parent.ended.addTimeout(60, reactor)
    assert "Traceback" not in parent.text()
    assert parent.text().count("SIP requests of this worker leave from udp:127.0.0.1:") == 2
