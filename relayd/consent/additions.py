"""Members added to a list, and the whole-list request that asks them (RFC 5360 §5.3).

RFC 5360 §4.2 and §5.3: when a client adds a recipient URI to a translation, the relay
asks that recipient for permission to perform the translation itself, whoever sends
through it: the permission document of §5.3 has a rule whose ``cp:identity`` is
``<cp:many/>`` (every sender, RFC 4745 §7.1), whose ``recipient`` is the member and
whose ``target`` is the list URI.

relayd keeps one record per (sender, list, recipient). A request about the whole list
is the record whose sender is the list URI itself (:func:`whole_list_sender`): a list
URI is never a sender's identity (list URIs and accounts share one user namespace,
docs/consent.md "Lists"), and the list is who asks (the From of the §5.3 example). Its
documents name every sender (:func:`relayd.consent.answer.consent_ruleset`), so a grant
lets every sender of the list through; a grant naming one sender does not settle it.

Whom a list write adds is :func:`relayd.consent.lists.added_members`.
"""

from __future__ import annotations

from relayd.consent.policy import identity_key
from relayd.consent.store import PendingConsent

LIST_METHODS: tuple[str, ...] = ("MESSAGE", "INVITE")
"""What a whole-list request asks for: every method the relay sends through a list."""


def whole_list_sender(list_uri: str) -> str:
    """The sender of the record asking a member about every sender of ``list_uri``."""
    return list_uri


def is_whole_list(record: PendingConsent) -> bool:
    """Whether ``record`` asks for every sender of its list (module doc)."""
    return identity_key(record.sender) == identity_key(record.list_uri)
