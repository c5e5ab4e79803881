"""``relayctl status``: the relay's health and main counts, from its metrics listener.

Reads ``/healthz`` (JSON, 200 healthy or 503) and ``/metrics`` (parsed with
prometheus_client's parser) at ``[metrics] listen`` of ``--config``, or ``--url``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import urlsplit

import treq
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.web.client import Agent, HTTPConnectionPool

from relayd.config import ConfigError, load_config
from relayd.ctl.settings import CtlError
from relayd.net.endpoints import EndpointSyntaxError, parse_endpoint

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Every sample of a scrape: (name, sorted labels) -> value."""


def default_url(config_path: str | None) -> str:
    """``http://<interface>:<port>`` of the first ``[metrics] listen`` endpoint."""
    try:
        config = load_config(config_path)
    except ConfigError as e:
        raise CtlError(str(e)) from None
    if not config.metrics.listen:
        where = config_path or "the default configuration"
        raise CtlError(f"[metrics] listen is not set in {where}: give --config or --url")
    try:
        spec = parse_endpoint(config.metrics.listen[0])
    except EndpointSyntaxError as e:  # pragma: no cover  (load_config checked it)
        raise CtlError(f"[metrics] listen: {e}") from None
    wildcard = spec.interface in ("", "0.0.0.0", "::")  # noqa: S104 - compared with
    host = "127.0.0.1" if wildcard else spec.interface
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{spec.port}"


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise CtlError(f"bad --url {url!r}: expected http://host:port of [metrics] listen")
    return url.rstrip("/")


def parse_samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _total(samples: Samples, name: str, **labels: str) -> int:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return int(sum(v for (n, found), v in samples.items() if n == name and wanted <= set(found)))


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{hours}h {minutes:02d}m {seconds:02d}s"
    return f"{days}d {text}" if days else text


COUNTS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("MSRP", "connections", "relayd_msrp_connections", {}),
    ("MSRP", "sessions", "relayd_msrp_sessions", {}),
    ("MSRP", "requests relayed", "relayd_msrp_relayed_total", {}),
    ("MSRP", "bytes received", "relayd_msrp_received_bytes_total", {}),
    ("SIP", "connections", "relayd_sip_connections", {}),
    ("SIP", "registrations", "relayd_sip_registrations", {}),
    ("SIP", "subscriptions", "relayd_sip_subscriptions", {}),
    ("SIP", "transactions", "relayd_sip_transactions", {}),
    ("SIP", "requests received", "relayd_sip_requests_total", {"direction": "received"}),
    ("SIP", "answered 470", "relayd_sip_consent_needed_total", {}),
    ("SIP", "shed (503)", "relayd_sip_shed_total", {}),
    ("XCAP", "requests", "relayd_xcap_requests_total", {}),
    ("consents", "pending", "relayd_consents", {"state": "pending"}),
    ("consents", "granted", "relayd_consents", {"state": "granted"}),
    ("consents", "denied", "relayd_consents", {"state": "denied"}),
)
"""What ``status`` shows of a scrape: (surface, what, metric, labels)."""


def counts(samples: Samples) -> dict[str, dict[str, int]]:
    """The main counts of a scrape, by surface (consents only when the store answered)."""
    found: dict[str, dict[str, int]] = {}
    names = {name for name, _ in samples}
    for surface, what, name, labels in COUNTS:
        if name in names:
            found.setdefault(surface, {})[what] = _total(samples, name, **labels)
    return found


def render(report: Mapping[str, Any], samples: Samples | None) -> list[str]:
    """The lines ``relayctl status`` prints for a health report and a scrape."""
    lines = [
        f"relayd {report['version']} (Python {report['python']}, Twisted {report['twisted']}):"
        f" {report['status']}",
        f"uptime: {_duration(int(report['uptime_seconds']))}",
    ]
    for label, listener in report["listeners"].items():
        state = "up" if listener["up"] else "DOWN"
        lines.append(f"listener {label}: {state} {', '.join(listener['addresses'])}".rstrip())
    store = report["store"]
    lines.append(f"store: {store['backend']}, {'up' if store['up'] else 'DOWN'}")
    for surface, values in counts(samples or {}).items():
        lines.append(f"{surface}: " + ", ".join(f"{v} {what}" for what, v in values.items()))
    lines += [f"problem: {problem}" for problem in report["problems"]]
    return lines


async def run_status(reactor: Any, url: str, timeout: float, as_json: bool, out: TextIO) -> None:
    """Print the status; a relay that is not healthy is a failure (exit 1)."""
    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    async def get(path: str) -> tuple[int, bytes]:
        try:
            response = await http.get(url + path).addTimeout(timeout, reactor)
            body: bytes = await treq.content(response).addTimeout(timeout, reactor)
        except (ConnectError, DNSLookupError) as e:
            raise CtlError(f"cannot reach the relay's metrics listener at {url}: {e}") from None
        return int(response.code), body

    code, body = await get("/healthz")
    try:
        report = json.loads(body)
        report["status"]
    except (ValueError, KeyError, TypeError):
        raise CtlError(f"{url}/healthz: not a relayd health report (HTTP {code})") from None
    metrics_code, text = await get("/metrics")
    samples = parse_samples(text.decode()) if metrics_code == 200 else None
    if as_json:
        document = {"health": report, "counts": counts(samples or {})}
        out.write(json.dumps(document, indent=2) + "\n")
    else:
        out.write("".join(line + "\n" for line in render(report, samples)))
    out.flush()
    if report["status"] != "ok":
        raise CtlError("the relay is not healthy")
