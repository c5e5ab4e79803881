"""Where relayctl finds things: the same defaults as the relay, so they meet.

A newcomer runs ``twistd -n msrprelay`` on defaults, which creates a data
directory with a self-signed certificate, a users file and the generated
user's ``credentials.txt``.  relayctl derives every default path and the realm
exactly as ``relayd.bootstrap.prepare`` does (from ``relayd.config``, optionally
from the same INI file), so ``relayctl auth msrps://localhost:2855`` then works
without options.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from relayd.bootstrap import SELF_SIGNED_NAMES
from relayd.config import ConfigError, RelaydConfig, load_config
from relayd.msrp.uri import MSRPURI, MSRPURIError
from relayd.net.tls import TLSSetupError, load_identity

PASSWORD_ENV = "RELAYCTL_PASSWORD"  # noqa: S105  (a variable name, not a secret)
"""Environment variable holding the password (for scripts without a password file)."""

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
"""Hosts for which the relay's own self-signed certificate is trusted by default."""


class CtlError(Exception):
    """A failure reported as one ``relayctl: …`` line and exit status 1."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@dataclass(frozen=True)
class Locations:
    """The relay's files as the relay itself would find them."""

    data_dir: Path
    users_path: Path
    realm: str

    @property
    def credentials_path(self) -> Path:
        return self.data_dir / "credentials.txt"

    @property
    def self_signed_cert_path(self) -> Path:
        return self.data_dir / "tls" / "selfsigned-cert.pem"


def locate(config_path: str | None, data_dir: str | None) -> Locations:
    """Mirror ``relayd.bootstrap.prepare``: data_dir, users file and realm."""
    try:
        config = load_config(config_path)
    except ConfigError as e:
        raise CtlError(str(e)) from None
    folder = Path(os.path.expanduser(data_dir)) if data_dir else Path(config.data_dir)
    users = Path(config.auth.users) if config.auth.users else folder / "users.htdigest"
    return Locations(folder, users, _relay_realm(config))


def _relay_realm(config: RelaydConfig) -> str:
    if config.auth.realm:
        return config.auth.realm
    if config.hostname:
        return config.hostname
    if config.tls.certificate:
        try:
            names = load_identity(config.tls.certificate, config.tls.private_key).dns_names
        except TLSSetupError as e:
            raise CtlError(f"cannot find the relay's realm: {e}") from None
        if names:
            return names[0]
        return "localhost"
    return SELF_SIGNED_NAMES[0]


def relay_uri(text: str) -> str:
    """Accept ``msrps://host:port`` as typed by people and complete it to an MSRP URI.

    RFC 4975 §9 makes the transport mandatory, but nobody types ``;tcp``.
    """
    value = text.strip()
    if "://" not in value:
        value = "msrps://" + value
    if ";" not in value.split("://", 1)[1]:
        value += ";tcp"
    try:
        return MSRPURI.parse(value).format()
    except MSRPURIError as e:
        raise CtlError(f"bad relay URI {text!r}: {e.reason}") from None


def peer_path(values: list[str]) -> list[str]:
    """URIs from ``--to`` arguments, each of which may hold several (a pasted path)."""
    uris = [word for value in values for word in value.split()]
    if uris and uris[0] == "Path:":
        uris = uris[1:]
    if not uris:
        raise CtlError("--to needs at least one MSRP URI")
    for uri in uris:
        try:
            MSRPURI.parse(uri)
        except MSRPURIError as e:
            raise CtlError(f"bad --to URI {uri!r}: {e.reason}") from None
    return uris


def split_to_and_file(to_values: list[str], file: str | None) -> tuple[list[str], str]:
    """``--to A B FILE``: argparse gives the file to ``--to``; take it back.

    A pasted path is several words, so ``--to`` takes several; the file is
    then the last word that is not an MSRP URI.
    """
    values = list(to_values)
    if file is None:
        if len(values) < 2 or values[-1].lower().startswith(("msrp://", "msrps://")):
            raise CtlError("no file to send given")
        file = values.pop()
    return peer_path(values), file


def read_credentials_file(path: Path) -> dict[str, str]:
    """``key=value`` lines as written by the relay on first start."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CtlError(f"cannot read credentials file {path}: {e.strerror}") from None
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    if not values.get("username") or not values.get("password"):
        raise CtlError(f"credentials file {path} lacks username= or password=")
    return values


def read_password_file(path: str) -> str:
    """The first line of the file, so ``echo secret > file`` works."""
    try:
        with open(path, encoding="utf-8") as handle:
            password = handle.readline().rstrip("\r\n")
    except OSError as e:
        raise CtlError(f"cannot read password file {path}: {e.strerror}") from None
    if not password:
        raise CtlError(f"password file {path} is empty")
    return password


def resolve_credentials(
    user: str | None,
    password_file: str | None,
    credentials_file: str | None,
    locations: Locations,
    environ: Mapping[str, str],
    interactive: bool,
    ask: Callable[[str], str],
) -> Credentials:
    """Pick the user and password: explicit options, then environment, then files, then a prompt.

    Without ``--user`` the relay's generated ``credentials.txt`` is used, which
    is what makes the first run work without any option.
    """
    password: str | None = None
    if password_file:
        password = read_password_file(password_file)
    elif environ.get(PASSWORD_ENV):
        password = environ[PASSWORD_ENV]
    if user:
        if password is None:
            if not interactive:
                raise CtlError(
                    f"no password for {user}: use --password-file, set {PASSWORD_ENV}"
                    " or run on a terminal"
                )
            password = ask(f"Password for {user}: ")
        return Credentials(user, password)
    path = Path(credentials_file) if credentials_file else locations.credentials_path
    if not path.exists():
        raise CtlError(
            f"no --user given and no credentials file at {path}"
            " (give --user, or --credentials FILE)"
        )
    values = read_credentials_file(path)
    return Credentials(values["username"], password or values["password"])


def trust_anchor(ca: str | None, first_relay: str, locations: Locations) -> bytes | None:
    """The PEM to trust for the first relay, or None for the system's roots.

    A loopback relay on defaults has a self-signed certificate in its data
    directory; trusting exactly that file is as safe as it gets locally.
    """
    path: Path | None = Path(ca) if ca else None
    if path is None:
        host = MSRPURI.parse(first_relay).host.strip("[]").lower()
        if host in LOOPBACK_HOSTS and locations.self_signed_cert_path.exists():
            path = locations.self_signed_cert_path
    if path is None:
        return None
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise CtlError(f"cannot read --ca file {path}: {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise CtlError(f"--ca file {path} holds no PEM certificate")
    return pem
