"""``relayctl permissions|lists`` as processes against a real XCAP listener over TLS.

The relay runs in this process (as in test_xcap_http_loopback.py); relayctl runs as
``python -m relayd.ctl.main`` children on the same reactor.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, cast

import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from relayd.consent.answer import answer
from relayd.consent.edits import make_rule, new_ruleset
from relayd.consent.permissions import permission_document_name
from relayd.consent.policy import is_permitted
from relayd.consent.store import ConsentState, IPermissionStore
from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as CP
from relayd.consent.vocabulary import CONSENT_RULES_MIME_TYPE
from relayd.ctl.xcap import Session
from relayd.testing import RelayPKI, prepared_relay, relay_config_overrides, relay_service
from relayd.testing import write_users as write_htdigest
from relayd.xcap.client import XCAPClient, XCAPResponse
from relayd.xcap.service import XCAPService
from relayd.xcap.xml import parse_document, serialize_document

from . import test_consent_flow as flow
from .test_consent_flow import start  # noqa: F401  (the fixture the grant-link test uses)

pytestmark = pytest.mark.integration

_P = ParamSpec("_P")
ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
REALM = "relayd-test"  # relayd.testing.relay_config_overrides
USERS = {"alice": "alice-xcap-pw", "bob": "bob-xcap-pw"}
ALICE = f"sip:alice@{REALM}"
BOB = f"sip:bob@{REALM}"
LIST = "sip:friends@relay.example.test"
TIMEOUT_SECONDS = 60


def async_test(
    function: Callable[_P, Coroutine[Any, Any, None]],
) -> Callable[_P, Deferred[None]]:
    return cast(Callable[_P, Deferred[None]], pytest_twisted.ensureDeferred(function))


@dataclass
class XCAPRelay:
    url: str
    store: IPermissionStore
    ca_path: str
    ca_pem: bytes
    folder: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYCTL_")}
        env.update({"HOME": str(self.folder), "PYTHONPATH": str(ROOT)})
        return env

    def access(self, user: str = "alice", password: str | None = None) -> list[str]:
        path = self.folder / f"{user}.pw"
        path.write_text((password or USERS[user]) + "\n", encoding="utf-8")
        server = ["--xcap", self.url, "--ca", self.ca_path]
        return [*server, "--user", user, "--password-file", str(path)]

    async def ctl(self, *args: str, user: str = "alice", password: str | None = None) -> Run:
        command, action, *rest = args
        argv = ["-m", "relayd.ctl.main", command, action, *self.access(user, password), *rest]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, argv, env=self.env(), path=str(ROOT)
        ).addTimeout(TIMEOUT_SECONDS, reactor)
        return Run(out.decode(), err.decode(), code)

    async def document(self, auid: str, xui: str = ALICE) -> etree._Element | None:
        stored = await self.store.get_document(auid, xui, "index")
        return None if stored is None else parse_document(stored.body)

    def client(self, user: str = "alice") -> XCAPClient:
        return XCAPClient(self.url, user, USERS[user], self.ca_pem, reactor)


@dataclass
class Run:
    out: str
    err: str
    code: int


@pytest_twisted.async_yield_fixture
async def relay(tmp_path: Path, pki: RelayPKI) -> AsyncIterator[XCAPRelay]:
    cert, key = pki.leaf(HOST)
    users = write_htdigest(tmp_path / "users.htdigest", REALM, USERS)
    overrides = relay_config_overrides(str(tmp_path / "data"), HOST, cert, key, users)
    service = relay_service(prepared_relay(overrides), reactor)
    service.startService()
    try:
        xcap = service.getServiceNamed("xcap")
        ports = await xcap.listening.addTimeout(10, reactor)
        port = ports[0].getHost().port
        yield XCAPRelay(
            f"https://{HOST}:{port}/xcap-root", xcap.store, pki.ca_path, pki.ca_pem, tmp_path
        )
    finally:
        await service.stopService()


def permitted(root: etree._Element | None, sender: str = BOB, method: str = "MESSAGE") -> bool:
    return root is not None and is_permitted(root, sender, LIST, method, datetime.now(UTC))


@async_test
async def test_grant_then_revoke_changes_what_the_store_permits(relay: XCAPRelay) -> None:
    grant = await relay.ctl("permissions", "grant", "alice", "--from", "bob", "--list", LIST)
    assert (grant.code, grant.err) == (0, ""), grant
    assert grant.out.startswith("added rule grant-bob-")
    assert permitted(await relay.document("consent-rules"))

    again = await relay.ctl(
        "permissions", "grant", ALICE, "--from", BOB, "--list", LIST, "--until", "2099-01-01"
    )
    assert again.code == 0 and again.out.startswith("updated rule"), again
    listed = await relay.ctl("permissions", "list", "--json")
    assert listed.code == 0, listed
    rules = json.loads(listed.out)["rules"]
    assert len(rules) == 1
    assert rules[0]["from"] == [BOB] and rules[0]["lists"] == [LIST]
    assert rules[0]["validity"][0]["until"] == "2099-01-01T00:00:00Z"
    table = await relay.ctl("permissions", "show", "alice")
    assert table.out.splitlines()[0].split() == [
        "DOCUMENT",
        "RULE",
        "FROM",
        "LIST",
        "METHODS",
        "UNTIL",
        "ACTION",
    ]

    revoke = await relay.ctl("permissions", "revoke", "alice", "--from", BOB, "--list", LIST)
    assert (revoke.code, revoke.out) == (0, f"revoked 1 rule of {ALICE}: index (1)\n"), revoke
    assert not permitted(await relay.document("consent-rules"))
    assert "no rules" in (await relay.ctl("permissions", "list")).out


@async_test
async def test_revoke_by_rule_id_and_all(relay: XCAPRelay) -> None:
    for sender in ("bob", "sip:carol@relayd-test"):
        run = await relay.ctl("permissions", "grant", "alice", "--from", sender, "--list", LIST)
        assert run.code == 0, run
    rules = json.loads((await relay.ctl("permissions", "list", "--json")).out)["rules"]
    by_id = await relay.ctl("permissions", "revoke", "alice", "--rule", rules[0]["id"])
    assert by_id.code == 0, by_id
    assert not permitted(await relay.document("consent-rules"))
    assert permitted(await relay.document("consent-rules"), "sip:carol@relayd-test")
    everything = await relay.ctl("permissions", "revoke", "alice", "--all", "--json")
    assert json.loads(everything.out)["document_deleted"] is True
    assert await relay.document("consent-rules") is None
    nothing = await relay.ctl("permissions", "revoke", "alice", "--all")
    assert nothing.code == 1 and "no consent-rules document" in nothing.err, nothing


@async_test
async def test_lists_add_show_remove(relay: XCAPRelay) -> None:
    add = await relay.ctl("lists", "add", "friends", "bob", "sip:carol@example.test")
    assert (add.code, add.out) == (0, "added 2 members to friends (new list)\n"), add
    shown = await relay.ctl("lists", "show", "friends", "--json")
    members = [m["uri"] for m in json.loads(shown.out)["members"]]
    assert members == [BOB, "sip:carol@example.test"]
    listing = await relay.ctl("lists", "list")
    assert listing.out.splitlines()[1].split() == ["friends", "2", "-"]
    removed = await relay.ctl("lists", "remove", "friends", "bob")
    assert removed.code == 0, removed
    root = await relay.document("resource-lists")
    assert root is not None
    assert [e.get("uri") for e in root.iter("{*}entry")] == ["sip:carol@example.test"]
    missing = await relay.ctl("lists", "remove", "friends", "bob")
    assert missing.code == 1 and missing.err.count("\n") == 1, missing
    whole = await relay.ctl("lists", "remove", "friends", "--all")
    assert (whole.code, whole.out) == (0, "removed list friends (1 member)\n"), whole
    root = await relay.document("resource-lists")
    assert root is not None and list(root.iter("{*}list")) == []
    uri = await relay.ctl("lists", "add", "sip:friends@example.test", "bob")
    assert uri.code != 0 and "list's name" in uri.err and uri.err.count("\n") == 1, uri


@async_test
async def test_wrong_password_is_one_line(relay: XCAPRelay) -> None:
    run = await relay.ctl("permissions", "list", password="wrong")
    assert run.code == 1
    assert run.out == ""
    assert run.err.splitlines() == [run.err.rstrip("\n")]
    assert run.err.startswith("relayctl: GET /xcap-root/")
    assert "401 Unauthorized" in run.err


@async_test
async def test_conflict_names_the_xcap_condition(relay: XCAPRelay) -> None:
    run = await relay.ctl("permissions", "grant", "alice", "--from", "bob", "--list", "sip:%zz")
    assert run.code == 1
    assert run.err.count("\n") == 1
    assert run.err.startswith("relayctl: PUT /xcap-root/consent-rules/users/sip:alice@")
    assert "409 Conflict: schema-validation-error" in run.err


@async_test
async def test_not_your_document_is_403(relay: XCAPRelay) -> None:
    run = await relay.ctl("permissions", "list", "--owner", "bob")
    assert run.code == 1 and "403 Forbidden" in run.err, run


@async_test
async def test_concurrent_grants_all_land(relay: XCAPRelay) -> None:
    senders = [f"sip:user{i}@example.test" for i in range(4)]
    runs = await defer.gatherResults(
        [
            Deferred.fromCoroutine(
                relay.ctl("permissions", "grant", "alice", "--from", s, "--list", LIST)
            )
            for s in senders
        ]
    )
    assert [run.code for run in runs] == [0, 0, 0, 0], runs
    root = await relay.document("consent-rules")
    assert root is not None
    assert all(permitted(root, sender) for sender in senders)


class _RacingClient(XCAPClient):
    """Before its first PUT, another writer changes the document (forcing a 412)."""

    rival: XCAPClient
    puts: list[int]

    async def put(
        self,
        path: str,
        body: bytes,
        content_type: str,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> XCAPResponse:
        if not self.puts:
            current = await self.rival.get(path)
            ruleset = parse_document(current.body)
            ruleset.append(make_rule("rival", "sip:rival@example.test", LIST))
            rival_put = await self.rival.put(
                path, serialize_document(ruleset), CONSENT_RULES_MIME_TYPE, if_match=current.etag
            )
            assert rival_put.status == 200
        response = await super().put(path, body, content_type, if_match, if_none_match)
        self.puts.append(response.status)
        return response


@async_test
async def test_update_retries_after_412(relay: XCAPRelay) -> None:
    path = f"/xcap-root/consent-rules/users/{ALICE}/index"
    seed = relay.client()
    created = await seed.put(
        path, serialize_document(new_ruleset()), CONSENT_RULES_MIME_TYPE, if_none_match="*"
    )
    assert created.status == 201
    racing = _RacingClient(relay.url, "alice", USERS["alice"], relay.ca_pem, reactor)
    racing.rival, racing.puts = seed, []
    session = Session(racing)

    def edit(root: etree._Element) -> None:
        root.append(make_rule("mine", BOB, LIST))

    try:
        await session.update(path, f"{{{CP}}}ruleset", CONSENT_RULES_MIME_TYPE, edit, None)
    finally:
        await racing.close()
        await seed.close()
    assert racing.puts == [412, 200]
    root = await relay.document("consent-rules")
    assert root is not None
    assert [r.get("id") for r in root] == ["rival", "mine"]


SHARED = (
    b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists"'
    b' xmlns:cr="urn:relayd:params:xml:ns:consent-policy">'
    b'<list name="buddies"><entry uri="mailto:carol@example.test"/>'
    b'<entry uri="sip:dave@example.test"/></list>'
    b'<list><entry uri="sip:erin@example.test"/></list>'
    b'<list name="far" cr:uri="sip:far@elsewhere.test"/></resource-lists>'
)


@async_test
async def test_lists_say_what_the_relay_does_not_route(relay: XCAPRelay) -> None:
    """A document another client shares is kept whole; relayctl says what is not routed."""
    path = f"/xcap-root/resource-lists/users/{ALICE}/index"
    other = relay.client()
    try:
        stored = await other.put(path, SHARED, "application/resource-lists+xml")
    finally:
        await other.close()
    assert stored.status == 201, stored
    listing = await relay.ctl("lists", "list")
    assert listing.code == 0, listing
    assert listing.out.splitlines()[4:] == [
        "not routed: list buddies, entry mailto:carol@example.test:"
        " mailto: URIs are not relayed (only sip: and sips:)",
        "not routed: resource-lists/list[2]: a list without a name (or cr:uri) has no list URI",
    ]
    # Only the relay knows its domain: its answer to the write says the rest.
    add = await relay.ctl("lists", "add", "buddies", "bob")
    assert add.code == 0, add
    assert add.out.splitlines() == [
        "added 1 member to buddies",
        "not routed: list buddies, entry mailto:carol@example.test:"
        " mailto: URIs are not relayed (only sip: and sips:)",
        "not routed: resource-lists/list[2]: a list without a name (or cr:uri) has no list URI",
        f"not routed: list far: sip:far@elsewhere.test is not in domain {HOST}",
    ]
    shown = json.loads((await relay.ctl("lists", "show", "buddies", "--json")).out)
    assert [m["uri"] for m in shown["members"]] == [
        "mailto:carol@example.test",
        "sip:dave@example.test",
        BOB,
    ]
    assert [item["uri"] for item in shown["not_routable"]] == ["mailto:carol@example.test"]
    refused = await relay.ctl("lists", "add", "new buddies", "bob")
    assert refused.code == 1 and refused.err.count("\n") == 1, refused
    assert "no list is created that the relay cannot route" in refused.err
    root = await relay.document("resource-lists")
    assert root is not None and len(list(root.iter("{*}list"))) == 3


@async_test
async def test_a_grant_made_by_link_is_listed_and_revoked(
    start: flow.Start,  # noqa: F811
    pki: RelayPKI,
    tmp_path: Path,
) -> None:
    """Bob allowed alice by his grant link, which wrote the document at the request's
    Permission URI, not his index: ``permissions list`` shows it with that document,
    ``revoke`` takes it back (the document deleted: the consent reads revoked) and
    alice's next MESSAGE gets 470."""
    solo = await flow.solo_consent(start)
    xcap: XCAPService = solo.relay.service.getServiceNamed("xcap")
    (record,) = await xcap.store.list_consents(recipient=flow.BOB)
    assert await answer(xcap.store, record, "grant", reactor) is ConsentState.GRANTED
    assert (await flow.send_message(solo.alice, flow.SOLO)).status == 200
    await solo.bob.next_request("MESSAGE")
    granted = permission_document_name(record.permission_token)

    password = tmp_path / "bob.pw"
    password.write_text(flow.USERS["bob"] + "\n", encoding="utf-8")
    access = ["--xcap", solo.relay.xcap_root, "--ca", pki.ca_path, "--user", "bob"]
    access += ["--password-file", str(password)]

    async def ctl(*args: str) -> Run:
        argv = ["-m", "relayd.ctl.main", *args[:2], *access, *args[2:]]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYCTL_")}
        env.update({"HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
        out, err, code = await getProcessOutputAndValue(
            sys.executable, argv, env=env, path=str(ROOT)
        ).addTimeout(TIMEOUT_SECONDS, reactor)
        return Run(out.decode(), err.decode(), code)

    # A rule of his own in index too: both documents are listed, each rule with its own.
    own = await ctl(
        "permissions", "grant", flow.BOB, "--from", flow.CAROL, "--list", flow.SOLO, "--id", "grant"
    )
    assert own.code == 0, own
    listed = await ctl("permissions", "list", "--owner", flow.BOB, "--json")
    assert listed.code == 0, listed
    rules = json.loads(listed.out)["rules"]
    assert [(r["document"], r["from"], r["action"]) for r in rules] == [
        ("index", [flow.CAROL], "grant"),
        (granted, [flow.ALICE], "grant"),
    ]
    table = await ctl("permissions", "list", "--owner", flow.BOB)
    assert [line.split()[0] for line in table.out.splitlines()] == ["DOCUMENT", "index", granted]
    only = await ctl("permissions", "show", flow.BOB, granted, "--json")
    assert [r["document"] for r in json.loads(only.out)["rules"]] == [granted]

    # Both documents have a rule "grant" (every grant link writes that id): by id alone
    # the revoke is ambiguous and changes nothing.
    ambiguous = await ctl("permissions", "revoke", flow.BOB, "--rule", "grant")
    assert ambiguous.code == 1 and f"(index, {granted}): name one with --document" in ambiguous.err
    assert await xcap.store.get_document("consent-rules", flow.BOB, granted) is not None

    revoke = await ctl("permissions", "revoke", flow.BOB, "--from", flow.ALICE, "--list", flow.SOLO)
    assert (revoke.code, revoke.err) == (0, ""), revoke
    assert revoke.out == f"revoked 1 rule of {flow.BOB}: {granted} (1, document deleted)\n"
    assert await xcap.store.get_document("consent-rules", flow.BOB, granted) is None
    # alice's watch heard of the grant (and of bob's other change); then of this.
    states: list[str] = []
    while "revoked" not in states and len(states) < 5:
        notify = await solo.alice.next_request("NOTIFY", solo.waiting.call_id)
        states += [e["state"] for e in flow.status_entries(notify)]
    assert states[-1] == "revoked" and set(states[:-1]) <= {"granted"}, states
    assert (await flow.send_message(solo.alice, flow.SOLO)).status == 470
    # carol's rule in index is untouched; a second revoke finds nothing to take back.
    left = json.loads((await ctl("permissions", "list", "--owner", flow.BOB, "--json")).out)
    assert [r["document"] for r in left["rules"]] == ["index"]
    again = await ctl("permissions", "revoke", flow.BOB, "--from", flow.ALICE, "--list", flow.SOLO)
    assert again.code == 1 and "no rule lets" in again.err, again
