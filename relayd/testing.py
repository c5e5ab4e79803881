"""Helpers shipped for tests (ours and operators'): throwaway PKI, relays in-process.

Certificates are generated at test time and never committed.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from relayd.bootstrap import Prepared, prepare
from relayd.config import load_config
from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as _CP
from relayd.consent.vocabulary import CONSENT_POLICY_NAMESPACE as _CR
from relayd.digest import answer_challenge, ha1
from relayd.net.tls import private_key_pem, subject_alt_names
from relayd.service import build_service
from relayd.sip.message import Headers, SIPRequest, SIPResponse
from relayd.sip.transaction import new_branch
from relayd.sipuri import SIPURI


@dataclass(frozen=True)
class RelayPKI:
    ca_path: str
    ca_pem: bytes
    directory: str

    def leaf(self, name: str, *alt_names: str) -> tuple[str, str]:
        """A certificate (with chain) and key for ``name``, signed by the test CA."""
        return _issue(Path(self.directory), self, name, (name, *alt_names))


def _common_name(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _test_certificate(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    """Every test certificate: valid from an hour ago (clock skew) for thirty days."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )


def make_pki(directory: str | Path) -> RelayPKI:
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _common_name("relayd test CA")
    certificate = (
        _test_certificate(name, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    ca_pem = certificate.public_bytes(serialization.Encoding.PEM)
    (folder / "ca.pem").write_bytes(ca_pem)
    (folder / "ca-key.pem").write_bytes(private_key_pem(key))
    return RelayPKI(str(folder / "ca.pem"), ca_pem, str(folder))


def _issue(folder: Path, pki: RelayPKI, name: str, names: tuple[str, ...]) -> tuple[str, str]:
    ca_key = serialization.load_pem_private_key((folder / "ca-key.pem").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _test_certificate(_common_name(name), ca_cert.subject, key)
        .add_extension(subject_alt_names(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    safe = name.replace(":", "_")
    cert_path = folder / f"{safe}-cert.pem"
    key_path = folder / f"{safe}-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM) + pki.ca_pem)
    key_path.write_bytes(private_key_pem(key))
    return str(cert_path), str(key_path)


@dataclass(frozen=True)
class IntermediatePKI:
    """Root → intermediate → leaf, with the intermediate in a file of its own
    (for ``extraCertChain=``): a client trusting the root verifies the leaf only
    when a server sends the intermediate."""

    root_pem: bytes
    root_path: str
    leaf_path: str
    key_path: str
    intermediate_path: str


def make_intermediate_pki(directory: str | Path, *names: str) -> IntermediatePKI:
    """Certificates for ``names`` (DNS names or IP addresses) issued by an intermediate."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    root_key, middle_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))

    def issue(subject: str, issuer: str, key: Any, signer: Any, ca: bool) -> x509.Certificate:
        builder = _test_certificate(_common_name(subject), _common_name(issuer), key).add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
        if not ca:
            builder = builder.add_extension(subject_alt_names(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    root = issue("relayd test root", "relayd test root", root_key, root_key, True)
    middle = issue("relayd test intermediate", "relayd test root", middle_key, root_key, True)
    leaf = issue(names[0], "relayd test intermediate", leaf_key, middle_key, False)
    pem = serialization.Encoding.PEM
    paths = {name: folder / f"{name}.pem" for name in ("root", "intermediate", "leaf", "key")}
    paths["root"].write_bytes(root.public_bytes(pem))
    paths["intermediate"].write_bytes(middle.public_bytes(pem))
    paths["leaf"].write_bytes(leaf.public_bytes(pem))
    paths["key"].write_bytes(private_key_pem(leaf_key))
    return IntermediatePKI(
        root.public_bytes(pem),
        str(paths["root"]),
        str(paths["leaf"]),
        str(paths["key"]),
        str(paths["intermediate"]),
    )


def write_users(path: str | Path, realm: str, users: dict[str, str]) -> str:
    """An htdigest file with these user → password entries."""
    lines = [f"{user}:{realm}:{ha1(user, realm, password)}" for user, password in users.items()]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def relay_config_overrides(
    data_dir: str,
    host: str,
    certificate: str,
    private_key: str,
    users_path: str,
    ca_path: str = "",
    extra: dict[tuple[str, str], str] | None = None,
) -> dict[tuple[str, str], str]:
    overrides = {
        ("relay", "data_dir"): data_dir,
        ("relay", "hostname"): host,
        ("msrp", "listen"): f"ssl:0:interface={host}",
        ("xcap", "listen"): f"ssl:0:interface={host}",
        ("sip", "listen"): f"udp:0:interface={host}\ntcp:0:interface={host}",
        ("msrp", "ca_certificates"): ca_path,
        ("tls", "certificate"): certificate,
        ("tls", "private_key"): private_key,
        ("auth", "users"): users_path,
        ("auth", "realm"): "relayd-test",
    }
    overrides.update(extra or {})
    return overrides


def prepared_relay(overrides: dict[tuple[str, str], str]) -> Prepared:
    return prepare(load_config(None, overrides))


def relay_service(prepared: Prepared, reactor: Any) -> Any:
    return build_service(prepared, reactor)


def consent_rule(rule_id: str, sender: str, target: str, handling: str = "grant") -> str:
    """One common-policy rule (RFC 4745/5361): ``sender`` through list ``target``."""
    return (
        f'<rule id="{rule_id}"><conditions><identity><one id="{sender}"/></identity>'
        f'<cr:target uri="{target}"/></conditions>'
        f"<actions><cr:trans-handling>{handling}</cr:trans-handling></actions></rule>"
    )


def consent_ruleset(*rules: str) -> bytes:
    """A consent-rules document holding ``rules`` (prefixes ``cr:`` bound)."""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ruleset xmlns="{_CP}" xmlns:cr="{_CR}">'
        + "".join(rules)
        + "</ruleset>"
    ).encode()


def grant_document(sender: str, target: str) -> bytes:
    """A consent-rules document: ``sender`` may reach its owner through list ``target``."""
    return consent_ruleset(consent_rule("a", sender, target))


class RecordingUDP:
    """A datagram transport that keeps what is sent, for driving the SIP stack
    in-process (``SIPTransportLayer.datagram_protocol().makeConnection``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5060) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self._address = IPv4Address("UDP", host, port)

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def getHost(self) -> IPv4Address:
        return self._address

    def take(self) -> list[tuple[bytes, tuple[str, int]]]:
        """What was sent since the last call."""
        sent, self.sent = self.sent, []
        return sent


@dataclass
class InProcessSIP:
    """The daemon's whole service with its SIP stack fed datagrams by hand."""

    reactor: MemoryReactorClock
    service: Any
    sip: Any
    store: Any
    wire: RecordingUDP
    protocol: Any


def in_process_sip_relay(
    folder: Path,
    host: str,
    passwords: dict[str, str],
    list_name: str,
    members: Sequence[str],
    extra: dict[tuple[str, str], str] | None = None,
) -> InProcessSIP:
    """The daemon (``build_service``) on a fake clock: a memory store, the domain
    ``host``, one list of ``members`` from a lists file, every sent datagram recorded;
    for tests and in-process benchmarks that need no sockets.  ``extra``: more config."""
    pki = make_pki(folder / "pki")
    cert, key = pki.leaf("relay", host)
    users = write_users(folder / "users", "relayd-test", passwords)
    lists = folder / "lists.xml"
    entries = "".join(f'<entry uri="{member}"/>' for member in members)
    lists.write_text(
        '<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        f'<list name="{list_name}">{entries}</list></resource-lists>'
    )
    overrides = relay_config_overrides(str(folder / "data"), host, cert, key, users)
    overrides[("store", "backend")] = "memory"
    overrides[("sip", "lists")] = str(lists)
    overrides[("sip", "domain")] = host
    overrides.update(extra or {})
    reactor = MemoryReactorClock()
    service = build_service(prepared_relay(overrides), reactor)
    sip = service.getServiceNamed("sip")
    wire = RecordingUDP()
    protocol = sip.transport.datagram_protocol()
    protocol.makeConnection(wire)
    sip.consent_relay.directory.add_local_port(wire.getHost().port)  # as binding a listener does
    ensureDeferred(sip.consent_relay.start())
    store = service.getServiceNamed("xcap").store
    return InProcessSIP(reactor, service, sip, store, wire, protocol)


def fired(awaitable: Any) -> Any:
    """The result (or Failure) of a Deferred or coroutine that completes at once, as
    everything over a MemoryPermissionStore and a task.Clock does."""
    out: list[Any] = []
    ensureDeferred(awaitable).addBoth(out.append)
    assert out, "deferred did not fire"
    return out[0]


@contextmanager
def captured_log() -> Iterator[EventLoggingObserver]:
    """Every ``twisted.logger`` event emitted inside the block."""
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


@implementer(IPolicyForHTTPS)
class TrustTestCA:
    """HTTPS client policy that trusts only the test CA (the relay's IP SAN is checked)."""

    def __init__(self, ca_pem: bytes) -> None:
        self._trust = Certificate.loadPEM(ca_pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust)


class RawProtocol(Protocol):
    """A client that records every byte it receives; ``closed`` fires when the
    connection is gone (for tests that speak a protocol by hand)."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class ProcessOutput(ProcessProtocol):
    """A child process's output (stdout and stderr, as they came) so far; ``ended`` fires
    with its exit status, or minus the signal's number when a signal ended it."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        assert isinstance(value, ProcessDone | ProcessTerminated)
        self.ended.callback(value.exitCode if value.exitCode is not None else -(value.signal or 0))

    def text(self, tail: int = 3000) -> str:
        """The last ``tail`` bytes, for an assertion's message."""
        return bytes(self.output[-tail:]).decode(errors="replace")


async def raw_tls(reactor: Any, host: str, port: int, ca_pem: bytes) -> RawProtocol:
    """A :class:`RawProtocol` connected over TLS to ``host:port``, trusting ``ca_pem``."""
    options = optionsForClientTLS(host, Certificate.loadPEM(ca_pem))
    raw = RawProtocol()
    await connectProtocol(SSL4ClientEndpoint(reactor, host, port, options), raw)
    return raw


def uac_request(
    method: str,
    uri: str,
    *,
    via: str,
    aor: str,
    from_tag: str,
    to: str | None,
    call_id: str,
    cseq: int,
    contact: str,
    headers: Iterable[tuple[str, str]] = (),
    authorization: tuple[str, str] | None = None,
    body: bytes = b"",
) -> tuple[str, SIPRequest]:
    """A test client's request with a fresh branch: ``(branch, request)``.

    ``via`` is the sent-protocol and sent-by (``SIP/2.0/UDP host:port``)."""
    branch = new_branch()
    h = Headers()
    h.add("Via", f"{via};rport;branch={branch}")
    h.add("Max-Forwards", "70")
    h.add("From", f"<{aor}>;tag={from_tag}")
    h.add("To", to or f"<{uri}>")
    h.add("Call-ID", call_id)
    h.add("CSeq", f"{cseq} {method}")
    h.add("Contact", contact)
    for name, value in headers:
        h.add(name, value)
    if authorization is not None:
        h.add(*authorization)
    return branch, SIPRequest(method, SIPURI.parse(uri), h, body)


def sip_credentials(
    response: SIPResponse, *, method: str, uri: str, username: str, password: str
) -> tuple[str, str] | None:
    """The ``(Authorization or Proxy-Authorization, value)`` answering a 401/407
    (RFC 3261 §22.2, §22.3), ``None`` for any other response."""
    if response.status not in (401, 407):
        return None
    proxy = response.status == 407
    challenge = response.headers.get("Proxy-Authenticate" if proxy else "WWW-Authenticate")
    answer = answer_challenge(
        challenge or "", method=method, uri=uri, username=username, password=password
    )
    return ("Proxy-Authorization" if proxy else "Authorization", answer.authorization)
