"""A pool of relayd processes on one PostgreSQL database act as one relay (RFC 4976 §8).

Each node is a real ``twistd -n msrprelay`` process on its own loopback address
(127.0.0.2, .3, .4), so that a node can be killed with SIGKILL mid-write.  They share
the users, the lists and the store; each names itself in its Use-Path URIs.  What a
client acknowledged as written (a 2xx) must be readable at every other node afterwards,
whichever node or database went away meanwhile.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.names import dns, error

from relayd.consent.vocabulary import CONSENT_RULES_MIME_TYPE as POLICY_TYPE
from relayd.msrp.client import MSRPClientProtocol, connect
from relayd.msrp.uri import MSRPURI
from relayd.sip.parser import parse_datagram
from relayd.testing import RelayPKI, consent_ruleset, write_users
from relayd.xcap.client import XCAPClient, XCAPClientError, document_path

from .conftest import USERS as RELAY_USERS
from .conftest import Capability, RecordingSink, RelayFactory, path_to
from .test_consent_flow import (
    HOST,
    LISTS_XML,
    REALM,
    SOLO,
    UA,
    USERS,
    ask_consent,
    call_info_uri,
    consent_uris,
    grant_document,
    rule,
    send_message,
    status_entries,
    subscribe,
)
from .test_twistd_process import TWISTD

pytestmark = pytest.mark.integration

reactor: Any = _reactor

NODES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
POOL_NAME = "relay.pool.test"
START_TIMEOUT = 60.0
TIMEOUT = 15.0
PG_BIN = Path("/usr/lib/postgresql/15/bin")

_LISTENING = re.compile(rb"(MSRP|XCAP|SIP) listening on (\w+):([0-9.]+):(\d+)")


class NodeProcess(protocol.ProcessProtocol):
    """One node's output, the ports it bound and when it ended."""

    def __init__(self) -> None:
        self.output = b""
        self.ports: dict[str, int] = {}
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[tuple[int | None, int | None]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for match in _LISTENING.finditer(self.output):
            kind = f"{match.group(1).decode().lower()}-{match.group(2).decode()}"
            self.ports.setdefault(kind, int(match.group(4)))
        if {"msrp-ssl", "xcap-ssl", "sip-udp"} <= self.ports.keys() and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback((reason.value.exitCode, reason.value.signal))


@dataclass
class Node:
    host: str
    daemon: NodeProcess
    process: Any
    ca_pem: bytes
    uas: list[UA] = field(default_factory=list)

    @property
    def msrp_uri(self) -> str:
        return f"msrps://{self.host}:{self.daemon.ports['msrp-ssl']};tcp"

    @property
    def xcap_root(self) -> str:
        return f"https://{self.host}:{self.daemon.ports['xcap-ssl']}/xcap-root"

    @property
    def sip_port(self) -> int:
        return self.daemon.ports["sip-udp"]

    @property
    def running(self) -> bool:
        return not self.daemon.ended.called

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when the machine dies."""
        self.process.signalProcess(signal.SIGKILL)

    def xcap(self, user: str) -> XCAPClient:
        return XCAPClient(
            self.xcap_root, user, USERS[user], self.ca_pem, reactor, timeout_seconds=TIMEOUT
        )


StartNode = Callable[..., Awaitable[Node]]


@pytest_twisted.async_yield_fixture
async def start_node(tmp_path: Path, pki: RelayPKI) -> AsyncIterator[StartNode]:
    """Start a node on a loopback address with the given PostgreSQL DSN."""
    nodes: list[Node] = []
    users = write_users(tmp_path / "users.htdigest", REALM, USERS)
    lists = tmp_path / "lists.xml"
    lists.write_text(LISTS_XML, encoding="utf-8")

    async def factory(host: str, dsn: str) -> Node:
        folder = tmp_path / f"node-{host}-{len(nodes)}"
        folder.mkdir()
        # Its own name, and the pool's: clients verify either (RFC 4976 §8, App. A).
        cert, key = pki.leaf(host, POOL_NAME)
        config = folder / "relayd.ini"
        config.write_text(
            f"""[relay]
hostname = {host}
data_dir = {folder / "data"}

[msrp]
listen = ssl:0:interface={host}
ca_certificates = {pki.ca_path}

[xcap]
listen = ssl:0:interface={host}

[sip]
listen = udp:0:interface={host}
domain = {HOST}
lists = {lists}

[auth]
realm = {REALM}
users = {users}

[tls]
certificate = {cert}
private_key = {key}

[store]
backend = postgresql
dsn = {dsn}
""",
            encoding="utf-8",
        )
        daemon = NodeProcess()
        process = reactor.spawnProcess(
            daemon,
            sys.executable,
            [*TWISTD, "-n", "--pidfile=", "msrprelay", "--config", str(config)],
            env=None,
            path=str(folder),
        )
        node = Node(host, daemon, process, pki.ca_pem)
        nodes.append(node)
        await daemon.ready.addTimeout(START_TIMEOUT, reactor)
        return node

    yield factory
    for node in nodes:
        for ua in node.uas:
            ua.close()
        if node.running:
            node.process.signalProcess(signal.SIGTERM)
    for node in nodes:
        await node.daemon.ended.addTimeout(START_TIMEOUT, reactor)
        assert b"Traceback" not in node.daemon.output, node.daemon.output.decode(errors="replace")


# -- SIP user agents at a node ----------------------------------------------------------


class _NodeUDP(DatagramProtocol):
    """A UA's socket: requests go to its home node, answers to whoever asked."""

    def __init__(self, ua: UA, home: tuple[str, int]) -> None:
        self.ua = ua
        self.home = home
        self.reply_to: tuple[str, int] | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.reply_to = addr
        try:
            self.ua.feed(parse_datagram(datagram))
        finally:
            self.reply_to = None

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data, self.reply_to or self.home)


def ua_at(user: str, node: Node) -> UA:
    """A UDP UA on 127.0.0.1 whose relay is ``node``."""
    ua = UA(user, "UDP", node.sip_port)
    udp = _NodeUDP(ua, (node.host, node.sip_port))
    listening = reactor.listenUDP(0, udp, interface=HOST)
    ua.local_port = listening.getHost().port
    ua._write = udp.write
    ua._closer = listening.stopListening
    node.uas.append(ua)
    return ua


async def wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(int(TIMEOUT / 0.05)):
        if await check():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting until {what}")


async def online_at(node: Node, ua: UA) -> None:
    """Until ``node`` knows that ``ua`` registered (at another node): an OPTIONS to its
    address there is 200, not 480 (RFC 3261 §11, §16.5)."""
    probe = ua_at("carol", node)
    answers: list[int] = []
    for _ in range(int(TIMEOUT / 0.05)):
        answers.append((await probe.request("OPTIONS", ua.aor, to=f"<{ua.aor}>")).status)
        if answers[-1] == 200:
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert answers[-1] == 200, f"{ua.aor} not reachable through {node.host}: {answers[-3:]}"


# -- the flows ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_three_nodes_a_grant_at_b_releases_a_message_at_a_and_notifies_c(
    postgres_dsn: str, start_node: StartNode
) -> None:
    """A list MESSAGE at node A gets 470; bob grants through node B's XCAP; alice's
    wait-permission subscription held by node C gets the NOTIFY; A then relays."""
    a, b, c = [await start_node(host, postgres_dsn) for host in NODES]
    bob = ua_at("bob", b)
    await bob.register()
    alice = ua_at("alice", a)
    await online_at(a, bob)
    refused = await send_message(alice, SOLO)
    assert refused.status == 470, refused
    (target,) = consent_uris(refused)
    accepted = await ask_consent(alice, target)
    assert accepted.status == 202, accepted
    forwarded = await bob.next_request("CONSENT")
    watcher = ua_at("alice", c)
    waiting, pending = await subscribe(watcher, call_info_uri(accepted))
    assert [e["state"] for e in status_entries(pending)] == ["pending"]

    permission = (forwarded.headers.get("permission") or "")[1:-1]
    assert permission.startswith(f"https://{a.host}:"), permission  # minted at A
    at_b = f"{b.xcap_root.split('/xcap-root')[0]}/{permission.split('/', 3)[3]}"
    assert await Capability(b.ca_pem).call("PUT", at_b, grant_document(target=SOLO)) == 201
    granted = await watcher.next_request("NOTIFY", waiting.call_id)
    assert [e["state"] for e in status_entries(granted)] == ["granted"]
    # Each node applies the grant when its own change feed brings it: A may do so a
    # few milliseconds after C, and answers 470 until then, never a wrong delivery.
    answers: list[int] = []
    for _ in range(int(TIMEOUT / 0.05)):
        answers.append((await send_message(alice, SOLO, b"through node A")).status)
        if answers[-1] != 470:
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert answers[-1] == 200 and set(answers) <= {470, 200}, answers
    assert (await bob.next_request("MESSAGE")).body == b"through node A"


@pytest_twisted.ensureDeferred
async def test_sixteen_mebibytes_between_clients_of_different_nodes(
    postgres_dsn: str, start_node: StartNode, pki: RelayPKI
) -> None:
    """Alice AUTHs at node A, bob at node B; each Use-Path names its own node, and A
    forwards alice's 16 MiB to B over mutual TLS, intact (SHA-256)."""
    a = await start_node(NODES[0], postgres_dsn)
    b = await start_node(NODES[1], postgres_dsn)
    sink = RecordingSink(keep=False)
    alice = await connect(reactor, a.msrp_uri, pki.ca_pem)
    bob = await connect(reactor, b.msrp_uri, pki.ca_pem, sink_for=lambda request: sink)
    alice_auth = await defer.Deferred.fromCoroutine(
        alice.auth([a.msrp_uri], "alice", USERS["alice"])
    ).addTimeout(TIMEOUT, reactor)
    bob_auth = await defer.Deferred.fromCoroutine(
        bob.auth([b.msrp_uri], "bob", USERS["bob"])
    ).addTimeout(TIMEOUT, reactor)
    assert alice_auth.use_path[0].startswith(f"msrps://{a.host}:")
    assert bob_auth.use_path[0].startswith(f"msrps://{b.host}:")

    data = os.urandom(16 * 1024 * 1024)
    to_path = " ".join([*alice_auth.use_path, *path_to(bob, bob_auth)])
    arrived = sink.wait("big", timeout=120)
    sent = await defer.Deferred.fromCoroutine(
        alice.send_message(to_path, data, len(data), chunk_bytes=1024 * 1024, message_id="big")
    ).addTimeout(120, reactor)
    assert sent.message_id == "big"
    await arrived
    assert sink.counts["big"] == len(data)
    assert sink.digests["big"].hexdigest() == hashlib.sha256(data).hexdigest()
    for protocol_ in (alice, bob):
        protocol_.transport.loseConnection()  # type: ignore[union-attr]


def _document(index: int) -> tuple[str, bytes]:
    """A consent-rules document of its own: one rule for a sender of its own (not alice,
    whose pending consent some tests watch)."""
    sender = f"sip:writer{index}@{HOST}"
    return f"w{index}.xml", consent_ruleset(rule(f"r{index}", sender, SOLO, "deny"))


@dataclass
class Writes:
    """What a writer got: the documents acknowledged (2xx), and every other outcome."""

    acknowledged: dict[str, bytes] = field(default_factory=dict)
    refused: list[tuple[int, Sequence[str]]] = field(default_factory=list)
    failed: int = 0


async def write_until(
    client: XCAPClient,
    user: str,
    prefix: str,
    writes: Writes,
    stop: Callable[[], bool],
    workers: int = 4,
) -> None:
    """PUT new documents of ``user``, ``workers`` at a time, until ``stop()``."""
    numbers = iter(range(1_000_000))

    async def worker() -> None:
        while not stop():
            index = next(numbers)
            name, body = _document(index)
            name = f"{prefix}-{name}"
            path = document_path(client.root, "consent-rules", f"sip:{user}@{HOST}", name)
            try:
                response = await client.put(path, body, POLICY_TYPE)
            except XCAPClientError:
                writes.failed += 1
                await deferLater(reactor, 0.02, lambda: None)
                continue
            if 200 <= response.status < 300:
                writes.acknowledged[path] = body
            else:
                writes.refused.append(
                    (response.status, response.headers.getRawHeaders("Retry-After") or [])
                )
                await deferLater(reactor, 0.02, lambda: None)

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker()) for _ in range(workers)], consumeErrors=True
    )


async def assert_readable(client: XCAPClient, writes: Writes) -> None:
    for path, body in writes.acknowledged.items():
        response = await client.get(path)
        assert response.status == 200, (path, response.status)
        assert response.body == body, path


@pytest_twisted.ensureDeferred
async def test_kill_9_of_a_node_while_another_serves_loses_no_acknowledged_write(
    postgres_dsn: str, start_node: StartNode
) -> None:
    a = await start_node(NODES[0], postgres_dsn)
    b = await start_node(NODES[1], postgres_dsn)
    at_a, at_b, reader = a.xcap("alice"), b.xcap("bob"), b.xcap("alice")
    written_a, written_b = Writes(), Writes()
    b_done = False
    writing_b = defer.Deferred.fromCoroutine(
        write_until(at_b, "bob", "b", written_b, lambda: b_done)
    )
    writing_a = defer.Deferred.fromCoroutine(
        write_until(at_a, "alice", "a", written_a, lambda: not a.running)
    )
    try:
        await wait_until(
            _returns(lambda: len(written_a.acknowledged) >= 40), "node A acknowledged writes"
        )
        a.kill()
        assert (await a.daemon.ended.addTimeout(TIMEOUT, reactor))[1] == signal.SIGKILL
        await writing_a.addTimeout(TIMEOUT * 2, reactor)
        # B went on serving while A died: still more acknowledged after.
        await grows(lambda: len(written_b.acknowledged), 20, "node B goes on")
    finally:
        b_done = True
        await writing_b.addTimeout(TIMEOUT * 2, reactor)
    assert written_b.refused == [] and written_b.failed == 0
    assert len(written_a.acknowledged) >= 40
    await assert_readable(reader, written_a)
    await assert_readable(b.xcap("bob"), written_b)
    for client in (at_a, at_b, reader):
        await client.close()


async def grows(count: Callable[[], int], by: int, what: str) -> None:
    """Until ``count()`` went up by ``by`` from now."""
    start = count()
    await wait_until(_returns(lambda: count() >= start + by), what)


def _returns(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def checked() -> bool:
        return check()

    return checked


# -- a PostgreSQL of the test's own, to restart under load ---------------------------------


@dataclass
class Cluster:
    """A throwaway PostgreSQL cluster, owned by the ``postgres`` system user."""

    directory: Path
    port: int

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres connect_timeout=3"

    @property
    def log(self) -> str:
        return str(self.directory / "server.log")

    def pg_ctl(self, *args: str) -> None:
        _as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.directory / "data"), "-w", "-t", "60", *args
        )


def _as_postgres(*command: str) -> None:
    result = subprocess.run(
        ["/usr/sbin/runuser", "-u", "postgres", "--", *command],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {(result.stdout + result.stderr).decode()}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A cluster of its own: the shared server must never be restarted by a test."""
    if os.geteuid() != 0:
        pytest.skip("restarting a PostgreSQL of the test's own needs root (to run it as postgres)")
    if not (PG_BIN / "initdb").exists() or not Path("/usr/sbin/runuser").exists():
        pytest.skip(f"no PostgreSQL server binaries at {PG_BIN} (or no runuser)")
    try:
        import pwd

        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres system user to run a PostgreSQL of the test's own")
    # Outside pytest's 0700 tmp directory, which the postgres user cannot enter.
    directory = Path(tempfile.mkdtemp(prefix="relayd-pg-"))
    os.chown(directory, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    made = Cluster(directory, port)
    data = str(directory / "data")
    _as_postgres(str(PG_BIN / "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "-N")
    # In its configuration, not on pg_ctl's command line: a plain start after a stop
    # takes the same settings.
    with open(directory / "data" / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write(
            f"port = {port}\nlisten_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{directory}'\nfsync = on\n"
        )
    made.pg_ctl("start", "-l", made.log)
    try:
        yield made
    finally:
        try:
            made.pg_ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_database_restarted_under_load_loses_nothing_acknowledged(
    cluster: Cluster, start_node: StartNode
) -> None:
    """Two nodes write while the database stops (fast, then immediate: a crash) and
    comes back.  Requests meanwhile get 503 with Retry-After; every acknowledged write
    is there afterwards; the wait-permission subscription at A outlives the outages
    (its NOTIFYs meanwhile are put off, not ended) and hears of a grant written at B
    right after one more restart, typically before A's change feed has reconnected, so
    that A learns of it by catching up on the changes table."""
    a = await start_node(NODES[0], cluster.dsn)
    b = await start_node(NODES[1], cluster.dsn)
    bob = ua_at("bob", b)
    await bob.register()
    alice = ua_at("alice", a)
    await online_at(a, bob)
    refused = await send_message(alice, SOLO)
    assert refused.status == 470, refused
    (target,) = consent_uris(refused)
    accepted = await ask_consent(alice, target)
    assert accepted.status == 202, accepted
    forwarded = await bob.next_request("CONSENT")
    waiting, pending = await subscribe(alice, call_info_uri(accepted))
    assert [e["state"] for e in status_entries(pending)] == ["pending"]

    at_a, at_b = a.xcap("alice"), b.xcap("bob")
    written_a, written_b = Writes(), Writes()
    done = False
    writing = [
        defer.Deferred.fromCoroutine(write_until(at_a, "alice", "a", written_a, lambda: done)),
        defer.Deferred.fromCoroutine(write_until(at_b, "bob", "b", written_b, lambda: done)),
    ]

    def acknowledged() -> int:
        return len(written_a.acknowledged) + len(written_b.acknowledged)

    def refusals() -> int:
        return len(written_a.refused) + len(written_b.refused)

    try:
        for mode in ("fast", "immediate"):
            await grows(acknowledged, 20, "writes before")
            await deferToThread(cluster.pg_ctl, "stop", "-m", mode)
            await grows(refusals, 4, "503s while down")
            await deferToThread(cluster.pg_ctl, "start", "-l", cluster.log)
            await grows(acknowledged, 20, "writes after")
    finally:
        done = True
        await defer.gatherResults(writing, consumeErrors=True).addTimeout(TIMEOUT * 2, reactor)

    refused_codes = written_a.refused + written_b.refused
    assert refused_codes, "no request met the outage"
    for status, retry_after in refused_codes:
        assert status == 503, refused_codes
        assert retry_after and retry_after[0].isdigit(), refused_codes
    reader = b.xcap("alice")
    await assert_readable(reader, written_a)
    await assert_readable(at_b, written_b)

    # A's feed reconnects with back-off (0.5 s, then doubling); B's store connection is
    # reopened by the first request, so the grant is written at B at once.
    await deferToThread(cluster.pg_ctl, "restart", "-m", "fast", "-l", cluster.log)
    permission = (forwarded.headers.get("permission") or "")[1:-1]
    at_b_url = f"{b.xcap_root.split('/xcap-root')[0]}/{permission.split('/', 3)[3]}"
    capability = Capability(b.ca_pem, timeout=TIMEOUT)
    code = 503
    for _ in range(int(TIMEOUT / 0.1)):
        code = await capability.call("PUT", at_b_url, grant_document(target=SOLO))
        if code != 503:
            break
        await deferLater(reactor, 0.1, lambda: None)
    assert code == 201
    granted = await alice.next_request("NOTIFY", waiting.call_id)
    assert [e["state"] for e in status_entries(granted)] == ["granted"]
    assert (await send_message(alice, SOLO, b"after the restarts")).status == 200
    for client in (at_a, at_b, reader):
        await client.close()


# -- clients find the pool's nodes by DNS SRV (RFC 4976 §8) --------------------------------


class PoolResolver:
    """A twisted.names IResolver with the pool's SRV records only (no DNS is asked)."""

    def __init__(self, records: list[tuple[int, int, int, str]]) -> None:
        self.records = records
        self.asked: list[str] = []

    def lookupService(self, name: str) -> defer.Deferred[Any]:
        self.asked.append(name)
        if name != f"_msrps._tcp.{POOL_NAME}":
            return defer.fail(error.DNSNameError(name))
        answers = [
            dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(p, w, port, target))
            for p, w, port, target in self.records
        ]
        return defer.succeed((answers, [], []))


async def auth_at_pool(
    resolver: PoolResolver, pki: RelayPKI, user: str, sink: RecordingSink | None = None
) -> tuple[MSRPClientProtocol, list[str]]:
    """Connect as a client given only the pool's name, and AUTH to that name."""
    pool_uri = f"msrps://{POOL_NAME};tcp"
    protocol = await connect(
        reactor,
        pool_uri,
        pki.ca_pem,
        sink_for=(lambda request: sink) if sink else None,
        resolver=resolver,
    )
    result = await defer.Deferred.fromCoroutine(
        protocol.auth([pool_uri], user, RELAY_USERS[user])
    ).addTimeout(TIMEOUT, reactor)
    return protocol, list(result.use_path)


@pytest_twisted.ensureDeferred
async def test_clients_given_the_pool_name_reach_a_node_by_srv_and_get_its_use_path(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    """The SRV records order the nodes (RFC 2782): the first that answers takes the AUTH
    addressed to the pool's name, and its Use-Path names that node (RFC 4976 App. A), so
    the peer's requests reach the node holding the session."""
    pool = {("msrp", "pool_names"): POOL_NAME}
    a = await start_relay(NODES[0], extra=pool, alt_names=(POOL_NAME,))
    b = await start_relay(NODES[1], extra=pool, alt_names=(POOL_NAME,))
    dead = _free_port_at(NODES[2])  # a node that is down: nothing listens there
    first_a = PoolResolver([(10, 1, a.port, a.host), (20, 1, b.port, b.host)])
    alice, alice_path = await auth_at_pool(first_a, pki, "alice")
    assert first_a.asked == [f"_msrps._tcp.{POOL_NAME}"]
    assert MSRPURI.parse(alice_path[0]).host == a.host
    sink = RecordingSink()
    down_first = PoolResolver([(10, 1, dead, NODES[2]), (20, 1, b.port, b.host)])
    bob, bob_path = await auth_at_pool(down_first, pki, "bob", sink)
    assert MSRPURI.parse(bob_path[0]).host == b.host
    # Across the two nodes, as any two clients of the pool.
    to_path = " ".join([*alice_path, *bob_path, bob.local_uri])
    await defer.Deferred.fromCoroutine(
        alice.send_message(to_path, b"found by SRV", 12, message_id="srv")
    ).addTimeout(TIMEOUT, reactor)
    assert await sink.wait("srv") == b"found by SRV"
    for client in (alice, bob):
        client.transport.loseConnection()  # type: ignore[union-attr]


def _free_port_at(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
