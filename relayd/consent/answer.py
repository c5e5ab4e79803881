"""Grant and deny links: a recipient answers a consent request with one click or request.

RFC 5360 §5.3 has the relay send the recipient grant and deny URIs (RFC 5361 §3.2
document, ``sip:``/``sips:`` and ``https:`` forms). Each link carries an answer token
``<consent id>.<mac>``, the MAC an HMAC of the action under the consent's Permission-URI
token: unguessable (the Permission token never leaves the relay's store and the
recipient's UA), nothing more to store, and it dies with the record. A grant link acts
while the request is open (pending, or denied and not yet expired); a deny link acts as
long as the record exists, so it also revokes a grant later (RFC 5360 §5.8).

Acting on a link writes the document an XCAP PUT at the Permission URI would
(:func:`answer_document`) and settles the record the same way
(:func:`relayd.consent.settle.settle_document`): the store's change listener then
NOTIFYs wait-permission watchers and releases what waited, as for any PUT.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Literal

from lxml import etree
from twisted.internet.interfaces import IReactorTime

from relayd.consent.additions import is_whole_list
from relayd.consent.documents import parse_document
from relayd.consent.permissions import permission_document_name
from relayd.consent.policy import identity_key, now_from_clock
from relayd.consent.settle import settle_document
from relayd.consent.store import ConsentState, IPermissionStore, PendingConsent
from relayd.consent.vocabulary import (
    COMMON_POLICY_NAMESPACE,
    CONSENT_FORMAT_NAMESPACE,
    CONSENT_RULES_AUID,
)

Action = Literal["grant", "deny"]
ACTIONS: tuple[Action, ...] = ("grant", "deny")

ANSWER_TOKEN = re.compile(r"\A(?P<id>[A-Za-z0-9_-]{16,64})\.(?P<mac>[A-Za-z0-9_-]{22})\Z")
"""``<consent id>.<128-bit MAC>``: URL path- and SIP user-part-safe (RFC 3986, RFC 3261)."""


def _mac(record: PendingConsent, action: Action) -> str:
    digest = hmac.new(
        record.permission_token.encode("ascii"),
        f"{action}\0{record.id}".encode(),
        hashlib.sha256,
    ).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode("ascii").rstrip("=")


def answer_token(record: PendingConsent, action: Action) -> str:
    """The token of ``record``'s grant or deny link."""
    return f"{record.id}.{_mac(record, action)}"


LINK_PATH = "/consent/"
"""Where the HTTPS links live on the XCAP site, beside (not below) the XCAP root."""


def link_path(record: PendingConsent, action: Action) -> str:
    """The path of ``record``'s HTTPS ``action`` link, below the site's origin."""
    return f"{LINK_PATH}{action}/{answer_token(record, action)}"


def token_consent_id(token: str) -> str | None:
    """The consent id a well-formed answer token names, else None (nothing to look up)."""
    match = ANSWER_TOKEN.match(token)
    return match["id"] if match is not None else None


def link_acts(record: PendingConsent, token: str, action: Action, now: float) -> bool:
    """Whether ``token`` is ``record``'s ``action`` link and may act at ``now``."""
    match = ANSWER_TOKEN.match(token)
    if match is None or match["id"] != record.id:
        return False
    if not hmac.compare_digest(match["mac"], _mac(record, action)):
        return False
    if action == "deny":
        return True
    return record.state in (ConsentState.PENDING, ConsentState.DENIED) and now < record.expires


async def find_answer(
    store: IPermissionStore, token: str, action: Action, now: float
) -> PendingConsent | None:
    """The record ``token`` answers with ``action`` at ``now``, or None (forged, wrong
    action, expired grant): a refusal never says which."""
    consent_id = token_consent_id(token)
    if consent_id is None:
        return None
    record = await store.get_consent(consent_id)
    if record is None or not link_acts(record, token, action, now):
        return None
    return record


Handling = tuple[Action, str | None]
"""One ``trans-handling``: its action and its ``perm-uri`` (None: none)."""


def consent_document(record: PendingConsent, rule_id: str, handlings: Sequence[Handling]) -> bytes:
    """An RFC 5361 document about ``record``: one rule (id ``rule_id``) for its sender,
    recipient and list, one ``trans-handling`` per ``(action, perm-uri or None)``."""
    return consent_ruleset([(record, rule_id, handlings)])


def consent_ruleset(rules: Sequence[tuple[PendingConsent, str, Sequence[Handling]]]) -> bytes:
    """An RFC 5361 document with one rule per ``(record, rule id, handlings)`` (RFC 4745
    §6: a ruleset holds any number of rules; RFC 5361 §4 shows one). A rule names its
    record's sender, or every sender (``cp:many``) for a whole-list request
    (:mod:`relayd.consent.additions`)."""
    cp = f"{{{COMMON_POLICY_NAMESPACE}}}"
    cr = f"{{{CONSENT_FORMAT_NAMESPACE}}}"
    nsmap = {"cp": COMMON_POLICY_NAMESPACE, "cr": CONSENT_FORMAT_NAMESPACE}
    ruleset = etree.Element(cp + "ruleset", nsmap=nsmap)
    for record, rule_id, handlings in rules:
        rule = etree.SubElement(ruleset, cp + "rule", id=rule_id)
        conditions = etree.SubElement(rule, cp + "conditions")
        identity = etree.SubElement(conditions, cp + "identity")
        if is_whole_list(record):
            # RFC 5360 §5.3's example: the list asks for every sender.
            etree.SubElement(identity, cp + "many")
        else:
            etree.SubElement(identity, cp + "one", id=record.sender)
        for parent, uri in (
            (etree.SubElement(conditions, cr + "recipient"), record.recipient),
            (etree.SubElement(conditions, cr + "target"), record.list_uri),
        ):
            etree.SubElement(parent, cp + "one", id=uri)
        actions = etree.SubElement(rule, cp + "actions")
        for action, perm_uri in handlings:
            attributes = {"perm-uri": perm_uri} if perm_uri else {}
            etree.SubElement(actions, cr + "trans-handling", attributes).text = action
    return bytes(etree.tostring(ruleset, xml_declaration=True, encoding="UTF-8"))


def answer_document(record: PendingConsent, action: Action) -> bytes:
    """The RFC 5361 document (§5.1, ``application/auth-policy+xml``) that answers
    ``record``: one rule for its sender, recipient and list, ``trans-handling``
    ``action``. Stored at the Permission URI, it speaks for the requested methods."""
    return consent_document(record, action, [(action, None)])


async def answer(
    store: IPermissionStore, record: PendingConsent, action: Action, clock: IReactorTime
) -> ConsentState | None:
    """Write ``record``'s answer at its Permission URI and settle the record; the new
    state (None: unchanged, e.g. a deny after a grant revokes through the document)."""
    body = answer_document(record, action)
    await store.put_document(
        CONSENT_RULES_AUID,
        identity_key(record.recipient),
        permission_document_name(record.permission_token),
        body,
    )
    root = parse_document(body)
    return await settle_document(store, record, root, now_from_clock(clock))
