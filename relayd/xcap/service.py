"""The XCAP listeners (``[xcap] listen``) and the permission store they serve (RFC 4825)."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

from lxml import etree
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort

from relayd.config import XCAPConfig
from relayd.consent.answer import Action, link_path
from relayd.consent.store import IPermissionStore, PendingConsent
from relayd.net.endpoints import (
    EndpointSpec,
    listener_tls,
    parse_endpoint,
    stream_server_endpoint,
)
from relayd.net.listeners import Listeners
from relayd.net.tls import TLSMaterial
from relayd.xcap.auth import permission_uri
from relayd.xcap.resource import XCAPResource, XCAPSite
from relayd.xcap.usages import load_schemas


class XCAPService(Listeners):
    """The XCAP HTTP listeners (``[xcap] listen``) and the permission store they serve.

    ``store`` is shared with the SIP side; it is closed when this service stops.
    """

    def __init__(
        self,
        site: XCAPSite,
        store: IPermissionStore,
        reactor: Any,
        config: XCAPConfig,
        tls: TLSMaterial,
        hostname: str,
    ) -> None:
        super().__init__("XCAP")
        self.site = site
        self.store = store
        self.root = config.root
        self.hostname = hostname
        self.public_url = config.public_url.rstrip("/")

        tls_context = listener_tls(tls)
        for text in config.listen:
            spec = parse_endpoint(text)
            self.add_stream(spec, stream_server_endpoint(reactor, spec, tls_context), site)

    def permission_uri(self, recipient: str, token: str) -> str:
        """The Permission URI for a consent request (consent spec §(c)); after start."""
        return permission_uri(self.public_url, recipient, token)

    def consent_link(self, record: PendingConsent, action: Action) -> str:
        """The HTTPS grant or deny link of ``record`` (RFC 5360 §5.6); after start.

        The links sit beside the XCAP root, so ``public_url`` without its root is their
        base (a reverse proxy's prefix kept); a ``public_url`` not ending in the root
        leaves only its origin to go by."""
        root = self.root.rstrip("/")
        if root and self.public_url.endswith(root):
            base = self.public_url[: -len(root)]
        else:
            parts = urlsplit(self.public_url)
            base = f"{parts.scheme}://{parts.netloc}"
        return base + link_path(record, action)

    def before_binding(self) -> None:
        """Compile the schemas before serving (relayd.xcap.usages): a request never
        reads a package file, and an installation without them does not start."""
        try:
            load_schemas(cast(XCAPResource, self.site.resource).usages.values())
        except (OSError, etree.LxmlError) as e:
            self.cannot_start(f"XCAP cannot load its XML schemas: {e}")

    def bound(self, spec: EndpointSpec, port: IListeningPort) -> None:
        address: Any = port.getHost()
        if not self.public_url:
            origin = _origin(spec.kind, self.hostname, address.port)
            self.public_url = origin + self.root.rstrip("/")
        self.log.info(
            "XCAP listening on {kind}:{host}:{port}, root {root}",
            kind=spec.kind,
            host=address.host,
            port=address.port,
            root=self.root,
        )

    def stopService(self) -> defer.Deferred[None]:
        listeners = super().stopService()

        async def stop() -> None:
            try:
                await listeners
            finally:
                await self.store.close()

        return defer.ensureDeferred(stop())


def _origin(kind: str, hostname: str, port: int) -> str:
    """``https://host:port`` of the first listener (``[xcap] public_url`` empty)."""
    scheme = "https" if kind == "ssl" else "http"
    host = f"[{hostname}]" if ":" in hostname else hostname
    return f"{scheme}://{host}:{port}"
