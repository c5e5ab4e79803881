"""relayd.net.eager.write_now: send at once when nothing is queued, never out of order."""

from __future__ import annotations

import pytest
from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactor, StringTransport

from relayd.net import eager
from relayd.net.eager import write_now


class FakeSocket(FileDescriptor):
    """A FileDescriptor whose socket takes at most ``room`` bytes per send."""

    def __init__(self, room: int = 1 << 20) -> None:
        super().__init__(MemoryReactor())
        self.connected = 1
        self.room = room
        self.sent: list[bytes] = []
        self.lost = False

    def writeSomeData(self, data: bytes) -> int | BaseException:
        if self.lost:
            return main.CONNECTION_LOST
        taken = bytes(data[: self.room])
        self.sent.append(taken)
        return len(taken)

    def queued(self) -> bytes:
        return self.dataBuffer[self.offset :] + b"".join(self._tempDataBuffer)


def test_sends_at_once_when_nothing_is_queued() -> None:
    fd = FakeSocket()
    write_now(fd, b"MSRP a 200 OK\r\n")
    assert fd.sent == [b"MSRP a 200 OK\r\n"]
    assert fd.queued() == b""
    assert fd not in fd.reactor.getWriters()


def test_queues_what_the_socket_did_not_take() -> None:
    fd = FakeSocket(room=4)
    write_now(fd, b"0123456789")
    assert fd.sent == [b"0123"]
    assert fd.queued() == b"456789"
    assert fd in fd.reactor.getWriters()
    # Something is queued now: the next write goes behind it, not past it.
    write_now(fd, b"abc")
    assert fd.sent == [b"0123"]
    assert fd.queued() == b"456789abc"


def test_goes_behind_data_left_in_twisteds_send_buffer() -> None:
    fd = FakeSocket()
    fd.dataBuffer, fd.offset = b"xxold", 2
    write_now(fd, b"new")
    assert fd.sent == []
    assert fd.queued() == b"oldnew"


def test_a_lost_connection_is_left_to_twisted() -> None:
    fd = FakeSocket()
    fd.lost = True
    write_now(fd, b"frame")
    assert fd.queued() == b"frame"
    assert isinstance(fd.doWrite(), ConnectionLost)


def test_a_closing_transport_only_queues() -> None:
    fd = FakeSocket()
    fd.disconnecting = True
    write_now(fd, b"frame")
    assert fd.sent == []
    assert fd.queued() == b"frame"


def test_other_transports_get_a_plain_write() -> None:
    transport = StringTransport()
    write_now(transport, b"frame")
    assert transport.value() == b"frame"


def test_without_twisteds_queue_counter_every_write_is_queued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Twisted release that renames ``_tempDataLen`` costs the fast path, never the order."""
    assert FakeSocket()._tempDataLen == 0  # the installed Twisted still has it
    monkeypatch.setattr(eager, "_WRITES_SINCE_LAST_SEND", "_renamedByTwisted")
    fd = FakeSocket()
    write_now(fd, b"frame")
    assert fd.sent == []
    assert fd.queued() == b"frame"
