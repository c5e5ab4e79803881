"""Tests for relayd.bootstrap: prepare's checks and the defaults it creates."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel

from relayd.bootstrap import SELF_SIGNED_NAMES, ensure_self_signed, prepare
from relayd.config import ConfigError, load_config
from relayd.net.endpoints import listener_identity, parse_endpoint
from relayd.net.tls import load_identity
from relayd.testing import captured_log, make_intermediate_pki, make_pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def overrides(tmp_path: Path, **extra: str) -> dict[tuple[str, str], str]:
    values = {("relay", "data_dir"): str(tmp_path / "data"), ("store", "backend"): "memory"}
    for name, value in extra.items():
        section, key = name.split("__")
        values[(section, key)] = value
    return values


@pytest.fixture
def events() -> Iterator[EventLoggingObserver]:
    with captured_log() as observer:
        yield observer


def test_existing_data_dir_is_tightened_once(tmp_path: Path, events: EventLoggingObserver) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # noqa: S103 - the too-open mode under test
    config = load_config(None, overrides(tmp_path))
    prepare(config)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    changed = [e for e in events if "had mode" in (e.get("log_format") or "")]
    assert [(e["path"], e["mode"], e["log_level"]) for e in changed] == [
        (str(data), "0755", LogLevel.warn)
    ]
    prepare(config)  # already 0700: nothing to say
    assert len([e for e in events if "had mode" in (e.get("log_format") or "")]) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_data_dir_of_another_owner_keeps_its_mode(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)  # noqa: S103 - the too-open mode under test
    os.chown(data, 65534, 65534)
    prepare(load_config(None, overrides(tmp_path)))
    assert stat.S_IMODE(data.stat().st_mode) == 0o755


def test_file_errors_name_the_command_line_when_the_value_came_from_it(tmp_path: Path) -> None:
    ini = tmp_path / "good.ini"
    ini.write_text("[auth]\nrealm = good\n", encoding="utf-8")
    garbage = tmp_path / "not-a-certificate"
    garbage.write_text("hello\n")
    values = overrides(tmp_path, tls__certificate=str(garbage), tls__private_key=str(garbage))
    with pytest.raises(ConfigError) as info:
        prepare(load_config(str(ini), values))
    assert str(info.value).startswith("command line: [tls] certificate: ")


def test_file_errors_name_the_file_when_the_value_came_from_it(tmp_path: Path) -> None:
    garbage = tmp_path / "not-a-certificate"
    garbage.write_text("hello\n")
    ini = tmp_path / "good.ini"
    ini.write_text(f"[tls]\ncertificate = {garbage}\nprivate_key = {garbage}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        prepare(load_config(str(ini), overrides(tmp_path)))
    assert str(info.value).startswith(f"{ini}: [tls] certificate: ")


def test_extra_cert_chain_is_served_by_the_listener(tmp_path: Path) -> None:
    pki = make_intermediate_pki(tmp_path / "pki", "127.0.0.1")
    listen = (
        f"ssl:22855:interface=127.0.0.1:certKey={pki.leaf_path}:privateKey={pki.key_path}"
        f":extraCertChain={pki.intermediate_path}"
    )
    prepared = prepare(load_config(None, overrides(tmp_path, msrp__listen=listen)))
    identity = listener_identity(prepared.identity, parse_endpoint(listen))
    subjects = [c.to_cryptography().subject.rfc4514_string() for c in identity.chain]
    assert subjects == ["CN=127.0.0.1", "CN=relayd test intermediate"]


def test_extra_cert_chain_without_certificates_is_refused_by_prepare(tmp_path: Path) -> None:
    garbage = tmp_path / "chain.pem"
    garbage.write_text("hello\n")
    listen = f"ssl:22855:interface=127.0.0.1:extraCertChain={garbage}"
    with pytest.raises(ConfigError) as info:
        prepare(load_config(None, overrides(tmp_path, msrp__listen=listen)))
    assert str(info.value) == (
        f"command line: [msrp] listen: extraCertChain: {garbage}: no certificate found"
    )


def test_a_lists_file_entry_the_relay_cannot_route_stops_start(tmp_path: Path) -> None:
    """The store keeps such entries (docs/consent.md); the file only defines routes."""
    lists = tmp_path / "lists.xml"
    lists.write_bytes(
        b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists">'
        b'<list name="staff"><entry uri="sip:bob@x.test"/><entry uri="mailto:bob@x.test"/>'
        b"</list></resource-lists>"
    )
    with pytest.raises(ConfigError) as info:
        prepare(load_config(None, overrides(tmp_path, sip__lists=str(lists))))
    assert str(info.value).endswith(
        '[sip] lists: resource-lists/list[@name="staff"]/entry[@uri="mailto:bob@x.test"]:'
        " mailto: URIs are not relayed (only sip: and sips:)"
    )


def _pool_node(tmp_path: Path, *names: str, **extra: str) -> str:
    cert, key = make_pki(tmp_path / "pki").leaf(*names)
    config = load_config(
        None,
        overrides(
            tmp_path,
            tls__certificate=cert,
            tls__private_key=key,
            msrp__pool_names="example.com",
            **extra,
        ),
    )
    return prepare(config).hostname


def test_a_pool_node_names_itself_even_when_the_certificate_lists_the_pool_first(
    tmp_path: Path,
) -> None:
    """RFC 4976 Appendix A: a session's requests must reach its node, not the pool."""
    assert _pool_node(tmp_path, "example.com", "relay1.example.com") == "relay1.example.com"


def test_a_pool_name_as_the_nodes_hostname_stops_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _pool_node(tmp_path, "relay1.example.com", relay__hostname="Example.com")
    assert "[msrp] pool_names: holds this node's own [relay] hostname Example.com" in str(
        info.value
    )
    with pytest.raises(ConfigError) as only:
        _pool_node(tmp_path / "other", "example.com")
    assert "[relay] hostname: the certificate names only the pool" in str(only.value)


# -- ensure_self_signed ---------------------------------------------------------------


def test_self_signed_files_and_permissions(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "tls"
    cert, key, created = ensure_self_signed(folder)
    assert created is True
    assert Path(cert).parent == folder
    assert Path(key).parent == folder
    assert _mode(folder) == 0o700
    assert _mode(Path(key)) == 0o600
    assert Path(cert).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_self_signed_tightens_an_existing_directory(tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    ensure_self_signed(folder)
    assert _mode(folder) == 0o700


def test_self_signed_is_idempotent(tmp_path: Path) -> None:
    cert, key, created = ensure_self_signed(tmp_path / "tls")
    before = (Path(cert).read_bytes(), Path(key).read_bytes())
    again = ensure_self_signed(tmp_path / "tls")
    assert again == (cert, key, False)
    assert (Path(cert).read_bytes(), Path(key).read_bytes()) == before
    assert created is True


def test_self_signed_regenerates_when_the_key_is_gone(tmp_path: Path) -> None:
    cert, key, _ = ensure_self_signed(tmp_path / "tls")
    old = Path(cert).read_bytes()
    Path(key).unlink()
    _, _, created = ensure_self_signed(tmp_path / "tls")
    assert created is True
    assert Path(cert).read_bytes() != old
    load_identity(cert, key)


def test_self_signed_names_and_usability(tmp_path: Path) -> None:
    cert_path, key_path, _ = ensure_self_signed(tmp_path / "tls")
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert SELF_SIGNED_NAMES == ("localhost", "127.0.0.1", "::1")
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
    identity = load_identity(cert_path, key_path)
    assert identity.dns_names == ["localhost"]
    assert len(identity.chain) == 1
