"""relayd.net.listeners: a surface's listeners bound together, one line when one cannot be."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import LogLevel

from relayd.net.endpoints import parse_endpoint, stream_server_endpoint
from relayd.net.listeners import ListenerError, Listeners
from relayd.testing import captured_log


class BusyReactor(MemoryReactor):
    def __init__(self, *busy: int) -> None:
        super().__init__()
        self.busy = set(busy)
        self.stopped: list[int] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        listening = super().listenTCP(port, factory, backlog, interface)
        original = listening.stopListening

        def stop() -> Any:
            self.stopped.append(port)
            return original()

        listening.stopListening = stop
        return listening


@pytest.fixture
def events() -> Iterator[EventLoggingObserver]:
    with captured_log() as observer:
        yield observer


def group(reactor: MemoryReactor, *texts: str) -> Listeners:
    listeners = Listeners("TEST")
    for text in texts:
        spec = parse_endpoint(text)
        factory = Factory.forProtocol(Protocol)
        listeners.add_stream(spec, stream_server_endpoint(reactor, spec), factory)
    return listeners


def test_every_listener_is_bound_before_listening_fires() -> None:
    reactor = BusyReactor()
    listeners = group(reactor, "tcp:2001:interface=127.0.0.1", "tcp:2002:interface=127.0.0.1")
    listeners.privilegedStartService()
    assert [port for port, *_ in reactor.tcpServers] == [2001, 2002]
    assert listeners.listening.called
    listeners.startService()  # binds nothing twice
    assert len(reactor.tcpServers) == 2
    listeners.stopService()
    assert sorted(reactor.stopped) == [2001, 2002]
    assert listeners.ports == []


def test_a_busy_port_is_one_critical_line_and_closes_the_others(
    events: EventLoggingObserver,
) -> None:
    reactor = BusyReactor(2002)
    listeners = group(reactor, "tcp:2001:interface=127.0.0.1", "tcp:2002:interface=127.0.0.1")
    with pytest.raises(ListenerError) as info:
        listeners.privilegedStartService()
    line = (
        "TEST cannot listen on tcp:2002:interface=127.0.0.1: Couldn't listen on"
        " 127.0.0.1:2002: [Errno 98] Address already in use."
    )
    assert str(info.value) == line
    critical = [e["message"] for e in events if e["log_level"] == LogLevel.critical]
    assert critical == [line]
    assert reactor.stopped == [2001]
    assert listeners.ports == []
    assert not listeners.listening.called
    listeners.stopService()  # nothing left to stop, and no error for what never listened


def test_listener_error_passes_twistds_handler_then_exits_1_silently() -> None:
    """twistd's start-up handler catches Exception (it removes the pid file, answers a
    daemon's parent) and re-raises; the interpreter must then print no traceback."""
    error = ListenerError("MSRP cannot listen on tcp:1: busy")
    assert isinstance(error, Exception)
    script = (
        "from relayd.net.listeners import ListenerError\n"
        "try:\n"
        "    raise ListenerError('MSRP cannot listen on tcp:1: busy')\n"
        "except Exception:\n"
        "    raise\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"")
