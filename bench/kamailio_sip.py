"""Kamailio as the reference SIP proxy for ``bench/sip_bench.py --with-kamailio`` and
``bench/invite_bench.py``.

``bench/kamailio/sip-fork.cfg`` (MESSAGE to lists) and ``bench/kamailio/sip-invite.cfg``
(calls to a registered user) are templates (see their headers); :func:`render_config`
fills in the UDP listener, the digest realm, the users' HA1 and the lists (a template
without lists takes none).
:class:`Kamailio` runs it in the foreground as the current user (``-DD -E``, the way
the MSRP reference's ``start.sh`` beside the repository does), only on
127.0.0.1, in a temporary folder, and measures its CPU summed over the main process
and every process it forked (utime+stime from /proc).  :meth:`Kamailio.stop` ends the
main process (which ends its children), kills any child left by pid, and removes the
folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.daemon import wait_idle
from relayd.digest import ha1

TEMPLATE = Path(__file__).resolve().parent / "kamailio" / "sip-fork.cfg"
INVITE_TEMPLATE = TEMPLATE.with_name("sip-invite.cfg")
CHILDREN = 2  # UDP workers, as in the reference measurement
SHM_MB = 256
PKG_MB = 16
_TICKS = float(os.sysconf("SC_CLK_TCK"))


def find_kamailio(install: bool = True) -> str:
    """The kamailio binary; ``apt-get install -y kamailio`` when missing (root only)."""
    found = shutil.which("kamailio") or (
        "/usr/sbin/kamailio" if Path("/usr/sbin/kamailio").exists() else None
    )
    if found is None and install and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "kamailio"], check=False)
        found = shutil.which("kamailio") or (
            "/usr/sbin/kamailio" if Path("/usr/sbin/kamailio").exists() else None
        )
    if found is None:
        raise RuntimeError("kamailio not found (apt-get install -y kamailio)")
    return found


def kamailio_version(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    first = (result.stdout or result.stderr).splitlines()
    return first[0].strip() if first else "?"


def render_config(
    *,
    host: str,
    port: int,
    realm: str,
    users: Mapping[str, str],
    lists: Mapping[str, Sequence[str]],
    children: int = CHILDREN,
    template: Path = TEMPLATE,
) -> str:
    """``template`` with the listener, workers, realm, users (plain passwords → HA1) and
    lists."""
    for name in [*users, *lists, *(m for members in lists.values() for m in members)]:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"unexpected user or list name {name!r}")
    user_lines = "\n".join(
        f'\t$sht(ha1=>{user}) = "{ha1(user, realm, password)}";' for user, password in users.items()
    )
    list_blocks = []
    for name, members in lists.items():
        lines = [f'\tif ($rU == "{name}") {{', f'\t\t$ru = "sip:{members[0]}@{host}";']
        lines += [f'\t\tappend_branch("sip:{member}@{host}");' for member in members[1:]]
        lines += ["\t\troute(FORK);", "\t}"]
        list_blocks.append("\n".join(lines))
    text = template.read_text(encoding="utf-8")
    for marker, value in {
        "@LISTEN@": f"udp:{host}:{port}",
        "@CHILDREN@": str(children),
        "@REALM@": realm,
        "@USERS@": user_lines,
        "@LISTS@": "\n".join(list_blocks),
    }.items():
        if marker not in text and (value or marker != "@LISTS@"):
            raise ValueError(f"{template} lacks {marker}")
        text = text.replace(marker, value)
    return text


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # fields from 3 (state) on; the command name (2) may hold spaces
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """``root`` and every process under it (by parent pid, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


@dataclass
class Kamailio:
    """One Kamailio (``children`` UDP workers) on ``host:sip_port``, in its own temp dir."""

    host: str
    sip_port: int
    realm: str
    users: Mapping[str, str]
    lists: Mapping[str, Sequence[str]]
    children: int = CHILDREN
    defines: Sequence[str] = ()  # -A NAME for the config's #!ifdef blocks
    template: Path = TEMPLATE
    binary: str = ""
    folder: Path = field(default_factory=Path)
    process: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)
    # CPU of processes of the tree that have exited (kept so the sum never goes back)
    _gone_cpu: float = 0.0
    _last_cpu: dict[int, float] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.folder / "kamailio.log"

    @property
    def config_path(self) -> Path:
        return self.folder / "kamailio.cfg"

    def start(self) -> None:
        if not self.host.startswith("127."):
            raise ValueError("the Kamailio reference listens on loopback only")
        self.binary = self.binary or find_kamailio()
        self.folder = Path(tempfile.mkdtemp(prefix="sip-bench-kamailio-"))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        text = render_config(
            host=self.host,
            port=self.sip_port,
            realm=self.realm,
            users=self.users,
            lists=self.lists,
            children=self.children,
            template=self.template,
        )
        self.config_path.write_text(text, encoding="utf-8")
        run = self.folder / "run"
        run.mkdir()
        base = [self.binary, "-f", str(self.config_path), "-Y", str(run), "-w", str(self.folder)]
        for name in self.defines:
            base += ["-A", name]
        check = subprocess.run([*base, "-c"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"kamailio -c failed:\n{check.stderr[-3000:]}")
        command = [*base, "-P", str(self.folder / "kamailio.pid"), "-DD", "-E"]
        command += ["-m", str(SHM_MB), "-M", str(PKG_MB)]
        with open(self.log_path, "wb") as output:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=str(self.folder),
            )
        # main + attendant children: children UDP workers, timers, ... ; wait for them
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            self.pids = descendants(self.pid)
            if len(self.pids) > self.children and self.listening():
                time.sleep(0.3)  # the rest of the forks
                self.pids = descendants(self.pid)
                self._last_cpu = {pid: self._pid_cpu(pid) or 0.0 for pid in self.pids}
                return
            time.sleep(0.05)
        raise RuntimeError(f"kamailio did not start:\n{self.log_text()[-3000:]}")

    def listening(self) -> bool:
        wanted = f"{int(self.host.split('.')[0]):02X}"  # 127 → 7F, the address's last byte
        port = f":{self.sip_port:04X}"
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            local = line.split()[1]
            if local.endswith(port) and local[6:8] == wanted:
                return True
        return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @staticmethod
    def _pid_cpu(pid: int) -> float | None:
        fields = _stat_fields(pid)
        if fields is None:
            return None
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def cpu(self) -> float:
        """utime+stime, seconds, summed over the main process and all its descendants."""
        if self.process is None:
            return 0.0
        total = 0.0
        seen = {}
        for pid in descendants(self.pid):
            value = self._pid_cpu(pid)
            if value is not None:
                seen[pid] = value
                total += value
        for pid, value in self._last_cpu.items():
            if pid not in seen:
                self._gone_cpu += value  # exited since the last reading
        self._last_cpu = seen
        return total + self._gone_cpu

    def processes(self) -> int:
        return len(descendants(self.pid)) if self.process is not None else 0

    def rss(self) -> int:
        """Memory of the whole tree, KiB: the sum of every process's PSS (shared memory
        split between the processes mapping it, so the tm/usrloc shm counts once)."""
        total = 0
        for pid in descendants(self.pid) if self.process is not None else []:
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            for line in rollup.splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        return total

    def wait_idle(self, limit: float = 35.0) -> float:
        """Until the whole tree is idle (``bench.daemon.wait_idle``)."""
        return wait_idle(self.cpu, limit)

    def stop(self) -> None:
        """SIGTERM to the main process (it ends its children), SIGKILL after 10 s; then
        SIGKILL any child still alive (by pid, checked to run our config); remove the
        folder.  Safe to call twice, or after a failed start."""
        process, self.process = self.process, None
        try:
            if process is not None and process.poll() is None:
                tree = descendants(process.pid)
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
                self.pids = sorted(set(self.pids) | set(tree))
            for pid in self.pids:
                if process is not None and pid == process.pid:
                    continue
                _kill_if_ours(pid, str(self.config_path))
        finally:
            if self.folder != Path() and self.folder.exists():
                shutil.rmtree(self.folder, ignore_errors=True)


def _kill_if_ours(pid: int, config: str) -> None:
    """SIGKILL ``pid`` if it is still one of our Kamailio processes (its command line, the
    main process's, names our config file), not a pid reused by someone else."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if name == "kamailio" and config.encode() in argv:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
