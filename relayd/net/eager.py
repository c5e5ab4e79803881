"""Write to a Twisted socket transport now instead of on the next reactor turn.

Twisted's ``FileDescriptor.write`` only queues: the bytes go out when the
reactor next finds the socket writable, which costs an ``epoll_ctl`` to ask
for that, a wake-up, the ``send``, and another ``epoll_ctl`` to stop asking.
For a relay that answers and forwards small frames, that is most of the
system-call work per message and adds a loop iteration to every hop.  When
nothing is queued on the transport, sending at once keeps every byte in
order and costs one ``send``; whatever the kernel does not take goes to
Twisted's queue as before, so back-pressure and error handling are Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import FileDescriptor


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent at once if it is a socket with nothing queued."""
    if (
        isinstance(transport, FileDescriptor)
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and data
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # A lost connection: queue it anyway, so that Twisted's next write
        # attempt meets the same error and closes the connection its usual way.
    transport.write(data)
