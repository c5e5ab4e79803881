"""What a permission change releases: one rule for every way a recipient answers.

A recipient answers a pending consent request by writing the document at its
Permission URI (the XCAP server settles it as the write lands) or a rule of their own
that lets the sender through (the SIP relay settles it when the permission cache sees
the change). Either way the request is settled by :func:`settlement`, so that
wait-permission (consent spec §(a) step 9) and grant-permission report one answer.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from lxml import etree

from relayd.consent.permissions import consent_scope
from relayd.consent.policy import RequestContext, evaluate
from relayd.consent.store import ConsentState, IPermissionStore, PendingConsent

Answer = str | None
"""The combined ``trans-handling`` a requested method now gets: ``grant``, ``deny``, or
None when nothing says (RFC 4745 §10.2, RFC 5361 §3.2)."""


def settlement(
    record: PendingConsent, answers: Collection[Answer], *, withdrawn: bool = False
) -> ConsentState | None:
    """The state a permission change moves ``record`` to, or None to leave it.

    ``answers`` holds what each method the request asked for now gets. Every one
    granted grants the request (as the wait-permission status counts it). An explicit
    ``deny``, or the Permission-URI document ``withdrawn`` (deleted), refuses it while
    it is open, so the sender's wait-permission watch learns of it instead of waiting
    for expiry. Anything else leaves it open. A refused request can still be granted
    later; a granted one is never taken back here (revocation shows in the documents).
    """
    if record.state not in (ConsentState.PENDING, ConsentState.DENIED):
        return None
    if answers and set(answers) == {"grant"}:
        return ConsentState.GRANTED
    if record.state is ConsentState.PENDING and (withdrawn or "deny" in answers):
        return ConsentState.DENIED
    return None


def document_answers(root: etree._Element, record: PendingConsent, now: datetime) -> list[Answer]:
    """What the document at ``record``'s Permission URI answers each requested method,
    read within the scope that URI was minted for."""
    scope = consent_scope(record)
    return [
        evaluate(
            root,
            RequestContext(record.sender, scope.list_uri, method, now, recipient=scope.recipient),
            scope,
        ).trans_handling
        for method in scope.methods
    ]


async def settle_document(
    store: IPermissionStore, record: PendingConsent, root: etree._Element | None, now: datetime
) -> ConsentState | None:
    """Mark ``record`` as the document just written at its Permission URI settles it
    (``root`` None: the document was deleted); the new state, or None when unchanged.

    The one step after every write at a Permission URI, whoever writes it (an XCAP PUT
    or DELETE, a grant or deny link)."""
    if root is None:
        state = settlement(record, (), withdrawn=True)
    else:
        state = settlement(record, document_answers(root, record, now))
    if state is not None:
        await store.set_consent_state(record.id, state)
    return state
