"""``[relay] workers = N``: N processes on one host, each running the whole relay.

The parent (the ``twistd msrprelay`` process the operator started) binds nothing: it
prepares the data directory and the store once (relayd.bootstrap), then runs N copies
of itself as workers, numbered from 0, and watches them.

* SIP (UDP, TCP, TLS) and XCAP listeners are shared: every worker binds the same
  address with SO_REUSEPORT (relayd.net.reuseport) and the kernel spreads
  connections and datagrams among the workers that are up.
* MSRP is not shared: a session lives in the worker whose connection authenticated
  it, so worker K listens on each ``[msrp] listen`` port plus K, and the Use-Path
  URIs it hands out name that port (RFC 4976 §6.3).  A peer's SEND therefore
  reaches the worker that holds the session directly; a SEND between two clients
  held by different workers is forwarded from one worker to the other like
  relay-to-relay traffic (TLS, each trusting the relay's own certificate).
* Metrics listeners are per worker too (port plus K): each worker counts its own.
* A worker that ends unasked is started again after a delay (:class:`RestartBackoff`),
  and logged; the others keep serving.  SIGTERM (or SIGINT) in the parent stops every
  worker (each one drains as a single relay does) and waits for them; SIGHUP is passed
  on, and each worker reloads.  A worker whose parent is gone stops (Linux).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    InvalidLogLevelError,
    Logger,
    LogLevel,
    eventFromJSON,
    globalLogPublisher,
)
from twisted.python.failure import Failure

from relayd.logs import logger
from relayd.net.endpoints import parse_endpoint, with_option, with_port
from relayd.net.reuseport import port_is_free

WORKER_ENVIRONMENT = "RELAYD_WORKER"
"""Set in a worker's environment to ``K/N``: this process is worker K of N."""

STOP_TIMEOUT_SECONDS = 60.0
"""How long the parent waits for a stopping worker to drain before killing it."""


def worker_listen(listen: Sequence[str], index: int) -> tuple[str, ...]:
    """Worker ``index``'s own listeners: each fixed port moved up by ``index``
    (port 0, any free port, stays: the worker's Use-Path names what it bound)."""
    moved = []
    for text in listen:
        port = parse_endpoint(text).port
        moved.append(with_port(text, port + index) if port else text)
    return tuple(moved)


def shared_listen(listen: Sequence[str]) -> tuple[str, ...]:
    """Listeners every worker binds at once (``reuseport=yes``)."""
    return tuple(with_option(text, "reuseport", "yes") for text in listen)


def own_udp(listen: Sequence[str]) -> tuple[str, ...]:
    """One UDP socket of a worker's own (any free port) per interface of the shared UDP
    listeners: the SIP requests the worker sends leave from it and its Via names it, so
    that their responses, and requests within the dialogs it holds, reach it and not
    whichever worker the kernel picks on the shared port."""
    own: list[str] = []
    for text in listen:
        spec = parse_endpoint(text)
        if spec.kind == "udp":
            interface = spec.interface.replace(":", "\\:")
            candidate = f"udp:0:interface={interface}" if interface else "udp:0"
            if candidate not in own:
                own.append(candidate)
    return tuple(own)


def shared_ports_in_use(sections: Sequence[tuple[str, Sequence[str]]]) -> tuple[str, str] | None:
    """The first shared listener (section, message) another process already holds, before
    any worker binds it (relayd.net.reuseport.port_is_free); None when all are free."""
    for section, listen in sections:
        for text in listen:
            spec = parse_endpoint(text)
            kind = socket.SOCK_DGRAM if spec.kind == "udp" else socket.SOCK_STREAM
            failure = port_is_free(kind, spec.interface, spec.port)
            if failure is not None:
                reason = failure.strerror or str(failure)
                return section, f"{text!r}: cannot listen: {reason} (another process holds it)"
    return None


def parse_worker(text: str) -> tuple[int, int]:
    """``K/N`` from :data:`WORKER_ENVIRONMENT`; ValueError if it is not that."""
    index_text, slash, count_text = text.partition("/")
    if not (slash and index_text.isdigit() and count_text.isdigit()):
        raise ValueError(f"{WORKER_ENVIRONMENT} must be K/N, got {text!r}")
    index, count = int(index_text), int(count_text)
    if not 0 <= index < count:
        raise ValueError(f"{WORKER_ENVIRONMENT}: worker {index} of {count} does not exist")
    return index, count


class RestartBackoff:
    """The wait before a worker that ended is started again.

    A worker that keeps failing at start-up (a port taken, a broken file) would
    otherwise be restarted in a tight loop: the wait starts at ``initial_seconds``
    and doubles after each quick end, up to ``max_seconds``; a worker that ran for
    ``stable_seconds`` before it ended starts again after ``initial_seconds``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        initial_seconds: float = 1.0,
        max_seconds: float = 30.0,
        stable_seconds: float = 60.0,
    ) -> None:
        self._clock = clock
        self.initial_seconds = initial_seconds
        self.max_seconds = max_seconds
        self.stable_seconds = stable_seconds
        self._next = initial_seconds
        self._started_at: float | None = None

    def started(self) -> None:
        """The worker was (re)started now."""
        self._started_at = self._clock.seconds()

    def ended(self) -> float:
        """The worker ended now: seconds to wait before starting it again."""
        ran = self._clock.seconds() - (self._started_at or 0.0)
        if self._started_at is not None and ran >= self.stable_seconds:
            self._next = self.initial_seconds
        delay = self._next
        self._next = min(self._next * 2, self.max_seconds)
        self._started_at = None
        return delay


_TEXT_LINE = re.compile(r"^\S+ \[(?P<system>[^\]]*)\] (?P<text>.*)$")
"""twistd's text format: time, ``[namespace#level]`` (``[-]`` for legacy events), text."""


class WorkerOutput(ProcessProtocol):
    """One worker process: its log lines re-published in the parent's log, its end
    reported to the supervisor.

    A worker writes its log to a pipe rather than to the parent's files so that one
    process, the parent, owns the log (rotation, ``--logfile``): each line becomes an
    event of the same namespace and level, saying which worker wrote it.  JSON lines
    (``--logger relayd.logs.json_lines``) are re-published as the events they were.
    """

    log = logger()

    def __init__(self, index: int, ended: Callable[[int, Failure], None]) -> None:
        self.index = index
        self._ended = ended
        self._buffers: dict[int, bytes] = {}
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        self._buffers[childFD] = rest[-65536:]
        for line in lines:
            self._line(line.decode("utf-8", errors="replace").rstrip("\r"))

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        if line.startswith("{"):
            try:
                event = eventFromJSON(line)
            except (ValueError, TypeError):
                pass
            else:
                event["worker"] = self.index
                globalLogPublisher(event)
                return
        match = _TEXT_LINE.match(line)
        namespace, level, text = "relayd.workers", LogLevel.info, line
        if match is not None:
            text = match["text"]
            name, hash_sign, level_name = match["system"].partition("#")
            if hash_sign and name:
                namespace = name
                try:
                    level = LogLevel.levelWithName(level_name)
                except InvalidLogLevelError:
                    level = LogLevel.info
        Logger(namespace=namespace, observer=globalLogPublisher).emit(
            level, "worker {worker}: {text}", worker=self.index, text=text
        )

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self._line(rest.decode("utf-8", errors="replace"))
            self._buffers[fd] = b""
        self._ended(self.index, reason)


class WorkerSupervisor(Service):
    """The parent of ``count`` workers (module doc): starts them, restarts one that
    ended unasked, stops them all when stopped.

    ``command(index)`` is the argument list of worker ``index`` (``argv[0]`` first) and
    ``environment(index)`` its environment.
    """

    log = logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        command: Callable[[int], list[str]],
        environment: Callable[[int], dict[str, str]],
        stop_timeout_seconds: float = STOP_TIMEOUT_SECONDS,
    ) -> None:
        self._reactor = reactor
        self.count = count
        self._command = command
        self._environment = environment
        self._stop_timeout_seconds = stop_timeout_seconds
        self.processes: dict[int, Any] = {}
        self._protocols: dict[int, WorkerOutput] = {}
        self._backoff = {index: RestartBackoff(reactor) for index in range(count)}
        self._restarts: dict[int, Any] = {}
        self._stopping = False
        self._all_ended: defer.Deferred[None] | None = None
        self._previous_hangup: Any = None

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.log.info(
            "Starting {count} workers (parent process {pid})", count=self.count, pid=os.getpid()
        )
        for index in range(self.count):
            self._spawn(index)
        if threading.current_thread() is threading.main_thread():
            self._previous_hangup = signal.signal(signal.SIGHUP, self._hangup)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        protocol = WorkerOutput(index, self._ended)
        argv = self._command(index)
        process = self._reactor.spawnProcess(
            protocol,
            argv[0],
            argv,
            env=self._environment(index),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self.processes[index] = process
        self._protocols[index] = protocol
        self._backoff[index].started()
        self.log.info("Worker {worker} started, process {pid}", worker=index, pid=process.pid)

    def _ended(self, index: int, reason: Failure) -> None:
        self.processes.pop(index, None)
        self._protocols.pop(index, None)
        status = _describe_end(reason)
        if self._stopping:
            # twistd re-raises the SIGTERM that stopped it: that is a clean stop too.
            clean = status in ("exit status 0", "signal SIGTERM")
            status = "cleanly" if clean else f"({status})"
            self.log.info("Worker {worker} stopped {status}", worker=index, status=status)
            if not self.processes and self._all_ended is not None:
                ended, self._all_ended = self._all_ended, None
                ended.callback(None)
            return
        delay = self._backoff[index].ended()
        self.log.error(
            "Worker {worker} ended unexpectedly ({status}); restarting it in {delay:g}s,"
            " the other workers keep serving",
            worker=index,
            status=status,
            delay=delay,
        )
        self._restarts[index] = self._reactor.callLater(delay, self._spawn, index)

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.signal_all, signal.SIGHUP)

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every running worker."""
        for process in list(self.processes.values()):
            try:
                process.signalProcess(signum)
            except error.ProcessExitedAlready:
                pass

    def stopService(self) -> defer.Deferred[None]:
        """Stop every worker (SIGTERM: each drains), then fire; SIGKILL after the timeout."""
        super().stopService()
        self._stopping = True
        if self._previous_hangup is not None:
            signal.signal(signal.SIGHUP, self._previous_hangup)
            self._previous_hangup = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        if not self.processes:
            return defer.succeed(None)
        self.log.info("Stopping {count} workers", count=len(self.processes))
        ended: defer.Deferred[None] = defer.Deferred()
        self._all_ended = ended
        self.signal_all(signal.SIGTERM)
        kill = self._reactor.callLater(self._stop_timeout_seconds, self._kill_remaining)

        def done(result: None) -> None:
            if kill.active():
                kill.cancel()

        ended.addCallback(done)
        return ended

    def _kill_remaining(self) -> None:
        self.log.error(
            "Workers {workers} did not stop within {seconds:g}s; killing them",
            workers=sorted(self.processes),
            seconds=self._stop_timeout_seconds,
        )
        self.signal_all(signal.SIGKILL)


def _describe_end(reason: Failure) -> str:
    value: Any = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number is not None:
        try:
            return f"signal {signal.Signals(signal_number).name}"
        except ValueError:
            return f"signal {signal_number}"
    return f"exit status {getattr(value, 'exitCode', None)}"


def twistd_options(argv: Sequence[str], plugin: str) -> list[str]:
    """The twistd options a worker runs with: the parent's ``--logger`` (the same log
    format), always in the foreground and without a pid file of its own."""
    options = ["--nodaemon", "--pidfile="]
    try:
        end = list(argv).index(plugin)
    except ValueError:
        end = len(argv)
    words = list(argv[:end])
    for position, word in enumerate(words):
        if word == "--logger" and position + 1 < len(words):
            options += ["--logger", words[position + 1]]
        elif word.startswith("--logger="):
            options.append(word)
    return options


def worker_command(plugin_arguments: Sequence[str], plugin: str) -> list[str]:
    """The argument list of a worker: this interpreter running twistd with the parent's
    plugin arguments (the same configuration file and overrides)."""
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        *twistd_options(sys.argv[1:], plugin),
        plugin,
        *plugin_arguments,
    ]


def worker_environment(index: int, count: int) -> dict[str, str]:
    """The parent's environment, and which worker this is."""
    environment = dict(os.environ)
    environment[WORKER_ENVIRONMENT] = f"{index}/{count}"
    environment["RELAYD_PARENT_PID"] = str(os.getpid())
    return environment


def follow_parent() -> None:
    """In a worker: end with SIGTERM (a clean stop) when the parent process ends, even if
    it was killed (Linux ``PR_SET_PDEATHSIG``); elsewhere nothing is set up."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    parent = os.environ.get("RELAYD_PARENT_PID", "")
    if parent.isdigit() and os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)  # the parent ended before the line above
