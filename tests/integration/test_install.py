"""twistd finds the ``msrprelay`` plugin after a plain and after an editable install.

Each install goes into a fresh virtual environment (with the packages of the
environment running the tests, for Twisted and friends) from a copy of the working
tree, so the repository itself is never touched.  The system setuptools may be older than
``pyproject.toml`` asks for; pip then builds in an isolated environment with
setuptools from the package index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

_IGNORE = shutil.ignore_patterns(
    ".git",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "build",
    "dist",
    "*.egg-info",
    "dropin.cache",
    "data",
    "twistd.pid",
    "twistd.log*",
)

# Runs inside the new environment.  Any path entry for the repository under
# test (a developer's own editable install) is removed first, so only the
# install being checked can provide relayd and its plugin.
_PROBE = """
import json, os, sys
root = os.path.realpath(sys.argv[1])
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != root]
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
import relayd
taps = [p.tapname for p in getPlugins(IServiceMaker)]
import twisted.plugins.relayd_plugin as plugin
print(json.dumps({"relayd": relayd.__file__, "plugin": plugin.__file__, "taps": taps}))
"""


def _copy_tree(destination: Path) -> Path:
    shutil.copytree(ROOT, destination, ignore=_IGNORE)
    return destination


def _venv(path: Path) -> Path:
    # pip comes from the system site packages, which saves installing it again.
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    python = path / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # Run from a virtual environment, "system" means the base interpreter, which
        # lacks Twisted; the tests' own environment is appended instead.  Entries of a
        # .pth file are added as they are: the .pth files inside them (an editable
        # install of this repository) are not read.
        inherited = {p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")}
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        Path(site, "outer-environment.pth").write_text(
            "".join(f"{entry}\n" for entry in sorted(inherited)), encoding="utf-8"
        )
    return python


def _pip_install(python: Path, *target: str, cwd: Path) -> None:
    base = [str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check"]
    attempts = [[*base, "--no-build-isolation", *target], [*base, *target]]
    errors = []
    for command in attempts:
        result = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, check=False, timeout=180
        )
        if result.returncode == 0:
            return
        # Typically: the system setuptools is too old, or wheel is missing.
        errors.append(f"$ {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    pytest.fail("pip install failed:\n" + "\n".join(errors))


def _probe(python: Path, cwd: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(python), "-c", _PROBE, str(ROOT)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    probe: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return probe


def _inside(path: object, folder: Path) -> bool:
    assert isinstance(path, str)
    return Path(path).resolve().is_relative_to(folder.resolve())


def test_plugin_found_after_plain_install(tmp_path: Path) -> None:
    source = _copy_tree(tmp_path / "src")
    venv = tmp_path / "venv"
    python = _venv(venv)
    _pip_install(python, str(source), cwd=tmp_path)
    # The installed copy must not depend on the source tree.
    shutil.rmtree(source)
    probe = _probe(python, tmp_path)
    assert "msrprelay" in probe["taps"]  # type: ignore[operator]
    assert _inside(probe["relayd"], venv)
    assert _inside(probe["plugin"], venv)


def test_plugin_found_after_editable_install(tmp_path: Path) -> None:
    source = _copy_tree(tmp_path / "src")
    venv = tmp_path / "venv"
    python = _venv(venv)
    _pip_install(python, "-e", str(source), cwd=tmp_path)
    probe = _probe(python, tmp_path)
    assert "msrprelay" in probe["taps"]  # type: ignore[operator]
    assert _inside(probe["relayd"], source)
    assert _inside(probe["plugin"], source)
