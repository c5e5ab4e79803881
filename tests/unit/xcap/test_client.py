"""relayd.xcap.client's pure parts: request paths."""

from __future__ import annotations

from relayd.xcap.client import document_path, node_path


def test_paths_escape_what_a_segment_or_selector_cannot_hold() -> None:
    path = document_path("/xcap-root", "consent-rules", "sip:a b@x", "index")
    assert path == "/xcap-root/consent-rules/users/sip:a%20b@x/index"
    assert node_path(path, 'ruleset/rule[@id="r"]').endswith("/~~/ruleset/rule%5B@id=%22r%22%5D")
    assert document_path("/r", "xcap-caps", None, "index") == "/r/xcap-caps/global/index"
