"""Listeners that several processes share (``reuseport=yes``, SO_REUSEPORT).

With ``[relay] workers`` every worker binds the same SIP and XCAP addresses and
the kernel spreads new connections and datagrams among them (Linux: by a hash of
the peer's address, so one peer's datagrams keep reaching one worker).  Twisted's
endpoints cannot set the option before ``bind``, so the socket is made here and
handed to the reactor with ``adoptStreamPort`` / ``adoptDatagramPort``.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer


def _family_and_host(interface: str) -> tuple[socket.AddressFamily, str]:
    """``interface`` as bound: empty is every IPv4 address (as Twisted's ``tcp:``)."""
    if not interface:
        return socket.AF_INET, "0.0.0.0"  # noqa: S104 - what an empty interface means
    if interface.lower().rstrip(".") == "localhost":
        return socket.AF_INET, "127.0.0.1"
    address = ipaddress.ip_address(interface)
    return (socket.AF_INET6 if address.version == 6 else socket.AF_INET), interface


def shared_socket(kind: int, interface: str, port: int) -> socket.socket:
    """A bound, non-blocking socket with SO_REUSEPORT set; ``CannotListenError`` if not."""
    family, host = _family_and_host(interface)
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # IPv6 sockets keep the system's IPV6_V6ONLY default, as Twisted's own do.
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise CannotListenError(host, port, e) from None
    return sock


def port_is_free(kind: int, interface: str, port: int) -> OSError | None:
    """Bind ``interface``:``port`` once without SO_REUSEPORT and let it go: the error if
    another process holds it.  Run before the workers bind it with SO_REUSEPORT, this
    tells a port in use by another program, or by another relay of the same user (which
    SO_REUSEPORT would otherwise let share it silently), from a free one."""
    family, host = _family_and_host(interface)
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listeners do
        try:
            sock.bind((host, port))
        except OSError as e:
            return e
    return None


@implementer(IStreamServerEndpoint)
class SharedTCPServerEndpoint:
    """A TCP listener with SO_REUSEPORT: the reactor adopts our bound socket."""

    def __init__(self, reactor: Any, port: int, backlog: int, interface: str) -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        try:
            sock = shared_socket(socket.SOCK_STREAM, self._interface, self._port)
        except CannotListenError:
            return defer.fail()
        try:
            sock.listen(self._backlog)
            port: IListeningPort = self._reactor.adoptStreamPort(
                sock.fileno(), sock.family, protocolFactory
            )
        except OSError as e:
            return defer.fail(CannotListenError(self._interface, self._port, e))
        finally:
            sock.close()  # the reactor holds its own duplicate
        return defer.succeed(port)


class SharedUDPServer(Service):
    """``internet.UDPServer`` with SO_REUSEPORT: bound at privileged start, as that one."""

    def __init__(
        self, reactor: Any, port: int, protocol: DatagramProtocol, interface: str, max_bytes: int
    ) -> None:
        self._reactor = reactor
        self._port_number = port
        self._protocol = protocol
        self._interface = interface
        self._max_bytes = max_bytes
        self._port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        sock = shared_socket(socket.SOCK_DGRAM, self._interface, self._port_number)
        try:
            self._port = self._reactor.adoptDatagramPort(
                sock.fileno(), sock.family, self._protocol, self._max_bytes
            )
        finally:
            sock.close()

    def startService(self) -> None:
        if self._port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        port, self._port = self._port, None
        if port is not None:
            return port.stopListening()
        return None
