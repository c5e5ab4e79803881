"""Asking a recipient by MESSAGE, and the SIP grant and deny URIs (RFC 5360 §5.3, §5.6).

A recipient whose UA cannot take a CONSENT (it answers 405 or 501, or ``[sip]
consent_request = message``) is asked by a MESSAGE from the relay itself. Its body is
``multipart/alternative`` (RFC 2046 §5.1.4): a ``text/plain`` note a person reads (who
asks, through which list, for which methods, the two HTTPS links), then the RFC 5361
permission document (``application/auth-policy+xml``) with the grant and deny URIs as
``perm-uri`` of its ``trans-handling`` actions, in ``sip:`` and ``https:`` forms. The
richest alternative comes last, as RFC 2046 asks. A UA that takes only plain text
answers such a MESSAGE with 415 and an ``Accept`` naming ``text/plain`` (RFC 3428 §7,
RFC 3261 §21.4.13; baresip does): the relay then sends the note alone, once.

The SIP URIs are ``sip:grant-<token>@<domain>`` and ``sip:deny-<token>@<domain>``
(tokens: :mod:`relayd.consent.answer`); a PUBLISH (RFC 5360 §5.6) or MESSAGE sent there
answers the request.

One MESSAGE may ask about several requests (:data:`Asks`): what a ``Trigger-Consent``
sends again goes as one MESSAGE whatever the number of senders, one rule and one
paragraph of the note per request, so a trigger is never multiplied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from relayd.consent.additions import is_whole_list
from relayd.consent.answer import ACTIONS, Action, consent_ruleset, token_consent_id
from relayd.consent.permissions import requested_methods
from relayd.consent.store import PendingConsent
from relayd.consent.vocabulary import (
    CONSENT_RULES_MIME_TYPE,
)
from relayd.tokens import random_bytes

Links = Mapping[Action, tuple[str, str]]
"""Per action, its (SIP URI, HTTPS URL)."""
Asks = Sequence[tuple[PendingConsent, Links]]
"""The requests one MESSAGE asks about, each with its links."""


def answer_uri(domain: str, action: Action, token: str) -> str:
    """The SIP grant or deny URI of an answer token."""
    return f"sip:{action}-{token}@{domain}"


def parse_answer_user(user: str | None) -> tuple[Action, str] | None:
    """``(action, token)`` of a grant/deny URI's user part; None for any other user."""
    for action in ACTIONS:
        prefix = f"{action}-"
        if user and user.startswith(prefix):
            token = user[len(prefix) :]
            return (action, token) if token_consent_id(token) is not None else None
    return None


def request_document(asks: Asks) -> bytes:
    """The RFC 5361 §3 document asking for consent (example: §4): per request, one rule
    for its sender, recipient and list, one ``trans-handling`` per grant/deny URI
    (``perm-uri``)."""
    return consent_ruleset(
        [
            (
                record,
                f"consent-{number}" if len(asks) > 1 else "consent",
                [(action, uri) for action in ACTIONS for uri in filter(None, links[action])],
            )
            for number, (record, links) in enumerate(asks, 1)
        ]
    )


def request_note(asks: Asks) -> str:
    """The ``text/plain`` part: what a person needs to decide and act, per request."""
    return "\r\n".join(_note(record, links) for record, links in asks)


def _note(record: PendingConsent, links: Links) -> str:
    methods = ", ".join(requested_methods(record))
    web = (
        f"Allow: {links['grant'][1]}\r\nDeny: {links['deny'][1]}\r\n\r\n"
        if links["grant"][1]
        else ""
    )
    who = (
        f"You were added to the list {record.list_uri}: its senders ask to send you"
        f" {methods} requests through it."
        if is_whole_list(record)
        else f"{record.sender} asks to send you {methods} requests through the list"
        f" {record.list_uri}."
    )
    return (
        f"{who}\r\n\r\n{web}"
        f"Or send a MESSAGE to {links['grant'][0]} (allow)"
        f" or {links['deny'][0]} (deny).\r\n"
    )


PLAIN_TEXT = "text/plain; charset=utf-8"


def takes_plain_text(accept: Iterable[str]) -> bool:
    """Whether the ``Accept`` values of a 415 admit ``text/plain`` (RFC 3261 §20.1: media
    ranges with ``*`` wildcards; a range with ``q=0`` refuses)."""
    for value in accept:
        for item in value.split(","):
            media, *params = (part.strip().lower() for part in item.split(";"))
            if media not in ("text/plain", "text/*", "*/*"):
                continue
            q = next((p.partition("=")[2] for p in params if p.startswith("q=")), "1")
            try:
                if float(q) > 0:
                    return True
            except ValueError:
                continue
    return False


def request_body(asks: Asks) -> tuple[str, bytes]:
    """``(Content-Type, body)`` of the MESSAGE asking a recipient about ``asks``."""
    boundary = "consent-" + random_bytes(12).hex()
    parts = (
        (PLAIN_TEXT, request_note(asks).encode("utf-8")),
        (CONSENT_RULES_MIME_TYPE, request_document(asks)),
    )
    body = b"".join(
        b"--%s\r\nContent-Type: %s\r\n\r\n%s\r\n" % (boundary.encode(), kind.encode(), data)
        for kind, data in parts
    )
    body += b"--%s--\r\n" % boundary.encode()
    return f'multipart/alternative;boundary="{boundary}"', body
