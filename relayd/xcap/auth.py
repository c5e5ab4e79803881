"""Who may touch which XCAP document (consent spec §(c), RFC 4825 §5.7).

Three ways in:

* **owner**: HTTP Digest (RFC 2617) against the users file shared with MSRP and SIP;
  user ``alice`` owns the XUIs ``sip:alice@<domain>`` and ``sips:alice@<domain>`` for
  each configured domain (the realm and the relay hostname), the same AOR the SIP side
  gives her, plus the bare XUI ``alice``.  A user name that already holds ``@`` keeps
  its own host.  Owners read and write their ``users/<xui>/`` tree only (403 else);
* **admin**: a digest user named in ``[xcap] admins`` reads and writes every tree,
  including ``global``, which other users may only read;
* **capability**: the Permission URI the SIP side mints for a consent request,
  ``ROOT/consent-rules/users/<recipient>/p-<token>.xml``.  The unguessable token
  (:func:`relayd.tokens.new_token`, ≥128 bits) authorises GET, PUT and DELETE of that
  one document without an account while its consent is pending or granted.

Tokens are capabilities: compared by the store, only ever logged through
:func:`relayd.tokens.redact`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

from relayd.consent.permissions import permission_document_name, permission_token
from relayd.consent.policy import normalize_identity
from relayd.consent.store import ConsentState, PendingConsent
from relayd.consent.vocabulary import CONSENT_RULES_AUID
from relayd.digest import DigestAuthenticator, DigestError, parse_credentials
from relayd.tokens import redact
from relayd.xcap.selector import DocumentSelector

CAPABILITY_STATES = frozenset({ConsentState.PENDING, ConsentState.GRANTED, ConsentState.DENIED})
"""Consent states in which a Permission URI still opens its document.

Granted stays open so the recipient can revoke by DELETE with the same URI, denied so
they can change their mind; only an expired request closes it."""

# RFC 3986 pchar minus "/" and "%": what an XUI may keep unescaped in a path segment.
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"


def permission_uri(root_url: str, recipient: str, token: str) -> str:
    """The full Permission URI for a consent request (consent spec §(a), §(c)).

    ``root_url`` is the public XCAP root (``https://relay.example:4443/xcap-root``).
    """
    xui = quote(normalize_identity(recipient), safe=_SEGMENT_SAFE)
    name = permission_document_name(token)
    return f"{root_url.rstrip('/')}/{CONSENT_RULES_AUID}/users/{xui}/{name}"


def redact_document(document: DocumentSelector) -> str:
    """``auid/users/xui/name`` for logs, with a Permission URI token redacted."""
    token = permission_token(document.key)
    name = f"p-<{redact(token)}>.xml" if token is not None else document.document
    tree = "global" if document.xui is None else f"users/{document.xui}"
    return f"{document.auid}/{tree}/{name}"


class Unauthorized(Exception):
    """Answer 401 with ``challenge`` in ``WWW-Authenticate`` (RFC 2617 §3.2.1)."""

    def __init__(self, challenge: str, reason: str) -> None:
        super().__init__(reason)
        self.challenge = challenge
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    """Who a request acts as.

    ``user`` is the digest user, None for capability access.  ``consent`` is the
    consent whose Permission URI opened the document (capability access only).
    """

    user: str | None
    admin: bool = False
    consent: PendingConsent | None = None

    @property
    def label(self) -> str:
        """Safe for logs: the user name, or the redacted capability."""
        if self.user is not None:
            return self.user
        assert self.consent is not None
        return f"capability:{redact(self.consent.permission_token)}"


class XCAPAuthorizer:
    """Digest authentication and ownership rules for the XCAP tree."""

    def __init__(
        self,
        digest: DigestAuthenticator,
        domains: Iterable[str],
        admins: Iterable[str] = (),
    ) -> None:
        self.digest = digest
        self.domains = tuple(dict.fromkeys(d.lower() for d in domains if d))
        self.admins = frozenset(admins)

    @property
    def realm(self) -> str:
        return self.digest.realm

    def challenge(self, stale: bool = False) -> str:
        return self.digest.challenge(stale=stale)

    def authenticate(self, method: str, authorization: str | None, request_uri: str) -> str:
        """Verify ``Authorization: Digest …`` for this request; return the user name.

        The digest-uri must equal the request-target as sent (RFC 2617 §3.2.2.5).
        Raises :class:`Unauthorized` carrying a fresh challenge (``stale=true`` for an
        expired nonce, so clients retry without asking for a password).
        """
        if not authorization:
            raise Unauthorized(self.challenge(), "no credentials")
        try:
            credentials = parse_credentials(authorization)
            success = self.digest.verify(method, credentials, request_uri)
        except DigestError as e:
            raise Unauthorized(self.challenge(stale=e.stale), e.reason) from None
        return success.username

    def owned_xuis(self, user: str) -> frozenset[str]:
        """The normalised XUIs ``user`` owns (see the module docstring)."""
        owned = {user}
        if "@" in user:
            owned |= {normalize_identity(f"{scheme}:{user}") for scheme in ("sip", "sips")}
        else:
            for domain in self.domains:
                for scheme in ("sip", "sips"):
                    owned.add(normalize_identity(f"{scheme}:{user}@{domain}"))
        return frozenset(owned)

    def owns(self, user: str, xui: str) -> bool:
        return xui in self.owned_xuis(user) or normalize_identity(xui) in self.owned_xuis(user)

    def principal_for(self, user: str) -> Principal:
        return Principal(user, admin=user in self.admins)

    def may_access(self, principal: Principal, document: DocumentSelector, write: bool) -> bool:
        """Owner/admin rule of RFC 4825 §5.7 as configured for relayd."""
        if principal.user is None:
            return False
        if principal.admin:
            return True
        if document.xui is None:
            return not write
        return self.owns(principal.user, document.xui)
