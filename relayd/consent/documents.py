"""What the consent documents are keyed by, and how one is refused.

Neutral types, so that consent's rules speak of documents without speaking XCAP or
SIP: the XCAP server answers a :class:`DocumentRejected` as the RFC 4825 §11 409 it
names, the SIP side logs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

GLOBAL_XUI = ""
"""The XUI of the documents of the ``global`` tree (RFC 4825 §6.2)."""


class DocumentKey(NamedTuple):
    """Where a document is stored: AUID, XUI (:data:`GLOBAL_XUI` for the global tree)
    and document name."""

    auid: str
    xui: str
    name: str


@dataclass(frozen=True)
class Taken:
    """A value a document repeats or may not claim: ``field`` names it as a node
    selector relative to the document, ``alternatives`` are free values to use instead."""

    field: str
    alternatives: tuple[str, ...] = ()


Fault = Literal["constraint-failure", "uniqueness-failure"]
"""Why a well-formed, valid document is refused, in RFC 4825 §11.2's words."""


class DocumentRejected(ValueError):
    """A document consent cannot store or use; the text is safe to log and to answer."""

    def __init__(self, fault: Fault, reason: str, taken: Sequence[Taken] = ()) -> None:
        super().__init__(reason)
        self.fault = fault
        self.reason = reason
        self.taken = tuple(taken)
