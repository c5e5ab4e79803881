"""What one UDP datagram in and one out cost a Python process here, before any SIP work.

Run by hand::

    python -m bench.udp_floor [--rates 5000,15000] [--seconds 4]

Two echo servers, each in its own process, get datagrams of 600 bytes (a small SIP
request) at a fixed rate from this process and send each one back: one written on the
standard library (``epoll``, ``recvfrom`` until ``EAGAIN``, ``sendto``), one on Twisted
(``listenUDP`` and a ``DatagramProtocol``, as the relay's SIP listener). Their CPU
(utime + stime) per datagram is the floor under the relay's CPU per SIP message: the
relay does this I/O plus its SIP work. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

_STDLIB_ECHO = """
import select, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.setblocking(False)
print(s.getsockname()[1], flush=True)
poller = select.epoll()
poller.register(s.fileno(), select.EPOLLIN)
while True:
    poller.poll()
    while True:
        try:
            data, address = s.recvfrom(65536)
        except BlockingIOError:
            break
        s.sendto(data, address)
"""

_TWISTED_ECHO = """
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol

class Echo(DatagramProtocol):
    def datagramReceived(self, data, address):
        self.transport.write(data, address)

port = reactor.listenUDP(0, Echo(), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""

DATAGRAM = b"x" * 600


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(source: str, rate: int, seconds: float) -> dict[str, float | int]:
    server = subprocess.Popen([sys.executable, "-c", source], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        client.setblocking(False)
        time.sleep(0.3)
        count = int(rate * seconds)
        echoed = 0
        before = cpu_seconds(server.pid)
        start = time.perf_counter()
        for i in range(count):
            due = start + i / rate
            while time.perf_counter() < due:
                try:
                    client.recvfrom(65536)
                    echoed += 1
                except BlockingIOError:
                    pass
            client.sendto(DATAGRAM, ("127.0.0.1", port))
        time.sleep(0.3)
        while True:
            try:
                client.recvfrom(65536)
                echoed += 1
            except BlockingIOError:
                break
        used = cpu_seconds(server.pid) - before
        client.close()
    finally:
        server.kill()
        server.wait()
    return {"sent": count, "echoed": echoed, "cpu_us_per_datagram": round(used / count * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.udp_floor", description=__doc__)
    parser.add_argument("--rates", default="5000,15000", help="datagrams/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    rows = []
    for rate in (int(r) for r in args.rates.split(",")):
        for name, source in (("stdlib", _STDLIB_ECHO), ("twisted", _TWISTED_ECHO)):
            row = {"server": name, "rate": rate, **measure(source, rate, args.seconds)}
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    print(json.dumps({"bench": "udp_floor", "datagram_bytes": len(DATAGRAM), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
