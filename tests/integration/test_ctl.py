"""relayctl as a user runs it: a real process against a real relay over TLS.

The relay runs in this process on the pytest-twisted reactor; relayctl runs
as ``python -m relayd.ctl.main`` children spawned on the same reactor, so the
relay keeps serving while they work.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue

from relayd.ctl import network
from relayd.ctl.settings import Credentials, CtlError
from relayd.digest import format_authentication_info, format_challenge
from relayd.msrp.message import MSRPRequest, make_response
from relayd.msrp.parser import MessageStart, MSRPParser
from relayd.testing import (
    RelayPKI,
    prepared_relay,
    relay_config_overrides,
    relay_service,
    write_users,
)
from relayd.users import RELOAD_CHECK_INTERVAL_SECONDS

from .conftest import REALM, USERS, RelayFactory, RunningRelay

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RELAYCTL = ["-m", "relayd.ctl.main"]
PROCESS_TIMEOUT_SECONDS = 60


def environment(home: Path, **extra: str) -> dict[str, str]:
    """A HOME of our own, so defaults never read or write the real one."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAYCTL_")}
    env.update({"HOME": str(home), "PYTHONPATH": str(ROOT)}, **extra)
    return env


async def relayctl(
    env: dict[str, str], *args: str, stdin: bytes | None = None
) -> tuple[str, str, int]:
    out, err, code = await getProcessOutputAndValue(
        sys.executable, [*RELAYCTL, *args], env=env, path=str(ROOT), stdinBytes=stdin
    ).addTimeout(PROCESS_TIMEOUT_SECONDS, reactor)
    return out.decode(), err.decode(), code


def password_file(tmp_path: Path, user: str) -> str:
    path = tmp_path / f"{user}.password"
    path.write_text(USERS[user] + "\n", encoding="utf-8")
    return str(path)


def access(tmp_path: Path, pki: RelayPKI, user: str) -> list[str]:
    return ["--user", user, "--password-file", password_file(tmp_path, user), "--ca", pki.ca_path]


def lines(text: str, prefix: str) -> list[str]:
    return [line.removeprefix(prefix) for line in text.splitlines() if line.startswith(prefix)]


class Receiver(protocol.ProcessProtocol):
    """``relayctl receive`` in the background: its Path line, then its exit."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.path: defer.Deferred[str] = defer.Deferred()
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if not self.path.called:
            for line in self.out.decode(errors="replace").splitlines(keepends=True):
                if line.startswith("Path: ") and line.endswith("\n"):
                    self.path.callback(line.removeprefix("Path: ").strip())

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        if not self.path.called:
            self.path.errback(RuntimeError(self.err.decode(errors="replace")))
        self.ended.callback(reason.value.exitCode)


async def start_receiver(env: dict[str, str], *args: str) -> tuple[Receiver, Any, str]:
    receiver = Receiver()
    process = reactor.spawnProcess(
        receiver,
        sys.executable,
        [sys.executable, *RELAYCTL, "receive", *args],
        env=env,
        path=str(ROOT),
    )
    try:
        path = await receiver.path.addTimeout(PROCESS_TIMEOUT_SECONDS, reactor)
    except BaseException:
        stop(receiver, process)
        raise
    return receiver, process, path


def stop(receiver: Receiver, process: Any) -> None:
    if not receiver.ended.called:
        process.signalProcess("KILL")


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def users_path(relay: RunningRelay) -> str:
    return str(relay.prepared.users.path)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- auth ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auth_prints_use_path_and_expires(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    relay = await start_relay()
    out, err, code = await relayctl(
        environment(tmp_path),
        "auth",
        f"msrps://127.0.0.1:{relay.port}",
        "--expires",
        "600",
        *access(tmp_path, pki, "alice"),
    )
    assert (code, err) == (0, "")
    use_path = lines(out, "Use-Path: ")
    assert len(use_path) == 1 and use_path[0].startswith(f"msrps://127.0.0.1:{relay.port}/")
    assert lines(out, "Expires: ") == ["600"]


@pytest_twisted.ensureDeferred
async def test_auth_defaults_to_relays_credentials_and_certificate(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    # What the relay writes on first start on defaults, in the default data directory.
    relay = await start_relay()
    data = tmp_path / ".local" / "state" / "relayd"
    (data / "tls").mkdir(parents=True)
    (data / "tls" / "selfsigned-cert.pem").write_bytes(pki.ca_pem)
    (data / "credentials.txt").write_text(
        f"username=bob\nrealm={REALM}\npassword={USERS['bob']}\n", encoding="utf-8"
    )
    out, err, code = await relayctl(environment(tmp_path), "auth", f"127.0.0.1:{relay.port}")
    assert (code, err) == (0, "")
    assert lines(out, "Expires: ") == ["1800"]


@pytest_twisted.ensureDeferred
async def test_auth_with_wrong_password_fails_in_one_line(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    relay = await start_relay()
    env = environment(tmp_path, RELAYCTL_PASSWORD="not-her-password")
    out, err, code = await relayctl(env, "auth", relay.uri, "--user", "alice", "--ca", pki.ca_path)
    assert code == 1
    assert out == ""
    assert err == (
        f"relayctl: {relay.uri}: AUTH refused: 401 Unauthorized (wrong user name or password?)\n"
    )


@pytest_twisted.ensureDeferred
async def test_auth_to_unreachable_relay_fails_in_one_line(tmp_path: Path, pki: RelayPKI) -> None:
    uri = f"msrps://127.0.0.1:{closed_port()};tcp"
    env = environment(tmp_path)
    out, err, code = await relayctl(env, "auth", uri, *access(tmp_path, pki, "alice"))
    assert (code, out) == (1, "")
    assert err.startswith(f"relayctl: cannot connect to {uri}: ")
    assert "refused" in err and err.count("\n") == 1


@pytest_twisted.ensureDeferred
async def test_auth_with_untrusted_certificate_says_so(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = await start_relay()
    env = environment(tmp_path, RELAYCTL_PASSWORD=USERS["alice"])
    # No --ca and no self-signed file in HOME: the system roots do not know our test CA.
    out, err, code = await relayctl(env, "auth", relay.uri, "--user", "alice")
    assert (code, out) == (1, "")
    assert err == (
        f"relayctl: {relay.uri}: TLS failed: certificate verify failed (wrong or missing --ca?)\n"
    )


@pytest_twisted.ensureDeferred
async def test_auth_with_certificate_for_another_name_says_so(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    relay = await start_relay()  # its certificate names 127.0.0.1 only
    env = environment(tmp_path, RELAYCTL_PASSWORD=USERS["alice"])
    uri = f"msrps://localhost:{relay.port}"
    out, err, code = await relayctl(env, "auth", uri, "--user", "alice", "--ca", pki.ca_path)
    assert (code, out) == (1, ""), err
    assert err == (
        f"relayctl: {uri};tcp: TLS failed: the relay's certificate is not valid for localhost\n"
    )


@pytest_twisted.ensureDeferred
async def test_auth_through_a_name_the_relay_does_not_answer_to_gives_a_hint(
    pki: RelayPKI, tmp_path: Path
) -> None:
    # The certificate names localhost too, so TLS succeeds; the relay is 127.0.0.1.
    cert, key = pki.leaf("localhost", "127.0.0.1")
    users = write_users(tmp_path / "users.htdigest", REALM, USERS)
    overrides = relay_config_overrides(str(tmp_path / "data"), "127.0.0.1", cert, key, users)
    service = relay_service(prepared_relay(overrides), reactor)
    service.startService()
    try:
        ports = await service.getServiceNamed("msrp").listening.addTimeout(5, reactor)
        uri = f"msrps://localhost:{ports[0].getHost().port};tcp"
        env = environment(tmp_path, RELAYCTL_PASSWORD=USERS["alice"])
        out, err, code = await relayctl(env, "auth", uri, "--user", "alice", "--ca", pki.ca_path)
    finally:
        await service.stopService()
    assert (code, out) == (1, "")
    assert err == (
        f"relayctl: {uri}: the relay closed the connection: is localhost its [relay] hostname?\n"
    )


@pytest_twisted.ensureDeferred
async def test_auth_with_msrp_scheme_against_a_tls_port_says_use_msrps(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    relay = await start_relay()
    uri = f"msrp://127.0.0.1:{relay.port};tcp"
    out, err, code = await relayctl(
        environment(tmp_path), "auth", uri, *access(tmp_path, pki, "alice")
    )
    assert (code, out) == (1, "")
    assert err == f"relayctl: {uri}: that port speaks TLS: use msrps://127.0.0.1:{relay.port};tcp\n"


class _TerseRelay(protocol.Protocol):
    """A relay that answers AUTH with a 401, then a 200 whose Authentication-Info
    is ``info`` (None: no header at all, which RFC 2617 §3.2.3 allows)."""

    def __init__(self, info: str | None) -> None:
        self.info = info
        self.parser = MSRPParser()

    def dataReceived(self, data: bytes) -> None:
        for event in self.parser.feed(data):
            if isinstance(event, MessageStart) and isinstance(event.message, MSRPRequest):
                request = event.message
                back = request.headers.get("From-Path") or ""
                if "Authorization" not in request.headers:
                    challenge = format_challenge(REALM, "bm9uY2U")
                    response = make_response(
                        request, 401, None, [("WWW-Authenticate", challenge)], to_path=back
                    )
                else:
                    here = request.headers.get("To-Path") or ""
                    extra = [("Use-Path", here.replace(";tcp", "/s1;tcp")), ("Expires", "600")]
                    if self.info is not None:
                        extra.append(("Authentication-Info", self.info))
                    response = make_response(request, 200, None, extra, to_path=back)
                transport: Any = self.transport
                transport.write(response.to_bytes())


async def _auth_against_terse_relay(pki: RelayPKI, info: str | None) -> str:
    cert, key = pki.leaf("127.0.0.1")
    factory = protocol.Factory.forProtocol(lambda: _TerseRelay(info))
    endpoint = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    )
    port: Any = await endpoint.listen(factory)
    uri = f"msrps://127.0.0.1:{port.getHost().port};tcp"
    access = network.RelayAccess([uri], Credentials("alice", "pw"), pki.ca_pem)
    out = io.StringIO()
    try:
        await defer.Deferred.fromCoroutine(network.run_auth(reactor, access, out)).addTimeout(
            10, reactor
        )
    finally:
        await port.stopListening()
    return out.getvalue().replace(uri, "URI")


@pytest_twisted.ensureDeferred
async def test_auth_accepts_a_200_without_authentication_info_and_says_so(
    pki: RelayPKI,
) -> None:
    out = await _auth_against_terse_relay(pki, None)
    assert lines(out, "Expires: ") == ["600"]
    assert lines(out, "Note: ") == [
        "URI sent no Authentication-Info (optional in RFC 2617),"
        " so it did not prove it knows the password"
    ]


@pytest_twisted.ensureDeferred
async def test_auth_refuses_a_wrong_rspauth_in_one_line(pki: RelayPKI) -> None:
    wrong = format_authentication_info(rspauth="0" * 32, cnonce="c", nc="00000001")
    with pytest.raises(CtlError) as info:
        await _auth_against_terse_relay(pki, wrong)
    assert str(info.value).endswith(
        ": relay's rspauth does not match: it did not prove it knows the password"
    )


class _Silent(protocol.Protocol):
    """Accepts a connection and never says a word (no TLS ServerHello)."""

    lost: defer.Deferred[None]

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_auth_gives_up_on_a_tls_handshake_that_never_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lost: defer.Deferred[None] = defer.Deferred()

    def silent() -> _Silent:
        server = _Silent()
        server.lost = lost
        return server

    factory = protocol.ServerFactory()
    factory.buildProtocol = lambda address: silent()  # type: ignore[assignment,method-assign]
    port: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")
    number = port.getHost().port
    monkeypatch.setattr(network, "CONNECT_TIMEOUT_SECONDS", 0.3)
    uri = f"msrps://127.0.0.1:{number};tcp"
    access = network.RelayAccess([uri], Credentials("alice", "pw"), None)
    try:
        with pytest.raises(CtlError) as info:
            await defer.Deferred.fromCoroutine(
                network.run_auth(reactor, access, io.StringIO())
            ).addTimeout(10, reactor)
        assert str(info.value) == f"TLS handshake with 127.0.0.1:{number} timed out after 0.3 s"
        await lost.addTimeout(5, reactor)  # and the connection is not left open
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_adduser_then_auth_as_that_user(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    relay = await start_relay()
    clock = Clock()
    relay.prepared.users.use_clock(clock)
    env = environment(tmp_path)
    users = ["--users", users_path(relay), "--realm", REALM]
    out, err, code = await relayctl(env, "adduser", *users, "dave", "--generate")
    assert (code, err) == (0, "")
    password = lines(out, "password=")[0]
    out, err, code = await relayctl(
        env, "adduser", *users, "erin", "--password-stdin", stdin=b"e1\n"
    )
    assert (code, err) == (0, "")
    listed, _, _ = await relayctl(env, "users", "--users", users_path(relay))
    assert f"dave\t{REALM}\nerin\t{REALM}\n" in listed
    # The running relay picks the file up by itself (it re-stats at most once a second).
    clock.advance(RELOAD_CHECK_INTERVAL_SECONDS)
    for user, secret in (("dave", password), ("erin", "e1")):
        env_user = environment(tmp_path, RELAYCTL_PASSWORD=secret)
        out, err, code = await relayctl(
            env_user, "auth", relay.uri, "--user", user, "--ca", pki.ca_path
        )
        assert (code, err) == (0, ""), user
    out, err, code = await relayctl(env, "deluser", *users, "dave")
    assert code == 0
    clock.advance(RELOAD_CHECK_INTERVAL_SECONDS)
    env_user = environment(tmp_path, RELAYCTL_PASSWORD=password)
    out, err, code = await relayctl(
        env_user, "auth", relay.uri, "--user", "dave", "--ca", pki.ca_path
    )
    assert code == 1 and "401" in err


# -- send and receive -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_send_and_receive_a_3_mib_file(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    relay = await start_relay()
    env = environment(tmp_path)
    source = random_file(tmp_path / "source.bin", 3 * 2**20)
    target = tmp_path / "received.bin"
    receiver, process, path = await start_receiver(
        env, "--via", relay.uri, "--output", str(target), *access(tmp_path, pki, "bob")
    )
    try:
        out, err, code = await relayctl(
            env,
            "send",
            "--via",
            relay.uri,
            "--to",
            path,
            "--chunk-size",
            "100000",
            str(source),
            *access(tmp_path, pki, "alice"),
        )
        assert code == 0, err
        received_code = await receiver.ended.addTimeout(PROCESS_TIMEOUT_SECONDS, reactor)
    finally:
        stop(receiver, process)
    received = receiver.out.decode()
    assert received_code == 0, receiver.err.decode()
    assert target.read_bytes() == source.read_bytes()
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    assert lines(out, "SHA-256: ") == [expected]
    assert lines(received, "SHA-256: ") == [expected]
    assert lines(out, "Bytes: ") == lines(received, "Bytes: ") == [str(3 * 2**20)]
    assert lines(out, "Message-ID: ") == lines(received, "Message-ID: ")
    # stderr is not a terminal here: one summary line instead of a bar.
    assert err.startswith("sent 3145728 bytes (3.0 MiB) in ") and err.count("\n") == 1


@pytest_twisted.ensureDeferred
async def test_two_interleaved_files_through_a_chain_of_two_relays(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    # The receiver AUTHs with intra, then with extra through intra (RFC 4976 §5.1);
    # two senders reach it through extra, so their chunks interleave on its connection.
    intra = await start_relay("127.0.0.1")
    extra = await start_relay("127.0.0.2")
    env = environment(tmp_path)
    folder = tmp_path / "inbox"
    folder.mkdir()
    receiver, process, path = await start_receiver(
        env,
        "--via",
        intra.uri,
        "--via",
        extra.uri,
        "--output",
        str(folder),
        "--count",
        "2",
        *access(tmp_path, pki, "bob"),
    )
    try:
        assert path.split()[0].startswith(f"msrps://127.0.0.2:{extra.port}/")
        assert path.split()[1].startswith(f"msrps://127.0.0.1:{intra.port}/")
        sources = [random_file(tmp_path / f"s{n}.bin", 1_000_000 + n) for n in (1, 2)]
        sends = [
            relayctl(
                env,
                "send",
                str(source),
                "--via",
                extra.uri,
                "--to",
                *path.split(),
                "--chunk-size",
                "30000",
                "--window",
                "2",
                *access(tmp_path, pki, user),
            )
            for source, user in zip(sources, ("alice", "carol"), strict=True)
        ]
        results = await defer.gatherResults([defer.ensureDeferred(s) for s in sends])
        assert [code for _, _, code in results] == [0, 0], [err for _, err, _ in results]
        received_code = await receiver.ended.addTimeout(PROCESS_TIMEOUT_SECONDS, reactor)
    finally:
        stop(receiver, process)
    assert received_code == 0, receiver.err.decode()
    received = receiver.out.decode()
    for source, (out, _, _) in zip(sources, results, strict=True):
        message_id = lines(out, "Message-ID: ")[0]
        assert (folder / message_id).read_bytes() == source.read_bytes()
        assert lines(out, "SHA-256: ")[0] in lines(received, "SHA-256: ")


@pytest_twisted.ensureDeferred
async def test_send_to_unknown_session_reports_delivery_failure(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    relay = await start_relay()
    source = random_file(tmp_path / "source.bin", 1000)
    bogus = f"msrps://127.0.0.1:{relay.port}/nosuchsession;tcp msrps://x.invalid:2855/y;tcp"
    out, err, code = await relayctl(
        environment(tmp_path),
        "send",
        "--via",
        relay.uri,
        "--to",
        bogus,
        str(source),
        *access(tmp_path, pki, "alice"),
    )
    assert code == 1
    assert out == ""
    assert err.splitlines()[-1].startswith("relayctl: delivery failed: 481 ")


@pytest_twisted.ensureDeferred
async def test_send_failing_after_the_bar_was_drawn_ends_its_line(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    relay = await start_relay()
    source = random_file(tmp_path / "source.bin", 4000)
    bogus = [f"msrps://127.0.0.1:{relay.port}/nosuchsession;tcp", "msrps://x.invalid:2855/y;tcp"]
    access = network.RelayAccess([relay.uri], Credentials("alice", USERS["alice"]), pki.ca_pem)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CtlError, match="delivery failed: 481"):
        await defer.Deferred.fromCoroutine(
            network.run_send(
                reactor, access, bogus, str(source), 1000, 2, "text/plain", 5, out, err, True
            )
        ).addTimeout(10, reactor)
    assert err.getvalue().startswith("\r[")  # the bar was drawn...
    assert err.getvalue().endswith("\n")  # ...and its line ended before the error


@pytest_twisted.ensureDeferred
async def test_receive_times_out_in_one_line(
    start_relay: RelayFactory, pki: RelayPKI, tmp_path: Path
) -> None:
    relay = await start_relay()
    out, err, code = await relayctl(
        environment(tmp_path),
        "receive",
        "--via",
        relay.uri,
        "--timeout",
        "0.5",
        "--output",
        str(tmp_path / "never"),
        *access(tmp_path, pki, "bob"),
    )
    assert code == 1
    assert out.startswith("Path: ")
    assert err == "relayctl: received 0 of 1 messages within 0.5 s\n"


# -- status -------------------------------------------------------------------------------

METRICS = {("metrics", "listen"): "tcp:0:interface=127.0.0.1"}


def metrics_url(relay: RunningRelay) -> str:
    port = relay.service.getServiceNamed("metrics").ports[0].getHost().port
    return f"http://127.0.0.1:{port}"


@pytest_twisted.ensureDeferred
async def test_status_prints_versions_uptime_listeners_and_counts(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = await start_relay(extra=METRICS)
    out, err, code = await relayctl(environment(tmp_path), "status", "--url", metrics_url(relay))
    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith("relayd 0.") and out.splitlines()[0].endswith(": ok")
    assert lines(out, "uptime: ")[0].startswith("0h 00m")
    msrp_address = f"ssl:127.0.0.1:{relay.port}"
    assert lines(out, "listener MSRP: ") == [f"up {msrp_address}"]
    assert lines(out, "store: ") == ["sqlite, up"]
    assert lines(out, "MSRP: ")[0].startswith("0 connections, 0 sessions")
    assert lines(out, "consents: ") == ["0 pending, 0 granted, 0 denied"]


@pytest_twisted.ensureDeferred
async def test_status_of_an_unhealthy_relay_names_the_problem_and_exits_1(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = await start_relay(extra=METRICS)
    await relay.service.getServiceNamed("xcap").ports[0].stopListening()
    out, err, code = await relayctl(environment(tmp_path), "status", "--url", metrics_url(relay))
    assert code == 1
    assert lines(out, "listener XCAP: ")[0].startswith("DOWN")
    assert lines(out, "problem: ") == ["XCAP is not listening"]
    assert err == "relayctl: the relay is not healthy\n"


@pytest_twisted.ensureDeferred
async def test_status_without_a_metrics_listener_says_so(tmp_path: Path) -> None:
    ini = tmp_path / "relayd.ini"
    ini.write_text(f"[relay]\ndata_dir = {tmp_path / 'data'}\n", encoding="utf-8")
    out, err, code = await relayctl(environment(tmp_path), "status", "--config", str(ini))
    assert (code, out) == (1, "")
    assert err == f"relayctl: [metrics] listen is not set in {ini}: give --config or --url\n"


@pytest_twisted.ensureDeferred
async def test_status_of_a_relay_not_running_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    out, err, code = await relayctl(
        environment(tmp_path), "status", "--url", f"http://127.0.0.1:{port}"
    )
    assert (code, out) == (1, "")
    assert err.startswith(
        f"relayctl: cannot reach the relay's metrics listener at http://127.0.0.1:{port}"
    )
    assert len(err.splitlines()) == 1
