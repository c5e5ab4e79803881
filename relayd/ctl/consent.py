"""``relayctl consent``: the sender's part of the consent flow, pure parts (RFC 5360 §5.6-§5.7).

The relay offers no way to learn who is missing without sending: a MESSAGE to a list
is delivered when everyone consents. So ``consent request`` takes the consent URIs of
a ``470 Consent Needed`` the sender already got (its ``Permission-Missing`` rows, or
the URIs themselves) and sends one CONSENT per URI; ``consent watch`` reads the
``wait-permission`` NOTIFY bodies (docs/consent.md) and decides when to stop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from lxml import etree
from twisted.internet import defer

from relayd.consent.vocabulary import CONSENT_STATUS_NAMESPACE
from relayd.ctl.render import render_json
from relayd.ctl.settings import CtlError
from relayd.ctl.sipua import SIPUserAgent
from relayd.sip.message import SIPResponse, new_tag, split_header_values
from relayd.sipuri import NameAddr, SIPURIError

MAX_STATUS_BODY = 65536
"""Largest NOTIFY body read: one wait-permission document holds one consent."""

_METHOD_RE = re.compile(r"[A-Z]+")

UNSUBSCRIBE_WAIT_SECONDS = 4.0
"""How long a finished watch waits for each unsubscribe's answer before exiting."""

SETTLED_BAD = frozenset({"denied", "expired", "revoked"})
"""States after which waiting longer cannot end in a grant (docs/consent.md)."""


def consent_uris(text: str) -> list[str]:
    """The consent URIs in pasted 470 text or plain URIs, in order, each once.

    A line ``Permission-Missing: <uri>, <uri>`` (any case, RFC 5360 §5.6) gives its
    name-addrs, a line starting ``sip:``, ``sips:`` or ``<`` is one URI, other lines of
    a pasted response are skipped. A bad URI is one clear error.
    """
    found: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        name, colon, rest = line.partition(":")
        if colon and name.strip().lower() == "permission-missing":
            values = split_header_values(rest.strip())
        elif line.lower().startswith(("sip:", "sips:", "<")):
            values = [line]
        else:
            continue  # blank, or another line of the pasted response
        for value in values:
            try:
                uri = NameAddr.parse(value).uri.format()
            except SIPURIError as e:
                raise CtlError(f"not a consent URI: {value!r} ({e})") from None
            if uri not in found:
                found.append(uri)
    if not found:
        raise CtlError("no consent URIs given (paste the 470's Permission-Missing lines)")
    return found


def consent_methods(text: str) -> str:
    """The ``Consent-Methods`` value for ``--methods MESSAGE,INVITE`` (RFC 5360 §5.7)."""
    methods = [m.strip().upper() for m in text.split(",") if m.strip()]
    if not methods or not all(_METHOD_RE.fullmatch(m) for m in methods):
        raise CtlError(f"--methods: give SIP methods separated by commas, got {text!r}")
    return ", ".join(dict.fromkeys(methods))


@dataclass(frozen=True)
class ConsentState:
    """One consent as a wait-permission NOTIFY reports it."""

    recipient: str
    list_uri: str
    methods: str
    state: str

    def line(self, watched: str) -> str:
        return f"{self.recipient}: {self.state} ({self.methods} via {self.list_uri}) [{watched}]"

    def as_json(self, watched: str) -> dict[str, Any]:
        return {
            "watch": watched,
            "recipient": self.recipient,
            "list": self.list_uri,
            "methods": self.methods.split(),
            "state": self.state,
        }


def status_states(body: bytes) -> list[ConsentState]:
    """The ``<consent>`` entries of a consent-status document (docs/consent.md)."""
    if len(body) > MAX_STATUS_BODY:
        raise CtlError(f"NOTIFY body over {MAX_STATUS_BODY} bytes")
    try:
        root = etree.fromstring(body, parser=etree.XMLParser(resolve_entities=False))
    except etree.XMLSyntaxError as e:
        raise CtlError(f"unreadable NOTIFY body: {e}") from None
    ns = f"{{{CONSENT_STATUS_NAMESPACE}}}"
    if root.tag != ns + "consent-status":
        raise CtlError(f"NOTIFY body is not a consent-status document: {root.tag}")
    return [
        ConsentState(
            entry.get("recipient", ""),
            entry.get("list", ""),
            entry.get("methods", ""),
            entry.get("state", ""),
        )
        for entry in root.iter(ns + "consent")
    ]


def verdict(latest: Iterable[list[ConsentState] | None]) -> bool | None:
    """``True`` once every watched consent is granted, ``False`` when one can no
    longer be (denied, expired, revoked, or gone), ``None`` while any is undecided.

    ``None`` in ``latest`` is a watch with no NOTIFY yet."""
    undecided = False
    for states in latest:
        if states is None:
            undecided = True
        elif not states or any(s.state in SETTLED_BAD for s in states):
            return False
        elif any(s.state != "granted" for s in states):
            undecided = True
    return None if undecided else True


def change_lines(
    watched: str, before: list[ConsentState] | None, after: list[ConsentState], as_json: bool
) -> list[str]:
    """What a watch prints for one NOTIFY: a line per consent whose state changed, or
    one saying the consent is gone (a wait-permission body without one)."""
    if not after:
        if as_json:
            return [json.dumps({"watch": watched, "state": "gone"}, sort_keys=True)]
        return [f"{watched}: no such consent (gone)"]
    seen = {(s.recipient, s.list_uri): s.state for s in before or []}
    return [
        json.dumps(state.as_json(watched), sort_keys=True) if as_json else state.line(watched)
        for state in after
        if seen.get((state.recipient, state.list_uri)) != state.state
    ]


def wait_uri(response: SIPResponse) -> str | None:
    """The ``Call-Info`` URI with ``purpose=wait-permission`` of a 202 (seed §5)."""
    for value in response.headers.get_all("call-info"):
        try:
            info = NameAddr.parse(value)
        except SIPURIError:
            continue
        if (info.param("purpose") or "").lower() == "wait-permission":
            return info.uri.format()
    return None


def request_line(consent_uri: str, response: SIPResponse, wait: str | None) -> str:
    line = f"{consent_uri}: {response.status} {response.reason}"
    return f"{line}\n  wait-permission: {wait}" if wait else line


async def run_request(
    client: SIPUserAgent, uris: list[str], methods: str, as_json: bool, out: TextIO
) -> None:
    """One CONSENT per consent URI (seed §5, RFC 5360 §5.7); each answer printed.

    A CONSENT that is not accepted (2xx) fails the command after all were sent."""
    answers: list[dict[str, Any]] = []
    refused = 0
    for uri in uris:
        response = await client.request(
            "CONSENT", uri, [("Consent-Methods", methods)], to=f"<{uri}>"
        )
        wait = wait_uri(response) if 200 <= response.status < 300 else None
        refused += wait is None
        answers.append(
            {"consent": uri, "status": response.status, "reason": response.reason, "wait": wait}
        )
        if not as_json:
            out.write(request_line(uri, response, wait) + "\n")
    if as_json:
        out.write(render_json(answers))
    out.flush()
    if refused:
        raise CtlError(f"{refused} of {len(uris)} consent requests not accepted")


@dataclass
class _Watch:
    uri: str
    call_id: str
    from_tag: str
    to: str | None = None
    target: str | None = None
    states: list[ConsentState] | None = None


async def run_watch(
    client: SIPUserAgent, uris: list[str], expires: int, as_json: bool, out: TextIO
) -> None:
    """SUBSCRIBE (Event: wait-permission) to each URI and print every change of state
    until all are granted; one that is denied, expired, revoked or gone, or the
    client's deadline, fails the command (RFC 6665 §4.1, docs/consent.md)."""
    watches: dict[str, _Watch] = {}
    try:
        for uri in uris:
            watch = _Watch(uri, new_tag(), new_tag())
            response = await _subscribe(client, watch, expires)
            minimum = response.headers.get("min-expires") or ""
            if response.status == 423 and minimum.isdigit():  # RFC 6665 §4.1.2.1
                response = await _subscribe(client, watch, int(minimum))
            if not 200 <= response.status < 300:
                raise CtlError(f"SUBSCRIBE {uri}: {response.status} {response.reason}")
            watch.to = response.headers.get("to")
            contact = response.headers.get("contact")
            watch.target = NameAddr.parse(contact).uri.format() if contact else uri
            watches[watch.call_id] = watch
        await _follow(client, watches, as_json, out)
    finally:
        await _unsubscribe(client, watches.values())


async def _subscribe(client: SIPUserAgent, watch: _Watch, expires: int) -> SIPResponse:
    return await client.request(
        "SUBSCRIBE",
        watch.uri,
        [("Event", "wait-permission"), ("Expires", str(expires))],
        to=f"<{watch.uri}>",
        call_id=watch.call_id,
        from_tag=watch.from_tag,
    )


async def _follow(
    client: SIPUserAgent, watches: dict[str, _Watch], as_json: bool, out: TextIO
) -> None:
    deadline = client.reactor.seconds() + client.deadline_seconds
    while True:
        left = deadline - client.reactor.seconds()
        if left <= 0:
            raise CtlError("timed out waiting for every consent to be granted")
        try:
            notify = await client.notifications.get().addTimeout(left, client.reactor)
        except defer.TimeoutError:
            raise CtlError("timed out waiting for every consent to be granted") from None
        watch = watches.get(notify.call_id or "")
        if watch is None:
            continue
        states = status_states(notify.body)
        for line in change_lines(watch.uri, watch.states, states, as_json):
            out.write(line + "\n")
        out.flush()
        watch.states = states
        decided = verdict(w.states for w in watches.values())
        if decided is True:
            return
        if decided is False:
            raise CtlError("a consent was not granted")
        terminated = (notify.headers.get("subscription-state") or "").lower()
        if terminated.startswith("terminated"):
            raise CtlError(f"{watch.uri}: subscription ended ({terminated})")


async def _unsubscribe(client: SIPUserAgent, watches: Iterable[_Watch]) -> None:
    """End each subscription (Expires: 0, RFC 6665 §4.1.2.3); failures only cost the
    relay a NOTIFY that goes unanswered."""
    for watch in watches:
        try:
            await client.request(
                "SUBSCRIBE",
                watch.target or watch.uri,
                [("Event", "wait-permission"), ("Expires", "0")],
                to=watch.to,
                call_id=watch.call_id,
                from_tag=watch.from_tag,
                wait_seconds=UNSUBSCRIBE_WAIT_SECONDS,
            )
        except CtlError:
            pass
