"""TLS material and contexts (RFC 4976 §6.1, §9.2).

Server side: our certificate, TLS 1.2 at least, and a certificate *request*
(not requirement) when peer-relay trust roots are configured, so relays
authenticate by certificate and clients by digest on the same port.
Client side: Twisted's ``optionsForClientTLS`` (SNI plus service_identity
checks of the URI host) with our certificate offered for mutual TLS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import ssl as stdlib_ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer


class TLSSetupError(Exception):
    pass


@dataclass(frozen=True)
class ServerIdentity:
    """Our certificate chain and key, loaded once and shared by every listener."""

    certificate_path: str
    private_key_path: str
    private_certificate: ssl.PrivateCertificate
    chain: tuple[crypto.X509, ...]
    extra_chain_path: str = ""
    """A listener's ``extraCertChain=`` file, whose certificates end ``chain``."""

    @property
    def dns_names(self) -> list[str]:
        return certificate_dns_names(self.private_certificate.original)


def load_identity(certificate_path: str, private_key_path: str) -> ServerIdentity:
    """Load a PEM chain (leaf first) and its key; say what is wrong if they do not fit."""
    try:
        chain_pem = Path(certificate_path).read_bytes()
        key_pem = Path(private_key_path).read_bytes()
    except OSError as e:
        raise TLSSetupError(f"cannot read {e.filename}: {e.strerror}") from None
    chain = _certificates_in(chain_pem, certificate_path)
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TLSSetupError(f"{private_key_path}: not an unencrypted PEM private key") from None
    if not isinstance(
        private_key,
        ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    ):
        raise TLSSetupError(f"{private_key_path}: key type not usable for TLS")
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.use_certificate(chain[0].to_cryptography())
        context.use_privatekey(private_key)
        context.check_privatekey()
    except SSL.Error:
        raise TLSSetupError(
            f"{private_key_path} does not match the certificate in {certificate_path}"
        ) from None
    key = crypto.PKey.from_cryptography_key(private_key)
    leaf = ssl.Certificate(chain[0])
    private = ssl.PrivateCertificate.fromCertificateAndKeyPair(leaf, ssl.KeyPair(key))
    return ServerIdentity(certificate_path, private_key_path, private, tuple(chain))


def with_extra_chain(identity: ServerIdentity, path: str) -> ServerIdentity:
    """``identity`` serving the certificates of ``path`` after its own chain.

    This is Twisted's ``extraCertChain=`` listener option: intermediates kept
    in a file of their own, sent so that clients trusting only the root can
    verify the leaf.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TLSSetupError(f"extraCertChain: cannot read {path}: {e.strerror}") from None
    extra = _certificates_in(data, f"extraCertChain: {path}")
    return dataclasses.replace(identity, chain=(*identity.chain, *extra), extra_chain_path=path)


def _certificates_in(data: bytes, source: str) -> list[crypto.X509]:
    """At least one PEM certificate from ``data``, read from ``source`` (for errors)."""
    try:
        certificates = _load_pem_certificates(data)
    except crypto.Error:
        raise TLSSetupError(f"{source}: not a PEM certificate") from None
    if not certificates:
        raise TLSSetupError(f"{source}: no certificate found")
    return certificates


def _load_pem_certificates(data: bytes) -> list[crypto.X509]:
    certificates = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for block in data.split(marker)[1:]:
        certificates.append(crypto.load_certificate(crypto.FILETYPE_PEM, marker + block))
    return certificates


def load_trust_roots(path: str) -> list[crypto.X509]:
    """Trust roots from one PEM file or every *.pem/*.crt file of a directory."""
    files = (
        sorted(p for p in Path(path).iterdir() if p.suffix in (".pem", ".crt"))
        if os.path.isdir(path)
        else [Path(path)]
    )
    roots: list[crypto.X509] = []
    for file in files:
        try:
            roots.extend(_load_pem_certificates(file.read_bytes()))
        except (OSError, crypto.Error) as e:
            raise TLSSetupError(f"{file}: cannot load trust roots ({e})") from None
    if not roots:
        raise TLSSetupError(f"{path}: no certificates found")
    return roots


def subject_alt_names(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    """The subjectAltName of a certificate we issue for ``names``: an iPAddress entry
    for an address, a dNSName otherwise; peers match an IP host only against the
    former (RFC 6125 §1.7.2, service_identity)."""
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A key we generate, as an unencrypted PKCS #8 PEM file (what ``load_identity``
    reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_dns_names(certificate: crypto.X509 | x509.Certificate) -> list[str]:
    """DNS names of the subjectAltName extension, in certificate order."""
    cert = (
        certificate if isinstance(certificate, x509.Certificate) else certificate.to_cryptography()
    )
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(extension.value.get_values_for_type(x509.DNSName))


def certificate_ip_names(certificate: x509.Certificate) -> list[str]:
    """IP addresses of the subjectAltName extension, as text."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(address) for address in extension.value.get_values_for_type(x509.IPAddress)]


def stdlib_server_context(
    identity: ServerIdentity, trust_roots: list[crypto.X509] | None
) -> stdlib_ssl.SSLContext:
    """Context for MSRP ``ssl:`` listeners on the standard library's TLS (see tlsio).

    Same policy as server_context_factory: TLS 1.2 at least, a client
    certificate requested (never required) when peer-relay roots are set.
    No session tickets: clients reconnect rarely, and idle memory matters more.
    """
    context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = stdlib_ssl.TLSVersion.TLSv1_2
    _load_served_chain(context, identity)
    context.num_tickets = 0
    context.options |= stdlib_ssl.OP_NO_TICKET
    if trust_roots:
        pem = b"".join(
            root.to_cryptography().public_bytes(serialization.Encoding.PEM) for root in trust_roots
        )
        context.load_verify_locations(cadata=pem.decode("ascii"))
        context.verify_mode = stdlib_ssl.CERT_OPTIONAL
    return context


def _load_served_chain(context: stdlib_ssl.SSLContext, identity: ServerIdentity) -> None:
    """The standard library loads a chain only from one file: with an extra chain, the
    whole chain goes through a private temporary file (certificates only, no key)."""
    if not identity.extra_chain_path:
        context.load_cert_chain(identity.certificate_path, identity.private_key_path)
        return
    pem = b"".join(
        certificate.to_cryptography().public_bytes(serialization.Encoding.PEM)
        for certificate in identity.chain
    )
    with tempfile.TemporaryDirectory(prefix="relayd-chain-") as folder:
        chain_path = Path(folder) / "chain.pem"
        chain_path.write_bytes(pem)
        context.load_cert_chain(chain_path, identity.private_key_path)


def certificate_matches(certificate: x509.Certificate, host: str) -> bool:
    """Does this (already verified) certificate name ``host`` (DNS or IP SAN)?"""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        is_ip = False
    else:
        is_ip = True
    try:
        if is_ip:
            verify_certificate_ip_address(certificate, host)
        else:
            verify_certificate_hostname(certificate, host)
    except (VerificationError, CertificateError, ValueError):
        return False
    return True


def server_context_factory(
    identity: ServerIdentity, trust_roots: list[crypto.X509] | None
) -> ssl.CertificateOptions:
    """Context for ssl: listeners; asks for (but never requires) a client certificate."""
    options = ssl.CertificateOptions(
        privateKey=identity.private_certificate.privateKey.original,
        certificate=identity.chain[0],
        extraCertChain=list(identity.chain[1:]),
        verify=bool(trust_roots),
        caCerts=list(trust_roots or []),
        requireCertificate=False,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    context = options.getContext()
    # Idle connections then hold no TLS read/write buffers (tens of KiB each).
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if trust_roots:
        # Peer relays must be told which CAs we accept.
        for root in trust_roots:
            context.add_client_ca(root)
    return options


def client_connection_creator(
    hostname: str,
    identity: ServerIdentity | None,
    trust_roots: list[crypto.X509] | None,
) -> IOpenSSLClientConnectionCreator:
    """Outbound TLS: SNI, service_identity check of hostname, our certificate offered."""
    trust = (
        ssl.trustRootFromCertificates([ssl.Certificate(root) for root in trust_roots])
        if trust_roots
        else None
    )
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=trust,
        clientCertificate=identity.private_certificate if identity else None,
    )


@implementer(IOpenSSLTrustRoot)
class _OwnCertificate:
    """Trust exactly the relay's own certificate (partial chain: the leaf itself is the
    anchor), for connections between the workers of one relay: only a process holding
    the relay's private key can present it."""

    def __init__(self, identity: ServerIdentity) -> None:
        self._identity = identity

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        store = context.get_cert_store()
        if store is None:  # pragma: no cover - pyOpenSSL always has one
            raise TLSSetupError("no certificate store")
        for certificate in self._identity.chain:
            store.add_cert(certificate)
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)


def sibling_connection_creator(
    hostname: str, identity: ServerIdentity
) -> IOpenSSLClientConnectionCreator:
    """Outbound TLS to another worker of this relay ([relay] workers): its certificate
    must be ours and name ``hostname``; ours is offered in turn."""
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=_OwnCertificate(identity),
        clientCertificate=identity.private_certificate,
    )


TrustRoots = list[crypto.X509] | None


class ListenerTLS:
    """One ``ssl:`` listener's TLS context, rebuilt when the relay's keys are reloaded.

    The listener takes ``current`` for each connection it accepts, so a new context
    reaches new connections only; one already made keeps the context it was made
    with.  A fresh context, not ``load_cert_chain`` on the running one: the
    trust roots change with it, and nothing is half-replaced if a file is bad.
    """

    def __init__(self, build: Callable[[ServerIdentity, TrustRoots], Any], current: Any) -> None:
        self.build = build
        self.current = current


class TLSMaterial:
    """The relay's TLS identity and peer-relay trust roots as last (re)loaded.

    Everything that makes or accepts a TLS connection reads them here when it
    does, so :meth:`stage` followed by its commit switches every listener,
    outbound connection and peer check at once (relayd.reload).
    """

    def __init__(self, identity: ServerIdentity, trust_roots: TrustRoots) -> None:
        self.identity = identity
        self.trust_roots = trust_roots
        self._listeners: list[ListenerTLS] = []
        self._followers: list[Callable[[], None]] = []

    def listener(self, build: Callable[[ServerIdentity, TrustRoots], Any]) -> ListenerTLS:
        """A listener's context made by ``build`` now, and again on every reload."""
        tls = ListenerTLS(build, build(self.identity, self.trust_roots))
        self._listeners.append(tls)
        return tls

    def follow(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each reload, for holders of a copy of the material."""
        self._followers.append(callback)

    def client_creator(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """Outbound TLS to ``hostname`` with the current identity and trust roots."""
        return client_connection_creator(hostname, self.identity, self.trust_roots)

    def stage(self, identity: ServerIdentity, trust_roots: TrustRoots) -> Callable[[], None]:
        """Build every listener's context from new material; the returned callable
        switches to them.  Raises :class:`TLSSetupError` (nothing switched) if one
        cannot be built, such as a listener's own ``certKey`` that no longer loads."""
        try:
            contexts = [tls.build(identity, trust_roots) for tls in self._listeners]
        except (OSError, SSL.Error, stdlib_ssl.SSLError) as e:
            raise TLSSetupError(f"{identity.certificate_path}: {e}") from None

        def commit() -> None:
            self.identity, self.trust_roots = identity, trust_roots
            for tls, context in zip(self._listeners, contexts, strict=True):
                tls.current = context
            for callback in self._followers:
                callback()

        return commit


def tls_failure(reason: BaseException | None) -> str | None:
    """What went wrong, when a connection ended because TLS failed; else None.

    A certificate that does not name the host (service_identity) and an
    OpenSSL handshake error (an untrusted chain, no common protocol) read as
    one short line, OpenSSL's reasons without their library codes.
    """
    if isinstance(reason, VerificationError):
        return "the certificate does not name the host"
    if isinstance(reason, SSL.Error):
        parts = reason.args[0] if reason.args and isinstance(reason.args[0], list) else []
        details = [str(part[-1]) for part in parts if isinstance(part, tuple) and part]
        return ", ".join(d for d in details if d) or str(reason) or "handshake failed"
    return None


def fingerprint(certificate: crypto.X509) -> str:
    return hashlib.sha256(
        certificate.to_cryptography().public_bytes(serialization.Encoding.DER)
    ).hexdigest()
