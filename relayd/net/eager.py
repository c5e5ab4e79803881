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

from typing import Any

from twisted.internet.abstract import FileDescriptor

_WRITES_SINCE_LAST_SEND = "_tempDataLen"
"""The length of ``FileDescriptor``'s list of queued writes (see above)."""


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
