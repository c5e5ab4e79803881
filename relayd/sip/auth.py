"""SIP digest authentication (RFC 3261 §22) on :class:`relayd.digest.DigestAuthenticator`.

§22.3: a request the relay *forwards* (a MESSAGE to a URI list) is challenged like a proxy,
``407`` + ``Proxy-Authenticate``, answered in ``Proxy-Authorization``; a request it
*terminates* (REGISTER, CONSENT, SUBSCRIBE) like a UAS, ``401`` + ``WWW-Authenticate``,
answered in ``Authorization``. Only ``qop=auth`` with MD5 is offered; the nonce-count
replay check and ``stale=true`` come from the digest module (stateless HMAC nonces).
"""

from __future__ import annotations

from dataclasses import dataclass

from relayd.digest import (
    DigestAuthenticator,
    DigestCredentials,
    DigestError,
    parse_credentials,
)
from relayd.logs import logger
from relayd.sip.message import SIPRequest, SIPStatus
from relayd.sipuri import SIPURI, SIPURIError

__all__ = ["SIPAuthenticator", "SIPIdentity"]


@dataclass(frozen=True, slots=True)
class SIPIdentity:
    """Who a request authenticated as: the users-file name and its AOR (RFC 3261 §10.2)."""

    user: str
    aor: str


class SIPAuthenticator:
    """Challenges and verifies SIP requests for one realm against the shared users file.

    ``domain`` builds identities: user ``alice`` becomes ``sip:alice@<domain>`` (a user
    name that already contains ``@`` keeps its own host).
    """

    log = logger()

    def __init__(self, digest: DigestAuthenticator, domain: str) -> None:
        self.digest = digest
        self.domain = domain.lower()

    @property
    def realm(self) -> str:
        return self.digest.realm

    def identity_for(self, user: str) -> SIPIdentity:
        if "@" in user:
            name, _, host = user.rpartition("@")
            return SIPIdentity(user, f"sip:{name}@{host.lower()}")
        return SIPIdentity(user, f"sip:{user}@{self.domain}")

    def challenge(self, *, proxy: bool, stale: bool = False) -> SIPStatus:
        """The 401/407 to raise (or send) so the client retries with credentials."""
        value = self.digest.challenge(stale=stale)
        if proxy:
            return SIPStatus(407, headers=[("Proxy-Authenticate", value)])
        return SIPStatus(401, headers=[("WWW-Authenticate", value)])

    def _credentials(self, request: SIPRequest, header: str) -> DigestCredentials | None:
        """The first credentials row for our realm (§22.4: one per realm may be present)."""
        for row in request.headers.get_raw(header):
            try:
                cred = parse_credentials(row)
            except DigestError as e:
                self.log.warn(
                    "malformed {header} in {method}: {reason}",
                    header=header,
                    method=request.method,
                    reason=e.reason,
                )
                raise SIPStatus(400, "Malformed Credentials") from None
            if cred.realm == self.realm:
                return cred
        return None

    def authenticate(self, request: SIPRequest, *, proxy: bool, peer: object = None) -> SIPIdentity:
        """Return the verified identity or raise :class:`SIPStatus`.

        401/407 for missing, wrong, replayed or stale credentials (stale adds
        ``stale=true`` so the UA retries silently); 400 for malformed credentials or a
        digest-uri that is not the Request-URI (RFC 2617 §3.2.2.5).
        """
        cred = self._credentials(request, "Proxy-Authorization" if proxy else "Authorization")
        if cred is None:
            raise self.challenge(proxy=proxy)
        if not _same_uri(cred.uri, request.uri):
            self.log.warn(
                "digest uri does not match the Request-URI of {method} from {peer}",
                method=request.method,
                peer=peer,
            )
            raise SIPStatus(400, "Digest URI Mismatch")
        try:
            success = self.digest.verify(request.method, cred)
        except DigestError as e:
            if e.stale:
                self.log.debug("stale nonce from {user} at {peer}", user=cred.username, peer=peer)
            else:
                self.log.warn(
                    "authentication of {user} failed from {peer}: {reason}",
                    user=cred.username,
                    peer=peer,
                    reason=e.reason,
                )
            raise self.challenge(proxy=proxy, stale=e.stale) from None
        return self.identity_for(success.username)


def _same_uri(digest_uri: str, request_uri: SIPURI) -> bool:
    """§22.4: digest-uri equals the Request-URI; compared as URIs, not strings (§19.1.4)."""
    if digest_uri == request_uri.format():
        return True
    try:
        return SIPURI.parse(digest_uri) == request_uri
    except SIPURIError:
        return False
