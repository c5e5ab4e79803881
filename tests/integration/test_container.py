"""Containerfile: it starts relayd the way etc/relayd.service does, and its image runs.

The build-and-run test needs podman or docker and the base image already present
locally (it never pulls); elsewhere it is skipped and says which of them is missing.
"""

from __future__ import annotations

import configparser
import json
import shlex
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"
UNIT = ROOT / "etc" / "relayd.service"
LISTENING = ("MSRP listening on ssl:", "SIP listening on tcp:", "XCAP listening on ssl:")


def _instructions(name: str) -> list[str]:
    """The arguments of every ``name`` instruction, continuation lines joined."""
    text = CONTAINERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword.upper() == name:
            found.append(rest.strip())
    return found


def _container_command() -> list[str]:
    (cmd,) = _instructions("CMD")
    words = json.loads(cmd)  # exec form: no shell between the runtime and twistd
    assert isinstance(words, list)
    return [str(word) for word in words]


def _unit_command() -> list[str]:
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return shlex.split(parser["Service"]["ExecStart"])


def test_container_starts_relayd_as_the_systemd_unit_does() -> None:
    # etc/relayd.service is the one source of how relayd is started; the image has
    # twistd on PATH where the unit names its installed path.
    container, unit = _container_command(), _unit_command()
    assert Path(unit[0]).name == container[0] == "twistd"
    assert container[1:] == unit[1:]


def test_container_keeps_config_and_data_in_volumes_and_runs_unprivileged() -> None:
    (volumes,) = _instructions("VOLUME")
    config = Path(_container_command()[-1])
    assert json.loads(volumes) == [str(config.parent), "/var/lib/relayd"]
    assert _instructions("USER") == ["relayd"]
    # The ports of the default [msrp], [sip] and [xcap] listeners.
    assert _instructions("EXPOSE") == ["2855 5060/udp 5060 4443"]


def _base_image() -> str:
    (base,) = _instructions("FROM")
    return base


def _runtime() -> str:
    """podman or docker, when one is installed and already holds the base image."""
    tools = [tool for tool in ("podman", "docker") if shutil.which(tool)]
    if not tools:
        pytest.skip("no container tool (podman or docker) installed")
    reasons = []
    for tool in tools:
        result = subprocess.run(
            [tool, "image", "inspect", _base_image()],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if result.returncode == 0:
            return tool
        reasons.append(f"{tool}: {(result.stderr.strip() or 'failed').splitlines()[0]}")
    pytest.skip(f"base image {_base_image()} not available locally ({'; '.join(reasons)})")


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def container(tmp_path: Path) -> Iterator[tuple[str, str, int]]:
    """The image built from this tree, running on a minimal configuration."""
    tool = _runtime()
    tag = f"relayd-test-{uuid.uuid4().hex[:12]}"
    # Never pull: podman says so with --pull=never; docker builds from a local base
    # image without pulling unless --pull is given.
    never_pull = ["--pull=never"] if tool == "podman" else []
    subprocess.run(
        [tool, "build", *never_pull, "-t", tag, "-f", str(CONTAINERFILE), str(ROOT)],
        check=True,
        timeout=1800,
    )
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    (etc / "relayd.ini").write_text(
        "[relay]\ndata_dir = /var/lib/relayd\n"
        "[msrp]\nlisten = ssl:2855\n"
        "[sip]\nlisten = udp:5060\n    tcp:5060\n"
        "[xcap]\nlisten = ssl:4443\n",
        encoding="utf-8",
    )
    (etc / "relayd.ini").chmod(0o644)
    msrp_port = _free_port()
    name = tag
    volume = f"{etc}:/etc/relayd:ro"
    publish = f"127.0.0.1:{msrp_port}:2855"
    try:
        subprocess.run(
            [tool, "run", "-d", "--name", name, "-v", volume, "-p", publish, tag],
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield tool, name, msrp_port
    finally:
        subprocess.run([tool, "rm", "-f", "-v", name], capture_output=True, check=False)
        subprocess.run([tool, "rmi", "-f", tag], capture_output=True, check=False)


def test_image_runs_relayd_with_its_volumes(container: tuple[str, str, int]) -> None:
    tool, name, msrp_port = container
    deadline = time.monotonic() + 60
    logs = ""
    while time.monotonic() < deadline:
        result = subprocess.run(
            [tool, "logs", name], capture_output=True, text=True, check=False, timeout=30
        )
        logs = result.stdout + result.stderr
        if all(line in logs for line in LISTENING):
            break
        time.sleep(0.5)
    assert all(line in logs for line in LISTENING), logs
    # The relay generated its certificate and keys in the data volume, as its own user.
    listing = subprocess.run(
        [tool, "exec", name, "sh", "-c", "id -un; ls /var/lib/relayd"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert listing[0] == "relayd"
    assert {"consent.key", "users.htdigest", "relay.sqlite3", "tls"} <= set(listing[1:])
    # MSRP answers TLS on the published port.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", msrp_port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        assert tls.version() is not None
