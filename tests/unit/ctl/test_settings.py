"""relayctl's defaults shared with the relay: locations, credentials, trust, relay URIs."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.ctl.settings import (
    PASSWORD_ENV,
    CtlError,
    Locations,
    locate,
    peer_path,
    relay_uri,
    resolve_credentials,
    split_to_and_file,
    trust_anchor,
)

A = "msrps://relay.example:2855/abc;tcp"
B = "msrps://peer.example:2855/xyz;tcp"


def test_send_without_file_is_an_error() -> None:
    with pytest.raises(CtlError, match="no file"):
        split_to_and_file([A, B], None)


@pytest.mark.parametrize(
    ("typed", "uri"),
    [
        ("msrps://localhost:2855", "msrps://localhost:2855;tcp"),
        ("localhost:2855", "msrps://localhost:2855;tcp"),
        ("MSRPS://Host:1;tcp", "msrps://Host:1;tcp"),
        ("msrp://[::1]:9", "msrp://[::1]:9;tcp"),
    ],
)
def test_relay_uri_completes_what_people_type(typed: str, uri: str) -> None:
    assert relay_uri(typed) == uri


def test_relay_uri_rejects_garbage() -> None:
    with pytest.raises(CtlError, match="bad relay URI 'http://x'"):
        relay_uri("http://x")


def test_peer_path_takes_a_pasted_path_line() -> None:
    assert peer_path([f"Path: {A}", B]) == [A, B]
    with pytest.raises(CtlError, match="bad --to URI"):
        peer_path(["msrps://nohost"])


def test_locate_follows_the_relays_config(tmp_path: Path) -> None:
    config = tmp_path / "relayd.ini"
    config.write_text(f"[relay]\ndata_dir = {tmp_path / 'd'}\nhostname = relay.example\n")
    found = locate(str(config), None)
    assert found == Locations(tmp_path / "d", tmp_path / "d" / "users.htdigest", "relay.example")
    config.write_text(f"[relay]\ndata_dir = {tmp_path / 'd'}\n[auth]\nrealm = R\n")
    assert locate(str(config), str(tmp_path / "other")).realm == "R"
    assert locate(str(config), str(tmp_path / "other")).data_dir == tmp_path / "other"


def test_locate_defaults_to_home_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    found = locate(None, None)
    assert found.data_dir == Path("/home/someone/.local/state/relayd")
    assert found.realm == "localhost"
    assert found.credentials_path == found.data_dir / "credentials.txt"


def _no_prompt(prompt: str) -> str:
    raise AssertionError("must not prompt")


def test_credentials_come_from_the_relays_file_without_user(tmp_path: Path) -> None:
    where = Locations(tmp_path, tmp_path / "users.htdigest", "localhost")
    (tmp_path / "credentials.txt").write_text("username=relayd\nrealm=localhost\npassword=p=w\n")
    found = resolve_credentials(None, None, None, where, {}, False, _no_prompt)
    assert (found.username, found.password) == ("relayd", "p=w")


def test_credentials_missing_file_says_what_to_do(tmp_path: Path) -> None:
    where = Locations(tmp_path, tmp_path / "users.htdigest", "localhost")
    with pytest.raises(CtlError, match="no --user given and no credentials file"):
        resolve_credentials(None, None, None, where, {}, False, _no_prompt)


def test_credentials_for_a_user(tmp_path: Path) -> None:
    where = Locations(tmp_path, tmp_path / "users.htdigest", "localhost")
    secret = tmp_path / "pw"
    secret.write_text("from-file\nignored\n")
    assert resolve_credentials("u", str(secret), None, where, {}, False, _no_prompt).password == (
        "from-file"
    )
    env = {PASSWORD_ENV: "from-env"}
    assert resolve_credentials("u", None, None, where, env, False, _no_prompt).password == (
        "from-env"
    )
    asked = resolve_credentials("u", None, None, where, {}, True, lambda prompt: "typed")
    assert asked.password == "typed"
    with pytest.raises(CtlError, match="no password for u"):
        resolve_credentials("u", None, None, where, {}, False, _no_prompt)


def test_loopback_relay_trusts_the_self_signed_certificate(tmp_path: Path) -> None:
    where = Locations(tmp_path, tmp_path / "users.htdigest", "localhost")
    assert trust_anchor(None, "msrps://localhost:2855;tcp", where) is None
    (tmp_path / "tls").mkdir()
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    where.self_signed_cert_path.write_bytes(pem)
    assert trust_anchor(None, "msrps://127.0.0.1:2855;tcp", where) == pem
    assert trust_anchor(None, "msrps://[::1]:2855;tcp", where) == pem
    assert trust_anchor(None, "msrps://relay.example:2855;tcp", where) is None
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(CtlError, match="holds no PEM certificate"):
        trust_anchor(str(not_pem), "msrps://x:1;tcp", where)
    with pytest.raises(CtlError, match="cannot read --ca file"):
        trust_anchor(str(tmp_path / "absent.pem"), "msrps://x:1;tcp", where)
