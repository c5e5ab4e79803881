"""The metrics listener of a running relay: real MSRP, SIP and XCAP traffic, then
``/metrics`` scraped over HTTP and parsed with prometheus_client's own parser, and
``/healthz`` up, with a listener down, and with the store failing."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq import content
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.defer import DeferredQueue
from twisted.internet.protocol import DatagramProtocol
from twisted.web.client import Agent, HTTPConnectionPool

from relayd.ctl.status import Samples, parse_samples
from relayd.sip.message import SIPResponse
from relayd.sip.parser import parse_datagram
from relayd.testing import RelayPKI, uac_request
from relayd.web.metrics import versions

from .conftest import Capability, RelayFactory, RunningRelay, client, path_to

pytestmark = pytest.mark.integration

reactor: Any = _reactor

METRICS = {("metrics", "listen"): "tcp:0:interface=127.0.0.1"}


async def get(relay: RunningRelay, path: str) -> tuple[int, bytes]:
    port = relay.service.getServiceNamed("metrics").ports[0].getHost().port
    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    response = await http.get(f"http://127.0.0.1:{port}{path}").addTimeout(5, reactor)
    body: bytes = await content(response).addTimeout(5, reactor)
    return int(response.code), body


async def scrape(relay: RunningRelay) -> Samples:
    """Every sample of ``/metrics`` by name and labels, as prometheus_client parses it."""
    code, body = await get(relay, "/metrics")
    assert code == 200
    return parse_samples(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class UDPClient(DatagramProtocol):
    def __init__(self) -> None:
        self.queue: DeferredQueue[SIPResponse] = DeferredQueue()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        message = parse_datagram(datagram)
        assert isinstance(message, SIPResponse)
        self.queue.put(message)


async def sip_options(relay: RunningRelay) -> SIPResponse:
    sip_port = relay.service.getServiceNamed("sip").port_of("udp")
    protocol = UDPClient()
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    try:
        local = port.getHost().port
        _, request = uac_request(
            "OPTIONS",
            f"sip:127.0.0.1:{sip_port}",
            via=f"SIP/2.0/UDP 127.0.0.1:{local}",
            aor="sip:alice@127.0.0.1",
            from_tag="metrics",
            to=None,
            call_id="metrics-options",
            cseq=1,
            contact=f"<sip:alice@127.0.0.1:{local}>",
        )
        port.write(request.to_bytes(), ("127.0.0.1", sip_port))
        return await protocol.queue.get().addTimeout(5, reactor)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_scrape_after_msrp_sip_and_xcap_traffic(
    start_relay: RelayFactory, pki: RelayPKI
) -> None:
    relay = await start_relay(extra=METRICS)
    before = await scrape(relay)

    alice, alice_auth = await client(relay, "alice", trust=pki.ca_pem)
    bob, bob_auth = await client(relay, "bob", trust=pki.ca_pem)
    to_path = " ".join([*alice_auth.use_path, *path_to(bob, bob_auth)])
    sent = defer.Deferred.fromCoroutine(
        alice.send_message(to_path, b"Hello Bob", 9, success_report=True, message_id="m1")
    )
    await sent.addTimeout(10, reactor)
    await alice.wait_report("m1").addTimeout(5, reactor)
    assert (await sip_options(relay)).status == 200
    xcap = relay.service.getServiceNamed("xcap")
    url = f"{xcap.public_url}/pres-rules/users/sip:alice@127.0.0.1/index"
    xcap_code = await Capability(pki.ca_pem).call("GET", url)

    after = await scrape(relay)
    assert value(after, "relayd_msrp_requests_total", method="AUTH") >= 4  # challenge + answer
    assert value(after, "relayd_msrp_requests_total", method="SEND") >= 1
    assert value(after, "relayd_msrp_relayed_total", method="SEND") >= 1

    assert value(after, "relayd_msrp_relayed_bytes_total") - value(
        before, "relayd_msrp_relayed_bytes_total"
    ) == len(b"Hello Bob")  # written once, towards bob's connection
    # Bob's client sends the success REPORT (RFC 4975 §7.1.2) through the relay.
    assert value(after, "relayd_msrp_reports_total", status="200") >= 1
    assert value(after, "relayd_msrp_received_bytes_total") > value(
        before, "relayd_msrp_received_bytes_total"
    )
    assert value(after, "relayd_msrp_sessions") == 2
    assert value(after, "relayd_msrp_connections") >= 2
    assert value(after, "relayd_sip_requests_total", direction="received", method="OPTIONS") == 1
    assert value(after, "relayd_sip_responses_total", direction="sent", code="200") >= 1
    assert value(after, "relayd_xcap_requests_total", method="GET", code=str(xcap_code)) == 1
    assert value(after, "relayd_store_seconds_count", operation="list_consents") >= 1
    assert value(after, "relayd_store_up") == 1
    assert value(after, "relayd_consents", state="pending") == 0
    assert value(after, "relayd_build_info", **versions()) == 1
    alice.transport.loseConnection()  # type: ignore[union-attr]
    bob.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_healthz_is_200_while_every_listener_and_the_store_answer(
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay(extra=METRICS)
    code, body = await get(relay, "/healthz")
    report = json.loads(body)
    assert code == 200, report
    assert report["status"] == "ok"
    assert set(report["listeners"]) == {"MSRP", "XCAP", "SIP", "metrics"}
    assert all(listener["up"] for listener in report["listeners"].values())
    assert report["store"] == {"backend": "sqlite", "up": True}


@pytest_twisted.ensureDeferred
async def test_healthz_is_503_when_a_listener_is_down(start_relay: RelayFactory) -> None:
    relay = await start_relay(extra=METRICS)
    sip = relay.service.getServiceNamed("sip")
    await sip.ports[0].stopListening()
    code, body = await get(relay, "/healthz")
    report = json.loads(body)
    assert code == 503
    assert report["problems"] == ["SIP is not listening"]
    assert report["listeners"]["SIP"]["up"] is False


@pytest_twisted.ensureDeferred
async def test_healthz_is_503_when_the_store_fails(
    start_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = await start_relay(extra=METRICS)
    store = relay.service.getServiceNamed("xcap").store
    monkeypatch.setattr(
        store, "next_consent_expiry", lambda: defer.fail(OSError("database is locked"))
    )
    monkeypatch.setattr(store, "list_consents", lambda **_: defer.fail(OSError("locked")))
    code, body = await get(relay, "/healthz")
    report = json.loads(body)
    assert code == 503
    assert report["store"]["up"] is False
    assert report["problems"] == ["the store does not answer: OSError: database is locked"]
    samples = await scrape(relay)
    assert value(samples, "relayd_store_up") == 0
    assert not any(name == "relayd_consents" for name, _ in samples)
