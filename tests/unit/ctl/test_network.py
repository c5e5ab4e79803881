"""relayctl's MSRP plumbing without a network: AUTH chaining (RFC 4976 §5.1), failures."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.python.failure import Failure

from relayd.ctl.network import (
    advertised_path,
    delivery_failure,
    describe_loss,
    merge_use_path,
)
from relayd.msrp.client import MSRPClientError

A = "msrps://relay.example:2855/abc;tcp"
B = "msrps://peer.example:2855/xyz;tcp"


def test_merge_use_path_appends_a_relay_that_names_only_itself() -> None:
    assert merge_use_path([], [A]) == [A]
    assert merge_use_path([A], [B]) == [A, B]


def test_merge_use_path_takes_a_full_route_as_is() -> None:
    assert merge_use_path([A], [A.replace("relay", "RELAY"), B]) == [
        A.replace("relay", "RELAY"),
        B,
    ]


def test_advertised_path_reverses_use_path_then_adds_own_uri() -> None:
    assert advertised_path([A, B], "msrps://me.invalid:2855/s;tcp") == [
        B,
        A,
        "msrps://me.invalid:2855/s;tcp",
    ]


def test_delivery_failure_keeps_status_code_and_comment() -> None:
    error = delivery_failure(MSRPClientError("relay refused a chunk: 481 Session Does Not Exist"))
    assert str(error) == "delivery failed: 481 Session Does Not Exist"
    lost = delivery_failure(MSRPClientError("connection to the relay was lost"))
    assert str(lost) == "delivery failed: connection to the relay was lost"


def test_describe_loss_explains_tls_verification() -> None:
    error = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert describe_loss([Failure(error)], "h") == (
        "TLS failed: certificate verify failed (wrong or missing --ca?)"
    )
    assert describe_loss([], "h") == "connection to the relay was lost"
