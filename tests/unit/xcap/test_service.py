"""The XCAP service's public links."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from relayd.config import XCAPConfig
from relayd.consent.answer import answer_token
from relayd.consent.store import MemoryPermissionStore, PendingConsent
from relayd.xcap.service import XCAPService

RECORD = PendingConsent(
    "c" * 22, "sip:a@x.test", "sip:l@x.test", "sip:b@x.test", (), "t" * 22, 0, 9
)


@pytest.mark.parametrize(
    ("public_url", "base"),
    [
        ("https://x.test:8443/xcap-root", "https://x.test:8443"),
        ("https://x.test/relay/xcap-root", "https://x.test/relay"),
        ("https://x.test/elsewhere", "https://x.test"),
    ],
)
def test_consent_links_sit_beside_the_public_xcap_root(public_url: str, base: str) -> None:
    config = XCAPConfig((), "/xcap-root", public_url, (), 1000, 1000, 5, 5)
    site: Any = None
    service = XCAPService(site, MemoryPermissionStore(), Clock(), config, None, "x.test")  # type: ignore[arg-type]
    token = answer_token(RECORD, "deny")
    assert service.consent_link(RECORD, "deny") == f"{base}/consent/deny/{token}"
