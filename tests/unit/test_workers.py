"""Tests for relayd.workers: each worker's ports, the restart delay, the supervisor."""

from __future__ import annotations

import signal
import sys
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from relayd.testing import captured_log
from relayd.workers import (
    WORKER_ENVIRONMENT,
    RestartBackoff,
    WorkerOutput,
    WorkerSupervisor,
    own_udp,
    parse_worker,
    shared_listen,
    twistd_options,
    worker_command,
    worker_environment,
    worker_listen,
)


def test_worker_listen_moves_each_fixed_port_by_the_worker_number() -> None:
    listen = ("ssl:2855:interface=127.0.0.1", "tcp:port=2856:interface=\\:\\:1")
    assert worker_listen(listen, 0) == listen
    assert worker_listen(listen, 3) == (
        "ssl:2858:interface=127.0.0.1",
        "tcp:port=2859:interface=\\:\\:1",
    )


def test_worker_listen_keeps_port_zero() -> None:
    assert worker_listen(("ssl:0:interface=127.0.0.1",), 1) == ("ssl:0:interface=127.0.0.1",)


def test_shared_listen_sets_reuseport_once() -> None:
    assert shared_listen(("udp:5060:interface=127.0.0.1", "tcp:5060:reuseport=no")) == (
        "udp:5060:interface=127.0.0.1:reuseport=yes",
        "tcp:5060:reuseport=yes",
    )


def test_parse_worker() -> None:
    assert parse_worker("1/2") == (1, 2)
    for bad in ("2/2", "x/2", "1", "-1/2", ""):
        with pytest.raises(ValueError, match=WORKER_ENVIRONMENT):
            parse_worker(bad)


def test_backoff_doubles_for_quick_ends_up_to_the_maximum() -> None:
    clock = Clock()
    backoff = RestartBackoff(clock, initial_seconds=1, max_seconds=8, stable_seconds=60)
    delays = []
    for _ in range(6):
        backoff.started()
        clock.advance(5)
        delays.append(backoff.ended())
    assert delays == [1, 2, 4, 8, 8, 8]


def test_backoff_starts_again_after_a_stable_run() -> None:
    clock = Clock()
    backoff = RestartBackoff(clock, initial_seconds=1, max_seconds=30, stable_seconds=60)
    for _ in range(3):
        backoff.started()
        backoff.ended()
    backoff.started()
    clock.advance(60)
    assert backoff.ended() == 1
    backoff.started()
    assert backoff.ended() == 2


def test_twistd_options_keep_only_the_logger() -> None:
    argv = ["--logfile", "x.log", "--logger", "relayd.logs.json_lines", "msrprelay", "--logger"]
    assert twistd_options(argv, "msrprelay") == [
        "--nodaemon",
        "--pidfile=",
        "--logger",
        "relayd.logs.json_lines",
    ]
    assert twistd_options(["-n", "--logger=a.b", "msrprelay"], "msrprelay")[-1] == "--logger=a.b"


def test_worker_command_runs_the_plugin_with_the_parents_arguments() -> None:
    command = worker_command(["--config", "relayd.ini"], "msrprelay")
    assert command[0] == sys.executable
    assert command[-3:] == ["msrprelay", "--config", "relayd.ini"]


def test_worker_environment_names_the_worker() -> None:
    environment = worker_environment(1, 4)
    assert environment[WORKER_ENVIRONMENT] == "1/4"


class _Process:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, signum: int) -> None:
        if self.signals and self.signals[-1] == signal.SIGKILL:
            raise error.ProcessExitedAlready()
        self.signals.append(signum)


class _Reactor(Clock):
    """A clock that records spawned processes."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[WorkerOutput, _Process, list[str], dict[str, str]]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> Any:
        process = _Process(100 + len(self.spawned))
        self.spawned.append((protocol, process, args, kw["env"]))
        return process


def _end(protocol: WorkerOutput, exit_code: int | None, signal_number: int | None) -> None:
    protocol.processEnded(Failure(error.ProcessTerminated(exit_code, signal_number)))


def _supervisor(reactor: _Reactor, count: int = 2) -> WorkerSupervisor:
    return WorkerSupervisor(
        reactor,
        count,
        command=lambda index: ["python", f"worker-{index}"],
        environment=lambda index: {"N": str(index)},
        stop_timeout_seconds=30,
    )


def test_supervisor_starts_each_worker() -> None:
    reactor = _Reactor()
    supervisor = _supervisor(reactor)
    supervisor.startService()
    assert [(args, env) for _, _, args, env in reactor.spawned] == [
        (["python", "worker-0"], {"N": "0"}),
        (["python", "worker-1"], {"N": "1"}),
    ]
    assert sorted(supervisor.processes) == [0, 1]


def test_a_dead_worker_is_restarted_after_the_backoff() -> None:
    reactor = _Reactor()
    supervisor = _supervisor(reactor)
    supervisor.startService()
    protocol, _, _, _ = reactor.spawned[1]
    with captured_log() as events:
        _end(protocol, None, signal.SIGKILL)
    assert sorted(supervisor.processes) == [0]
    (event,) = [e for e in events if e["log_level"] == LogLevel.error]
    assert event["worker"] == 1 and event["status"] == "signal SIGKILL" and event["delay"] == 1
    reactor.advance(0.5)
    assert len(reactor.spawned) == 2
    reactor.advance(0.5)
    assert len(reactor.spawned) == 3
    assert reactor.spawned[2][2] == ["python", "worker-1"]
    # Ending again at once: the wait doubles.
    _end(reactor.spawned[2][0], 1, None)
    reactor.advance(1.5)
    assert len(reactor.spawned) == 3
    reactor.advance(0.5)
    assert len(reactor.spawned) == 4


def test_stop_sends_sigterm_and_waits_for_every_worker() -> None:
    reactor = _Reactor()
    supervisor = _supervisor(reactor)
    supervisor.startService()
    stopped = supervisor.stopService()
    assert [p.signals for _, p, _, _ in reactor.spawned] == [[signal.SIGTERM]] * 2
    assert not stopped.called
    _end(reactor.spawned[0][0], None, signal.SIGTERM)
    assert not stopped.called
    with captured_log() as events:
        _end(reactor.spawned[1][0], 0, None)
    assert stopped.called
    assert any(e.get("status") == "cleanly" for e in events)
    reactor.advance(60)  # no restart, no kill
    assert len(reactor.spawned) == 2
    assert [p.signals for _, p, _, _ in reactor.spawned] == [[signal.SIGTERM]] * 2


def test_stop_cancels_a_pending_restart() -> None:
    reactor = _Reactor()
    supervisor = _supervisor(reactor, count=1)
    supervisor.startService()
    _end(reactor.spawned[0][0], 1, None)
    stopped = supervisor.stopService()
    assert stopped.called
    reactor.advance(60)
    assert len(reactor.spawned) == 1


def test_a_worker_that_does_not_drain_is_killed_after_the_timeout() -> None:
    reactor = _Reactor()
    supervisor = _supervisor(reactor, count=1)
    supervisor.startService()
    stopped = supervisor.stopService()
    process = reactor.spawned[0][1]
    reactor.advance(29)
    assert process.signals == [signal.SIGTERM]
    reactor.advance(1)
    assert process.signals == [signal.SIGTERM, signal.SIGKILL]
    _end(reactor.spawned[0][0], None, signal.SIGKILL)
    assert stopped.called


def test_sighup_is_passed_on_to_every_worker() -> None:
    reactor = _Reactor()
    supervisor = _supervisor(reactor)
    supervisor.startService()
    supervisor.signal_all(signal.SIGHUP)
    assert [p.signals for _, p, _, _ in reactor.spawned] == [[signal.SIGHUP]] * 2


def test_worker_output_is_republished_with_namespace_and_level() -> None:
    ended: list[int] = []
    output = WorkerOutput(3, lambda index, reason: ended.append(index))
    with captured_log() as events:
        output.childDataReceived(1, b"2026-12-06T21:00:00+0000 [relayd.msrp#warn] half ")
        assert not events
        output.childDataReceived(1, b"of it\n2026-12-06T21:00:00+0000 [-] legacy\nbare\n")
        output.childDataReceived(2, b'{"log_namespace": "x", "log_format": "j", "log_level": ')
        output.childDataReceived(2, b'{"__class_uuid__": "02e59486-f24d-46ad-8224-3acdf2a5732a",')
        output.childDataReceived(2, b' "name": "error"}}\n')
        output.childDataReceived(1, b"no newline at the end")
        _end(output, 0, None)
    lines = [(e["log_namespace"], e["log_level"], e.get("text")) for e in events]
    assert lines[:3] == [
        ("relayd.msrp", LogLevel.warn, "half of it"),
        ("relayd.workers", LogLevel.info, "legacy"),
        ("relayd.workers", LogLevel.info, "bare"),
    ]
    assert events[3]["log_namespace"] == "x" and events[3]["worker"] == 3
    assert events[3]["log_level"] == LogLevel.error
    assert lines[4] == ("relayd.workers", LogLevel.info, "no newline at the end")
    assert all(e["worker"] == 3 for e in events)
    assert ended == [3]


def test_own_udp_is_one_free_port_per_interface_of_the_shared_udp_listeners() -> None:
    listen = (
        "udp:5060:interface=127.0.0.1",
        "tcp:5060:interface=127.0.0.1",
        "udp:5062:interface=127.0.0.1",
        "udp:5060:interface=\\:\\:1",
        "udp:5060",
    )
    assert own_udp(listen) == (
        "udp:0:interface=127.0.0.1",
        "udp:0:interface=\\:\\:1",
        "udp:0",
    )
    assert own_udp(("tcp:5060",)) == ()
