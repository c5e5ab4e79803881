"""Tests for relayd.net.tls: generated certificates, loading, trust roots and contexts."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from relayd.net.tls import (
    ServerIdentity,
    TLSSetupError,
    certificate_dns_names,
    certificate_ip_names,
    certificate_matches,
    fingerprint,
    load_identity,
    load_trust_roots,
    server_context_factory,
    stdlib_server_context,
    with_extra_chain,
)
from relayd.testing import IntermediatePKI, RelayPKI, make_intermediate_pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> RelayPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def identity(pki: RelayPKI) -> ServerIdentity:
    cert, key = pki.leaf("relay.example.com", "alt.example.com", "127.0.0.1")
    return load_identity(cert, key)


def _cn(certificate: crypto.X509) -> str:
    names = certificate.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_key(
    path: Path, key: object, encryption: serialization.KeySerializationEncryption
) -> str:
    assert isinstance(key, ec.EllipticCurvePrivateKey | dsa.DSAPrivateKey)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return str(path)


# -- load_identity ---------------------------------------------------------------------


def test_load_identity_with_chain(pki: RelayPKI, identity: ServerIdentity) -> None:
    assert len(identity.chain) == 2
    assert _cn(identity.chain[1]) == "relayd test CA"
    assert identity.dns_names == ["relay.example.com", "alt.example.com"]


def test_load_identity_missing_certificate(tmp_path: Path, pki: RelayPKI) -> None:
    _, key = pki.leaf("missing-cert.example.com")
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(TLSSetupError, match=f"cannot read {missing}: No such file"):
        load_identity(missing, key)


def test_load_identity_missing_key(tmp_path: Path, pki: RelayPKI) -> None:
    cert, _ = pki.leaf("missing-key.example.com")
    missing = str(tmp_path / "nope-key.pem")
    with pytest.raises(TLSSetupError, match=f"cannot read {missing}"):
        load_identity(cert, missing)


def test_load_identity_garbage_certificate(tmp_path: Path, pki: RelayPKI) -> None:
    _, key = pki.leaf("garbage.example.com")
    bad = tmp_path / "garbage.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSSetupError) as info:
        load_identity(str(bad), key)
    assert str(info.value) == f"{bad}: not a PEM certificate"


def test_load_identity_file_without_certificate(tmp_path: Path, pki: RelayPKI) -> None:
    _, key = pki.leaf("empty.example.com")
    bad = tmp_path / "empty.pem"
    bad.write_text("hello\n")
    with pytest.raises(TLSSetupError) as info:
        load_identity(str(bad), key)
    assert str(info.value) == f"{bad}: no certificate found"


def test_load_identity_key_not_matching_certificate(pki: RelayPKI) -> None:
    cert, _ = pki.leaf("one.example.com")
    _, other_key = pki.leaf("two.example.com")
    with pytest.raises(TLSSetupError) as info:
        load_identity(cert, other_key)
    assert str(info.value) == f"{other_key} does not match the certificate in {cert}"


def test_load_identity_encrypted_key(tmp_path: Path, pki: RelayPKI) -> None:
    cert, _ = pki.leaf("encrypted.example.com")
    key = _write_key(
        tmp_path / "encrypted-key.pem",
        ec.generate_private_key(ec.SECP256R1()),
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    with pytest.raises(TLSSetupError) as info:
        load_identity(cert, key)
    assert str(info.value) == f"{key}: not an unencrypted PEM private key"


def test_load_identity_garbage_key(tmp_path: Path, pki: RelayPKI) -> None:
    cert, _ = pki.leaf("garbage-key.example.com")
    key = tmp_path / "garbage-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TLSSetupError, match=f"{key}: not an unencrypted PEM private key"):
        load_identity(cert, str(key))


def test_load_identity_unusable_key_type(tmp_path: Path, pki: RelayPKI) -> None:
    cert, _ = pki.leaf("dsa.example.com")
    key = _write_key(
        tmp_path / "dsa-key.pem",
        dsa.generate_private_key(2048),
        serialization.NoEncryption(),
    )
    with pytest.raises(TLSSetupError, match="key type not usable for TLS"):
        load_identity(cert, key)


# -- trust roots and names -----------------------------------------------------------------


def test_load_trust_roots_from_file(pki: RelayPKI) -> None:
    roots = load_trust_roots(pki.ca_path)
    assert [_cn(root) for root in roots] == ["relayd test CA"]


def test_load_trust_roots_from_directory(tmp_path: Path) -> None:
    first = make_pki(tmp_path / "first")
    second = make_pki(tmp_path / "second")
    folder = tmp_path / "roots"
    folder.mkdir()
    (folder / "a.pem").write_bytes(first.ca_pem)
    (folder / "b.crt").write_bytes(second.ca_pem)
    (folder / "README.txt").write_text("not a certificate")
    roots = load_trust_roots(str(folder))
    assert [fingerprint(r) for r in roots] == [
        fingerprint(crypto.load_certificate(crypto.FILETYPE_PEM, p))
        for p in (first.ca_pem, second.ca_pem)
    ]


def test_load_trust_roots_bundle_with_several_certificates(tmp_path: Path) -> None:
    first = make_pki(tmp_path / "first")
    second = make_pki(tmp_path / "second")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(first.ca_pem + second.ca_pem)
    assert len(load_trust_roots(str(bundle))) == 2


def test_load_trust_roots_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(TLSSetupError, match="no certificates found"):
        load_trust_roots(str(tmp_path))


def test_load_trust_roots_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSSetupError, match=f"{missing}: cannot load trust roots"):
        load_trust_roots(str(missing))


def test_load_trust_roots_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSSetupError, match=f"{bad}: cannot load trust roots"):
        load_trust_roots(str(bad))


def test_certificate_dns_names_in_order_without_ip_addresses(pki: RelayPKI) -> None:
    cert, _ = pki.leaf("b.example.com", "a.example.com", "10.0.0.1", "::1")
    leaf = crypto.load_certificate(crypto.FILETYPE_PEM, Path(cert).read_bytes())
    assert certificate_dns_names(leaf) == ["b.example.com", "a.example.com"]


def test_certificate_dns_names_without_san(pki: RelayPKI) -> None:
    ca = crypto.load_certificate(crypto.FILETYPE_PEM, pki.ca_pem)
    assert certificate_dns_names(ca) == []


# -- server contexts -----------------------------------------------------------------------


def test_server_context_releases_buffers_and_needs_tls12(identity: ServerIdentity) -> None:
    context = server_context_factory(identity, None).getContext()
    assert context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS
    options = context.set_options(0)
    assert options & SSL.OP_NO_SSLv3
    assert options & SSL.OP_NO_TLSv1
    assert options & SSL.OP_NO_TLSv1_1
    assert not options & SSL.OP_NO_TLSv1_2


def test_server_context_without_trust_roots_asks_no_certificate(
    identity: ServerIdentity,
) -> None:
    context = server_context_factory(identity, None).getContext()
    assert context.get_verify_mode() == SSL.VERIFY_NONE


def test_server_context_requests_but_does_not_require_client_certificate(
    pki: RelayPKI, identity: ServerIdentity
) -> None:
    roots = load_trust_roots(pki.ca_path)
    context = server_context_factory(identity, roots).getContext()
    mode = context.get_verify_mode()
    assert mode & SSL.VERIFY_PEER
    assert not mode & SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    connection = SSL.Connection(context, None)
    connection.set_accept_state()
    assert [name.CN for name in connection.get_client_ca_list()] == ["relayd test CA"]


def _handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    """Drive a memory-BIO handshake to completion (or raise the SSL error)."""
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(20):
        done = 0
        for side in (client, server):
            try:
                side.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
        for source, sink in ((client, server), (server, client)):
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                continue
            sink.bio_write(data)
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def _client(ca_pem: bytes, cert_key: tuple[str, str] | None = None) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.get_cert_store().add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, ca_pem))  # type: ignore[union-attr]
    context.set_verify(SSL.VERIFY_PEER)
    if cert_key is not None:
        context.use_certificate_chain_file(cert_key[0])
        context.use_privatekey_file(cert_key[1])
    return SSL.Connection(context, None)


def test_handshake_without_client_certificate_succeeds(
    pki: RelayPKI, identity: ServerIdentity
) -> None:
    roots = load_trust_roots(pki.ca_path)
    server = SSL.Connection(server_context_factory(identity, roots).getContext(), None)
    client = _client(pki.ca_pem)
    _handshake(server, client)
    assert server.get_peer_certificate() is None
    assert server.get_protocol_version_name() in ("TLSv1.2", "TLSv1.3")


def test_handshake_with_client_certificate_reveals_it(
    pki: RelayPKI, identity: ServerIdentity
) -> None:
    roots = load_trust_roots(pki.ca_path)
    server = SSL.Connection(server_context_factory(identity, roots).getContext(), None)
    client = _client(pki.ca_pem, pki.leaf("peer.example.com"))
    _handshake(server, client)
    peer = server.get_peer_certificate()
    assert peer is not None
    assert certificate_dns_names(peer) == ["peer.example.com"]


def test_handshake_with_untrusted_client_certificate_fails(
    tmp_path: Path, pki: RelayPKI, identity: ServerIdentity
) -> None:
    stranger = make_pki(tmp_path / "stranger")
    roots = load_trust_roots(pki.ca_path)
    server = SSL.Connection(server_context_factory(identity, roots).getContext(), None)
    client = _client(pki.ca_pem, stranger.leaf("peer.example.com"))
    with pytest.raises(SSL.Error):
        _handshake(server, client)


def test_stdlib_context_without_peer_roots_asks_no_certificate(identity: ServerIdentity) -> None:
    import ssl

    context = stdlib_server_context(identity, None)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    assert context.num_tickets == 0


def test_stdlib_context_with_peer_roots_requests_but_does_not_require(
    pki: RelayPKI, identity: ServerIdentity
) -> None:
    import ssl

    context = stdlib_server_context(identity, load_trust_roots(pki.ca_path))
    assert context.verify_mode == ssl.CERT_OPTIONAL
    assert context.cert_store_stats()["x509_ca"] == 1


def test_certificate_matches_dns_and_ip_names(pki: RelayPKI) -> None:
    cert_path, _ = pki.leaf("relay.example.test", "127.0.0.7")
    leaf = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    assert certificate_matches(leaf, "relay.example.test")
    assert certificate_matches(leaf, "127.0.0.7")
    assert not certificate_matches(leaf, "other.example.test")
    assert not certificate_matches(leaf, "127.0.0.8")
    assert certificate_ip_names(leaf) == ["127.0.0.7"]
    assert certificate_dns_names(leaf) == ["relay.example.test"]


# -- extraCertChain: intermediates in a file of their own -----------------------------------


@pytest.fixture(scope="module")
def intermediate_pki(tmp_path_factory: pytest.TempPathFactory) -> IntermediatePKI:
    return make_intermediate_pki(tmp_path_factory.mktemp("intermediate"), "relay.example.com")


def _stdlib_handshake(context: ssl.SSLContext, client: SSL.Connection) -> None:
    """Drive the standard library's server side against a pyOpenSSL client in memory."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = context.wrap_bio(incoming, outgoing, server_side=True)
    client.set_connect_state()
    for _ in range(20):
        done = 0
        try:
            client.do_handshake()
            done += 1
        except SSL.WantReadError:
            pass
        try:
            incoming.write(client.bio_read(65536))
        except SSL.WantReadError:
            pass
        try:
            server.do_handshake()
            done += 1
        except ssl.SSLWantReadError:
            pass
        data = outgoing.read()
        if data:
            client.bio_write(data)
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def _chain_names(client: SSL.Connection) -> list[str]:
    return [_cn(certificate) for certificate in client.get_peer_cert_chain() or []]


def test_extra_chain_is_appended_to_the_identity(intermediate_pki: IntermediatePKI) -> None:
    identity = load_identity(intermediate_pki.leaf_path, intermediate_pki.key_path)
    extended = with_extra_chain(identity, intermediate_pki.intermediate_path)
    assert [_cn(c) for c in extended.chain] == ["relay.example.com", "relayd test intermediate"]
    assert extended.extra_chain_path == intermediate_pki.intermediate_path
    assert identity.chain == extended.chain[:1]  # the shared identity is left alone


def test_pyopenssl_listener_serves_the_extra_chain(intermediate_pki: IntermediatePKI) -> None:
    identity = load_identity(intermediate_pki.leaf_path, intermediate_pki.key_path)
    extended = with_extra_chain(identity, intermediate_pki.intermediate_path)
    server = SSL.Connection(server_context_factory(extended, None).getContext(), None)
    client = _client(intermediate_pki.root_pem)  # trusts the root only
    _handshake(server, client)
    assert _chain_names(client) == ["relay.example.com", "relayd test intermediate"]


def test_stdlib_listener_serves_the_extra_chain(intermediate_pki: IntermediatePKI) -> None:
    identity = load_identity(intermediate_pki.leaf_path, intermediate_pki.key_path)
    extended = with_extra_chain(identity, intermediate_pki.intermediate_path)
    client = _client(intermediate_pki.root_pem)
    _stdlib_handshake(stdlib_server_context(extended, None), client)
    assert _chain_names(client) == ["relay.example.com", "relayd test intermediate"]


def test_without_the_extra_chain_a_root_only_client_cannot_verify(
    intermediate_pki: IntermediatePKI,
) -> None:
    identity = load_identity(intermediate_pki.leaf_path, intermediate_pki.key_path)
    with pytest.raises(SSL.Error):
        _stdlib_handshake(stdlib_server_context(identity, None), _client(intermediate_pki.root_pem))


def test_extra_chain_that_is_not_pem_is_refused(
    tmp_path: Path, intermediate_pki: IntermediatePKI
) -> None:
    identity = load_identity(intermediate_pki.leaf_path, intermediate_pki.key_path)
    garbage = tmp_path / "chain.pem"
    garbage.write_text("no certificate here\n")
    with pytest.raises(TLSSetupError, match=r"extraCertChain: .*no certificate found"):
        with_extra_chain(identity, str(garbage))
    with pytest.raises(TLSSetupError, match="extraCertChain: cannot read"):
        with_extra_chain(identity, str(tmp_path / "absent.pem"))
