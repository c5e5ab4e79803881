"""Write to a Twisted socket transport now instead of on the next reactor turn.

Twisted's ``FileDescriptor.write`` only queues: the bytes go out when the
reactor next finds the socket writable, which costs an ``epoll_ctl`` to ask
for that, a wake-up, the ``send``, and another ``epoll_ctl`` to stop asking.
For a relay that answers and forwards small frames, that is most of the
system-call work per message and adds a loop iteration to every hop.  When
nothing is queued on the transport, sending at once keeps every byte in
order and costs one ``send``; whatever the kernel does not take goes to
Twisted's queue as before, so back-pressure and error handling are Twisted's.

Why this reads Twisted's private ``_tempDataLen``: a transport queues in two
places, ``dataBuffer`` from ``offset`` (public attributes) and a list of the
writes made since the last ``doWrite``, which merges them into it;
``_tempDataLen`` is their total length.  Sending now is in order only when both are empty,
and Twisted has no public way to ask about the second: its only public trace
is the descriptor's registration as a writer, and ``IReactorFDSet.getWriters``
builds a list of every writer per call, which under load costs more than the
system calls this saves.  A Twisted without the counter gets plain
``write`` calls (never bytes out of order), and tests/unit/net/test_eager.py
fails, saying the fast path is gone.
"""

from __future__ import annotations

import fcntl
import sys
from typing import Any

from twisted.internet.abstract import FileDescriptor

_WRITES_SINCE_LAST_SEND = "_tempDataLen"
"""The length of ``FileDescriptor``'s list of queued writes (see above)."""

#: Linux ioctl: bytes in a TCP socket's send queue not yet sent.
_SIOCOUTQNSD = 0x894B


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent at once if it is a socket with nothing queued."""
    if (
        data
        and isinstance(transport, FileDescriptor)
        and getattr(transport, _WRITES_SINCE_LAST_SEND, None) == 0
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # A lost connection: queue it anyway, so that Twisted's next write
        # attempt meets the same error and closes the connection its usual way.
    transport.write(data)


def socket_transport(transport: Any) -> FileDescriptor | None:
    """The socket transport under any TLS wrappers, or None (a test double)."""
    inner = transport
    while inner is not None and not isinstance(inner, FileDescriptor):
        inner = getattr(inner, "__dict__", {}).get("transport")
    return inner


def unsent_bytes(transport: FileDescriptor) -> int:
    """Bytes written but not sent yet: in the transport's queue and, on Linux, the kernel's.

    The kernel's part is what a receiver that reads slowly lets pile up in
    an autotuned send buffer (megabytes); TCP_NOTSENT_LOWAT alone does not
    bound it, as a write may still fill the last segment up to 64 KiB.
    """
    queued = (
        len(transport.dataBuffer)
        - transport.offset
        + getattr(transport, _WRITES_SINCE_LAST_SEND, 0)
    )
    try:
        raw = fcntl.ioctl(transport.fileno(), _SIOCOUTQNSD, b"\0\0\0\0")
    except (OSError, ValueError):  # not Linux, not TCP, or already closed
        return queued
    return queued + int.from_bytes(raw, sys.byteorder, signed=True)


def pause_until_writable(transport: FileDescriptor) -> bool:
    """Pause the registered streaming producer until the kernel wants more data.

    Twisted does this by itself only once ``bufferSize`` bytes wait in user
    space; this is the same pause taken earlier, for a producer that keeps its
    own queue short.  The producer's ``resumeProducing`` comes from the
    transport's ``doWrite`` when the socket is writable and nothing is queued
    (with TCP_NOTSENT_LOWAT: when the kernel's unsent bytes fell below it).
    """
    producer: Any = transport.producer
    if producer is None or not transport.streamingProducer or not transport.connected:
        return False
    if not transport.producerPaused:
        transport.producerPaused = True
        producer.pauseProducing()
    transport.startWriting()
    return True


def resume_if_writable(
    transport: FileDescriptor, low_water: int, unsent: int | None = None
) -> None:
    """Now what ``doWrite`` would do on the next reactor turn: resume the producer
    paused by pause_until_writable once fewer than ``low_water`` bytes are unsent
    (``unsent``: what unsent_bytes has just answered the caller)."""
    producer: Any = transport.producer
    if producer is None or not transport.producerPaused:
        return
    if unsent is None:
        unsent = unsent_bytes(transport)
    if unsent < low_water:
        transport.producerPaused = False
        producer.resumeProducing()
