"""A committed :class:`StoreChange` as text, for the processes sharing one store.

Both shared backends keep a ``changes`` table of ``(seq, node, payload)`` rows that
every process reads after the last row it has seen: PostgreSQL for every node naming
the database (relayd.consent.pgchanges), SQLite for the workers of one host
(relayd.consent.sqlite).  The payload is the change as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from relayd.consent.store import ConsentState, PendingConsent, StoreChange, StoredBinding


def encode(change: StoreChange) -> str:
    """A change as the JSON text of its ``changes`` row."""
    fields = asdict(change)
    del fields["remote"]
    del fields["body"]  # the others read the document
    return json.dumps(fields, separators=(",", ":"))


def decode(text: str) -> StoreChange:
    """The change :func:`encode` wrote, marked ``remote``: another process committed it."""
    fields: dict[str, Any] = json.loads(text)
    consent = fields.pop("consent", None)
    if consent is not None:
        consent["methods"] = tuple(consent["methods"])
        consent["state"] = ConsentState(consent["state"])
        fields["consent"] = PendingConsent(**consent)
    fields["bindings"] = tuple(StoredBinding(**b) for b in fields.get("bindings", ()))
    fields["removed"] = tuple(fields.get("removed", ()))
    return StoreChange(**fields, remote=True)
