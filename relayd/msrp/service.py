"""The MSRP listeners (``[msrp] listen``) and the relay they serve, started and stopped together."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort

from relayd.config import MSRPConfig
from relayd.msrp.link import RelayLimits
from relayd.msrp.parser import MSRPLimits
from relayd.msrp.transport import MSRPRelay
from relayd.net.endpoints import (
    EndpointSpec,
    listener_identity,
    parse_endpoint,
    stream_server_endpoint,
)
from relayd.net.listeners import Listeners
from relayd.net.tls import (
    ListenerTLS,
    ServerIdentity,
    TLSMaterial,
    TrustRoots,
    stdlib_server_context,
)


def relay_limits(config: MSRPConfig) -> RelayLimits:
    """The ``[msrp]`` section's limits, as the relay and its connections take them."""
    return RelayLimits(
        parser=MSRPLimits(
            max_line_bytes=config.max_line_bytes,
            max_header_count=config.max_header_count,
            max_header_bytes=config.max_header_bytes,
        ),
        probation_seconds=config.probation_seconds,
        probation_max_failures=config.probation_max_failures,
        max_failed_auth=config.max_failed_auth,
        transaction_timeout_seconds=config.transaction_timeout_seconds,
        idle_timeout_seconds=config.idle_timeout_seconds,
        max_connections=config.max_connections,
        max_chunk_bytes=config.max_chunk_bytes,
        peer_chunk_bytes=config.peer_chunk_bytes,
        peer_chunk_overrides=config.peer_chunk_overrides,
        send_queue_bytes=config.send_queue_bytes,
        block_unknown_methods=config.block_unknown_methods,
        connect_timeout_seconds=config.connect_timeout_seconds,
        max_request_body_bytes=config.max_request_body_bytes,
    )


def exposed_listener_host(hostname: str, listener_hosts: Iterable[str]) -> str | None:
    """The first listener address off loopback, when ``hostname`` is no FQDN; else None.

    RFC 4976 puts the relay's FQDN in Use-Path so that the next hop can check
    it against the relay's certificate.  An IP literal or "localhost" is fine
    while every listener is on loopback (the defaults, the tests), so this
    only warns; it never refuses.
    """
    name = hostname.strip("[]").rstrip(".").lower()
    if name != "localhost":
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return None
    for host in listener_hosts:
        if not _is_loopback(host):
            return host
    return None


def _is_loopback(host: str) -> bool:
    """Loopback only: a wildcard (0.0.0.0, ::) or a name listens beyond this machine."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return host.lower() == "localhost"


class MSRPService(Listeners):
    """The MSRP listeners (``[msrp] listen``), their bound ports recorded as ours."""

    def __init__(
        self,
        relay: MSRPRelay,
        reactor: Any,
        tls: TLSMaterial,
        hostname: str,
        listen: Iterable[str],
    ) -> None:
        super().__init__("MSRP")
        self.relay = relay
        self.hostname = hostname
        #: The ``[msrp] listen`` endpoint strings.
        self.listen = tuple(listen)
        self._listener_hosts: list[str] = []

        def tls_context(spec: EndpointSpec) -> ListenerTLS:
            # The standard library's TLS: half the memory per idle client (relayd.net.tlsio).
            def build(identity: ServerIdentity, trust_roots: TrustRoots) -> ssl.SSLContext:
                return stdlib_server_context(listener_identity(identity, spec), trust_roots)

            return tls.listener(build)

        def follow() -> None:  # outbound connections to peer relays use the reloaded keys
            relay.identity, relay.trust_roots = tls.identity, tls.trust_roots

        tls.follow(follow)

        for text in self.listen:
            spec = parse_endpoint(text)
            endpoint = stream_server_endpoint(reactor, spec, tls_context)
            self.add_stream(spec, endpoint, relay.listener_factory(spec.kind == "ssl"))

    def bound(self, spec: EndpointSpec, port: IListeningPort) -> None:
        address: Any = port.getHost()
        self.relay.core.add_local_address(address.port, spec.kind == "ssl", spec.interface or None)
        self._listener_hosts.append(spec.interface or address.host)
        self.log.info(
            "MSRP listening on {kind}:{host}:{port}",
            kind=spec.kind,
            host=address.host,
            port=address.port,
        )

    def all_bound(self) -> None:
        """Warn once when peers beyond this machine get a Use-Path host they cannot verify."""
        exposed = exposed_listener_host(self.hostname, self._listener_hosts)
        if exposed is not None:
            self.log.warn(
                "[relay] hostname {hostname} is not a DNS name, and MSRP listens on {host}:"
                " peers cannot verify it against a certificate (RFC 4976 Use-Path:"
                " the relay's FQDN); set [relay] hostname",
                hostname=self.hostname,
                host=exposed,
            )

    def startService(self) -> None:
        super().startService()
        self.relay.start()

    def stopService(self) -> defer.Deferred[None]:
        self.relay.stop()
        return super().stopService()
