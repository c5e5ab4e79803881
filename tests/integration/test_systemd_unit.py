"""etc/relayd.service: a unit systemd accepts, with the hardening operators expect."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "etc" / "relayd.service"


def _service_section() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser["Service"]


def test_unit_runs_relayd_as_its_own_user_hardened() -> None:
    service = _service_section()
    assert service["User"] == service["Group"] == "relayd"
    assert service["StateDirectory"] == "relayd" and service["StateDirectoryMode"] == "0700"
    assert (
        "twistd --nodaemon --pidfile= msrprelay --config /etc/relayd/relayd.ini"
        in (service["ExecStart"])
    )
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["AmbientCapabilities"] == service["CapabilityBoundingSet"]
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    # A SIGTERM stop is a clean stop, not a failure to restart from.
    assert "143" in service["SuccessExitStatus"].split()


def test_systemctl_reload_sends_sighup() -> None:
    # SIGHUP rereads certificates, users and lists (relayd.reload).
    assert _service_section()["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_sysusers_entry_names_the_units_user() -> None:
    line = next(
        entry
        for entry in (ROOT / "etc" / "relayd.sysusers.conf").read_text().splitlines()
        if entry and not entry.startswith("#")
    )
    kind, name, _, _, home = shlex.split(line)
    assert (kind, name, home) == ("u", "relayd", "/var/lib/relayd")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    twistd = Path(sys.executable).with_name("twistd")
    if not twistd.exists():
        pytest.skip(f"no twistd beside {sys.executable}")
    # The unit names the installed twistd; point it at this environment's.
    unit = tmp_path / "relayd.service"
    text = UNIT.read_text(encoding="utf-8")
    assert "/usr/local/bin/twistd " in text
    unit.write_text(text.replace("/usr/local/bin/twistd ", f"{twistd} "), encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # Unknown keys are only warnings (exit 0): any output at all fails the test.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
