"""Tests for relayd.ctl.status: what ``relayctl status`` prints of a report and a scrape."""

from __future__ import annotations

import pytest

from relayd.ctl.settings import CtlError
from relayd.ctl.status import check_url, counts, parse_samples, render

REPORT = {
    "status": "failing",
    "problems": ["SIP is not listening"],
    "version": "1.2.3",
    "python": "3.11.7",
    "twisted": "24.7.0",
    "uptime_seconds": 93784,
    "listeners": {
        "MSRP": {"up": True, "addresses": ["ssl:127.0.0.1:2855"]},
        "SIP": {"up": False, "addresses": ["udp:5060", "tcp:127.0.0.1:5060"]},
    },
    "store": {"backend": "sqlite", "up": True},
}

SCRAPE = """\
# TYPE relayd_msrp_connections gauge
relayd_msrp_connections 3
# TYPE relayd_msrp_sessions gauge
relayd_msrp_sessions 2
# TYPE relayd_sip_transactions gauge
relayd_sip_transactions{kind="server"} 4
relayd_sip_transactions{kind="client"} 1
# TYPE relayd_sip_requests counter
relayd_sip_requests_total{direction="received",method="MESSAGE"} 7
relayd_sip_requests_total{direction="received",method="OPTIONS"} 1
relayd_sip_requests_total{direction="sent",method="MESSAGE"} 20
# TYPE relayd_consents gauge
relayd_consents{state="pending"} 5
relayd_consents{state="granted"} 1
relayd_consents{state="denied"} 0
"""


def test_render_prints_versions_uptime_listeners_store_counts_and_problems() -> None:
    assert render(REPORT, parse_samples(SCRAPE)) == [
        "relayd 1.2.3 (Python 3.11.7, Twisted 24.7.0): failing",
        "uptime: 1d 2h 03m 04s",
        "listener MSRP: up ssl:127.0.0.1:2855",
        "listener SIP: DOWN udp:5060, tcp:127.0.0.1:5060",
        "store: sqlite, up",
        "MSRP: 3 connections, 2 sessions",
        "SIP: 5 transactions, 8 requests received",
        "consents: 5 pending, 1 granted, 0 denied",
        "problem: SIP is not listening",
    ]


def test_counts_leave_out_what_the_scrape_lacks() -> None:
    assert counts(parse_samples("# TYPE relayd_msrp_sessions gauge\nrelayd_msrp_sessions 0\n")) == {
        "MSRP": {"sessions": 0}
    }


@pytest.mark.parametrize("url", ["https://127.0.0.1:9100", "127.0.0.1:9100", "http://"])
def test_status_url_must_be_plain_http(url: str) -> None:
    with pytest.raises(CtlError, match="expected http://host:port"):
        check_url(url)
