"""Configuration: built-in defaults < INI file < command line, validated at once.

Every key is declared once in ``SCHEMA`` (name, default, parser, one-line
help).  The example file, the documentation and the command line are all
checked against it, so a key cannot exist in one place and not another.
Errors name the file, section and key: an operator should never have to guess
which line stopped the daemon.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relayd.net.endpoints import EndpointSpec, EndpointSyntaxError, is_host, parse_endpoint


class ConfigError(Exception):
    """A bad configuration value; its text is the one line shown to operators."""

    def __init__(self, source: str, section: str, key: str | None, message: str) -> None:
        self.source = source
        self.section = section
        self.key = key
        self.message = message
        where = f"[{section}] {key}: " if key else f"[{section}]: " if section else ""
        super().__init__(f"{source}: {where}{message}")


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    default: str
    parse: Callable[[str], Any]
    help: str


def _integer(minimum: int, maximum: int = 2**31 - 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        stripped = text.strip()
        digits = stripped[1:] if stripped[:1] == "-" else stripped
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"expected a whole number, got {stripped!r}")
        try:
            value = int(stripped)
        except ValueError:
            raise ValueError(f"expected a whole number, got {text.strip()!r}") from None
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}, got {value}")
        return value

    return parse


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"expected yes or no, got {text.strip()!r}")


def _text(text: str) -> str:
    return text.strip()


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.replace(",", " ").split())


def _chunk_overrides(text: str) -> tuple[tuple[str, int | None, int], ...]:
    """``host[:port]=bytes`` words as (host, port or None, bytes); IPv6 in brackets."""
    overrides = []
    for word in _words(text):
        target, equals, size = word.rpartition("=")
        host, port = target, None
        if target.rfind(":") > target.rfind("]"):
            host, _, port_text = target.rpartition(":")
            port = _integer(1, 65535)(port_text)
        host = host.strip("[]").lower()
        if not equals or not host:
            raise ValueError(f"expected host[:port]=bytes, got {word!r}")
        overrides.append((host, port, _integer(1024)(size)))
    return tuple(overrides)


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _hostname(text: str) -> str:
    """A DNS name or an IP literal: it goes into every Use-Path URI and is compared
    with To-Path (RFC 4976 §5), so a name no URI can carry would refuse every AUTH."""
    value = text.strip()
    if not value:
        return value
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    brackets_fit = bare == value or ":" in bare  # only around an IPv6 address
    if not (brackets_fit and is_host(bare)) or value.endswith("."):
        raise ValueError(
            f"expected a DNS name or an IP address (without a trailing dot), got {value!r}"
        )
    return value


def _hostnames(text: str) -> tuple[str, ...]:
    """Space- or comma-separated DNS names (as :func:`_hostname`), lower case."""
    try:
        return tuple(_hostname(word).lower() for word in _words(text))
    except ValueError as e:
        raise ValueError(str(e).replace("expected", "expected each to be", 1)) from None


def _choice(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in allowed:
            raise ValueError(f"expected {' or '.join(allowed)}, got {value!r}")
        return value

    return parse


def _endpoints(allowed: Iterable[str]) -> Callable[[str], tuple[str, ...]]:
    kinds = tuple(allowed)

    def parse(text: str) -> tuple[str, ...]:
        values = _lines(text)
        for value in values:
            try:
                endpoint = parse_endpoint(value)
            except EndpointSyntaxError as e:
                raise ValueError(str(e)) from None
            if endpoint.kind not in kinds:
                raise ValueError(
                    f"{value!r}: listener type {endpoint.kind!r} not allowed here"
                    f" (use {' or '.join(kinds)})"
                )
        return values

    return parse


SCHEMA: tuple[Key, ...] = (
    Key(
        "relay",
        "hostname",
        "",
        _hostname,
        "Name put in Use-Path URIs and checked against To-Path; empty: the first DNS name"
        " of the TLS certificate. Give the relay's FQDN: peers cannot verify an IP address"
        " or localhost, so either draws a warning at start-up when MSRP listens off loopback",
    ),
    Key(
        "relay",
        "data_dir",
        "~/.local/state/relayd",
        _text,
        "Directory for generated certificates, the users file and the store (created 0700)",
    ),
    Key(
        "relay",
        "log_level",
        "info",
        _choice(("debug", "info", "warn", "error")),
        "Least important log events written: debug adds a line per relayed request",
    ),
    Key(
        "relay",
        "workers",
        "1",
        _integer(1, 64),
        "Worker processes, each running the whole relay: they share the SIP and XCAP"
        " ports (SO_REUSEPORT); worker K (from 0) listens for MSRP and metrics on each"
        " configured port plus K. Above 1 the store must be sqlite or postgresql",
    ),
    Key(
        "msrp",
        "listen",
        "ssl:2855:interface=127.0.0.1",
        _endpoints(("ssl", "tcp")),
        "MSRP listeners, one endpoint string per line; ssl: without keys uses [tls]",
    ),
    Key(
        "msrp",
        "pool_names",
        "",
        _hostnames,
        "Names of the relay pool this node belongs to (RFC 4976 §8: clients find the"
        " nodes by DNS SRV _msrps._tcp.<name>), space separated: an AUTH addressed to"
        " msrps://<name>;tcp is answered here, and the Use-Path still names this node"
        " ([relay] hostname). Put each name in the certificate's subjectAltName too",
    ),
    Key(
        "msrp",
        "ca_certificates",
        "",
        _text,
        "PEM file or directory of trust roots for peer relays (mutual TLS); empty: no peers",
    ),
    Key(
        "msrp",
        "session_expires_seconds",
        "1800",
        _integer(1),
        "Lifetime of a Use-Path URI when AUTH carries no Expires",
    ),
    Key(
        "msrp",
        "session_expires_min_seconds",
        "60",
        _integer(1),
        "Smallest Expires accepted in AUTH (423 with Min-Expires below it)",
    ),
    Key(
        "msrp",
        "session_expires_max_seconds",
        "86400",
        _integer(1),
        "Largest Expires accepted in AUTH (423 with Max-Expires above it)",
    ),
    Key(
        "msrp",
        "probation_seconds",
        "30",
        _integer(1, 3600),
        "A new connection without a successful request in this time is closed (RFC 4976 §6.1)",
    ),
    Key(
        "msrp",
        "probation_max_failures",
        "3",
        _integer(1, 1000),
        "Failed requests tolerated on a connection still on probation",
    ),
    Key(
        "msrp",
        "max_failed_auth",
        "3",
        _integer(1, 1000),
        "Failed AUTH attempts after which a client connection is closed (never a relay's)",
    ),
    Key(
        "msrp",
        "transaction_timeout_seconds",
        "30",
        _integer(1, 3600),
        "Wait for the next hop's response before a 408 REPORT (RFC 4976 §6.4.1)",
    ),
    Key(
        "msrp",
        "idle_timeout_seconds",
        "3600",
        _integer(1),
        "Connections unused for this long are closed (RFC 4976 §6.5)",
    ),
    Key(
        "msrp",
        "max_connections",
        "0",
        _integer(0),
        "When above this many connections, close the least recently used; 0: no limit",
    ),
    Key(
        "msrp",
        "max_chunk_bytes",
        "1048576",
        _integer(1024),
        "Longest body a forwarded SEND carries before the relay splits it",
    ),
    Key(
        "msrp",
        "peer_chunk_bytes",
        "8192",
        _integer(1024),
        "Longest body per forwarded SEND towards a peer relay not known to take more"
        " (Kamailio: about 10 KiB); relayd peers are recognised and get max_chunk_bytes",
    ),
    Key(
        "msrp",
        "peer_chunk_overrides",
        "",
        _chunk_overrides,
        "Peer relays known to take larger chunks: host[:port]=bytes, space separated",
    ),
    Key(
        "msrp",
        "send_queue_bytes",
        "32768",
        _integer(4096, 1048576),
        "Unsent bytes (in the relay and the kernel) towards one connection before large"
        " transfers wait: what a new message may queue behind",
    ),
    Key(
        "msrp",
        "block_unknown_methods",
        "no",
        _boolean,
        "Refuse (501) requests other than SEND, REPORT and AUTH instead of forwarding them",
    ),
    Key(
        "msrp",
        "connect_timeout_seconds",
        "10",
        _integer(1, 300),
        "Time allowed to open a connection to a next hop",
    ),
    Key(
        "msrp",
        "max_request_body_bytes",
        "65536",
        _integer(0),
        "Largest body of a request other than SEND (those are forwarded whole, never split)",
    ),
    Key("msrp", "max_line_bytes", "8192", _integer(256), "Longest start or header line"),
    Key("msrp", "max_header_count", "64", _integer(4), "Most header fields in one message"),
    Key("msrp", "max_header_bytes", "32768", _integer(1024), "Largest header block"),
    Key(
        "auth",
        "realm",
        "",
        _text,
        "Digest realm for MSRP AUTH (and SIP, HTTP); empty: the relay hostname",
    ),
    Key(
        "auth",
        "users",
        "",
        _text,
        "htdigest file (user:realm:HA1); empty: users.htdigest in data_dir, with one"
        " generated user on first start",
    ),
    Key(
        "auth",
        "allowed_users",
        "",
        _words,
        "Users allowed to AUTH (space separated); empty: every user in the file",
    ),
    Key(
        "auth",
        "nonce_lifetime_seconds",
        "300",
        _integer(10, 86400),
        "Age after which a digest nonce is answered with stale=true",
    ),
    Key(
        "tls",
        "certificate",
        "",
        _text,
        "PEM certificate (chain) for ssl: listeners without certKey; empty: generated",
    ),
    Key(
        "tls",
        "private_key",
        "",
        _text,
        "PEM private key matching [tls] certificate; empty: generated",
    ),
    Key(
        "xcap",
        "listen",
        "ssl:4443:interface=127.0.0.1",
        _endpoints(("ssl", "tcp")),
        "XCAP (HTTP) listeners, one endpoint string per line; ssl: uses [tls]; tcp: (plain"
        " HTTP) only with a loopback interface",
    ),
    Key(
        "xcap",
        "root",
        "/xcap-root",
        _text,
        "Path of the XCAP root (RFC 4825 §6.1); documents are ROOT/<auid>/users/<xui>/<name>",
    ),
    Key(
        "xcap",
        "public_url",
        "",
        _text,
        "Base URL of the XCAP root put in minted Permission URIs; empty: https://<hostname>:"
        "<port of the first listener><root> (http:// when that listener is tcp:)",
    ),
    Key(
        "xcap",
        "admins",
        "",
        _words,
        "Users (space separated) who may read and write every user's documents",
    ),
    Key(
        "xcap",
        "max_body_bytes",
        "1048576",
        _integer(1024, 64 * 1024 * 1024),
        "Largest XCAP request body and stored document (413 above it)",
    ),
    Key(
        "xcap",
        "max_header_bytes",
        "16384",
        _integer(1024, 1024 * 1024),
        "Largest XCAP request line or header block (414 or 431 above it, and the"
        " connection is closed)",
    ),
    Key(
        "xcap",
        "header_timeout_seconds",
        "10",
        _integer(1, 3600),
        "Time a client has to send a request's line and headers, from connecting or from"
        " the previous response (408 and close after it)",
    ),
    Key(
        "xcap",
        "max_connections",
        "256",
        _integer(1, 1_000_000),
        "Most XCAP connections open at once; a new one beyond it is closed at once",
    ),
    Key(
        "sip",
        "listen",
        "udp:5060:interface=127.0.0.1\n    tcp:5060:interface=127.0.0.1",
        _endpoints(("udp", "tcp", "ssl")),
        "SIP listeners (consent relay), one endpoint string per line; ssl: uses [tls]",
    ),
    Key(
        "sip",
        "domain",
        "",
        _text,
        "SIP domain served (AORs sip:user@domain, list URIs); empty: the relay hostname",
    ),
    Key(
        "sip",
        "lists",
        "",
        _text,
        "resource-lists XML file of URI lists (list URI, members, owner); empty: only lists"
        " kept in the XCAP store",
    ),
    Key(
        "sip",
        "max_list_size",
        "100",
        _integer(1, 100_000),
        "Most members a list (or a request-contained recipient list) may have",
    ),
    Key(
        "sip",
        "max_bindings",
        "100000",
        _integer(1, 10_000_000),
        "Most registered contacts the registrar holds in memory (about 2 KiB each; every"
        " node of a pool holds the whole pool's); past it a REGISTER gets 503",
    ),
    Key(
        "sip",
        "consent_requests_per_hour",
        "30",
        _integer(1, 1_000_000),
        "CONSENT requests one sender may make per hour, and Trigger-Consent requests one"
        " recipient may make per hour, each counted apart (503 with Retry-After beyond)",
    ),
    Key(
        "sip",
        "pending_consent_seconds",
        "86400",
        _integer(1),
        "How long a pending consent request lives before it expires",
    ),
    Key(
        "sip",
        "subscription_expires_seconds",
        "3600",
        _integer(1),
        "Subscription duration when SUBSCRIBE carries no Expires",
    ),
    Key(
        "sip",
        "subscription_expires_min_seconds",
        "60",
        _integer(1),
        "Shortest subscription accepted (423 with Min-Expires below it)",
    ),
    Key(
        "sip",
        "subscription_expires_max_seconds",
        "86400",
        _integer(1),
        "Longest subscription granted (longer requests are shortened)",
    ),
    Key(
        "sip",
        "max_subscriptions_per_user",
        "100",
        _integer(1, 1_000_000),
        "Subscriptions one authenticated user may hold at once",
    ),
    Key(
        "sip",
        "max_server_transactions",
        "200000",
        _integer(100),
        "Server transactions kept at once; beyond it requests get 503 with Retry-After",
    ),
    Key(
        "sip",
        "overload_lag_ms",
        "50",
        _integer(0, 10_000),
        "Shed load: while even the least of the event loop's recent delays (sampled every"
        " 20 ms) exceeds this many milliseconds, new requests get 503 with Retry-After"
        " instead of queueing, until it falls below half of it (0 turns it off)",
    ),
    Key(
        "sip",
        "max_datagrams_per_source",
        "1000",
        _integer(0, 10_000_000),
        "UDP datagrams taken per second from one source address and port; the rest are"
        " dropped unread, so a flood from a few sources leaves the others answered (0: no"
        " limit)",
    ),
    Key(
        "sip",
        "idle_timeout_seconds",
        "60",
        _integer(1),
        "A TCP/TLS connection over which no request has come closes after this long"
        " without traffic (so does a TLS connect that never starts its handshake)",
    ),
    Key(
        "sip",
        "request_idle_timeout_seconds",
        "300",
        _integer(1),
        "A TCP/TLS connection that has carried a request closes after this long without"
        " traffic; one a registration was made over stays open while it is valid",
    ),
    Key(
        "sip",
        "max_connections",
        "10000",
        _integer(1, 1_000_000),
        "Most TCP/TLS connections open at once; at the limit the one idle the longest"
        " closes to make room (one carrying a valid registration never does)",
    ),
    Key(
        "sip",
        "record_route",
        "yes",
        _boolean,
        "Put the relay in the route of the dialogs an INVITE it proxies sets up"
        " (Record-Route), so the ACK for a 2xx and every in-dialog request cross it;"
        " with no, they go end to end",
    ),
    Key(
        "sip",
        "consent_request",
        "consent",
        _choice(("consent", "message")),
        "How a list member is asked for consent: consent (a CONSENT, and a MESSAGE with"
        " grant and deny links if the member's UA answers 405 or 501) or message (always"
        " the MESSAGE)",
    ),
    Key(
        "sip",
        "ask_list_additions",
        "no",
        _boolean,
        "Ask a member for consent when a list write on this relay adds them to a list"
        " (RFC 5360 section 5.3), by consent_request, for every sender of that list; no:"
        " members are asked only when a sender sends a CONSENT",
    ),
    Key(
        "store",
        "backend",
        "sqlite",
        _choice(("sqlite", "postgresql", "memory")),
        "Permission store: sqlite (durable, one host), postgresql (durable, shared by every"
        " node naming the same database) or memory (lost on restart; tests only)",
    ),
    Key(
        "store",
        "path",
        "",
        _text,
        "SQLite file of the permission store; empty: relay.sqlite3 in data_dir",
    ),
    Key(
        "store",
        "dsn",
        "",
        _text,
        "libpq connection string of the postgresql store, such as"
        " host=db.example.com dbname=relayd user=relayd (required for it, refused otherwise)",
    ),
    Key(
        "metrics",
        "listen",
        "",
        _endpoints(("tcp",)),
        "Metrics listeners (plain HTTP: Prometheus text on /metrics, GET /healthz), one"
        " endpoint string per line; empty: none. Loopback interfaces only unless"
        " allow_remote is set",
    ),
    Key(
        "metrics",
        "allow_remote",
        "no",
        _boolean,
        "Allow metrics listeners on non-loopback interfaces (the page is unauthenticated"
        " and shows traffic volumes: put a firewall or a proxy in front)",
    ),
)

_KEYS: dict[tuple[str, str], Key] = {(k.section, k.name): k for k in SCHEMA}


@dataclass(frozen=True)
class MSRPConfig:
    listen: tuple[str, ...]
    pool_names: tuple[str, ...]
    ca_certificates: str
    session_expires_seconds: int
    session_expires_min_seconds: int
    session_expires_max_seconds: int
    probation_seconds: int
    probation_max_failures: int
    max_failed_auth: int
    transaction_timeout_seconds: int
    idle_timeout_seconds: int
    max_connections: int
    max_chunk_bytes: int
    peer_chunk_bytes: int
    peer_chunk_overrides: tuple[tuple[str, int | None, int], ...]
    send_queue_bytes: int
    block_unknown_methods: bool
    connect_timeout_seconds: int
    max_request_body_bytes: int
    max_line_bytes: int
    max_header_count: int
    max_header_bytes: int


@dataclass(frozen=True)
class AuthConfig:
    realm: str
    users: str
    allowed_users: tuple[str, ...]
    nonce_lifetime_seconds: int


@dataclass(frozen=True)
class TLSConfig:
    certificate: str
    private_key: str


@dataclass(frozen=True)
class XCAPConfig:
    listen: tuple[str, ...]
    root: str
    public_url: str
    admins: tuple[str, ...]
    max_body_bytes: int
    max_header_bytes: int
    header_timeout_seconds: int
    max_connections: int


@dataclass(frozen=True)
class SIPConfig:
    listen: tuple[str, ...]
    domain: str
    lists: str
    max_list_size: int
    max_bindings: int
    consent_requests_per_hour: int
    pending_consent_seconds: int
    subscription_expires_seconds: int
    subscription_expires_min_seconds: int
    subscription_expires_max_seconds: int
    max_subscriptions_per_user: int
    max_server_transactions: int
    overload_lag_ms: int
    max_datagrams_per_source: int
    idle_timeout_seconds: int
    request_idle_timeout_seconds: int
    max_connections: int
    record_route: bool = True
    consent_request: str = "consent"
    ask_list_additions: bool = False


@dataclass(frozen=True)
class StoreConfig:
    backend: str
    path: str
    dsn: str


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, ...]
    allow_remote: bool


@dataclass(frozen=True)
class RelaydConfig:
    hostname: str
    data_dir: str
    msrp: MSRPConfig
    auth: AuthConfig
    tls: TLSConfig
    xcap: XCAPConfig
    store: StoreConfig
    sip: SIPConfig
    metrics: MetricsConfig
    source: str = "<defaults>"
    log_level: str = "info"
    workers: int = 1
    origins: Mapping[tuple[str, str], str] = field(default_factory=dict, compare=False, repr=False)
    """Where each ``(section, key)`` value came from: the file, "command line" or
    "<defaults>"; errors found after loading name that, not just the file."""

    def source_of(self, section: str, key: str) -> str:
        """The origin of one value, for a ``ConfigError`` about it."""
        return self.origins.get((section, key), self.source)


def load_config(
    path: str | None = None,
    overrides: Mapping[tuple[str, str], str] | None = None,
) -> RelaydConfig:
    """Read defaults, then the INI file, then overrides; validate everything.

    Raises ConfigError for the first problem found.
    """
    raw: dict[tuple[str, str], str] = {key: k.default for key, k in _KEYS.items()}
    origin: dict[tuple[str, str], str] = dict.fromkeys(_KEYS, "<defaults>")
    source = "<defaults>"
    if path is not None:
        source = path
        for key, value in _read_ini(path).items():
            raw[key] = value
            origin[key] = path
    for (section, name), value in (overrides or {}).items():
        if (section, name) not in _KEYS:
            raise ConfigError("command line", section, name, "unknown key")
        raw[(section, name)] = value
        origin[(section, name)] = "command line"
    values: dict[tuple[str, str], Any] = {}
    for key, spec in _KEYS.items():
        try:
            values[key] = spec.parse(raw[key])
        except ValueError as e:
            raise ConfigError(origin[key], key[0], key[1], str(e)) from None
    config = _build(values, source, origin)
    _validate(config, origin)
    return config


def _read_ini(path: str) -> dict[tuple[str, str], str]:
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00none")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as e:
        raise ConfigError(path, "", None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", None, "not UTF-8 text") from None
    except configparser.Error as e:
        message = str(e).splitlines()[0]
        raise ConfigError(path, "", None, f"not an INI file: {message}") from None
    sections = {k.section for k in SCHEMA}
    found: dict[tuple[str, str], str] = {}
    for section in parser.sections():
        if section not in sections:
            raise ConfigError(path, section, None, "unknown section")
        for name, value in parser.items(section):
            if (section, name) not in _KEYS:
                raise ConfigError(path, section, name, "unknown key")
            found[(section, name)] = value
    return found


def _build(
    values: Mapping[tuple[str, str], Any], source: str, origin: Mapping[tuple[str, str], str]
) -> RelaydConfig:
    def section(name: str) -> dict[str, Any]:
        return {k: v for (s, k), v in values.items() if s == name}

    relay = section("relay")
    data_dir = str(Path(os.path.expanduser(relay["data_dir"])).absolute())
    return RelaydConfig(
        hostname=relay["hostname"],
        data_dir=data_dir,
        log_level=relay["log_level"],
        workers=relay["workers"],
        msrp=MSRPConfig(**section("msrp")),
        auth=AuthConfig(**section("auth")),
        tls=TLSConfig(**section("tls")),
        xcap=XCAPConfig(**section("xcap")),
        store=StoreConfig(**section("store")),
        sip=SIPConfig(**section("sip")),
        metrics=MetricsConfig(**section("metrics")),
        source=source,
        origins=dict(origin),
    )


def _validate(config: RelaydConfig, origin: Mapping[tuple[str, str], str]) -> None:
    def fail(section: str, key: str, message: str, *related: str) -> None:
        # A cross-key problem is blamed on whichever involved value the
        # operator actually set, not on a built-in default.
        sources = [origin[(section, name)] for name in (key, *related)]
        chosen = next((source for source in sources if source != "<defaults>"), sources[0])
        raise ConfigError(chosen, section, key, message)

    msrp = config.msrp
    if msrp.session_expires_min_seconds > msrp.session_expires_max_seconds:
        fail(
            "msrp",
            "session_expires_min_seconds",
            f"greater than session_expires_max_seconds"
            f" ({msrp.session_expires_min_seconds} > {msrp.session_expires_max_seconds})",
            "session_expires_max_seconds",
        )
    _check_within("msrp", msrp, "session_expires", fail)
    if not msrp.listen:
        fail("msrp", "listen", "at least one listener is required")
    if msrp.ca_certificates and not os.access(msrp.ca_certificates, os.R_OK):
        fail("msrp", "ca_certificates", f"cannot read {msrp.ca_certificates!r}")
    for key in ("certificate", "private_key"):
        value = getattr(config.tls, key)
        if value and not os.access(value, os.R_OK):
            fail("tls", key, f"cannot read {value!r}")
    if bool(config.tls.certificate) != bool(config.tls.private_key):
        missing = "certificate" if not config.tls.certificate else "private_key"
        other = "private_key" if missing == "certificate" else "certificate"
        fail("tls", missing, f"must be set together with {other}", other)
    for value in msrp.listen:
        _check_listener_files("msrp", parse_endpoint(value), fail)
    users = config.auth.users
    if users and os.path.exists(users) and not os.access(users, os.R_OK):
        fail("auth", "users", f"cannot read {users!r}")
    _validate_xcap(config.xcap, fail)
    _validate_sip(config.sip, fail)
    _validate_store(config.store, fail)
    _validate_metrics(config.metrics, fail)
    if config.workers > 1:
        _validate_workers(config, fail)


def _check_listener_files(
    section: str, endpoint: EndpointSpec, fail: Callable[[str, str, str], None]
) -> None:
    """The files a listener's TLS options name must be readable, whichever service
    listens: a daemon that cannot read them would fail only when it binds."""
    for option in ("privateKey", "certKey", "extraCertChain"):
        file_name = endpoint.options.get(option)
        if file_name and not os.access(file_name, os.R_OK):
            fail(section, "listen", f"{option}: cannot read {file_name!r}")


def _check_within(section: str, values: Any, prefix: str, fail: Callable[..., None]) -> None:
    """``<prefix>_seconds``, the expiry used when a peer asks for none, must lie within
    the ``<prefix>_min_seconds``..``<prefix>_max_seconds`` a peer may ask for."""
    name, low, high = (
        f"{prefix}{suffix}" for suffix in ("_seconds", "_min_seconds", "_max_seconds")
    )
    least, most = getattr(values, low), getattr(values, high)
    if not least <= getattr(values, name) <= most:
        fail(section, name, f"must lie between {low} and {high} ({least}..{most})", low, high)


def _validate_sip(sip: SIPConfig, fail: Callable[..., None]) -> None:
    """Expiry bounds in order, readable files, at least one listener."""
    if not sip.listen:
        fail("sip", "listen", "at least one listener is required")
    for value in sip.listen:
        _check_listener_files("sip", parse_endpoint(value), fail)
    if sip.lists and not os.access(sip.lists, os.R_OK):
        fail("sip", "lists", f"cannot read {sip.lists!r}")
    _check_within("sip", sip, "subscription_expires", fail)


def _validate_store(store: StoreConfig, fail: Callable[..., None]) -> None:
    """A DSN exactly when the backend is postgresql, one libpq can parse, and the driver
    (the ``postgresql`` extra) installed: found at load, not at the first request."""
    if store.backend != "postgresql":
        if store.dsn:
            fail("store", "dsn", f"only used with backend = postgresql, not {store.backend}")
        return
    if not store.dsn:
        fail("store", "dsn", "required with backend = postgresql", "backend")
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        fail("store", "backend", "postgresql needs psycopg: pip install 'relayd[postgresql]'")
        return
    try:
        conninfo_to_dict(store.dsn)
    except ProgrammingError as e:
        fail("store", "dsn", f"not a libpq connection string: {str(e).strip()}")


def is_loopback_interface(interface: str) -> bool:
    """Whether a listener ``interface`` is a loopback address (empty means all: no)."""
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def _validate_xcap(xcap: XCAPConfig, fail: Callable[[str, str, str], None]) -> None:
    """Plain HTTP carries digest exchanges and capability URIs in clear: loopback only."""
    if not xcap.listen:
        fail("xcap", "listen", "at least one listener is required")
    for value in xcap.listen:
        endpoint = parse_endpoint(value)
        if endpoint.kind == "tcp" and not is_loopback_interface(endpoint.interface):
            fail(
                "xcap",
                "listen",
                f"{value!r}: plain HTTP (tcp:) is only allowed with a loopback interface"
                " such as interface=127.0.0.1; use ssl:",
            )
        _check_listener_files("xcap", endpoint, fail)
    root = xcap.root
    if not root.startswith("/") or any(ch in root for ch in "?#% \t") or "/~~" in root:
        fail("xcap", "root", f"must be an absolute path without ?, #, % or ~~, got {root!r}")
    if "//" in root or "/../" in root + "/" or "/./" in root + "/":
        fail("xcap", "root", f"must be a normalised path, got {root!r}")
    if xcap.public_url:
        parts = urlsplit(xcap.public_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            fail("xcap", "public_url", f"must be an http(s) URL, got {xcap.public_url!r}")
        if parts.query or parts.fragment:
            fail("xcap", "public_url", "must not have a query or fragment")


def _validate_workers(config: RelaydConfig, fail: Callable[..., None]) -> None:
    """Several workers share SIP and XCAP ports (so each must be fixed), take one MSRP and
    metrics port each (base + K must exist) and one store (memory is per process)."""
    if config.store.backend == "memory":
        fail(
            "store",
            "backend",
            f"memory keeps one store per process; with workers = {config.workers} use sqlite"
            " or postgresql",
        )
    for section, listen in (("sip", config.sip.listen), ("xcap", config.xcap.listen)):
        for value in listen:
            if parse_endpoint(value).port == 0:
                fail(
                    section,
                    "listen",
                    f"{value!r}: workers share this listener, so its port must be fixed (not 0)",
                )
    for section, listen in (("msrp", config.msrp.listen), ("metrics", config.metrics.listen)):
        for value in listen:
            port = parse_endpoint(value).port
            if port and port + config.workers - 1 > 65535:
                fail(
                    section,
                    "listen",
                    f"{value!r}: worker {config.workers - 1} would listen on port"
                    f" {port + config.workers - 1}",
                )
    _check_worker_ports(config, fail)


def _check_worker_ports(config: RelaydConfig, fail: Callable[..., None]) -> None:
    """No two listeners of the workers on one port: worker K takes each MSRP and metrics
    port plus K, so ``ssl:2855`` and ``tcp:2856`` collide from two workers on."""
    taken: list[tuple[str, str, int, str, str, int]] = []
    shared = (("sip", config.sip.listen), ("xcap", config.xcap.listen))
    own = (("msrp", config.msrp.listen), ("metrics", config.metrics.listen))
    for section, listen in shared:
        for value in listen:
            spec = parse_endpoint(value)
            taken.append((section, value, -1, spec.kind, spec.interface, spec.port))
    for section, listen in own:
        for value in listen:
            spec = parse_endpoint(value)
            if spec.port:
                for worker in range(config.workers):
                    port = spec.port + worker
                    taken.append((section, value, worker, spec.kind, spec.interface, port))
    for index, (section, value, worker, kind, interface, port) in enumerate(taken):
        for other_section, other, other_worker, other_kind, other_interface, other_port in taken[
            :index
        ]:
            same_protocol = (kind == "udp") == (other_kind == "udp")
            overlap = interface == other_interface or "" in (interface, other_interface)
            if same_protocol and overlap and port == other_port:
                whose = "every worker" if worker < 0 else f"worker {worker}"
                theirs = "every worker" if other_worker < 0 else f"worker {other_worker}"
                fail(
                    section,
                    "listen",
                    f"{value!r} gives {whose} port {port}, which {other!r}"
                    f" ([{other_section}] listen) gives {theirs}: with workers ="
                    f" {config.workers}, space the ports of [msrp] and [metrics] listeners"
                    f" at least {config.workers} apart",
                )


def _validate_metrics(metrics: MetricsConfig, fail: Callable[..., None]) -> None:
    """The metrics page has no authentication: loopback only unless the operator says so."""
    if metrics.allow_remote:
        return
    for value in metrics.listen:
        if not is_loopback_interface(parse_endpoint(value).interface):
            fail(
                "metrics",
                "listen",
                f"{value!r}: only a loopback interface such as interface=127.0.0.1,"
                " unless allow_remote = yes",
                "allow_remote",
            )


def example_ini() -> str:
    """The documented example file, generated from the schema."""
    lines: list[str] = [
        "# relayd configuration: every key with its built-in default.",
        "# Copy to relayd.ini, change what you need and start with",
        "#   twistd -n msrprelay --config relayd.ini",
        "# Durations are whole seconds; listeners are endpoint strings, one per line.",
    ]
    section = ""
    for key in SCHEMA:
        if key.section != section:
            section = key.section
            lines += ["", f"[{section}]"]
        lines.append(f"# {key.help}")
        lines.append(f"{key.name} = {key.default}".rstrip())
    return "\n".join(lines) + "\n"
