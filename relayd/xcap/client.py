"""A small XCAP client (RFC 4825) on treq, with HTTP Digest (RFC 2617, qop="auth").

Used by ``relayctl permissions|lists``, the tests and ``bench/xcap_bench.py``.

Digest is transparent: the first request is answered 401 with a challenge, which is
answered once; the nonce is then kept and each later request carries credentials
straight away with the next nonce-count (RFC 2617 §3.2.2), so a request costs one
round trip while the nonce is valid.  A 401 for credentials built on a kept nonce
(``stale=true``, or a nonce the server has forgotten) is answered once more with the
fresh challenge; a second 401 is the caller's answer (wrong password).

The digest-uri must equal the request-target as sent (RFC 2617 §3.2.2.5), so paths
are normalised once with hyperlink, exactly as treq would, and that text is used
for both.  Every request, body included, is bounded by ``timeout_seconds``.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import quote

import treq
from hyperlink import EncodedURL
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from relayd.digest import Challenge, DigestError, answer_challenge, read_challenge
from relayd.logs import logger
from relayd.xcap.errors import percent_encoded

DEFAULT_TIMEOUT_SECONDS = 30.0
XCAP_ERROR_MIME_TYPE = "application/xcap-error+xml"

# RFC 3986 pchar minus "/" and "%": what a path segment (an XUI) may keep unescaped.
SEGMENT_SAFE = "!$&'()*+,;=:@-._~"
# Node selectors (RFC 4825 §6.3) keep "/" and "@"; "[", "]" and '"' are escaped.

log = logger()


class XCAPClientError(Exception):
    """No HTTP answer: connection refused, TLS failure, timeout.  One-line message."""


class XCAPResponse(NamedTuple):
    """``(status, headers, body)`` of one answered request."""

    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def etag(self) -> str | None:
        return self.header("ETag")

    @property
    def reason(self) -> str:
        phrase = RESPONSES.get(self.status, b"")
        return phrase.decode("ascii", "replace")

    def xcap_error(self) -> tuple[str, str | None] | None:
        """``(condition, phrase)`` of an ``application/xcap-error+xml`` body, else None."""
        media = (self.header("Content-Type") or "").split(";", 1)[0].strip().lower()
        if media != XCAP_ERROR_MIME_TYPE or not self.body:
            return None
        # Imported here: the parser module pulls in lxml, not needed for plain requests.
        from relayd.xcap.xml import parse_document

        try:
            root = parse_document(self.body)
        except Exception:
            return None
        for child in root:
            if isinstance(child.tag, str):
                local = child.tag.rpartition("}")[2]
                return local, child.get("phrase")
        return None


def document_path(root: str, auid: str, xui: str | None, document: str) -> str:
    """``<root>/<auid>/users/<xui>/<document>`` (``global`` when ``xui`` is None)."""
    tree = "global" if xui is None else "users/" + quote(xui, safe=SEGMENT_SAFE)
    return f"{root.rstrip('/')}/{auid}/{tree}/{quote(document, safe=SEGMENT_SAFE)}"


def node_path(document: str, selector: str) -> str:
    """A document path plus ``/~~/`` and the percent-encoded node selector."""
    return f"{document}/~~/{percent_encoded(selector)}"


def load_trust_root(pem: bytes) -> Any:
    """A trust root made of every certificate in ``pem`` (a CA or a self-signed leaf)."""
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in pem.split(marker) if b"-----BEGIN" in block]
    if not blocks:
        raise XCAPClientError("the trust PEM holds no certificate")
    return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])


@implementer(IPolicyForHTTPS)
class PinnedTrustPolicy:
    """HTTPS with our own trust root (hostname checks as usual, via service_identity)."""

    def __init__(self, trust_pem: bytes) -> None:
        self._trust = load_trust_root(trust_pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust)


def describe_failure(failure: Failure) -> str:
    """One line for a request that got no HTTP answer."""
    value = failure.value
    reasons: list[Failure] = list(getattr(value, "reasons", []) or [])
    inner = reasons[0].value if reasons else value
    if isinstance(inner, SSL.Error):
        parts = inner.args[0] if inner.args and isinstance(inner.args[0], list) else []
        details = [str(part[-1]) for part in parts if isinstance(part, tuple) and part]
        text = ", ".join(d for d in details if d) or str(inner) or "handshake failed"
        return f"TLS failed: {text} (wrong or missing --ca?)"
    if type(inner).__name__ == "VerificationError":
        return "TLS failed: the certificate is not valid for this host"
    if isinstance(inner, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(inner, error.DNSLookupError):
        return "host name not found"
    if isinstance(inner, error.TimeoutError | defer.TimeoutError | defer.CancelledError):
        return "timed out"
    text = (reasons[0] if reasons else failure).getErrorMessage()
    return f"connection failed: {text}"


class XCAPClient:
    """One XCAP server, one digest user; keeps connections and the nonce between calls."""

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        trust_pem: bytes | None = None,
        reactor: Any = None,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        persistent: bool = True,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        origin = EncodedURL.from_text(base_url.rstrip("/"))
        self.origin = origin.replace(path=(), query=(), fragment="").to_uri().to_text()
        self.root = "/" + "/".join(origin.path) if origin.path and any(origin.path) else ""
        self.username = username
        self._password = password
        self.reactor = reactor
        self.timeout_seconds = timeout_seconds
        self.pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.pool.maxPersistentPerHost = 4
        policy: IPolicyForHTTPS = (
            PinnedTrustPolicy(trust_pem) if trust_pem is not None else BrowserLikePolicyForHTTPS()
        )
        agent = Agent(
            reactor, contextFactory=policy, pool=self.pool, connectTimeout=timeout_seconds
        )
        self.http = HTTPClient(agent)
        self._nonce: Challenge | None = None

    @property
    def realm(self) -> str | None:
        """The digest realm once a challenge has been seen."""
        return self._nonce.realm if self._nonce is not None else None

    # -- public API ----------------------------------------------------------------

    async def get(self, path: str, if_none_match: str | None = None) -> XCAPResponse:
        headers = {"If-None-Match": if_none_match} if if_none_match else {}
        return await self.request("GET", path, headers=headers)

    async def put(
        self,
        path: str,
        body: bytes,
        content_type: str,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> XCAPResponse:
        headers = {"Content-Type": content_type}
        if if_match:
            headers["If-Match"] = if_match
        if if_none_match:
            headers["If-None-Match"] = if_none_match
        return await self.request("PUT", path, body, headers)

    async def delete(self, path: str, if_match: str | None = None) -> XCAPResponse:
        headers = {"If-Match": if_match} if if_match else {}
        return await self.request("DELETE", path, headers=headers)

    async def authenticate(self) -> str:
        """Fetch a nonce (GET of xcap-caps) so later requests need one round trip.

        Returns the realm.  Raises :class:`XCAPClientError` when the server does not
        accept the credentials.
        """
        response = await self.get(f"{self.root}/xcap-caps/global/index")
        if response.status == 401 or self._nonce is None:
            raise XCAPClientError(f"authentication as {self.username} failed")
        return self._nonce.realm

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> XCAPResponse:
        """Send one request, answering a digest challenge at most once (module doc)."""
        url = EncodedURL.from_text(self.origin + path).to_uri()
        target = url.to_text()[len(self.origin) :]
        used = self._authorization(method, target)
        response = await self._send(method, url, body, headers, used)
        if response.status != 401:
            return response
        challenge = self._challenge_of(response)
        if challenge is None:
            return response
        # No credentials yet, or a kept nonce that expired (stale=true), was forgotten
        # or lost an nc race with a concurrent request: answer the new challenge once.
        self._nonce = challenge
        retry = self._authorization(method, target)
        response = await self._send(method, url, body, headers, retry)
        if response.status == 401:
            self._nonce = None  # do not keep reusing a nonce with bad credentials
        return response

    async def close(self) -> None:
        await self.pool.closeCachedConnections()

    # -- internals -----------------------------------------------------------------

    @staticmethod
    def _challenge_of(response: XCAPResponse) -> Challenge | None:
        for value in response.headers.getRawHeaders("WWW-Authenticate") or []:
            try:
                return read_challenge(value)
            except DigestError:
                continue
        return None

    def _authorization(self, method: str, target: str) -> str | None:
        if self._nonce is None:
            return None
        return answer_challenge(
            self._nonce, username=self.username, password=self._password, method=method, uri=target
        ).authorization

    async def _send(
        self,
        method: str,
        url: EncodedURL,
        body: bytes | None,
        headers: dict[str, str] | None,
        authorization: str | None,
    ) -> XCAPResponse:
        sent = Headers({name: [value] for name, value in (headers or {}).items()})
        if authorization is not None:
            sent.setRawHeaders("Authorization", [authorization])

        async def exchange() -> XCAPResponse:
            response = await self.http.request(
                method, url, data=body, headers=sent, allow_redirects=False
            )
            content: bytes = await treq.content(response)
            return XCAPResponse(response.code, response.headers, content)

        d = defer.Deferred.fromCoroutine(exchange())
        d.addTimeout(self.timeout_seconds, self.reactor)
        try:
            return await d
        except Exception:
            failure = Failure()
            if isinstance(failure.value, defer.TimeoutError):
                message = f"no answer within {self.timeout_seconds:g} s"
            else:
                message = describe_failure(failure)
            log.debug(
                "XCAP {method} {uri} failed: {reason}", method=method, uri=url, reason=message
            )
            raise XCAPClientError(f"{method} {url.to_text()}: {message}") from None
