"""The names consent documents are written in, each held against the RFC that
registers it (so a typo or a guessed name cannot pass unnoticed)."""

from __future__ import annotations

from relayd.consent import vocabulary
from relayd.sip.events import PendingAdditionsPackage


def test_rfc_5361_permission_documents() -> None:
    # RFC 5361 §7.1: the namespace; §3: "Permission documents inherit the MIME type of
    # common policy documents, 'application/auth-policy+xml'"; RFC 4745 §13.1.
    assert vocabulary.CONSENT_FORMAT_NAMESPACE == "urn:ietf:params:xml:ns:consent-rules"
    assert vocabulary.CONSENT_RULES_MIME_TYPE == "application/auth-policy+xml"
    assert vocabulary.COMMON_POLICY_NAMESPACE == "urn:ietf:params:xml:ns:common-policy"


def test_rfc_5362_pending_additions() -> None:
    # §4: namespace, element and its enumeration (in the schema's order); §5.1: the
    # event package name; §5.1.4: NOTIFY bodies are application/resource-lists+xml.
    assert vocabulary.PENDING_ADDITIONS_NAMESPACE == "urn:ietf:params:xml:ns:consent-status"
    assert vocabulary.PENDING_ADDITIONS_ELEMENT == "consent-status"
    assert vocabulary.PENDING_ADDITIONS_STATES == (
        "pending",
        "waiting",
        "error",
        "denied",
        "granted",
    )
    assert PendingAdditionsPackage.name == "consent-pending-additions"
    assert PendingAdditionsPackage.content_type == "application/resource-lists+xml"
    assert vocabulary.RESOURCE_LISTS_NAMESPACE == "urn:ietf:params:xml:ns:resource-lists"


def test_relayd_own_names_stay_out_of_the_ietf_namespace() -> None:
    """What no RFC defines (the seed's wait-permission bodies, relayd's policy
    extensions, list reports) is named under relayd's own URN and vendor tree."""
    for name in ("CONSENT_POLICY_NAMESPACE", "CONSENT_STATUS_NAMESPACE", "LIST_REPORT_NAMESPACE"):
        assert getattr(vocabulary, name).startswith("urn:relayd:params:xml:ns:")
    for name in ("CONSENT_STATUS_MIME_TYPE", "LIST_REPORT_MIME_TYPE"):
        assert getattr(vocabulary, name).startswith("application/vnd.relayd.")
