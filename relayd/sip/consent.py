"""The SIP side of consent (seed §§4-6, §10; consent spec §(a) steps 2-6).

* :class:`ConsentURIs`: the relay-local URIs of the flow. The 470 names, for each member
  lacking permission, ``sip:consent-<list,member>.<mac>@domain``; a CONSENT sent there
  needs no server state to find its list (consent spec gap 11), and the MAC keeps a
  sender from making the relay forward CONSENTs to arbitrary URIs. Wait-permission URIs
  are ``sip:wp-<consent id>@domain``.
* :func:`consent_needed`: the 470 response (resource-lists body + ``Permission-Missing``,
  RFC 5360 §5.9.1).
* :func:`format_trigger_consent` / :func:`parse_trigger_consent`: the ``Trigger-Consent``
  header (RFC 5360 §5.11.2). Its ABNF is ``(SIP-URI / SIPS-URI) *( SEMI trigger-param )``
  with ``target-uri = "target-uri" EQUAL LDQUOT *( qdtext / quoted-pair ) RDQUOT``: a
  bare URI (no angle brackets, so every ``;`` parameter after it is a header parameter,
  RFC 3261 §20.10) and a quoted ``target-uri``. The relay writes exactly that; it reads
  the ``<uri>`` form too, which earlier relayd versions wrote.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from relayd.bounded import remember
from relayd.consent.lists import build_uri_list
from relayd.consent.vocabulary import RESOURCE_LISTS_MIME_TYPE
from relayd.sip.message import SIPRequest, SIPResponse, make_response
from relayd.sipuri import SIPURI, NameAddr, SIPURIError, split_outside_quotes

__all__ = [
    "ConsentURIs",
    "TriggerConsent",
    "TriggerConsentError",
    "consent_needed",
    "format_trigger_consent",
    "parse_trigger_consent",
]

CONSENT_PREFIX = "consent-"
MAX_CACHED_URIS = 4096
WAIT_PREFIX = "wp-"


class ConsentURIs:
    """Mints and reads the relay-local URIs of the consent flow (module doc)."""

    def __init__(self, domain: str, key: bytes | None = None) -> None:
        self.domain = domain
        self._key = key or secrets.token_bytes(32)
        # Every relayed copy and every 470 names these; the MAC makes them worth keeping.
        self._minted: dict[tuple[str, str], str] = {}

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode("utf-8"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:12]).decode("ascii")

    def route_token(self, call_id: str, caller_tag: str) -> str:
        """The ``rr`` parameter of the Record-Route we put in a dialog: only requests of
        that dialog (its Call-ID and the caller's tag, which is the From tag one way and
        the To tag the other) are routed through us (RFC 3261 §16.4), so our Route is
        no open relay to whoever writes it into a request."""
        return self._mac(f"rr\0{call_id}\0{caller_tag}")

    def consent_uri(self, list_uri: str, member: str) -> str:
        uri = self._minted.get((list_uri, member))
        if uri is None:
            payload = base64.urlsafe_b64encode(f"{list_uri}\n{member}".encode()).decode("ascii")
            payload = payload.rstrip("=")
            uri = f"sip:{CONSENT_PREFIX}{payload}.{self._mac(payload)}@{self.domain}"
            remember(self._minted, MAX_CACHED_URIS, (list_uri, member), uri)
        return uri

    def parse_consent_user(self, user: str | None) -> tuple[str, str] | None:
        """``(list_uri, member)`` of a consent URI's user part, None when not ours/forged."""
        if not user or not user.startswith(CONSENT_PREFIX):
            return None
        payload, dot, mac = user[len(CONSENT_PREFIX) :].rpartition(".")
        if not dot or not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            return None
        try:
            text = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        list_uri, newline, member = text.partition("\n")
        return (list_uri, member) if newline else None

    def wait_uri(self, consent_id: str) -> str:
        return f"sip:{WAIT_PREFIX}{consent_id}@{self.domain}"

    @staticmethod
    def wait_id(user: str | None) -> str | None:
        if not user or not user.startswith(WAIT_PREFIX):
            return None
        return user[len(WAIT_PREFIX) :] or None


def consent_needed(
    request: SIPRequest,
    list_uri: str,
    missing: Sequence[str],
    uris: ConsentURIs,
    *,
    name_members: bool = False,
) -> SIPResponse:
    """470 (seed §5; RFC 5360 §5.9.1): nothing was relayed; here is whom to ask.

    Each URI is a relay-local consent URI for one member; the body and the
    ``Permission-Missing`` header carry the same URIs (consent spec §(a) step 2).
    The URIs stay opaque; with ``name_members`` (the sender may know the members: it
    owns the list or wrote it into the request) each also names its member, as the
    header's display-name (``"sip:bob@example.com" <sip:consent-…>``) and the body
    entry's ``<display-name>``, so the sender sees who is missing.
    """
    targets = tuple(uris.consent_uri(list_uri, member) for member in missing)
    key = (targets, name_members)
    built = _CONSENT_NEEDED.get(key)
    if built is None:
        # A sender retrying without permission gets the same answer every time.
        if name_members:
            header = ", ".join(
                NameAddr(SIPURI.parse(target), member).format()
                for target, member in zip(targets, missing, strict=True)
            )
            body = build_uri_list(targets, missing)
        else:
            header = ", ".join(f"<{t}>" for t in targets)
            body = build_uri_list(targets)
        built = remember(_CONSENT_NEEDED, MAX_CACHED_URIS, key, (header, body))
    missing_header, body = built
    headers = [
        ("Permission-Missing", missing_header),
        ("Content-Type", RESOURCE_LISTS_MIME_TYPE),
    ]
    return make_response(request, 470, headers=headers, body=body)


_CONSENT_NEEDED: dict[tuple[tuple[str, ...], bool], tuple[str, bytes]] = {}


class TriggerConsentError(ValueError):
    """A ``Trigger-Consent`` value that is not RFC 5360 §5.11.2 syntax; the text is safe
    to log and to answer as a reason phrase."""


@dataclass(frozen=True, slots=True)
class TriggerConsent:
    """One ``trigger-cons-spec``: the URI to trigger consent at, and the target URI of
    the translation (RFC 5360 §5.11.2)."""

    uri: SIPURI
    target_uri: SIPURI


TRIGGER_SCHEMES = frozenset({"sip", "sips"})
"""RFC 5360 §5.11.2: ``SIP-URI / SIPS-URI`` only."""


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_trigger_consent(uri: str, target_uri: str) -> str:
    """The header value the relay writes: ``sip:…;target-uri="<target>"`` (module doc)."""
    return f"{uri};target-uri={_quoted(target_uri)}"


def parse_trigger_consent(value: str) -> TriggerConsent:
    """The one ``trigger-cons-spec`` of a header value (module doc).

    Raises :class:`TriggerConsentError` for several specs (a request triggers one
    consent at a time), a URI that is not SIP or SIPS, or a ``target-uri`` that is
    missing, not a quoted string, or not a SIP/SIPS URI itself.
    """
    specs, unterminated = split_outside_quotes(value, ",", angles=True)
    if unterminated:
        raise TriggerConsentError("Bad Trigger-Consent")
    if len(specs) != 1:
        raise TriggerConsentError("One Trigger-Consent At A Time")
    try:
        addr = NameAddr.parse(specs[0])
    except SIPURIError:
        raise TriggerConsentError("Bad Trigger-Consent") from None
    if addr.display_name is not None or addr.uri.scheme not in TRIGGER_SCHEMES:
        raise TriggerConsentError("Bad Trigger-Consent")
    target = addr.param("target-uri")
    if not target:
        raise TriggerConsentError("Trigger-Consent Without target-uri")
    if len(target) < 2 or not (target.startswith('"') and target.endswith('"')):
        raise TriggerConsentError("Trigger-Consent target-uri Not Quoted")
    try:
        target_uri = SIPURI.parse(_unquote(target[1:-1]))
    except SIPURIError:
        raise TriggerConsentError("Bad Trigger-Consent target-uri") from None
    if target_uri.scheme not in TRIGGER_SCHEMES:
        raise TriggerConsentError("Bad Trigger-Consent target-uri")
    return TriggerConsent(addr.uri, target_uri)


def _unquote(text: str) -> str:
    """The text of a quoted-string's body (RFC 3261 §25.1 quoted-pair)."""
    out: list[str] = []
    escaped = False
    for c in text:
        if escaped or c != "\\":
            out.append(c)
            escaped = False
        else:
            escaped = True
    return "".join(out)
