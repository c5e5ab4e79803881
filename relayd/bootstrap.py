"""Start-up preparation: the operator's files checked, safe defaults created.

``prepare`` does everything that can fail because of the operator's files
(certificates, users file, trust roots, the lists file) and turns each failure
into a ``ConfigError`` naming the key, so twistd stops with one line before
anything listens.  On a first start on defaults it creates what the relay
needs: a 0700 data directory, a self-signed certificate, one user with its
password in a 0600 file, and the key consent URIs are signed with.
"""

from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from relayd.config import ConfigError, RelaydConfig
from relayd.consent.lists import URIList, URIListError, parse_lists_document
from relayd.keyfile import KeyFileError, load_or_create_key
from relayd.logs import logger
from relayd.net.endpoints import listener_identity, parse_endpoint
from relayd.net.tls import (
    ServerIdentity,
    TLSSetupError,
    load_identity,
    load_trust_roots,
    private_key_pem,
    subject_alt_names,
)
from relayd.users import UsersFile, UsersFileError, generate_password

log = logger()

GENERATED_USER = "relayd"

SELF_SIGNED_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Prepared:
    config: RelaydConfig
    identity: ServerIdentity
    trust_roots: list[crypto.X509] | None
    users: UsersFile
    hostname: str
    realm: str
    store_path: str = ""
    sip_domain: str = ""
    sip_lists: tuple[URIList, ...] = ()
    consent_key: bytes = b""
    worker_key: bytes = b""
    """With ``[relay] workers``: the key every worker shares, so that what one worker
    signs (digest nonces, form tokens, loop-detection hashes) another can check; see
    :func:`relayd.keyfile.derive_key`.  Empty for a single process, whose keys are
    drawn at each start."""


def prepare(config: RelaydConfig) -> Prepared:
    """Check and load the operator's files; create safe defaults on first start."""
    origin = config.source_of
    data_dir = Path(config.data_dir)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            origin("relay", "data_dir"), "relay", "data_dir", f"cannot create: {e.strerror}"
        ) from None
    _restrict(data_dir, origin("relay", "data_dir"))
    if config.tls.certificate:
        try:
            identity = load_identity(config.tls.certificate, config.tls.private_key)
        except TLSSetupError as e:
            raise ConfigError(origin("tls", "certificate"), "tls", "certificate", str(e)) from None
    else:
        cert, key, _ = ensure_self_signed(data_dir / "tls")
        identity = load_identity(cert, key)
    listener_keys = (
        ("msrp", config.msrp.listen),
        ("xcap", config.xcap.listen),
        ("sip", config.sip.listen),
    )
    for section, listeners in listener_keys:
        for text in listeners:
            try:
                listener_identity(identity, parse_endpoint(text))
            except TLSSetupError as e:
                raise ConfigError(origin(section, "listen"), section, "listen", str(e)) from None
    store_path = config.store.path or str(data_dir / "relay.sqlite3")
    if config.store.backend == "sqlite":
        folder = Path(store_path).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(
                origin("store", "path"),
                "store",
                "path",
                f"directory {str(folder)!r} is not writable",
            )
    trust_roots = None
    if config.msrp.ca_certificates:
        try:
            trust_roots = load_trust_roots(config.msrp.ca_certificates)
        except TLSSetupError as e:
            raise ConfigError(
                origin("msrp", "ca_certificates"), "msrp", "ca_certificates", str(e)
            ) from None
    hostname = _node_hostname(config.hostname, identity.dns_names, config.msrp.pool_names, origin)
    realm = config.auth.realm or hostname
    users_path = config.auth.users or str(data_dir / "users.htdigest")
    try:
        users = UsersFile(users_path)
    except UsersFileError as e:
        raise ConfigError(origin("auth", "users"), "auth", "users", str(e)) from None
    if not config.auth.users and len(users) == 0:
        _generate_user(users, data_dir, realm)
    domain = config.sip.domain or hostname
    lists: tuple[URIList, ...] = ()
    if config.sip.lists:
        try:
            lists = read_lists(config.sip.lists, domain)
        except URIListError as e:
            raise ConfigError(origin("sip", "lists"), "sip", "lists", str(e)) from None
    try:
        consent_key = load_or_create_key(data_dir / "consent.key")
        worker_key = load_or_create_key(data_dir / "workers.key") if config.workers > 1 else b""
    except KeyFileError as e:
        raise ConfigError(origin("relay", "data_dir"), "relay", "data_dir", str(e)) from None
    return Prepared(
        config,
        identity,
        trust_roots,
        users,
        hostname,
        realm,
        store_path,
        domain,
        lists,
        consent_key,
        worker_key,
    )


def _node_hostname(
    configured: str,
    dns_names: Sequence[str],
    pool_names: Sequence[str],
    origin: Callable[[str, str], str],
) -> str:
    """The name in this node's Use-Path URIs: ``[relay] hostname``, else the certificate's
    first DNS name that is not a pool name.  Never a pool name: requests of a session
    must reach the node that holds it, not any node of the pool (RFC 4976 Appendix A)."""
    pool = {name.lower() for name in pool_names}
    if configured:
        if configured.lower().strip("[]") in pool:
            raise ConfigError(
                origin("msrp", "pool_names"),
                "msrp",
                "pool_names",
                f"holds this node's own [relay] hostname {configured}: Use-Path URIs must"
                " name the node, the pool name is for AUTH only",
            )
        return configured
    own = [name for name in dns_names if name.lower() not in pool]
    if own:
        return own[0]
    if dns_names:
        raise ConfigError(
            origin("relay", "hostname"),
            "relay",
            "hostname",
            "the certificate names only the pool ([msrp] pool_names): set this node's own name",
        )
    return "localhost"


def prepare_shared(prepared: Prepared) -> None:
    """With ``[relay] workers``: what the workers share is made once, by the parent,
    before any starts, so none of them race to create it: the SQLite store's file, its
    WAL mode and schema (the certificate, users file and keys were made by ``prepare``)."""
    config = prepared.config
    if config.store.backend != "sqlite":
        return
    import sqlite3

    from relayd.consent.sqlite import StoreSchemaError, session

    try:
        with session(prepared.store_path):
            pass
    except (sqlite3.Error, StoreSchemaError, OSError) as e:
        raise ConfigError(
            config.source_of("store", "path"), "store", "path", f"cannot open the store: {e}"
        ) from None


def read_lists(path: str, domain: str) -> tuple[URIList, ...]:
    """The lists of the ``[sip] lists`` file, at start and on reload; raises
    :class:`URIListError` saying what is wrong."""
    try:
        with open(path, "rb") as handle:
            # Oversized lists load; requests to them are refused (403) instead.
            document = parse_lists_document(handle.read(), domain)
    except OSError as e:
        raise URIListError(str(e)) from None
    if document.unroutable:
        # The file exists only to define routes: a list or entry it cannot
        # route is the operator's mistake, not a document to keep as it is.
        first = document.unroutable[0]
        raise URIListError(f"{first.node}: {first.reason}")
    return document.lists


def _restrict(data_dir: Path, source: str) -> None:
    """0700 for a data directory of ours that already existed with a wider mode.

    ``mkdir(mode=0o700)`` only applies to a directory it creates, and this one
    holds the private key, the users file and the generated password.  A
    directory owned by someone else is left alone: it is theirs to set.
    """
    try:
        info = data_dir.stat()
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid != os.geteuid() or mode == 0o700:
            return
        os.chmod(data_dir, 0o700)
    except OSError as e:
        raise ConfigError(
            source, "relay", "data_dir", f"cannot restrict to mode 0700: {e.strerror}"
        ) from None
    log.warn(
        "Data directory {path} had mode {mode}; changed it to 0700",
        path=str(data_dir),
        mode=f"{mode:04o}",
    )


def _generate_user(users: UsersFile, data_dir: Path, realm: str) -> None:
    """First start on defaults: one user, credentials in a 0600 file, logged once."""
    password = generate_password()
    users.add_or_update(GENERATED_USER, realm, password)
    path = data_dir / "credentials.txt"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(f"username={GENERATED_USER}\nrealm={realm}\npassword={password}\n")
    log.info(
        "Created user {user} for realm {realm}; its password is in {path}",
        user=GENERATED_USER,
        realm=realm,
        path=str(path),
    )


def ensure_self_signed(
    directory: str | os.PathLike[str], names: tuple[str, ...] = SELF_SIGNED_NAMES
) -> tuple[str, str, bool]:
    """Generate a self-signed certificate for loopback use on first start.

    Returns (certificate path, key path, created).  ECDSA P-256 keeps
    handshakes cheap; the key file is 0600 and its directory 0700.
    """
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    cert_path = folder / "selfsigned-cert.pem"
    key_path = folder / "selfsigned-key.pem"
    if cert_path.exists() and key_path.exists():
        os.chmod(key_path, 0o600)
        return str(cert_path), str(key_path), False
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(subject_alt_names(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_key_pem(key))
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex(":")
    log.info(
        "Generated a self-signed certificate {path} (SHA-256 {fingerprint})",
        path=str(cert_path),
        fingerprint=fingerprint,
    )
    return str(cert_path), str(key_path), True
