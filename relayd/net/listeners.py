"""The listeners of one surface, bound by Twisted's own listener services.

Each ``tcp:``/``ssl:`` listener is a ``StreamServerEndpointService`` and each
``udp:`` listener an ``internet.UDPServer``.  What :class:`Listeners` adds is
the order and the error: every listener of a surface is bound in
``privilegedStartService`` (before the reactor runs, so before anything
serves), and one that cannot be bound is one critical log line naming it and
a :class:`ListenerError`, which ends twistd with status 1 and no traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from twisted.application.internet import StreamServerEndpointService, UDPServer
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from relayd.logs import logger
from relayd.net.endpoints import EndpointSpec


class ListenerError(SystemExit, Exception):
    """A listener could not be bound; its text names it and says why, in one line.

    Raised out of ``privilegedStartService``, before the reactor runs.  As an
    ``Exception`` it goes through twistd's start-up handler, which tells a
    daemon's waiting parent and removes the pid file before re-raising it; as
    a ``SystemExit`` with code 1 it then ends the interpreter with status 1
    and prints nothing, the line being in the log already (``ConfigRefused``
    in relayd.tap is the same exit for a configuration).
    """

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


@implementer(IStreamServerEndpoint)
class _Recorded:
    """An endpoint that hands the port it bound to ``on_bound``."""

    def __init__(self, endpoint: IStreamServerEndpoint, on_bound: Callable[[Any], None]) -> None:
        self._endpoint = endpoint
        self._on_bound = on_bound

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        listening = self._endpoint.listen(protocolFactory)
        listening.addCallback(self._record)
        return listening

    def _record(self, port: IListeningPort) -> IListeningPort:
        self._on_bound(port)
        return port


class Listeners(MultiService):
    """A surface's listeners (its children), bound together at start.

    ``listening`` fires with the bound ports once all are bound; ``ports``
    holds them until the service stops.  Subclasses add what a surface does
    with a port (:meth:`bound`) and once all are up (:meth:`all_bound`).
    """

    log = logger()

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.ports: list[IListeningPort] = []
        self.listening: Deferred[list[IListeningPort]] = Deferred()
        self._listeners: list[tuple[EndpointSpec, IService, Callable[[], Any]]] = []
        self._bound = False

    def add_stream(
        self, spec: EndpointSpec, endpoint: IStreamServerEndpoint, factory: IProtocolFactory
    ) -> None:
        """Listen on ``endpoint`` (built from ``spec``) with ``factory``."""
        bound: list[IListeningPort] = []
        service = StreamServerEndpointService(_Recorded(endpoint, bound.append), factory)
        # As strports.service does: a port that cannot be bound raises at once,
        # out of privilegedStartService, instead of only being logged.
        service._raiseSynchronously = True
        self._add(spec, service, lambda: bound[0] if bound else None)

    def add_datagram(
        self, spec: EndpointSpec, service: UDPServer | Service, protocol: DatagramProtocol
    ) -> None:
        """Listen with a UDP server ``service`` that delivers to ``protocol``."""
        self._add(spec, service, lambda: protocol.transport)

    def _add(self, spec: EndpointSpec, service: IService, port_of: Callable[[], Any]) -> None:
        """``port_of`` gives the listener's port once it is bound, None before."""
        service.setServiceParent(self)
        self._listeners.append((spec, service, port_of))

    @property
    def specs(self) -> list[EndpointSpec]:
        """The listeners' endpoint specs, in the order of ``ports``."""
        return [spec for spec, _, _ in self._listeners]

    def before_binding(self) -> None:
        """Check what must hold before any port is bound; :meth:`cannot_start` if it does not."""

    def bound(self, spec: EndpointSpec, port: IListeningPort) -> None:
        """One listener is bound (log it, note its address)."""

    def all_bound(self) -> None:
        """Every listener of this surface is bound."""

    def _bind(self) -> None:
        self._bound = True
        self.before_binding()
        for spec, service, port_of in self._listeners:
            try:
                service.privilegedStartService()
                port = port_of()
                if port is None:
                    raise RuntimeError("listener did not bind synchronously")
            except Exception as e:
                self.cannot_start(f"{self.label} cannot listen on {spec.text}: {e}")
            self.ports.append(port)
            self.bound(spec, port)
        self.all_bound()
        self.listening.callback(list(self.ports))

    def cannot_start(self, message: str) -> NoReturn:
        """Log ``message`` once, close what this surface had bound, and stop start-up."""
        self.log.critical("{message}", message=message)
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()
        # Nothing is left to stop: the listeners never served.
        for _, service, _ in self._listeners:
            service.disownServiceParent()
        self._listeners = []
        raise ListenerError(message) from None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._bind()

    def startService(self) -> None:
        if not self._bound:
            self._bind()
        super().startService()

    def stopService(self) -> Deferred[None]:
        self.ports = []
        stopped: Deferred[Any] = super().stopService()
        return stopped.addCallback(lambda _: None)
