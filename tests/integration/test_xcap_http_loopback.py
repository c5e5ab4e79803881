"""XCAP over real TLS on 127.0.0.1: the daemon as relayd.service builds it, treq as client.

Digest authentication is done by hand (treq has none): send, read the 401 challenge,
answer it with relayd.digest, send again.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, cast

import pytest
import pytest_twisted
from hyperlink import EncodedURL
from lxml import etree
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from relayd.consent.permissions import permission_document_name
from relayd.consent.sqlite import SQLitePermissionStore
from relayd.consent.store import ConsentState, StoreChange
from relayd.consent.vocabulary import COMMON_POLICY_NAMESPACE as CP
from relayd.consent.vocabulary import CONSENT_POLICY_NAMESPACE as CR
from relayd.consent.vocabulary import CONSENT_RULES_MIME_TYPE as AUTH_POLICY
from relayd.consent.vocabulary import RESOURCE_LISTS_NAMESPACE as RL
from relayd.digest import answer_challenge, parse_challenge
from relayd.testing import (
    RawProtocol,
    RelayPKI,
    TrustTestCA,
    prepared_relay,
    raw_tls,
    relay_config_overrides,
    relay_service,
    write_users,
)
from relayd.xcap import usages
from relayd.xcap.errors import XCAP_ERROR_NAMESPACE
from relayd.xcap.service import XCAPService

pytestmark = pytest.mark.integration

_P = ParamSpec("_P")

HOST = "127.0.0.1"
REALM = "relayd-test"  # what relayd.testing.relay_config_overrides configures
USERS = {"alice": "alice-pw", "bob": "bob-pw", "root": "root-pw"}
ALICE = f"sip:alice@{REALM}"
BOB = f"sip:bob@{REALM}"
LIST = "sip:friends@relay.example.test"
MAX_BODY = 65536
TIMEOUT_SECONDS = 10


def async_test(
    function: Callable[_P, Coroutine[Any, Any, None]],
) -> Callable[_P, Deferred[None]]:
    """pytest_twisted.ensureDeferred with a type mypy can see (pytest_twisted is untyped)."""
    return cast(Callable[_P, Deferred[None]], pytest_twisted.ensureDeferred(function))


def rule(rule_id: str, identity: str = BOB, target: str = LIST) -> str:
    return (
        f'<rule id="{rule_id}"><conditions><identity><one id="{identity}"/></identity>'
        f'<cr:target uri="{target}"/></conditions>'
        "<actions><cr:trans-handling>grant</cr:trans-handling></actions></rule>"
    )


def ruleset(*rules: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ruleset xmlns="{CP}" xmlns:cr="{CR}">'
        + "".join(rules)
        + "</ruleset>"
    ).encode()


@dataclass
class Reply:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def etag(self) -> str | None:
        return self.header("ETag")

    def xcap_error(self) -> str:
        assert self.header("Content-Type") == "application/xcap-error+xml", self
        root = etree.fromstring(self.body)
        assert root.tag == f"{{{XCAP_ERROR_NAMESPACE}}}xcap-error"
        return etree.QName(root[0]).localname


def digest_authorization(challenge: str, method: str, uri: str, user: str, password: str) -> str:
    """Answer a ``WWW-Authenticate: Digest`` challenge (RFC 2617 §3.2.2, qop=auth)."""
    return answer_challenge(
        challenge, username=user, password=password, method=method, uri=uri
    ).authorization


class XCAPClient:
    """treq over TLS to one running relay, with the digest dance."""

    def __init__(self, base: str, ca_pem: bytes, scheme: str = "https") -> None:
        self.base = base
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, contextFactory=TrustTestCA(ca_pem), pool=pool)
        self.http = HTTPClient(agent)

    @staticmethod
    def wire(path: str) -> str:
        """The request-target treq sends for ``path``: digest's uri must equal it."""
        return EncodedURL.from_text("https://h" + path).to_uri().to_text()[len("https://h") :]

    async def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        d = self.http.request(
            method,
            self.base + path,
            data=body,
            headers=Headers({name: [value] for name, value in (headers or {}).items()}),
        )
        response = await d.addTimeout(TIMEOUT_SECONDS, reactor)
        content = await self.http_content(response)
        return Reply(response.code, response.headers, content)

    @staticmethod
    async def http_content(response: Any) -> bytes:
        from treq import content

        result: bytes = await content(response).addTimeout(TIMEOUT_SECONDS, reactor)
        return result

    async def authorize(self, method: str, path: str, user: str) -> str:
        """Fetch a challenge with a body-less request and answer it."""
        challenge = await self.send(method, path)
        assert challenge.code == 401, challenge
        value = challenge.header("WWW-Authenticate")
        assert value is not None
        return digest_authorization(value, method, self.wire(path), user, USERS[user])

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        user: str | None = "alice",
    ) -> Reply:
        sent = dict(headers or {})
        if user is not None:
            sent["Authorization"] = await self.authorize(method, path, user)
        return await self.send(method, path, body, sent)

    async def put(
        self, path: str, body: bytes, content_type: str = AUTH_POLICY, **kw: Any
    ) -> Reply:
        headers = {"Content-Type": content_type, **kw.pop("headers", {})}
        return await self.request("PUT", path, body, headers, **kw)


@dataclass
class RunningXCAP:
    service: Any
    xcap: XCAPService
    client: XCAPClient
    root: str
    changes: list[StoreChange]
    port: int
    ca_pem: bytes

    async def raw(self) -> RawProtocol:
        """A TLS connection on which the test speaks HTTP by hand."""
        return await raw_tls(reactor, HOST, self.port, self.ca_pem)

    def path(self, xui: str = ALICE, name: str = "index", auid: str = "consent-rules") -> str:
        return f"{self.root}/{auid}/users/{xui}/{name}"


StartXCAP = Callable[..., Awaitable[RunningXCAP]]


@pytest_twisted.async_yield_fixture
async def start_xcap(tmp_path: Path, pki: RelayPKI) -> AsyncIterator[StartXCAP]:
    running: list[Any] = []
    cert, key = pki.leaf(HOST)
    users = write_users(tmp_path / "users.htdigest", REALM, USERS)

    async def factory(
        data_dir: str = "data",
        listen: str = f"ssl:0:interface={HOST}",
        store: dict[str, str] | None = None,
        **xcap_keys: str,
    ) -> RunningXCAP:
        overrides = relay_config_overrides(
            str(tmp_path / data_dir),
            HOST,
            cert,
            key,
            users,
            extra={
                ("xcap", "listen"): listen,
                ("xcap", "admins"): "root",
                ("xcap", "max_body_bytes"): str(MAX_BODY),
                **{("xcap", name): value for name, value in xcap_keys.items()},
                **{("store", name): value for name, value in (store or {}).items()},
            },
        )
        service = relay_service(prepared_relay(overrides), reactor)
        service.startService()
        running.append(service)
        await service.getServiceNamed("msrp").listening.addTimeout(TIMEOUT_SECONDS, reactor)
        xcap: XCAPService = service.getServiceNamed("xcap")
        ports = await xcap.listening.addTimeout(TIMEOUT_SECONDS, reactor)
        address: Any = ports[0].getHost()
        port = address.port
        scheme = "https" if listen.startswith("ssl:") else "http"
        client = XCAPClient(f"{scheme}://{HOST}:{port}", pki.ca_pem)
        changes: list[StoreChange] = []
        xcap.store.add_listener(changes.append)
        return RunningXCAP(service, xcap, client, "/xcap-root", changes, port, pki.ca_pem)

    yield factory
    for service in running:
        if service.running:
            await service.stopService()


async def stop(running: RunningXCAP) -> None:
    await running.service.stopService()


@async_test
async def test_service_uses_sqlite_store_in_data_dir(start_xcap: StartXCAP, tmp_path: Path) -> None:
    running = await start_xcap()
    assert isinstance(running.xcap.store, SQLitePermissionStore)
    assert (await running.client.put(running.path(), ruleset(rule("a")))).code == 201
    assert (tmp_path / "data" / "relay.sqlite3").exists()
    address: Any = running.xcap.ports[0].getHost()
    port = address.port
    assert running.xcap.public_url == f"https://{HOST}:{port}/xcap-root"


@async_test
async def test_put_after_schema_files_are_gone(
    start_xcap: StartXCAP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editable reinstall removes the installed .xsd files under a running daemon."""
    usages.load_schema.cache_clear()  # as in a fresh process
    running = await start_xcap()
    monkeypatch.setattr(usages, "SCHEMA_DIR", tmp_path / "removed")
    assert (await running.client.put(running.path(), ruleset(rule("a")))).code == 201
    lists = b'<resource-lists xmlns="urn:ietf:params:xml:ns:resource-lists"/>'
    put = await running.client.put(
        running.path(auid="resource-lists"), lists, "application/resource-lists+xml"
    )
    assert put.code == 201


@async_test
async def test_digest_put_get_delete_over_tls(start_xcap: StartXCAP) -> None:
    running = await start_xcap()
    client = running.client
    path = running.path()
    unauthenticated = await client.request("GET", path, user=None)
    assert unauthenticated.code == 401
    challenge = unauthenticated.header("WWW-Authenticate")
    assert challenge is not None and parse_challenge(challenge)["realm"] == REALM

    put = await client.put(path, ruleset(rule("a")))
    assert put.code == 201
    assert put.etag is not None
    get = await client.request("GET", path)
    assert (get.code, get.body, get.etag) == (200, ruleset(rule("a")), put.etag)
    assert get.header("Content-Type") == AUTH_POLICY
    not_modified = await client.request("GET", path, headers={"If-None-Match": put.etag})
    assert not_modified.code == 304

    element_path = path + '/~~/ruleset/rule[@id="b"]'
    element = b'<rule id="b"/>'  # in the document's context, as GET returns it
    element_put = await client.put(
        element_path, element, "application/xcap-el+xml", headers={"If-Match": put.etag}
    )
    assert element_put.code == 201
    element_get = await client.request("GET", element_path)
    assert (element_get.body, element_get.etag) == (element, element_put.etag)

    assert (await client.request("GET", running.path(BOB))).code == 403
    assert (await client.request("GET", running.path(BOB), user="root")).code == 404
    assert (await client.request("DELETE", path)).code == 200
    assert (await client.request("GET", path)).code == 404

    kinds = [(change.kind, change.etag is None) for change in running.changes]
    assert kinds == [("document", False), ("document", False), ("document", True)]
    assert running.changes[0].etag == put.etag
    assert running.changes[1].etag == element_put.etag


@async_test
async def test_xcap_caps_read_only(start_xcap: StartXCAP) -> None:
    running = await start_xcap()
    path = f"{running.root}/xcap-caps/global/index"
    get = await running.client.request("GET", path)
    assert get.code == 200
    assert get.etag is not None
    put = await running.client.put(path, b"<x/>", "application/xcap-caps+xml", user=None)
    assert put.code == 405
    assert put.header("Allow") == "GET, HEAD"


@async_test
async def test_concurrent_document_puts_with_same_if_match(start_xcap: StartXCAP) -> None:
    running = await start_xcap()
    client = running.client
    path = running.path()
    etag = (await client.put(path, ruleset(rule("a")))).etag
    assert etag is not None
    bodies = [ruleset(rule("one")), ruleset(rule("two"))]
    authorizations = [await client.authorize("PUT", path, "alice") for _ in bodies]
    replies = await defer.gatherResults(
        [
            defer.ensureDeferred(
                client.send(
                    "PUT",
                    path,
                    body,
                    {"Authorization": auth, "Content-Type": AUTH_POLICY, "If-Match": etag},
                )
            )
            for body, auth in zip(bodies, authorizations, strict=True)
        ]
    )
    assert sorted(reply.code for reply in replies) == [200, 412]
    winner = next(index for index, reply in enumerate(replies) if reply.code == 200)
    current = await client.request("GET", path)
    assert (current.body, current.etag) == (bodies[winner], replies[winner].etag)


@async_test
async def test_concurrent_element_puts_with_same_if_match(start_xcap: StartXCAP) -> None:
    running = await start_xcap()
    client = running.client
    path = running.path()
    etag = (await client.put(path, ruleset(rule("a")))).etag
    assert etag is not None
    targets = [path + f'/~~/ruleset/rule[@id="{name}"]' for name in ("x", "y")]
    authorizations = [await client.authorize("PUT", target, "alice") for target in targets]
    replies = await defer.gatherResults(
        [
            defer.ensureDeferred(
                client.send(
                    "PUT",
                    target,
                    f'<rule id="{target[-3]}"/>'.encode(),
                    {
                        "Authorization": auth,
                        "Content-Type": "application/xcap-el+xml",
                        "If-Match": etag,
                    },
                )
            )
            for target, auth in zip(targets, authorizations, strict=True)
        ]
    )
    assert sorted(reply.code for reply in replies) == [201, 412]
    present = [(await client.request("GET", target)).code for target in targets]
    assert sorted(present) == [200, 404]


@async_test
async def test_restart_keeps_documents_and_etags(
    start_xcap: StartXCAP, durable_store: dict[str, str]
) -> None:
    first = await start_xcap(store=durable_store)
    put = await first.client.put(first.path(), ruleset(rule("a")))
    assert put.code == 201
    assert (await first.client.request("GET", first.path())).etag == put.etag
    await stop(first)

    second = await start_xcap(store=durable_store)
    get = await second.client.request("GET", second.path())
    assert (get.code, get.body, get.etag) == (200, ruleset(rule("a")), put.etag)


_BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + b"".join(
        b' <!ENTITY lol%d "%s">\n' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b']>\n<ruleset xmlns="urn:ietf:params:xml:ns:common-policy">&lol9;</ruleset>'
)
_EXTERNAL_ENTITY = (
    b'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
    b'<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"><rule id="&xxe;"/></ruleset>'
)
_INVALID_UTF8 = (
    b'<ruleset xmlns="urn:ietf:params:xml:ns:common-policy"><rule id="\xc3\x28"/></ruleset>'
)
_HUGE = ruleset(*(rule(f"r{i}") for i in range(MAX_BODY // 100)))


@pytest.mark.parametrize(
    ("body", "code", "condition"),
    [
        (_BILLION_LAUGHS, 409, "not-well-formed"),
        (_EXTERNAL_ENTITY, 409, "not-well-formed"),
        (_INVALID_UTF8, 409, "not-utf-8"),
        (_HUGE, 413, None),
    ],
    ids=["billion-laughs", "external-entity", "invalid-utf8", "huge"],
)
@async_test
async def test_hostile_bodies_are_refused_and_nothing_stored(
    start_xcap: StartXCAP, body: bytes, code: int, condition: str | None
) -> None:
    assert len(_HUGE) > MAX_BODY
    running = await start_xcap()
    path = running.path()
    reply = await running.client.put(path, body)
    assert reply.code == code
    if condition is not None:
        assert reply.xcap_error() == condition
    assert (await running.client.request("GET", path)).code == 404
    assert running.changes == []


@async_test
async def test_permission_uri_grants_without_account(start_xcap: StartXCAP) -> None:
    running = await start_xcap()
    store = running.xcap.store
    token = secrets.token_urlsafe(16)
    consent = await store.open_consent(BOB, LIST, ALICE, ["MESSAGE"], token, 0, 4_000_000_000)
    uri = running.xcap.permission_uri(ALICE, token)
    assert uri.endswith(running.path(name=permission_document_name(token)))
    path = running.path(name=permission_document_name(token))

    too_wide = await running.client.put(
        path, ruleset(rule("x", target="sip:other@relay.example.test")), user=None
    )
    assert (too_wide.code, too_wide.xcap_error()) == (409, "constraint-failure")

    reply = await running.client.put(path, ruleset(rule("bob")), user=None)
    assert reply.code == 201
    granted = await store.get_consent(consent.id)
    assert granted is not None and granted.state is ConsentState.GRANTED
    assert [change.kind for change in running.changes] == ["consent", "document", "consent"]
    assert (await running.client.request("GET", running.path(), user=None)).code == 401


@async_test
async def test_xcap_directory_lists_a_users_documents(start_xcap: StartXCAP) -> None:
    """OMA xcap-directory over TLS: the owner sees ``index`` and the document a grant
    wrote at a Permission URI, each with its ETag; others are refused, and the
    Permission-URI capability opens its one document, never the listing."""
    running = await start_xcap()
    client = running.client
    token = secrets.token_urlsafe(16)
    await running.xcap.store.open_consent(BOB, LIST, ALICE, ["MESSAGE"], token, 0, 4_000_000_000)
    index = await client.put(running.path(), ruleset(rule("a")))
    granted = await client.put(
        running.path(name=permission_document_name(token)), ruleset(rule("bob")), user=None
    )
    assert (index.code, granted.code) == (201, 201)
    directory = running.path(name="directory.xml", auid="org.openmobilealliance.xcap-directory")
    caps = await client.request("GET", f"{running.root}/xcap-caps/global/index")
    assert b">org.openmobilealliance.xcap-directory<" in caps.body

    listed = await client.request("GET", directory)
    assert listed.code == 200, listed
    assert listed.header("Content-Type") == "application/vnd.oma.xcap-directory+xml"
    folders = {
        folder.get("auid", ""): [(e.get("uri"), e.get("etag")) for e in folder]
        for folder in etree.fromstring(listed.body)
    }
    assert folders == {
        "consent-rules": [
            (running.path(), index.etag),
            (running.path(name=permission_document_name(token)), granted.etag),
        ],
        "resource-lists": [],
    }
    unchanged = await client.request("GET", directory, headers={"If-None-Match": listed.etag or ""})
    assert unchanged.code == 304
    assert (await client.request("GET", directory, user="root")).code == 200
    assert (await client.request("GET", directory, user="bob")).code == 403
    assert (await client.request("GET", directory, user=None)).code == 401
    refused = await client.put(
        directory, b"<x/>", "application/vnd.oma.xcap-directory+xml", user=None
    )
    assert (refused.code, refused.header("Allow")) == (405, "GET, HEAD")


@async_test
async def test_plain_http_on_loopback_when_configured(start_xcap: StartXCAP) -> None:
    running = await start_xcap(listen=f"tcp:0:interface={HOST}")
    assert running.xcap.public_url.startswith(f"http://{HOST}:")
    reply = await running.client.put(running.path(), ruleset(rule("a")))
    assert reply.code == 201


# OpenXCAP's test document (RFC 4826 §3.3's example) plus what the relay cannot route.
ENTRY_REF = (
    "resource-lists/users/sip:bill@example.com/index/~~/resource-lists/"
    "list%5b@name=%22list1%22%5d/entry%5b@uri=%22sip:petri@example.com%22%5d"
)
EXTERNAL = (
    "http://xcap.example.org/resource-lists/users/sip:a@example.org/index/~~/"
    "resource-lists/list%5b@name=%22mkting%22%5d"
)
SHARED_LISTS = f"""<?xml version="1.0" encoding="UTF-8"?>
<resource-lists xmlns="{RL}">
  <list name="friends">
    <entry uri="sip:bill@example.com"><display-name>Bill Doe</display-name></entry>
    <entry uri="mailto:bill@example.com"/>
    <entry-ref ref="{ENTRY_REF}"/>
    <list name="close-friends">
      <entry uri="tel:+15551234"/>
      <external anchor="{EXTERNAL}"/>
    </list>
  </list>
  <list><entry uri="sip:joe@example.com"/></list>
  <list name="work mates"><entry uri="http://example.com/~joe"/></list>
</resource-lists>""".encode()

ROUTABLE_LISTS = (
    (SHARED_LISTS.split(b"\n  <list><entry")[0] + b"\n</resource-lists>")
    .replace(b'\n    <entry uri="mailto:bill@example.com"/>', b"")
    .replace(b'\n      <entry uri="tel:+15551234"/>', b"")
)


@async_test
async def test_any_rfc4826_lists_document_is_stored_and_served(start_xcap: StartXCAP) -> None:
    """Lists and entries the relay cannot route are kept; the PUT says which and why."""
    running = await start_xcap()
    client = running.client
    path = running.path(auid="resource-lists")
    put = await client.put(path, SHARED_LISTS, "application/resource-lists+xml")
    assert put.code == 201, put
    assert put.header("Content-Type") == "application/vnd.relayd.list-report+xml"
    report = etree.fromstring(put.body)
    items = [(item.get("node"), item.get("uri")) for item in report]
    assert items == [
        (
            'resource-lists/list[@name="friends"]/entry[@uri="mailto:bill@example.com"]',
            "mailto:bill@example.com",
        ),
        (
            'resource-lists/list[@name="friends"]/list[@name="close-friends"]/entry[@uri="tel:+15551234"]',
            "tel:+15551234",
        ),
        ("resource-lists/list[2]", None),
        ('resource-lists/list[@name="work mates"]', None),
        (
            'resource-lists/list[@name="work mates"]/entry[@uri="http://example.com/~joe"]',
            "http://example.com/~joe",
        ),
    ]
    assert all(item.get("reason") for item in report)
    get = await client.request("GET", path)
    assert (get.code, get.body, get.etag) == (200, SHARED_LISTS, put.etag)
    # A document the relay routes whole is answered as before: no body.
    again = await client.put(path, ROUTABLE_LISTS, "application/resource-lists+xml")
    assert (again.code, again.body, again.header("Content-Type")) == (200, b"", None)


@async_test
async def test_list_references_outside_the_root_are_refused(start_xcap: StartXCAP) -> None:
    """RFC 4826 §3.4.5: entry-ref relative to the XCAP root, external absolute HTTP."""
    running = await start_xcap()
    path = running.path(auid="resource-lists")
    for old, new in (
        (b'ref="resource-lists/', b'ref="http://xcap.example.org/resource-lists/'),
        (b'anchor="http://xcap.example.org/', b'anchor="resource-lists/'),
    ):
        body = ROUTABLE_LISTS.replace(old, new)
        refused = await running.client.put(path, body, "application/resource-lists+xml")
        assert (refused.code, refused.xcap_error()) == (409, "constraint-failure")
    assert (await running.client.request("GET", path)).code == 404
    stored = await running.client.put(path, ROUTABLE_LISTS, "application/resource-lists+xml")
    assert (stored.code, stored.body) == (201, b"")


# -- limits on the wire: answered at once, over real sockets -------------------------


async def closed_within(raw: RawProtocol, seconds: float = TIMEOUT_SECONDS) -> bytes:
    await raw.closed.addTimeout(seconds, reactor)
    return raw.received


def put_head(path: str, length: int) -> bytes:
    return (
        f"PUT {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {AUTH_POLICY}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


@async_test
async def test_declared_oversized_body_is_413_before_it_is_sent(start_xcap: StartXCAP) -> None:
    running = await start_xcap()
    raw = await running.raw()
    raw.send(put_head(running.path(), 100_000_000))  # and no body at all
    started = reactor.seconds()
    received = await closed_within(raw)
    assert received.startswith(b"HTTP/1.1 413 "), received
    assert reactor.seconds() - started < 2  # at once, not after a timeout
    assert (await running.client.request("GET", running.path())).code == 404


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"X-Big: " + b"a" * 20_000 + b"\r\n", b"431"),
        (b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(400)), b"431"),
    ],
    ids=["one-long-line", "many-lines"],
)
@async_test
async def test_oversized_header_block_is_answered_and_closed(
    start_xcap: StartXCAP, head: bytes, status: bytes
) -> None:
    running = await start_xcap()
    raw = await running.raw()
    raw.send(f"GET {running.path()} HTTP/1.1\r\nHost: {HOST}\r\n".encode() + head)
    received = await closed_within(raw)
    assert received.startswith(b"HTTP/1.1 " + status + b" "), received


@async_test
async def test_trickling_head_is_cut_off(start_xcap: StartXCAP) -> None:
    running = await start_xcap(header_timeout_seconds="1")
    raw = await running.raw()
    raw.send(f"GET {running.path()} HTTP/1.1\r\n".encode())
    started = reactor.seconds()
    sent = 0
    while not raw.closed.called and reactor.seconds() - started < TIMEOUT_SECONDS:
        await deferLater(reactor, 0.2, lambda: None)
        if not raw.closed.called:
            raw.send(b"X-Slow-%d: v\r\n" % sent)  # well inside the idle timeout
            sent += 1
    assert raw.closed.called
    assert raw.received.startswith(b"HTTP/1.1 408 "), raw.received
    assert 1 <= reactor.seconds() - started < 4
    assert sent >= 3


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(int(TIMEOUT_SECONDS / 0.05)):
        if condition():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("condition not reached")


@async_test
async def test_connection_beyond_the_cap_is_closed(start_xcap: StartXCAP) -> None:
    running = await start_xcap(max_connections="2")
    site = running.xcap.site
    first, second = await running.raw(), await running.raw()
    await until(lambda: site.connections == 2)
    third = await running.raw()
    assert await closed_within(third) == b""
    assert not first.closed.called and not second.closed.called
    assert site.connections == 2

    first.close()
    await closed_within(first)
    await until(lambda: site.connections == 1)
    assert (await running.client.request("GET", running.path(), user=None)).code == 401
