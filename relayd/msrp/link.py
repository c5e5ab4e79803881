"""What forwarded streams, transactions and connections need from each other.

``connection.py`` (the protocol and its flow control) builds the message
consumers of ``forwarding.py`` and the transactions of ``transactions.py``;
these only see a connection, a stream and the relay through the protocols
below, so the modules import each other in one direction only:
link <- transactions <- forwarding <- connection <- transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayd.msrp.message import MSRPRequest, MSRPResponse, MSRPStatus
from relayd.msrp.parser import MSRPLimits
from relayd.msrp.relay import Hop, RelayCore
from relayd.msrp.uri import MSRPURI


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """Every limit and timer of the MSRP relay, as plain values (msrp.service builds them).

    Each bounds something a peer could otherwise make grow or wait without
    end: parsing, bodies held, unsent output, connections, failures, time.
    """

    parser: MSRPLimits
    #: RFC 4976 §6.3: an unauthenticated client must succeed within this time
    #: and before this many failed requests; this many failed AUTHs close it.
    probation_seconds: float
    probation_max_failures: int
    max_failed_auth: int
    #: RFC 4975 §7.1.1: a forwarded request's response timer.
    transaction_timeout_seconds: float
    #: RFC 4976 §6.5: idle connections close; the least recently used goes first.
    idle_timeout_seconds: float
    max_connections: int
    #: Longest SEND body per frame: towards relayd and clients, towards other
    #: relays, and per other relay (host, port or None, bytes).
    max_chunk_bytes: int
    peer_chunk_bytes: int
    peer_chunk_overrides: tuple[tuple[str, int | None, int], ...]
    #: Unsent bytes a connection takes before its streams wait (back-pressure).
    send_queue_bytes: int
    block_unknown_methods: bool
    connect_timeout_seconds: float
    #: Body of a request other than SEND, which is forwarded whole.
    max_request_body_bytes: int


class Transaction(Protocol):
    """A request sent on a connection, awaiting its response (RFC 4975 §7.1)."""

    deadline: float

    def response(self, response: MSRPResponse) -> bool:
        """Handle the response; True when it ends the transaction."""

    def timeout(self) -> None: ...
    def lost(self, code: int, comment: str, cause: str) -> None: ...


class MSRPCounts:
    """What the relay has handled since it started, read by the metrics listener
    (relayd.web.metrics) when scraped.

    Every message passes here several times, so the paths do one addition each,
    in plain dicts (``d[key] += 1`` with the rare first time caught: no call, where
    ``dict.get`` or a ``Counter`` costs one), and what can be derived is derived
    when scraped: the requests relayed are those received less those refused.
    """

    __slots__ = (
        "received_bytes",
        "refusals",
        "relayed_bytes",
        "reports",
        "requests",
        "responses",
        "unrelayed",
    )

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        """Requests received, by method."""
        self.unrelayed: dict[str, int] = {}
        """Requests received but neither forwarded nor answered here, by method."""
        self.refusals: dict[int, int] = {}
        """Error responses this relay answered with, by status code."""
        self.responses: dict[int, int] = {}
        """Responses received for requests this relay sent, by status code."""
        self.reports: dict[bytes, int] = {}
        """REPORT requests received, by the status code in their Status header (§7.1.2)."""
        self.received_bytes = 0
        self.relayed_bytes = 0
        """Message body bytes written towards next hops (SEND chunks, re-chunked or not)."""

    @property
    def relayed(self) -> dict[str, int]:
        """Requests accepted for forwarding (or answered here, AUTH), by method."""
        unrelayed = self.unrelayed
        relayed = {method: n - unrelayed.get(method, 0) for method, n in self.requests.items()}
        return {method: n for method, n in relayed.items() if n}


def count_one(counts: dict[Any, int], key: Any) -> None:
    """One more of ``key``: the first time is the only one that costs more than an addition."""
    try:
        counts[key] += 1
    except KeyError:
        counts[key] = 1


class Relaying(Protocol):
    """The relay process's shared state, as connections and streams use it."""

    counts: MSRPCounts
    batch: dict[Link, list[bytes]] | None
    batch_number: int
    relayd_peers: dict[tuple[str, str, int], None]

    @property
    def core(self) -> RelayCore: ...
    @property
    def clock(self) -> IReactorTime: ...
    @property
    def log(self) -> Logger: ...
    @property
    def limits(self) -> RelayLimits: ...

    def connection_for(self, uri: MSRPURI) -> Deferred[Any]:
        """An open connection (a ``Link``) to this next hop."""

    def send_report(
        self,
        connection: Link,
        to_path: str,
        from_uri: str,
        message_id: str,
        byte_range: str,
        code: int,
        comment: str,
        cause: str | None = None,
    ) -> None: ...

    def peer_chunk_bytes(self, names: frozenset[str], port: int | None) -> int: ...
    def touch(self, connection: Any) -> None: ...
    def register(self, connection: Any) -> None: ...
    def unregister(self, connection: Any) -> None: ...


class Stream(Protocol):
    """A SEND chunk forwarded through a connection (forwarding.SendStream)."""

    @property
    def source(self) -> Link: ...
    @property
    def relay(self) -> Relaying: ...
    @property
    def done(self) -> bool: ...
    @property
    def response_to(self) -> bytes:
        """How the next hop's responses start: To-Path back to our URI (§6.4.3)."""

    @property
    def backlog_bytes(self) -> int:
        """How much of the body waits in the stream's backlog."""

    def send_backlog(self, room: int) -> bool: ...
    def cut(self) -> None: ...
    def unconfirmed(self) -> tuple[int, int]: ...
    def timed_out(self, first: int, last: int) -> None: ...
    def fail(
        self, code: int, comment: str, first: int, last: int, cause: str | None = None
    ) -> None: ...


class Link(Hop, Protocol):
    """One MSRP connection, as the streams going in and out of it use it."""

    frame_owner: Stream | None
    incoming: set[Stream]
    pause_reasons: set[object] | None
    waiting: dict[Link, list[Stream]]

    @property
    def relay(self) -> Relaying: ...
    @property
    def connected(self) -> int: ...
    @property
    def congested(self) -> bool: ...
    @property
    def chunk_bytes(self) -> int: ...

    def room(self, wanted: int) -> int: ...
    def wait(self, stream: Stream) -> None: ...
    def unwait(self, stream: Stream) -> None: ...
    def take_wire(self, stream: Stream) -> None: ...
    def write_raw(self, data: bytes) -> None: ...
    def write_atomic(self, data: bytes) -> None: ...
    def write_out(self, out: list[bytes], touch: bool = True) -> None: ...
    def add_transaction(self, tid: str, transaction: Transaction) -> None: ...
    def pause_reading(self, reason: object) -> None: ...
    def resume_reading(self, reason: object) -> None: ...
    def refuse(self, request: MSRPRequest, status: MSRPStatus, count: bool = True) -> None: ...
    def succeeded(self) -> None: ...
    def auth_failed(self) -> None: ...
    def takes_any_chunk(self) -> None: ...
    def deviating_response(self, response: MSRPResponse) -> None: ...
