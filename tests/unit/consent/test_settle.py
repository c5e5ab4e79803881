"""What a permission change releases: one rule for the Permission URI and own rules."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from relayd.consent.documents import parse_document
from relayd.consent.settle import Answer, document_answers, settlement
from relayd.consent.store import ConsentState, PendingConsent
from relayd.testing import consent_rule, consent_ruleset

LIST = "sip:friends@relay.test"
ALICE = "sip:alice@x.test"
RECORD = PendingConsent(
    "c1", ALICE, LIST, "sip:bob@x.test", ("MESSAGE", "INVITE"), "tok", 0.0, 60.0
)
PENDING, GRANTED, DENIED, EXPIRED = (
    ConsentState.PENDING,
    ConsentState.GRANTED,
    ConsentState.DENIED,
    ConsentState.EXPIRED,
)


@pytest.mark.parametrize(
    ("state", "answers", "withdrawn", "settled"),
    [
        (PENDING, ["grant", "grant"], False, GRANTED),
        (PENDING, ["grant", None], False, None),
        (PENDING, [None, None], False, None),
        (PENDING, ["grant", "deny"], False, DENIED),
        (PENDING, [], True, DENIED),
        (PENDING, [], False, None),
        (DENIED, ["grant", "grant"], False, GRANTED),
        (DENIED, ["deny", "deny"], False, None),
        (DENIED, [], True, None),
        (GRANTED, [], True, None),
        (GRANTED, ["deny", "deny"], False, None),
        (EXPIRED, ["grant", "grant"], False, None),
    ],
)
def test_settlement(
    state: ConsentState, answers: list[Answer], withdrawn: bool, settled: ConsentState | None
) -> None:
    record = replace(RECORD, state=state)
    assert settlement(record, answers, withdrawn=withdrawn) is settled


def test_a_permission_uri_document_answers_within_its_scope() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    grant = parse_document(consent_ruleset(consent_rule("a", ALICE, LIST)))
    assert document_answers(grant, RECORD, now) == ["grant", "grant"]
    deny = parse_document(consent_ruleset(consent_rule("a", ALICE, LIST, "deny")))
    assert document_answers(deny, RECORD, now) == ["deny", "deny"]
    other = parse_document(consent_ruleset(consent_rule("a", "sip:eve@x.test", LIST)))
    assert document_answers(other, RECORD, now) == [None, None]
    asked_nothing = replace(RECORD, methods=())
    assert document_answers(grant, asked_nothing, now) == ["grant"]
