"""The real daemon: `twistd -n msrprelay --config FILE` in its own process."""

from __future__ import annotations

import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import load_pem_x509_certificate
from twisted.internet import defer, endpoints, protocol, reactor, ssl
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.utils import getProcessOutputAndValue
from zope.interface import implementer

from relayd.msrp.client import connect
from relayd.testing import RelayPKI, write_users

from .conftest import REALM, USERS, RecordingSink, deferLater, path_to

pytestmark = pytest.mark.integration

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class Daemon(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.listening: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[tuple[int | None, int | None]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = re.search(rb"MSRP listening on ssl:127\.0\.0\.1:(\d+)", self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback((reason.value.exitCode, reason.value.signal))


def _start_daemon(config: Path, folder: Path) -> tuple[Daemon, Any]:
    """``twistd -n msrprelay --config CONFIG`` in its own process, run in ``folder``."""
    daemon = Daemon()
    process = reactor.spawnProcess(
        daemon,
        sys.executable,
        [*TWISTD, "-n", "--pidfile=", "msrprelay", "--config", str(config)],
        env=None,
        path=str(folder),
    )
    return daemon, process


def write_config(tmp_path: Path, pki: RelayPKI) -> Path:
    cert, key = pki.leaf("127.0.0.1")
    users = write_users(tmp_path / "users.htdigest", REALM, USERS)
    config = tmp_path / "relayd.ini"
    config.write_text(
        f"""[relay]
hostname = 127.0.0.1
data_dir = {tmp_path / "data"}

[msrp]
listen = ssl:0:interface=127.0.0.1

[xcap]
listen = ssl:0:interface=127.0.0.1

[sip]
listen = udp:0:interface=127.0.0.1

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


@pytest_twisted.ensureDeferred
async def test_twistd_runs_relay_from_config(tmp_path: Path, pki: RelayPKI) -> None:
    config = write_config(tmp_path, pki)
    daemon, process = _start_daemon(config, tmp_path)
    try:
        port = await daemon.listening.addTimeout(30, reactor)
        uri = f"msrps://127.0.0.1:{port};tcp"
        sink = RecordingSink()
        alice = await connect(reactor, uri, pki.ca_pem)
        bob = await connect(reactor, uri, pki.ca_pem, sink_for=lambda request: sink)
        alice_auth = await defer.Deferred.fromCoroutine(alice.auth([uri], "alice", USERS["alice"]))
        bob_auth = await defer.Deferred.fromCoroutine(bob.auth([uri], "bob", USERS["bob"]))
        to_path = " ".join([*alice_auth.use_path, *path_to(bob, bob_auth)])
        await defer.Deferred.fromCoroutine(
            alice.send_message(to_path, b"through the daemon", 18, message_id="d1")
        ).addTimeout(10, reactor)
        assert await sink.wait("d1") == b"through the daemon"
        alice.transport.loseConnection()  # type: ignore[union-attr]
        bob.transport.loseConnection()  # type: ignore[union-attr]
    finally:
        if not daemon.ended.called:
            process.signalProcess(signal.SIGTERM)
    code, signal_number = await daemon.ended.addTimeout(30, reactor)
    output = daemon.output.decode(errors="replace")
    # twistd re-raises the signal that stopped it, so SIGTERM is a clean exit too.
    assert code == 0 or signal_number == signal.SIGTERM, output
    assert "Server Shut Down" in output
    assert "Traceback" not in output
    # Who the relay is comes first, then every listener.
    introduction = output.index(
        f"starting: hostname 127.0.0.1, realm {REALM}, SIP domain 127.0.0.1, store sqlite"
    )
    for listener in ("MSRP listening on ssl:", "XCAP listening on ssl:", "SIP listening on udp:"):
        assert output.index(listener) > introduction, listener


@pytest_twisted.ensureDeferred
async def test_bad_config_stops_startup_with_one_line(tmp_path: Path, pki: RelayPKI) -> None:
    config = write_config(tmp_path, pki)
    text = config.read_text(encoding="utf-8")
    config.write_text(
        text + "session_expires_min_seconds = 900\nsession_expires_max_seconds = 60\n",
        encoding="utf-8",
    )
    # The keys above landed in [tls]: unknown key there.
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        [*TWISTD[1:], "-n", "--pidfile=", "msrprelay", "--config", str(config)],
        path=str(tmp_path),
    )
    assert code != 0
    message = (out + err).decode()
    assert f"{config}: [tls] session_expires_min_seconds: unknown key" in message
    assert "Traceback" not in message
    assert "listening" not in message
    # Only that line: no twistd usage text (the command line itself was fine).
    assert out == b""
    assert "Usage:" not in message
    assert err.decode().splitlines() == [
        f"twistd: {config}: [tls] session_expires_min_seconds: unknown key"
    ]


@pytest.mark.parametrize("section", ["msrp", "sip"])
@pytest_twisted.ensureDeferred
async def test_busy_port_stops_startup_with_one_line(
    tmp_path: Path, pki: RelayPKI, section: str
) -> None:
    # A port of ours stands in for another program: the daemon must not start without it.
    busy: Any = reactor.listenTCP(0, protocol.ServerFactory(), interface="127.0.0.1")
    port = busy.getHost().port
    listen = f"tcp:{port}:interface=127.0.0.1"
    config = write_config(tmp_path, pki)
    text = config.read_text(encoding="utf-8")
    if section == "msrp":
        text = text.replace("[msrp]\nlisten = ssl:0:", f"[msrp]\nlisten = {listen}\n#", 1)
    else:
        text = text.replace("[sip]\nlisten = ", f"[sip]\nlisten = {listen}\n  ", 1)
    config.write_text(text, encoding="utf-8")
    try:
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [*TWISTD[1:], "-n", "--pidfile=", "msrprelay", "--config", str(config)],
            path=str(tmp_path),
        ).addTimeout(60, reactor)
    finally:
        await busy.stopListening()
    assert code == 1
    output = (out + err).decode()
    label = section.upper()
    reason = f"Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use."
    critical = [line for line in output.splitlines() if "#critical]" in line]
    assert len(critical) == 1, output
    assert critical[0].endswith(f"{label} cannot listen on {listen}: {reason}")
    assert err == b""
    assert "Traceback" not in output
    assert f"{label} listening" not in output
    if section == "msrp":  # the first service: nothing else was bound either
        assert "listening" not in output


async def _logged(daemon: Daemon, text: bytes, count: int = 1) -> None:
    """Wait until the daemon has logged ``text`` ``count`` times (or time out)."""
    for _ in range(200):
        if daemon.output.count(text) >= count:
            return
        await deferLater(0.05)
    raise AssertionError(daemon.output.decode(errors="replace"))


@implementer(IHandshakeListener)
class _Handshake(protocol.Protocol):
    def __init__(self) -> None:
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport
        served = transport.getPeerCertificate().to_cryptography().public_bytes(Encoding.DER)
        self.done.callback(bytes(served))
        transport.loseConnection()


async def _served_certificate(port: int, ca_pem: bytes) -> bytes:
    """The DER leaf certificate a new TLS connection to ``port`` is given."""
    options = ssl.optionsForClientTLS("127.0.0.1", ssl.Certificate.loadPEM(ca_pem))
    endpoint = endpoints.SSL4ClientEndpoint(reactor, "127.0.0.1", port, options)
    client = await endpoints.connectProtocol(endpoint, _Handshake())
    served: bytes = await client.done.addTimeout(10, reactor)
    return served


def _leaf_der(path: Path) -> bytes:
    return load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


@pytest_twisted.ensureDeferred
async def test_sighup_serves_a_renewed_certificate_and_refuses_a_bad_one(
    tmp_path: Path, pki: RelayPKI
) -> None:
    config = write_config(tmp_path, pki)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(name: str) -> None:
        issued_cert, issued_key = pki.leaf(name, "127.0.0.1")
        cert.write_bytes(Path(issued_cert).read_bytes())
        key.write_bytes(Path(issued_key).read_bytes())

    install("first.example.com")
    text = re.sub(r"(?m)^certificate = .*$", f"certificate = {cert}", config.read_text())
    config.write_text(re.sub(r"(?m)^private_key = .*$", f"private_key = {key}", text))
    daemon, process = _start_daemon(config, tmp_path)
    try:
        port = await daemon.listening.addTimeout(30, reactor)
        assert await _served_certificate(port, pki.ca_pem) == _leaf_der(cert)
        uri = f"msrps://127.0.0.1:{port};tcp"
        sink = RecordingSink()
        alice = await connect(reactor, uri, pki.ca_pem)
        bob = await connect(reactor, uri, pki.ca_pem, sink_for=lambda request: sink)
        alice_auth = await defer.Deferred.fromCoroutine(alice.auth([uri], "alice", USERS["alice"]))
        bob_auth = await defer.Deferred.fromCoroutine(bob.auth([uri], "bob", USERS["bob"]))
        to_path = " ".join([*alice_auth.use_path, *path_to(bob, bob_auth)])

        install("second.example.com")
        process.signalProcess("HUP")
        await _logged(daemon, b"Reloaded: certificate " + str(cert).encode())
        assert await _served_certificate(port, pki.ca_pem) == _leaf_der(cert)
        # Connections made before the reload carry on with the certificate they had.
        await defer.Deferred.fromCoroutine(
            alice.send_message(to_path, b"after the reload", 16, message_id="r1")
        ).addTimeout(10, reactor)
        assert await sink.wait("r1") == b"after the reload"

        renewed = _leaf_der(cert)
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        process.signalProcess("HUP")
        await _logged(daemon, b"Reload refused")
        assert await _served_certificate(port, pki.ca_pem) == renewed
        alice.transport.loseConnection()  # type: ignore[union-attr]
        bob.transport.loseConnection()  # type: ignore[union-attr]
    finally:
        if not daemon.ended.called:
            process.signalProcess(signal.SIGTERM)
    await daemon.ended.addTimeout(30, reactor)
    output = daemon.output.decode(errors="replace")
    refused = [line for line in output.splitlines() if "Reload refused" in line]
    assert len(refused) == 1 and f"{cert}: not a PEM certificate" in refused[0], output
    assert "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_relayctl_status_of_the_daemon_from_its_config(tmp_path: Path, pki: RelayPKI) -> None:
    with socket.socket() as probe:  # a free port, so relayctl can read it from the file
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    config = write_config(tmp_path, pki)
    listen = f"tcp:{metrics_port}:interface=127.0.0.1"
    config.write_text(config.read_text() + f"\n[metrics]\nlisten = {listen}\n")
    daemon, process = _start_daemon(config, tmp_path)
    try:
        await daemon.listening.addTimeout(30, reactor)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "relayd.ctl.main", "status", "--config", str(config)]
        ).addTimeout(30, reactor)
    finally:
        if not daemon.ended.called:
            process.signalProcess(signal.SIGTERM)
    await daemon.ended.addTimeout(30, reactor)
    assert (code, err) == (0, b""), daemon.output.decode(errors="replace")
    text = out.decode()
    assert text.splitlines()[0].endswith(": ok")
    assert f"listener metrics: up tcp:127.0.0.1:{metrics_port}\n" in text
    assert "store: sqlite, up\n" in text
    assert f"metrics listening on tcp:127.0.0.1:{metrics_port}" in daemon.output.decode()
