"""What the SIP cores need of the transport to send requests of their own (RFC 3261 §18).

The consent relay starts client transactions (list copies, CONSENTs, NOTIFYs), reaches a
registered contact over the connection it registered on (RFC 5626-style flows), sends
in-dialog requests back the way the dialog's first request came, and names itself in
Contact. It asks that of an :class:`IRequestSender`, never of the transport module:
:class:`~relayd.sip.transport.SIPTransportLayer` is the one implementation, and
``relayd.sip.stack`` hands it over; the cores stay free of sockets, as the transaction
layer is behind its ``send`` callable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred

from relayd.sip.message import SIPRequest, SIPResponse
from relayd.sip.resolve import Target
from relayd.sipuri import SIPURI

__all__ = ["IRequestSender"]


class IRequestSender(Protocol):
    """Sends the requests a core starts, and says where they go and come from."""

    def request(
        self,
        request: SIPRequest,
        target: Target,
        on_provisional: Callable[[SIPResponse], object] | None = None,
        on_2xx: Callable[[SIPResponse], object] | None = None,
    ) -> Deferred[SIPResponse]:
        """Send ``request`` (top Via with a fresh branch) in a client transaction; the
        final response, or a 408/503 made up here (§8.1.3.1). ``on_provisional`` gets
        each 1xx, ``on_2xx`` (INVITE) each 2xx after the first."""

    def forward(self, request: SIPRequest, target: Target) -> None:
        """Send ``request`` with no transaction (an ACK for a 2xx on our route, §16.11),
        our Via stamped; raises ``TransportError`` when it cannot be sent."""

    def flow_target(self, contact: SIPURI) -> Target | None:
        """The open connection a registered ``contact`` came over, or ``None``."""

    def towards(self, source: object) -> Target:
        """Where a new request to the sender of a request from ``source`` goes: back
        along its flow (in-dialog requests, such as a subscription's NOTIFY)."""

    def sent_by(self, transport_name: str) -> tuple[str, int]:
        """Our host and port for a transport (Via sent-by, §18.1.1; also our Contact)."""
