"""Tests for relayd.config: defaults < INI file < command line, and every error message."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from relayd.config import SCHEMA, ConfigError, RelaydConfig, example_ini, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "etc/relayd.ini.example"


def write_ini(tmp_path: Path, text: str, name: str = "relayd.ini") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def config_error(path: str | None, overrides: dict[tuple[str, str], str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_load_without_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None)
    assert config.source == "<defaults>"
    assert config.hostname == ""
    assert config.data_dir == str(tmp_path / ".local" / "state" / "relayd")
    assert config.msrp.listen == ("ssl:2855:interface=127.0.0.1",)
    assert config.msrp.ca_certificates == ""
    assert config.msrp.session_expires_seconds == 1800
    assert config.msrp.session_expires_min_seconds == 60
    assert config.msrp.session_expires_max_seconds == 86400
    assert config.msrp.block_unknown_methods is False
    assert config.auth.realm == ""
    assert config.auth.allowed_users == ()
    assert config.auth.nonce_lifetime_seconds == 300
    assert config.tls.certificate == ""
    assert config.tls.private_key == ""


def test_defaults_listen_only_on_loopback() -> None:
    config = load_config(None)
    assert all("interface=127.0.0.1" in value for value in config.msrp.listen)


def test_ini_values_override_defaults(tmp_path: Path) -> None:
    path = write_ini(
        tmp_path,
        "[relay]\n"
        "hostname = relay.example.com\n"
        f"data_dir = {tmp_path / 'data'}\n"
        "[msrp]\n"
        "listen = ssl:2855:interface=127.0.0.1\n"
        "    tcp:2856:interface=127.0.0.1\n"
        "session_expires_seconds = 600\n"
        "block_unknown_methods = yes\n"
        "[auth]\n"
        "allowed_users = alice, bob carol\n"
        "realm = example\n",
    )
    config = load_config(path)
    assert config.source == path
    assert config.hostname == "relay.example.com"
    assert config.data_dir == str(tmp_path / "data")
    assert config.msrp.listen == ("ssl:2855:interface=127.0.0.1", "tcp:2856:interface=127.0.0.1")
    assert config.msrp.session_expires_seconds == 600
    assert config.msrp.block_unknown_methods is True
    assert config.auth.allowed_users == ("alice", "bob", "carol")
    assert config.auth.realm == "example"
    # Untouched keys keep their defaults.
    assert config.msrp.session_expires_max_seconds == 86400


def test_ini_percent_signs_are_not_interpolated(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[auth]\nrealm = 100%(x)s sure\n")
    assert load_config(path).auth.realm == "100%(x)s sure"


@pytest.mark.parametrize("text", ["yes", "True", "on", "1", "no", "FALSE", "off", "0"])
def test_boolean_spellings_accepted(tmp_path: Path, text: str) -> None:
    path = write_ini(tmp_path, f"[msrp]\nblock_unknown_methods = {text}\n")
    expected = text.lower() in ("yes", "true", "on", "1")
    assert load_config(path).msrp.block_unknown_methods is expected


def test_command_line_overrides_beat_the_file(tmp_path: Path) -> None:
    path = write_ini(
        tmp_path, "[relay]\nhostname = from-file.example.com\n[msrp]\nprobation_seconds = 20\n"
    )
    config = load_config(
        path,
        {
            ("relay", "hostname"): "from-cli.example.com",
            ("msrp", "listen"): "tcp:0:interface=127.0.0.1",
        },
    )
    assert config.hostname == "from-cli.example.com"
    assert config.msrp.listen == ("tcp:0:interface=127.0.0.1",)
    assert config.msrp.probation_seconds == 20


def test_command_line_overrides_without_file() -> None:
    config = load_config(None, {("msrp", "max_connections"): "10"})
    assert config.msrp.max_connections == 10


def test_command_line_unknown_key_is_reported_as_command_line() -> None:
    message = config_error(None, {("msrp", "no_such_key"): "1"})
    assert message == "command line: [msrp] no_such_key: unknown key"


def test_command_line_bad_value_names_command_line() -> None:
    message = config_error(None, {("msrp", "max_connections"): "many"})
    assert message.startswith("command line: [msrp] max_connections: ")
    assert "whole number" in message
    assert "'many'" in message


def test_error_carries_its_parts(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[msrp]\nmax_connections = lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == path
    assert info.value.section == "msrp"
    assert info.value.key == "max_connections"
    assert "whole number" in info.value.message


def test_unknown_section(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[relay]\nhostname = x\n[bogus]\nkey = 1\n")
    assert config_error(path) == f"{path}: [bogus]: unknown section"


def test_default_section_is_not_special(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[DEFAULT]\nhostname = x\n")
    assert config_error(path) == f"{path}: [DEFAULT]: unknown section"


def test_unknown_key(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[msrp]\nlisten_on = tcp:2855\n")
    assert config_error(path) == f"{path}: [msrp] listen_on: unknown key"


def test_keys_are_case_sensitive(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[relay]\nHostname = x\n")
    assert config_error(path) == f"{path}: [relay] Hostname: unknown key"


def test_bad_integer(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[msrp]\nsession_expires_seconds = 30m\n")
    message = config_error(path)
    assert message.startswith(f"{path}: [msrp] session_expires_seconds: ")
    assert "expected a whole number, got '30m'" in message


@pytest.mark.parametrize(
    ("key", "value", "bounds"),
    [
        ("probation_seconds", "0", "between 1 and 3600"),
        ("probation_seconds", "3601", "between 1 and 3600"),
        ("max_chunk_bytes", "1023", "between 1024 and"),
        ("session_expires_seconds", "-5", "between 1 and"),
    ],
)
def test_out_of_range_integer(tmp_path: Path, key: str, value: str, bounds: str) -> None:
    path = write_ini(tmp_path, f"[msrp]\n{key} = {value}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: [msrp] {key}: ")
    assert bounds in message
    assert f"got {value}" in message


def test_peer_chunk_overrides(tmp_path: Path) -> None:
    path = write_ini(
        tmp_path,
        "[msrp]\npeer_chunk_overrides = relay.example.com:2855=65536, 192.0.2.1=1048576"
        " [2001:db8::1]:2855=32768 [2001:db8::2]=16384\n",
    )
    assert load_config(path).msrp.peer_chunk_overrides == (
        ("relay.example.com", 2855, 65536),
        ("192.0.2.1", None, 1048576),
        ("2001:db8::1", 2855, 32768),
        ("2001:db8::2", None, 16384),
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("relay.example.com", "expected host[:port]=bytes, got 'relay.example.com'"),
        ("=65536", "expected host[:port]=bytes, got '=65536'"),
        ("relay.example.com=100", "between 1024 and"),
        ("relay.example.com:http=65536", "expected a whole number, got 'http'"),
    ],
)
def test_bad_peer_chunk_overrides(tmp_path: Path, value: str, problem: str) -> None:
    path = write_ini(tmp_path, f"[msrp]\npeer_chunk_overrides = {value}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: [msrp] peer_chunk_overrides: ")
    assert problem in message


def test_bad_boolean(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[msrp]\nblock_unknown_methods = maybe\n")
    message = config_error(path)
    assert message == f"{path}: [msrp] block_unknown_methods: expected yes or no, got 'maybe'"


def test_min_expiry_greater_than_max(tmp_path: Path) -> None:
    path = write_ini(
        tmp_path,
        "[msrp]\nsession_expires_min_seconds = 500\nsession_expires_max_seconds = 400\n"
        "session_expires_seconds = 450\n",
    )
    message = config_error(path)
    assert message.startswith(f"{path}: [msrp] session_expires_min_seconds: ")
    assert "greater than session_expires_max_seconds (500 > 400)" in message


def test_min_expiry_greater_than_max_set_only_in_file_names_the_file(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[msrp]\nsession_expires_max_seconds = 30\n")
    message = config_error(path)
    assert message.startswith(f"{path}: ")


@pytest.mark.parametrize("value", ["59", "86401"])
def test_default_expiry_outside_min_max(tmp_path: Path, value: str) -> None:
    path = write_ini(tmp_path, f"[msrp]\nsession_expires_seconds = {value}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: [msrp] session_expires_seconds: ")
    assert "between session_expires_min_seconds and session_expires_max_seconds" in message
    assert "(60..86400)" in message


def test_default_expiry_outside_max_set_only_in_file_names_the_file(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[msrp]\nsession_expires_max_seconds = 1000\n")
    message = config_error(path)
    assert message.startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("http:80", "expected tcp:PORT, ssl:PORT or udp:PORT"),
        ("tcp:port", "port must be a number"),
        ("tcp:70000", "port must be a number from 0 to 65535"),
        ("tcp:2855:colour=blue", "unknown option 'colour'"),
        ("tcp:2855:interface=a:interface=b", "option 'interface' given twice"),
    ],
)
def test_bad_endpoint_string(tmp_path: Path, value: str, fragment: str) -> None:
    path = write_ini(tmp_path, f"[msrp]\nlisten = {value}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: [msrp] listen: ")
    assert fragment in message


@pytest.mark.parametrize("section", ["msrp", "xcap", "sip"])
def test_listener_interface_that_is_no_address_is_refused_at_load(
    tmp_path: Path, section: str
) -> None:
    path = write_ini(tmp_path, f"[{section}]\nlisten = tcp:20000:interface=0.0.0.0x\n")
    message = config_error(path)
    assert message.startswith(f"{path}: [{section}] listen: ")
    assert "interface must be an IP address or localhost, got '0.0.0.0x'" in message


def test_sslmethod_in_a_listener_is_refused_at_load(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[msrp]\nlisten = ssl:20000:sslmethod=TLSv1_METHOD\n")
    message = config_error(path)
    assert message.startswith(f"{path}: [msrp] listen: ")
    assert "'sslmethod' is not supported" in message


def test_bad_endpoint_on_second_line(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[msrp]\nlisten = tcp:2855\n  tcp:nope\n")
    message = config_error(path)
    assert message.startswith(f"{path}: [msrp] listen: ")
    assert "'tcp:nope'" in message


def test_udp_not_allowed_for_msrp_listen(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[msrp]\nlisten = udp:5060\n")
    message = config_error(path)
    assert message == (
        f"{path}: [msrp] listen: 'udp:5060': listener type 'udp' not allowed here (use ssl or tcp)"
    )


def test_empty_listen_is_refused(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[msrp]\nlisten =\n")
    assert config_error(path) == f"{path}: [msrp] listen: at least one listener is required"


def test_unreadable_ca_certificates(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    path = write_ini(tmp_path, f"[msrp]\nca_certificates = {missing}\n")
    assert config_error(path) == f"{path}: [msrp] ca_certificates: cannot read {str(missing)!r}"


@pytest.mark.parametrize("key", ["certificate", "private_key"])
def test_unreadable_tls_file(tmp_path: Path, key: str) -> None:
    missing = tmp_path / "missing.pem"
    other = tmp_path / "present.pem"
    other.write_text("x")
    other_key = "private_key" if key == "certificate" else "certificate"
    path = write_ini(tmp_path, f"[tls]\n{key} = {missing}\n{other_key} = {other}\n")
    assert config_error(path) == f"{path}: [tls] {key}: cannot read {str(missing)!r}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their mode")
def test_tls_file_without_read_permission(tmp_path: Path) -> None:
    secret = tmp_path / "key.pem"
    secret.write_text("x")
    secret.chmod(0)
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    path = write_ini(tmp_path, f"[tls]\ncertificate = {cert}\nprivate_key = {secret}\n")
    assert "[tls] private_key: cannot read" in config_error(path)


def test_certificate_without_private_key(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    path = write_ini(tmp_path, f"[tls]\ncertificate = {cert}\n")
    assert config_error(path) == (
        f"{path}: [tls] private_key: must be set together with certificate"
    )


def test_private_key_without_certificate_names_the_file(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("x")
    path = write_ini(tmp_path, f"[tls]\nprivate_key = {key}\n")
    assert config_error(path) == (
        f"{path}: [tls] certificate: must be set together with private_key"
    )


def test_unreadable_private_key_in_listen_string(tmp_path: Path) -> None:
    missing = tmp_path / "listener-key.pem"
    path = write_ini(tmp_path, f"[msrp]\nlisten = ssl:2855:privateKey={missing}\n")
    assert config_error(path) == (
        f"{path}: [msrp] listen: privateKey: cannot read {str(missing)!r}"
    )


def test_unreadable_cert_key_in_listen_string_from_command_line(tmp_path: Path) -> None:
    missing = tmp_path / "listener-cert.pem"
    message = config_error(None, {("msrp", "listen"): f"ssl:2855:certKey={missing}"})
    assert message == f"command line: [msrp] listen: certKey: cannot read {str(missing)!r}"


def test_unreadable_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.ini")
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    assert "cannot read: No such file or directory" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    message = config_error(str(tmp_path))
    assert message.startswith(f"{tmp_path}: ")
    assert "cannot read" in message


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.ini"
    path.write_bytes("[auth]\nrealm = caf\u00e9\n".encode("latin-1"))
    message = config_error(str(path))
    assert message.startswith(f"{path}: ")
    assert message.endswith("not UTF-8 text")


@pytest.mark.parametrize(
    "text",
    [
        "hostname = no section header\n",
        '{"relay": {"hostname": "json"}}\n',
        "[relay]\nhostname = a\nhostname = b\n",
    ],
    ids=["no-section", "json", "duplicate-key"],
)
def test_non_ini_file(tmp_path: Path, text: str) -> None:
    path = write_ini(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    assert "not an INI file" in message
    assert "\n" not in message


def test_every_schema_key_is_in_the_config() -> None:
    config = load_config(None)
    sections: dict[str, object] = {
        "msrp": config.msrp,
        "auth": config.auth,
        "tls": config.tls,
        "relay": config,
        "xcap": config.xcap,
        "store": config.store,
        "sip": config.sip,
        "metrics": config.metrics,
    }
    for key in SCHEMA:
        assert hasattr(sections[key.section], key.name), (key.section, key.name)


def test_example_file_matches_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    on_disk = (ROOT / EXAMPLE).read_text(encoding="utf-8")
    assert on_disk == example_ini(), (
        "etc/relayd.ini.example is out of date: regenerate it from relayd.config.example_ini()"
    )
    monkeypatch.chdir(ROOT)
    from_example = load_config(EXAMPLE)
    defaults: RelaydConfig = load_config(None)
    assert from_example.source == EXAMPLE
    assert dataclasses.replace(from_example, source=defaults.source) == defaults


def test_example_documents_every_key() -> None:
    text = example_ini()
    for key in SCHEMA:
        assert f"\n{key.name} =" in text
        assert f"# {key.help}\n{key.name} =" in text


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("listen", "tcp:8080:interface=0.0.0.0", "plain HTTP (tcp:) is only allowed"),
        ("listen", "tcp:8080", "plain HTTP (tcp:) is only allowed"),
        ("listen", "udp:8080", "not allowed here"),
        ("root", "xcap", "must be an absolute path"),
        ("root", "/a//b", "must be a normalised path"),
        ("root", "/a/../b", "must be a normalised path"),
        ("public_url", "ftp://x.example/", "must be an http(s) URL"),
        ("public_url", "https://x.example/?q=1", "must not have a query"),
        ("max_body_bytes", "10", "must be between"),
    ],
)
def test_xcap_values_are_checked(tmp_path: Path, key: str, value: str, expected: str) -> None:
    path = write_ini(tmp_path, f"[xcap]\n{key} = {value}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: [xcap] {key}: ")
    assert expected in message


def test_xcap_plain_http_on_loopback_is_allowed(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[xcap]\nlisten = tcp:8080:interface=127.0.0.1\n")
    assert load_config(str(path)).xcap.listen == ("tcp:8080:interface=127.0.0.1",)


def test_store_backend_is_sqlite_postgresql_or_memory(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[store]\nbackend = redis\n")
    assert config_error(path).startswith(f"{path}: [store] backend: ")


def test_postgresql_store_takes_its_dsn(tmp_path: Path) -> None:
    dsn = "host=db.example.com dbname=relayd user=relayd"
    path = write_ini(tmp_path, f"[store]\nbackend = postgresql\ndsn = {dsn}\n")
    store = load_config(str(path)).store
    assert (store.backend, store.dsn) == ("postgresql", dsn)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backend = postgresql\n", "[store] dsn: required with backend = postgresql"),
        ("backend = postgresql\ndsn = host='db\n", "[store] dsn: not a libpq connection string"),
        ("dsn = host=db.example.com\n", "[store] dsn: only used with backend = postgresql"),
        ("backend = memory\ndsn = host=db\n", "[store] dsn: only used with backend = postgresql"),
    ],
)
def test_store_dsn_is_checked_at_load(tmp_path: Path, text: str, expected: str) -> None:
    path = write_ini(tmp_path, "[store]\n" + text)
    message = config_error(path)
    assert message.startswith(f"{path}: {expected}"), message
    assert "\n" not in message


def test_sip_defaults_listen_on_loopback_udp_and_tcp() -> None:
    sip = load_config(None).sip
    assert sip.listen == ("udp:5060:interface=127.0.0.1", "tcp:5060:interface=127.0.0.1")
    assert (sip.max_list_size, sip.consent_requests_per_hour) == (100, 30)
    assert sip.pending_consent_seconds == 86400
    assert sip.domain == "" and sip.lists == ""


def test_sip_listen_refuses_unknown_kinds() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {("sip", "listen"): "unix:/tmp/sip"})
    assert info.value.section == "sip" and info.value.key == "listen"


def test_sip_subscription_expiry_bounds_in_order() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            {
                ("sip", "subscription_expires_min_seconds"): "600",
                ("sip", "subscription_expires_seconds"): "300",
            },
        )
    assert info.value.key == "subscription_expires_seconds"


def test_sip_lists_file_must_be_readable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {("sip", "lists"): str(tmp_path / "missing.xml")})
    assert info.value.key == "lists"


def test_sip_limits_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {("sip", "max_list_size"): "0"})
    assert info.value.key == "max_list_size"


@pytest.mark.parametrize(
    "hostname", ["relay.example.com", "localhost", "127.0.0.1", "::1", "[2001:db8::1]", ""]
)
def test_hostname_dns_name_or_ip_address_is_accepted(hostname: str) -> None:
    assert load_config(None, {("relay", "hostname"): hostname}).hostname == hostname


@pytest.mark.parametrize(
    "hostname", ["bad host!", "relay_1.example", "999.1.1.1", "relay.example.", "[relay]", "a..b"]
)
def test_hostname_that_no_uri_can_carry_is_refused_at_load(tmp_path: Path, hostname: str) -> None:
    path = write_ini(tmp_path, f"[relay]\nhostname = {hostname}\n")
    message = config_error(path)
    assert message == (
        f"{path}: [relay] hostname: expected a DNS name or an IP address"
        f" (without a trailing dot), got {hostname!r}"
    )


def test_each_value_remembers_where_it_came_from(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[auth]\nrealm = file-realm\n[tls]\ncertificate =\n")
    config = load_config(path, {("tls", "private_key"): ""})
    assert config.source == path
    assert config.source_of("auth", "realm") == path
    assert config.source_of("tls", "certificate") == path
    assert config.source_of("tls", "private_key") == "command line"
    assert config.source_of("msrp", "listen") == "<defaults>"


@pytest.mark.parametrize("section", ["msrp", "sip", "xcap"])
def test_every_listeners_tls_files_must_be_readable(tmp_path: Path, section: str) -> None:
    missing = tmp_path / "listener-key.pem"
    message = config_error(None, {(section, "listen"): f"ssl:0:privateKey={missing}"})
    assert message == (
        f"command line: [{section}] listen: privateKey: cannot read {str(missing)!r}"
    )


def test_sip_default_subscription_expiry_outside_its_bounds_names_them() -> None:
    message = config_error(
        None,
        {
            ("sip", "subscription_expires_min_seconds"): "600",
            ("sip", "subscription_expires_seconds"): "300",
            ("sip", "subscription_expires_max_seconds"): "900",
        },
    )
    assert message == (
        "command line: [sip] subscription_expires_seconds: must lie between"
        " subscription_expires_min_seconds and subscription_expires_max_seconds (600..900)"
    )


def test_metrics_are_off_by_default() -> None:
    assert load_config(None).metrics.listen == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tcp:9100", "only a loopback interface"),
        ("tcp:9100:interface=192.0.2.1", "only a loopback interface"),
        ("ssl:9100:interface=127.0.0.1", "not allowed here"),
    ],
)
def test_metrics_listen_is_checked(tmp_path: Path, value: str, expected: str) -> None:
    path = write_ini(tmp_path, f"[metrics]\nlisten = {value}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: [metrics] listen: ")
    assert expected in message


def test_metrics_listen_off_loopback_when_allowed(tmp_path: Path) -> None:
    path = write_ini(
        tmp_path, "[metrics]\nlisten = tcp:9100:interface=192.0.2.1\nallow_remote = yes\n"
    )
    config = load_config(str(path))
    assert config.metrics.listen == ("tcp:9100:interface=192.0.2.1",)
    assert config.metrics.allow_remote


def test_workers_default_to_one() -> None:
    assert load_config(None).workers == 1


def test_workers_need_fixed_shared_ports() -> None:
    message = config_error(
        None, {("relay", "workers"): "2", ("sip", "listen"): "udp:0:interface=127.0.0.1"}
    )
    assert message.startswith("command line: [sip] listen: 'udp:0:interface=127.0.0.1':")
    assert "port must be fixed" in message
    message = config_error(
        None, {("relay", "workers"): "2", ("xcap", "listen"): "ssl:0:interface=127.0.0.1"}
    )
    assert "[xcap] listen" in message


def test_workers_need_a_port_for_the_last_worker() -> None:
    message = config_error(
        None, {("relay", "workers"): "3", ("msrp", "listen"): "ssl:65534:interface=127.0.0.1"}
    )
    assert "[msrp] listen" in message and "worker 2 would listen on port 65536" in message


def test_workers_refuse_the_memory_store() -> None:
    message = config_error(None, {("relay", "workers"): "2", ("store", "backend"): "memory"})
    assert message.startswith("command line: [store] backend: memory keeps one store")


def test_workers_range() -> None:
    assert "between 1 and 64" in config_error(None, {("relay", "workers"): "0"})
    assert load_config(None, {("relay", "workers"): "4"}).workers == 4


def test_workers_ports_must_not_collide() -> None:
    message = config_error(
        None,
        {
            ("relay", "workers"): "2",
            ("msrp", "listen"): "ssl:2855:interface=127.0.0.1\ntcp:2856:interface=127.0.0.1",
        },
    )
    assert "[msrp] listen: 'tcp:2856:interface=127.0.0.1' gives worker 0 port 2856" in message
    assert "'ssl:2855:interface=127.0.0.1' ([msrp] listen) gives worker 1" in message
    message = config_error(
        None, {("relay", "workers"): "2", ("msrp", "listen"): "tcp:5059:interface=127.0.0.1"}
    )
    assert "gives worker 1 port 5060" in message and "every worker" in message
    # Other interfaces, other protocols and spaced ports are fine.
    assert (
        load_config(
            None,
            {
                ("relay", "workers"): "2",
                ("msrp", "listen"): "ssl:2855:interface=127.0.0.1\nssl:2855:interface=127.0.0.2"
                "\ntcp:2857:interface=127.0.0.1",
            },
        ).workers
        == 2
    )
