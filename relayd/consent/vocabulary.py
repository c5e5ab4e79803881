"""Names the consent documents are written in: namespaces, AUIDs, MIME types.

One place for them, so that the relay, relayctl, the benchmarks and the tests spell
them the same way.
"""

from __future__ import annotations

COMMON_POLICY_NAMESPACE = "urn:ietf:params:xml:ns:common-policy"
"""RFC 4745 rulesets: what a permission document is."""
CONSENT_FORMAT_NAMESPACE = "urn:ietf:params:xml:ns:consent-rules"
"""RFC 5361's permission document elements (recipient, target, trans-handling)."""
CONSENT_POLICY_NAMESPACE = "urn:relayd:params:xml:ns:consent-policy"
"""relayd's extensions: ``cr:methods``, ``cr:target``, ``cr:trans-handling``, ``cr:uri``."""
RESOURCE_LISTS_NAMESPACE = "urn:ietf:params:xml:ns:resource-lists"
"""RFC 4826 lists."""
LIST_REPORT_NAMESPACE = "urn:relayd:params:xml:ns:list-report"
"""What a list write stores but the relay will not route (docs/consent.md)."""
CONSENT_STATUS_NAMESPACE = "urn:relayd:params:xml:ns:consent-status"
"""NOTIFY bodies of the wait-permission and grant-permission event packages."""
PENDING_ADDITIONS_NAMESPACE = "urn:ietf:params:xml:ns:consent-status"
"""RFC 5362 §4: the namespace of the element each consent-pending-additions entry carries."""
PENDING_ADDITIONS_ELEMENT = "consent-status"
"""RFC 5362 §4: that element, ``<consent-status>`` (pending, waiting, error, denied,
granted), inside each resource-lists ``<entry>`` (§5.1.6)."""
PENDING_ADDITIONS_STATES = ("pending", "waiting", "error", "denied", "granted")
"""RFC 5362 §4: the values of ``<consent-status>``, in the schema's order."""

CONSENT_RULES_AUID = "consent-rules"
RESOURCE_LISTS_AUID = "resource-lists"

CONSENT_RULES_MIME_TYPE = "application/auth-policy+xml"
RESOURCE_LISTS_MIME_TYPE = "application/resource-lists+xml"
LIST_REPORT_MIME_TYPE = "application/vnd.relayd.list-report+xml"
CONSENT_STATUS_MIME_TYPE = "application/vnd.relayd.consent-status+xml"
