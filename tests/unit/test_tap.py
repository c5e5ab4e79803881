"""Tests for relayd.tap: twistd options, their precedence and makeService wiring."""

from __future__ import annotations

import gc
import stat
from pathlib import Path

import pytest
from twisted.application.service import IServiceCollection, MultiService
from twisted.python import usage

import relayd.tap
from relayd.bootstrap import Prepared
from relayd.config import example_ini
from relayd.msrp.service import MSRPService
from relayd.tap import ConfigRefused, Options, makeService
from relayd.testing import make_pki, write_users

LISTEN = "tcp:0:interface=127.0.0.1"


def parse(tmp_path: Path, *args: str) -> Options:
    options = Options()
    options.parseOptions(["--data-dir", str(tmp_path / "data"), *args])
    return options


def prepared(options: Options) -> Prepared:
    value = options["prepared"]
    assert isinstance(value, Prepared)
    return value


def usage_error(tmp_path: Path, *args: str) -> str:
    with pytest.raises(usage.UsageError) as info:
        parse(tmp_path, *args)
    return str(info.value)


def config_refused(tmp_path: Path, *args: str) -> str:
    """The one line a bad configuration writes to stderr; it exits with status 1."""
    with pytest.raises(ConfigRefused) as info:
        parse(tmp_path, *args)
    assert info.value.code == 1
    return info.value.message


def test_defaults_with_data_dir(tmp_path: Path) -> None:
    options = parse(tmp_path)
    result = prepared(options)
    data = tmp_path / "data"
    assert result.config.data_dir == str(data)
    assert result.config.source == "<defaults>"
    assert result.config.msrp.listen == ("ssl:2855:interface=127.0.0.1",)
    # Safe defaults: a generated certificate and one generated user.
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert (data / "tls" / "selfsigned-cert.pem").exists()
    assert result.hostname == "localhost"
    assert result.realm == "localhost"
    assert len(result.users) == 1
    credentials = data / "credentials.txt"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert "username=relayd\n" in credentials.read_text()


def test_msrp_listen_is_repeatable(tmp_path: Path) -> None:
    options = parse(tmp_path, "--msrp-listen", LISTEN, "--msrp-listen", "ssl:0:interface=127.0.0.1")
    assert options["msrp-listen"] == [LISTEN, "ssl:0:interface=127.0.0.1"]
    assert prepared(options).config.msrp.listen == (LISTEN, "ssl:0:interface=127.0.0.1")


def test_config_file_then_command_line(tmp_path: Path) -> None:
    ini = tmp_path / "relayd.ini"
    ini.write_text(
        "[relay]\nhostname = file.example.com\ndata_dir = /nonexistent/never/used\n"
        "[msrp]\nlisten = ssl:2855:interface=127.0.0.1\nprobation_seconds = 20\n"
        "[auth]\nrealm = file-realm\n",
        encoding="utf-8",
    )
    options = parse(
        tmp_path,
        "--config",
        str(ini),
        "--hostname",
        "cli.example.com",
        "--msrp-listen",
        LISTEN,
        "--set",
        "msrp.max_connections=7",
    )
    result = prepared(options)
    assert result.config.source == str(ini)
    assert result.config.data_dir == str(tmp_path / "data")
    assert result.hostname == "cli.example.com"
    assert result.realm == "file-realm"
    assert result.config.msrp.listen == (LISTEN,)
    assert result.config.msrp.probation_seconds == 20
    assert result.config.msrp.max_connections == 7


def test_short_config_option(tmp_path: Path) -> None:
    ini = tmp_path / "relayd.ini"
    ini.write_text("[auth]\nrealm = short\n", encoding="utf-8")
    assert prepared(parse(tmp_path, "-c", str(ini))).realm == "short"


def test_realm_and_users_options(tmp_path: Path) -> None:
    users = write_users(tmp_path / "users.htdigest", "cli-realm", {"alice": "pw"})
    result = prepared(parse(tmp_path, "--realm", "cli-realm", "--users", users))
    assert result.realm == "cli-realm"
    assert result.users.lookup("alice", "cli-realm") is not None
    # An operator's users file means no generated user.
    assert not (tmp_path / "data" / "credentials.txt").exists()


def test_set_any_key(tmp_path: Path) -> None:
    result = prepared(
        parse(
            tmp_path,
            "--set",
            "msrp.block_unknown_methods=yes",
            "--set",
            "auth.allowed_users=alice bob",
            "--set",
            " msrp . session_expires_seconds =120",
        )
    )
    assert result.config.msrp.block_unknown_methods is True
    assert result.config.auth.allowed_users == ("alice", "bob")
    assert result.config.msrp.session_expires_seconds == 120


def test_set_value_may_contain_equals_signs(tmp_path: Path) -> None:
    result = prepared(parse(tmp_path, "--set", "auth.realm=a=b"))
    assert result.realm == "a=b"


def test_later_set_wins(tmp_path: Path) -> None:
    result = prepared(
        parse(tmp_path, "--set", "msrp.max_connections=1", "--set", "msrp.max_connections=2")
    )
    assert result.config.msrp.max_connections == 2


@pytest.mark.parametrize("assignment", ["max_connections=5", "msrp.max_connections", "", "x"])
def test_bad_set_syntax(tmp_path: Path, assignment: str) -> None:
    message = usage_error(tmp_path, "--set", assignment)
    assert "--set expects section.key=value" in message
    assert repr(assignment) in message


def test_set_unknown_key(tmp_path: Path) -> None:
    message = config_refused(tmp_path, "--set", "msrp.colour=blue")
    assert message == "command line: [msrp] colour: unknown key"


@pytest.mark.parametrize(
    ("args", "where", "what"),
    [
        (("--set", "msrp.max_connections=lots"), "[msrp] max_connections", "whole number"),
        (("--set", "msrp.probation_seconds=0"), "[msrp] probation_seconds", "between 1 and"),
        (("--set", "msrp.block_unknown_methods=perhaps"), "[msrp] block_unknown_methods", "yes"),
        (("--msrp-listen", "udp:5060"), "[msrp] listen", "not allowed here"),
        (("--msrp-listen", "tcp:notaport"), "[msrp] listen", "port must be a number"),
        (
            ("--set", "msrp.session_expires_min_seconds=100000"),
            "[msrp] session_expires_min_seconds",
            "greater than",
        ),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, args: tuple[str, ...], where: str, what: str
) -> None:
    message = config_refused(tmp_path, *args)
    assert message.startswith(f"command line: {where}: ")
    assert what in message


def test_config_error_is_one_stderr_line_without_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_refused(tmp_path, "--set", "msrp.max_connections=lots")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("twistd: command line: [msrp] max_connections: ")
    assert captured.err.count("\n") == 1


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.ini"
    message = config_refused(tmp_path, "--config", str(missing))
    assert message.startswith(f"{missing}: ")
    assert "cannot read" in message


def test_bad_config_file_value(tmp_path: Path) -> None:
    ini = tmp_path / "relayd.ini"
    ini.write_text("[msrp]\nmax_connections = -1\n", encoding="utf-8")
    message = config_refused(tmp_path, "--config", str(ini))
    assert message.startswith(f"{ini}: [msrp] max_connections: ")


def test_garbage_certificate_stops_start_up(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    message = config_refused(
        tmp_path, "--set", f"tls.certificate={cert}", "--set", f"tls.private_key={key}"
    )
    assert "[tls] certificate" in message
    assert str(cert) in message


def test_certificate_and_key_mismatch_stops_start_up(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    cert, _ = pki.leaf("one.example.com")
    _, key = pki.leaf("two.example.com")
    message = config_refused(
        tmp_path, "--set", f"tls.certificate={cert}", "--set", f"tls.private_key={key}"
    )
    assert "[tls] certificate" in message


def test_bad_trust_roots_stop_start_up(tmp_path: Path) -> None:
    roots = tmp_path / "roots.pem"
    roots.write_text("no certificates in here\n")
    message = config_refused(tmp_path, "--set", f"msrp.ca_certificates={roots}")
    assert "[msrp] ca_certificates" in message


def test_make_service_has_named_msrp_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tuned: list[bool] = []
    levels: list[str] = []
    monkeypatch.setattr(relayd.tap, "tune_garbage_collector", lambda: tuned.append(True))
    monkeypatch.setattr(relayd.tap, "set_level", levels.append)
    options = parse(tmp_path, "--msrp-listen", LISTEN, "--set", "relay.log_level=warn")
    service = makeService(options)
    assert tuned == [True]
    assert levels == ["warn"]
    assert isinstance(service, MultiService)
    assert IServiceCollection.providedBy(service)
    msrp = service.getServiceNamed("msrp")
    assert isinstance(msrp, MSRPService)
    assert msrp.hostname == prepared(options).hostname
    assert msrp.listen == (LISTEN,)
    assert not service.running
    assert not msrp.running
    assert msrp.ports == []


def test_garbage_collector_tuning_freezes_the_start_up_heap() -> None:
    threshold = gc.get_threshold()
    try:
        relayd.tap.tune_garbage_collector()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == relayd.tap.GC_GEN0_THRESHOLD
        assert gc.get_threshold()[1:] == threshold[1:]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_help_names_the_three_services_and_their_default_listeners() -> None:
    text = " ".join(str(Options()).split())
    for fragment in (
        "MSRP relay (RFC 4976)",
        "ssl:2855:interface=127.0.0.1",
        "SIP consent relay",
        "udp:5060:interface=127.0.0.1 and tcp:5060:interface=127.0.0.1",
        "permission store over HTTP (XCAP, RFC 4825)",
        "ssl:4443:interface=127.0.0.1",
        "--example-config",
    ):
        assert fragment in text, fragment


def test_example_config_is_printed_and_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        Options().parseOptions(["--example-config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert printed == example_ini()
    # What it prints is a configuration the relay accepts as it is.
    config = tmp_path / "relayd.ini"
    config.write_text(printed, encoding="utf-8")
    options = parse(tmp_path, "--config", str(config))
    assert prepared(options).config.msrp.listen == ("ssl:2855:interface=127.0.0.1",)


WORKER_SETTINGS = (
    "--set",
    "relay.workers=2",
    "--set",
    "sip.listen=udp:5070:interface=127.0.0.1",
    "--set",
    "xcap.listen=tcp:5071:interface=127.0.0.1",
    "--msrp-listen",
    "tcp:5072:interface=127.0.0.1",
)


def _free_shared_ports() -> tuple[str, ...]:
    """WORKER_SETTINGS on ports free now: the parent checks that no one holds them."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        sip = udp.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        xcap = tcp.getsockname()[1]
    return (
        *WORKER_SETTINGS[:2],
        "--set",
        f"sip.listen=udp:{sip}:interface=127.0.0.1",
        "--set",
        f"xcap.listen=tcp:{xcap}:interface=127.0.0.1",
        *WORKER_SETTINGS[6:],
    )


def test_workers_make_a_parent_that_binds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relayd.workers import WORKER_ENVIRONMENT, WorkerSupervisor

    monkeypatch.delenv(WORKER_ENVIRONMENT, raising=False)
    settings = _free_shared_ports()
    options = parse(tmp_path, *settings)
    assert options["arguments"][-len(settings) :] == list(settings)
    # The shared store is made once, here, before any worker starts.
    assert (tmp_path / "data" / "relay.sqlite3").exists()
    service = makeService(options)
    assert isinstance(service, WorkerSupervisor)
    assert service.count == 2


def test_a_worker_runs_the_relay_on_its_own_msrp_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relayd.workers import WORKER_ENVIRONMENT

    monkeypatch.setenv(WORKER_ENVIRONMENT, "1/2")
    monkeypatch.setattr(relayd.tap, "follow_parent", lambda: None)
    options = parse(tmp_path, *WORKER_SETTINGS)
    assert options["worker"] == 1
    service = makeService(options)
    msrp = service.getServiceNamed("msrp")
    assert isinstance(msrp, MSRPService)
    assert msrp.listen == ("tcp:5073:interface=127.0.0.1",)
    # The shared port, then the worker's own socket for the requests it sends.
    assert [spec.text for spec in service.getServiceNamed("sip").specs] == [
        "udp:5070:interface=127.0.0.1:reuseport=yes",
        "udp:0:interface=127.0.0.1",
    ]
    assert msrp.relay.sibling_host == "localhost"


def test_a_bad_worker_environment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relayd.workers import WORKER_ENVIRONMENT

    monkeypatch.setenv(WORKER_ENVIRONMENT, "2/2")
    assert "does not exist" in config_refused(tmp_path, *WORKER_SETTINGS)


def test_a_shared_port_another_process_holds_stops_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from relayd.workers import WORKER_ENVIRONMENT

    monkeypatch.delenv(WORKER_ENVIRONMENT, raising=False)
    settings = _free_shared_ports()
    port = int(settings[3].split(":")[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another relay's
        holder.bind(("127.0.0.1", port))
        message = config_refused(tmp_path, *settings)
    assert message.startswith("command line: [sip] listen: ")
    assert "another process holds it" in message
